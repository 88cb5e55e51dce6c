"""report.html: one self-contained page (figures as data URIs) with excerpts of real generations of the
tiny model, each token a span shaded by its entropy; generated text is shown as text, never as markup."""
import base64
import json
import re
from html.parser import HTMLParser

import polars as pl
import pytest

from entcal.tasks import report
from entcal.tasks.config import DatasetSpec, DecodingSpec
from entcal.tasks.datasets import build_prompts, documents
from entcal.tasks.generate import token_strings
from entcal.tasks.contracts import CalibrationResult, StudyResult
from entcal.tasks.metrics import pair_result, step_curves
from tests.tasks.helpers import gen, scored, summary_knobs

HORIZON = 12


class Page(HTMLParser):
    """The page's <img> sources, links, <script> elements, and the token spans of each generation box."""

    def __init__(self, text: str):
        super().__init__()
        self.srcs, self.hrefs, self.scripts, self.boxes, self.h4 = [], [], 0, [], []
        self._tok = self._h4 = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.srcs.append(a.get("src", ""))
        if tag == "a":
            self.hrefs.append(a.get("href", ""))
        if tag == "script":
            self.scripts += 1
        if tag == "div" and "gen" in (a.get("class") or "").split():
            self.boxes.append([])
        if tag == "span" and a.get("class") == "tok":
            self._tok = [float(a["data-entropy"]), a["title"], ""]
            self.boxes[-1].append(self._tok)
        if tag == "h4":
            self._h4 = ""

    def handle_endtag(self, tag):
        if tag == "span":
            self._tok = None
        if tag == "h4" and self._h4 is not None:
            self.h4.append(self._h4)
            self._h4 = None

    def handle_data(self, data):
        if self._tok is not None:
            self._tok[2] += data
        if self._h4 is not None:
            self._h4 += data


@pytest.fixture(scope="module")
def tables(tiny_lm):
    """Real prompts, generations (with their text columns) and reference scores of the tiny model."""
    prompts, _ = build_prompts(documents(DatasetSpec(name="python-docs")), tiny_lm.tokenizer, label="python-docs",
                               num_examples=5, prompt_tokens=10, min_reference_tokens=HORIZON,
                               max_reference_tokens=HORIZON)
    dec = DecodingSpec()
    gens = gen(tiny_lm, prompts, dec, max_new_tokens=HORIZON, samples_per_prompt=1, seed=0, batch_size=4,
               eos_ids=None)  # the model's own EOS ids
    ref = scored(tiny_lm, prompts, [dec], max_tokens=HORIZON, epsilon=1e-6, batch_size=4)
    return prompts, gens, ref


CALIBRATION = CalibrationResult(
    label="tiny__python-docs", tau_star=0.9, tau_star_ci=(0.8, 1.0), tau_converged=True, logloss_at_tau_star=3.2,
    logloss_at_tau_1=3.1, truncation=[],
    sweep=[{"method": m, "param": p, "decoding": d, "entce": e, "entce_ci_low": e - 0.1, "entce_ci_high": e + 0.1,
            "logloss": l, "logloss_untruncated": l, "truncated_share": 0.0, "entropy": l + e,
            "logloss_eps_x10": l, "logloss_eps_div10": l}
           for m, p, d, e, l in (("temperature", 1.0, "t1", 0.2, 3.1), ("temperature", 0.8, "t0.8", -0.1, 3.3))],
    pareto_front=[], fit_examples=2, eval_examples=3, epsilon=1e-4)


def _write(out, tables, calibrations=(), excerpts=None):
    """The study's report of the tiny model's one pair (and ``calibrations``) through report.write_report."""
    prompts, gens, ref = tables
    pair = pair_result("tiny", "python-docs", DecodingSpec(), prompts, gens, ref, summary_knobs(horizon=HORIZON, bootstrap=20))
    result = StudyResult(pairs=[pair], calibrations=list(calibrations), scaling=[], corpus_alpha={}, cached=[], ran=[])
    if excerpts is None:
        excerpts = report.pick_excerpts(prompts, {"t1": gens}, ref, model="tiny", horizon=HORIZON)
    return report.write_report(out, "tiny", [pair.row()], result, horizon=HORIZON,
                               run_url="http://127.0.0.1:5000/#/experiments/1/runs/abc", excerpts=excerpts)


