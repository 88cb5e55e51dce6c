"""Future-entropy scaling (Cao et al., Alg. 1) made practical (docs/SCIENCE.md §4, docs/DESIGN.md
"Reweighted decodings"): q̃(w) ∝ p̂(w)^{1+α}·exp(−α·f̂(x, y<s, w)), one α fitted by the human log loss
on the fit split (tasks.atoms.fit_alpha). f̂ predicts F = the TOTAL entropy of the rest of the generation
within the horizon T (a sum over the remaining steps, nats), learned from the model's own generations of
the fit split (every sample of every prompt).

The estimator, for a token w at step s with r = max(T − s − 1, 0) steps after it:
    f̂(w) = g(r) + ρ(r)·(z(w)·β + b),    ρ(r) = r / T
  g   the baseline: for each r, the mean of F over the training tokens with r steps left (g(0) = 0;
      an r without tokens: interpolated). Constant over the candidates at one position, so it cancels
      in q̃ (but for EOS, whose φ is 0) and in the log-loss gradient; it carries F's size.
  z   standardised features of the model's output after w: H(next | ·, w) and the largest log-prob of
      softmax(logits/τ) after w (SCALARS: cheap, and they tell the candidates apart), and the final
      hidden state [D].
  β,b ridge regression of F − g(r) on ρ·z (and ρ), b unpenalised; ρ makes the residual vanish at the
      horizon (f̂(r = 0) = 0) and grow with the steps it sums over.
The two penalties (scalars, hidden state; the hidden state may be left out) are chosen by grouped K-fold
cross-validation over prompts (groups = example ids: the samples of one prompt never straddle folds),
or no residual at all when none beats the baseline held out; the held-out R² (pooled over folds, the
baseline refitted per fold) is reported for the choice and for the baseline alone; then everything is
refitted on all tokens. Measured (SmolLM2-135M, python-docs, 8 fit prompts × 4 samples, T = 96): the
hidden state lowers the held-out R² at every penalty tried (576 features, 2968 tokens, 8 prompts), the
two scalars raise it.

Drift skill. With the exact F, d/dα of the human log loss at α = 0 telescopes to L̄ − H̄ = −EntCE
(tasks.atoms.HumanAtoms.gradient_at_zero): the fit moves toward calibration as far as f̂ carries the
drift. The fit reports that gradient beside −EntCE of the fit split. Gate: held-out R² ≤ 0 means f̂
fits nothing, and α = 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
import torch

from entcal import kernels
from entcal.tasks.atoms import decoding_key, fit_alpha, human_atoms, reweighted_generate
from entcal.tasks.config import DecodingSpec
from entcal.tasks.contracts import RecalibrationKnobs, Reweighting
from entcal.tasks.metrics import entce_summary
from entcal.tasks.models import LoadedModel
from entcal.tasks.score import plain_lm_head, teacher_forced

if TYPE_CHECKING:
    from entcal.tasks.recalibrate import BeforeTables

BASE = DecodingSpec()  # τ = 1, untruncated: the decoding q̃ reweights
FUTURE_BOUNDS = (-0.5, 4.0)  # (1 + α) stays > 0
SCALARS = ("entropy_next", "top_logprob_next")  # of softmax(logits/τ) after the token: H(next), max log p̂(next)
SCALAR_RIDGES = (1e-3, 1e-1, 10.0)  # penalty on |β_scalars|² per token (features standardised)
HIDDEN_RIDGES = (1.0, 10.0, 100.0, 1e3, 1e4, math.inf)  # on |β_hidden|²; inf: the hidden state left out
FOLDS = 5
ROWS = 512  # rows of logits reduced at once


def future_entropy_targets(step_entropy) -> np.ndarray:
    """F[s] = Σ_{t > s} H_t (float64 [n − 1], nats) for a generation's step entropies H [n]: the total
    entropy of the steps after token s (Cao et al.'s F_{t+1}, a sum, not a mean)."""
    h = np.asarray(step_entropy, dtype=np.float64)
    return np.cumsum(h[::-1])[::-1][1:].copy()


def next_stats(logits: torch.Tensor, temperature: float) -> np.ndarray:
    """The scalar features [Q, 2] float64 (SCALARS) of the next-token distribution softmax(logits/τ) after
    a token, from its logits [Q, V]: entropy and largest log-prob, nats."""
    out = []
    for i in range(0, logits.shape[0], ROWS):
        z = logits[i : i + ROWS].float()
        h = kernels.token_stats(z, None, temperature=temperature).entropy
        top = torch.log_softmax(z / temperature, -1).amax(-1)
        out.append(torch.stack([h, top], 1).double().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, len(SCALARS)))


