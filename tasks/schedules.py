"""Two calibration families that target the shape of the entropy curve, not only its mean (docs/SCIENCE.md
§4; issue 19): a pooled EntCE of 0 can hide a model too cold early and too hot late, since h_t rises with t.
Both rescale the base decoding's logits z_t (τ = 1, untruncated; float32 [N, V]) by a temperature τ_t at
each step t (0-based) and apply the SAME rule to the human prefix when scoring human text:

  tau_schedule      τ_t = τ_b · c, b the step bucket of t (edges e_1 < … < e_{B−1}: bucket b holds the
                    steps e_b ≤ t < e_{b+1}, e_0 = 0; steps past the last edge stay in the last bucket).
                    params {"edges", "temperatures"}; knob c: the schedule's scale (1.0 as fitted).
  entropy_feedback  τ_t (per row) solves H(softmax(z_t/τ)) = target(t) + δ, τ ∈ [0.05, 20] (a target
                    outside the reachable range gives the nearer end); target(t) for t past its last
                    entry is that entry. params {"target": nats per step}; knob δ: offset in nats (0.0).

q_t = softmax(z_t / τ_t). Generations (tasks.generate with ``adjust``; the sampler's Gumbel noise is keyed
by (row seed, step, token), so τ ≡ 1 reproduces the base decoding draw for draw) record H(q_t) and
log q_t(drawn token); the human text is scored teacher-forced: step_logloss = step_logloss_untruncated =
−log q_t(y_t), step_entropy = H(q_t), nothing truncated. Nats per token; the first T steps (T the horizon).

Fits (on the fit split): the schedule's τ_b bucket by bucket in step order, each the root of the bucket's
gap mean h_t − mean l_t (pooled over the bucket's tokens) with the earlier buckets at their fitted τ; the
feedback target is the fit split's human per-step log loss at τ = 1, exponentially smoothed.
"""
from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import polars as pl
import torch

from entcal import kernels
from entcal.tasks.atoms import decoding_key
from entcal.tasks.contracts import REFERENCE_SCHEMA, GenerationKnobs, RecalibrationKnobs, Reweighting, ScoringKnobs
from entcal.tasks.fronts import tau_star
from entcal.tasks.generate import generate
from entcal.tasks.metrics import entce_summary, smooth, step_curves
from entcal.tasks.models import LoadedModel
from entcal.tasks.recalibrate import BASE, BeforeTables
from entcal.tasks.score import score, teacher_forced

BRACKET = (0.3, 3.0)  # the schedule's root search per bucket
TAU_RANGE = (0.05, 20.0)  # the feedback decoder's τ clamp
BISECT_ITERS = 30  # in log τ over TAU_RANGE: the bracket ends 5.6e-9 apart (relative)
SMOOTHING = 0.2  # the target's exponential smoothing (the plots' default)
ROW_BLOCK = 256  # human positions whose logits (and float64 copies) are materialised at once
TAGS = {"tau_schedule": "sched", "entropy_feedback": "feedback"}


# ---------------------------------------------------------------- the rules
def equal_edges(horizon: int, buckets: int) -> list[int]:
    """Interior edges splitting steps 0 … horizon − 1 into ``buckets`` near-equal buckets (rounded)."""
    if not 1 <= buckets <= horizon:
        raise ValueError(f"buckets: need 1 ≤ buckets ≤ horizon ({horizon}), got {buckets}")
    return [round(horizon * b / buckets) for b in range(1, buckets)]


def feedback_temperature(z: torch.Tensor, target: torch.Tensor, *, iters: int = BISECT_ITERS,
                         bounds: tuple[float, float] = TAU_RANGE) -> torch.Tensor:
    """τ [N] (float64) with H(softmax(z[n]/τ)) = target[n] (nats), by bisection in log τ over ``bounds``, all
    rows at once in float64 on z's device. H rises with τ, so a target above H at the upper bound gives the
    upper bound, one below H at the lower bound the lower bound. z: [N, V] logits (−inf allowed)."""
    z64, target = z.to(torch.float64), target.to(torch.float64)
    a = torch.full(z.shape[:1], math.log(bounds[0]), dtype=torch.float64, device=z.device)
    b = torch.full_like(a, math.log(bounds[1]))
    for _ in range(iters):
        m = (a + b) / 2
        above = _entropy64(z64 / m.exp()[:, None]) > target
        a, b = torch.where(above, a, m), torch.where(above, m, b)
    return ((a + b) / 2).exp()


