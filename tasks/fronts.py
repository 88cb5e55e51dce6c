"""Temperature root τ* (EntCE(τ*) = 0) and truncation trade-offs (docs/SCIENCE.md §4): the zero-EntCE point
of each truncation sweep and the (|EntCE|, L̄) Pareto front (its plot: tasks.figures.plot_pareto). Pure
Python: no torch, no matplotlib."""
from __future__ import annotations

import math
from typing import Callable


# ---------------------------------------------------------------- temperature: τ* with EntCE(τ*) = 0
def tau_star(entce_at: Callable[[float], tuple[float, float, float]], lo: float = 0.5, hi: float = 1.5, *,
             tol: float = 0.01, max_rounds: int = 8, floor: float | None = 0.0) -> dict:
    """Root of EntCE(τ) in [lo, hi] by modified regula falsi: the Illinois family with Anderson–Björck
    scaling (the end retained twice in a row has its value scaled by 1 − f(x)/f(replaced), or halved as
    in Illinois when that is ≤ 0). Each new point is kept ≥ tol/2 inside the bracket, so the bracket
    closes to ≤ tol instead of creeping from one side; bisection when the estimate leaves the bracket
    or three steps failed to halve it. A bracket without a sign change is widened once, by half its
    width, toward the end with the smaller |EntCE| (lo is kept > ``floor``: 0 for a temperature; None for a
    knob of any sign, e.g. an entropy target's offset); still none: ValueError. Any scalar knob whose EntCE
    is monotone in it works the same way (a calibration's α, a schedule's scale).
    τ* is the linear root between the final bracket ends (error ≤ tol once converged; ``converged`` is
    False when max_rounds, widening included, ran out first). CI: sort the evaluated τ; the roots of the
    ci_low(τ) and ci_high(τ) curves by linear interpolation between adjacent evaluated points (the
    crossing nearest τ* when several); tau_star_ci = [the root ≤ τ*, the root > τ*] (for EntCE rising
    in τ: [root of ci_high, root of ci_low]); None on a side with no crossing among the evaluated τ."""
    if not lo < hi or (floor is not None and lo <= floor):
        raise ValueError(f"tau_star: need {'' if floor is None else f'{floor:g} < '}lo < hi, got lo={lo}, hi={hi}")
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
            x = lo - w / 2 if floor is None else max(lo - w / 2, (lo + floor) / 2)
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
def finite(*vals) -> bool:
    """True when every value is a finite number (not None, ±inf or NaN)."""
    return all(v is not None and math.isfinite(float(v)) for v in vals)


def truncation_front(rows: list[dict]) -> dict:
    """Per method (rows sorted by param): the param zeroing EntCE by linear interpolation between the two
    sweep points that straddle 0 (the crossing with the lowest interpolated log loss if several; None if
    none), with logloss / logloss_untruncated / truncated_share interpolated at the same weight. Front:
    rows not dominated in (|EntCE|, logloss), both minimised, sorted by |EntCE|."""
    methods: dict[str, dict] = {}
    for m in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r for r in rows if r["method"] == m and finite(r["entce"], r["param"])),
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
            lerp = {k: (p[k] + w * (q[k] - p[k]) if finite(p.get(k), q.get(k)) else None)
                    for k in ("param", "logloss", "logloss_untruncated", "truncated_share")}
            cands.append(lerp)
        best = min(cands, key=lambda c: c["logloss"] if c["logloss"] is not None else math.inf, default=None)
        methods[m] = {"zero_param": best and best["param"], "zero_logloss": best and best["logloss"],
                      "zero_logloss_untruncated": best and best["logloss_untruncated"],
                      "zero_truncated_share": best and best["truncated_share"],
                      "crossings": len(cands), "points": len(pts)}
    valid = [r for r in rows if finite(r["entce"], r["logloss"])]
    front = [r for r in valid if not any(
        abs(o["entce"]) <= abs(r["entce"]) and o["logloss"] <= r["logloss"]
        and (abs(o["entce"]) < abs(r["entce"]) or o["logloss"] < r["logloss"]) for o in valid)]
    return {"methods": methods, "front": sorted(front, key=lambda r: (abs(r["entce"]), r["logloss"]))}
