"""Future-entropy scaling (tasks/future.py): f̂ = baseline(remaining steps) + a ridge residual chosen by
cross-validation over prompts, the gate, the drift skill (log-loss gradient at α = 0), and q̃'s tables."""
import dataclasses
import json

import numpy as np
import polars as pl
import pytest
import torch

from entcal.tasks.atoms import human_atoms
from entcal.tasks.contracts import RecalibrationKnobs, Reweighting
from entcal.tasks.future import (
    BASE, FutureEstimator, TrainingSet, fit_estimator, fit_future_entropy, future_entropy_targets, future_phi,
    future_tables, training_set,
)
from entcal.tasks import recalibrate
from entcal.tasks.recalibrate import BeforeTables
from tests.tasks.helpers import docs_prompts, gen, generation_knobs, scored, summary_knobs, with_model

N_NEW = 10
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prompts(tiny_lm):
    return docs_prompts(tiny_lm.tokenizer, num_examples=8, prompt_tokens=8, tokens=N_NEW)


def _knobs(*, samples: int = 1, seed: int = 0) -> RecalibrationKnobs:
    return RecalibrationKnobs(candidates=6, generation=generation_knobs(max_new_tokens=N_NEW, samples_per_prompt=samples,
                                                                        seed=seed, batch_size=8),
                              summary=summary_knobs(horizon=N_NEW, bootstrap=20))


# ---------------------------------------------------------------- cross-validation over prompts
def _synthetic(rng, *, groups=12, samples=3, horizon=20, dim=6):
    """Tokens of ``groups`` prompts × ``samples`` generations of ``horizon`` − 1 targets each."""
    n = groups * samples * (horizon - 1)
    r = np.tile(horizon - 1 - np.arange(horizon - 1), groups * samples)
    g = np.repeat([f"p{i:02d}" for i in range(groups)], samples * (horizon - 1)).astype(object)
    return n, r, g, rng.normal(size=(n, dim))


def test_cv_baseline_and_residual_on_held_out_prompts():
    rng = np.random.default_rng(0)
    n, r, g, x = _synthetic(rng)
    y = 2.5 * r + 0.03 * r ** 2 + 4.0 * (r / 20) * x[:, 0] + rng.normal(size=n)
    est, cv = fit_estimator(TrainingSet(x, r, y, g), horizon=20)
    assert cv["heldout_r2_baseline"] > 0.9 and cv["heldout_r2"] > cv["heldout_r2_baseline"]
    assert cv["ridge"] is not None and cv["tokens"] == n and cv["groups"] == 12
    assert cv["heldout_r2"] == max(cv["r2_by_ridge"].values())
    assert abs(est.weight[0] * 1 / est.scale[0] - 4.0) < 0.3  # the residual found x₀'s effect, scaled by r/T
    # shuffled targets: nothing to find, held out R² ≤ 0 (in sample a small ridge still "fits")
    ys = rng.permutation(y)
    _, cv = fit_estimator(TrainingSet(x, r, ys, g), horizon=20)
    assert cv["heldout_r2"] <= 0 and cv["heldout_r2_baseline"] <= 0


def test_cv_holds_out_whole_prompts():
    """Each prompt's future entropy per step is a constant coded by its (shared) features: split token by
    token, CV recalls it (R² ≈ 1); held out by prompt, nothing carries over."""
    rng = np.random.default_rng(1)
    n, r, g, _ = _synthetic(rng, groups=10, dim=0)
    code = {k: rng.normal(size=30) for k in np.unique(g)}
    x = np.stack([code[k] for k in g]) + 0.01 * rng.normal(size=(n, 30))
    value = {k: rng.normal(scale=10) for k in code}
    y = r / 20 * np.array([value[k] for k in g]) + 0.1 * rng.normal(size=n)
    grid, key = dict(scalar_ridges=(1e-3,), hidden_ridges=(1e-3,)), "scalar=0.001,hidden=0.001"
    _, by_prompt = fit_estimator(TrainingSet(x, r, y, g), horizon=20, **grid)
    _, by_token = fit_estimator(TrainingSet(x, r, y, np.arange(n).astype(str)), horizon=20, **grid)
    assert by_prompt["r2_by_ridge"][key] < 0.2 and by_token["r2_by_ridge"][key] > 0.9


# ---------------------------------------------------------------- f̂ on the tiny model
@pytest.fixture(scope="module")
def fitted(tiny_lm, prompts):
    """The estimator fitted on 2 samples of 4 fit prompts, and the calibration of those tables."""
    train = prompts.head(4)
    knobs = _knobs(samples=2, seed=1)
    gens = gen(tiny_lm, train, BASE, max_new_tokens=N_NEW, samples_per_prompt=2, seed=1)  # no EOS: full length
    before = BeforeTables(gens)
    return train, gens, knobs, before, fit_future_entropy(tiny_lm, train, before, knobs)


