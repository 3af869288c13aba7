"""Rein (Wei et al., CVPR 2024): learnable tokens that refine a frozen VFM's features between blocks.

Paper: https://arxiv.org/abs/2312.04265; official code: https://github.com/w1oves/Rein (GPL-3.0: reimplemented from
the paper and the released configs, nothing is copied).

For the patch features ``f`` (N, C) after block l and that layer's tokens ``T`` (m, C):

    S  = softmax(f Tᵀ / √C)            over all m tokens; token 0 is a sink: it normalises, then is dropped
    ΔF = S[:, 1:] · token2feat(T[1:])
    f  ← f + s · delta_f(ΔF + f)        the features themselves enter delta_f; s is one learnable scalar

Prefix tokens (CLS, registers) pass through untouched. ``queries()`` links the tokens to a query-based head:
``merge(interleave(max_l, mean_l, last_l of transform(T_l)))`` -> (m, query_dim).

``ReinLayers`` is standalone (tokens in, tokens out); ``Rein`` is the dgss method that hooks it into a frozen
backbone: after every block for ViT / DINOv2 / CLIP / EVA02, after the global-attention blocks only for SAM.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from dgss import console
from dgss.errors import ConfigError, state_mismatch
from dgss.methods.base import MethodConfig, SegmentationMethod
from dgss.models.heads.protocol import QueryHead
from dgss.options import Options, register


@dataclass
class ReinOptions(Options):
    """``method.rein``: Rein's options (defaults: the released DINOv2-L config, ``w1oves/Rein``)."""

    num_tokens: int = 100  # m: learnable tokens per layer; also the number of Mask2Former queries
    lora_rank: int | None = 16  # r of the token factorisation T_l = A_l B_l; null = full-rank tokens
    query_dim: int = 256  # Q: width of the linked queries (= head.dim)
    patch_size: int = 16  # enters the official token init bound only (16 in every released config)
    scale_init: float = 1.0e-3  # initial value of the learnable scalar s
    zero_mlp_delta_f: bool = False  # true: s is the constant 1, delta_f starts at zero (identity at init)
    use_softmax: bool = True  # false: no softmax and no 1/sqrt(C)
    link_token_to_query: bool = True  # build transform / merge for queries() (only with a query head)


@dataclass
class ReinConfig(MethodConfig):
    _target_: str = "dgss.methods.rein.Rein"
    rein: ReinOptions = field(default_factory=ReinOptions)


class ReinLayers(nn.Module):
    """The Rein parameters of ``num_layers`` layers and their per-layer refinement.

    Args:
        num_layers: layers that get a Rein (L).
        embed_dim: token width (C).
        **options: :class:`ReinOptions` (``num_tokens``, ``lora_rank``, …; their defaults otherwise).
    """

    def __init__(self, num_layers: int, embed_dim: int, **options):
        o = ReinOptions.of(options, "method.rein")
        num_tokens, lora_rank, query_dim, patch_size = o.num_tokens, o.lora_rank, o.query_dim, o.patch_size
        scale_init, zero_mlp_delta_f, use_softmax = o.scale_init, o.zero_mlp_delta_f, o.use_softmax
        link_token_to_query = o.link_token_to_query
        super().__init__()
        if num_layers < 1 or embed_dim < 1 or num_tokens < 2:
            raise ConfigError(
                f"Rein needs num_layers >= 1, embed_dim >= 1 and num_tokens >= 2 (token 0 is the sink); "
                f"got {num_layers}, {embed_dim}, {num_tokens}"
            )
        self.num_layers, self.embed_dim, self.num_tokens = num_layers, embed_dim, num_tokens
        self.lora_rank, self.query_dim, self.use_softmax = lora_rank, query_dim, use_softmax
        p2 = 3 * patch_size**2
        if lora_rank is None:
            bound = math.sqrt(6.0 / (p2 + embed_dim))
            self.learnable_tokens = nn.Parameter(
                torch.empty(num_layers, num_tokens, embed_dim).uniform_(-bound, bound)
            )
        else:
            bound = math.sqrt(6.0 / (p2 + math.sqrt(embed_dim * lora_rank)))
            self.learnable_tokens_a = nn.Parameter(
                torch.empty(num_layers, num_tokens, lora_rank).uniform_(-bound, bound)
            )
            self.learnable_tokens_b = nn.Parameter(
                torch.empty(num_layers, lora_rank, embed_dim).uniform_(-bound, bound)
            )
        self.token_init_bound = bound
        self.mlp_token2feat = nn.Linear(embed_dim, embed_dim)
        self.mlp_delta_f = nn.Linear(embed_dim, embed_dim)
        if zero_mlp_delta_f:
            nn.init.zeros_(self.mlp_delta_f.weight)
            nn.init.zeros_(self.mlp_delta_f.bias)
            self.register_buffer("scale", torch.tensor(1.0), persistent=False)
        else:
            self.scale = nn.Parameter(torch.tensor(float(scale_init)))
        self.link_token_to_query = link_token_to_query
        if link_token_to_query:
            self.transform = nn.Linear(embed_dim, query_dim)
            self.merge = nn.Linear(3 * query_dim, query_dim)

    def tokens(self, layer: int | None = None) -> torch.Tensor:
        """Effective tokens: (m, C) of one layer, or (L, m, C) of all."""
        if self.lora_rank is None:
            return self.learnable_tokens if layer is None else self.learnable_tokens[layer]
        if layer is None:
            return self.learnable_tokens_a @ self.learnable_tokens_b
        return self.learnable_tokens_a[layer] @ self.learnable_tokens_b[layer]

    def forward(self, x: torch.Tensor, layer: int, num_prefix_tokens: int = 1) -> torch.Tensor:
        """Refine the patch tokens of ``x`` (B, prefix + N, C) with layer ``layer``'s tokens."""
        prefix, f = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
        t = self.tokens(layer)
        attn = f @ t.t()
        if self.use_softmax:
            attn = F.softmax(attn * self.embed_dim**-0.5, dim=-1)
        delta = attn[..., 1:] @ self.mlp_token2feat(t[1:])  # token 0 normalises but contributes nothing
        f = f + self.scale * self.mlp_delta_f(delta + f)
        return torch.cat([prefix, f], dim=1) if num_prefix_tokens else f

    def queries(self) -> torch.Tensor:
        """(num_tokens, query_dim) queries for a Mask2Former-style head (Rein's query link)."""
        if not self.link_token_to_query:
            raise ConfigError("ReinLayers(link_token_to_query=False) has no queries; set it to true")
        proj = self.transform(self.tokens())  # (L, m, Q)
        z = torch.stack([proj.max(dim=0).values, proj.mean(dim=0), proj[-1]], dim=-1)  # (m, Q, 3)
        return self.merge(z.flatten(-2))  # interleaved per channel: [max_0, avg_0, last_0, max_1, ...]


