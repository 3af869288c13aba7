"""The console scripts as a user runs them (subprocesses: ~10 s of imports each, so few of them)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.limits import HANG_GUARD_S

BIN = Path(sys.executable).parent
TINY = ["debug=tiny", "trainer.max_steps=2", "synthetic.val_length=2", "logger=csv"]


def run(args, cwd, prog="dgss-train", timeout=HANG_GUARD_S):
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [str(BIN / prog), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_user_experiment_from_any_directory_then_eval(tmp_path):
    mine = tmp_path / "my_conf" / "experiment"
    mine.mkdir(parents=True)
    (mine / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - /experiment/demo\n  - override /method: frozen\n"
    )
    run_dir = tmp_path / "run"
    r = run(["--config-dir", "my_conf", "experiment=mine", *TINY, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "FrozenBackbone" in r.stdout + r.stderr  # the user's delta over the packaged demo applied
    hist = json.loads((run_dir / "metrics.json").read_text())
    assert hist[-1]["step"] == 2 and set(hist[-1]["domains"]) == {"game", "photo", "overcast", "fog", "night"}
    photo = hist[-1]["domains"]["photo"]
    assert photo["test_size"] == "native" and photo["inference"]["mode"] == "whole" and photo["images"] > 0
    assert "mIoU" in (run_dir / "iou.csv").read_text() and (run_dir / "csv" / "metrics.csv").exists()
    assert "game *" in r.stdout  # the console table marks the source as not in the mean
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    e = run(
        [f"ckpt_path={ckpt}", "trainer=cpu", f"hydra.run.dir={tmp_path / 'eval'}"],
        cwd=tmp_path,
        prog="dgss-eval",
    )
    assert e.returncode == 0, e.stderr[-3000:]
    ev = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert ev[-1]["mean_mIoU"] == pytest.approx(hist[-1]["mean_mIoU"], abs=1e-6)


def test_bad_input_is_one_line(tmp_path):
    r = run(
        ["debug=tiny", "backbone.name=vit_larg_patch14_dinov2", f"hydra.run.dir={tmp_path}"], cwd=tmp_path
    )
    assert r.returncode == 2
    err = [ln for ln in r.stderr.splitlines() if ln.strip() and "Warning" not in ln and "warn" not in ln]
    assert len(err) == 1 and err[0].startswith(
        "dgss-train: error: backbone.name='vit_larg_patch14_dinov2'"
    ), r.stderr
    assert "did you mean vit_large_patch14_dinov2" in err[0] and "Traceback" not in r.stderr


def test_multirun_over_methods(tmp_path):
    r = run(["-m", "method=full,frozen", *TINY, f"hydra.sweep.dir={tmp_path}/sweep"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    for job in ("0", "1"):
        assert (tmp_path / "sweep" / job / "metrics.json").exists()


def test_a_sweep_job_with_a_config_error_does_not_end_the_sweep(tmp_path):
    """Issue 25 (6): a job's one-line error (exit 2 inside the job) ended the whole sweep. Now it is that job's
    line, the other jobs run, and the command exits 1 naming the failed jobs."""
    r = run(["-m", "data.num_workers=-1,0", *TINY, f"hydra.sweep.dir={tmp_path}/sweep"], cwd=tmp_path)
    assert r.returncode == 1, r.stderr[-3000:]
    assert (
        "dgss-train: error in sweep job 0 (data.num_workers=-1 " in r.stderr and "Traceback" not in r.stderr
    )
    assert "data.num_workers=-1 must be >= 0; the sweep goes on" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("dgss-train: 1 sweep job(s) failed: job 0 (")
    assert (tmp_path / "sweep" / "1" / "metrics.json").exists()


@pytest.mark.slow
def test_optuna_study_optimizes_mean_miou(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    db = tmp_path / "study.db"
    r = run(["hparams_search=optuna", *TINY, "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=2",
             f"hydra.sweeper.storage=sqlite:///{db}", f"hydra.sweep.dir={tmp_path}/sweep"], cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    result = (tmp_path / "sweep" / "optimization_results.yaml").read_text()
    assert "best_params" in result and "method.optimizer.lr" in result and db.exists()
    # a second invocation with the same storage continues the study: its trials are added to the first two
    r = run(["hparams_search=optuna", *TINY, "hydra.sweeper.n_trials=1", f"hydra.sweeper.storage=sqlite:///{db}",
             f"hydra.sweep.dir={tmp_path}/sweep2"], cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    import optuna

    study = optuna.load_study(study_name="dgss", storage=f"sqlite:///{db}")
    assert len(study.trials) == 3 and all(t.value is not None for t in study.trials)
    # issue 25 (6, 10): a trial's config error stopped the study and left the trial RUNNING in its storage; now it
    # is recorded as failed and the next trial runs
    db = tmp_path / "failing.db"
    r = run(["hparams_search=optuna", *TINY, "hydra.sweeper.sampler.seed=2", "hydra.sweeper.n_trials=2",
             "head.channels=choice(0,8)", f"hydra.sweeper.storage=sqlite:///{db}",
             f"hydra.sweep.dir={tmp_path}/sweep3"], cwd=tmp_path)  # fmt: skip
    assert r.returncode == 1 and "head.channels=0 must be >= 1; the sweep goes on" in r.stderr, r.stderr[
        -3000:
    ]
    study = optuna.load_study(study_name="dgss", storage=f"sqlite:///{db}")
    states = {(t.params["head.channels"], t.state.name) for t in study.trials}  # (seed 2 draws 0 first)
    assert len(study.trials) == 2 and (0, "FAIL") in states and states <= {(0, "FAIL"), (8, "COMPLETE")}


@pytest.mark.slow
def test_wheel_ships_the_configs(tmp_path):
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(root)],
                       capture_output=True, text=True, timeout=HANG_GUARD_S)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    import zipfile

    names = zipfile.ZipFile(next(tmp_path.glob("dgss-*.whl"))).namelist()
    for f in ("dgss/conf/__init__.py", "dgss/conf/train.yaml", "dgss/conf/eval.yaml", "dgss/conf/method/_common.yaml",
              "dgss/conf/experiment/demo.yaml", "dgss/conf/backbone/dinov2_l.yaml", "dgss/conf/hydra/launcher/slurm.yaml"):  # fmt: skip
        assert f in names, f


@pytest.mark.slow
def test_two_point_sweep_through_the_submitit_local_launcher(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    r = run(["-m", "hydra/launcher=submitit_local", "method=full,frozen", *TINY, f"hydra.sweep.dir={tmp_path}/sweep",
             "hydra.launcher.timeout_min=10"], cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    for job in ("0", "1"):  # one job (its own process) per sweep point
        hist = json.loads((tmp_path / "sweep" / job / "metrics.json").read_text())
        assert hist[-1]["step"] == 2
    assert list((tmp_path / "sweep" / ".submitit").iterdir())
