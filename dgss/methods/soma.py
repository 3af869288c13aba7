"""SoMA (Yun et al., CVPR'25; code name SoRA): tune the r *minor* singular components of the frozen backbone's
linear layers in its later blocks, keep the rest. Paper: Yun et al., CVPR'25, https://arxiv.org/abs/2412.04077; official code: https://github.com/ysj9909/SoMA
(commit 7ea8c0e).

For a frozen weight W (out × in) and its thin SVD W = U diag(σ) Vᵀ (float32, σ descending), the last r triplets give
A = diag(√σ'_r) V_rᵀ (r × in) and B = U_r diag(√σ'_r) (out × r), σ'_r = σ_r / s with s = α / r, so that
s·B·A is exactly W's r minor components and the frozen residual is W_res = W − s·B·A. A layer computes

    y = x W_resᵀ + b + s·(x Aᵀ) Bᵀ

with A, B and the layer's bias training. dgss keeps W untouched and stores A₀ = A(0), B₀ = B(0) as frozen persistent
buffers (:mod:`dgss.methods.residual_adapters`, shared with RecycleLoRA), computing the same function as
y = x Wᵀ + b + s·((x Aᵀ) Bᵀ − (x A₀ᵀ) B₀ᵀ) (the official ``SoMALinear``): the model at step 0 is the pretrained one bit for bit,
checkpoints re-attach W from its weights file and restore A, B, A₀, B₀ with no SVD at load, and the merged weight is
W' = W − s·B₀A₀ + s·B·A = W_res + s·B·A.

``init: official`` reproduces what the official pipeline starts from (the official ``init_weights``): its SVD runs on the randomly
initialised layer before the pretrained weights overwrite the residual, so the model at step 0 is W + s·B₀A₀ with
B₀A₀ the minor part of a random nn.Linear matrix (A₀ = B₀ = 0 in the subtraction here).

Placement (blocks from ``start_block`` on, the rest of the backbone frozen): q, k, v (a fused ``qkv`` gets one
adapter per row third, each from the SVD of its own C × C slice), ``attn.proj``, ``mlp.fc1`` (SwiGLU: ``fc1_g`` and
``fc1_x``), ``mlp.fc2``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from dgss.errors import ConfigError
from dgss.methods.base import MethodConfig
from dgss.methods.residual_adapters import ResidualAdapter, ResidualAdapterMethod, linear_like
from dgss.models.heads.protocol import QueryHead
from dgss.options import Options, register

TARGETS = ("q", "k", "v", "proj", "fc1", "fc2")


@dataclass
class SoMAOptions(Options):
    """``method.soma``: the official configs' values (``configs/sora/*.py``) unless marked ours."""

    rank: int = 16  # r
    alpha: float = 16.0  # s = alpha / r = 1
    start_block: int | None = None  # null: 8 of 24 blocks, round(depth / 3) for other depths (ours beyond 24)
    targets: list[str] = field(default_factory=lambda: list(TARGETS))
    components: Literal["minor", "principal"] = "minor"  # principal: the first r (PiSSA-like ablation)
    # the paper's form | what the official pipeline runs
    init: Literal["pretrained", "official"] = "pretrained"
    svd_dtype: Literal["float32", "float64"] = "float32"
    train_bias: bool = True  # the adapted layers' biases train (SoraConfig's bias='all')
    seed: int = 0  # init=official: the random matrices' generator


@dataclass
class SoMAConfig(MethodConfig):
    _target_: str = "dgss.methods.soma.SoMA"
    soma: SoMAOptions = field(default_factory=SoMAOptions)


# ------------------------------------------------------------------------------------------ pure functions
def default_start_block(depth: int) -> int:
    """The first adapted block: 8 for the paper's 24-block ViT-L, round(depth / 3) otherwise (12 → 4, 32 → 11)."""
    return round(depth / 3)