# ---------------------------------------------------------------- the estimator
@dataclass(frozen=True)
class FutureEstimator:
    """f̂ (module doc) as plain numbers. baseline [T]: g(r) for r = 0 … T − 1; mean, scale, weight
    [S + D]: the raw features' standardisation and β (SCALARS first, then the hidden state; β = 0 for
    features left out); bias: b; temperature: τ of the next-token features."""

    horizon: int
    temperature: float
    baseline: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    weight: np.ndarray
    bias: float

    def __call__(self, logits: torch.Tensor, hidden: torch.Tensor, remaining: torch.Tensor) -> torch.Tensor:
        """φ (tasks.atoms' protocol): f̂ [Q] float32 nats from the logits [Q, V] and final hidden state [Q, D]
        after the token and the steps left after it [Q]."""
        x = np.concatenate([next_stats(logits, self.temperature), hidden.double().cpu().numpy()], 1)
        return torch.from_numpy(self.predict(x, remaining.cpu().numpy())).float().to(logits.device)

    def predict(self, x: np.ndarray, remaining: np.ndarray) -> np.ndarray:
        """f̂ [N] float64 from raw features x [N, S + D] (next_stats, then the hidden state) and remaining [N]."""
        r = np.clip(np.asarray(remaining, dtype=np.int64), 0, self.horizon - 1)
        return self.baseline[r] + (r / self.horizon) * (((x - self.mean) / self.scale) @ self.weight + self.bias)

    def params(self) -> dict:
        """JSON-able: numbers and lists of floats."""
        return {"horizon": self.horizon, "temperature": self.temperature, "features": [*SCALARS, "hidden"],
                "baseline": self.baseline.tolist(), "mean": self.mean.tolist(), "scale": self.scale.tolist(),
                "weight": self.weight.tolist(), "bias": self.bias}

    @classmethod
    def of(cls, params: dict) -> "FutureEstimator":
        arr = lambda k: np.asarray(params[k], dtype=np.float64)  # noqa: E731
        return cls(int(params["horizon"]), float(params["temperature"]), arr("baseline"), arr("mean"), arr("scale"),
                   arr("weight"), float(params["bias"]))


@dataclass(frozen=True)
class TrainingSet:
    """One row per generated token with a target (all but each generation's last): x [N, S + D] raw
    features (next_stats after the token, then its final hidden state), remaining [N], target F [N]
    (nats), group [N] (example id)."""

    x: np.ndarray
    remaining: np.ndarray
    target: np.ndarray
    group: np.ndarray


@torch.inference_mode()
def training_set(lm: LoadedModel, prompts: pl.DataFrame, generations: pl.DataFrame, *, horizon: int,
                 temperature: float = 1.0, batch_size: int = 8) -> TrainingSet:
    """The model's own generations (GENERATIONS_SCHEMA, every sample) of ``prompts`` as a TrainingSet: token
    s < n − 1 of a generation cut at ``horizon`` gets the features of the model's output after it
    (tasks.score.teacher_forced over prompt + generation: the final hidden state, and the logits through
    the plain LM head, or from a second, logits pass), remaining T − s − 1 and target
    F[s] = Σ_{t > s} step_entropy[t]."""
    ctx = dict(zip(prompts["example_id"].to_list(), prompts["prompt_ids"].to_list()))
    gens = [(ex, toks[:horizon], ent[:horizon]) for ex, toks, ent in generations.select(
        "example_id", "token_ids", "step_entropy").iter_rows() if len(toks[:horizon]) >= 2]
    if not gens:
        raise ValueError("future entropy: no generation of the fit split has 2 or more steps")
    xs, rs, ys, gs = [], [], [], []
    for b in range(0, len(gens), batch_size):
        part = gens[b : b + batch_size]
        args = ([ctx[ex] for ex, _, _ in part], [t for _, t, _ in part])
        tf = teacher_forced(lm.model, *args, pad_id=lm.pad_id, hidden=True)
        head = plain_lm_head(lm.model)
        logits = (teacher_forced(lm.model, *args, pad_id=lm.pad_id).rows if head is None else None)
        # row j of a generation predicts its token j: the state after token j − 1; drop each first row
        keep = torch.cat([torch.arange(1, n) + o for n, o in zip(tf.lengths, np.cumsum([0, *tf.lengths[:-1]]))])
        hidden = tf.rows[keep.to(tf.rows.device)]
        z = logits[keep.to(logits.device)] if head is None else torch.cat(
            [hidden[i : i + ROWS].float() @ head.float().T for i in range(0, len(hidden), ROWS)])
        xs.append(np.concatenate([next_stats(z, temperature), hidden.double().cpu().numpy()], 1))
        for ex, _, ent in part:
            rs.append(horizon - 1 - np.arange(len(ent) - 1))
            ys.append(future_entropy_targets(ent))
            gs.append(np.full(len(ent) - 1, ex, dtype=object))
    return TrainingSet(*(np.concatenate(a) for a in (xs, rs, ys, gs)))


