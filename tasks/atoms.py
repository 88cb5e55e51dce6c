"""The reweighted decodings that tasks/recalibrate.py calibrates (docs/SCIENCE.md §4): batched candidate
passes, the human text under q̃ for any α (HumanAtoms), the α fit, and sampling from q̃. Plain functions.

Reweighted decodings. Both calibration methods reweight the untruncated base p̂ = softmax(logits/τ) of
EVERY token w of the vocabulary, q̃(w) ∝ p̂(w)·exp(α·u_w), u_w = γ·log p̂(w) − φ(w) (γ and φ per method:
tasks/recalibrate.py). φ is computed for the top-k candidates K of p̂ only; every other token gets φ̄,
the p̂-weighted mean of the non-EOS candidates' φ (0 when all are EOS), so a tail token still gets
γ·log p̂(w) − φ̄ (with φ constant and γ = 1, q̃ is exactly temperature τ/(1+α)). After EOS nothing is
generated: φ(EOS) = 0 for every EOS id, candidate or not.
Generation applies the rule to all V logits (exact, O(V) per row; reweighted_logits, reweighted_generate).
Fitting needs, per human position, log Z(α) = log[Σ_K e^{(1+γα)·log p̂ − α·φ} + Σ_tail e^{(1+γα)·log p̂ − α·φ̄}]
at many α: the tail (every token outside K and the EOS ids) is kept as entries (p̂-mass m_j, mass-weighted
mean log p̂ μ_j) that stand for m_j·e^{−μ_j} tokens of log p̂ = μ_j: one entry per token when
V ≤ TAIL_BINS + 1 (exact), else one per bin of width δ = TAIL_BIN_NATS in log p̂ below the tail's top
log-prob plus one floor bin beyond TAIL_RANGE_NATS. P_tail, the tail's p̂-entropy and the slope at α = 0
are exact; for α ≠ 0 the binned log Σ_tail p̂^{1+γα} is low by at most (γα)²·δ²/8 (Hoeffding's lemma,
per bin) plus the floor bin's share. The human token's own term is exact wherever it lies:
−log q̃(y) = log Z(α) − (log p̂(y) + α·u_y), a log-sum-exp of functions affine in α, so convex (fit_alpha).
φ(w) is a function ``phi(logits[Q, V], last hidden[Q, D], remaining[Q])`` of the model's output after
appending w and of the steps left after it within the horizon T, remaining = max(T − s − 1, 0) for a
token at step s (0-based) of the continuation (entropy_phi: H(next | context, w), the entropy of
softmax(logits/τ), ignores it; future entropy's f̂ needs it: tasks/future.py); the features after appending
each candidate come from ONE batched forward of the k candidates per position, a single new token
each, attending to the prefix's KV cache (copied per candidate row; in teacher-forced scoring a padding
mask hides the cache beyond the candidate's context length). The teacher-forced prefix forward is
tasks.score.teacher_forced, the scorer's own.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from entcal import kernels
from entcal.tasks.config import DecodingSpec
from entcal.tasks.contracts import REFERENCE_SCHEMA, GenerationKnobs
from entcal.tasks.generate import generate
from entcal.tasks.models import LoadedModel, input_device
from entcal.tasks.score import plain_lm_head, teacher_forced

ROW_BLOCK = 512  # human positions whose candidates are scored per block (teacher-forced fitting)
TAIL_BIN_NATS = 0.05  # δ: width in log p̂ of one tail bin (fitting, V > TAIL_BINS + 1)
TAIL_RANGE_NATS = 30.0  # bins cover [top − R, top] of the tail's log p̂; below: one floor bin
TAIL_BINS = round(TAIL_RANGE_NATS / TAIL_BIN_NATS)


# ---------------------------------------------------------------- candidate passes
def _untruncated(decoding: DecodingSpec) -> None:
    if decoding.truncated:
        raise ValueError(f"decoding {decoding.key}: lookahead / future-entropy calibration reweights the "
                         "untruncated p̂ = softmax(logits/τ); use a temperature-only decoding")


def _candidate_pass(model, cache, key_mask, rows, positions, tokens, phi, *, remaining, ctx_len=None,
                    chunk: int | None = None, budget: int = 1 << 30) -> torch.Tensor:
    """phi(logits[Q, V], last hidden[Q, D], remaining[Q]) after appending ``tokens[q]`` to batch row
    ``rows[q]`` of ``cache`` (``remaining[q]``: steps left after it, int64): one forward per ``chunk``
    queries (default: as many as fit copies of their cache rows in ``budget`` bytes), one new token
    each, on a per-query copy of the rows' KV cache.
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
        out.append(phi(o.logits[:, -1].float(), o.hidden_states[-1][:, -1].float(), remaining[s : s + chunk]))
    return torch.cat(out)


