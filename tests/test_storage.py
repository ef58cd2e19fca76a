"""Object-storage run folders (proxykd/storage.py) against the session's S3 server (moto, 127.0.0.1)."""

import uuid
from pathlib import Path

import pytest

from proxykd import artifacts, storage
from conftest import S3_BUCKET


@pytest.fixture
def run_uri():
    return f"s3://{S3_BUCKET}/unit-{uuid.uuid4().hex[:8]}"


def remote_files(uri: str) -> dict[str, bytes]:
    from pyarrow import fs as pafs

    fs, key = storage.filesystem(uri)
    out = {}
    for info in fs.get_file_info(pafs.FileSelector(key, recursive=True, allow_not_found=True)):
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(info.path) as f:
                out[info.path[len(key) + 1:]] = f.read()
    return out


def test_local_paths_are_left_alone(tmp_path):
    assert storage.local_path(tmp_path / "run") == (tmp_path / "run").resolve()
    assert storage.remote_uri(tmp_path / "run") is None
    assert storage.location(tmp_path / "x") == str(tmp_path / "x")
    (tmp_path / "f").write_text("x")
    assert storage.push(tmp_path / "f") == 0 and storage.pull(tmp_path) == 0
    assert storage.fetch(str(tmp_path / "f")) == str(tmp_path / "f")
    assert storage.join(str(tmp_path), "a", "b") == str(tmp_path / "a" / "b")


def test_a_uri_maps_to_its_mirror_and_back(run_uri):
    local = storage.local_path(run_uri + "/teacher")
    assert local == storage.mirror_root() / "s3" / S3_BUCKET / run_uri.split("/")[-1] / "teacher"
    assert storage.remote_uri(local) == run_uri + "/teacher"
    assert storage.location(local / "model") == run_uri + "/teacher/model"
    assert storage.join(run_uri, "a", "b") == run_uri + "/a/b"
    assert storage.is_remote("gs://b/p") and not storage.is_remote("/tmp/s3://x")


def test_artifacts_written_in_a_mirror_reach_the_store_and_a_fresh_mirror_gets_them_back(run_uri, tmp_path, monkeypatch):
    import pyarrow as pa

    folder = artifacts.stage_dir(run_uri, "logits")
    artifacts.begin_stage(folder, "h1")
    artifacts.write_table_atomic(pa.table({"id": ["a", "b"]}), folder / "part-0.parquet")
    (folder / "_ray").mkdir()
    (folder / "_ray" / "state").write_text("ray's own")
    storage.push(folder / "_ray")
    artifacts.write_manifest(folder, "logits", "h1", 0.0, rows=2)
    stored = remote_files(run_uri + "/logits")
    assert set(stored) == {".config_hash", "part-0.parquet", "manifest.json", "_ray/state"}
    assert stored["part-0.parquet"] == (folder / "part-0.parquet").read_bytes()

    monkeypatch.setenv(storage.MIRROR_ENV, str(tmp_path / "fresh"))  # another machine
    fresh = artifacts.stage_dir(run_uri, "logits")
    assert fresh != folder and not fresh.exists()
    assert storage.pull(fresh, exclude=("_ray",)) == 3
    assert artifacts.is_done(fresh, "h1") and not (fresh / "_ray").exists()
    assert artifacts.read_shards(fresh)["id"].to_pylist() == ["a", "b"]
    assert storage.pull(fresh, exclude=("_ray",)) == 2  # the same files are not downloaded again; state files are
    other = tmp_path / "other"
    monkeypatch.setenv(storage.MIRROR_ENV, str(other))  # a third machine wants only the shards
    assert storage.pull(artifacts.stage_dir(run_uri, "logits"), match="part-*.parquet") == 1
    assert [p.name for p in artifacts.stage_dir(run_uri, "logits").iterdir()] == ["part-0.parquet"]


def test_state_files_follow_the_store(run_uri):
    folder = artifacts.stage_dir(run_uri, "eval")
    artifacts.begin_stage(folder, "h1")
    artifacts.write_manifest(folder, "eval", "h1", 0.0)
    storage.delete(folder / "manifest.json")  # the stage was begun again elsewhere
    storage.pull(folder)
    assert not (folder / "manifest.json").exists() and not artifacts.is_done(folder, "h1")
    # begin_stage with a new config drops the old work here and in the store, also what is only
    # there (Ray Train's state), but not a quarantined file
    artifacts.write_table_atomic(__import__("pyarrow").table({"id": ["x"]}), folder / "part-0.parquet")
    fs, key = storage.filesystem(run_uri + "/eval")
    for name in ("_ray/distill/checkpoint_000001/state.pt", "part-9.parquet.unreadable-20260101T000000Z"):
        with fs.open_output_stream(f"{key}/{name}") as out:
            out.write(b"x")
    artifacts.begin_stage(folder, "h2")
    assert set(remote_files(run_uri + "/eval")) == {".config_hash", "part-9.parquet.unreadable-20260101T000000Z"}
    assert remote_files(run_uri + "/eval")[".config_hash"] == b"h2"


def test_fetch_brings_a_model_folder_whole_and_once(run_uri, tmp_path, monkeypatch):
    model = storage.local_path(run_uri) / "distill" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"\0" * 1000)
    storage.push(model)
    uri = storage.location(model)
    assert uri == run_uri + "/distill/model"

    monkeypatch.setenv(storage.MIRROR_ENV, str(tmp_path / "node2"))
    got = Path(storage.fetch(uri))
    assert got == storage.local_path(uri) and (got / "model.safetensors").read_bytes() == b"\0" * 1000
    assert sorted(p.name for p in got.parent.iterdir()) == ["model"]  # no side folder left behind
    (got / "config.json").write_text('{"local": 1}')
    assert storage.fetch(uri) == str(got) and (got / "config.json").read_text() == '{"local": 1}'  # not again
    with pytest.raises(FileNotFoundError, match="not in the object store"):
        storage.fetch(run_uri + "/nothing/here")


def test_quarantine_in_a_mirror_moves_the_object_too(run_uri):
    folder = artifacts.stage_dir(run_uri, "teacher")
    folder.mkdir(parents=True)
    (folder / "part-1.parquet").write_bytes(b"not parquet")
    storage.push(folder / "part-1.parquet")
    assert artifacts.shard_files(folder) == []
    names = set(remote_files(run_uri + "/teacher"))
    assert "part-1.parquet" not in names and any(n.startswith("part-1.parquet.unreadable-") for n in names)


def test_train_storage_puts_ray_train_in_the_store(run_uri, tmp_path):
    path, fs = storage.train_storage(storage.local_path(run_uri) / "distill" / "_ray")
    assert path == f"{S3_BUCKET}/{run_uri.split('/')[-1]}/distill/_ray" and fs is not None
    assert storage.train_storage(tmp_path / "_ray") == (str((tmp_path / "_ray").resolve()), None)


def test_the_logits_progress_counts_the_shards_the_writers_put_in_the_store(run_uri):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from proxykd.logits import rows_written

    folder = artifacts.stage_dir(run_uri, "logits")
    count = rows_written(folder)
    assert count() == 0
    fs, key = storage.filesystem(run_uri + "/logits")
    for name, n in (("a.parquet", 3), ("b.parquet", 5)):
        with fs.open_output_stream(f"{key}/{name}") as out:
            pq.write_table(pa.table({"id": [str(i) for i in range(n)]}), out)
    with fs.open_output_stream(f"{key}/c.parquet") as out:
        out.write(b"PAR1 still being written")
    assert count() == 8 and not folder.exists()  # counted in the store; nothing here, nothing quarantined