def test_future_phi_rebuilds_the_fit_and_round_trips_json(tiny_lm, fitted):
    train, gens, knobs, _, rw = fitted
    assert rw.method == "future_entropy" and rw.knob_name == "alpha"
    back = Reweighting(**json.loads(json.dumps(dataclasses.asdict(rw), allow_nan=False)))
    assert back == rw
    ts = training_set(tiny_lm, train, gens, horizon=N_NEW)
    assert len(ts.target) == 8 * (N_NEW - 1) and rw.fit["tokens"] == len(ts.target) and rw.fit["prompts"] == 4
    est, cv = fit_estimator(ts, horizon=N_NEW)
    assert (cv["heldout_r2"], cv["ridge"]) == (rw.fit["heldout_r2"], rw.fit["ridge"])
    phi = future_phi(back)
    np.testing.assert_allclose(phi.predict(ts.x, ts.remaining), est.predict(ts.x, ts.remaining), rtol=1e-12,
                               atol=1e-9)
    # φ at inference (the model's logits and last hidden state after the token) = f̂ on the training features
    ctx = train["prompt_ids"][0].to_list()
    toks = gens["token_ids"][0].to_list()
    with torch.inference_mode():
        out = tiny_lm.model(input_ids=torch.tensor([ctx + toks]), output_hidden_states=True)
    at = slice(len(ctx), len(ctx) + N_NEW - 1)  # the states after generated tokens 0 … n − 2
    left = torch.from_numpy(ts.remaining[: N_NEW - 1])
    assert left.tolist() == list(range(N_NEW - 1, 0, -1))  # T − s − 1
    got = phi(out.logits[0, at].float(), out.hidden_states[-1][0, at].float(), left)
    np.testing.assert_allclose(got.numpy(), est.predict(ts.x[: N_NEW - 1], left.numpy()), atol=2e-3)
    # the report's figures
    fit = rw.fit
    assert fit["skill"] in ("ok", "none") and isinstance(fit["verdict"], str) and "R²" in fit["verdict"]
    assert fit["fit_logloss"] <= fit["fit_logloss_alpha0"] + 1e-12
    assert np.isfinite([fit["gradient_at_zero"], fit["entce_fit_split"]]).all()


def test_no_skill_fits_nothing_and_says_so(tiny_lm, fitted):
    """Step entropies whose future sum does not depend on the steps left nor on the state (one random
    value at each generation's last step): held-out R² ≤ 0, α = 0, and the verdict says why."""
    train, gens, knobs, before, _ = fitted
    rng = np.random.default_rng(3)
    noise = [[0.0] * (len(e) - 1) + [float(rng.exponential(5.0))] for e in gens["step_entropy"].to_list()]
    doctored = gens.with_columns(pl.Series("step_entropy", noise, dtype=pl.List(pl.Float32)))
    rw = fit_future_entropy(tiny_lm, train, BeforeTables(doctored), knobs)
    assert rw.fit["heldout_r2"] <= 0 and rw.knob == 0.0 and rw.fit["skill"] == "none"
    assert rw.fit["verdict"].startswith("f̂ has no skill on this model/data")
    assert rw.fit["fit_logloss"] == rw.fit["fit_logloss_alpha0"] and np.isfinite(rw.fit["gradient_at_zero"])


# ---------------------------------------------------------------- drift skill: the gradient at α = 0
def test_gradient_at_zero_is_the_derivative_of_the_log_loss(tiny_lm, prompts, fitted):
    rw = fitted[-1]
    atoms = human_atoms(with_model(tiny_lm, eos_ids=(int(prompts["reference_ids"][0][2]),)), prompts.head(3), BASE,
                        future_phi(rw), 1.0, top_k=6, max_tokens=N_NEW, batch_size=3)
    h = 1e-4
    fd = (atoms.loss_entropy(h)[0].mean() - atoms.loss_entropy(-h)[0].mean()) / (2 * h)
    assert atoms.gradient_at_zero() == pytest.approx(fd, abs=1e-5 * max(1.0, abs(fd)))
    sel = np.arange(0, len(atoms.steps), 2)
    fd = (atoms.loss_entropy(h, sel=sel)[0].mean() - atoms.loss_entropy(-h, sel=sel)[0].mean()) / (2 * h)
    assert atoms.gradient_at_zero(sel) == pytest.approx(fd, abs=1e-5 * max(1.0, abs(fd)))


