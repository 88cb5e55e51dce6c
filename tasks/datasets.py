"""Human text -> the prompts table.

Sources: built-in corpora that need no download (``python-docs``: the Python reference manual
from ``pydoc_data.topics``; ``python-stdlib``: the standard library's own source files), local
.txt/.jsonl/.parquet files, Hugging Face datasets by id, and the paper's presets (WikiText-103,
WritingPrompts, CodeContests) with its filters.

Every document gets a stable id; examples are taken in dataset order after filtering. ``identity(spec)``
names what ``documents(spec)`` reads (files by stat or content, a hub dataset by commit, docs/DESIGN.md).
Output schema (tasks/contracts.py, docs/DESIGN.md): example_id str, dataset str, prompt_ids list[i32], reference_ids list[i32],
prompt_text str (the prompt decoded with the model's tokenizer, special tokens such as chat markup kept:
what the model conditions on), reference_text str (the human continuation decoded).
"""
from __future__ import annotations

import json
import logging
import os
import platform
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import polars as pl

from entcal.tasks.config import ConfigError, DatasetSpec
from entcal.tasks.contracts import PROMPTS_SCHEMA, PromptKnobs
from entcal.tasks.identity import digest, fingerprint, hub_commit

log = logging.getLogger(__name__)


# The paper's presets: hub parquet files (read by polars over hf://) and how a row becomes a document.
PRESET_SOURCES = {
    "wikitext-103": "hf://datasets/Salesforce/wikitext/wikitext-103-raw-v1/train-*.parquet",
    "writingprompts": "hf://datasets/euclaise/writingprompts/data/train-*.parquet",
    "codecontests": "hf://datasets/deepmind/code_contests/data/train-*.parquet",
}
STORY_INSTRUCTION = "Write a story based on the following prompt: {prompt}"
CODE_INSTRUCTION = (
    "Solve the following competitive programming problem. Write a complete solution.\n\n{description}"
)


@dataclass(frozen=True)
class Document:
    """One human text. ``instruction`` (optional) is formatted before it; when ``text_in_prompt`` the
    first prompt_tokens of ``text`` join the prompt and the rest is the reference."""

    doc_id: str
    text: str
    instruction: str | None = None
    text_in_prompt: bool = True


@dataclass
class PrepareStats:
    documents: int = 0
    kept: int = 0
    dropped_short: int = 0
    dropped_long_prompt: int = 0

    def message(self, label: str, want: int, min_ref: int) -> str:
        return (
            f"dataset {label}: {self.kept} usable examples of {want} requested "
            f"({self.documents} documents read; {self.dropped_short} dropped with a reference shorter "
            f"than min_reference_tokens={min_ref}, {self.dropped_long_prompt} with a prompt too long "
            "for the model); lower num_examples or min_reference_tokens, or add text"
        )


# ---------------------------------------------------------------- built-in corpora
DOC_CHARS = 6000  # long manual topics become several documents, cut at paragraph breaks


def split_paragraphs(text: str, max_chars: int) -> list[str]:
    """Greedy chunks of whole paragraphs, each at most ``max_chars`` (a longer paragraph stands alone)."""
    chunks, cur = [], ""
    for para in text.split("\n\n"):
        if cur and len(cur) + 2 + len(para) > max_chars:
            chunks.append(cur)
            cur = para
        else:
            cur = f"{cur}\n\n{para}" if cur else para
    if cur.strip():
        chunks.append(cur)
    return chunks

def python_docs_documents() -> Iterator[Document]:
    """The Python reference manual's prose, one document per topic, in sorted topic order."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        for k, chunk in enumerate(split_paragraphs(topics[name], DOC_CHARS)):
            yield Document(f"python-docs/{name}#{k}", chunk)


STDLIB_SKIP = {"site-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3", "ensurepip"}


def stdlib_files() -> tuple[Path, list[Path]]:
    """(the standard library's folder, its .py files python-stdlib reads, in reading order): every *.py
    under it outside the STDLIB_SKIP folders (whose trees are not walked)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for top, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in STDLIB_SKIP]
        found += [Path(top, n) for n in names if n.endswith(".py")]
    return root, sorted(found)


