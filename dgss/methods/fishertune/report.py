"""FisherTune's reporting, a callback the method adds itself: after each refresh the selection's shares per module
kind and block to every logger, rows to ``fishertune_selection.csv`` and to a wandb table and bar chart; at the end of
training the final selection to ``fishertune_mask.pt``."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_only

from dgss import console
from dgss.loggers import wandb_logger
from dgss.methods.fishertune.selection import KINDS


class FisherTuneReport(pl.Callback):
    """FisherTune's selection, reported after each refresh (the method appends to ``history``; this reads it):
    shares per module kind and block to every logger, rows to ``fishertune_selection.csv`` and to a wandb table and
    bar chart; at the end of training the final selection to ``fishertune_mask.pt``. FisherTune adds it itself
    (``configure_callbacks``)."""

    def __init__(self):
        self.reported = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.reported = len(getattr(pl_module, "history", []))  # a resumed run reported its refreshes already

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        history = getattr(pl_module, "history", [])
        if len(history) <= self.reported:
            return
        self.reported = len(history)
        t = history[-1]["step"]
        rows = pl_module.breakdown()
        by_kind = {k: sum(r["share"] for r in rows if r["kind"] == k) for k in KINDS}
        by_block: dict[int, float] = {}
        for r in rows:
            by_block[r["block"]] = by_block.get(r["block"], 0.0) + r["share"]
        metrics = {f"fishertune/kind/{k}": v for k, v in by_kind.items()}
        metrics |= {f"fishertune/block/{'embed' if b < 0 else b}": v for b, v in by_block.items()}
        metrics["fishertune/target"] = float(history[-1]["target"])
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=t)
        self._write(trainer, pl_module, t, rows, by_kind)

    @rank_zero_only
    def _write(self, trainer, pl_module, t: int, rows: list[dict], by_kind: dict[str, float]) -> None:
        out = Path(trainer.default_root_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "fishertune_selection.csv"
        new = not path.exists() or t == pl_module.options.schedule.warmup_iters
        with path.open("w" if new else "a") as fh:
            if new:
                fh.write("step,block,kind,selected,share\n")
            for r in rows:
                fh.write(f"{t},{r['block']},{r['kind']},{r['selected']},{r['share']:.6f}\n")
        wb = wandb_logger(trainer)
        if wb is not None:
            wb.log_table("fishertune/selection", columns=["step", "block", "kind", "selected", "share"],
                         data=[[t, r["block"], r["kind"], r["selected"], r["share"]] for r in rows], step=t)  # fmt: skip
            wandb = sys.modules["wandb"]  # imported by the WandbLogger that _wandb found
            kinds = wandb.Table(columns=["kind", "share"], data=[[k, v] for k, v in by_kind.items()])
            wb.experiment.log({"fishertune/kind_share": wandb.plot.bar(kinds, "kind", "share",
                                                                        title="selection per kind")}, step=t)  # fmt: skip

    @rank_zero_only
    def on_train_end(self, trainer, pl_module) -> None:
        if not getattr(pl_module, "masks", None):
            return
        path = Path(trainer.default_root_dir) / "fishertune_mask.pt"
        cands = pl_module.candidates
        torch.save({"index": {n: pl_module.selected_opt.index(n).cpu() for n in cands},
                    "shapes": {n: tuple(p.shape) for n, p in cands.items()},
                    "history": pl_module.history, "breakdown": pl_module.breakdown()}, path)  # fmt: skip
        console.info(f"FisherTune: final selection saved to {path}")
