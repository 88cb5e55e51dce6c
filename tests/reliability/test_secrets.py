"""The S3 keys never leave the environment and stack.json: a real study through the CLI (keys given
the documented way, in the environment), then everything it wrote is searched for them: its output,
every file under the state dir (service logs, the MLflow and Prefect databases, the S3 objects) and
the --out dir, MLflow runs (params, tags, inputs, artifacts), Prefect records (flow and task runs,
artifacts, logs, blocks), and the command lines of the stack's processes."""
import base64
import json
import signal
import time
import urllib.parse
import uuid
from pathlib import Path

import psutil
import pytest
import yaml

from tests.conftest import run_cli, start_python, tiny_config

LEGIT = {"stack.json"}  # the one place the keys are kept (mode 0600)


# ------------------------------------------------------------------ the scanner
def _forms(secret: str) -> set[bytes]:
    """The secret as raw bytes, URL-quoted, and inside base64 (standard or URL-safe) at any alignment:
    Prefect result records and MLflow payloads hold base64 blobs."""
    raw = secret.encode()
    forms = {raw, urllib.parse.quote(secret, safe="").encode()}
    for pad in range(3):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            enc = encode(b"\0" * pad + raw)
            forms.add(enc[(0, 2, 3)[pad]: -4])  # drop the characters shared with neighbouring bytes
    return forms


def find_secrets(blob: bytes | str, secrets: list[str]) -> list[str]:
    if isinstance(blob, str):
        blob = blob.encode("utf-8", "surrogateescape")
    return [s for s in secrets if any(form in blob for form in _forms(s))]


def scan_tree(root: Path, secrets: list[str], skip: set[str] = frozenset()) -> dict[str, list[str]]:
    """{file: secrets found} for every regular file under root (names in `skip` excepted)."""
    hits = {}
    for path in sorted(Path(root).rglob("*")):
        if path.is_file() and not path.is_symlink() and path.name not in skip:
            try:
                found = find_secrets(path.read_bytes(), secrets)
            except OSError:  # a file removed while we walk (a service's temp file)
                continue
            if found:
                hits[str(path)] = found
    return hits


def command_lines(pids) -> dict[int, str]:
    """{pid: command line} of these processes and all their descendants."""
    out = {}
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            for p in [proc, *proc.children(recursive=True)]:
                try:
                    out[p.pid] = " ".join(p.cmdline())
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
        except psutil.NoSuchProcess:
            pass
    return out


def test_scanner_finds_planted_secrets(tmp_path):
    secret = "planted-" + uuid.uuid4().hex
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "clean.txt").write_text("nothing to see")
    (tmp_path / "a" / "raw.log").write_bytes(b"\x00binary\xff prefix " + secret.encode() + b" suffix")
    (tmp_path / "a" / "stack.json").write_text(secret)  # skipped by name
    for pad in range(3):
        blob = base64.b64encode(b"x" * pad + b"pickle:" + secret.encode() + b":end").decode()
        (tmp_path / "a" / "b" / f"record{pad}.json").write_text(json.dumps({"result": blob}))
    (tmp_path / "a" / "b" / "url.txt").write_text("http://h/?k=" + urllib.parse.quote(secret + "/+=", safe=""))
    hits = scan_tree(tmp_path, [secret, "never-there"], skip=LEGIT)
    assert sorted(Path(p).name for p in hits) == ["raw.log", "record0.json", "record1.json", "record2.json",
                                                  "url.txt"], hits
    assert all(found == [secret] for found in hits.values())
    odd = secret + "/+= &"  # a secret that URL-quoting changes
    assert find_secrets("http://h/?k=" + urllib.parse.quote(odd, safe=""), [odd])
    # a command line is seen too
    proc = start_python("-c", "import time; time.sleep(60)", "--key", secret)
    try:
        deadline = time.monotonic() + 30  # until exec'd: before that the child's command line is its parent's
        while not any(find_secrets(c, [secret]) for c in command_lines([proc.pid]).values()):
            assert time.monotonic() < deadline, command_lines([proc.pid])
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)


# ------------------------------------------------------------------ one real study
@pytest.fixture(scope="module")
def study_run(tmp_path_factory, tiny_model_dir, stack, prefect_server):
    d = tmp_path_factory.mktemp("secrets")
    name = f"secrets-{uuid.uuid4().hex[:8]}"
    cfg = d / "study.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tiny_model_dir, name=name, num_examples=4,
                                              decodings=[{"temperature": 1.0}, {"temperature": 1.0, "top_p": 0.9}])))
    env = {"ENTCAL_S3_ENDPOINT_URL": stack.s3_endpoint, "AWS_ACCESS_KEY_ID": stack.access_key,
           "AWS_SECRET_ACCESS_KEY": stack.secret_key, "MLFLOW_TRACKING_URI": stack.mlflow_uri}
    proc = run_cli("run", "--config", str(cfg), "--out", str(d / "out"), env=env, check=True)
    assert stack.secrets() and all(len(s) >= 12 for s in stack.secrets())
    return {"proc": proc, "out": d / "out", "name": name}


