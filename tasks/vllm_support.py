"""engine: vllm: did vLLM sample each step from the support entcal re-scores? Both ways, per step.

vLLM reports, per generated step, the processed log-prob (after temperature and truncation) of the
drawn token and of its own top ``TOP_L`` tokens (``SamplingParams(logprobs=TOP_L)``). vLLM 0.32 takes
them with ``torch.topk`` of the truncated logits and log-softmaxes those, so a token its truncation
removed reports −inf (``v1/worker/gpu/sample/logprob.py``: ``compute_topk_scores``; on CPU
``v1/sample/ops/topk_topp_sampler.py``: ``forward_cpu``). The re-score's logits of each step give
entcal's side (``entcal_side``, ``kernels.reference.truncation_mask``: entcal's kept set E): for the
reported ids, whether E keeps each and its log-weight ℓ_i = z_i − log Z_E (z = logits/τ, Z_E = Σ_E e^z),
and |E|. ``compare``, per step (S = vLLM's set):

* Inside the top L, exactly. ``added``: tokens vLLM kept (finite) that E excludes. ``removed``:
  tokens of E that vLLM dropped (−inf). A step is *closed* when the report holds a −inf: all of S
  is then in it, so ``removed`` = |E| − |E ∩ S| counts E's tokens beyond the top L as well.
* Beyond the top L (open steps), by the shift of log Z. With the same logits, ℓ_i − lp_vLLM(i) =
  log Z_S − log Z_E for every token in both sets; the observed shift is δ = log Σ_T e^ℓ − log Σ_T q_vLLM,
  T the report's tokens in both sets (the same quantity from T's mass on each side: exactly 0 when
  S = E = T, whatever the logit noise). The known differences predict log r, r = Σ_S e^ℓ (closed) or
  1 + Σ_added e^ℓ (open); the residual ρ = δ − log r is, on open steps, a set-mass difference beyond
  the top L plus noise: ρ > tol, vLLM's set holds more mass than E; ρ < −tol, less.
* ΔH = H(q over E) − H(q over S), nats. Closed steps: exact (H over S from the report's ids with
  entcal's ℓ). Open steps: from the added tokens, exact when nothing beyond the top L differs; unknown
  (left out of the ΔH means, counted in ``support_beyond_top_l``; |ρ|, about the relative set mass that
  differs, averaged in ``beyond_logz_shift_mean``) when ρ says something does.

The tolerance of an open step (``summarize``): max(TOL_FLOOR, TOL_K·σ_t). σ_t = e_t·gain_t: e_t the
per-token logit noise between the engines, measured where it cannot be a support difference (the
spread of ℓ_i − lp_vLLM(i) over the step's tokens in both sets: a set difference shifts them all
alike), at least the RMS of that spread over all steps; gain_t what iid per-token noise of sd 1 does
to δ (√(Σ_{E∖T} q² + (1/Q_T − 1)² Σ_T q²), T the report's tokens in both sets, Q_T their mass, q over
E standing in for q over S). What the shift cannot see: a mass difference below the tolerance (a
relative mass e^tol − 1), which tokens differ beyond the top L, a swap there whose masses cancel; it
assumes both engines' logits agree up to that noise. Memory: [steps, TOP_L + 1] per call; entcal's
side holds a few [SIDE_ROWS, V] tensors at once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from entcal.kernels.reference import truncation_mask

TOP_L = 20  # vLLM's top-L processed log-probs per step (its max_logprobs is 20 by default)
TOL_K = 10.0  # a step's tolerance: max(TOL_FLOOR, TOL_K × its shift's noise sd)
TOL_FLOOR = 1e-4  # nats: float32 log-probs and log-partitions of ~30 carry ~4e-6 of rounding each
SIDE_ROWS = 128  # rows of entcal's side at once


def top_l(flat, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's report of one row from its ``FlatLogprobs`` (``SamplingParams(flat_logprobs=True)``: each
    position lists the drawn token, then vLLM's top L, which may list the drawn token again): ids
    [steps, TOP_L + 1] int32 (column 0 the drawn token; −1 = no entry) and processed log-probs
    [steps, TOP_L + 1] float32 (nats, as vLLM computed them; −inf: truncated by vLLM; NaN: no entry)."""
    width = TOP_L + 1
    ids = torch.full((steps, width), -1, dtype=torch.int32)
    lps = torch.full((steps, width), math.nan, dtype=torch.float32)
    starts = torch.tensor(flat.start_indices[:steps], dtype=torch.long)
    counts = (torch.tensor(flat.end_indices[:steps], dtype=torch.long) - starts).clamp(0, width)
    row = torch.repeat_interleave(torch.arange(steps), counts)
    col = torch.arange(row.numel()) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    src = torch.repeat_interleave(starts, counts) + col
    ids[row, col] = torch.tensor(flat.token_ids, dtype=torch.int32)[src]
    lps[row, col] = torch.tensor(flat.logprobs, dtype=torch.float32)[src]
    dup = ids[:, 1:] == ids[:, :1]  # the drawn token again among the top L
    ids[:, 1:][dup], lps[:, 1:][dup] = -1, math.nan
    return ids, lps


