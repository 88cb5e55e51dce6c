import math

import numpy as np
import polars as pl
import pytest
import torch

from tasks.config import DecodingSpec
from tasks.generate import generate_table
from tasks.recalibrate import (
    fit_alpha, fit_future_regressor, future_entropy_calibration, future_features, future_generate,
    fit_lookahead_alpha, lookahead_calibration, lookahead_entropies, lookahead_features, lookahead_generate,
    lookahead_score, plot_pareto, tau_star, truncation_front,
)
from tasks.score import score_table

N_NEW = 12


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls: a 2-thread intra-op pool on a shared 2-core box spins ~100x slower than 1 thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
    png = plot_pareto(rows, tmp_path / "pareto.png")
    assert (tmp_path / "pareto.png").stat().st_size > 1000 and png.endswith(".png")


# ---------------------------------------------------------------- model-based methods
@pytest.fixture(scope="module")
def prompts(tiny_lm):
    from tasks.config import DatasetSpec
    from tasks.datasets import build_prompts, documents

    df, _ = build_prompts(documents(DatasetSpec(name="python-docs")), tiny_lm.tokenizer, label="python-docs",
                          num_examples=8, prompt_tokens=10, min_reference_tokens=N_NEW, max_reference_tokens=N_NEW)
    return df.with_columns(pl.col("prompt_ids").list.head(pl.lit(pl.Series([10, 7, 10, 5, 10, 8, 9, 10]))))


def _naive_entropy(model, seq, temperature=1.0):
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([seq])).logits[0, -1].float()
    return float(torch.distributions.Categorical(logits=logits / temperature).entropy())


def test_batched_lookahead_entropies_equal_naive_loop(sharp_model):
    model, seqs = sharp_model, [[5, 17, 40, 99, 12, 7], [33, 8, 2], [60, 61, 62, 63]]
    from tasks.generate import left_pad

    ids, mask = left_pad(seqs, 0, "cpu")
    out = lookahead_entropies(model, ids, mask, top_k=6, temperature=0.8)
    for i, s in enumerate(seqs):
        naive = [_naive_entropy(model, s + [int(w)], 0.8) for w in out["candidates"][i]]
        torch.testing.assert_close(out["entropy"][i], torch.tensor(naive), atol=1e-4, rtol=0)
        logits = model(input_ids=torch.tensor([s])).logits[0, -1].float().detach()
        top = torch.log_softmax(logits / 0.8, -1).topk(6)
        torch.testing.assert_close(out["logprobs"][i], top.values, atol=1e-5, rtol=0)


def _explicit_log_qtilde(logp, cand, phi, alpha, gamma):
    """q̃ over the whole vocabulary, written out from the module's definition (candidates + tail block)."""
    logp = logp.double()
    p_c = logp[cand].exp()
    phi_bar = float((p_c * phi).sum() / p_c.sum())
    tail = torch.ones_like(logp, dtype=torch.bool)
    tail[cand] = False
    log_pb = torch.logsumexp(logp[tail], 0)
    z = logp + alpha * (gamma * log_pb - phi_bar)  # tail: p̂·(P_B^γ·e^{−φ̄})^α
    z[cand] = logp[cand] + alpha * (gamma * logp[cand] - phi)
    return torch.log_softmax(z, 0)


def _check_against_explicit(atoms, m, logp, phi, alpha, gamma, y):
    lq = _explicit_log_qtilde(logp, torch.as_tensor(atoms.candidates[m]), torch.as_tensor(phi, dtype=torch.float64),
                              alpha, gamma)
    loss, ent = atoms.loss_entropy(alpha)
    assert loss[m] == pytest.approx(float(-lq[y]), abs=1e-4)
    assert ent[m] == pytest.approx(float(-(lq.exp() * lq).sum()), abs=1e-4)


def test_teacher_forced_candidates_equal_naive_and_alpha0_is_base(sharp_model, prompts):
    model, dec = sharp_model, DecodingSpec(temperature=0.9)
    atoms = lookahead_features(model, prompts.head(3), dec, top_k=5, max_tokens=N_NEW, batch_size=2, chunk=7)
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
    base = score_table(model, prompts.head(3), [dec], max_tokens=N_NEW, epsilon=1e-4)
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
    base = generate_table(tiny_lm.model, prompts.head(4), dec, **kw)
    la = lookahead_generate(tiny_lm.model, prompts.head(4), dec, alpha=0.0, top_k=6, **kw)
    assert la.schema == base.schema and la.height == base.height
    _same_samples(la, base)
    # EOS compaction (KV cache rows dropped mid-batch) keeps the candidate pass aligned with its rows
    eos = base["token_ids"][0][3]
    stopped = lookahead_generate(tiny_lm.model, prompts.head(4), dec, alpha=0.0, top_k=6, eos_ids=(eos,), **kw)
    assert (stopped["finish_reason"] == "eos").any() and (stopped["finish_reason"] == "length").any()
    _same_samples(stopped, generate_table(tiny_lm.model, prompts.head(4), dec, eos_ids=(eos,), **kw))
    moved = lookahead_generate(tiny_lm.model, prompts.head(4), dec, alpha=3.0, top_k=6, **kw)
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


