"""The valid ranges of the decoding knobs: the one table both the kernels and the study config use.

The knobs are listed in the order they apply (transformers' warper order, top-nσ last; see
kernels.reference and docs/KERNELS.md "Decodings").

`kernels.token_stats` checks its arguments with `check_decoding`; `tasks.config.DecodingSpec` turns
each entry into pydantic ``Field`` constraints (so the JSON schema of the Prefect UI form carries
the ranges) and takes its field descriptions from `DECODING_DESCRIPTIONS`. A range is a dict of
pydantic's bound keywords, ``gt`` / ``ge`` / ``lt`` / ``le``, all of which the value must satisfy.
This module imports no torch, so a config is checked before torch loads.
"""
from __future__ import annotations

import operator

DECODING_RANGES: dict[str, dict[str, float]] = {
    "temperature": {"gt": 0, "le": 100},
    "top_k": {"ge": 0},
    "top_p": {"gt": 0, "le": 1},
    "min_p": {"ge": 0, "lt": 1},
    "typical_p": {"gt": 0, "le": 1},
    "epsilon_cutoff": {"ge": 0, "lt": 1},
    "eta_cutoff": {"ge": 0, "lt": 1},
    "top_nsigma": {"ge": 0},
}

DECODING_DESCRIPTIONS: dict[str, str] = {
    "temperature": "τ > 0: logits are divided by it (1 = the model's own distribution; lower = sharper)",
    "top_k": "keep the k most likely tokens (0 = off)",
    "top_p": "nucleus: keep the smallest set whose mass reaches p (1 = off)",
    "min_p": "keep tokens with p ≥ min_p · p_max (0 = off)",
    "typical_p": "typical: keep the tokens whose −log p is nearest the entropy H, until their "
                 "mass reaches typical_p (1 = off)",
    "epsilon_cutoff": "ε-sampling: keep tokens with p ≥ ε, and the most likely one (0 = off)",
    "eta_cutoff": "η-sampling: keep tokens with p ≥ min(η, √η·e^−H), and the most likely one "
                  "(0 = off)",
    "top_nsigma": "keep logits ≥ max − n·σ of the row (0 = off)",
}

# bound keyword -> (symbol in messages, test the value must pass)
BOUNDS = {"gt": (">", operator.gt), "ge": (">=", operator.ge), "lt": ("<", operator.lt),
          "le": ("<=", operator.le)}


def range_error(name: str, value) -> str | None:
    """The message for a knob outside its range, naming the bound it breaks, else None.

    e.g. ``range_error("temperature", -1) == "temperature must be > 0, got -1"`` (NaN breaks every
    bound), the same wording as tasks.config's errors for an out-of-range config value.
    """
    for bound, limit in DECODING_RANGES[name].items():
        symbol, holds = BOUNDS[bound]
        if not holds(value, limit):
            return f"{name} must be {symbol} {limit:g}, got {value!r}"
    return None


def check_decoding(**knobs) -> None:
    """Raise ValueError(range_error's message) for the first knob, by keyword, outside its range."""
    for name, value in knobs.items():
        message = range_error(name, value)
        if message is not None:
            raise ValueError(message)


__all__ = ["DECODING_RANGES", "DECODING_DESCRIPTIONS", "BOUNDS", "range_error", "check_decoding"]
