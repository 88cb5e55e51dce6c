"""Calibration methods (SCIENCE.md §4): temperature root τ*, truncation trade-offs, lookahead
(Braverman et al.) and future-entropy scaling (Cao et al., Alg. 1 made practical). Plain functions.

Reweighted decodings. Both model-based methods reweight the base distribution p̂ = softmax(logits/τ)
(untruncated decodings only) over "atoms": the top-k candidates K of p̂ and one tail block B (every
other token, mass P_B). With a feature u per atom, q̃(a) ∝ P(a)·exp(α·u_a), and inside the block q̃ ∝ p̂:
  lookahead        u_w = −H(next | context, w)                        (q̃ ∝ p̂·exp(−α·H))
  future entropy   u_w = log p̂(w) − f̂(context, w)                     (q̃ ∝ exp{(1+α)·log p̂ − α·f̂})
  tail block       u_B = γ·log P_B − φ̄, φ̄ = the p̂-weighted mean of the candidates' H or f̂ (γ = 0, 1).
For lookahead the block rule is exactly "every tail token gets φ̄"; for future entropy the (1+α)
exponent acts on the block's mass, not per token. Per position the log loss of q̃ is then
−log q̃(atom of y) − log(p̂(y)/P_B if y ∈ B): a log-sum-exp of functions affine in α, so convex.
H(next | context, w) is the entropy of softmax(logits/τ) after appending w; the features after
appending each candidate come from ONE batched forward of the k candidates per position, a single
new token each, attending to the prefix's KV cache (copied per candidate row; in teacher-forced
scoring a padding mask hides the cache beyond the candidate's context length).
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import polars as pl
import torch

import kernels
from tasks.calibrate import entce_summary
from tasks.config import DecodingSpec
from tasks.generate import generate_table
from tasks.score import REFERENCE_SCHEMA, plain_lm_head

LOOKAHEAD_BOUNDS = (-1.0, 4.0)
FUTURE_BOUNDS = (-0.5, 4.0)  # (1 + α) stays > 0
ROW_BLOCK = 512


# ---------------------------------------------------------------- temperature: τ* with EntCE(τ*) = 0
def tau_star(entce_at: Callable[[float], tuple[float, float, float]], lo: float = 0.5, hi: float = 1.5, *,
             tol: float = 0.01, max_rounds: int = 8) -> dict:
    """Root of EntCE(τ) in [lo, hi] by modified regula falsi: the Illinois family with Anderson–Björck
    scaling (the end retained twice in a row has its value scaled by 1 − f(x)/f(replaced), or halved as
    in Illinois when that is ≤ 0). Each new point is kept ≥ tol/2 inside the bracket, so the bracket
    closes to ≤ tol instead of creeping from one side; bisection when the estimate leaves the bracket
    or three steps failed to halve it. A bracket without a sign change is widened once, by half its
    width, toward the end with the smaller |EntCE| (lo is kept > 0); still none: ValueError.
    τ* is the linear root between the final bracket ends (error ≤ tol once converged; ``converged`` is
    False when max_rounds, widening included, ran out first). CI: sort the evaluated τ; the roots of the
    ci_low(τ) and ci_high(τ) curves by linear interpolation between adjacent evaluated points (the
    crossing nearest τ* when several); tau_star_ci = [the root ≤ τ*, the root > τ*] (for EntCE rising
    in τ: [root of ci_high, root of ci_low]); None on a side with no crossing among the evaluated τ."""
    if not 0 < lo < hi:
        raise ValueError(f"tau_star: need 0 < lo < hi, got lo={lo}, hi={hi}")
    rounds: list[dict] = []

    def ev(t: float) -> float:
        vals = tuple(float(v) for v in entce_at(float(t)))
        if not all(math.isfinite(v) for v in vals):
            raise ValueError(f"tau_star: entce_at({t:g}) returned non-finite values {vals}")
        rounds.append({"temperature": float(t), "entce": vals[0], "ci_low": vals[1], "ci_high": vals[2]})
        return vals[0]

    a, b = lo, hi
    fa, fb = ev(a), ev(b)
    if fa * fb > 0:
        w = hi - lo
        if abs(fa) <= abs(fb):
            x = max(lo - w / 2, lo / 2)
            fx = ev(x)
            if fx * fa <= 0:
                a, fa, b, fb = x, fx, lo, fa
        else:
            x = hi + w / 2
            fx = ev(x)
            if fx * fb <= 0:
                a, fa, b, fb = hi, fb, x, fx
        if fa * fb > 0:
            seen = ", ".join(f"EntCE({r['temperature']:g})={r['entce']:+.4f}" for r in rounds)
            raise ValueError(f"tau_star: EntCE does not change sign on [{min(lo, x):g}, {max(hi, x):g}] "
                             f"({seen}); give a bracket lo/hi with EntCE of opposite signs")
    ga, gb, side, widths = fa, fb, 0, [b - a]
    while b - a > tol and fa != 0 and fb != 0 and len(rounds) < max_rounds:
        x = b - gb * (b - a) / (gb - ga)
        if not a < x < b or (len(widths) >= 4 and widths[-1] > 0.5 * widths[-4]):
            x = (a + b) / 2
        x = min(max(x, a + tol / 2), b - tol / 2)  # a step of ≥ tol/2: the bracket closes, not creeps
        fx = ev(x)
        if fx == 0:
            a = b = x
            fa = fb = 0.0
            break
        if (fx > 0) == (fa > 0):  # replaces a; b retained twice in a row: scale its value down
            m = 1 - fx / fa
            gb, a, fa, ga, side = (gb * (m if m > 0 else 0.5) if side == -1 else gb), x, fx, fx, -1
        else:
            m = 1 - fx / fb
            ga, b, fb, gb, side = (ga * (m if m > 0 else 0.5) if side == 1 else ga), x, fx, fx, 1
        widths.append(b - a)
    root = a if fa == 0 else b if fb == 0 else a - fa * (b - a) / (fb - fa)
    pts = sorted({r["temperature"]: r for r in rounds}.values(), key=lambda r: r["temperature"])

    def crossing(col: str) -> float | None:
        roots = []
        for p, q in zip(pts, pts[1:]):
            e0, e1 = p[col], q[col]
            if e0 == 0 or e0 * e1 < 0:
                w = 0.0 if e0 == 0 else e0 / (e0 - e1)
                roots.append(p["temperature"] + w * (q["temperature"] - p["temperature"]))
        if pts and pts[-1][col] == 0:
            roots.append(pts[-1]["temperature"])
        return min(roots, key=lambda r: abs(r - root)) if roots else None

    ends = [r for r in (crossing("ci_low"), crossing("ci_high")) if r is not None]
    ci = [min([r for r in ends if r <= root], default=None), max([r for r in ends if r > root], default=None)]
    return {"tau_star": float(root), "tau_star_ci": ci, "rounds": rounds,
            "converged": bool(b - a <= tol or fa == 0 or fb == 0), "bracket": [float(a), float(b)]}


# ---------------------------------------------------------------- truncation trade-offs
def _finite(*vals) -> bool:
    return all(v is not None and math.isfinite(float(v)) for v in vals)


def truncation_front(rows: list[dict]) -> dict:
    """Per method (rows sorted by param): the param zeroing EntCE by linear interpolation between the two
    sweep points that straddle 0 (the crossing with the lowest interpolated log loss if several; None if
    none), with logloss / logloss_untruncated / truncated_share interpolated at the same weight. Front:
    rows not dominated in (|EntCE|, logloss), both minimised, sorted by |EntCE|."""
    methods: dict[str, dict] = {}
    for m in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r for r in rows if r["method"] == m and _finite(r["entce"], r["param"])),
                     key=lambda r: r["param"])
        cands = []
        for i, p in enumerate(pts):
            q = pts[i + 1] if i + 1 < len(pts) else None
            if p["entce"] == 0:
                w, q = 0.0, p
            elif q is not None and p["entce"] * q["entce"] < 0:
                w = p["entce"] / (p["entce"] - q["entce"])
            else:
                continue
            lerp = {k: (p[k] + w * (q[k] - p[k]) if _finite(p.get(k), q.get(k)) else None)
                    for k in ("param", "logloss", "logloss_untruncated", "truncated_share")}
            cands.append(lerp)
        best = min(cands, key=lambda c: c["logloss"] if c["logloss"] is not None else math.inf, default=None)
        methods[m] = {"zero_param": best and best["param"], "zero_logloss": best and best["logloss"],
                      "zero_logloss_untruncated": best and best["logloss_untruncated"],
                      "zero_truncated_share": best and best["truncated_share"],
                      "crossings": len(cands), "points": len(pts)}
    valid = [r for r in rows if _finite(r["entce"], r["logloss"])]
    front = [r for r in valid if not any(
        abs(o["entce"]) <= abs(r["entce"]) and o["logloss"] <= r["logloss"]
        and (abs(o["entce"]) < abs(r["entce"]) or o["logloss"] < r["logloss"]) for o in valid)]
    return {"methods": methods, "front": sorted(front, key=lambda r: (abs(r["entce"]), r["logloss"]))}


def plot_pareto(rows: list[dict], path) -> str:
    """EntCE against L̄, one marker/colour per method, the (|EntCE|, L̄) front circled and joined."""
    from matplotlib.figure import Figure  # Agg via Figure.savefig: no pyplot global state

    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.subplots()
    markers = "osD^vP*Xh<>"
    for i, m in enumerate(dict.fromkeys(r["method"] for r in rows)):
        pts = sorted((r for r in rows if r["method"] == m and _finite(r["entce"], r["logloss"])),
                     key=lambda r: r["param"])
        ax.plot([r["logloss"] for r in pts], [r["entce"] for r in pts], marker=markers[i % len(markers)],
                color=f"C{i}", lw=0.8, ms=5, label=m)
    front = truncation_front(rows)["front"]
    ax.scatter([r["logloss"] for r in front], [r["entce"] for r in front], s=140, facecolors="none",
               edgecolors="k", lw=1.2, label="Pareto front (|EntCE|, L̄)", zorder=3)
    ax.axhline(0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("L̄: log loss on human text (nats/token)")
    ax.set_ylabel("EntCE = H̄ − L̄ (nats/token)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return str(path)


# ---------------------------------------------------------------- batched candidate features
def _untruncated(decoding: DecodingSpec) -> None:
    if decoding.truncated:
        raise ValueError(f"decoding {decoding.key}: lookahead / future-entropy calibration reweights the "
                         "untruncated p̂ = softmax(logits/τ); use a temperature-only decoding")


def _candidate_pass(model, cache, key_mask, rows, positions, tokens, phi, *, ctx_len=None,
                    chunk: int | None = None, budget: int = 1 << 30) -> torch.Tensor:
    """phi(logits[Q, V], last hidden[Q, D]) after appending ``tokens[q]`` to batch row ``rows[q]`` of
    ``cache``: one forward per ``chunk`` queries (default: as many as fit copies of their cache rows
    in ``budget`` bytes), one new token each, on a per-query copy of the rows' KV cache.
    ``ctx_len[q]`` (optional) hides cache positions >= it (teacher-forced prefixes)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    layers = cache.layers
    if any(not isinstance(l, DynamicLayer) or getattr(l, "is_sliding", False) for l in layers):
        raise NotImplementedError("candidate pass supports plain dynamic KV caches only (no sliding window)")
    if chunk is None:
        per = sum(2 * l.keys[0].numel() * l.keys.element_size() for l in layers)
        chunk = max(1, budget // max(per, 1))
    out = []
    for s in range(0, rows.numel(), chunk):
        r = rows[s : s + chunk]
        width = key_mask.shape[1] if ctx_len is None else int(ctx_len[s : s + chunk].max())
        sub = DynamicCache(ddp_cache_data=[(l.keys[r, :, :width], l.values[r, :, :width]) for l in layers])
        km = key_mask[r, :width]
        if ctx_len is not None:
            km = km * (torch.arange(width, device=km.device)[None] < ctx_len[s : s + chunk, None])
        am = torch.cat([km, torch.ones_like(km[:, :1])], dim=-1)
        o = model(input_ids=tokens[s : s + chunk, None], attention_mask=am, position_ids=positions[s : s + chunk, None],
                  past_key_values=sub, use_cache=True, output_hidden_states=True)
        out.append(phi(o.logits[:, -1].float(), o.hidden_states[-1][:, -1].float()))
    return torch.cat(out)


def _right_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(seqs), max(map(len, seqs))), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j, s in enumerate(seqs):
        ids[j, : len(s)], mask[j, : len(s)] = torch.tensor(s, dtype=torch.long), 1
    return ids.to(device), mask.to(device)


