"""One study per device of this machine at a time: an operating-system file lock per device.

A study holds ``fcntl.flock`` on ``<lock dir>/<device>.lock`` for its model-bound part. The kernel
releases a lock when the process that holds it ends, however it ends (``kill -9`` included), so a
killed study leaves nothing to sweep. The lock dir is machine-wide, ``$ENTCAL_LOCK_DIR`` or
``<tmp>/entcal-locks`` (sticky and world-writable, like /tmp): studies with different state dirs, or of
different users, see each other's locks. While it holds a lock, a study writes who it is into the lock
file (JSON: study, pid, host, since), so a study that waits can say for whom.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import tempfile
import time
from pathlib import Path


def lock_dir() -> Path:
    return Path(os.environ.get("ENTCAL_LOCK_DIR") or Path(tempfile.gettempdir()) / "entcal-locks")


def _file(device: str) -> Path:
    d = lock_dir()
    if not d.is_dir():
        d.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):  # another user's folder: it is already shared
            d.chmod(0o1777)
    return d / (re.sub(r"[^A-Za-z0-9_.-]", "_", device) + ".lock")


def holder(device: str) -> dict | None:
    """Who holds ``device``'s lock now, as the holder wrote it (None if nobody wrote or it is unreadable)."""
    try:
        return json.loads(_file(device).read_text() or "null")
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def hold(devices: list[str], study: str, log):
    """Hold the locks of ``devices`` (in sorted order, so two studies never wait on each other) for the
    block. A device another study holds: say so once on ``log`` ("waiting for cuda:0 on this machine"), then
    wait until the kernel hands the lock over."""
    with contextlib.ExitStack() as held:
        for device in sorted(set(devices)):
            path = _file(device)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            held.callback(os.close, fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                other = holder(device) or {}
                log.info("waiting for %s on this machine: study %s (pid %s) is using it", device,
                         other.get("study", "?"), other.get("pid", "?"))
                fcntl.flock(fd, fcntl.LOCK_EX)  # a signal (SIGTERM, Ctrl-C) interrupts the wait
            held.callback(fcntl.flock, fd, fcntl.LOCK_UN)
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"study": study, "pid": os.getpid(), "host": socket.gethostname(),
                                      "since": time.time()}).encode(), 0)
            held.callback(os.ftruncate, fd, 0)  # (runs before the unlock: callbacks run last-in first-out)
            log.info("holding %s on this machine", device)
        yield
