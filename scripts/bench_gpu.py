#!/usr/bin/env python
"""One prepared GPU run: every method's training step at the papers' size, the CLI end to end, slide inference.

Writes ``bench_gpu.md`` (tables) and ``bench_gpu.json`` (every row, the environment, the targets) into OUT_DIR
after every stage, so a run cut off by its time limit still leaves what it measured, plus the CLI runs' logs.

Stages, in this order (each one catches its own errors and records them as a row; the run goes on):

1. ``methods``: every method's real Lightning training step (its ``experiment=gta2cbm/<method>_dinov2_l`` recipe:
   DINOv2-L/16, 512×512, Mask2Former, random init; batch 4; bf16-mixed): median step time, images/s, peak
   allocated memory, FLOPs of one step (``torch.utils.flop_counter``) and MFU against the device's dense bf16 peak.
   FisherTune runs in its selection (growth) phase: mean step over one refresh period (``window`` statistic
   steps with two passes, the refresh, masking and the selected-element AdamW), its FLOPs those of a plain step.
2. ``slide``: ``dgss-eval``'s slide inference (Rein, bf16) on 1024×512 images, 512 windows at stride 341, the
   windows of a batch run ``window_batch`` at a time: images/s and peak memory.
3. ``cli``: ``dgss-train`` (trainer=gpu, bf16-mixed, full-size dinov2_l with random init, Mask2Former, Rein) on the
   embedded data at 512 crops for ``--cli-steps`` steps with one slide validation, then ``dgss-eval`` of its
   ``last.ckpt``: exit codes, a finite loss, the IoU table, and the reloaded model's mIoU against the training's.
4. ``fp32``: full and Rein in fp32 (the papers' precision; PyTorch's default: no TF32 matmuls).
5. ``profile``: where one bf16 step's time goes (``--profile-methods``, default frozen and full): ``torch.profiler``
   over two timed steps; host (CPU) time per part of the step (backbone, head, losses, backward, the rest), the
   device's kernel time split into GEMM / attention / elementwise / optimizer, the idle time between kernels, the
   kernel launches and host synchronisations (``cudaStreamSynchronize`` and kin) per step, and the top operators by
   host and by device time (``profile_<method>.txt``). A step whose host time exceeds its kernel time is launch-bound.
6. ``compile``: Rein and full with ``compile=true`` (regional: ``SegmentationMethod.compile_regions``, each block
   and the head; FLOPs taken from the eager row). Last: its first step alone took 159 s on an H100 (2026-11-27,
   whole-model compile), so it is the stage the budget cuts.

A time budget (``--budget-s``, 450 s on a GPU) skips what no longer fits, so the run ends inside the device's limit;
the targets of issue 14 are checked on what was measured, ratios within this one run. The CPU smoke run
(``--tiny``) has no budget unless one is given: what it checks must not depend on how busy the machine is. Run folders
and checkpoints go to a fresh temporary folder, removed at the end (``--work-dir`` to keep them elsewhere).

    make bench-gpu OUT=/tmp/bench                                     # on a CUDA machine (sets up the env first)
    python scripts/bench_gpu.py OUT_DIR [--stages methods,slide,...] [--budget-s 450]
    python scripts/bench_gpu.py OUT_DIR --device cpu --tiny           # the smoke run (tests/test_bench_gpu.py)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from benchmark import METHODS  # noqa: E402  (every method, in one place)
from benchmarks_md import peak_bf16_tflops  # noqa: E402

# compile last: 171 s for Rein alone on an H100
STAGES = ("methods", "slide", "cli", "fp32", "profile", "compile")
# rough cost of a stage in seconds on an H100 (only used to skip what no longer fits in the budget)
STAGE_MIN_S = {"methods": 60, "slide": 20, "cli": 90, "fp32": 30, "compile": 100, "profile": 25}
# distribution -> module: a version counts only where the module imports (an image may hold metadata without it)
DEPENDENCIES = {"torch": "torch", "lightning": "lightning", "timm": "timm", "torchmetrics": "torchmetrics",
                "hydra-core": "hydra", "omegaconf": "omegaconf", "numpy": "numpy", "scipy": "scipy", "wandb": "wandb"}  # fmt: skip


# ------------------------------------------------------------------------------------------------ environment
def git_commit() -> str:
    """``git rev-parse`` in the tree (``+dirty`` with uncommitted changes); on a machine that got the tree without
    ``.git`` (a device copy), the commit ``make gpu-pack`` wrote to ``.gpu/commit``."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    packed = ROOT / ".gpu" / "commit"
    return (
        packed.read_text().strip() + " (packed)"
        if packed.is_file()
        else os.environ.get("DGSS_COMMIT", "unknown")
    )