def _entropy_phi(temperature: float):
    return lambda logits, hidden: kernels.token_stats(logits, None, temperature=temperature).entropy


def _atoms(logp, cand, clp, phi_c, gamma: float):
    """(logP[N, k+1], u[N, k+1], tail entropy[N]) of the k candidates + tail block (see module doc)."""
    tail = logp.scatter(1, cand, -math.inf)
    lse_b = torch.logsumexp(tail, dim=1)
    has_b = torch.isfinite(lse_b)
    r = torch.where(has_b[:, None], tail - lse_b[:, None], torch.full_like(tail, -math.inf))
    tail_h = -(r.exp() * torch.where(torch.isfinite(r), r, torch.zeros_like(r))).sum(1)
    p = clp.exp()
    phi_b = (p * phi_c).sum(1) / p.sum(1)
    logP = torch.cat([clp, lse_b[:, None]], 1)
    ok = torch.isfinite(logP)
    u = gamma * torch.where(ok, logP, torch.zeros_like(logP)) - torch.cat([phi_c, phi_b[:, None]], 1)
    return logP, torch.where(ok, u, torch.zeros_like(u)), tail_h


def lookahead_entropies(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                        top_k: int = 16, temperature: float = 1.0) -> dict:
    """For the next position of each (left-padded) row: its top-k candidates w under softmax(logits/τ),
    their log-probs, and H(next | row, w), the entropy of softmax(logits/τ) after appending w. One
    prefix forward, then ONE batched forward of all N·k candidates over copies of the prefix KV cache."""
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.inference_mode():
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        logp = torch.log_softmax(out.logits[:, -1].float() / temperature, -1)
        k = min(top_k, logp.shape[-1])
        clp, cand = logp.topk(k, dim=-1)
        rows = torch.arange(len(input_ids), device=input_ids.device).repeat_interleave(k)
        h = _candidate_pass(model, out.past_key_values, mask, rows, (pos[:, -1] + 1)[rows], cand.reshape(-1),
                            _entropy_phi(temperature))
    return {"candidates": cand, "logprobs": clp, "entropy": h.view(-1, k)}


