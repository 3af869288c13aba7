"""Classic PEFT on a frozen backbone: LoRA, AdaptFormer (Chen et al.'s original) and VPT-deep (the Rein paper's
baselines, COBOT's bases); their modules and options are in :mod:`dgss.methods.peft_layers`.

All three freeze the backbone (kept in eval mode) and train their own modules plus the head; checkpoints hold
those alone (the base drops the frozen backbone tensors). Modules are placed through
:meth:`Backbone.block_parts`, so the same code covers DINOv2 / CLIP (fused ``qkv``), EVA02 (``q_proj`` / ``v_proj``,
SwiGLU MLP) and SAM (NHWC tokens: the wrappers act on the last dimension).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from dgss.methods.base import MethodConfig, SegmentationMethod
from dgss.methods.peft_layers import (
    AdapterOptions,
    FusedQKVLoRA,
    LinearLoRA,
    LoRAOptions,
    PromptedBlock,
    PromptedSAMAttention,
    VPTOptions,
    wrap_adapters,
    wrap_lora,
)
from dgss.methods.residual_adapters import fold_wrappers
from dgss.options import Options, register


@dataclass
class LoRAConfig(MethodConfig):
    _target_: str = "dgss.methods.peft.LoRA"
    peft: LoRAOptions = field(default_factory=LoRAOptions)


@dataclass
class AdaptFormerConfig(MethodConfig):
    _target_: str = "dgss.methods.peft.AdaptFormer"
    peft: AdapterOptions = field(default_factory=AdapterOptions)


@dataclass
class VPTConfig(MethodConfig):
    _target_: str = "dgss.methods.peft.VPT"
    peft: VPTOptions = field(default_factory=VPTOptions)


# ------------------------------------------------------------------------------------------------ methods
class PEFTMethod(SegmentationMethod):
    """Frozen backbone (eval mode) + modules placed by :meth:`place`; they and the head train."""

    options_type: type[Options] = Options

    def __init__(self, *args, peft: Options | dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.peft_options = peft if isinstance(peft, Options) else self.options_type.of(peft, "method.peft")

    def configure_tuning(self) -> None:
        self.freeze(self.backbone)
        for module in self.place(self.backbone):  # new modules require grad; those they wrap stay frozen
            self.adopt(module)

    def place(self, backbone) -> list[nn.Module]:
        """Put the method's modules into ``backbone``; returns them."""
        raise NotImplementedError

    def peft_parameters(self) -> int:
        """Trainable parameters inside the backbone (the method's own, head excluded)."""
        return sum(p.numel() for p in self.backbone.parameters() if p.requires_grad)


class LoRA(PEFTMethod):
    options_type = LoRAOptions

    def place(self, backbone) -> list[nn.Module]:
        o = self.peft_options
        return [lr for pair in wrap_lora(backbone, o.rank, o.init) for lr in pair]

    def plain_backbone(self) -> nn.Module:
        """The backbone's timm model with every LoRA folded into the weight it sits beside: W' = W + B·A (a copy;
        ``dgss-merge --backbone-out``, ``dgss-export``)."""
        return fold_wrappers(self.backbone.model, (FusedQKVLoRA, LinearLoRA))


class AdaptFormer(PEFTMethod):
    options_type = AdapterOptions

    def place(self, backbone) -> list[nn.Module]:
        return wrap_adapters(backbone, self.peft_options)


class VPT(PEFTMethod):
    """VPT-deep. SAM: :class:`PromptedSAMAttention`."""

    options_type = VPTOptions

    def place(self, backbone) -> list[nn.Module]:
        n = self.peft_options.num_tokens
        for i, blk in enumerate(backbone.model.blocks):
            if backbone.family == "sam":
                blk.attn = PromptedSAMAttention(blk.attn, blk.norm1, backbone.embed_dim, n)
            else:
                backbone.model.blocks[i] = PromptedBlock(
                    blk, backbone.embed_dim, n, backbone.num_prefix_tokens
                )
        return []  # the prompts sit in wrappers of frozen blocks, which keep the blocks' eval mode


register(LoRAConfig, "method", "lora_schema")
register(AdaptFormerConfig, "method", "adaptformer_schema")
register(VPTConfig, "method", "vpt_schema")
