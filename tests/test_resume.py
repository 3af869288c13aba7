"""Checkpoints that survive a kill: atomic writes, the newest readable checkpoint, resume=auto."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.limits import HANG_GUARD_S
from helpers.runs import DATA

from dgss.checkpoint import AtomicCheckpointIO, find_resume_checkpoint, section
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
    torch.save({"state_dict": {}, "loops": {}, "optimizer_states": []}, old)
    new.write_bytes(b"PK\x03\x04 truncated")
    os.utime(old, ns=(1, 1))
    with pytest.warns(UserWarning, match=r"last.ckpt is unreadable .*trying the previous checkpoint"):
        assert find_resume_checkpoint(tmp_path) == old


def test_resume_auto_continues_the_run_in_its_folder(compose_cfg, tmp_path):
    run = [*DATA, "trainer=cpu", "trainer.val_check_interval=2", "trainer.num_sanity_val_steps=0", "~logger",
           "callbacks=default", "~callbacks.progress_bar", "~callbacks.media", "resume=auto", "trainer.max_steps=4"]  # fmt: skip
    crash_after(compose_cfg, run, 2)
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in ckpts and "step000002.ckpt" in ckpts
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"corrupt")  # killed while writing, say
    with pytest.warns(UserWarning, match="last.ckpt is unreadable"):
        second = train(compose_cfg(run))
    assert "val/mean_mIoU" in second
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 4  # continued from step 2, not restarted


def test_resuming_with_a_changed_recipe_or_schedule_length_is_refused(compose_cfg, tmp_path, capsys):
    """Issue 25 (9): "raise trainer.max_steps to train on" resumed with learning rate 0.0 for every added step (the
    poly schedule had ended), and a changed method.optimizer.lr was ignored (the optimizer state is restored) while
    the new checkpoints recorded the new value. Both are refused in one line now, before anything is built."""
    from dgss.cli import run_cli

    run = [*DATA, "trainer=cpu", "trainer.val_check_interval=2", "trainer.num_sanity_val_steps=0", "~logger",
           "callbacks=default", "~callbacks.progress_bar", "~callbacks.media", "resume=auto", "trainer.max_steps=2"]  # fmt: skip
    train(compose_cfg(run))
    for override, want in [
        ("trainer.max_steps=4", "belongs to a run of trainer.max_steps=2, whose learning rate decays to 0 at that "
                                "step; resuming it with trainer.max_steps=4 would train every added step at learning "
                                "rate 0: resume with trainer.max_steps=2, or train a new run"),
        ("method.optimizer.lr=0.5", "was trained with method.optimizer.lr=0.0001 (this command: 0.5): a resumed run "
                                    "continues with the checkpoint's optimizer and schedule"),
        ("head.channels=32", "was trained with head.channels="),
    ]:  # fmt: skip
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            run_cli(train, compose_cfg([*run, override]), "dgss-train")
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and "\n" not in err and want in err, err
    # what may change on resume: the inference setting, loader workers
    assert train(compose_cfg([*run, "method.inference.mode=slide", "data.num_workers=1"]))


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
        train(
            compose_cfg(
                [
                    *base,
                    f"compile={str(compiled).lower()}",
                    f"+callbacks.last.dirpath={out}",
                    f"paths.output_dir={out}",
                ]
            )
        )  # one run folder each
        keys[compiled] = sorted(torch.load(out / "last.ckpt", weights_only=False)["state_dict"])
    assert keys[True] == keys[False] and not any("_orig_mod" in k for k in keys[True])


RESUMABLE = [*DATA, "trainer=cpu", "trainer.max_steps=6", "trainer.val_check_interval=2", "~logger",
             "trainer.num_sanity_val_steps=0", "callbacks=default", "~callbacks.progress_bar", "~callbacks.media",
             "resume=auto"]  # fmt: skip


def crash_after(compose_cfg, run, step):
    """Train ``run`` until it crashes before step ``step + 1`` (helpers.interrupt.CrashAt)."""
    with pytest.raises(RuntimeError, match=f"crash after step {step}"):
        train(
            compose_cfg(
                [*run, "+callbacks.crash._target_=helpers.interrupt.CrashAt", f"+callbacks.crash.step={step}"]
            )
        )


def final_weights(folder):
    return torch.load(folder / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]


@pytest.mark.parametrize(
    "method,crash,workers",
    [
        ("full", 3, 0),
        ("full", 5, 0),
        ("full", 3, 2),
        ("rein", 3, 0),
        ("fishertune", 3, 0),
        ("adaptformer", 3, 0),
    ],
)
def test_a_crashed_run_resumed_ends_bit_identical_to_a_straight_one(
    compose_cfg, tmp_path, method, crash, workers
):
    """6 steps straight vs a crash after step 3 (last checkpoint: step 2) or 5 (step 4, the end of a pass: 8 images
    in batches of 2) + resume=auto: identical weights, also with 2 loader workers (fresh ones after the restart).
    Random scales, crops, flips, photometric distortion and (AdaptFormer) dropout all draw from the random streams;
    the resumed runs cross a pass boundary."""
    run = [*RESUMABLE, f"method={method}", f"data.num_workers={workers}"]
    train(compose_cfg([*run, f"paths.output_dir={tmp_path / 'straight'}"]))
    resumed = [*run, f"paths.output_dir={tmp_path / 'resumed'}"]
    with pytest.raises(RuntimeError, match=f"crash after step {crash}"):
        train(
            compose_cfg(
                [
                    *resumed,
                    "+callbacks.crash._target_=helpers.interrupt.CrashAt",
                    f"+callbacks.crash.step={crash}",
                ]
            )
        )
    saved = torch.load(
        tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True
    )  # plain tensors only
    assert saved["global_step"] == crash - 1
    train(compose_cfg(resumed))
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert not changed, f"{len(changed)} tensors differ, e.g. {changed[:3]}"


@pytest.mark.parametrize(
    "sig,during,accumulate",
    [
        ("SIGTERM", "train", 1),
        ("SIGUSR1", "validation", 1),
        ("SIGUSR2", "train", 1),
        ("SIGTERM", "train", 2),
        ("SIGINT", "train", 1),
    ],
)
def test_a_preempted_run_saves_stops_and_resumes_bit_identical(
    compose_cfg, tmp_path, monkeypatch, sig, during, accumulate
):
    """A signal after step 3 (or during the validation at step 4) -> checkpoints/preempted.ckpt at the next safe
    point (step 4: with accumulation the signal comes mid-window and the save waits for the window's step),
    Preempted raised (dgss-train exits with it), and resume=auto continues to the straight run's weights.
    In a SLURM job (SLURM_JOB_ID) the job is requeued with scontrol (here a stand-in on PATH)."""
    step_saved = 4
    from dgss.preemption import Preempted

    calls = tmp_path / "scontrol_calls"
    if sig == "SIGUSR2":
        fake = tmp_path / "bin" / "scontrol"
        fake.parent.mkdir()
        fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
        fake.chmod(0o755)
        monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
    run = [*RESUMABLE, f"trainer.accumulate_grad_batches={accumulate}"]  # validation every 2 steps either way
    train(compose_cfg([*run, f"paths.output_dir={tmp_path / 'straight'}"]))
    resumed = [*run, f"paths.output_dir={tmp_path / 'resumed'}"]
    sent = 4 if during == "validation" else 3
    with pytest.raises(Preempted) as stop:
        train(compose_cfg([*resumed, "+callbacks.signal._target_=helpers.interrupt.SignalAt",
                           f"+callbacks.signal.step={sent}", f"+callbacks.signal.signal={sig}",
                           f"+callbacks.signal.during={during}"]))  # fmt: skip
    saved = tmp_path / "resumed" / "checkpoints" / "preempted.ckpt"
    assert stop.value.signame == sig and stop.value.step == step_saved and stop.value.path == saved
    assert torch.load(saved, weights_only=True)["global_step"] == step_saved
    if sig == "SIGUSR2":
        assert stop.value.requeued == "4242" and stop.value.exit_code == 0
        assert calls.read_text().split() == ["requeue", "4242"]
    else:
        assert stop.value.requeued is None and stop.value.exit_code == 128 + getattr(signal, sig)
    assert signal.getsignal(getattr(signal, sig)) in (
        signal.SIG_DFL,
        signal.default_int_handler,
    )  # handlers restored
    train(compose_cfg(resumed))
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert not [k for k in a if not torch.equal(a[k], b[k])]
    for path in (tmp_path / "resumed" / "checkpoints").glob(
        "*.ckpt"
    ):  # all at step ends, none mid-accumulation
        ckpt = torch.load(path, weights_only=True)
        processed = ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"]
        assert processed == ckpt["global_step"] * accumulate, path.name
    history = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert [h["step"] for h in history] == [
        2,
        6,
    ]  # the validation at step 4 is skipped, never logged half-done
    assert {v["images"] for h in history for v in h["domains"].values()} == {3}


def dgss_train(args, **kw):
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    return subprocess.Popen([str(Path(sys.executable).parent / "dgss-train"), *RESUMABLE, *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)  # fmt: skip


def finish(proc, timeout=HANG_GUARD_S):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


@pytest.mark.slow
def test_kill_9_and_sigterm_then_resume_auto_give_the_straight_runs_weights(tmp_path):
    """Real processes: (1) 6 steps straight; (2) kill -9 in the middle of writing the step-4 checkpoint, then the
    same command (resume=auto) again; (3) SIGTERM from outside after step 3, then the same command again; (4) the
    same to the run's whole process group, with loader workers. Every interrupted run ends with the straight run's
    weights, bit for bit."""
    rc, err = finish(dgss_train([f"hydra.run.dir={tmp_path / 'straight'}"]))
    assert rc == 0, err[-3000:]

    killed = [f"hydra.run.dir={tmp_path / 'killed'}"]
    rc, err = finish(
        dgss_train(
            [*killed, "+callbacks.kill._target_=helpers.interrupt.KillDuringSave", "+callbacks.kill.step=4"]
        )
    )
    assert rc == -signal.SIGKILL, err[-3000:]
    ckpts = tmp_path / "killed" / "checkpoints"
    leftovers = [p.name for p in ckpts.glob(".*.tmp")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".step000004")  # the write that was cut off
    assert os.path.getsize(ckpts / leftovers[0]) > 1 << 20  # the kill came mid-write, after the first MiB
    for p in ckpts.glob("*.ckpt"):  # every checkpoint under its final name loads
        assert torch.load(p, weights_only=True)["global_step"] == 2
    rc, err = finish(dgss_train(killed))
    assert rc == 0, err[-3000:]
    assert not list(ckpts.glob(".*.tmp"))  # the cut-off write was cleaned up

    termed = [f"hydra.run.dir={tmp_path / 'termed'}"]
    marker = tmp_path / "reached_step_3"
    proc = dgss_train([*termed, "+callbacks.slow._target_=helpers.interrupt.SlowAfter", "+callbacks.slow.step=3",
                       f"+callbacks.slow.marker={marker}"])  # fmt: skip
    deadline = time.monotonic() + 240
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    rc, err = finish(proc)
    assert rc == 128 + signal.SIGTERM, err[-3000:]
    last = [ln for ln in err.splitlines() if ln.strip()][-1]
    # the command already has resume=auto and a fixed folder: the same command continues
    assert last.startswith("dgss-train: stopped by SIGTERM at step ") and last.endswith(
        "; rerun the same command to continue"
    ), err[-3000:]
    assert "`weights_only` was not set" not in err  # Lightning's notice for a save without the flag
    assert (tmp_path / "termed" / "checkpoints" / "preempted.ckpt").is_file()
    rc, err = finish(dgss_train(termed))
    assert rc == 0, err[-3000:]

    # (4) SIGTERM to the whole process group (SLURM, scancel, timeout), two loader workers and a sanity validation's
    # workers included: issue 25 (2) - the workers died and the run failed with "DataLoader worker ... exited" and
    # a traceback, no checkpoint
    grouped = [
        f"hydra.run.dir={tmp_path / 'grouped'}",
        "data.num_workers=2",
        "trainer.num_sanity_val_steps=1",
    ]
    marker = tmp_path / "grouped_reached_step_3"
    proc = dgss_train([*grouped, "+callbacks.slow._target_=helpers.interrupt.SlowAfter", "+callbacks.slow.step=3",
                       f"+callbacks.slow.marker={marker}"], start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 240
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)
    rc, err = finish(proc)
    assert rc == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err and "DataLoader worker" not in err, err[-3000:]
    last = [ln for ln in err.splitlines() if ln.strip()][-1]
    assert last.startswith("dgss-train: stopped by SIGTERM at step ") and last.endswith(
        "; rerun the same command to continue"
    ), err[-3000:]
    rc, err = finish(dgss_train(grouped))
    assert rc == 0, err[-3000:]

    want = final_weights(tmp_path / "straight")
    for run in ("killed", "termed", "grouped"):
        got = final_weights(tmp_path / run)
        assert not [k for k in want if not torch.equal(want[k], got[k])], run


def test_resume_keeps_the_csv_history_and_ends_with_the_straight_runs_rows(compose_cfg, tmp_path):
    """Lightning's CSV logger deleted metrics.csv when a resumed run reopened the folder: the loss curve and the
    validations before the crash were gone. Now a crash after step 3 + resume=auto leaves the same rows (step,
    loss, mIoU) as 6 steps straight: the history before the checkpoint kept, the lost steps logged once."""
    import csv

    def rows(folder):
        with (folder / "csv" / "metrics.csv").open() as f:
            return [(int(r["step"]), r.get("train/loss", ""), r.get("val/mean_mIoU", ""))
                    for r in csv.DictReader(f) if r.get("train/loss") or r.get("val/mean_mIoU")]  # fmt: skip

    run = [o for o in RESUMABLE if o != "~logger"] + [
        "method=full",
        "logger=csv",
        "trainer.log_every_n_steps=1",
    ]
    train(compose_cfg([*run, f"paths.output_dir={tmp_path / 'straight'}"]))
    resumed = [*run, f"paths.output_dir={tmp_path / 'resumed'}"]
    crash_after(compose_cfg, resumed, 3)
    before = rows(tmp_path / "resumed")
    assert [s for s, *_ in before] == [0, 1, 1, 2]  # steps 0-2 trained, the validation at step 2 logged as 1
    train(compose_cfg(resumed))
    straight = rows(tmp_path / "straight")
    assert rows(tmp_path / "resumed") == straight and len(straight) == 9  # 6 losses + 3 validations


def test_resume_auto_on_a_finished_run_returns_its_result(compose_cfg, tmp_path):
    """A requeue or a script rerunning a finished run: nothing to train, exit 0 with the run's last validation
    (not "optimized_metric was never logged"), and the checkpoints are left as they were."""
    from dgss.train import _main

    run = [*RESUMABLE, "trainer.max_steps=2", "method=frozen"]
    first = train(compose_cfg(run))
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "checkpoints").glob("*.ckpt")}
    again = compose_cfg(run)
    assert _main(again) == pytest.approx(first["val/mean_mIoU"], abs=1e-4)
    assert train(again)["val/game/mIoU"] == pytest.approx(first["val/game/mIoU"], abs=1e-4)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "checkpoints").glob("*.ckpt")} == mtimes


def test_schedule_and_checkpoint_mistakes_fail_before_the_run(compose_cfg, tmp_path):
    from dgss.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^trainer.val_check_interval=8 is past trainer.max_steps=4: the run "
                       r"would never validate nor write its periodic checkpoints; set trainer.val_check_interval <= 4$"):  # fmt: skip
        train(compose_cfg([*RESUMABLE, "trainer.max_steps=4", "trainer.val_check_interval=8"]))
    assert not (tmp_path / "checkpoints").exists()
    full = tmp_path / "full"
    train(compose_cfg([*RESUMABLE, "trainer.max_steps=2", "method=full", f"paths.output_dir={full}"]))
    ckpt = full / "checkpoints" / "last.ckpt"
    with pytest.raises(
        ConfigError, match=r"^the checkpoint was trained with method FullFineTune, not Rein: resume"
    ):
        train(
            compose_cfg(
                [*RESUMABLE, "method=rein", f"ckpt_path={ckpt}", f"paths.output_dir={tmp_path / 'r'}"]
            )
        )
    torch.save({"state_dict": {"decode_head.w": torch.ones(1)}}, tmp_path / "release.pth")
    with pytest.raises(
        ConfigError, match=r"release.pth' is not a dgss-train checkpoint \(an official release"
    ):
        train(
            compose_cfg(
                [*RESUMABLE, f"ckpt_path={tmp_path / 'release.pth'}", f"paths.output_dir={tmp_path / 'x'}"]
            )
        )
    assert (
        not (tmp_path / "r").exists() and not (tmp_path / "x").exists()
    )  # refused before anything was built


def test_resume_auto_needs_a_named_run(compose_cfg):
    from dgss.errors import ConfigError
    from dgss.train import resume_from

    cfg = compose_cfg(["resume=auto"])
    cfg.paths.output_dir = cfg.hydra.run.dir  # the folder Hydra made up for this run: date_time_<random>
    with pytest.raises(
        ConfigError, match=r"^resume=auto needs run_name=<name>: without it every run gets a new"
    ):
        resume_from(cfg)
    named = compose_cfg(["resume=auto", "run_name=mine"])
    assert (
        named.hydra.run.dir.endswith("/train/runs/mine") and resume_from(named) is None
    )  # nothing there yet


def test_ctrl_c_saves_and_says_how_to_resume_and_a_second_one_stops_at_once(compose_cfg, tmp_path, capsys):
    """Ctrl-C used to leave no checkpoint and no hint. Now the first one finishes the step, writes preempted.ckpt and
    names the rerun (with the made-up folder's name as run_name); a second one stops at once without a checkpoint."""
    from dgss.preemption import Preempted

    try:
        cfg = compose_cfg([o for o in RESUMABLE if o != "resume=auto"] + [
            "+callbacks.signal._target_=helpers.interrupt.SignalAt", "+callbacks.signal.step=3",
            "+callbacks.signal.signal=SIGINT"])  # fmt: skip
        cfg.paths.output_dir = str(tmp_path / cfg.hydra.run.dir.rsplit("/", 1)[1])  # a folder Hydra made up
        name = Path(cfg.paths.output_dir).name
        with pytest.raises(Preempted) as stop:
            train(cfg)
        assert str(stop.value) == (f"stopped by SIGINT at step 4; checkpoint {tmp_path / name}/checkpoints/"
                                   f"preempted.ckpt; rerun the same command with run_name={name} resume=auto to continue")  # fmt: skip
        assert stop.value.exit_code == 130
        assert "Ctrl-C: finishing this step, then saving a checkpoint" in capsys.readouterr().err
        twice = compose_cfg([*RESUMABLE, "+callbacks.signal._target_=helpers.interrupt.SignalAt",
                             "+callbacks.signal.step=3", "+callbacks.signal.signal=SIGINT", "+callbacks.again._target_="
                             "helpers.interrupt.SignalAt", "+callbacks.again.step=3", "+callbacks.again.signal=SIGINT",
                             f"paths.output_dir={tmp_path / 'twice'}"])  # fmt: skip
        with pytest.raises(SystemExit):  # Lightning's KeyboardInterrupt shutdown
            train(twice)
        assert not (tmp_path / "twice" / "checkpoints" / "preempted.ckpt").exists()
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def test_progress_bar_counts_steps_of_max_steps_also_after_a_resume(compose_cfg, tmp_path, recwarn):
    from dgss.callbacks import StepProgressBar

    seen = []

    class Spy(StepProgressBar):
        def on_train_batch_end(self, trainer, *args):
            super().on_train_batch_end(trainer, *args)
            bar = self.train_progress_bar
            seen.append((int(bar.completed), bar.total, bar.description))

    run = [o for o in RESUMABLE if o != "~callbacks.progress_bar"] + [
        "callbacks.progress_bar._target_=" + __name__ + ".Spy"
    ]
    globals()["Spy"] = Spy
    crash_after(compose_cfg, run, 3)
    first = list(seen)
    seen.clear()
    train(compose_cfg(run))
    assert [c for c, *_ in first] == [1, 2, 3] and {t for _, t, _ in first} == {6}
    assert [c for c, *_ in seen] == [3, 4, 5, 6] and {t for _, t, _ in seen} == {
        6
    }  # from the checkpoint's step 2
    assert all("train (steps)" in d and "Epoch" not in d for *_, d in first + seen)
    assert not [
        w for w in recwarn if "not resumable" in str(w.message)
    ]  # Lightning's false alarm is filtered


@pytest.fixture
def toy_weights(tmp_path):
    import timm

    torch.manual_seed(0)
    m = timm.create_model("vit_small_patch14_reg4_dinov2", num_classes=0, img_size=(96, 192), patch_size=8, depth=4,
                          embed_dim=96, num_heads=3)  # fmt: skip
    path = tmp_path / "toy.pth"
    torch.save(m.state_dict(), path)
    return path


EMA_CB = "callbacks.ema={_target_: dgss.callbacks.EMA, momentum: 0.5, begin: 1}"
GROUP_RUNS = {
    "soma": [
        "method=soma",
        "method.soma.rank=2",
        "method.soma.start_block=1",
        "method.optimizer.lr=1e-2",
        EMA_CB,
    ],
    "fishertune": ["method=fishertune", EMA_CB],
}


@pytest.mark.parametrize(
    "method,during", [("soma", "train"), ("soma", "validation"), ("fishertune", "train")]
)
def test_a_group_signalled_run_with_loader_workers_saves_and_resumes_bit_identical(
    compose_cfg, tmp_path, toy_weights, method, during
):
    """Issue 25 (2, 3): SIGTERM to the whole process group (the main process and its two loader workers, as SLURM's
    preemption, scancel and timeout send it) killed the workers, and the run died with "DataLoader worker ... killed
    by signal" before any checkpoint; SIGTERM during training saved before EMA's update of that step, and during
    validation with the weights and the averages swapped. Now the workers ignore it, preempted.ckpt is written at
    the next safe point (step 4), and resume=auto ends with the straight run's weights and averages, bit for bit;
    FisherTune's averaged candidates are stored as their selected elements, not as whole tensors."""
    from dgss.preemption import Preempted

    # a sanity validation starts the evaluation workers before the fit installs its handlers, as a default run does
    run = [*RESUMABLE, "backbone=toy", f"backbone.weights={toy_weights}", "data.num_workers=2",
           "trainer.num_sanity_val_steps=1", *GROUP_RUNS[method]]  # fmt: skip
    train(compose_cfg([*run, f"paths.output_dir={tmp_path / 'straight'}"]))
    resumed = [*run, f"paths.output_dir={tmp_path / 'resumed'}"]
    with pytest.raises(Preempted) as stop:
        train(compose_cfg([*resumed, "+callbacks.signal._target_=helpers.interrupt.SignalAt", "+callbacks.signal.group=true",
                           f"+callbacks.signal.step={4 if during == 'validation' else 3}",
                           f"+callbacks.signal.during={during}"]))  # fmt: skip
    assert stop.value.step == 4 and stop.value.signame == "SIGTERM"
    saved = torch.load(stop.value.path, weights_only=True)
    assert saved["global_step"] == 4
    train(compose_cfg(resumed))
    a, b = (
        torch.load(tmp_path / r / "checkpoints" / "last.ckpt", weights_only=True)
        for r in ("straight", "resumed")
    )
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert not [
        k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])
    ]  # averages
    raw_a, raw_b = section(a, "weight_averaging")["raw"], section(b, "weight_averaging")["raw"]
    assert raw_a.keys() == raw_b.keys() and raw_a
    for k in raw_a:  # the weights the run goes on from
        assert torch.equal(
            *(r[k] if isinstance(r[k], torch.Tensor) else r[k]["value"] for r in (raw_a, raw_b))
        ), k
    if method == "fishertune":  # the raw weights cost what the selection costs: per tensor, only its selected
        # elements differ from the average; a tensor is stored sparse (those elements) unless a third of it differs,
        # then dense — so at most 3 x its selected elements
        delta = section(a, "fishertune")["delta"]
        stored = selected = 0
        for k, v in raw_a.items():
            if not k.startswith("backbone."):
                continue
            sel = (
                delta[k.removeprefix("backbone.model.")]["index"].numel()
                if k.removeprefix("backbone.model.") in delta
                else 0
            )
            n = v.numel() if isinstance(v, torch.Tensor) else v["value"].numel()
            assert n <= (3 * sel if isinstance(v, torch.Tensor) else sel), (k, n, sel)
            stored, selected = stored + n, selected + sel
        candidates = sum(v.numel() for k, v in torch.load(toy_weights).items() if k.startswith("blocks."))
        assert 0 < stored <= 3 * selected and selected < candidates / 4, (stored, selected, candidates)


