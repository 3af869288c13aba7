"""The documentation site builds strictly (``make docs``: a broken link or a page missing from the navigation fails
it), and the pre-commit configuration is one pre-commit accepts."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(root: Path, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(root / "mkdocs.yml"),
                           "-d", str(out)], capture_output=True, text=True, cwd=root, env=env)  # fmt: skip


def test_the_docs_build_strictly_and_a_broken_link_fails_them(tmp_path):
    done = build(ROOT, tmp_path / "site")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "site" / "custom-data" / "index.html").is_file()
    assert "dgss.export.InferenceGraph" in (tmp_path / "site" / "api" / "index.html").read_text()
    copy = tmp_path / "copy"  # the same tree with one link broken
    shutil.copytree(ROOT / "docs", copy / "docs")
    shutil.copy(ROOT / "mkdocs.yml", copy)
    shutil.copytree(ROOT / "dgss", copy / "dgss")
    with open(copy / "docs" / "video.md", "a") as f:
        f.write("\nSee [the missing page](missing.md).\n")
    done = build(copy, tmp_path / "site2")
    assert done.returncode != 0 and "missing.md" in done.stderr


def test_the_pre_commit_configuration_is_valid():
    done = subprocess.run([sys.executable, "-m", "pre_commit", "validate-config", ".pre-commit-config.yaml"],
                          capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    text = (ROOT / ".pre-commit-config.yaml").read_text()
    assert all(
        h in text for h in ("ruff-check", "ruff-format", "check-added-large-files", "check-merge-conflict")
    )