def test_html_is_self_contained_with_the_figures_embedded(tables, tmp_path):
    files = _write(tmp_path, tables, calibrations=[CALIBRATION])
    text = files["html"].read_text()
    page = Page(text)
    assert len(page.srcs) == 3 and all(s.startswith("data:image/png;base64,") for s in page.srcs)
    embedded = {base64.b64decode(s.split(",", 1)[1]) for s in page.srcs}
    assert (tmp_path / "pareto__tiny__python-docs.png").read_bytes() in embedded
    assert (tmp_path / "error_accumulation.png").read_bytes() in embedded
    # nothing points at a file beside the page
    assert not re.findall(r'(?:src|href)="(?!data:|https?://)', text)
    assert "<h2>Calibration: tiny__python-docs</h2>" in text and "<td>temperature</td><td>0.8</td>" in text
    assert "<th>EntCE</th>" in text
    # report.md stays for --out readers, with its relative figure links; calibration.json beside it
    assert "(pareto__tiny__python-docs.png)" in files["report"].read_text()
    assert json.loads(files["calibration.json"].read_text())["tau_star"] == 0.9



def test_the_table_gives_each_decodings_shape_with_its_ci(tables, tmp_path):
    """Per-step error and the slope of h_t − l_t, with their CIs, in report.md's row of every decoding."""
    prompts, gens, ref = tables
    pair = pair_result("tiny", "python-docs", DecodingSpec(), prompts, gens, ref, summary_knobs(horizon=HORIZON, bootstrap=20))
    s = pair.summary
    (row,) = [line for line in _write(tmp_path, tables)["report"].read_text().splitlines()
              if line.startswith("| tiny | python-docs | t1 |")]
    lo, hi = s.calib_error_per_step_ci
    assert f"| {s.calib_error_per_step:.3f} [{lo:.3f}, {hi:.3f}] |" in row
    assert f"| {s.entce_slope:.3f} [{s.entce_slope_ci[0]:.3f}, {s.entce_slope_ci[1]:.3f}] |" in row


def test_three_excerpts_with_one_span_per_token_carrying_its_entropy(tables, tmp_path):
    prompts, gens, ref = tables
    excerpts = report.pick_excerpts(prompts, gens, ref, model="tiny", horizon=HORIZON)
    assert [e["rank"] for e in excerpts] == ["lowest", "median", "highest"]
    means = sorted(gens["step_entropy"].list.head(HORIZON).list.mean().to_list())
    assert [e["mean_entropy"] for e in excerpts] == pytest.approx([means[0], means[2], means[-1]])
    page = Page(_write(tmp_path, tables, excerpts=excerpts)["html"].read_text())
    assert len(page.boxes) == 3 and [h.split(" ")[0] for h in page.h4] == ["lowest", "median", "highest"]
    for e, box in zip(excerpts, page.boxes):
        row = gens.filter(pl.col("example_id") == e["example_id"]).row(0, named=True)
        assert len(box) == len(row["token_ids"]) == len(e["tokens"])
        assert [b[0] for b in box] == pytest.approx(row["step_entropy"], abs=1e-4)
        assert all(title == f"H = {h:.3f} nats" for (h, title, _), h in zip(box, row["step_entropy"]))
        assert "".join(b[2] for b in box) == "".join(row["tokens"])
        p = prompts.filter(pl.col("example_id") == e["example_id"]).row(0, named=True)
        assert e["prompt_text"] == p["prompt_text"] and e["reference_text"] == p["reference_text"]
        r = ref.filter(pl.col("example_id") == e["example_id"])["step_logloss"][0].to_list()[:HORIZON]
        assert e["reference_logloss"] == pytest.approx(sum(r) / len(r))


