#!/usr/bin/env python3
"""Set up dgss on an offline GPU machine whose Python already has torch, lightning, timm and torchmetrics.

Standard library only: it runs before Hydra is importable.

    python scripts/gpu_env.py pack                # here (with internet): wheels into .gpu/wheels, commit into .gpu/commit
    python3 scripts/gpu_env.py bench OUT [ARGS]   # there: install what is missing into .gpu/site, run bench_gpu.py
    python3 scripts/gpu_env.py install            # there: only the installation (prints the PYTHONPATH / PATH to use)

``pack`` downloads pure-Python wheels (``py3-none-any``, so they fit any CPython 3.10-3.13) of the packages such an
image lacks — hydra-core, omegaconf, antlr4-python3-runtime (built here from its source release: PyPI has no
wheel of 4.9.3) — at the versions of this environment, and setuptools to build dgss with. wandb is not carried:
dgss trains without it unless ``logger=wandb`` is chosen. ``.gpu/`` is git-ignored; carry it with the tree.

``install`` puts the wheels (``--no-deps``: nothing is resolved or downloaded) and dgss itself, built from this
tree, into ``.gpu/site``; nothing outside the tree is written. Where everything is importable already (a dev
install), it does nothing.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / ".gpu"
WHEELS, SITE = GPU / "wheels", GPU / "site"
CARRIED = {
    "hydra-core": "hydra",
    "omegaconf": "omegaconf",
    "antlr4-python3-runtime": "antlr4",
}  # dist -> module
BUILD = ("setuptools",)  # dgss's build backend, so the device's own setuptools version does not matter


def pip(*args: str, env: dict | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def pack() -> int:
    from importlib import metadata

    WHEELS.mkdir(parents=True, exist_ok=True)
    for old in WHEELS.glob("*.whl"):
        old.unlink()
    pins = {d: metadata.version(d) for d in (*CARRIED, *BUILD)}
    sdist_only = {"antlr4-python3-runtime"}
    binary = [f"{d}=={v}" for d, v in pins.items() if d not in sdist_only]
    pip("download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation", "py",
        "--abi", "none", "--platform", "any", "-d", str(WHEELS), *binary)  # fmt: skip
    pip("wheel", "-q", "--no-deps", "-w", str(WHEELS), *(f"{d}=={pins[d]}" for d in sdist_only))
    wheels = sorted(WHEELS.glob("*.whl"))
    not_pure = [w.name for w in wheels if not w.name.endswith("-none-any.whl")]
    if not_pure:
        print(f"gpu_env: not pure-Python wheels: {', '.join(not_pure)}", file=sys.stderr)
        return 1
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()  # fmt: skip
        (GPU / "commit").write_text(head + ("+dirty" if dirty else "") + "\n")
    except (OSError, subprocess.CalledProcessError):
        pass
    size = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"gpu_env: {len(wheels)} wheels ({size:.1f} MiB) in {WHEELS.relative_to(ROOT)}: "
          + ", ".join(w.name for w in wheels))  # fmt: skip
    return 0


def importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def dgss_from_this_tree() -> bool:
    """dgss is importable here as an editable install of this very tree (a dev ``.venv``)."""
    try:
        spec = importlib.util.find_spec("dgss.conf")
    except (ImportError, ValueError):
        return False
    origin = Path(spec.origin).resolve() if spec and spec.origin else None
    return origin is not None and origin.is_relative_to(ROOT / "conf")


def environ() -> dict:
    env = dict(os.environ)
    if SITE.is_dir():
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SITE), env.get("PYTHONPATH")]))
        env["PATH"] = os.pathsep.join(filter(None, [str(SITE / "bin"), env.get("PATH")]))
    return env


def install() -> int:
    if sys.path[0] != str(SITE) and SITE.is_dir():
        sys.path.insert(0, str(SITE))
    missing = [d for d, mod in CARRIED.items() if not importable(mod)]
    if missing:
        wheels = sorted(WHEELS.glob("*.whl"))
        if not wheels:
            print(f"gpu_env: {', '.join(missing)} not installed and no wheels in {WHEELS}; run "
                  "`make gpu-pack` on a machine with internet and carry .gpu/ with the tree", file=sys.stderr)  # fmt: skip
            return 2
        pip("install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade",
            "--target", str(SITE), *map(str, wheels))  # fmt: skip
    if not dgss_from_this_tree():  # a copy from an earlier call may be stale: always rebuild from the tree
        env = environ() if SITE.is_dir() else dict(os.environ)
        if SITE.is_dir():  # the carried setuptools builds dgss, not whatever version the image has
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SITE), os.environ.get("PYTHONPATH")]))
        pip("install", "-q", "--no-index", "--no-deps", "--no-build-isolation", "--no-compile", "--no-cache-dir",
            "--upgrade", "--target", str(SITE), str(ROOT), env=env)  # fmt: skip
    if SITE.is_dir():
        print(f"gpu_env: ready; PYTHONPATH={SITE} PATH={SITE / 'bin'}:$PATH", flush=True)
    else:
        print("gpu_env: everything importable already; nothing installed", flush=True)
    return 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("pack", "install", "bench"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    if argv[0] == "pack":
        return pack()
    rc = install()
    if rc or argv[0] == "install":
        return rc
    bench = [sys.executable, str(ROOT / "scripts" / "bench_gpu.py"), *argv[1:]]
    print("$", " ".join(bench), flush=True)
    os.execve(sys.executable, bench, environ())
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
