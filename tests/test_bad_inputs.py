"""Every file a user names is hostile until checked: for each file argument of each command and script, a missing,
empty, truncated, random-bytes, wrong-kind or code-carrying (pickle payload) file gives one line that names the file
and says what to do, a non-zero exit, no traceback, no code run and nothing written over."""

import os
import pathlib
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from dgss import merge
from dgss.cli import check_argv, run_cli
from dgss.errors import ConfigError
from dgss.eval import evaluate
from dgss.predict import predict
from dgss.train import train

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))
import convert_datasets  # noqa: E402
import convert_weights  # noqa: E402

TINY = dict(depth=4, embed_dim=96, num_heads=3, patch_size=8)  # conf/backbone/toy.yaml
DATA = ["data=synthetic", "synthetic.height=32", "synthetic.width=64", "synthetic.train_length=4",
        "synthetic.val_length=1", "data.batch_size=2", "data.val_batch_size=1", "data.num_workers=0"]  # fmt: skip
RUN = ["trainer=cpu", "trainer.max_steps=1", "trainer.val_check_interval=1", "trainer.num_sanity_val_steps=0", "~logger", "callbacks=default",
       "~callbacks.progress_bar", "~callbacks.media"]  # fmt: skip
FIX_WORDS = ("copy it again", "point", "download", "re-save", "fix", "set ", "remove", "convert", "use ", "pass ",
             "unpack")  # fmt: skip


class Payload:
    """Unpickling this touches a marker file: a stand-in for code a crafted checkpoint would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A weights file of the tiny backbone, a frozen-backbone checkpoint trained from it, an image."""
    root = tmp_path_factory.mktemp("made")
    torch.manual_seed(0)
    weights = root / "tiny.pth"
    torch.save(timm.create_model("vit_small_patch14_reg4_dinov2", num_classes=0, img_size=(96, 192), **TINY)
               .state_dict(), weights)  # fmt: skip
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module("dgss.conf", version_base="1.3"):
        cfg = compose("train", [*DATA, *RUN, "backbone=toy", f"backbone.weights={weights}", "method=frozen",
                                f"paths.output_dir={root / 'run'}"])  # fmt: skip
    train(cfg)
    image = root / "street.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 64, 3), dtype=np.uint8)).save(image)
    return {
        "weights": weights,
        "ckpt": root / "run" / "checkpoints" / "last.ckpt",
        "image": image,
        "root": root,
    }


