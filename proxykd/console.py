"""The console of a run (`proxykd run`, the stage commands, `proxykd report`).

By default the console shows proxykd's own INFO lines, one progress line for the stage that is
running (rows or steps done / total, rate, ETA; the teacher's cost so far) and the results; the rest
goes to files under `RUN_DIR/logs/`:

- `driver.log`: every log record of the driver (proxykd's DEBUG, every other logger's INFO and
  up) and everything else the driver process writes to stdout/stderr (Ray's and Ray Data's own
  logs, C++ warnings, progress bars of the libraries);
- `workers.log`: the output of every Ray worker Ray forwards to the driver (vLLM engines, Ray
  Train workers and their training lines, Ray Data actors, the teacher's actors), one line each,
  with the time it arrived and the process it came from.

Each command appends to both files after a `==== ... ====` header line. With `--verbose` the
console shows everything as before (every logger, every worker line); the files are written too.

Progress comes from what the stages already report: the training workers' step lines
(`[NAME] epoch E step S/T ...`, printed by proxykd/training.py), a log record carrying a
`progress` dict (`log.info(msg, extra={"progress": {...}})`, the arguments of `Console.update`),
or a stage's `track` (a count polled from its output on disk, the logits stage). On a terminal
the line is redrawn in place; otherwise (a file, CI, `ray job logs`) it is printed at most every
PROXYKD_PROGRESS_EVERY_S seconds (default 30), so logs stay short. Each stage that did work ends
with `STAGE: done in TIME`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, TextIO

from proxykd import storage

log = logging.getLogger("proxykd")

LOG_DIR = "logs"
DRIVER_LOG = "driver.log"
WORKERS_LOG = "workers.log"
HEADER = "===="
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
EVERY_S_ENV = "PROXYKD_PROGRESS_EVERY_S"
DEFAULT_EVERY_S = 30.0
WORKER_HANDLER = "proxykd_worker_logs"  # our handler on Ray's worker-output dispatcher
RAY_HANDLER = "ray_print_logs"  # Ray's own, which prints worker output on the driver's console
RAY_TQDM_MAGIC = "__ray_tqdm_magic_token__"  # ray.experimental.tqdm_ray's bar updates: not log lines

# The stages' own progress lines (see the module docstring).
TRAIN_STEP = re.compile(r"^\[(?P<name>[^\]\s]+)\] epoch \d+ step (?P<done>\d+)/(?P<total>\d+)\b")

_current: Optional["Console"] = None


def current() -> Optional["Console"]:
    """The console of the command running in this process, or None (library use, tests)."""
    return _current


# ------------------------------------------------------------------------------- formatting


def fmt_duration(seconds: float) -> str:
    """45 s, 3:05, 1:02:03."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def fmt_rate(per_s: float, unit: str) -> str:
    if per_s >= 1:
        return f"{per_s:.1f} {unit}/s"
    if per_s * 60 >= 1:
        return f"{per_s * 60:.1f} {unit}/min"
    return f"{per_s * 3600:.2g} {unit}/h"


@dataclass
class Counter:
    """One count a stage makes progress on (a training's steps, the teacher's prompts, rows)."""

    key: str
    unit: str
    total: int
    done: int
    since: float  # the baseline the rate is measured from: (since, base)
    base: int
    updated: float
    cost: Optional[float] = None

    def rate(self) -> Optional[float]:
        if self.updated <= self.since or self.done <= self.base:
            return None
        return (self.done - self.base) / (self.updated - self.since)


@dataclass
class StageState:
    name: str
    started: float
    counters: dict[str, Counter] = field(default_factory=dict)
    skipped: bool = False  # the stage found its work done (set by the caller): no "done in" line


