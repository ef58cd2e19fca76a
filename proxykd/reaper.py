"""Nothing of a local Ray run outlives its driver, however the driver ends.

Why this exists (Ray 2.60 on Linux, measured): the daemons `ray.init()` starts itself (gcs_server,
raylet, dashboard, log_monitor, monitor) die with the driver (PR_SET_PDEATHSIG), but the raylet's
children do not: after a `kill -9` of the driver the dashboard and runtime-env agents notice the
raylet is gone, then wait about 60 s on the dead GCS before exiting, and a worker's vLLM EngineCore
can outlive its worker. By then they have been re-parented to init, so the session's process tree
no longer exists when anyone looks for it, and most of them carry no session dir in their
command line (`ray::DashboardAgent`, `ray::IDLE`, `VLLM::EngineCore`).

So a run's processes are found by a mark instead: `init_ray` puts `PROXYKD_RAY_RUN=<random token>`
into the environment Ray's daemons are started with. The raylet hands its environment to the agents
and workers, and they to what they spawn (vLLM engines, multiprocessing's resource tracker), so
every process of the run has the token in /proc/PID/environ whoever its parent is now, and no
other process on the machine does (other Ray clusters are never touched).

The watchdog (`python -m proxykd.reaper TOKEN`) runs in a session of its own, so a kill of the
driver's process group spares it, and reads a pipe whose write end only the driver holds. EOF
without a "done" line first means the driver died without shutting Ray down: it stops every
process with the token and exits. After a normal run the driver stops stragglers itself
(`stop(token)`) and then says "done".
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time

ENV = "PROXYKD_RAY_RUN"


def new_token() -> str:
    return secrets.token_hex(8)


def _has_token(pid: int, needle: bytes) -> bool:
    """Alive (not a zombie) and carrying `needle` in its environment; False if gone or not ours."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            if needle not in f.read().split(b"\0"):
                return False
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def marked(token: str) -> list[int]:
    """This run's live processes: those whose environment carries `ENV=token`."""
    needle = f"{ENV}={token}".encode()
    return [int(n) for n in os.listdir("/proc")
            if n.isdigit() and int(n) != os.getpid() and _has_token(int(n), needle)]


def _signal_marked(token: str, sig: int) -> set[int]:
    """Signal every marked process. Through a pidfd where there is one, so the check and the
    signal hit the same process even if its pid is reused in between."""
    needle, hit = f"{ENV}={token}".encode(), set()
    for pid in marked(token):
        try:
            fd = os.pidfd_open(pid)
        except OSError:  # gone, or a kernel without pidfds (before 5.3): plain kill
            fd = None
        try:
            if _has_token(pid, needle):
                signal.pidfd_send_signal(fd, sig) if fd is not None else os.kill(pid, sig)
                hit.add(pid)
        except OSError:
            pass
        finally:
            if fd is not None:
                os.close(fd)
    return hit


def _wait_gone(token: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while marked(token):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def stop(token: str, wait_s: float = 0.0, grace_s: float = 2.0) -> int:
    """Stop the run's processes. Give them `wait_s` to exit on their own (a Ray worker finishing
    its vLLM teardown after the raylet is gone), then SIGTERM (a vLLM engine unlinks its shared
    memory on SIGTERM), `grace_s` later SIGKILL, again while any is left (a dying worker may start
    a helper process). Returns how many processes were signalled."""
    if _wait_gone(token, wait_s):
        return 0
    stopped = _signal_marked(token, signal.SIGTERM)
    for _ in range(5):
        if _wait_gone(token, grace_s):
            break
        stopped |= _signal_marked(token, signal.SIGKILL)
        grace_s = 0.5
    return len(stopped)


class Watchdog:
    """The driver's end: start it before `ray.init`; `done()` after a clean shutdown."""

    def __init__(self, token: str):
        self.token = token
        read, self._write = os.pipe()  # non-inheritable: Ray's daemons never hold the write end
        env = {k: v for k, v in os.environ.items() if k != ENV}
        self.proc = subprocess.Popen([sys.executable, "-m", "proxykd.reaper", token], stdin=read, env=env,
                                     stdout=subprocess.DEVNULL, start_new_session=True)
        os.close(read)

    def tell(self, line: str) -> None:
        try:
            os.write(self._write, (line + "\n").encode())
        except OSError:
            pass

    def done(self) -> None:
        """The run shut down cleanly: the watchdog exits without touching anything."""
        if self._write is None:
            return
        self.tell("done")
        os.close(self._write)
        self._write = None
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def main(argv: list[str] | None = None) -> int:
    token = (argv or sys.argv[1:])[0]
    lines, session = [], None
    for raw in sys.stdin.buffer:  # until EOF: the driver has exited or closed the pipe
        lines.append(raw.decode(errors="replace").strip())
        if lines[-1].startswith("session "):
            session = lines[-1][len("session "):]
    if "done" in lines:
        return 0
    n = stop(token)
    if n:
        where = f" (Ray session {session})" if session else ""
        print(f"proxykd: the driver exited without shutting Ray down; stopped {n} leftover Ray/vLLM "
              f"process(es) of its run{where}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