def entropy_phi(temperature: float):
    """φ for lookahead: H(next | context, w) in nats, the entropy of softmax(logits/τ) after appending w
    (the remaining steps play no part)."""
    return lambda logits, hidden, remaining: kernels.token_stats(logits, None, temperature=temperature).entropy


def remaining_after(step, horizon: int):
    """Steps left within the horizon T after the token at 0-based ``step`` (int or int64 tensor):
    max(T − step − 1, 0)."""
    return (horizon - 1 - step).clamp_min(0) if torch.is_tensor(step) else max(horizon - 1 - step, 0)


def _eos_mask(ids: torch.Tensor, eos: torch.Tensor | None) -> torch.Tensor:
    return torch.zeros_like(ids, dtype=torch.bool) if eos is None else torch.isin(ids, eos)


def _candidate_phi(cand, clp, phi_c, eos):
    """(φ of the candidates [N, k] with φ(EOS) = 0, φ̄ [N] = p̂-weighted mean φ of the non-EOS candidates)."""
    is_eos = _eos_mask(cand, eos)
    phi_c = phi_c.masked_fill(is_eos, 0.0)
    w = (clp - clp[:, :1]).exp().masked_fill(is_eos | ~torch.isfinite(clp), 0.0)
    den = w.sum(1)
    return phi_c, torch.where(den > 0, (w * phi_c).sum(1) / den.clamp_min(1e-30), torch.zeros_like(den))


def reweighted_logits(z: torch.Tensor, cand: torch.Tensor, phi_c: torch.Tensor, alpha: float, gamma: float,
                      eos: torch.Tensor | None = None) -> torch.Tensor:
    """z̃[N, V] = z + α·u with u_w = γ·log p̂(w) − φ(w) for every token (module doc): φ_c [N, k] for the
    candidates ``cand`` [N, k], 0 for EOS ids, φ̄ for the rest. softmax(z̃) = q̃."""
    logp = torch.log_softmax(z, -1)
    lp = torch.where(torch.isfinite(logp), logp, torch.zeros_like(logp))
    phi_c, phi_bar = _candidate_phi(cand, logp.gather(1, cand), phi_c, eos)
    u = (gamma * lp - phi_bar[:, None]).scatter(1, cand, gamma * lp.gather(1, cand) - phi_c)
    if eos is not None:
        u[:, eos] = gamma * lp[:, eos]
    return z + alpha * u


def tail_entries(logp: torch.Tensor, excluded: torch.Tensor, *, bins: int = TAIL_BINS,
                 width: float = TAIL_BIN_NATS) -> tuple[torch.Tensor, torch.Tensor]:
    """The tail (tokens not ``excluded`` [N, V]) of log p̂ [N, V] as (log mass [N, J], mean log p̂ [N, J]):
    J = V exact entries (excluded ones at log mass −inf) when V ≤ bins + 1, else J = bins + 1: bin b holds
    the tokens with log p̂ in (top − (b+1)·width, top − b·width] (top = the tail's largest log p̂), the
    last bin everything lower; the mean is mass-weighted, so Σ_j m_j = P_tail and Σ_j m_j·μ_j = Σ p̂·log p̂
    exactly. Empty entries: log mass −inf, mean 0."""
    tail = logp.masked_fill(excluded, -math.inf)
    if logp.shape[1] <= bins + 1:
        return tail, torch.where(torch.isfinite(tail), tail, torch.zeros_like(tail))
    top = tail.amax(1, keepdim=True).nan_to_num(0.0, 0.0, 0.0)
    rel = tail.sub_(top).clamp_(min=-1e4)  # ≤ 0; excluded tokens at −1e4: mass e^{−1e4} = 0
    pr = rel.exp()
    b = rel.mul(-1.0 / width).clamp_(max=bins).long()  # ≥ 0, truncation = floor
    mass = torch.zeros(len(logp), bins + 1, dtype=logp.dtype, device=logp.device).scatter_add_(1, b, pr)
    mom = torch.zeros_like(mass).scatter_add_(1, b, pr.mul_(rel))
    full = mass > 0
    return (torch.where(full, mass.log() + top, torch.full_like(mass, -math.inf)),
            torch.where(full, mom / mass.clamp_min(1e-38) + top, torch.zeros_like(mass)))


