"""Tests for proxykd.artifacts: manifests, stage (re)opening, shards, resume ids, atomic writes."""

import json
import os
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from proxykd.artifacts import (
    begin_stage,
    done_ids,
    is_done,
    read_manifest,
    read_shards,
    shard_files,
    stage_dir,
    write_manifest,
    write_table_atomic,
)


def _table(ids, error=None):
    cols = {"id": pa.array(ids, pa.string()), "value": pa.array(list(range(len(ids))), pa.int64())}
    if error is not None:
        cols["error"] = pa.array(error, pa.string())
    return pa.table(cols)


def test_stage_dir(tmp_path):
    assert stage_dir(tmp_path / "run", "teacher") == (tmp_path / "run" / "teacher").resolve()


def test_manifest_and_is_done(tmp_path):
    folder = tmp_path / "teacher"
    folder.mkdir()
    assert read_manifest(folder) is None
    assert not is_done(folder, "abc")

    started = time.time() - 2.0
    m = write_manifest(folder, "teacher", "abc", started, rows={"ok": 3})
    assert is_done(folder, "abc")
    assert not is_done(folder, "abd")
    on_disk = json.loads((folder / "manifest.json").read_text())
    assert on_disk == read_manifest(folder)
    assert on_disk["stage"] == "teacher" and on_disk["config_hash"] == "abc"
    assert on_disk["rows"] == {"ok": 3}
    assert on_disk["seconds"] >= 2.0
    assert "python" in on_disk["versions"]
    assert m["config_hash"] == "abc"
    assert [p.name for p in folder.iterdir()] == ["manifest.json"]  # no temp file left


def test_is_done_missing_folder(tmp_path):
    assert not is_done(tmp_path / "does-not-exist", "abc")


def test_begin_stage_removes_manifest(tmp_path):
    folder = tmp_path / "logits"
    begin_stage(folder, "h1")
    write_manifest(folder, "logits", "h1", time.time())
    assert is_done(folder, "h1")
    begin_stage(folder, "h1")
    assert not (folder / "manifest.json").exists()
    assert not is_done(folder, "h1")


def test_begin_stage_same_hash_keeps_partial_work(tmp_path):
    folder = tmp_path / "align"
    begin_stage(folder, "h1")
    write_table_atomic(_table(["a", "b"]), folder / "part-0.parquet")
    (folder / "round-1").mkdir()
    (folder / "round-1" / "weights.bin").write_bytes(b"123")
    begin_stage(folder, "h1")
    assert (folder / "part-0.parquet").exists()
    assert (folder / "round-1" / "weights.bin").read_bytes() == b"123"
    assert done_ids(folder) == {"a", "b"}


def test_begin_stage_other_hash_drops_partial_work(tmp_path):
    folder = tmp_path / "align"
    begin_stage(folder, "h1")
    write_table_atomic(_table(["a", "b"]), folder / "part-0.parquet")
    (folder / "round-1" / "nested").mkdir(parents=True)
    (folder / "round-1" / "nested" / "w.bin").write_bytes(b"x")
    write_manifest(folder, "align", "h1", time.time())

    begin_stage(folder, "h2")
    assert folder.is_dir()
    assert not (folder / "part-0.parquet").exists()
    assert not (folder / "round-1").exists()
    assert not (folder / "manifest.json").exists()
    assert done_ids(folder) == set()
    assert not is_done(folder, "h1") and not is_done(folder, "h2")
    # the new hash is now the one resumed against: a second begin with h2 keeps new work
    write_table_atomic(_table(["c"]), folder / "part-1.parquet")
    begin_stage(folder, "h2")
    assert done_ids(folder) == {"c"}


