"""The report's statistics and choices (pure), against hand values and plain reference loops."""

import math

import numpy as np
import pyarrow as pa
import pytest

from proxykd.models import cut_layers
from proxykd.report import accuracy_summary, paired_bootstrap, pick_best, wilson_interval


def test_wilson_interval_by_hand():
    # p = 0.5, n = 100, z = 1.96: centre 0.5, half = 1.96·sqrt(0.0025 + 0.0000960)/1.0384 = 0.0960
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    # 0 of 10: the lower end is 0, the upper z²/(n + z²) = 3.8415/13.8415
    lo, hi = wilson_interval(0, 10)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(3.841459 / 13.841459, abs=1e-6)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_paired_bootstrap_matches_a_plain_loop():
    rng = np.random.default_rng(3)
    a, b = (rng.random(40) < 0.6).astype(float), (rng.random(40) < 0.4).astype(float)
    got = paired_bootstrap(a, b, samples=2000, seed=7)
    # the same resampling written out as a loop
    draw = np.random.default_rng(7).integers(0, 40, size=(2000, 40))
    means = sorted(float(np.mean([a[i] - b[i] for i in row])) for row in draw)
    assert got["diff"] == pytest.approx(float(np.mean(a - b)))
    assert got["lo"] == pytest.approx(np.quantile(means, 0.025)) and got["hi"] == pytest.approx(np.quantile(means, 0.975))
    assert got["wins"] == int(((a - b) > 0).sum()) and got["losses"] == int(((a - b) < 0).sum())
    assert got["lo"] <= got["diff"] <= got["hi"]


def test_paired_bootstrap_of_identical_arms_is_zero_and_rejects_unpaired_input():
    a = np.array([1.0, 0.0, 1.0, 1.0])
    d = paired_bootstrap(a, a, samples=100)
    assert d["diff"] == d["lo"] == d["hi"] == 0.0 and d["wins"] == d["losses"] == 0
    with pytest.raises(ValueError):
        paired_bootstrap(a, a[:3])


def test_accuracy_summary_counts_only_full_scores_and_splits_by_task():
    results = pa.table({"id": ["1", "2", "3", "4"], "score": [1.0, 0.01, 1.0, 0.0],
                        "task": ["x", "x", "y", "y"], "teacher_ll": [-1.0, -3.0, math.nan, -2.0],
                        "teacher_top1": [math.nan] * 4})
    s = accuracy_summary(results)
    assert s["accuracy"] == 0.5 and s["right"] == 2 and s["n"] == 4
    assert s["per_task"] == {"x": 0.5, "y": 0.5}
    assert s["teacher_ll"] == pytest.approx(-2.0) and s["teacher_top1"] is None
    assert (s["lo"], s["hi"]) == pytest.approx(wilson_interval(2, 4))
    untasked = accuracy_summary(results.set_column(2, "task", pa.array([None, None, "y", "y"], pa.string())))
    assert untasked["per_task"] == {"None": 0.5, "y": 0.5}  # file rows without a task still count


def test_the_eval_table_shows_a_dash_where_nothing_is_known_and_warns_nothing():
    import warnings

    from proxykd.evaluate import known_mean, report_table

    assert known_mean([1.0, math.nan, 3.0]) == 2.0 and math.isnan(known_mean([math.nan, None]))
    results = pa.table({"model": ["teacher", "teacher", "s", "s"], "score": [1.0, 1.0, 1.0, None],
                        "teacher_ll": [None, None, -1.0, -2.0], "teacher_top1": [None, None, 0.5, 1.0]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (numpy's "Mean of empty slice" would raise here)
        table = report_table(results)
    assert "| teacher | 2 | 1.000 | 1.000 | – | – |" in table
    assert "| s | 2 | 1.000 | 1.000 | -1.500 | 0.750 |" in table  # accuracy over the scored row only


def test_pick_best_prefers_accuracy_then_teacher_likelihood_then_order():
    c = [{"lr": 1, "accuracy": 0.4, "teacher_ll": -1.0}, {"lr": 2, "accuracy": 0.5, "teacher_ll": -3.0},
         {"lr": 3, "accuracy": 0.5, "teacher_ll": -2.0}, {"lr": 4, "accuracy": 0.5, "teacher_ll": -2.0}]
    assert pick_best(c)["lr"] == 3
    assert pick_best(c[:1])["lr"] == 1


def test_cut_layers_spreads_evenly_with_first_and_last():
    assert cut_layers(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert cut_layers(30, 2) == [0, 29] and cut_layers(4, 4) == [0, 1, 2, 3] and cut_layers(5, 1) == [0]
    with pytest.raises(ValueError):
        cut_layers(4, 5)