# ---------------------------------------------------------------- human text under q̃
@dataclass
class HumanAtoms:
    """Per human token (all examples, in order): what the log loss / entropy of q̃ need, for any α."""

    example_id: list[str]
    lengths: list[int]
    steps: np.ndarray  # [M] step index within its reference
    candidates: np.ndarray  # [M, k]
    logP: np.ndarray  # [M, k+1] float64, last column = tail block
    u: np.ndarray  # [M, k+1]
    y_atom: np.ndarray  # [M] atom of the human token (k = tail)
    y_const: np.ndarray  # [M] log(p̂(y)/P_B) when y is in the tail, else 0
    tail_entropy: np.ndarray  # [M] entropy of p̂ renormalised inside the tail block

    def alpha_per_step(self, alpha, buckets=()) -> np.ndarray:
        al = np.atleast_1d(np.asarray(alpha, dtype=np.float64))
        return al[np.searchsorted(np.asarray(buckets, dtype=np.int64), self.steps, side="right")]

    def loss_entropy(self, alpha, buckets=(), sel=None) -> tuple[np.ndarray, np.ndarray]:
        """Per-token −log q̃(y) and H(q̃) at α (a scalar, or one per step bucket)."""
        sel = slice(None) if sel is None else sel
        a = self.alpha_per_step(alpha, buckets)[sel]
        s = self.logP[sel] + a[:, None] * self.u[sel]
        m = s.max(1, keepdims=True)
        lq = s - (m + np.log(np.exp(s - m).sum(1, keepdims=True)))
        loss = -np.take_along_axis(lq, self.y_atom[sel, None], 1)[:, 0] - self.y_const[sel]
        q = np.exp(lq)
        ent = -(q * np.where(q > 0, lq, 0.0)).sum(1) + q[:, -1] * self.tail_entropy[sel]
        return loss, ent

    def table(self, alpha, buckets=(), *, key: str) -> pl.DataFrame:
        """A reference table (REFERENCE_SCHEMA) of the human text scored under q̃."""
        loss, ent = self.loss_entropy(alpha, buckets)
        cut = np.cumsum([0] + self.lengths)
        data = [{"example_id": ex, "decoding": key, "step_logloss": loss[a:b].tolist(),
                 "step_logloss_untruncated": loss[a:b].tolist(), "step_entropy": ent[a:b].tolist(),
                 "step_truncated": [False] * int(b - a)} for ex, a, b in zip(self.example_id, cut, cut[1:])]
        return pl.DataFrame(data, schema=REFERENCE_SCHEMA)


