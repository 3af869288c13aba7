"""The config tree's files, by group."""

from pathlib import Path

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def config_names(group: str) -> list[str]:
    """Every config of a group, nested ones as ``sub/name`` (``experiment=gta2cbm/rein_dinov2_l``)."""
    root = CONF_DIR / group
    return sorted(
        p.relative_to(root).with_suffix("").as_posix()
        for p in root.rglob("*.yaml")
        if not p.stem.startswith("_")
    )
