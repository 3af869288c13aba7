"""Trained models as shareable artifacts: a release folder — the checkpoint merged to one self-contained file, its
``metrics.json``, the composed ``config.yaml``, a generated model card (``README.md``: method, backbone, data, the
per-target IoU tables, the command that reproduces it, the backbone weights' licence) and a ``sha256.json`` manifest —
pushed to the Hugging Face Hub (``dgss-push ckpt_path=… repo=user/name``) or written as a local release with the hash
prefix in the checkpoint's name, as mmseg's ``publish_model`` does (``dgss-publish ckpt_path=… output=…``). Read back
with ``ckpt_path=hf://user/name`` (:mod:`dgss.hub`).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import hydra
from huggingface_hub import HfApi
from omegaconf import DictConfig, OmegaConf

from dgss.checkpoint import config_of, read_checkpoint
from dgss.cli import entry_point, run_cli
from dgss.errors import ConfigError
from dgss.hub import CHECKPOINT, MANIFEST, REPO_RE, sha256_file
from dgss.io import atomic_path, check_output_folder
from dgss.restore import merge

log = logging.getLogger("dgss.release")

# the licence a checkpoint inherits from its backbone's pretrained weights (a fine-tuned model is a derivative)
WEIGHT_LICENCES = {
    "dinov2": "apache-2.0",  # facebookresearch/dinov2, weights Apache-2.0
    "dinov3": "other",  # the DINOv3 License (Meta), not an OSI licence: carry it with the model
    "eva02": "mit",  # baaivision/EVA
    "samvit": "apache-2.0",  # facebookresearch/segment-anything
    "clip": "mit",  # openai/CLIP
}
LICENCE_NOTES = {
    "other": "the DINOv3 License (https://ai.meta.com/resources/models-and-libraries/dinov3-license/): ship it with "
    "the model",
}


def backbone_licence(name: str) -> str:
    for key, licence in WEIGHT_LICENCES.items():
        if key in name:
            return licence
    return "unknown"


def reproduce_command(run_dir: Path | None, cfg: dict) -> str:
    """The ``dgss-train`` command of the run: its recorded overrides (``.hydra/overrides.yaml``), else a note that
    it was not recorded (``config.yaml`` holds the composed config)."""
    overrides = run_dir / ".hydra" / "overrides.yaml" if run_dir else None
    if overrides is not None and overrides.is_file():
        try:
            items = [str(o) for o in OmegaConf.to_container(OmegaConf.load(overrides))]
            return " ".join(["dgss-train", *items])
        except Exception:  # noqa: BLE001 - a damaged record: fall back to the config's name
            pass
    return (
        "# the run's command was not recorded beside this checkpoint (no .hydra/overrides.yaml in its run folder);\n"
        "# config.yaml holds the composed model and data configuration it was trained with"
    )


def iou_tables(metrics: list | None, class_names: list[str]) -> str:
    """Markdown: each target's mIoU at the last validation, and the per-class IoU table (classes x targets)."""
    if not metrics:
        return "No metrics.json was found beside the checkpoint's run.\n"
    last = metrics[-1]
    domains = last.get("domains", {})
    lines = [f"Step {last.get('step')}; mean over {', '.join(last.get('mean_over', []))}: "
             f"**{last.get('mean_mIoU', float('nan')):.2f}** mIoU.", "",
             "| target | mIoU | images |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {d} | {v['mIoU']:.2f} | {v.get('images', '')} |" for d, v in domains.items()]
    lines += ["", "| class | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
    for c in class_names:
        values = [(v.get("per_class") or {}).get(c) for v in domains.values()]
        row = ["–" if x is None else f"{x:.2f}" for x in values]  # – : the class is in no image of the target
        lines.append(f"| {c} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def model_card(cfg: dict, metrics: list | None, command: str, files: dict[str, str], repo: str | None) -> str:
    """The release's README.md (Hugging Face model card: YAML front matter, then the card)."""
    method = str(cfg["method"]["_target_"]).rsplit(".", 1)[-1]
    backbone = str(cfg["backbone"].get("name", "?"))
    licence = backbone_licence(backbone)
    data = cfg.get("data", {})
    sources = ", ".join(data.get("sources") or {}) or "?"
    targets = ", ".join(data.get("targets") or {}) or "?"
    names = list(data.get("class_names") or []) or [
        "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
        "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
    ]  # fmt: skip
    ref = (
        f"hf://{repo}"
        if repo
        else "<this folder>/" + next((f for f in files if f.endswith(".ckpt")), CHECKPOINT)
    )
    front = {"library_name": "dgss", "license": licence, "pipeline_tag": "image-segmentation",
             "tags": ["semantic-segmentation", "domain-generalization", "dgss", method.lower()]}  # fmt: skip
    manifest = "\n".join(f"| `{name}` | `{digest}` |" for name, digest in files.items())
    note = LICENCE_NOTES.get(licence, "")
    return f"""---
{OmegaConf.to_yaml(OmegaConf.create(front)).strip()}
---

# {method} · {backbone} · {sources} → {targets}

A domain-generalized semantic segmentation model trained with [dgss](https://github.com/) ({method} on the
`{backbone}` backbone, {len(names)} classes), trained on **{sources}**, evaluated on **{targets}**.

## Results

{iou_tables(metrics, names)}
## Use

```bash
dgss-eval ckpt_path={ref}                      # evaluate on the targets it was trained for
dgss-predict ckpt_path={ref} input=<images or video>
dgss-export ckpt_path={ref} format=onnx          # ONNX for onnxruntime / TensorRT
```

## Reproduce

```bash
{command}
```

The composed config is `config.yaml`; the metrics of every validation `metrics.json`.

## Licence

The backbone's pretrained weights decide it: `{backbone}` → **{licence}**{f" — {note}" if note else ""}. dgss itself is
Apache-2.0.

## Files

| file | sha256 |
|---|---|
{manifest}
"""


def build_release(ckpt_path: str | Path, folder: Path, backbone_weights: str | None = None, hashed: bool = False,
                  repo: str | None = None, config_dirs=()) -> dict[str, str]:  # fmt: skip
    """Write a release into ``folder``: the checkpoint merged to one self-contained file (optimizer state left
    out; named ``model.ckpt``, or ``<run>-<sha256[:8]>.ckpt`` with ``hashed``), the run's ``metrics.json`` if its
    run folder has one, ``config.yaml``, ``README.md`` (the model card) and
    ``sha256.json`` (every other file's digest). Returns the manifest."""
    src = Path(ckpt_path).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    model = folder / CHECKPOINT
    merge(src, model, backbone_weights, config_dirs=config_dirs)
    if hashed:  # mmseg publish_model: the hash prefix in the name, so a file names its own content
        stem = src.parent.parent.name if src.parent.name == "checkpoints" else src.stem
        named = folder / f"{stem}-{sha256_file(model)[:8]}.ckpt"
        model.replace(named)
        model = named
    cfg = config_of(read_checkpoint(model))
    run_dir = src.parent.parent if src.parent.name == "checkpoints" else None
    metrics = None
    if run_dir is not None and (run_dir / "metrics.json").is_file():
        try:  # the run's own file, but a user names the checkpoint beside it: a damaged one is one line
            metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(
                f"{run_dir / 'metrics.json'} is not readable JSON ({e}); repair or remove it"
            ) from None
        shutil.copyfile(run_dir / "metrics.json", folder / "metrics.json")
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    card = model_card(cfg, metrics, reproduce_command(run_dir, cfg), files, repo)
    (folder / "README.md").write_text(card)
    files["README.md"] = sha256_file(folder / "README.md")
    with atomic_path(folder / MANIFEST) as tmp:
        tmp.write_text(json.dumps(files, indent=2) + "\n")
    return files


def push(ckpt_path: str | Path, repo: str, target: str | None = None, backbone_weights: str | None = None,
         private: bool = False, api=None) -> dict:  # fmt: skip
    """``dgss-push``: build the release and upload it to the Hub repository ``repo`` (created if absent), or with
    ``target`` copy it into that local folder instead (no network)."""
    if not REPO_RE.match(repo):
        raise ConfigError(f"repo={repo!r}: write <user or organisation>/<name>")
    with tempfile.TemporaryDirectory(prefix="dgss-release-") as tmp:
        files = build_release(ckpt_path, Path(tmp), backbone_weights, repo=repo)
        if target is not None:
            dst = Path(target).expanduser()
            dst.mkdir(parents=True, exist_ok=True)
            for src in Path(tmp).iterdir():  # the files and their manifest
                shutil.copyfile(src, dst / src.name)
            return {"target": str(dst), "files": files}
        if api is None:
            api = HfApi()
        api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo, folder_path=tmp, repo_type="model",
                                 commit_message=f"dgss-push: {Path(str(ckpt_path)).name}")  # fmt: skip
        return {"repo": repo, "files": files, "commit": str(getattr(info, "oid", info))}


@hydra.main(version_base="1.3", config_path="conf", config_name="push")
def push_main(cfg: DictConfig) -> None:
    result = run_cli(
        lambda c: push(c.ckpt_path, c.repo, c.target, c.backbone_weights, c.private), cfg, "dgss-push"
    )
    if result is not None:
        print(json.dumps(result))


def publish(cfg: DictConfig) -> dict:
    """``dgss-publish``: a local release folder, the checkpoint named with its hash prefix."""
    out = check_output_folder(cfg.output, "output", {"ckpt_path": cfg.ckpt_path})
    files = build_release(cfg.ckpt_path, out, cfg.backbone_weights, hashed=True)
    log.info(f"dgss-publish: {len(files)} files in {out}")
    return {"output": str(out), "files": files}


@hydra.main(version_base="1.3", config_path="conf", config_name="publish")
def publish_main(cfg: DictConfig) -> None:
    result = run_cli(publish, cfg, "dgss-publish")
    if result is not None:
        print(json.dumps(result))


main_push = entry_point(push_main, "dgss-push", "push")
main_publish = entry_point(publish_main, "dgss-publish", "publish")
