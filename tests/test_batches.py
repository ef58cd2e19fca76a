"""Tests for the pure batch functions of proxykd.training: pad_sequences, place_topk, collate."""

import numpy as np
import pyarrow as pa
import pytest

from proxykd.training import collate, pad_sequences, place_topk, response_window

PAD = 0
X = -100  # ignored label

ROWS = [[11, 12, 13, 14], [21, 22], [31, 32, 33, 34, 35, 36]]
STARTS = [2, 1, 3]


def test_pad_sequences_by_hand():
    ids, mask, labels = pad_sequences(ROWS, STARTS, PAD)
    np.testing.assert_array_equal(
        ids,
        [
            [11, 12, 13, 14, 0, 0],
            [21, 22, 0, 0, 0, 0],
            [31, 32, 33, 34, 35, 36],
        ],
    )
    np.testing.assert_array_equal(
        mask,
        [
            [1, 1, 1, 1, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 1],
        ],
    )
    np.testing.assert_array_equal(
        labels,
        [
            [X, X, 13, 14, X, X],
            [X, 22, X, X, X, X],
            [X, X, X, 34, 35, 36],
        ],
    )
    for arr in (ids, mask, labels):
        assert arr.shape == (3, 6)
        assert arr.dtype == np.int64


def test_pad_sequences_other_pad_id_and_full_response():
    ids, mask, labels = pad_sequences([[5, 6, 7], [8]], [0, 0], pad_id=99)
    np.testing.assert_array_equal(ids, [[5, 6, 7], [8, 99, 99]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [1, 0, 0]])
    np.testing.assert_array_equal(labels, [[5, 6, 7], [8, X, X]])


def test_place_topk_by_hand():
    # k = 2; row b has (len - start) response positions
    topk_ids = [
        [[1, 2], [3, 4]],
        [[5, 6]],
        [[7, 8], [9, 10], [11, 12]],
    ]
    topk_lps = [
        [[-0.1, -0.2], [-0.3, -0.4]],
        [[-0.5, -0.6]],
        [[-0.7, -0.8], [-0.9, -1.0], [-1.1, -1.2]],
    ]
    ids, lps = place_topk(topk_ids, topk_lps, STARTS, T=6)
    assert ids.shape == (3, 6, 2) and lps.shape == (3, 6, 2)
    assert ids.dtype == np.int64 and lps.dtype == np.float32

    exp_ids = np.zeros((3, 6, 2), np.int64)
    exp_ids[0, 2] = [1, 2]
    exp_ids[0, 3] = [3, 4]
    exp_ids[1, 1] = [5, 6]
    exp_ids[2, 3] = [7, 8]
    exp_ids[2, 4] = [9, 10]
    exp_ids[2, 5] = [11, 12]
    np.testing.assert_array_equal(ids, exp_ids)

    exp_lps = np.zeros((3, 6, 2), np.float32)
    exp_lps[0, 2] = [-0.1, -0.2]
    exp_lps[0, 3] = [-0.3, -0.4]
    exp_lps[1, 1] = [-0.5, -0.6]
    exp_lps[2, 3] = [-0.7, -0.8]
    exp_lps[2, 4] = [-0.9, -1.0]
    exp_lps[2, 5] = [-1.1, -1.2]
    np.testing.assert_allclose(lps, exp_lps, rtol=0, atol=1e-7)

    # top-k entries sit exactly where the labels are (response positions), zeros elsewhere
    _, _, labels = pad_sequences(ROWS, STARTS, PAD)
    resp = labels != X
    assert np.all((ids != 0).any(-1) == resp)
    assert np.all(lps[~resp] == 0)