def progress_text(stage: StageState, now: float) -> str:
    """`[stage] LABEL D/T unit (P%) | rate | ETA | $cost | elapsed`: the counters still running
    (summed when several run at once, e.g. two trainings side by side); only the time elapsed
    when none is."""
    running = [c for c in stage.counters.values() if c.done < c.total]
    parts = []
    if running:
        unit = running[0].unit
        running = [c for c in running if c.unit == unit]
        done, total = sum(c.done for c in running), sum(c.total for c in running)
        label = (running[0].key if running[0].key != stage.name else "") if len(running) == 1 else f"{len(running)} runs"
        parts.append(f"{label} {done}/{total} {unit} ({100 * done // max(total, 1)}%)".lstrip())
        rates = [c.rate() for c in running]
        if all(r is not None for r in rates):
            parts.append(fmt_rate(sum(rates), unit))
            parts.append("ETA " + fmt_duration(max((c.total - c.done) / r for c, r in zip(running, rates))))
    costs = [c.cost for c in stage.counters.values() if c.cost is not None]
    if costs:
        parts.append(f"${sum(costs):.4f} so far")
    parts.append(f"{fmt_duration(now - stage.started)} elapsed")
    return f"[{stage.name}] " + " | ".join(parts)


def progress_every_s() -> float:
    try:
        return max(1.0, float(os.environ.get(EVERY_S_ENV, DEFAULT_EVERY_S)))
    except ValueError:
        return DEFAULT_EVERY_S


def last_run(text: str) -> str:
    """The part of a log file (driver.log, workers.log) the last command wrote: from its header on."""
    at = text.rfind("\n" + HEADER + " ")
    return text if at < 0 and not text.startswith(HEADER + " ") else text[at + 1:]


# ------------------------------------------------------------------------------- the console


class _ConsoleHandler(logging.Handler):
    """The quiet console's log handler: proxykd's INFO and up, every other logger's ERROR and up;
    progress records update the progress line instead of scrolling."""

    def __init__(self, console: "Console"):
        super().__init__(logging.INFO)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            ours = record.name == "proxykd" or record.name.startswith("proxykd.")
            if record.levelno < (logging.INFO if ours else logging.ERROR):
                return
            msg = record.getMessage()
            if ours and record.levelno == logging.INFO:
                progress = getattr(record, "progress", None)
                if isinstance(progress, dict):
                    self.console.update(**progress)
                    return
            level = "" if record.levelno == logging.INFO else f"{record.levelname} "
            text = f"{time.strftime('%H:%M:%S', time.localtime(record.created))} {level}{msg}"
            if record.exc_info:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
            self.console.write(text)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


