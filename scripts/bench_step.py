#!/usr/bin/env python
"""One dgss training step (Lightning Trainer + SegmentationMethod + DGSSDataModule) against a hand-written
PyTorch loop on the same model, batch, optimizer groups and schedule; prints the ratio and appends it to
docs/benchmarks.md. Target: ratio <= 1.05.

    python scripts/bench_step.py [--steps 30] [--warmup 5] [--batch 8] [--height 96] [--width 192]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import statistics
import time

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from benchmarks_md import append_row

from dgss.data.datamodule import DGSSDataModule
from dgss.data.synthetic import SyntheticDomain
from dgss.data.transforms import TrainPipeline
from dgss.methods.full import FullFineTune
from dgss.models.backbone import Backbone
from dgss.models.heads.light import LightHead


class Cached(torch.utils.data.Dataset):
    """Pre-rendered uint8 samples (a dgss data set): both loops read the same tensors, no rendering cost."""

    on_bad = "error"

    def __init__(self, n, h, w):
        src = SyntheticDomain("game", "train", n, h, w)
        self.items = [src.load(i) for i in range(n)]

    def __len__(self):
        return len(self.items)

    def load(self, i):
        return self.items[i]

    def name(self, i):
        return f"cached/{i}"

    def __getitem__(self, i):  # the hand-written loop's dataset
        return {"image": self.items[i][0], "label": self.items[i][1].long()}


def build(h, w):
    torch.manual_seed(0)
    bb = Backbone(
        "vit_small_patch14_reg4_dinov2",
        img_size=(h, w),
        model_kwargs=dict(patch_size=8, depth=4, embed_dim=96, num_heads=3),
    )
    return FullFineTune(bb, functools.partial(LightHead, channels=128, upsample=2), num_classes=19,
                        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.01))  # fmt: skip


def hand_loop(data, steps, batch, h, w) -> list[float]:
    """What a researcher writes by hand: same modules, same groups, CE + AdamW + poly."""
    m = build(h, w)
    m.train()
    groups = m.param_groups()
    opt = torch.optim.AdamW([{"params": g["params"], "lr": 1e-3 * g["lr_mult"], "weight_decay": 0.01 * g["decay_mult"]}
                             for g in groups])  # fmt: skip
    sched = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=steps, power=0.9)
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, drop_last=True)
    times, it = [], iter(loader)
    for _ in range(steps):
        t0 = time.perf_counter()
        try:
            b = next(it)
        except StopIteration:
            it = iter(loader)
            b = next(it)
        logits = m.head(m.backbone(m.normalize(b["image"])))
        logits = F.interpolate(logits, size=b["label"].shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, b["label"], ignore_index=255)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss.item()
        times.append(time.perf_counter() - t0)
    return times


class StepTimer(pl.Callback):
    def __init__(self):
        self.starts = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.starts.append(time.perf_counter())


def dgss_loop(data, steps, batch, h, w) -> list[float]:
    m = build(h, w)
    dm = DGSSDataModule(  # no augmentation: the samples as the hand-written loop reads them
        sources={"game": data},
        targets={"game": data},
        batch_size=batch,
        num_workers=0,
        pin_memory=False,
        train_pipeline=TrainPipeline(crop=(h, w), flip=0, photometric=False, cat_max_ratio=1.0),
    )
    timer = StepTimer()
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps + 1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                         log_every_n_steps=50, callbacks=[timer], num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(m, datamodule=dm)
    return [b - a for a, b in zip(timer.starts, timer.starts[1:])]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--height", type=int, default=96)
    p.add_argument("--width", type=int, default=192)
    p.add_argument("--out", default="docs/benchmarks.md")
    a = p.parse_args()
    data = Cached(4 * a.batch, a.height, a.width)
    med = lambda ts: statistics.median(ts[a.warmup :])  # noqa: E731
    hand1 = med(hand_loop(data, a.steps, a.batch, a.height, a.width))
    ours = med(dgss_loop(data, a.steps, a.batch, a.height, a.width))
    hand2 = med(hand_loop(data, a.steps, a.batch, a.height, a.width))
    base = (hand1 + hand2) / 2
    ratio = ours / base
    print(
        f"hand-written loop: {1000 * hand1:.1f} ms, {1000 * hand2:.1f} ms (before / after); dgss: {1000 * ours:.1f} ms"
    )
    print(f"ratio dgss / hand-written = {ratio:.3f} (target <= 1.05)")
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    model = f"tiny ViT (4x96, patch 8) + light head, batch {a.batch} @ {a.height}x{a.width}, median of {a.steps - a.warmup} steps"
    append_row(
        a.out,
        "## Training-step overhead (`scripts/bench_step.py`)",
        "One dgss step (Lightning Trainer, method base class, DataModule, logging) over a hand-written\n"
        "loop on the same model, batch, parameter groups and schedule, measured in the same process.",
        [
            "date",
            "machine",
            "model / batch",
            "hand-written step, ms (before / after)",
            "dgss step, ms",
            "ratio",
        ],
        [
            str(datetime.date.today()),
            machine,
            model,
            f"{1000 * hand1:.1f} / {1000 * hand2:.1f}",
            f"{1000 * ours:.1f}",
            f"**{ratio:.3f}**",
        ],
    )
    print(f"appended to {a.out}")


if __name__ == "__main__":
    main()
