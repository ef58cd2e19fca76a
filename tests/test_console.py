"""The run's console (proxykd/console.py): progress lines, their throttle off a terminal and their
redraw on one, what reaches the console and what the log files under RUN_DIR/logs/ get. Ray only
for a dataset's blocks counted as they arrive; the console of a real run is checked on the
session's pipeline run (tests/test_pipeline.py)."""

import io
import logging
import subprocess
import sys
import textwrap
import time

import pytest

from proxykd import console
from proxykd.console import Console, Counter, StageState, fmt_duration, fmt_rate, last_run, progress_text

log = logging.getLogger("proxykd")


def test_durations_and_rates_read_naturally():
    assert [fmt_duration(s) for s in (0, 44.6, 60, 185, 3723)] == ["0 s", "45 s", "1:00", "3:05", "1:02:03"]
    assert fmt_rate(18.26, "prompts") == "18.3 prompts/s"
    assert fmt_rate(0.5, "steps") == "30.0 steps/min"
    assert fmt_rate(1 / 7200, "rows") == "0.5 rows/h"


def test_the_progress_line_shows_done_total_rate_eta_and_cost():
    stage = StageState("teacher", started=1000.0)
    assert progress_text(stage, 1012) == "[teacher] 12 s elapsed"  # nothing counted yet
    # 50 of 200 prompts 10 s into the stage (rate measured from the stage's start at 0)
    stage.counters["teacher"] = Counter("teacher", "prompts", total=200, done=50, since=1000.0, base=0,
                                        updated=1010.0, cost=0.0125)
    assert progress_text(stage, 1010) == \
        "[teacher] 50/200 prompts (25%) | 5.0 prompts/s | ETA 30 s | $0.0125 so far | 10 s elapsed"
    # one update only: no rate yet, so no ETA
    stage.counters["teacher"] = Counter("teacher", "prompts", 200, 50, since=1010.0, base=50, updated=1010.0)
    assert progress_text(stage, 1011) == "[teacher] 50/200 prompts (25%) | 11 s elapsed"


def test_trainings_side_by_side_are_summed_and_a_finished_one_drops_out(tmp_path):
    with Console(tmp_path, stream=io.StringIO(), tty=False, every_s=3600, tick_s=3600) as c:
        with c.stage("distill") as stage:
            for name, step in (("distill-proxykd", 1), ("distill-baseline", 1)):
                c.worker_output(_worker_lines(f"[{name}] epoch 0 step {step}/40 loss 1.0 lr 1e-3 tok/s 5"))
            for counter in stage.counters.values():  # as if 10 s went by
                counter.since -= 10
            c.worker_output(_worker_lines("[distill-proxykd] epoch 0 step 21/40 loss 1.0 lr 1e-3 tok/s 5",
                                          "[distill-baseline] epoch 0 step 11/40 loss 1.0 lr 1e-3 tok/s 5"))
            line = c.progress_line()
            assert line.startswith("[distill] 2 runs 32/80 steps (40%) | ")
            assert "ETA" in line  # the slower run's remaining steps at its own rate
            c.worker_output(_worker_lines("[distill-proxykd] epoch 3 step 40/40 loss 1.0 lr 1e-3 tok/s 5"))
            assert c.progress_line().startswith("[distill] distill-baseline 11/40 steps (27%)")
    workers = (tmp_path / "logs" / "workers.log").read_text()
    assert "(RayTrainWorker pid=7) [distill-proxykd] epoch 0 step 21/40" in workers


def _worker_lines(*lines, pid=7):
    return {"pid": pid, "ip": "127.0.0.1", "localhost": "127.0.0.1", "actor_name": "RayTrainWorker",
            "task_name": None, "is_err": False, "lines": list(lines)}


def test_off_a_terminal_progress_is_printed_at_most_every_n_seconds(tmp_path):
    stream = io.StringIO()
    with Console(tmp_path, stream=stream, tty=False, every_s=30, tick_s=3600) as c:
        with c.stage("logits") as stage:
            t0 = stage.started
            for dt in range(0, 95, 1):  # ticks every second for 95 s
                c.update("logits", dt * 2, 400, "rows")
                c.tick(t0 + dt)
    printed = [line for line in stream.getvalue().splitlines() if "[logits]" in line]
    assert len(printed) == 3, printed  # at 30, 60 and 90 s
    assert all("/400 rows" in line and "ETA" in line and "\r" not in line for line in printed)
    assert stream.getvalue().splitlines()[-1].endswith("logits: done in 0 s")


