import subprocess
import sys
from pathlib import Path

import pytest

from entcal.kernels.decoding import DECODING_DESCRIPTIONS, DECODING_RANGES, check_decoding
from entcal.tasks.config import ConfigError, DecodingSpec, ModelSpec, StudyConfig, load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]


def test_yaml_round_trip_and_overrides(tmp_path):
    p = tmp_path / "study.yaml"
    p.write_text("name: x\nmodels:\n  - name: smollm2-135m\ndatasets:\n  - name: python-docs\n"
                 "decodings:\n  - {temperature: 1.0}\n  - {temperature: 1.0, top_p: 0.95}\nnum_examples: 4\n")
    cfg = load_config(p, {"num_examples": 7})
    assert cfg.num_examples == 7
    assert [d.key for d in cfg.decodings] == ["t1", "t1-p0.95"]
    assert StudyConfig.model_validate_json(cfg.model_dump_json()) == cfg


@pytest.mark.parametrize("data, needle", [
    ({"num_exampels": 3}, "num_exampels: unknown key"),
    ({"decodings": [{"temperature": 0}]}, "temperature must be > 0, got 0"),
    ({"decodings": [{"top_p": 1.5}]}, "top_p must be <= 1, got 1.5"),
    ({"decodings": [{"top_k": -1}]}, "top_k must be >= 0, got -1"),
    ({"decodings": [{"min_p": 1.0}]}, "min_p must be < 1"),
    ({"horizon": 0}, "horizon: horizon must be >= 1, got 0"),
    ({"models": [{"name": "gpt-9"}]}, "unknown built-in model 'gpt-9'"),
    ({"datasets": [{"name": "x", "path": "a.txt", "preset": "wikitext-103"}]}, "give one of path/preset/hf"),
    ({"decodings": [{"temperature": 1}, {"temperature": 1.0}]}, "decodings repeat"),
])
def test_bad_config_is_one_clear_line(data, needle):
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    msg = str(err.value)
    assert needle in msg and "\n" not in msg


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_decoding_key_is_canonical():
    assert DecodingSpec(temperature=0.9).key == "t0.9"
    assert DecodingSpec(top_k=50, min_p=0.05).key == "t1-k50-minp0.05"
    assert ModelSpec(gguf="/m/x.gguf").label == "x"
    assert DecodingSpec(typical_p=0.9).key == "t1-typ0.9"
    assert DecodingSpec(eta_cutoff=9e-4).key == "t1-eta0.0009"
    assert DecodingSpec(epsilon_cutoff=3e-4).key == "t1-eps0.0003"
    assert DecodingSpec(temperature=0.8, top_p=0.95, typical_p=0.95, epsilon_cutoff=1e-3,
                        eta_cutoff=2e-3).key == "t0.8-p0.95-typ0.95-eps0.001-eta0.002"


@pytest.mark.parametrize("knob, value", [("typical_p", 0.9), ("epsilon_cutoff", 3e-4), ("eta_cutoff", 2e-3)])
def test_typical_eta_epsilon_truncate_and_default_off(knob, value):
    assert not DecodingSpec().truncated
    assert DecodingSpec(**{knob: value}).truncated
    assert DecodingSpec(**{knob: value}).kernel_kwargs()[knob] == value


@pytest.mark.parametrize("knob, value, what", [("typical_p", 0.9, "typical sampling"),
                                               ("epsilon_cutoff", 3e-4, "ε-sampling"),
                                               ("eta_cutoff", 2e-3, "η-sampling")])
def test_vllm_has_no_typical_eta_epsilon_one_line_errors(knob, value, what):
    model = {"name": "smollm2-135m", "engine": "vllm"}
    with pytest.raises(ConfigError) as err:
        parse_config({"models": [model], "decodings": [{knob: value}]})
    msg = str(err.value)
    assert "\n" not in msg
    assert f"decodings.0: {knob} is not a vLLM sampling parameter" in msg and "engine: vllm" in msg
    assert f"use engine: entcal for {what}" in msg
    off = {k: [] for k in ("top_nsigma", "typical_p", "eta_cutoff", "epsilon_cutoff") if k != knob}
    calibration = {"lookahead": False, "future_entropy": False, "tau_schedule": False, "entropy_feedback": False,
                   **off, knob: [value]}
    with pytest.raises(ConfigError) as err:
        parse_config({"models": [model], "calibration": calibration})
    msg = str(err.value)
    assert "\n" not in msg
    assert f"calibration.{knob}: {what} is not a vLLM sampling parameter" in msg and "engine: vllm" in msg
    assert f"set calibration.{knob}: []" in msg
    parse_config({"models": [model], "calibration": {**calibration, knob: []}})  # all off: fine


@pytest.mark.parametrize("over, names", [
    ({"horizon": 1000, "max_new_tokens": 256}, ("horizon (1000)", "max_new_tokens (256)")),
    ({"horizon": 64, "max_new_tokens": 64, "min_reference_tokens": 32}, ("horizon (64)", "min_reference_tokens (32)")),
])
def test_a_horizon_longer_than_the_data_is_a_one_line_error_naming_both_fields(over, names):
    with pytest.raises(ConfigError) as err:
        parse_config(over)
    msg = str(err.value)
    assert "\n" not in msg and all(n in msg for n in names) and "set horizon <=" in msg


