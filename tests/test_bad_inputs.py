"""Every file a user names is hostile until checked: for each file argument of each command and script, a missing,
empty, truncated, random-bytes, wrong-kind or code-carrying (pickle payload) file gives one line that names the file
and says what to do, a non-zero exit, no traceback, no code run and nothing written over."""

import os
import pathlib
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import dgss.convert_weights as convert_weights
from dgss import convert as convert_datasets
from dgss import merge
from dgss.cli import check_argv, run_cli
from dgss.errors import ConfigError
from dgss.eval import evaluate
from dgss.predict import predict
from dgss.train import train

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
    elif kind == "fifo":  # reading it would block for ever
        os.mkfifo(f)
    elif (
        kind == "zip_bomb"
    ):  # a few hundred KB declaring 200 MB, in a deflated record torch.load would inflate
        import zipfile

        with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("archive/data.pkl", b"\0" * (200 << 20))
    elif kind == "int64":  # the right names and shapes, integer values (a dump of the wrong thing)
        state = torch.load(good, weights_only=True)
        state = state.get("state_dict", state)
        torch.save({k: v.to(torch.int64) for k, v in state.items()}, f)
    return f


def one_line(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


KINDS = ["missing", "empty", "truncated", "random", "wrong_kind", "payload", "fifo", "zip_bomb", "int64"]
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
    if kind == "int64" and ckpt_arg:
        pytest.skip("a checkpoint's tensors are checked against the method it builds (test_checkpoint_eval)")
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
    # issue 25 (10): each command names the file as it takes it (dgss-eval's is backbone_weights=, not backbone.weights=)
    option = {"dgss-eval backbone_weights": "backbone_weights=", "dgss-predict backbone_weights": "backbone_weights=",
              "dgss-merge --backbone-weights": "--backbone-weights=", "dgss-train backbone.weights": "backbone.weights="}  # fmt: skip
    if command in option:
        assert f"{option[command]}{str(f)!r}" in line, line
    expected = {
        "fifo": "not a regular file",
        "zip_bomb": "declares 209715200 bytes of records in a",
        "int64": "not floating point",
    }
    if kind in expected:  # (FIFO: "a folder" before; zip: 4 GB allocated first; int64: loaded silently)
        assert expected[kind] in line, line


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
        from helpers.real_data import FIXTURES, write_pair

        for key in (("cityscapes", "val"), ("bdd100k", "val"), ("mapillary", "val")):
            write_pair(root, *FIXTURES[key], size=(64, 32))
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
            compose_cfg(
                [*cfg, "+callbacks.crash._target_=helpers.interrupt.CrashAt", "+callbacks.crash.step=1"]
            )
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


# ------------------------------------------------------------------ an output never destroys an input (issue 25)
READ_ONLY = Path("/proc/1/dgss-out")  # a folder no process may create files in (as root too)
OUT_CASES = ["the_input", "a_link_to_the_input", "a_folder", "under_a_file", "read_only"]
FILE_WRITERS = ["dgss-merge --out", "dgss-merge --backbone-out", "convert_weights.py --out"]
OUT_WORDS = {
    "the_input": r"is (the checkpoint to merge|its backbone weights file|the official file) .*writing it would "
    r"replace its input",
    "a_link_to_the_input": r"is (the checkpoint to merge|its backbone weights file|the official file) .*would "
    r"replace its input",
    "a_folder": r"is a folder; name the file to write",
    "under_a_file": r"afile is a file, not a folder",
    "read_only": r"is not writable \(read-only or no permission\)",
}


def out_path(case: str, target: Path, tmp: Path) -> Path:
    if case == "the_input":
        return target
    if case == "a_link_to_the_input":
        link = tmp / f"alias{target.suffix}"
        link.symlink_to(target)
        return link
    if case == "a_folder":
        (tmp / "folder").mkdir()
        return tmp / "folder"
    if case == "under_a_file":
        (tmp / "afile").write_text("x")
        return tmp / "afile" / "out.bin"
    if os.access(READ_ONLY.parent, os.W_OK):
        pytest.skip(f"{READ_ONLY.parent} is writable here")
    return READ_ONLY / "out.bin"


@pytest.mark.parametrize("case", OUT_CASES)
@pytest.mark.parametrize("command", FILE_WRITERS)
def test_an_output_file_never_replaces_an_input_and_a_bad_place_is_one_line(
    command, case, made, tmp_path, capsys
):
    """Issue 25 (4, 7): dgss-merge --out <the checkpoint> replaced the training checkpoint with a model-only file,
    --backbone-out <the weights> the backbone every checkpoint was trained from, convert_weights.py --out <src> the
    official release; a folder, a path under a file or a read-only place gave a traceback. Now: one line, exit 2,
    every input byte for byte as before."""
    ckpt, weights = tmp_path / "run.ckpt", tmp_path / "weights.pth"
    ckpt.write_bytes(made["ckpt"].read_bytes())
    weights.write_bytes(made["weights"].read_bytes())
    before = {p: p.read_bytes() for p in (ckpt, weights)}
    target = ckpt if command == "dgss-merge --out" else weights
    out = out_path(case, target, tmp_path)
    if command.startswith("dgss-merge"):
        rc = merge.main([str(ckpt), "--backbone-weights", str(weights), command.split()[1], str(out)])
    else:
        rc = convert_weights.main(["dinov2", str(weights), "--out", str(out), "--model", "vit_small_patch14_dinov2",
                                   "--img-size", "64"])  # fmt: skip
    assert rc == 2
    assert re.search(OUT_WORDS[case], one_line(capsys))
    assert all(p.read_bytes() == b for p, b in before.items())
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("case", ["a_file", "under_a_file", "read_only"])
@pytest.mark.parametrize("key", ["DGSS_LOG_DIR", "predict output="])
def test_a_log_or_output_folder_that_cannot_be_written_is_one_line(
    key, case, made, tmp_path, monkeypatch, capsys
):
    """Issue 25 (7): a file, a path under a file or a read-only place as DGSS_LOG_DIR (where Hydra makes the run
    folder before dgss runs) or as dgss-predict's output= gave a traceback."""
    from dgss.cli import entry_point

    folder = {"a_file": tmp_path / "afile", "under_a_file": tmp_path / "afile" / "logs",
              "read_only": READ_ONLY}[case]  # fmt: skip
    (tmp_path / "afile").write_text("x")
    if case == "read_only" and os.access(READ_ONLY.parent, os.W_OK):
        pytest.skip(f"{READ_ONLY.parent} is writable here")
    if key == "DGSS_LOG_DIR":
        monkeypatch.setenv("DGSS_LOG_DIR", str(folder))
        monkeypatch.setattr(sys, "argv", ["dgss-train", *DATA])
        with pytest.raises(SystemExit) as e:
            entry_point(lambda: pytest.fail("Hydra ran"), "dgss-train", "train")()
        assert e.value.code == 2
        line = one_line(capsys)
        assert line.startswith("dgss-train: error: paths.log_dir (DGSS_LOG_DIR)=")
    else:
        images = tmp_path / "images"
        images.mkdir()
        Image.open(made["image"]).save(images / "a.png")
        cfg = [f"ckpt_path={made['ckpt']}", f"input={images}", f"output={folder}", "progress=false"]
        assert cli(predict, compose_cfg_for(cfg, "predict", tmp_path), "dgss-predict") == 2
        line = one_line(capsys)
        assert line.startswith("dgss-predict: error: output=")
    assert re.search(r"is a file, not a folder|is not writable", line), line


def compose_cfg_for(overrides, config_name, tmp_path):
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="dgss.conf", version_base="1.3"):
        cfg = compose(
            config_name, overrides=[*overrides, f"paths.log_dir={tmp_path}"], return_hydra_config=True
        )
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path / "run")
        cfg.hydra.job.num = 0
    HydraConfig().set_config(cfg)
    return cfg