def test_on_a_terminal_the_line_is_redrawn_in_place_below_the_log_lines(tmp_path):
    stream = io.StringIO()
    with Console(tmp_path, stream=stream, tty=True, tick_s=3600) as c:
        with c.stage("align"):
            c.update("align-warmup", 1, 32, "steps")
            log.info("align: round 1, sampling 165 proxy answers")
    text = stream.getvalue()
    # drawn, cleared for the log line, drawn again, cleared at the end of the stage
    assert "\r\x1b[K[align] align-warmup 1/32 steps (3%)" in text
    assert "\r\x1b[K" + time.strftime("%H:") in text and "align: round 1, sampling 165 proxy answers\n" in text
    before, after = text.split("sampling 165 proxy answers\n")
    assert after.startswith("\r\x1b[K[align]") and "align: done in" in after
    assert not after.rstrip("\n").endswith("elapsed")  # no progress line left after the stage


def test_the_teachers_own_progress_line_feeds_the_progress_line_and_its_last_one_stays(tmp_path):
    from proxykd.config import TeacherConfig
    from proxykd.teacher import COUNTERS, log_progress

    cfg = TeacherConfig(price_per_million_prompt_tokens=2.5, price_per_million_completion_tokens=10.0)
    totals = {"ok": 150, "failed": 0, "rejected": 0, "budget": 0, **dict.fromkeys(COUNTERS, 0),
              "requests": 150, "prompt_tokens": 4000, "completion_tokens": 2000}
    stream = io.StringIO()
    with Console(tmp_path, stream=stream, tty=False, every_s=3600, tick_s=3600) as c:
        with c.stage("teacher") as stage:
            log_progress(cfg, totals, 150, 200, time.time() - 10)
            assert "teacher: 150/200" not in stream.getvalue()  # not a scrolling line
            counter = stage.counters["teacher"]
            assert (counter.done, counter.total, counter.unit) == (150, 200, "prompts")
            assert counter.cost == pytest.approx(0.03)
            assert "$0.0300 so far" in c.progress_line()
            log_progress(cfg, {**totals, "ok": 200, "requests": 200}, 200, 200, time.time() - 12, final=True)
    assert "teacher: 200/200 prompts |" in stream.getvalue()  # the stage's summary


def test_progress_records_and_tracked_counts_feed_the_line(tmp_path):
    with Console(tmp_path, stream=io.StringIO(), tty=False, every_s=3600, tick_s=0.05) as c:
        with c.stage("eval") as stage:
            log.info("eval: 3 of 9", extra={"progress": {"key": "eval", "done": 3, "total": 9, "unit": "rows"}})
            assert stage.counters["eval"].done == 3
            count = iter(range(10, 100))
            with c.track("logits", 120, "rows", lambda: next(count), every_s=0.05):
                deadline = time.time() + 10
                while stage.counters["logits"].done < 12 and time.time() < deadline:
                    time.sleep(0.05)
            assert stage.counters["logits"].done >= 12 and stage.counters["logits"].total == 120
    # without a console (library use) the same calls do nothing
    with console.stage("logits") as alone, console.track("logits", 5, "rows", lambda: 1):
        alone.skipped = True


def test_a_datasets_blocks_are_counted_as_they_arrive(tmp_path, local_ray):
    """`artifacts.collect` (the eval answers, align's sampling and held-out measure) takes a Ray
    dataset's output block by block: every row comes back, and each block moves the count."""
    import pyarrow as pa
    import ray

    from proxykd import artifacts

    seen = []

    class Recording(Console):
        def update(self, key, done, total, unit, cost=None, from_start=False):
            seen.append((key, done, total, unit))
            super().update(key, done, total, unit, cost, from_start)

    ds = ray.data.from_arrow([pa.table({"x": list(range(i * 4, i * 4 + 4))}) for i in range(3)])
    with Recording(tmp_path, stream=io.StringIO(), tty=False, every_s=3600, tick_s=3600) as c:
        with c.stage("eval") as stage:
            table = artifacts.collect(ds.map_batches(lambda b: b, batch_format="pyarrow"), "answers", 12)
            assert (stage.counters["answers"].done, stage.counters["answers"].total) == (12, 12)
    assert sorted(table["x"].to_pylist()) == list(range(12))
    assert seen[0] == ("answers", 0, 12, "rows") and seen[-1] == ("answers", 12, 12, "rows")
    assert len(seen) >= 2 and all(a[1] <= b[1] for a, b in zip(seen, seen[1:]))
    # without a console the same call only collects
    assert artifacts.collect(ds, "answers", 12).num_rows == 12


