"""The modules of classic PEFT on a frozen backbone (:mod:`dgss.methods.peft`): LoRA's low-rank updates on q and v
(Hu et al., ICLR'22, https://github.com/microsoft/LoRA), AdaptFormer's parallel adapters (Chen et al., NeurIPS'22,
https://github.com/ShoufaChen/AdaptFormer) and VPT-deep's prompt tokens (Jia et al., ECCV'22,
https://github.com/KMnP/vpt), their options, and where they go in a block (:meth:`Backbone.block_parts`).

A *core* is an optional callable ``core(h) -> h`` on a wrapper's low-dimensional hidden code (LoRA's r, AdaptFormer's
bottleneck V); COBOT (:mod:`dgss.methods.cobot`) plugs its cross-block coefficients and quaternion heads in there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import timm
import torch
from torch import nn

from dgss.errors import ConfigError
from dgss.options import Options

Core = Callable[[torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------------------ options
@dataclass
class LoRAOptions(Options):
    """``method.peft`` of LoRA (and COBOT over LoRA): q and v of every block."""

    rank: int = 4  # r (SAM-COBOT's); the Rein paper's DINOv2-L baseline: 8 (its recipes set it)
    init: Literal["identity", "official"] = "identity"  # identity: B = 0, the pretrained model at step 0


@dataclass
class AdapterOptions(Options):
    """``method.peft`` of AdaptFormer: Chen et al.'s original (ShoufaChen/AdaptFormer ``models/custom_modules.py``
    and its tuning config: parallel, bottleneck 64, scale 0.1, dropout 0.1, no adapter LayerNorm, the adapter reading
    the block input before ``norm2``). On DINOv2-L: 24 x (1024·64 + 64 + 64·1024 + 1024) = 3,171,840 parameters,
    the Rein table's count."""

    bottleneck: int = 64
    scale: float = 0.1
    dropout: float = 0.1
    norm: bool = False  # the adapter's own LayerNorm
    input: Literal["block", "mlp"] = (
        "block"  # before norm2 (Chen et al.) | the MLP's input, after it (SAM-COBOT)
    )
    # where the output joins: after the block's LayerScale (unscaled, as both reference designs on backbones
    # without one) | inside the MLP (DINOv2's frozen ls2 then multiplies it); the same on SAM / CLIP (no LayerScale)
    position: Literal["after_ls2", "inside_mlp"] = "after_ls2"


@dataclass
class VPTOptions(Options):
    """``method.peft`` of VPT-deep."""

    num_tokens: int = 150  # the Rein paper's baseline (3,686,400 parameters on DINOv2-L)


class LowRank(nn.Module):
    """x ↦ up(core(down(x))), no biases. ``init``: ``official`` (both Xavier-normal, as SAM-COBOT's code) or
    ``identity`` (up zero: the wrapped layer is unchanged at step 0)."""

    def __init__(self, in_features: int, out_features: int, rank: int, init: str = "identity"):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)
        if init == "official":
            nn.init.xavier_normal_(self.down.weight)
            nn.init.xavier_normal_(self.up.weight)
        elif init == "identity":
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.up.weight)
        else:
            raise ConfigError(f"method.lora.init={init!r}; choose official or identity")
        self.core: Core | None = (
            None  # a plain callable, not a submodule: shared COBOT state is owned elsewhere
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down(x)
        if self.core is not None:
            h = self.core(h)
        return self.up(h)

    def delta(self) -> torch.Tensor:
        """The (out, in) weight this branch adds: up·down (LoRA's; a branch with a core, SAM-COBOT's, does not
        fold: its core is a function of the rank features)."""
        if self.core is not None:
            raise ConfigError(
                "a low-rank branch with a core (SAM-COBOT) does not fold into the weight it wraps"
            )
        return self.up.weight @ self.down.weight


def folded_linear(base: nn.Linear, delta: torch.Tensor) -> nn.Linear:
    """A plain ``nn.Linear`` with ``base``'s bias and weight + ``delta`` (a LoRA folded: W' = W + B·A)."""
    out = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                    device=base.weight.device, dtype=base.weight.dtype)  # fmt: skip
    with torch.no_grad():
        out.weight.copy_(base.weight + delta.to(base.weight.dtype))
        if base.bias is not None:
            out.bias.copy_(base.bias)
    return out.requires_grad_(base.weight.requires_grad)


