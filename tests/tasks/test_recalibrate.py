import json
import math

import numpy as np
import polars as pl
import pytest
import torch

from entcal.tasks.atoms import (
    TAIL_BIN_NATS, HumanAtoms, _candidate_pass, atoms_from_parts, entropy_phi, fit_alpha, human_atoms,
    position_atoms, reweighted_generate, reweighted_logits, tail_entries,
)
from entcal.tasks.config import DecodingSpec
from entcal.tasks.contracts import REFERENCE_SCHEMA, RecalibrationKnobs, ScoringKnobs
from entcal.tasks.figures import plot_pareto
from entcal.tasks.fronts import tau_star, truncation_front
from entcal.tasks.generate import generate
from entcal.tasks.future import SCALARS, FutureEstimator
from entcal.tasks import recalibrate
from entcal.tasks.recalibrate import LOOKAHEAD_BOUNDS, BeforeTables
from entcal.tasks.score import score
from tests.tasks.helpers import gen as generate_base
from tests.tasks.helpers import docs_prompts, generation_knobs, scored, summary_knobs, with_model

N_NEW = 12
pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- τ*
def _curve(f, half_width=0.1):
    calls = []

    def at(t):
        calls.append(t)
        e = f(t)
        return e, e - half_width, e + half_width
    return at, calls


def test_tau_star_linear_root_and_ci():
    at, calls = _curve(lambda t: 2 * (t - 0.93))
    r = tau_star(at, 0.5, 1.5, tol=0.01)
    assert abs(r["tau_star"] - 0.93) <= 0.01 and r["converged"]
    lo, hi = r["tau_star_ci"]
    assert lo < r["tau_star"] < hi
    # ci curves are entce ± 0.1 → roots at 0.93 ∓ 0.05, recovered exactly by linear interpolation
    assert lo == pytest.approx(0.88, abs=1e-9) and hi == pytest.approx(0.98, abs=1e-9)
    assert [x["temperature"] for x in r["rounds"]] == calls and len(calls) <= 8
    assert set(r["rounds"][0]) == {"temperature", "entce", "ci_low", "ci_high"}


@pytest.mark.parametrize("f, root, rounds", [
    (lambda t: math.log(t / 1.12), 1.12, 8),
    (lambda t: math.tanh(3 * (t - 1.02)), 1.02, 8),
    (lambda t: math.exp(4 * (t - 0.5)) - math.exp(4 * (0.77 - 0.5)), 0.77, 8),  # 1:27 slope ratio
    (lambda t: 5 * (t - 0.8) ** 3 + 0.02 * (t - 0.8), 0.8, 20),  # flat at the root: the safeguards carry it
])
def test_tau_star_nonlinear(f, root, rounds):
    at, calls = _curve(f, 0.05)
    r = tau_star(at, 0.5, 1.5, tol=0.01, max_rounds=rounds)
    assert r["converged"] and abs(r["tau_star"] - root) <= 0.01, r
    assert r["bracket"][0] <= root <= r["bracket"][1] and len(calls) <= rounds
    lo, hi = r["tau_star_ci"]
    assert lo is not None and hi is not None and lo <= root <= hi


def test_tau_star_smooth_curves_within_default_rounds():
    rng = np.random.default_rng(0)
    for _ in range(60):
        root, c = rng.uniform(0.55, 1.45), rng.uniform(0.5, 4)
        for f in (lambda t: c * math.log(t / root), lambda t: math.tanh(c * (t - root)),
                  lambda t: math.exp(c * (t - 0.5)) - math.exp(c * (root - 0.5))):
            r = tau_star(_curve(f)[0], 0.5, 1.5, tol=0.01)
            assert r["converged"] and abs(r["tau_star"] - root) <= 0.01 and len(r["rounds"]) <= 8


def test_tau_star_out_of_rounds_says_so():
    at, _ = _curve(lambda t: 5 * (t - 0.8) ** 3 + 0.02 * (t - 0.8))
    r = tau_star(at, 0.5, 1.5, tol=0.01, max_rounds=5)
    assert not r["converged"] and len(r["rounds"]) == 5 and r["bracket"][0] <= 0.8 <= r["bracket"][1]


def test_tau_star_widens_once_then_gives_up():
    at, _ = _curve(lambda t: t - 1.8)  # root above the bracket, inside the widened one [0.5, 2.0]
    r = tau_star(at, 0.5, 1.5, tol=0.01)
    assert abs(r["tau_star"] - 1.8) <= 0.01 and len(r["rounds"]) >= 3
    at, calls = _curve(lambda t: t + 5)
    with pytest.raises(ValueError, match="does not change sign"):
        tau_star(at, 0.5, 1.5)
    assert len(calls) == 3  # both ends, one widening
    with pytest.raises(ValueError, match="lo < hi"):
        tau_star(at, 1.5, 0.5)


