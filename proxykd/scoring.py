"""Scoring answers without running them: reasoning-gym's scorers in a separate, limited process.

Some reasoning-gym scorers evaluate text. `bitwise_arithmetic` and `number_sorting` call `eval` on
the row's metadata or reference; `countdown`, `puzzle24`, `polynomial_multiplication` and the
integration tasks parse the model's answer with sympy, which evaluates it too. References and
metadata may come from a user's prompt file and answers come from a model, so neither is trusted:

- `score_many` scores a batch (one model's items) in ONE worker process, started with a clean
  environment (no API keys), in an empty folder, its output on a pipe only it writes;
- the worker limits its memory (RLIMIT_AS), the CPU of each item (RLIMIT_CPU), file writes
  (RLIMIT_FSIZE = 0) and, when not root, new processes (RLIMIT_NPROC = 0);
- an audit hook in the worker refuses what no scorer needs: starting processes, opening files for
  writing, creating, renaming or deleting files, sockets, ctypes, raising its own limits. An item
  that tried is a failure even when the scorer swallowed the refusal, and the worker is replaced
  before the next item (the payload may have changed its state);
- each item has a wall-clock limit: past it the worker is killed, the item is a failure and a
  fresh worker takes the rest.

A failed item scores 0.0, counted as wrong like any other unscorable answer (a model does not
escape a wrong answer by making the scorer hang), with an error naming its id; `evaluate` stores
it in the `score_error` column. Rows without a task are scored by exact match here, in this
process (nothing to evaluate); rows without a reference score NaN.

Audit hooks are not a complete sandbox (a determined payload inside the interpreter could find
a way around them); together with the limits, the clean environment and the kill they stop the
ways eval or sympy's parser can be steered to act. Rows are also checked before they get here:
a prompt file's `task` must name a registered reasoning-gym dataset (`data.validate_row`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from functools import lru_cache
from typing import NamedTuple, Optional

log = logging.getLogger("proxykd")

ITEM_TIMEOUT_S = 10.0  # wall clock per item; reasoning-gym's scorers take milliseconds
MEMORY_MB = 1024  # address space the worker may add to what its imports hold
STARTUP_TIMEOUT_S = 120.0  # importing reasoning-gym (all its tasks) on a busy machine
_ERROR_CHARS = 300


class Scored(NamedTuple):
    score: float
    error: Optional[str]  # None when the scorer gave a score


@lru_cache(maxsize=1)
def registered_tasks() -> frozenset[str]:
    """reasoning-gym's dataset names: the only `task` values whose scorer is used."""
    from reasoning_gym.factory import DATASETS

    return frozenset(DATASETS)


def exact_match(answer: str, reference: str) -> float:
    return float(answer.strip() == reference.strip())


def score_many(rows: list[dict], timeout_s: float = ITEM_TIMEOUT_S, memory_mb: int = MEMORY_MB) -> list[Scored]:
    """Score `rows` ({id, task, answer, reference, metadata (JSON text)}), in order. Rows with a
    task go through the isolated scorer process; the others are scored here."""
    out: list[Optional[Scored]] = [None] * len(rows)
    isolated = []
    for i, r in enumerate(rows):
        if r.get("reference") is None:
            out[i] = Scored(math.nan, None)
        elif not r.get("task"):
            out[i] = Scored(exact_match(r["answer"], r["reference"]), None)
        else:
            isolated.append(i)
    if not isolated:
        return out  # type: ignore[return-value]
    with _lock:
        for i in isolated:
            r = rows[i]
            reply = _ask({"task": r["task"], "answer": r.get("answer") or "", "reference": r["reference"],
                          "metadata": r.get("metadata") or "{}", "timeout_s": timeout_s, "memory_mb": memory_mb},
                         timeout_s)
            if "error" in reply:
                out[i] = Scored(0.0, f"score of {r['id']} failed: {reply['error']} (counted as wrong)")
                log.warning("%s", out[i].error)
            else:
                out[i] = Scored(float(reply["score"]), None)
    return out  # type: ignore[return-value]


# ------------------------------------------------------------------ this process's side
#
# Processes: this one -> the scorer server (a subprocess with a clean environment: it imports
# reasoning-gym once and never runs a scorer itself) -> one forked item worker at a time (limits
# and the audit hook set, runs the scorers). A fork is cheap, so a worker that timed out,
# crashed or tried something is simply replaced; the server outlives the calls of this process
# and ends when its stdin closes (this process exited, however it died).

_lock = threading.Lock()
_server: Optional["_Server"] = None
SERVER_MARGIN_S = 30.0  # the server enforces the item limit; this is the backstop if it hangs itself


