"""The local stack: real rclone S3 + MLflow server on loopback."""
import json

import pytest

from entcal.storage import s3
from entcal.storage.settings import Settings
from entcal.storage.stack import Stack
from tests.conftest import run_cli, s3_keys

pytestmark = pytest.mark.services  # entcal or a server in a subprocess: not in make test-fast


def test_status_reports_urls_not_secrets(stack):
    st = Stack().status()
    assert st["healthy"]["s3"] and st["healthy"]["mlflow"]
    assert st["s3"].startswith("http://127.0.0.1:") and st["mlflow"].startswith("http://127.0.0.1:")
    assert st["artifact_root"] == f"s3://{st['bucket']}/mlflow"
    text = json.dumps(st)
    assert all(secret not in text for secret in stack.secrets())


def test_up_is_idempotent(stack):
    assert Stack().up(("s3", "mlflow")) == []


def test_stack_file_is_private(stack):
    from entcal.storage.settings import stack_file

    assert stack_file().stat().st_mode & 0o077 == 0


def test_put_and_list_objects(stack):
    client = s3.client(stack)
    client.put_object(Bucket=stack.bucket, Key="probe/a.txt", Body=b"hello")
    assert "probe/a.txt" in s3_keys(stack, "probe/")
    assert client.get_object(Bucket=stack.bucket, Key="probe/a.txt")["Body"].read() == b"hello"


def test_wrong_credentials_and_missing_bucket_are_explained(stack):
    bad = Settings(stack.state_dir, stack.s3_endpoint, "nobody", "wrong-secret", bucket=stack.bucket)
    with pytest.raises(s3.StorageError, match="refused the credentials"):
        s3.ensure_bucket(bad, create=False)
    missing = Settings(stack.state_dir, stack.s3_endpoint, stack.access_key, stack.secret_key, bucket="nope")
    with pytest.raises(s3.StorageError, match="bucket 'nope' does not exist"):
        s3.ensure_bucket(missing, create=False)


def test_unreachable_endpoint_is_explained(tmp_path):
    from entcal.storage.stack import free_port

    dead = Settings(tmp_path, f"http://127.0.0.1:{free_port()}", "a", "b")
    with pytest.raises(s3.StorageError, match="unreachable"):
        s3.ensure_bucket(dead)


def test_cli_stack_status_json(stack):
    out = run_cli("stack", "status", "--json", timeout=120, check=True)
    st = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"s3", "mlflow", "prefect", "bucket", "artifact_root"} <= set(st)


def test_services_listen_on_loopback_only(stack):
    import psutil

    pids = Stack().state()["pids"]
    seen = 0
    for pid in pids.values():
        proc = psutil.Process(pid)
        for p in [proc, *proc.children(recursive=True)]:
            for conn in p.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    seen += 1
                    assert conn.laddr.ip in ("127.0.0.1", "::1"), (p.cmdline()[:3], conn.laddr)
    assert seen >= 2
