"""timm vision transformers as segmentation backbones: features from chosen blocks and a per-block hook.

One wrapper covers the four families DGSS papers use; it hides their token layouts behind one view:

  ViT / DINOv2 (incl. registers) / CLIP  ``VisionTransformer``      tokens (B, prefix + H·W, C)
  EVA02                                  ``Eva``                    tokens (B, 1 + H·W, C), rope per block
  SAM ViT                                ``VisionTransformerSAM``   tokens (B, H, W, C), no prefix

Hooks registered with :meth:`Backbone.register_block_hook` run after every block as
``hook(tokens, block_idx) -> tokens`` on a batch-first ``(B, prefix + N, C)`` view for every family; what
they return feeds the next block. :meth:`Backbone.block_parts` hands in-block methods (LoRA, AdaptFormer,
COBOT) the attention and MLP modules of a block, with their dotted paths for replacement.
"""

from __future__ import annotations

import difflib
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer_sam import VisionTransformerSAM
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.hooks import RemovableHandle

from dgss.compat import parameters_swapped, vit_pos_embed
from dgss.errors import ConfigError
from dgss.models.cast_once import FrozenCast
from dgss.models.weights import checked_state, file_sha256, filtered_state, hub_weights
from dgss.schemas import register_signature

BlockHook = Callable[[torch.Tensor, int], torch.Tensor]

FAMILY_PATTERNS = {
    "dinov2": ["vit_*dinov2*"],
    "eva02": ["eva02_*"],
    "sam": ["samvit_*"],
    "clip": ["vit_*clip*"],
    "dinov3": [
        "vit_*dinov3*"
    ],  # timm's Eva class (RoPE); use the plain names, not *_qkvb (https://github.com/facebookresearch/dinov3)
}
# random-init CPU variants: the real classes at toy width/depth
TINY_KWARGS = {
    "vit": dict(depth=4, embed_dim=64, num_heads=2),
    "eva": dict(depth=4, embed_dim=64, num_heads=2),
    "sam": dict(depth=4, embed_dim=64, num_heads=2, global_attn_indexes=(1, 3), window_size=4, neck_chans=32),
}
DEFAULT_OUT_FRACTIONS = (1 / 3, 1 / 2, 2 / 3, 1)  # 24 blocks -> [7, 11, 15, 23]; 12 -> [3, 5, 7, 11]


def supported_models() -> list[str]:
    """timm architecture names of the supported families."""
    return sorted({n for pats in FAMILY_PATTERNS.values() for n in timm.list_models(pats)})


def default_out_indices(depth: int) -> list[int]:
    """Rein's block choice generalised: [7, 11, 15, 23] for 24 blocks, [3, 5, 7, 11] for 12, all of 4."""
    if depth <= 4:
        return list(range(depth))
    return sorted({max(round(depth * f) - 1, 0) for f in DEFAULT_OUT_FRACTIONS})


@dataclass
class BlockParts:
    """The modules of one transformer block that in-block PEFT methods wrap.

    ``qkv`` is the fused projection (ViT, SAM, fused EVA) or None; ``q``/``k``/``v`` are set where the
    family has separate projections (EVA02). ``qkv_bias_in_attn``: the attention adds separate q/v biases
    around a bias-free fused ``qkv`` and calls ``F.linear`` on its weight directly (fused EVA), so wrapping
    the ``qkv`` module alone changes nothing there. ``path`` is the block's dotted path inside ``model``.
    """

    index: int
    path: str
    block: nn.Module
    attn: nn.Module
    mlp: nn.Module
    proj: nn.Linear
    qkv: nn.Linear | None = None
    q: nn.Linear | None = None
    k: nn.Linear | None = None
    v: nn.Linear | None = None
    qkv_bias_in_attn: bool = False
    global_attn: bool = True  # SAM: windowed blocks are False


