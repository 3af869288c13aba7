"""Every experiment's composed job config, resolved, one YAML file each: ``python scripts/compose_experiments.py
--out DIR``; ``--compare DIR_A DIR_B`` prints the keys whose values differ. A refactor of the config tree must leave
every experiment's job config as it was (issue 29): dump before, dump after, compare."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

import dgss.config  # noqa: F401  (registers resolvers and schemas)

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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--compare", nargs=2, type=Path)
    a = p.parse_args(argv)
    if a.out:
        names = ["", *experiments()]
        for name in names:
            cfg = job_config([f"experiment={name}"] if name else [])
            path = a.out / f"{name or '_default'}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.safe_dump(cfg, sort_keys=True))
        print(f"{len(names)} job configs in {a.out}")
    if a.compare:
        before, after = a.compare
        differ = 0
        for path in sorted(before.rglob("*.yaml")):
            other = after / path.relative_to(before)
            x = dict(flat(yaml.safe_load(path.read_text())))
            y = dict(flat(yaml.safe_load(other.read_text()))) if other.exists() else {}
            diff = sorted(k for k in x.keys() | y.keys() if x.get(k, "<absent>") != y.get(k, "<absent>"))
            if diff:
                differ += 1
                print(
                    f"{path.relative_to(before)}: "
                    + "; ".join(
                        f"{k}: {x.get(k, '<absent>')!r} -> {y.get(k, '<absent>')!r}" for k in diff[:8]
                    )
                )
        print(f"{differ} of {len(list(before.rglob('*.yaml')))} job configs differ")
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