def test_a_full_disk_during_a_checkpoint_write_is_one_line_and_keeps_the_older_ones(made, tmp_path, monkeypatch,
                                                                                      compose_cfg, capsys):  # fmt: skip
    """Issue 25 (7): ENOSPC while writing a checkpoint left the data safe but ended in a traceback."""
    import errno

    from dgss.checkpoint import AtomicCheckpointIO

    real = AtomicCheckpointIO.save_checkpoint
    calls = []

    def full_after_first(self, checkpoint, path, storage_options=None):
        calls.append(path)
        if len(calls) > 1:
            monkeypatch.setattr(
                torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full"))
            )
        return real(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", full_after_first)
    cfg = compose_cfg([*DATA, *RUN, "backbone=toy", "method=full", "trainer.max_steps=2"])
    assert cli(train, cfg, "dgss-train") == 2
    line = one_line(capsys)
    assert re.match(r"dgss-train: error: writing the checkpoint .* failed \(no space left on device\); the "
                    r"checkpoints written before are intact: free space", line), line  # fmt: skip
    saved = [p for p in (tmp_path / "checkpoints").glob("*.ckpt")]
    assert saved and all(torch.load(p, weights_only=True)["global_step"] == 1 for p in saved)
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))


@pytest.mark.parametrize(
    "args,words",
    [
        (["--model", "vit_bogus_patch14"], r"--model 'vit_bogus_patch14' is not a timm model"),
        (["--img-size", "0"], r"--patch-size 16 / --img-size 0: both must be positive"),
        (["--patch-size", "0"], r"--patch-size 0 / --img-size 64: both must be positive"),
    ],
)
def test_convert_weights_options_are_one_line(args, words, made, tmp_path, capsys):
    """Issue 25 (7): a bogus --model or a zero --img-size / --patch-size gave a traceback."""
    out = tmp_path / "w.safetensors"
    rc = convert_weights.main(["dinov2", str(made["weights"]), "--out", str(out), "--model", "vit_small_patch14_dinov2",
                               "--img-size", "64", *args])  # fmt: skip
    assert rc == 2 and re.search(words, one_line(capsys)) and not out.exists()