def python_stdlib_documents() -> Iterator[Document]:
    """The standard library's source (human-written code), one document per module file."""
    root, files = stdlib_files()
    for path in files:
        rel = path.relative_to(root)
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        yield Document(f"python-stdlib/{rel.as_posix()}", text)


# ---------------------------------------------------------------- local files and the hub
CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f]")  # control characters other than whitespace
MAX_CONTROL_SHARE = 0.1  # above this share of control characters a "text" is binary data


def check_text(text: str, label: str, where: str) -> str:
    """``text`` unless it is mostly control characters (binary data read as text): ConfigError naming ``where``."""
    bad = len(CONTROL.findall(text))
    if text and bad > MAX_CONTROL_SHARE * len(text):
        raise ConfigError(f"dataset {label}: {where} is not text ({bad / len(text):.0%} control characters); "
                          "give human-written UTF-8 text")
    return text


def read_text_file(path: Path, label: str) -> str:
    """A local .txt file's text; ConfigError naming it when it is not UTF-8 or is binary data."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"dataset {label}: {path} is not UTF-8 text (byte {data[err.start]:#04x} at offset "
                          f"{err.start}); give a UTF-8 text file") from None
    return check_text(text, label, str(path))


def _frame_documents(df: pl.DataFrame, label: str, text_field: str, source: str,
                     local: bool = False) -> Iterator[Document]:
    if text_field not in df.columns:
        raise ConfigError(
            f"dataset {label}: {source} has no column {text_field!r} (columns: {df.columns}); "
            "set text_field: to the column that holds the text"
        )
    ids = df["id"].cast(pl.String).to_list() if "id" in df.columns else None
    for i, text in enumerate(df[text_field].to_list()):
        if isinstance(text, str) and text.strip():
            yield Document(f"{label}/{ids[i] if ids else i}", check_text(text, label, f"{source} row {i}") if local
                           else text)


def text_files(folder: Path, label: str) -> list[Path]:
    """The .txt files a folder dataset reads, in reading order: those directly in ``folder`` (not below)."""
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise ConfigError(f"dataset {label}: directory {folder} has no .txt files")
    return files


def local_documents(spec: DatasetSpec) -> Iterator[Document]:
    """.txt (one document per file; a directory of .txt files is read in sorted order), .jsonl, .parquet."""
    path = Path(spec.path)
    label = spec.label
    if not path.exists():
        raise ConfigError(f"dataset {label}: {path} does not exist (give a .txt, .jsonl or .parquet path)")
    if path.is_dir():
        for f in text_files(path, label):
            yield Document(f"{label}/{f.stem}", read_text_file(f, label))
        return
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            yield Document(f"{label}/{path.stem}", read_text_file(path, label))
            return
        if suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            df = pl.DataFrame(rows, infer_schema_length=None) if rows else pl.DataFrame()
        elif suffix == ".parquet":
            df = pl.read_parquet(path)
        else:
            raise ConfigError(f"dataset {label}: {path}: expected a .txt, .jsonl or .parquet file, got {suffix!r}")
    except (json.JSONDecodeError, pl.exceptions.PolarsError, OSError) as err:
        raise ConfigError(f"dataset {label}: cannot read {path} ({err.__class__.__name__}: {str(err)[:200]})") from None
    yield from _frame_documents(df, label, spec.text_field, str(path), local=True)


def read_table(source: str) -> pl.DataFrame:
    """Read parquet from a local glob or the hub (``hf://datasets/...``, needs network)."""
    return pl.read_parquet(source)


def preset_documents(preset: str, df: pl.DataFrame) -> Iterator[Document]:
    """Rows of a preset's table -> documents, with the paper's filters (docs/SCIENCE.md §2)."""
    if preset == "wikitext-103":
        for i, text in enumerate(df["text"].to_list()):
            if len(text) >= 200:  # the paper keeps texts of at least 200 characters
                yield Document(f"wikitext-103/{i}", text)
    elif preset == "writingprompts":
        for i, (prompt, story) in enumerate(zip(df["prompt"].to_list(), df["story"].to_list())):
            yield Document(f"writingprompts/{i}", story, instruction=STORY_INSTRUCTION.format(prompt=prompt.strip()))
    elif preset == "codecontests":
        for i, row in enumerate(df.select("name", "description", "solutions").iter_rows(named=True)):
            sols = [s for s in (row["solutions"] or {}).get("solution", []) if s.isascii()]
            if sols:
                yield Document(
                    f"codecontests/{row['name'] or i}", max(sols, key=len),
                    instruction=CODE_INSTRUCTION.format(description=row["description"]), text_in_prompt=False,
                )
    else:  # pragma: no cover - the config's Literal stops this
        raise ConfigError(f"unknown preset {preset!r}")


def check_source(spec: DatasetSpec) -> None:
    """Fail fast on a local dataset that is missing or of an unknown kind (before any service starts)."""
    if spec.path:
        path = Path(spec.path)
        if not path.exists():
            raise ConfigError(f"dataset {spec.label}: {path} does not exist (give a .txt, .jsonl or .parquet path)")
        suffix = path.suffix.lower()
        if path.is_file() and suffix not in (".txt", ".jsonl", ".parquet"):
            raise ConfigError(f"dataset {spec.label}: {path}: expected a .txt, .jsonl or .parquet file, got {suffix!r}")
        if path.is_file() and suffix in (".jsonl", ".parquet"):
            try:
                if suffix == ".parquet":
                    columns, rows = list(pl.read_parquet_schema(path)), pl.scan_parquet(path).select(pl.len()).collect().item()
                else:
                    first = next((line for line in path.open(encoding="utf-8") if line.strip()), None)
                    columns, rows = (list(json.loads(first)) if first else []), int(first is not None)
            except (OSError, ValueError, pl.exceptions.PolarsError) as err:
                raise ConfigError(f"dataset {spec.label}: cannot read {path} ({err.__class__.__name__}: {str(err)[:200]})") from None
            if rows == 0:
                raise ConfigError(f"dataset {spec.label}: {path} is empty (no rows); give a file with texts")
            if spec.text_field not in columns:
                raise ConfigError(f"dataset {spec.label}: {path} has no column {spec.text_field!r} (columns: {columns}); "
                                  "set text_field: to the column that holds the text")
        if path.is_file() and suffix == ".txt" and not read_text_file(path, spec.label).strip():
            raise ConfigError(f"dataset {spec.label}: {path} is empty; give a file with text")


def documents(spec: DatasetSpec) -> Iterator[Document]:
    if spec.path:
        return local_documents(spec)
    if spec.preset:
        return preset_documents(spec.preset, read_table(PRESET_SOURCES[spec.preset]))
    if spec.hf:
        src = f"hf://datasets/{spec.hf}/**/{spec.split}*.parquet"
        if spec.hf_config:
            src = f"hf://datasets/{spec.hf}/{spec.hf_config}/{spec.split}*.parquet"
        return _frame_documents(read_table(src), spec.label, spec.text_field, spec.hf)
    if spec.name == "python-docs":
        return python_docs_documents()
    return python_stdlib_documents()


# ---------------------------------------------------------------- identity
def hub_repo(source: str) -> str:
    """``org/name`` of an ``hf://datasets/org/name/...`` source (a preset's)."""
    return "/".join(source.removeprefix("hf://datasets/").split("/")[:2])


def identity(spec: DatasetSpec) -> str:
    """What ``documents(spec)`` reads, as a short stable string (docs/DESIGN.md "Inputs by identity"):
    a local file ``file:<stat|content>:<hex>``, a folder ``txt-dir:<stat|content>:<hex>`` over its .txt files
    (``spec.fingerprint`` picks); a hub dataset or preset ``hub:datasets/<repo>@<commit>`` (its main branch,
    what polars reads); ``python-docs:<hex>`` of pydoc's topics (name and text); ``python-stdlib:<Python
    version>:<stat|content>:<hex>`` over the .py files it reads."""
    if spec.path:
        path = Path(spec.path)
        if not path.exists():
            raise ConfigError(f"dataset {spec.label}: {path} does not exist (give a .txt, .jsonl or .parquet path)")
        if path.is_dir():
            return "txt-dir:" + fingerprint(path, text_files(path, spec.label), spec.fingerprint)
        return "file:" + fingerprint(path, [path], spec.fingerprint)
    if spec.preset or spec.hf:
        repo = hub_repo(PRESET_SOURCES[spec.preset]) if spec.preset else spec.hf
        commit = hub_commit(repo, None, repo_type="dataset", who=f"dataset {spec.label}", what="name its commit")
        return f"hub:datasets/{repo}@{commit}"
    if spec.name == "python-docs":
        from pydoc_data.topics import topics

        return "python-docs:" + digest(*(f"{name}\0{topics[name]}" for name in sorted(topics)))
    root, files = stdlib_files()
    return f"python-stdlib:{platform.python_version()}:" + fingerprint(root, files, spec.fingerprint)


# ---------------------------------------------------------------- tokenisation
def _prefix_ids(tokenizer, doc: Document, fmt: str) -> list[int]:
    """Token ids of what precedes the text: BOS, and the formatted instruction if any."""
    if doc.instruction is None or fmt == "raw":
        head = tokenizer("a").input_ids
        bos = tokenizer.bos_token_id
        return [bos] if bos is not None and head and head[0] == bos else []
    if fmt == "chat" or (fmt == "auto" and getattr(tokenizer, "chat_template", None)):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": doc.instruction}], add_generation_prompt=True, tokenize=True
        )
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tokenizer(f"Q: {doc.instruction}\nA: ").input_ids


