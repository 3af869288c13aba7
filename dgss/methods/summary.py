"""The parameter summary every method prints and logs at fit start: total, trainable (and its share), the backbone's
and the head's counts, and a method's own (``extra_summary``: COBOT's extra parameters, SoMA's singular components)."""

from __future__ import annotations

from torch import nn


def parameter_summary(method: nn.Module) -> dict[str, float]:
    """Counts logged at fit start (console, ``<task>.log``, every logger's hyperparameters), with the method's own
    (``method.extra_summary()``)."""
    total = sum(p.numel() for p in method.parameters())
    trainable = sum(p.numel() for p in method.parameters() if p.requires_grad)
    return {
        "params/total": total,
        "params/trainable": trainable,
        "params/trainable_pct": 100.0 * trainable / max(total, 1),
        "params/backbone": sum(p.numel() for p in method.backbone.parameters()),
        "params/backbone_trainable": sum(p.numel() for p in method.backbone.parameters() if p.requires_grad),
        "params/head": sum(p.numel() for p in method.head.parameters()),
        **method.extra_summary(),
    }


def describe_summary(name: str, s: dict[str, float], extra: dict[str, float]) -> str:
    """The summary as one console line."""
    own = "".join(f", {k.removeprefix('params/').replace('_', ' ')} {int(v):,}" for k, v in extra.items())
    return (f"{name}: {s['params/total']:,} parameters, {s['params/trainable']:,} trainable "
            f"({s['params/trainable_pct']:.2f}%), backbone trainable {s['params/backbone_trainable']:,}, "
            f"head {s['params/head']:,}{own}")  # fmt: skip