@torch.no_grad()
def singular_factors(weight: torch.Tensor, rank: int, scale: float = 1.0, components: str = "minor",
                     dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(A, B) with s·B·A equal to the ``rank`` minor (smallest; ``principal``: largest) singular components of
    ``weight``: A = diag(√(σ_r/s)) V_rᵀ (r × in), B = U_r diag(√(σ_r/s)) (out × r), from a thin SVD in ``dtype``;
    returned in float32."""
    u, s, vh = torch.linalg.svd(weight.detach().to(dtype), full_matrices=False)
    pick = slice(-rank, None) if components == "minor" else slice(0, rank)
    root = (s[pick] / scale).sqrt()
    return (root[:, None] * vh[pick]).float(), (u[:, pick] * root[None, :]).float()


def random_linear_weight(out_features: int, in_features: int, generator: torch.Generator) -> torch.Tensor:
    """A weight as ``nn.Linear`` initialises it (Kaiming-uniform with a = √5, i.e. U(±1/√in))."""
    bound = 1.0 / math.sqrt(in_features)
    return torch.empty(out_features, in_features).uniform_(-bound, bound, generator=generator)


# ------------------------------------------------------------------------------------------------ modules
MinorAdapter = (
    ResidualAdapter  # SoMA's name for the shared adapter: its A, B are W's minor singular components
)


class SoMALinear(nn.Module):
    """A frozen ``nn.Linear`` (its bias may train) plus a :class:`MinorAdapter`."""

    def __init__(self, base: nn.Linear, rank: int, scale: float):
        super().__init__()
        self.base = base
        self.adapter = MinorAdapter(base.in_features, base.out_features, rank, scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.adapter(x)

    def weights(self) -> list[tuple[torch.Tensor, MinorAdapter]]:
        return [(self.base.weight, self.adapter)]

    def frozen_layer(self) -> nn.Linear:
        return self.base

    @torch.no_grad()
    def fold(self) -> nn.Linear:
        """The plain layer with W' = W + s·(B·A − B₀·A₀)."""
        return linear_like(
            self.base, self.base.weight + self.adapter.weight_delta().to(self.base.weight.dtype)
        )


class SoMAFusedQKV(nn.Module):
    """A fused ``qkv`` Linear(C, 3C) with one adapter per targeted row third (q, k, v), each from its own slice."""

    def __init__(self, qkv: nn.Linear, rank: int, scale: float, parts: list[str]):
        super().__init__()
        self.qkv = qkv
        c = qkv.in_features
        if qkv.out_features != 3 * c:
            raise ConfigError(
                f"a fused qkv of {qkv.out_features} outputs for width {c} is not q, k, v thirds"
            )
        self.parts = [p for p in ("q", "k", "v") if p in parts]
        self.adapters = nn.ModuleDict({p: MinorAdapter(c, c, rank, scale) for p in self.parts})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.qkv(x)
        zero = None
        deltas = []
        for p in ("q", "k", "v"):
            if p in self.adapters:
                deltas.append(self.adapters[p](x))
            else:
                zero = zero if zero is not None else torch.zeros_like(y[..., : self.qkv.in_features])
                deltas.append(zero)
        return y + torch.cat(deltas, dim=-1)

    def frozen_layer(self) -> nn.Linear:
        return self.qkv

    def rows(self, part: str) -> slice:
        """The rows of ``part`` (q, k or v) in the fused weight and bias."""
        j, c = ("q", "k", "v").index(part), self.qkv.in_features
        return slice(j * c, (j + 1) * c)

    def weights(self) -> list[tuple[torch.Tensor, MinorAdapter]]:
        return [(self.qkv.weight[self.rows(p)], self.adapters[p]) for p in self.parts]

    @torch.no_grad()
    def fold(self) -> nn.Linear:
        w = self.qkv.weight.detach().clone()
        for p in self.parts:
            w[self.rows(p)] += self.adapters[p].weight_delta().to(w.dtype)
        return linear_like(self.qkv, w)


# ---------------------------------------------------------------------------------------------- placement
def _layers_of(backbone, index: int, targets: list[str]) -> list[tuple[nn.Module, str, str]]:
    """(parent module, attribute, kind) of every targeted Linear of block ``index``; kind 'qkv' = a fused qkv."""
    parts = backbone.block_parts(index)
    out: list[tuple[nn.Module, str, str]] = []
    if parts.qkv is not None:
        backbone.require_wrappable_qkv(parts, "SoMA")
        if any(t in targets for t in ("q", "k", "v")):
            out.append((parts.attn, "qkv", "qkv"))
    else:
        out += [(parts.attn, f"{t}_proj", t) for t in ("q", "k", "v") if t in targets]
    if "proj" in targets:
        out.append((parts.attn, "proj", "proj"))
    mlp = parts.mlp
    if "fc1" in targets:
        out += [
            (mlp, n, "fc1") for n in ("fc1", "fc1_g", "fc1_x") if isinstance(getattr(mlp, n, None), nn.Linear)
        ]
    if "fc2" in targets and isinstance(getattr(mlp, "fc2", None), nn.Linear):
        out.append((mlp, "fc2", "fc2"))
    return out


def wrap_soma(backbone, options: SoMAOptions, initialise: bool = True) -> list[nn.Module]:
    """SoMA's wrappers in blocks ``start_block``… of ``backbone``; returns them in block order. ``initialise=False``
    (a checkpoint will fill A, B, A₀, B₀) leaves them zero: no SVD."""
    bad = sorted(set(options.targets) - set(TARGETS))
    if bad:
        raise ConfigError(f"method.soma.targets has {bad}; choose from {list(TARGETS)}")
    if options.rank < 1:
        raise ConfigError(f"method.soma.rank={options.rank} must be at least 1")
    start = (
        options.start_block if options.start_block is not None else default_start_block(backbone.num_blocks)
    )
    if not 0 <= start < backbone.num_blocks:
        raise ConfigError(
            f"method.soma.start_block={start} is outside the backbone's {backbone.num_blocks} blocks"
        )
    scale = options.alpha / options.rank
    dtype = {"float32": torch.float32, "float64": torch.float64}[options.svd_dtype]
    gen = torch.Generator().manual_seed(options.seed)
    wrappers: list[nn.Module] = []
    for i in range(start, backbone.num_blocks):
        for parent, attr, kind in _layers_of(backbone, i, options.targets):
            layer = getattr(parent, attr)
            if min(layer.in_features, layer.out_features // (3 if kind == "qkv" else 1)) < options.rank:
                raise ConfigError(f"method.soma.rank={options.rank} exceeds the width of blocks.{i} {attr}")
            if kind == "qkv":
                w = SoMAFusedQKV(layer, options.rank, scale, options.targets)
            else:
                w = SoMALinear(layer, options.rank, scale)
            if initialise:
                for weight, adapter in w.weights():
                    if options.init == "official":
                        weight = random_linear_weight(*weight.shape, gen)
                    a, b = singular_factors(weight, options.rank, scale, options.components, dtype)
                    adapter.initialise(a.to(weight.device), b.to(weight.device), options.init == "pretrained")
            else:
                for _, adapter in w.weights():
                    adapter.subtract = options.init == "pretrained"
            setattr(parent, attr, w)
            wrappers.append(w)
    return wrappers


# ------------------------------------------------------------------------------------------------- method
class SoMA(ResidualAdapterMethod):
    """Frozen backbone (eval mode); minor-component adapters (and the adapted layers' biases) in blocks
    ``start_block``… train with the head. Options: :class:`SoMAOptions` (``method.soma``)."""

    # configs/sora/*.py paramwise_cfg: the backbone's trainable tensors (adapters and biases, biases decayed too: a
    # custom key overrides the bias rule) at lr x 0.5; query features without decay (norms, query and level
    # embeddings: every method's defaults, dgss.methods.paramwise)
    recipe_custom_keys = {"backbone": {"lr_mult": 0.5, "decay_mult": 1.0}, "query_feat": {"decay_mult": 0.0}}
    wrapper_types = (SoMALinear, SoMAFusedQKV)

    def __init__(self, *args, soma: SoMAOptions | dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.soma_options = soma if isinstance(soma, SoMAOptions) else SoMAOptions.of(soma, "method.soma")

    def configure_tuning(self) -> None:
        self.freeze(self.backbone)
        self.train_wrappers(wrap_soma(self.backbone, self.soma_options, initialise=not self.restoring),
                            self.soma_options.train_bias)  # fmt: skip

    def extra_summary(self) -> dict[str, float]:
        biases = [w.frozen_layer().bias for w in self.wrappers] if self.soma_options.train_bias else []
        return {
            "params/soma_adapters": sum(a.A.numel() + a.B.numel() for a in self.adapters()),
            "params/soma_biases": sum(b.numel() for b in biases if b is not None),
        }

    def load_official(self, state: Mapping[str, torch.Tensor]) -> None:
        """A published SoMA release (``dgss-eval ckpt_path=<release.pth> experiment=gta2cbm/soma_dinov2_l
        method.soma.init=official``): :meth:`load_official_adapters`, then ``decode_head.*`` into Mask2Former."""
        state = state.get("state_dict", state)
        self.load_official_adapters(state)
        if not isinstance(self.head, QueryHead):
            raise ConfigError(
                f"head {type(self.head).__name__} cannot take an official decode head; use head=mask2former"
            )
        self.head.load_official(state)

    @torch.no_grad()
    def load_official_adapters(self, state: Mapping[str, torch.Tensor]) -> list[str]:
        """The official names (``ysj9909/SoMA`` checkpoints): ``backbone.model.blocks.<i>.attn.{q,k,v,proj}.lora_{A,B}.weight``,
        ``….mlp.fc{1,2}.lora_{A,B}.weight`` (A: r × in, B: out × r) and the adapted layers' ``….bias`` (q, k, v into the
        fused qkv's thirds); an EMA dict's ``module.`` prefix is dropped. The release's A, B are A(t), B(t) of the
        official start (W kept), so ``method.soma.init`` must be ``official``. Returns the keys loaded."""
        if self.soma_options.init != "official":
            raise ConfigError("an official SoMA release holds A, B trained from the official start (W kept, nothing "
                              "subtracted): evaluate it with method.soma.init=official")  # fmt: skip
        state = {k.removeprefix("module."): v for k, v in state.items()}
        want: dict[str, torch.Tensor] = {}
        for name, w in self.backbone.model.named_modules():
            if isinstance(w, SoMAFusedQKV):
                attn = f"backbone.model.{name.rpartition('.')[0]}"
                for p in w.parts:
                    want[f"{attn}.{p}.lora_A.weight"] = w.adapters[p].A
                    want[f"{attn}.{p}.lora_B.weight"] = w.adapters[p].B
                    if w.qkv.bias is not None:
                        want[f"{attn}.{p}.bias"] = w.qkv.bias[w.rows(p)]
            elif isinstance(w, SoMALinear):
                want[f"backbone.model.{name}.lora_A.weight"] = w.adapter.A
                want[f"backbone.model.{name}.lora_B.weight"] = w.adapter.B
                if w.base.bias is not None:
                    want[f"backbone.model.{name}.bias"] = w.base.bias
        missing = [k for k in want if k not in state]
        wrong = [f"{k} {tuple(state[k].shape)} (want {tuple(t.shape)})" for k, t in want.items()
                 if k in state and state[k].shape != t.shape]  # fmt: skip
        if missing or wrong:
            problem = f"missing {', '.join(missing[:3])}" if missing else f"shape {', '.join(wrong[:3])}"
            raise ConfigError(f"the release does not fit this SoMA ({len(missing)} missing, {len(wrong)} mis-shaped "
                              f"tensors: {problem}); check method.soma.rank / start_block / targets and backbone")  # fmt: skip
        for k, t in want.items():
            t.copy_(state[k])
        return sorted(want)


register(SoMAConfig, "method", "soma_schema")