def test_cli_output_has_no_secrets(study_run, stack):
    proc = study_run["proc"]
    assert "MLflow run:" in proc.stdout  # the output we scan is the real one
    assert not find_secrets(proc.stdout + proc.stderr, stack.secrets())


def test_files_written_have_no_secrets(study_run, stack):
    out = study_run["out"]
    assert (out / "report.md").is_file() and list(out.glob("*/generations.parquet"))
    state = stack.state_dir
    assert (state / "logs").is_dir() and (state / "mlflow.db").is_file()
    assert list((state / "prefect").rglob("*.db")) and list((state / "s3").rglob("generations.parquet"))
    assert scan_tree(out, stack.secrets()) == {}
    # logs/, mlflow.db, prefect/ (the Prefect server's database), s3/ (every bucket's objects:
    # MLflow artifacts and Prefect's cached results), results/: all but stack.json
    assert scan_tree(state, stack.secrets(), skip=LEGIT) == {}


def test_mlflow_runs_and_artifacts_have_no_secrets(study_run, stack, tmp_path):
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(stack.mlflow_uri)
    secrets, leaks, ours = stack.secrets(), [], []
    experiments, token = [], None
    while True:
        page = client.search_experiments(view_type=ViewType.ALL, max_results=1000, page_token=token)
        experiments += page
        if not (token := page.token):
            break
    for exp in experiments:
        if find_secrets(json.dumps({"name": exp.name, "tags": exp.tags, "location": exp.artifact_location}), secrets):
            leaks.append(f"experiment {exp.name}")
        token = None
        while True:
            runs = client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL, max_results=1000,
                                      page_token=token)
            for run in runs:
                # info, params, tags, metrics and the dataset inputs (name, source, schema, profile)
                if find_secrets(json.dumps(run.to_dictionary(), default=str), secrets):
                    leaks.append(f"run {exp.name}/{run.info.run_name}")
                if exp.name == f"entcal/{study_run['name']}":
                    ours.append(run)
            if not (token := runs.token):
                break
    assert len(ours) == 3  # the study and one child per decoding
    for run in ours:
        dest = tmp_path / run.info.run_id
        dest.mkdir()
        client.download_artifacts(run.info.run_id, "", str(dest))
        files = [p for p in dest.rglob("*") if p.is_file()]
        assert files, run.info.run_name
        leaks += [f"artifact {p}" for p in files if find_secrets(p.read_bytes(), secrets)]
    assert leaks == []


def test_prefect_records_have_no_secrets(study_run, stack, prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    def every(read, **kw):
        items, offset = [], 0
        while batch := read(limit=200, offset=offset, **kw):
            items += batch
            offset += len(batch)
        return items

    def dump(objs) -> str:
        return "\n".join(o.model_dump_json() for o in objs)

    with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
        with get_client(sync_client=True) as client:
            flow_runs = every(client.read_flow_runs)
            records = {
                "flow runs": dump(flow_runs),
                "flow-run parameters": json.dumps([r.parameters for r in flow_runs], default=str),
                "task runs": dump(every(client.read_task_runs)),
                "artifacts": dump(every(client.read_artifacts)),
                "logs": dump(every(client.read_logs)),
                "block documents": dump(every(client.read_block_documents, include_secrets=True)),
                "deployments": dump(every(client.read_deployments)),
                "variables": dump(client.read_variables(limit=200)),
            }
    # what we searched holds this study: its config, its report artifact, its result block
    assert study_run["name"] in records["flow-run parameters"]
    assert f"entcal-{study_run['name']}" in records["artifacts"]
    assert "prefect-results" in records["block documents"]
    assert "stages served from cache" in records["logs"]  # the flow's own log lines reached the API
    leaks = {what: find_secrets(text, stack.secrets()) for what, text in records.items()}
    assert {k: v for k, v in leaks.items() if v} == {}


def test_service_command_lines_have_no_secrets(study_run, stack, prefect_server):
    from entcal.storage.settings import read_stack_file

    pids = read_stack_file(stack.state_dir)["pids"]
    assert {"s3", "mlflow", "prefect"} <= set(pids)
    lines = command_lines(pids.values())
    assert any("rclone" in c for c in lines.values()) and any("mlflow" in c for c in lines.values())
    assert {pid: c for pid, c in lines.items() if find_secrets(c, stack.secrets())} == {}


def test_refused_credentials_are_not_echoed(tmp_path, tiny_model_dir, stack):
    """A wrong secret key fails with one line that names neither key, even with --debug."""
    wrong = "wrong-" + uuid.uuid4().hex
    cfg = tmp_path / "study.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tiny_model_dir, name="secrets-refused")))
    env = {"ENTCAL_S3_ENDPOINT_URL": stack.s3_endpoint, "AWS_ACCESS_KEY_ID": stack.access_key,
           "AWS_SECRET_ACCESS_KEY": wrong}
    for debug in ((), ("--debug",)):
        proc = run_cli(*debug, "run", "--config", str(cfg), env=env)
        assert proc.returncode != 0
        assert "refused the credentials" in proc.stderr or "SignatureDoesNotMatch" in proc.stderr, proc.stderr[-3000:]
        assert not find_secrets(proc.stdout + proc.stderr, [stack.access_key, stack.secret_key, wrong]), debug