def position_atoms(logp, cand, phi_c, y, gamma: float, eos: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """What q̃'s log loss and entropy need at N positions, for any α (HumanAtoms fields): log p̂ [N, V],
    top-k ``cand`` [N, k] with features ``phi_c`` [N, k], human tokens ``y`` [N]. Atoms: the k candidates,
    then each EOS id (log p̂ −inf where it is already a candidate); the tail as tail_entries."""
    n = len(logp)
    clp = logp.gather(1, cand)
    phi_c, phi_bar = _candidate_phi(cand, clp, phi_c, eos)
    ids, lp_a, phi_a = cand, clp, phi_c
    if eos is not None and eos.numel():
        ex = eos[None].expand(n, -1)
        ex_lp = logp.gather(1, ex).masked_fill((ex[:, :, None] == cand[:, None, :]).any(-1), -math.inf)
        ids, lp_a = torch.cat([cand, ex], 1), torch.cat([clp, ex_lp], 1)
        phi_a = torch.cat([phi_c, torch.zeros_like(ex_lp)], 1)
    ok = torch.isfinite(lp_a)
    u = torch.where(ok, gamma * lp_a - phi_a, torch.zeros_like(lp_a))
    t_lm, t_mu = tail_entries(logp, torch.zeros_like(logp, dtype=torch.bool).scatter(1, ids, True))
    y_lp = logp.gather(1, y[:, None])[:, 0]
    hit = cand == y[:, None]
    phi_y = torch.where(hit.any(1), (phi_c * hit).sum(1), phi_bar).masked_fill(_eos_mask(y, eos), 0.0)
    return {"candidates": cand, "logP": lp_a, "u": u, "tail_logm": t_lm, "tail_mu": t_mu, "tail_c": -phi_bar,
            "y_logp": y_lp, "y_u": gamma * y_lp - phi_y}


# ---------------------------------------------------------------- human text under q̃
@dataclass
class HumanAtoms:
    """Per human token (all examples, in order; M tokens): what q̃'s log loss / entropy need, for any α.
    A = k candidates + the EOS ids; J tail entries (module doc, tail_entries)."""

    example_id: list[str]
    lengths: list[int]
    steps: np.ndarray  # [M] step index within its reference
    candidates: np.ndarray  # [M, k] top-k token ids
    logP: np.ndarray  # [M, A] float64 log p̂ of the atoms (−inf: an EOS id that is also a candidate)
    u: np.ndarray  # [M, A] float64 feature γ·log p̂ − φ of the atoms (φ(EOS) = 0)
    tail_logm: np.ndarray  # [M, J] float32 log p̂-mass of each tail entry (−inf: empty)
    tail_mu: np.ndarray  # [M, J] float32 mass-weighted mean log p̂ of each tail entry
    tail_c: np.ndarray  # [M] float64 −φ̄: a tail token's feature is γ·log p̂ + tail_c
    y_logp: np.ndarray  # [M] float64 log p̂(y) of the human token
    y_u: np.ndarray  # [M] float64 its feature u_y
    gamma: float

    def alpha_per_step(self, alpha, buckets=()) -> np.ndarray:
        al = np.atleast_1d(np.asarray(alpha, dtype=np.float64))
        return al[np.searchsorted(np.asarray(buckets, dtype=np.int64), self.steps, side="right")]

    def loss_entropy(self, alpha, buckets=(), sel=None, *, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """Per-token −log q̃(y) and H(q̃) in nats [M or len(sel)] at α (a scalar, or one per step bucket)."""
        idx = np.arange(len(self.steps))[slice(None) if sel is None else sel]
        a_all = self.alpha_per_step(alpha, buckets)[idx]
        loss, ent = np.empty(len(idx)), np.empty(len(idx))
        for s in range(0, len(idx), chunk):
            i, a = idx[s : s + chunk], a_all[s : s + chunk, None]
            sc = self.logP[i] + a * self.u[i]
            mu = self.tail_mu[i].astype(np.float64)
            fu = self.gamma * mu + self.tail_c[i, None]
            st = self.tail_logm[i].astype(np.float64) + a * fu
            m = np.maximum(sc.max(1), st.max(1))[:, None]
            lse = m + np.log(np.exp(sc - m).sum(1, keepdims=True) + np.exp(st - m).sum(1, keepdims=True))
            loss[s : s + chunk] = lse[:, 0] - (self.y_logp[i] + a[:, 0] * self.y_u[i])
            lqc, lqt = sc - lse, mu + a * fu - lse  # log q̃ of a candidate / of one token of a tail entry
            qc, qt = np.exp(lqc), np.exp(st - lse)  # qt: q̃-mass of the whole entry
            ent[s : s + chunk] = (-(qc * np.where(qc > 0, lqc, 0.0)).sum(1)
                                  - (qt * np.where(qt > 0, lqt, 0.0)).sum(1))
        return loss, ent

    def gradient_at_zero(self, sel=None, *, chunk: int = 4096) -> float:
        """d/dα of the mean −log q̃(y) at α = 0 (nats/token per unit α), exact on these atoms: the mean
        over positions (``sel``: all) of E_p̂[u] − u_y, E_p̂ over the candidates, EOS ids and tail entries
        (a tail token's u = γ·log p̂ + tail_c). With φ = the exact future entropy F and γ = 1 it
        telescopes to L̄ − H̄ = −EntCE (docs/SCIENCE.md §4): the drift an f̂ carries."""
        idx = np.arange(len(self.steps))[slice(None) if sel is None else sel]
        total = 0.0
        for s in range(0, len(idx), chunk):
            i = idx[s : s + chunk]
            pa, pt = np.exp(self.logP[i]), np.exp(self.tail_logm[i].astype(np.float64))
            ut = self.gamma * self.tail_mu[i].astype(np.float64) + self.tail_c[i, None]
            eu = ((pa * self.u[i]).sum(1) + (pt * ut).sum(1)) / (pa.sum(1) + pt.sum(1))
            total += float((eu - self.y_u[i]).sum())
        return total / max(len(idx), 1)

    def table(self, alpha, buckets=(), *, key: str) -> pl.DataFrame:
        """A reference table (REFERENCE_SCHEMA) of the human text scored under q̃."""
        loss, ent = self.loss_entropy(alpha, buckets)
        cut = np.cumsum([0] + self.lengths)
        data = [{"example_id": ex, "decoding": key, "step_logloss": loss[a:b].tolist(),
                 "step_logloss_untruncated": loss[a:b].tolist(), "step_entropy": ent[a:b].tolist(),
                 "step_truncated": [False] * int(b - a)} for ex, a, b in zip(self.example_id, cut, cut[1:])]
        return pl.DataFrame(data, schema=REFERENCE_SCHEMA)


_F64 = ("logP", "u", "tail_c", "y_logp", "y_u")


def atoms_from_parts(example_id: list[str], lengths: list[int], steps, parts: list[dict], gamma: float) -> HumanAtoms:
    """HumanAtoms from position_atoms outputs (in token order) and each token's step index."""
    cat = {k: torch.cat([p[k].cpu() for p in parts]).numpy() for k in parts[0]}
    return HumanAtoms(list(example_id), list(lengths), np.asarray(steps, dtype=np.int64), cat["candidates"],
                      *(cat[k].astype(np.float64) for k in _F64[:2]),
                      cat["tail_logm"].astype(np.float32), cat["tail_mu"].astype(np.float32),
                      *(cat[k].astype(np.float64) for k in _F64[2:]), float(gamma))


def _eos_tensor(eos_ids, device) -> torch.Tensor | None:
    return torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device) if eos_ids else None


@torch.inference_mode()
def human_atoms(lm: LoadedModel, prompts: pl.DataFrame, decoding: DecodingSpec, phi, gamma: float, *, top_k: int,
                max_tokens: int, batch_size: int, chunk: int | None = None) -> HumanAtoms:
    """Teacher-forced pass (tasks.score.teacher_forced, KV cache kept) over prompt + first ``max_tokens``
    reference tokens, ``batch_size`` examples at a time; for every reference position its ``top_k``
    candidates and phi after appending each (one batched candidate forward per block; remaining =
    max(max_tokens − s − 1, 0) at step s: the horizon is ``max_tokens``), φ(EOS) = 0 for the model's
    EOS ids."""
    _untruncated(decoding)
    model, pad_id = lm.model, lm.pad_id
    device = input_device(model)
    eos = _eos_tensor(lm.eos_ids, device)
    weight = plain_lm_head(model)  # teacher_forced's rows are hidden states exactly when this is not None
    weight = None if weight is None else weight.float()
    ids_all, ctx = prompts["example_id"].to_list(), prompts["prompt_ids"].to_list()
    ref = [r[:max_tokens] for r in prompts["reference_ids"].to_list()]
    parts, steps_all = [], []
    for b in range(0, len(ids_all), batch_size):
        idx = range(b, min(b + batch_size, len(ids_all)))
        tf = teacher_forced(model, [ctx[i] for i in idx], [ref[i] for i in idx], pad_id=pad_id, use_cache=True)
        rows, targets = tf.rows, tf.targets
        src = torch.cat([torch.full((len(ref[i]),), j) for j, i in enumerate(idx)]).to(device)
        clen = torch.cat([torch.arange(len(ref[i])) + len(ctx[i]) for i in idx]).to(device)
        left = remaining_after(torch.cat([torch.arange(len(ref[i])) for i in idx]), max_tokens).to(device)
        steps_all += [s for i in idx for s in range(len(ref[i]))]
        for s in range(0, rows.shape[0], ROW_BLOCK):
            blk = rows[s : s + ROW_BLOCK].float()
            logits = blk @ weight.T if weight is not None else blk
            logp = torch.log_softmax(logits / decoding.temperature, -1)
            k = min(top_k, logp.shape[-1])
            cand = logp.topk(k, dim=-1).indices
            rq = src[s : s + ROW_BLOCK].repeat_interleave(k)
            cq = clen[s : s + ROW_BLOCK].repeat_interleave(k)
            phi_c = _candidate_pass(model, tf.cache, tf.mask, rq, cq, cand.reshape(-1), phi, ctx_len=cq, chunk=chunk,
                                    remaining=left[s : s + ROW_BLOCK].repeat_interleave(k)).view(-1, k)
            parts.append({k_: v.cpu() for k_, v in position_atoms(logp, cand, phi_c, targets[s : s + ROW_BLOCK],
                                                                   gamma, eos).items()})
    if not parts:
        raise ValueError("human_atoms: no reference tokens to score (empty reference_ids)")
    return atoms_from_parts(ids_all, [len(r) for r in ref], steps_all, parts, gamma)


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


def fit_alpha(atoms: HumanAtoms, *, bounds: tuple[float, float], buckets=(), tol: float = 1e-4) -> dict:
    """One α per step bucket (edges ``buckets``; none = one shared α) minimising the mean log loss of q̃:
    golden section on [bounds] (convex), then the best of {that, both bounds, 0}, so α = 0 wins unless
    strictly better: the fitted α never raises the log loss on the data it is fitted on. Returns alpha
    (a float, or one per bucket), buckets, logloss and logloss_alpha0 (nats/token on ``atoms``), tokens."""
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
def decoding_key(decoding: DecodingSpec, tag: str, alpha) -> str:
    """The decoding column of q̃'s tables: ``t1-look0.25``, ``t1-fut0.1_0.3``."""
    return f"{decoding.key}-{tag}" + "_".join(f"{a:g}" for a in np.atleast_1d(alpha))


def reweighted_generate(lm: LoadedModel, prompts: pl.DataFrame, decoding: DecodingSpec, phi, gamma: float, alpha,
                        buckets=(), *, key: str, top_k: int, knobs: GenerationKnobs, horizon: int | None = None,
                        chunk: int | None = None) -> pl.DataFrame:
    """A GENERATIONS_SCHEMA table sampled from q̃ (z̃ = reweighted_logits, α_t per step bucket) by
    tasks.generate's own sampler: same draws, padding and compaction, so α = 0 reproduces tasks.generate
    row for row. The model's EOS ids stop a row and get φ = 0. phi's remaining at decode step t is
    max(T − t − 1, 0), T = ``horizon`` (default: knobs.max_new_tokens)."""
    _untruncated(decoding)
    al, edges = np.atleast_1d(np.asarray(alpha, dtype=float)), list(buckets)
    horizon = knobs.max_new_tokens if horizon is None else horizon
    eos = {}

    def adjust(t, z, cache, mask, next_pos):
        k = min(top_k, z.shape[-1])
        cand = z.topk(k, dim=-1).indices
        rows = torch.arange(z.shape[0], device=z.device).repeat_interleave(k)
        left = torch.full_like(rows, remaining_after(t, horizon))
        phi_c = _candidate_pass(lm.model, cache, mask, rows, next_pos[:, 0][rows], cand.reshape(-1), phi,
                                remaining=left, chunk=chunk).view(-1, k)
        if z.device not in eos:
            eos[z.device] = _eos_tensor(lm.eos_ids, z.device)
        return reweighted_logits(z, cand, phi_c, float(al[bisect.bisect_right(edges, t)]), gamma, eos[z.device])

    return generate(lm, prompts, decoding, knobs, adjust=adjust, key=key)