@torch.inference_mode()
def human_atoms(model, prompts: pl.DataFrame, decoding: DecodingSpec, phi, gamma: float, *, top_k: int = 16,
                max_tokens: int, batch_size: int = 8, pad_id: int = 0, chunk: int | None = None) -> HumanAtoms:
    """Teacher-forced pass over prompt + first ``max_tokens`` reference tokens; for every reference
    position its top-k candidates and phi after appending each (one batched candidate forward per block)."""
    _untruncated(decoding)
    device = next(model.parameters()).device
    weight = plain_lm_head(model)
    weight = None if weight is None else weight.float()
    ids_all, ctx = prompts["example_id"].to_list(), prompts["prompt_ids"].to_list()
    ref = [r[:max_tokens] for r in prompts["reference_ids"].to_list()]
    cols: dict[str, list] = {k: [] for k in ("steps", "cand", "logP", "u", "y_atom", "y_const", "tail_h")}
    for b in range(0, len(ids_all), batch_size):
        idx = range(b, min(b + batch_size, len(ids_all)))
        ids, mask = _right_pad([ctx[i] + ref[i] for i in idx], pad_id, device)
        net = model.get_decoder() if weight is not None else model
        o = net(input_ids=ids, attention_mask=mask, use_cache=True)
        states = o.last_hidden_state if weight is not None else o.logits
        rows = torch.cat([states[j, len(ctx[i]) - 1 : len(ctx[i]) - 1 + len(ref[i])] for j, i in enumerate(idx)])
        src = torch.cat([torch.full((len(ref[i]),), j) for j, i in enumerate(idx)]).to(device)
        steps = torch.cat([torch.arange(len(ref[i])) for i in idx]).to(device)
        clen = torch.cat([torch.arange(len(ref[i])) + len(ctx[i]) for i in idx]).to(device)
        targets = torch.cat([torch.tensor(ref[i], dtype=torch.long) for i in idx]).to(device)
        for s in range(0, rows.shape[0], ROW_BLOCK):
            blk = rows[s : s + ROW_BLOCK].float()
            logits = blk @ weight.T if weight is not None else blk
            logp = torch.log_softmax(logits / decoding.temperature, -1)
            k = min(top_k, logp.shape[-1])
            clp, cand = logp.topk(k, dim=-1)
            rq = src[s : s + ROW_BLOCK].repeat_interleave(k)
            cq = clen[s : s + ROW_BLOCK].repeat_interleave(k)
            phi_c = _candidate_pass(model, o.past_key_values, mask, rq, cq, cand.reshape(-1), phi, ctx_len=cq,
                                    chunk=chunk).view(-1, k)
            logP, u, tail_h = _atoms(logp, cand, clp, phi_c, gamma)
            y = targets[s : s + ROW_BLOCK]
            hit = cand == y[:, None]
            in_k = hit.any(1)
            y_lp = logp.gather(1, y[:, None])[:, 0]
            for name, v in (("steps", steps[s : s + ROW_BLOCK]), ("cand", cand), ("logP", logP), ("u", u),
                            ("y_atom", torch.where(in_k, hit.int().argmax(1), k)),
                            ("y_const", torch.where(in_k, torch.zeros_like(y_lp), y_lp - logP[:, -1])),
                            ("tail_h", tail_h)):
                cols[name].append(v.cpu())
    if not cols["steps"]:
        raise ValueError("human_atoms: no reference tokens to score (empty reference_ids)")
    cat = {k: torch.cat(v).numpy() for k, v in cols.items()}
    f64 = {k: cat[k].astype(np.float64) for k in ("logP", "u", "y_const", "tail_h")}
    return HumanAtoms(ids_all, [len(r) for r in ref], cat["steps"].astype(np.int64), cat["cand"], f64["logP"],
                      f64["u"], cat["y_atom"].astype(np.int64), f64["y_const"], f64["tail_h"])