# ---------------------------------------------------------------- truncation
def _row(method, param, entce, logloss, lu=None, share=0.0):
    return {"method": method, "param": param, "entce": entce, "logloss": logloss,
            "logloss_untruncated": lu if lu is not None else logloss, "truncated_share": share}


def test_truncation_zero_by_interpolation_and_front(tmp_path):
    rows = [
        _row("top_p", 1.0, 0.30, 3.0), _row("top_p", 0.9, -0.10, 3.4, 3.2, 0.1),
        _row("top_p", 0.95, 0.10, 3.2, 3.1, 0.05),
        _row("top_p", 0.8, -0.30, 3.8, 3.5, 0.2),
        _row("temperature", 1.0, 0.30, 3.0), _row("temperature", 0.8, -0.20, 3.3), _row("temperature", 0.9, 0.05, 3.1),
        _row("top_k", 50, 0.20, 3.05), _row("top_k", 20, 0.15, 3.5),  # never crosses zero
    ]
    out = truncation_front(rows)
    tp = out["methods"]["top_p"]
    assert tp["zero_param"] == pytest.approx(0.925) and tp["zero_logloss"] == pytest.approx(3.3)
    assert tp["zero_logloss_untruncated"] == pytest.approx(3.15) and tp["zero_truncated_share"] == pytest.approx(0.075)
    t = out["methods"]["temperature"]
    assert t["zero_param"] == pytest.approx(0.9 - 0.1 * 0.05 / 0.25)
    assert t["zero_logloss"] == pytest.approx(3.1 + 0.2 * 0.2)
    assert out["methods"]["top_k"]["zero_param"] is None and out["methods"]["top_k"]["crossings"] == 0
    # front by hand: (|e|, L) = t0.9 (0.05, 3.1), top_p0.95 (0.10, 3.2) is dominated by t0.9,
    # t1/top_p1 (0.30, 3.0), top_k50 (0.20, 3.05)
    front = {(r["method"], r["param"]) for r in out["front"]}
    assert front == {("temperature", 0.9), ("top_k", 50), ("temperature", 1.0), ("top_p", 1.0)}
    assert [abs(r["entce"]) for r in out["front"]] == sorted(abs(r["entce"]) for r in out["front"])
    png = plot_pareto(rows, out["front"], tmp_path / "pareto.png")
    assert png == str(tmp_path / "pareto.png")
    data = (tmp_path / "pareto.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


# ---------------------------------------------------------------- model-based methods
@pytest.fixture(scope="module")
def prompts(tiny_lm):
    df = docs_prompts(tiny_lm.tokenizer, num_examples=8, prompt_tokens=10, tokens=N_NEW)
    return df.with_columns(pl.col("prompt_ids").list.head(pl.lit(pl.Series([10, 7, 10, 5, 10, 8, 9, 10]))))


def _naive_entropy(model, seq, temperature=1.0):
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([seq])).logits[0, -1].float()
    return float(torch.distributions.Categorical(logits=logits / temperature).entropy())


def lookahead_entropies(model, input_ids, mask, *, top_k: int, temperature: float) -> dict:
    """The next position's top-k candidates of each left-padded row, their log-probs, and
    H(next | row, w) from ONE batched candidate pass over copies of the prefix KV cache."""
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.inference_mode():
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        clp, cand = torch.log_softmax(out.logits[:, -1].float() / temperature, -1).topk(top_k, dim=-1)
        rows = torch.arange(len(input_ids)).repeat_interleave(top_k)
        h = _candidate_pass(model, out.past_key_values, mask, rows, (pos[:, -1] + 1)[rows], cand.reshape(-1),
                            entropy_phi(temperature), remaining=torch.zeros_like(rows))
    return {"candidates": cand, "logprobs": clp, "entropy": h.view(-1, top_k)}


