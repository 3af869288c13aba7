"""How much does FisherTune's domain term change the selection? On the demo setting (the pretrained toy ViT of
`make demo`, the embedded `game` domain), train the head-only warm-up while gathering F(x) and F(x') over its last
`--window` steps, then make one fixed 5 % selection (global, element-wise) by DR-FIM and by the Fisher alone under
several normalisations and prior floors, and print the overlap |A ∩ B| / k. The same with the perturbation off
(``perturb.scale=0``) must give 1.0 for every setting.

    python scripts/fishertune_overlap.py --weights weights/toy_mim.safetensors [--window 16] [--fraction 0.05]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

SETTINGS = [("mean", 1.0), ("mean", 0.01), ("quantile", 1.0), ("quantile", 0.1), ("quantile", 0.01),
            ("per_tensor", 0.1), ("none", 0.0)]  # fmt: skip


def gather(weights: str, window: int, scale: float, seed: int):
    """The method after its warm-up with statistics over the last ``window`` steps (no element selected yet)."""
    import hydra
    import lightning.pytorch as pl
    from hydra import compose, initialize_config_module

    from dgss.config import build_method

    with initialize_config_module("dgss.conf", version_base="1.3"):
        cfg = compose("train", overrides=[
            "experiment=demo", f"backbone.weights={weights}", f"seed={seed}", "~logger",
            f"method.fishertune.fisher.window={window}", f"method.fishertune.perturb.scale={scale}", "data.num_workers=0",
        ])  # fmt: skip
    pl.seed_everything(seed, verbose=False)
    m = build_method(cfg)
    dm = hydra.utils.instantiate(cfg.data)
    t1 = m.options.schedule.warmup_iters

    class StopAtT1(pl.Callback):  # the run's own schedule (lr, growth), stopped before the first refresh
        def on_train_batch_end(self, trainer, *args):
            trainer.should_stop = trainer.global_step >= t1

    trainer = pl.Trainer(accelerator="cpu", max_steps=cfg.trainer.max_steps, logger=False, callbacks=[StopAtT1()],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, use_distributed_sampler=False)  # fmt: skip
    trainer.fit(m, dm)
    return m


def top(scores: dict[str, torch.Tensor], k: int) -> torch.Tensor:
    flat = torch.cat([v.reshape(-1) for v in scores.values()])
    return torch.topk(flat, k, sorted=False).indices


def overlaps(m, fraction: float) -> list[tuple[str, float, float]]:
    k = round(fraction * m.n_base)
    f = m.options.fisher
    rows = []
    for normalize, floor in SETTINGS:
        f.normalize, f.prior_precision = normalize, floor
        f.score = "dr_fim"
        a = set(top(m.scores(), k).tolist())
        f.score = "fim"
        b = set(top(m.scores(), k).tolist())
        rows.append((normalize, floor, len(a & b) / k))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default="weights/toy_mim.safetensors")
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--fraction", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(
        f"one fixed {args.fraction:.0%} selection after the warm-up, statistics over its last {args.window} steps"
    )
    print("| normalize | tau^-2 | overlap DR-FIM vs FIM, perturb.scale=1 | perturb.scale=0 |")
    print("|---|---|---|---|")
    on = overlaps(gather(args.weights, args.window, 1.0, args.seed), args.fraction)
    off = overlaps(gather(args.weights, args.window, 0.0, args.seed), args.fraction)
    for (n, floor, a), (_, _, b) in zip(on, off):
        print(f"| {n} | {floor:g} | {a:.3f} | {b:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
