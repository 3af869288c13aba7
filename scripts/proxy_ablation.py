"""A proxy ablation on the embedded domains: the demo's setting (the label-free pretrained toy ViT of `make demo`,
source `game`, 96x192, batch 4, 1,000 iterations, light head) for full fine-tuning, the frozen backbone, Rein and
FisherTune with its three scores (DR-FIM, the Fisher alone, uniformly random elements) at the demo's budget, over
several seeds. Prints (and writes with --out) a markdown table of mean +- std of the source and the mean-target mIoU.

    python scripts/proxy_ablation.py --weights weights/toy_mim.safetensors --seeds 0 1 2 --out proxy.md

Each run is one `dgss-train` process (its own run dir under --root, metrics.json read back); a finished run is
reused, so an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# every run: the demo experiment, without the loggers (metrics.json is written regardless)
RUNS: dict[str, list[str]] = {
    # the backbone at the head's lr, as FisherTune's demo recipe (backbone_lr_mult 1.0): the same step size
    "full": ["method=full", "+method.paramwise.custom_keys.backbone={lr_mult: 1.0}"],
    "frozen": ["method=frozen"],
    "rein": ["method=rein"],
    "fishertune dr_fim": ["method.fisher.score=dr_fim"],
    "fishertune fim": ["method.fisher.score=fim"],
    "fishertune random": ["method.fisher.score=random"],
}


def run_one(name: str, seed: int, weights: str, root: Path) -> dict:
    out = root / f"{name.replace(' ', '_')}_seed{seed}"
    metrics = out / "metrics.json"
    if not metrics.is_file():
        cmd = [sys.executable, "-m", "dgss.train", "experiment=demo", f"backbone.weights={weights}", f"seed={seed}",
               "~logger", f"hydra.run.dir={out}", *RUNS[name]]  # fmt: skip
        t0 = time.time()
        env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode != 0:
            raise SystemExit(f"{name} seed {seed} failed ({res.returncode}):\n{res.stderr[-3000:]}")
        print(f"  {name} seed {seed}: {time.time() - t0:.0f} s", flush=True)
    last = json.loads(metrics.read_text())[-1]
    return {"source": last["domains"]["game"]["mIoU"], "target": last["mean_mIoU"]}


def fmt(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default="weights/toy_mim.safetensors")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--root", default="logs/proxy_ablation")
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--out", default=None, help="also write the table here")
    args = ap.parse_args(argv)
    root = Path(args.root)
    rows = []
    for name in args.runs:
        res = [run_one(name, s, args.weights, root) for s in args.seeds]
        rows.append((name, [r["source"] for r in res], [r["target"] for r in res]))
    lines = ["| method | source `game` mIoU | mean over targets (photo, overcast, fog, night) | seeds |",
             "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {n} | {fmt(s)} | {fmt(t)} | {', '.join(f'{v:.2f}' for v in t)} |" for n, s, t in rows]
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