def test_exact_future_entropy_telescopes_to_minus_entce(tiny_lm, prompts):
    """T = 2 and every token a candidate: F after the first token is H(next), after the second 0; then
    d/dα L̄ at 0 = L̄ − H̄ with H̄ the model's expected entropy over its own generations (H_0 + E_w H_1(w))/2,
    enumerated here over the whole vocabulary. A φ blind to the future (0) gives L̄ − H̄(human prefixes)."""
    lm, two = with_model(tiny_lm, eos_ids=()), prompts.head(3)
    vocab = lm.model.config.vocab_size

    def exact(logits, hidden, remaining):
        h = torch.distributions.Categorical(logits=logits).entropy()
        return torch.where(remaining > 0, h, torch.zeros_like(h))

    atoms = human_atoms(lm, two, BASE, exact, 1.0, top_k=vocab, max_tokens=2, batch_size=3)
    blind = human_atoms(lm, two, BASE, lambda lo, hi, r: torch.zeros(len(lo)), 1.0, top_k=8, max_tokens=2,
                        batch_size=3)
    ref = scored(lm, two, [BASE], max_tokens=2, epsilon=1e-4)
    loss = np.concatenate(ref["step_logloss"].to_list()).mean()
    h_gen = []
    for ctx in two["prompt_ids"].to_list():
        with torch.inference_mode():
            p0 = torch.softmax(lm.model(input_ids=torch.tensor([ctx])).logits[0, -1].double(), -1)
            nxt = lm.model(input_ids=torch.tensor([ctx + [w] for w in range(vocab)])).logits[:, -1].double()
        h1 = torch.distributions.Categorical(logits=nxt).entropy()
        h_gen.append(float(torch.distributions.Categorical(probs=p0).entropy() + (p0 * h1).sum()) / 2)
    minus_entce = loss - np.mean(h_gen)
    assert atoms.gradient_at_zero() == pytest.approx(minus_entce, abs=2e-4)
    h_human = np.concatenate(ref["step_entropy"].to_list()).mean()
    assert blind.gradient_at_zero() == pytest.approx(loss - h_human, abs=1e-4)
    assert abs(minus_entce - (loss - h_human)) > 1e-2  # the two differ: the test can tell them apart


# ---------------------------------------------------------------- q̃'s tables
def test_future_tables_at_zero_are_the_base_decoding(tiny_lm, prompts, fitted):
    rw, evals = fitted[-1], prompts.tail(3)
    knobs = _knobs(seed=4)
    gens, ref = future_tables(tiny_lm, evals, rw.at(0.0), knobs)
    base = gen(tiny_lm, evals, BASE, max_new_tokens=N_NEW, seed=4, eos_ids=None)
    assert gens["token_ids"].to_list() == base["token_ids"].to_list()
    for a, b in zip(gens["step_entropy"].to_list() + gens["step_logprob"].to_list(),
                    base["step_entropy"].to_list() + base["step_logprob"].to_list()):
        np.testing.assert_allclose(a, b, atol=1e-5)
    want = scored(tiny_lm, evals, [BASE], max_tokens=N_NEW, epsilon=1e-4)
    for col in ("step_logloss", "step_entropy"):
        np.testing.assert_allclose(np.concatenate(ref[col].to_list()), np.concatenate(want[col].to_list()), atol=1e-4)
    assert set(gens["decoding"]) == set(ref["decoding"]) == {"t1-fut0"}
    moved, moved_ref = future_tables(tiny_lm, evals, rw.at(2.0), knobs)
    assert moved["token_ids"].to_list() != base["token_ids"].to_list()
    assert not np.allclose(np.concatenate(moved_ref["step_logloss"].to_list()),
                           np.concatenate(want["step_logloss"].to_list()))


def test_the_door_fits_and_samples_future_entropy(tiny_lm, prompts, fitted):
    """recalibrate.fit and tables_at (the stages' one door) are tasks/future.py's fit and tables; a BeforeTables
    without the fit split's generations is refused in one line."""
    train, _, knobs, before, rw = fitted
    assert recalibrate.fit("future_entropy", tiny_lm, train, before, knobs) == rw
    evals = prompts.tail(3)
    a, b = recalibrate.tables_at(tiny_lm, evals, rw.at(1.0), knobs), future_tables(tiny_lm, evals, rw.at(1.0), knobs)
    assert all(x.equals(y) for x, y in zip(a, b)) and set(a[0]["decoding"]) == {"t1-fut1"}
    with pytest.raises(ValueError, match="train_generations has no rows of decoding t1 for the fit split's examples"):
        recalibrate.fit("future_entropy", tiny_lm, evals, before, knobs)


def test_future_entropy_target_is_the_sum_of_later_steps():
    np.testing.assert_allclose(future_entropy_targets([1.0, 2.0, 3.0, 4.0]), [9.0, 7.0, 4.0])
    assert future_entropy_targets([5.0]).shape == (0,)


def test_estimator_is_zero_beyond_the_horizon_and_json_plain():
    est = FutureEstimator(4, 1.0, np.array([0.0, 2.0, 4.0, 6.0]), np.zeros(3), np.ones(3), np.array([1.0, 0, 0]), 0.5)
    x = np.array([[2.0, 0.0, 0.0]] * 4)
    np.testing.assert_allclose(est.predict(x, np.array([0, 1, 3, 9])),
                               [0.0, 2 + 0.25 * 2.5, 6 + 0.75 * 2.5, 6 + 0.75 * 2.5])
    assert FutureEstimator.of(json.loads(json.dumps(est.params()))).params() == est.params()