def entcal_side(logits: torch.Tensor, ids: torch.Tensor, decoding) -> tuple[torch.Tensor, ...]:
    """Entcal's side of the comparison for one block of re-scored steps: logits [B, V] (any float dtype,
    the re-score's), ids [B, C] vLLM's reported ids (−1 = none), ``SIDE_ROWS`` rows at a time (the mask's
    sort and float64 masses are a few [rows, V] tensors). Returns, on CPU: kept [B, C] bool (entcal's
    truncation keeps the id), logw [B, C] float64 (ℓ = z − log Z_E, nats), n_kept [B] int64 (|E|) and
    q2 [B] float64 (Σ_E q², for the shift's noise)."""
    knobs = {k: v for k, v in decoding.kernel_kwargs().items() if k != "temperature"}
    parts = []
    for i in range(0, logits.shape[0], SIDE_ROWS):
        z = logits[i : i + SIDE_ROWS].float() / decoding.temperature  # as kernels.reference.scaled_logits
        keep = truncation_mask(z, **knobs)
        if keep is None:
            keep = torch.ones_like(z, dtype=torch.bool)
        zk = z.masked_fill(~keep, -math.inf)
        lse = torch.logsumexp(zk, dim=-1, keepdim=True)
        idx = ids[i : i + SIDE_ROWS].to(z.device, torch.long).clamp_min(0)
        parts.append((keep.gather(-1, idx).cpu(), (z.gather(-1, idx).double() - lse.double()).cpu(),
                      keep.sum(-1).cpu(), (2 * (zk - lse)).exp().sum(-1).double().cpu()))
    return tuple(torch.cat(c) for c in zip(*parts))


@dataclass
class StepSupport:
    """Per generated step [N] (``compare``): ``closed`` (vLLM's whole set is in its report), ``added`` /
    ``removed`` (tokens vLLM keeps that entcal drops / entcal keeps that vLLM drops, found exactly),
    ``residual`` (ρ, nats; NaN: no token in both sets to measure the shift on), ``dH`` (H over entcal's set
    − H over vLLM's, nats, from the exactly found differences; 0 where there are none), ``gain`` (the
    shift's noise sd per unit of per-token logit noise) and ``token_var`` (the step's sample variance of
    ℓ − lp over the tokens in both sets, nats²: per-token logit noise; NaN with fewer than 2)."""

    closed: torch.Tensor
    added: torch.Tensor
    removed: torch.Tensor
    residual: torch.Tensor
    dH: torch.Tensor
    gain: torch.Tensor
    token_var: torch.Tensor

    @staticmethod
    def cat(parts: list[StepSupport]) -> StepSupport:
        if not parts:
            e = torch.empty(0, dtype=torch.float64)
            return StepSupport(e.bool(), e.long(), e.long(), e, e, e, e)
        return StepSupport(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(StepSupport)))