def test_resuming_an_averaged_run_without_its_averaging_is_refused(
    compose_cfg, tmp_path, toy_weights, capsys
):
    """Issue 25 (3): an EMA checkpoint resumed with callbacks.ema off trained on from the averages as if they were
    the weights, silently."""
    from dgss.cli import run_cli

    run = [*RESUMABLE, "backbone=toy", f"backbone.weights={toy_weights}", *GROUP_RUNS["soma"][:-1]]
    crash_after(compose_cfg, [*run, EMA_CB], 3)
    for extra, why in [([], "without it"), (["callbacks.ema={_target_: dgss.callbacks.EMA, momentum: 0.1, begin: 1}"],
                                            "with other settings")]:  # fmt: skip
        capsys.readouterr()
        with pytest.raises(SystemExit):
            run_cli(train, compose_cfg([*run, *extra]), "dgss-train")
        err = capsys.readouterr().err.strip()
        assert (
            "was trained with weight averaging (callbacks.ema={_target_: dgss.callbacks.EMA, momentum: 0.5, "
            in err
        )
        assert f"{why} the run would go on from the wrong weights" in err and "\n" not in err, err
    assert train(compose_cfg([*run, EMA_CB]))  # with it, the run continues


# ------------------------------------------------------------------------------- one run per folder (issue 25, 5)
def test_a_run_folder_holds_one_run_at_a_time(compose_cfg, tmp_path, monkeypatch):
    """Two dgss-train run_name=X at once wrote into one folder, interleaved. Now the training process holds
    <run>/.lock (pid, host, SLURM job): a live holder is refused in one line naming it; a lock whose process is
    gone, or left by this SLURM job before its requeue, is taken over; the lock is gone after the run."""
    import json as json_module
    import socket

    from dgss.errors import ConfigError

    folder = tmp_path / "run"
    run = [*RESUMABLE, "trainer.max_steps=2", f"paths.output_dir={folder}"]
    folder.mkdir()
    lock = folder / ".lock"
    live = subprocess.Popen(["sleep", "60"])  # another process of this host, alive
    try:
        lock.write_text(json_module.dumps({"pid": live.pid, "host": socket.gethostname(), "slurm_job": None}))
        with pytest.raises(ConfigError, match=rf"the run folder .*run is in use by process {live.pid} on "
                           rf"{socket.gethostname()} since .*: one run per folder; use another run_name"):  # fmt: skip
            train(compose_cfg(run))
        assert not (folder / "checkpoints").exists() and lock.exists()
        lock.write_text(json_module.dumps({"pid": 1, "host": "node-b", "slurm_job": "77", "since": "x"}))
        with pytest.raises(
            ConfigError, match=rf"in use by process 1 on node-b, SLURM job 77 .*remove {lock}"
        ):
            train(compose_cfg(run))
    finally:
        live.kill()
        live.wait()
    lock.write_text(json_module.dumps({"pid": live.pid, "host": socket.gethostname()}))  # its process is gone
    with _logs_warning("taking over a stale lock (process"):
        train(compose_cfg(run))
    assert not lock.exists() and (folder / "checkpoints" / "last.ckpt").is_file()
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # a requeued job finds its own lock from before
    lock.write_text(json_module.dumps({"pid": 1, "host": "node-b", "slurm_job": "4242"}))
    train(compose_cfg([*run, "trainer.max_steps=2"]))
    assert not lock.exists()