def _ask(item: dict, timeout_s: float) -> dict:
    global _server
    if _server is None:
        _server = _Server()
    reply = _server.ask(item, timeout_s + SERVER_MARGIN_S)
    if reply is None:  # the server itself hung or died: replace it for the next item
        _server.close()
        _server = None
        return {"error": "the scorer server stopped answering"}
    return reply


def close() -> None:
    """Stop the scorer server (it also stops by itself when this process ends)."""
    global _server
    with _lock:
        if _server is not None:
            _server.close()
            _server = None


def _server_env() -> dict[str, str]:
    """No secrets: only what Python needs to import the same modules as this process."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8",
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
           "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
    env.update(dict.fromkeys(("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"), "1"))
    return env


class _Server:
    """The scorer server, spoken to in JSON lines over its stdin / stdout."""

    def __init__(self):
        self.folder = tempfile.TemporaryDirectory(prefix="proxykd-score-")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from proxykd.scoring import server_main; server_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            cwd=self.folder.name, env=_server_env(), start_new_session=True)
        self.lines = _Lines(self.proc.stdout.fileno())
        ready = self.lines.read(STARTUP_TIMEOUT_S)
        if not ready or not ready.get("ready"):
            self.close()
            raise RuntimeError(f"the scoring process did not start ({sys.executable}): is reasoning-gym installed?")

    def ask(self, item: dict, timeout_s: float) -> Optional[dict]:
        try:
            self.proc.stdin.write((json.dumps(item) + "\n").encode())
            self.proc.stdin.flush()
        except OSError:
            return None
        return self.lines.read(timeout_s)

    def close(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the server and its worker
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        self.folder.cleanup()


class _Lines:
    """JSON lines from a file descriptor, each awaited with a time limit."""

    def __init__(self, fd: int):
        self.fd, self.buffer, self.ended = fd, b"", False

    def read(self, timeout_s: float) -> Optional[dict]:
        """The next line as a dict; None when it does not come in time or the writer ended
        (`ended` is then set)."""
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], None if math.isinf(left) else left)[0]:
                return None
            chunk = os.read(self.fd, 65536)
            if not chunk:
                self.ended = True
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        try:
            reply = json.loads(line)
        except json.JSONDecodeError:
            return None
        return reply if isinstance(reply, dict) else None


# ------------------------------------------------------------------ the server and its workers

# Audit events no scorer needs (https://docs.python.org/3/library/audit_events.html).
REFUSED_EVENTS = frozenset({
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.startfile",
    "subprocess.Popen", "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill",
    "os.remove", "os.rmdir", "os.rename", "os.truncate", "os.mkdir", "os.symlink", "os.link",
    "os.chmod", "os.chown", "os.chdir", "os.putenv", "os.unsetenv", "shutil.rmtree", "shutil.move",
    "socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.getaddrinfo",
    "urllib.Request", "http.client.connect", "ftplib.connect", "smtplib.connect", "webbrowser.open",
    "ctypes.dlopen", "ctypes.dlsym", "ctypes.call_function", "ctypes.cdata", "ctypes.addressof",
    "resource.setrlimit", "resource.prlimit", "sys.addaudithook", "sys.setprofile", "sys.settrace",
    "builtins.input", "mmap.__new__", "time.sleep",
})
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _refusal(event: str, args: tuple) -> Optional[str]:
    """What is refused about this audit event, or None."""
    if event in REFUSED_EVENTS:
        return event
    if event == "open":
        mode, flags = (args[1] if len(args) > 1 else None), (args[2] if len(args) > 2 else 0)
        if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & _WRITE_FLAGS:
            return f"open({args[0]!r}, {mode!r}) for writing"
    return None


def server_main() -> None:
    """The scorer server: imports reasoning-gym, then hands each item from stdin to an item worker
    (forked when there is none), waits at most the item's `timeout_s`, and answers on stdout."""
    reply_fd = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 1)  # whatever a scorer prints goes nowhere, never into the replies
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115

    import reasoning_gym  # noqa: F401  (trusted code first: every task's module is loaded here)

    def reply(obj: dict) -> None:
        os.write(reply_fd, (json.dumps(obj) + "\n").encode())

    reply({"ready": True})
    worker: Optional[_ItemWorker] = None
    for line in sys.stdin.buffer:
        item = json.loads(line)
        timeout_s, memory_mb = float(item.pop("timeout_s")), int(item.pop("memory_mb"))
        limits = (memory_mb, math.ceil(timeout_s) + 1)  # (the CPU limit: past the wall-clock one)
        if worker is not None and worker.limits != limits:
            worker = worker.stop()
        if worker is None:
            worker = _ItemWorker(*limits, close_fds=(0, reply_fd))
        out = worker.ask(item, timeout_s)
        if out is None:
            out = {"error": "the scoring worker died (memory or CPU limit, or a crash)" if worker.replies.ended
                   else f"timed out after {timeout_s:g} s"}
            worker = worker.stop()
        elif out.get("refused"):  # the payload may have changed the worker's state: a fresh one
            worker = worker.stop()
        reply(out)
    if worker is not None:
        worker.stop()


