"""Typed options: one dataclass per option group, the one place its keys, types, choices and defaults live.

A method's options are :class:`Options` dataclasses (``Literal[...]`` for choices); its Hydra node is a dataclass
registered in Hydra's ConfigStore (:func:`register`), so composing a config type-checks every key: a misspelt key or
a value of the wrong type fails at compose time, and the YAML files only hold recipes. OmegaConf 2.3 cannot check a
``Literal``: the registered schema holds it as a plain ``str`` / ``bool`` / ... and :meth:`Options.of` checks the
choice when the options are built, which ``dgss-train`` / ``dgss-eval`` do right after composing, before anything
else runs (``dgss.cli.check_compose``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections import abc
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from dgss.errors import ConfigError

T = TypeVar("T", bound="Options")
SCHEMAS: dict[str, list[type]] = {}  # a method's _target_ -> its registered Hydra nodes (dataclasses)
#: option paths that moved, old -> new (FisherTune's groups moved under ``method.fishertune``): a config that sets an
#: old one is refused in one line naming the new one (dgss.cli)
RENAMED: dict[str, str] = {}


def renamed(key: str) -> str | None:
    """Where an old option path (or one under it) lives now; None for a current one.

    >>> RENAMED["method.old"] = "method.new.old"
    >>> renamed("method.old.x"), renamed("method.other")
    ('method.new.old.x', None)
    >>> del RENAMED["method.old"]
    """
    for old, new in RENAMED.items():
        if key == old or key.startswith(old + "."):
            return new + key[len(old) :]
    return None


_WHERE: ContextVar[str | None] = ContextVar(
    "where", default=None
)  # the config path errors name (set by ``of``)


@dataclasses.dataclass
class Options:
    """Base of every option group. Subclasses are plain dataclasses; ``of`` builds one from a dict / DictConfig /
    instance / None with one-line errors naming ``where`` and the key."""

    def __post_init__(self) -> None:
        where = _WHERE.get() or type(self).__name__
        hints = get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, check_value(getattr(self, f.name), hints[f.name], f"{where}.{f.name}"))

    @classmethod
    def of(cls: type[T], value: Any = None, where: str | None = None) -> T:
        """``value`` (None, a mapping, a DictConfig or an instance) as ``cls``; missing keys take the defaults."""
        where = where or cls.__name__
        if isinstance(value, cls):
            return value
        if value is None:
            value = {}
        if isinstance(value, DictConfig):
            value = OmegaConf.to_container(value, resolve=True)
        elif dataclasses.is_dataclass(value):
            value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping of options, got {value!r}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise ConfigError(f"{where} has no option {unknown[0]!r}; valid: {', '.join(names)}")
        token = _WHERE.set(where)
        try:
            return cls(**value)
        finally:
            _WHERE.reset(token)


def option_path(options: Options) -> str:
    """The config path errors name for ``options`` while it is being built (``method.inference``)."""
    return _WHERE.get() or type(options).__name__


def check_value(value: Any, hint: Any, where: str) -> Any:
    """``value`` checked against the annotation ``hint`` (Literal choices, nested Options, int -> float)."""
    origin = get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return check_value(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}={value!r} must be {_describe(hint)}")
    if origin is Literal:
        if value not in get_args(hint) or type(value) is not type(
            next(a for a in get_args(hint) if a == value)
        ):
            raise ConfigError(f"{where}={value!r} is not supported; choose one of {list(get_args(hint))}")
        return value
    if isinstance(hint, type) and issubclass(hint, Options):
        return hint.of(value, where)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not (
        isinstance(value, hint) and (hint is bool or not isinstance(value, bool))
    ):
        raise ConfigError(f"{where}={value!r} must be {hint.__name__}")
    if origin in (list, tuple, abc.Sequence) and isinstance(value, (list, tuple)):
        (item,) = get_args(hint)[:1] or (Any,)
        return (
            [check_value(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
            if item is not Any
            else list(value)
        )
    if origin in (dict, abc.Mapping) and isinstance(value, Mapping):
        _, item = get_args(hint) or (Any, Any)
        return (
            {k: check_value(v, item, f"{where}.{k}") for k, v in value.items()}
            if item is not Any
            else dict(value)
        )
    if origin in (list, tuple, dict, abc.Sequence, abc.Mapping):
        kind = "mapping" if origin in (dict, abc.Mapping) else "list"
        raise ConfigError(f"{where}={value!r} must be a {kind}")
    return value


def _describe(hint: Any) -> str:
    """``int | Literal['a', 'b'] | None`` as ``int or 'a' or 'b' or null``."""
    words = []
    for a in get_args(hint):
        if a is type(None):
            words.append("null")
        elif get_origin(a) is Literal:
            words += [repr(v) for v in get_args(a)]
        elif get_origin(a) in (list, tuple, abc.Sequence):
            inner = [getattr(x, "__name__", str(x)) for x in get_args(a) if x is not Ellipsis]
            words.append(f"a list of {inner[0]}" if len(inner) == 1 else "a list")
        elif get_origin(a) in (dict, abc.Mapping):
            words.append("a mapping")
        else:
            words.append(getattr(a, "__name__", str(a)))
    return " or ".join(words)


# ---------------------------------------------------------------------------------------------- Hydra schema
def _schema_type(hint: Any) -> Any:
    """An annotation OmegaConf 2.3 accepts: Literal -> the type of its values; nested Options -> their schema."""
    origin = get_origin(hint)
    if origin is Literal:
        kinds = {type(a) for a in get_args(hint)}
        return kinds.pop() if len(kinds) == 1 else Any
    if origin in (typing.Union, types.UnionType):
        args = [_schema_type(a) for a in get_args(hint)]
        return typing.Optional[args[0]] if len(args) == 2 and type(None) in args else Any  # noqa: UP045
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return schema(hint)
    if origin in (list, tuple):
        return list[_schema_type(get_args(hint)[0])] if get_args(hint) else list
    if origin is dict:
        return dict[str, _schema_type(get_args(hint)[1])] if get_args(hint) else dict
    return hint


_SCHEMA_CACHE: dict[type, type] = {}


def _as_schema(obj: Any) -> Any:
    """A dataclass instance as an instance of its schema (nested ones too); anything else unchanged."""
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        return obj
    return schema(type(obj))(**{f.name: _as_schema(getattr(obj, f.name)) for f in dataclasses.fields(obj)})


def schema(cls: type) -> type:
    """The OmegaConf-compatible mirror of dataclass ``cls``: the same fields and defaults, ``Literal`` held as the type
    of its values (checked by :meth:`Options.of` instead)."""
    if cls not in _SCHEMA_CACHE:
        hints = get_type_hints(cls)
        fields = []
        for f in dataclasses.fields(cls):
            if f.default_factory is not dataclasses.MISSING:
                default = {"default_factory": lambda make=f.default_factory: _as_schema(make())}
            else:
                default = {"default": f.default}
            fields.append((f.name, _schema_type(hints[f.name]), dataclasses.field(**default)))
        _SCHEMA_CACHE[cls] = dataclasses.make_dataclass(f"{cls.__name__}Schema", fields)
    return _SCHEMA_CACHE[cls]


def register(node: type, group: str, name: str) -> None:
    """Put ``schema(node)`` in Hydra's ConfigStore as ``<group>/<name>`` (a YAML file lists it in its defaults)."""
    target = next(f.default for f in dataclasses.fields(node) if f.name == "_target_")
    SCHEMAS.setdefault(target, []).append(node)
    ConfigStore.instance().store(group=group, name=name, node=schema(node))


def schema_for(method: Mapping) -> type | None:
    """The registered node a composed method config follows: by ``_target_``, and where one class has several
    (COBOT over LoRA / AdaptFormer) by its fixed ``Literal`` fields (``base``)."""
    nodes = SCHEMAS.get(str(method.get("_target_")), [])
    for node in nodes:
        hints = get_type_hints(node)
        fixed = {f.name: f.default for f in dataclasses.fields(node) if get_origin(hints[f.name]) is Literal}
        if all(method.get(k, v) == v for k, v in fixed.items()):
            return node
    return nodes[0] if nodes else None
