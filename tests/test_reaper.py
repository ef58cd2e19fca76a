"""The watchdog of proxykd/reaper.py, without Ray (a few seconds): a driver killed with SIGKILL
leaves no process of its run, including one re-parented to init and one that ignores SIGTERM;
processes without the run's mark are never touched; after a clean shutdown it touches nothing."""

import os
import signal
import subprocess
import sys
import textwrap
import time

from conftest import session_processes

from proxykd import reaper

# A stand-in driver: starts the watchdog, then marked processes the way Ray's are (the mark in
# their environment): a plain one, one that ignores SIGTERM, and an orphan (its parent exits, as
# an agent's raylet does), then prints their pids.
DRIVER = textwrap.dedent("""
    import os, subprocess, sys, time
    from proxykd import reaper

    token, clean = sys.argv[1], sys.argv[2] == "clean"
    watchdog = reaper.Watchdog(token)
    env = {**os.environ, reaper.ENV: token}
    sleeper = "import signal, sys, time; sys.argv[1:] and signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"
    # sessions of their own, like Ray's workers: a kill of the driver's group does not reach them
    pids = [subprocess.Popen([sys.executable, "-c", sleeper], env=env, start_new_session=True).pid,
            subprocess.Popen([sys.executable, "-c", sleeper, "ignore"], env=env, start_new_session=True).pid]
    orphaner = subprocess.run([sys.executable, "-c", "import subprocess, sys; print(subprocess.Popen("
                               f"[sys.executable, '-c', {sleeper!r}], start_new_session=True, stdout=-3, stderr=-3).pid)"],
                              env=env, capture_output=True, text=True)
    pids.append(int(orphaner.stdout))
    if clean:
        watchdog.done()
    print(*pids, flush=True)
    time.sleep(120)
""")


def _driver(tmp_path, token: str, mode: str):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    proc = subprocess.Popen([sys.executable, str(script), token, mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 3, proc.stderr.read()
    return proc, pids


def _wait_gone(token: str, seconds: float) -> list[int]:
    deadline = time.time() + seconds
    while (left := session_processes(None, token)) and time.time() < deadline:
        time.sleep(0.1)
    return left


def test_killed_driver_leaves_no_marked_process(tmp_path):
    token = reaper.new_token()
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # not marked
    proc, pids = _driver(tmp_path, token, "kill")
    try:
        assert sorted(session_processes(None, token)) == sorted(pids)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver's group: the watchdog has a session of its own
        proc.wait()
        started = time.time()
        left = _wait_gone(token, 10)
        assert not left, f"still running 10 s after the driver was killed: {left}"
        assert time.time() - started < 6  # SIGTERM, 2 s grace, SIGKILL
        assert bystander.poll() is None
        assert "stopped 3 leftover" in proc.stderr.read()
    finally:
        bystander.kill()
        for pid in session_processes(None, token):
            os.kill(pid, signal.SIGKILL)


def test_clean_shutdown_touches_nothing(tmp_path):
    token = reaper.new_token()
    proc, pids = _driver(tmp_path, token, "clean")
    try:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        time.sleep(1)
        assert sorted(session_processes(None, token)) == sorted(pids)
        assert reaper.stop(token, grace_s=1) == 3  # what shutdown_ray does with stragglers
        assert not session_processes(None, token)
    finally:
        for pid in session_processes(None, token):
            os.kill(pid, signal.SIGKILL)
