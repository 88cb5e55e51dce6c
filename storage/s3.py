"""boto3 against any S3-compatible store: path-style addressing, retries, bucket bootstrap."""
from __future__ import annotations

import hashlib
import logging

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

from entcal.storage.errors import UserError
from entcal.storage.settings import Settings

log = logging.getLogger(__name__)


class StorageError(UserError, RuntimeError):
    """S3 is unreachable, refuses the credentials, or lacks the bucket: the message says which."""


def client(settings: Settings, *, attempts: int = 8):
    if not settings.s3_endpoint:
        raise StorageError("S3: no endpoint (set ENTCAL_S3_ENDPOINT_URL, or run `entcal stack up`)")
    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint,
        aws_access_key_id=settings.access_key,
        aws_secret_access_key=settings.secret_key,
        region_name=settings.region,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": attempts, "mode": "standard"},
                      connect_timeout=5, read_timeout=60),
    )


def explain(err: Exception, settings: Settings) -> str:
    """One line for an S3 failure: unreachable, bad credentials, or missing bucket."""
    if isinstance(err, EndpointConnectionError):
        return f"S3 endpoint {settings.s3_endpoint} is unreachable (is the server up? `entcal stack status`)"
    if isinstance(err, ClientError):
        code = err.response.get("Error", {}).get("Code", "")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden"):
            return f"S3 at {settings.s3_endpoint} refused the credentials ({code}): check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
        if code in ("NoSuchBucket", "404", "NotFound"):
            return f"S3 bucket {settings.bucket!r} does not exist at {settings.s3_endpoint} (create it or set ENTCAL_BUCKET)"
        return f"S3 error {code} at {settings.s3_endpoint}: {err}"
    return f"S3 at {settings.s3_endpoint}: {err.__class__.__name__}: {err}"


def ensure_bucket(settings: Settings, *, create: bool = True) -> None:
    """Fail fast (two attempts) when S3 is unreachable, refuses the keys, or lacks the bucket."""
    s3 = client(settings, attempts=2)
    try:
        s3.head_bucket(Bucket=settings.bucket)
        return
    except ClientError as err:
        code = err.response.get("Error", {}).get("Code", "")
        if code not in ("404", "NoSuchBucket", "NotFound") or not create:
            raise StorageError(explain(err, settings)) from None
    except BotoCoreError as err:
        raise StorageError(explain(err, settings)) from None
    s3.create_bucket(Bucket=settings.bucket)
    log.info("created bucket %s at %s", settings.bucket, settings.s3_endpoint)


def put_bytes(settings: Settings, key: str, data: bytes) -> None:
    """One PUT: S3 makes the object visible only when complete, so readers never see half of it."""
    try:
        client(settings).put_object(Bucket=settings.bucket, Key=key, Body=data)
    except (BotoCoreError, ClientError) as err:
        raise StorageError(explain(err, settings)) from None


def put_content(settings: Settings, folder: str, data: bytes, suffix: str) -> str | None:
    """``data`` as ``s3://<bucket>/<folder>/<sha256 of data, 16 hex><suffix>``: named by its content, so
    writing it again changes nothing. None without an S3 endpoint."""
    if not settings.s3_endpoint:
        return None
    key = f"{folder}/{hashlib.sha256(data).hexdigest()[:16]}{suffix}"
    put_bytes(settings, key, data)
    return f"s3://{settings.bucket}/{key}"


def get_bytes(settings: Settings, key: str) -> bytes | None:
    """The object's bytes, or None when there is no such key."""
    try:
        return client(settings).get_object(Bucket=settings.bucket, Key=key)["Body"].read()
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
            return None
        raise StorageError(explain(err, settings)) from None
    except BotoCoreError as err:
        raise StorageError(explain(err, settings)) from None
