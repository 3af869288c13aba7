"""``ckpt_path=hf://user/name[@revision]``: a release that ``dgss-push`` put on the Hugging Face Hub
(:mod:`dgss.release`), read back by dgss-eval, dgss-predict and dgss-export.

A Hub checkpoint is as untrusted as any file: ``hf://`` reads the manifest and the checkpoint through
``huggingface_hub`` (the local cache, offline with ``HF_HUB_OFFLINE=1``), checks the checkpoint's sha256 against the
manifest before anything reads it, and then loads it like every checkpoint (``weights_only``: a pickle with code is
refused unread). Every failure — a missing file, a mismatching hash, a repository not in the cache — is one line.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from dgss.errors import ConfigError

SCHEME = "hf://"
MANIFEST = "sha256.json"
CHECKPOINT = "model.ckpt"
REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------- reading
def parse(url: str) -> tuple[str, str | None]:
    """``hf://user/name[@revision]`` -> (repo id, revision or None), or one line."""
    body = url[len(SCHEME) :]
    repo, _, revision = body.partition("@")
    if not REPO_RE.match(repo) or (revision == "" and "@" in body):
        raise ConfigError(f"ckpt_path={url!r}: write hf://<user>/<name> or hf://<user>/<name>@<revision>")
    return repo, revision or None


def _download(url: str, repo: str, filename: str, revision: str | None) -> Path:
    try:
        return Path(hf_hub_download(repo, filename, revision=revision))
    except LocalEntryNotFoundError:  # (an EntryNotFoundError too) offline, or the Hub out of reach
        cached = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "snapshots"
        if cached.is_dir() and any(cached.iterdir()):
            raise ConfigError(f"ckpt_path={url!r}: the local Hub cache holds this repository without {filename}: not "
                              f"a dgss release, or an incomplete download (hf download {repo})") from None  # fmt: skip
        raise ConfigError(f"ckpt_path={url!r}: {filename} is not in the local Hub cache and the Hub cannot be "
                          f"reached (HF_HUB_OFFLINE=1?); download it first: hf download {repo}"
                          + (f" --revision {revision}" if revision else "")) from None  # fmt: skip
    except EntryNotFoundError:
        raise ConfigError(f"ckpt_path={url!r} has no {filename}: not a dgss release (dgss-push writes {MANIFEST} "
                          f"and {CHECKPOINT})") from None  # fmt: skip
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise ConfigError(f"ckpt_path={url!r}: {str(e).splitlines()[0]}") from None


def resolve(ckpt_path: str | Path) -> Path:
    """A checkpoint a command names: a local path as it is, or ``hf://user/name[@rev]`` as the cached
    ``model.ckpt`` of that Hub repository after its sha256 matched the release's manifest."""
    text = str(ckpt_path)
    if not text.startswith(SCHEME):
        return Path(text).expanduser()
    repo, revision = parse(text)
    manifest_file = _download(text, repo, MANIFEST, revision)
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"ckpt_path={text!r}: its {MANIFEST} is not JSON ({e})") from None
    want = manifest.get(CHECKPOINT) if isinstance(manifest, dict) else None
    if not isinstance(want, str) or not re.fullmatch(r"[0-9a-f]{64}", want):
        raise ConfigError(f"ckpt_path={text!r}: its {MANIFEST} does not list {CHECKPOINT} with a sha256")
    path = _download(text, repo, CHECKPOINT, revision)
    got = sha256_file(path)
    if got != want:
        raise ConfigError(f"ckpt_path={text!r}: {CHECKPOINT} has sha256 {got[:12]}…, its manifest says "
                          f"{want[:12]}…: a damaged or altered download, refused unread; download it again "
                          f"(hf download {repo} --force-download)")  # fmt: skip
    return path