def test_batched_candidate_entropies_equal_naive_loop(sharp_model):
    model, seqs = sharp_model, [[5, 17, 40, 99, 12, 7], [33, 8, 2], [60, 61, 62, 63]]
    from entcal.tasks.generate import left_pad

    ids, mask = left_pad(seqs, 0, "cpu")
    out = lookahead_entropies(model, ids, mask, top_k=6, temperature=0.8)
    for i, s in enumerate(seqs):
        naive = [_naive_entropy(model, s + [int(w)], 0.8) for w in out["candidates"][i]]
        torch.testing.assert_close(out["entropy"][i], torch.tensor(naive), atol=1e-4, rtol=0)
        logits = model(input_ids=torch.tensor([s])).logits[0, -1].float().detach()
        top = torch.log_softmax(logits / 0.8, -1).topk(6)
        torch.testing.assert_close(out["logprobs"][i], top.values, atol=1e-5, rtol=0)


def _explicit_log_qtilde(logp, cand, phi, alpha, gamma, eos=()):
    """q̃ over the whole vocabulary, written out token by token from docs/SCIENCE.md §4: every token gets
    (1+γα)·log p̂ − α·φ; φ = the candidate's feature, 0 for EOS, else φ̄ (p̂-weighted over non-EOS
    candidates)."""
    logp = logp.double()
    phi = torch.as_tensor(phi, dtype=torch.float64).clone()
    is_eos = torch.tensor([int(c) in eos for c in cand], dtype=torch.bool)
    phi[is_eos] = 0.0
    p_c = logp[cand].exp().masked_fill(is_eos, 0.0)
    phi_tok = torch.full_like(logp, float((p_c * phi).sum() / p_c.sum()) if p_c.sum() > 0 else 0.0)
    phi_tok[cand] = phi
    phi_tok[list(eos)] = 0.0
    return torch.log_softmax(logp + alpha * (gamma * logp - phi_tok), 0)


def _check_against_explicit(atoms, m, logp, phi, alpha, gamma, y, eos=()):
    lq = _explicit_log_qtilde(logp, torch.as_tensor(atoms.candidates[m]), phi, alpha, gamma, eos)
    loss, ent = atoms.loss_entropy(alpha)
    assert loss[m] == pytest.approx(float(-lq[y]), abs=1e-4)
    assert ent[m] == pytest.approx(float(-(lq.exp() * lq).sum()), abs=1e-4)


def test_teacher_forced_candidates_equal_naive_and_alpha0_is_base(tiny_lm, sharp_model, prompts):
    model, dec = sharp_model, DecodingSpec(temperature=0.9)
    lm = with_model(tiny_lm, model)
    atoms = _features(lm, prompts.head(3), dec, top_k=5, max_tokens=N_NEW, batch_size=2, chunk=7)
    ctx, ref = prompts["prompt_ids"].to_list(), prompts["reference_ids"].to_list()
    # mid-sequence prefixes: the padding mask must hide the cache beyond each candidate's context
    for m in (0, 7, N_NEW + 4, 3 * N_NEW - 1):
        ex, step = m // N_NEW, int(atoms.steps[m])
        prefix = ctx[ex] + ref[ex][:step]
        naive = [_naive_entropy(model, prefix + [int(w)], 0.9) for w in atoms.candidates[m]]
        np.testing.assert_allclose(-atoms.u[m, :5], naive, atol=1e-4)
        # α ≠ 0: loss and entropy of q̃ equal q̃ written out over the whole vocabulary
        with torch.inference_mode():
            logp = torch.log_softmax(model(input_ids=torch.tensor([prefix])).logits[0, -1].float() / 0.9, -1)
        _check_against_explicit(atoms, m, logp, naive, 1.3, 0.0, ref[ex][step])
    # α = 0: q̃ is the base distribution: log loss and entropy of the teacher-forced scorer
    base = scored(lm, prompts.head(3), [dec], max_tokens=N_NEW, epsilon=1e-4)
    loss, ent = atoms.loss_entropy(0.0)
    np.testing.assert_allclose(loss, np.concatenate(base["step_logloss"].to_list()), atol=1e-4)
    np.testing.assert_allclose(ent, np.concatenate(base["step_entropy"].to_list()), atol=1e-4)
    # α ≠ 0 is a proper distribution that differs
    loss2, _ = atoms.loss_entropy(1.5)
    assert np.all(np.isfinite(loss2)) and not np.allclose(loss2, loss)


def _same_samples(a, b):
    assert a["token_ids"].to_list() == b["token_ids"].to_list()
    for x, y in zip(a["step_entropy"].to_list(), b["step_entropy"].to_list()):
        torch.testing.assert_close(torch.tensor(x), torch.tensor(y), atol=1e-5, rtol=0)
    for x, y in zip(a["step_logprob"].to_list(), b["step_logprob"].to_list()):
        torch.testing.assert_close(torch.tensor(x), torch.tensor(y), atol=1e-5, rtol=0)


