"""The identity of an input: a short string that names exactly what a load of it reads.

A parameter such as ``ModelSpec(path="/m")`` names a place, not the weights in it; a cache key made of
its text serves old numbers once a new checkpoint is saved there, and a hub ``revision: main`` names a
branch that moves. ``models.identity`` and ``datasets.identity`` name the content instead, with the
building blocks here (docs/DESIGN.md, "Inputs by identity"):

- local files by ``stat`` (each file's path relative to the root, its size in bytes and its mtime in
  ns: no byte is read, cheap on a 140 GB checkpoint; a ``touch`` re-keys) or by ``content`` (sha256 of
  the bytes, read in 1 MiB chunks; memoised per process while the file's stat is unchanged);
- hub repositories by the commit (40 hex) their revision names now: as huggingface_hub resolves it
  for transformers' own loads (the hub, else the local cache's refs).

The root's own path is never part of an identity: what is under it, relative to it, is.
"""
from __future__ import annotations

import hashlib
import os
import re
import stat as statmod
from pathlib import Path
from typing import Iterable

from entcal.tasks.config import ConfigError

COMMIT = re.compile(r"[0-9a-f]{40}")  # a hub commit id: immutable, needs no lookup
DEFAULT_REVISION = "main"  # what a hub load without a revision reads (huggingface_hub's default)
CHUNK = 1 << 20  # bytes read at a time by a content hash
DIGEST_HEX = 16  # hex characters of an identity's digest (64 bits: tells versions of one input apart)

_CONTENT: dict[tuple, bytes] = {}  # (path, dev, inode, size, mtime_ns, ctime_ns) -> sha256 of the bytes


def files_under(root: Path) -> list[Path]:
    """Every regular file under directory ``root``, recursively (symlinks to files followed, to directories
    not), skipping hidden files and directories (``.git``, ``.cache``); sorted by relative path."""
    found = []
    for top, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            path = Path(top, name)
            if not name.startswith(".") and path.is_file():  # is_file: follows a link, drops a broken one
                found.append(path)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def content_sha256(path: Path) -> bytes:
    """sha256 (32 bytes) of the file's bytes, streamed in CHUNK-byte reads. Memoised per process on the
    file's device, inode, size, mtime and ctime (ns): any write changes the ctime, so a changed file is read
    again, while an unchanged 140 GB checkpoint is read once per process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _CONTENT:
        h = hashlib.sha256()
        with path.open("rb") as f:
            while block := f.read(CHUNK):
                h.update(block)
        _CONTENT[key] = h.digest()
    return _CONTENT[key]


def fingerprint(root: Path, files: Iterable[Path], mode: str) -> str:
    """``<mode>:<hex>``: sha256 over each file's path relative to ``root`` ("" for ``root`` itself, a single
    file), its size (bytes) and either its mtime (ns, ``mode="stat"``) or the sha256 of its bytes
    (``mode="content"``), in the order given. ``root``'s own path is not part of it."""
    if mode not in ("stat", "content"):
        raise ValueError(f"fingerprint mode {mode!r}: expected stat or content")
    h = hashlib.sha256()
    for path in files:
        rel = "" if path == root else path.relative_to(root).as_posix()
        st = path.stat()
        if not statmod.S_ISREG(st.st_mode):
            raise ValueError(f"{path} is not a regular file")
        h.update(f"{rel}\0{st.st_size}\0".encode())
        h.update(content_sha256(path) if mode == "content" else f"{st.st_mtime_ns}".encode())
        h.update(b"\n")
    return f"{mode}:{h.hexdigest()[:DIGEST_HEX]}"


def digest(*parts: str) -> str:
    """A short hex digest of text parts (an in-memory source such as pydoc's topics)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:DIGEST_HEX]


def hub_commit(repo: str, revision: str | None, *, repo_type: str, who: str, what: str) -> str:
    """The commit (40 hex) that ``revision`` (default main) of hub repository ``repo`` names now.

    A commit id is returned as given (no lookup). Otherwise huggingface_hub's public
    ``HfApi.resolve_revision``, the call transformers' ``from_pretrained`` resolves with: online, the hub's
    answer (repo_info's sha, also written to the local cache's refs); offline (HF_HUB_OFFLINE), or when the
    hub is unreachable or down (5xx), the local Hugging Face cache's ``refs/<revision>``. When neither
    answers, or the hub says there is no such repository or revision, a one-line ConfigError that ``who``
    ("model x") and ``what`` ("load it") word."""
    rev = revision or DEFAULT_REVISION
    if COMMIT.fullmatch(rev):
        return rev
    from huggingface_hub import HfApi, is_offline_mode
    from huggingface_hub.errors import HfHubHTTPError, RevisionResolutionError

    try:
        return HfApi().resolve_revision(repo, repo_type=repo_type, revision=rev,
                                        local_files_only=is_offline_mode()).resolved
    except (RevisionResolutionError, HfHubHTTPError) as err:
        raise ConfigError(f"{who}: cannot {what}: {_unresolved(err, repo, rev, repo_type)}") from None


def _unresolved(err: Exception, repo: str, rev: str, repo_type: str) -> str:
    """Why ``rev`` of ``repo`` names no commit, and what to do, in words (the tail of a one-line error)."""
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError, RevisionResolutionError

    if isinstance(err, RevisionResolutionError):  # no answer from the hub, nothing in the cache
        cause = err.__cause__
        why = f"the hub is unreachable ({type(cause).__name__})" if cause is not None else "offline (HF_HUB_OFFLINE)"
        kind, pin = (" --repo-type dataset", "") if repo_type == "dataset" else ("", "give a 40-hex commit, ")
        return (f"revision {rev!r} of {repo} resolves to no commit ({why} and the local Hugging Face cache has no "
                f"such ref); {pin}go online, or download it first (hf download {repo}{kind} --revision {rev})")
    if isinstance(err, RevisionNotFoundError):
        return f"the hub has no revision {rev!r} of {repo}; give a branch, tag or commit of {repo}"
    if isinstance(err, RepositoryNotFoundError):  # gated ones too
        return (f"the hub has no {repo_type} {repo} that this machine may read; check the id (a private or gated "
                "one needs `hf auth login` and access)")
    first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    return f"the hub refused revision {rev!r} of {repo} ({first})"  # another 4xx answer
