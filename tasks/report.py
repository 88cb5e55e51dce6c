"""The markdown and HTML report of a study, with its figures (drawn by tasks.figures).

- error_accumulation.png: h_t (solid) and l_t (dashed) against t, smoothed, one colour per
  decoding, one panel per (model, dataset)
- entce_vs_temperature.png: EntCE with its CI against temperature, one line per (model, dataset)
- report.md: the numbers, one row per child run
- report.html: one self-contained page (figures as base64 data URIs, no external file: MLflow shows it
  in its artifact view): report.md's content, and excerpts of generations with each token shaded by
  its entropy (pick_excerpts)
"""
from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

import polars as pl

from entcal.tasks import figures
from entcal.tasks.contracts import StudyResult
from entcal.tasks.sections import study_sections

METRIC_COLUMNS = ("entce", "entce_ci_low", "entce_ci_high", "entropy", "logloss", "logloss_untruncated",
                  "truncated_share", "sampled_surprisal", "n_examples")


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.3f}"
    return str(v)


def _shape(row: dict, name: str) -> str:
    """A shape statistic with its CI, for reading."""
    lo, hi = row.get(f"{name}_ci") or (None, None)
    return f"{_fmt(row.get(name))} [{_fmt(lo)}, {_fmt(hi)}]"


