"""Issue 30's console leftovers: ``~callbacks.progress_bar`` turns progress display off (not Lightning's epoch bar),
dgss-eval as quiet as dgss-train, ``--cfg job`` checks the config before printing it, and bench_gpu's smoke run
has no time budget and a work folder of its own."""

import math
import sys
import warnings

import hydra
import lightning.pytorch as pl
import pytest
from helpers.runs import DATA, RUN, backbone_args
from helpers.scripts import load_script

from dgss.compat import StepProgressBar
from dgss.config import instantiate_group
from dgss.eval import evaluate
from dgss.train import main as train_main
from dgss.train import progress_display, train


@pytest.mark.parametrize("drop", [True, False])
def test_removing_the_step_bar_turns_progress_display_off(compose_cfg, drop):
    cfg = compose_cfg(
        [*DATA, "trainer=cpu", "callbacks=default", *(["~callbacks.progress_bar"] if drop else [])]
    )
    callbacks = instantiate_group(cfg.callbacks)
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=False,
                                      **progress_display(callbacks, cfg.trainer))  # fmt: skip
    if drop:
        assert trainer.progress_bar_callback is None  # not Lightning's TQDM bar counting epochs
    else:
        assert isinstance(trainer.progress_bar_callback, StepProgressBar)
    keep = compose_cfg([*DATA, "trainer=cpu", "~callbacks.progress_bar", "trainer.enable_progress_bar=true"])
    assert progress_display([], keep.trainer) == {}  # asked for explicitly: Lightning's own bar


def test_dgss_eval_shows_none_of_lightnings_false_warnings(compose_cfg, tmp_path, weights, monkeypatch):  # noqa: F811
    """Lightning 2.6 warns about a torch-deprecated pytree call from inside its loops (once per process, so here the
    loop is made to warn it, as it does in a fresh dgss-eval): dgss-eval filters it as dgss-train does."""
    train(compose_cfg([*DATA, *RUN, *backbone_args(weights), "method=frozen"]))
    validate = pl.Trainer.validate

    def warning_validate(self, *args, **kwargs):
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)`",
                      FutureWarning, stacklevel=2)  # fmt: skip
        warnings.warn("an unrelated warning", UserWarning, stacklevel=2)
        return validate(self, *args, **kwargs)

    monkeypatch.setattr(pl.Trainer, "validate", warning_validate)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        evaluate(compose_cfg([f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}", "trainer=cpu", "~logger"],
                             config_name="eval"))  # fmt: skip
    texts = [str(w.message) for w in seen]
    assert "an unrelated warning" in texts  # only the false ones are filtered
    assert not [t for t in texts if "LeafSpec" in t], texts


def test_cfg_job_checks_the_config_before_printing_it(capsys, monkeypatch):
    monkeypatch.setattr(
        sys,
        "argv",
        ["dgss-train", "experiment=demo", "+method.fishertune.selection.scopee=global", "--cfg", "job"],
    )
    with pytest.raises(SystemExit) as e:
        train_main()
    assert e.value.code == 2
    err = capsys.readouterr()
    assert (
        err.err.strip()
        == "dgss-train: error: method.fishertune.selection has no option 'scopee'; valid: granularity, scope, exclude"
    )
    assert "selection" not in err.out  # nothing printed as if it were a valid config
    monkeypatch.setattr(
        sys,
        "argv",
        ["dgss-train", "experiment=demo", "method.fishertune.selection.scope=per_block", "--cfg", "job"],
    )
    train_main()  # a valid one prints
    assert "scope: per_block" in capsys.readouterr().out


def test_bench_gpu_smoke_has_no_budget_and_its_own_work_folder(tmp_path):
    bench = load_script("bench_gpu")
    a, b = (bench.parse([str(tmp_path), "--device", "cpu", "--tiny"]) for _ in range(2))
    assert math.isinf(a.budget_s) and a.work_dir != b.work_dir and not a.keep_work
    assert "dgss_bench_gpu_" in a.work_dir.name and str(a.work_dir) != "/tmp/dgss_bench_gpu"
    assert bench.parse([str(tmp_path)]).budget_s == 450.0  # the GPU run keeps its device budget
    assert bench.parse([str(tmp_path), "--tiny", "--budget-s", "9"]).budget_s == 9.0
    for x in (a, b):
        x.work_dir.rmdir()