def versions_vs_bounds() -> list[dict]:
    """Installed versions of dgss's dependencies against the bounds in pyproject.toml."""
    import importlib.util
    from importlib import metadata

    try:
        import tomllib
        from packaging.requirements import Requirement

        reqs = {Requirement(r).name.lower(): Requirement(r) for r in
                tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}  # fmt: skip
    except Exception:  # Python 3.10 (no tomllib) or no packaging: versions only
        reqs = {}
    rows = []
    for name, module in DEPENDENCIES.items():
        try:
            have = metadata.version(name) if importlib.util.find_spec(module) else None
        except (metadata.PackageNotFoundError, ImportError, ValueError):
            have = None
        req = reqs.get(name)
        within = None if have is None or req is None else req.specifier.contains(have, prereleases=True)
        rows.append({"package": name, "installed": have, "bound": str(req.specifier) if req else "",
                     "within": within})  # fmt: skip
    return rows


def environment(device: str) -> dict:
    import torch

    env = {
        "date": str(datetime.date.today()),
        "commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "host": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        env.update(device=torch.cuda.get_device_name(), memory_gib=round(p.total_memory / 2**30, 1),
                   capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                   cudnn=torch.backends.cudnn.version(), peak_bf16_tflops=peak_bf16_tflops(torch.cuda.get_device_name()))  # fmt: skip
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()  # fmt: skip
    else:
        env.update(device=f"{platform.machine()} CPU", peak_bf16_tflops=None)
    env["versions"] = versions_vs_bounds()
    return env


# --------------------------------------------------------------------------------------------------- report
class Report:
    """Rows of every stage, written to OUT_DIR as JSON and markdown after each stage."""

    def __init__(self, out: Path, env: dict, args: argparse.Namespace):
        self.out, self.env, self.args = out, env, args
        self.rows: list[dict] = []
        self.notes: list[str] = []
        out.mkdir(parents=True, exist_ok=True)

    def add(self, row: dict) -> None:
        row = {"device": self.env["device"], "torch": self.env["torch"], "cuda": self.env["cuda"],
               "commit": self.env["commit"], **row}  # fmt: skip
        self.rows.append(row)
        shown = {k: v for k, v in row.items() if k not in ("device", "torch", "cuda", "commit", "traceback")}
        print(json.dumps(shown), flush=True)
        self.write()

    def find(self, **match) -> dict | None:
        return next(
            (r for r in self.rows if all(r.get(k) == v for k, v in match.items()) and r.get("ok")), None
        )

    def targets(self) -> list[dict]:
        """Issue 14's targets on this run's rows (ratios within the run)."""
        m = lambda **k: self.find(stage=k.pop("stage", "methods"), **k)  # noqa: E731
        full, rein = m(method="full", precision="bf16-mixed"), m(method="rein", precision="bf16-mixed")
        ft, full32 = m(method="fishertune", precision="bf16-mixed"), m(stage="fp32", method="full")
        rein_c = m(stage="compile", method="rein")
        out = []

        def target(name, value, limit, better):
            ok = None if value is None else (value >= limit if better == "higher" else value <= limit)
            out.append({"target": name, "value": None if value is None else round(value, 4), "limit": limit,
                        "met": ok})  # fmt: skip

        def ratio(x, y, key):
            return x[key] / y[key] if x and y and x.get(key) and y.get(key) else None

        target("Rein MFU, bf16, compile on", rein_c and rein_c.get("mfu"), 0.35, "higher")
        target("Rein peak memory / full", ratio(rein, full, "peak_mib"), 0.6, "lower")
        target("FisherTune mean step over a refresh period / full mean step", ratio(ft, full, "mean_step_ms"), 1.5,
               "lower")  # fmt: skip
        target("full: bf16 step / fp32 step", ratio(full, full32, "step_ms"), 0.5, "lower")
        return out

    def write(self) -> None:
        data = {"environment": self.env, "args": vars(self.args), "rows": self.rows, "targets": self.targets(),
                "notes": self.notes}  # fmt: skip
        (self.out / "bench_gpu.json").write_text(json.dumps(data, indent=1, default=str))
        (self.out / "bench_gpu.md").write_text(self.markdown())

    def markdown(self) -> str:
        e = self.env
        fmt = lambda v, f="{:.1f}": "" if v is None else f.format(v)  # noqa: E731
        lines = [f"# `scripts/bench_gpu.py` — {e['date']}", "",
                 f"{e['device']} ({e.get('memory_gib', '?')} GiB, driver {e.get('driver', '?')}), torch {e['torch']}, "
                 f"CUDA {e['cuda']}, Python {e['python']}, commit {e['commit']}; MFU against "
                 f"{fmt(e.get('peak_bf16_tflops'), '{:.0f}') or 'n/a'} TFLOP/s dense bf16.", ""]  # fmt: skip
        train = [r for r in self.rows if r["stage"] in ("methods", "fp32", "compile")]
        if train:
            lines += ["| method | precision | compile | step ms | images/s | peak MiB | TFLOP / step | MFU | trainable | "
                      "device | torch / CUDA | commit | note |", "|" + "---|" * 13]  # fmt: skip
            for r in train:
                lines.append("| " + " | ".join([
                    r["method"], r.get("precision", ""), "yes" if r.get("compile") else "no", fmt(r.get("step_ms")),
                    fmt(r.get("images_s"), "{:.2f}"), fmt(r.get("peak_mib"), "{:.0f}"), fmt(r.get("tflop_step"), "{:.3f}"),
                    fmt(r.get("mfu") and 100 * r["mfu"], "{:.1f} %"), fmt(r.get("trainable"), "{:,}"), r["device"],
                    f"{r['torch']} / {r['cuda']}", r["commit"], r.get("note") or r.get("error", "")]) + " |")  # fmt: skip
            lines.append("")
        for r in self.rows:
            if r["stage"] == "slide":
                lines += [f"**Slide inference** ({r['device']}, torch {r['torch']} / CUDA {r['cuda']}, {r['commit']}): "
                          + (f"{r['images']} × {r['input']}, windows {r['windows_per_image']} per image, window_batch "
                             f"{r['window_batch']}, {r['precision']}: **{r['images_s']:.2f} images/s**, peak "
                             f"{r['peak_mib']:.0f} MiB" if r["ok"] else f"failed: {r['error']}"), ""]  # fmt: skip
            if r["stage"] == "cli":
                lines += [f"**CLI end to end** ({r['device']}, torch {r['torch']} / CUDA {r['cuda']}, {r['commit']}): "
                          + ("; ".join(f"{k} {v}" for k, v in r.items() if k in CLI_KEYS)), ""]  # fmt: skip
        targets = self.targets()
        lines += ["| target | value | limit | met |", "|---|---|---|---|"]
        for t in targets:
            met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
            lines.append(
                f"| {t['target']} | {'' if t['value'] is None else t['value']} | {t['limit']} | {met} |"
            )
        lines += ["", "| package | installed | pyproject bound | within |", "|---|---|---|---|"]
        for v in e["versions"]:
            within = {True: "yes", False: "**no**", None: "?"}[v["within"]]
            lines.append(
                f"| {v['package']} | {v['installed'] or 'not installed'} | {v['bound']} | {within} |"
            )
        lines += ["", *(f"- {n}" for n in self.notes)]
        return "\n".join(lines).rstrip() + "\n"


