"""Mask2Former for semantic segmentation (Rein's decode head), pure PyTorch.

ViT features (one stride) → a simple pyramid (bilinear ×4, ×2, ×1, ×0.5: strides 4/8/16/32) → the deformable
pixel decoder → a 9-layer masked-attention transformer decoder over the three coarsest levels in turn (cross-
attention restricted to each query's previous mask, then self-attention, then FFN, post-norm) → per query a class
(K + no-object) and a mask; every layer's prediction (and the one before the first layer) is supervised.
Semantic scores: Σ_q softmax(class_q)[c] · sigmoid(mask_q).

Rein's link (``forward(features, queries)``): the linked queries (num_tokens, dim) are the query positions in every
layer, and with ``replace_query_feat`` also, through ``querys2feat`` (a trained Linear), the initial query features;
the number of queries is then Rein's token count.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dgss.data.classes import IGNORE_INDEX
from dgss.errors import ConfigError
from dgss.models.heads.mask2former.cache import size_cached
from dgss.models.heads.mask2former.criterion import SetCriterion
from dgss.models.heads.mask2former.official import load_official_head
from dgss.models.heads.mask2former.pixel_decoder import PixelDecoder, sine_position_encoding
from dgss.schemas import register_signature


class DecoderLayer(nn.Module):
    """Masked cross-attention, self-attention, FFN; each residual followed by LayerNorm."""

    def __init__(self, dim: int, num_heads: int, ffn: int, dropout: float = 0.0):
        super().__init__()
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(ffn, dim)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(3))

    def forward(self, q: torch.Tensor, q_pos: torch.Tensor, memory: torch.Tensor, m_pos: torch.Tensor,
                attn_mask: torch.Tensor) -> torch.Tensor:  # fmt: skip
        q = self.norms[0](
            q + self.cross_attn(q + q_pos, memory + m_pos, memory, attn_mask=attn_mask, need_weights=False)[0]
        )
        qp = q + q_pos
        q = self.norms[1](q + self.self_attn(qp, qp, q, need_weights=False)[0])
        return self.norms[2](q + self.ffn(q))


class Mask2FormerHead(nn.Module):
    """
    Args:
        in_channels: channels of the backbone features (4 levels; from the method).
        num_classes: K.
        dim: feature / query width (256; Rein's ``query_dim`` must match).
        num_queries: learned queries without Rein's link (100).
        pyramid: scale factor per input level to build strides 4/8/16/32 from one-stride ViT features; ``null``
            when the inputs already form a pyramid.
        replace_query_feat: with linked queries, make the query features from them (``querys2feat``) instead of
            learning them (Rein: true for DINOv2 / EVA02, false for SAM-H).
        num_points, oversample, importance: point sampling of the mask losses (12544, 3.0, 0.75).
        no_object_weight, loss weights: class CE 2.0 (no-object 0.1), mask BCE 5.0, Dice 5.0; the same weights are
            the matching costs.
        tiny: shrink depth, FFNs and points for CPU smoke runs (``debug=tiny``); the width stays ``dim``.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        dim: int = 256,
        num_queries: int = 100,
        pyramid: Sequence[float] | None = (4.0, 2.0, 1.0, 0.5),
        encoder_layers: int = 6,
        encoder_ffn: int = 1024,
        num_points_deform: int = 4,
        decoder_layers: int = 9,
        decoder_ffn: int = 2048,
        num_heads: int = 8,
        num_feature_levels: int = 3,
        replace_query_feat: bool = True,
        num_points: int = 12544,
        oversample: float = 3.0,
        importance: float = 0.75,
        no_object_weight: float = 0.1,
        loss_weights: Sequence[float] = (2.0, 5.0, 5.0),
        ignore_index: int = IGNORE_INDEX,
        tiny: bool = False,
    ):
        super().__init__()
        if tiny:  # CPU smoke size: one encoder layer, one decoder layer per level, small FFNs, few points
            encoder_layers, decoder_layers, encoder_ffn, decoder_ffn = 1, num_feature_levels, 256, 256
            num_points = min(num_points, 256)
        in_channels = list(in_channels)
        if pyramid is not None and len(pyramid) != len(in_channels):
            raise ConfigError(f"head.pyramid={list(pyramid)} needs one scale per backbone output; the backbone gives "
                              f"{len(in_channels)} (backbone.out_indices)")  # fmt: skip
        if len(in_channels) <= num_feature_levels:
            raise ConfigError(f"Mask2Former needs more than {num_feature_levels} feature levels; the backbone gives "
                              f"{len(in_channels)}: set backbone.out_indices to 4 blocks")  # fmt: skip
        self.num_classes, self.num_queries, self.dim, self.num_inputs = (
            num_classes,
            num_queries,
            dim,
            len(in_channels),
        )
        self.pyramid = list(pyramid) if pyramid is not None else None
        self.num_heads, self.num_levels, self.replace_query_feat = (
            num_heads,
            num_feature_levels,
            replace_query_feat,
        )
        self.pixel_decoder = PixelDecoder(in_channels, dim, encoder_layers, num_heads, num_points_deform, encoder_ffn,
                                          num_feature_levels)  # fmt: skip
        self.level_embed = nn.Embedding(num_feature_levels, dim)
        self.query_embed = nn.Embedding(
            num_queries, dim
        )  # unused (and not trained) when Rein's queries are given
        self.query_feat = nn.Embedding(num_queries, dim)
        self.querys2feat: nn.Linear | None = None  # built by link()
        self.layers = nn.ModuleList(DecoderLayer(dim, num_heads, decoder_ffn) for _ in range(decoder_layers))
        self.post_norm = nn.LayerNorm(dim)
        self.cls_embed = nn.Linear(dim, num_classes + 1)
        self.mask_embed = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim),
                                        nn.ReLU(inplace=True), nn.Linear(dim, dim))  # fmt: skip
        self.criterion = SetCriterion(num_classes, ignore_index, num_points, oversample, importance, no_object_weight,
                                      *loss_weights)  # fmt: skip
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """mmdet's ``Mask2FormerHead.init_weights`` in its order: the pixel decoder's init, then every transformer-
        decoder tensor with more than one dimension xavier-normal (per layer self-attention, cross-attention, FFN:
        mmdet's module order). Embeddings, class / mask MLPs, norms and biases keep PyTorch's defaults, as there
        (``nn.MultiheadAttention`` zeroes its own biases)."""
        self.pixel_decoder.reset_parameters()
        for layer in self.layers:
            for p in (*layer.self_attn.parameters(), *layer.cross_attn.parameters(), *layer.ffn.parameters()):
                if p.dim() > 1:
                    nn.init.xavier_normal_(p)

    def link(self, num_queries: int) -> None:
        """Take ``num_queries`` linked queries (Rein): drop the learned query positions (and features, with
        ``replace_query_feat``, building ``querys2feat`` instead), which would never get gradients and stall DDP."""
        if not self.replace_query_feat and num_queries != self.num_queries:
            raise ConfigError(f"head.replace_query_feat=false keeps {self.num_queries} learned query features, but "
                              f"the method links {num_queries} queries; set head.num_queries={num_queries}")  # fmt: skip
        self.num_queries = num_queries
        self.query_embed = None
        if self.replace_query_feat:
            self.query_feat = None
            self.querys2feat = nn.Linear(self.dim, self.dim)

    # --------------------------------------------------------------------------------------- forward
    def _prediction(self, q: torch.Tensor, mask_features: torch.Tensor, attn_size) -> tuple:
        q = self.post_norm(q)
        cls = self.cls_embed(q)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(q), mask_features)
        attn = F.interpolate(masks, size=attn_size, mode="bilinear", align_corners=False)
        attn = (attn.flatten(2).sigmoid() < 0.5).detach()  # True = may not attend
        attn = attn & ~attn.all(-1, keepdim=True)  # a query masked everywhere attends everywhere
        return cls, masks, attn.repeat_interleave(self.num_heads, dim=0)

    def forward(self, features: Sequence[torch.Tensor], queries: torch.Tensor | None = None) -> dict:
        feats = list(features)
        if len(feats) != self.num_inputs:
            raise ConfigError(
                f"Mask2Former was built for {self.num_inputs} feature levels but got {len(feats)}"
            )
        if self.pyramid is not None:
            feats = [f if s == 1 else F.interpolate(f, scale_factor=s, mode="bilinear", align_corners=False)
                     for f, s in zip(feats, self.pyramid)]  # fmt: skip
        mask_features, memories = self.pixel_decoder(feats)
        b = mask_features.shape[0]
        mem, mem_pos = [], []
        for i, m in enumerate(memories):
            mem.append(m.flatten(2).transpose(1, 2) + self.level_embed.weight[i].view(1, 1, -1))
            h, w = m.shape[-2:]
            pos = size_cached(
                self, sine_position_encoding, 1, h, w, self.dim // 2, device=m.device, dtype=m.dtype
            )
            mem_pos.append(pos.expand(b, -1, -1, -1).flatten(2).transpose(1, 2))
        if queries is not None:
            q_pos = queries.to(mask_features.dtype)[None].expand(b, -1, -1)
            q = (
                self.querys2feat(q_pos)
                if self.replace_query_feat
                else self.query_feat.weight[None].expand(b, -1, -1)
            )
        elif self.query_embed is None:
            raise ConfigError("this Mask2Former head was linked to a method's queries but got none")
        else:
            q_pos = self.query_embed.weight[None].expand(b, -1, -1)
            q = self.query_feat.weight[None].expand(b, -1, -1)
        cls, masks, attn = self._prediction(q, mask_features, memories[0].shape[-2:])
        out_cls, out_masks = [cls], [masks]
        for i, layer in enumerate(self.layers):
            lvl = i % self.num_levels
            q = layer(q, q_pos, mem[lvl], mem_pos[lvl], attn)
            cls, masks, attn = self._prediction(
                q, mask_features, memories[(i + 1) % self.num_levels].shape[-2:]
            )
            out_cls.append(cls)
            out_masks.append(masks)
        return {"cls": out_cls, "masks": out_masks}

    def repeated_layers(self) -> list[nn.Module]:
        """The layers ``compile=true`` compiles one by one (each kind one graph): the pixel decoder's deformable
        encoder layers and the masked-attention decoder layers."""
        return [*self.pixel_decoder.layers, *self.layers]

    def load_official(self, state: dict) -> None:
        """The ``decode_head.*`` tensors of an official mmseg / mmdet Mask2Former checkpoint (e.g. a Rein release)."""
        load_official_head(self, state)

    # ----------------------------------------------------------------------------------- outputs
    def logits(self, output: dict, size: Sequence[int]) -> torch.Tensor:
        """(B, K, H, W) semantic scores of the last layer: Σ_q softmax(class)[c] · sigmoid(mask upsampled to size)."""
        masks = F.interpolate(output["masks"][-1], size=tuple(size), mode="bilinear", align_corners=False)
        return torch.einsum("bqc,bqhw->bchw", output["cls"][-1].softmax(-1)[..., :-1], masks.sigmoid())

    def loss(self, output: dict, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The last layer's class / mask / Dice losses, and every earlier prediction's summed as ``loss_aux`` (all
        layers matched and scored together: :meth:`SetCriterion.losses`)."""
        per_layer = self.criterion.losses(output["cls"], output["masks"], labels)
        out = {k: v[-1] for k, v in per_layer.items()}
        out["loss_aux"] = sum(per_layer.values())[:-1].sum()
        return out


# head=mask2former: the method supplies in_channels and num_classes (a partial node)
register_signature(
    Mask2FormerHead,
    "head",
    "mask2former_schema",
    supplied=("in_channels", "num_classes"),
    partial=True,
    target="dgss.models.heads.mask2former.Mask2FormerHead",
)
