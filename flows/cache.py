"""Cache keys for the study's stages: what a result depends on, by content.

A stage's key is the hash of
  - CACHE_VERSION (the shape of cached results),
  - the stage's name,
  - the source of every module its result depends on: the modules the stage names and every
    module of ours (tasks/, kernels/, storage/) they import, transitively, in function bodies too,
    so a change to tasks/generate.py re-keys the calibration fits that sample through it, and a
    change to a Triton kernel re-keys everything that scores with it,
  - and every parameter by content (a DataFrame by its bytes, a spec or record by its fields),
    except those that only name the run (NAME_ONLY).
Never a model object or a run id: a re-run from any process or machine pointed at the same
result storage reuses the result.
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import io
import json
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tasks", "kernels", "storage")  # the code a stage's result can depend on
CACHE_VERSION = "3"  # 3: generation returns a PartRecord; recalibration a Recalibration
NAME_ONLY = {"shard"}  # parameters that only name a task run: not part of its cache key


def frame_digest(df: pl.DataFrame) -> str:
    buf = io.BytesIO()
    df.write_ipc(buf, compression="uncompressed")
    return hashlib.sha256(buf.getvalue()).hexdigest()


def _canonical(value) -> str:
    if isinstance(value, pl.DataFrame):
        return "frame:" + frame_digest(value)
    if hasattr(value, "model_dump_json"):
        return value.model_dump_json()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return type(value).__name__ + "{" + ",".join(f"{k}={_canonical(v)}" for k, v in fields.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_canonical(v) for v in value) + "]"
    return json.dumps(value, sort_keys=True, default=str)


def _file_of(module: str, root: Path) -> Path | None:
    base = root.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imports(path: Path) -> set[str]:
    """Module names ``path`` imports anywhere (``from pkg import name`` also yields ``pkg.name``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def dependencies(*modules: str, root: Path = ROOT) -> list[Path]:
    """The files of ``modules`` and of every module of ours they import, transitively (sorted)."""
    seen: dict[str, Path] = {}
    todo = list(modules)
    while todo:
        name = todo.pop()
        if name in seen or name.split(".")[0] not in PACKAGES:
            continue
        path = _file_of(name, root)
        if path is None:  # ``from pkg import name`` where name is not a module
            continue
        seen[name] = path
        parent = name.rpartition(".")[0]
        todo += [m for m in _imports(path) if m not in seen] + ([parent] if parent else [])
    return sorted(set(seen.values()))


def source_digest(*modules: str, root: Path = ROOT) -> str:
    """sha256 over the path and bytes of every file in ``dependencies(*modules)``."""
    h = hashlib.sha256()
    for path in dependencies(*modules, root=root):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def content_key(context, parameters: dict) -> str:
    """A Prefect cache_key_fn: the stage's name, its code (``fn.__stage__.modules``) and its parameters."""
    fn = context.task.fn
    items = [CACHE_VERSION, context.task.name, source_digest(*fn.__stage__.modules)]
    items += [f"{k}={_canonical(v)}" for k, v in sorted(parameters.items()) if k not in NAME_ONLY]
    return hashlib.sha256("\n".join(items).encode()).hexdigest()
