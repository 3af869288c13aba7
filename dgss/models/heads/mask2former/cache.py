"""Tensors made once per input size: Mask2Former's position encodings, reference points and level sizes depend only
on the feature maps' size, dtype and device, so each module makes them on its first forward at that size."""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch
from torch import nn


def size_cached(
    module: nn.Module, make: Callable[..., torch.Tensor], *args: Hashable, **kwargs: Hashable
) -> torch.Tensor:
    """``make(*args, **kwargs)`` once per argument set for ``module``: tensors that depend only on an input size,
    dtype and device (position encodings, reference points, level sizes) are made on the first forward at that size,
    not on every one (the level sizes would otherwise be a blocking host-to-device copy each time). Made outside
    autograd and inference mode, so a training step may use what a validation made; never changed in place. Under
    ``torch.compile`` made in the graph (constants the compiler folds)."""
    if torch.compiler.is_compiling():
        return make(*args, **kwargs)
    cache = module.__dict__.setdefault("_size_cache", {})
    key = (make.__qualname__, args, tuple(sorted(kwargs.items())))
    if key not in cache:
        with torch.inference_mode(False), torch.no_grad():
            cache[key] = make(*args, **kwargs)
    return cache[key]
