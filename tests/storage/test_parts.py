"""Parquet parts: content-addressed tables in the real S3 server (or local files), verified on read."""
import dataclasses

import polars as pl
import pytest

from entcal.storage import parts, s3

TABLE = pl.DataFrame({"example_id": ["a", "b"], "token_ids": [[1, 2, 3], [4]],
                      "step_entropy": [[0.5, 0.25, 0.125], [1.0]]},
                     schema={"example_id": pl.String, "token_ids": pl.List(pl.Int32),
                             "step_entropy": pl.List(pl.Float32)})


@pytest.fixture(params=["s3", "local"])
def settings(request, stack, tmp_path):
    if request.param == "s3":
        return stack
    return dataclasses.replace(stack, s3_endpoint=None, state_dir=tmp_path)


def _corrupt(settings, record: parts.PartRecord, data: bytes) -> None:
    if record.uri.startswith("s3://"):
        s3.put_bytes(settings, record.key, data)
    else:
        (settings.state_dir / record.key).write_bytes(data)


def test_round_trip_under_a_content_address(settings):
    rec = parts.write(settings, "generations/tiny/docs/t1", TABLE)
    assert rec.key == f"parts/generations/tiny/docs/t1/{rec.sha256}.parquet" and rec.rows == 2
    assert rec.uri.startswith("s3://entcal/") == bool(settings.s3_endpoint)
    assert parts.read(settings, rec).equals(TABLE)
    assert parts.write(settings, "generations/tiny/docs/t1", TABLE).key == rec.key  # same table, same key


@pytest.mark.parametrize("damage", ["missing", "truncated", "altered"])
def test_a_damaged_part_reads_as_none(settings, damage):
    other = TABLE.with_columns(pl.col("example_id") + damage)
    rec = parts.write(settings, "generations/damaged", other)
    if damage == "missing":
        rec = dataclasses.replace(rec, key=rec.key.replace(rec.sha256, "0" * 64))
    elif damage == "truncated":
        _corrupt(settings, rec, b"PAR1" + b"\0" * 10)
    else:
        import io

        buf = io.BytesIO()
        other.with_columns(pl.col("step_entropy").list.eval(pl.element() * 2)).write_parquet(buf)
        _corrupt(settings, rec, buf.getvalue())
    assert parts.read(settings, rec) is None