def compare(ids: torch.Tensor, logprob: torch.Tensor, kept: torch.Tensor, logw: torch.Tensor,
            n_kept: torch.Tensor, q2: torch.Tensor, entropy: torch.Tensor) -> StepSupport:
    """The two supports of each step (see the module docstring). vLLM's side: ids [N, C] (column 0 the
    drawn token, −1 none), logprob [N, C] its processed log-probs (nats, −inf truncated, NaN none).
    Entcal's (``entcal_side``): kept [N, C] bool, logw [N, C] ℓ (nats), n_kept [N] |E|, q2 [N] Σ_E q²;
    entropy [N] H(q_t) over E (nats), the re-score's."""
    lp, lw, entropy = logprob.double(), logw.double(), entropy.double()
    zero = torch.zeros_like(lw)
    valid = ids >= 0
    in_s = valid & torch.isfinite(lp)  # vLLM kept it
    out_s = valid & torch.isneginf(lp)  # vLLM truncated it
    kept = kept & valid
    closed = out_s.any(-1)
    both = in_s & kept
    w = torch.where(valid, lw.exp(), zero)  # q over E for E's tokens; e^ℓ for any
    wl = torch.where(valid & (w > 0), w * lw, zero)
    add = in_s & ~kept
    added = add.sum(-1)
    removed = torch.where(closed, n_kept - both.sum(-1), (out_s & kept).sum(-1))
    # the observed shift: log of T's mass relative to E (entcal) over T's mass relative to S (vLLM), T the
    # report's tokens in both sets; log Z_S − log Z_E with equal logits, exactly 0 when S = E = T
    ninf = torch.full_like(lw, -math.inf)
    delta = torch.where(both, lw, ninf).logsumexp(-1) - torch.where(both, lp, ninf).logsumexp(-1)
    diff = torch.where(both, lw - lp, zero)
    r_closed = (w * in_s).sum(-1)  # Z_S / Z_E, all of S known
    r_open = 1.0 + (w * add).sum(-1)  # what the added tokens alone add
    residual = delta - torch.where(closed, r_closed, r_open).log()
    # its noise: with iid per-token logit noise of sd e, sd(δ) = e·gain (q over E standing in for S's)
    n_both = both.sum(-1)
    mean = diff.sum(-1) / n_both
    token_var = torch.where(both, (diff - mean[:, None]) ** 2, zero).sum(-1) / (n_both - 1)
    token_var = torch.where(n_both >= 2, token_var, torch.full_like(token_var, math.nan))
    wb = torch.where(both, w, zero)
    q_t, s_t = wb.sum(-1), (wb**2).sum(-1)
    tail = (q2 - torch.where(kept, w**2, zero).sum(-1)).clamp_min(0)  # Σ q² over E's tokens not reported
    gain = (tail + (1 / q_t - 1) ** 2 * s_t).sqrt()
    # ΔH: closed, H_S over the report's finite tokens; open, adding the added tokens to E
    h_closed = r_closed.log() - (wl * in_s).sum(-1) / r_closed
    h_open = (entropy - (wl * add).sum(-1)) / r_open + r_open.log()
    differs = (added > 0) | (removed > 0)
    dH = torch.where(differs, entropy - torch.where(closed, h_closed, h_open), torch.zeros_like(entropy))
    return StepSupport(closed, added, removed, residual, dH, gain, token_var)


_EMPTY = {"support_top_l": 0, "support_steps": 0, "support_closed": 0, "support_open": 0, "support_differs": 0,
          "support_differs_share": 0.0, "support_larger_in_vllm": 0, "support_smaller_in_vllm": 0,
          "support_beyond_top_l": 0, "beyond_logz_shift_mean": 0.0, "implied_abs_dH_mean": 0.0,
          "implied_abs_dH_differing_mean": 0.0, "implied_dH_steps": 0, "implied_dH_differing_steps": 0,
          "logit_noise_sd": 0.0, "logit_noise_steps": 0, "logz_shift_tol_mean": 0.0, "logz_shift_tol_max": 0.0}