def test_lookahead_generate_alpha0_reproduces_sampler(tiny_lm, prompts):
    dec, kw = DecodingSpec(temperature=1.1), dict(max_new_tokens=N_NEW, samples_per_prompt=2, seed=5, batch_size=3)
    base = generate_base(tiny_lm, prompts.head(4), dec, **kw)
    la = _generate(tiny_lm, prompts.head(4), dec, alpha=0.0, top_k=6, **kw)
    assert la.schema == base.schema and la.height == base.height
    _same_samples(la, base)
    # EOS compaction (KV cache rows dropped mid-batch) keeps the candidate pass aligned with its rows
    eos = base["token_ids"][0][3]
    stopped = _generate(tiny_lm, prompts.head(4), dec, alpha=0.0, top_k=6, eos_ids=(eos,), **kw)
    assert (stopped["finish_reason"] == "eos").any() and (stopped["finish_reason"] == "length").any()
    _same_samples(stopped, generate_base(tiny_lm, prompts.head(4), dec, eos_ids=(eos,), **kw))
    moved = _generate(tiny_lm, prompts.head(4), dec, alpha=3.0, top_k=6, **kw)
    assert moved["token_ids"].to_list() != base["token_ids"].to_list()


@pytest.fixture(scope="module")
def sharp_model(tiny_lm):
    """The tiny model with peaked attention: its random init attends almost uniformly, so a wrong position
    id or an unmasked cache slot would hide under 1e-4; here they do not."""
    import copy

    model = copy.deepcopy(tiny_lm.model)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(12.0)
            layer.self_attn.k_proj.weight.mul_(12.0)
    return model


def _regressor(hidden: int, *, scale: float, bias: float, slope: float = 0.0, seed: int = 0) -> FutureEstimator:
    """A real f̂ (tasks.future) with fixed weights over the horizon N_NEW: baseline bias + slope·r, residual
    weights scale·N(0, 1) on the raw features (scale = slope = 0: f̂ is the constant ``bias``)."""
    g = torch.Generator().manual_seed(seed)
    m = len(SCALARS) + hidden
    w = (scale * torch.randn(m, generator=g)).double().numpy()
    return FutureEstimator(N_NEW, 1.0, bias + slope * np.arange(N_NEW), np.zeros(m), np.ones(m), w, 0.0)


def _phi_gamma(dec, reg=None):
    """(φ, γ): lookahead's H(next | ·, w) without a regressor, future entropy's f̂ with one."""
    return (entropy_phi(dec.temperature), 0.0) if reg is None else (reg, 1.0)


def _features(lm, prompts, dec=None, reg=None, *, eos_ids=(), batch_size=8, **kw) -> HumanAtoms:
    """The human text's atoms under lookahead (no ``reg``) or future entropy (regressor ``reg``); ``eos_ids``
    (none by default) replace the model's."""
    dec = dec or DecodingSpec()
    return human_atoms(with_model(lm, eos_ids=tuple(eos_ids)), prompts, dec, *_phi_gamma(dec, reg),
                       batch_size=batch_size, **kw)


def _generate(lm, prompts, dec=None, reg=None, *, alpha, buckets=(), top_k, eos_ids=(), chunk=None,
              **knobs) -> pl.DataFrame:
    """Generations sampled from lookahead's (no ``reg``) or future entropy's q̃ at ``alpha``; ``knobs``:
    helpers.generation_knobs'; ``eos_ids`` (none by default) replace the model's."""
    dec = dec or DecodingSpec()
    return reweighted_generate(with_model(lm, eos_ids=tuple(eos_ids)), prompts, dec, *_phi_gamma(dec, reg), alpha,
                               buckets, key=f"{dec.key}-{'look' if reg is None else 'fut'}", top_k=top_k,
                               knobs=generation_knobs(**knobs), chunk=chunk)


def _method(name, lm, reg_scale=0.5):
    """(generate, features) of one method with its regressor bound (f̂ depends on the steps left, too)."""
    reg = None if name == "lookahead" else _regressor(lm.model.config.hidden_size, scale=reg_scale, bias=3.0,
                                                      slope=0.7)
    return (lambda m, p, d, **kw: _generate(m, p, d, reg, **kw), lambda m, p, d, **kw: _features(m, p, d, reg, **kw))


