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
    """[n, v] logits of one of ROW_KINDS, on DEVICE."""
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
    elif kind != "randn":
        raise ValueError(kind)
    return x.to(dtype).to(DEVICE)


def make_targets(logits: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """[n] targets: the row max for row 0 (never truncated), random elsewhere."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, logits.shape[1], (logits.shape[0],), generator=g).to(logits.device)
    t[0] = logits[0].float().argmax()
    return t


def truth(logits, targets, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
          top_nsigma=0.0) -> TokenStats:
    """float64 TokenStats on the kept set of the float32 reference."""
    z32 = reference.scaled_logits(logits, temperature=temperature)
    keep = reference.truncation_mask(z32, top_k=top_k, top_p=top_p, min_p=min_p,
                                     top_nsigma=top_nsigma)
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
    if ref is None:
        ref = reference.token_stats(logits, targets, **kw)
    for name, g, r, e in zip(TokenStats._fields, got, ref, exp):
        assert g.dtype == torch.float32, name
        assert g.shape == e.shape, name
        fin = torch.isfinite(e)
        ref_err = (r.double() - e)[fin].abs().max().item() if bool(fin.any()) else 0.0
        torch.testing.assert_close(g.double(), e, atol=ref_err + atol, rtol=rtol, equal_nan=True,
                                   msg=lambda m, name=name: f"{name} ({kw}): {m}")