def test_convert_weights_reads_a_release_whatever_its_name_says(made, tmp_path):
    """Issue 25 (7): a .pth file holding safetensors bytes (a renamed download) gave a traceback; it is read as
    what it is."""
    from safetensors.torch import save_file

    kwargs = {k: v for k, v in TINY.items() if k != "patch_size"}
    state = timm.create_model("vit_small_patch14_reg4_dinov2", num_classes=0, img_size=96, patch_size=8,
                              **kwargs).state_dict()  # fmt: skip
    src = tmp_path / "release.pth"
    save_file({k: v.contiguous() for k, v in state.items()}, str(src))
    out = tmp_path / "w.safetensors"
    convert_weights.convert(
        "dinov2", src, out, "vit_small_patch14_reg4_dinov2", 8, 96, "pi", model_kwargs=kwargs
    )
    from safetensors.torch import load_file

    assert load_file(str(out))["blocks.0.attn.qkv.weight"].equal(state["blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize(
    "override,words",
    [
        ("run_name=..", r"run_name='\.\.' is not a folder name"),
        ("run_name=a/b", r"run_name='a/b' is not a folder name \(it holds '/'\)"),
        ("run_name=straße", r"run_name=straße cannot be read: .*only quoted; write \"run_name='straße'\""),
        ("method.optimizer.lr=-1", r"method.optimizer.lr=-1(\.0)? must be >= 0"),
        ("data.num_workers=-1", r"data.num_workers=-1 must be >= 0"),
        ("trainer.val_check_interval=0", r"trainer.val_check_interval=0 must be > 0"),
        ("trainer.accumulate_grad_batches=0", r"trainer.accumulate_grad_batches=0 must be >= 1"),
        ("head.channels=0", r"head.channels=0 must be >= 1"),
        ("method.inference.crop=0", r"method.inference.crop=0 must be >= 1"),
        ("method.inference.stride=0", r"method.inference.stride=0 must be >= 1"),
    ],
)
def test_values_out_of_range_are_one_line_before_anything_runs(
    override, words, tmp_path, monkeypatch, capsys
):
    """Issue 25 (5, 7, 10): run_name=.. wrote into the parent folder; zero strides, crops, intervals, channels,
    accumulation, a negative worker count or learning rate were accepted or failed deep inside PyTorch; an unquoted
    non-ASCII run_name got no hint to quote it. One line each, before Hydra makes a folder."""
    from dgss.cli import entry_point

    monkeypatch.setenv("DGSS_LOG_DIR", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["dgss-train", *DATA, override])
    hydra_ran = []
    with pytest.raises(SystemExit) as e:
        entry_point(lambda: hydra_ran.append(1), "dgss-train", "train")()
    if not hydra_ran:  # refused while composing
        assert e.value.code == 2 and re.search(words, one_line(capsys))
        assert not list(tmp_path.iterdir())
        return
    pytest.fail(f"{override} reached Hydra")
