"""Start, stop and report the local services, all on 127.0.0.1 by default:

  s3       `rclone serve s3` over a directory on disk (a real S3 server)
  mlflow   `mlflow server`: SQLite backend, artifacts proxied to s3://$bucket/mlflow
  prefect  `prefect server start` (SQLite)

State (data, logs, pids, ports, generated credentials) lives under one directory,
``$ENTCAL_STATE_DIR`` (default ./.entcal). ``up`` is idempotent: healthy services are left
alone. ``stack.json`` is written with mode 0600 because it holds the generated S3 keys.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from entcal.storage import s3
from entcal.storage.errors import UserError
from entcal.storage.settings import Settings, from_env, read_stack_file, stack_file

log = logging.getLogger(__name__)

SERVICES = ("s3", "mlflow", "prefect")
HOST = os.environ.get("ENTCAL_BIND_HOST", "127.0.0.1")


class StackError(UserError, RuntimeError):
    """A service did not come up: the message names it and points at its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    """An executable from this environment's bin/ (the venv), else from PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise StackError(f"{name}: executable not found (run `make setup`)")
    return found


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """True when GET url answers 2xx within the timeout."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return 200 <= r.status < 300
    except Exception:
        return False


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def process_start(pid: int | None) -> float | None:
    """When process `pid` started (seconds since the epoch, to 0.01 s), or None when it does not exist."""
    import psutil

    try:
        return round(psutil.Process(int(pid)).create_time(), 2) if pid else None
    except (psutil.Error, ValueError, TypeError):
        return None


def owner_record(pid: int | None = None) -> dict:
    """Who a process is, so a later process can tell whether it is still alive: host, pid, start time."""
    pid = pid or os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": process_start(pid)}


def owner_alive(owner: dict) -> bool:
    """False only when the owner process is known to be gone: on this host, and its pid is dead or
    now names a process that started at another time (a reused pid). Another host's: assumed alive."""
    if owner.get("host") not in (None, socket.gethostname()):
        return True
    start = process_start(owner.get("pid"))
    return start is not None and (owner.get("start") in (None, "None") or abs(start - float(owner["start"])) < 1.0)


def health(state: dict, name: str) -> bool:
    if name == "s3":
        return _s3_ok(state)
    if name == "mlflow":
        return bool(state.get("mlflow")) and http_ok(state["mlflow"].rstrip("/") + "/health")
    if name == "prefect":
        return bool(state.get("prefect")) and http_ok(state["prefect"].rstrip("/") + "/health")
    raise ValueError(f"unknown service {name!r}")


def _s3_ok(state: dict) -> bool:
    if not state.get("s3"):
        return False
    try:
        with socket.create_connection(("127.0.0.1", int(state["s3"].rsplit(":", 1)[1])), timeout=1):
            return True
    except (OSError, ValueError):
        return False


