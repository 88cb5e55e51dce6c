"""Endpoints and credentials, from the environment only (never from study configs, never logged).

| variable | meaning | default |
|---|---|---|
| ENTCAL_STATE_DIR | local state: embedded services' data, logs, caches | ./.entcal |
| ENTCAL_S3_ENDPOINT_URL | S3-compatible endpoint (MinIO, rclone, AWS) | the embedded stack's |
| AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY | S3 credentials | the embedded stack's |
| AWS_DEFAULT_REGION | region | us-east-1 |
| ENTCAL_BUCKET | bucket for artifacts and cached results | entcal |
| MLFLOW_TRACKING_URI | MLflow server | the embedded stack's |
| PREFECT_API_URL | Prefect server | the embedded stack's, else Prefect's ephemeral API |

When a variable is unset and the embedded stack (``entcal stack up``) is running, its values
are used; they live in ``$ENTCAL_STATE_DIR/stack.json`` (mode 0600).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path


def state_dir() -> Path:
    return Path(os.environ.get("ENTCAL_STATE_DIR", ".entcal")).absolute()


@dataclass(frozen=True)
class Settings:
    state_dir: Path
    s3_endpoint: str | None = None
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    region: str = "us-east-1"
    bucket: str = "entcal"
    mlflow_uri: str | None = None
    prefect_api: str | None = None

    @property
    def artifact_root(self) -> str:
        return f"s3://{self.bucket}/mlflow"

    def secrets(self) -> list[str]:
        """Values that must never appear in logs, params, tags or artifacts."""
        return [s for s in (self.access_key, self.secret_key) if s]

    def s3_env(self) -> dict[str, str]:
        """Environment for a child process that talks to S3 (e.g. the MLflow server)."""
        env = {"AWS_DEFAULT_REGION": self.region, "MLFLOW_BOTO_CLIENT_ADDRESSING_STYLE": "path"}
        if self.s3_endpoint:
            env["MLFLOW_S3_ENDPOINT_URL"] = self.s3_endpoint
            env["AWS_ENDPOINT_URL_S3"] = self.s3_endpoint
        if self.access_key:
            env["AWS_ACCESS_KEY_ID"] = self.access_key
        if self.secret_key:
            env["AWS_SECRET_ACCESS_KEY"] = self.secret_key
        return env


def stack_file(root: Path | None = None) -> Path:
    return (root or state_dir()) / "stack.json"


def read_stack_file(root: Path | None = None) -> dict:
    p = stack_file(root)
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}


def from_env(env: dict[str, str] | None = None) -> Settings:
    """Settings from the environment, falling back to the embedded stack's recorded values."""
    env = os.environ if env is None else env
    root = Path(env.get("ENTCAL_STATE_DIR", ".entcal")).absolute()
    stack = read_stack_file(root)
    return Settings(
        state_dir=root,
        s3_endpoint=env.get("ENTCAL_S3_ENDPOINT_URL") or stack.get("s3"),
        access_key=env.get("AWS_ACCESS_KEY_ID") or stack.get("access_key"),
        secret_key=env.get("AWS_SECRET_ACCESS_KEY") or stack.get("secret_key"),
        region=env.get("AWS_DEFAULT_REGION", "us-east-1"),
        bucket=env.get("ENTCAL_BUCKET") or stack.get("bucket") or "entcal",
        mlflow_uri=env.get("MLFLOW_TRACKING_URI") or stack.get("mlflow"),
        prefect_api=env.get("PREFECT_API_URL") or stack.get("prefect"),
    )


