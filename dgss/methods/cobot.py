"""SAM-COBOT (CVPR'24): cross-block orchestration over LoRA or AdaptFormer.

Paper: https://arxiv.org/abs/2311.17112; official code: https://github.com/SJTU-DeepVisionLab/SAM-COBOT
(``remote/model/``).

Each PEFT branch has a V-dimensional hidden code h (LoRA: the rank-r code of q or v, so L′ = 2 × blocks slices;
AdaptFormer: the bottleneck, L′ = blocks). COBOT maps slice s's code through

    c_s(h) = H_s( h ⊙ (λ_s + γ_s) ),   λ_s = (C S)[:, s] = Σ_k S[k, s] · C[:, k]

* inter-block communication: the coefficient matrix C (V × L′) and the relation matrix S (L′ × L′) are shared by all
  blocks, so every slice's coefficients mix those of all others; γ_s (V) is the slice's own set;
* intra-block enhancement: H_s is a quaternion (Hamilton-product) layer, V²/4 parameters: the code is split into
  four chunks (r, i, j, k) and multiplied by the 4 × 4 block matrix of :func:`quaternion_matrix`.

``init``: ``official`` (C = 1, S = I, γ = 1, heads R = 0 and I, J, K ~ U[0, 1), LoRA B Xavier-normal: the tuned model
differs from the pretrained one at step 0, as in the official code) or ``identity`` (γ = 0, heads = identity,
LoRA B = 0: exactly the pretrained backbone at step 0, and COBOT's core equals plain LoRA / AdaptFormer).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from dgss.errors import ConfigError
from dgss.methods.base import MethodConfig
from dgss.methods.peft import PEFTMethod
from dgss.methods.peft_layers import AdapterOptions, LoRAOptions, wrap_adapters, wrap_lora
from dgss.options import Options, register


def quaternion_matrix(r: torch.Tensor, i: torch.Tensor, j: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The real (4n × 4n) matrix K_q of the Hamilton product for row vectors, y = h · K_q (rows: input r, i, j, k;
    columns: output r, i, j, k)."""
    return torch.cat([
        torch.cat([r, i, j, k], 1),
        torch.cat([-i, r, k, -j], 1),
        torch.cat([-j, -k, r, i], 1),
        torch.cat([-k, j, -i, r], 1),
    ], 0)  # fmt: skip