def test_the_console_gets_proxykds_lines_and_the_files_get_everything(tmp_path):
    """In a process of its own: the driver's file descriptors go to driver.log while the console
    runs, and come back after."""
    script = textwrap.dedent(f"""
        import logging, os, warnings
        from proxykd.console import Console
        with Console({str(tmp_path / 'run')!r}, command="run", every_s=3600, tick_s=3600) as c:
            print("a stray print", flush=True)
            os.write(1, b"raw on fd 1\\n")
            os.write(2, b"raw on fd 2, as C++ code writes\\n")
            logging.getLogger("proxykd").info("ours")
            logging.getLogger("proxykd").debug("our debug line")
            logging.getLogger("ray.data").info("a library's info")
            logging.getLogger("somelib").error("a library's error")
            warnings.warn("a library warning")
            with c.stage("teacher"):
                logging.getLogger("proxykd").warning("teacher: x rejected")
            c.write("| the | table |", out=True)
            c.worker_output({{"pid": 9, "ip": "10.0.0.2", "localhost": "127.0.0.1", "actor_name": "MapWorker",
                              "lines": ["INFO vllm engine line", "__ray_tqdm_magic_token__ {{}}"]}})
        print("after the console", flush=True)
    """)
    for _ in range(2):  # twice: each command appends after a header
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
    assert out.stdout == "| the | table |\nafter the console\n"
    err = out.stderr.splitlines()
    assert err[0] == f"proxykd run: full logs in {tmp_path / 'run' / 'logs'} (driver.log, workers.log); " \
                     "--verbose shows them here"
    assert [line[9:] for line in err[1:]] == ["ours", "ERROR a library's error", "WARNING teacher: x rejected",
                                              "teacher: done in 0 s"]
    driver = (tmp_path / "run" / "logs" / "driver.log").read_text()
    assert driver.count("==== proxykd run | ") == 2
    mine = last_run(driver)
    assert mine.startswith("==== proxykd run | ") and driver.endswith(mine)
    for text in ("a stray print", "raw on fd 1", "raw on fd 2, as C++ code writes", "INFO proxykd: ours",
                 "DEBUG proxykd: our debug line", "a library's info", "ERROR somelib: a library's error",
                 "a library warning", "INFO proxykd: teacher: done in"):
        assert mine.count(text) == 1, (text, mine)
    workers = last_run((tmp_path / "run" / "logs" / "workers.log").read_text())
    assert workers.splitlines()[1].endswith(" (MapWorker pid=9, ip=10.0.0.2) INFO vllm engine line")
    assert "tqdm" not in workers


def test_a_stage_that_fails_or_was_done_already_says_so(tmp_path):
    stream = io.StringIO()
    with Console(tmp_path, stream=stream, tty=False, tick_s=3600) as c:
        with pytest.raises(RuntimeError), c.stage("logits"):
            raise RuntimeError("boom")
        with c.stage("distill") as stage:
            stage.skipped = True  # (the pipeline sets it when the stage's manifest predates it)
    lines = [line[9:] for line in stream.getvalue().splitlines()[1:]]
    assert lines == ["logits: failed after 0 s"]


def test_verbose_keeps_everything_on_the_console(tmp_path):
    stream = io.StringIO()
    with Console(tmp_path, verbose=True, stream=stream, tick_s=3600) as c:
        logging.getLogger("somelib").info("a library's info")
        with c.stage("teacher"):
            c.update("teacher", 1, 2, "prompts")
    text = stream.getvalue()
    assert "INFO somelib: a library's info" in text and "INFO proxykd: teacher: done in" in text
    assert "[teacher]" not in text  # no progress line among the scrolling logs
    assert "a library's info" in (tmp_path / "logs" / "driver.log").read_text()


def test_the_cli_takes_verbose_on_every_running_command():
    from proxykd.cli import build_parser

    for command in ("run", "teacher", "align", "logits", "distill", "eval", "report"):
        args = build_parser().parse_args([command, "c.yaml", "--verbose"])
        assert args.verbose
        assert not build_parser().parse_args([command, "c.yaml"]).verbose
