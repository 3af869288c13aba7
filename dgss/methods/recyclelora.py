"""RecycleLoRA (CVPR 2026 Findings, arXiv 2603.28142): two low-rank adapters on every linear layer of the frozen
backbone, initialised from a column-pivoted (rank-revealing) QR of its pretrained weight. Paper: CVPR'26 Findings,
https://arxiv.org/abs/2603.28142; official code https://github.com/chanseul01/RecycleLoRA (``rein/models/backbones/recyclelora_linear.py``,
``dino_v2_recyclelora.py``; read for its facts, reimplemented here).

For W (out × in), scipy's ``linalg.qr(W, pivoting=True, mode="economic")`` gives W P = Q R with n = min(out, in)
columns of Q, ordered by pivot importance. The **main** adapter (r_main = 32) takes the last r_main columns of Q
(the minor pivoted directions) as B and, as A, the 0/1 matrix selecting the matching input columns
(A[i, P[n − r_main + i]] = 1); the **sub** adapter (r_sub = r_max − r_main = 4) the first r_sub columns of Q and
pivots. Both scale by s = α / r_max (1/36). The official layer writes W_res = W − s·(B_main A_main + B_sub A_sub) into
the weight and computes x W_resᵀ + b + s·(x A_mainᵀ) B_mainᵀ + s·(x A_subᵀ) B_subᵀ; dgss keeps W and frozen copies
A₀, B₀ (:mod:`dgss.methods.residual_adapters`, shared with SoMA), the same function with an exact identity at step 0,
restoring without a QR, and folding to a plain timm backbone (``dgss-merge --backbone-out``).

Placement as the official ``replace_linear_layers``: every ``nn.Linear`` inside the blocks (a fused qkv as **one**
matrix, attn.proj, mlp.fc1 / fc2, SwiGLU's fc1_g / fc1_x), in every block from ``start_block`` (0: all 24); biases
frozen (``bias_tune=False``); no dropout. The official backbone also marks its ``mask_token`` trainable (the 1,024 in
its count of 14,155,776 + 1,024 on DINOv2-L); no forward reads it (masked-image modelling only), so it never changes
there, and timm's DINOv2 has none: dgss trains 14,155,776 backbone parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import linalg
from torch import nn

from dgss.errors import ConfigError
from dgss.methods.base import MethodConfig
from dgss.methods.residual_adapters import ResidualAdapter, ResidualAdapterMethod, linear_like
from dgss.options import Options, register


@dataclass
class RecycleLoRAOptions(Options):
    """``method.recyclelora``: the official recipe's values (``configs/_base_/models/
    recyclelora_dinov2_mask2former.py``) unless marked ours."""

    r_max: int = 36  # r: both adapters together
    r_main: int = 32  # the minor directions' adapter; the sub adapter gets r_max - r_main (4)
    alpha: float = 1.0  # s = alpha / r_max
    start_block: int = 0  # n_skip_layers: blocks before it stay plain and frozen
    train_bias: bool = False  # bias_tune

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.r_main <= self.r_max or self.r_max < 1:
            raise ConfigError(f"method.recyclelora: need 0 <= r_main <= r_max and r_max >= 1; got r_max="
                              f"{self.r_max}, r_main={self.r_main}")  # fmt: skip

    @property
    def r_sub(self) -> int:
        return self.r_max - self.r_main

    @property
    def scale(self) -> float:
        return self.alpha / self.r_max


@dataclass
class RecycleLoRAConfig(MethodConfig):
    _target_: str = "dgss.methods.recyclelora.RecycleLoRA"
    recyclelora: RecycleLoRAOptions = field(default_factory=RecycleLoRAOptions)


# ------------------------------------------------------------------------------------------ pure function
def pivoted_qr_factors(
    weight: torch.Tensor, r_main: int, r_sub: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The adapters' (A, B) from one column-pivoted QR of ``weight`` (float32, scipy, economic): ``main`` the last
    ``r_main`` columns of Q with the selection of their pivots, ``sub`` the first ``r_sub``. A is (r × in) with a single
    1 per row, B (out × r) orthonormal columns.

    >>> w = torch.tensor([[1.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    >>> f = pivoted_qr_factors(w, 1, 1)
    >>> f["sub"][0].tolist(), f["main"][0].tolist()  # the largest column first, the smallest kept one last
    ([[0.0, 1.0, 0.0]], [[1.0, 0.0, 0.0]])
    """
    q, _, piv = linalg.qr(weight.detach().float().cpu().numpy(), pivoting=True, mode="economic")
    n = q.shape[1]
    out = {}
    for name, r, cols in (
        ("main", r_main, slice(n - min(r_main, n), n)),
        ("sub", r_sub, slice(0, min(r_sub, n))),
    ):
        if r < 1:
            continue
        picked = piv[cols]
        a = np.zeros((len(picked), weight.shape[1]), dtype=np.float32)
        a[np.arange(len(picked)), picked] = 1.0
        out[name] = (
            torch.from_numpy(a),
            torch.from_numpy(np.ascontiguousarray(q[:, cols], dtype=np.float32)),
        )
    return out


