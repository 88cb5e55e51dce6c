"""Bad input, table-driven: each fails fast with one line (which input, what was expected, what to
do). The bad configs (tests/cases.py) are checked here through the loader and preflight in-process
(tests/flows/test_cli.py runs them through the CLI); bad endpoints, Ray addresses and a model that
yields NaN run the real CLI in a subprocess against the test stack: a non-zero exit and no traceback."""
import math

import pytest
import torch
import yaml

from entcal.storage.errors import UserError
from tests.cases import BAD_CONFIGS
from tests.conftest import assert_one_line_error, build_tiny_model, run_cli, tiny_config


def _write(tmp_path, cfg: dict) -> str:
    p = tmp_path / "study.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


@pytest.mark.parametrize("case", BAD_CONFIGS, ids=[c.id for c in BAD_CONFIGS])
def test_bad_config(tmp_path, tiny_model_dir, case):
    """What `entcal run` does before any service starts: load the file, then preflight every input."""
    from entcal.flows.preflight import preflight
    from entcal.tasks.config import load_config

    path = case.write(tmp_path, tiny_model_dir)
    with pytest.raises(UserError) as err:
        preflight(load_config(path))
    message = str(err.value)
    assert case.expected_in(tmp_path) in message and "\n" not in message, message


def test_preflight_imports_neither_prefect_nor_mlflow():
    """The CLI checks a config before it imports the flow: preflight's imports stay light, so a mistake fails
    in seconds (a fresh interpreter: this one has imported both already)."""
    import subprocess
    import sys

    code = ("import sys, entcal.flows.preflight; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'prefect', 'mlflow', 'ray', 'vllm'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]


def _dead_url():
    from entcal.storage.stack import free_port

    return f"http://127.0.0.1:{free_port()}"


# (id, make the environment from the test stack's settings, the one line; "{VAR}" is that variable's value)
ENDPOINT_CASES = [
    ("s3-unreachable", lambda st: {"ENTCAL_S3_ENDPOINT_URL": _dead_url(), "AWS_ACCESS_KEY_ID": "a",
                                   "AWS_SECRET_ACCESS_KEY": "b"},
     "S3 endpoint {ENTCAL_S3_ENDPOINT_URL} is unreachable"),
    ("s3-wrong-credentials", lambda st: {"ENTCAL_S3_ENDPOINT_URL": st.s3_endpoint, "AWS_ACCESS_KEY_ID": "nobody",
                                         "AWS_SECRET_ACCESS_KEY": "wrong"},
     "S3 at {ENTCAL_S3_ENDPOINT_URL} refused the credentials"),
    ("s3-missing-bucket", lambda st: {"ENTCAL_S3_ENDPOINT_URL": st.s3_endpoint, "AWS_ACCESS_KEY_ID": st.access_key,
                                      "AWS_SECRET_ACCESS_KEY": st.secret_key, "ENTCAL_BUCKET": "no-such-bucket"},
     "S3 bucket 'no-such-bucket' does not exist at {ENTCAL_S3_ENDPOINT_URL}"),
    ("mlflow-unreachable", lambda st: {"MLFLOW_TRACKING_URI": _dead_url()},
     "MLflow at {MLFLOW_TRACKING_URI} is unreachable"),
    ("prefect-unreachable", lambda st: {"PREFECT_API_URL": _dead_url() + "/api"},
     "Prefect API at {PREFECT_API_URL} is unreachable"),
]


@pytest.mark.parametrize("make_env, needle", [c[1:] for c in ENDPOINT_CASES], ids=[c[0] for c in ENDPOINT_CASES])
def test_bad_endpoint(tmp_path, tiny_model_dir, stack, make_env, needle):
    env = make_env(stack)
    proc = run_cli("run", "--config", _write(tmp_path, tiny_config(tiny_model_dir)), env=env)
    assert_one_line_error(proc, needle.format(**env))


@pytest.mark.parametrize("address, needle", [("127.0.0.1:{port}", "Ray at 127.0.0.1:{port} is unreachable"),
                                             ("ray://nohost", "expected host:port or ray://host:port")],
                         ids=["ray-unreachable", "ray-address-without-port"])
def test_bad_ray_address(tmp_path, tiny_model_dir, stack, address, needle):
    from entcal.storage.stack import free_port

    port = free_port()
    cfg = _write(tmp_path, tiny_config(tiny_model_dir, executor="ray"))
    proc = run_cli("run", "--config", cfg, env={"RAY_ADDRESS": address.format(port=port)})
    assert_one_line_error(proc, needle.format(port=port))


def test_nan_logits_name_the_example_and_step(tmp_path, stack, prefect_server):
    from transformers import AutoModelForCausalLM

    d = build_tiny_model(tmp_path / "nan-model")
    model = AutoModelForCausalLM.from_pretrained(d)
    with torch.no_grad():
        model.model.norm.weight.fill_(math.nan)
    model.save_pretrained(d)
    proc = run_cli("run", "--config", _write(tmp_path, tiny_config(d, name="nan")))
    assert_one_line_error(proc, "NaN or +inf in the model's logits for example python-docs/")
    assert "at generation step 0" in proc.stderr