def _golden(f, a: float, b: float, tol: float) -> float:
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return (a + b) / 2


def fit_alpha(atoms: HumanAtoms, *, bounds=LOOKAHEAD_BOUNDS, buckets=(), tol: float = 1e-4) -> dict:
    """One α per step bucket (edges ``buckets``; none = one shared α) minimising the mean log loss of q̃:
    golden section on [bounds] (convex), then the best of {that, both bounds, 0}, so α = 0 wins unless
    strictly better: the fitted α never raises the log loss on the data it is fitted on."""
    lo, hi = bounds
    if not lo <= 0 <= hi:
        raise ValueError(f"fit_alpha: bounds must contain 0, got {bounds}")
    which = np.searchsorted(np.asarray(buckets, dtype=np.int64), atoms.steps, side="right")
    alphas, n = [], 0
    for j in range(len(buckets) + 1):
        sel = np.nonzero(which == j)[0]
        if sel.size == 0:
            alphas.append(0.0)
            continue
        f = lambda a: float(atoms.loss_entropy(a, sel=sel)[0].mean())  # noqa: E731
        best = min([0.0, _golden(f, lo, hi, tol), lo, hi], key=lambda a: (f(a), abs(a)))
        alphas.append(float(best))
        n += sel.size
    loss = float(atoms.loss_entropy(alphas, buckets)[0].mean())
    loss0 = float(atoms.loss_entropy(0.0)[0].mean())
    return {"alpha": alphas[0] if not buckets else alphas, "buckets": list(buckets), "logloss": loss,
            "logloss_alpha0": loss0, "tokens": n}