def _entropy64(x: torch.Tensor) -> torch.Tensor:
    """H(softmax(x)) [N] of float64 logits [N, V] (−inf entries carry no mass)."""
    logp = torch.log_softmax(x, dim=-1)
    return -torch.where(logp > -math.inf, logp.exp() * logp, 0.0).sum(-1)


def _apply(z: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """z̃ = z / τ row by row, in z's dtype (τ [N] cast first): the one division generation and scoring share."""
    return z / tau.to(z.dtype)[:, None]


class Rule:
    """A Reweighting as a function: ``temperatures(steps [N] int64, z [N, V]) -> τ [N]`` (float64), z̃ = z/τ."""

    def __init__(self, rw: Reweighting):
        self.rw = rw
        if rw.method == "tau_schedule":
            edges, temps = list(rw.params["edges"]), [float(t) for t in rw.params["temperatures"]]
            if len(temps) != len(edges) + 1 or any(not t > 0 for t in temps) or not rw.knob > 0:
                raise ValueError(f"tau_schedule: need len(edges) + 1 temperatures > 0 and a scale > 0, got "
                                 f"edges {edges}, temperatures {temps}, scale {rw.knob}")
            if any(b <= a for a, b in zip([0, *edges], edges)):
                raise ValueError(f"tau_schedule: edges must rise from ≥ 1, got {edges}")
            self.edges, self.temps = torch.tensor(edges, dtype=torch.long), torch.tensor(temps, dtype=torch.float64)
        elif rw.method == "entropy_feedback":
            target = [float(v) for v in rw.params["target"]]
            if not target or not all(math.isfinite(v) for v in target) or not math.isfinite(rw.knob):
                raise ValueError("entropy_feedback: need a non-empty finite target curve and a finite offset")
            self.target = torch.tensor(target, dtype=torch.float64)
        else:
            raise ValueError(f"schedules: no rule for method {rw.method!r} (tau_schedule | entropy_feedback)")

    def temperatures(self, steps: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        steps = steps.cpu()
        if self.rw.method == "tau_schedule":
            tau = self.temps[torch.bucketize(steps, self.edges, right=True)] * self.rw.knob
            return tau.to(z.device)
        goal = self.target[steps.clamp_max(len(self.target) - 1)] + self.rw.knob
        return feedback_temperature(z, goal.to(z.device))

    def adjust(self, t: int, z: torch.Tensor, cache, mask, positions) -> torch.Tensor:
        """tasks.generate's hook: z̃ = z / τ_t at decode step t."""
        return _apply(z, self.temperatures(torch.full(z.shape[:1], t, dtype=torch.long), z))


# ---------------------------------------------------------------- the human text, teacher-forced once
@dataclasses.dataclass
class Human:
    """The first ``horizon`` reference tokens of each prompt, after one teacher-forced forward.

    rows [N, ·]: final hidden states [N, D] (``weight`` [V, D] float32 the plain LM head) or float32 logits
    [N, V] (weight None); targets [N] the human tokens; steps [N] int64 their step t (0-based);
    example_id and lengths per example (N = Σ lengths, examples in the prompts' order)."""

    rows: torch.Tensor
    weight: torch.Tensor | None
    targets: torch.Tensor
    steps: torch.Tensor
    example_id: list[str]
    lengths: list[int]

    @torch.inference_mode()
    def logits(self, sel: torch.Tensor) -> torch.Tensor:
        """Float32 logits [len(sel), V] of the positions ``sel`` (hidden.float() @ W.float().T: the sampler's)."""
        rows = self.rows[sel.to(self.rows.device)]
        return rows.float() @ self.weight.T if self.weight is not None else rows.float()

    @torch.inference_mode()
    def stats(self, rule: Rule, sel: torch.Tensor | None = None, logits: torch.Tensor | None = None):
        """(entropy, target log-prob, τ) [len(sel)] under ``rule`` at the positions ``sel`` (default: all), in
        blocks of ROW_BLOCK; ``logits``: those positions' logits when already materialised."""
        sel = torch.arange(len(self.targets)) if sel is None else sel
        parts = []
        for i in range(0, len(sel), ROW_BLOCK):
            z = self.logits(sel[i : i + ROW_BLOCK]) if logits is None else logits[i : i + ROW_BLOCK]
            tau = rule.temperatures(self.steps[sel[i : i + ROW_BLOCK]], z)
            s = kernels.token_stats(_apply(z, tau), self.targets[sel[i : i + ROW_BLOCK]].to(z.device))
            parts.append((s.entropy.cpu(), s.target_logprob.cpu(), tau.cpu()))
        if not parts:
            return torch.empty(0), torch.empty(0), torch.empty(0, dtype=torch.float64)
        return tuple(torch.cat(c) for c in zip(*parts))

    def table(self, rule: Rule, key: str) -> pl.DataFrame:
        """REFERENCE_SCHEMA under ``rule``: −log q_t(y_t) (both log-loss columns), H(q_t), never truncated."""
        ent, lp, _ = self.stats(rule)
        ents, losses = ent.split(self.lengths), (-lp).split(self.lengths)
        return pl.DataFrame([{"example_id": ex, "decoding": key, "step_logloss": l.tolist(),
                              "step_logloss_untruncated": l.tolist(), "step_entropy": e.tolist(),
                              "step_truncated": [False] * len(e)}
                             for ex, e, l in zip(self.example_id, ents, losses)], schema=REFERENCE_SCHEMA)


def human_text(lm: LoadedModel, prompts: pl.DataFrame, horizon: int, batch_size: int) -> Human:
    """One teacher-forced forward (tasks.score.teacher_forced) of each prompt + its first ``horizon``
    reference tokens, ``batch_size`` examples at a time; the states kept (not the [N, V] logits)."""
    ctx, ref = prompts["prompt_ids"].to_list(), [r[:horizon] for r in prompts["reference_ids"].to_list()]
    rows, targets, weight = [], [], None
    for b in range(0, len(ctx), batch_size):
        tf = teacher_forced(lm.model, ctx[b : b + batch_size], ref[b : b + batch_size], pad_id=lm.pad_id)
        rows.append(tf.rows)
        targets.append(tf.targets.cpu())
        weight = None if tf.weight is None else tf.weight.detach().float()
    lengths = [len(r) for r in ref]
    steps = torch.cat([torch.arange(n) for n in lengths]) if lengths else torch.empty(0, dtype=torch.long)
    return Human(torch.cat(rows), weight, torch.cat(targets), steps, prompts["example_id"].to_list(), lengths)


# ---------------------------------------------------------------- tables under a rule
def _generate(lm, prompts, rule: Rule, knobs: GenerationKnobs, steps: int, key: str) -> pl.DataFrame:
    return generate(lm, prompts, BASE, dataclasses.replace(knobs, max_new_tokens=steps), adjust=rule.adjust,
                    key=key)


def schedule_tables(lm: LoadedModel, prompts: pl.DataFrame, rw: Reweighting,
                    knobs: RecalibrationKnobs) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(generations, reference) of ``prompts`` under ``rw`` at ``rw.knob`` over the first T =
    knobs.summary.horizon steps: GENERATIONS_SCHEMA sampled by tasks.generate (knobs.generation's seed,
    samples and batch; T new tokens at most), and REFERENCE_SCHEMA of the human text under the same rule.
    Decoding column: ``t1-sched<scale>`` / ``t1-feedback<offset>``."""
    rule, horizon = Rule(rw), knobs.summary.horizon
    key = decoding_key(BASE, TAGS[rw.method], rw.knob)
    gens = _generate(lm, prompts, rule, knobs.generation, horizon, key)
    return gens, human_text(lm, prompts, horizon, knobs.generation.batch_size).table(rule, key)


# ---------------------------------------------------------------- fits
def _base_generations(lm, prompts, before: BeforeTables, knobs: RecalibrationKnobs) -> pl.DataFrame:
    """The fit split's generations at the base decoding: ``before.train_generations``' rows of them, or
    sampled here (T steps) when the pipeline has none."""
    rows = before.rows("train_generations", prompts)
    if rows is not None:
        return rows
    knobs_t = dataclasses.replace(knobs.generation, max_new_tokens=knobs.summary.horizon)
    return generate(lm, prompts, BASE, knobs_t)


def _pooled(table: pl.DataFrame, col: str, start: int, end: int) -> tuple[float, int]:
    """(mean, count) of ``col``'s values at steps start ≤ t < end over every row (nan, 0 when none)."""
    v = table.select(pl.col(col).list.slice(start, end - start)).explode(col).drop_nulls()[col]
    return (float(v.cast(pl.Float64).mean()), len(v)) if len(v) else (math.nan, 0)


def _report(gens, ref, knobs: RecalibrationKnobs, bounds: list[int], tag: str) -> dict:
    """The fit split's EntCE, H̄, L̄, per-bucket gap and (1/T)·Σ_t |h_t − l_t| of one pair of tables."""
    s = entce_summary(gens, ref, knobs.summary)
    curves = step_curves(gens, ref, horizon=knobs.summary.horizon)
    step_gap = (curves["entropy_mean"] - curves["logloss_mean"]).abs().drop_nulls()
    gaps = [_pooled(gens, "step_entropy", a, b)[0] - _pooled(ref, "step_logloss", a, b)[0]
            for a, b in zip(bounds, bounds[1:])]
    return {f"entce_{tag}": s.entce, f"entropy_{tag}": s.entropy, f"logloss_{tag}": s.logloss,
            f"step_abs_gap_{tag}": float(step_gap.mean()), f"bucket_gap_{tag}": gaps}


def fit_tau_schedule(lm: LoadedModel, train: pl.DataFrame, before: BeforeTables, knobs: RecalibrationKnobs, *,
                     buckets: int = 4, bracket: tuple[float, float] = BRACKET, tol: float = 0.01,
                     max_rounds: int = 8) -> Reweighting:
    """τ(s) over ``buckets`` equal step buckets of T = knobs.summary.horizon, fitted on ``train`` (the fit
    split) bucket by bucket in step order: τ_b is the root in ``bracket`` of gap_b(τ) = mean h_t − mean l_t
    over the bucket's steps (tasks.fronts.tau_star, regula falsi, over β = 1/τ ∈ [1/hi, 1/lo] to ``tol`` in β,
    at most ``max_rounds`` evaluations; τ_b = 1/β at the root), h_t from
    generations of ``train`` under the schedule (earlier buckets at their fitted τ, bucket b at τ; sampled up
    to the bucket's end only), l_t = −log softmax(z_t/τ)[y_t] of the human text (one teacher-forced forward;
    the bucket's logits kept across its rounds). No sign change on the bracket: τ_b is the end whose |gap| is
    smaller (``sign_change`` False). Returns Reweighting("tau_schedule", {"edges", "temperatures"}, 1.0, fit):
    fit = {"buckets": per bucket steps, temperature, rounds [{temperature, gap}], converged, sign_change,
    gap_before (τ ≡ 1), gap_after (fitted); entce / entropy / logloss / step_abs_gap _fit_before and _fit_after on the
    fit split; bracket, tol, generated_steps (decode steps sampled, per row), seconds}."""
    start = time.perf_counter()
    horizon, lo, hi = knobs.summary.horizon, *bracket
    edges = equal_edges(horizon, buckets)
    bounds = [0, *edges, horizon]
    human = human_text(lm, train, horizon, knobs.generation.batch_size)
    temps = [1.0] * (len(edges) + 1)

    def schedule(ts) -> Reweighting:
        return Reweighting("tau_schedule", {"edges": list(edges), "temperatures": [float(t) for t in ts]}, 1.0)

    unit = Rule(schedule(temps))
    gens0 = _base_generations(lm, train, before, knobs)
    fit = _report(gens0, human.table(unit, BASE.key), knobs, bounds, "fit_before")
    generated, rows = 0, []
    for b, (s, e) in enumerate(zip(bounds, bounds[1:])):
        sel = ((human.steps >= s) & (human.steps < e)).nonzero().flatten()
        z = human.logits(sel)  # this bucket's human logits, kept across its rounds
        seen: dict[float, tuple[float, float]] = {}  # 1/τ -> (τ, gap)

        def gap(beta: float, tau: float | None = None, b=b, s=s, e=e, sel=sel, z=z, seen=seen) -> float:
            nonlocal generated
            if beta not in seen:
                tau = 1.0 / beta if tau is None else tau
                rule = Rule(schedule(temps[:b] + [tau] + temps[b + 1 :]))
                gens = _generate(lm, train, rule, knobs.generation, e, "fit")
                generated += e
                h, n = _pooled(gens, "step_entropy", s, e)
                lp = human.stats(rule, sel, z)[1]
                seen[beta] = (tau, h + float(lp.double().mean()) if n and len(lp) else math.nan)
            return seen[beta][1]

        g_lo, g_hi = gap(1 / lo, lo), gap(1 / hi, hi)
        row = {"steps": [s, e]}
        if not (math.isfinite(g_lo) and math.isfinite(g_hi)):  # no generated or human token in the bucket
            tau = temps[b - 1] if b else 1.0
            row.update(converged=False, sign_change=False, empty=True)
        elif g_lo * g_hi > 0:
            tau = lo if abs(g_lo) <= abs(g_hi) else hi
            row.update(converged=False, sign_change=False)
        else:  # in β = 1/τ: l_t grows like β as τ → 0, so the gap is nearer linear there than in τ
            r = tau_star(lambda beta: (gap(beta),) * 3, 1 / hi, 1 / lo, tol=tol, max_rounds=max_rounds)
            tau = 1.0 / r["tau_star"]
            row.update(converged=r["converged"], sign_change=True)
        temps[b] = float(tau)
        rows.append({**row, "temperature": float(tau),
                     "rounds": [{"temperature": t, "gap": g} for t, g in seen.values()]})
    rw = schedule(temps)
    rule = Rule(rw)
    gens1 = _generate(lm, train, rule, knobs.generation, horizon, "fit")
    generated += horizon
    fit |= _report(gens1, human.table(rule, "fit"), knobs, bounds, "fit_after")
    for row, g0, g1 in zip(rows, fit.pop("bucket_gap_fit_before"), fit.pop("bucket_gap_fit_after")):
        row.update(gap_before=g0, gap_after=g1)
    fit.update(buckets=rows, bracket=[lo, hi], tol=tol, generated_steps=generated, seconds=time.perf_counter() - start)
    return dataclasses.replace(rw, fit=_jsonable(fit))


def fit_entropy_feedback(lm: LoadedModel, train: pl.DataFrame, before: BeforeTables, knobs: RecalibrationKnobs, *,
                         smoothing: float = SMOOTHING) -> Reweighting:
    """target(t), t < T: the fit split's human log loss at τ = 1 per step (the mean over examples that reach
    step t; ``before.train_reference``'s rows of the base decoding, scored here when it has none),
    exponentially smoothed (tasks.metrics.smooth at ``smoothing``). Returns
    Reweighting("entropy_feedback", {"target": [T nats]}, 0.0, fit): fit = {logloss_curve (unsmoothed),
    smoothing; entce / entropy / logloss / step_abs_gap _fit_before (τ = 1) and _fit_after (the rule) on the fit split;
    tau_mean_human, tau_clamped_share_human (τ at a clamp end), target_miss_generation (mean |h_t − target(t)|
    of the fit split's generations), generated_steps, seconds}."""
    start = time.perf_counter()
    horizon = knobs.summary.horizon
    ref0 = before.rows("train_reference", train)
    if ref0 is None:
        ref0 = score(lm, train, [BASE], ScoringKnobs(max_tokens=horizon, epsilon=1e-4,
                                                     batch_size=knobs.generation.batch_size))
    steps = (ref0.select(pl.col("step_logloss").list.head(horizon).alias("v"))
             .with_columns(pl.int_ranges(pl.col("v").list.len()).alias("t")).explode("v", "t").drop_nulls()
             .group_by("t").agg(pl.col("v").cast(pl.Float64).mean()).sort("t"))
    curve = dict(zip(steps["t"].to_list(), steps["v"].to_list()))
    raw = [curve.get(t, math.nan) for t in range(horizon)]
    if math.isnan(raw[0]):
        raise ValueError("fit_entropy_feedback: the fit split has no human token at step 0")
    rw = Reweighting("entropy_feedback", {"target": [float(v) for v in smooth(raw, smoothing)]}, 0.0)
    human = human_text(lm, train, horizon, knobs.generation.batch_size)
    rule = Rule(rw)
    gens1 = _generate(lm, train, rule, knobs.generation, horizon, "fit")
    ent, _, tau = human.stats(rule)
    bounds = [0, horizon]
    fit = _report(_base_generations(lm, train, before, knobs), ref0, knobs, bounds, "fit_before")
    fit |= _report(gens1, human.table(rule, "fit"), knobs, bounds, "fit_after")
    target = np.asarray(rw.params["target"])
    miss = [abs(h - target[min(t, horizon - 1)]) for hs in gens1["step_entropy"].to_list() for t, h in enumerate(hs)]
    clamped = (tau <= TAU_RANGE[0] * (1 + 1e-6)) | (tau >= TAU_RANGE[1] * (1 - 1e-6))
    fit = {k: v for k, v in fit.items() if not k.startswith("bucket_gap")}
    fit.update(logloss_curve=raw, smoothing=smoothing, tau_mean_human=float(tau.mean()),
               tau_clamped_share_human=float(clamped.double().mean()), target_miss_generation=float(np.mean(miss)),
               generated_steps=horizon, seconds=time.perf_counter() - start)
    return dataclasses.replace(rw, fit=_jsonable(fit))


def _jsonable(obj):
    """Plain Python numbers, lists and dicts (numpy / torch scalars converted; NaN kept as float)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj)
    return obj
