"""Lightning's CSV logger, made to keep a resumed run's history; its wandb logger without a deprecated setting."""

from __future__ import annotations

import csv
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from dgss.io import atomic_path


class _ContinuedWriter(ExperimentWriter):
    """An ``ExperimentWriter`` that continues ``metrics.csv`` instead of deleting it (Lightning's deletes the file
    whenever the folder is not empty, so ``resume=auto`` lost the loss curve and every validation before it).

    The first row this process logs, at step ``s``, cuts the file to its rows with ``step < s``: those the resumed
    run will not log again (rows at and after its checkpoint's step belong to work the interruption lost, and a new
    run in the same folder starts at 0, replacing the file as Lightning's would)."""

    def __init__(self, log_dir: str) -> None:
        self._continued = False
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if path.is_file():
            with path.open(newline="") as f:
                self.metrics_keys = list(csv.DictReader(f).fieldnames or [])

    def log_metrics(self, metrics_dict: dict[str, float], step: int | None = None) -> None:
        if not self._continued and step is not None:
            self._continued = True
            self._keep_before(step)
        super().log_metrics(metrics_dict, step)

    def _keep_before(self, step: int) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            keys = list(reader.fieldnames or [])
            rows = [r for r in reader if r.get("step") not in (None, "") and int(float(r["step"])) < step]
        if not rows:
            path.unlink()
            self.metrics_keys = []
            return
        with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = keys


class CSVLogger(_LightningCSVLogger):
    """``lightning.pytorch.loggers.CSVLogger`` whose ``metrics.csv`` survives a resume (see ``_ContinuedWriter``)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuedWriter(log_dir=self.log_dir)
        return self._experiment


class WandbLogger(_LightningWandbLogger):
    """``lightning.pytorch.loggers.WandbLogger`` without the ``anonymous`` setting it always passes (wandb 0.2x+ warns
    on every run that it "has no effect and will be removed")."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)


def wandb_logger(trainer) -> _LightningWandbLogger | None:
    """The trainer's wandb logger, if it has one (tables and media go there)."""
    return next((lg for lg in trainer.loggers if isinstance(lg, _LightningWandbLogger)), None)
