"""Faults mid-run: a study killed with SIGKILL, a corrupted cached result, the S3 server gone mid-run,
a dead MLflow server. Each either ends with the same tables as an undisturbed run or fails loudly;
nothing is lost or wrong in silence. Runs the real CLI in a subprocess against the test stack (real
rclone S3, MLflow and Prefect servers); nothing is mocked. Faults strike at a named point, not after a
guessed time: the CLI runs under FAULTY_CLI, which kills the study (SIGKILL) or the S3 server right
after a named stage is done."""
import io
import json
import os
import queue
import re
import signal
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

import polars as pl
import pytest
import yaml

from entcal.storage import parts, s3
from tests.conftest import run_cli, s3_keys, start_python, tiny_config, wait_for_s3

pytestmark = pytest.mark.services  # entcal or a server in a subprocess: not in make test-fast

REPO = Path(__file__).resolve().parents[2]
DECODINGS = [{"temperature": 1.0}, {"temperature": 0.9}, {"temperature": 0.8}]
STUDY = dict(name="faults", decodings=DECODINGS, num_examples=8, prompt_tokens=8, max_new_tokens=16,
             min_reference_tokens=16, horizon=16, batch_size=4)
TAG = "tiny/python-docs"
CHILDREN = [f"tiny__python-docs__{k}" for k in ("t1", "t0.9", "t0.8")]


def _write(tmp_path: Path, cfg: dict) -> str:
    p = tmp_path / "study.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