def hostile(kind: str, good: Path, wrong: Path, where: Path, suffix: str) -> Path:
    """A file of ``kind`` under ``where``: missing, empty, the first half of ``good``, random bytes, ``wrong`` (a
    valid file of another kind), or a pickle payload."""
    f = where / f"input{suffix}"
    if kind == "empty":
        f.write_bytes(b"")
    elif kind == "truncated":
        data = good.read_bytes()
        f.write_bytes(data[: len(data) // 2])
    elif kind == "random":
        f.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "wrong_kind":
        f.write_bytes(wrong.read_bytes())
    elif kind == "payload":
        torch.save({"state_dict": {"w": torch.ones(1)}, "extra": Payload(where / "MARKER")}, f)
    return f


def one_line(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


KINDS = ["missing", "empty", "truncated", "random", "wrong_kind", "payload"]
CKPT_USERS = [
    "dgss-train ckpt_path",
    "dgss-eval ckpt_path",
    "dgss-predict ckpt_path",
    "dgss-merge ckpt",
]
WEIGHT_USERS = ["dgss-train backbone.weights", "dgss-eval backbone_weights", "dgss-predict backbone_weights",
                "dgss-merge --backbone-weights", "convert_weights.py src"]  # fmt: skip


def run_command(name: str, f: Path, made: dict, tmp: Path, compose_cfg) -> tuple[int, Path | None]:
    """Run command ``name`` with ``f`` as its file argument; returns (exit code, the output it must not touch)."""
    out = tmp / "out.ckpt"
    out.write_bytes(b"the user's earlier file")
    if name == "dgss-train ckpt_path":
        cfg = compose_cfg([*DATA, *RUN, "backbone=toy", f"backbone.weights={made['weights']}", "method=frozen",
                           f"ckpt_path={f}"])  # fmt: skip
        return cli(train, cfg, "dgss-train"), None
    if name == "dgss-train backbone.weights":
        return cli(
            train, compose_cfg([*DATA, *RUN, "backbone=toy", f"backbone.weights={f}"]), "dgss-train"
        ), None
    if name == "dgss-eval ckpt_path":
        return cli(
            evaluate, compose_cfg(["trainer=cpu", f"ckpt_path={f}"], config_name="eval"), "dgss-eval"
        ), None
    if name == "dgss-eval backbone_weights":
        cfg = compose_cfg(
            ["trainer=cpu", f"ckpt_path={made['ckpt']}", f"backbone_weights={f}"], config_name="eval"
        )
        return cli(evaluate, cfg, "dgss-eval"), None
    if name.startswith("dgss-predict"):
        images = tmp / "images"
        images.mkdir(exist_ok=True)
        Image.open(made["image"]).save(images / "a.png")
        arg = f"ckpt_path={f}" if name.endswith("ckpt_path") else f"backbone_weights={f}"
        ckpt = [] if name.endswith("ckpt_path") else [f"ckpt_path={made['ckpt']}"]
        cfg = compose_cfg([*ckpt, arg, f"input={images}", f"output={tmp / 'pred'}", "progress=false", "device=cpu"],
                          config_name="predict")  # fmt: skip
        return cli(predict, cfg, "dgss-predict"), None
    if name == "dgss-predict image":
        return None, None
    if name == "dgss-merge ckpt":
        return merge.main([str(f), "--out", str(out)]), out
    if name == "dgss-merge --backbone-weights":
        return merge.main([str(made["ckpt"]), "--backbone-weights", str(f), "--out", str(out)]), out
    if name == "convert_weights.py src":
        return convert_weights.main(["dinov2", str(f), "--out", str(out), "--model", "vit_small_patch14_dinov2",
                                     "--img-size", "64"]), out  # fmt: skip
    raise AssertionError(name)


def cli(task, cfg, prog) -> int:
    with pytest.raises(SystemExit) as e:
        run_cli(task, cfg, prog)
    return e.value.code


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("command", CKPT_USERS + WEIGHT_USERS)
def test_checkpoint_and_weights_arguments(command, kind, made, tmp_path, compose_cfg, capsys):
    ckpt_arg = command in CKPT_USERS
    good = made["ckpt"] if ckpt_arg else made["weights"]
    wrong = made["image"]  # an image where a checkpoint or weights file belongs
    f = hostile(kind, good, wrong, tmp_path, ".ckpt" if ckpt_arg else ".pth")
    capsys.readouterr()
    code, out = run_command(command, f, made, tmp_path, compose_cfg)
    line = one_line(capsys)
    assert code not in (0, None), line
    assert str(f) in line or f.name in line, line
    assert any(w in line for w in FIX_WORDS), line
    assert not (tmp_path / "MARKER").exists()  # the payload never ran
    if out is not None:
        assert out.read_bytes() == b"the user's earlier file"  # nothing written over
    if kind == "payload":
        assert "could run code" in line


@pytest.mark.parametrize("kind", ["empty", "truncated", "random", "wrong_kind"])
def test_predict_images(kind, made, tmp_path, compose_cfg, capsys):
    images = tmp_path / "images"
    images.mkdir()
    (tmp_path / "notes.txt").write_text("not an image\n")
    f = hostile(kind, made["image"], tmp_path / "notes.txt", images, ".png")
    cfg = compose_cfg([f"ckpt_path={made['ckpt']}", f"input={images}", f"output={tmp_path / 'pred'}",
                       "progress=false", "device=cpu"], config_name="predict")  # fmt: skip
    capsys.readouterr()
    code = cli(predict, cfg, "dgss-predict")
    line = one_line(capsys)
    assert code == 2 and str(f) in line and "remove it from input=" in line, line
    assert not (tmp_path / "pred" / "masks" / "input.png").exists()


@pytest.mark.parametrize("kind", ["missing", "empty_folder", "a_file", "truncated_label", "random_image"])
def test_data_roots_images_and_labels(kind, made, tmp_path, compose_cfg, capsys):
    root = tmp_path / "data"
    if kind == "empty_folder":
        root.mkdir()
    elif kind == "a_file":
        root.write_bytes(b"x")
    elif kind in ("truncated_label", "random_image"):
        from test_real_data import FIXTURES, _write_pair

        for key in (("cityscapes", "val"), ("bdd100k", "val"), ("mapillary", "val")):
            _write_pair(root, *FIXTURES[key], size=(64, 32))
        bad = root / (
            FIXTURES[("bdd100k", "val")][1]
            if kind == "truncated_label"
            else FIXTURES[("cityscapes", "val")][0]
        )
        data = bad.read_bytes()
        bad.write_bytes(data[: len(data) // 2] if kind == "truncated_label" else os.urandom(len(data)))
    cfg = compose_cfg(["trainer=cpu", f"ckpt_path={made['ckpt']}", "data=gta2cbm", f"paths.data_dir={root}",
                       "data.num_workers=0"], config_name="eval")  # fmt: skip
    capsys.readouterr()
    code = cli(evaluate, cfg, "dgss-eval")
    line = one_line(capsys)
    assert code == 2, line
    if kind in ("truncated_label", "random_image"):
        assert str(bad) in line and "on_bad: skip" in line, line
    else:
        assert str(root) in line and ("DGSS_DATA_ROOT" in line or "expected" in line), line


@pytest.mark.parametrize("kind", ["missing", "empty_folder", "a_file"])
def test_convert_datasets_check_root(kind, tmp_path, capsys):
    root = tmp_path / "data"
    if kind == "empty_folder":
        root.mkdir()
    elif kind == "a_file":
        root.write_bytes(b"x")
    assert convert_datasets.main(["check", "--root", str(root)]) == 2
    line = one_line(capsys)
    assert str(root) in line and ("DGSS_DATA_ROOT" in line or "expected one of" in line), line


@pytest.mark.parametrize("kind", ["missing_dir", "random", "truncated", "wrong_kind", "no_such_choice"])
def test_user_config_files(kind, tmp_path):
    conf = tmp_path / "my_conf"
    f = conf / "experiment" / "mine.yaml"
    if kind != "missing_dir":
        f.parent.mkdir(parents=True)
    if kind == "random":
        f.write_bytes(np.random.default_rng(2).integers(128, 256, 300, dtype=np.uint8).tobytes())
    elif kind == "truncated":
        f.write_text("# @package _global_\ndefaults:\n  - /experiment/demo\n  - override /method: [frozen\n")
    elif kind == "wrong_kind":
        f.write_text("- a list\n- not a mapping\n")
    argv = ["--config-dir", str(conf), "experiment=mine" if kind != "no_such_choice" else "experiment=mien"]
    with pytest.raises(ConfigError) as e:
        check_argv(argv)
    msg = str(e.value)
    assert "\n" not in msg
    if kind == "missing_dir":
        assert (
            msg == f"--config-dir {conf} is not a folder; point it at the folder holding your config groups"
        )
    elif kind == "no_such_choice":
        assert msg.startswith("experiment=mien: no such config in experiment/; choose one of")
    else:
        assert msg.startswith(str(f)) and msg.endswith(("fix it", "fix or remove it")), msg
    check_argv(
        [
            "method=rein",
            "experiment=gta2cbm/rein_dinov2_l",
            "-m",
            "method=full,frozen",
            "hydra/launcher=slurm",
        ]
    )


def test_resume_auto_skips_a_payload_checkpoint_without_running_it(made, tmp_path, compose_cfg):
    """The resume=auto probe read every checkpoint of the run folder with weights_only=False: a crafted file
    dropped there ran its payload. Now it is skipped (with a warning) like any unreadable file."""
    folder = tmp_path / "run"
    cfg = [*DATA, *RUN, "backbone=toy", f"backbone.weights={made['weights']}", "method=frozen", "resume=auto",
           f"paths.output_dir={folder}", "trainer.max_steps=2"]  # fmt: skip
    with pytest.raises(RuntimeError, match="crash after step 1"):
        train(
            compose_cfg([*cfg, "+callbacks.crash._target_=resume_helpers.CrashAt", "+callbacks.crash.step=1"])
        )
    torch.save({"state_dict": {}, "x": Payload(tmp_path / "MARKER")}, folder / "checkpoints" / "zzz.ckpt")
    with pytest.warns(
        UserWarning, match=r"zzz.ckpt is unreadable \(it holds Python objects .*could run code"
    ):
        train(compose_cfg(cfg))
    assert not (tmp_path / "MARKER").exists()
    assert torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


# ------------------------------------------------------------------ a checkpoint's stored config runs nothing
def crafted(made: dict, tmp: Path, section: str) -> Path:
    """``made['ckpt']`` (a real, weights_only-loadable checkpoint) whose stored config calls ``os.makedirs(MARKER)``
    from ``section`` (a dotted path into dgss_config), as a crafted download would."""
    ckpt = torch.load(made["ckpt"], weights_only=True)
    node = ckpt["dgss_config"]
    *parents, last = section.split(".")
    for p in parents:
        node = node[p]
    call = {"_target_": "os.makedirs", "name": str(tmp / "MARKER")}
    if last == "_target_":  # the section's own class replaced
        node.clear()
        node.update(call)
    else:
        node[last] = call
    f = tmp / "crafted.ckpt"
    torch.save(ckpt, f)
    torch.load(f, weights_only=True)  # passes torch's own safety check
    return f


@pytest.mark.parametrize("section", ["backbone._target_", "head._target_", "method._target_", "method.optimizer",
                                     "data.targets.photo", "data._target_"])  # fmt: skip
@pytest.mark.parametrize("command", CKPT_USERS)
def test_a_checkpoint_whose_config_names_any_callable_is_refused_with_nothing_called(
    command, section, made, tmp_path, compose_cfg, capsys
):
    """Issue 25 (1): a file that passes weights_only=True carried dgss_config with a _target_, and dgss-eval,
    dgss-predict and dgss-merge instantiated it. Now every command that loads a checkpoint refuses it in one line."""
    f = crafted(made, tmp_path, section)
    capsys.readouterr()
    code, out = run_command(command, f, made, tmp_path, compose_cfg)
    line = one_line(capsys)
    assert code == 2, line
    assert not (tmp_path / "MARKER").exists()  # nothing was called
    assert "'os.makedirs' is not a dgss" in line and "refused without calling it" in line, line
    assert str(f) in line
    if out is not None:
        assert out.read_bytes() == b"the user's earlier file"


def test_a_stored_interpolation_or_object_is_refused_and_a_config_dir_class_is_trusted(made, tmp_path):
    from dgss.trust import allowed_targets, check_stored_config

    cfg = torch.load(made["ckpt"], weights_only=True)["dgss_config"]
    check_stored_config(cfg, "ckpt")  # dgss's own checkpoint passes
    bad = {**cfg, "head": {**cfg["head"], "channels": "${oc.env:HOME}"}}
    with pytest.raises(
        ConfigError, match=r"dgss_config.head.channels='\$\{oc.env:HOME\}' is an interpolation"
    ):
        check_stored_config(bad, "ckpt")
    with pytest.raises(ConfigError, match="lacks the method config"):
        check_stored_config({k: v for k, v in cfg.items() if k != "method"}, "ckpt")
    mine = {**cfg, "data": {**cfg["data"], "targets": {"mine": {"_target_": "mypkg.MyData", "root": "x"}}}}
    with pytest.raises(ConfigError, match="'mypkg.MyData' is not a dgss data class"):
        check_stored_config(mine, "ckpt")
    conf = tmp_path / "conf" / "data"
    conf.mkdir(parents=True)
    (conf / "mine.yaml").write_text("targets:\n  mine: {_target_: mypkg.MyData, root: x}\n")
    assert "mypkg.MyData" in allowed_targets("data", [tmp_path / "conf"])
    check_stored_config(mine, "ckpt", [tmp_path / "conf"])  # the user pointed at the config naming it
    assert "mypkg.MyData" not in allowed_targets("head", [tmp_path / "conf"])  # per section


def test_hydra_experimental_rerun_is_refused():
    """--experimental-rerun unpickles the file it names (code runs): refused before Hydra sees it."""
    with pytest.raises(ConfigError, match="--experimental-rerun is refused: it unpickles"):
        check_argv(["--experimental-rerun", "outputs/x/.hydra/config.pickle"])