@pytest.mark.parametrize("method", ["lookahead", "future"])
def test_generation_matches_teacher_forced_rescore_with_eos(tiny_lm, sharp_model, prompts, method):
    """α ≠ 0: H(q̃_t) and log q̃(token) recorded while sampling (left padding, KV cache, per-step candidate
    pass, φ(EOS) = 0) equal the teacher-forced scorer run on the generated tokens (right padding, masked
    prefixes, the tail as exact entries)."""
    sharp = with_model(tiny_lm, sharp_model)
    dec, (gen, feat) = DecodingSpec(temperature=0.9), _method(method, sharp)
    kw = dict(top_k=5, max_new_tokens=N_NEW, seed=7, batch_size=3)
    free = gen(sharp, prompts.head(5), dec, alpha=1.5, **kw)
    common = pl.Series(np.concatenate(free["token_ids"].to_list())).value_counts(sort=True)
    eos = tuple(int(t) for t in common[:, 0].head(2))  # frequent tokens: some rows stop at them
    gens = gen(sharp, prompts.head(5), dec, alpha=1.5, eos_ids=eos, **kw)
    assert (gens["finish_reason"] == "eos").any()
    as_ref = prompts.head(5).drop("reference_ids").join(
        gens.select("example_id", pl.col("token_ids").alias("reference_ids")), on="example_id")
    loss, ent = feat(sharp, as_ref, dec, top_k=5, max_tokens=N_NEW, batch_size=2, eos_ids=eos).loss_entropy(1.5)
    np.testing.assert_allclose(ent, np.concatenate(gens["step_entropy"].to_list()), atol=1e-4)
    np.testing.assert_allclose(-loss, np.concatenate(gens["step_logprob"].to_list()), atol=1e-4)


# ---------------------------------------------------------------- the exact q̃ rule (docs/SCIENCE.md §4)
ALPHAS = (1.0, 3.0, -0.4)


@pytest.fixture(scope="module")
def flat_model(tiny_lm):
    """The tiny model with its final norm zeroed: every logit is 0, p̂ is uniform over the vocabulary."""
    import copy

    model = copy.deepcopy(tiny_lm.model)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    return model


@pytest.mark.parametrize("which", ["tiny", "flat"])
def test_constant_future_entropy_is_temperature_in_generation(tiny_lm, flat_model, prompts, which):
    """f̂ constant and no EOS ids: q̃ ∝ p̂^{1+α} for every token, i.e. temperature τ/(1+α): the same tokens,
    entropies and log-probs as tasks.generate's sampler at that temperature (a lumped tail atom would move
    the tail). With EOS ids it is not: φ(EOS) = 0 (test_eos_candidates_get_phi_zero)."""
    lm = tiny_lm if which == "tiny" else with_model(tiny_lm, flat_model)
    model = lm.model
    reg = _regressor(model.config.hidden_size, scale=0.0, bias=4.0)
    kw = dict(max_new_tokens=N_NEW, seed=3, batch_size=4)
    for alpha in ALPHAS:
        q = _generate(lm, prompts.head(4), DecodingSpec(temperature=1.2), reg, alpha=alpha, top_k=6, **kw)
        t = generate_base(lm, prompts.head(4), DecodingSpec(temperature=1.2 / (1 + alpha)), **kw)
        _same_samples(q, t)
        if which == "flat":
            np.testing.assert_allclose(np.concatenate(q["step_entropy"].to_list()), math.log(model.config.vocab_size),
                                       atol=1e-5)


@pytest.mark.parametrize("which", ["tiny", "flat"])
def test_constant_future_entropy_is_temperature_in_fitting(tiny_lm, flat_model, prompts, which):
    """The same in fitting: HumanAtoms' log loss and entropy at α equal the teacher-forced scorer at τ/(1+α)."""
    lm = tiny_lm if which == "tiny" else with_model(tiny_lm, flat_model)
    reg = _regressor(lm.model.config.hidden_size, scale=0.0, bias=4.0)
    atoms = _features(lm, prompts.head(3), DecodingSpec(temperature=1.2), reg, top_k=6, max_tokens=N_NEW)
    for alpha in ALPHAS:
        ref = scored(lm, prompts.head(3), [DecodingSpec(temperature=1.2 / (1 + alpha))], max_tokens=N_NEW,
                     epsilon=1e-4)
        loss, ent = atoms.loss_entropy(alpha)
        np.testing.assert_allclose(loss, np.concatenate(ref["step_logloss"].to_list()), atol=1e-4)
        np.testing.assert_allclose(ent, np.concatenate(ref["step_entropy"].to_list()), atol=1e-4)


