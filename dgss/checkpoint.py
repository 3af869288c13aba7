"""The dgss checkpoint format, in one place: reading a user's file safely, writing atomically, what a checkpoint
holds of the model (frozen backbone tensors left out and re-attached from the weights file, checked by sha256;
FisherTune's selected elements as a sparse delta; the method that wrote it), rebuilding a method from one
(``load_method``: dgss-eval, dgss-predict), merging one with its weights file (``merge``: dgss-merge), random states,
and ``resume=auto``'s search.

``AtomicCheckpointIO`` (the trainer's checkpoint plugin) writes every checkpoint to a hidden temporary in the same
folder, fsyncs it and renames it over the target, so a kill at any moment leaves the previous file or the new one,
never a truncated one, and reads every checkpoint back with :func:`load_file` (``weights_only``). A dgss-train
checkpoint is Lightning's dict plus ``dgss_config`` (the resolved backbone / head / method / data config),
``dgss`` (backbone identity, dropped keys), ``rng_states`` and, for FisherTune, ``fishertune``.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from dgss import hub
from dgss.compat import should_accumulate
from dgss.errors import ConfigError, TrainingAborted
from dgss.io import atomic_path, check_output_file, remove_cut_off
from dgss.trust import check_stored_config, command_line_config_dirs

log = logging.getLogger("dgss.checkpoint")


class UnreadableFile(ConfigError):
    """A user's file that cannot be loaded; ``reason`` is the message without the file's name."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where} {reason}")
        self.reason = reason


def load_file(path: str | os.PathLike, key: str = "ckpt_path", mmap: bool = False) -> Any:
    """``torch.load`` of a file a user names, safely: ``weights_only=True`` (tensors and plain containers only, so a
    crafted file cannot run code), and every way it can fail as one :class:`ConfigError` line naming ``key``, the
    file and the fix. dgss's own checkpoints hold only such types."""
    path = Path(path).expanduser()
    where = f"{key}={str(path)!r}"
    if not path.exists():
        raise UnreadableFile(where, "does not exist")
    if path.is_dir():
        raise UnreadableFile(where, "is a folder, not a checkpoint file")
    if not path.is_file():
        raise UnreadableFile(
            where, "is not a regular file (a pipe, socket or device); point at a checkpoint file"
        )
    if path.stat().st_size == 0:
        raise UnreadableFile(where, "is empty (0 bytes): an interrupted copy or download? copy it again")
    check_archive(path, where)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - every failure of an untrusted file becomes one line
        if mmap and "mmap" in str(e):  # an old (non-zip) torch.save format: readable, just not memory-mapped
            return load_file(path, key, mmap=False)
        raise UnreadableFile(where, unreadable_reason(e)) from None


def check_archive(path: Path, where: str) -> None:
    """A zip archive (``torch.save``'s format) is read only if its records' declared sizes fit the file (records
    are stored uncompressed; a TorchScript archive's small code records aside): a crafted archive with a
    compressed record would make ``torch.load`` allocate its declared size (GBs from a few MB) before failing."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return  # the legacy pickle format, or not an archive at all: torch.load says which
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise UnreadableFile(
            where, f"is a damaged zip archive ({e}); copy it again or point at the right file"
        ) from None
    declared, size = sum(i.file_size for i in infos), path.stat().st_size
    if declared > size + ARCHIVE_SLACK:
        packed = next((i.filename for i in infos if i.compress_type != zipfile.ZIP_STORED), None)
        why = f", in compressed records ({packed}) torch.save never writes" if packed else ""
        raise UnreadableFile(where, f"declares {declared} bytes of records in a {size}-byte file{why}; refused "
                                    "unread (a crafted file can claim any size): copy it again, or re-save it")  # fmt: skip


ARCHIVE_SLACK = (
    64 << 20
)  # bytes an archive may declare beyond its size (TorchScript compresses its code records)


def unreadable_reason(e: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` (or a safetensors read) failed, as the tail of a one-line message."""
    msg = str(e)
    unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", msg)
    if unsafe:
        return (
            f"holds Python objects beyond tensors and plain containers ({unsafe.group(1)}); refused, since loading "
            "it could run code. dgss checkpoints and state dicts never need that: if you trust the file, re-save "
            "its tensors as a plain state dict (or .safetensors) and pass that"
        )
    detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", msg)  # torch's own reason, not its advice
    detail = detail.group(1) if detail else next((ln.strip() for ln in msg.splitlines() if ln.strip()), "")
    detail = f"{type(e).__name__}: {detail.split('. ')[0][:120]}" if detail else type(e).__name__
    return f"is not a readable PyTorch checkpoint, or it is truncated ({detail}); copy it again or point at the right file"


def load_checkpoint_dict(path: str | os.PathLike, key: str = "ckpt_path", mmap: bool = False) -> dict:
    """:func:`load_file` for a file that must be a dict (a Lightning checkpoint or a state dict)."""
    obj = load_file(path, key, mmap=mmap)
    if not isinstance(obj, dict):
        raise UnreadableFile(
            f"{key}={str(path)!r}", f"holds a {type(obj).__name__}, not a checkpoint (a dict)"
        )
    return obj


