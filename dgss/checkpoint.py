"""The dgss checkpoint format, in one place: every key dgss adds to Lightning's checkpoint dict is written and read
here; methods and callbacks add their own state as one named *section* (:func:`put_section` / :func:`section`).

A dgss-train checkpoint is Lightning's dict plus

- ``dgss_format_version`` (:data:`FORMAT_VERSION`); files written before it had none (version 0: their sections were
  top-level keys) and are read through :func:`upgrade`;
- ``dgss_config``: the resolved backbone / head / method / data config that rebuilds the model (:func:`put_config`);
- ``dgss``: the backbone's identity (name, weights file, sha256), how many frozen tensors were left out, the run's
  ``max_steps`` / ``accumulate_grad_batches``, and for a merged file its provenance;
- ``rng_states``: the process's random streams, so a resumed run draws what an uninterrupted one would;
- ``dgss_sections``: ``{name: payload}`` of the method and callbacks (FisherTune's sparse delta and statistics under
  ``fishertune``, the EMA callback's raw weights under ``weight_averaging``).

What a checkpoint holds of the model: frozen backbone tensors are left out (:func:`strip_reattachable`) and re-attached
from the weights file, checked by sha256 (:func:`check_reattach`); FisherTune's selected elements travel as a sparse
delta (:func:`sparse_delta`). ``AtomicCheckpointIO`` (the trainer's checkpoint plugin) writes every checkpoint to a
hidden temporary in the same folder, fsyncs it and renames it over the target, so a kill at any moment leaves the
previous file or the new one, and reads every checkpoint back with :func:`dgss.io.load_file` (``weights_only``).
Rebuilding a method from a checkpoint and merging one live above the config, in :mod:`dgss.restore`.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import get_class
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from dgss.compat import should_accumulate
from dgss.errors import ConfigError, TrainingAborted
from dgss.io import UnreadableFile, atomic_path, load_checkpoint_dict, remove_cut_off, write_failure
from dgss.models.weights import WEIGHTS_OPTION

log = logging.getLogger("dgss.checkpoint")

#: the format this dgss writes; a file of a newer one is refused (in one line) rather than half read
FORMAT_VERSION = 1
VERSION_KEY, CONFIG_KEY, IDENTITY_KEY, RNG_KEY, SECTIONS_KEY = (
    "dgss_format_version",
    "dgss_config",
    "dgss",
    "rng_states",
    "dgss_sections",
)
#: version 0 kept each section as a top-level key of its own name
LEGACY_SECTIONS = ("fishertune", "weight_averaging")
#: version 0 stored FisherTune's option groups at method level (now under method.fishertune)
LEGACY_NESTED = {"dgss.methods.fishertune.FisherTune": ("fishertune", ("schedule", "selection", "fisher", "perturb",
                                                                       "optim", "finalize"))}  # fmt: skip


def version_of(ckpt: dict) -> int:
    return int(ckpt.get(VERSION_KEY, 0))


def upgrade(ckpt: dict, where: str = "the checkpoint") -> dict:
    """``ckpt`` in the current format, in place: a version-0 file's top-level sections move under ``dgss_sections``;
    a file of a newer format than this dgss reads is one :class:`ConfigError` line."""
    version = version_of(ckpt)
    if version > FORMAT_VERSION:
        raise ConfigError(f"{where} has dgss checkpoint format {version}, newer than this dgss reads "
                          f"({FORMAT_VERSION}): upgrade dgss (pip install -U dgss)")  # fmt: skip
    if version == 0:
        sections = ckpt.setdefault(SECTIONS_KEY, {})
        for name in LEGACY_SECTIONS:
            if name in ckpt:
                sections[name] = ckpt.pop(name)
        method = (ckpt.get(CONFIG_KEY) or {}).get("method") or {}
        nest, groups = LEGACY_NESTED.get(method.get("_target_"), (None, ()))
        if nest and any(g in method for g in groups):
            method[nest] = {g: method.pop(g) for g in groups if g in method}
        if CONFIG_KEY in ckpt or IDENTITY_KEY in ckpt:  # a dgss file (an official release stays as it is)
            ckpt[VERSION_KEY] = FORMAT_VERSION
    return ckpt


def read_checkpoint(path, key: str = "ckpt_path", mmap: bool = False) -> dict:
    """A user's checkpoint file (:func:`dgss.io.load_checkpoint_dict`: ``weights_only``, one-line errors), upgraded
    to the current format."""
    return upgrade(load_checkpoint_dict(path, key, mmap=mmap), f"{key}={str(path)!r}")


def put_section(ckpt: dict, name: str, payload: Any) -> None:
    """A method's or callback's own state, under its name (read back with :func:`section`)."""
    ckpt.setdefault(SECTIONS_KEY, {})[name] = payload
    ckpt[VERSION_KEY] = FORMAT_VERSION


def section(ckpt: dict, name: str) -> Any | None:
    """The section ``name`` of ``ckpt`` (of either format version), None when it has none."""
    found = (ckpt.get(SECTIONS_KEY) or {}).get(name)
    return ckpt.get(name) if found is None and version_of(ckpt) == 0 and name in LEGACY_SECTIONS else found


def put_config(ckpt: dict, cfg: dict) -> None:
    """The resolved model + data config that rebuilds the model (``dgss.config.model_config``)."""
    ckpt[CONFIG_KEY] = cfg
    ckpt[VERSION_KEY] = FORMAT_VERSION


def config_of(ckpt: dict) -> dict | None:
    """The stored config of a dgss-train checkpoint; None for an official release (no dgss config)."""
    return ckpt.get(CONFIG_KEY)


def identity_of(ckpt: dict) -> dict:
    """``dgss``: backbone identity, dropped keys, the run's settings, a merge's provenance (empty if none)."""
    return ckpt.get(IDENTITY_KEY) or {}


def run_settings(ckpt: dict) -> dict:
    """What a resumed run must keep (``max_steps``, ``accumulate_grad_batches``), as the run that wrote it had them."""
    return identity_of(ckpt).get("run") or {}


def mark_merged(ckpt: dict, provenance: dict) -> None:
    """``ckpt`` becomes a self-contained model file: every tensor inside (no weights file), the merge's provenance
    recorded, the optimizer and scheduler states dropped (a model file, not a training state)."""
    ident = identity_of(ckpt)
    backbone = {**ident.get("backbone", {}), "weights": None, "weights_sha256": None}
    ckpt[IDENTITY_KEY] = {**ident, "backbone": backbone, "merged": provenance}
    ckpt[CONFIG_KEY]["backbone"]["weights"] = None
    for key in ("optimizer_states", "lr_schedulers"):
        ckpt.pop(key, None)
    ckpt[VERSION_KEY] = FORMAT_VERSION


def save_model_part(ckpt: dict, method, trainer=None) -> None:
    """What every method writes: the frozen tensors left out (:func:`strip_reattachable`), the random streams, the
    run's settings when a trainer saves, the format version."""
    strip_reattachable(ckpt, method)
    ckpt[RNG_KEY] = rng_states()
    if trainer is not None:  # what a resumed run must keep (dgss.train.check_unchanged)
        ckpt[IDENTITY_KEY]["run"] = {"max_steps": int(trainer.max_steps),
                                     "accumulate_grad_batches": int(trainer.accumulate_grad_batches)}  # fmt: skip
    ckpt[VERSION_KEY] = FORMAT_VERSION


