"""The contracts of dgss's data sets, declared (``typing.Protocol``) rather than probed with ``getattr``."""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class SegmentationData(Protocol):
    """What dgss needs of a data set."""

    on_bad: Literal["error", "skip"]

    def __len__(self) -> int: ...

    def load(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Item ``i``: uint8 image (3, H, W) and uint8 trainId label (H, W), checked (:class:`ConfigError` names the
        file and what is wrong)."""
        ...

    def name(self, i: int) -> str:
        """A short name of item ``i`` (``<data set>/<file>``) for logs and predictions."""
        ...


@runtime_checkable
class TestSized(Protocol):
    """A data set with its own evaluation size (the Rein protocol's per-data-set test resolution)."""

    test_size: tuple[int, int] | None


@runtime_checkable
class LabelsOnly(Protocol):
    """A data set that can read labels without images (rare-class sampling counts classes over them)."""

    cache_key: str

    def read_label(self, i: int) -> np.ndarray: ...


@runtime_checkable
class PairedData(Protocol):
    """A data set that renders each item's scene again in other domains, with the same label: FisherTune's oracle x′
    (``method.fishertune.perturb.type: paired_render``). ``paired_domains`` empty: no pairing."""

    paired_domains: tuple[str, ...]

    def load_paired(self, i: int) -> torch.Tensor:
        """uint8 (3, H, W): scene ``i`` in ``paired_domains[i % len(paired_domains)]``."""
        ...