def summarize(s: StepSupport | None, steps: int) -> dict:
    """The agreement's support fields over ``steps`` steps from their StepSupport (None: an untruncated
    decoding, where both engines keep the whole vocabulary and nothing is compared)."""
    if s is None:
        return {**_EMPTY, "support_steps": steps, "implied_dH_steps": steps}
    res, closed = s.residual, s.closed
    noisy = torch.isfinite(s.token_var)
    e_pool = float(s.token_var[noisy].mean().sqrt()) if noisy.any() else 0.0
    e = torch.where(noisy, s.token_var.sqrt().clamp_min(e_pool), torch.full_like(s.gain, e_pool))
    tol = (TOL_K * s.gain * e).nan_to_num(nan=math.inf).clamp_min(TOL_FLOOR)
    opened = ~closed & torch.isfinite(res)
    beyond = opened & (res.abs() > tol)
    larger = (s.added > 0) | (beyond & (res > 0))
    smaller = (s.removed > 0) | (beyond & (res < 0))
    differs = larger | smaller
    known = ~beyond  # steps whose ΔH is known: exactly, or 0 where the supports agree
    dh = s.dH.abs()
    k_diff = known & differs
    tol_open = tol[opened]
    return {"support_top_l": TOP_L, "support_steps": steps, "support_closed": int(closed.sum()),
            "support_open": int(opened.sum()), "support_differs": int(differs.sum()),
            "support_differs_share": float(differs.sum()) / max(1, steps),
            "support_larger_in_vllm": int(larger.sum()), "support_smaller_in_vllm": int(smaller.sum()),
            "support_beyond_top_l": int(beyond.sum()),
            "beyond_logz_shift_mean": float(res[beyond].abs().mean()) if beyond.any() else 0.0,
            "implied_abs_dH_mean": float(dh[known].mean()) if known.any() else 0.0,
            "implied_abs_dH_differing_mean": float(dh[k_diff].mean()) if k_diff.any() else 0.0,
            "implied_dH_steps": int(known.sum()), "implied_dH_differing_steps": int(k_diff.sum()),
            "logit_noise_sd": e_pool, "logit_noise_steps": int(noisy.sum()),
            "logz_shift_tol_mean": float(tol_open.mean()) if tol_open.numel() else 0.0,
            "logz_shift_tol_max": float(tol_open.max()) if tol_open.numel() else 0.0}


def merge(shards: list[dict]) -> dict:
    """The support fields of several calls' agreements (a decoding's shards): counts summed, shares and
    means weighted by the steps they cover, the logit noise pooled (RMS), the largest tolerance. Shards
    recorded before this check carry none of the fields and are left out (``support_steps`` says how
    many steps the figures cover); {} when none carries them."""
    have = [a for a in shards if "support_steps" in a]
    if not have:
        return {}
    counts = ("support_steps", "support_closed", "support_open", "support_differs", "support_larger_in_vllm",
              "support_smaller_in_vllm", "support_beyond_top_l", "implied_dH_steps", "implied_dH_differing_steps",
              "logit_noise_steps")
    total = {k: sum(a[k] for a in have) for k in counts}

    def mean(key: str, weight: str, f=lambda x: x) -> float:
        return sum(f(a[key]) * a[weight] for a in have) / max(1, total[weight])

    return {"support_top_l": max(a["support_top_l"] for a in have), **total,
            "support_differs_share": total["support_differs"] / max(1, total["support_steps"]),
            "beyond_logz_shift_mean": mean("beyond_logz_shift_mean", "support_beyond_top_l"),
            "implied_abs_dH_mean": mean("implied_abs_dH_mean", "implied_dH_steps"),
            "implied_abs_dH_differing_mean": mean("implied_abs_dH_differing_mean", "implied_dH_differing_steps"),
            "logit_noise_sd": math.sqrt(mean("logit_noise_sd", "logit_noise_steps", lambda x: x * x)),
            "logz_shift_tol_mean": mean("logz_shift_tol_mean", "support_open"),
            "logz_shift_tol_max": max(a["logz_shift_tol_max"] for a in have)}