OFFICIAL_PREFIXES = ("backbone.reins.", "reins.")


def load_official_state_dict(layers: ReinLayers, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Load the Rein part of an official checkpoint (mmengine dict or its ``state_dict``) into ``layers``.

    Keys under ``backbone.reins.`` (or ``reins.``) carry the same names as ``ReinLayers``' parameters.
    Returns the loaded names; raises a one-line ``ConfigError`` naming missing / mismatched tensors.
    """
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]
    prefix = next((p for p in OFFICIAL_PREFIXES if any(k.startswith(p) for k in state_dict)), None)
    if prefix is None:
        raise ConfigError(
            f"no Rein tensors in the checkpoint: expected keys under {' or '.join(OFFICIAL_PREFIXES)}"
        )
    theirs = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    problem = state_mismatch(layers.state_dict(), theirs, shown=4)
    if problem:
        dims = f"ReinLayers(num_layers={layers.num_layers}, embed_dim={layers.embed_dim}, num_tokens={layers.num_tokens}, lora_rank={layers.lora_rank}, query_dim={layers.query_dim})"
        raise ConfigError(f"the checkpoint's Rein does not fit {dims}: {problem}")
    layers.load_state_dict(theirs, strict=True)
    return sorted(theirs)


class Rein(SegmentationMethod):
    """Frozen backbone (eval mode) + Rein after its blocks + a trainable head.

    Rein sits after every block, except on SAM where it follows the global-attention blocks only (layer index =
    position in that list). ``rein``: keyword arguments of :class:`ReinLayers` (``num_layers`` and
    ``embed_dim`` come from the backbone). The query link is built only for a
    :class:`~dgss.models.heads.protocol.QueryHead` (Mask2Former); the light head takes no queries, and untrained link
    parameters would stall DDP.
    """

    # configs/dinov2/rein_dinov2_mask2former_512x512_bs1x4.py: the tokens and the scale without decay (the rest of
    # Rein, biases included, decays at the base rate)
    recipe_custom_keys = {"learnable_tokens": {"decay_mult": 0.0}, "reins.scale": {"decay_mult": 0.0}}

    def __init__(self, *args, rein: ReinOptions | dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.rein_options = ReinOptions.of(rein, "method.rein")

    def configure_tuning(self) -> None:
        self.freeze(self.backbone)
        bb = self.backbone
        blocks = (
            [i for i in range(bb.num_blocks) if bb.block_parts(i).global_attn]
            if bb.family == "sam"
            else list(range(bb.num_blocks))
        )
        self.rein_blocks = {b: k for k, b in enumerate(blocks)}
        options = self.rein_options
        if options.link_token_to_query and not isinstance(self.head, QueryHead):
            # transform / merge would get no gradient: unused parameters stall DDP and inflate counts
            console.info(f"Rein: {type(self.head).__name__} takes no queries, so the query link is not built")
            options = replace(options, link_token_to_query=False)
        self.reins = ReinLayers(num_layers=len(blocks), embed_dim=bb.embed_dim, **asdict(options))
        if self.reins.link_token_to_query:
            if self.head.dim != self.reins.query_dim:
                raise ConfigError(f"method.rein.query_dim={self.reins.query_dim} must equal the head's width "
                                  f"head.dim={self.head.dim} (Rein's queries become the head's queries)")  # fmt: skip
            self.head.link(self.reins.num_tokens)  # drops the learned queries the link replaces
        bb.register_block_hook(self._refine)

    def _refine(self, tokens: torch.Tensor, block_idx: int) -> torch.Tensor:
        layer = self.rein_blocks.get(block_idx)
        if layer is None:
            return tokens
        return self.reins(tokens, layer, self.backbone.num_prefix_tokens)

    def load_official(self, state: Mapping[str, torch.Tensor]) -> None:
        """A published Rein release (mmengine dict): ``backbone.reins.*`` into Rein, ``decode_head.*`` into the head."""
        load_official_state_dict(self.reins, state)
        if not isinstance(self.head, QueryHead):
            raise ConfigError(
                f"head {type(self.head).__name__} cannot take an official decode head; use head=mask2former"
            )
        self.head.load_official(state.get("state_dict", state))

    def forward(self, images: torch.Tensor):
        feats = self.backbone(images)
        queries = self.reins.queries() if self.reins.link_token_to_query else None
        return self.head(feats, queries=queries)


register(ReinConfig, "method", "rein_schema")
