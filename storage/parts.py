"""Parquet parts in the artifact store: one table per finished unit of work (a generation shard).

A part is written once under a content-addressed key (the sha256 of its bytes), so a reader that
holds the part's record can check what it got: a missing, torn or altered object reads as None
(recompute it), never as a table. With no S3 endpoint configured, parts are files under
``$ENTCAL_STATE_DIR/parts/`` (written to a temporary name and renamed into place).

The record (what the cached task returns) is a PartRecord.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import socket
from pathlib import Path

import polars as pl

from entcal.storage import s3
from entcal.storage.settings import Settings

PREFIX = "parts"


@dataclasses.dataclass(frozen=True)
class PartRecord:
    """Where a part is and what it holds: enough to fetch it and check it is the one written."""

    uri: str  # s3://bucket/key, or a local path
    key: str  # parts/<folder>/<sha256>.parquet
    sha256: str
    rows: int
    bytes: int
    worker: str  # host:pid of the process that wrote it
    notes: dict = dataclasses.field(default_factory=dict)  # what the writer measured (engine agreement, loads)


def _local(settings: Settings, key: str) -> Path:
    return settings.state_dir / key


def write(settings: Settings, folder: str, df: pl.DataFrame, notes: dict | None = None) -> PartRecord:
    """Store ``df`` as ``parts/<folder>/<sha256>.parquet``; returns its record (with ``notes``)."""
    buf = io.BytesIO()
    df.write_parquet(buf, statistics=False)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    key = f"{PREFIX}/{folder.strip('/')}/{digest}.parquet"
    if settings.s3_endpoint:
        s3.put_bytes(settings, key, data)
        uri = f"s3://{settings.bucket}/{key}"
    else:
        path = _local(settings, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.partial")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        uri = str(path)
    return PartRecord(uri=uri, key=key, sha256=digest, rows=df.height, bytes=len(data),
                      worker=f"{socket.gethostname()}:{os.getpid()}", notes=dict(notes or {}))


def read(settings: Settings, record: PartRecord) -> pl.DataFrame | None:
    """The part's table, or None when the object is missing or fails its checksum."""
    key, uri = record.key, record.uri
    if uri.startswith("s3://"):
        bucket = uri.removeprefix("s3://").split("/", 1)[0]
        data = s3.get_bytes(dataclasses.replace(settings, bucket=bucket), key)
    else:
        path = _local(settings, key)
        data = path.read_bytes() if path.is_file() else None
    if data is None or hashlib.sha256(data).hexdigest() != record.sha256:
        return None
    df = pl.read_parquet(io.BytesIO(data))
    return df if df.height == record.rows else None