class FusedQKVLoRA(nn.Module):
    """LoRA on the q and v slices of a fused ``qkv`` Linear(C, 3C); k untouched."""

    def __init__(self, qkv: nn.Linear, rank: int, init: str = "identity"):
        super().__init__()
        self.qkv = qkv
        c = qkv.in_features
        self.q = LowRank(c, c, rank, init)
        self.v = LowRank(c, c, rank, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return torch.cat([q + self.q(x), k, v + self.v(x)], dim=-1)

    def fold(self) -> nn.Linear:
        """The fused qkv Linear with the q and v branches folded into its q and v rows."""
        zero = torch.zeros_like(self.qkv.weight[: self.qkv.in_features])
        return folded_linear(self.qkv, torch.cat([self.q.delta(), zero, self.v.delta()]))


class LinearLoRA(nn.Module):
    """LoRA beside one Linear (EVA02's separate ``q_proj`` / ``v_proj``)."""

    def __init__(self, base: nn.Linear, rank: int, init: str = "identity"):
        super().__init__()
        self.base = base
        self.lora = LowRank(base.in_features, base.out_features, rank, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora(x)

    def fold(self) -> nn.Linear:
        return folded_linear(self.base, self.lora.delta())


class Adapter(nn.Module):
    """AdaptFormer's bottleneck: z ↦ s · up(dropout(relu(core(down(norm(z)))))). ``norm``: the adapter's own
    LayerNorm (SAM-COBOT's recipe; Chen et al.'s original has none). Init as ShoufaChen/AdaptFormer's ``lora``
    option: down Kaiming-uniform (a = √5) with a zero bias, up zero, so the block is unchanged at step 0."""

    def __init__(self, dim: int, bottleneck: int, scale: float, dropout: float, norm: bool):
        super().__init__()
        self.ln = nn.LayerNorm(dim) if norm else nn.Identity()  # not `norm`: SwiGLU MLPs have their own
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.drop = nn.Dropout(dropout)
        self.scale = scale
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.core: Core | None = None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.down(self.ln(z))
        if self.core is not None:
            h = self.core(h)
        return self.scale * self.up(self.drop(torch.relu(h)))


class BranchInput(nn.Module):
    """Wraps a block's ``norm2`` and keeps, for its adapter, the MLP branch's input: ``x`` before the norm
    (``input: block``, Chen et al.: ``adaptmlp(x)`` beside ``mlp(norm2(x))``) or ``u = norm2(x)`` (``input: mlp``,
    SAM-COBOT: the adapter wraps the MLP). Held until the join takes it, within the same block call."""

    def __init__(self, norm: nn.Module, take: Literal["block", "mlp"]):
        super().__init__()
        self.norm, self.take = norm, take
        self.value: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.norm(x)
        self.value = x if self.take == "block" else u
        return u

    def pop(self) -> torch.Tensor:
        v, self.value = self.value, None
        if v is None:
            raise RuntimeError(
                "the adapter's join ran without its block's norm2 (a block forward dgss does not know)"
            )
        return v


class AdapterJoin(nn.Module):
    """Adds ``adapter(branch input)`` where ``position`` says: wrapping the block's ``mlp`` (``inside_mlp``: the
    block's LayerScale then scales the adapter too) or its ``drop_path2`` (``after_ls2``: the adapter joins the
    residual stream unscaled, as in both reference designs, whose backbones have no LayerScale)."""

    def __init__(self, inner: nn.Module, adapter: Adapter, tap: BranchInput):
        super().__init__()
        self.inner, self.adapter = inner, adapter
        self._tap = [tap]  # registered once, as the block's norm2

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.inner(z) + self.adapter(self._tap[0].pop())


def vpt_prompts(num_tokens: int, dim: int) -> nn.Parameter:
    """(1, num_tokens, dim) prompts with VPT's uniform init (its patch-16 bound)."""
    val = math.sqrt(6.0 / float(3 * 16 * 16 + dim))
    return nn.Parameter(torch.empty(1, num_tokens, dim).uniform_(-val, val))


class PromptedBlock(nn.Module):
    """VPT-deep: ``num_tokens`` learnable tokens enter the block after the prefix tokens and leave after it, so
    hooks and features never see them. EVA's attention treats them as prefix (no rotary embedding)."""

    def __init__(self, block: nn.Module, dim: int, num_tokens: int, num_prefix_tokens: int):
        super().__init__()
        self.block = block
        self.prompts = vpt_prompts(num_tokens, dim)
        self.p = num_prefix_tokens
        attn = getattr(block, "attn", None)
        if attn is not None and hasattr(attn, "num_prefix_tokens"):  # EVA: rope only on the patch tokens
            attn.num_prefix_tokens = num_prefix_tokens + num_tokens

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        n = self.prompts.shape[1]
        x = torch.cat(
            [x[:, : self.p], self.prompts.expand(x.shape[0], -1, -1).to(x.dtype), x[:, self.p :]], 1
        )
        y = self.block(x, **kwargs)
        return torch.cat([y[:, : self.p], y[:, self.p + n :]], 1)


class PromptedSAMAttention(nn.Module):
    """VPT-deep for SAM's (windowed) attention: prompts can only matter through the keys and values they offer
    the patch tokens (VPT-deep drops their outputs after every block), so they are normed like the block input,
    projected by the block's qkv and appended as extra keys / values in every window (no relative-position bias)."""

    def __init__(self, attn: nn.Module, norm: nn.Module, dim: int, num_tokens: int):
        super().__init__()
        if not getattr(attn, "use_rel_pos", False) and getattr(attn, "rope", None) is not None:
            raise ConfigError(
                "method=vpt supports SAM attention with relative positions, not rotary embeddings"
            )
        self.attn = attn
        self._norm = [norm]  # the block's own norm1, not registered twice
        self.prompts = vpt_prompts(num_tokens, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn
        b, h, w, c = x.shape
        n, heads = h * w, a.num_heads
        p = self._norm[0](self.prompts.to(x.dtype)).expand(b, -1, -1)
        qkv = (
            a.qkv(torch.cat([x.reshape(b, n, c), p], 1))
            .view(b, n + p.shape[1], 3, heads, -1)
            .permute(2, 0, 3, 1, 4)
        )
        q, k, v = qkv.reshape(3, b * heads, n + p.shape[1], -1).unbind(0)
        q, k = a.q_norm(q[:, :n]), a.k_norm(k)
        bias = None
        if a.use_rel_pos:
            rel = timm.models.vision_transformer_sam.get_decomposed_rel_pos_bias(
                q, a.rel_pos_h, a.rel_pos_w, (h, w), (h, w)
            )
            bias = torch.nn.functional.pad(rel, (0, p.shape[1]))  # prompts: no positional bias
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=a.attn_drop.p if self.training else 0.0
        )
        out = out.view(b, heads, n, -1).transpose(1, 2).reshape(b, n, -1)
        return a.proj_drop(a.proj(out)).view(b, h, w, -1)


# ---------------------------------------------------------------------------------------------- placement
def wrap_lora(backbone, rank: int, init: str) -> list[tuple[LowRank, LowRank]]:
    """LoRA on q and v of every block; returns the (q, v) low-rank pairs in block order."""
    pairs = []
    for i in range(backbone.num_blocks):
        parts = backbone.block_parts(i)
        if parts.qkv is not None:
            backbone.require_wrappable_qkv(parts, "LoRA")
            w = FusedQKVLoRA(parts.qkv, rank, init)
            parts.attn.qkv = w
            pairs.append((w.q, w.v))
        else:
            q, v = LinearLoRA(parts.q, rank, init), LinearLoRA(parts.v, rank, init)
            parts.attn.q_proj, parts.attn.v_proj = q, v
            pairs.append((q.lora, v.lora))
    return pairs


def wrap_adapters(backbone, options: AdapterOptions) -> list[Adapter]:
    """An adapter per block, reading the MLP branch's input (``options.input``) and joining where
    ``options.position`` says; returns the adapters in block order."""
    out = []
    for i in range(backbone.num_blocks):
        parts = backbone.block_parts(i)
        blk = parts.block
        if not isinstance(getattr(blk, "norm2", None), nn.Module) or not hasattr(blk, "drop_path2"):
            raise ConfigError(f"backbone.name={backbone.name!r}: block {i} has no norm2 / drop_path2, so AdaptFormer "
                              "cannot find its MLP branch")  # fmt: skip
        adapter = Adapter(
            backbone.embed_dim, options.bottleneck, options.scale, options.dropout, options.norm
        )
        tap = BranchInput(blk.norm2, options.input)
        blk.norm2 = tap
        if options.position == "inside_mlp":
            blk.mlp = AdapterJoin(blk.mlp, adapter, tap)
        else:
            blk.drop_path2 = AdapterJoin(blk.drop_path2, adapter, tap)
        out.append(adapter)
    return out
