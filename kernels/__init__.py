"""The math of one logits row, fast.

Public API (docs/DESIGN.md):

    token_stats(logits[N, V], targets[N] | None, *, temperature, top_k, top_p, min_p, top_nsigma,
                typical_p, eta_cutoff, epsilon_cutoff, impl="auto")
        -> TokenStats(entropy[N], logsumexp[N], target_logprob[N])
    fused_token_stats(hidden[N, D], weight[V, D], targets[N] | None, *, temperature, impl="auto")
    gumbel_argmax(z[N, V], seed_words[N, 2], step, impl="auto") -> [N] tokens   (kernels.sampling)

All outputs are float32, in nats. The decodings apply in transformers' order: temperature, top-k,
top-p, min-p, typical, ε (epsilon_cutoff), η (eta_cutoff), then top-nσ (kernels.reference,
docs/KERNELS.md "Decodings"); which tokens are kept is decided in float64. ``impl="auto"`` runs
Triton on CUDA and the PyTorch reference elsewhere; ``impl="triton"`` also runs on CPU under
``TRITON_INTERPRET=1``.

The decoding knobs' ranges are one table, `DECODING_RANGES` (kernels.decoding), which
tasks.config builds its pydantic fields from. Importing this package loads no torch (the config
is checked before torch loads): torch and the implementations are imported on first use.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from entcal.kernels.decoding import DECODING_DESCRIPTIONS, DECODING_RANGES, check_decoding, range_error

if TYPE_CHECKING:
    import torch

    from entcal.kernels.reference import TokenStats


IMPLS = ("auto", "triton", "reference")


def __getattr__(name: str):
    """`kernels.TokenStats`, `kernels.gumbel_argmax`, `kernels.seed_words`, imported (with torch) on first use."""
    if name == "TokenStats":
        from entcal.kernels.reference import TokenStats

        return TokenStats
    if name in ("gumbel_argmax", "seed_words"):
        from entcal.kernels import sampling

        return getattr(sampling, name)
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")


def _resolve(impl: str, device: torch.device) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "reference"
    return impl


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton is a dependency, but keep CPU-only installs working
        return False
    try:
        from entcal.kernels import stats  # noqa: F401
    except ImportError:
        return False
    return True


def _check(logits: torch.Tensor, targets, **knobs) -> None:
    """ValueError unless logits is [N, V], targets [N] or None, and each knob in DECODING_RANGES."""
    if logits.dim() != 2:
        raise ValueError(f"logits: expected a 2-D tensor [N, V], got shape {tuple(logits.shape)}")
    if targets is not None and targets.shape != logits.shape[:1]:
        raise ValueError(f"targets: expected shape [{logits.shape[0]}], got {tuple(targets.shape)}")
    check_decoding(**knobs)


def token_stats(
    logits: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    top_nsigma: float = 0.0,
    typical_p: float = 1.0,
    eta_cutoff: float = 0.0,
    epsilon_cutoff: float = 0.0,
    impl: str = "auto",
) -> TokenStats:
    """Entropy, logsumexp and target log-prob of q = truncate(softmax(logits / temperature))."""
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p,
              epsilon_cutoff=epsilon_cutoff, eta_cutoff=eta_cutoff, top_nsigma=top_nsigma)
    _check(logits, targets, **kw)
    if _resolve(impl, logits.device) == "triton":
        truncated = (top_k > 0 or top_p < 1.0 or min_p > 0.0 or typical_p < 1.0
                     or epsilon_cutoff > 0.0 or eta_cutoff > 0.0 or top_nsigma > 0.0)
        if truncated:
            from entcal.kernels.truncation import truncated_token_stats

            return truncated_token_stats(logits, targets, **kw)
        from entcal.kernels.stats import token_stats as triton_token_stats

        return triton_token_stats(logits, targets, temperature=temperature)
    from entcal.kernels import reference

    return reference.token_stats(logits, targets, **kw)


def fused_token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    impl: str = "auto",
) -> TokenStats:
    """token_stats(hidden @ weight.T, targets) without materialising the [N, V] logits."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden[N, D] and weight[V, D]: expected matching D, got {tuple(hidden.shape)} "
            f"and {tuple(weight.shape)}"
        )
    check_decoding(temperature=temperature)
    if _resolve(impl, hidden.device) == "triton":
        from entcal.kernels.fused_head import fused_token_stats as triton_fused

        return triton_fused(hidden, weight, targets, temperature=temperature)
    from entcal.kernels import reference

    return reference.fused_token_stats(hidden, weight, targets, temperature=temperature)


__all__ = ["TokenStats", "token_stats", "fused_token_stats", "gumbel_argmax", "seed_words", "IMPLS", "DECODING_RANGES",
           "DECODING_DESCRIPTIONS", "check_decoding", "range_error"]