def _kd_table():
    return pa.table(
        {
            "id": ["a", "b", "c"],
            "input_ids": pa.array(ROWS, pa.list_(pa.int32())),
            "response_start": pa.array(STARTS, pa.int32()),
            "topk_ids": pa.array(
                [
                    [[1, 2], [3, 4]],
                    [[5, 6]],
                    [[7, 8], [9, 10], [11, 12]],
                ],
                pa.list_(pa.list_(pa.int32())),
            ),
            "topk_logprobs": pa.array(
                [
                    [[np.float16(-0.5), np.float16(-1.0)], [np.float16(-0.25), np.float16(-2.0)]],
                    [[np.float16(-0.125), np.float16(-3.0)]],
                    [[np.float16(-1.5), np.float16(-2.5)], [np.float16(-0.75), np.float16(-4.0)], [np.float16(-0.5), np.float16(-0.5)]],
                ],
                pa.list_(pa.list_(pa.float16())),
            ),
            "ll": pa.array([-1.0, -2.0, -0.5], pa.float64()),
            "weight": pa.array([0.25, 0.5, 0.75], pa.float64()),
        }
    )


def test_collate_kd():
    out = collate("kd", _kd_table(), PAD)
    assert set(out) == {"input_ids", "attention_mask", "labels", "topk_ids", "topk_logprobs", "weight"}
    assert out["input_ids"].shape == (3, 6)
    assert out["attention_mask"].shape == (3, 6)
    assert out["labels"].shape == (3, 6)
    assert out["topk_ids"].shape == (3, 6, 2)
    assert out["topk_logprobs"].shape == (3, 6, 2)
    assert out["topk_logprobs"].dtype == np.float32
    assert out["weight"].dtype == np.float32
    np.testing.assert_allclose(out["weight"], [0.25, 0.5, 0.75])
    np.testing.assert_array_equal(out["input_ids"][1], [21, 22, 0, 0, 0, 0])
    np.testing.assert_array_equal(out["labels"][0], [X, X, 13, 14, X, X])
    np.testing.assert_array_equal(out["topk_ids"][2, 4], [9, 10])
    np.testing.assert_array_equal(out["topk_logprobs"][0, 3], [-0.25, -2.0])  # exact in float16
    np.testing.assert_array_equal(out["topk_logprobs"][1, 1], [-0.125, -3.0])
    assert np.all(out["topk_ids"][0, :2] == 0) and np.all(out["topk_ids"][1, 2:] == 0)


@pytest.mark.parametrize("id_type,lp_type", [(pa.uint16(), pa.float16()), (pa.uint8(), pa.float32()),
                                             (pa.int32(), pa.float32())])
def test_collate_kd_reads_every_stored_id_and_logprob_type(id_type, lp_type):
    """The logits stage stores ids in the narrowest type the vocabulary allows and log-probs as
    float16 or float32: collate gives the same int64/float32 arrays for each."""
    table = _kd_table()
    cast = table.cast(pa.schema([
        f.with_type({"input_ids": pa.list_(id_type), "topk_ids": pa.list_(pa.list_(id_type)),
                     "topk_logprobs": pa.list_(pa.list_(lp_type))}.get(f.name, f.type)) for f in table.schema]))
    assert cast.schema.field("topk_ids").type == pa.list_(pa.list_(id_type))
    want, got = collate("kd", table, PAD), collate("kd", cast, PAD)
    for name in want:
        assert got[name].dtype == want[name].dtype
        np.testing.assert_array_equal(got[name], want[name])


def test_collate_sft_has_no_topk():
    out = collate("sft", _kd_table().select(["id", "input_ids", "response_start"]), pad_id=7)
    assert set(out) == {"input_ids", "attention_mask", "labels"}
    np.testing.assert_array_equal(out["input_ids"][0], [11, 12, 13, 14, 7, 7])
    np.testing.assert_array_equal(out["labels"][2], [X, X, X, 34, 35, 36])


