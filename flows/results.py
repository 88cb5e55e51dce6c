"""Prefect result storage in the entcal bucket, so cached generation and scoring are shared by
every process and machine pointed at the same S3 store.

The block holds only the bucket and a prefix; the endpoint and the credentials are read from the
environment at each call (storage.settings), so no secret is ever saved in Prefect's database.
"""
from __future__ import annotations

import anyio
from prefect.filesystems import WritableFileSystem

from storage import s3
from storage.settings import Settings, from_env

BLOCK_NAME = "entcal-results"


class EntcalS3Results(WritableFileSystem):
    """Task results as objects under s3://<bucket>/<prefix>/ (boto3, path-style)."""

    _block_type_name = "entcal S3 results"
    _description = "entcal task results in S3-compatible storage; credentials from the environment."
    bucket: str = "entcal"
    prefix: str = "prefect-results"

    def _settings(self) -> Settings:
        return from_env()

    def _key(self, path: str) -> str:
        return f"{self.prefix.strip('/')}/{str(path).lstrip('/')}"

    def read_path(self, path: str, **_) -> bytes:
        data = s3.get_bytes(self._settings(), self._key(path))
        if data is None:
            raise ValueError(f"no result at s3://{self.bucket}/{self._key(path)}")
        return data

    def write_path(self, path: str, content: bytes, **_) -> str:
        s3.put_bytes(self._settings(), self._key(path), content)
        return f"s3://{self.bucket}/{self._key(path)}"

    async def aread_path(self, path: str) -> bytes:
        return await anyio.to_thread.run_sync(self.read_path, path)

    async def awrite_path(self, path: str, content: bytes) -> str:
        return await anyio.to_thread.run_sync(self.write_path, path, content)


def result_storage(settings: Settings) -> EntcalS3Results | None:
    """The saved S3 result block when S3 is configured, else None (Prefect's local default)."""
    if not settings.s3_endpoint:
        return None
    block = EntcalS3Results(bucket=settings.bucket)
    block.save(BLOCK_NAME, overwrite=True)
    return block
