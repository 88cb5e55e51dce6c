import pytest

from tasks.config import ConfigError, DecodingSpec, ModelSpec, StudyConfig, load_config, parse_config


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
    ({"decodings": [{"temperature": 0}]}, "temperature must be > 0"),
    ({"decodings": [{"top_p": 1.5}]}, "top_p must be"),
    ({"decodings": [{"top_k": -1}]}, "top_k must be >= 0"),
    ({"decodings": [{"min_p": 1.0}]}, "min_p must be < 1"),
    ({"horizon": 0}, "horizon"),
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
    from tasks.config import DecodingSpec

    props = DecodingSpec.model_json_schema()["properties"]
    assert props["temperature"]["exclusiveMinimum"] == 0
    assert props["top_p"]["exclusiveMinimum"] == 0 and props["top_p"]["maximum"] == 1
    assert props["min_p"]["minimum"] == 0 and props["min_p"]["exclusiveMaximum"] == 1
    assert props["top_k"]["minimum"] == 0 and props["top_nsigma"]["minimum"] == 0
    assert all(p.get("description") for p in props.values())