class _logs_warning:
    """Asserts a dgss.train warning containing ``text`` is logged inside the block."""

    def __init__(self, text):
        self.text, self.records = text, []

    def __enter__(self):
        import logging

        self.handler = logging.Handler()
        self.handler.emit = self.records.append
        logging.getLogger("dgss.train").addHandler(self.handler)

    def __exit__(self, *exc):
        import logging

        logging.getLogger("dgss.train").removeHandler(self.handler)
        if exc[0] is None:
            assert any(self.text in r.getMessage() for r in self.records), [
                r.getMessage() for r in self.records
            ]


def test_a_finished_run_is_not_overwritten_without_overwrite_true(compose_cfg, tmp_path):
    """Re-running a run_name without resume=auto overwrote its checkpoints and metrics. Now refused in one line;
    overwrite=true starts over (the old results removed, none of them mixed into the new ones)."""
    from dgss.errors import ConfigError

    folder = tmp_path / "run"
    run = [a for a in RESUMABLE if a != "resume=auto"] + ["trainer.max_steps=2", f"paths.output_dir={folder}"]
    train(compose_cfg(run))
    first = (folder / "metrics.json").read_text()
    with pytest.raises(ConfigError, match=r"already holds a run \(checkpoints/last.ckpt, .*\): continue it with "
                       r"resume=auto, start it over with overwrite=true"):  # fmt: skip
        train(compose_cfg([*run, "seed=7"]))
    assert (folder / "metrics.json").read_text() == first
    (folder / "checkpoints" / "step000099.ckpt").write_bytes(b"an old file")
    train(compose_cfg([*run, "seed=7", "overwrite=true"]))
    assert not (folder / "checkpoints" / "step000099.ckpt").exists()
    assert (folder / "metrics.json").read_text() != first
    assert len(json.loads((folder / "metrics.json").read_text())) == 1