CLI_KEYS = ("ok", "error", "train_exit", "train_s", "steps", "loss_first", "loss_last", "loss_finite",
            "val_mIoU", "eval_exit", "eval_s", "eval_mIoU", "eval_matches_train", "checkpoint_mib")  # fmt: skip


# ------------------------------------------------------------------------------------------------- training
def fixed_batch(batch: int, size: int, device: str) -> dict:
    """One batch as the DataModule hands it to a method: uint8 images (the method normalises and pads them) and
    trainId labels with an ignored band."""
    import torch

    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 19, (batch, size, size), generator=g, dtype=torch.uint8)
    label[:, : size // 8] = 255
    image = torch.randint(0, 256, (batch, 3, size, size), generator=g, dtype=torch.uint8)
    return {"image": image.to(device), "label": label.to(device)}


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module("dgss.conf", version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


def method_overrides(name: str, a: argparse.Namespace, steps: int) -> list[str]:
    # the method pads every training batch to its crop (method.input.crop, linked to the data's): the measured size
    o = [f"experiment=gta2cbm/{name}_dinov2_l", "backbone.weights=null", f"trainer.max_steps={steps}",
         f"backbone.img_size={a.size}", f"data.train_pipeline.crop=[{a.size},{a.size}]"]  # fmt: skip
    if a.tiny:
        o += ["backbone.tiny=true", "head.tiny=true"]
    if name == "fishertune":
        # the growth phase from step T1 on, refresh period R with `window` statistic steps
        t1, r, w = a.ft_warmup, a.ft_refresh, a.ft_window
        o += [f"method.fishertune.schedule.warmup_iters={t1}", f"method.fishertune.schedule.refresh_every={r}",
              f"method.fishertune.schedule.growth_tau={2 * r}", f"method.fishertune.schedule.growth_end={t1 + 4 * r}",
              f"method.fishertune.fisher.window={w}"]  # fmt: skip
    return o


def train_row(name: str, a: argparse.Namespace, precision: str, compiled: bool, stage: str,
              flops_from: dict | None = None, profile: bool = False) -> dict:  # fmt: skip
    """Build one method from its recipe and time its real Lightning training step on a fixed batch; ``profile``:
    the first two timed steps under ``torch.profiler`` (:func:`profile_summary`)."""
    import lightning.pytorch as pl
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from dgss.config import build_method

    cuda = a.device == "cuda"
    if name == "fishertune":  # timed: the second refresh period of the growth phase, (T1 + R, T1 + 2R]
        timed = list(range(a.ft_warmup + a.ft_refresh + 1, a.ft_warmup + 2 * a.ft_refresh + 1))
    else:
        timed = list(range(a.warmup, a.warmup + a.steps))
    flop_step = None if compiled else timed[-1] + 1
    steps = timed[-1] + 2
    traced = set(timed[:2]) if profile else set()

    class Clock(pl.Callback):
        """Wall time per batch (synchronised), the allocator peak over the timed steps, FLOPs of one step."""

        def __init__(self):
            self.times: dict[int, float] = {}
            self.flops, self.peak, self.mode, self.prof = None, None, None, None

        def sync(self):
            if cuda:
                torch.cuda.synchronize()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == timed[0] and cuda:
                torch.cuda.reset_peak_memory_stats()
            if batch_idx == flop_step:
                self.mode = FlopCounterMode(display=False)
                self.mode.__enter__()
            if batch_idx == min(traced, default=None):
                acts = [torch.profiler.ProfilerActivity.CPU] + (
                    [torch.profiler.ProfilerActivity.CUDA] if cuda else []
                )
                self.prof = torch.profiler.profile(activities=acts)
                self.prof.__enter__()
            self.sync()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.sync()
            self.times[batch_idx] = time.perf_counter() - self.t0
            if batch_idx == timed[-1] and cuda:
                self.peak = torch.cuda.max_memory_allocated() / 2**20
            if batch_idx == flop_step:
                self.mode.__exit__(None, None, None)
                self.flops = self.mode.get_total_flops()
            if batch_idx == max(traced, default=None):
                self.prof.__exit__(None, None, None)

    torch.manual_seed(0)
    t_build = time.perf_counter()
    cfg = compose(method_overrides(name, a, steps))
    method = build_method(cfg)
    if compiled:
        # what dgss-train does with compile=true (the smoke run: dynamo's capture without code generation)
        method.compile_regions(**({"backend": a.compile_backend} if a.compile_backend != "inductor" else {}))
    clock = Clock()
    if profile:
        annotate_parts(method)
    batch = fixed_batch(a.batch, a.size, a.device)
    loader = torch.utils.data.DataLoader([batch] * steps, batch_size=None)
    trainer = pl.Trainer(accelerator=a.device, devices=1, max_steps=steps, precision=precision, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0, callbacks=[clock],
                         default_root_dir=str(a.work_dir / "methods"))  # fmt: skip
    trainer.fit(method, train_dataloaders=loader)
    wall = time.perf_counter() - t_build
    times = [clock.times[i] for i in timed]
    step_s = statistics.median(times)
    flops = clock.flops if flops_from is None else flops_from.get("flops")
    peak_tf = peak_bf16_tflops(torch.cuda.get_device_name()) if cuda else None
    trainable = sum(q.numel() for q in method.parameters() if q.requires_grad)
    row = {"stage": stage, "method": name, "precision": precision, "compile": compiled, "ok": True,
           "step_ms": 1000 * step_s, "mean_step_ms": 1000 * statistics.fmean(times), "images_s": a.batch / step_s,
           "peak_mib": clock.peak, "flops": flops, "tflop_step": flops and flops / 1e12,
           "mfu": flops / step_s / (peak_tf * 1e12) if flops and peak_tf else None, "trainable": trainable,
           "timed_steps": len(times), "first_step_s": clock.times[0], "wall_s": wall}  # fmt: skip
    if name == "fishertune":
        stat = [i for i in timed if method.schedule.is_stat_step(i)]
        plain = [clock.times[i] for i in timed if i not in stat and not method.schedule.is_refresh(i)]
        row.update(trainable=sum(q.numel() for q in method.head.parameters()) + method.selected_opt.num_selected(),
                   stat_steps=len(stat), plain_step_ms=1000 * statistics.median(plain) if plain else None,
                   refresh_ms=1000 * clock.times[max(i for i in timed if method.schedule.is_refresh(i))],
                   note=f"mean over a refresh period (R={a.ft_refresh}, {len(stat)} statistic steps, refresh included): "
                        f"{row['mean_step_ms']:.1f} ms; FLOPs: a plain step")  # fmt: skip
        if plain and flops and peak_tf:
            row["mfu"] = flops / statistics.median(plain) / (peak_tf * 1e12)
    if not cuda:
        row["note"] = (row.get("note", "") + "; CPU: no allocator peak").lstrip("; ")
    if profile:
        row.update(profile_summary(clock.prof, len(traced), a.out / f"profile_{name}.txt", row))
    del method, trainer, loader, batch
    return row


PARTS = ("backbone", "head", "losses", "backward")


def annotate_parts(method) -> None:
    """Label the parts of a step for the profiler: the backbone's and the head's forward, the head's losses, the
    backward (instance attributes over the bound methods; Lightning looks its hooks up on the instance)."""
    import functools

    import torch

    def labelled(fn, label):
        @functools.wraps(fn)
        def run(*args, **kw):
            with torch.profiler.record_function(f"dgss.{label}"):
                return fn(*args, **kw)

        return run

    method.backbone.forward = labelled(method.backbone.forward, "backbone")
    method.head.forward = labelled(method.head.forward, "head")
    method.head.loss = labelled(method.head.loss, "losses")
    method.backward = labelled(method.backward, "backward")


# kernel families by name (cuBLAS / CUTLASS GEMMs, flash / memory-efficient attention, the optimizer's multi-tensor
# kernels; the rest elementwise, reductions and copies), for the kernel-time split of the profile stage
KERNEL_KINDS = (
    ("attention", ("flash", "fmha", "attention", "efficient_attention", "cudnn_sdpa")),
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "sm80_", "sm90_", "wgmma", "conv")),
    ("optimizer", ("multi_tensor_apply", "adam", "foreach")),
)
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def kernel_kind(name: str) -> str:
    """>>> kernel_kind("sm90_xmma_gemm_bf16bf16_bf16f32"), kernel_kind("flash_fwd_kernel"), kernel_kind("elementwise")
    ('gemm', 'attention', 'elementwise')"""
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "elementwise")