# ---------------------------------------------------------------- generation from q̃
def reweighted_generate(model, prompts: pl.DataFrame, decoding: DecodingSpec, phi, gamma: float, alpha,
                        buckets=(), *, key: str, top_k: int = 16, max_new_tokens: int, samples_per_prompt: int = 1,
                        seed: int = 0, batch_size: int = 8, eos_ids=(), pad_id: int = 0,
                        chunk: int | None = None) -> pl.DataFrame:
    """A GENERATIONS_SCHEMA table sampled from q̃ (z̃ = z + α_t·U) by tasks.generate's own sampler: same
    uniforms, padding and compaction, so α = 0 reproduces generate_table row for row."""
    _untruncated(decoding)
    al, edges = np.atleast_1d(np.asarray(alpha, dtype=float)), list(buckets)

    def adjust(t, z, cache, mask, next_pos):
        logp = torch.log_softmax(z, -1)
        k = min(top_k, z.shape[-1])
        clp, cand = logp.topk(k, dim=-1)
        rows = torch.arange(z.shape[0], device=z.device).repeat_interleave(k)
        phi_c = _candidate_pass(model, cache, mask, rows, next_pos[:, 0][rows], cand.reshape(-1), phi,
                                chunk=chunk).view(-1, k)
        _, u, _ = _atoms(logp, cand, clp, phi_c, gamma)
        U = u[:, -1:].expand_as(z).scatter(1, cand, u[:, :k])
        return z + float(al[bisect.bisect_right(edges, t)]) * U

    return generate_table(model, prompts, decoding, max_new_tokens=max_new_tokens,
                          samples_per_prompt=samples_per_prompt, seed=seed, batch_size=batch_size,
                          eos_ids=tuple(eos_ids), pad_id=pad_id, adjust=adjust, key=key)


def _key(decoding: DecodingSpec, tag: str, alpha) -> str:
    return f"{decoding.key}-{tag}" + "_".join(f"{a:g}" for a in np.atleast_1d(alpha))


# ---------------------------------------------------------------- lookahead (Braverman et al.)
def lookahead_features(model, prompts, decoding: DecodingSpec | None = None, **kw) -> HumanAtoms:
    decoding = decoding or DecodingSpec()
    return human_atoms(model, prompts, decoding, _entropy_phi(decoding.temperature), 0.0, **kw)


def fit_lookahead_alpha(model, prompts, decoding: DecodingSpec | None = None, *, bounds=LOOKAHEAD_BOUNDS,
                        tol: float = 1e-4, **kw) -> dict:
    """α minimising the log loss of q̃ ∝ p̂·exp(−α·H(next | ·, w)) on ``prompts``' human references."""
    return fit_alpha(lookahead_features(model, prompts, decoding, **kw), bounds=bounds, tol=tol)


def lookahead_generate(model, prompts, decoding: DecodingSpec | None = None, *, alpha: float, **kw) -> pl.DataFrame:
    decoding = decoding or DecodingSpec()
    return reweighted_generate(model, prompts, decoding, _entropy_phi(decoding.temperature), 0.0, alpha,
                               key=_key(decoding, "look", alpha), **kw)


def lookahead_score(model, prompts, decoding: DecodingSpec | None = None, *, alpha: float, **kw) -> pl.DataFrame:
    """Human references scored under q̃ (REFERENCE_SCHEMA; step_logloss = −log q̃(y_t))."""
    decoding = decoding or DecodingSpec()
    return lookahead_features(model, prompts, decoding, **kw).table(alpha, key=_key(decoding, "look", alpha))