def load_model_part(ckpt: dict, method, resuming: bool) -> bool:
    """Before ``method`` loads ``ckpt``: the same method, the random streams back when a fit resumes, the left-out
    tensors checked against the weights file. Returns whether loading must be non-strict."""
    upgrade(ckpt)
    check_same_method(ckpt, type(method))
    if resuming and RNG_KEY in ckpt:
        set_rng_states(ckpt[RNG_KEY])
    return check_reattach(ckpt, method)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Local checkpoints written atomically (temporary in the same folder + fsync + ``os.replace``), read back with
    :func:`load_file` (``weights_only``; one-line errors)."""

    def load_checkpoint(
        self, path, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict:
        ckpt = read_checkpoint(path)
        if "state_dict" not in ckpt:
            raise ConfigError(
                f"ckpt_path={str(path)!r} is not a dgss-train checkpoint (no state_dict): resume from a "
                "checkpoints/*.ckpt of a run; to start from backbone weights use backbone.weights=<file>"
            )
        return ckpt

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        try:
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
        except (OSError, RuntimeError) as e:
            if isinstance(e, RuntimeError) and "write" not in str(e).lower():
                raise  # not a failed write: a bug
            raise TrainingAborted(f"writing the checkpoint {path} failed ({write_failure(e, path)}); the checkpoints "
                                  "written before are intact: free space or fix the folder, then rerun with "
                                  "resume=auto") from e  # fmt: skip


class StepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that never saves inside a gradient-accumulation window (accumulated gradients are not in
    checkpoints, so such a file would not resume exactly). Lightning's would, e.g. one batch after a resume at a
    step it had not saved yet."""

    def on_train_batch_end(self, trainer, *args, **kwargs) -> None:
        if not should_accumulate(trainer):
            super().on_train_batch_end(trainer, *args, **kwargs)