# ------------------------------------------------------------------------------------------------ module
class RecycleLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus the main and sub adapters (``lora_main``, ``lora_sub``; either may be absent at
    rank 0): y = base(x) + lora_main(x) + lora_sub(x)."""

    def __init__(self, base: nn.Linear, r_main: int, r_sub: int, scale: float):
        super().__init__()
        self.base = base
        n = min(base.in_features, base.out_features)
        self.lora_main = (
            ResidualAdapter(base.in_features, base.out_features, min(r_main, n), scale) if r_main else None
        )
        self.lora_sub = (
            ResidualAdapter(base.in_features, base.out_features, min(r_sub, n), scale) if r_sub else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for adapter in (self.lora_main, self.lora_sub):
            if adapter is not None:
                y = y + adapter(x)
        return y

    def weights(self) -> list[tuple[torch.Tensor, ResidualAdapter]]:
        return [(self.base.weight, a) for a in (self.lora_main, self.lora_sub) if a is not None]

    def frozen_layer(self) -> nn.Linear:
        return self.base

    @torch.no_grad()
    def initialise(self) -> None:
        """The adapters from the pivoted QR of the frozen weight; A₀, B₀ their copies (exact identity)."""
        factors = pivoted_qr_factors(self.base.weight, self.lora_main.A.shape[0] if self.lora_main else 0,
                                     self.lora_sub.A.shape[0] if self.lora_sub else 0)  # fmt: skip
        for name, adapter in (("main", self.lora_main), ("sub", self.lora_sub)):
            if adapter is not None:
                a, b = factors[name]
                adapter.initialise(a.to(self.base.weight.device), b.to(self.base.weight.device))

    @torch.no_grad()
    def fold(self) -> nn.Linear:
        """The plain layer with W' = W + Σ s·(B·A − B₀·A₀) = W_res + s·(B_main A_main + B_sub A_sub)."""
        w = self.base.weight.detach().clone()
        for _, adapter in self.weights():
            w += adapter.weight_delta().to(w.dtype)
        return linear_like(self.base, w)


def wrap_recyclelora(
    backbone, options: RecycleLoRAOptions, initialise: bool = True
) -> list[RecycleLoRALinear]:
    """RecycleLoRA's wrappers on every ``nn.Linear`` of blocks ``start_block``… of ``backbone`` (block order);
    ``initialise=False`` (a checkpoint will fill A, B, A₀, B₀) runs no QR."""
    if not 0 <= options.start_block < backbone.num_blocks:
        raise ConfigError(f"method.recyclelora.start_block={options.start_block} is outside the backbone's "
                          f"{backbone.num_blocks} blocks")  # fmt: skip
    wrappers: list[RecycleLoRALinear] = []
    for i in range(options.start_block, backbone.num_blocks):
        parts = backbone.block_parts(i)
        if parts.qkv is not None:
            backbone.require_wrappable_qkv(parts, "RecycleLoRA")
        block = backbone.model.blocks[i]
        for name, layer in list(block.named_modules()):
            if type(layer) is not nn.Linear:
                continue
            w = RecycleLoRALinear(layer, options.r_main, options.r_sub, options.scale)
            if initialise:
                w.initialise()
            parent, _, attr = name.rpartition(".")
            setattr(block.get_submodule(parent), attr, w)
            wrappers.append(w)
    return wrappers


# ------------------------------------------------------------------------------------------------ method
class RecycleLoRA(ResidualAdapterMethod):
    """Frozen backbone (eval mode); the main and sub adapters of every block's linear layers train with the head.
    Options: :class:`RecycleLoRAOptions` (``method.recyclelora``)."""

    # configs/dinov2/g2cbm_recyclelora_dinov2_mask2former.py paramwise_cfg: backbone lr x 0.5; the main adapter at
    # lr x 1 and the sub adapter at lr x 0.5, both without decay; norms, query and level embeddings without decay
    # (every method's defaults, dgss.methods.paramwise). The official keys lora_A_main, lora_B_main, lora_A_sub,
    # lora_B_sub are dgss's lora_main.A ...: longer than "backbone", so they win (longest key first)
    recipe_custom_keys = {
        "backbone": {"lr_mult": 0.5, "decay_mult": 1.0},
        **{f"lora_main.{x}": {"lr_mult": 1.0, "decay_mult": 0.0} for x in "AB"},
        **{f"lora_sub.{x}": {"lr_mult": 0.5, "decay_mult": 0.0} for x in "AB"},
    }
    wrapper_types = (RecycleLoRALinear,)

    def __init__(self, *args, recyclelora: RecycleLoRAOptions | dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.options = RecycleLoRAOptions.of(recyclelora, "method.recyclelora")

    def configure_tuning(self) -> None:
        self.freeze(self.backbone)
        wrappers = wrap_recyclelora(self.backbone, self.options, initialise=not self.restoring)
        self.train_wrappers(wrappers, self.options.train_bias)

    def extra_summary(self) -> dict[str, float]:
        main = sum(
            w.lora_main.A.numel() + w.lora_main.B.numel() for w in self.wrappers if w.lora_main is not None
        )
        sub = sum(
            w.lora_sub.A.numel() + w.lora_sub.B.numel() for w in self.wrappers if w.lora_sub is not None
        )
        return {"params/recyclelora_main": main, "params/recyclelora_sub": sub}


register(RecycleLoRAConfig, "method", "recyclelora_schema")