class Stack:
    def __init__(self, root: Path | None = None):
        self.root = (root or from_env().state_dir).absolute()
        self.file = stack_file(self.root)

    # ---- state
    def state(self) -> dict:
        return read_stack_file(self.root)

    def _save(self, state: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(state, f, indent=2)
        os.replace(tmp, self.file)

    def status(self) -> dict:
        """URLs and health of each service; never the credentials."""
        st = self.state()
        bucket = st.get("bucket", "entcal")
        return {
            "s3": st.get("s3"), "mlflow": st.get("mlflow"), "prefect": st.get("prefect"),
            "bucket": bucket, "artifact_root": f"s3://{bucket}/mlflow", "state_dir": str(self.root),
            "healthy": {name: health(st, name) for name in SERVICES},
        }

    # ---- processes
    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> int:
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        out = open(logs / f"{name}.log", "ab")
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env},
                                start_new_session=True, cwd=self.root)
        return proc.pid

    def _wait(self, state: dict, name: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if health(state, name):
                return
            if not _pid_alive(state.get("pids", {}).get(name)):
                break
            time.sleep(0.5)
        raise StackError(f"{name} did not become healthy in {timeout_s:.0f}s; see {self.root / 'logs' / (name + '.log')}")

    def up(self, services: tuple[str, ...] = SERVICES, ephemeral: bool = False) -> list[str]:
        """Start what is not running. Returns the services this call started.

        ``ephemeral`` (from ``ensure``): what this starts belongs to this process, which stops it when
        done (or a later ``ensure`` adopts it if this one dies). Otherwise (``entcal stack up``) services,
        including ephemeral ones already running, are made permanent: ``ensure`` never stops them."""
        st = self.state()
        st.setdefault("bucket", os.environ.get("ENTCAL_BUCKET", "entcal"))
        st.setdefault("pids", {})
        if not st.get("access_key"):
            st["access_key"] = "entcal-" + secrets.token_hex(6)
            st["secret_key"] = secrets.token_urlsafe(24)
        started = []
        want = [s for s in SERVICES if s in services or (s == "s3" and "mlflow" in services)]
        for name in want:
            if health(st, name):
                if not ephemeral:
                    _make_permanent(st, name)
                continue
            port = free_port()
            if name == "s3":
                data = self.root / "s3"
                (data / st["bucket"]).mkdir(parents=True, exist_ok=True)  # a directory is a bucket
                st["s3"] = f"http://127.0.0.1:{port}"
                cmd = [_bin("rclone"), "serve", "s3", str(data), "--addr", f"{HOST}:{port}", "--vfs-cache-mode", "off"]
                # the key pair goes through the environment: a command line is visible to every local user
                env = {"RCLONE_CONFIG": str(self.root / "rclone.conf"),
                       "RCLONE_AUTH_KEY": f'"{st["access_key"]},{st["secret_key"]}"'}  # CSV-quoted: one pair
                timeout = 30
            elif name == "mlflow":
                st["mlflow"] = f"http://127.0.0.1:{port}"
                cmd = [_bin("mlflow"), "server", "--host", HOST, "--port", str(port),
                       "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                       "--artifacts-destination", f"s3://{st['bucket']}/mlflow", "--workers", "1"]
                cfg = Settings(self.root, st["s3"], st["access_key"], st["secret_key"], bucket=st["bucket"])
                # without MLflow's job runner (GenAI scorers and trace jobs; entcal tracks runs): it is 8 more
                # Python processes, ~16 s more CPU at every start and ~2 GB more memory (measured on 2 cores)
                env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION",
                                                                           "false"), **cfg.s3_env()}
                timeout = float(os.environ.get("ENTCAL_MLFLOW_START_TIMEOUT_S", 300))  # more on a busy machine
            else:
                st["prefect"] = f"http://127.0.0.1:{port}/api"
                cmd = [_bin("prefect"), "server", "start", "--host", HOST, "--port", str(port)]
                # the UI asks /ui-settings where the API is: without this it says 127.0.0.1:4200
                env = {"PREFECT_HOME": str(self.root / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                       "PREFECT_UI_ENABLED": "true", "PREFECT_API_URL": "", "PREFECT_SERVER_UI_API_URL": st["prefect"]}
                timeout = 300  # ~30 s on an idle 2-core machine; far more when it is busy
            st["pids"][name] = self._spawn(name, cmd, env)
            _record_spawn(st, name, ephemeral)
            self._save(st)
            self._wait(st, name, timeout)
            started.append(name)
            log.info("started %s at %s", name, st[name])
        self._save(st)
        return started

    def down(self, services: tuple[str, ...] = SERVICES) -> list[str]:
        """Stop the services this state dir started (each one's whole process group). Returns what was
        stopped. A recorded pid that now names another process (its start time differs) is left alone."""
        st = self.state()
        stopped = []
        for name in reversed(SERVICES):
            pid = st.get("pids", {}).get(name)
            if name not in services or not _pid_alive(pid):
                continue
            if not owner_alive({"pid": pid, "start": st.get("pid_start", {}).get(name)}):
                log.warning("%s: pid %s now names another process; not stopping it", name, pid)
            else:
                _stop_group(pid)
                stopped.append(name)
            for key in ("pids", "pid_start", "owners", "ephemeral"):
                st.get(key, {}).pop(name, None)
            st.pop(name, None)
        if st:
            self._save(st)
        return stopped

    # ---- ownership: services ``ensure`` started belong to the entcal processes using them
    @contextmanager
    def lock(self):
        """Exclusive hold on this state dir's bookkeeping; the OS drops it if the holder dies (kill -9)."""
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "stack.lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def reap(self, services: tuple[str, ...]) -> list[str]:
        """Stop ephemeral services whose owners are all gone and that do not answer (e.g. killed while
        still starting), so ``up`` starts them afresh instead of leaving them running for good."""
        st = self.state()
        stale = [n for n in services if st.get("ephemeral", {}).get(n) and not health(st, n)
                 and not any(owner_alive(o) for o in st.get("owners", {}).get(n, []))]
        for name in stale:
            log.warning("stopping %s (pid %s): started by entcal process %s, which is gone, and not answering", name,
                        st.get("pids", {}).get(name), _pids(st, name))
        return self.down(tuple(stale)) if stale else []

    def claim(self, services: tuple[str, ...]) -> list[str]:
        """Add this process to the owners of the ephemeral services among ``services``. One whose
        previous owners are all gone (killed with SIGKILL, so they never stopped it) is adopted: this
        process stops it when done. Returns the adopted ones."""
        st, me, adopted = self.state(), owner_record(), []
        for name in services:
            if not st.get("ephemeral", {}).get(name):
                continue
            before = st.setdefault("owners", {}).get(name, [])
            live = [o for o in before if owner_alive(o) and not _same(o, me)]
            if before and not live and not any(_same(o, me) for o in before):
                adopted.append(name)
                log.warning("adopting %s at %s, left running by entcal process %s (gone): stopped when this run ends",
                            name, st.get(name), _pids(st, name))
            st["owners"][name] = live + [me]
        self._save(st)
        return adopted

    def release(self, services: tuple[str, ...]) -> list[str]:
        """Remove this process (and gone ones) from the owners; stop the ephemeral services this process
        owned that no live process uses any more. Returns what was stopped."""
        st, me, idle = self.state(), owner_record(), []
        for name in services:
            owners = st.get("owners", {}).get(name, [])
            if not st.get("ephemeral", {}).get(name) or not any(_same(o, me) for o in owners):
                continue
            st["owners"][name] = [o for o in owners if owner_alive(o) and not _same(o, me)]
            if not st["owners"][name]:
                idle.append(name)
        self._save(st)
        return self.down(tuple(idle)) if idle else []


def _record_spawn(st: dict, name: str, ephemeral: bool) -> None:
    """Note the new service process's start time and, from ``ensure``, that this process owns it."""
    st.setdefault("pid_start", {})[name] = process_start(st["pids"][name])
    if ephemeral:
        st.setdefault("ephemeral", {})[name] = True
        st.setdefault("owners", {})[name] = [owner_record()]
    else:
        _make_permanent(st, name)


def _make_permanent(st: dict, name: str) -> None:
    """`entcal stack up` keeps the service: no owner, and ``ensure`` never stops it."""
    st.get("ephemeral", {}).pop(name, None)
    st.get("owners", {}).pop(name, None)


def _same(a: dict, b: dict) -> bool:
    return a.get("pid") == b.get("pid") and a.get("host") == b.get("host")


def _pids(st: dict, name: str) -> str:
    return ", ".join(str(o.get("pid")) for o in st.get("owners", {}).get(name, [])) or "unknown"


def _group_gone(pgid: int) -> bool:
    """No live (non-zombie) process left in the process group; reaps the leader if it is our child."""
    import psutil

    try:
        os.waitpid(pgid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                return False
        except (OSError, psutil.Error):
            continue
    return True


def _stop_group(pid: int, grace_s: float = 10.0) -> None:
    """SIGTERM the process group `pid` leads (servers start in their own session); SIGKILL what is
    left after ``grace_s``."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except OSError:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if _group_gone(pid):
            return
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass


@contextmanager
def ensure(services: tuple[str, ...] = ("s3", "mlflow"), root: Path | None = None):
    """Use running services, start the missing ones, and on exit stop those nobody else still uses.

    What this starts is *ephemeral* (stack.json: ``ephemeral[name]``, ``owners[name]`` = the entcal
    processes using it, each {host, pid, start}). A process killed with SIGKILL never stops its services:
    the next ``ensure`` adopts the healthy ones (and stops them when it is done) and stops the ones that
    no longer answer. Services started by ``entcal stack up`` are permanent and never stopped here.
    Services configured through the environment (ENTCAL_S3_ENDPOINT_URL, MLFLOW_TRACKING_URI)
    are used as they are and never started here.
    """
    env = os.environ
    external = {"s3": bool(env.get("ENTCAL_S3_ENDPOINT_URL")), "mlflow": bool(env.get("MLFLOW_TRACKING_URI")),
                "prefect": bool(env.get("PREFECT_API_URL"))}
    stack = Stack(root)
    wanted = tuple(s for s in services if not external[s])
    names = tuple(s for s in SERVICES if s in wanted or (s == "s3" and "mlflow" in wanted))
    try:
        if wanted:
            with stack.lock():  # one process at a time starts, adopts or stops this state dir's services
                stack.reap(names)
                stack.up(wanted, ephemeral=True)
                stack.claim(names)
        settings = from_env({**env, "ENTCAL_STATE_DIR": str(stack.root)})
        s3.ensure_bucket(settings, create=not external["s3"])  # a user's bucket is theirs to create
        yield settings
    finally:
        if names:
            with stack.lock():
                stack.release(names)
