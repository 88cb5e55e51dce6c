"""Pure-PyTorch reference for the statistics of one logits row.

This is the ground truth every Triton kernel is tested against, and the CPU path.
Semantics (docs/DESIGN.md "Kernel API", docs/KERNELS.md "Decodings"): z = logits / temperature,
then, each step on the renormalised survivors of the step before (transformers' warper order,
`_get_logits_processor`): top-k, top-p, min-p, typical, ε (epsilon_cutoff), η (eta_cutoff); then
top-nσ last. Each step keeps at least one token.

Which tokens are kept is decided in float64 (probabilities, entropies and prefix masses from the
float32 z): the kept set is the float64 rule's unless a decision's margin is below 1e-10 of the
mass (MASS_TOL). The statistics themselves are float32 (or float64 with ``dtype=torch.float64``),
in nats.
"""
from __future__ import annotations

import math

from typing import NamedTuple

import torch

F64 = torch.float64
INF = math.inf
# A prefix mass within MASS_TOL below p counts as reaching p (top-p, typical). Float64 sums of the
# same masses in another order (Triton's buffer, another device's scan) differ by < 1e-13, so with
# it a mass that is exactly p (800 of 1000 equal tokens at p = 0.8) is decided as in exact
# arithmetic on every implementation, instead of by the last bit of each one's rounding.
MASS_TOL = 1e-10


class TokenStats(NamedTuple):
    """Per-row statistics of the sampling distribution q; every field is [N] float32, nats."""

    entropy: torch.Tensor  # H(q) of the (truncated) sampling distribution
    logsumexp: torch.Tensor  # log Σ_kept exp(logit/τ)
    target_logprob: torch.Tensor  # log q(target); -inf if truncated away, NaN without targets


def _and(keep: torch.Tensor | None, kp: torch.Tensor) -> torch.Tensor:
    return kp if keep is None else keep & kp


