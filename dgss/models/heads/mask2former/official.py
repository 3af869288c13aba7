"""Import the ``decode_head.*`` tensors of an official (mmseg 1.x / mmdet 3.x) Mask2Former checkpoint, e.g. a
published Rein release, into :class:`Mask2FormerHead`.

The module tree here mirrors mmdet's, so the map is a few renames (ConvModule ``conv`` / ``gn`` → ``0`` / ``1``,
mmcv FFN ``layers.0.0`` / ``layers.1`` → ``0`` / ``3``, ``encoder.layers`` → ``layers``, ``norms.0/1`` →
``norm1/2``, ``attn.attn`` → ``attn``). The names follow mmdet 3.x's Mask2Former and Rein's head, as read from
their source (tests/test_mask2former.py writes the official key list out from it, including the input projections'
conv bias); no downloaded release was checked, so every tensor must match by name and shape or the import fails
naming the keys.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from dgss.errors import ConfigError, state_mismatch

PREFIX = "decode_head."
RULES = [
    (r"^pixel_decoder\.(input_convs|lateral_convs|output_convs)\.(\d+)\.conv\.", r"pixel_decoder.\1.\2.0."),
    (r"^pixel_decoder\.(input_convs|lateral_convs|output_convs)\.(\d+)\.gn\.", r"pixel_decoder.\1.\2.1."),
    (r"^pixel_decoder\.encoder\.layers\.(\d+)\.self_attn\.", r"pixel_decoder.layers.\1.attn."),
    (r"^pixel_decoder\.encoder\.layers\.(\d+)\.ffn\.layers\.0\.0\.", r"pixel_decoder.layers.\1.ffn.0."),
    (r"^pixel_decoder\.encoder\.layers\.(\d+)\.ffn\.layers\.1\.", r"pixel_decoder.layers.\1.ffn.3."),
    (r"^pixel_decoder\.encoder\.layers\.(\d+)\.norms\.0\.", r"pixel_decoder.layers.\1.norm1."),
    (r"^pixel_decoder\.encoder\.layers\.(\d+)\.norms\.1\.", r"pixel_decoder.layers.\1.norm2."),
    (r"^transformer_decoder\.layers\.(\d+)\.(self|cross)_attn\.attn\.", r"layers.\1.\2_attn."),
    (r"^transformer_decoder\.layers\.(\d+)\.ffn\.layers\.0\.0\.", r"layers.\1.ffn.0."),
    (r"^transformer_decoder\.layers\.(\d+)\.ffn\.layers\.1\.", r"layers.\1.ffn.3."),
    (r"^transformer_decoder\.layers\.(\d+)\.norms\.", r"layers.\1.norms."),
    (r"^transformer_decoder\.post_norm\.", r"post_norm."),
]


def mmdet_to_dgss(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``decode_head.*`` tensors renamed to :class:`Mask2FormerHead`'s parameter names."""
    out = {}
    for k, v in state.items():
        if not k.startswith(PREFIX):
            continue
        k = k[len(PREFIX) :]
        for pattern, repl in RULES:
            k = re.sub(pattern, repl, k)
        out[k] = v
    return out


def load_official_head(head: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load an official checkpoint's decode head into ``head`` strictly; one-line error naming what does not fit."""
    theirs = mmdet_to_dgss(state.get("state_dict", state))
    if not theirs:
        raise ConfigError(f"no Mask2Former tensors in the checkpoint: expected keys under {PREFIX!r}")
    problem = state_mismatch(head.state_dict(), theirs, shown=4)
    if problem:
        raise ConfigError(f"the checkpoint's decode head does not fit this Mask2Former head: {problem}")
    head.load_state_dict(theirs, strict=True)