def _rows(v: int = 50_000, k: int = 8):
    """log p̂ [3, V] float32: flat; a near-flat row whose tail outweighs the candidates; a Zipf row."""
    g = torch.Generator().manual_seed(0)
    flat = torch.zeros(v)
    nearflat = torch.cat([torch.full((k,), 3.0), 0.3 * torch.randn(v - k, generator=g)])
    zipf = -1.1 * torch.log(torch.arange(1, v + 1, dtype=torch.float64)).float() + 0.5 * torch.randn(v, generator=g)
    return torch.log_softmax(torch.stack([flat, nearflat, zipf]), -1)


def test_synthetic_rows_constant_phi_is_temperature_generation_and_fitting():
    """V = 50k rows (histogram tail): with φ the same for every candidate, generation's logits are exactly
    (1+α)·log p̂ up to a constant, and fitting's loss / entropy equal temperature 1/(1+α) within the
    histogram's bound (exact on the flat row, whose tail is one bin)."""
    logp, k = _rows(), 8
    cand = logp.topk(k, -1).indices
    phi_c = torch.full((3, k), 2.5)
    y = torch.tensor([17, 20_000, 3])  # all in the tail
    atoms = atoms_from_parts(["x"], [3], [0, 1, 2], [position_atoms(logp, cand, phi_c, y, 1.0)], 1.0)
    assert atoms.tail_logm.shape[1] < 1000  # binned, not one entry per token
    for alpha in ALPHAS:
        want = torch.log_softmax((1 + alpha) * logp.double(), -1)
        got = torch.log_softmax(reweighted_logits(logp, cand, phi_c, alpha, 1.0).double(), -1)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
        loss, ent = atoms.loss_entropy(alpha)
        h = -(want.exp() * want).sum(-1).numpy()
        bound = alpha ** 2 * TAIL_BIN_NATS ** 2 / 8
        assert loss[0] == pytest.approx(-float(want[0, 17]), abs=1e-6)
        assert ent[0] == pytest.approx(h[0], abs=1e-6)
        np.testing.assert_allclose(loss, -want.gather(1, y[:, None])[:, 0].numpy(), atol=bound + 1e-5)
        np.testing.assert_allclose(ent, h, atol=10 * bound + 1e-4)
    # the brief's near-flat row at α = 1: p̂^{2} concentrates on the candidates; q̃'s tail mass stays small
    lq = torch.log_softmax(reweighted_logits(logp, cand, phi_c, 1.0, 1.0).double(), -1)
    tail = torch.ones(logp.shape[1], dtype=torch.bool)
    tail[cand[1]] = False
    assert logp[1, tail].exp().sum() > 0.5 and lq[1, tail].exp().sum() < logp[1, tail].exp().sum()


def test_tail_histogram_within_its_bound_of_exact():
    """log Σ_tail p̂^{1+α} from the bins is low by 0 … α²δ²/8; P_tail and Σ p̂·log p̂ are exact."""
    logp = _rows().double()
    excluded = torch.zeros_like(logp, dtype=torch.bool).scatter(1, logp.topk(8, -1).indices, True)
    lm, mu = tail_entries(logp.float(), excluded)
    lm, mu = lm.double(), mu.double()
    tail = logp.masked_fill(excluded, -math.inf)
    torch.testing.assert_close(torch.logsumexp(lm, 1), torch.logsumexp(tail, 1), atol=1e-5, rtol=0)
    plogp = (tail.exp() * tail.nan_to_num(0, 0, 0)).sum(1)
    torch.testing.assert_close((lm.exp() * mu).sum(1), plogp, atol=1e-4, rtol=1e-5)
    for alpha in (-0.5, 0.5, 1.0, 4.0):
        exact = torch.logsumexp((1 + alpha) * tail, 1)
        approx = torch.logsumexp(lm + alpha * mu, 1)
        err = exact - approx
        assert (err >= -1e-5).all() and (err <= alpha ** 2 * TAIL_BIN_NATS ** 2 / 8 + 1e-5).all(), (alpha, err)


