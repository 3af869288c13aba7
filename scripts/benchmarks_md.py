"""Shared by the benchmark scripts: variants in fresh processes, peak memory, device name, and appending a result
row to a section's table in docs/benchmarks.md (creating the section on first use)."""

from __future__ import annotations

import multiprocessing as mp
import os
import platform
from collections.abc import Callable, Sequence
from pathlib import Path


def rss_mb() -> float:
    """Resident set size of this process in MiB (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def run_isolated(
    fn: Callable, variants: Sequence[str], args, device: str, mmap_threshold: int
) -> dict[str, dict]:
    """``fn(variant, args, queue)`` for each variant in its own spawned process (peak memory is per process).

    On CPU, glibc raises its mmap threshold after frees and then keeps freed tensors in the heap; a fixed
    ``MALLOC_MMAP_THRESHOLD_`` returns them, so the RSS high-water mark follows live memory (0 = glibc default).
    """
    if device == "cpu" and mmap_threshold:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(
            mmap_threshold
        )  # read at process start: set before spawning
    ctx = mp.get_context("spawn")
    results = {}
    for variant in variants:
        q = ctx.Queue()
        proc = ctx.Process(target=fn, args=(variant, args, q))
        proc.start()
        results[variant] = q.get()
        proc.join()
        print(results[variant], flush=True)
    return results


# dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, by a substring of torch.cuda.get_device_name()
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "B200": 2250.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def peak_bf16_tflops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)


def device_name(device: str) -> str:
    import torch

    name = (
        torch.cuda.get_device_name()
        if device == "cuda"
        else f"{platform.machine()} CPU, {os.cpu_count()} cores"
    )
    return f"{name}, torch {torch.__version__}"


def append_row(path: str | Path, header: str, intro: str, columns: list[str], row: list[str]) -> None:
    """``header`` is the section title line (``## ...``); ``intro`` the text above the table."""
    out = Path(path)
    text = out.read_text() if out.exists() else "# Benchmarks\n"
    lines = text.rstrip("\n").split("\n")
    if header not in lines:
        lines += ["", header, "", *intro.strip().split("\n"), "", "| " + " | ".join(columns) + " |",
                  "|" + "---|" * len(columns)]  # fmt: skip
    start = lines.index(header)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    last = max(i for i in range(start, end) if lines[i].startswith("|"))
    lines.insert(last + 1, "| " + " | ".join(row) + " |")
    out.write_text("\n".join(lines) + "\n")
