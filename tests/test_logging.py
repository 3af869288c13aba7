"""wandb (offline) receives per-domain mIoU, the per-class table, the parameter summary and overlays."""

import json
import os

import pytest

from dgss.train import train

TINY = [
    "debug=tiny",
    "trainer.max_steps=2",
    "synthetic.val_length=2",
    "callbacks=default",
    "~callbacks.progress_bar",
]


@pytest.mark.slow
def test_wandb_offline_run_has_metrics_table_summary_and_images(compose_cfg, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose_cfg([*TINY, "logger=many"])
    try:
        train(cfg)
    finally:
        import wandb

        wandb.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files = runs[0] / "files"
    # offline history / config live in the run's protobuf log (wandb 0.31 has no Python reader): keys are UTF-8
    records = next(runs[0].glob("run-*.wandb")).read_bytes()
    for key in ("val/game/mIoU", "val/photo/mIoU", "val/night/mIoU", "val/mean_mIoU", "train/loss",
                "params/trainable", "params/trainable_pct", "params/total"):  # fmt: skip
        assert key.encode() in records, key
    table = json.loads(next(files.rglob("per_class_iou*.table.json")).read_text())
    assert (
        table["columns"] == ["class", "game", "photo", "overcast", "fog", "night"]
        and len(table["data"]) == 19
    )
    media = [str(p.relative_to(files)) for p in files.rglob("*") if p.is_file()]
    assert any("per_class_iou" in m and m.endswith(".table.json") for m in media), media
    for domain in ("game", "photo", "overcast", "fog", "night"):
        assert any(f"val/{domain}/examples" in m and m.endswith(".png") for m in media), domain
    assert any(
        "mask" in m and m.endswith(".png") for m in media
    )  # segmentation masks travelled with the images
    assert (tmp_path / "tensorboard").exists() and (tmp_path / "csv" / "metrics.csv").exists()
    assert os.environ["WANDB_MODE"] == "offline"


@pytest.mark.slow
def test_fishertune_selection_reaches_wandb_as_table_plot_and_series(compose_cfg, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    schedule = ["method=fishertune", "method.fishertune.schedule.warmup_iters=1", "method.fishertune.schedule.growth_end=1",
                "method.fishertune.schedule.refresh_every=1", "method.fishertune.fisher.window=1"]  # fmt: skip
    cfg = compose_cfg([*TINY, "logger=wandb", *schedule])
    try:
        train(cfg)
    finally:
        import wandb

        wandb.finish()
    run = next((tmp_path / "wandb").glob("offline-run-*"))
    records = next(run.glob("run-*.wandb")).read_bytes()
    for key in (
        "fishertune/selected_fraction",
        "fishertune/kind/q",
        "fishertune/kind/fc1",
        "fishertune/block/0",
    ):
        assert key.encode() in records, key
    tables = [p.name for p in (run / "files").rglob("*.table.json")]
    assert any(n.startswith("selection_") for n in tables) and any(
        n.startswith("kind_share") for n in tables
    ), tables
    rows = (tmp_path / "fishertune_selection.csv").read_text().splitlines()
    assert rows[0] == "step,block,kind,selected,share" and {r.split(",")[0] for r in rows[1:]} == {"1"}


def test_trains_without_wandb_installed_and_logger_wandb_says_so_in_one_line(
    compose_cfg, tmp_path, monkeypatch
):
    """A GPU image without wandb: the default callbacks (wandb media, IoU tables) and the CSV / TensorBoard loggers
    work; ``logger=wandb`` (or ``many``) stops before anything is written, naming the package and the choices."""
    import sys

    from dgss.cli import run_cli
    from dgss.errors import ConfigError

    # `import wandb` raises ImportError, find_spec finds nothing
    monkeypatch.setitem(sys.modules, "wandb", None)
    metrics = train(compose_cfg([*TINY, "logger=tensorboard"]))
    assert metrics["val/mean_mIoU"] >= 0 and (tmp_path / "metrics.json").is_file()
    assert not (tmp_path / "wandb_run_id").exists() and not (tmp_path / "wandb").exists()
    out = tmp_path / "many"
    cfg = compose_cfg([*TINY, "logger=many", f"paths.output_dir={out}"])
    with pytest.raises(ConfigError, match=r"^logger\.wandb needs the wandb package, which is not installed: pip "
                       r"install wandb, or log with logger=csv or logger=tensorboard$"):  # fmt: skip
        train(cfg)
    assert not out.exists()  # refused before the run folder got anything
    # the CLI wrapper's one line and exit code (its finally survives no wandb)
    with pytest.raises(SystemExit) as e:
        run_cli(train, cfg, "dgss-train")
    assert e.value.code == 2


def test_a_demo_run_prints_no_warning_and_logs_its_summary_and_tables(compose_cfg, tmp_path, capfd, caplog):
    """make demo's run, shortened: no Python warning, no Lightning tip on the console; the parameter summary and
    the IoU tables go through the dgss logger (Hydra writes it to <task>.log)."""
    import logging
    import re
    import warnings

    run = ["experiment=demo", "backbone.weights=null", "synthetic.train_length=8", "synthetic.val_length=2", "trainer.max_steps=4",
           "trainer.val_check_interval=4", "logger=csv", "~callbacks.progress_bar", "method.fishertune.schedule.warmup_iters=1",
           "method.fishertune.schedule.growth_tau=1", "method.fishertune.schedule.growth_end=3", "method.fishertune.schedule.refresh_every=1",
           "method.fishertune.fisher.window=1", "method.scheduler.warmup_steps=1", "trainer.log_every_n_steps=1"]  # fmt: skip
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO, logger="dgss"):
        warnings.simplefilter("always")
        train(compose_cfg(run))
    assert [str(w.message)[:100] for w in caught] == [], [w.filename for w in caught]
    out, err = capfd.readouterr()
    assert "Tip:" not in out + err and "anonymous" not in out + err
    assert re.search(r"FisherTune: [\d,]+ parameters, [\d,]+ trainable \([\d.]+%\)", caplog.text)
    assert "val IoU (%) at step 4" in caplog.text and "mean over targets" in caplog.text