def test_eos_candidates_get_phi_zero(tiny_lm, prompts):
    """φ(EOS) = 0: a candidate that is an EOS id has lookahead feature 0 (H(next | EOS) := 0) and future
    feature log p̂ (f̂(EOS) := 0); the other candidates keep theirs; the same rule in generation's logits."""
    model = tiny_lm.model
    base = _features(tiny_lm, prompts.head(2), top_k=6, max_tokens=N_NEW)
    eos = int(base.candidates[5, 2])  # a candidate at position 5 (rank 3)
    atoms = _features(tiny_lm, prompts.head(2), top_k=6, max_tokens=N_NEW, eos_ids=(eos,))
    is_eos = atoms.candidates == eos
    assert is_eos[5, 2] and (atoms.u[:, :6][is_eos] == 0).all()
    assert (atoms.u[:, :6][~is_eos] < 0).all()  # entropies > 0 elsewhere
    np.testing.assert_allclose(atoms.u[:, :6][~is_eos], base.u[:, :6][~is_eos])
    reg = _regressor(model.config.hidden_size, scale=0.0, bias=4.0)
    fut = _features(tiny_lm, prompts.head(2), reg=reg, top_k=6, max_tokens=N_NEW, eos_ids=(eos,))
    lp = fut.logP[:, :6]
    np.testing.assert_allclose(fut.u[:, :6], np.where(fut.candidates == eos, lp, lp - 4.0), atol=1e-6)
    # an EOS id outside the top-k is its own atom with φ = 0
    out = ~is_eos.any(1)
    np.testing.assert_allclose(fut.u[out, 6], fut.logP[out, 6], atol=1e-6)
    np.testing.assert_allclose(atoms.u[out, 6], 0.0)
    # generation: z̃ − z = α·(γ·log p̂ − φ) with φ(EOS) = 0, candidate or not
    logp = torch.log_softmax(torch.randn(2, 50, generator=torch.Generator().manual_seed(1)), -1)
    cand = logp.topk(4, -1).indices
    e = torch.tensor([int(cand[0, 1]), int(logp[1].argmin())])
    d = reweighted_logits(logp, cand, torch.full((2, 4), 3.0), 2.0, 1.0, e) - logp
    torch.testing.assert_close(d[:, e], 2.0 * logp[:, e])
    torch.testing.assert_close(d[1, cand[1]], 2.0 * (logp[1, cand[1]] - 3.0))


@pytest.mark.parametrize("method", ["lookahead", "future"])
def test_eos_phi_zero_in_generation(tiny_lm, prompts, method):
    """First step of generation with EOS ids: the recorded H(q̃) and log q̃(token) are those of
    q̃ ∝ p̂^{1+γα}·exp(−α·φ) with φ(EOS) = 0, computed here from the model's logits and naive features."""
    model, alpha, k, one = tiny_lm.model, 1.0, 6, prompts.head(4)
    ctx = one["prompt_ids"].to_list()
    with torch.inference_mode():
        logps = [torch.log_softmax(model(input_ids=torch.tensor([c])).logits[0, -1].float(), -1) for c in ctx]
    eos = tuple(sorted({int(lp.topk(2).indices[1]) for lp in logps}))  # a candidate in every row
    reg = _regressor(model.config.hidden_size, scale=0.0, bias=4.0)
    if method == "lookahead":
        gens = _generate(tiny_lm, one, alpha=alpha, top_k=k, max_new_tokens=1, eos_ids=eos, seed=4)
    else:
        gens = _generate(tiny_lm, one, reg=reg, alpha=alpha, top_k=k, max_new_tokens=1, eos_ids=eos, seed=4)
    for c, lp, row in zip(ctx, logps, gens.iter_rows(named=True)):
        cand = lp.topk(k).indices
        phi = [_naive_entropy(model, c + [int(w)]) for w in cand] if method == "lookahead" else [4.0] * k
        lq = _explicit_log_qtilde(lp, cand, phi, alpha, 0.0 if method == "lookahead" else 1.0, eos)
        assert row["step_entropy"][0] == pytest.approx(float(-(lq.exp() * lq).sum()), abs=1e-4)
        assert row["step_logprob"][0] == pytest.approx(float(lq[row["token_ids"][0]]), abs=1e-4)


def test_fit_alpha_never_worse_than_zero_and_buckets(tiny_lm, prompts):
    atoms = _features(tiny_lm, prompts, top_k=8, max_tokens=N_NEW)
    fit = fit_alpha(atoms, bounds=LOOKAHEAD_BOUNDS)
    assert fit["logloss"] <= fit["logloss_alpha0"] + 1e-12
    grid = [atoms.loss_entropy(a)[0].mean() for a in np.linspace(-1, 4, 51)]
    assert fit["logloss"] <= min(grid) + 1e-6  # golden section found the convex minimum
    a = fit["alpha"]
    if -1 < a < 4 and a != 0:  # interior optimum: the feature is calibrated, E_q̃[u] = u(y) on average
        h = 1e-3
        grad = (atoms.loss_entropy(a + h)[0].mean() - atoms.loss_entropy(a - h)[0].mean()) / (2 * h)
        assert abs(grad) < 1e-3
    table = atoms.table(fit["alpha"], key="t1-look")  # the human text scored under q̃
    assert table.schema == pl.Schema(REFERENCE_SCHEMA) and table.height == prompts.height
    np.testing.assert_allclose(np.concatenate(table["step_logloss"].to_list()), atoms.loss_entropy(fit["alpha"])[0],
                               atol=1e-5)
    per = fit_alpha(atoms, bounds=LOOKAHEAD_BOUNDS, buckets=[4])
    assert len(per["alpha"]) == 2 and per["logloss"] <= fit["logloss"] + 1e-12
    # a range without the optimum: α = 0 can still win, never a worse value
    pinned = fit_alpha(atoms, bounds=(0.0, 0.0))
    assert pinned["alpha"] == 0.0 and pinned["logloss"] == pinned["logloss_alpha0"]


