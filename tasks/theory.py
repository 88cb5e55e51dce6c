"""The paper's simplified theory (docs/SCIENCE.md §3) and the power-law α of a corpus.

Plain functions (no Prefect, no I/O), numpy only; the plot is tasks.figures.plot_theory:

    expected_derail_probability(alpha, m, *, vocab=None) -> q        # E[K_{m,1}]/m, closed form
    derail_probability(alpha, m, *, vocab, seed) -> q                # K_{m,1}/m from one sample
    simulate_theory(alpha, ms, *, vocab, derail_entropy_gap_nats, horizon, method, seed) -> TheoryCurve
    theory_curves(alphas, ms) / theory_results(alphas, ms) -> one curve / one dict per α
    corpus_alpha(units | counts, *, top) -> α of a corpus (minus the log-frequency/log-rank slope)
    corpus_alpha_stats(texts, *, top, max_words) -> α over the top 5000 lower-cased words + diagnostics

The theory. Data are tokens i = 1, 2, … with p_i ∝ i^(−α). A model has seen m
training tokens and samples from their empirical counts; at each generated step it draws a token it
saw exactly once with probability q = K_{m,1}/m (K_{m,1}: types seen exactly once), and from then on
it is "derailed": its entropy is higher by a constant gap (nats). E[K_{m,1}]/m = Σ_i p_i (1 − p_i)^(m−1),
which scales as m^(1/α − 1) when the vocabulary is unbounded.

Miscalibration over a horizon of T steps, in closed form: the model is derailed at step t with
probability 1 − (1 − q)^t, so EntCE(q) = gap · (1/T) Σ_{t=1..T} [1 − (1 − q)^t]
                                       = gap · [1 − (1 − q)(1 − (1 − q)^T) / (q T)].
For q·T ≪ 1 this is gap·q·(T + 1)/2 and inherits the exponent 1/α − 1; once q·T ≳ 1 the model
derails early in almost every generation, EntCE saturates at the gap and its exponent tends to 0
(for α near 1 even a large training set leaves q large: that is the paper's point).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from entcal.tasks.scaling import _ols, fit_exponent

# Defaults of the theory simulation. ms span 10^4..10^7 training tokens; the horizon is short so
# that q·T stays small where the power law is cleanest (α ≥ 1.5); see the module docstring.
THEORY_MS = tuple(float(m) for m in np.logspace(4, 7, 13))
THEORY_HORIZON = 4
THEORY_ALPHAS = (1.2, 1.5, 2.0, 3.0)
_ZETA_HEAD = 1 << 16          # exact terms before the Euler–Maclaurin tail of ζ(α)
_MIN_HEAD = 1 << 12           # exact terms before the analytic tail of Σ p_i (1 − p_i)^(m−1)
_TAIL_TERMS = 60              # series terms of the lower incomplete gamma function


# --------------------------------------------------------------------------- theory (§3)

def _check_alpha(alpha: float, vocab: int | None) -> None:
    if vocab is None and not alpha > 1:
        raise ValueError(f"an unbounded Zipf vocabulary needs alpha > 1, got {alpha}")
    if vocab is not None and (not alpha > 0 or int(vocab) < 1):
        raise ValueError(f"expected alpha > 0 and vocab ≥ 1, got alpha={alpha}, vocab={vocab}")


def zipf_probs(alpha: float, vocab: int) -> np.ndarray:
    """p[vocab], float64: p_i = i^(−α) / Σ_{j ≤ vocab} j^(−α), i = 1..vocab (index 0 is rank 1)."""
    _check_alpha(alpha, vocab)
    w = np.arange(1, int(vocab) + 1, dtype=np.float64) ** -alpha
    return w / w.sum()


def zeta(alpha: float) -> float:
    """Riemann ζ(α) for α > 1: an exact head plus the Euler–Maclaurin tail (relative error ≪ 1e-12)."""
    n = _ZETA_HEAD
    head = float(np.sum(np.arange(1, n + 1, dtype=np.float64) ** -alpha))
    return head + n ** (1 - alpha) / (alpha - 1) - 0.5 * n ** -alpha + alpha * n ** (-alpha - 1) / 12


def expected_derail_probability(alpha: float, m: float | Sequence[float], *,
                                vocab: int | None = None) -> np.ndarray:
    """E[K_{m,1}]/m = Σ_i p_i (1 − p_i)^(m−1): the expected per-step derailing chance, in [0, 1].

    m: training-set size(s) in tokens (scalar or array; result has its shape, float64).
    vocab: finite vocabulary size V (p normalised over i ≤ V, exact sum vectorised over types), or
    None for the unbounded Zipf law (needs α > 1): an exact sum over the first H types, H chosen so
    that (m − 1)·p_H ≤ 1, plus the tail Σ_{i>H} ≈ ∫_H^∞ g − g(H)/2 with g(x) = p(x) e^{−(m−1)p(x)},
    whose integral is H^{1−α}/(αζ) · Σ_k (−u)^k / (k! (1 − 1/α + k)), u = (m − 1) H^{−α}/ζ.
    """
    _check_alpha(alpha, vocab)
    ms = np.asarray(m, dtype=np.float64)
    if np.any(ms < 1):
        raise ValueError(f"expected training-set sizes m ≥ 1, got min {ms.min()}")
    flat = ms.reshape(-1)
    if vocab is not None:
        p = zipf_probs(alpha, vocab)
        log1m = np.log1p(-p)
        out = np.array([float(np.dot(p, np.exp((mi - 1.0) * log1m))) for mi in flat])
        return out.reshape(ms.shape)
    z = zeta(alpha)
    head = max(_MIN_HEAD, int(math.ceil((max(float(flat.max()) - 1.0, 1.0) / z) ** (1 / alpha))) + 1)
    p = np.arange(1, head + 1, dtype=np.float64) ** -alpha / z
    log1m = np.log1p(-p)
    s = 1.0 - 1.0 / alpha
    k = np.arange(_TAIL_TERMS, dtype=np.float64)
    log_fact = np.cumsum(np.log(np.maximum(k, 1.0)))
    out = np.empty(flat.shape)
    for j, mi in enumerate(flat):
        exact = float(np.dot(p, np.exp((mi - 1.0) * log1m)))
        p_h = head ** -alpha / z
        u = (mi - 1.0) * p_h
        series = float(np.sum((-1.0) ** k * np.exp(k * math.log(u) - log_fact) / (s + k))) \
            if u > 0 else 1.0 / s
        integral = head ** (1 - alpha) / (alpha * z) * series
        out[j] = exact + integral - 0.5 * p_h * math.exp(-u)
    return out.reshape(ms.shape)


def derail_probability(alpha: float, m: int, *, vocab: int, seed: int = 0) -> float:
    """K_{m,1}/m from one sample: draw m i.i.d. training tokens from the Zipf(α) law over ``vocab``
    types and count the types seen exactly once. Unbiased for ``expected_derail_probability``."""
    _check_alpha(alpha, vocab)
    m = int(m)
    if m < 1:
        raise ValueError(f"expected m ≥ 1 training tokens, got {m}")
    cdf = np.cumsum(zipf_probs(alpha, vocab))
    draws = np.searchsorted(cdf, np.random.default_rng(seed).random(m) * cdf[-1], side="right")
    counts = np.bincount(np.minimum(draws, int(vocab) - 1), minlength=int(vocab))
    return float(np.count_nonzero(counts == 1)) / m


def expected_entce(q: float | np.ndarray, *, horizon: int, derail_entropy_gap_nats: float = 1.0
                   ) -> np.ndarray:
    """Expected EntCE (nats/token) over T = ``horizon`` steps when each not-yet-derailed step derails
    with probability q and a derailed step has entropy higher by the gap:
    gap · [1 − (1 − q)(1 − (1 − q)^T) / (qT)]  (→ gap·q·(T+1)/2 as q → 0)."""
    if int(horizon) < 1:
        raise ValueError(f"expected horizon ≥ 1 step, got {horizon}")
    q = np.asarray(q, dtype=np.float64)
    if np.any(~((q >= 0) & (q <= 1))):
        raise ValueError("expected derailing probabilities q in [0, 1]")
    t = float(horizon)
    # (1 − (1−q)^T)/q without cancellation: −expm1(T log1p(−q)) / q, with the q → 0 limit T.
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(q > 0, -np.expm1(t * np.log1p(-q)) / q, t)
    return derail_entropy_gap_nats * (1.0 - (1.0 - q) * frac / t)


@dataclass(frozen=True)
class TheoryCurve:
    """One α of the simplified setting. ms[k]: training tokens; derail_probability[k]: q per step;
    entce_nats[k]: expected EntCE over the horizon; exponents are slopes on log m."""

    alpha: float
    ms: tuple[float, ...]
    derail_probability: tuple[float, ...]
    entce_nats: tuple[float, ...]
    horizon: int
    fitted_exponent: float          # of entce_nats
    derail_exponent: float          # of derail_probability
    predicted_exponent: float       # 1/α − 1

    def as_row(self) -> dict[str, float | int]:
        return {"alpha": self.alpha, "fitted_exponent": self.fitted_exponent,
                "predicted_exponent": self.predicted_exponent,
                "derail_exponent": self.derail_exponent, "horizon": self.horizon,
                "m_min": min(self.ms), "m_max": max(self.ms)}


def simulate_theory(alpha: float, ms: Sequence[float] = THEORY_MS, *, vocab: int | None = None,
                    derail_entropy_gap: float = 1.0, horizon: int = THEORY_HORIZON,
                    method: str = "exact", seed: int = 0) -> TheoryCurve:
    """Miscalibration of the simplified setting as a function of training-set size m.

    method="exact": q = E[K_{m,1}]/m in closed form (vocab=None: unbounded Zipf law, the default);
    method="sampled": q = K_{m,1}/m from one training sample per m (needs a finite vocab; seed).
    EntCE per m is then the closed-form expectation over the horizon (``expected_entce``), nats/token.
    """
    if method not in ("exact", "sampled"):
        raise ValueError(f"method: expected 'exact' or 'sampled', got {method!r}")
    m_arr = np.asarray(ms, dtype=np.float64)
    if method == "exact":
        q = expected_derail_probability(alpha, m_arr, vocab=vocab)
    else:
        if vocab is None:
            raise ValueError("method='sampled' needs a finite vocab")
        q = np.array([derail_probability(alpha, int(mi), vocab=vocab, seed=seed + k)
                      for k, mi in enumerate(m_arr)])
    entce = expected_entce(q, horizon=horizon, derail_entropy_gap_nats=derail_entropy_gap)
    return TheoryCurve(alpha=float(alpha), ms=tuple(m_arr.tolist()),
                       derail_probability=tuple(q.tolist()), entce_nats=tuple(entce.tolist()),
                       horizon=int(horizon), fitted_exponent=fit_exponent(m_arr, entce),
                       derail_exponent=fit_exponent(m_arr, q), predicted_exponent=1.0 / alpha - 1.0)


def theory_curves(alphas: Sequence[float] = THEORY_ALPHAS, ms: Sequence[float] | None = None,
                  **kwargs) -> list[TheoryCurve]:
    """``simulate_theory`` for each α (ms defaults to THEORY_MS; kwargs pass through)."""
    return [simulate_theory(a, THEORY_MS if ms is None else ms, **kwargs) for a in alphas]


def theory_results(alphas: Sequence[float] = THEORY_ALPHAS, ms: Sequence[float] | None = None,
                   **kwargs) -> list[dict[str, float | int]]:
    """One dict per α: alpha, fitted_exponent (of EntCE), predicted_exponent = 1/α − 1,
    derail_exponent (of q), horizon, m_min, m_max."""
    return [c.as_row() for c in theory_curves(alphas, ms, **kwargs)]


# --------------------------------------------------------------------------- corpus α

# The paper's α is the slope of a word-unigram rank-frequency law. A unit here is a lower-cased word:
# a maximal run of Unicode letters or digits with internal apostrophes kept ("don't" is one word),
# i.e. WORD_PATTERN matched on text.lower(); punctuation, underscores and whitespace separate words.
WORD_PATTERN = r"[^\W_]+(?:'[^\W_]+)*"
WORD_UNIT = f"lower-cased words, regex {WORD_PATTERN} (letters/digits, internal apostrophes; punctuation stripped)"
CORPUS_TOP = 5000            # ranks in the fit
CORPUS_MAX_WORDS = 2_000_000  # words counted at most (documents in corpus order)
CORPUS_MIN_COUNT = 5         # the word at rank CORPUS_TOP must occur at least this often to trust the tail
_WORD_RE = re.compile(WORD_PATTERN)


def words(text: str) -> list[str]:
    """The corpus-α units of ``text``: WORD_PATTERN matches of text.lower()."""
    return _WORD_RE.findall(text.lower())


def corpus_alpha(units: Sequence[str] | Mapping[str, int] | Sequence[int] | str, *,
                 top: int = CORPUS_TOP) -> float:
    """Power-law exponent α of a corpus: minus the OLS slope of log frequency on log rank over its
    ``top`` most frequent units. units: a list of units, a plain string (split into ``words``), a
    {unit: count} mapping, or a sequence of counts. Returns α (positive for any corpus whose
    frequencies fall with rank)."""
    counts = _counts(units)[: int(top)]
    if counts.size < 2:
        raise ValueError(f"corpus_alpha needs at least 2 distinct units, got {counts.size}")
    ranks = np.arange(1, counts.size + 1, dtype=np.float64)
    return -_ols(np.log(ranks), np.log(counts))[0]


def _counts(units) -> np.ndarray:
    """Counts of the distinct units, float64, sorted descending."""
    if isinstance(units, str):
        units = words(units)
    if isinstance(units, Mapping):
        counts = np.asarray(list(units.values()), dtype=np.float64)
    elif len(units) and all(isinstance(u, (int, float, np.integer, np.floating)) for u in units[:64]):
        counts = np.asarray(units, dtype=np.float64)
    else:
        counts = np.asarray(list(Counter(units).values()), dtype=np.float64)
    return np.sort(counts[counts > 0])[::-1]


def corpus_alpha_stats(texts: Iterable[str], *, top: int = CORPUS_TOP, max_words: int = CORPUS_MAX_WORDS,
                       min_count: int = CORPUS_MIN_COUNT) -> dict:
    """α over the ``top`` most frequent ``words`` of the first ``max_words`` words of ``texts``.

    Returns {alpha, top (ranks actually fitted), unit (WORD_UNIT), words (counted), documents (read),
    distinct, count_at_top (occurrences of the word at the last fitted rank), warning (str or None)}.
    Warns when the corpus has fewer than ``top`` distinct words (the fit uses what there is) or when
    the word at the last rank occurs fewer than ``min_count`` times (the tail is noise). ValueError
    when there are fewer than 2 distinct words."""
    counter: Counter = Counter()
    total = docs = 0
    for text in texts:
        w = words(text)[: max_words - total]
        counter.update(w)
        total += len(w)
        docs += 1
        if total >= max_words:
            break
    counts = _counts(dict(counter))
    alpha = corpus_alpha(counts.tolist(), top=top)
    used = int(min(top, counts.size))
    at_top = int(counts[used - 1])
    warnings = []
    if counts.size < top:
        warnings.append(f"only {counts.size} distinct words (< {top}): α is fitted over all of them; add text")
    if at_top < min_count:
        warnings.append(f"the word at rank {used} occurs only {at_top} times (< {min_count}): the tail of the "
                        "rank-frequency fit is noise; add text")
    return {"alpha": float(alpha), "top": used, "unit": WORD_UNIT, "words": int(total), "documents": int(docs),
            "distinct": int(counts.size), "count_at_top": at_top, "warning": "; ".join(warnings) or None}
