"""A tiny method and the embedded data, built directly (not through a config): what most method tests start from."""

import functools

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

from dgss.data.datamodule import DGSSDataModule
from dgss.data.synthetic import SyntheticDomain
from dgss.data.transforms import TrainPipeline
from dgss.models.backbone import Backbone
from dgss.models.heads.light import LightHead

H, W = 32, 64


def make_method(cls, weights=None, **kw):
    mk = dict(depth=2, embed_dim=32, num_heads=2, patch_size=8)
    bb = Backbone("vit_small_patch14_reg4_dinov2", weights=weights, img_size=(H, W), model_kwargs=mk)
    m = cls(bb, functools.partial(LightHead, channels=16), num_classes=19, **kw)
    m.configure_model()  # what build_method does: the tuning is built
    return m


def make_dm(n_train=8, n_val=3, **kw):
    return DGSSDataModule(
        sources={"game": SyntheticDomain("game", "train", n_train, H, W)},
        targets={"game": SyntheticDomain("game", "val", n_val, H, W), "fog": SyntheticDomain("fog", "val", n_val, H, W)},
        train_pipeline=TrainPipeline(crop=(H, W), short_edge=None, photometric=False),
        batch_size=2, val_batch_size=2, num_workers=0, pin_memory=False, **kw,
    )  # fmt: skip


def trainer(tmp_path, steps=3, **kw):
    checkpointing = any(isinstance(c, ModelCheckpoint) for c in kw.get("callbacks", []))
    return pl.Trainer(accelerator="cpu", max_steps=steps, val_check_interval=steps, check_val_every_n_epoch=None,
                      logger=False, enable_checkpointing=checkpointing, enable_progress_bar=False, enable_model_summary=False,
                      use_distributed_sampler=False, num_sanity_val_steps=0, default_root_dir=tmp_path, **kw)  # fmt: skip


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
