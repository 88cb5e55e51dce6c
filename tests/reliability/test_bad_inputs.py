"""Bad input, table-driven: each fails fast with one line (which input, what was expected, what to
do), a non-zero exit and no traceback. Runs the real CLI in a subprocess against the test stack."""
import json
import math

import pytest
import torch
import yaml

from tests.conftest import run_cli, tiny_config


def _write(tmp_path, cfg) -> str:
    p = tmp_path / "study.yaml"
    p.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
    return str(p)


def _assert_one_line(proc, needle):
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    errors = [l for l in proc.stderr.splitlines() if l.startswith("entcal: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert needle in errors[0], errors[0]


def _broken_model_dir(tmp_path):
    d = tmp_path / "broken-model"
    d.mkdir()
    (d / "config.json").write_text("{not json")
    return str(d)


def _jsonl(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(json.dumps(r) for r in rows))
    return str(p)


# (id, make config from (tmp_path, tiny_model_dir) -> dict | str, expected words in the one line)
CASES = [
    ("unknown-key", lambda t, m: {**tiny_config(m), "num_exampels": 2}, "num_exampels: unknown key"),
    ("not-a-mapping", lambda t, m: "- a\n- b\n", "expected a mapping"),
    ("invalid-yaml", lambda t, m: "models: [\n", "not valid YAML"),
    ("not-utf8", lambda t, m: b"\xff\xfe\x00bad".decode("latin-1"), "config"),
    ("temperature<=0", lambda t, m: tiny_config(m, decodings=[{"temperature": 0}]), "temperature must be > 0"),
    ("top_p>1", lambda t, m: tiny_config(m, decodings=[{"top_p": 1.5}]), "top_p must be"),
    ("top_p=0", lambda t, m: tiny_config(m, decodings=[{"top_p": 0}]), "top_p must be"),
    ("top_k<0", lambda t, m: tiny_config(m, decodings=[{"top_k": -5}]), "top_k must be >= 0"),
    ("min_p=1", lambda t, m: tiny_config(m, decodings=[{"min_p": 1.0}]), "min_p must be < 1"),
    ("horizon<1", lambda t, m: tiny_config(m, horizon=0), "horizon"),
    ("model-path-missing", lambda t, m: tiny_config(t / "nope"), "is not a directory"),
    ("gguf-missing", lambda t, m: {**tiny_config(m), "models": [{"gguf": str(t / "x.gguf")}]}, "GGUF file"),
    ("model-does-not-load", lambda t, m: tiny_config(_broken_model_dir(t)), "cannot read its config"),
    ("dataset-missing", lambda t, m: tiny_config(m, datasets=[{"name": "x", "path": str(t / "no.jsonl")}]),
     "does not exist"),
    ("dataset-empty", lambda t, m: tiny_config(m, datasets=[{"name": "x", "path": _jsonl(t, [])}]), "is empty"),
    ("text-column-missing", lambda t, m: tiny_config(m, datasets=[{"name": "x", "path": _jsonl(t, [{"body": "hi"}])}]),
     "no column 'text'"),
    ("too-few-examples", lambda t, m: tiny_config(m, datasets=[{"name": "x", "path": _jsonl(t, [{"text": "short"}] * 3)}]),
     "0 usable examples of 2 requested"),
]


@pytest.mark.parametrize("make, needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_config(tmp_path, tiny_model_dir, stack, prefect_server, make, needle):
    cfg = make(tmp_path, tiny_model_dir)
    if isinstance(cfg, str) and cfg.startswith("\xff"):
        path = tmp_path / "study.yaml"
        path.write_bytes(b"\xff\xfe\x00bad: [")
        _assert_one_line(run_cli("run", "--config", str(path)), needle)
        return
    _assert_one_line(run_cli("run", "--config", _write(tmp_path, cfg)), needle)


def test_missing_config(tmp_path):
    _assert_one_line(run_cli("run", "--config", str(tmp_path / "absent.yaml")), "no such file")


def _dead_url():
    from storage.stack import free_port

    return f"http://127.0.0.1:{free_port()}"


ENDPOINT_CASES = [
    ("s3-unreachable", lambda st: {"ENTCAL_S3_ENDPOINT_URL": _dead_url(), "AWS_ACCESS_KEY_ID": "a",
                                   "AWS_SECRET_ACCESS_KEY": "b"}, "is unreachable"),
    ("s3-wrong-credentials", lambda st: {"ENTCAL_S3_ENDPOINT_URL": st.s3_endpoint, "AWS_ACCESS_KEY_ID": "nobody",
                                         "AWS_SECRET_ACCESS_KEY": "wrong"}, "refused the credentials"),
    ("s3-missing-bucket", lambda st: {"ENTCAL_S3_ENDPOINT_URL": st.s3_endpoint, "AWS_ACCESS_KEY_ID": st.access_key,
                                      "AWS_SECRET_ACCESS_KEY": st.secret_key, "ENTCAL_BUCKET": "no-such-bucket"},
     "bucket 'no-such-bucket' does not exist"),
    ("mlflow-unreachable", lambda st: {"MLFLOW_TRACKING_URI": _dead_url()}, "MLflow at"),
    ("prefect-unreachable", lambda st: {"PREFECT_API_URL": _dead_url() + "/api"}, "Prefect API at"),
]


@pytest.mark.parametrize("make_env, needle", [c[1:] for c in ENDPOINT_CASES], ids=[c[0] for c in ENDPOINT_CASES])
def test_bad_endpoint(tmp_path, tiny_model_dir, stack, make_env, needle):
    proc = run_cli("run", "--config", _write(tmp_path, tiny_config(tiny_model_dir)), env=make_env(stack))
    _assert_one_line(proc, needle)


@pytest.mark.parametrize("address, needle", [("127.0.0.1:{port}", "Ray at 127.0.0.1:{port} is unreachable"),
                                             ("ray://nohost", "expected host:port or ray://host:port")],
                         ids=["ray-unreachable", "ray-address-without-port"])
def test_bad_ray_address(tmp_path, tiny_model_dir, stack, address, needle):
    from storage.stack import free_port

    port = free_port()
    cfg = _write(tmp_path, tiny_config(tiny_model_dir, executor="ray"))
    proc = run_cli("run", "--config", cfg, env={"RAY_ADDRESS": address.format(port=port)})
    _assert_one_line(proc, needle.format(port=port))


def test_nan_logits_name_the_example_and_step(tmp_path, stack, prefect_server):
    from tests.conftest import build_tiny_model
    from transformers import AutoModelForCausalLM

    d = build_tiny_model(tmp_path / "nan-model")
    model = AutoModelForCausalLM.from_pretrained(d)
    with torch.no_grad():
        model.model.norm.weight.fill_(math.nan)
    model.save_pretrained(d)
    proc = run_cli("run", "--config", _write(tmp_path, tiny_config(d, name="nan")))
    _assert_one_line(proc, "NaN or +inf in the model's logits for example python-docs/")
    assert "at generation step 0" in proc.stderr
