#!/usr/bin/env python
"""Rein vs full fine-tuning on the same ViT-B: training step time and peak memory, measured in one run.

Each variant runs in its own fresh process (peak memory is a per-process high-water mark): on CUDA the
allocator's peak, on CPU the peak resident set size above the process's size before the model was built.
Prints the ratios Rein / full and appends a row to docs/benchmarks.md. Target: memory ratio <= 0.6.

    python scripts/bench_rein.py [--size 512] [--batch 2] [--steps 4] [--device cpu|cuda] [--precision 32|bf16]
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
    import torch
    import torch.nn.functional as F

    from dgss.methods.full import FullFineTune
    from dgss.methods.rein import Rein
    from dgss.models.backbone import Backbone
    from dgss.models.heads.light import LightHead

    torch.manual_seed(0)
    dev = torch.device(a.device)
    base_rss = rss_mb()
    bb = Backbone("vit_base_patch16_224", img_size=a.size, model_kwargs={"dynamic_img_size": True})
    cls = Rein if method == "rein" else FullFineTune
    m = cls(bb, functools.partial(LightHead, channels=256), num_classes=19)
    m.configure_model()  # the tuning (Lightning would call this in fit)
    m = m.to(dev)
    m.train()
    opt = torch.optim.AdamW(
        [{"params": g["params"], "lr": 1e-4 * g["lr_mult"]} for g in m.param_groups()], lr=1e-4
    )
    x = torch.randn(a.batch, 3, a.size, a.size, device=dev)
    y = torch.randint(0, 19, (a.batch, a.size, a.size), device=dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(a.steps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.precision == "bf16"):
            logits = m.head(m.backbone(x)) if method == "full" else m(x)
            loss = F.cross_entropy(F.interpolate(logits.float(), size=y.shape[-2:], mode="bilinear"), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_rss
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    backbone_grads = sum(p.grad is not None for p in m.backbone.parameters())
    out.put({"method": method, "step_s": statistics.median(times[1:]), "peak_mb": peak, "trainable": trainable,
             "backbone_tensors_with_grad": backbone_grads})  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="32", choices=["32", "bf16"])
    p.add_argument("--out", default="docs/benchmarks.md")
    p.add_argument("--mmap-threshold", type=int, default=1 << 20,
                   help="CPU: glibc MALLOC_MMAP_THRESHOLD_ for the workers, so freed tensors leave the RSS (0 = glibc default)")  # fmt: skip
    a = p.parse_args()
    res = run_isolated(run_variant, ("full", "rein"), a, a.device, a.mmap_threshold)
    t_ratio = res["rein"]["step_s"] / res["full"]["step_s"]
    m_ratio = res["rein"]["peak_mb"] / res["full"]["peak_mb"]
    print(f"Rein / full: step time {t_ratio:.3f}, peak memory {m_ratio:.3f} (target <= 0.6)")
    row = [str(datetime.date.today()), f"{device_name(a.device)}, {a.precision}", f"ViT-B/16 @ {a.size}², batch {a.batch}",
           f"{res['full']['step_s']:.2f} / {res['rein']['step_s']:.2f}", f"{res['full']['peak_mb']:.0f} / {res['rein']['peak_mb']:.0f}",
           f"{t_ratio:.3f}", f"**{m_ratio:.3f}**", f"{res['full']['trainable']:,} / {res['rein']['trainable']:,}"]  # fmt: skip
    append_row(
        a.out, "## Rein vs full fine-tuning (`scripts/bench_rein.py`)",
        "Same ViT-B/16 (random init), light head, AdamW; each variant in a fresh process. Peak memory: CUDA allocator\n"
        "peak, or on CPU the peak RSS above the process size before the model was built (glibc\n"
        "`MALLOC_MMAP_THRESHOLD_` fixed at 1 MiB unless `--mmap-threshold 0`, so freed tensors leave the RSS).",
        ["date", "device", "model / input", "step s (full / Rein)", "peak MB (full / Rein)", "time ratio", "memory ratio",
         "trainable (full / Rein)"], row,
    )  # fmt: skip
    print(f"appended to {a.out}")


if __name__ == "__main__":
    main()
