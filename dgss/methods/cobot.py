"""SAM-COBOT (CVPR'24): cross-block orchestration over LoRA or AdaptFormer. Spec: specs/cobot.md.

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

import torch
from torch import nn

from dgss.errors import ConfigError
from dgss.methods.peft import PEFTMethod, wrap_adapters, wrap_lora


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
        head: ``quaternion`` | ``linear`` (plain V × V, no bias) | ``none``.
        init: ``official`` | ``identity``.
    """

    def __init__(self, hidden: int, slices: int, head: str = "quaternion", init: str = "identity"):
        super().__init__()
        if init not in ("official", "identity"):
            raise ConfigError(f"method.cobot.init={init!r}; choose official or identity")
        if head == "quaternion" and hidden % 4:
            raise ConfigError(f"the quaternion head needs a hidden size divisible by 4, got {hidden}")
        self.hidden, self.slices, self.head = hidden, slices, head
        self.coef = nn.Parameter(torch.ones(hidden, slices))
        self.relation = nn.Parameter(torch.eye(slices))
        self.gamma = nn.Parameter(torch.full((slices, hidden), 1.0 if init == "official" else 0.0))
        n = hidden // 4
        if head == "quaternion":
            if init == "official":
                comps = [torch.zeros(slices, n, n)] + [torch.rand(slices, n, n) for _ in range(3)]
            else:
                comps = [torch.eye(n).repeat(slices, 1, 1)] + [torch.zeros(slices, n, n) for _ in range(3)]
            self.q_r, self.q_i, self.q_j, self.q_k = (nn.Parameter(c) for c in comps)
        elif head == "linear":
            w = torch.eye(hidden).repeat(slices, 1, 1)
            self.linear = nn.Parameter(w if init == "identity" else torch.empty_like(w).uniform_(0, 1))
        elif head != "none":
            raise ConfigError(f"method.cobot.head={head!r}; choose quaternion, linear or none")

    def head_matrix(self, s: int) -> torch.Tensor | None:
        if self.head == "quaternion":
            return quaternion_matrix(self.q_r[s], self.q_i[s], self.q_j[s], self.q_k[s])
        return self.linear[s] if self.head == "linear" else None

    def coefficients(self, s: int) -> torch.Tensor:
        """λ_s + γ_s (V)."""
        return self.coef @ self.relation[:, s] + self.gamma[s]

    def forward(self, h: torch.Tensor, s: int) -> torch.Tensor:
        h = h * self.coefficients(s).to(h.dtype)
        m = self.head_matrix(s)
        return h if m is None else h @ m.to(h.dtype)


class Cobot(PEFTMethod):
    """COBOT over ``base`` = ``lora`` (rank r, slices q and v per block) or ``adaptformer`` (bottleneck V).

    ``peft``: the base's options (``rank`` 4 / ``bottleneck`` 16, …); ``cobot``: ``init`` (identity), ``head``
    (quaternion), ``lr_mult`` for C, S and the heads (1.0; the official medical recipe's 100× is relative to a base
    lr of 1.25e-6) and ``lr_mult_gamma`` (1.0). No weight decay on any COBOT parameter.
    """

    extra_no_decay = ("cobot.",)

    def __init__(self, *args, base: str = "lora", cobot: dict | None = None, **kwargs):
        if base not in ("lora", "adaptformer"):
            raise ConfigError(f"method.base={base!r}; choose lora or adaptformer")
        self.base_kind = base
        self.cobot_cfg = {"init": "identity", "head": "quaternion", "lr_mult": 1.0, "lr_mult_gamma": 1.0,
                          **(cobot or {})}  # fmt: skip
        mult, mult_gamma = float(self.cobot_cfg["lr_mult"]), float(self.cobot_cfg["lr_mult_gamma"])
        lr_mults = {**(kwargs.pop("lr_mults", None) or {})}
        for name in ("coef", "relation", "q_r", "q_i", "q_j", "q_k", "linear"):
            lr_mults.setdefault(f"cobot.{name}", mult)
        lr_mults.setdefault("cobot.gamma", mult_gamma)
        super().__init__(*args, lr_mults=lr_mults, **kwargs)

    def place(self, backbone) -> None:
        init = self.cobot_cfg["init"]
        if self.base_kind == "lora":
            rank = int(self.peft_cfg.get("rank", 4))
            branches = [
                lr for pair in wrap_lora(backbone, rank, init) for lr in pair
            ]  # q of block l: 2l, v: 2l+1
            hidden = rank
        else:
            keys = ("bottleneck", "scale", "dropout", "norm")
            branches = wrap_adapters(backbone, **{k: self.peft_cfg[k] for k in keys if k in self.peft_cfg})
            self.adapters = branches
            hidden = int(self.peft_cfg.get("bottleneck", 16))
        self.cobot = CobotState(hidden, len(branches), self.cobot_cfg["head"], init)
        for s, branch in enumerate(branches):
            branch.core = functools.partial(self.cobot, s=s)

    def cobot_parameters(self) -> int:
        return sum(p.numel() for p in self.cobot.parameters())