def kernel_timeline(events, steps: int) -> tuple[dict[str, float], float]:
    """Per step: device kernel time by :func:`kernel_kind` (ms) and the device's idle time between kernels (ms: the
    span from the first kernel's start to the last one's end, less the union of the kernels' intervals)."""
    kernels = [e for e in events if e.device_type.name == "CUDA" and not e.is_user_annotation
               and e.time_range.end > e.time_range.start]  # fmt: skip
    split = {kind: 0.0 for kind, _ in KERNEL_KINDS} | {"elementwise": 0.0}
    for e in kernels:
        split[kernel_kind(e.name)] += (e.time_range.end - e.time_range.start) / 1e3 / steps
    busy, end, first = 0.0, None, None
    for e in sorted(kernels, key=lambda e: e.time_range.start):
        s, t = e.time_range.start, e.time_range.end
        first = s if first is None else first
        if end is None or s >= end:
            busy += t - s
            end = t
        elif t > end:
            busy += t - end
            end = t
    idle = ((end - first) - busy) / 1e3 / steps if kernels else 0.0
    return {k: round(v, 2) for k, v in split.items()}, round(idle, 2)


def profile_summary(prof, steps: int, path: Path, row: dict) -> dict:
    """Per step: host time of each labelled part (the rest: Lightning, the optimizer, hooks), the device's kernel
    time (split into GEMM / attention / elementwise / optimizer) and launches, the idle time between kernels, host
    synchronisations (``cudaStreamSynchronize`` and kin: the host waiting for the device), memory copies and
    ``torch.unique`` calls; the report (with the top operators by host and device time) goes to ``path``."""
    events = prof.key_averages()
    host = {p: sum(e.cpu_time_total for e in events if e.key == f"dgss.{p}") / 1e3 / steps for p in PARTS}
    # the kernels' own time, as the profiler's table totals it: device events, not the labelled ranges' spans
    device_ms = sum(e.self_device_time_total for e in events
                    if e.device_type.name == "CUDA" and not e.is_user_annotation) / 1e3 / steps  # fmt: skip
    per_step = {k: sum(e.count for e in events if e.key == k) / steps
                for k in ("cudaMemcpyAsync", "aten::_unique2", *SYNC_CALLS)}  # fmt: skip
    launches = (
        sum(e.count for e in events if e.key.startswith(("cudaLaunchKernel", "cuLaunchKernel"))) / steps
    )
    split, idle = kernel_timeline(prof.events(), steps)
    syncs = sum(per_step[k] for k in SYNC_CALLS)
    out = {"profiled_steps": steps, "host_ms": {k: round(v, 2) for k, v in host.items()},
           "device_kernel_ms": round(device_ms, 2), "kernel_ms": split, "device_idle_ms": idle,
           "kernel_launches": round(launches), "host_syncs_per_step": round(syncs, 1),
           "memcpy_per_step": round(per_step["cudaMemcpyAsync"]), "unique_per_step": round(per_step["aten::_unique2"])}  # fmt: skip
    cpu_sort = "self_cpu_time_total"
    dev_sort = "self_cuda_time_total" if device_ms else cpu_sort
    text = [f"# profile of {row['method']} ({row['precision']}, compile {row['compile']}): {steps} steps",
            f"step (median of the timed steps, profiled ones included): {row['step_ms']:.1f} ms",
            "per step: host time in " + ", ".join(f"{k} {v:.1f} ms" for k, v in host.items())
            + f"; device kernel time {device_ms:.1f} ms in {launches:.0f} launches ("
            + ", ".join(f"{k} {v:.1f} ms" for k, v in split.items()) + f"), idle between kernels {idle:.1f} ms; "
            f"{syncs:.1f} host synchronisations, {per_step['cudaMemcpyAsync']:.0f} cudaMemcpyAsync calls "
            f"(device-to-device ones too), {per_step['aten::_unique2']:.0f} torch.unique", "",
            "## by self host time", events.table(sort_by=cpu_sort, row_limit=30), "",
            "## by self device time", events.table(sort_by=dev_sort, row_limit=30)]  # fmt: skip
    path.write_text("\n".join(text) + "\n")
    return out