def readable(path: Path) -> bool:
    try:
        ckpt = load_checkpoint_dict(path, key="checkpoint", mmap=True)
    except UnreadableFile as e:  # any unreadable file is skipped with the reason
        rank_zero_warn(f"resume=auto: {path} is unreadable (it {e.reason}); trying the previous checkpoint")
        return False
    if "state_dict" not in ckpt:
        rank_zero_warn(f"resume=auto: {path} holds no state_dict; trying the previous checkpoint")
        return False
    if not is_training_state(ckpt):  # e.g. a dgss-merge output written into the run's folder
        rank_zero_warn(f"resume=auto: {path} is a model-only file (no optimizer or loop state); trying the "
                       "previous checkpoint")  # fmt: skip
        return False
    return True


def is_training_state(ckpt: dict) -> bool:
    """A checkpoint a run can resume from: Lightning's loops and the optimizer states, not a merged model file."""
    return "loops" in ckpt and "optimizer_states" in ckpt and "merged" not in identity_of(ckpt)


def find_resume_checkpoint(folder: str | Path) -> Path | None:
    """The newest ``*.ckpt`` in ``folder`` (by modification time) that loads; None when there is none. Temporaries
    of writes that a kill cut off are removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    if rank_zero_only.rank == 0:  # before the fit starts, so no rank is writing yet
        for stale in remove_cut_off(folder, "*.ckpt"):  # a save the previous process was killed in
            log.info(f"resume=auto: removed {stale.name}, a checkpoint write that was cut off")
    for path in sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime_ns, reverse=True):
        if readable(path):
            return path
    return None


# ------------------------------------------------------------------------------------- the model part
def check_same_method(checkpoint: dict, cls: type | str) -> None:
    """A dgss checkpoint names the method it was trained with (``_target_``); loading it into another (a class, or
    the ``_target_`` of this run's config) is a user error, named as such (not as the missing tensors it would
    otherwise surface as). Compared as classes: a method that moved keeps its old ``_target_`` importable."""
    saved = ((config_of(checkpoint) or {}).get("method") or {}).get("_target_")
    if not saved:
        return
    cls = get_class(cls) if isinstance(cls, str) else cls
    try:
        same = (
            get_class(saved) is cls
        )  # (the stored config was checked by dgss.trust before anything reads it)
    except Exception:  # noqa: BLE001 - a class this dgss no longer has
        same = False
    if not same:
        raise ConfigError(
            f"the checkpoint was trained with method {saved.rsplit('.', 1)[-1]}, not {cls.__name__}: "
            "resume it with the method (experiment) it was trained with, or evaluate it with dgss-eval "
            "ckpt_path=<file>"
        )


def strip_reattachable(checkpoint: dict, method) -> None:
    """Leave out of ``checkpoint`` what the backbone's weights file gives back (``method.reattachable_keys()``), and
    record the backbone's identity (file, sha256) so :func:`check_reattach` can refuse another file."""
    drop = method.reattachable_keys()
    state = checkpoint["state_dict"]
    for k in [k for k in state if k in drop]:
        del state[k]
    checkpoint[IDENTITY_KEY] = {"backbone": method.backbone.identity, "dropped_keys": len(drop)}


