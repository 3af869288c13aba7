"""Hydra schemas generated from constructors' signatures: a backbone, a head, a data module, its pipelines and the
Lightning ``Trainer`` are configured by their own ``__init__`` parameters, with the types and defaults Python gives
them, so a YAML file holds only what differs from those defaults, and a misspelt key or a value of the wrong type
fails at compose time in one line (as the methods' :class:`dgss.options.Options` do).

A registered schema is a dataclass in Hydra's ConfigStore (``<group>/<name>``; a YAML file lists it first in its
defaults). OmegaConf 2.3 holds a union (``int | Sequence[int]``), a ``Literal`` or a class it does not know as
``Any``; :func:`check_node` checks those values against the real annotation after composing.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, get_args, get_origin

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig
from omegaconf.errors import OmegaConfBaseException

from dgss.errors import ConfigError
from dgss.options import check_value

#: Hydra's own keys of an instantiable node
HYDRA_KEYS = ("_target_", "_partial_", "_convert_", "_recursive_", "_args_")


@dataclasses.dataclass(frozen=True)
class Signature:
    """What :func:`register_signature` knows of one class: its dotted name, parameters and annotations."""

    target: str
    cls: type
    hints: dict[str, Any]
    supplied: tuple[str, ...]  # parameters the caller passes when it builds the object (never in a config)

    @property
    def options(self) -> list[str]:
        return [n for n in self.hints if n not in self.supplied]


#: ``_target_`` -> its signature, for every registered class (also the nested ones: a data module's pipelines)
SIGNATURES: dict[str, Signature] = {}


def dotted(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def parameters(cls: type) -> tuple[list[inspect.Parameter], dict[str, Any]]:
    """``cls.__init__``'s named parameters (no ``self``, ``*args``, ``**kwargs``) and their annotations."""
    init = cls.__init__
    hints = typing.get_type_hints(init)
    params = [
        p
        for p in list(inspect.signature(init).parameters.values())[1:]
        if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    return params, {p.name: hints.get(p.name, Any) for p in params}


def omegaconf_type(hint: Any, nested: Mapping[type, type]) -> Any:
    """The annotation OmegaConf 2.3 can hold for ``hint``: ``int``, ``float``, ``str``, ``bool``, ``X | None`` as
    ``Optional``, a class with a registered schema as that schema, anything else (unions, sequences, mappings,
    ``Literal``) ``Any``, which :func:`check_node` checks after composing.

    >>> omegaconf_type(int | None, {}), omegaconf_type(Sequence[int], {}), omegaconf_type(int | str, {})
    (typing.Optional[int], typing.Any, typing.Any)
    """
    origin, args = get_origin(hint), get_args(hint)
    if hint in (int, float, str, bool):
        return hint
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        inner = omegaconf_type(rest[0], nested) if len(rest) == 1 else Any
        return typing.Optional[inner] if inner is not Any and len(rest) < len(args) else inner  # noqa: UP045
    if origin in (list, tuple, dict, Sequence, Mapping) or hint in (list, tuple, dict, Mapping):
        # held as Any: OmegaConf resolves an interpolation merged into a typed list or dict while composing (data=
        # folder's class names come from a resolver over a key the command line fills); check_node checks the items
        return Any
    if isinstance(hint, type) and hint in nested:
        return nested[hint]
    return Any


def _optional_inner(hint: Any) -> Any:
    """``X`` of ``Optional[X]``; None for another union."""
    args = [a for a in get_args(hint) if a is not type(None)]
    return args[0] if len(args) == 1 else None


def _field(name: str, kind: Any, default: Any) -> tuple[str, Any, dataclasses.Field]:
    if default is inspect.Parameter.empty:
        return name, kind, dataclasses.field(default=MISSING)
    if isinstance(default, (tuple, list)):
        return name, kind, dataclasses.field(default_factory=lambda d=default: list(d))
    if isinstance(default, dict):
        return name, kind, dataclasses.field(default_factory=lambda d=default: dict(d))
    if default is not None and not isinstance(default, (int, float, str, bool)):
        raise TypeError(f"{name}'s default {default!r} cannot be written in a config")
    return name, kind, dataclasses.field(default=default)


def signature_schema(
    cls: type,
    *,
    supplied: Iterable[str] = (),
    partial: bool = False,
    convert: Literal["none", "partial", "object", "all"] | None = None,
    nested: Mapping[type, type] | None = None,
    target: str | None = None,
) -> type:
    """A Hydra node for building ``cls``: ``_target_`` (and ``_partial_`` / ``_convert_`` when given), then every
    parameter of its ``__init__`` not ``supplied`` by the caller, with its default (``???`` where it has none).

    Args:
        cls: the class the node builds.
        supplied: parameters the code passes itself (a head's ``in_channels`` and ``num_classes``).
        partial: ``_partial_: true`` (the caller completes the object: a head).
        convert: ``_convert_`` of the node (``all``: the object gets plain lists and dicts).
        nested: classes of parameters that have schemas of their own (a data module's pipelines); where such a
            parameter defaults to ``None`` (the object built with its own defaults), the node holds those defaults.
        target: the ``_target_`` to write, where the class is public under a shorter path than its module's
            (``lightning.pytorch.Trainer``); by default ``<module>.<name>``.

    >>> class Pipe:
    ...     def __init__(self, size: Sequence[int] = (8, 8), flip: float = 0.5): ...
    >>> from omegaconf import OmegaConf
    >>> node = OmegaConf.structured(signature_schema(Pipe))
    >>> node.size, node.flip, node._target_.endswith("Pipe")
    ([8, 8], 0.5, True)
    """
    supplied, target = tuple(supplied), target or dotted(cls)
    params, hints = parameters(cls)
    SIGNATURES[target] = Signature(target, cls, hints, supplied)
    fields = [("_target_", str, dataclasses.field(default=target))]
    if partial:
        fields.append(("_partial_", bool, dataclasses.field(default=True)))
    if convert is not None:
        fields.append(("_convert_", str, dataclasses.field(default=convert)))
    for p in params:
        if p.name in supplied:
            continue
        kind = omegaconf_type(hints[p.name], nested or {})
        inner = _optional_inner(kind) if get_origin(kind) in (typing.Union, types.UnionType) else kind
        built_with_defaults = p.default is None and dataclasses.is_dataclass(inner)  # ``None`` = ``cls()``
        if built_with_defaults:
            fields.append((p.name, kind, dataclasses.field(default_factory=inner)))
        else:
            fields.append(_field(p.name, kind, p.default))
    return dataclasses.make_dataclass(f"{cls.__name__}Schema", fields)


def register_signature(cls: type, group: str, name: str, **kwargs: Any) -> type:
    """:func:`signature_schema` of ``cls`` in Hydra's ConfigStore as ``<group>/<name>``."""
    node = signature_schema(cls, **kwargs)
    ConfigStore.instance().store(group=group, name=name, node=node)
    GROUP_TARGETS.setdefault(group, set()).update(
        [node._target_, *(s._target_ for s in (kwargs.get("nested") or {}).values())]
    )
    return node


#: config group -> the ``_target_`` values its registered schemas name, their nested nodes' included (dgss.trust
#: allows a stored config to name them; the YAML files no longer do)
GROUP_TARGETS: dict[str, set[str]] = {}


def check_node(node: Any, where: str) -> None:
    """Every instantiable node under ``node`` (a composed config section, resolved) whose ``_target_`` has a
    registered signature: each key is one of its parameters, each value fits its annotation (the unions and
    ``Literal`` choices OmegaConf cannot check). One :class:`ConfigError` line naming the key."""
    if isinstance(node, (DictConfig, ListConfig)):
        node = _resolved(node)
    if isinstance(node, list):
        for i, v in enumerate(node):
            check_node(v, f"{where}[{i}]")
        return
    if not isinstance(node, Mapping):
        return
    sig = SIGNATURES.get(str(node.get("_target_")))
    for key, value in node.items():
        if key in HYDRA_KEYS:
            continue
        if sig is not None:
            if value is UNRESOLVED:
                continue
            if key not in sig.hints or key in sig.supplied:
                raise ConfigError(
                    f"{where}.{key} is not an option of {sig.cls.__name__}; valid: {', '.join(sig.options)}"
                )
            if not (isinstance(value, Mapping) and "_target_" in value):
                check_value(value, config_hint(sig.hints[key]), f"{where}.{key}")
        check_node(value, f"{where}.{key}")


def config_hint(hint: Any) -> Any:
    """``hint`` without the classes a config value cannot be (``datetime.timedelta`` in ``int | timedelta``): a
    union keeps the members a YAML value can match.

    >>> import datetime
    >>> config_hint(int | datetime.timedelta | None)
    typing.Optional[int]
    """
    if get_origin(hint) not in (typing.Union, types.UnionType):
        return hint
    keep = [a for a in get_args(hint) if not _foreign(a)]
    return typing.Union[tuple(keep)] if keep and len(keep) < len(get_args(hint)) else hint  # noqa: UP007


def _foreign(hint: Any) -> bool:
    return isinstance(hint, type) and hint not in (int, float, str, bool, type(None), list, dict, tuple)


UNRESOLVED = object()  # a value whose interpolation only the run can resolve (``${hydra:...}``)


def _resolved(node: DictConfig | ListConfig) -> Any:
    """``node`` as plain containers, each value resolved where it can be outside a run."""
    items = (
        node.items_ex(resolve=False)
        if isinstance(node, DictConfig)
        else enumerate(node._iter_ex(resolve=False))
    )
    out = {}
    for key, _ in items:
        try:
            value = node[key]
        except OmegaConfBaseException:
            out[key] = UNRESOLVED
            continue
        out[key] = _resolved(value) if isinstance(value, (DictConfig, ListConfig)) else value
    return out if isinstance(node, DictConfig) else list(out.values())


def defaults_of(target: str) -> dict[str, Any]:
    """The Python defaults of a registered class's options (tuples as lists, as a config holds them)."""
    sig = SIGNATURES[target]
    params, _ = parameters(sig.cls)
    return {
        p.name: list(p.default) if isinstance(p.default, tuple) else p.default
        for p in params
        if p.default is not inspect.Parameter.empty and p.name not in sig.supplied
    }