def build_prompts(
    docs: Iterator[Document],
    tokenizer,
    *,
    label: str,
    num_examples: int,
    prompt_tokens: int,
    min_reference_tokens: int,
    max_reference_tokens: int,
    max_total_tokens: int | None = None,
    prompt_format: str = "auto",
) -> tuple[pl.DataFrame, PrepareStats]:
    """Tokenise documents in order until ``num_examples`` pass the filters."""
    stats = PrepareStats()
    rows: dict[str, list] = {k: [] for k in PROMPTS_SCHEMA}
    for doc in docs:
        if stats.kept >= num_examples:
            break
        stats.documents += 1
        ids = tokenizer(doc.text, add_special_tokens=False).input_ids
        head = _prefix_ids(tokenizer, doc, prompt_format)
        cut = prompt_tokens if doc.text_in_prompt else 0
        if len(ids) - cut < min_reference_tokens:
            stats.dropped_short += 1
            continue
        prompt = head + ids[:cut]
        if max_total_tokens and len(prompt) + max_reference_tokens > max_total_tokens:
            stats.dropped_long_prompt += 1
            continue
        rows["example_id"].append(doc.doc_id)
        rows["dataset"].append(label)
        rows["prompt_ids"].append(prompt)
        rows["reference_ids"].append(ids[cut : cut + max_reference_tokens])
        stats.kept += 1
    kw = dict(clean_up_tokenization_spaces=False)
    # batch_decode([]) returns one empty string, not an empty list: decode only what there is
    rows["prompt_text"] = tokenizer.batch_decode(rows["prompt_ids"], skip_special_tokens=False, **kw) if stats.kept else []
    rows["reference_text"] = tokenizer.batch_decode(rows["reference_ids"], skip_special_tokens=True, **kw) if stats.kept else []
    return pl.DataFrame(rows, schema=PROMPTS_SCHEMA), stats