def markdown_report(name: str, summary: pl.DataFrame, *, horizon: int, figures: list[str],
                    run_url: str | None = None, extra: str = "") -> str:
    lines = [f"# entcal study: {name}", ""]
    if run_url:
        lines += [f"MLflow run: {run_url}", ""]
    lines += [
        f"EntCE = H̄ − L̄ in nats per token over the first T = {horizon} steps; positive means the model's "
        "generations carry more entropy than its log loss on human text. CI: bootstrap over examples. The shape: "
        "per-step error (1/T)·Σ_t |h_t − l_t| of the smoothed curves, and the slope of h_t − l_t in nats per 100 "
        "steps (a pooled EntCE of 0 can hide a model too cold early and too hot late).",
        "",
        "| model | dataset | decoding | EntCE | CI | H̄ | L̄ | L̄ untruncated | truncated share | per-step error "
        "| slope /100 steps | n |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary.iter_rows(named=True):
        lines.append(
            f"| {r['model']} | {r['dataset']} | {r['decoding']} | {_fmt(r['entce'])} | "
            f"[{_fmt(r['entce_ci_low'])}, {_fmt(r['entce_ci_high'])}] | {_fmt(r['entropy'])} | {_fmt(r['logloss'])} | "
            f"{_fmt(r['logloss_untruncated'])} | {_fmt(r['truncated_share'])} | {_shape(r, 'calib_error_per_step')} | "
            f"{_shape(r, 'entce_slope')} | {r['n_examples']} |"
        )
    lines += [""] + [f"![{Path(f).stem}]({Path(f).name})" for f in figures] + ["", extra]
    return "\n".join(lines)


def write_report(out_dir: Path, name: str, rows: list[dict], result: StudyResult, *, horizon: int,
                 run_url: str | None = None, excerpts: list[dict] | None = None,
                 inputs: dict[str, str] | None = None) -> dict[str, Path]:
    """Write the study's report into ``out_dir``: the figures (tasks.figures.study_figures), calibration.json
    when the study calibrated, report.md (the table, then tasks.sections.study_sections) and the
    self-contained report.html (with ``excerpts``: pick_excerpts' dicts, and ``inputs``: each model's and
    dataset's identity), summary.parquet. ``rows``: one per child run (PairResult.row() with its run_id and
    run_url). Returns every file written by name ("report" is report.md, "html" report.html)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = pl.DataFrame(rows)
    files = figures.study_figures(out_dir, result, summary)
    extra = study_sections(result, inputs)
    if result.calibrations:
        docs = {c.label: c.as_dict() for c in result.calibrations}
        files["calibration.json"] = out_dir / "calibration.json"
        files["calibration.json"].write_text(json.dumps(next(iter(docs.values())) if len(docs) == 1
                                                        else {"pairs": docs}, indent=2, default=str))
    md_text = markdown_report(name, summary, horizon=horizon, figures=[str(files["error_accumulation"]),
                                                                       str(files["entce_vs_temperature"])],
                              run_url=run_url, extra=extra)
    md = out_dir / "report.md"
    md.write_text(md_text)
    page = out_dir / "report.html"
    page.write_text(html_report(name, md_text, out_dir, excerpts or []))
    summary.write_parquet(out_dir / "summary.parquet")
    return {**files, "report": md, "html": page}


# ------------------------------------------------------------------ excerpts of generations
def pick_excerpts(prompts: pl.DataFrame, generations: pl.DataFrame | dict[str, pl.DataFrame],
                  reference: pl.DataFrame | None = None, n: int = 3, *, model: str = "",
                  horizon: int | None = None) -> list[dict]:
    """``n`` generations of one (model, dataset) at evenly spaced ranks of their mean entropy (n = 3: the
    lowest, the median and the highest), from the decoding ``t1`` (τ = 1) when present, else the table's
    first. Mean entropy H̄ in nats per token over the first ``horizon`` steps (all steps when None).

    Returns JSON-able dicts: model, dataset, decoding, example_id, sample, rank ("lowest" | "median" |
    "highest" | "rank i/m"), mean_entropy, finish_reason, tokens [k] (each token's text; "⟨id⟩" when the
    table has no tokens column filled), entropies [k] (nats), text, prompt_text, reference_text and
    reference_logloss (the human continuation's mean log loss over the same horizon; None without
    ``reference``)."""
    if isinstance(generations, dict):
        generations = pl.concat(list(generations.values()), how="diagonal_relaxed") if generations else pl.DataFrame()
    if generations.is_empty() or n < 1:
        return []
    keys = generations["decoding"].unique(maintain_order=True).to_list()
    key = "t1" if "t1" in keys else keys[0]
    head = pl.col("step_entropy").list.head(horizon) if horizon else pl.col("step_entropy")
    g = (generations.filter((pl.col("decoding") == key) & (pl.col("token_ids").list.len() > 0))
         .with_columns(head.list.mean().alias("_h")).sort("_h", "example_id", "sample"))
    m = g.height
    if m == 0:
        return []
    ranks = sorted({k * (m - 1) // (n - 1) for k in range(n)} if n > 1 else {(m - 1) // 2})
    info = {r["example_id"]: r for r in prompts.iter_rows(named=True)}
    ref = {}
    if reference is not None and not reference.is_empty():
        r = reference.filter(pl.col("decoding") == key)
        col = pl.col("step_logloss").list.head(horizon) if horizon else pl.col("step_logloss")
        ref = dict(r.select("example_id", col.list.mean()).iter_rows())
    out = []
    for i in ranks:
        row = g.row(i, named=True)
        p = info.get(row["example_id"], {})
        label = ("lowest" if i == 0 else "highest" if i == m - 1 else "median" if i == (m - 1) // 2
                 else f"rank {i + 1}/{m}")
        tokens = row.get("tokens") or [f"⟨{t}⟩" for t in row["token_ids"]]
        out.append({
            "model": model, "dataset": p.get("dataset", ""), "decoding": key, "example_id": row["example_id"],
            "sample": row["sample"], "rank": label, "mean_entropy": float(row["_h"]),
            "finish_reason": row["finish_reason"], "tokens": list(tokens),
            "entropies": [float(h) for h in row["step_entropy"]], "text": row.get("text"),
            "prompt_text": p.get("prompt_text"), "reference_text": p.get("reference_text"),
            "reference_logloss": None if ref.get(row["example_id"]) is None else float(ref[row["example_id"]]),
        })
    return out


# ------------------------------------------------------------------ the HTML page
CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:1.5em auto;max-width:1150px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.2em .5em}th{background:#f3f3f3}
img{max-width:100%;display:block;margin:.6em 0}code{background:#f3f3f3;padding:0 .2em}
.ex{display:grid;grid-template-columns:1fr 1fr;gap:.6em;margin:.3em 0 1.6em}
.box{border:1px solid #ddd;border-radius:4px;padding:.5em;white-space:pre-wrap;overflow-wrap:anywhere;
font:12.5px/1.6 ui-monospace,Menlo,monospace;max-height:26em;overflow:auto}
.prompt{grid-column:1/3;background:#fafafa;color:#555;max-height:10em}.label{font:600 12px system-ui;color:#666}
.legend span{display:inline-block;min-width:3.4em;text-align:center;font-size:11px;padding:0 .2em}"""


def _shade(h: float, top: float) -> str:
    """Background of a token with entropy ``h`` nats on a scale whose darkest colour is ``top`` nats."""
    a = 0.0 if not h == h or top <= 0 else max(0.0, min(1.0, h / top))
    return f"rgba(230,85,13,{0.85 * a:.3f})"


def _inline(text: str, folder: Path) -> str:
    """Escape ``text``; then images (embedded from ``folder``), links, **bold**, `code` and bare URLs."""
    def sub(m: re.Match) -> str:
        alt, src, label, href, bold, code, url = m.groups()
        if src is not None:
            return _image(html.unescape(alt), html.unescape(src), folder)
        if label is not None:
            return f'<a href="{href}" target="_blank" rel="noopener">{label}</a>'
        if bold is not None:
            return f"<strong>{bold}</strong>"
        if code is not None:
            return f"<code>{code}</code>"
        return f'<a href="{url}" target="_blank" rel="noopener">{url}</a>'

    return _INLINE.sub(sub, html.escape(text, quote=True))


_INLINE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)|\[([^\]]+)\]\(([^)\s]+)\)|\*\*(.+?)\*\*|`([^`]+)`"
                     r"|(https?://[^\s<>|]+)")


def _image(alt: str, src: str, folder: Path) -> str:
    """An <img> whose source is a data: URI of ``folder/src`` (PNG, JPEG or SVG); text when it is missing."""
    path = folder / Path(src).name
    mime = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}
    if src.startswith("data:"):
        return f'<img alt="{html.escape(alt)}" src="{html.escape(src)}">'
    if not path.is_file() or path.suffix.lower() not in mime:
        return f"<em>[figure {html.escape(src)} is missing]</em>"
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:{mime[path.suffix.lower()]};base64,{data}">'


def markdown_to_html(md: str, folder: Path) -> str:
    """The markdown subset the report's sections use: # headings, paragraphs, pipe tables (first row the
    header, the |---| row skipped) and ![alt](file.png) images, embedded from ``folder`` as data URIs."""
    out, para, table = [], [], []

    def flush() -> None:
        if para:
            out.append(f"<p>{_inline(' '.join(para), folder)}</p>")
            para.clear()
        if table:
            cells = [[c.strip() for c in row.strip().strip("|").split("|")] for row in table]
            rows = [r for r in cells if not all(re.fullmatch(r":?-{2,}:?", c) for c in r)]
            head = "".join(f"<th>{_inline(c, folder)}</th>" for c in rows[0])
            body = "".join("<tr>" + "".join(f"<td>{_inline(c, folder)}</td>" for c in r) + "</tr>" for r in rows[1:])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            table.clear()

    for line in md.splitlines():
        s = line.strip()
        heading = re.match(r"(#{1,6})\s+(.*)", s)
        if not s or heading or (s.startswith("|") != bool(table)):
            flush()
        if heading:
            level = len(heading.group(1))
            out.append(f"<h{level}>{_inline(heading.group(2), folder)}</h{level}>")
        elif s.startswith("|"):
            table.append(s)
        elif s:
            para.append(s)
    flush()
    return "\n".join(out)


def excerpts_html(excerpts: list[dict]) -> str:
    """Per (model, dataset): its excerpts, one <span class="tok"> per token shaded by the token's entropy
    (title and data-entropy: the value in nats), beside the prompt and the human continuation."""
    if not excerpts:
        return ""
    top = max([h for e in excerpts for h in e["entropies"] if h == h] or [1.0]) or 1.0
    legend = "".join(f'<span style="background:{_shade(top * k / 5, top)}">{top * k / 5:.2f}</span>' for k in range(6))
    parts = ["<h2>Generations at low, median and high entropy</h2>",
             "<p>Each token of a generation is shaded by the entropy H(q<sub>t</sub>) of the distribution it was "
             "sampled from (hover for the value); the prompt is above, the human continuation of the same prompt "
             f'on the right.</p><p class="legend">entropy, nats: {legend}</p>']
    seen = []
    for e in excerpts:
        group = (e["model"], e["dataset"], e["decoding"])
        if group not in seen:
            seen.append(group)
            parts.append(f"<h3>{html.escape(' · '.join(g for g in group if g))}</h3>")
        spans = "".join(f'<span class="tok" style="background:{_shade(h, top)}" title="H = {h:.3f} nats" '
                        f'data-entropy="{h:.4f}">{html.escape(t)}</span>'
                        for t, h in zip(e["tokens"], e["entropies"]))
        ll = e.get("reference_logloss")
        ref_ll = "" if ll is None else f" · mean log loss {ll:.3f} nats/token"
        prompt = html.escape(e.get("prompt_text") or "(no prompt text)")
        human = html.escape(e.get("reference_text") or "(no reference text)")
        parts.append(
            f'<h4>{html.escape(e["rank"])} entropy: {html.escape(str(e["example_id"]))} (sample {e["sample"]}) · '
            f'H̄ = {e["mean_entropy"]:.3f} nats/token · {len(e["tokens"])} tokens · '
            f'ended by {html.escape(e["finish_reason"])}</h4><div class="ex">'
            f'<div class="box prompt"><div class="label">prompt</div>{prompt}</div>'
            f'<div class="box gen"><div class="label">generation</div>{spans}</div>'
            f'<div class="box ref"><div class="label">human continuation{ref_ll}</div>{human}</div></div>')
    return "\n".join(parts)


def html_report(name: str, md: str, folder: Path, excerpts: list[dict]) -> str:
    """One self-contained page: the markdown report as HTML (figures as data URIs) and the excerpts."""
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>entcal study: {html.escape(name)}</title>'
            f"<style>{CSS}</style></head><body>\n{markdown_to_html(md, folder)}\n{excerpts_html(excerpts)}\n"
            "</body></html>\n")


def artifact_markdown(md: str, file_url) -> str:
    """``md`` for a place that cannot show local files (the Prefect UI): every ![alt](file) becomes a
    link to ``file_url(file name)``."""
    return re.sub(r"!\[([^\]]*)\]\(([^)\s]+)\)",
                  lambda m: f"[{m.group(1)} (figure)]({file_url(Path(m.group(2)).name)})", md)