def slide_row(a: argparse.Namespace) -> dict:
    """dgss-eval's slide inference (the method's own ``predict_logits`` + argmax, as its validation step)."""
    import torch

    from dgss.config import build_method

    cuda = a.device == "cuda"
    h, w = a.slide_size
    crop, stride = (a.size, round(a.size * 2 / 3)) if a.tiny else (512, 341)
    cfg = compose(method_overrides("rein", a, 10) + ["method.inference.mode=slide", f"method.inference.crop={crop}",
                                                    f"method.inference.stride={stride}",
                                                    f"method.inference.window_batch={a.window_batch}"])  # fmt: skip
    method = build_method(cfg).to(a.device).eval()
    images = torch.randint(0, 256, (a.slide_images, 3, h, w), dtype=torch.uint8, device=a.device)
    dtype = torch.bfloat16

    def run():
        with torch.inference_mode(), torch.autocast(a.device, dtype=dtype):
            pred = method.predict_logits(images, (h, w)).argmax(1)
        if cuda:
            torch.cuda.synchronize()
        return pred

    run()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(a.slide_iters):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    from dgss.models.inference import windows

    n_win = len(windows(h, w, (crop, crop), (stride, stride)))
    t = statistics.median(times)
    row = {"stage": "slide", "method": "rein", "ok": True, "precision": "bf16 autocast", "input": f"{w}×{h}",
           "images": a.slide_images, "windows_per_image": n_win, "window_batch": a.window_batch,
           "crop": crop, "stride": stride, "call_ms": 1000 * t, "images_s": a.slide_images / t,
           "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")}  # fmt: skip
    return row


