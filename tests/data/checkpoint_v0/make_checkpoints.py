"""How the v0 checkpoints here were written: ``python tests/data/checkpoint_v0/make_checkpoints.py OUT`` from the
repository root at commit 4f86b1a (the format before issue 29), then OUT/<name>/checkpoints/last.ckpt copied here."""

import sys
from pathlib import Path

import timm
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

import dgss.config  # noqa: F401  (resolvers)
from dgss.train import train

out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/legacy")
out.mkdir(parents=True, exist_ok=True)
m = timm.create_model(
    "vit_small_patch14_dinov2", num_classes=0, img_size=64, depth=2, embed_dim=32, num_heads=2, patch_size=16
)
torch.save(m.state_dict(), out / "tiny_dinov2.pth")
DATA = ["data=synthetic", "synthetic.height=64", "synthetic.width=128", "synthetic.train_length=4",
        "synthetic.val_length=2", "data.batch_size=2", "data.val_batch_size=2", "data.num_workers=0"]  # fmt: skip
RUN = ["trainer=cpu", "trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.num_sanity_val_steps=0",
       "~logger", "callbacks=default", "~callbacks.progress_bar", "~callbacks.media"]  # fmt: skip
BB = ["backbone=dinov2_s", f"backbone.weights={out / 'tiny_dinov2.pth'}", "backbone.img_size=64",
      "backbone.out_indices=[0,1]", "+backbone.model_kwargs.depth=2", "+backbone.model_kwargs.embed_dim=32",
      "+backbone.model_kwargs.num_heads=2", "backbone.model_kwargs.patch_size=16", "head=light", "head.channels=16"]  # fmt: skip
FT = ["method=fishertune", "method.schedule.warmup_iters=1", "method.schedule.growth_end=3",
      "method.schedule.refresh_every=1", "method.schedule.growth_tau=2", "method.fisher.window=1",
      "method.perturb.after_blocks=[0,1]", "callbacks.ema={_target_: dgss.callbacks.EMA, momentum: 0.5, begin: 1}"]  # fmt: skip
for name, extra in [("frozen", ["method=frozen"]), ("fishertune_ema", FT)]:
    run = out / name
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="dgss.conf", version_base="1.3"):
        cfg = compose("train", overrides=[*DATA, *RUN, *BB, *extra, f"paths.log_dir={run}", "seed=0"],
                      return_hydra_config=True)  # fmt: skip
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run)
        cfg.hydra.job.num = 0
    HydraConfig().set_config(cfg)
    print(name, {k: v for k, v in train(cfg).items() if "mIoU" in k})