def _before_after(model, prompts_eval, decoding, phi, gamma, fit, tag, *, top_k, max_new_tokens, horizon,
                  samples_per_prompt, seed, batch_size, eos_ids, pad_id, bootstrap, ci_level, chunk,
                  return_tables) -> dict:
    """EntCE on ``prompts_eval``: before = p̂ (tasks.generate sampler, human text at α = 0), after = q̃."""
    alpha, buckets = fit["alpha"], fit["buckets"]
    gen_kw = dict(max_new_tokens=max_new_tokens, samples_per_prompt=samples_per_prompt, seed=seed,
                  batch_size=batch_size, eos_ids=tuple(eos_ids), pad_id=pad_id)
    atoms = human_atoms(model, prompts_eval, decoding, phi, gamma, top_k=top_k, max_tokens=horizon,
                        batch_size=batch_size, pad_id=pad_id, chunk=chunk)
    gens0 = generate_table(model, prompts_eval, decoding, **gen_kw)
    ref0 = atoms.table(0.0, key=decoding.key)
    if np.all(np.asarray(alpha) == 0):
        gens1, ref1 = gens0, ref0
    else:
        gens1 = reweighted_generate(model, prompts_eval, decoding, phi, gamma, alpha, buckets, top_k=top_k,
                                    key=_key(decoding, tag, alpha), chunk=chunk, **gen_kw)
        ref1 = atoms.table(alpha, buckets, key=_key(decoding, tag, alpha))
    s0, s1 = (entce_summary(g, r, horizon=horizon, bootstrap=bootstrap, ci_level=ci_level, seed=seed)
              for g, r in ((gens0, ref0), (gens1, ref1)))
    return {"alpha": alpha, "alpha_buckets": list(buckets),
            "entce_before": s0["entce"], "entce_after": s1["entce"],
            "logloss_before": s0["logloss"], "logloss_after": s1["logloss"],
            "entropy_before": s0["entropy"], "entropy_after": s1["entropy"],
            "entce_ci_before": [s0["entce_ci_low"], s0["entce_ci_high"]],
            "entce_ci_after": [s1["entce_ci_low"], s1["entce_ci_high"]],
            "fit_logloss": fit["logloss"], "fit_logloss_alpha0": fit["logloss_alpha0"],
            "summary_before": s0, "summary_after": s1,
            **({"tables": {"generations_before": gens0, "reference_before": ref0, "generations_after": gens1,
                           "reference_after": ref1}} if return_tables else {})}


def lookahead_calibration(model, prompts_train, prompts_eval, decoding: DecodingSpec | None = None, *,
                          top_k: int = 16, max_new_tokens: int = 64, horizon: int | None = None,
                          bounds=LOOKAHEAD_BOUNDS, samples_per_prompt: int = 1, seed: int = 0, batch_size: int = 8,
                          eos_ids=(), pad_id: int = 0, bootstrap: int = 1000, ci_level: float = 0.95,
                          chunk: int | None = None, return_tables: bool = False) -> dict:
    """Fit α on ``prompts_train``'s human text; EntCE / L̄ before and after on ``prompts_eval`` (before:
    tasks.generate's sampler and the human text at α = 0; ``return_tables`` adds the four tables)."""
    decoding, horizon = decoding or DecodingSpec(), horizon or max_new_tokens
    phi = _entropy_phi(decoding.temperature)
    fit = fit_alpha(human_atoms(model, prompts_train, decoding, phi, 0.0, top_k=top_k, max_tokens=horizon,
                                batch_size=batch_size, pad_id=pad_id, chunk=chunk), bounds=bounds)
    return _before_after(model, prompts_eval, decoding, phi, 0.0, fit, "look", top_k=top_k,
                         max_new_tokens=max_new_tokens, horizon=horizon, samples_per_prompt=samples_per_prompt,
                         seed=seed, batch_size=batch_size, eos_ids=eos_ids, pad_id=pad_id, bootstrap=bootstrap,
                         ci_level=ci_level, chunk=chunk, return_tables=return_tables)


# ---------------------------------------------------------------- future entropy (Cao et al., Alg. 1)
@dataclass
class FutureEntropyRegressor:
    """Ridge regression f̂(h) = ((h − mean)/scale)·w + b on final hidden states (post final norm)."""

    mean: torch.Tensor
    scale: torch.Tensor
    weight: torch.Tensor
    bias: float
    r2: float
    n: int

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        d = hidden.device
        return ((hidden.float() - self.mean.to(d)) / self.scale.to(d)) @ self.weight.to(d) + self.bias

    def phi(self, logits, hidden):
        return self(hidden)


