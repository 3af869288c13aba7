"""A fixed, seeded subset of a training source (``data.source_subset``): RecycleLoRA's official runs train on a random
half of GTAV (12,403 of 24,966 images, ``RandomSubsetDataset(num_samples=12403, seed=None)``: drawn once per run,
unseeded, so no two runs see the same images). dgss draws the same kind of subset from a seed, so a run, its resume
and a rerun see the same images; the indices are sorted (the training sampler shuffles)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dgss.data.protocols import LabelsOnly, SegmentationData, TestSized
from dgss.errors import ConfigError


@dataclass(frozen=True)
class SubsetOptions:
    """``data.source_subset``: ``size`` items of the source ``source`` (null: the only source) drawn with ``seed``."""

    size: int
    seed: int = 0
    source: str | None = None


def subset_indices(length: int, size: int, seed: int) -> list[int]:
    """``size`` distinct indices of ``range(length)``, drawn by ``torch.randperm`` from ``seed``, sorted.

    >>> subset_indices(10, 4, seed=0) == sorted(subset_indices(10, 4, seed=0)) and len(set(subset_indices(10, 4, 0)))
    4
    """
    if not 1 <= size <= length:
        raise ConfigError(f"data.source_subset.size={size} must be between 1 and the source's {length} items")
    perm = torch.randperm(length, generator=torch.Generator().manual_seed(int(seed)))
    return sorted(perm[:size].tolist())


class SourceSubset:
    """``data`` restricted to ``indices`` (a :class:`SegmentationData` itself; label reading and the test size pass
    through)."""

    def __init__(self, data: SegmentationData, indices: list[int], options: SubsetOptions):
        self.data, self.indices, self.options = data, list(indices), options
        self.on_bad = data.on_bad
        if isinstance(data, TestSized):
            self.test_size = data.test_size
        if isinstance(data, LabelsOnly):
            self.cache_key = f"{data.cache_key}-subset{options.size}-seed{options.seed}"

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, i: int):
        return self.data.load(self.indices[i])

    def name(self, i: int) -> str:
        return self.data.name(self.indices[i])

    def read_label(self, i: int) -> np.ndarray:
        return self.data.read_label(self.indices[i])


def apply_subset(sources: dict[str, SegmentationData], subset) -> tuple[dict, SubsetOptions | None]:
    """``sources`` with ``data.source_subset`` applied (a mapping ``{size, seed, source}`` or None)."""
    if not subset:
        return sources, None
    unknown = sorted(set(subset) - {"size", "seed", "source"})
    if unknown or "size" not in subset:
        raise ConfigError(f"data.source_subset takes size (required), seed and source; got {dict(subset)}")
    name = subset.get("source")
    if name is None:
        if len(sources) != 1:
            raise ConfigError(f"data.source_subset: name the source to draw from (data.source_subset.source, one "
                              f"of {list(sources)})")  # fmt: skip
        name = next(iter(sources))
    if name not in sources:
        raise ConfigError(f"data.source_subset.source={name!r} is not in data.sources {list(sources)}")
    options = SubsetOptions(int(subset["size"]), int(subset.get("seed", 0)), name)
    out = dict(sources)
    out[name] = SourceSubset(
        sources[name], subset_indices(len(sources[name]), options.size, options.seed), options
    )
    return out, options
