"""A synthetic domain as a data set: sample ``i`` of a split is the scene ``SPLIT_OFFSETS[split] + i`` rendered in
the domain (:mod:`dgss.data.synthetic`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
from hydra.core.config_store import ConfigStore

from dgss.data.synthetic.style import DOMAINS, render_sample
from dgss.errors import ConfigError

SPLIT_OFFSETS = {
    "train": 0,
    "val": 10_000_000,
    "test": 20_000_000,
    "unlabelled": 30_000_000,
}  # unlabelled: pretraining


class SyntheticDomain:
    """``length`` samples of one embedded domain at ``height`` x ``width``, rendered on the fly (a
    ``dgss.data.samples.SegmentationData``).

    ``split`` selects a disjoint index range (train / val / test), so validation scenes are never trained on;
    the same (split, index) has the same layout in every domain.
    """

    on_bad = "error"  # rendered, never unreadable

    def __init__(self, domain: str, split: str = "train", length: int = 1000, height: int = 256, width: int = 512,
                 seed: int = 0, paired: Sequence[str] = ()):  # fmt: skip
        if domain not in DOMAINS:
            raise ConfigError(
                f"synthetic domain={domain!r} does not exist; choose one of {', '.join(DOMAINS)}"
            )
        if split not in SPLIT_OFFSETS:
            raise ConfigError(f"synthetic split={split!r}; choose one of {', '.join(SPLIT_OFFSETS)}")
        if length <= 0 or height <= 0 or width <= 0:
            raise ConfigError(
                f"synthetic length/height/width must be positive, got {length}/{height}/{width}"
            )
        self.domain, self.split, self.length = domain, split, int(length)
        self.height, self.width, self.seed = int(height), int(width), int(seed)
        bad = [d for d in paired if d not in DOMAINS]
        if bad:
            raise ConfigError(
                f"synthetic paired={list(paired)}: {bad} are not domains; choose from {', '.join(DOMAINS)}"
            )
        # the same scenes rendered in these domains (an oracle x′ for FisherTune: method.fishertune.perturb.type=paired_render)
        self.paired_domains = tuple(paired)

    def __len__(self) -> int:
        return self.length

    def read_label(self, i: int) -> np.ndarray:
        return np.array(
            render_sample(self.domain, SPLIT_OFFSETS[self.split] + i, self.height, self.width, self.seed)[1]
        )

    @property
    def cache_key(self) -> str:
        return f"synthetic/{self.domain}/{self.split}/{self.length}/{self.height}x{self.width}/{self.seed}"

    def load(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Image uint8 (3, H, W) and trainId label uint8 (H, W) of scene ``i`` (rendered, deterministic)."""
        if not 0 <= i < self.length:
            raise IndexError(i)
        img, lab = render_sample(
            self.domain, SPLIT_OFFSETS[self.split] + i, self.height, self.width, self.seed
        )
        return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous(), torch.from_numpy(np.array(lab))

    def name(self, i: int) -> str:
        return f"{self.domain}/{self.split}/{i:06d}"

    def load_paired(self, i: int) -> torch.Tensor:
        """Scene ``i`` rendered in ``paired_domains[i % len(paired_domains)]``: the same layout and label."""
        if not self.paired_domains:
            raise ConfigError(
                f"synthetic domain {self.domain!r} has no paired domains (synthetic paired=[...])"
            )
        domain = self.paired_domains[i % len(self.paired_domains)]
        img, _ = render_sample(domain, SPLIT_OFFSETS[self.split] + i, self.height, self.width, self.seed)
        return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()


@dataclasses.dataclass
class SyntheticScenes:
    """``data=synthetic``'s settings, the top-level ``synthetic`` block every domain of it reads: one size, one seed.

    Args:
        height: rendered height in pixels (also the training crop's).
        width: rendered width in pixels.
        train_length: distinct training scenes of the source (rendered on the fly).
        val_length: scenes per evaluation domain.
        seed: the scenes' seed (layouts and appearance draws).
        paired: render every training scene again in these domains through the same draws, collated as
            ``paired_image`` (FisherTune's oracle x′: ``method.fishertune.perturb.type=paired_render``), e.g.
            ``[photo, overcast, fog, night]``.
    """

    height: int = 96
    width: int = 192
    train_length: int = 4000
    val_length: int = 100
    seed: int = 0
    paired: list[str] = dataclasses.field(default_factory=list)


ConfigStore.instance().store(group="data", name="synthetic_schema", node=SyntheticScenes, package="synthetic")
