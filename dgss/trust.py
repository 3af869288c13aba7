"""Configs a user did not write on the command line are rebuilt only from dgss's own classes.

A dgss-train checkpoint carries the resolved config of its model and data (``dgss_config``) so that ``dgss-eval``,
``dgss-predict`` and ``dgss-merge`` can rebuild it. Hydra's ``instantiate`` calls whatever a ``_target_`` names, so a
file that passes ``torch.load(weights_only=True)`` could still run code through that config (``os.system``,
``pathlib.Path.write_text``, ``torch.save`` of a ``.pth`` into site-packages...). Before anything is built, every
``_target_`` of such a config must be one the config tree itself names:

- the ``_target_`` values in the YAML files of the section's group (``backbone/``, ``head/``, ``method/``, ``data/``)
  in dgss's packaged config and in every ``--config-dir`` the user gave on the command line (a user's own data set
  or method class is trusted when the user points at the config that names it);
- the registered schemas: the methods' (:func:`dgss.options.register`) and the classes they default to (AdamW), and
  the backbone's, heads' and data module's generated from their signatures (:func:`dgss.schemas.register_signature`);
- in ``method``, any optimizer class of ``torch.optim`` (``method.optimizer._target_=torch.optim.SGD`` is a
  command-line choice; constructing one touches nothing but its parameters).

Anything else (another import path, an interpolation ``${...}``, which a resolved config never holds, a value that
is not a plain config value) is refused in one line, with nothing called.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

import dgss.conf
import dgss.methods  # noqa: F401  (registers the methods' schemas)
from dgss.errors import ConfigError
from dgss.options import SCHEMAS
from dgss.schemas import GROUP_TARGETS

#: the sections of a stored config and the config group whose files name their classes
SECTIONS = ("backbone", "head", "method", "data")
PLAIN = (str, int, float, bool, type(None))


def packaged_conf() -> Path:
    """dgss's own config tree (the ``dgss.conf`` package, ``conf/`` in a checkout)."""
    return Path(dgss.conf.__file__).resolve().parent


def _targets_in(node: Any) -> Iterable[str]:
    if isinstance(node, Mapping):
        for k, v in node.items():
            if k == "_target_" and isinstance(v, str):
                yield v
            else:
                yield from _targets_in(v)
    elif isinstance(node, list):
        for v in node:
            yield from _targets_in(v)


@functools.lru_cache(maxsize=16)
def _group_targets(root: str, group: str) -> frozenset[str]:
    """Every ``_target_`` named in ``root/group/**/*.yaml`` (read as YAML, not matched as text)."""
    found: set[str] = set()
    folder = Path(root) / group
    if not folder.is_dir():
        return frozenset()
    for f in sorted(folder.rglob("*.yaml")):
        try:
            found.update(_targets_in(yaml.safe_load(f.read_text(encoding="utf-8"))))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue  # a broken user file names nothing (dgss.cli.check_argv reports it where it is used)
    return frozenset(found)


def allowed_targets(section: str, config_dirs: Iterable[str | os.PathLike] = ()) -> frozenset[str]:
    """The ``_target_`` values a stored ``section`` config may name."""
    roots = [packaged_conf(), *(Path(d).expanduser().resolve() for d in config_dirs)]
    allowed = set().union(*(_group_targets(str(r), section) for r in roots)) | GROUP_TARGETS.get(
        section, set()
    )
    if section == "method":
        allowed |= set(SCHEMAS) | _schema_targets()
    return frozenset(allowed)


@functools.lru_cache(maxsize=1)
def _schema_targets() -> frozenset[str]:
    """The ``_target_`` values inside the registered method schemas (e.g. ``method.optimizer``'s AdamW)."""
    found: set[str] = set()
    for entry in ConfigStore.instance().repo.get("method", {}).values():
        found.update(_targets_in(OmegaConf.to_container(entry.node)))
    return frozenset(found)


def torch_optimizer(target: str) -> bool:
    """``torch.optim.<Name>`` naming an optimizer class of the (already imported) ``torch.optim``; nothing is
    imported to find out."""
    module, _, name = target.rpartition(".")
    cls = getattr(torch.optim, name, None) if module == "torch.optim" else None
    return isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)


def command_line_config_dirs() -> list[str]:
    """The config folders of this run: ``--config-dir`` / ``hydra.searchpath`` entries, as Hydra recorded them."""
    if not HydraConfig.initialized():
        return []
    sources = HydraConfig.get().runtime.get("config_sources") or []
    return [s.path for s in sources if s.get("schema") == "file" and s.get("path")]


def _walk(node: Any, path: str) -> Iterable[tuple[str, Any]]:
    yield path, node
    if isinstance(node, Mapping):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


def check_stored_config(config: Any, where: str, config_dirs: Iterable[str | os.PathLike] = ()) -> None:
    """Refuse, in one :class:`ConfigError` line and before anything is called, a stored config (``config``, the
    ``dgss_config`` of the checkpoint ``where`` names) that is not a mapping of plain values, holds an interpolation,
    or names a ``_target_`` outside :func:`allowed_targets` of its section."""
    if not isinstance(config, Mapping):
        raise ConfigError(
            f"{where} holds a {type(config).__name__} as its dgss_config, not a mapping; refused"
        )
    missing = [k for k in ("backbone", "head", "method") if not isinstance(config.get(k), Mapping)
               or "_target_" not in config[k]]  # fmt: skip
    if missing:
        raise ConfigError(f"{where} is not a complete dgss-train checkpoint: its dgss_config lacks the "
                          f"{', '.join(missing)} config; refused")  # fmt: skip
    dirs = tuple(str(d) for d in config_dirs)
    hint = ("refused without calling it: a checkpoint's config may only name classes of dgss's config tree (a crafted "
            "file could run code this way); if you trained it with your own class, pass the config folder that names "
            "it with --config-dir")  # fmt: skip
    for section, node in config.items():
        for path, value in _walk(node, f"dgss_config.{section}"):
            if isinstance(value, Mapping):
                bad = [k for k in value if not isinstance(k, str)]
                if bad:
                    raise ConfigError(f"{where}: {path} has a key of type {type(bad[0]).__name__}; refused")
                continue
            if isinstance(value, (list, tuple)):
                continue
            if not isinstance(value, PLAIN):
                raise ConfigError(
                    f"{where}: {path} holds a {type(value).__name__}, not a config value; refused"
                )
            if isinstance(value, str) and "${" in value:
                raise ConfigError(f"{where}: {path}={value!r} is an interpolation, which a saved (resolved) config "
                                  "never holds; refused")  # fmt: skip
            if path.endswith("._target_"):
                ok = section in SECTIONS and (value in allowed_targets(section, dirs)
                                              or (section == "method" and torch_optimizer(value)))  # fmt: skip
                if not ok:
                    raise ConfigError(f"{where}: {path}={value!r} is not a dgss {section} class; {hint}")
