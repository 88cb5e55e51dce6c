import json
import os
import platform
import subprocess

import polars as pl
import pytest

from entcal.tasks.config import ConfigError, DatasetSpec
from entcal.tasks.datasets import (build_prompts, documents, preset_documents, python_docs_documents,
                            python_stdlib_documents)
from tests.conftest import start_python

TEXT = "The quick brown fox jumps over the lazy dog. " * 40


def _ids(docs, n):
    return [d.doc_id for _, d in zip(range(n), docs)]


def test_builtin_ids_are_stable_and_unique():
    a, b = _ids(python_docs_documents(), 200), _ids(python_docs_documents(), 200)
    assert a == b and len(set(a)) == len(a) and a[0].startswith("python-docs/")
    c = _ids(python_stdlib_documents(), 50)
    assert c == _ids(python_stdlib_documents(), 50) and all(i.startswith("python-stdlib/") for i in c)
    assert any(i.endswith(".py") for i in c)


def test_prompts_split_prompt_and_reference(tiny_lm):
    tok = tiny_lm.tokenizer
    df, stats = build_prompts(documents(DatasetSpec(name="python-docs")), tok, label="python-docs", num_examples=5,
                              prompt_tokens=16, min_reference_tokens=40, max_reference_tokens=60)
    assert df.height == 5 and stats.kept == 5
    assert df.schema["prompt_ids"] == pl.List(pl.Int32)
    for ex, p, r in df.select("example_id", "prompt_ids", "reference_ids").iter_rows():
        assert len(p) == 16 and 40 <= len(r) <= 60
    # the continuation is the text right after the prompt
    first = next(d for d in documents(DatasetSpec(name="python-docs")) if d.doc_id == df["example_id"][0])
    ids = tok(first.text, add_special_tokens=False).input_ids
    assert df["prompt_ids"][0].to_list() + df["reference_ids"][0].to_list() == ids[: 16 + len(df["reference_ids"][0])]


def test_short_documents_are_dropped_and_counted(tiny_lm, tmp_path):
    rows = [{"text": "short text"}, {"text": TEXT}, {"text": "tiny"}]
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows))
    df, stats = build_prompts(documents(DatasetSpec(name="mine", path=str(p))), tiny_lm.tokenizer, label="mine",
                              num_examples=3, prompt_tokens=8, min_reference_tokens=30, max_reference_tokens=30)
    assert df["example_id"].to_list() == ["mine/1"]
    assert (stats.kept, stats.dropped_short) == (1, 2)
    assert "2 dropped with a reference shorter than min_reference_tokens=30" in stats.message("mine", 3, 30)


def test_local_formats(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    pl.DataFrame({"id": ["x", "y"], "body": [TEXT, TEXT]}).write_parquet(tmp_path / "b.parquet")
    assert [d.doc_id for d in documents(DatasetSpec(name="t", path=str(tmp_path / "a.txt")))] == ["t/a"]
    docs = list(documents(DatasetSpec(name="p", path=str(tmp_path / "b.parquet"), text_field="body")))
    assert [d.doc_id for d in docs] == ["p/x", "p/y"]
    with pytest.raises(ConfigError, match="no column 'text'"):
        list(documents(DatasetSpec(name="p", path=str(tmp_path / "b.parquet"))))
    with pytest.raises(ConfigError, match="does not exist"):
        list(documents(DatasetSpec(name="m", path=str(tmp_path / "missing.jsonl"))))


def test_presets_apply_the_papers_filters():
    wiki = pl.DataFrame({"text": [" = Title = \n", "x" * 250, "y" * 199]})
    assert [d.doc_id for d in preset_documents("wikitext-103", wiki)] == ["wikitext-103/1"]
    wp = pl.DataFrame({"prompt": ["[WP] A cat rules. "], "story": ["Once upon a time"]})
    (d,) = preset_documents("writingprompts", wp)
    assert d.instruction == "Write a story based on the following prompt: [WP] A cat rules." and d.text_in_prompt
    cc = pl.DataFrame({"name": ["p1"], "description": ["Add two numbers."],
                       "solutions": [{"language": [1, 3, 3], "solution": ["print(1)", "x = 1\nprint(x + 1)", "ünï"]}]})
    (d,) = preset_documents("codecontests", cc)
    assert d.text == "x = 1\nprint(x + 1)" and not d.text_in_prompt and "Add two numbers." in d.instruction


def test_instruction_formats(tiny_lm):
    from entcal.tasks.datasets import Document, _prefix_ids

    tok = tiny_lm.tokenizer
    doc = Document("d", "Once upon a time", instruction="Write a story")
    assert tok.decode(_prefix_ids(tok, doc, "qa")) == "Q: Write a story\nA: "
    assert _prefix_ids(tok, Document("d", "text"), "auto") == []


def test_prompt_and_reference_text_are_the_decoded_ids(tiny_lm):
    tok = tiny_lm.tokenizer
    df, _ = build_prompts(documents(DatasetSpec(name="python-docs")), tok, label="python-docs", num_examples=3,
                          prompt_tokens=16, min_reference_tokens=20, max_reference_tokens=30)
    assert df.schema["prompt_text"] == pl.String and df.schema["reference_text"] == pl.String
    docs = {d.doc_id: d.text for _, d in zip(range(50), documents(DatasetSpec(name="python-docs")))}
    for ex, p, r, pt, rt in df.select("example_id", "prompt_ids", "reference_ids", "prompt_text",
                                      "reference_text").iter_rows():
        assert pt == tok.decode(p) and rt == tok.decode(r, skip_special_tokens=True)
        assert docs[ex].startswith(pt + rt)  # the human text, cut where the prompt ends


def test_prepare_prompts_takes_its_knobs_and_refuses_too_few_examples(tiny_spec, tiny_lm, tmp_path):
    from entcal.tasks.contracts import PromptKnobs
    from entcal.tasks.datasets import prepare_prompts

    knobs = PromptKnobs(num_examples=3, prompt_tokens=16, min_reference_tokens=20, max_reference_tokens=30,
                        max_new_tokens=40)
    from entcal.tasks.models import tokenizer_and_context

    tok, context = tokenizer_and_context(tiny_spec)
    df = prepare_prompts(tok, context, DatasetSpec(name="python-docs"), knobs)
    want, _ = build_prompts(documents(DatasetSpec(name="python-docs")), tiny_lm.tokenizer, label="python-docs",
                            num_examples=3, prompt_tokens=16, min_reference_tokens=20, max_reference_tokens=30)
    assert df.equals(want)
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"text": t}) for t in ("short text", TEXT)))
    with pytest.raises(ConfigError) as err:
        prepare_prompts(tok, context, DatasetSpec(name="mine", path=str(p)), knobs)
    assert str(err.value).startswith("dataset mine: 1 usable examples of 3 requested (2 documents read; 1 dropped "
                                     "with a reference shorter than min_reference_tokens=20")


