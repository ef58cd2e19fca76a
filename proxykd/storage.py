"""Run folders in object storage: `run_dir: s3://bucket/prefix` (or `gs://...`).

Stages work on local files; for a run folder in object storage each node keeps a *mirror* of it
(`$PROXYKD_MIRROR/<scheme>/<bucket>/<prefix>`, default `~/.cache/proxykd/mirror`), and the object
store is the record:

- every artifact written (`artifacts.write_*_atomic`, shards, models, journals) is uploaded the
  moment it is complete, one object per file, each PUT atomic by the store's own rules; a stage's
  manifest is written last, so it is uploaded last and a crash never leaves a remote manifest over
  missing data;
- the driver pulls the run folder before the stages (`pull`): a rerun on a fresh machine resumes
  from what the store holds; the manifest and the config marker always follow the store;
- what a worker loads by location (a model, a shard) it `fetch`es: a local path, downloaded to its
  node's mirror on first use. Manifests record locations (`location`): `s3://...` for a remote run,
  plain paths otherwise, so a manifest read on another machine still points at its models;
- Ray Train keeps its run state and checkpoints in the store itself (`train_storage`).

Credentials and endpoints come from the environment as pyarrow reads them (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL`, an instance role; `GOOGLE_APPLICATION_CREDENTIALS`),
never from the config. For a local run folder every function here does nothing (or returns its
argument), so local runs pay nothing for this.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Optional

log = logging.getLogger("proxykd")

MIRROR_ENV = "PROXYKD_MIRROR"
SCHEMES = ("s3", "gs")
# Files that say whether a stage is done: a pull always makes them what the store says (present
# or absent), whatever the mirror held, so a stale local copy never claims a stage done.
STATE_FILES = ("manifest.json", ".config_hash")
CHUNK = 8 << 20


def is_remote(location: str | os.PathLike) -> bool:
    return str(location).startswith(tuple(f"{s}://" for s in SCHEMES))


def mirror_root() -> Path:
    return Path(os.environ.get(MIRROR_ENV) or "~/.cache/proxykd/mirror").expanduser().resolve()


def local_path(location: str | os.PathLike) -> Path:
    """The local folder or file standing for `location`: its mirror for `s3://`/`gs://`, else the
    path itself (absolute)."""
    if is_remote(location):
        scheme, rest = str(location).split("://", 1)
        return mirror_root() / scheme / rest.strip("/")
    return Path(location).resolve()


def remote_uri(path: str | os.PathLike) -> Optional[str]:
    """The object-store location a mirror path stands for; None for a path outside any mirror."""
    if is_remote(path):
        return str(path).rstrip("/")
    try:
        rel = Path(path).resolve().relative_to(mirror_root())
    except ValueError:
        return None
    if len(rel.parts) < 2 or rel.parts[0] not in SCHEMES:
        return None
    return f"{rel.parts[0]}://{'/'.join(rel.parts[1:])}"


def location(path: str | os.PathLike) -> str:
    """What a manifest records for `path`: its object-store URI when it lies in a mirror, else the path."""
    return remote_uri(path) or str(path)


def join(location: str | os.PathLike, *parts: str) -> str:
    """`location` / parts, for a URI or a path."""
    if is_remote(location):
        return "/".join([str(location).rstrip("/"), *parts])
    return str(Path(location).joinpath(*parts))


@functools.lru_cache(maxsize=None)
def _filesystem(scheme: str, bucket: str):
    from pyarrow import fs

    return fs.FileSystem.from_uri(f"{scheme}://{bucket}")[0]


def filesystem(uri: str):
    """(pyarrow filesystem, path inside it: `bucket/key`) of an `s3://` or `gs://` URI."""
    scheme, rest = uri.split("://", 1)
    return _filesystem(scheme, rest.split("/", 1)[0]), rest.strip("/")


def push(path: str | os.PathLike) -> int:
    """Upload a mirror file, or every file under a mirror folder (manifests last), to the store;
    returns the files uploaded (0 outside a mirror)."""
    uri = remote_uri(path)
    if uri is None:
        return 0
    path = Path(path)
    if path.is_dir():
        files = sorted((f for f in path.rglob("*") if f.is_file()), key=lambda f: (f.name == "manifest.json", str(f)))
    else:
        files = [path]
    fs, key = filesystem(uri)
    for f in files:
        rel = f.relative_to(path).as_posix() if f != path else ""
        with open(f, "rb") as src, fs.open_output_stream(f"{key}/{rel}" if rel else key) as out:
            shutil.copyfileobj(src, out, CHUNK)  # the object appears whole when the stream closes
    return len(files)


def delete(path: str | os.PathLike) -> None:
    """Remove the store's copy of a mirror file or folder (nothing outside a mirror; no error
    when it is not there)."""
    uri = remote_uri(path)
    if uri is None:
        return
    from pyarrow import fs as pafs

    fs, key = filesystem(uri)
    info = fs.get_file_info(key)
    if info.type == pafs.FileType.File:
        fs.delete_file(key)
    elif info.type == pafs.FileType.Directory:
        fs.delete_dir(key)


def children(path: str | os.PathLike) -> list[str]:
    """Names of the files and folders directly under a mirror folder in the store (Ray Train's
    `_ray` state, for one, is only there); [] outside a mirror."""
    uri = remote_uri(path)
    if uri is None:
        return []
    from pyarrow import fs as pafs

    fs, key = filesystem(uri)
    return [i.base_name for i in fs.get_file_info(pafs.FileSelector(key, allow_not_found=True))]


def _download(fs, key: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.pull-{uuid.uuid4().hex[:8]}")
    with fs.open_input_stream(key) as src, open(tmp, "wb") as out:
        shutil.copyfileobj(src, out, CHUNK)
    os.replace(tmp, dest)


def pull(path: str | os.PathLike, exclude: tuple[str, ...] = (), match: str = "*") -> int:
    """Bring a mirror folder (or file) up to date with the store: files missing here or of another
    size are downloaded, `STATE_FILES` always follow the store (removed here when the store has
    none); folders named in `exclude` are skipped, and files whose name does not match the glob
    `match`. Local files the store lacks are kept (a stage may not have uploaded them yet).
    Returns the files downloaded."""
    uri = remote_uri(path)
    return 0 if uri is None else _pull(uri, Path(path), exclude, match)


def _pull(uri: str, path: Path, exclude: tuple[str, ...] = (), match: str = "*") -> int:
    import fnmatch

    from pyarrow import fs as pafs

    fs, key = filesystem(uri)
    excluded = lambda rel: bool(set(rel.split("/")[:-1]) & set(exclude))  # noqa: E731 - in a folder named in `exclude`
    top = fs.get_file_info(key)
    if top.type == pafs.FileType.File:
        if not path.exists() or path.stat().st_size != top.size:
            _download(fs, key, path)
            return 1
        return 0
    remote = {}
    if top.type == pafs.FileType.Directory:
        for info in fs.get_file_info(pafs.FileSelector(key, recursive=True)):
            rel = info.path[len(key) + 1:]
            if info.type == pafs.FileType.File and not excluded(rel) and fnmatch.fnmatch(info.base_name, match):
                remote[rel] = info.size
    got = 0
    for rel, size in remote.items():
        dest = path / rel
        if dest.name in STATE_FILES or not dest.exists() or dest.stat().st_size != size:
            _download(fs, f"{key}/{rel}", dest)
            got += 1
    if path.is_dir():  # a state file the store no longer has (the stage restarted elsewhere)
        for name in fnmatch.filter(STATE_FILES, match):
            for f in path.rglob(name):
                rel = f.relative_to(path).as_posix()
                if rel not in remote and not excluded(rel):
                    f.unlink()
    return got


def fetch(location: str | os.PathLike) -> str:
    """A local path for `location` (a model folder, a file): itself for a local path; for a URI
    or a mirror path, its mirror copy on this node, downloaded whole (into a side folder, renamed
    into place) when it is not here yet."""
    uri = remote_uri(location)
    if uri is None:
        return str(location)
    path = local_path(uri)
    if path.exists():
        return str(path)
    tmp = path.with_name(f".{path.name}.fetch-{uuid.uuid4().hex[:8]}")
    if _pull(uri, tmp) == 0:
        raise FileNotFoundError(f"{uri}: not in the object store")
    try:
        os.rename(tmp, path)
    except OSError:  # another process on this node fetched it first
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    return str(path)


def train_storage(path: str | os.PathLike) -> tuple[str, object]:
    """Ray Train's (storage_path, storage_filesystem) for a run's `_ray` folder: the store itself
    for a mirror path (checkpoints go straight there, and a rerun anywhere resumes from them),
    else the local path and Ray's default."""
    uri = remote_uri(path)
    if uri is None:
        return str(Path(path).resolve()), None
    fs, key = filesystem(uri)
    return key, fs


def open_input(location: str | os.PathLike):
    """What pyarrow's readers take for `location`: the path itself, or an open random-access file
    in the store for a URI (a Parquet shard is then read in place, only the row groups wanted)."""
    if not is_remote(location):
        return str(location)
    fs, key = filesystem(str(location))
    return fs.open_input_file(key)