def masked64(z: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """z as float64 (exact: z is float32 or float64) with the tokens outside ``keep`` at -inf."""
    z = z.to(F64)
    return z if keep is None else z.masked_fill(~keep, -INF)


def top_p_keep(zc: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus on logits zc [N, V] (-inf = already dropped): the smallest prefix of a stable
    descending sort (lower index first among ties) whose mass reaches top_p; the first always.
    The order is zc's own (float32 keys sort faster, in the same order); the masses are float64."""
    order = torch.sort(zc, dim=-1, descending=True, stable=True).indices
    probs = torch.softmax(zc.to(F64), dim=-1).gather(-1, order)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    keep_sorted = mass_before < top_p - MASS_TOL
    keep_sorted[:, 0] = True
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def typical_rule(logq: torch.Tensor, ent: torch.Tensor, mass: float):
    """(keep [N, C], reached [N]) of typical sampling (transformers' TypicalLogitsWarper).

    logq [N, C] float64 log-probabilities (-inf = dropped), ent [N, 1] their distribution's entropy.
    Sort by the shifted score |−log q − H| (ascending), take the first position where the
    cumulative mass reaches ``mass`` (the last one if none does) and keep every token whose score
    is <= that position's: ties of the score are all kept, so the kept set does not depend on the
    order among ties; the most typical token is always kept. ``reached``: the mass was reached
    within the C columns (a candidate buffer that holds only part of the row needs it).
    """
    q = logq.exp()
    shifted = (-logq - ent).abs()
    ss, idx = torch.sort(shifted, dim=-1, stable=True)
    cum = q.gather(-1, idx).cumsum(-1)
    last = (cum < mass - MASS_TOL).sum(-1, keepdim=True).clamp_max(logq.shape[-1] - 1)
    keep = shifted <= ss.gather(-1, last)
    keep.scatter_(-1, idx[:, :1], True)
    return keep, cum[:, -1] >= mass - MASS_TOL


def entropy64(zc: torch.Tensor):
    """(log q [N, V], H [N, 1]) of softmax(zc), float64; -inf entries have q = 0 and add nothing."""
    logq = torch.log_softmax(zc, dim=-1)
    ent = -(logq * logq.exp()).nansum(-1, keepdim=True)
    return logq, ent


def typical_keep(zc: torch.Tensor, mass: float) -> torch.Tensor:
    """Typical sampling on float64 logits zc [N, V] (-inf = dropped); see typical_rule."""
    logq, ent = entropy64(zc)
    return typical_rule(logq, ent, mass)[0]


def epsilon_keep(zc: torch.Tensor, epsilon: float) -> torch.Tensor:
    """ε-sampling (EpsilonLogitsWarper) on float64 zc: q >= ε, or z equal to the row's max."""
    q = torch.softmax(zc, dim=-1)
    return (q >= epsilon) | (zc >= zc.max(dim=-1, keepdim=True).values)


def eta_keep(zc: torch.Tensor, eta: float) -> torch.Tensor:
    """η-sampling (EtaLogitsWarper) on float64 zc: q >= min(η, √η·e^−H(q)), or z at the max."""
    logq, ent = entropy64(zc)
    thr = torch.clamp(math.sqrt(eta) * torch.exp(-ent), max=eta)
    return (logq.exp() >= thr) | (zc >= zc.max(dim=-1, keepdim=True).values)


def truncation_mask(
    z: torch.Tensor,
    *,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    typical_p: float = 1.0,
    epsilon_cutoff: float = 0.0,
    eta_cutoff: float = 0.0,
    top_nsigma: float = 0.0,
) -> torch.Tensor | None:
    """Boolean mask[N, V] of the tokens a decoding keeps, or None when nothing is truncated.

    ``z`` are temperature-scaled logits [N, V] (float32/float64). Steps, in this order, each on the
    survivors of the one before, renormalised (ties follow transformers):
      top-k     keeps every token >= the k-th largest z (ties at the k-th all kept);
      top-p     the smallest prefix of a stable descending sort whose mass reaches p (top_p_keep);
      min-p     z >= max + log(min_p) (float32, as before; the max survives top-k and top-p);
      typical   the tokens nearest the entropy in −log q until their mass reaches typical_p;
      ε         q >= ε, and every token equal to the max of the survivors (epsilon_keep);
      η         q >= min(η, √η·e^−H), H the survivors' entropy, and the max (eta_keep);
      top-nσ    z >= M − n·σ, M the max of the survivors (the row max unless typical dropped it),
                σ the standard deviation of the whole row's finite z (as in the top-nσ paper),
                not of the survivors.
    top-p, typical, ε and η decide in float64 (probabilities and cumulative sums of the float32 z).
    A row with no finite entry has NaN entropy.
    """
    n, v = z.shape
    keep = None
    if top_k and top_k < v:
        kth = torch.topk(z, top_k, dim=-1).values[:, -1:]
        keep = z >= kth
    if top_p < 1.0:
        keep = _and(keep, top_p_keep(z if keep is None else z.masked_fill(~keep, -INF), top_p))
    if min_p > 0.0:
        m = z.max(dim=-1, keepdim=True).values  # the max token is kept by every step above
        keep = _and(keep, z >= m + math.log(min_p))
    if typical_p < 1.0:
        keep = _and(keep, typical_keep(masked64(z, keep), typical_p))
    if epsilon_cutoff > 0.0:
        keep = _and(keep, epsilon_keep(masked64(z, keep), epsilon_cutoff))
    if eta_cutoff > 0.0:
        keep = _and(keep, eta_keep(masked64(z, keep), eta_cutoff))
    if top_nsigma > 0.0:
        finite = torch.isfinite(z)
        zf = torch.where(finite, z, torch.zeros_like(z))
        cnt = finite.sum(-1, keepdim=True).clamp_min(1)
        mean = zf.sum(-1, keepdim=True) / cnt
        var = (torch.where(finite, (z - mean) ** 2, torch.zeros_like(z))).sum(-1, keepdim=True) / cnt
        zk = z if keep is None else z.masked_fill(~keep, -INF)
        m = zk.max(dim=-1, keepdim=True).values
        keep = _and(keep, z >= m - top_nsigma * var.sqrt())
    return keep


def scaled_logits(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    typical_p: float = 1.0,
    epsilon_cutoff: float = 0.0,
    eta_cutoff: float = 0.0,
    top_nsigma: float = 0.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Logits of the sampling distribution q: z = logits/τ with truncated tokens set to -inf."""
    z = logits.to(dtype) / temperature
    keep = truncation_mask(z, top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p,
                           epsilon_cutoff=epsilon_cutoff, eta_cutoff=eta_cutoff,
                           top_nsigma=top_nsigma)
    return z if keep is None else z.masked_fill(~keep, -math.inf)


def token_stats(
    logits: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    typical_p: float = 1.0,
    epsilon_cutoff: float = 0.0,
    eta_cutoff: float = 0.0,
    top_nsigma: float = 0.0,
    dtype: torch.dtype = torch.float32,
):
    """Entropy[N], logsumexp[N] and target log-prob[N] of q = truncate(softmax(logits/τ)).

    logsumexp is over the kept tokens of z = logits/τ. A target outside the kept set has
    log-prob -inf. Without targets, target_logprob is all NaN.
    """
    z = scaled_logits(
        logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        typical_p=typical_p, epsilon_cutoff=epsilon_cutoff, eta_cutoff=eta_cutoff,
        top_nsigma=top_nsigma, dtype=dtype,
    )
    lse = torch.logsumexp(z, dim=-1)
    logq = z - lse[:, None]
    q = logq.exp()
    entropy = -(q * torch.where(q > 0, logq, torch.zeros_like(logq))).sum(-1)
    if targets is None:
        target_logprob = torch.full_like(lse, math.nan)
    else:
        target_logprob = logq.gather(-1, targets.long()[:, None]).squeeze(-1)
    out = torch.float32 if dtype != torch.float64 else torch.float64
    return TokenStats(entropy.to(out), lse.to(out), target_logprob.to(out))


def fused_token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    chunk_rows: int = 1024,
    dtype: torch.dtype = torch.float32,
):
    """token_stats(hidden @ weight.T, ...) computed a block of rows at a time.

    Peak extra memory is chunk_rows × V floats (plus a float32 copy of a low-precision weight), not N × V.
    """
    parts = []
    w = weight.to(dtype)  # cast once, not per chunk
    for i in range(0, hidden.shape[0], chunk_rows):
        h = hidden[i : i + chunk_rows].to(dtype)
        logits = h @ w.T
        t = None if targets is None else targets[i : i + chunk_rows]
        parts.append(token_stats(logits, t, temperature=temperature, dtype=dtype))
    if not parts:
        empty = torch.empty(0, dtype=torch.float32, device=hidden.device)
        return TokenStats(empty, empty, empty)
    return TokenStats(*(torch.cat(x) for x in zip(*parts)))
