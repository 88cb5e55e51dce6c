"""Prefect result storage in the entcal bucket, so cached generation and scoring are shared by
every process and machine pointed at the same S3 store.

The block holds only the bucket and a prefix; the endpoint and the credentials are read from the
environment at each call (storage.settings), so no secret is ever saved in Prefect's database.
"""
from __future__ import annotations

import dataclasses
import hashlib

import anyio
from prefect.filesystems import WritableFileSystem

from entcal.storage import s3
from entcal.storage.settings import Settings, from_env

HEADER = b"entcal-sha256:"

BLOCK_NAME = "entcal-results"


class EntcalS3Results(WritableFileSystem):
    """Task results as objects under s3://<bucket>/<prefix>/ (boto3, path-style)."""

    _block_type_name = "entcal S3 results"
    _description = "entcal task results in S3-compatible storage; credentials from the environment."
    bucket: str = "entcal"
    prefix: str = "prefect-results"

    def _settings(self) -> Settings:
        return dataclasses.replace(from_env(), bucket=self.bucket)

    def _key(self, path: str) -> str:
        return f"{self.prefix.strip('/')}/{str(path).lstrip('/')}"

    def _digest(self, key: str, content: bytes) -> bytes:
        return hashlib.sha256(key.encode() + b"\0" + content).hexdigest().encode()

    def read_path(self, path: str, **_) -> bytes:
        """The stored bytes, only if their checksum (over key and content) holds: an object altered at rest
        or copied under another key raises, which Prefect treats as a cache miss, so the stage reruns."""
        key = self._key(path)
        data = s3.get_bytes(self._settings(), key)
        if data is None:
            raise ValueError(f"no result at s3://{self.bucket}/{key}")
        head, _, content = data.partition(b"\n")
        if not head.startswith(HEADER) or head[len(HEADER):] != self._digest(key, content):
            raise ValueError(f"cached result at s3://{self.bucket}/{key} fails its checksum; recomputing")
        return content

    def write_path(self, path: str, content: bytes, **_) -> str:
        key = self._key(path)
        s3.put_bytes(self._settings(), key, HEADER + self._digest(key, content) + b"\n" + content)
        return f"s3://{self.bucket}/{key}"

    async def aread_path(self, path: str) -> bytes:
        return await anyio.to_thread.run_sync(self.read_path, path)

    async def awrite_path(self, path: str, content: bytes) -> str:
        return await anyio.to_thread.run_sync(self.write_path, path, content)


def part_settings() -> Settings:
    """Where the running task's parquet parts go: the bucket of its S3 result storage, else local files
    (storage/parts.py), so parts always sit beside the cached records that point at them."""
    from prefect.context import TaskRunContext

    ctx = TaskRunContext.get()
    storage = ctx.result_store.result_storage if ctx and ctx.result_store else None
    settings = from_env()
    if isinstance(storage, EntcalS3Results):
        return dataclasses.replace(settings, bucket=storage.bucket)
    return dataclasses.replace(settings, s3_endpoint=None)


def result_storage(settings: Settings) -> EntcalS3Results | None:
    """The saved S3 result block when S3 is configured, else None (Prefect's local default)."""
    if not settings.s3_endpoint:
        return None
    from prefect.exceptions import ObjectAlreadyExists

    block = EntcalS3Results(bucket=settings.bucket)
    try:
        block.save(BLOCK_NAME, overwrite=True)
    except ObjectAlreadyExists:  # two first studies registered it at once: the second save overwrites
        block.save(BLOCK_NAME, overwrite=True)
    return block