class Console:
    """The console and log files of one command; a context manager (see the module docstring).
    `stream`, `out` and `tty` replace the process's stderr, stdout and terminal check (tests);
    given a `stream`, the process's file descriptors are left alone."""

    def __init__(self, run_dir: str | os.PathLike, verbose: bool = False, command: str = "run",
                 stream: Optional[TextIO] = None, out: Optional[TextIO] = None, tty: Optional[bool] = None,
                 every_s: Optional[float] = None, tick_s: float = 1.0):
        self.run_dir = storage.local_path(run_dir)
        self.log_dir = self.run_dir / LOG_DIR
        self.verbose = verbose
        self.command = command
        self.every_s = progress_every_s() if every_s is None else every_s
        self.tick_s = tick_s
        self._stream, self._out, self._tty = stream, out, tty
        self._lock = threading.RLock()
        self._stages: list[StageState] = []
        self._shown = ""  # the progress line on screen (tty)
        self._drawn_at = 0.0
        self._printed_at = 0.0  # the last progress line printed (not a tty)
        self._trackers: list[tuple[str, Callable[[], int], float]] = []
        self._saved_fds: Optional[tuple[int, int]] = None
        self._handlers: list[logging.Handler] = []
        self._workers: Optional[TextIO] = None
        self._stop = threading.Event()
        self._ticker: Optional[threading.Thread] = None
        self._restore: list[Callable[[], None]] = []

    # ---- life

    def __enter__(self) -> "Console":
        self.start()
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if exc is not None and not isinstance(exc, (KeyboardInterrupt, SystemExit)):
            log.debug("%s failed", self.command, exc_info=(kind, exc, tb))  # (to driver.log only)
        self.close()

    def start(self) -> None:
        global _current
        if not self.log_dir.exists():  # a run folder in object storage, new here: its logs so far
            storage.pull(self.log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        header = (f"{HEADER} proxykd {self.command} | {time.strftime('%Y-%m-%d %H:%M:%S')} | pid {os.getpid()} "
                  f"| {'verbose' if self.verbose else 'quiet'} {HEADER}\n")
        with open(self.log_dir / DRIVER_LOG, "a") as f:
            f.write("\n" + header if f.tell() else header)
        self._workers = open(self.log_dir / WORKERS_LOG, "a", buffering=1, encoding="utf-8", errors="replace")
        self._workers.write(("\n" if self._workers.tell() else "") + header)
        if not self.verbose and self._stream is None:
            self._redirect_fds()
        self.err = self._stream or sys.stderr
        self.out = self._out or self._stream or sys.stdout
        self.tty = self._tty if self._tty is not None else _isatty(self.err)

        root, ours = logging.getLogger(), logging.getLogger("proxykd")
        levels = root.level, ours.level
        self._restore.append(lambda: (root.setLevel(levels[0]), ours.setLevel(levels[1])))
        file_handler = logging.FileHandler(self.log_dir / DRIVER_LOG, "a", encoding="utf-8")
        file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
        file_handler.setLevel(logging.DEBUG)
        if self.verbose:  # today's console: every logger's INFO lines
            console_handler = logging.StreamHandler(self.err)
            console_handler.setFormatter(logging.Formatter(LOG_FORMAT))
            console_handler.setLevel(logging.INFO)
        else:
            console_handler = _ConsoleHandler(self)
        for handler in (file_handler, console_handler):
            root.addHandler(handler)
            self._handlers.append(handler)
        if root.level > logging.INFO:
            root.setLevel(logging.INFO)
        ours.setLevel(logging.DEBUG)
        logging.captureWarnings(True)
        self._restore.append(lambda: logging.captureWarnings(False))
        _current = self
        where = f"{self.log_dir} ({DRIVER_LOG}, {WORKERS_LOG})"
        if self.verbose:
            log.info("logs also in %s", where)
        else:
            self.write(f"proxykd {self.command}: full logs in {where}; --verbose shows them here")
            self._ticker = threading.Thread(target=self._tick, name="proxykd-console", daemon=True)
            self._ticker.start()

    def close(self) -> None:
        global _current
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=5)
        with self._lock:
            self._clear()
        self.detach_ray()
        root = logging.getLogger()
        for handler in self._handlers:
            root.removeHandler(handler)
            handler.close()
        self._handlers.clear()
        for undo in reversed(self._restore):
            undo()
        self._restore.clear()
        if _current is self:
            _current = None
        if self._saved_fds is not None:
            self._restore_fds()
        if self._workers is not None:
            self._workers.close()
            self._workers = None
        try:  # a run folder in object storage: this command's logs beside its artifacts
            storage.push(self.log_dir)
        except Exception as e:  # noqa: BLE001 - the run's outcome stands; the logs stay here
            log.warning("logs not uploaded (%s): they are in %s", e, self.log_dir)

    def _redirect_fds(self) -> None:
        """The driver's own stdout and stderr (file descriptors 1 and 2, so also what C++ code,
        subprocesses and libraries print) go to driver.log; the console keeps copies of both."""
        for s in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                s.flush()
        saved = os.dup(1), os.dup(2)
        fd = os.open(self.log_dir / DRIVER_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        self._saved_fds = saved
        self._stream = os.fdopen(os.dup(saved[1]), "w", buffering=1, encoding="utf-8", errors="replace")
        self._out = os.fdopen(os.dup(saved[0]), "w", buffering=1, encoding="utf-8", errors="replace")

    def _restore_fds(self) -> None:
        for s in (sys.stdout, sys.stderr, self._stream, self._out):
            with contextlib.suppress(Exception):
                s.flush()
        out, err = self._saved_fds
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.close(out)
        os.close(err)
        for s in (self._stream, self._out):
            with contextlib.suppress(Exception):
                s.close()
        self._saved_fds = None

    # ---- Ray

    def attach_ray(self) -> None:
        """After `ray.init`: every worker line Ray forwards to the driver is written to
        workers.log (and read for training progress); unless verbose, Ray's own printing of
        them on the console is removed."""
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        dispatcher.remove_handler(WORKER_HANDLER)
        dispatcher.add_handler(WORKER_HANDLER, self.worker_output)
        if not self.verbose:
            dispatcher.remove_handler(RAY_HANDLER)

    def detach_ray(self) -> None:
        with contextlib.suppress(ImportError):
            from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

            dispatcher.remove_handler(WORKER_HANDLER)

    def worker_output(self, data: dict) -> None:
        """One batch of a worker's output lines, as Ray's log monitor publishes it."""
        try:
            pid, ip = data.get("pid"), data.get("ip")
            lines = data.get("lines", [])
            if pid == "autoscaler":  # only its events, as Ray prints them (not its status every 5 s)
                who = "autoscaler"
                try:
                    from ray._private.worker import filter_autoscaler_events

                    lines = list(filter_autoscaler_events(lines))
                except Exception:  # noqa: BLE001 - no GCS to ask which autoscaler runs
                    lines = []
            elif pid == "raylet":
                who = "raylet"
            else:
                name = data.get("actor_name") or data.get("task_name")
                who = f"{name} pid={pid}" if name else f"pid={pid}"
            if ip and ip != data.get("localhost"):
                who += f", ip={ip}"
            stamp = time.strftime("%H:%M:%S")
            lines = [line for line in lines if RAY_TQDM_MAGIC not in line]
            if self._workers is not None and lines:
                self._workers.write("".join(f"{stamp} ({who}) {line}\n" for line in lines))
            for line in lines:
                if m := TRAIN_STEP.match(line):
                    self.update(m["name"], int(m["done"]), int(m["total"]), "steps")
        except Exception:  # noqa: BLE001 - Ray's log thread must never die of it
            pass

    # ---- stages and progress

    @contextlib.contextmanager
    def stage(self, name: str):
        """A stage running: its progress line while it runs, `NAME: done in T` at the end unless
        the caller sets `.skipped` on what this yields."""
        state = StageState(name, time.time())
        with self._lock:
            self._clear()
            self._stages.append(state)
            self._printed_at = state.started
        ended = "failed"
        try:
            yield state
            ended = "skipped" if state.skipped else "done"
        except KeyboardInterrupt:
            ended = "interrupted"
            raise
        finally:
            with self._lock:
                self._stages.remove(state)
                self._clear()
                self._printed_at = time.time()
            took = fmt_duration(time.time() - state.started)
            if ended == "done":
                log.info("%s: done in %s", name, took)
            elif ended != "skipped":
                log.info("%s: %s after %s", name, ended, took)

    @contextlib.contextmanager
    def track(self, key: str, total: int, unit: str, poll: Callable[[], int], every_s: float = 2.0):
        """Poll `poll()` (a count, e.g. of rows on disk) every `every_s` seconds while the block runs."""
        self.update(key, int(poll()), total, unit)
        entry = (key, poll, every_s)
        with self._lock:
            self._trackers.append(entry)
        try:
            yield
        finally:
            with self._lock:
                self._trackers.remove(entry)

    def update(self, key: str, done: int, total: int, unit: str, cost: Optional[float] = None,
               from_start: bool = False) -> None:
        """Counter `key` of the running stage is at `done` of `total`. Its rate is measured from its
        first update, or from the stage's start at 0 when `from_start`."""
        now = time.time()
        with self._lock:
            if not self._stages:
                return
            stage = self._stages[-1]
            c = stage.counters.get(key)
            if c is None or done < c.done or total != c.total:  # new, or a restarted count
                since, base = (stage.started, 0) if from_start else (now, done)
                c = stage.counters[key] = Counter(key, unit, total, done, since, base, now)
            c.done, c.updated = done, now
            if cost is not None:
                c.cost = cost
            if self.tty and not self.verbose and now - self._drawn_at >= 0.2:
                self._draw(now)

    def progress_line(self, now: Optional[float] = None) -> Optional[str]:
        with self._lock:
            return progress_text(self._stages[-1], now or time.time()) if self._stages else None

    def _tick(self) -> None:
        polled: dict[str, float] = {}
        while not self._stop.wait(self.tick_s):
            now = time.time()
            with self._lock:
                trackers = list(self._trackers)
            for key, poll, every_s in trackers:
                if now - polled.get(key, 0.0) >= every_s:
                    polled[key] = now
                    with contextlib.suppress(Exception):
                        counter = self._counter(key)
                        if counter is not None:
                            self.update(key, int(poll()), counter.total, counter.unit)
            self.tick(time.time())

    def tick(self, now: float) -> None:
        """Redraw the progress line (terminal), or print it when it is due (otherwise)."""
        with self._lock:
            if not self._stages or self.verbose:
                return
            if self.tty:
                self._draw(now)
            elif now - self._printed_at >= self.every_s:
                self._printed_at = now
                text = progress_text(self._stages[-1], now)
                self._emit(f"{time.strftime('%H:%M:%S', time.localtime(now))} {text}")
                logging.getLogger("proxykd.progress").debug(text)

    def _counter(self, key: str) -> Optional[Counter]:
        with self._lock:
            return self._stages[-1].counters.get(key) if self._stages else None

    # ---- writing

    def write(self, text: str, out: bool = False) -> None:
        """A line (or lines) on the console, above the progress line."""
        with self._lock:
            self._clear()
            self._emit(text, self.out if out else self.err)
            if self.tty and self._stages and not self.verbose:
                self._draw(time.time())

    def _emit(self, text: str, stream: Optional[TextIO] = None) -> None:
        stream = stream or self.err
        with contextlib.suppress(Exception):
            stream.write(text + "\n")
            stream.flush()

    def _draw(self, now: float) -> None:
        line = progress_text(self._stages[-1], now)
        width = shutil.get_terminal_size((120, 24)).columns - 1
        line = line if len(line) <= width else line[:max(width - 1, 1)] + "…"
        with contextlib.suppress(Exception):
            self.err.write("\r\x1b[K" + line)
            self.err.flush()
        self._shown, self._drawn_at = line, now

    def _clear(self) -> None:
        if self._shown:
            with contextlib.suppress(Exception):
                self.err.write("\r\x1b[K")
                self.err.flush()
            self._shown = ""


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


# ------------------------------------------------------------------ for stage code (no-ops alone)


@contextlib.contextmanager
def stage(name: str):
    """`Console.stage` of the running command; a stand-in when there is none."""
    if _current is None:
        yield StageState(name, time.time())
    else:
        with _current.stage(name) as state:
            yield state


@contextlib.contextmanager
def track(key: str, total: int, unit: str, poll: Callable[[], int], every_s: float = 2.0):
    """`Console.track` of the running command; nothing when there is none."""
    if _current is None:
        yield
    else:
        with _current.track(key, total, unit, poll, every_s):
            yield


def update(key: str, done: int, total: int, unit: str) -> None:
    """`Console.update` of the running command; nothing when there is none."""
    if _current is not None:
        _current.update(key, done, total, unit)


def echo(text: str, err: bool = False) -> None:
    """Print on the console (stdout, or stderr with `err`), above the progress line."""
    if _current is None:
        print(text, file=sys.stderr if err else sys.stdout, flush=True)
    else:
        _current.write(text, out=not err)