def _baseline(remaining: np.ndarray, target: np.ndarray, horizon: int) -> np.ndarray:
    """g [T]: the mean target per remaining-steps value, g(0) = 0, gaps interpolated linearly in r."""
    r = np.clip(remaining, 0, horizon - 1)
    count = np.bincount(r, minlength=horizon).astype(np.float64)
    total = np.bincount(r, weights=target, minlength=horizon)
    count[0], total[0] = 1.0, 0.0
    seen = np.nonzero(count > 0)[0]
    return np.interp(np.arange(horizon), seen, total[seen] / count[seen])


class _Design:
    """The residual's least-squares problem on rows ``idx``: A = [ρ·z, ρ] (z standardised on those rows,
    ρ = r/T), e = F − g(r); its moments AᵀA/n and Aᵀe/n, so every penalty is one solve."""

    def __init__(self, ts: TrainingSet, idx: np.ndarray, horizon: int):
        x, r = ts.x[idx], np.clip(ts.remaining[idx], 0, horizon - 1)
        self.g = _baseline(r, ts.target[idx], horizon)
        self.mean, self.scale = x.mean(0), np.maximum(x.std(0), 1e-6)
        a = self.matrix(ts, idx, horizon)
        e = ts.target[idx] - self.g[r]
        self.gram, self.rhs = a.T @ a / len(idx), a.T @ e / len(idx)

    def matrix(self, ts: TrainingSet, idx: np.ndarray, horizon: int) -> np.ndarray:
        rho = np.clip(ts.remaining[idx], 0, horizon - 1)[:, None] / horizon
        return np.concatenate([(ts.x[idx] - self.mean) / self.scale * rho, rho], 1)

    def solve(self, scalar: float, hidden: float) -> np.ndarray:
        """θ = (β [S + D], b) minimising mean (e − A·θ)² + scalar·|β_S|² + hidden·|β_D|² (hidden = inf:
        β_D = 0; b unpenalised)."""
        s, m = len(SCALARS), self.gram.shape[0]
        use = np.arange(m) if math.isfinite(hidden) else np.r_[np.arange(s), m - 1]
        pen = np.r_[np.full(s, scalar), np.full(m - 1 - s, hidden), 0.0][use]
        theta = np.zeros(m)
        theta[use] = np.linalg.solve(self.gram[np.ix_(use, use)] + np.diag(pen) + 1e-12 * np.eye(len(use)),
                                     self.rhs[use])
        return theta


def _label(penalty) -> str:
    return "baseline" if penalty is None else "scalar={:g},hidden={:g}".format(*penalty)


