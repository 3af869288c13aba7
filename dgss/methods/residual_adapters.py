"""Low-rank adapters initialised from a frozen weight's own directions, shared by SoMA (its minor singular
components) and RecycleLoRA (its pivoted-QR directions).

Both papers write the frozen residual ``W_res = W − s·B·A`` into the weight and train A, B from there. dgss keeps W
untouched and stores A₀ = A(0), B₀ = B(0) as frozen persistent buffers, computing the same function as

    y = x Wᵀ + b + s·((x Aᵀ) Bᵀ − (x A₀ᵀ) B₀ᵀ)

so the model at step 0 is the pretrained one bit for bit, a checkpoint re-attaches W from its weights file and
restores A, B, A₀, B₀ with no decomposition at load (``initialise=False``), and folding gives
W' = W + s·(B·A − B₀·A₀) = W_res + s·B·A, a plain ``nn.Linear`` (``dgss-merge --backbone-out``).

A wrapper (a module holding the frozen layer and its adapters) offers ``weights()`` — (the weight an adapter
decomposes, the adapter) pairs —, ``frozen_layer()`` and ``fold()``; :func:`fold_wrappers` folds every wrapper of a
model copy.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from dgss.methods.base import SegmentationMethod


class ResidualAdapter(nn.Module):
    """x ↦ s·((x Aᵀ) Bᵀ − (x A₀ᵀ) B₀ᵀ): A, B train; A₀, B₀ (their values at step 0, or zeros where the start
    keeps W, e.g. SoMA's ``init: official``) are frozen persistent buffers."""

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float):
        super().__init__()
        self.scale = scale
        self.A = nn.Parameter(torch.zeros(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        self.register_buffer("A0", torch.zeros(rank, in_features))
        self.register_buffer("B0", torch.zeros(out_features, rank))
        self.subtract = True  # False where A₀ = B₀ = 0: the subtraction is skipped

    @torch.no_grad()
    def initialise(self, a: torch.Tensor, b: torch.Tensor, subtract: bool = True) -> None:
        self.A.copy_(a)
        self.B.copy_(b)
        self.subtract = subtract
        self.A0.copy_(a if subtract else torch.zeros_like(a))
        self.B0.copy_(b if subtract else torch.zeros_like(b))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x @ self.A.t().to(x.dtype)) @ self.B.t().to(x.dtype)
        if self.subtract:
            y = y - (x @ self.A0.t().to(x.dtype)) @ self.B0.t().to(x.dtype)
        return self.scale * y

    @torch.no_grad()
    def weight_delta(self) -> torch.Tensor:
        """s·(B·A − B₀·A₀): what the adapter adds to the frozen weight."""
        return self.scale * (self.B @ self.A - self.B0 @ self.A0)


def linear_like(layer: nn.Linear, weight: torch.Tensor) -> nn.Linear:
    """A plain ``nn.Linear`` on ``layer``'s device with ``weight`` and a copy of ``layer``'s bias."""
    out = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    with torch.no_grad():
        out.weight.copy_(weight)
        if layer.bias is not None:
            out.bias.copy_(layer.bias)
    return out.to(layer.weight.device)


def fold_wrappers(model: nn.Module, wrapper_types: tuple[type, ...]) -> nn.Module:
    """A copy of ``model`` with every wrapper of ``wrapper_types`` replaced by its ``fold()``: a plain model."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, wrapper_types):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, module.fold())
    return model


class ResidualAdapterMethod(SegmentationMethod):
    """What SoMA and RecycleLoRA share as methods: a frozen backbone (eval mode) whose wrappers (``self.wrappers``,
    of ``wrapper_types``) train their adapters' A, B (and optionally the wrapped layers' biases); A₀, B₀ stay in
    checkpoints (they are not in the backbone's weights file); the plain backbone folds every wrapper."""

    wrapper_types: tuple[type, ...] = ()

    def train_wrappers(self, wrappers: list[nn.Module], train_bias: bool) -> None:
        """Adopt ``wrappers`` (the trainer's mode inside the frozen backbone) and train their adapters' A, B."""
        self.wrappers = wrappers
        for w in wrappers:
            self.adopt(w)
            for _, adapter in w.weights():
                adapter.A.requires_grad_(True)
                adapter.B.requires_grad_(True)
            bias = w.frozen_layer().bias
            if train_bias and bias is not None:
                bias.requires_grad_(True)

    def adapters(self) -> list[ResidualAdapter]:
        return [a for w in self.wrappers for _, a in w.weights()]

    def reattachable_keys(self) -> set[str]:
        """A₀, B₀ are buffers of the backbone but not in its weights file: they stay in the checkpoint."""
        return {k for k in super().reattachable_keys() if not k.endswith((".A0", ".B0"))}

    def plain_backbone(self) -> nn.Module:
        """The backbone's timm model with every wrapper folded: W' = W + s·(B·A − B₀·A₀) (a copy)."""
        return fold_wrappers(self.backbone.model, self.wrapper_types)
