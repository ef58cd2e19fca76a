"""One run per run folder: an exclusive lock on `RUN_DIR/.lock`, safe on NFS and on local disk.

The lock file is created with O_CREAT|O_EXCL (atomic on NFSv3+ and local file systems) and holds
JSON {owner, host, pid, pidns, started, heartbeat, token}. A daemon thread rewrites the heartbeat
every PROXYKD_LOCK_HEARTBEAT_S seconds (default 10) in place, as one fixed-size write, so a reader
never sees a half-written file. A lock is stale when its heartbeat is older than
PROXYKD_LOCK_STALE_S seconds (default 60), or, seen from the same host and pid namespace, when its
process is gone. A stale lock is taken over race-safely: it is first renamed to a name unique to
the contender (only one rename of a given file can win); the winner checks that what it moved is
the very lock it judged stale (else it puts it back and looks again), then creates a fresh lock
with O_EXCL. Clocks of hosts sharing a run folder must agree to well within the stale timeout.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from proxykd import storage

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
_SIZE = 1024  # every write of the lock is padded to this size: a rewrite never changes the length


class RunLocked(RuntimeError):
    """The run folder is held by another live run."""


def heartbeat_s() -> float:
    return float(os.environ.get("PROXYKD_LOCK_HEARTBEAT_S", "10"))


def stale_s() -> float:
    return float(os.environ.get("PROXYKD_LOCK_STALE_S", "60"))


def _pidns() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _owner() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user name (uid without passwd entry in a container)
        return str(os.getuid())


def _encode(info: dict) -> bytes:
    data = json.dumps(info, sort_keys=True).encode()
    return data + b" " * (_SIZE - 1 - len(data)) + b"\n" if len(data) < _SIZE else data + b"\n"


def _read(path: Path) -> dict | None:
    """The lock's content; None when it is gone. {} when it cannot be parsed (being created)."""
    for attempt in range(5):
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            info = json.loads(raw.decode().strip())
            if isinstance(info, dict):
                return info
        except (UnicodeDecodeError, json.JSONDecodeError):
            pass
        time.sleep(0.02 * (attempt + 1))
    return {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed process its parent has not reaped yet is a zombie: dead too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _stale_reason(path: Path, info: dict) -> str | None:
    """Why the lock `info` read from `path` is stale, or None while its holder may be alive."""
    now = time.time()
    if not info:  # unreadable: a creator died between create and write, or is writing right now
        try:
            age = now - path.stat().st_mtime
        except FileNotFoundError:
            return "gone"
        return f"unreadable and untouched for {age:.0f}s" if age > stale_s() else None
    if (info.get("host") == socket.gethostname() and info.get("pidns") == _pidns()
            and isinstance(info.get("pid"), int) and not _pid_alive(info["pid"])):
        return f"process {info['pid']} on this host is gone"
    age = now - float(info.get("heartbeat", 0))
    if age > stale_s():
        return f"last heartbeat {age:.0f}s ago (stale after {stale_s():.0f}s)"
    return None


def _when(ts) -> str:
    try:
        return datetime.fromtimestamp(float(ts), timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (TypeError, ValueError, OverflowError):
        return "?"


def _locked_message(path: Path, info: dict) -> str:
    if info:
        holder = (f"pid {info.get('pid')} on host {info.get('host')} (user {info.get('owner')}), "
                  f"started {_when(info.get('started'))}, last heartbeat {_when(info.get('heartbeat'))} "
                  f"({time.time() - float(info.get('heartbeat', 0)):.0f}s ago)")
    else:
        holder = "a run whose lock is still being written"
    return (f"run folder {path.parent} is in use by another run: {holder}; lock file {path}. "
            f"Wait for that run to finish, or use another run_dir. If that run is certainly dead, "
            f"remove {path} (a lock is taken over by itself once its heartbeat is older than "
            f"{stale_s():.0f}s, or at once when its process is gone on the same host).")


class RunLock:
    def __init__(self, run_dir: str | os.PathLike):
        # (a run folder in object storage is locked in this machine's mirror of it: two drivers on
        # one machine are stopped; the store has no conditional create that pyarrow offers)
        self.path = storage.local_path(run_dir) / LOCK_NAME
        self.token = uuid.uuid4().hex
        self.info: dict = {}
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- acquire / release ------------------------------------------------------------------------
    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        now = time.time()
        self.info = {"owner": _owner(), "host": socket.gethostname(), "pid": os.getpid(), "pidns": _pidns(),
                     "started": now, "heartbeat": now, "token": self.token}
        for _ in range(20):
            if self._create():
                self._thread = threading.Thread(target=self._beat, name="proxykd-runlock", daemon=True)
                self._thread.start()
                return self
            info = _read(self.path)
            if info is None:
                continue  # released between our create and our read: try again
            reason = _stale_reason(self.path, info)
            if reason is None:
                raise RunLocked(_locked_message(self.path, info))
            self._take_over(info, reason)
        raise RunLocked(f"could not take the lock {self.path}: it kept changing hands")

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, _encode(self.info))
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def _take_over(self, info: dict, reason: str) -> None:
        """Move the stale lock `info` out of the way; only one contender can move a given file."""
        aside = self.path.with_name(f"{LOCK_NAME}.stale.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another contender moved it first
        moved = _read(aside)
        if moved is not None and moved.get("token") != info.get("token"):
            # We moved a fresh lock someone created after our read: put it back, look again.
            with contextlib.suppress(FileExistsError):
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                try:
                    os.write(fd, aside.read_bytes())
                    os.fsync(fd)
                finally:
                    os.close(fd)
            aside.unlink(missing_ok=True)
            return
        log.warning("taking over the stale lock %s (%s): pid %s on host %s (user %s), started %s",
                    self.path, reason, info.get("pid"), info.get("host"), info.get("owner"),
                    _when(info.get("started")))
        aside.unlink(missing_ok=True)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        info = _read(self.path)
        if info is not None and info.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    # -- heartbeat --------------------------------------------------------------------------------
    def _beat(self) -> None:
        while not self._stop.wait(heartbeat_s()):
            try:
                if not self._refresh():
                    return
            except OSError as e:  # NFS hiccup: try again next beat; a long outage makes the lock stale
                log.warning("could not refresh the run lock %s: %s", self.path, e)

    def _refresh(self) -> bool:
        """Write a new heartbeat into our lock; False (and `lost`) when the lock is no longer ours."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            self.info["heartbeat"] = time.time()
            if self._create():  # removed by hand, or moved aside for a moment by a contender
                log.warning("run lock %s had vanished; recreated it", self.path)
                return True
            fd = os.open(self.path, os.O_RDWR)
        try:
            raw = os.pread(fd, 4 * _SIZE, 0)
            try:
                token = json.loads(raw.decode().strip()).get("token")
            except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
                token = None
            if token != self.token:
                self.lost = True
                log.error("run lock %s was taken over by another run (%s); this run no longer holds "
                          "its run folder", self.path, raw.decode(errors="replace").strip())
                return False
            self.info["heartbeat"] = time.time()
            os.pwrite(fd, _encode(self.info), 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        return True


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike):
    """Hold the run folder `run_dir` exclusively for the block; RunLocked when another run holds it."""
    lock = RunLock(run_dir).acquire()
    try:
        yield lock
    finally:
        lock.release()