# ----------------------------------------------------------------------------------------------------- CLI
def cli(name: str) -> list[str]:
    """The installed console script (next to this interpreter, else on PATH), else the same entry point via -c."""
    for cand in (Path(sys.executable).parent / name, shutil.which(name)):
        if cand and Path(cand).is_file():
            return [str(cand)]
    module = {"dgss-train": "dgss.train", "dgss-eval": "dgss.eval"}[name]
    return [sys.executable, "-c", f"import sys; sys.argv[0] = {name!r}; from {module} import main; main()"]


def run_logged(cmd: list[str], log: Path, timeout: float) -> tuple[int, float]:
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    with log.open("w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        try:
            limit = None if math.isinf(timeout) else timeout
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=limit).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.perf_counter() - t0


def cli_row(a: argparse.Namespace, budget: float) -> dict:
    """dgss-train then dgss-eval as a user runs them; checks the loss, the IoU table and the reloaded checkpoint."""
    import csv

    import torch

    run, ev = a.work_dir / "cli_train", a.work_dir / "cli_eval"
    for d in (run, ev):
        shutil.rmtree(d, ignore_errors=True)
    if a.tiny:
        model = ["backbone.tiny=true", "head.tiny=true", "trainer=cpu", "synthetic.height=64", "synthetic.width=128",
                 "data.train_pipeline.crop=[64,64]", "backbone.img_size=64", "data.batch_size=2",
                 "'method.inference={mode: slide, crop: 64, stride: 43}'"]  # fmt: skip
    else:
        model = ["trainer=gpu", "trainer.precision=bf16-mixed", "synthetic.height=512", "synthetic.width=1024",
                 "data.train_pipeline.crop=[512,512]", f"data.batch_size={a.batch}",
                 "'method.inference={mode: slide, crop: 512, stride: 341, window_batch: 8}'"]  # fmt: skip
    steps = a.cli_steps
    train_cmd = cli("dgss-train") + [
        "method=rein", "backbone=dinov2_l", "backbone.weights=null", "head=mask2former", "data=synthetic",
        *model, "synthetic.val_length=4", "data.val_batch_size=2", f"data.num_workers={a.workers}",
        f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}", "trainer.log_every_n_steps=1",
        "trainer.num_sanity_val_steps=0", "logger=csv", "~callbacks.progress_bar", f"hydra.run.dir={run}"]  # fmt: skip
    train_cmd = [c.strip("'") for c in train_cmd]
    rc, train_s = run_logged(train_cmd, a.out / "cli_train.log", timeout=budget)
    row = {"stage": "cli", "method": "rein", "train_exit": rc, "train_s": round(train_s, 1)}
    losses = []
    metrics_csv = run / "csv" / "metrics.csv"
    if metrics_csv.is_file():
        with metrics_csv.open() as f:
            losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    row.update(steps=len(losses), loss_first=losses and round(losses[0], 4), loss_last=losses and round(losses[-1], 4),
               loss_finite=bool(losses) and all(math.isfinite(v) for v in losses))  # fmt: skip
    metrics = run / "metrics.json"
    train_val = json.loads(metrics.read_text())[-1] if metrics.is_file() else None
    row["val_mIoU"] = train_val and round(train_val["mean_mIoU"], 4)
    ckpt = run / "checkpoints" / "last.ckpt"
    row["checkpoint_mib"] = round(ckpt.stat().st_size / 2**20, 1) if ckpt.is_file() else None
    if rc == 0 and ckpt.is_file():
        eval_cmd = cli("dgss-eval") + [f"ckpt_path={ckpt}", f"hydra.run.dir={ev}",
                                       *(["trainer=cpu"] if a.tiny else ["trainer=gpu", "trainer.precision=bf16-mixed"])]  # fmt: skip
        erc, eval_s = run_logged(
            eval_cmd, a.out / "cli_eval.log", timeout=max(budget - train_s, 30)
        )  # inf: none
        em = ev / "metrics.json"
        eval_val = json.loads(em.read_text())[-1] if em.is_file() else None
        row.update(
            eval_exit=erc, eval_s=round(eval_s, 1), eval_mIoU=eval_val and round(eval_val["mean_mIoU"], 4)
        )
        # same weights, data and inference: the same numbers (bf16 kernels may differ a hair)
        if train_val and eval_val:
            row["eval_matches_train"] = (
                abs(train_val["mean_mIoU"] - eval_val["mean_mIoU"]) <= a.eval_tolerance
            )
    row["ok"] = bool(rc == 0 and row.get("eval_exit") == 0 and row["loss_finite"] and row["val_mIoU"] is not None
                     and row.get("eval_matches_train"))  # fmt: skip
    if not row["ok"]:
        row["error"] = "see cli_train.log / cli_eval.log"
    if a.device == "cuda":
        torch.cuda.empty_cache()
    return row


