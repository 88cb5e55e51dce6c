"""Paired sampling: Gumbel-max with noise keyed by (row seed, step, token).

    token = argmax_w  z_w + G_w,    G_w = −log(−log u_w),    u_w = U(row seed, step, w) ∈ (0, 1)

The Gumbel-max trick: for any logits z [N, V] (−inf entries never win) the argmax is an exact draw from
softmax(z). The noise is a counter-based hash of (row seed, step, token), so it is the same whatever
the distribution: two decodings of one row that differ by a small change of z share almost every draw
(a change of total variation δ flips a draw with probability about δ; inverse-CDF sampling in vocabulary
order flips it with probability up to the CDF's total shift, about 10× more on a 49k vocabulary).
A row's draws depend on its seed alone: not on its batch, its shard or the device's thread count.

U: two 32-bit murmur3 finalisers (``_fmix``), of the token id mixed with two per-(seed, step) keys,
give 52 random bits: u = ((h1 >> 6) · 2^26 + (h2 >> 6) + 0.5) / 2^52, exact in float64, in
[2^−53, 1 − 2^−53]. The noise therefore lies in [−3.61, 36.7] nats: a token more than ~40 nats below
the row's top is never drawn (its mass, ≤ V·e^−40, is below 1e-12 for V = 152k).

``gumbel_argmax(z, seeds, step)``: the reference (numpy, exact uint32 arithmetic; the CPU path) or a
Triton kernel (CUDA; also under TRITON_INTERPRET=1) that hashes, adds and reduces in one pass over
the row, in float64.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

M1, M2 = 0x85EBCA6B, 0xC2B2AE35  # murmur3's fmix32 multipliers
SALT = (0x9E3779B9, 0x5BD1E995)  # the second hash's token and key salts
SPAN = 4503599627370496.0  # 2^52: the random bits of u


def _fmix(x: np.ndarray) -> np.ndarray:
    """murmur3's 32-bit finaliser, elementwise on uint32 (a bijection with full avalanche)."""
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(M1)
    x = x ^ (x >> np.uint32(13))
    x = x * np.uint32(M2)
    return x ^ (x >> np.uint32(16))


def seed_words(seeds) -> torch.Tensor:
    """[N, 2] int32: the low and high 32 bits of each 63-bit row seed (bit patterns), the form
    gumbel_argmax takes, so a batch's seeds go to the device once and rows are picked there."""
    s = np.asarray([int(x) for x in seeds], dtype=np.uint64)
    words = np.stack([s & np.uint64(0xFFFFFFFF), s >> np.uint64(32)], axis=1).astype(np.uint32)
    return torch.from_numpy(words.view(np.int32).copy())


def row_keys(words: np.ndarray, step: int) -> np.ndarray:
    """[N, 2] uint32: the two keys of each row's noise at ``step``, from its seed words (seed_words)."""
    lo, hi = words[:, 0].astype(np.uint32), words[:, 1].astype(np.uint32)
    with np.errstate(over="ignore"):
        k = _fmix(_fmix(lo ^ np.uint32(SALT[0])) ^ hi)
        k1 = _fmix(k ^ np.uint32(step & 0xFFFFFFFF))
        k2 = _fmix(k1 ^ np.uint32(SALT[1]))
    return np.stack([k1, k2], axis=1)


@functools.lru_cache(maxsize=4)
def _token_hashes(vocab: int) -> tuple[np.ndarray, np.ndarray]:
    w = np.arange(vocab, dtype=np.uint32)
    with np.errstate(over="ignore"):
        return _fmix(w), _fmix(w ^ np.uint32(SALT[0]))


def gumbel_noise(keys: np.ndarray, vocab: int) -> np.ndarray:
    """[N, V] float64 Gumbel noise of rows with ``keys`` (row_keys), token by token."""
    t1, t2 = _token_hashes(vocab)
    with np.errstate(over="ignore"):
        h1 = _fmix(t1[None] ^ keys[:, :1])
        h2 = _fmix(t2[None] ^ keys[:, 1:])
    u = ((h1 >> np.uint32(6)).astype(np.float64) * 67108864.0 + (h2 >> np.uint32(6)) + 0.5) / SPAN
    return -np.log(-np.log(u))


def _reference(z: torch.Tensor, words: torch.Tensor, step: int) -> torch.Tensor:
    keys = row_keys(words.cpu().numpy().view(np.uint32), step)
    scores = z.detach().to("cpu", torch.float64).numpy() + gumbel_noise(keys, z.shape[1])
    return torch.from_numpy(scores.argmax(1)).to(z.device)


def gumbel_argmax(z: torch.Tensor, words: torch.Tensor, step: int, *, impl: str = "auto") -> torch.Tensor:
    """Draw one token per row of softmax(z) (z [N, V], float32, −inf allowed) with the noise of (row seed,
    ``step``, token): ``words`` [N, 2] int32 are the rows' seed_words, on any device -> [N] int64 on z's
    device. ``impl``: auto (Triton on CUDA, the reference elsewhere) | triton | reference."""
    if z.dim() != 2 or tuple(words.shape) != (z.shape[0], 2):
        raise ValueError(f"gumbel_argmax: expected z [N, V] and seed words [N, 2], got {tuple(z.shape)} and "
                         f"{tuple(words.shape)}")
    if impl == "reference" or (impl == "auto" and z.device.type != "cuda"):
        return _reference(z, words, step)
    from entcal.kernels.sampling_triton import gumbel_argmax_triton

    return gumbel_argmax_triton(z, words.to(z.device, torch.int32), step)
