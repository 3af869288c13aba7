"""Rare-class sampling (DAFormer): draw a class c with P(c) ∝ exp((1 − f_c) / T) from the sources' pixel
frequencies f_c, then an image holding ≥ ``min_pixels`` of c; the train crop then prefers windows holding c.

Per-image class pixel counts are read once from the training labels (in parallel over the loader workers) and
cached as ``.npy`` under ``cache_dir``, keyed by the data set's ``cache_key`` (its files, or its generator
settings), so later runs start at once.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dgss.data.protocols import LabelsOnly
from dgss.data.workers import worker_init
from dgss.errors import ConfigError
from dgss.io import atomic_path

log = logging.getLogger("dgss.data")


class _Counts(Dataset):
    def __init__(self, ds, num_classes: int):
        self.ds, self.num_classes = ds, num_classes

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> np.ndarray:
        label = np.asarray(self.ds.read_label(i)).ravel()
        return np.bincount(label[label < self.num_classes], minlength=self.num_classes)


def class_pixel_counts(
    ds, num_classes: int, cache_dir: str | Path | None = None, num_workers: int = 0
) -> np.ndarray:
    """(len(ds), num_classes) int64 pixel counts of each class in each training label."""
    if not isinstance(ds, LabelsOnly):
        raise ConfigError(
            f"rare-class sampling needs labels without images: {type(ds).__name__} has no read_label() / cache_key"
        )
    path = None
    key = ds.cache_key
    if cache_dir is not None:
        digest = hashlib.sha256(f"{key}|{num_classes}".encode()).hexdigest()[:16]
        path = Path(cache_dir).expanduser() / f"class_pixels_{digest}.npy"
        if path.is_file():
            try:  # no pickles (a crafted cache file), and a truncated one is counted again
                counts = np.load(path, allow_pickle=False)
            except (OSError, ValueError, EOFError) as e:
                log.warning(f"rare-class sampling: the class-count cache {path} is unreadable ({type(e).__name__}); "
                            "counting again")  # fmt: skip
                counts = None
            if counts is not None and counts.shape == (len(ds), num_classes) and counts.dtype == np.int64:
                return counts
    loader = DataLoader(
        _Counts(ds, num_classes), batch_size=None, num_workers=num_workers, worker_init_fn=worker_init
    )
    log.info(f"rare-class sampling: counting class pixels in {len(ds)} labels")
    counts = np.stack([np.asarray(c) for c in loader]).astype(np.int64)
    if path is not None:
        try:
            with (
                atomic_path(path) as tmp,
                open(tmp, "wb") as f,
            ):  # per-process temporary: ranks may write at once
                np.save(f, counts)
        except OSError as e:
            log.warning(f"rare-class sampling: could not cache class counts at {path}: {e}")
    return counts


class RareClassSampler(Sampler):
    """Yields ``(index, class)`` pairs: the class drawn by rarity, the index uniformly among the images holding
    ≥ ``min_pixels`` of it. Classes that no image holds that much of are never drawn.

    Args:
        counts: (N, K) pixel counts per image and class (over the concatenated sources).
        temperature: T; smaller = rarer classes more often (DAFormer: 0.01).
        min_pixels: an image qualifies for class c with at least this many pixels of c (DAFormer: 3000).
        num_samples: pairs per epoch (default N).
    """

    def __init__(self, counts: np.ndarray, temperature: float = 0.01, min_pixels: int = 3000,
                 num_samples: int | None = None, generator: torch.Generator | None = None):  # fmt: skip
        if temperature <= 0:
            raise ConfigError(f"data.rare_class_sampling.temperature={temperature} must be > 0")
        counts = np.asarray(counts)
        freq = counts.sum(0) / max(counts.sum(), 1)
        self.images = [np.flatnonzero(counts[:, c] >= min_pixels) for c in range(counts.shape[1])]
        self.classes = np.array([c for c, imgs in enumerate(self.images) if len(imgs)])
        if not len(self.classes):
            raise ConfigError(
                f"rare-class sampling: no image has ≥ {min_pixels} pixels of any class; lower min_pixels"
            )
        logits = torch.tensor((1 - freq[self.classes]) / temperature, dtype=torch.float64)
        self.probs = torch.softmax(logits, 0)
        self.num_samples = int(num_samples or len(counts))
        self.generator = generator

    def class_probabilities(self) -> dict[int, float]:
        return {int(c): float(p) for c, p in zip(self.classes, self.probs)}

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        drawn = torch.multinomial(self.probs, self.num_samples, replacement=True, generator=self.generator)
        picks = torch.rand(self.num_samples, generator=self.generator, dtype=torch.float64)
        for k, u in zip(drawn.tolist(), picks.tolist()):
            imgs = self.images[self.classes[k]]
            yield int(imgs[int(u * len(imgs))]), int(self.classes[k])


def split_index(i: int | Sequence[int]) -> tuple[int, int | None]:
    """A sampler's item as (index, preferred class or None)."""
    if isinstance(i, (tuple, list)):
        return int(i[0]), int(i[1])
    return int(i), None
