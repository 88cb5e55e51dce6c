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

from storage import s3
from storage.errors import UserError
from storage.settings import Settings, from_env, read_stack_file, stack_file

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

    def up(self, services: tuple[str, ...] = SERVICES) -> list[str]:
        """Start what is not running. Returns the services this call started."""
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
                env = cfg.s3_env()
                timeout = 120
            else:
                st["prefect"] = f"http://127.0.0.1:{port}/api"
                cmd = [_bin("prefect"), "server", "start", "--host", HOST, "--port", str(port)]
                env = {"PREFECT_HOME": str(self.root / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                       "PREFECT_UI_ENABLED": "true", "PREFECT_API_URL": ""}
                timeout = 120
            st["pids"][name] = self._spawn(name, cmd, env)
            self._save(st)
            self._wait(st, name, timeout)
            started.append(name)
            log.info("started %s at %s", name, st[name])
        self._save(st)
        return started

    def down(self, services: tuple[str, ...] = SERVICES) -> list[str]:
        """Stop the services this state dir started. Returns what was stopped."""
        st = self.state()
        stopped = []
        for name in reversed(SERVICES):
            pid = st.get("pids", {}).get(name)
            if name not in services or not _pid_alive(pid):
                continue
            try:
                os.killpg(pid, signal.SIGTERM)
            except OSError:
                os.kill(pid, signal.SIGTERM)
            for _ in range(20):
                if not _pid_alive(pid):
                    break
                time.sleep(0.25)
            else:
                os.killpg(pid, signal.SIGKILL)
            st["pids"].pop(name, None)
            st.pop(name, None)
            stopped.append(name)
        if st:
            self._save(st)
        return stopped


@contextmanager
def ensure(services: tuple[str, ...] = ("s3", "mlflow"), root: Path | None = None):
    """Use running services, start the missing ones, and stop on exit only what this started.

    Services configured through the environment (ENTCAL_S3_ENDPOINT_URL, MLFLOW_TRACKING_URI)
    are used as they are and never started here.
    """
    env = os.environ
    external = {"s3": bool(env.get("ENTCAL_S3_ENDPOINT_URL")), "mlflow": bool(env.get("MLFLOW_TRACKING_URI")),
                "prefect": bool(env.get("PREFECT_API_URL"))}
    stack = Stack(root)
    started = stack.up(tuple(s for s in services if not external[s])) if not all(external[s] for s in services) else []
    try:
        settings = from_env()
        s3.ensure_bucket(settings, create=not external["s3"])  # a user's bucket is theirs to create
        yield settings
    finally:
        if started:
            stack.down(tuple(started))
