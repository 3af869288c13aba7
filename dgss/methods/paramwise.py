"""Parameter groups as mmengine's ``DefaultOptimWrapperConstructor`` builds them (``paramwise_cfg``), the rule the
official DGSS configs (w1oves/Rein and the baselines run in its code base) train with.

For every trainable parameter, visited module by module (``prefix.name`` as its full name):

1. **custom keys**: the first key that is a substring of the full name, keys tried longest first (ties in
   alphabetical order), sets ``lr = base_lr · lr_mult`` and ``weight_decay = base_wd · decay_mult`` (each 1 when not
   given), and no other rule applies;
2. otherwise ``norm_decay_mult`` for parameters of normalisation layers (BatchNorm, InstanceNorm, GroupNorm,
   LayerNorm), else ``bias_decay_mult`` for a parameter named ``bias``, else ``flat_decay_mult`` for any other 1-D
   parameter (each only when set; ``None`` = decay at the base rate).

So, unlike a "no decay on 1-D tensors" rule, a Linear's bias decays unless a key or ``bias_decay_mult`` says
otherwise. dgss's module names carry the substrings the official keys look for (``norm``, ``query_embed``,
``level_embed``, ``learnable_tokens``, ``reins.scale``, ``backbone``); tests/test_methods.py checks the groups of
each method against the official configs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from dgss.errors import ConfigError
from dgss.options import Options

NORM_TYPES = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.LayerNorm,
)
RULE_KEYS = ("lr_mult", "decay_mult")


def rein_custom_keys() -> dict[str, dict[str, float]]:
    """The keys every official Rein config shares (``configs/dinov2/rein_dinov2_mask2former_512x512_bs1x4.py``):
    norms, query and level embeddings without decay."""
    return {
        "norm": {"decay_mult": 0.0},
        "query_embed": {"decay_mult": 0.0},
        "level_embed": {"decay_mult": 0.0},
    }


@dataclass
class ParamwiseOptions(Options):
    """``method.paramwise``: mmengine's ``paramwise_cfg``. ``custom_keys`` merge over the method's own (a method
    adds its recipe's keys, e.g. Rein's tokens); set a key's rule to override it."""

    custom_keys: dict[str, dict[str, float]] = field(default_factory=rein_custom_keys)
    norm_decay_mult: float | None = 0.0
    bias_decay_mult: float | None = None
    flat_decay_mult: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for key, rule in self.custom_keys.items():
            if not isinstance(rule, Mapping) or set(rule) - set(RULE_KEYS):
                raise ConfigError(f"method.paramwise.custom_keys.{key} may set only {', '.join(RULE_KEYS)}; got "
                                  f"{sorted(rule) if isinstance(rule, Mapping) else rule!r}")  # fmt: skip


def rule_for(
    name: str, param: torch.Tensor, module: nn.Module, o: ParamwiseOptions
) -> tuple[float, float, str]:
    """(lr_mult, decay_mult, the rule that decided) of one parameter (``name`` = its full name)."""
    for key in sorted(sorted(o.custom_keys), key=len, reverse=True):
        if key in name:
            rule = o.custom_keys[key]
            return float(rule.get("lr_mult", 1.0)), float(rule.get("decay_mult", 1.0)), f"key {key!r}"
    leaf = name.rsplit(".", 1)[-1]
    if isinstance(module, NORM_TYPES) and o.norm_decay_mult is not None:
        return 1.0, float(o.norm_decay_mult), "norm layer"
    if leaf == "bias" and o.bias_decay_mult is not None:
        return 1.0, float(o.bias_decay_mult), "bias"
    if param.ndim == 1 and o.flat_decay_mult is not None:
        return 1.0, float(o.flat_decay_mult), "1-D"
    return 1.0, 1.0, "default"


def group_parameters(model: nn.Module, o: ParamwiseOptions) -> list[dict]:
    """Trainable parameters of ``model`` grouped by (lr_mult, decay_mult): dicts with ``params``, ``names``,
    ``lr_mult``, ``decay_mult`` and ``rules`` (which rule decided, per name), in first-seen order."""
    groups: dict[tuple[float, float], dict] = {}
    seen: set[int] = set()
    for prefix, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            name = f"{prefix}.{pname}" if prefix else pname
            lr_mult, decay_mult, why = rule_for(name, p, module, o)
            g = groups.setdefault((lr_mult, decay_mult), {"params": [], "names": [], "rules": [],
                                                         "lr_mult": lr_mult, "decay_mult": decay_mult})  # fmt: skip
            g["params"].append(p)
            g["names"].append(name)
            g["rules"].append(why)
    return list(groups.values())


def describe_groups(groups: list[dict], base_lr: float, base_wd: float) -> str:
    """One line per group: lr, weight decay, tensors, elements and which rules put them there."""
    lines = []
    for g in groups:
        n = sum(p.numel() for p in g["params"])
        rules = sorted(set(g.get("rules", [])))
        lines.append(f"  lr {base_lr * g['lr_mult']:.3g}, weight decay {base_wd * g['decay_mult']:.3g}: "
                     f"{len(g['params'])} tensors, {n:,} elements ({', '.join(rules) or g.get('name', '')})")  # fmt: skip
    return "\n".join(lines)