class CobotState(nn.Module):
    """C, S, every γ and every head, owned once (wrappers hold only a slice index).

    Args:
        hidden: V, the width of the PEFT code (a multiple of 4 for the quaternion head).
        slices: L′.
        head: ``quaternion`` | ``linear`` (a V × V map without bias, as the official ``LORA_relation``'s
            ``nn.Linear(V, V, bias=False)``) | ``none``.
        init: ``official`` | ``identity``.
        relation: ``learnable`` (S, init I) | ``fixed_random`` (the paper's fixed random S, a buffer) |
            ``identity_frozen`` (S = I, a buffer: no cross-block mixing).
        coefficients: ``dual`` (λ^LM + γ) | ``lm_only`` (λ^LM = C S[:, s]) | ``mc_only`` (γ alone); the official
            code's commented ablations. A single set starts at 1 under both inits (so ``identity`` stays the
            pretrained model and the official ablations' starting code is kept).
    """

    def __init__(self, hidden: int, slices: int, head: str = "quaternion", init: str = "identity",
                 relation: str = "learnable", coefficients: str = "dual"):  # fmt: skip
        super().__init__()
        if init not in ("official", "identity"):
            raise ConfigError(f"method.cobot.init={init!r}; choose official or identity")
        if head == "quaternion" and hidden % 4:
            raise ConfigError(f"the quaternion head needs a hidden size divisible by 4, got {hidden}")
        self.hidden, self.slices, self.head = hidden, slices, head
        self.relation_kind, self.coefficients_kind = relation, coefficients
        if coefficients in ("dual", "lm_only"):
            self.coef = nn.Parameter(torch.ones(hidden, slices))
            if relation == "learnable":
                self.relation = nn.Parameter(torch.eye(slices))
            elif relation == "fixed_random":  # columns sum to 1: λ keeps C's scale, only the mixing is random
                r = torch.rand(slices, slices)
                self.register_buffer("relation", r / r.sum(0, keepdim=True))
            elif relation == "identity_frozen":
                self.register_buffer("relation", torch.eye(slices))
            else:
                raise ConfigError(
                    f"method.cobot.relation={relation!r}; choose learnable, fixed_random or identity_frozen"
                )
        elif coefficients != "mc_only":
            raise ConfigError(f"method.cobot.coefficients={coefficients!r}; choose dual, lm_only or mc_only")
        if coefficients in ("dual", "mc_only"):
            start = 1.0 if init == "official" or coefficients == "mc_only" else 0.0
            self.gamma = nn.Parameter(torch.full((slices, hidden), start))
        n = hidden // 4
        if head == "quaternion":
            if init == "official":
                comps = [torch.zeros(slices, n, n)] + [torch.rand(slices, n, n) for _ in range(3)]
            else:
                comps = [torch.eye(n).repeat(slices, 1, 1)] + [torch.zeros(slices, n, n) for _ in range(3)]
            self.q_r, self.q_i, self.q_j, self.q_k = (nn.Parameter(c) for c in comps)
        elif head == "linear":  # y = h @ M: M = W.T of the official nn.Linear (default init: U(±1/√V))
            if init == "identity":
                w = torch.eye(hidden).repeat(slices, 1, 1)
            else:
                w = torch.stack(
                    [nn.Linear(hidden, hidden, bias=False).weight.detach().T for _ in range(slices)]
                )
            self.linear = nn.Parameter(w.clone())
        elif head != "none":
            raise ConfigError(f"method.cobot.head={head!r}; choose quaternion, linear or none")

    def head_matrix(self, s: int) -> torch.Tensor | None:
        if self.head == "quaternion":
            return quaternion_matrix(self.q_r[s], self.q_i[s], self.q_j[s], self.q_k[s])
        return self.linear[s] if self.head == "linear" else None

    def coefficients(self, s: int) -> torch.Tensor:
        """The code's multiplier for slice s (V): λ^LM_s + γ_s, or one of them (``coefficients``)."""
        if self.coefficients_kind == "mc_only":
            return self.gamma[s]
        lm = self.coef @ self.relation[:, s]
        return lm if self.coefficients_kind == "lm_only" else lm + self.gamma[s]

    def forward(self, h: torch.Tensor, s: int) -> torch.Tensor:
        h = h * self.coefficients(s).to(h.dtype)
        m = self.head_matrix(s)
        return h if m is None else h @ m.to(h.dtype)


@dataclass
class CobotOptions(Options):
    """``method.cobot``: SAM-COBOT's own options (no weight decay on any COBOT parameter)."""

    init: Literal["identity", "official"] = (
        "identity"  # identity: the pretrained model at step 0 | the code's init
    )
    head: Literal["quaternion", "linear", "none"] = "quaternion"
    lr_mult: float = (
        1.0  # C, S, heads (the official 100x is relative to a base lr of 1.25e-6; ours: 1.0 at 1e-4)
    )
    lr_mult_gamma: float = 1.0
    # the paper's ablations (Tables 1-2): the relation matrix S learnable (init I) | a fixed random S | S = I frozen;
    # both coefficient sets | λ^LM only | γ only (the official code's commented ablation lines)
    relation: Literal["learnable", "fixed_random", "identity_frozen"] = "learnable"
    coefficients: Literal["dual", "lm_only", "mc_only"] = "dual"


@dataclass
class CobotLoRAOptions(Options):
    """``method.peft`` of COBOT over LoRA (the LoRA init is COBOT's: ``method.cobot.init``)."""

    rank: int = LoRAOptions.rank