# ---------------------------------------------------------------------------------------------------- main
def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def guarded(report: Report, stage: str, method: str, fn, *args, **kw) -> dict | None:
    """Run one measurement; a failure becomes a row with the error (the traceback goes to the JSON and the console)."""
    try:
        row = fn(*args, **kw)
    except Exception as e:  # a CUDA failure in one method must not cost the others' rows
        tb = traceback.format_exc()
        print(tb, file=sys.stderr, flush=True)
        row = {"stage": stage, "method": method, "ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
               "traceback": tb}  # fmt: skip
    finally:
        free(report.args.device)
    report.add(row)
    return row


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="folder for bench_gpu.md, bench_gpu.json and the CLI logs")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny backbone / head at 64² (the CPU smoke run)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {','.join(STAGES)}")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--budget-s", type=float, default=None,
                   help="skip stages that no longer fit (default 450 s, 8 min all told; none with --tiny)")  # fmt: skip
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before the timed ones")
    p.add_argument("--steps", type=int, default=10, help="timed steps per method")
    p.add_argument("--ft-warmup", type=int, default=2, help="FisherTune: head-only steps T1")
    p.add_argument(
        "--ft-refresh", type=int, default=10, help="FisherTune: refresh period R (timed: one period)"
    )
    p.add_argument(
        "--ft-window", type=int, default=4, help="FisherTune: statistic steps per period (200/500 at 40k)"
    )
    p.add_argument("--slide-size", type=int, nargs=2, default=[512, 1024], metavar=("H", "W"))
    p.add_argument("--slide-images", type=int, default=4, help="images per inference call")
    p.add_argument("--slide-iters", type=int, default=5)
    p.add_argument("--window-batch", type=int, default=8)
    p.add_argument("--cli-steps", type=int, default=60)
    p.add_argument(
        "--workers", type=int, default=min(8, os.cpu_count() or 1), help="loader workers of the CLI run"
    )
    p.add_argument(
        "--eval-tolerance", type=float, default=0.05, help="mIoU points between dgss-eval and training"
    )
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (--tiny: eager)")
    p.add_argument("--profile-methods", default="frozen,full", help="the profile stage's methods")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="run folders and checkpoints (default: a fresh temporary folder, removed at the end)")  # fmt: skip
    a = p.parse_args(argv)
    if a.tiny:  # seconds on a CPU: 64² inputs, 2 timed steps, FisherTune R = 3 with 1 statistic step
        a.size, a.batch, a.warmup, a.steps = 64, 2, 1, 2
        a.ft_warmup, a.ft_refresh, a.ft_window = 1, 3, 1
        a.slide_size, a.slide_images, a.slide_iters, a.window_batch = [64, 128], 1, 1, 4
        a.cli_steps, a.workers, a.compile_backend = 4, 0, "eager"
    if a.budget_s is None:  # the smoke run's verdict never depends on the machine's speed (issue 30)
        a.budget_s = math.inf if a.tiny else 450.0
    a.out = a.out.resolve()
    a.keep_work = a.work_dir is not None
    # a folder of its own, so two runs at once never share (or delete) each other's run folders
    a.work_dir = (a.work_dir or Path(tempfile.mkdtemp(prefix="dgss_bench_gpu_"))).resolve()
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    try:
        return run_stages(a)
    finally:
        if not a.keep_work:
            shutil.rmtree(a.work_dir, ignore_errors=True)