def check_reattach(checkpoint: dict, method) -> bool:
    """Before loading ``checkpoint`` into ``method``: the tensors it left out must be exactly those the weights file
    gives (the same file, by sha256). Returns whether loading must be non-strict (something was left out)."""
    missing = set(method.state_dict()) - set(checkpoint["state_dict"])
    if not missing:
        return False
    saved = identity_of(checkpoint).get("backbone", {})
    key = WEIGHTS_OPTION.get()
    if not method.backbone.weights:
        raise ConfigError(
            f"the checkpoint holds no frozen backbone tensors ({len(missing)} keys); set "
            f"{key} to the file it was trained from ({saved.get('weights')})"
        )
    unexpected = missing - method.reattachable_keys()
    if unexpected:
        raise ConfigError(f"the checkpoint lacks trained tensors: {', '.join(sorted(unexpected)[:5])}")
    want, have = saved.get("weights_sha256"), method.backbone.identity["weights_sha256"]
    if want and want != have:
        raise ConfigError(
            f"{key}={method.backbone.weights!r} (sha256 {have[:12]}) is not the file this checkpoint "
            f"was trained with ({saved.get('weights')}, sha256 {want[:12]})"
        )
    return True


def sparse_delta(params: dict[str, torch.Tensor], index: dict[str, torch.Tensor]) -> dict[str, dict]:
    """The elements ``index[name]`` of each parameter: ``{name: {"index", "value"}}`` (FisherTune's selection)."""
    return {n: {"index": i.cpu(), "value": params[n].detach().reshape(-1)[i].cpu()} for n, i in index.items()}


def apply_sparse_delta(
    state: dict, delta: dict[str, dict], pretrained: dict[str, torch.Tensor], prefix: str
) -> None:
    """Into ``state``: each ``prefix + name`` is its pretrained tensor with the delta's elements written over it
    (unless the checkpoint already holds the whole tensor: a run without a weights file)."""
    for name, d in delta.items():
        if prefix + name in state:
            continue
        state[prefix + name] = with_elements(pretrained[name], d)


def with_elements(base: torch.Tensor, d: dict[str, torch.Tensor]) -> torch.Tensor:
    """A copy of ``base`` with the elements ``d["index"]`` (of its flat view) set to ``d["value"]``."""
    full = base.detach().clone()
    full.view(-1)[d["index"].to(full.device)] = d["value"].to(full.device, full.dtype)
    return full


# ------------------------------------------------------------------------------------------ random states
def rng_states() -> dict[str, Any]:
    """The process's random streams (torch CPU, this device's CUDA, Python, numpy) as tensors and plain values (the
    checkpoint stays loadable with ``weights_only``): dropout, drop-path and the loss's point sampling continue
    after a resume exactly as without the interruption."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "python": [version, torch.tensor(mt, dtype=torch.int64), gauss],
              "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}  # fmt: skip
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()  # this device only: every device's would wake all GPUs
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    version, mt, gauss = states["python"]
    random.setstate((version, tuple(int(v) for v in mt.tolist()), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
