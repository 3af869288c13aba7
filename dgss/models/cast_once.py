"""Frozen weights cast once under autocast. Every ``nn.Linear`` / conv casts its weight and bias to the low precision
on every call; autocast caches the cast only for tensors that require grad, so a frozen backbone (Rein, VPT, frozen,
COBOT, SoMA's base) paid ~2 casts per layer per forward. Its frozen plain Linear / conv weights are cast once instead
(the same rounding: bit-identical outputs) and made again only when a weight changes (a load, EMA's swap); the
backbone's forward swaps them in (``dgss.compat.parameters_swapped``)."""

from __future__ import annotations

import torch
from torch import nn

from dgss.compat import tensor_version


class FrozenCast:
    """The low-precision copies of ``model``'s frozen plain layer weights; ``enabled=False`` casts per call again."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.enabled = True
        self._scan: tuple[list, list] | None = None
        self._cache: tuple | None = None

    def plain_layers(self) -> list[tuple[str, nn.Module]]:
        """Every plain ``nn.Linear`` / ``nn.Conv2d`` (its forward the only reader of its weights) outside dgss modules
        (an adapter may read its base layer's weight in float32). The structural scan is cached while every link from
        the model down to those layers still holds (a method wrapping a layer or its parent later makes a new scan)."""
        if self._scan is not None and all(
            getattr(parent, attr, None) is child for parent, attr, child in self._scan[1]
        ):
            return self._scan[0]
        dgss_owned: set[int] = set()
        for m in self.model.modules():
            if type(m).__module__.startswith("dgss."):
                dgss_owned |= {id(c) for c in m.modules() if c is not m}
        layers, links = [], {}
        for name, m in self.model.named_modules():
            if type(m).forward not in (nn.Linear.forward, nn.Conv2d.forward) or id(m) in dgss_owned:
                continue
            layers.append((name, m))
            parent = self.model
            for part in name.split("."):
                child = getattr(parent, part)
                links[(id(parent), part)] = (parent, part, child)
                parent = child
        self._scan = (layers, list(links.values()))
        return layers

    def castable(self) -> list[tuple[str, torch.Tensor]]:
        """Frozen weights and biases of :meth:`plain_layers`: what autocast would cast on every forward."""
        return [(f"{name}.{pname}" if name else pname, p) for name, m in self.plain_layers()
                for pname, p in m.named_parameters(recurse=False)
                if not p.requires_grad and p.is_floating_point()]  # fmt: skip

    def weights(self, device_type: str) -> dict[str, torch.Tensor]:
        """The frozen castable weights in autocast's dtype, made when a weight (or the dtype) changed; empty outside
        autocast or when disabled."""
        if not (self.enabled and torch.is_autocast_enabled(device_type)):
            return {}
        dtype = torch.get_autocast_dtype(device_type)
        params = self.castable()
        key = (dtype, tuple((n, id(p), tensor_version(p), p.device) for n, p in params))
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, {n: p.detach().to(dtype) for n, p in params})
        return self._cache[1]
