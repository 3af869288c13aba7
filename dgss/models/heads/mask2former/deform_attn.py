"""Multi-scale deformable attention (Deformable DETR) in plain PyTorch: bilinear sampling with ``grid_sample``.

Each query attends, per head, to ``num_points`` sampling locations on each of ``num_levels`` feature maps, at
offsets predicted from the query around its reference point, weighted by a softmax over levels × points.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dgss.models.heads.mask2former.cache import size_cached


def ms_deform_attn(value: torch.Tensor, shapes: Sequence[tuple[int, int]], locations: torch.Tensor,
                   weights: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """
    Args:
        value: (B, sum h·w, heads, d) values of all levels, flattened row-major, levels concatenated.
        shapes: (h, w) of each level.
        locations: (B, Nq, heads, levels, points, 2) sampling positions (x, y) in [0, 1] of each level.
        weights: (B, Nq, heads, levels, points) attention weights.

    Returns:
        (B, Nq, heads·d). Bilinear sampling with zero padding, pixel centres at (i + 0.5) / size.
    """
    b, _, heads, d = value.shape
    _, nq, _, levels, points, _ = locations.shape
    grids = 2 * locations - 1
    sampled = []
    for lvl, (v, (h, w)) in enumerate(zip(value.split([h * w for h, w in shapes], dim=1), shapes)):
        v = v.permute(0, 2, 3, 1).reshape(b * heads, d, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).reshape(b * heads, nq, points, 2)
        sampled.append(
            F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        )  # (B·H, d, Nq, P)
    attn = weights.transpose(1, 2).reshape(b * heads, 1, nq, levels * points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * attn).sum(-1)  # (B·H, d, Nq)
    return out.view(b, heads * d, nq).transpose(1, 2)


def level_sizes(
    shapes: tuple[tuple[int, int], ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """(levels, 2): each level's (w, h), the divisor that turns pixel offsets into normalised ones."""
    return torch.tensor([[w, h] for h, w in shapes], dtype=dtype, device=device)


class MSDeformAttn(nn.Module):
    """Deformable attention module (mmcv ``MultiScaleDeformableAttention`` semantics, including its init and the
    residual: ``forward`` returns ``query + attention``)."""

    def __init__(
        self,
        dim: int = 256,
        num_heads: int = 8,
        num_levels: int = 3,
        num_points: int = 4,
        dropout: float = 0.0,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"deformable attention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.num_levels, self.num_points = num_heads, num_levels, num_points
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(self.num_heads, dtype=torch.float32) * (2 * math.pi / self.num_heads)
        grid = torch.stack([theta.cos(), theta.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True).values).view(self.num_heads, 1, 1, 2)
        grid = grid.repeat(1, self.num_levels, self.num_points, 1) * torch.arange(
            1, self.num_points + 1
        ).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, query: torch.Tensor, query_pos: torch.Tensor, reference_points: torch.Tensor,
                shapes: Sequence[tuple[int, int]]) -> torch.Tensor:  # fmt: skip
        """query (B, N, C) is also the value (encoder self-attention); reference_points (B, N, levels, 2)."""
        b, n, c = query.shape
        value = self.value_proj(query).view(b, n, self.num_heads, c // self.num_heads)
        q = query + query_pos
        offsets = self.sampling_offsets(q).view(b, n, self.num_heads, self.num_levels, self.num_points, 2)
        weights = self.attention_weights(q).view(b, n, self.num_heads, self.num_levels * self.num_points)
        weights = weights.softmax(-1).view(b, n, self.num_heads, self.num_levels, self.num_points)
        normaliser = size_cached(self, level_sizes, tuple(map(tuple, shapes)), query.dtype, query.device)
        locations = (
            reference_points[:, :, None, :, None, :] + offsets / normaliser[None, None, None, :, None, :]
        )
        out = self.output_proj(ms_deform_attn(value, shapes, locations, weights))
        return query + self.dropout(out)