def fit_estimator(ts: TrainingSet, *, horizon: int, temperature: float = 1.0, scalar_ridges=SCALAR_RIDGES,
                  hidden_ridges=HIDDEN_RIDGES, folds: int = FOLDS) -> tuple[FutureEstimator, dict]:
    """f̂ with its penalties (scalar, hidden) chosen by grouped K-fold CV over ts.group (K = min(folds,
    groups); the i-th group in sorted order goes to fold i mod K), from the grid and "baseline" (no
    residual), by pooled held-out R² = 1 − Σ(F − f̂_held-out)² / Σ(F − F̄)², baseline and standardisation
    refitted per fold; then refitted on all rows. Returns (f̂, cv): heldout_r2 (the choice),
    heldout_r2_baseline, ridge ({"scalar", "hidden" (None: left out)}, or None: baseline alone),
    r2_by_ridge, tokens, groups. With fewer than 2 groups nothing is held out: the baseline alone, both R²
    None."""
    groups = np.unique(ts.group)
    k, n = min(folds, len(groups)), len(ts.target)
    grid = [None, *((a, b) for a in scalar_ridges for b in hidden_ridges)]
    if k < 2:
        cv = {"heldout_r2": None, "heldout_r2_baseline": None, "ridge": None, "r2_by_ridge": {}}
        best = None
    else:
        fold = dict(zip(groups, np.arange(len(groups)) % k))
        of = np.array([fold[g] for g in ts.group])
        sse = np.zeros(len(grid))
        for j in range(k):
            tr, te = np.nonzero(of != j)[0], np.nonzero(of == j)[0]
            d = _Design(ts, tr, horizon)
            base = d.g[np.clip(ts.remaining[te], 0, horizon - 1)]
            a_te = d.matrix(ts, te, horizon)
            for c, penalty in enumerate(grid):
                pred = base if penalty is None else base + a_te @ d.solve(*penalty)
                sse[c] += float(((ts.target[te] - pred) ** 2).sum())
        sst = float(((ts.target - ts.target.mean()) ** 2).sum())
        r2 = 1 - sse / sst if sst > 0 else np.full(len(grid), -math.inf)
        best = grid[int(np.argmax(r2))]
        cv = {"heldout_r2": float(r2.max()), "heldout_r2_baseline": float(r2[0]),
              "ridge": None if best is None else {"scalar": best[0], "hidden": best[1] if math.isfinite(best[1])
                                                  else None},
              "r2_by_ridge": {_label(p): float(v) for p, v in zip(grid, r2)}}
    d = _Design(ts, np.arange(n), horizon)
    theta = np.zeros(d.gram.shape[0]) if best is None else d.solve(*best)
    est = FutureEstimator(horizon, temperature, d.g, d.mean, d.scale, theta[:-1], float(theta[-1]))
    return est, {**cv, "tokens": n, "groups": len(groups)}


# ---------------------------------------------------------------- fit, rebuild, evaluate
def drift_share(grad: float, grad_flat: float, entce: float) -> float | None:
    """The share of the drift f̂ carries: (gradient − gradient with f̂ flat) / (−EntCE − gradient with f̂
    flat). A flat f̂ (temperature) gives L̄ − H̄(human prefixes); the exact F adds H̄(human) − H̄(own
    generations), the drift. None when that is 0."""
    drift = -entce - grad_flat
    return (grad - grad_flat) / drift if drift else None


def _verdict(skill: bool, cv: dict, grad: float, grad_flat: float, entce: float, alpha: float) -> str:
    r2, r2b = cv["heldout_r2"], cv["heldout_r2_baseline"]
    held = ("no held-out R² (fewer than 2 prompts)" if r2 is None
            else f"held-out R² {r2:.3f} (baseline alone {r2b:.3f})")
    figures = (f"{held}; log-loss gradient at α = 0 {grad:+.3f} (f̂ flat: {grad_flat:+.3f}) against −EntCE "
               f"{-entce:+.3f} nats/token")
    if not skill:
        return f"f̂ has no skill on this model/data: {figures}; α = 0."
    if cv["ridge"] is None:
        return (f"f̂ is the baseline alone (no residual beats it held out), a function of the step only, so q̃ is "
                f"temperature 1/(1+α) but for EOS: {figures}; α = {alpha:.4g}.")
    share = drift_share(grad, grad_flat, entce)
    part = "" if share is None else f"f̂ carries {share:.0%} of the drift: "
    return f"{part}{figures}; α = {alpha:.4g}."