def test_an_empty_horizon_is_the_shorter_of_generations_and_references():
    assert parse_config({"max_new_tokens": 16, "min_reference_tokens": 48}).horizon == 16
    assert parse_config({"max_new_tokens": 64, "min_reference_tokens": 48}).horizon == 48
    assert parse_config({"horizon": 12, "max_new_tokens": 16, "min_reference_tokens": 16}).horizon == 12


def test_decoding_ranges_are_in_the_json_schema_the_form_is_built_from():
    from entcal.tasks.config import DecodingSpec

    props = DecodingSpec.model_json_schema()["properties"]
    assert props["temperature"]["exclusiveMinimum"] == 0
    assert props["top_p"]["exclusiveMinimum"] == 0 and props["top_p"]["maximum"] == 1
    assert props["min_p"]["minimum"] == 0 and props["min_p"]["exclusiveMaximum"] == 1
    assert props["top_k"]["minimum"] == 0 and props["top_nsigma"]["minimum"] == 0
    assert props["typical_p"]["exclusiveMinimum"] == 0 and props["typical_p"]["maximum"] == 1
    for knob in ("eta_cutoff", "epsilon_cutoff"):
        assert props[knob]["minimum"] == 0 and props[knob]["exclusiveMaximum"] == 1
    assert (props["typical_p"]["default"], props["eta_cutoff"]["default"], props["epsilon_cutoff"]["default"]) \
        == (1.0, 0.0, 0.0)
    assert all(p.get("description") for p in props.values())


def test_decoding_fields_are_the_kernels_ranges_and_descriptions():
    props = DecodingSpec.model_json_schema()["properties"]
    assert set(props) == set(DECODING_RANGES) == set(DECODING_DESCRIPTIONS)
    schema_key = {"gt": "exclusiveMinimum", "ge": "minimum", "lt": "exclusiveMaximum", "le": "maximum"}
    for name, bounds in DECODING_RANGES.items():
        in_schema = {k: props[name][k] for k in schema_key.values() if k in props[name]}
        assert in_schema == {schema_key[b]: limit for b, limit in bounds.items()}, name
        assert props[name]["description"] == DECODING_DESCRIPTIONS[name]


@pytest.mark.parametrize("name, value", [
    ("temperature", 0), ("temperature", -1), ("temperature", 101), ("top_k", -1), ("top_p", 0),
    ("top_p", 1.5), ("min_p", -0.1), ("min_p", 1.0), ("top_nsigma", -0.5), ("typical_p", 0), ("typical_p", 1.01),
    ("eta_cutoff", -1e-4), ("eta_cutoff", 1.0), ("epsilon_cutoff", -1e-4), ("epsilon_cutoff", 1),
])
def test_config_and_kernels_refuse_a_decoding_out_of_range_in_the_same_words(name, value):
    with pytest.raises(ValueError) as kernel_err:
        check_decoding(**{name: value})
    words = str(kernel_err.value)
    assert words.startswith(f"{name} must be ") and words.endswith(f", got {value!r}")
    with pytest.raises(ConfigError) as config_err:
        parse_config({"decodings": [{name: value}]})
    assert str(config_err.value).endswith(f"decodings.0.{name}: {words}")


def test_decoding_range_ends_that_are_allowed_pass_both_checks():
    edges = dict(temperature=100, top_k=0, top_p=1, min_p=0, top_nsigma=0, typical_p=1, epsilon_cutoff=0,
                 eta_cutoff=0)
    check_decoding(**edges)
    assert DecodingSpec(**edges).model_dump() == edges
    with pytest.raises(ValueError, match="top_nsigma must be >= 0, got nan"):
        check_decoding(top_nsigma=float("nan"))


def test_the_config_and_its_ranges_load_without_torch():
    """flows.cli checks a config before torch loads: kernels.decoding must not pull torch in."""
    code = "import sys, tasks.config, kernels; assert 'torch' not in sys.modules, 'torch was imported'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_paper_scale_config_in_the_readme_is_a_valid_study():
    """docs/paper-scale.yaml (README "Paper scale") is what it says: the Qwen2.5 family on vLLM and Ray."""
    path = Path(__file__).parents[2] / "docs" / "paper-scale.yaml"
    assert path.read_text() in (path.parents[1] / "README.md").read_text()  # the README shows it whole
    cfg = load_config(path)
    assert [m.engine for m in cfg.models] == ["vllm"] * 7 and {m.family for m in cfg.models} == {"qwen2.5"}
    assert [m.tensor_parallel_size for m in cfg.models][-2:] == [2, 4] and cfg.models[-1].spread
    assert [d.preset for d in cfg.datasets] == ["wikitext-103", "writingprompts", "codecontests"]
    assert [d.temperature for d in cfg.decodings] == [1.0, 0.95, 0.9, 0.85, 0.8]
    assert (cfg.num_examples, cfg.horizon, cfg.executor) == (5000, 1000, "ray")