class Backbone(nn.Module):
    """A timm ViT-family model that returns (B, C, h, w) maps from ``out_indices`` blocks.

    Args:
        name: timm model name (architecture, optionally with a pretrained tag).
        weights: local checkpoint file (``.pth``/``.bin``/``.safetensors``) loaded through the model's own
            timm filter (pos-embed / patch resampling); ``None`` keeps the random init; ``"hub"``: timm's pretrained
            copy of ``name`` from the Hugging Face cache (downloaded when online: :func:`hub_weights`).
        out_indices: blocks whose outputs become features; ``None`` = ``default_out_indices(depth)``.
        img_size: pretraining grid of the pos-embed (resampled once at load, dynamically per input).
        tiny: build a 4-block, 64-wide random-init variant of the same class for CPU work (features from
            all 4 blocks; ``out_indices`` and ``weights`` do not apply).
        final_norm: apply the model's final norm to the features (Rein: off).
        grad_checkpointing: recompute block activations in backward.
        model_kwargs: passed to ``timm.create_model`` (e.g. ``patch_size``, ``drop_path_rate``).
        mean / std: the input normalisation (RGB in [0, 1]); ``None`` = timm's pretrained config of ``name`` (Rein
            normalises every backbone with ImageNet's: set them to reproduce that for CLIP / EVA02).
    """

    def __init__(
        self,
        name: str,
        weights: str | None = None,
        out_indices: Sequence[int] | None = None,
        img_size: int | Sequence[int] | None = None,
        tiny: bool = False,
        final_norm: bool = False,
        grad_checkpointing: bool = False,
        model_kwargs: dict | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__()
        if (mean is None) != (std is None) or any(len(v) != 3 for v in (mean, std) if v is not None):
            raise ConfigError(
                f"backbone.mean={mean} and backbone.std={std}: give both (RGB in [0, 1]) or neither"
            )
        self.mean = tuple(float(v) for v in mean) if mean is not None else None
        self.std = tuple(float(v) for v in std) if std is not None else None
        arch = name.split(".")[0]
        if arch not in timm.list_models() and not timm.list_models(arch):
            valid = supported_models()
            close = difflib.get_close_matches(arch, valid, n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ConfigError(
                f"backbone.name={name!r} is not a timm model; {hint}valid names: {', '.join(valid)}"
            )
        kwargs = dict(model_kwargs or {})
        if img_size is not None:
            kwargs["img_size"] = tuple(img_size) if isinstance(img_size, Sequence) else img_size
        family = _family_of_name(arch)
        if tiny:
            kwargs = {**TINY_KWARGS[family], **kwargs}
            if weights:
                raise ConfigError(
                    f"backbone.tiny=true builds a random-init toy model, but backbone.weights={weights!r} is set; "
                    "drop one of them"
                )
        if family in ("vit", "eva"):
            kwargs.setdefault("dynamic_img_size", True)  # any input size that is a multiple of the patch
        self.name, self.tiny = name, tiny
        self._arch, self._kwargs = arch, kwargs
        self.model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
        self.family = _family_of_model(self.model)
        self.weights = str(weights) if weights else None
        self.weights_sha256: str | None = None
        if weights == "hub":  # timm's pretrained copy through the Hugging Face cache
            weights = str(hub_weights(name))
        if weights:
            self.load_weights(weights)
        if self.family == "sam":
            self.model.neck = nn.Identity()  # the SAM neck is not used for segmentation features
        self.depth = len(self.model.blocks)
        if tiny:  # the configured indices are for the full-depth model
            out_indices = None
        self.out_indices = list(out_indices) if out_indices is not None else default_out_indices(self.depth)
        bad = [i for i in self.out_indices if not -self.depth <= i < self.depth]
        if bad:
            raise ConfigError(
                f"backbone.out_indices={self.out_indices} has {bad} outside the {self.depth} blocks of {name}"
            )
        self.out_indices = sorted(i % self.depth for i in self.out_indices)
        self.final_norm = final_norm
        if not final_norm:  # unused parameters would stall DDP (find_unused_parameters) and skew counts
            self.model.norm = nn.Identity()
            if hasattr(
                self.model, "fc_norm"
            ):  # avg-pool models (EVA02): the last norm sits after the pooling
                self.model.fc_norm = nn.Identity()
        if getattr(self.model, "mask_token", None) is not None:  # masked-image-modelling only
            self.model.mask_token.requires_grad_(False)
        self.grad_checkpointing = grad_checkpointing
        self._block_hooks: OrderedDict[int, BlockHook] = OrderedDict()
        self._model_hooks: set[int] = set()  # ids of the hooks that change what the trained model computes
        self.cast = FrozenCast(self.model)  # frozen weights cast once under autocast

    # ------------------------------------------------------------------------------- properties
    @property
    def embed_dim(self) -> int:
        return self.model.embed_dim

    @property
    def last_norm(self) -> nn.Module:
        """The model's final norm: ``norm``, or ``fc_norm`` where timm applies it after average pooling (EVA02 with
        ``global_pool='avg'``: ``norm`` is the identity there); applied per token with ``final_norm``."""
        if isinstance(self.model.norm, nn.Identity):
            return getattr(self.model, "fc_norm", self.model.norm)
        return self.model.norm

    @property
    def num_blocks(self) -> int:
        return self.depth

    @property
    def patch_size(self) -> int:
        return int(self.model.patch_embed.patch_size[0])

    @property
    def num_prefix_tokens(self) -> int:
        return 0 if self.family == "sam" else int(self.model.num_prefix_tokens)

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) of RGB in [0, 1] the model expects: ``mean`` / ``std`` if given, else timm's pretrained config
        of ``name`` (ImageNet for DINOv2 / SAM, the CLIP values for CLIP / EVA02)."""
        if self.mean is not None:
            return self.mean, self.std
        cfg = timm.get_pretrained_cfg(self.name)
        cfg = cfg.to_dict() if cfg is not None else self.model.pretrained_cfg
        return tuple(cfg["mean"]), tuple(cfg["std"])

    @property
    def out_channels(self) -> list[int]:
        return [self.embed_dim] * len(self.out_indices)

    @property
    def identity(self) -> dict:
        """What re-creates the frozen part: stored in PEFT-only checkpoints."""
        if self.weights and self.weights_sha256 is None:
            self.weights_sha256 = file_sha256(self.weights)
        return {
            "name": self.name,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "tiny": self.tiny,
        }

    # ---------------------------------------------------------------------------------- weights
    def load_weights(self, path: str | os.PathLike) -> None:
        """Load a local weights file through the model's timm filter; one-line errors for bad files."""
        self.model.load_state_dict(checked_state(path, self.model, self.name, self._arch), strict=True)
        self.weights = str(Path(path).expanduser())

    def timm_state(self, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """A full timm state dict of this architecture, what ``weights=`` loads back: ``model``'s tensors (default this
        backbone's), and the parts dgss replaces for segmentation (the final norm, SAM's neck) from the weights file,
        or from the random init without one."""
        fresh = timm.create_model(self._arch, pretrained=False, num_classes=0, **self._kwargs)
        if self.weights:
            fresh.load_state_dict(filtered_state(Path(self.weights), fresh, self._arch), strict=True)
        own = (model if model is not None else self.model).state_dict()
        return {k: own.get(k, v) for k, v in fresh.state_dict().items()}

    # ------------------------------------------------------------------------------------ hooks
    @property
    def has_block_hooks(self) -> bool:
        """A hook that is part of the model runs after some block (Rein's refinement): the timm model alone is not
        this backbone. Hooks registered with ``part_of_model=False`` do not count."""
        return any(i in self._block_hooks for i in self._model_hooks)

    def register_block_hook(self, hook: BlockHook, part_of_model: bool = True) -> RemovableHandle:
        """Run ``hook(tokens, block_idx) -> tokens`` after every block, on (B, prefix + N, C) tokens.
        ``part_of_model=False``: the hook is the identity outside training passes of the method's own (FisherTune's
        perturbation), so the trained model is the timm model alone."""
        handle = RemovableHandle(self._block_hooks)
        if part_of_model:
            self._model_hooks.add(handle.id)
        self._block_hooks[handle.id] = hook
        return handle

    def block_parts(self, index: int) -> BlockParts:
        blk = self.model.blocks[index]
        attn, mlp = blk.attn, blk.mlp
        parts = BlockParts(index=index, path=f"blocks.{index}", block=blk, attn=attn, mlp=mlp, proj=attn.proj)
        if getattr(attn, "qkv", None) is not None:
            parts.qkv = attn.qkv
            parts.qkv_bias_in_attn = self.family == "eva" and getattr(attn, "q_bias", None) is not None
        else:
            parts.q, parts.k, parts.v = attn.q_proj, attn.k_proj, attn.v_proj
        if self.family == "sam":
            parts.global_attn = getattr(blk, "window_size", 0) == 0
        return parts

    def require_wrappable_qkv(self, parts: BlockParts, who: str) -> None:
        """In-block methods wrap a fused ``qkv`` module; where the attention adds q/v biases around it and calls
        ``F.linear`` on its weight (EVA with ``qkv_fused=True``, DINOv3's ``_qkvb``) a wrapper has no effect: one line
        naming the variant that works."""
        if not parts.qkv_bias_in_attn:
            return
        if "dinov3" in self.name:
            hint = (f"use the plain name {self._arch.replace('_qkvb', '')!r} (released DINOv3 weights have zero q/v "
                    "biases, so it computes the same function)")  # fmt: skip
        else:
            hint = "set +backbone.model_kwargs.qkv_fused=false"
        raise ConfigError(f"backbone.name={self.name!r} applies its q/v biases inside the attention around a fused "
                          f"qkv, where {who}'s wrapper would have no effect: {hint}")  # fmt: skip

    # ---------------------------------------------------------------------------------- forward
    def _embed(self, x: torch.Tensor):
        """Patch + position embedding: (tokens in the family's layout, (gh, gw), rope)."""
        m = self.model
        t = m.patch_embed(x)
        if t.ndim == 4:  # NHWC (dynamic size or SAM)
            grid = (t.shape[1], t.shape[2])
        else:
            grid = tuple(m.patch_embed.dynamic_feat_size(x.shape[-2:]))
        rope = None
        if self.family == "sam":
            if m.pos_embed is not None:
                t = t + timm.layers.resample_abs_pos_embed_nhwc(m.pos_embed, grid)
            t = m.pos_drop(t)
            t = m.patch_drop(t)
        elif self.family == "eva":
            t, rope = vit_pos_embed(m, t)
        else:
            t = vit_pos_embed(m, t)
            t = m.patch_drop(t)
        return m.norm_pre(t), grid, rope

    def _run_block(self, i: int, blk: nn.Module, x: torch.Tensor, rope) -> torch.Tensor:
        if self.family == "eva":
            r = rope[i] if rope is not None and getattr(self.model, "rope_mixed", False) else rope
            fn = lambda t: blk(t, rope=r)  # noqa: E731
        else:
            fn = blk
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, x, use_reentrant=False)
        return fn(x)

    def _apply_hooks(self, x: torch.Tensor, i: int) -> torch.Tensor:
        if self.family == "sam":
            b, h, w, c = x.shape
            flat = x.reshape(b, h * w, c)
            for hook in self._block_hooks.values():
                flat = hook(flat, i)
            return flat.reshape(b, h, w, c)
        for hook in self._block_hooks.values():
            x = hook(x, i)
        return x

    def _to_map(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if self.final_norm:
            x = self.last_norm(x)
        if self.family == "sam":
            return x.permute(0, 3, 1, 2).contiguous()
        b, _, c = x.shape
        return x[:, self.num_prefix_tokens :].transpose(1, 2).reshape(b, c, *grid)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        low = self.cast.weights(images.device.type) if not torch.compiler.is_compiling() else {}
        if not low:
            return self._forward(images)
        with parameters_swapped(self.model, low):
            return self._forward(images)

    def _forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x, grid, rope = self._embed(images)
        feats, last = [], self.out_indices[-1]
        for i, blk in enumerate(self.model.blocks):
            x = self._run_block(i, blk, x, rope)
            if self._block_hooks:
                x = self._apply_hooks(x, i)
            if i in self.out_indices:
                feats.append(self._to_map(x, grid))
            if i == last:
                break
        return feats


def _family_of_name(arch: str) -> str:
    if arch.startswith("samvit"):
        return "sam"
    if arch.startswith("eva") or "dinov3" in arch:
        return "eva"
    return "vit"


def _family_of_model(model: nn.Module) -> str:
    if isinstance(model, VisionTransformerSAM):
        return "sam"
    if isinstance(model, Eva):
        return "eva"
    if isinstance(model, VisionTransformer):
        return "vit"
    raise ConfigError(
        f"{type(model).__name__} is not a supported backbone class; use a DINOv2, EVA02, SAM-ViT or CLIP ViT model"
    )


register_signature(Backbone, "backbone", "backbone_schema")
