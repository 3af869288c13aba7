"""Mask2Former's pixel decoder: a deformable-attention encoder over the three coarsest levels plus an FPN step to
the finest level (mmdet ``MSDeformAttnPixelDecoder`` semantics)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dgss.models.heads.mask2former.cache import size_cached
from dgss.models.heads.mask2former.deform_attn import MSDeformAttn


def sine_position_encoding(b: int, h: int, w: int, num_feats: int = 128, temperature: float = 10000.0,
                           device=None, dtype=torch.float32) -> torch.Tensor:  # fmt: skip
    """DETR's normalised sine encoding of an unpadded (h, w) grid: (B, 2·num_feats, h, w), y features first."""
    eps, scale = 1e-6, 2 * math.pi
    y = torch.arange(1, h + 1, device=device, dtype=dtype)[:, None].expand(h, w)
    x = torch.arange(1, w + 1, device=device, dtype=dtype)[None, :].expand(h, w)
    y, x = y / (h + eps) * scale, x / (w + eps) * scale
    dim_t = temperature ** (2 * (torch.arange(num_feats, device=device, dtype=dtype) // 2) / num_feats)
    pos_x, pos_y = x[..., None] / dim_t, y[..., None] / dim_t
    pos_x = torch.stack([pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()], dim=-1).flatten(-2)
    pos_y = torch.stack([pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()], dim=-1).flatten(-2)
    return torch.cat([pos_y, pos_x], dim=-1).permute(2, 0, 1)[None].expand(b, -1, -1, -1)


def _conv_gn(cin: int, cout: int, k: int, relu: bool, bias: bool = False) -> nn.Sequential:
    """mmcv's ConvModule (conv, GroupNorm(32), optional ReLU) as ``0`` / ``1`` / ``2``."""
    layers = [nn.Conv2d(cin, cout, k, padding=k // 2, bias=bias), nn.GroupNorm(32, cout)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


def _caffe2_xavier_(conv: nn.Conv2d) -> None:
    """mmengine's ``caffe2_xavier_init``: kaiming-uniform with a = 1, fan-in, leaky-ReLU gain; bias 0."""
    nn.init.kaiming_uniform_(conv.weight, a=1, mode="fan_in", nonlinearity="leaky_relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class EncoderLayer(nn.Module):
    """Deformable self-attention, norm, FFN, norm (post-norm)."""

    def __init__(
        self, dim: int, num_heads: int, num_levels: int, num_points: int, ffn: int, dropout: float = 0.0
    ):
        super().__init__()
        self.attn = MSDeformAttn(dim, num_heads, num_levels, num_points, dropout)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(ffn, dim),
                                 nn.Dropout(dropout))  # fmt: skip

    def forward(self, x: torch.Tensor, pos: torch.Tensor, ref: torch.Tensor, shapes) -> torch.Tensor:
        x = self.norm1(self.attn(x, pos, ref, shapes))
        return self.norm2(x + self.ffn(x))


class PixelDecoder(nn.Module):
    """
    Args:
        in_channels: channels of the inputs, finest first (strides 4, 8, 16, 32 for Mask2Former).
        dim: feature width (256).
        num_encoder_levels: the coarsest levels the deformable encoder runs on (3).

    ``forward(features)`` returns ``(mask_features at the finest level, [encoder outputs coarsest first])``.
    """

    def __init__(self, in_channels: Sequence[int], dim: int = 256, num_layers: int = 6, num_heads: int = 8,
                 num_points: int = 4, ffn: int = 1024, num_encoder_levels: int = 3):  # fmt: skip
        super().__init__()
        if len(in_channels) <= num_encoder_levels:
            raise ValueError(
                f"the pixel decoder needs more than {num_encoder_levels} input levels, got {len(in_channels)}"
            )
        self.num_inputs, self.num_levels = len(in_channels), num_encoder_levels
        coarse = list(in_channels)[::-1][:num_encoder_levels]  # coarsest first
        # mmdet builds the input projections with bias=True next to the GroupNorm (the FPN convs without): an
        # official checkpoint carries input_convs.N.conv.bias
        self.input_convs = nn.ModuleList(_conv_gn(c, dim, 1, relu=False, bias=True) for c in coarse)
        self.level_encoding = nn.Embedding(num_encoder_levels, dim)
        self.layers = nn.ModuleList(EncoderLayer(dim, num_heads, num_encoder_levels, num_points, ffn)
                                    for _ in range(num_layers))  # fmt: skip
        fine = list(in_channels)[: self.num_inputs - num_encoder_levels][::-1]  # finer levels, coarsest first
        self.lateral_convs = nn.ModuleList(_conv_gn(c, dim, 1, relu=False) for c in fine)
        self.output_convs = nn.ModuleList(_conv_gn(dim, dim, 3, relu=True) for _ in fine)
        self.mask_feature = nn.Conv2d(dim, dim, 1)
        self.dim = dim
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """mmdet's ``MSDeformAttnPixelDecoder.init_weights``, in its order (one seed gives mmdet's tensors): input
        projections xavier-uniform (gain 1, bias 0); lateral / output convs and ``mask_feature`` caffe2-xavier
        (kaiming-uniform, a = 1, fan-in, leaky-ReLU; bias 0); level encoding N(0, 1); every encoder tensor with more
        than one dimension xavier-normal; then each deformable attention's own init (mmcv). GroupNorm / LayerNorm
        keep (1, 0) and the encoder FFN biases PyTorch's default, as there."""
        for conv in self.input_convs:
            nn.init.xavier_uniform_(conv[0].weight, gain=1)
            nn.init.zeros_(conv[0].bias)
        for lateral, output in zip(self.lateral_convs, self.output_convs):
            _caffe2_xavier_(lateral[0])
            _caffe2_xavier_(output[0])
        _caffe2_xavier_(self.mask_feature)
        nn.init.normal_(self.level_encoding.weight, mean=0.0, std=1.0)
        for layer in self.layers:  # mmdet: encoder.parameters(), i.e. self-attention then FFN per layer
            for p in (*layer.attn.parameters(), *layer.ffn.parameters()):
                if p.dim() > 1:
                    nn.init.xavier_normal_(p)
        for layer in self.layers:
            layer.attn.reset_parameters()

    @staticmethod
    def reference_points(shapes, device, dtype) -> torch.Tensor:
        """(sum h·w, 2) normalised pixel centres (x, y) of every level."""
        refs = []
        for h, w in shapes:
            y, x = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, device=device, dtype=dtype),
                                  torch.linspace(0.5, w - 0.5, w, device=device, dtype=dtype), indexing="ij")  # fmt: skip
            refs.append(torch.stack([x.reshape(-1) / w, y.reshape(-1) / h], -1))
        return torch.cat(refs)

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        coarse = list(features)[::-1][: self.num_levels]
        b = coarse[0].shape[0]
        tokens, pos, shapes = [], [], []
        for i, (f, conv) in enumerate(zip(coarse, self.input_convs)):
            h, w = f.shape[-2:]
            shapes.append((h, w))
            tokens.append(conv(f).flatten(2).transpose(1, 2))
            p = size_cached(
                self, sine_position_encoding, 1, h, w, self.dim // 2, device=f.device, dtype=f.dtype
            )
            pos.append(
                p.expand(b, -1, -1, -1).flatten(2).transpose(1, 2)
                + self.level_encoding.weight[i].view(1, 1, -1)
            )
        x, pos = torch.cat(tokens, 1), torch.cat(pos, 1)
        ref = size_cached(self, self.reference_points, tuple(shapes), x.device, x.dtype)
        ref = ref[None, :, None, :].expand(b, -1, self.num_levels, -1)
        for layer in self.layers:
            x = layer(x, pos, ref, shapes)
        outs = [
            t.transpose(1, 2).reshape(b, self.dim, h, w)
            for t, (h, w) in zip(x.split([h * w for h, w in shapes], 1), shapes)
        ]
        fine = list(features)[: self.num_inputs - self.num_levels][::-1]
        for f, lateral, output in zip(fine, self.lateral_convs, self.output_convs):
            y = lateral(f)
            y = y + F.interpolate(outs[-1], size=y.shape[-2:], mode="bilinear", align_corners=False)
            outs.append(output(y))
        return self.mask_feature(outs[-1]), outs[: self.num_levels]
