"""One run per run folder (issue 12, point 2): fast, no Ray, no engines."""

import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from proxykd.runlock import LOCK_NAME, RunLocked, run_lock

from conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]
CTX = mp.get_context("spawn")  # no fork of a process with threads


def _hold(run_dir, ready, done, seconds):
    """Child: hold the lock for `seconds`, write a marker inside the run folder, release."""
    with run_lock(run_dir) as lock:
        ready.set()
        time.sleep(seconds)
        (Path(run_dir) / "first.txt").write_text(lock.token)
        assert not lock.lost
    done.set()


def _try(run_dir, results, barrier):
    barrier.wait(60)  # both contenders reach for the stale lock at the same moment
    try:
        with run_lock(run_dir):
            results.put(("won", os.getpid()))
            time.sleep(1.0)  # hold long enough that a loser must see us
    except RunLocked as e:
        results.put(("locked", str(e)))


@pytest.fixture(autouse=True)
def _fast_heartbeat(monkeypatch):
    monkeypatch.setenv("PROXYKD_LOCK_HEARTBEAT_S", "0.2")
    monkeypatch.setenv("PROXYKD_LOCK_STALE_S", "3")


def _start_holder(run_dir, seconds):
    ready, done = CTX.Event(), CTX.Event()
    p = CTX.Process(target=_hold, args=(str(run_dir), ready, done, seconds))
    p.start()
    assert ready.wait(60), "holder never took the lock"
    return p, done


def test_second_run_fails_fast_naming_holder_first_finishes(tmp_path):
    run_dir = tmp_path / "run"
    holder, done = _start_holder(run_dir, 2.0)
    t0 = time.monotonic()
    with pytest.raises(RunLocked) as e:
        with run_lock(run_dir):
            pytest.fail("second run got the lock")
    assert time.monotonic() - t0 < 1.0
    msg = str(e.value)
    assert f"pid {holder.pid}" in msg and socket.gethostname() in msg
    assert str(run_dir.resolve() / LOCK_NAME) in msg and "remove" in msg
    # The heartbeat moves while the holder runs; the holder's lock is untouched by the failed try.
    lock_file = run_dir / LOCK_NAME
    hb = json.loads(lock_file.read_text())["heartbeat"]
    time.sleep(0.6)
    info = json.loads(lock_file.read_text())
    assert info["pid"] == holder.pid and info["heartbeat"] > hb
    holder.join(30)
    assert holder.exitcode == 0 and done.is_set()
    assert (run_dir / "first.txt").read_text() == info["token"]
    assert not lock_file.exists()
    with run_lock(run_dir):  # free again
        assert lock_file.exists()
    assert not lock_file.exists()


def _stale_lock(run_dir: Path, **fields) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    info = {"owner": "ghost", "host": socket.gethostname(), "pid": os.getpid(),
            "pidns": os.readlink("/proc/self/ns/pid"), "started": now - 100, "heartbeat": now, "token": "old"}
    info.update(fields)
    path = run_dir / LOCK_NAME
    path.write_text(json.dumps(info))
    return path


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _zombie_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    while Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        time.sleep(0.05)
    _zombie_pid.keep = p  # not reaped until the test ends
    return p.pid


@pytest.mark.parametrize("kind", ["dead_pid", "zombie_pid", "old_heartbeat", "unreadable"])
def test_stale_lock_is_taken_over(tmp_path, kind):
    run_dir = tmp_path / "run"
    if kind == "dead_pid":
        path = _stale_lock(run_dir, pid=_dead_pid())
    elif kind == "zombie_pid":  # killed, not yet reaped by its parent
        path = _stale_lock(run_dir, pid=_zombie_pid())
    elif kind == "old_heartbeat":  # a live pid on another host: only the heartbeat can tell
        path = _stale_lock(run_dir, host="elsewhere", heartbeat=time.time() - 10)
    else:  # a creator that died between create and write
        run_dir.mkdir(parents=True)
        path = run_dir / LOCK_NAME
        path.write_text("")
        os.utime(path, (time.time() - 10, time.time() - 10))
    with run_lock(run_dir) as lock:
        assert json.loads(path.read_text())["token"] == lock.token
    assert not path.exists()
    assert not list(run_dir.glob(".lock.stale.*"))


def test_live_lock_elsewhere_is_not_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    path = _stale_lock(run_dir, host="elsewhere", pid=1, heartbeat=time.time() - 1)
    with pytest.raises(RunLocked, match="pid 1 on host elsewhere"):
        with run_lock(run_dir):
            pass
    assert json.loads(path.read_text())["token"] == "old"


def test_two_contenders_for_a_stale_lock_exactly_one_wins(tmp_path):
    for attempt in range(3):
        run_dir = tmp_path / f"run{attempt}"
        _stale_lock(run_dir, pid=_dead_pid())
        results, barrier = CTX.Queue(), CTX.Barrier(2)
        procs = [CTX.Process(target=_try, args=(str(run_dir), results, barrier)) for _ in range(2)]
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
        kinds = sorted(o[0] for o in outcomes)
        assert kinds == ["locked", "won"], outcomes
        winner = next(o[1] for o in outcomes if o[0] == "won")
        assert f"pid {winner}" in next(o[1] for o in outcomes if o[0] == "locked")
        assert not (run_dir / LOCK_NAME).exists()


def test_take_over_puts_back_a_fresh_lock_it_moved_by_mistake(tmp_path):
    """A contender that judged lock "old" stale, but moves the fresh lock another contender has
    just created in its place, puts that one back and reports it as the holder."""
    from proxykd.runlock import RunLock

    run_dir = tmp_path / "run"
    path = _stale_lock(run_dir, host="elsewhere", pid=7, heartbeat=time.time(), token="new")
    late = RunLock(run_dir)
    late._take_over({"token": "old"}, "judged stale earlier")
    assert json.loads(path.read_text())["token"] == "new"
    assert not list(run_dir.glob(".lock.stale.*"))
    with pytest.raises(RunLocked, match="pid 7 on host elsewhere"):
        late.acquire()


def test_cli_second_run_exits_2_before_any_stage(tmp_path):
    run_dir = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config(run_dir)))
    holder, _ = _start_holder(run_dir, 30.0)
    try:
        t0 = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "proxykd.cli", "run", str(config)], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
        took = time.monotonic() - t0
        assert out.returncode == 2, out.stderr
        assert f"pid {holder.pid}" in out.stderr and "is in use by another run" in out.stderr
        assert "Started a local Ray instance" not in out.stderr
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME]  # no stage touched the folder
        assert took < 60
    finally:
        holder.kill()
        holder.join(10)