@torch.inference_mode()
def fit_future_regressor(model, prompts: pl.DataFrame, generations: pl.DataFrame, *, horizon: int,
                         ridge: float = 1e-2, batch_size: int = 8, pad_id: int = 0) -> FutureEntropyRegressor:
    """Target at generated token s (feature: the final hidden state at that token, i.e. after appending
    it): the mean step_entropy of steps s+1 … end of that generation, within the first ``horizon`` steps.
    Features standardised; minimises mean squared error + ridge·|w|², closed form from float64 moments
    accumulated batch by batch (memory D², not tokens × D)."""
    device = next(model.parameters()).device
    ctx = dict(zip(prompts["example_id"].to_list(), prompts["prompt_ids"].to_list()))
    gens = [(ctx[ex], toks[:horizon], ent[:horizon]) for ex, toks, ent in generations.select(
        "example_id", "token_ids", "step_entropy").iter_rows() if len(toks[:horizon]) >= 2]
    if not gens:
        raise ValueError("fit_future_regressor: no generation has 2 or more steps")
    n, sx, sxx, sy, syy, sxy = 0, 0.0, 0.0, 0.0, 0.0, 0.0
    for b in range(0, len(gens), batch_size):
        part = gens[b : b + batch_size]
        ids, mask = _right_pad([c + t for c, t, _ in part], pad_id, device)
        hs = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        x = torch.cat([hs[j, len(c) : len(c) + len(t) - 1] for j, (c, t, _) in enumerate(part)]).double()
        tails = [np.cumsum(np.asarray(e, dtype=np.float64)[::-1])[::-1] for _, _, e in part]  # Σ steps s … end
        y = torch.from_numpy(np.concatenate([t[1:] / np.arange(len(t) - 1, 0, -1) for t in tails])).to(x.device)
        n, sx, sxx = n + len(x), sx + x.sum(0), sxx + x.T @ x
        sy, syy, sxy = sy + y.sum(), syy + (y * y).sum(), sxy + x.T @ y
    mean, ym = sx / n, sy / n
    cov = sxx / n - torch.outer(mean, mean)
    scale = cov.diagonal().clamp_min(0).sqrt().clamp_min(1e-6)
    czz = cov / torch.outer(scale, scale)
    czy = (sxy / n - mean * ym) / scale
    w = torch.linalg.solve(czz + ridge * torch.eye(len(mean), dtype=czz.dtype, device=czz.device), czy)
    var_y = float(syy / n - ym * ym)
    sse = var_y - float(2 * w @ czy - w @ czz @ w)
    r2 = 1 - sse / var_y if var_y > 0 else 0.0
    return FutureEntropyRegressor(mean.float().cpu(), scale.float().cpu(), w.float().cpu(), float(ym), r2, n)


def future_features(model, prompts, regressor: FutureEntropyRegressor, decoding: DecodingSpec | None = None,
                    **kw) -> HumanAtoms:
    return human_atoms(model, prompts, decoding or DecodingSpec(), regressor.phi, 1.0, **kw)


def future_generate(model, prompts, regressor: FutureEntropyRegressor, decoding: DecodingSpec | None = None, *,
                    alpha, buckets=(), **kw) -> pl.DataFrame:
    decoding = decoding or DecodingSpec()
    return reweighted_generate(model, prompts, decoding, regressor.phi, 1.0, alpha, buckets,
                               key=_key(decoding, "fut", alpha), **kw)


def future_entropy_calibration(model, prompts_train, prompts_eval, decoding: DecodingSpec | None = None, *,
                               top_k: int = 16, max_new_tokens: int = 64, horizon: int | None = None,
                               buckets=(), bounds=FUTURE_BOUNDS, ridge: float = 1e-2, samples_per_prompt: int = 1,
                               seed: int = 0, batch_size: int = 8, eos_ids=(), pad_id: int = 0,
                               bootstrap: int = 1000, ci_level: float = 0.95, chunk: int | None = None,
                               return_tables: bool = False) -> dict:
    """Regressor on the model's own generations for ``prompts_train``, α (one per step bucket) on their
    human text; EntCE / L̄ before and after on ``prompts_eval``."""
    decoding, horizon = decoding or DecodingSpec(), horizon or max_new_tokens
    gen_kw = dict(max_new_tokens=max_new_tokens, samples_per_prompt=samples_per_prompt, seed=seed,
                  batch_size=batch_size, eos_ids=tuple(eos_ids), pad_id=pad_id)
    gens = generate_table(model, prompts_train, decoding, **gen_kw)
    reg = fit_future_regressor(model, prompts_train, gens, horizon=horizon, ridge=ridge, batch_size=batch_size,
                               pad_id=pad_id)
    atoms = human_atoms(model, prompts_train, decoding, reg.phi, 1.0, top_k=top_k, max_tokens=horizon,
                        batch_size=batch_size, pad_id=pad_id, chunk=chunk)
    fit = fit_alpha(atoms, bounds=bounds, buckets=buckets)
    out = _before_after(model, prompts_eval, decoding, reg.phi, 1.0, fit, "fut", top_k=top_k,
                        max_new_tokens=max_new_tokens, horizon=horizon, samples_per_prompt=samples_per_prompt,
                        seed=seed, batch_size=batch_size, eos_ids=eos_ids, pad_id=pad_id, bootstrap=bootstrap,
                        ci_level=ci_level, chunk=chunk, return_tables=return_tables)
    return {**out, "regressor_r2": reg.r2, "regressor_n": reg.n}