def test_an_unreadable_shard_is_quarantined_never_deleted(tmp_path):
    folder = tmp_path / "teacher"
    begin_stage(folder, "h1")
    good = folder / "a.parquet"
    bad = folder / "b.parquet"
    pq.write_table(_table(["x", "y"]), good)
    pq.write_table(_table(["z", "w", "v"]), bad)
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # a crash mid-write: no footer
    (folder / "notes.txt").write_text("not a shard")

    files = shard_files(folder)
    assert files == [good]
    kept = [p for p in folder.iterdir() if p.name.startswith("b.parquet.unreadable-")]
    assert not bad.exists() and len(kept) == 1 and kept[0].read_bytes() == data[: len(data) // 2]
    assert good.exists() and (folder / "notes.txt").exists()
    assert sorted(read_shards(folder)["id"].to_pylist()) == ["x", "y"]
    assert done_ids(folder) == {"x", "y"}
    # reported by the stage's next manifest, and kept when a new config drops the partial work
    assert write_manifest(folder, "teacher", "h1", time.time())["quarantined"] == [kept[0].name]
    begin_stage(folder, "h2")
    assert [p.name for p in folder.iterdir() if p.name != ".config_hash"] == [kept[0].name]


def test_an_empty_file_is_quarantined_too(tmp_path):
    (tmp_path / "empty.parquet").write_bytes(b"")
    pq.write_table(_table(["k"]), tmp_path / "ok.parquet")
    assert [p.name for p in shard_files(tmp_path)] == ["ok.parquet"]
    assert [p.name.split("-")[0] for p in tmp_path.iterdir() if "unreadable" in p.name] == ["empty.parquet.unreadable"]


def test_read_shards_quarantines_a_shard_whose_data_is_corrupt_but_not_one_it_asked_wrongly(tmp_path):
    pq.write_table(_table(["a", "b"]), tmp_path / "0.parquet")
    path = tmp_path / "1.parquet"
    pq.write_table(pa.table({"id": [f"row-{i}" for i in range(2000)], "value": list(range(2000))}), path,
                   compression="zstd")
    data = bytearray(path.read_bytes())
    data[100:400] = b"\xff" * 300  # inside the first data page; the footer still reads
    path.write_bytes(bytes(data))
    pq.read_metadata(path)
    assert sorted(read_shards(tmp_path)["id"].to_pylist()) == ["a", "b"]
    assert not path.exists() and len([p for p in tmp_path.iterdir() if "unreadable" in p.name]) == 1
    # A good shard read for a column it does not have is an error of the caller, not of the file.
    with pytest.raises(Exception):
        read_shards(tmp_path, ["no_such_column"])
    assert (tmp_path / "0.parquet").exists()


def test_an_unreadable_manifest_is_quarantined_and_the_stage_redone(tmp_path):
    write_manifest(tmp_path, "eval", "h", time.time())
    (tmp_path / "manifest.json").write_text('{"stage": "eval", "config_ha')  # cut short
    assert read_manifest(tmp_path) is None and not is_done(tmp_path, "h")
    assert [p.name.split("-")[0] for p in tmp_path.iterdir()] == ["manifest.json.unreadable"]


def test_manifests_shards_and_markers_are_fsynced_before_they_are_renamed_into_place(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                  real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))), real_replace(a, b))[1])
    folder = tmp_path / "stage"
    begin_stage(folder, "h")
    write_table_atomic(_table(["a"]), folder / "part.parquet")
    write_manifest(folder, "stage", "h", time.time())
    for name in (".config_hash", "part.parquet", "manifest.json"):
        final = str(folder / name)
        replace = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == final)
        tmp = events[replace][1]
        assert ("fsync", tmp) in events[:replace], name  # the data is on disk before the rename
        assert ("fsync", str(folder)) in events[replace:], name  # and the rename itself after it


def test_read_shards_concatenates_and_selects(tmp_path):
    pq.write_table(_table(["a", "b"]), tmp_path / "0.parquet")
    pq.write_table(_table(["c"]), tmp_path / "1.parquet")
    t = read_shards(tmp_path, ["id"])
    assert t.column_names == ["id"]
    assert sorted(t["id"].to_pylist()) == ["a", "b", "c"]
    assert read_shards(tmp_path / "nothing").num_rows == 0


def test_done_ids_reads_every_shard(tmp_path):
    pq.write_table(_table(["a", "b", "c"], error=[None, "timeout", None]), tmp_path / "0.parquet")
    pq.write_table(_table(["d", "e"], error=["HTTP 500", None]), tmp_path / "1.parquet")
    assert done_ids(tmp_path) == {"a", "b", "c", "d", "e"}
    assert done_ids(tmp_path / "empty") == set()


def test_begin_stage_keep_stale_keeps_shards_of_another_config(tmp_path):
    begin_stage(tmp_path, "h1")
    pq.write_table(_table(["a"], error=[None]), tmp_path / "0.parquet")
    begin_stage(tmp_path, "h2", keep_stale=True)
    assert done_ids(tmp_path) == {"a"}
    begin_stage(tmp_path, "h3")
    assert done_ids(tmp_path) == set()


def test_write_rejected_keeps_every_row(tmp_path):
    from proxykd.artifacts import write_rejected

    rows = [{"id": f"r{i}", "error": "too long"} for i in range(1500)]
    fields = write_rejected(tmp_path, rows)
    assert fields["rejected_count"] == 1500 and fields["rejected_first"] == rows[:20]
    assert pq.read_table(tmp_path / "rejected.parquet").to_pylist() == rows
    assert shard_files(tmp_path) == []  # never mistaken for a shard


def test_write_table_atomic(tmp_path):
    path = tmp_path / "out.parquet"
    t = _table(["p", "q", "r"])
    write_table_atomic(t, path)
    assert [p.name for p in tmp_path.iterdir()] == ["out.parquet"]
    assert pq.read_table(path).equals(t)
    # overwriting is atomic too and leaves no temp file
    write_table_atomic(_table(["s"]), path)
    assert [p.name for p in tmp_path.iterdir()] == ["out.parquet"]
    assert pq.read_table(path)["id"].to_pylist() == ["s"]