def test_lookahead_generation_matches_teacher_forced_rescore(sharp_model, prompts):
    """α ≠ 0: H(q̃_t) and log q̃(token) recorded while sampling (left padding, KV cache, per-step candidate
    pass) equal the teacher-forced scorer run on the generated tokens (right padding, masked prefixes)."""
    dec = DecodingSpec(temperature=0.9)
    gens = lookahead_generate(sharp_model, prompts.head(5), dec, alpha=1.5, top_k=5, max_new_tokens=N_NEW,
                              seed=7, batch_size=3)
    as_ref = prompts.head(5).drop("reference_ids").join(
        gens.select("example_id", pl.col("token_ids").alias("reference_ids")), on="example_id")
    loss, ent = lookahead_features(sharp_model, as_ref, dec, top_k=5, max_tokens=N_NEW, batch_size=2
                                   ).loss_entropy(1.5)
    np.testing.assert_allclose(ent, np.concatenate(gens["step_entropy"].to_list()), atol=1e-4)
    np.testing.assert_allclose(-loss, np.concatenate(gens["step_logprob"].to_list()), atol=1e-4)


def test_fit_alpha_never_worse_than_zero_and_buckets(tiny_lm, prompts):
    atoms = lookahead_features(tiny_lm.model, prompts, top_k=8, max_tokens=N_NEW)
    fit = fit_alpha(atoms)
    assert fit["logloss"] <= fit["logloss_alpha0"] + 1e-12
    grid = [atoms.loss_entropy(a)[0].mean() for a in np.linspace(-1, 4, 51)]
    assert fit["logloss"] <= min(grid) + 1e-6  # golden section found the convex minimum
    a = fit["alpha"]
    if -1 < a < 4 and a != 0:  # interior optimum: the feature is calibrated, E_q̃[u] = u(y) on average
        s = atoms.logP + a * atoms.u
        q = np.exp(s - s.max(1, keepdims=True))
        q /= q.sum(1, keepdims=True)
        grad = ((q * atoms.u).sum(1) - np.take_along_axis(atoms.u, atoms.y_atom[:, None], 1)[:, 0]).mean()
        assert abs(grad) < 1e-3
    assert fit_lookahead_alpha(tiny_lm.model, prompts, top_k=8, max_tokens=N_NEW)["alpha"] == fit["alpha"]
    table = lookahead_score(tiny_lm.model, prompts, alpha=fit["alpha"], top_k=8, max_tokens=N_NEW)
    from tasks.score import REFERENCE_SCHEMA
    assert table.schema == pl.Schema(REFERENCE_SCHEMA) and table.height == prompts.height
    np.testing.assert_allclose(np.concatenate(table["step_logloss"].to_list()), atoms.loss_entropy(fit["alpha"])[0],
                               atol=1e-5)
    per = fit_alpha(atoms, buckets=[4])
    assert len(per["alpha"]) == 2 and per["logloss"] <= fit["logloss"] + 1e-12
    # a range without the optimum: α = 0 can still win, never a worse value
    pinned = fit_alpha(atoms, bounds=(0.0, 0.0))
    assert pinned["alpha"] == 0.0 and pinned["logloss"] == pinned["logloss_alpha0"]


def test_uninformative_feature_gets_alpha_zero():
    from tasks.recalibrate import HumanAtoms

    rng = np.random.default_rng(0)
    logp = np.log(rng.dirichlet(np.ones(5), size=40))
    atoms = HumanAtoms(["a", "b"], [20, 20], np.tile(np.arange(20), 2), np.zeros((40, 4), dtype=np.int64), logp,
                       np.full((40, 5), 0.7), rng.integers(0, 5, 40), np.zeros(40), np.zeros(40))
    fit = fit_alpha(atoms)  # u is the same for every atom: q̃ = p̂ for all α, and the tie goes to α = 0
    assert fit["alpha"] == 0.0 and fit["logloss"] == fit["logloss_alpha0"]


