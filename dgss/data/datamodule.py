"""``DGSSDataModule``: named sources -> one training stream; named targets -> one evaluation loader each.

The training stream resumes exactly (``dgss.data.resumable``): checkpoints hold where the interrupted pass began and
how many batches of it were trained, and every sample is augmented under its own seed. Samplers are ours, not
Lightning's (``Trainer(use_distributed_sampler=False)``): training draws from the
concatenated sources (optionally weighted per source) and is split over ranks with Lightning's
``DistributedSamplerWrapper``; every evaluation loader uses ``UnrepeatedDistributedSampler``, so under DDP
each image is evaluated exactly once (the default sampler pads with duplicates and biases mIoU).
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from torch.utils.data import (
    ConcatDataset,
    DataLoader,
    Dataset,
    RandomSampler,
    SequentialSampler,
    WeightedRandomSampler,
    default_collate,
)

from dgss.compat import UnrepeatedDistributedSampler, batches_done
from dgss.data.classes import ClassSet
from dgss.data.protocols import TestSized
from dgss.data.rare_class import RareClassSampler, class_pixel_counts, split_index
from dgss.data.resumable import Draw, SeededSampler, SkipSampler
from dgss.data.samples import Samples
from dgss.data.subset import apply_subset
from dgss.data.transforms import TestPipeline, TrainPipeline
from dgss.data.workers import worker_init
from dgss.errors import ConfigError
from dgss.schemas import register_signature, signature_schema

log = logging.getLogger("dgss.data")


class _Sources(ConcatDataset):
    """The concatenated sources' samples. A sampler's item is a ``Draw(item, seed)`` or a bare item, and the item an
    index or (index, preferred class) from rare-class sampling: mapped to the source's own index, the rest passed
    on to its :class:`Samples` wrapper."""

    def __getitem__(self, i):
        item, seed = (i.item, i.seed) if isinstance(i, Draw) else (i, None)
        index, prefer = split_index(item)
        d = bisect.bisect_right(self.cumulative_sizes, index)
        local = index - (self.cumulative_sizes[d - 1] if d else 0)
        local = local if prefer is None else (local, prefer)
        return self.datasets[d][local if seed is None else Draw(local, seed)]


def collate_train(samples: list[dict]) -> dict:
    """Training samples as lists (crops of images smaller than the crop size are smaller; the method pads them after
    normalising), ``skipped`` as one count per sample."""
    batch = {"image": [s["image"] for s in samples], "label": [s["label"] for s in samples],
             "name": [s["name"] for s in samples], "skipped": torch.tensor([int(s["skipped"]) for s in samples])}  # fmt: skip
    if all(
        "paired_image" in s for s in samples
    ):  # the same scenes in another domain (data with paired domains)
        batch["paired_image"] = [s["paired_image"] for s in samples]
    return batch


def collate_eval(samples: list[dict]) -> dict:
    """``default_collate`` of the readable samples; the unreadable ones (``image`` None: ``on_bad: skip``) are left
    out and counted in ``skipped`` (a 0-d tensor); ``image`` is None when none of the batch was readable."""
    kept = [s for s in samples if s.get("image") is not None]
    skipped = sum(int(s.get("skipped", 0)) for s in samples)
    batch = default_collate([{k: v for k, v in s.items() if k != "skipped"} for s in kept]) if kept else {
        "image": None, "label": None, "name": []}  # fmt: skip
    batch["skipped"] = torch.tensor(skipped)
    return batch


def drop_settings_only(targets: Mapping[str, Any]) -> dict[str, Any]:
    """The targets that are data sets. An entry that is only settings (a mapping without ``_target_``, e.g. a
    recipe's ``cityscapes: {test_size: [2048, 1024]}`` meant for its real target) names a target this data config
    does not have (``debug=tiny`` swaps in the embedded data): left out with a warning naming it."""
    kept = {}
    for name, ds in targets.items():
        if isinstance(ds, Mapping) and "_target_" not in ds:
            log.warning(f"data.targets.{name} sets {', '.join(map(str, ds)) or 'nothing'} but this data config has no "
                        f"target {name!r} (a recipe's setting for its real data): ignored")  # fmt: skip
            continue
        kept[name] = ds
    if not kept:
        raise ConfigError("data.targets holds no data set (only settings for targets this data config lacks)")
    return kept


class DGSSDataModule(pl.LightningDataModule):
    """
    Args:
        sources: name -> training data set (a ``dgss.data.samples.SegmentationData``; its samples transformed by
            ``train_pipeline``).
        targets: name -> evaluation data set (transformed by ``test_pipeline``, at the data set's own ``test_size``
            where it has one). The DataModule hands out uint8 images and labels: the method normalises and pads.
        source_weights: name -> sampling weight; ``None`` samples images uniformly over the concatenation.
        exclude_from_mean: targets that are evaluated and logged but not part of ``val/mean_mIoU``
            (e.g. the source's own validation split).
        seed: seeds the training order (identically on every rank).
        rare_class_sampling: ``None``, or ``{temperature, min_pixels, cache_dir}`` (DAFormer rare-class sampling
            over the concatenated sources; excludes ``source_weights``).
        source_subset: ``None``, or ``{size, seed, source}``: train on ``size`` items of one source drawn once from
            ``seed`` (:mod:`dgss.data.subset`; RecycleLoRA's recipes: 12,403 of GTAV).
        num_classes / class_names / palette: the label space (default: the 19 Cityscapes classes; a custom
            space is labels 0..K-1 plus 255 = ignore).
    """

    def __init__(
        self,
        sources: Mapping[str, Dataset],
        targets: Mapping[str, Dataset],
        train_pipeline: TrainPipeline | None = None,
        test_pipeline: TestPipeline | None = None,
        source_weights: Mapping[str, float] | None = None,
        exclude_from_mean: Sequence[str] = (),
        batch_size: int = 8,
        val_batch_size: int = 1,
        num_workers: int = 4,
        pin_memory: bool = True,
        num_classes: int | None = None,
        class_names: Sequence[str] | None = None,
        palette: Sequence[Sequence[int]] | None = None,
        seed: int = 0,
        rare_class_sampling: Mapping | None = None,
        source_subset: Mapping | None = None,
    ):
        super().__init__()
        if not targets:
            raise ConfigError("data.targets is empty; name at least one evaluation data set")
        if batch_size <= 0 or val_batch_size <= 0:
            raise ConfigError(
                f"data.batch_size={batch_size} and data.val_batch_size={val_batch_size} must be > 0"
            )
        self.sources, self.targets = dict(sources), drop_settings_only(targets)
        self.sources, self.source_subset = apply_subset(self.sources, source_subset)
        if self.source_subset is not None:
            o = self.source_subset
            log.info(f"training on a subset of {o.source}: {o.size:,} of {len(self.sources[o.source].data):,} items "
                     f"(data.source_subset, seed {o.seed})")  # fmt: skip
        unknown = set(source_weights or {}) - set(self.sources)
        if unknown:
            raise ConfigError(
                f"data.source_weights names {sorted(unknown)}, which are not in data.sources {list(self.sources)}"
            )
        unknown = set(exclude_from_mean) - set(self.targets)
        if unknown:
            raise ConfigError(
                f"data.exclude_from_mean names {sorted(unknown)}, which are not in data.targets {list(self.targets)}"
            )
        self.source_weights = dict(source_weights) if source_weights else None
        self.exclude_from_mean = list(exclude_from_mean)
        self.train_pipeline = train_pipeline or TrainPipeline()
        self.test_pipeline = test_pipeline or TestPipeline()
        self.train_samples = {n: Samples(ds, self.train_pipeline) for n, ds in self.sources.items()}
        self.eval_samples = {n: Samples(ds, self._test_pipeline(ds), substitute=False)  # unreadable: left out
                             for n, ds in self.targets.items()}  # fmt: skip
        self.classes = ClassSet.build(num_classes, class_names, palette)
        self.batch_size, self.val_batch_size = int(batch_size), int(val_batch_size)
        self.num_workers, self.pin_memory = int(num_workers), bool(pin_memory)
        self.seed = int(seed)
        self.rare_class_sampling = dict(rare_class_sampling) if rare_class_sampling else None
        if self.rare_class_sampling and self.source_weights:
            raise ConfigError(
                "data.rare_class_sampling and data.source_weights both set; keep one (null the other)"
            )
        unknown = set(self.rare_class_sampling or {}) - {"temperature", "min_pixels", "cache_dir"}
        if unknown:
            raise ConfigError(
                f"data.rare_class_sampling has unknown keys {sorted(unknown)}; use temperature, min_pixels, cache_dir"
            )
        self._rcs_sampler: RareClassSampler | None = None
        self._train_sampler: SkipSampler | None = None
        self._resume_state: dict | None = None

    def _test_pipeline(self, ds) -> TestPipeline:
        size = ds.test_size if isinstance(ds, TestSized) else None  # a data set's own test resolution wins
        return self.test_pipeline.with_size(size) if size else self.test_pipeline

    def test_size(self, target: str) -> tuple[int, int] | None:
        """The (long, short) size target ``target``'s images are fitted into, or None (native)."""
        return self.eval_samples[target].transform.size

    # ------------------------------------------------------------------------------- naming
    @property
    def num_classes(self) -> int:
        return self.classes.num_classes

    @property
    def target_names(self) -> list[str]:
        return list(self.targets)

    @property
    def mean_targets(self) -> list[str]:
        return [t for t in self.targets if t not in self.exclude_from_mean]

    # ------------------------------------------------------------------------------ loaders
    def _dist(self) -> tuple[int, int] | None:
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            return trainer.world_size, trainer.global_rank
        return None

    HOST_KEYS = ("skipped", "name")  # bookkeeping read by the host: never sent to the device

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        """The images and labels go to the device (non-blocking from pinned memory); the skipped counts and names
        stay on the host, where the callbacks read them: reading a device copy would make the host wait for the
        device every step."""
        if not isinstance(batch, dict):
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        host = {k: batch[k] for k in self.HOST_KEYS if k in batch}
        moved = super().transfer_batch_to_device({k: v for k, v in batch.items() if k not in host}, device,
                                                 dataloader_idx)  # fmt: skip
        return {**moved, **host}

    def train_dataloader(self) -> DataLoader:
        if not self.sources:
            raise ConfigError("data.sources is empty; name at least one training data set")
        names = list(self.sources)
        data = _Sources([self.train_samples[n] for n in names])
        # the same seed on every rank: all ranks draw one order and each takes its own share; `gen` is re-seeded
        # at the start of every pass from the stream's own generator (dgss.data.resumable)
        gen = torch.Generator()
        if self.source_weights:
            per_sample = torch.cat([torch.full((len(self.sources[n]),), float(self.source_weights.get(n, 0.0)) / len(self.sources[n]))
                                    for n in names])  # fmt: skip
            sampler = WeightedRandomSampler(
                per_sample, num_samples=len(data), replacement=True, generator=gen
            )
        elif self.rare_class_sampling:
            sampler = self.rcs_sampler(data, gen)
        else:
            sampler = RandomSampler(data, generator=gen)
        # seeds are attached before the split over ranks: one augmentation per draw, whatever the world size
        seeds = sampler = SeededSampler(sampler, torch.Generator().manual_seed(self.seed), gen)
        dist = self._dist()
        if dist is not None:
            sampler = DistributedSamplerWrapper(sampler, num_replicas=dist[0], rank=dist[1], shuffle=False)
        if len(sampler) < self.batch_size:
            raise ConfigError(
                f"the training stream has {len(sampler)} samples per rank, fewer than data.batch_size={self.batch_size}"
            )
        self._train_sampler = SkipSampler(sampler, seeds, self.batch_size)
        if self._resume_state is not None:
            self._train_sampler.load_state_dict(self._resume_state)
            self._resume_state = None
        return DataLoader(data, batch_size=self.batch_size, sampler=self._train_sampler, drop_last=True, collate_fn=collate_train,
                          num_workers=self.num_workers, pin_memory=self.pin_memory, generator=self._loader_generator(),
                          persistent_workers=self.num_workers > 0, worker_init_fn=worker_init)  # fmt: skip

    def _loader_generator(self) -> torch.Generator:
        """The loader's own generator (worker base seeds): creating an iterator leaves the global stream alone, so
        a resumed run's dropout and point sampling continue exactly where the checkpointed run's were."""
        return torch.Generator().manual_seed(self.seed + 1)

    # ---------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """Where the training stream stands: the interrupted pass's generator state and the batches trained in it."""
        trainer = self.trainer
        if self._train_sampler is None or trainer is None:
            return {}
        done = batches_done(trainer)
        state = {"train_stream": self._train_sampler.state_dict(done)}
        if self.source_subset is not None:  # what the run trained on, beside its config
            state["source_subset"] = dataclasses.asdict(self.source_subset)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self._resume_state = state_dict.get("train_stream")

    def rcs_sampler(self, data: ConcatDataset, generator: torch.Generator) -> RareClassSampler:
        if self._rcs_sampler is None:
            cfg = self.rare_class_sampling
            counts = np.concatenate([
                class_pixel_counts(ds, self.num_classes, cfg.get("cache_dir"), self.num_workers) for ds in self.sources.values()
            ])  # fmt: skip
            self._rcs_sampler = RareClassSampler(
                counts, cfg.get("temperature", 0.01), cfg.get("min_pixels", 3000)
            )
            probs = ", ".join(
                f"{self.classes.names[c]} {p:.3f}" for c, p in self._rcs_sampler.class_probabilities().items()
            )
            log.info(f"rare-class sampling: P(class) = {probs}")
        self._rcs_sampler.generator = generator
        return self._rcs_sampler

    def _eval_loader(self, ds: Dataset) -> DataLoader:
        dist = self._dist()
        sampler = (UnrepeatedDistributedSampler(ds, num_replicas=dist[0], rank=dist[1], shuffle=False)
                   if dist is not None else SequentialSampler(ds))  # fmt: skip
        return DataLoader(ds, batch_size=self.val_batch_size, sampler=sampler, num_workers=self.num_workers,
                          pin_memory=self.pin_memory, generator=self._loader_generator(), collate_fn=collate_eval,
                          persistent_workers=self.num_workers > 0, worker_init_fn=worker_init)  # fmt: skip

    def val_dataloader(self) -> list[DataLoader]:
        return [self._eval_loader(ds) for ds in self.eval_samples.values()]

    test_dataloader = val_dataloader


# data=<name>: every data config starts from this node (its pipelines typed by theirs); `_convert_: all` hands the
# data sets plain lists and dicts
register_signature(
    DGSSDataModule,
    "data",
    "datamodule_schema",
    convert="all",
    nested={TrainPipeline: signature_schema(TrainPipeline), TestPipeline: signature_schema(TestPipeline)},
)
