"""A 2-process CPU DDP evaluation gives exactly the single-process per-class IoU (no padded duplicates)."""

import functools

import lightning.pytorch as pl
import pytest
import torch

from dgss.data.datamodule import DGSSDataModule
from dgss.data.synthetic import SyntheticDomain
from dgss.methods.fishertune import FisherTune
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
    m = FullFineTune(bb, functools.partial(LightHead, channels=16), num_classes=19)
    m.configure_model()
    return m


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


class SaveSelection(pl.Callback):
    def __init__(self, folder):
        self.folder = folder

    def on_train_end(self, trainer, m):
        torch.save({"masks": m.masks, "history": m.history, "backbone": m.backbone.state_dict(),
                    "head": dict(m.head.named_parameters()), "nonfinite": dict(m.nonfinite),
                    "counts": dict(m.stats.counts)}, self.folder / f"rank{trainer.global_rank}.pt")  # fmt: skip


class NanOnRank1(FisherTune):
    """The clean pass of step 2 (a statistic step) is NaN on rank 1 only."""

    def fisher_forward(self, images, labels):
        output, losses, fisher_loss = super().fisher_forward(images, labels)
        if self.global_rank == 1 and self.global_step == 2 and not self.perturbation.enabled:
            nan = float("nan")
            return output, {k: v * nan for k, v in losses.items()}, fisher_loss * nan
        return output, losses, fisher_loss


@pytest.mark.parametrize("score", ["dr_fim", "fim", "random"])
def test_fishertune_selects_identically_on_every_rank(tmp_path, score):
    """Each rank sees other images and perturbation draws; the averaged statistics give one selection (``fim``, and
    ``random``, whose generator was seeded through Python's per-process salted string hash before issue 27: every
    spawned rank drew its own). A loss that is NaN on one rank only skips the step on both, and nothing of it enters
    the statistics."""
    torch.manual_seed(0)
    bb = Backbone("vit_small_patch14_reg4_dinov2", img_size=(32, 64),
                  model_kwargs=dict(depth=2, embed_dim=32, num_heads=2, patch_size=8))  # fmt: skip
    m = NanOnRank1(bb, functools.partial(LightHead, channels=16), num_classes=19, fishertune=dict(
                   perturb={"after_blocks": [0]}, fisher={"window": 2, "score": score},
                   schedule={"warmup_iters": 1, "growth_tau": 2, "growth_end": 5, "refresh_every": 2}))  # fmt: skip
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=7, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False, limit_val_batches=0, callbacks=[SaveSelection(tmp_path)],
                         default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(m, datamodule=_dm())
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert [h["step"] for h in r0["history"]] == [1, 3, 5] and r0["history"] == r1["history"]
    assert r0["nonfinite"] == r1["nonfinite"] == {"total": 1, "streak": 0}
    assert r0["counts"] == r1["counts"] and r0["counts"]["x"] == (0 if score == "random" else 5)  # 0..5 but 2
    assert all(torch.equal(r0["masks"][n], r1["masks"][n]) for n in r0["masks"])
    assert all(torch.equal(r0["backbone"][k], r1["backbone"][k]) for k in r0["backbone"])  # same updates
    assert all(torch.equal(r0["head"][k], r1["head"][k]) for k in r0["head"])  # (BN buffers are per rank)


class _SignalOnRank1(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_rank == 1 and trainer.global_step == 2:
            import signal

            signal.raise_signal(signal.SIGUSR1)


def test_a_signal_on_one_rank_stops_every_rank_after_one_checkpoint(tmp_path):
    """SIGUSR1 reaches rank 1 only (from a callback's end-of-step hook): the ranks agree at that step's end
    (Preemption acts after every other callback), write one preempted.ckpt and stop."""
    from dgss.preemption import Preemption

    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=20, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False, limit_val_batches=0, default_root_dir=tmp_path,
                         callbacks=[Preemption(tmp_path / "ckpt"), _SignalOnRank1()])  # fmt: skip
    with pytest.raises(Exception, match="stopped by SIGUSR1 at step 2"):
        trainer.fit(_method(), datamodule=_dm())
    assert torch.load(tmp_path / "ckpt" / "preempted.ckpt", weights_only=True)["global_step"] == 2