def test_lookahead_calibration_end_to_end(tiny_lm, prompts):
    out = lookahead_calibration(tiny_lm.model, prompts.head(4), prompts.tail(4), top_k=6, max_new_tokens=N_NEW,
                                batch_size=4, bootstrap=50)
    assert "tables" not in out
    for k in ("alpha", "entce_before", "entce_after", "logloss_before", "logloss_after"):
        assert k in out and np.all(np.isfinite(out[k]))
    assert out["fit_logloss"] <= out["fit_logloss_alpha0"] + 1e-12
    # held out: guaranteed only where α was fitted; here the eval split agrees to within noise
    assert out["logloss_after"] <= out["logloss_before"] + 1e-4
    # before = the base sampler on the eval split, scored like tasks.score
    ref = score_table(tiny_lm.model, prompts.tail(4), [DecodingSpec()], max_tokens=N_NEW, epsilon=1e-4)
    assert out["logloss_before"] == pytest.approx(float(np.concatenate(ref["step_logloss"].to_list()).mean()), abs=1e-4)


def test_future_entropy_alpha0_base_and_fit(tiny_lm, prompts):
    model, dec = tiny_lm.model, DecodingSpec()
    train, evals = prompts.head(5), prompts.tail(3)
    gens = generate_table(model, train, dec, max_new_tokens=N_NEW, samples_per_prompt=2, seed=1)
    reg = fit_future_regressor(model, train, gens, horizon=N_NEW)
    assert reg.n == 10 * (N_NEW - 1) and reg.r2 > 0
    # the same fit written out: feature = final hidden state at generated token s (unpadded forward),
    # target = mean entropy of steps s+1 … end
    ctx = dict(zip(train["example_id"].to_list(), train["prompt_ids"].to_list()))
    xs, ys = [], []
    for ex, toks, ent in gens.select("example_id", "token_ids", "step_entropy").iter_rows():
        with torch.inference_mode():
            hs = model(input_ids=torch.tensor([ctx[ex] + toks]), output_hidden_states=True).hidden_states[-1][0]
        for t in range(len(toks) - 1):
            xs.append(hs[len(ctx[ex]) + t].double())
            ys.append(float(np.mean(ent[t + 1 :])))
    x, y = torch.stack(xs), torch.tensor(ys, dtype=torch.float64)
    xz = (x - x.mean(0)) / x.std(0, unbiased=False).clamp_min(1e-6)
    gram = xz.T @ xz / len(x) + 1e-2 * torch.eye(x.shape[1], dtype=x.dtype)
    w = torch.linalg.solve(gram, xz.T @ (y - y.mean()) / len(x))
    torch.testing.assert_close(reg.weight.double(), w, atol=1e-3, rtol=1e-3)
    assert reg.bias == pytest.approx(float(y.mean()), abs=1e-6)
    atoms = future_features(model, evals, reg, dec, top_k=6, max_tokens=N_NEW)
    base = score_table(model, evals, [dec], max_tokens=N_NEW, epsilon=1e-4)
    np.testing.assert_allclose(atoms.loss_entropy(0.0)[0], np.concatenate(base["step_logloss"].to_list()), atol=1e-4)
    ctx, ref = evals["prompt_ids"].to_list(), evals["reference_ids"].to_list()
    for m in (3, N_NEW + 9):  # the regressor on the hidden state after each candidate, and q̃ at α ≠ 0
        ex, step = m // N_NEW, int(atoms.steps[m])
        prefix = ctx[ex] + ref[ex][:step]
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([prefix + [int(w)] for w in atoms.candidates[m]]),
                        output_hidden_states=True)
            logp = torch.log_softmax(model(input_ids=torch.tensor([prefix])).logits[0, -1].float(), -1)
        f_hat = reg(out.hidden_states[-1][:, -1]).double()
        np.testing.assert_allclose(atoms.u[m, :6], (logp[atoms.candidates[m]].double() - f_hat).numpy(), atol=1e-4)
        _check_against_explicit(atoms, m, logp, f_hat, 0.7, 1.0, ref[ex][step])
    kw = dict(max_new_tokens=N_NEW, seed=2, batch_size=2)
    _same_samples(future_generate(model, evals, reg, dec, alpha=0.0, top_k=6, **kw),
                  generate_table(model, evals, dec, **kw))
    fit = fit_alpha(atoms, bounds=(-0.5, 4.0), buckets=[6])
    assert fit["logloss"] <= fit["logloss_alpha0"] + 1e-12
    out = future_entropy_calibration(model, train, evals, top_k=6, max_new_tokens=N_NEW, buckets=[6], bootstrap=50,
                                     return_tables=True)
    assert out["tables"]["generations_after"].height == evals.height and out["regressor_n"] == 5 * (N_NEW - 1)
    assert out["fit_logloss"] <= out["fit_logloss_alpha0"] + 1e-12 and len(out["alpha"]) == 2
    assert out["logloss_after"] <= out["logloss_before"]  # held out: not a theorem, true on this split
    assert np.isfinite([out["entce_before"], out["entce_after"], out["logloss_after"]]).all()
