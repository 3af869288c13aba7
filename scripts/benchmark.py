#!/usr/bin/env python
"""Every method's training step on the same backbone, in one process: median step time, peak memory and trainable
parameters, each relative to full fine-tuning measured in the same run; a table in docs/benchmarks.md.

Each method is built from its own config (``conf/method/<name>.yaml``, composed by Hydra as ``dgss-train`` would)
on one backbone and the light head, and runs its real Lightning training step (FisherTune with a schedule scaled to
``--steps``; SoMA with its SVD at build time, outside the timed steps) on one fixed batch. Peak memory: the CUDA allocator peak (reset
per method), or on CPU the resident-set growth sampled every 2 ms while the method runs (glibc's mmap threshold is
pinned so freed tensors leave the RSS; the script re-executes itself with it set).

    python scripts/benchmark.py [--backbone dinov2_s] [--size 224] [--batch 4] [--steps 12] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import statistics
import sys
import threading
import time

METHODS = (
    "full",
    "frozen",
    "rein",
    "fishertune",
    "lora",
    "adaptformer",
    "vpt",
    "cobot_lora",
    "cobot_adaptformer",
    "soma",
    "recyclelora",
)


class PeakRSS:
    """Max resident set size above the level at start, sampled in a thread."""

    def __init__(self, rss_mb):
        self.rss_mb, self.peak, self._stop = rss_mb, 0.0, threading.Event()

    def __enter__(self):
        self.base = self.rss_mb()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss_mb() - self.base)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()


def make_clock(pl, torch):
    class Clock(pl.Callback):
        """Wall time of every training batch (synchronised on CUDA)."""

        def __init__(self, cuda: bool):
            self.cuda, self.times = cuda, []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if self.cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if self.cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t0)

    return Clock


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="dinov2_s", help="a conf/backbone name (random init)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument(
        "--steps", type=int, default=12, help="training steps per method; the first 2 are not timed"
    )
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="32", choices=["32", "bf16"])
    p.add_argument("--out", default="docs/benchmarks.md")
    a = p.parse_args()
    if a.device == "cpu" and "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # read by glibc at process start
        os.execve(
            sys.executable,
            [sys.executable, *sys.argv],
            {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)},
        )

    import lightning.pytorch as pl
    import torch
    from benchmarks_md import append_row, device_name, rss_mb
    from hydra import compose, initialize_config_module

    from dgss.config import build_method

    Clock = make_clock(pl, torch)

    batch = {
        "image": torch.randint(
            0, 256, (a.batch, 3, a.size, a.size), dtype=torch.uint8
        ),  # the model normalises
        "label": torch.randint(0, 19, (a.batch, a.size, a.size)),
    }
    loader = torch.utils.data.DataLoader([batch] * a.steps, batch_size=None)
    results = {}
    with initialize_config_module("dgss.conf", version_base="1.3"):
        for name in a.methods.split(","):
            cfg = compose("train", overrides=[f"method={name}", f"backbone={a.backbone}", "backbone.weights=null",
                                              f"backbone.img_size={a.size}", "head=light", "data=synthetic",
                                              f"trainer.max_steps={a.steps}"])  # fmt: skip
            torch.manual_seed(0)
            gc.collect()
            if a.device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            clock = Clock(a.device == "cuda")
            with PeakRSS(rss_mb) as mem:
                method = build_method(cfg)
                trainer = pl.Trainer(accelerator=a.device, devices=1, max_steps=a.steps, logger=False,
                                     precision="bf16-mixed" if a.precision == "bf16" else "32-true",
                                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                     limit_val_batches=0, callbacks=[clock], default_root_dir="/tmp/dgss_benchmark")  # fmt: skip
                trainer.fit(method, train_dataloaders=loader)
            peak = torch.cuda.max_memory_allocated() / 2**20 if a.device == "cuda" else mem.peak
            trainable = sum(q.numel() for q in method.parameters() if q.requires_grad)
            if name == "fishertune":  # its trainable backbone elements are the selection, not whole tensors
                trainable = (
                    sum(q.numel() for q in method.head.parameters()) + method.selected_opt.num_selected()
                )
            results[name] = {
                "step_s": statistics.median(clock.times[2:]),
                "peak_mb": peak,
                "trainable": trainable,
            }
            print(
                name,
                {k: round(v, 4) if isinstance(v, float) else v for k, v in results[name].items()},
                flush=True,
            )
            del method, trainer
    ref = results.get("full")

    def rel(r: dict, k: str) -> str:
        return f"{r[k] / ref[k]:.3f}" if ref and ref[k] else "n/a"

    rows = [[name, f"{1000 * r['step_s']:.1f}", rel(r, "step_s"), f"{r['peak_mb']:.0f}", rel(r, "peak_mb"),
             f"{r['trainable']:,}", rel(r, "trainable")] for name, r in results.items()]  # fmt: skip
    header = "## Every method vs full fine-tuning (`scripts/benchmark.py`)"
    intro = ("Each method's real training step (its own config, light head) on one backbone and one fixed batch, all in\n"
             "one process; median step after 2 warm-up steps; ratios against full fine-tuning in the same run.")  # fmt: skip
    cols = [
        "date",
        "device",
        "setting",
        "method",
        "step ms",
        "× full",
        "peak MB",
        "× full",
        "trainable",
        "× full",
    ]
    setting = f"{a.backbone} @ {a.size}², batch {a.batch}, {a.steps} steps, {a.precision}"
    for row in rows:
        append_row(
            a.out, header, intro, cols, [str(datetime.date.today()), device_name(a.device), setting, *row]
        )
    print(f"appended {len(rows)} rows to {a.out}")


if __name__ == "__main__":
    main()
