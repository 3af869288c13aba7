"""Backbone weight files: reading a user's file safely (``.safetensors``, or ``.pth`` / ``.bin`` with
``weights_only``), through the architecture's timm filter (official key names to timm's, pos-embed resampling),
checked against the model it loads into, and ``backbone.weights=hub`` from the Hugging Face cache. Every failure is
one :class:`~dgss.errors.ConfigError` line naming the option the running command takes (:data:`WEIGHTS_OPTION`)."""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import io
import os
import sys
from pathlib import Path

import huggingface_hub
import timm
import torch
from huggingface_hub import errors
from safetensors.torch import load_file as load_safetensors
from torch import nn

from dgss.errors import ConfigError, state_mismatch
from dgss.io import load_file

#: how the command being run names the backbone's weights file in its messages: ``backbone.weights`` (dgss-train),
#: ``backbone_weights`` (dgss-eval, dgss-predict), ``--backbone-weights`` (dgss-merge); set by ``load_method``
WEIGHTS_OPTION: contextvars.ContextVar[str] = contextvars.ContextVar(
    "WEIGHTS_OPTION", default="backbone.weights"
)


def read_weights(path: Path, key: str) -> dict[str, torch.Tensor]:
    """The state dict of a weights file (``.safetensors``, or ``.pth`` / ``.bin`` loaded with ``weights_only``), picked
    and cleaned as ``timm.models.load_state_dict`` does; every unreadable file as one :class:`ConfigError` line."""
    if path.suffix == ".safetensors":
        if path.stat().st_size == 0:
            raise ConfigError(
                f"{key}={str(path)!r} is empty (0 bytes): an interrupted copy or download? copy it again"
            )
        try:
            checkpoint = load_safetensors(str(path))
        except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
            detail = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            raise ConfigError(f"{key}={str(path)!r} is not a readable .safetensors file, or it is truncated "
                              f"({type(e).__name__}: {detail[:120]}); copy it again or point at the right file") from None  # fmt: skip
    else:
        checkpoint = load_file(path, key)
    if isinstance(checkpoint, dict):
        for k in ("state_dict_ema", "model_ema", "state_dict", "model"):
            if isinstance(checkpoint.get(k), dict):
                checkpoint = checkpoint[k]
                break
    if (
        not isinstance(checkpoint, dict)
        or not checkpoint
        or not all(torch.is_tensor(v) for v in checkpoint.values())
    ):
        raise ConfigError(f"{key}={str(path)!r} holds no state dict of tensors; point it at a backbone's weights file "
                          "(dgss-convert-weights makes one from an official release)")  # fmt: skip
    return timm.models.clean_state_dict(checkpoint)