def prepare_prompts(tokenizer, context: int | None, dataset: DatasetSpec, knobs: PromptKnobs) -> pl.DataFrame:
    """The prompts table for one (model, dataset), cut by the model's ``tokenizer`` (tasks.models.
    tokenizer_and_context): ``knobs.num_examples`` examples in dataset order whose reference has at least
    ``knobs.min_reference_tokens`` tokens after a ``knobs.prompt_tokens`` prompt, each fitting the model's
    ``context`` with ``knobs.max_new_tokens`` generated. Raises ConfigError when too few examples pass."""
    longest = max(0, knobs.max_new_tokens - knobs.max_reference_tokens)
    df, stats = build_prompts(
        documents(dataset), tokenizer, label=dataset.label, num_examples=knobs.num_examples,
        prompt_tokens=knobs.prompt_tokens, min_reference_tokens=knobs.min_reference_tokens,
        max_reference_tokens=knobs.max_reference_tokens, max_total_tokens=context - longest if context else None,
        prompt_format=dataset.prompt_format,
    )
    if stats.kept < knobs.num_examples:
        raise ConfigError(stats.message(dataset.label, knobs.num_examples, knobs.min_reference_tokens))
    log.info("dataset %s: %d examples (%d documents read, %d too short)", dataset.label, stats.kept,
             stats.documents, stats.dropped_short)
    return df