class _ItemWorker:
    """A forked child of the server that runs scorers, limited (see the module docstring)."""

    def __init__(self, memory_mb: int, cpu_per_item_s: int, close_fds: tuple[int, ...]):
        from_server, to_worker = os.pipe()
        from_worker, to_server = os.pipe()
        self.limits = (memory_mb, cpu_per_item_s)
        self.pid = os.fork()
        if self.pid == 0:  # the worker: never returns into the server's loop
            code = 1
            try:
                os.close(to_worker)
                os.close(from_worker)
                for fd in close_fds:  # the server's stdin and replies: not the payload's to read or forge
                    os.close(fd)
                os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
                _work(from_server, to_server, memory_mb, cpu_per_item_s)
                code = 0
            finally:
                os._exit(code)
        os.close(from_server)
        os.close(to_server)
        self.to_worker, self.replies = to_worker, _Lines(from_worker)

    def ask(self, item: dict, timeout_s: float) -> Optional[dict]:
        try:
            os.write(self.to_worker, (json.dumps(item) + "\n").encode())
        except OSError:  # (it died since the last item)
            self.replies.ended = True
            return None
        return self.replies.read(timeout_s)

    def stop(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)  # (a worker that exited is a zombie until waited for)
        except ProcessLookupError:
            pass
        os.waitpid(self.pid, 0)
        os.close(self.to_worker)
        os.close(self.replies.fd)


def _limit(resource, name: str, value: int) -> None:
    try:
        resource.setrlimit(getattr(resource, name), (value, value))
    except (ValueError, OSError):  # a platform without it, or a hard limit already lower
        pass


def _work(from_server: int, to_server: int, memory_mb: int, cpu_per_item_s: int) -> None:
    """The item worker's loop: limits, the audit hook, then one scored item per line."""
    import resource

    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    try:  # what the server holds, plus `memory_mb` (Linux; macOS does not enforce RLIMIT_AS)
        with open("/proc/self/statm") as f:
            _limit(resource, "RLIMIT_AS", int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE") + memory_mb * 2**20)
    except OSError:
        pass
    _limit(resource, "RLIMIT_FSIZE", 0)
    if os.getuid() != 0:  # (root ignores it)
        _limit(resource, "RLIMIT_NPROC", 0)

    refused: list[str] = []
    own_call = [False]  # the worker's own setrlimit between items; a payload may not raise limits

    def hook(event: str, args: tuple) -> None:
        why = None if own_call[0] and event == "resource.setrlimit" else _refusal(event, args)
        if why:
            refused.append(why)
            raise PermissionError(f"scoring sandbox: {why} is not allowed")

    def limit_cpu_of_next_item() -> None:
        used = resource.getrusage(resource.RUSAGE_SELF)
        own_call[0] = True
        try:  # past it the kernel kills the worker (SIGXCPU), even if the server could not
            resource.setrlimit(resource.RLIMIT_CPU, (math.ceil(used.ru_utime + used.ru_stime) + cpu_per_item_s,
                                                     resource.RLIM_INFINITY))
        finally:
            own_call[0] = False

    sys.addaudithook(hook)
    scorers: dict = {}
    items = _Lines(from_server)
    while (item := items.read(math.inf)) is not None:
        limit_cpu_of_next_item()
        try:
            task = item["task"]
            if task in DATASETS:
                if task not in scorers:
                    scorers[task] = reasoning_gym.get_score_answer_fn(task)
                entry = {"answer": item["reference"], "metadata": json.loads(item["metadata"])}
                out = {"score": float(scorers[task](item["answer"], entry))}
            else:  # a task name stored before names were checked: exact match
                out = {"score": exact_match(item["answer"], item["reference"])}
        except Exception as e:  # noqa: BLE001 - a scorer that raises: this item fails, not the batch
            out = {"error": f"{type(e).__name__}: {e}"[:_ERROR_CHARS]}
        if refused:
            out = {"error": f"the scorer tried {refused[0]} (refused)"[:_ERROR_CHARS], "refused": True}
        os.write(to_server, (json.dumps(out) + "\n").encode())
        if refused:
            return