def _bucket(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


# ------------------------------------------------------------------ a CLI with a fault at a named point
FAULTY_CLI = r"""
import os, signal, sys
from entcal.flows import executor

note = executor.Executor._note  # every stage ends here, its result stored: "<stage> <label>", ran or cached


def note_then_fault(self, what, state):
    note(self, what, state)
    if what != os.environ.get("FAULT_AFTER"):
        return
    fault = os.environ["FAULT"]
    if fault == "s3-down":  # the S3 server's process group: the test brings it back
        os.killpg(int(os.environ["FAULT_S3_PID"]), signal.SIGKILL)
        open(os.environ["FAULT_MARK"], "w").close()
    else:  # "kill" (SIGKILL) or "term" (SIGTERM) this study
        os.kill(os.getpid(), signal.SIGKILL if fault == "kill" else signal.SIGTERM)


executor.Executor._note = note_then_fault
from entcal.flows.cli import main
sys.exit(main(sys.argv[1:]))
"""


def fault(kind: str, *, after: str) -> dict[str, str]:
    """The environment that makes FAULTY_CLI strike (``kind``: kill | term | s3-down) right after the stage
    ``after`` (``generate tiny/python-docs/t1``) is done."""
    return {"FAULT": kind, "FAULT_AFTER": after}


class Cli:
    """`entcal ARGS` under FAULTY_CLI (a fault where ``env`` says, else none) in its own process group;
    stderr read line by line."""

    def __init__(self, *args: str, env: dict, stdout: Path):
        self.out = open(stdout, "w")
        self.proc = start_python("-c", FAULTY_CLI, *args, env=env, stdout=self.out, stderr=subprocess.PIPE,
                                 text=True, start_new_session=True)
        self.lines: list[str] = []
        self._q: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self._q.put(line)
        self._q.put(None)

    def wait_for(self, needle: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._q.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                break
            self.lines.append(line)
            if needle in line:
                return
        pytest.fail(f"{needle!r} never logged (exit {self.proc.poll()}):\n" + "".join(self.lines)[-4000:])

    def kill(self) -> int:
        """SIGKILL the CLI's whole process group (a CLI that died alone leaves its children holding its pipes)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        rc = self.proc.wait(60)
        self.out.close()
        return rc

    def finish(self, timeout: float = 400) -> int:
        try:
            rc = self.proc.wait(timeout)
        finally:
            self.kill()
        while (line := self._q.get(timeout=30)) is not None:
            self.lines.append(line)
        return rc

    @property
    def stderr(self) -> str:
        return "".join(self.lines)


# ------------------------------------------------------------------ what is in the result cache
def cached_value(settings, key: str):
    """The value of the Prefect result record stored at `key` (from its JSON on, so a header the
    product might add, e.g. a checksum line, does not matter)."""
    from prefect.results import ResultRecord

    data = s3.get_bytes(settings, key)
    return ResultRecord.deserialize(data[data.index(b"{"):]).result


def cached_table(settings, key: str):
    """The cached value at `key`, with a generation shard's part record resolved to its table."""
    value = cached_value(settings, key)
    if isinstance(value, parts.PartRecord) and value.key.startswith("parts/generations/"):
        table = parts.read(settings, value)
        assert table is not None, f"the part behind {key} is unreadable: {value}"
        return table
    return value


def cached_stages(settings) -> dict[str, str]:
    """{stage label: object key} of the Prefect results under prefect-results/, labelled by content."""
    found = {}
    for key in s3_keys(settings, "prefect-results/"):
        value = cached_table(settings, key)
        if not isinstance(value, pl.DataFrame):
            found[f"other {key[-8:]}"] = key  # e.g. the corpus's alpha (a float)
        elif "prompt_ids" in value.columns:
            found["prepare"] = key
        elif "token_ids" in value.columns:
            found["generate " + "+".join(value["decoding"].unique().sort().to_list())] = key
        else:
            found["score"] = key
    return found


MAIN_STAGES = {"prepare", "generate t1", "generate t0.9", "generate t0.8", "score"}


def stage_outcomes(proc_stderr: str, proc_stdout: str) -> tuple[set[str], set[str]]:
    """(served from cache, ran) from the flow's log lines; checked against the CLI's summary line."""
    cached, ran = set(), set()
    for m in re.finditer(r"prefect\.flow_runs: (.+?): (ran|served from cache)\s*$", proc_stderr, re.M):
        (ran if m[2] == "ran" else cached).add(m[1])
    if cached:
        assert f"Served from cache: {len(cached)} stages; ran: {len(ran)}" in proc_stdout, proc_stdout
    return cached, ran


# ------------------------------------------------------------------ comparing --out directories
def _tables(out: Path) -> dict[str, pl.DataFrame]:
    return {str(p.relative_to(out)): pl.read_parquet(p) for p in sorted(out.rglob("*.parquet"))}


def assert_same_results(a: Path, b: Path, *, config_changed: bool = False) -> None:
    """The same tables and child summaries in two --out directories (a summary's provenance names its run;
    ``config_changed``: the two configs differ in how the study ran, e.g. its shard size, so their digests do)."""
    assert not list(b.glob("*.partial")), f"left behind: {list(b.glob('*.partial'))}"
    ta, tb = _tables(a), _tables(b)
    assert sorted(tb) == sorted(ta)
    assert sorted(p.name for p in b.iterdir() if p.is_dir()) == sorted(CHILDREN)
    for name, df in ta.items():
        other = tb[name]
        if name == "summary.parquet":  # run ids and URLs name the new MLflow runs
            df, other = df.drop("run_id", "run_url"), other.drop("run_id", "run_url")
        assert other.equals(df), f"{name} differs:\n{df}\n{other}"
    for child in CHILDREN:
        ja, jb = (json.loads((d / child / "summary.json").read_text()) for d in (a, b))
        for key in ("provenance", "config_digest") if config_changed else ("provenance",):
            ja.pop(key), jb.pop(key)
        assert jb == ja, child


# ------------------------------------------------------------------ the undisturbed run
@pytest.fixture(scope="module")
def baseline(tmp_path_factory, tiny_model_dir, stack, prefect_server):
    d = tmp_path_factory.mktemp("baseline")
    cfg = _write(d, tiny_config(tiny_model_dir, **STUDY))
    bucket = _bucket("baseline")
    proc = run_cli("run", "--config", cfg, "--out", str(d / "A"), env={"ENTCAL_BUCKET": bucket})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"config": cfg, "out": d / "A", "bucket": bucket}


SHARDED = {**STUDY, "shard_size": 4}  # the same study in shards of 4 prompts (2 per decoding): the same forwards
SHARD_LABELS = [f"generate {TAG}/{d}/shard{i}" for d in ("t1", "t0.9", "t0.8") for i in range(2)]


def _part_mtimes(settings) -> dict[str, object]:
    client = s3.client(settings)
    return {o["Key"]: o["LastModified"] for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=settings.bucket, Prefix="parts/generations/") for o in page.get("Contents", [])}