def test_uninformative_feature_gets_alpha_zero():
    rng = np.random.default_rng(0)
    logp = np.log(rng.dirichlet(np.ones(5), size=40))
    y = rng.integers(0, 5, 40)
    atoms = HumanAtoms(["a", "b"], [20, 20], np.tile(np.arange(20), 2), np.zeros((40, 5), dtype=np.int64), logp,
                       np.full((40, 5), 0.7), np.full((40, 1), -np.inf, np.float32), np.zeros((40, 1), np.float32),
                       np.full(40, 0.7), logp[np.arange(40), y], np.full(40, 0.7), 0.0)
    # u is the same for every atom: q̃ = p̂ for all α, and the tie goes to α = 0
    fit = fit_alpha(atoms, bounds=LOOKAHEAD_BOUNDS)
    assert fit["alpha"] == 0.0 and fit["logloss"] == fit["logloss_alpha0"]


def _recalibration_knobs(*, batch_size: int) -> RecalibrationKnobs:
    """6 candidates, N_NEW steps, 1 sample per prompt, seed 0, 50 bootstrap resamples."""
    return RecalibrationKnobs(candidates=6, generation=generation_knobs(max_new_tokens=N_NEW, batch_size=batch_size),
                              summary=summary_knobs(horizon=N_NEW, bootstrap=50))


def test_lookahead_through_the_door(tiny_lm, prompts):
    """α fitted on the fit split's human text (recalibrate.fit: the fit stage); tables_at (the calibrated stage)
    is q̃ at the knob: sampled by reweighted_generate, the human text scored by the atoms; at α = 0 both are
    the base decoding's tables (generations token for token)."""
    lm, train, evals, dec = tiny_lm, prompts.head(4), prompts.tail(4), DecodingSpec()
    knobs = _recalibration_knobs(batch_size=4)
    rw = recalibrate.fit("lookahead", lm, train, BeforeTables(), knobs)
    assert rw.method == "lookahead" and rw.knob != 0  # q̃ ≠ p̂: "after" below is not "before"
    assert rw.fit["fit_logloss"] <= rw.fit["fit_logloss_alpha0"] + 1e-12
    json.dumps(rw.fit, allow_nan=False)  # JSON-able: a cached stage's parameter
    gens1, ref1 = recalibrate.tables_at(lm, evals, rw, knobs)
    phi = entropy_phi(dec.temperature)
    want = reweighted_generate(lm, evals, dec, phi, 0.0, rw.knob, top_k=6, key="q", knobs=knobs.generation)
    assert gens1["token_ids"].to_list() == want["token_ids"].to_list()
    atoms = human_atoms(lm, evals, dec, phi, 0.0, top_k=6, max_tokens=N_NEW, batch_size=4).table(rw.knob, key="q")
    np.testing.assert_allclose(np.concatenate(ref1["step_logloss"].to_list()),
                               np.concatenate(atoms["step_logloss"].to_list()), atol=1e-6)
    gens0, ref0 = recalibrate.tables_at(lm, evals, rw.at(0.0), knobs)
    base = generate(lm, evals, dec, knobs.generation)
    assert gens0["token_ids"].to_list() == base["token_ids"].to_list()
    scoring = ScoringKnobs(max_tokens=N_NEW, epsilon=1e-4, batch_size=4)
    np.testing.assert_allclose(np.concatenate(ref0["step_logloss"].to_list()),
                               np.concatenate(score(lm, evals, [dec], scoring)["step_logloss"].to_list()), atol=1e-4)
    with pytest.raises(ValueError, match="calibration method: expected one of"):
        recalibrate.fit("nucleus", lm, train, BeforeTables(), knobs)
