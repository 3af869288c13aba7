"""Rebuilding a trained method from a checkpoint (``load_method``: dgss-eval, dgss-predict, dgss-export) and
merging one with its backbone's weights file (``merge``: dgss-merge, dgss-push). Above :mod:`dgss.config` (it builds
the method from the checkpoint's config) and :mod:`dgss.checkpoint` (the format it reads)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from dgss import hub
from dgss.checkpoint import (
    config_of,
    identity_of,
    is_training_state,
    mark_merged,
    put_config,
    read_checkpoint,
)
from dgss.config import build_method
from dgss.errors import ConfigError
from dgss.io import UnreadableFile, atomic_path, check_output_file, load_checkpoint_dict
from dgss.models.weights import WEIGHTS_OPTION
from dgss.trust import check_stored_config, command_line_config_dirs


@runtime_checkable
class TakesOfficialRelease(Protocol):
    """A method that imports a published release of its paper (an mmengine dict without a dgss config): Rein."""

    def load_official(self, state: dict[str, torch.Tensor]) -> None: ...


def load_method(ckpt_path: str | os.PathLike, backbone_weights: str | None = None, inference: dict | None = None,
                recipe=None, config_dirs=None, weights_option: str = "backbone_weights"):  # fmt: skip
    """The trained method of a checkpoint, frozen backbone re-attached, in eval-ready state; also its config.

    A dgss-train checkpoint carries its own config. An official release (an mmengine dict with ``backbone.reins.*``
    and ``decode_head.*``, e.g. a published Rein or SoMA checkpoint) needs ``recipe``, the config it was trained with
    (``experiment=rein``; SoMA: its recipe with ``method.soma.init=official``): the method is built from it and the
    release's tensors imported. The stored config is checked first (:func:`dgss.trust.check_stored_config`: only
    classes of the config tree, ``config_dirs`` or this run's ``--config-dir`` included); nothing is built before.
    ``weights_option``: how the command takes the weights file, named in its messages (``--backbone-weights``).
    """
    token = WEIGHTS_OPTION.set(weights_option)
    try:
        return _load_method(ckpt_path, backbone_weights, inference, recipe, config_dirs)
    finally:
        WEIGHTS_OPTION.reset(token)


def _load_method(ckpt_path, backbone_weights, inference, recipe, config_dirs):
    path = hub.resolve(ckpt_path)  # a local file, or hf://user/name checked against its release's manifest
    try:
        ckpt = read_checkpoint(path, "ckpt_path")
    except UnreadableFile as e:  # named as the user named it (the Hub cache's path says little)
        if not str(ckpt_path).startswith(hub.SCHEME):
            raise
        raise UnreadableFile(f"ckpt_path={str(ckpt_path)!r}", e.reason) from None
    stored = config_of(ckpt)
    official = stored is None
    if not official:
        dirs = command_line_config_dirs() if config_dirs is None else config_dirs
        check_stored_config(stored, f"ckpt_path={str(path)!r}", dirs)
    if not official and recipe is not None:
        given = [k for k in ("backbone", "head", "method") if recipe.get(k) is not None]
        raise ConfigError(
            f"ckpt_path={str(path)!r} is a dgss-train checkpoint: it rebuilds its own "
            f"{str(stored['method']['_target_']).rsplit('.', 1)[-1]} model, so {', '.join(given)} (or the "
            "experiment setting them) would be ignored; drop them (data=, inference=, backbone_weights= still apply)"
        )
    if official:
        state = ckpt.get("state_dict", ckpt)
        if not any(str(k).startswith(("backbone.reins.", "decode_head.")) for k in state):
            raise ConfigError(
                f"ckpt_path={str(path)!r} is not a dgss-train checkpoint (no 'dgss_config' entry)"
            )
        if recipe is None or recipe.get("method") is None:
            raise ConfigError(f"ckpt_path={str(path)!r} is an official release without a dgss config; add the recipe "
                              "it was trained with, e.g. experiment=rein (and backbone.weights=<converted file>)")  # fmt: skip
        saved = OmegaConf.create(OmegaConf.to_container(recipe, resolve=True))
    else:
        saved = OmegaConf.create(stored)
    if backbone_weights:
        saved.backbone.weights = backbone_weights
    if inference:
        saved.method.inference = OmegaConf.merge(saved.method.get("inference", {}), inference)
    # the checkpoint or the release supplies every trained tensor: no data-dependent init (SoMA's SVD)
    method = build_method(saved, restoring=True)
    if official:
        if not isinstance(method, TakesOfficialRelease):
            raise ConfigError(
                f"method {type(method).__name__} has no official checkpoint format; use experiment=rein or a SoMA "
                "recipe with method.soma.init=official"
            )
        method.load_official(state)
    else:
        method.on_load_checkpoint(ckpt)
        method.load_state_dict(ckpt["state_dict"], strict=method.strict_loading)
    return method, saved


def merge(ckpt_path: str | os.PathLike, out: str | os.PathLike | None, backbone_weights: str | None = None,
          backbone_out: str | os.PathLike | None = None, config_dirs=()) -> dict:  # fmt: skip
    """One self-contained checkpoint from a frozen-backbone / sparse one and its weights file: every tensor inside,
    ``backbone.weights: null`` in its config, the merge's provenance recorded; optimizer and scheduler state left
    out (a model file, not a training state). Written atomically; returns the provenance. ``backbone_out``: also (or,
    with ``out=None``, only) the plain backbone with the method folded in (:meth:`SegmentationMethod.plain_backbone`),
    a ``.safetensors`` file of timm's keys that ``backbone.weights`` loads into the same ``backbone.name``."""
    method, saved = load_method(
        ckpt_path, backbone_weights, config_dirs=config_dirs, weights_option="--backbone-weights"
    )
    identity = method.backbone.identity
    inputs = {"the checkpoint to merge": ckpt_path, "its backbone weights file": identity.get("weights")}
    if out is not None:
        check_output_file(out, "--out", inputs)
        if Path(out).is_file() and _is_training_checkpoint(Path(out)):
            raise ConfigError(f"--out={str(out)!r} is a training checkpoint (a run resumes from it); a merged model "
                              "file would replace it: write the merged file to another name")  # fmt: skip
    if backbone_out is not None:
        check_output_file(backbone_out, "--backbone-out", {**inputs, "--out": out})
    written = {}
    if backbone_out is not None:
        state = method.backbone.timm_state(method.plain_backbone())
        plain = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        with atomic_path(backbone_out) as tmp:
            save_file(
                plain, str(tmp), metadata={"dgss_merged_from": str(ckpt_path), "backbone": identity["name"]}
            )
        written["backbone_out"] = str(backbone_out)
    if out is None:
        return written
    ckpt = read_checkpoint(ckpt_path)
    ckpt["state_dict"] = {k: v.detach().cpu() for k, v in method.state_dict().items()}
    put_config(ckpt, OmegaConf.to_container(saved, resolve=True))
    mark_merged(ckpt, {"from": str(ckpt_path), "from_sha256": hashlib.sha256(Path(ckpt_path).read_bytes()).hexdigest(),
                       "backbone_weights": identity["weights"], "backbone_sha256": identity["weights_sha256"]})  # fmt: skip
    with atomic_path(out) as tmp:
        torch.save(ckpt, tmp)
    return {"tensors": len(ckpt["state_dict"]), **identity_of(ckpt)["merged"], **written}


def _is_training_checkpoint(path: Path) -> bool:
    try:
        return is_training_state(load_checkpoint_dict(path, "--out", mmap=True))
    except UnreadableFile:
        return False