def test_collate_dpo_stacks_chosen_then_rejected():
    batch = pa.table(
        {
            "id": ["a", "b"],
            "chosen_input_ids": pa.array([[1, 2, 3], [4, 5, 6, 7]], pa.list_(pa.int32())),
            "chosen_response_start": pa.array([1, 2], pa.int32()),
            "rejected_input_ids": pa.array([[1, 2, 8, 9, 10], [4, 5]], pa.list_(pa.int32())),
            "rejected_response_start": pa.array([1, 1], pa.int32()),
            "ref_chosen_logp": pa.array([-3.0, -4.5], pa.float64()),
            "ref_rejected_logp": pa.array([-6.0, -1.5], pa.float64()),
        }
    )
    out = collate("dpo", batch, PAD)
    assert set(out) == {"input_ids", "attention_mask", "labels", "ref_chosen", "ref_rejected"}
    np.testing.assert_array_equal(
        out["input_ids"],
        [
            [1, 2, 3, 0, 0],  # chosen a
            [4, 5, 6, 7, 0],  # chosen b
            [1, 2, 8, 9, 10],  # rejected a
            [4, 5, 0, 0, 0],  # rejected b
        ],
    )
    np.testing.assert_array_equal(
        out["attention_mask"],
        [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]],
    )
    np.testing.assert_array_equal(
        out["labels"],
        [
            [X, 2, 3, X, X],
            [X, X, 6, 7, X],
            [X, 2, 8, 9, 10],
            [X, 5, X, X, X],
        ],
    )
    assert out["ref_chosen"].dtype == np.float32 and out["ref_rejected"].dtype == np.float32
    np.testing.assert_array_equal(out["ref_chosen"], [-3.0, -4.5])
    np.testing.assert_array_equal(out["ref_rejected"], [-6.0, -1.5])


@pytest.mark.parametrize("objective", ["kd", "sft"])
def test_collate_single_row(objective):
    out = collate(objective, _kd_table().slice(1, 1), PAD)
    np.testing.assert_array_equal(out["input_ids"], [[21, 22]])
    np.testing.assert_array_equal(out["labels"], [[X, 22]])


def test_left_padding_and_response_window_by_hand():
    # ROWS = [[11,12,13,14],[21,22],[31..36]], STARTS = [2, 1, 3]; T = 6
    out = collate("kd", _kd_table(), PAD, left_pad=True)
    np.testing.assert_array_equal(out["input_ids"], [[0, 0, 11, 12, 13, 14], [0, 0, 0, 0, 21, 22],
                                                     [31, 32, 33, 34, 35, 36]])
    np.testing.assert_array_equal(out["labels"], [[X, X, X, X, 13, 14], [X, X, X, X, X, 22],
                                                  [X, X, X, 34, 35, 36]])
    np.testing.assert_array_equal(out["position_ids"], [[0, 0, 0, 1, 2, 3], [0, 0, 0, 0, 0, 1],
                                                        [0, 1, 2, 3, 4, 5]])
    # top-k entry t of a row sits at its token's position: row 0's two entries at 4 and 5
    np.testing.assert_array_equal(out["topk_ids"][0, 4:], [[1, 2], [3, 4]])
    np.testing.assert_array_equal(out["topk_ids"][1, 5], [5, 6])
    np.testing.assert_array_equal(out["topk_ids"][2, 3:], [[7, 8], [9, 10], [11, 12]])
    first, cut = response_window(out)
    assert first == 2  # the first response token is at 3; logits from position 2 predict it
    assert cut["labels"].shape == (3, 4) and cut["topk_ids"].shape == (3, 4, 2)
    assert cut["input_ids"].shape == (3, 6) and cut["position_ids"].shape == (3, 6)
    np.testing.assert_array_equal(cut["weight"], out["weight"])


