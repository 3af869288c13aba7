"""The contracts of dgss's decode heads, declared (``typing.Protocol``) rather than probed with ``getattr``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class SegmentationHead(Protocol):
    """What every method asks of its decode head (:class:`~dgss.models.heads.light.LightHead`,
    :class:`~dgss.models.heads.mask2former.Mask2FormerHead`).

    ``head(features, queries=None)`` takes the backbone's feature maps (finest first) and returns the head's own
    output; ``loss(output, labels)`` the named loss terms against int64 labels (255 ignored), summed by the method;
    ``logits(output, size)`` per-class logits (B, K, *size) for evaluation and inference.
    """

    def __call__(self, features: Sequence[torch.Tensor], queries: torch.Tensor | None = None) -> Any: ...

    def loss(self, output: Any, labels: torch.Tensor) -> dict[str, torch.Tensor]: ...

    def logits(self, output: Any, size: Sequence[int]) -> torch.Tensor: ...


@runtime_checkable
class QueryHead(SegmentationHead, Protocol):
    """A head whose queries a method can supply (Rein's token-to-query link): ``dim`` is the query width,
    ``link(num_queries)`` drops the learned queries the supplied ones replace, ``load_official(state)`` imports the
    ``decode_head.*`` tensors of an official (mmseg) release."""

    dim: int

    def link(self, num_queries: int) -> None: ...

    def load_official(self, state: Mapping[str, torch.Tensor]) -> None: ...


@runtime_checkable
class RegionalHead(SegmentationHead, Protocol):
    """A head with layers that repeat: ``compile=true`` compiles each of ``repeated_layers()`` (one graph per kind)
    instead of the whole forward (a head without them is compiled whole)."""

    def repeated_layers(self) -> list[nn.Module]: ...


class HeadFactory(Protocol):
    """How a method builds its head (a Hydra partial of the ``head`` config)."""

    def __call__(self, *, in_channels: Sequence[int], num_classes: int) -> SegmentationHead: ...
