import json

import pandas as pd
import pytest

from napari_cellmae.store import (
    atomic_path,
    file_sha256,
    run_record,
    write_json_atomic,
    write_table_atomic,
)


def test_atomic_write_keeps_old_file_on_error(tmp_path):
    target = tmp_path / "out" / "table.parquet"
    write_table_atomic(pd.DataFrame({"a": [1, 2]}), target, csv_twin=True)
    assert pd.read_parquet(target)["a"].tolist() == [1, 2]
    assert (tmp_path / "out" / "table.csv").read_text().splitlines() == ["a", "1", "2"]
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert pd.read_parquet(target)["a"].tolist() == [1, 2]  # untouched
    assert sorted(p.name for p in target.parent.iterdir()) == ["table.csv", "table.parquet"]


def test_outputs_get_normal_permissions(tmp_path):
    import stat

    path = write_json_atomic(tmp_path / "config.json", {"a": 1})
    (tmp_path / "plain.json").write_text("{}")  # what a plain open() gives under this umask
    expected = stat.S_IMODE((tmp_path / "plain.json").stat().st_mode)
    assert stat.S_IMODE(path.stat().st_mode) == expected


def test_json_and_checksum(tmp_path):
    path = write_json_atomic(tmp_path / "config.json", run_record(model="m", channels=["DNA"]))
    record = json.loads(path.read_text())
    assert record["model"] == "m" and record["napari_cellmae_version"]
    (tmp_path / "x.bin").write_bytes(b"abc")
    assert file_sha256(tmp_path / "x.bin").startswith("ba7816bf")
