"""The overrides of a tiny training run on the embedded data (a few steps on the CPU), and a tiny DINOv2 as the
backbone's weights file (the ``weights`` fixture in conftest.py writes one)."""

TINY_DINO = dict(depth=2, embed_dim=64, num_heads=2, patch_size=16)
DATA = ["data=synthetic", "synthetic.height=64", "synthetic.width=128", "synthetic.train_length=8",
        "synthetic.val_length=3", "data.batch_size=2", "data.val_batch_size=2", "data.num_workers=0"]  # fmt: skip
RUN = ["trainer=cpu", "trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.num_sanity_val_steps=0",
       "~logger", "callbacks=default", "~callbacks.progress_bar", "~callbacks.media"]  # fmt: skip


def backbone_args(weights):
    kw = [f"+backbone.model_kwargs.{k}={v}" if k not in ("patch_size",) else f"backbone.model_kwargs.{k}={v}"
          for k, v in TINY_DINO.items()]  # fmt: skip
    return [
        "backbone=dinov2_s",
        f"backbone.weights={weights}",
        "backbone.img_size=64",
        "backbone.out_indices=[0,1]",
        *kw,
    ]