def test_kill_mid_generation_resumes_at_the_first_unfinished_shard_and_matches_uninterrupted(baseline, stack,
                                                                                             tiny_model_dir, tmp_path):
    """The baseline's study in shards of 4 prompts, killed (SIGKILL) right after t1's first shard: only the
    prompts and that shard are stored, nothing in --out looks finished. The rerun serves both (the part is
    not regenerated, not rewritten), generates the other five shards and scores, and ends with the tables of
    the uninterrupted run in one shard, to the last bit (each shard is one of its batches: rows batched alike
    see the same float arithmetic; another batching gives the same tokens, floats within rounding)."""
    cfg = _write(tmp_path, tiny_config(tiny_model_dir, **SHARDED))
    env = {"ENTCAL_BUCKET": _bucket("shardkill")}
    settings = replace(stack, bucket=env["ENTCAL_BUCKET"])
    out = tmp_path / "B"
    cli = Cli("run", "--config", cfg, "--out", str(out), stdout=tmp_path / "kill.out",
              env={**env, **fault("kill", after=SHARD_LABELS[0])})
    rc = cli.finish()
    assert rc == -signal.SIGKILL, f"the study was not killed mid-generation (exit {rc}):\n{cli.stderr[-3000:]}"
    before = _part_mtimes(settings)
    assert len(before) == 1, before  # shard 0 finished; it died before shard 1 began
    assert not out.exists() or not [p.name for p in out.iterdir() if p.name.startswith("tiny__")]

    proc = run_cli("run", "--config", cfg, "--out", str(out), env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    cached, ran = stage_outcomes(proc.stderr, proc.stdout)
    assert {f"prepare {TAG}", SHARD_LABELS[0]} <= cached, proc.stderr[-4000:]
    assert set(SHARD_LABELS[1:]) | {f"score {TAG}/t1+t0.9+t0.8"} <= ran, proc.stderr[-4000:]
    after = _part_mtimes(settings)
    assert len(after) == len(SHARD_LABELS) and all(after[k] == t for k, t in before.items())
    assert_same_results(baseline["out"], out, config_changed=True)


def test_corrupted_cached_result_is_recomputed_not_trusted(baseline, stack, tmp_path):
    settings = replace(stack, bucket=baseline["bucket"])
    stages = cached_stages(settings)
    assert set(stages) >= MAIN_STAGES
    client = s3.client(settings)
    originals = {s: cached_table(settings, stages[s]) for s in ("generate t0.9", "score")}
    # garbage over one generation, half of the scoring record (a torn write) over the other
    client.put_object(Bucket=settings.bucket, Key=stages["generate t0.9"], Body=os.urandom(4096))
    torn = s3.get_bytes(settings, stages["score"])
    client.put_object(Bucket=settings.bucket, Key=stages["score"], Body=torn[: len(torn) // 2])

    proc = run_cli("run", "--config", baseline["config"], "--out", str(tmp_path / "C"),
                   env={"ENTCAL_BUCKET": baseline["bucket"]})
    assert proc.returncode == 0, proc.stderr[-4000:]
    cached, ran = stage_outcomes(proc.stderr, proc.stdout)
    assert ran == {f"generate {TAG}/t0.9", f"score {TAG}/t1+t0.9+t0.8"}, proc.stderr[-4000:]
    assert {f"prepare {TAG}", f"generate {TAG}/t1", f"generate {TAG}/t0.8"} <= cached, proc.stderr[-4000:]
    assert_same_results(baseline["out"], tmp_path / "C")
    # the recomputed results replaced the corrupted objects
    assert cached_stages(settings) == stages
    for stage, df in originals.items():
        assert cached_table(settings, stages[stage]).equals(df), stage


def test_lost_or_altered_generation_part_is_regenerated(baseline, stack, tmp_path):
    """The cached record survives but the parquet part it points at is gone (t0.9) or altered (t0.8):
    the study notices by the part's checksum and generates exactly those two again."""
    settings = replace(stack, bucket=baseline["bucket"])
    records = {label: cached_value(settings, key) for label, key in cached_stages(settings).items()
               if label in ("generate t0.9", "generate t0.8")}
    client = s3.client(settings)
    client.delete_object(Bucket=settings.bucket, Key=records["generate t0.9"].key)
    altered = pl.read_parquet(io.BytesIO(s3.get_bytes(settings, records["generate t0.8"].key)))
    altered = altered.with_columns(pl.col("step_entropy").list.eval(pl.element() + 1.0))
    buf = io.BytesIO()
    altered.write_parquet(buf)
    s3.put_bytes(settings, records["generate t0.8"].key, buf.getvalue())

    proc = run_cli("run", "--config", baseline["config"], "--out", str(tmp_path / "D"),
                   env={"ENTCAL_BUCKET": baseline["bucket"]})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("is missing or fails its checksum; generating it again") == 2, proc.stderr[-4000:]
    cached, ran = stage_outcomes(proc.stderr, proc.stdout)
    assert ran == {f"generate {TAG}/t0.9", f"generate {TAG}/t0.8"}, proc.stderr[-4000:]
    assert_same_results(baseline["out"], tmp_path / "D")
    for label, rec in records.items():  # the same content is back under the same content address
        assert parts.read(settings, rec) is not None, label


def _alter_value(obj: bytes, old: float, new: float) -> bytes:
    """The stored object with one float64 inside the pickled payload changed (same length): bit rot
    that leaves valid JSON, valid base64 and a valid pickle. Finds the record's "result" string
    wherever it sits in the object, so it works on any wrapping of Prefect's record."""
    import base64
    import struct

    start = obj.index(b'"result":') + len(b'"result":')
    end = obj.index(b'"', start + 1) + 1
    payload = base64.decodebytes(json.loads(obj[start:end]).encode())
    if struct.pack("<d", old) not in payload:
        pytest.fail(f"{old} is not in the stored payload")
    payload = payload.replace(struct.pack("<d", old), struct.pack("<d", new), 1)
    altered = json.dumps(base64.encodebytes(payload).decode()).encode()
    if len(altered) != end - start:
        pytest.fail("the altered payload changed length")
    return obj[:start] + altered + obj[end:]


def test_cached_result_altered_at_rest_is_not_served(stack, prefect_server):
    from prefect.results import ResultStore
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from entcal.flows.results import result_storage

    with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
        block = result_storage(stack)  # the block the study flow saves and uses
        store = ResultStore(result_storage=block)
        key = f"reliability-bitrot-{uuid.uuid4().hex}"
        df = pl.DataFrame({"example_id": ["a", "b"], "step_entropy": [[1.5, 1.25], [0.75, 0.5]]})
        store.write(df, key=key)
        reader = ResultStore(result_storage=block)  # another process: nothing held in memory
        if not (reader.exists(key) and reader.read(key).result.equals(df)):
            pytest.fail("the record does not round-trip unaltered")
        [obj_key] = [k for k in s3_keys(stack, "prefect-results/") if key in k]
        s3.put_bytes(stack, obj_key, _alter_value(s3.get_bytes(stack, obj_key), 1.5, 9.5))
        store = ResultStore(result_storage=block)
        # a reader may refuse it (a cache miss: the stage is recomputed) or fail loudly; never serve 9.5
        if store.exists(key):
            try:
                served = store.read(key).result
            except Exception:
                return
            assert served.equals(df), f"served an altered cached result: {served['step_entropy'].to_list()}"


# ------------------------------------------------------------------ S3 down for 30 s mid-run
def _restart_rclone(root: Path, state: dict) -> subprocess.Popen:
    """The same command, port, data dir and key pair as storage.stack.Stack.up."""
    from entcal.storage.stack import _bin

    port = state["s3"].rsplit(":", 1)[1]
    cmd = [_bin("rclone"), "serve", "s3", str(root / "s3"), "--addr", f"127.0.0.1:{port}", "--vfs-cache-mode", "off"]
    env = {**os.environ, "RCLONE_CONFIG": str(root / "rclone.conf"),
           "RCLONE_AUTH_KEY": f'"{state["access_key"]},{state["secret_key"]}"'}
    log = open(root / "logs" / "s3-restarted.log", "ab")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=root)


OUTAGE_S = 8  # S3 down this long: longer than boto3's first retries' backoff, shorter than all of them


def test_s3_outage_mid_run_is_retried_through(tmp_path, tiny_model_dir, stack, prefect_server):
    from entcal.storage.settings import Settings
    from entcal.storage.stack import Stack

    root = tmp_path / "st"
    own = Stack(root)
    own.up(("s3",))
    st = own.state()
    settings = Settings(root, st["s3"], st["access_key"], st["secret_key"], bucket=st["bucket"])
    env = {"ENTCAL_S3_ENDPOINT_URL": st["s3"], "AWS_ACCESS_KEY_ID": st["access_key"],
           "AWS_SECRET_ACCESS_KEY": st["secret_key"], "ENTCAL_BUCKET": st["bucket"],
           "MLFLOW_TRACKING_URI": stack.mlflow_uri}
    cfg = _write(tmp_path, tiny_config(tiny_model_dir, **{**STUDY, "name": "s3-outage"}))
    restarted, mark = None, tmp_path / "s3-down"
    cli = Cli("run", "--config", cfg, "--out", str(tmp_path / "out"), stdout=tmp_path / "cli.out",
              env={**env, **fault("s3-down", after=f"generate {TAG}/t1"), "FAULT_S3_PID": str(st["pids"]["s3"]),
                   "FAULT_MARK": str(mark)})
    try:
        deadline = time.monotonic() + 300
        while not mark.exists():  # S3 is down from the end of the first generation on: the next stage's
            assert cli.proc.poll() is None and time.monotonic() < deadline, cli.stderr[-3000:]  # cache lookup
            time.sleep(0.2)                                                                   # meets it at once
        time.sleep(OUTAGE_S)
        assert cli.proc.poll() is None, "the study gave up while S3 was down:\n" + cli.stderr[-3000:]
        restarted = _restart_rclone(root, st)
        rc = cli.finish()
        wait_for_s3(settings)
        cached = set(cached_stages(settings))
    finally:
        cli.kill()
        if restarted:
            os.killpg(restarted.pid, signal.SIGTERM)
            restarted.wait(30)
    assert rc == 0, cli.stderr[-4000:]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(CHILDREN)
    for child in CHILDREN:
        assert sorted(p.name for p in (out / child).iterdir()) == [
            "generations.parquet", "prompts.parquet", "reference.parquet", "summary.json"]
        assert pl.read_parquet(out / child / "generations.parquet").height == STUDY["num_examples"]
        assert json.loads((out / child / "summary.json").read_text())["n_examples"] == STUDY["num_examples"]
    # every finished stage was persisted through the outage, or its loss was logged: never silent
    missing = MAIN_STAGES - cached
    assert not missing or "An error was encountered while committing transaction" in cli.stderr, missing


# ------------------------------------------------------------------ MLflow gone mid-run
class Relay:
    """A TCP relay in front of the session's MLflow server that dies (listener and every connection
    closed, so the address refuses connections) when the client sends its request number `die_at`."""

    def __init__(self, target: str, die_at: int):
        self.target = ("127.0.0.1", int(target.rstrip("/").rsplit(":", 1)[1]))
        self.die_at, self.requests, self.dead = die_at, 0, threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.uri = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.socks = [self.listener]
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.dead.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.socks += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src, dst, from_client: bool) -> None:
        try:
            while data := src.recv(65536):
                if from_client:
                    with self.lock:
                        self.requests += data.count(b" HTTP/1.1\r\n")
                        if self.requests >= self.die_at:
                            self.die()
                            return
                dst.sendall(data)
        except OSError:
            pass

    def die(self) -> None:
        self.dead.set()
        for sock in self.socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


def _publish_one_pair(uri: str, relay: "Relay", die_at: int | None) -> str:
    """Publish a study with one model, dataset and decoding through flows.publish.Publisher to the MLflow at
    ``uri``; the relay counts (and, at ``die_at``, dies on) the requests from the child run's start on.
    Returns the child run's id."""
    from entcal.storage.settings import Settings
    from entcal.tasks import metrics
    from entcal.tasks.config import StudyConfig
    from entcal.tasks.contracts import GENERATIONS_SCHEMA, PROMPTS_SCHEMA, REFERENCE_SCHEMA, SummaryKnobs
    from entcal.flows.publish import Publisher

    cfg = StudyConfig.model_validate({"name": "dead-mlflow", "num_examples": 2, "max_new_tokens": 2,
                                      "min_reference_tokens": 2, "bootstrap": 10})
    model, dataset, decoding = cfg.models[0], cfg.datasets[0], cfg.decodings[0]
    ids = ["e0", "e1"]
    prompts = pl.DataFrame({"example_id": ids, "dataset": ["python-docs"] * 2, "prompt_ids": [[1, 2], [3]],
                            "reference_ids": [[4, 5], [6, 7]], "prompt_text": ["a", "b"], "reference_text": ["c", "d"]},
                           schema=PROMPTS_SCHEMA)
    gens = pl.DataFrame({"example_id": ids, "sample": [0, 0], "decoding": ["t1"] * 2, "token_ids": [[1, 2]] * 2,
                         "step_entropy": [[1.0, 2.0]] * 2, "step_logprob": [[-1.0, -2.0]] * 2,
                         "finish_reason": ["length"] * 2, "text": ["x", "y"], "tokens": [["x", ""]] * 2},
                        schema=GENERATIONS_SCHEMA)
    ref = pl.DataFrame({"example_id": ids, "decoding": ["t1"] * 2, "step_logloss": [[1.5, 1.5]] * 2,
                        "step_logloss_untruncated": [[1.5, 1.5]] * 2, "step_entropy": [[1.0, 1.0]] * 2,
                        "step_truncated": [[False, False]] * 2}, schema=REFERENCE_SCHEMA)
    pair = metrics.pair_result(model.label, dataset.label, decoding, prompts, gens, ref, SummaryKnobs(2, 10, 0.95, 0))
    publisher = Publisher(cfg, Settings(Path(os.environ["ENTCAL_STATE_DIR"]), mlflow_uri=uri), None, links={},
                          run_name=f"dead-mlflow-{uuid.uuid4().hex[:6]}")
    with publisher.study() as study:
        relay.requests, relay.die_at = 0, die_at or 10**9  # count from here: the requests the child run makes
        with study.pair(model, dataset, prompts) as children:
            children.publish(pair)
        return children.ids[decoding.key]


@pytest.mark.parametrize("die_at", [1, 3, 7], ids=["before-the-child-run", "while-logging-metrics",
                                                    "while-uploading-tables"])
def test_publish_to_an_mlflow_server_that_died_raises(stack, monkeypatch, die_at):
    from entcal.storage.tracking import TrackingError

    relay = Relay(stack.mlflow_uri, die_at=10**9)
    # MLflow's client retries a refused connection for minutes by default; one retry is enough here
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    try:
        with pytest.raises(TrackingError) as err:  # one line for the CLI, never a silent loss
            _publish_one_pair(relay.uri, relay, die_at)
        assert relay.dead.is_set()
        assert relay.uri.removeprefix("http://") in str(err.value), str(err.value)[:2000]
    finally:
        relay.die()


def test_relay_passes_a_whole_child_run_when_it_does_not_die(stack):
    """The relay itself is transparent: the same publish succeeds through it (and counts its requests)."""
    from mlflow.tracking import MlflowClient

    relay = Relay(stack.mlflow_uri, die_at=10**9)
    try:
        run_id = _publish_one_pair(relay.uri, relay, None)
        assert relay.requests > 7
    finally:
        relay.die()
    run = MlflowClient(stack.mlflow_uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["entce"] == pytest.approx(0.0)