def timm_filter(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``state`` through the ``checkpoint_filter_fn`` of ``model``'s timm module (official key names to timm's), if
    it has one. timm's DINOv3 filter prints one "`q_bias` is not an nn.Parameter" line per block for models
    without q/v biases (it probes for them): its console output is dropped."""
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is None:
        return state
    with contextlib.redirect_stdout(io.StringIO()):
        return filter_fn(state, model)


def dropped_dinov3_biases(state: dict[str, torch.Tensor], model: nn.Module) -> list[str]:
    """Meta's DINOv3 layout (``storage_tokens``) holds ``attn.qkv.bias`` (masked by ``bias_mask``); timm's plain
    variants have no q/v bias and its filter drops them silently. The blocks whose effective bias is not zero (the
    released ViTs' are all zero, so the plain names compute the same function): a file that needs the ``_qkvb``
    variant."""
    if "storage_tokens" not in state or getattr(model.blocks[0].attn, "q_bias", None) is not None:
        return []
    out = []
    for k, v in state.items():
        if k.endswith("attn.qkv.bias"):
            mask = state.get(k[: -len("bias")] + "bias_mask")
            if bool(((v * mask) if mask is not None else v).abs().max() > 0):
                out.append(k)
    return out


def hub_weights(name: str) -> Path:
    """``backbone.weights=hub``: timm's pretrained weights of ``name`` (architecture with its tag) as a local file of
    the Hugging Face cache (``HF_HUB_CACHE``, default ``~/.cache/huggingface/hub``), downloaded first when online. One
    :class:`ConfigError` line when it cannot be had: offline without a cached copy, a gated model (DINOv3: accept its
    licence on huggingface.co, then ``hf auth login``), or no hub copy at all."""
    try:
        cfg = timm.get_pretrained_cfg(name)
    except RuntimeError:  # a tag timm does not know
        cfg = None
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        raise ConfigError(f"backbone.weights=hub: timm has no Hugging Face copy of {name!r}; pass a local file "
                          "(backbone.weights=<path>, dgss-convert-weights makes one from an official release)")  # fmt: skip
    cache = os.environ.get("HF_HUB_CACHE") or huggingface_hub.constants.HF_HUB_CACHE
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    last: Exception | None = None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        try:
            return Path(
                huggingface_hub.hf_hub_download(repo, filename, cache_dir=cache, local_files_only=offline)
            )
        except errors.EntryNotFoundError as e:  # this repository has the other file
            last = e
        except errors.LocalEntryNotFoundError as e:
            last = e
        except (errors.GatedRepoError, errors.RepositoryNotFoundError):
            raise ConfigError(f"backbone.weights=hub: {repo} is gated on Hugging Face (or not visible to you): accept "
                              "its licence on huggingface.co and log in (hf auth login), or pass a local file "
                              "(backbone.weights=<path>)") from None  # fmt: skip
        except Exception as e:  # noqa: BLE001 - network errors and the like: the same two fixes
            last = e
    why = (
        "this machine is offline (HF_HUB_OFFLINE=1)"
        if offline
        else f"the download failed ({type(last).__name__})"
    )
    raise ConfigError(f"backbone.weights=hub: {name} ({repo}) is not in the Hugging Face cache {cache} and {why}; go "
                      "online once to download it (unset HF_HUB_OFFLINE), or pass a local file: "
                      "backbone.weights=<path>")  # fmt: skip


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def filtered_state(path: Path, model: nn.Module, arch: str) -> dict[str, torch.Tensor]:
    """The weights file's state dict through ``model``'s timm filter, classifier keys the model lacks left out."""
    state = read_weights(path, WEIGHTS_OPTION.get())
    biased = dropped_dinov3_biases(state, model)
    if biased:
        raise ConfigError(f"{WEIGHTS_OPTION.get()}={str(path)!r} has non-zero attention q/v biases ({biased[0]}, "
                          f"{len(biased)} blocks) that {arch} has no place for (timm would drop them); "
                          f"use backbone.name={arch}_qkvb")  # fmt: skip
    try:
        state = timm_filter(state, model)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(
            f"{WEIGHTS_OPTION.get()}={str(path)!r} does not fit {arch}: timm's filter failed with {e}"
        ) from None
    own = model.state_dict()
    classifier = ("head.", "fc_norm.") if not any(k.startswith("head.") for k in own) else ()
    return {k: v for k, v in state.items() if k in own or not k.startswith(classifier)}


def checked_state(path: str | os.PathLike, model: nn.Module, name: str, arch: str) -> dict[str, torch.Tensor]:
    """:func:`filtered_state` of a local file that must fit ``model`` exactly (``name``: ``backbone.name``)."""
    path = Path(path).expanduser()
    key = WEIGHTS_OPTION.get()
    if path.exists() and not path.is_file():
        raise ConfigError(f"{key}={str(path)!r} is {'a folder' if path.is_dir() else 'not a regular file'}; "
                          "point it at a .pth/.safetensors weights file")  # fmt: skip
    if not path.is_file():
        raise ConfigError(
            f"{key}={str(path)!r} does not exist; point it at a local .pth/.safetensors file "
            "(dgss never downloads weights)"
        )
    state = filtered_state(path, model, arch)
    if any(k.startswith("backbone.model.") for k in state):
        raise ConfigError(f"{key}={str(path)!r} is a dgss-train checkpoint, not backbone weights: pass it "
                          "as ckpt_path=, and the backbone's own weights file as backbone.weights")  # fmt: skip
    problem = state_mismatch(model.state_dict(), state)
    if problem:
        raise ConfigError(
            f"{key}={str(path)!r} does not fit backbone.name={name!r} ({problem}); point it at "
            "this model's weights (dgss-convert-weights makes them from an official release)"
        )
    return state
