"""Alignment measurement: the pure parts (the stage itself runs in tests/test_pipeline.py)."""

import numpy as np
import pytest

from proxykd.align import alignment, is_heldout, top1_hits


def test_top1_hits_counts_response_tokens_that_are_the_models_first_choice():
    input_ids = [[5, 6, 7, 8, 9], [1, 2, 3]]
    starts = [2, 1]
    # score(..., k=1) rows: (topk_ids [n, 1], topk_logprobs [n, 1], token_logprobs [n])
    scored = [(np.array([[7], [0], [9]]), None, None), (np.array([[2], [3]]), None, None)]
    assert top1_hits(scored, input_ids, starts) == [2, 2]


def test_alignment_is_token_weighted():
    # two rows with 3 and 1 response tokens: log-prob sums -3.0 and -1.0, 2 and 0 top-1 hits
    point = alignment("round-1", np.array([-3.0, -1.0]), np.array([2, 0]), [[0, 1, 2, 3, 4], [0, 1]], [2, 1])
    assert point == {"model": "round-1", "rows": 2, "tokens": 4, "teacher_ll": pytest.approx(-1.0),
                     "top1": pytest.approx(0.5)}


def test_heldout_draw_is_stable_and_near_its_fraction():
    ids = [f"row-{i}" for i in range(4000)]
    held = [i for i in ids if is_heldout(i, 0.1)]
    assert 0.08 < len(held) / len(ids) < 0.12
    assert held == [i for i in ids if is_heldout(i, 0.1)]
    assert set(held) <= {i for i in ids if is_heldout(i, 0.3)}  # a larger fraction only adds rows
    assert not any(is_heldout(i, 0.0) for i in ids)