@pytest.mark.parametrize("objective", ["sft", "kd", "dpo"])
def test_left_padded_window_gives_the_right_padded_full_loss_and_gradient(objective, tmp_path):
    """The training loop's batches (left padding, logits only from the response window) give the
    loss and gradients of the plain right-padded full forward."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from proxykd.training import compute_loss

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=0))
    table = _kd_table()
    if objective == "dpo":
        table = pa.table({"id": ["a", "b"],
                          "chosen_input_ids": pa.array([[1, 2, 3], [4, 5, 6, 7, 9, 9, 9]], pa.list_(pa.int32())),
                          "chosen_response_start": pa.array([1, 2], pa.int32()),
                          "rejected_input_ids": pa.array([[1, 2, 8, 9, 10], [4, 5, 3]], pa.list_(pa.int32())),
                          "rejected_response_start": pa.array([1, 2], pa.int32()),
                          "ref_chosen_logp": pa.array([-3.0, -4.5]), "ref_rejected_logp": pa.array([-6.0, -1.5])})
    params = {"alpha": 2.0, "sample_weighting": True, "beta": 0.5, "nll_weight": 1.0}

    def loss_and_grad(left):
        model.zero_grad()
        arrays = collate(objective, table, PAD, left_pad=left)
        first, arrays = response_window(arrays) if left else (0, arrays)
        t = {k: torch.as_tensor(v) for k, v in arrays.items()}
        kw = {"position_ids": t["position_ids"], "logits_to_keep": t["input_ids"].shape[1] - first} if left else {}
        logits = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"], **kw).logits
        loss, _ = compute_loss(objective, logits.float(), t, params)
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    want_loss, want_grad = loss_and_grad(False)
    got_loss, got_grad = loss_and_grad(True)
    assert np.isfinite(got_loss)
    assert abs(got_loss - want_loss) < 1e-5 * max(1.0, abs(want_loss))
    assert torch.allclose(got_grad, want_grad, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- numpy collate vs the list-based reference


def reference_collate(objective: str, batch: pa.Table, pad_id: int, left_pad: bool = False) -> dict:
    """The straightforward per-row version `collate` replaced (Python lists, one row at a time)."""

    def pad(rows, starts):
        T, B = max(len(x) for x in rows), len(rows)
        ids, mask, labels = np.full((B, T), pad_id, np.int64), np.zeros((B, T), np.int64), np.full((B, T), X, np.int64)
        for b, (row, start) in enumerate(zip(rows, starts)):
            n, o = len(row), T - len(row) if left_pad else 0
            ids[b, o:o + n], mask[b, o:o + n], labels[b, o + start:o + n] = row, 1, row[start:]
        return ids, mask, labels

    if objective == "dpo":
        rows = batch["chosen_input_ids"].to_pylist() + batch["rejected_input_ids"].to_pylist()
        starts = batch["chosen_response_start"].to_pylist() + batch["rejected_response_start"].to_pylist()
        ids, mask, labels = pad(rows, starts)
        out = {"input_ids": ids, "attention_mask": mask, "labels": labels,
               "ref_chosen": np.asarray(batch["ref_chosen_logp"].to_pylist(), np.float32),
               "ref_rejected": np.asarray(batch["ref_rejected_logp"].to_pylist(), np.float32)}
    else:
        rows, starts = batch["input_ids"].to_pylist(), batch["response_start"].to_pylist()
        ids, mask, labels = pad(rows, starts)
        out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if objective == "kd":
            T = ids.shape[1]
            tids, tlps = batch["topk_ids"].to_pylist(), batch["topk_logprobs"].to_pylist()
            k = len(tids[0][0])
            out["topk_ids"] = np.zeros((len(rows), T, k), np.int64)
            out["topk_logprobs"] = np.zeros((len(rows), T, k), np.float32)
            for b, (rid, rlp, start) in enumerate(zip(tids, tlps, starts)):
                at = start + (T - len(rows[b]) if left_pad else 0)
                out["topk_ids"][b, at:at + len(rid)] = np.asarray(rid, np.int64)
                out["topk_logprobs"][b, at:at + len(rid)] = np.asarray(rlp, np.float32)
            out["weight"] = np.asarray(batch["weight"].to_pylist(), np.float32)
    if left_pad:
        out["position_ids"] = np.maximum(mask.cumsum(1) - 1, 0)
    return out


def random_kd_table(rng, n, k, id_type, lp_type, vocab=250):
    """Rows of random lengths (1..40 tokens, some with the response at 0 or one token long)."""
    rows = []
    for i in range(n):
        length = int(rng.integers(1, 40))
        start = int(rng.integers(0, length))
        lp = -rng.exponential(2.0, (length - start, k))
        rows.append({"id": f"r{i:04d}", "input_ids": rng.integers(0, vocab, length).tolist(), "response_start": start,
                     "topk_ids": rng.integers(0, vocab, (length - start, k)).tolist(), "topk_logprobs": lp.tolist(),
                     "weight": float(rng.uniform())})
    schema = pa.schema([("id", pa.string()), ("input_ids", pa.list_(id_type)), ("response_start", pa.int32()),
                        ("topk_ids", pa.list_(pa.list_(id_type))), ("topk_logprobs", pa.list_(pa.list_(lp_type))),
                        ("weight", pa.float64())])
    return pa.Table.from_pylist(rows, schema=schema)


def random_dpo_table(rng, n, id_type):
    rows = []
    for i in range(n):
        start = int(rng.integers(0, 6))
        prompt = rng.integers(0, 200, start).tolist()
        rows.append({"id": f"p{i:04d}", "chosen_input_ids": prompt + rng.integers(0, 200, int(rng.integers(1, 20))).tolist(),
                     "chosen_response_start": start,
                     "rejected_input_ids": prompt + rng.integers(0, 200, int(rng.integers(1, 20))).tolist(),
                     "rejected_response_start": start, "ref_chosen_logp": float(rng.uniform(-50, 0)),
                     "ref_rejected_logp": float(rng.uniform(-50, 0))})
    schema = pa.schema([("id", pa.string()), ("chosen_input_ids", pa.list_(id_type)), ("chosen_response_start", pa.int64()),
                        ("rejected_input_ids", pa.list_(id_type)), ("rejected_response_start", pa.int64()),
                        ("ref_chosen_logp", pa.float64()), ("ref_rejected_logp", pa.float64())])
    return pa.Table.from_pylist(rows, schema=schema)


def layouts(table, rng):
    """The same rows as the loop meets them: whole, as several chunks, sliced, and taken out of order."""
    yield "whole", table
    yield "chunked", pa.concat_tables([table.slice(0, 7), table.slice(7, 5), table.slice(12)])
    yield "sliced", table.slice(3, 9)
    yield "taken", pa.concat_tables([table.slice(0, 10), table.slice(10)]).take(rng.permutation(table.num_rows)[:11])


@pytest.mark.parametrize("id_type", [pa.uint8(), pa.uint16(), pa.int32()])
@pytest.mark.parametrize("lp_type", [pa.float16(), pa.float32()])
@pytest.mark.parametrize("left", [False, True])
def test_numpy_collate_equals_the_list_reference_on_random_rows(id_type, lp_type, left):
    rng = np.random.default_rng([id_type.bit_width, lp_type.bit_width, left])
    table = random_kd_table(rng, 20, k=int(rng.integers(1, 6)), id_type=id_type, lp_type=lp_type)
    for name, batch in layouts(table, rng):
        for objective in ("kd", "sft"):
            want, got = reference_collate(objective, batch, 3, left), collate(objective, batch, 3, left)
            assert set(got) == set(want), (name, objective)
            for key in want:
                assert got[key].dtype == want[key].dtype, (name, objective, key)
                np.testing.assert_array_equal(got[key], want[key], err_msg=f"{name} {objective} {key}")
    dpo = random_dpo_table(rng, 16, id_type)
    for name, batch in layouts(dpo, rng):
        want, got = reference_collate("dpo", batch, 3, left), collate("dpo", batch, 3, left)
        for key in want:
            assert got[key].dtype == want[key].dtype
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"dpo {name} {key}")


def test_collate_refuses_topk_lists_that_do_not_fit_the_response():
    table = _kd_table()
    too_many = table.set_column(table.schema.get_field_index("topk_ids"), "topk_ids",
                                pa.array([[[1, 2]] * 3, [[5, 6]], [[7, 8]] * 3], pa.list_(pa.list_(pa.int32()))))
    too_many = too_many.set_column(too_many.schema.get_field_index("topk_logprobs"), "topk_logprobs",
                                   pa.array([[[-1.0, -2.0]] * 3, [[-1.0, -2.0]], [[-1.0, -2.0]] * 3]))
    with pytest.raises(ValueError, match="more top-k entries than response positions"):
        collate("kd", too_many, PAD)
    ragged = table.set_column(table.schema.get_field_index("topk_ids"), "topk_ids",
                              pa.array([[[1, 2], [3]], [[5, 6]], [[7, 8], [9, 10], [11, 12]]], pa.list_(pa.list_(pa.int32()))))
    with pytest.raises(ValueError, match="different sizes"):
        collate("kd", ragged, PAD)


# ---------------------------------------------------------------- length sorting and padding


def test_length_sorted_keeps_the_rows_and_breaks_ties_in_epoch_order():
    from proxykd.training import length_sorted

    lengths = np.array([5, 3, 9, 3, 1, 5, 7])
    rows = np.array([6, 0, 3, 5, 1, 2])
    got = length_sorted(rows, lengths)
    assert sorted(got.tolist()) == sorted(rows.tolist())
    assert got.tolist() == sorted(rows.tolist(), key=lambda r: (lengths[r], rows.tolist().index(r)))
    assert got.tolist() == [3, 1, 0, 5, 6, 2]  # lengths 3, 3, 5, 5, 7, 9; 3 before 1 and 0 before 5 as in `rows`


@pytest.mark.parametrize("world,accum", [(1, 1), (1, 3), (2, 1), (2, 2), (3, 4)])
def test_snake_dealing_gives_every_slice_to_one_worker(world, accum):
    from proxykd.training import worker_micro_batches

    rows = np.arange(50)
    slices = np.array_split(rows, world * accum)
    got = [worker_micro_batches(rows, r, world, accum) for r in range(world)]
    taken = [m.tolist() for w in got for m in w]
    assert sorted(taken) == sorted(s.tolist() for s in slices)
    for a in range(accum):  # slot a holds slices a·world ... a·world + world - 1, every other slot reversed
        order = range(world) if a % 2 == 0 else reversed(range(world))
        assert [got[r][a].tolist() for r in order] == [s.tolist() for s in slices[a * world:(a + 1) * world]]


def test_padding_fraction_is_the_padding_of_the_collated_batches():
    from proxykd.training import length_sorted, padding_fraction

    rng = np.random.default_rng(5)
    table = random_kd_table(rng, 24, 2, pa.uint16(), pa.float16())
    lengths = np.array([[len(x)] for x in table["input_ids"].to_pylist()])
    for rows in (np.arange(24), length_sorted(rng.permutation(24), lengths[:, 0])):
        micro = np.array_split(rows, 4)
        masks = [collate("sft", table.take(m), PAD)["attention_mask"] for m in micro]
        want = 1 - sum(m.sum() for m in masks) / sum(m.size for m in masks)
        assert padding_fraction(micro, lengths) == pytest.approx(want)
    shuffled = rng.permutation(24)
    assert padding_fraction(np.array_split(length_sorted(shuffled, lengths[:, 0]), 4), lengths) < \
        padding_fraction(np.array_split(shuffled, 4), lengths)
    # DPO: chosen and rejected of a micro-batch pad to their common longest
    pairs = np.array([[4, 6], [2, 3]])
    assert padding_fraction([np.array([0, 1])], pairs) == pytest.approx(1 - 15 / 24)