def run_stages(a: argparse.Namespace) -> int:
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("bench_gpu: no CUDA device; run on a GPU machine, or --device cpu --tiny for the smoke run",
                  file=sys.stderr)  # fmt: skip
            return 2
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    left = lambda: a.budget_s - (time.perf_counter() - start)  # noqa: E731
    report = Report(a.out, environment(a.device), a)
    stages = [s for s in a.stages.split(",") if s]
    unknown = set(stages) - set(STAGES)
    if unknown:
        print(f"bench_gpu: unknown stages {sorted(unknown)}; choose from {','.join(STAGES)}", file=sys.stderr)
        return 2
    methods = [m for m in a.methods.split(",") if m]
    bf16 = "bf16-mixed"

    def fits(stage: str) -> bool:
        if a.tiny or left() >= STAGE_MIN_S[stage]:
            return True
        report.notes.append(f"stage {stage} skipped: {left():.0f} s of the {a.budget_s:.0f} s budget left")
        report.write()
        return False

    for stage in STAGES:
        if stage not in stages or not fits(stage):
            continue
        if stage == "methods":
            for name in methods:
                if not fits("methods"):
                    break
                guarded(report, stage, name, train_row, name, a, bf16, False, stage)
        elif stage == "slide":
            guarded(report, stage, "rein", slide_row, a)
        elif stage == "cli":
            guarded(report, stage, "rein", cli_row, a, max(left(), 60))
        elif stage == "fp32":
            for name in ("full", "rein"):
                if fits("fp32"):
                    guarded(report, stage, name, train_row, name, a, "32-true", False, stage)
        elif stage == "compile":
            for name in ("rein", "full"):
                if fits("compile"):
                    eager = report.find(stage="methods", method=name, precision=bf16)
                    guarded(
                        report, stage, name, train_row, name, a, bf16, True, stage, flops_from=eager or {}
                    )
        elif stage == "profile":
            for name in (m for m in a.profile_methods.split(",") if m):
                if fits("profile"):
                    guarded(report, stage, name, train_row, name, a, bf16, False, stage, profile=True)
    report.notes.append(f"total {time.perf_counter() - start:.0f} s")
    report.write()
    print(report.markdown())
    failed = [f"{r['stage']}/{r['method']}" for r in report.rows if not r.get("ok")]
    if failed:
        print(
            f"bench_gpu: failed: {', '.join(failed)} (errors in {a.out / 'bench_gpu.json'})", file=sys.stderr
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