def test_generated_markup_is_shown_as_text(tiny_lm, tables, tmp_path):
    tok = tiny_lm.tokenizer
    texts = ['<script>alert("x")</script> & <b>bold</b>', "plain words here", "def f(x): return x"]
    ids = [tok(t, add_special_tokens=False).input_ids for t in texts]
    gens = pl.DataFrame({
        "example_id": ["a", "b", "c"], "sample": [0, 0, 0], "decoding": ["t1"] * 3, "token_ids": ids,
        "step_entropy": [[3.0] * len(ids[0]), [1.0] * len(ids[1]), [0.5] * len(ids[2])],
        "step_logprob": [[-1.0] * len(i) for i in ids], "finish_reason": ["length"] * 3,
        "text": tok.batch_decode(ids, skip_special_tokens=True), "tokens": token_strings(tok, ids),
    })
    prompts = pl.DataFrame({"example_id": ["a", "b", "c"], "dataset": ["d"] * 3,
                            "prompt_text": ["<img src=x onerror=alert(1)>"] * 3, "reference_text": ["</div>"] * 3})
    excerpts = report.pick_excerpts(prompts, gens, model="m")
    assert excerpts[-1]["example_id"] == "a" and excerpts[-1]["rank"] == "highest"
    text = _write(tmp_path, tables, excerpts=excerpts)["html"].read_text()
    page = Page(text)
    assert page.scripts == 0 and "<script" not in text and "<b>" not in text
    assert "".join(b[2] for b in page.boxes[-1]) == texts[0]  # shown exactly, as text (tokens escaped one by one)
    assert "&lt;img src=x onerror=alert(1)&gt;" in text and all(s.startswith("data:") for s in page.srcs)


def test_token_strings_round_trip_through_the_tiny_tokenizer(tiny_lm):
    tok = tiny_lm.tokenizer
    text = "Entropie: ±0.5 nats — 日本語 ✓ <eos>"
    ids = tok(text, add_special_tokens=False).input_ids
    pieces = token_strings(tok, [ids, []])
    assert len(pieces[0]) == len(ids) and pieces[1] == []
    assert "".join(pieces[0]) == text == tok.decode(ids)
    assert pieces[0][-1] == "<eos>"  # special tokens keep their text per token
    assert "" in pieces[0]  # a multi-byte character's leading byte tokens carry no text of their own


def test_prefect_artifact_markdown_links_figures_instead_of_embedding_them():
    md = "# x\n\n![error_accumulation](error_accumulation.png)\n\n![pareto](pareto__a.png)\n"
    out = report.artifact_markdown(md, lambda f: f"http://mlflow/#/experiments/1/runs/r/artifacts/report/{f}")
    assert "![" not in out
    assert "[pareto (figure)](http://mlflow/#/experiments/1/runs/r/artifacts/report/pareto__a.png)" in out


def test_a_missing_figure_is_named_not_linked(tmp_path):
    html = report.markdown_to_html("para one\nstill one\n\n![gone](gone.png)", tmp_path)
    assert "<p>para one still one</p>" in html and "gone.png is missing" in html and "<img" not in html


def test_child_figure_draws_the_unsmoothed_curves_and_still_saves_once_closed(tables):
    import io

    import matplotlib.pyplot as plt

    from entcal.tasks import figures

    prompts, gens, ref = tables
    curves = step_curves(gens, ref, horizon=HORIZON)
    fig = figures.error_accumulation_figure(curves, "t1 · python-docs · tiny")
    (ax,) = fig.axes
    h, l = ax.get_lines()
    assert list(h.get_xdata()) == curves["step"].to_list()
    assert list(h.get_ydata()) == curves["entropy_mean"].to_list() and h.get_linestyle() == "-"
    assert list(l.get_ydata()) == curves["logloss_mean"].to_list() and l.get_linestyle() == "--"
    assert fig not in [plt.figure(n) for n in plt.get_fignums()]  # no pyplot state left behind
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    assert buf.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"
