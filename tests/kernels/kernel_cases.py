"""Shared test data and checks for the Triton kernels (imported by tests/kernels/test_*.py).

The ground truth is float64 on the kept set the float32 reference picks (kernels.reference is the
contract for *which* tokens are kept; float64 only sharpens the sums). A kernel passes when its
error is at most the float32 reference's own error plus a small tolerance (the pattern of
apple/ml-cross-entropy tests/test_cce_lse.py).
"""
from __future__ import annotations

import math

import torch

from entcal.kernels import reference
from entcal.kernels.reference import TokenStats

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ATOL = 2e-6  # on top of the float32 reference's own max error
RTOL = 2e-6
ROW_KINDS = ("randn", "uniform", "one_hot", "all_negative", "offset+300", "offset-300", "neg_inf",
             "ties")
# the parameter grids every kernel test module shares
DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # logits / hidden / weight dtypes
TEMPERATURES = (1.0, 0.7, 1.6)  # identity (no scaling), sharper, flatter


def make_logits(kind: str, n: int, v: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """[n, v] logits of one of ROW_KINDS (or "near_uniform"), on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    if kind == "uniform":
        x = torch.full((n, v), 1.25, dtype=torch.float64)
    elif kind == "one_hot":
        x = x / 30
        x[torch.arange(n), torch.randint(0, v, (n,), generator=g)] = 20.0
    elif kind == "all_negative":
        x = x - 60
    elif kind == "offset+300":
        x = x / 1.5 + 300
    elif kind == "offset-300":
        x = x / 1.5 - 300
    elif kind == "neg_inf":  # -inf except a few tokens; one row has a single finite token
        drop = torch.rand(n, v, generator=g) < 0.9
        drop[:, 0] = False
        drop[0, :] = True
        drop[0, v // 2] = False
        x = x.masked_fill(drop, -math.inf)
    elif kind == "ties":  # few distinct values: ties at every top-k / top-p / min-p boundary
        x = torch.randint(0, 5, (n, v), generator=g).double()
    elif kind == "near_uniform":  # H within ~1e-6 of ln V: typical's centre sits on every token
        x = 1.25 + x * 1e-4
    elif kind != "randn":
        raise ValueError(kind)
    return x.to(dtype).to(DEVICE)


def make_targets(logits: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """[n] targets: the row max for row 0 (never truncated), random elsewhere."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, logits.shape[1], (logits.shape[0],), generator=g).to(logits.device)
    t[0] = logits[0].float().argmax()
    return t


def truth(logits, targets, *, temperature=1.0, keep=None, **rules) -> TokenStats:
    """float64 TokenStats on the kept set of the float32 reference (or on ``keep`` [N, V])."""
    z32 = reference.scaled_logits(logits, temperature=temperature)
    if keep is None:
        keep = reference.truncation_mask(z32, **rules)
    z = logits.double() / temperature
    if keep is not None:
        z = z.masked_fill(~keep, -math.inf)
    lse = torch.logsumexp(z, -1)
    logq = z - lse[:, None]
    q = logq.exp()
    ent = -(q * torch.where(q > 0, logq, torch.zeros_like(logq))).sum(-1)
    if targets is None:
        lp = torch.full_like(lse, math.nan)
    else:
        lp = logq.gather(-1, targets.long()[:, None])[:, 0]
    return TokenStats(ent, lse, lp)


def assert_stats_close(got: TokenStats, logits, targets, *, atol=ATOL, rtol=RTOL,
                       ref: TokenStats | None = None, **kw) -> None:
    """got (float32) vs float64 truth: error <= float32 reference's error + atol (+ rtol*|x|).

    `ref` replaces reference.token_stats(logits, ...) as the float32 baseline (the fused tests
    pass the float32 reference.fused_token_stats, logits being the float64 product).
    Non-finite values (-inf log-probs of truncated targets, NaN without targets) must match.
    """
    exp = truth(logits, targets, **kw)
    kw.pop("keep", None)
    if ref is None:
        ref = reference.token_stats(logits, targets, **kw)
    for name, g, r, e in zip(TokenStats._fields, got, ref, exp):
        assert g.dtype == torch.float32, name
        assert g.shape == e.shape, name
        fin = torch.isfinite(e)
        ref_err = (r.double() - e)[fin].abs().max().item() if bool(fin.any()) else 0.0
        torch.testing.assert_close(g.double(), e, atol=ref_err + atol, rtol=rtol, equal_nan=True,
                                   msg=lambda m, name=name: f"{name} ({kw}): {m}")


def transformers_keep(z: torch.Tensor, *, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0,
                      epsilon_cutoff=0.0, eta_cutoff=0.0) -> torch.Tensor:
    """[N, V] bool: what transformers' own warpers keep of the temperature-scaled z, applied in
    the order of its `_get_logits_processor` (top-k, top-p, min-p, typical, ε, η), with
    min_tokens_to_keep=1, in float64 (z as float64: the rule the kernels decide by)."""
    from transformers.generation.logits_process import (EpsilonLogitsWarper, EtaLogitsWarper,
                                                        MinPLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper, TypicalLogitsWarper)

    warpers = []
    if top_k:
        warpers.append(TopKLogitsWarper(top_k, min_tokens_to_keep=1))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p, min_tokens_to_keep=1))
    if min_p > 0.0:
        warpers.append(MinPLogitsWarper(min_p, min_tokens_to_keep=1))
    if typical_p < 1.0:
        warpers.append(TypicalLogitsWarper(typical_p, min_tokens_to_keep=1))
    if epsilon_cutoff > 0.0:
        warpers.append(EpsilonLogitsWarper(epsilon_cutoff, min_tokens_to_keep=1))
    if eta_cutoff > 0.0:
        warpers.append(EtaLogitsWarper(eta_cutoff, min_tokens_to_keep=1, device=z.device))
    scores = z.double()
    ids = torch.zeros((z.shape[0], 1), dtype=torch.long, device=z.device)
    for w in warpers:
        scores = w(ids, scores)
    return ~torch.isneginf(scores)