def fit_future_entropy(lm: LoadedModel, train: pl.DataFrame, before: "BeforeTables", knobs: RecalibrationKnobs, *,
                       bounds=FUTURE_BOUNDS, chunk: int | None = None) -> Reweighting:
    """Future-entropy scaling fitted on the fit split ``train``: f̂ (fit_estimator) on
    ``before.train_generations`` (the base decoding's rows of ``train``'s examples, every sample), then α by
    the human log loss of ``train`` under q̃ (fit_alpha; α = 0 when the held-out R² ≤ 0). Returns a
    Reweighting: params = FutureEstimator.params(), knob = α, fit = heldout_r2, heldout_r2_baseline, ridge
    (None: baseline alone), r2_by_ridge, tokens, prompts, gradient_at_zero (d/dα of the fit split's human
    L̄ at α = 0), gradient_at_zero_flat (the same for a flat f̂: L̄ − H̄ along the human text),
    entce_fit_split (H̄ of the split's generations − L̄ of its human text at α = 0; nats/token, first T
    steps), drift_share, fit_logloss, fit_logloss_alpha0, skill ("ok" | "none"), verdict (one sentence)."""
    gens = before.rows("train_generations", train)
    if gens is None:
        raise ValueError(f"future entropy: BeforeTables.train_generations has no rows of decoding {BASE.key} for the "
                         "fit split's examples; f̂ is fitted on the model's own generations of the fit split")
    horizon = knobs.summary.horizon
    ts = training_set(lm, train, gens, horizon=horizon, temperature=BASE.temperature,
                      batch_size=knobs.generation.batch_size)
    est, cv = fit_estimator(ts, horizon=horizon, temperature=BASE.temperature)
    atoms = human_atoms(lm, train, BASE, est, 1.0, top_k=knobs.candidates, max_tokens=horizon,
                        batch_size=knobs.generation.batch_size, chunk=chunk)
    grad = atoms.gradient_at_zero()
    base_loss, base_ent = atoms.loss_entropy(0.0)
    grad_flat = float((base_loss - base_ent).mean())
    entce = entce_summary(gens, atoms.table(0.0, key=BASE.key), knobs.summary).entce
    skill = cv["heldout_r2"] is not None and cv["heldout_r2"] > 0
    if skill:
        fa = fit_alpha(atoms, bounds=bounds)
        alpha, loss, loss0 = float(fa["alpha"]), fa["logloss"], fa["logloss_alpha0"]
    else:
        alpha, loss = 0.0, float(base_loss.mean())
        loss0 = loss
    fit = {"heldout_r2": cv["heldout_r2"], "heldout_r2_baseline": cv["heldout_r2_baseline"], "ridge": cv["ridge"],
           "r2_by_ridge": cv["r2_by_ridge"], "tokens": cv["tokens"], "prompts": cv["groups"],
           "gradient_at_zero": grad, "gradient_at_zero_flat": grad_flat, "entce_fit_split": entce,
           "drift_share": drift_share(grad, grad_flat, entce), "fit_logloss": loss, "fit_logloss_alpha0": loss0,
           "skill": "ok" if skill else "none", "verdict": _verdict(skill, cv, grad, grad_flat, entce, alpha)}
    return Reweighting(method="future_entropy", params=est.params(), knob=alpha, fit=fit)


def future_phi(rw: Reweighting) -> FutureEstimator:
    """f̂ rebuilt from ``rw.params``: a φ of tasks.atoms' protocol, phi(logits, hidden, remaining) -> [Q]."""
    if rw.method != "future_entropy":
        raise ValueError(f"future_phi: expected a future_entropy Reweighting, got {rw.method}")
    return FutureEstimator.of(rw.params)


def future_tables(lm: LoadedModel, prompts: pl.DataFrame, rw: Reweighting, knobs: RecalibrationKnobs, *,
                  chunk: int | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """q̃ at α = rw.knob on ``prompts``: (generations sampled from it, GENERATIONS_SCHEMA, by
    atoms.reweighted_generate with the study's draws, and the human text scored under it, REFERENCE_SCHEMA,
    first T steps), both with decoding atoms.decoding_key(BASE, "fut", α). At α = 0 these are the base decoding's generations,
    token for token, and the scorer's τ = 1 reference (callers that hold those may skip the call)."""
    phi, horizon = future_phi(rw), int(rw.params["horizon"])
    key = decoding_key(BASE, "fut", rw.knob)
    gens = reweighted_generate(lm, prompts, BASE, phi, 1.0, rw.knob, key=key, top_k=knobs.candidates,
                               knobs=knobs.generation, horizon=horizon, chunk=chunk)
    atoms = human_atoms(lm, prompts, BASE, phi, 1.0, top_k=knobs.candidates, max_tokens=horizon,
                        batch_size=knobs.generation.batch_size, chunk=chunk)
    return gens, atoms.table(rw.knob, key=key)
