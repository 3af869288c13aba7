"""Every experiment's composed job config, resolved, one YAML file each: ``python scripts/compose_experiments.py
--out DIR`` (``--override debug=tiny`` adds overrides to each); ``--compare DIR_A DIR_B`` prints the keys whose values
differ. A refactor of the config tree must leave every experiment's job config as it was (issue 29): dump before,
dump after, compare. A key only the second has, holding the Python default of its node's ``_target_`` (a schema
generated from a constructor's signature writes every parameter, dgss.schemas) or of dgss-train's root schema (an
unused group's slot), builds the same object: such keys are counted apart, not as differences."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import yaml
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

import dgss.config  # noqa: F401  (registers resolvers and schemas)
from dgss.commands import TrainCommand
from dgss.schemas import SIGNATURES, defaults_of

CONF = Path(__file__).resolve().parents[1] / "conf"


def experiments() -> list[str]:
    root = CONF / "experiment"
    return sorted(
        p.relative_to(root).with_suffix("").as_posix()
        for p in root.rglob("*.yaml")
        if not p.stem.startswith("_")
    )


def job_config(overrides: list[str]) -> dict:
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="dgss.conf", version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[*overrides, "run_name=compose", "paths.log_dir=/LOG"],
            return_hydra_config=True,
        )
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = "/OUT"
        cfg.hydra.job.num = 0
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return OmegaConf.to_container(cfg, resolve=True)


def flat(d, prefix=""):
    if isinstance(d, dict):
        for k, v in d.items():
            yield from flat(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], d


def python_default(flat_config: dict, key: str) -> bool:
    """``key`` holds the Python default of the parameter it names, by its node's ``_target_``."""
    node, _, name = key.rpartition(".")
    if not node:  # a top-level key: dgss-train's root schema (an unused group's slot is null)
        field = next((f for f in dataclasses.fields(TrainCommand) if f.name == name), None)
        return (
            field is not None
            and field.default is not dataclasses.MISSING
            and field.default == flat_config[key]
        )
    target = flat_config.get(f"{node}._target_")
    if target not in SIGNATURES or name not in defaults_of(target):
        return False
    return defaults_of(target)[name] == flat_config[key]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--compare", nargs=2, type=Path)
    p.add_argument(
        "--override", nargs="*", default=[], help="added to every experiment's overrides (debug=tiny)"
    )
    a = p.parse_args(argv)
    if a.out:
        names = ["", *experiments()]
        for name in names:
            cfg = job_config([*([f"experiment={name}"] if name else []), *a.override])
            path = a.out / f"{name or '_default'}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.safe_dump(cfg, sort_keys=True))
        print(f"{len(names)} job configs in {a.out}")
    if a.compare:
        before, after = a.compare
        differ, defaulted = 0, set()
        for path in sorted(before.rglob("*.yaml")):
            other = after / path.relative_to(before)
            x = dict(flat(yaml.safe_load(path.read_text())))
            y = dict(flat(yaml.safe_load(other.read_text()))) if other.exists() else {}
            diff = sorted(k for k in x.keys() | y.keys() if x.get(k, "<absent>") != y.get(k, "<absent>"))
            same = [k for k in diff if k not in x and python_default(y, k)]
            defaulted.update(same)
            diff = [k for k in diff if k not in same]
            if diff:
                differ += 1
                print(
                    f"{path.relative_to(before)}: "
                    + "; ".join(
                        f"{k}: {x.get(k, '<absent>')!r} -> {y.get(k, '<absent>')!r}" for k in diff[:8]
                    )
                )
        print(f"{len(defaulted)} keys added with their Python defaults: {', '.join(sorted(defaulted))}")
        print(f"{differ} of {len(list(before.rglob('*.yaml')))} job configs differ")
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