def np_top_p_keep(z, p: float):
    """Independent float64 numpy nucleus on one row z [V] (float32): a stable descending order,
    keep a token while the mass strictly before it is < p. Returns (keep [V] bool, mass_before)."""
    import numpy as np

    z = np.asarray(z, dtype=np.float64)
    order = np.argsort(-z, kind="stable")
    e = np.exp(z[order] - z.max())
    q = e / e.sum()
    before = np.concatenate(([0.0], np.cumsum(q)[:-1]))
    keep = np.zeros(z.shape, dtype=bool)
    keep[order] = before < p
    keep[order[0]] = True
    return keep, before[np.argsort(order)]


def np_typical_keep(z, mass: float):
    """Independent float64 numpy typical sampling on one row z [V] (finite, float32): tokens by
    |−log q − H| ascending; keep every token whose score is <= the score where the cumulative
    mass first reaches ``mass``. Returns (keep [V] bool, cum [V] in that order)."""
    import numpy as np

    z = np.asarray(z, dtype=np.float64)
    d = z - z.max()
    logq = d - np.log(np.exp(d).sum())
    q = np.exp(logq)
    shifted = np.abs(-logq - (-(q * logq).sum()))
    order = np.argsort(shifted, kind="stable")
    cum = np.cumsum(q[order])
    last = min(int((cum < mass).sum()), z.size - 1)
    return shifted <= shifted[order[last]], cum


def np_cutoff_keep(z, epsilon: float = 0.0, eta: float = 0.0):
    """Independent float64 numpy ε- (or η-) sampling on one row z [V] (finite, float32)."""
    import numpy as np

    z = np.asarray(z, dtype=np.float64)
    d = z - z.max()
    logq = d - np.log(np.exp(d).sum())
    q = np.exp(logq)
    thr = epsilon if epsilon else min(eta, np.sqrt(eta) * np.exp((q * logq).sum()))
    return (q >= thr) | (z == z.max())


def float32_flip(row, index: int, keeps, lo: float, hi: float):
    """Two float32 rows that differ only at ``index`` by one float32 step (z_a < z_b), between
    which the float64 rule ``keeps(row) -> bool [V]`` changes: the closest a float32 row can be
    to a decision boundary. row [V] float32 numpy; keeps(row) must differ at lo and hi."""
    import numpy as np

    a, b = np.float32(lo), np.float32(hi)
    ra, rb = row.copy(), row.copy()
    ra[index], rb[index] = a, b
    ka, kb = keeps(ra), keeps(rb)
    assert (ka != kb).any(), "the rule does not change between lo and hi"
    while np.nextafter(a, b) != b:
        mid = np.float32((np.float64(a) + np.float64(b)) / 2)
        if mid in (a, b):
            mid = np.nextafter(a, b)
        r = row.copy()
        r[index] = mid
        if (keeps(r) == ka).all():
            a, ra = mid, r
        else:
            b, rb = mid, r
            kb = keeps(r)
    return ra, rb
