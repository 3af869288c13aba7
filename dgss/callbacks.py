"""Callbacks: per-class IoU tables (console, metrics.json, CSV, wandb table) and wandb image overlays."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from rich.table import Table

from dgss import console
from dgss.checkpoint import put_config, put_section, section, with_elements
from dgss.compat import StepProgressBar, foreach_copy_, foreach_lerp_  # noqa: F401  (StepProgressBar: callbacks=default)
from dgss.console import show
from dgss.data.classes import IGNORE_INDEX
from dgss.io import atomic_path
from dgss.loggers import wandb_logger
from dgss.metrics import summarize


def _class_names(trainer: pl.Trainer, k: int) -> list[str]:
    dm = getattr(trainer, "datamodule", None)
    return list(dm.classes.names) if dm is not None else [str(i) for i in range(k)]


def iou_table(
    per_class: dict[str, torch.Tensor], names: list[str], mean_over: list[str] | None, title: str
) -> Table:
    table = Table(title=title, show_lines=False)
    table.add_column("class")
    for d in per_class:
        table.add_column(d + ("" if mean_over is None or d in mean_over else " *"), justify="right")
    fmt = lambda v: "-" if math.isnan(v) else f"{100 * v:.2f}"  # noqa: E731
    for c, name in enumerate(names):
        table.add_row(name, *(fmt(float(iou[c])) for iou in per_class.values()))
    scores = summarize(per_class, mean_over)
    table.add_section()
    table.add_row("mIoU", *(f"{scores[f'{d}/mIoU']:.2f}" for d in per_class), style="bold")
    table.caption = f"mean over targets: {scores['mean_mIoU']:.2f}" + (
        "  (* not in the mean)" if mean_over is not None and set(mean_over) != set(per_class) else ""
    )
    return table


def _protocol(trainer: pl.Trainer, pl_module: pl.LightningModule, domain: str) -> dict:
    """How a target was evaluated (test resolution changes DGSS numbers by ~2 mIoU: record it with each result)."""
    dm = trainer.datamodule
    ds = dm.targets.get(domain) if dm is not None else None
    size = dm.test_size(domain) if ds is not None else None
    counts = pl_module.last_counts.get(domain)  # scored / left out (on_bad: skip) in this run
    out = {"images": counts["images"] if counts else (len(ds) if ds is not None else None),
           "skipped": counts["skipped"] if counts else 0, "test_size": list(size) if size else "native"}  # fmt: skip
    return {**out, "inference": asdict(pl_module.inference_options)}


class IoUTables(pl.Callback):
    """After every validation: a per-class table in the console, ``metrics.json`` (all validations so far),
    ``iou.csv`` (one row per step, domain and class) in the run dir, and a wandb table."""

    def __init__(self, output_dir: str | Path | None = None, console: bool = True, title: str | None = None):
        self.output_dir = Path(output_dir) if output_dir else None
        self.title = title  # default: "<stage> IoU (%) at step <n>"
        self.console = console
        self.history: list[dict] = []

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.history = state.get("history", [])

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._resumed_at = int(checkpoint.get("global_step", 0))

    def on_train_start(self, trainer, pl_module) -> None:
        """A resumed run keeps the validations the run logged up to its checkpoint's step that the checkpoint
        does not hold (one that ran after the checkpoint was written, before a kill): the history continues from
        the file on disk, not only from the checkpoint; later ones are dropped (they will be redone)."""
        step = getattr(self, "_resumed_at", None)
        path = self.output_dir / "metrics.json" if self.output_dir is not None else None
        if step is None or path is None or not path.is_file():
            return
        try:
            on_disk = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        have = {(e.get("stage"), e.get("step")) for e in self.history}
        kept = [e for e in on_disk if isinstance(e, dict) and isinstance(e.get("step"), int) and e["step"] <= step
                and (e.get("stage"), e["step"]) not in have and "domains" in e]  # fmt: skip
        if kept:
            self.history = sorted([*self.history, *kept], key=lambda e: (e["step"], e.get("stage") != "val"))

    def _record(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        per_class = getattr(pl_module, "last_val", None)
        if not per_class or trainer.sanity_checking:
            return
        names = _class_names(trainer, len(next(iter(per_class.values()))))
        mean_over = getattr(pl_module, "mean_domains", None)
        scores = summarize(per_class, mean_over)
        unscored = [d for d in (mean_over if mean_over is not None else per_class)
                    if math.isnan(scores.get(f"{d}/mIoU", math.nan))]  # fmt: skip
        if unscored:  # e.g. every image of a target skipped: the mean is over the others, and says so
            console.warning(f"{stage} at step {trainer.global_step}: {', '.join(unscored)} scored no pixel (mIoU NaN: "
                            "were all its images skipped?); the mean over targets leaves it out")  # fmt: skip
            mean_over = [d for d in (mean_over if mean_over is not None else per_class) if d not in unscored]
        nan_none = lambda v: None if math.isnan(v) else round(100 * v, 4)  # noqa: E731
        entry = {
            "stage": stage,
            "step": trainer.global_step,
            "mean_mIoU": scores["mean_mIoU"],
            "mean_over": mean_over,
            **({"not_scored": unscored} if unscored else {}),
            "domains": {
                d: {
                    "mIoU": scores[f"{d}/mIoU"],
                    "per_class": {n: nan_none(float(v)) for n, v in zip(names, iou)},
                    **_protocol(trainer, pl_module, d),
                }
                for d, iou in per_class.items()
            },  # fmt: skip
        }
        self.history.append(entry)
        self._write(trainer, entry, per_class, names, mean_over)

    @rank_zero_only
    def _write(self, trainer, entry, per_class, names, mean_over) -> None:
        if self.console:  # the console and the run's log file
            title = self.title or f"{entry['stage']} IoU (%) at step {entry['step']}"
            show(iou_table(per_class, names, mean_over, title))
        if (
            self.output_dir is not None
        ):  # both files from the whole history, atomically (a resume rewrites them)
            with atomic_path(self.output_dir / "metrics.json") as tmp:
                tmp.write_text(json.dumps(self.history, indent=1))
            with atomic_path(self.output_dir / "iou.csv") as tmp, tmp.open("w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["stage", "step", "domain", "class", "iou"])
                for e in self.history:
                    for d, dom in e["domains"].items():
                        for n, v in dom["per_class"].items():
                            w.writerow([e["stage"], e["step"], d, n, "" if v is None else f"{v:.4f}"])
                        w.writerow([e["stage"], e["step"], d, "mIoU", f"{dom['mIoU']:.4f}"])
        wb = wandb_logger(trainer)
        if wb is not None:
            rows = [[n, *(None if math.isnan(float(iou[c])) else 100 * float(iou[c]) for iou in per_class.values())]
                    for c, n in enumerate(names)]  # fmt: skip
            wb.log_table(
                key="val/per_class_iou", columns=["class", *per_class], data=rows, step=trainer.global_step
            )

    def on_validation_end(self, trainer, pl_module) -> None:
        self._record(trainer, pl_module, "val")

    def on_test_end(self, trainer, pl_module) -> None:
        self._record(trainer, pl_module, "test")


class SkippedSamples(pl.Callback):
    """Counts the samples that a data set with ``on_bad: skip`` replaced by the next good one (each sample says how
    many it stands in for, in ``skipped``): the training count is logged as ``data/skipped_train``, and every
    validation that skipped warns with the count per target, so skipping is never silent."""

    def __init__(self):
        self.train = 0
        self.val: dict[str, int] = {}

    def state_dict(self) -> dict:
        return {"train": self.train}

    def load_state_dict(self, state: dict) -> None:
        self.train = state.get("train", 0)

    @staticmethod
    def _count(batch) -> int:
        n = batch.get("skipped") if isinstance(batch, dict) else None
        return int(n.sum()) if isinstance(n, torch.Tensor) else 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = self._count(batch)
        if n:
            self.train += n
            rank_zero_warn(
                f"{self.train} training samples skipped so far (unreadable or bad; data set on_bad=skip)"
            )
        if self.train:
            pl_module.log("data/skipped_train", float(self.train), on_step=True, batch_size=1)

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        n = self._count(batch)
        if n:
            domain = pl_module.domains[dataloader_idx]
            self.val[domain] = self.val.get(domain, 0) + n

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.val:
            counts = ", ".join(f"{d} {n}" for d, n in self.val.items())
            rank_zero_warn(f"samples skipped in this validation (on_bad=skip; those targets' mIoU is over fewer "
                           f"images): {counts}")  # fmt: skip
        self.val = {}


class WandbMedia(pl.Callback):
    """Logs ``num_images`` image / label / prediction overlays per target domain at each validation."""

    def __init__(self, num_images: int = 4):
        self.num_images = num_images
        self._buffer: dict[str, list] = {}

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._buffer = {}

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if (
            trainer.sanity_checking
            or not trainer.is_global_zero
            or wandb_logger(trainer) is None
            or not outputs
        ):
            return
        domain = pl_module.domains[dataloader_idx]
        buf = self._buffer.setdefault(domain, [])
        if len(buf) >= self.num_images:
            return
        for img, lab, pred in zip(batch["image"], batch["label"], outputs["pred"]):  # uint8 images, as loaded
            if len(buf) >= self.num_images:
                break
            rgb = img.detach().cpu()
            if rgb.shape[-2:] != lab.shape:
                rgb = torch.nn.functional.interpolate(rgb[None].float(), size=lab.shape, mode="bilinear")[
                    0
                ].byte()
            buf.append(
                (
                    rgb.permute(1, 2, 0).numpy(),
                    lab.cpu().numpy().astype(np.int32),
                    pred.cpu().numpy().astype(np.int32),
                )
            )

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        wb = wandb_logger(trainer)
        if wb is None or not self._buffer or not trainer.is_global_zero:
            return
        names = _class_names(trainer, pl_module.num_classes)
        labels = {i: n for i, n in enumerate(names)} | {IGNORE_INDEX: "ignore"}
        for domain, items in self._buffer.items():
            wb.log_image(
                key=f"val/{domain}/examples",
                images=[img for img, _, _ in items],
                masks=[
                    {
                        "prediction": {"mask_data": pred, "class_labels": labels},
                        "ground_truth": {"mask_data": lab, "class_labels": labels},
                    }
                    for _, lab, pred in items
                ],  # fmt: skip
                step=trainer.global_step,
            )


class StoreConfig(pl.Callback):
    """Puts the resolved model + data config into every checkpoint, so ``dgss-eval`` can rebuild the model."""

    def __init__(self, cfg: dict):
        self.cfg = cfg

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        put_config(checkpoint, self.cfg)


class EMA(pl.Callback):
    """Weight averaging as mmengine's ``EMAHook`` with ``ExponentialMovingAverage`` (SoMA's recipe), for every method.

    After optimizer step n (``trainer.global_step``): avg = θ while n ≤ max(``begin``, 1), then
    avg ← (1 − m)·avg + m·θ with m = ``momentum`` (mmengine copies θ before ``begin_iter`` and on its first update).
    Validation during training, and so checkpoint selection, runs on the averaged weights; every saved checkpoint's
    ``state_dict`` holds them (``dgss-eval``, ``dgss-merge`` use them, as mmengine's saved ``state_dict``), the raw
    ones go to the checkpoint's ``weight_averaging`` section (``raw``) for an exact resume. Only parameters that train are averaged
    (a frozen one is its own average: no memory); buffers follow the model, as mmengine's ``update_buffers=False``.
    Lightning's ``WeightAveraging`` copies the whole module, frozen backbone included, and writes every tensor of it
    into each checkpoint; this keeps dgss's checkpoints as small as without averaging.
    """

    def __init__(self, momentum: float = 2e-4, begin: int = 0):
        if not 0.0 < momentum < 1.0 or begin < 0:
            raise ValueError(f"callbacks.ema: momentum={momentum} must be in (0, 1) and begin={begin} >= 0")
        self.momentum, self.begin = float(momentum), int(begin)
        self.avg: dict[str, torch.Tensor] = {}
        self._step = -1
        self._swapped = False

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = trainer.global_step
        if n == self._step:  # inside an accumulation window: no optimizer step yet
            return
        self._step = n
        copy = n <= max(self.begin, 1)
        avgs, params = [], []
        for name, p in pl_module.named_parameters():
            if not p.requires_grad:
                continue
            a = self.avg.get(name)
            # a parameter that starts training now (FisherTune's candidates) was constant: its average is θ
            if a is None:
                self.avg[name] = p.detach().clone()
            else:
                avgs.append(a)
                params.append(p.detach())
        if avgs:  # one multi-tensor kernel per step, not one per parameter (the same lerp / copy per element)
            if copy:
                foreach_copy_(avgs, params)
            else:
                foreach_lerp_(avgs, params, self.momentum)

    @torch.no_grad()
    def _swap(self, pl_module) -> None:
        params = dict(pl_module.named_parameters())
        for name, a in self.avg.items():
            p = params[name]
            tmp = p.detach().clone()
            p.copy_(a)
            a.copy_(tmp)
        self._swapped = not self._swapped

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit" and self.avg and not self._swapped:
            self._swap(pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._swapped:
            self._swap(pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        """``state_dict`` gets the averages, the ``weight_averaging`` section's ``raw`` the weights, whichever of the two the model
        holds now (during validation it holds the averages: a signal there saves the same file as one at the step's
        end). A raw tensor that differs from its average in fewer than a third of its elements is stored as those
        elements (:func:`sparse_difference`): FisherTune's candidates differ only where they are selected, so the
        averages cost what its sparse delta costs, not a whole backbone."""
        if not self.avg:
            return
        state = checkpoint["state_dict"]
        raw = {}
        for name, a in self.avg.items():
            weights, average = (a, state[name]) if self._swapped else (state[name], a)
            raw[name] = sparse_difference(weights.detach(), average.detach())
            state[name] = average.detach().clone()
        put_section(checkpoint, "weight_averaging", {"raw": raw, "momentum": self.momentum, "begin": self.begin,
                                                     "step": self._step})  # fmt: skip

    @torch.no_grad()
    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        """A resumed fit: the model was loaded with the averages; they become ``avg`` and the raw weights return."""
        wa = section(checkpoint, "weight_averaging")
        if not wa:
            return
        params = dict(pl_module.named_parameters())
        for name, raw in wa["raw"].items():
            p = params[name]
            self.avg[name] = p.detach().clone()
            p.copy_(undo_sparse_difference(raw, p.detach()).to(p.device, p.dtype))
        self._step = int(wa["step"])


def sparse_difference(
    tensor: torch.Tensor, reference: torch.Tensor
) -> torch.Tensor | dict[str, torch.Tensor]:
    """``tensor`` as the elements where it differs from ``reference`` (``{"index", "value"}`` over the flat view),
    when that is smaller than the tensor (fewer than a third of the elements: an int64 index and a value each),
    else a copy of ``tensor``. :func:`undo_sparse_difference` restores it bit for bit."""
    differs = (_bits(tensor) != _bits(reference)).reshape(-1)  # by bits: -0.0 vs 0.0 and NaNs count exactly
    if 3 * int(differs.sum()) >= tensor.numel():
        return tensor.clone()
    index = differs.nonzero().reshape(-1)
    return {"index": index.cpu(), "value": tensor.reshape(-1)[index].cpu()}


def _bits(t: torch.Tensor) -> torch.Tensor:
    if not t.is_floating_point():
        return t
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def undo_sparse_difference(stored: torch.Tensor | dict, reference: torch.Tensor) -> torch.Tensor:
    return stored if isinstance(stored, torch.Tensor) else with_elements(reference, stored)
