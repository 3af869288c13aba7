"""A 2-process CPU DDP evaluation gives exactly the single-process per-class IoU (no padded duplicates)."""

import functools

import lightning.pytorch as pl
import torch

from dgss.data.datamodule import DGSSDataModule
from dgss.data.synthetic import SyntheticDomain
from dgss.methods.full import FullFineTune
from dgss.models.backbone import Backbone
from dgss.models.heads.light import LightHead


class SaveIoU(pl.Callback):
    def __init__(self, path):
        self.path = path

    def on_validation_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            torch.save(pl_module.last_val, self.path)


def _method():
    torch.manual_seed(0)
    bb = Backbone(
        "vit_small_patch14_reg4_dinov2",
        img_size=(32, 64),
        model_kwargs=dict(depth=2, embed_dim=32, num_heads=2, patch_size=8),
    )
    return FullFineTune(bb, functools.partial(LightHead, channels=16), num_classes=19)


def _dm():  # 5 and 3 images over 2 ranks with batch 2: uneven shards, a padded sampler would repeat one
    return DGSSDataModule(
        sources={"game": SyntheticDomain("game", "train", 4, 32, 64)},
        targets={"photo": SyntheticDomain("photo", "val", 5, 32, 64), "night": SyntheticDomain("night", "val", 3, 32, 64)},
        batch_size=2, val_batch_size=2, num_workers=0, pin_memory=False,
    )  # fmt: skip


def _validate(tmp_path, name, **kw):
    path = tmp_path / f"{name}.pt"
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False, callbacks=[SaveIoU(path)],
                         default_root_dir=tmp_path, **kw)  # fmt: skip
    trainer.validate(_method(), datamodule=_dm())
    return torch.load(path)


def test_two_process_ddp_matches_single_process(tmp_path):
    single = _validate(tmp_path, "single", devices=1)
    ddp = _validate(tmp_path, "ddp", devices=2, strategy="ddp_spawn")
    assert set(single) == set(ddp) == {"photo", "night"}
    for d in single:
        assert torch.equal(torch.nan_to_num(single[d], nan=-1.0), torch.nan_to_num(ddp[d], nan=-1.0)), d
