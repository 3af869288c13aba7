"""Checkpoints as artifacts, offline: dgss-push to a local folder and to a recording stand-in for the Hub API, the
model card and manifest it writes, ``ckpt_path=hf://user/name[@rev]`` read from a Hub cache built here in the Hub's
own layout, dgss-publish's hash-named file; a mismatching hash, a missing file, a pickle payload and an uncached
repository are one line each, nothing executed."""

import hashlib
import json
import pickle
import re
import shutil
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from PIL import Image

from dgss import hub
from dgss.cli import user_error
from dgss.errors import ConfigError
from dgss.eval import evaluate
from dgss.predict import predict
from dgss.release import build_release, main_publish, push

FILES = {"model.ckpt", "metrics.json", "config.yaml", "README.md", "sha256.json"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny LoRA run of dgss-train (its run folder: checkpoints, metrics.json, .hydra/overrides.yaml)."""
    from dgss.train import main as train_main

    folder = tmp_path_factory.mktemp("run")
    argv = sys.argv
    sys.argv = ["dgss-train", "experiment=demo", "debug=tiny", "method=lora", "backbone.weights=null", "~logger",
                f"hydra.run.dir={folder}"]  # fmt: skip
    try:
        train_main()
    finally:
        sys.argv = argv
    return folder


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hub_cache(root, repo, files, revision="main", commit="a" * 40):
    """``files`` ({name: path}) as the Hub's cache holds a download: blobs by sha256, a snapshot per commit linking
    to them, refs/<revision> naming the commit."""
    base = root / f"models--{repo.replace('/', '--')}"
    (base / "blobs").mkdir(parents=True, exist_ok=True)
    (base / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
    (base / "refs").mkdir(exist_ok=True)
    for name, src in files.items():
        blob = base / "blobs" / sha(src)
        shutil.copyfile(src, blob)
        (base / "snapshots" / commit / name).symlink_to(blob)
    (base / "refs" / revision).write_text(commit)
    return base


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_push_to_a_folder_writes_the_release_its_card_and_manifest(run, tmp_path):
    res = push(run / "checkpoints" / "last.ckpt", "me/tiny-lora", target=str(tmp_path / "rel"))
    rel = tmp_path / "rel"
    assert {p.name for p in rel.iterdir()} == FILES
    manifest = json.loads((rel / "sha256.json").read_text())
    assert manifest.keys() == FILES - {"sha256.json"} and res["files"] == manifest
    assert all(sha(rel / name) == digest for name, digest in manifest.items())
    ckpt = torch.load(rel / "model.ckpt", weights_only=True)
    assert "optimizer_states" not in ckpt and ckpt["dgss_config"]["backbone"]["weights"] is None
    card = (rel / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: dgss" in card and "license: apache-2.0" in card
    assert "# LoRA · vit_small_patch14_reg4_dinov2 · game → game, photo, overcast, fog, night" in card
    assert (
        "dgss-train experiment=demo debug=tiny method=lora backbone.weights=null" in card
    )  # the run's command
    metrics = json.loads((run / "metrics.json").read_text())[-1]
    assert f"| fog | {metrics['domains']['fog']['mIoU']:.2f} |" in card  # the per-target table
    assert (
        f"| car | {metrics['domains']['game']['per_class']['car']:.2f} |" in card
    )  # per-class, first column
    assert "dgss-eval ckpt_path=hf://me/tiny-lora" in card


def test_push_to_the_hub_creates_the_repository_and_uploads_the_release(run):
    class RecordingApi:  # the two HfApi calls dgss-push makes, recorded (no network)
        def __init__(self):
            self.calls, self.uploaded = [], {}

        def create_repo(self, repo_id, **kw):
            self.calls.append(("create_repo", repo_id, kw))

        def upload_folder(self, repo_id, folder_path, **kw):
            self.calls.append(("upload_folder", repo_id, kw))
            self.uploaded = {p.name: sha(p) for p in Path(folder_path).iterdir()}
            return type("Commit", (), {"oid": "c0ffee"})()

    api = RecordingApi()
    res = push(run / "checkpoints" / "last.ckpt", "me/tiny-lora", api=api)
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[0][2]["exist_ok"] and api.calls[1][1] == "me/tiny-lora"
    assert api.uploaded.keys() == FILES and res["commit"] == "c0ffee"
    assert {k: v for k, v in api.uploaded.items() if k != "sha256.json"} == res["files"]
    with pytest.raises(ConfigError, match="repo='tiny': write <user or organisation>/<name>"):
        push(run / "checkpoints" / "last.ckpt", "tiny", api=api)


def test_hf_urls_read_the_local_hub_cache_offline(run, tmp_path, offline_cache, compose_cfg):
    rel = tmp_path / "rel"
    push(run / "checkpoints" / "last.ckpt", "me/tiny-lora", target=str(rel))
    files = {p.name: p for p in rel.iterdir()}
    hub_cache(offline_cache, "me/tiny-lora", files)
    hub_cache(offline_cache, "me/tiny-lora", files, revision="v1", commit="b" * 40)
    assert hub.resolve("hf://me/tiny-lora").read_bytes() == (rel / "model.ckpt").read_bytes()
    assert "b" * 40 in str(hub.resolve("hf://me/tiny-lora@v1"))
    metrics = evaluate(
        compose_cfg(["ckpt_path=hf://me/tiny-lora", "trainer=cpu", "~logger"], config_name="eval")
    )
    want = json.loads((run / "metrics.json").read_text())[-1]["mean_mIoU"]
    assert metrics["val/mean_mIoU"] == pytest.approx(
        want, abs=1e-6
    )  # the same model as the run's last validation
    frame = tmp_path / "frame.png"
    Image.new("RGB", (64, 32), (90, 120, 30)).save(frame)
    out = predict(compose_cfg(["ckpt_path=hf://me/tiny-lora", f"input={frame}", f"output={tmp_path / 'p'}",
                               "progress=false", "device=cpu"], config_name="predict"))  # fmt: skip
    assert out["images"] == 1


def _broken(tmp_path, offline_cache, run, how):
    rel = tmp_path / "rel"
    push(run / "checkpoints" / "last.ckpt", "me/broken", target=str(rel))
    files = {p.name: p for p in rel.iterdir()}
    if how == "missing":
        del files["sha256.json"]
    elif how == "altered":
        data = bytearray((rel / "model.ckpt").read_bytes())
        data[-100] ^= 1
        (rel / "model.ckpt").write_bytes(bytes(data))
    elif how == "pickle":  # a payload whose manifest entry matches: the hash is fine, the content is not
        marker = tmp_path / "PWNED"
        (rel / "model.ckpt").write_bytes(pickle.dumps(Payload(str(marker)), protocol=2))
        (rel / "sha256.json").write_text(json.dumps({"model.ckpt": sha(rel / "model.ckpt")}))
    hub_cache(offline_cache, "me/broken", files)


class Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize(
    "how, message",
    [
        ("missing", "the local Hub cache holds this repository without sha256.json: not a dgss release"),
        ("altered", r"model.ckpt has sha256 \w+…, its manifest says \w+…: a damaged or altered download"),
        ("pickle", "holds Python objects beyond tensors"),
        ("uncached", "is not in the local Hub cache and the Hub cannot be reached"),
    ],
)
def test_a_bad_hub_release_is_one_line_and_nothing_runs(
    run, tmp_path, offline_cache, compose_cfg, how, message
):
    if how != "uncached":
        _broken(tmp_path, offline_cache, run, how)
    with pytest.raises(Exception) as e:
        evaluate(compose_cfg(["ckpt_path=hf://me/broken", "trainer=cpu", "~logger"], config_name="eval"))
    line = user_error(e.value)
    assert line is not None and "\n" not in line and "hf://me/broken" in line
    assert re.search(message, line), line
    assert not (tmp_path / "PWNED").exists()


def test_publish_names_the_checkpoint_by_its_hash(run, tmp_path, compose_cfg):
    argv = sys.argv
    sys.argv = ["dgss-publish", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"output={tmp_path / 'pub'}",
                f"hydra.run.dir={tmp_path / 'h'}"]  # fmt: skip
    try:
        main_publish()
    finally:
        sys.argv = argv
    (ckpt,) = (tmp_path / "pub").glob("*.ckpt")
    stem, digest = ckpt.stem.rsplit("-", 1)
    assert stem == run.name and sha(ckpt).startswith(digest) and len(digest) == 8
    assert json.loads((tmp_path / "pub" / "sha256.json").read_text())[ckpt.name] == sha(ckpt)
    metrics = evaluate(compose_cfg([f"ckpt_path={ckpt}", "trainer=cpu", "~logger"], config_name="eval"))
    assert "val/mean_mIoU" in metrics


def test_build_release_refuses_nothing_it_needs(run, tmp_path):
    """A checkpoint without its run folder (moved on its own) still releases: no metrics, the config's command."""
    lone = tmp_path / "lone.ckpt"
    shutil.copyfile(run / "checkpoints" / "last.ckpt", lone)
    files = build_release(lone, tmp_path / "rel")
    assert "metrics.json" not in files and "No metrics.json" in (tmp_path / "rel" / "README.md").read_text()
    assert (
        "# the run's command was not recorded beside this checkpoint"
        in (tmp_path / "rel" / "README.md").read_text()
    )