@dataclass
class CobotAdapterOptions(AdapterOptions):
    """``method.peft`` of COBOT over AdaptFormer: SAM-COBOT's variant (``remote/model``: bottleneck V = 16 with the
    adapter's own LayerNorm, scale 1, reading the MLP's input); the output joins after LayerScale (the official code:
    the faithful transfer to DINOv2 / EVA02; the same as inside the MLP on SAM, which has no LayerScale)."""

    bottleneck: int = 16
    scale: float = 1.0
    norm: bool = True
    input: Literal["block", "mlp"] = "mlp"


@dataclass
class CobotLoRAConfig(MethodConfig):
    _target_: str = "dgss.methods.cobot.Cobot"
    base: Literal["lora", "adaptformer"] = "lora"
    peft: CobotLoRAOptions = field(default_factory=CobotLoRAOptions)
    cobot: CobotOptions = field(default_factory=CobotOptions)


@dataclass
class CobotAdaptFormerConfig(CobotLoRAConfig):
    base: Literal["lora", "adaptformer"] = "adaptformer"
    peft: CobotAdapterOptions = field(default_factory=CobotAdapterOptions)


class Cobot(PEFTMethod):
    """COBOT over ``base`` = ``lora`` (rank r, slices q and v per block) or ``adaptformer`` (bottleneck V); ``peft``:
    the base's options (:class:`CobotLoRAOptions` / :class:`AdapterOptions`), ``cobot``: :class:`CobotOptions`."""

    BASES = {"lora": CobotLoRAOptions, "adaptformer": CobotAdapterOptions}

    def __init__(self, *args, base: Literal["lora", "adaptformer"] = "lora", cobot: CobotOptions | dict | None = None,
                 **kwargs):  # fmt: skip
        if base not in self.BASES:
            raise ConfigError(f"method.base={base!r}; choose lora or adaptformer")
        peft = self.BASES[base].of(kwargs.pop("peft", None), "method.peft")
        options = CobotOptions.of(cobot, "method.cobot")
        super().__init__(*args, peft=peft, **kwargs)
        self.base_kind, self.cobot_options = base, options
        # the official recipe: no decay on C, S, the heads and γ (decay would pull them off their init); C, S and the heads at
        # cobot.lr_mult (the official medical recipe's 100x group), γ at cobot.lr_mult_gamma
        keys = {"cobot.": {"lr_mult": options.lr_mult, "decay_mult": 0.0}}
        keys["cobot.gamma"] = {"lr_mult": options.lr_mult_gamma, "decay_mult": 0.0}
        self.recipe_custom_keys = keys

    def place(self, backbone) -> list[nn.Module]:
        init, o = self.cobot_options.init, self.peft_options
        if self.base_kind == "lora":
            branches = [
                lr for pair in wrap_lora(backbone, o.rank, init) for lr in pair
            ]  # q of block l: 2l, v: 2l+1
            hidden = o.rank
        else:
            branches = wrap_adapters(backbone, o)
            hidden = o.bottleneck
        c = self.cobot_options
        self.cobot = CobotState(hidden, len(branches), c.head, init, c.relation, c.coefficients)
        for s, branch in enumerate(branches):
            branch.core = functools.partial(self.cobot, s=s)
        return branches

    def cobot_parameters(self) -> int:
        """COBOT's extra parameters (C, S when learnable, γ, heads): the paper's count beside the base PEFT's."""
        return sum(p.numel() for p in self.cobot.parameters())

    def extra_summary(self) -> dict[str, float]:
        # the base PEFT's parameters sit inside the backbone, COBOT's state beside it
        return {"params/cobot_extra": self.cobot_parameters(), "params/peft_base": self.peft_parameters()}


register(CobotLoRAConfig, "method", "cobot_lora_schema")
register(CobotAdaptFormerConfig, "method", "cobot_adaptformer_schema")