def test_a_validation_logged_after_the_last_checkpoint_is_kept_on_resume(compose_cfg, tmp_path):
    """Issue 25 (9): the periodic checkpoint of step 2 is written before that step's validation; a crash after
    the validation left metrics.json with it, and resume=auto rewrote metrics.json from the checkpoint, without
    it. Now the resumed run keeps it: metrics.json and iou.csv end as a straight run's."""
    run = [*RESUMABLE, "~callbacks.model_checkpoint"]  # only the checkpoints written before each validation
    train(compose_cfg([*run, f"paths.output_dir={tmp_path / 'straight'}"]))
    resumed = [*run, f"paths.output_dir={tmp_path / 'resumed'}"]
    crash_after(compose_cfg, resumed, 3)
    assert [h["step"] for h in json.loads((tmp_path / "resumed" / "metrics.json").read_text())] == [2]
    train(compose_cfg(resumed))
    a, b = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("straight", "resumed"))
    assert [h["step"] for h in b] == [2, 4, 6] and a == b
    assert (tmp_path / "straight" / "iou.csv").read_text() == (tmp_path / "resumed" / "iou.csv").read_text()


def test_a_merged_file_in_the_run_folder_is_skipped_and_refused_as_ckpt_path(compose_cfg, tmp_path, capsys):
    """Issue 25 (4, 7): `dgss-merge step.ckpt --out checkpoints/merged.ckpt` put a model-only file in the run
    folder; resume=auto picked it (the newest) and died with Lightning's KeyError, as ckpt_path=<it> did. Now
    resume=auto skips it with a warning and continues from the newest training checkpoint, and ckpt_path=<it> is
    one line saying what the file is for."""
    from dgss.cli import run_cli
    from dgss.errors import ConfigError
    from dgss.restore import merge

    folder = tmp_path / "run"
    run = [*RESUMABLE, f"paths.output_dir={folder}"]
    crash_after(compose_cfg, run, 3)
    merged = folder / "checkpoints" / "zz_merged.ckpt"
    last = (folder / "checkpoints" / "last.ckpt").read_bytes()
    with pytest.raises(ConfigError, match=r"last.ckpt' is a training checkpoint \(a run resumes from it\)"):
        merge(folder / "checkpoints" / "step000002.ckpt", folder / "checkpoints" / "last.ckpt")
    assert (folder / "checkpoints" / "last.ckpt").read_bytes() == last
    merge(folder / "checkpoints" / "step000002.ckpt", merged)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_cli(train, compose_cfg([*run, "resume=null", f"ckpt_path={merged}"]), "dgss-train")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "is a model-only file (a dgss-merge output): it evaluates" in err, err
    with pytest.warns(
        UserWarning, match=r"zz_merged.ckpt is a model-only file .*trying the previous checkpoint"
    ):
        train(compose_cfg(run))
    assert torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6


def test_a_process_with_live_loader_workers_exits_without_waiting_for_them(tmp_path):
    """The workers ignore SIGTERM (issue 25, 2); Python's exit handler terminates daemonic children with SIGTERM and
    waits for them, so a process leaving with live workers (an exception, a preemption) hung for ever. dgss kills
    them at exit instead."""
    script = tmp_path / "leave.py"
    script.write_text(
        "from torch.utils.data import DataLoader\n"
        "from dgss.data.workers import worker_init\n"
        "dl = DataLoader(list(range(64)), batch_size=2, num_workers=2, worker_init_fn=worker_init, "
        "persistent_workers=True)\n"
        "it = iter(dl)\nnext(it)\nraise SystemExit(3)\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert done.returncode == 3, done.stderr[-2000:]
