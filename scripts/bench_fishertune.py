#!/usr/bin/env python
"""FisherTune vs full fine-tuning on the same ViT: mean training step time over one refresh period of the growth
phase, and peak memory, measured in one run. Target: step time ratio <= 1.5.

Both methods run their real Lightning training step, the base's automatic one (FisherTune: the perturbed and clean
passes on statistic steps, the refresh, masking, and its chained head AdamW + selected-element AdamW; full: AdamW
over everything) on the same fixed batch, each in a fresh process. The measured period is the second refresh
period of the growth phase, steps (T1 + R, T1 + 2R]: ``window`` statistic steps and one refresh, in the default
proportion (window / refresh_every = 200 / 500 at 40k steps). Peak memory: CUDA allocator peak, or on CPU the peak
RSS above the process size before the model was built. Single runs of the pair spread 1.34-1.53 on a shared CPU, so
the pair is measured ``--pairs`` times interleaved (full, FisherTune, full, FisherTune, ...): the row gives the median
ratio of the pairs and their range. Appends a row to docs/benchmarks.md.

    python scripts/bench_fishertune.py [--model vit_small_patch16_224] [--size 224] [--batch 4] [--refresh 25]
                                       [--window 10] [--device cpu|cuda] [--precision 32|bf16] [--pairs 3]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import resource
import statistics
import time

from benchmarks_md import append_row, device_name, rss_mb, run_isolated


def run_variant(method: str, a: argparse.Namespace, out) -> None:
    import lightning.pytorch as pl
    import torch

    from dgss.methods.fishertune import FisherTune
    from dgss.methods.full import FullFineTune
    from dgss.models.backbone import Backbone
    from dgss.models.heads.light import LightHead

    torch.manual_seed(0)
    base_rss = rss_mb()
    t1, r = a.warmup, a.refresh
    first, last = t1 + r + 1, t1 + 2 * r  # the measured refresh period
    bb = Backbone(a.model, img_size=a.size)
    head = functools.partial(LightHead, channels=256)
    if method == "fishertune":
        m = FisherTune(bb, head, num_classes=19, fishertune=dict(perturb={"after_blocks": [0, 1, 2]},
                       fisher={"window": a.window}, schedule={"warmup_iters": t1, "refresh_every": r,
                                                              "growth_tau": 2 * r, "growth_end": t1 + 4 * r}))  # fmt: skip
    else:
        m = FullFineTune(bb, head, num_classes=19)
    batch = {
        "image": torch.randint(
            0, 256, (a.batch, 3, a.size, a.size), dtype=torch.uint8
        ),  # the model normalises
        "label": torch.randint(0, 19, (a.batch, a.size, a.size)),
    }
    loader = torch.utils.data.DataLoader([batch] * (last + 1), batch_size=None)

    class Clock(pl.Callback):
        def __init__(self):
            self.times: dict[int, float] = {}

        def _sync(self):
            if a.device == "cuda":
                torch.cuda.synchronize()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == first and a.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            self._sync()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self._sync()
            self.times[trainer.global_step - 1] = time.perf_counter() - self.t0

    clock = Clock()
    trainer = pl.Trainer(accelerator=a.device, devices=1, max_steps=last + 1, precision="bf16-mixed" if a.precision == "bf16" else "32-true",
                         logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[clock], default_root_dir=a.tmp)  # fmt: skip
    trainer.fit(m, train_dataloaders=loader)
    period = [clock.times[t] for t in range(first, last + 1)]
    if a.device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_rss
    info = {"method": method, "mean_step_s": sum(period) / len(period), "peak_mb": peak}
    if method == "fishertune":
        info["stat_steps"] = sum(m.schedule.is_stat_step(t) for t in range(first, last + 1))
        info["selected"] = m.selected_opt.num_selected()
    out.put(info)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--refresh", type=int, default=25)
    p.add_argument("--window", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="32", choices=["32", "bf16"])
    p.add_argument("--out", default="docs/benchmarks.md")
    p.add_argument("--tmp", default="/tmp/dgss_bench_fishertune")
    p.add_argument(
        "--mmap-threshold", type=int, default=1 << 20, help="CPU: glibc MALLOC_MMAP_THRESHOLD_ (0 = default)"
    )
    p.add_argument(
        "--pairs", type=int, default=3, help="interleaved full / FisherTune pairs (median and range)"
    )
    a = p.parse_args()
    pairs = [
        run_isolated(run_variant, ("full", "fishertune"), a, a.device, a.mmap_threshold)
        for _ in range(a.pairs)
    ]
    t_ratios = sorted(r["fishertune"]["mean_step_s"] / r["full"]["mean_step_s"] for r in pairs)
    m_ratios = sorted(r["fishertune"]["peak_mb"] / r["full"]["peak_mb"] for r in pairs)
    median = lambda v: statistics.median(v)  # noqa: E731
    t_ratio, m_ratio = median(t_ratios), median(m_ratios)
    full_s = median([r["full"]["mean_step_s"] for r in pairs])
    ft_s = median([r["fishertune"]["mean_step_s"] for r in pairs])
    full_mb = median([r["full"]["peak_mb"] for r in pairs])
    ft_mb = median([r["fishertune"]["peak_mb"] for r in pairs])
    ft = pairs[0]["fishertune"]
    verdict = "meets" if t_ratio <= 1.5 else "MISSES"
    print(f"FisherTune / full over {a.pairs} interleaved pairs: mean step time over a refresh period, median "
          f"{t_ratio:.3f} (range {t_ratios[0]:.3f}-{t_ratios[-1]:.3f}; {verdict} <= 1.5), peak memory {m_ratio:.3f}")  # fmt: skip
    row = [str(datetime.date.today()), f"{device_name(a.device)}, {a.precision}", f"{a.model} @ {a.size}², batch {a.batch}",
           f"R={a.refresh}, window={a.window} ({ft['stat_steps']} statistic steps); {a.pairs} interleaved pairs",
           f"{full_s:.3f} / {ft_s:.3f} (medians)", f"**{t_ratio:.3f}** ({t_ratios[0]:.3f}-{t_ratios[-1]:.3f})",
           f"{full_mb:.0f} / {ft_mb:.0f}", f"{m_ratio:.3f}"]  # fmt: skip
    append_row(
        a.out, "## FisherTune vs full fine-tuning (`scripts/bench_fishertune.py`)",
        "Same ViT (random init), light head; each method's real Lightning training step on one fixed batch, each in a\n"
        "fresh process. Mean step time over the growth phase's second refresh period (statistic window and refresh\n"
        "included, window / period as in the 40k-step defaults); target <= 1.5. Peak memory as in the Rein table.",
        ["date", "device", "model / input", "period", "mean step s (full / FisherTune)", "time ratio",
         "peak MB (full / FisherTune)", "memory ratio"], row,
    )  # fmt: skip
    print(f"appended to {a.out}")


if __name__ == "__main__":
    main()
