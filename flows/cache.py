"""Cache keys for the study's stages: what a result depends on, by content.

A stage's key is the hash of
  - CACHE_VERSION (the shape of cached results),
  - the stage's name and the source of its task function (flows/stages.py; STAGES names its modules),
  - the code of every module its result depends on: the modules the stage names and every module
    of ours (tasks/, kernels/, storage/) they import, transitively, in function bodies too, so a
    change to tasks/generate.py re-keys the calibration fits that sample through it, and a change
    to a Triton kernel re-keys everything that scores with it. Code is hashed as its syntax tree
    without docstrings: a comment or a docstring re-keys nothing. A package that is only the parent
    of an imported module counts with its module-level imports (what importing it runs),
  - and every parameter by content (a DataFrame by its bytes, a spec or record by its fields; a model
    or dataset spec also by the identity of what it reads: tasks.models.identity, tasks.datasets.identity,
    so new weights or texts under the same path re-key), except those that only name the run (NAME_ONLY).
Never a model object or a run id: a re-run from any process or machine pointed at the same
result storage reuses the result.
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import inspect
import json
from pathlib import Path

import polars as pl

from entcal.tasks import datasets, models
from entcal.tasks.config import DatasetSpec, ModelSpec
from entcal.tasks.contracts import frame_digest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tasks", "kernels", "storage")  # the folders (entcal.tasks, ...) a stage's result can depend on
CACHE_VERSION = "4"  # 4: the package is entcal.*, stages take typed knobs (every key changed once)
NAME_ONLY = {"label"}  # parameters that only name a task run: not part of its cache key


def _canonical(value) -> str:
    """A parameter by content; a type without a content form is a TypeError, never a repr."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return json.dumps(value)
    if isinstance(value, pl.DataFrame):
        return "frame:" + frame_digest(value)
    if isinstance(value, ModelSpec):  # what it reads, by identity: a new checkpoint in place re-keys
        return value.model_dump_json() + "@" + models.identity(value)
    if isinstance(value, DatasetSpec):
        return value.model_dump_json() + "@" + datasets.identity(value)
    if hasattr(value, "model_dump_json"):
        return value.model_dump_json()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return type(value).__name__ + "{" + ",".join(f"{k}={_canonical(v)}" for k, v in fields.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_canonical(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(str(k))}:{_canonical(v)}" for k, v in sorted(value.items())) + "}"
    raise TypeError(f"cache key: no content form for a {type(value).__name__} parameter")


def _package_of(module: str) -> str | None:
    """``tasks`` for ``entcal.tasks.generate``; None for a module that is not ours."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "entcal" and parts[1] in PACKAGES else None


def _file_of(module: str, root: Path) -> Path | None:
    """``entcal.tasks.generate`` -> ``<root>/tasks/generate.py`` (the folders install as entcal.<folder>)."""
    base = root.joinpath(*module.split(".")[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imports(path: Path, module: str, *, top_level: bool) -> set[str]:
    """Module names ``path`` (module ``module``) imports: anywhere in it, or only at module level
    (``top_level``). ``from pkg import name`` also yields ``pkg.name``; relative imports are resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in (tree.body if top_level else ast.walk(tree)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def dependencies(*modules: str, root: Path = ROOT) -> list[Path]:
    """The files of ``modules`` and of every module of ours they import, transitively (sorted). A
    package reached only as the parent of an imported module contributes its module-level imports."""
    followed: dict[str, bool] = {}  # module -> all its imports followed (False: module-level only)
    files: set[Path] = set()
    todo = [(m, True) for m in modules]
    while todo:
        name, full = todo.pop()
        if _package_of(name) is None or followed.get(name) is True or (name in followed and not full):
            continue
        path = _file_of(name, root)
        if path is None:  # ``from pkg import name`` where name is not a module
            continue
        followed[name] = full
        files.add(path)
        todo += [(m, True) for m in _imports(path, name, top_level=not full)]
        if _package_of(name.rpartition(".")[0]):
            todo.append((name.rpartition(".")[0], False))
    return sorted(files)


def code_digest(path: Path) -> bytes:
    """The module's syntax tree without docstrings: what changes when the code changes."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree).encode()).digest()


def source_digest(*modules: str, root: Path = ROOT) -> str:
    """sha256 over the path and code of every file in ``dependencies(*modules)``."""
    h = hashlib.sha256()
    for path in dependencies(*modules, root=root):
        h.update(str(path.relative_to(root)).encode() + b"\0" + code_digest(path))
    return h.hexdigest()


def content_key(task, parameters: dict, modules: tuple[str, ...]) -> str:
    """The key of one call of ``task`` (a Prefect task): its name, its function's source, the code of
    ``modules`` (flows/stages.py STAGES) and what they import, and its parameters by content."""
    items = [CACHE_VERSION, task.name, inspect.getsource(task.fn), source_digest(*modules)]
    items += [f"{k}={_canonical(v)}" for k, v in sorted(parameters.items()) if k not in NAME_ONLY]
    return hashlib.sha256("\n".join(items).encode()).hexdigest()
