"""Checkpoints that survive a kill: atomic writes, the newest readable checkpoint, resume=auto."""

import os

import pytest
import torch
from test_checkpoint_eval import DATA

from dgss.checkpoint import AtomicCheckpointIO, find_resume_checkpoint
from dgss.train import train


def test_a_kill_during_a_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    real_save = torch.save

    def dies_halfway(obj, f):
        real_save(obj, f)
        f.truncate(f.tell() // 2)  # half the bytes are on disk when the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(torch.load(path)["state_dict"]["w"], torch.ones(3))  # the old file, whole
    assert os.listdir(tmp_path) == ["last.ckpt"]  # no temporary left behind


def test_the_newest_unreadable_checkpoint_falls_back_to_the_previous(tmp_path):
    assert find_resume_checkpoint(tmp_path / "none") is None
    old, new = tmp_path / "step000002.ckpt", tmp_path / "last.ckpt"
    torch.save({"state_dict": {}}, old)
    new.write_bytes(b"PK\x03\x04 truncated")
    os.utime(old, ns=(1, 1))
    with pytest.warns(UserWarning, match=r"last.ckpt is unreadable .*trying the previous checkpoint"):
        assert find_resume_checkpoint(tmp_path) == old


def test_resume_auto_continues_the_run_in_its_folder(compose_cfg, tmp_path):
    run = [*DATA, "trainer=cpu", "trainer.val_check_interval=2", "trainer.num_sanity_val_steps=0", "~logger",
           "callbacks=default", "~callbacks.progress_bar", "~callbacks.media", "resume=auto"]  # fmt: skip
    first = train(compose_cfg([*run, "trainer.max_steps=2"]))
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in ckpts and "step000002.ckpt" in ckpts
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"corrupt")  # killed while writing, say
    with pytest.warns(UserWarning, match="last.ckpt is unreadable"):
        second = train(compose_cfg([*run, "trainer.max_steps=4"]))
    assert "val/mean_mIoU" in first and "val/mean_mIoU" in second
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 4  # continued from step 2, not restarted


def test_a_run_folder_keeps_one_wandb_run(compose_cfg, tmp_path):
    from dgss.train import keep_wandb_run

    cfg = compose_cfg(["logger=wandb"])
    first = keep_wandb_run(cfg)
    assert cfg.logger.wandb.id == first and cfg.logger.wandb.resume == "allow"
    assert (tmp_path / "wandb_run_id").read_text().strip() == first
    again = compose_cfg(["logger=wandb"])  # the same folder later: resume=auto, a requeued job
    assert keep_wandb_run(again) == first
    assert keep_wandb_run(compose_cfg(["logger=wandb", "logger.wandb.id=mine"])) == "mine"
    assert keep_wandb_run(compose_cfg(["logger=csv"])) is None


@pytest.mark.slow
def test_compiled_training_writes_the_same_checkpoint_keys(compose_cfg, tmp_path):
    base = [*DATA, "trainer=cpu", "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.num_sanity_val_steps=0",
            "~logger", "callbacks=minimal", "+callbacks.last._target_=lightning.pytorch.callbacks.ModelCheckpoint",
            "+callbacks.last.save_last=true", "+callbacks.last.save_top_k=0"]  # fmt: skip
    keys = {}
    for compiled in (False, True):
        out = tmp_path / str(compiled)
        train(compose_cfg([*base, f"compile={str(compiled).lower()}", f"+callbacks.last.dirpath={out}"]))
        keys[compiled] = sorted(torch.load(out / "last.ckpt", weights_only=False)["state_dict"])
    assert keys[True] == keys[False] and not any("_orig_mod" in k for k in keys[True])


RESUMABLE = [*DATA, "trainer=cpu", "trainer.max_steps=6", "trainer.val_check_interval=2", "~logger",
             "trainer.num_sanity_val_steps=0", "callbacks=default", "~callbacks.progress_bar", "~callbacks.media",
             "resume=auto"]  # fmt: skip


def final_weights(folder):
    return torch.load(folder / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]


@pytest.mark.parametrize("method,crash", [("full", 3), ("full", 5), ("rein", 3), ("fishertune", 3), ("adaptformer", 3)])
def test_a_crashed_run_resumed_ends_bit_identical_to_a_straight_one(compose_cfg, tmp_path, method, crash):
    """6 steps straight vs a crash after step 3 (last checkpoint: step 2) or 5 (step 4, the end of a pass: 8 images
    in batches of 2) + resume=auto: identical weights. Random scales, crops, flips, photometric distortion and
    (AdaptFormer) dropout all draw from the random streams; the resumed runs cross a pass boundary."""
    run = [*RESUMABLE, f"method={method}"]
    train(compose_cfg([*run, f"paths.output_dir={tmp_path / 'straight'}"]))
    resumed = [*run, f"paths.output_dir={tmp_path / 'resumed'}"]
    with pytest.raises(RuntimeError, match=f"crash after step {crash}"):
        train(compose_cfg([*resumed, "+callbacks.crash._target_=resume_helpers.CrashAt", f"+callbacks.crash.step={crash}"]))
    saved = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)  # plain tensors only
    assert saved["global_step"] == crash - 1
    train(compose_cfg(resumed))
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert not changed, f"{len(changed)} tensors differ, e.g. {changed[:3]}"
