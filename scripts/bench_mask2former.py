#!/usr/bin/env python
"""Rein + Mask2Former training-step throughput: step time, images/s, peak memory and model FLOPs utilisation.

The paper setting by default (GPU): DINOv2-L at patch 16 (random init: weights do not change the cost), Rein,
the full Mask2Former head, 512×512, batch 4, bf16 autocast, AdamW over the trainable parameters. FLOPs of one
training step (forward + backward) are counted once with ``torch.utils.flop_counter``; MFU = counted FLOPs / step
time / the device's peak dense bf16 FLOP/s (``--peak-tflops``, or a table of known GPUs). Appends a row to
docs/benchmarks.md.

    python scripts/bench_mask2former.py --device cuda                       # DINOv2-L, 512², batch 4, bf16
    python scripts/bench_mask2former.py --device cpu --tiny --size 128 --batch 2 --precision 32   # smoke run
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch
from benchmarks_md import append_row, device_name, peak_bf16_tflops, rss_mb


def peak_tflops(a: argparse.Namespace) -> float | None:
    if a.peak_tflops:
        return a.peak_tflops
    if a.device != "cuda":
        return None
    return peak_bf16_tflops(torch.cuda.get_device_name())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--precision", default="bf16", choices=["32", "bf16"])
    p.add_argument("--tiny", action="store_true", help="tiny backbone and head (smoke run)")
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="the device's peak dense FLOP/s in TFLOP/s"
    )
    p.add_argument("--out", default="docs/benchmarks.md")
    a = p.parse_args()

    from torch.utils.flop_counter import FlopCounterMode

    from dgss.methods.rein import Rein
    from dgss.models.backbone import Backbone
    from dgss.models.heads.mask2former import Mask2FormerHead

    torch.manual_seed(0)
    dev = torch.device(a.device)
    base = rss_mb()
    bb = Backbone("vit_large_patch14_dinov2", tiny=a.tiny, img_size=a.size, model_kwargs={"patch_size": 16},
                  out_indices=[7, 11, 15, 23])  # fmt: skip
    head = lambda in_channels, num_classes: Mask2FormerHead(in_channels, num_classes, tiny=a.tiny)  # noqa: E731
    m = Rein(bb, head, num_classes=19)
    m.configure_model()  # the tuning (Lightning would call this in fit)
    m = m.to(dev)
    m.train()
    opt = torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-4, weight_decay=0.05)
    x = torch.randn(a.batch, 3, a.size, a.size, device=dev)
    y = torch.randint(0, 19, (a.batch, a.size, a.size), device=dev)
    y[:, : a.size // 8] = 255

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.precision == "bf16"):
            losses = m.head.loss(m(x), y)
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up (allocator, autotuning)
    with FlopCounterMode(display=False) as fc:
        step()
    flops = fc.get_total_flops()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(a.steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else rss_mb() - base
    tf = peak_tflops(a)
    mfu = flops / step_s / (tf * 1e12) if tf else None
    trainable = sum(q.numel() for q in m.parameters() if q.requires_grad)
    print(f"step {step_s * 1000:.1f} ms, {a.batch / step_s:.2f} images/s, peak {peak:.0f} MB, "
          f"{flops / 1e12:.3f} TFLOP per step, MFU {'n/a' if mfu is None else f'{100 * mfu:.1f} %'}")  # fmt: skip
    model = f"{'tiny ViT' if a.tiny else 'DINOv2-L/16'} + Rein + Mask2Former{' (tiny)' if a.tiny else ''}"
    append_row(
        a.out,
        "## Rein + Mask2Former training step (`scripts/bench_mask2former.py`)",
        "Forward + backward + AdamW of Rein with the Mask2Former head on random data (random-init backbone: weights do not\n"
        "change the cost). FLOPs counted by `torch.utils.flop_counter` for one step; MFU against the device's peak dense\n"
        "bf16 FLOP/s. Median of the timed steps. Peak memory: CUDA allocator peak, or on CPU the RSS growth.",
        ["date", "device", "model", "input", "precision", "step ms", "images/s", "peak MB", "TFLOP / step", "MFU",
         "trainable"],
        [str(datetime.date.today()), device_name(a.device), model, f"{a.batch} × {a.size}²", a.precision,
         f"{step_s * 1000:.1f}", f"{a.batch / step_s:.2f}", f"{peak:.0f}", f"{flops / 1e12:.3f}",
         "n/a (no peak for this device)" if mfu is None else f"{100 * mfu:.1f} %", f"{trainable:,}"],
    )  # fmt: skip


if __name__ == "__main__":
    main()