def write_failure(e: BaseException, path) -> str:
    """Why a write failed, in words: the errno's (a full disk, a read-only folder), else the error's first line."""
    err = (
        e
        if isinstance(e, OSError)
        else next((c for c in (e.__cause__, e.__context__) if isinstance(c, OSError)), None)
    )
    if err is not None and err.errno is not None:
        return os.strerror(err.errno).lower()
    try:
        if shutil.disk_usage(Path(path).parent).free < 1 << 20:
            return "no space left on device"
    except OSError:
        pass
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


class AtomicCheckpointIO(TorchCheckpointIO):
    """Local checkpoints written atomically (temporary in the same folder + fsync + ``os.replace``), read back with
    :func:`load_file` (``weights_only``; one-line errors)."""

    def load_checkpoint(
        self, path, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict:
        ckpt = load_checkpoint_dict(path)
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


def _is_training_checkpoint(path: Path) -> bool:
    try:
        return is_training_state(load_checkpoint_dict(path, "--out", mmap=True))
    except UnreadableFile:
        return False


def is_training_state(ckpt: dict) -> bool:
    """A checkpoint a run can resume from: Lightning's loops and the optimizer states, not a merged model file."""
    return "loops" in ckpt and "optimizer_states" in ckpt and "merged" not in (ckpt.get("dgss") or {})


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
def method_target(method) -> str:
    return f"{type(method).__module__}.{type(method).__name__}"


def check_same_method(checkpoint: dict, target: str) -> None:
    """A dgss checkpoint names the method it was trained with (``_target_``); loading it into another is a user
    error, named as such (not as the missing tensors it would otherwise surface as)."""
    saved = ((checkpoint.get("dgss_config") or {}).get("method") or {}).get("_target_")
    if saved and saved != target:
        raise ConfigError(
            f"the checkpoint was trained with method {saved.rsplit('.', 1)[-1]}, not {target.rsplit('.', 1)[-1]}: "
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
    checkpoint["dgss"] = {"backbone": method.backbone.identity, "dropped_keys": len(drop)}


def check_reattach(checkpoint: dict, method) -> bool:
    """Before loading ``checkpoint`` into ``method``: the tensors it left out must be exactly those the weights file
    gives (the same file, by sha256). Returns whether loading must be non-strict (something was left out)."""
    missing = set(method.state_dict()) - set(checkpoint["state_dict"])
    if not missing:
        return False
    from dgss.models.backbone import WEIGHTS_OPTION

    saved = checkpoint.get("dgss", {}).get("backbone", {})
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


# --------------------------------------------------------------------------------------------- rebuilding
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
    from dgss.models.backbone import WEIGHTS_OPTION

    token = WEIGHTS_OPTION.set(weights_option)
    try:
        return _load_method(ckpt_path, backbone_weights, inference, recipe, config_dirs)
    finally:
        WEIGHTS_OPTION.reset(token)


def _load_method(ckpt_path, backbone_weights, inference, recipe, config_dirs):
    from omegaconf import OmegaConf

    from dgss.config import build_method

    path = hub.resolve(ckpt_path)  # a local file, or hf://user/name checked against its release's manifest
    try:
        ckpt = load_checkpoint_dict(path, "ckpt_path")
    except UnreadableFile as e:  # named as the user named it (the Hub cache's path says little)
        if not str(ckpt_path).startswith(hub.SCHEME):
            raise
        raise UnreadableFile(f"ckpt_path={str(ckpt_path)!r}", e.reason) from None
    official = "dgss_config" not in ckpt
    if not official:
        dirs = command_line_config_dirs() if config_dirs is None else config_dirs
        check_stored_config(ckpt["dgss_config"], f"ckpt_path={str(path)!r}", dirs)
    if not official and recipe is not None:
        given = [k for k in ("backbone", "head", "method") if recipe.get(k) is not None]
        raise ConfigError(
            f"ckpt_path={str(path)!r} is a dgss-train checkpoint: it rebuilds its own "
            f"{str(ckpt['dgss_config']['method']['_target_']).rsplit('.', 1)[-1]} model, so {', '.join(given)} (or the "
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
        saved = OmegaConf.create(ckpt["dgss_config"])
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
    import hashlib

    from omegaconf import OmegaConf

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
        from safetensors.torch import save_file

        state = method.backbone.timm_state(method.plain_backbone())
        plain = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        with atomic_path(backbone_out) as tmp:
            save_file(
                plain, str(tmp), metadata={"dgss_merged_from": str(ckpt_path), "backbone": identity["name"]}
            )
        written["backbone_out"] = str(backbone_out)
    if out is None:
        return written
    ckpt = load_checkpoint_dict(ckpt_path)
    ckpt["state_dict"] = {k: v.detach().cpu() for k, v in method.state_dict().items()}
    cfg = OmegaConf.to_container(saved, resolve=True)
    cfg["backbone"]["weights"] = None  # every tensor is in this file now
    ckpt["dgss_config"] = cfg
    ckpt["dgss"] = {**ckpt.get("dgss", {}), "backbone": {**identity, "weights": None, "weights_sha256": None},
                    "merged": {"from": str(ckpt_path), "from_sha256": hashlib.sha256(Path(ckpt_path).read_bytes()).hexdigest(),
                               "backbone_weights": identity["weights"], "backbone_sha256": identity["weights_sha256"]}}  # fmt: skip
    for key in ("optimizer_states", "lr_schedulers"):
        ckpt.pop(key, None)
    with atomic_path(out) as tmp:
        torch.save(ckpt, tmp)
    return {"tensors": len(ckpt["state_dict"]), **ckpt["dgss"]["merged"], **written}


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