# ---------------------------------------------------------------- identity: what documents() reads
def _ids_of(path, **kw) -> list[str]:
    from entcal.tasks.datasets import identity

    return [identity(DatasetSpec(name="d", path=str(path), fingerprint=f, **kw)) for f in ("stat", "content")]


def _bump_mtime(path, ns: int = 1_000_000) -> None:
    """What `touch` does, made certain: the mtime moves by ``ns`` (a coarse clock may not move in a test)."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + ns))


def test_identity_of_a_local_file_follows_its_texts(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"text": t}) for t in (TEXT, "second text " * 50)))
    first = _ids_of(p)
    assert first[0].startswith("file:stat:") and first[1].startswith("file:content:")
    assert _ids_of(p) == first  # unchanged: the same identity
    p.write_text("\n".join(json.dumps({"text": t}) for t in (TEXT, "other texts " * 50)))  # same size, new texts
    replaced = _ids_of(p)
    assert replaced[0] != first[0] and replaced[1] != first[1]
    _bump_mtime(p)  # the same bytes with a new mtime (a touch, a rewrite): stat re-keys, content does not
    assert _ids_of(p)[0] != replaced[0] and _ids_of(p)[1] == replaced[1]
    moved = p.rename(tmp_path / "e.jsonl")  # a file's own name and place are not part of it
    assert _ids_of(moved)[1] == replaced[1]
    with pytest.raises(ConfigError, match="does not exist"):
        _ids_of(tmp_path / "gone.jsonl")


def test_identity_of_a_folder_is_its_txt_files(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    first = _ids_of(tmp_path)
    assert first[0].startswith("txt-dir:stat:")
    (tmp_path / "notes.md").write_text("not read")  # documents() reads *.txt directly in the folder, nothing else
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text(TEXT)
    assert _ids_of(tmp_path) == first
    (tmp_path / "b.txt").write_text(TEXT)
    assert all(a != b for a, b in zip(_ids_of(tmp_path), first))


def test_builtin_identities_are_stable_within_one_python():
    from entcal.tasks.datasets import identity

    docs, stdlib = DatasetSpec(name="python-docs"), DatasetSpec(name="python-stdlib")
    assert identity(docs) == identity(docs) and identity(docs).startswith("python-docs:")
    assert identity(stdlib) == identity(stdlib)
    assert identity(stdlib).startswith(f"python-stdlib:{platform.python_version()}:stat:")
    content = DatasetSpec(name="python-stdlib", fingerprint="content")
    assert identity(content) == identity(content) and ":content:" in identity(content)


HUB_DATASETS = """
import json, sys
from pathlib import Path
from entcal.tasks.config import ConfigError, DatasetSpec
from entcal.tasks.datasets import identity

ref, moved = Path(sys.argv[1]), sys.argv[2]
out = {"hf": identity(DatasetSpec(hf="org/data")), "preset": identity(DatasetSpec(preset="wikitext-103"))}
ref.write_text(moved)
out["moved"] = identity(DatasetSpec(hf="org/data"))
try:
    identity(DatasetSpec(hf="org/absent"))
except ConfigError as err:
    out["error"] = str(err)
print(json.dumps(out))
"""


def test_hub_dataset_identity_is_its_commit_offline_from_the_cache(tmp_path):
    """A hub dataset and a preset by the commit their main branch names (offline: the local Hugging Face
    cache's refs, as huggingface_hub lays them out); moving the branch re-keys; nothing cached is one line."""
    cache = tmp_path / "hub"
    commits = {"org/data": "1" * 40, "Salesforce/wikitext": "2" * 40}
    for repo, commit in commits.items():
        refs = cache / ("datasets--" + repo.replace("/", "--")) / "refs"
        refs.mkdir(parents=True)
        (refs / "main").write_text(commit)
    ref = cache / "datasets--org--data" / "refs" / "main"
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "home")}
    proc = start_python("-c", HUB_DATASETS, str(ref), "3" * 40, env=env, stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
    got = json.loads(out.strip().splitlines()[-1])
    assert got["hf"] == f"hub:datasets/org/data@{'1' * 40}" and got["moved"] == f"hub:datasets/org/data@{'3' * 40}"
    assert got["preset"] == f"hub:datasets/Salesforce/wikitext@{'2' * 40}"
    assert got["error"] == ("dataset absent: cannot name its commit: revision 'main' of org/absent resolves to no "
                            "commit (offline (HF_HUB_OFFLINE) and the local Hugging Face cache has no such ref); go "
                            "online, or download it first (hf download org/absent --repo-type dataset --revision "
                            "main)")
