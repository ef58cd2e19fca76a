"""The shared Ray Train loop: data order and sharding (pure), the Parquet index and reader, the
input stream's resume, the lr schedule, and real Ray Train runs of the KD and DPO objectives on a
tiny Llama: 2 workers (DDP, gloo) with gradient accumulation give the 1-worker loss curve; a table
several times larger than the memory bound streams from Parquet with the in-memory loss curve; a
worker SIGKILLed mid-run of a streamed table resumes from the last checkpoint with no batch repeated
or skipped (slow); FSDP matches one worker (slow); LoRA trains only the adapters and saves a plain
merged Hugging Face model."""

import itertools
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from proxykd import training
from proxykd.config import (
    LoraConfig,
    ModelConfig,
    ResourcesConfig,
    TinyModelSpec,
    TrainConfig,
)
from proxykd.models import materialize_model

# ---------------------------------------------------------------- pure parts


def test_epoch_order_is_a_seeded_permutation():
    a, b = training.epoch_order(50, 3, 0, True), training.epoch_order(50, 3, 1, True)
    assert sorted(a) == list(range(50)) and sorted(b) == list(range(50))
    assert not np.array_equal(a, b)  # a new order every epoch
    assert np.array_equal(a, training.epoch_order(50, 3, 0, True))  # the same on every worker and retry
    assert np.array_equal(training.epoch_order(5, 3, 0, False), np.arange(5))


@pytest.mark.parametrize("world,accum", [(1, 1), (2, 1), (1, 3), (2, 2), (3, 2)])
def test_every_row_of_an_epoch_is_trained_once(world, accum):
    n, batch = 23, 2
    G = batch * world * accum
    order = training.epoch_order(n, 0, 0, True)
    steps = training.steps_per_epoch(n, G, world * accum)
    seen = []
    for s in range(steps):
        rows = training.step_rows(order, s, G)
        parts = [training.worker_micro_batches(rows, r, world, accum) for r in range(world)]
        assert all(len(m) == accum and all(len(x) > 0 for x in m) for m in parts)
        seen += [int(i) for m in parts for x in m for i in x]
    assert len(seen) == len(set(seen))
    # only a last partial batch too small to give every micro-batch a row is dropped
    assert n - len(seen) < world * accum
    assert n - len(seen) == (n % G if n % G < world * accum else 0)


def test_fits_at_once_is_what_the_clusters_totals_hold_and_never_zero():
    one_cpu = {"num_workers": 1, "resources_per_worker": {"CPU": 1}}
    assert training.fits_at_once({"CPU": 4.0}, one_cpu) == 4
    assert training.fits_at_once({"CPU": 4.0}, {**one_cpu, "num_workers": 2}) == 2
    assert training.fits_at_once({"CPU": 3.0}, {**one_cpu, "num_workers": 2}) == 1
    gpu = {"num_workers": 1, "resources_per_worker": {"CPU": 1, "GPU": 1}}
    assert training.fits_at_once({"CPU": 16.0, "GPU": 1.0}, gpu) == 1
    assert training.fits_at_once({"CPU": 16.0, "GPU": 8.0}, gpu) == 8
    assert training.fits_at_once({"CPU": 2.0}, gpu) == 1  # no GPU node yet: one, for the autoscaler to place
    mem = {"num_workers": 1, "resources_per_worker": {"CPU": 1, "memory": 8 * 2**30}}
    assert training.fits_at_once({"CPU": 8.0, "memory": 20.0 * 2**30}, mem) == 2
    assert training.fits_at_once({"CPU": 8.0}, {"num_workers": 1, "resources_per_worker": {"CPU": 0}}) == 1


def test_lr_factor():
    assert [training.lr_factor(s, 10, 0, "constant") for s in range(10)] == [1.0] * 10
    assert [training.lr_factor(s, 10, 4, "constant") for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    lin = [training.lr_factor(s, 10, 2, "linear") for s in range(10)]
    assert lin[:3] == [0.5, 1.0, 1.0] and lin[-1] == pytest.approx(1 / 8)
    assert all(x > y for x, y in itertools.pairwise(lin[2:]))
    cos = [training.lr_factor(s, 10, 0, "cosine") for s in range(10)]
    assert cos[0] == 1.0 and cos[5] == pytest.approx(0.5) and cos[9] == pytest.approx(0.5 * (1 + math.cos(0.9 * math.pi)))


def test_worker_slices_add_up_to_the_global_mean():
    """compute_loss with the global token count: summed over micro-batches of a global batch it
    is the global batch's token mean, however the batch is split."""
    rng = np.random.default_rng(0)
    table = kd_table(rng, 8, vocab=40, k=3)
    logits = torch.randn(8, 24, 40, generator=torch.Generator().manual_seed(0))
    params = {"alpha": 2.0, "sample_weighting": True}
    ntok = training.response_tokens(table, "kd")

    def loss_of(rows, num_tokens):
        t = {k: torch.as_tensor(v) for k, v in training.collate("kd", table.take(rows), 0).items()}
        T = t["input_ids"].shape[1]
        return training.compute_loss("kd", logits[rows, :T], t, params, num_tokens)[0]

    rows = np.arange(8)
    # padding to the longest row changes nothing, so one big batch is the reference
    whole = loss_of(rows, None)
    assert int(ntok.sum()) == int((training.collate("kd", table, 0)["labels"][:, 1:] != -100).sum())
    for world, accum in [(2, 1), (2, 2), (4, 2)]:
        total = 0.0
        for r in range(world):
            for m in training.worker_micro_batches(rows, r, world, accum):
                total += loss_of(m, ntok.sum() / world) / world  # DDP averages over workers
        torch.testing.assert_close(total, whole, rtol=1e-5, atol=1e-6)


def test_train_and_distill_config_keys():
    from pydantic import ValidationError

    from proxykd.config import DistillConfig

    with pytest.raises(ValidationError, match="lora with strategy fsdp"):
        TrainConfig(strategy="fsdp", lora={"r": 4})
    with pytest.raises(ValidationError):
        TrainConfig(lr_schedule="step")
    with pytest.raises(ValidationError):
        DistillConfig(tail="drop")
    d = DistillConfig()
    assert (d.divergence, d.tail, d.train.lr_schedule, d.train.strategy, d.train.lora) == (
        "forward", "tail_bucket", "constant", "ddp", None)


class _WritesMarker:
    """Unpickling this runs code: it creates `path` (a harmless stand-in for os.system)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    import pickle

    state, marker = tmp_path / "train_state.pt", tmp_path / "ran"
    torch.save({"model": {"w": torch.zeros(2)}, "step": _WritesMarker(marker)}, state)
    torch.load(state, weights_only=False)  # the unsafe load the loader must not do: it runs the code
    assert marker.exists()
    marker.unlink()
    with pytest.raises(pickle.UnpicklingError):
        training.load_state(state)
    assert not marker.exists()


def test_a_checkpoint_state_of_tensors_and_plain_types_loads():
    """What train_loop saves: state dicts of a stepped AdamW and LambdaLR, ints, metric rows."""
    import io

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: training.lr_factor(s, 10, 2, "cosine"))
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched.step()
    row = {"step": 1, "epoch": 0, "batch": "abc", "loss": 0.5, "lr": sched.get_last_lr()[0], "attempt": 0}
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "step": 1, "epoch": 0, "batch_in_epoch": 1, "rows": 24, "global_batch": 8, "history": [row], "attempt": 0}
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    got = training.load_state(buf)
    assert got["history"] == [row] and got["scheduler"] == sched.state_dict()
    torch.testing.assert_close(got["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


# ---------------------------------------------------------------- rows read in place from Parquet


def write_shards(table, folder, rng, files=3, row_group_size=7):
    """`table`'s rows shuffled into `files` Parquet files of several row groups each."""
    folder.mkdir(parents=True, exist_ok=True)
    shuffled = table.take(rng.permutation(table.num_rows))
    cuts = np.linspace(0, table.num_rows, files + 1).astype(int)
    paths = []
    for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
        paths.append(folder / f"part-{i}.parquet")
        pq.write_table(shuffled.slice(a, b - a), paths[-1], row_group_size=row_group_size + i)
    return paths


def test_parquet_rows_index_and_read_the_in_memory_rows(tmp_path):
    rng = np.random.default_rng(3)
    table = kd_table(rng, 60, vocab=200, k=3)
    files = write_shards(table, tmp_path / "kd", rng)
    rows = training.ParquetRows(files)
    got, want = rows.index(), training.table_index(table.sort_by("id"))
    assert got.ids.equals(want.ids) and got.ids.to_pylist() == sorted(table["id"].to_pylist())
    np.testing.assert_array_equal(got.lengths, want.lengths)
    np.testing.assert_array_equal(got.response_tokens(), training.response_tokens(table.sort_by("id"), "kd"))
    assert got.fingerprint() == want.fingerprint() and rows.num_rows == 60
    shards = training.ShardReader(rows.files, got.where, batch_rows=4, max_open=2, max_cursors=2)
    memory = training.TableReader(table.sort_by("id"))
    for objective in ("kd", "sft"):
        cols = training.read_columns(objective)
        for pos in [rng.permutation(60)[:n] for n in (1, 5, 17, 60)] + [np.arange(a, a + 6) for a in range(0, 54, 6)]:
            assert shards.take(pos, cols).equals(memory.take(pos, cols))
    # the report's cut to common ids
    keep = training.ParquetRows(files, ids=pa.array(["row-003", "row-041", "not-there"]))
    assert keep.index().ids.to_pylist() == ["row-003", "row-041"]
    assert keep.index().where.tolist() == got.where[[3, 41]].tolist()
    # DPO pairs: chosen and rejected lengths
    pairs = dpo_table(rng, 20, vocab=200)
    pindex = training.ParquetRows(write_shards(pairs, tmp_path / "dpo", rng, files=2)).index()
    np.testing.assert_array_equal(pindex.lengths, training.table_index(pairs.sort_by("id")).lengths)
    assert pindex.lengths.shape == (20, 2)
    # one id in two shards is refused, naming it
    pq.write_table(table.slice(5, 1), tmp_path / "kd" / "copy.parquet")
    with pytest.raises(ValueError, match="'row-005' occurs more than once"):
        training.ParquetRows(sorted((tmp_path / "kd").glob("*.parquet"))).index()


def test_report_arms_read_both_logits_tables_cut_to_their_common_ids(tmp_path):
    """report's training rows: the aligned and unaligned proxies' shards, read in place, each cut to
    the ids both hold (the same rows for every arm), sorted by id."""
    from types import SimpleNamespace

    from proxykd.report import Report

    rng = np.random.default_rng(9)
    table = kd_table(rng, 30, vocab=200, k=3)
    dirs = {"aligned": tmp_path / "a", "unaligned": tmp_path / "u"}
    write_shards(table.slice(0, 25), dirs["aligned"], rng, files=2)
    write_shards(table.slice(5), dirs["unaligned"], rng, files=3)
    rows = Report.training_rows(SimpleNamespace(logits_dirs=dirs))
    want = [f"row-{i:03d}" for i in range(5, 25)]
    for key in dirs:
        assert isinstance(rows[key], training.ParquetRows) and rows[key].num_rows == 20
        index = rows[key].index()
        assert index.ids.to_pylist() == want
        got = training.ShardReader(rows[key].files, index.where).take(np.arange(20), ["input_ids"])
        assert got["input_ids"].to_pylist() == table.slice(5, 20)["input_ids"].to_pylist()


READ_END_OF_GROUP = """
import sys, numpy as np, pyarrow as pa
from proxykd import training
path, n = sys.argv[1], int(sys.argv[2])
where = np.stack([np.zeros(n, int), np.zeros(n, int), np.arange(n)], 1)  # the ids are in file order
reader = training.ShardReader([path], where, batch_bytes=1 << 20)
rows = [reader.take(np.asarray(pos), training.read_columns("kd")) for pos in ([n - 1], [n - 2, 3], [n - 1])]
print(pa.default_memory_pool().max_memory(), sum(r.nbytes for r in rows))
"""


def test_shard_reader_memory_does_not_grow_with_the_row_group(tmp_path):
    """Rows near the end of one big row group are read through ~1 MB batches: the reading process's
    peak Arrow memory (a fresh process: its pool's peak is the reader's) is the same for a 49 and a
    98 MB group (11-12 MB seen), a fraction of either. The rows read equal the table's."""
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    peaks = []
    for n in (256, 512):
        big = big_kd_table(rng, n, (400, 401), k=64, vocab=200)
        path = tmp_path / f"one-group-{n}.parquet"
        pq.write_table(big, path, row_group_size=n)
        assert pq.read_metadata(path).num_row_groups == 1
        out = subprocess.run([sys.executable, "-c", READ_END_OF_GROUP, str(path), str(n)],
                             capture_output=True, text=True, check=True).stdout.split()
        peaks.append(int(out[0]))
        assert 0 < int(out[1]) < peaks[-1] < big.nbytes / 3, (out, big.nbytes)
        reader = training.ShardReader([str(path)], np.stack([np.zeros(n, int), np.zeros(n, int), np.arange(n)], 1),
                                      batch_bytes=1 << 20)
        for pos in ([n - 1], [n - 2, 3], [0, n - 1]):
            assert reader.take(np.asarray(pos), training.read_columns("kd")).equals(
                big.select(training.read_columns("kd")).take(pos))
    assert peaks[1] < 1.25 * peaks[0], peaks  # twice the group, not twice the memory


@pytest.mark.parametrize("world,rank,accum", [(1, 0, 1), (2, 1, 2)])
def test_a_resumed_input_stream_takes_exactly_the_next_micro_batches(tmp_path, world, rank, accum):
    """What a restarted worker reads from step s on is the uninterrupted stream's tail, from Parquet
    as from memory: same steps, slots and tensors."""
    rng = np.random.default_rng(4)
    table = kd_table(rng, 37, vocab=200, k=3)
    rows = training.ParquetRows(write_shards(table, tmp_path, rng))
    index = rows.index()
    tc = TrainConfig(batch_size=3, grad_accum_steps=accum, epochs=2, seed=5)
    G = tc.batch_size * world * accum
    per_epoch = training.steps_per_epoch(37, G, world * accum)
    total = per_epoch * tc.epochs

    def stream(reader, start):
        return [(s, m, first, {k: v.numpy() for k, v in t.items()})
                for s, m, first, t, _ in training.micro_batch_stream(index, reader, "kd", 0, tc, rank, world, start,
                                                                     total, per_epoch)]

    memory = training.TableReader(table.sort_by("id"))
    whole = stream(memory, 0)
    assert [(s, m) for s, m, _, _ in whole] == [(s, m) for s in range(total) for m in range(accum)]
    for start in (0, 1, per_epoch, total - 1):
        for reader in (memory, training.ShardReader(rows.files, index.where)):
            tail = stream(reader, start)
            assert [x[:3] for x in tail] == [x[:3] for x in whole[start * accum:]]
            for (_, _, _, a), (_, _, _, b) in zip(tail, whole[start * accum:]):
                assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- Ray Train runs


def kd_table(rng, n, vocab, k):
    rows = []
    for i in range(n):
        length = int(rng.integers(10, 24))
        start = int(rng.integers(2, 6))
        lp = np.log(rng.dirichlet(np.ones(k + 2), length - start))[:, :k]
        rows.append({
            "id": f"row-{i:03d}",
            "input_ids": rng.integers(6, vocab, length).tolist(),
            "response_start": start,
            "topk_ids": [rng.choice(vocab, k, replace=False).tolist() for _ in range(length - start)],
            "topk_logprobs": np.sort(lp, axis=1)[:, ::-1].astype(np.float16).tolist(),
            "weight": float(rng.uniform(0.1, 1.0)),
        })
    return pa.Table.from_pylist(rows)


def big_kd_table(rng, n, length_range, k, vocab):
    """`n` KD rows built as Arrow buffers (fast at any size): lengths in `length_range`, k
    distinct top-k ids a position, log-probs summing to under 0.9, int32 ids, float32 log-probs."""
    lengths = rng.integers(*length_range, n)
    starts = rng.integers(2, 20, n)
    counts = lengths - starts
    P = int(counts.sum())

    def lists(values, sizes):
        return pa.ListArray.from_arrays(pa.array(np.r_[0, np.cumsum(sizes)].astype(np.int32)), values)

    topk_ids = (rng.integers(0, vocab, (P, 1)) + np.arange(k)) % vocab
    lps = np.log(rng.uniform(0.01, 1.0, (P, k)) * 0.9 / k)
    return pa.table({
        "id": pa.array([f"big-{i:05d}" for i in range(n)]),
        "input_ids": lists(pa.array(rng.integers(6, vocab, int(lengths.sum())).astype(np.int32)), lengths),
        "response_start": pa.array(starts.astype(np.int32)),
        "topk_ids": lists(lists(pa.array(topk_ids.reshape(-1).astype(np.int32)), np.full(P, k)), counts),
        "topk_logprobs": lists(lists(pa.array(lps.reshape(-1).astype(np.float32)), np.full(P, k)), counts),
        "weight": pa.array(rng.uniform(0.1, 1.0, n)),
    })


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    spec = TinyModelSpec(hidden_size=64, num_layers=1, num_heads=2, intermediate_size=128)
    return materialize_model(ModelConfig(tiny=spec), tmp_path_factory.mktemp("student") / "model", seed=0)


@pytest.fixture(scope="module")
def table():
    return kd_table(np.random.default_rng(1), 24, vocab=200, k=4)


LOSS = {"alpha": 2.0, "sample_weighting": True, "divergence": "forward", "tail": "tail_bucket"}


def kd_run(out_dir, student, table, workers, **train) -> dict:
    """The keywords of one `training.fit` of the KD objective (3 epochs, cosine lr with warm-up)."""
    tc = TrainConfig(**{"epochs": 3, "lr": 3e-3, "lr_schedule": "cosine", "warmup_steps": 2, **train})
    return dict(name="kd", objective="kd", model_path=student, table=table, out_dir=out_dir, train=tc,
                resources=ResourcesConfig(train_workers=workers), loss=LOSS)


def run_kd(out_dir, student, table, workers, **train):
    training.fit(**kd_run(out_dir, student, table, workers, **train))
    return training.read_metrics(out_dir)


def expected_batches(table, tc_seed, epochs, G, parts):
    ids = table.sort_by("id")["id"].to_pylist()
    per_epoch = training.steps_per_epoch(len(ids), G, parts)
    return [training.batch_fingerprint([ids[r] for r in training.step_rows(
        training.epoch_order(len(ids), tc_seed, e, True), s, G)]) for e in range(epochs) for s in range(per_epoch)]


DPO_LOSS = {"beta": 0.5, "nll_weight": 0.7}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, local_ray, student, table):
    """The default suite's Ray Train runs, all at once (`training.fit_concurrently`, as the report's
    arms and distill's two students run): a fit of a tiny model spends about 20 of its 24 s starting
    and stopping Ray Train, and concurrent fits overlap that. Each is seeded: running them together
    changes none of their figures. {name: (out_dir, metrics rows)}."""
    root = tmp_path_factory.mktemp("trained")
    shards = write_shards(table, root / "shards", np.random.default_rng(7), files=3, row_group_size=3)
    pairs = dpo_table(np.random.default_rng(2), 16, vocab=200)

    def dpo_run(out, workers, **train):
        return dict(name="dpo", objective="dpo", model_path=student, table=pairs, out_dir=out,
                    train=TrainConfig(**{"epochs": 2, "lr": 3e-3, **train}),
                    resources=ResourcesConfig(train_workers=workers), loss=DPO_LOSS)

    runs = {
        # the reference: 1 worker, global batch 8 in one micro-batch
        "one": kd_run(root / "one", student, table, workers=1, batch_size=8),
        "two": kd_run(root / "two", student, table, workers=2, batch_size=2, grad_accum_steps=2),
        # the same rows as 3 shuffled Parquet shards of small row groups, read in place by the worker
        "streamed": kd_run(root / "streamed", student, training.ParquetRows(shards), workers=1, batch_size=8),
        "lora": kd_run(root / "lora", student, table, workers=1, batch_size=8, epochs=1, lr=1e-2,
                       lora=LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])),
        "dpo-one": dpo_run(root / "dpo-one", 1, batch_size=8),
        "dpo-two": dpo_run(root / "dpo-two", 2, batch_size=2, grad_accum_steps=2),
    }
    training.fit_concurrently(list(runs.values()), ResourcesConfig(train_workers=1))
    return {name: (run["out_dir"], training.read_metrics(run["out_dir"])) for name, run in runs.items()}


@pytest.fixture(scope="module")
def one_worker(trained):
    """The reference: 1 worker, global batch 8 in one micro-batch."""
    return trained["one"]


def assert_same_curve(a, b, keys=("loss", "nll", "kl", "lr"), rtol=1e-4):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert [r["batch"] for r in a] == [r["batch"] for r in b]
    for key in keys:
        x, y = [r[key] for r in a], [r[key] for r in b]
        np.testing.assert_allclose(x, y, rtol=rtol, err_msg=f"{key}: {x} vs {y}")


def test_two_workers_with_accumulation_match_one_worker(trained):
    _, ref = trained["one"]
    assert [r["step"] for r in ref] == list(range(1, 10))  # 24 rows / 8 = 3 steps × 3 epochs
    assert ref[0]["loss"] > ref[-1]["loss"]
    assert len({r["lr"] for r in ref}) > 3  # warm-up and cosine: the lr moves
    out, two = trained["two"]
    assert_same_curve(ref, two)
    assert all(r["kl"] > 0 and r["tokens_per_s"] > 0 for r in two)
    assert (out / "model" / "config.json").exists()
    # the final checkpoint Ray Train keeps loads under weights_only
    states = sorted((trained["one"][0] / "_ray").rglob(training.STATE_FILE))
    assert states and training.load_state(states[-1])["history"] == ref
    png = training.plot_metrics(out)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rows_streamed_from_parquet_give_the_in_memory_curve(trained):
    """The same rows as 3 shuffled Parquet shards of small row groups, read in place by the worker:
    the steps, batches and loss curve of the in-memory run, within 1e-5; the input metrics are there."""
    _, ref = trained["one"]
    out, got = trained["streamed"]
    assert_same_curve(ref, got, keys=("loss", "nll", "kl", "lr", "grad_norm"), rtol=1e-5)
    assert [r["pad_fraction"] for r in got] == [r["pad_fraction"] for r in ref]
    assert all(r["input_s"] > 0 and r["input_wait_s"] >= 0 and r["rss_mb"] > 0 for r in got)
    assert (out / "model" / "config.json").exists()


@pytest.mark.slow  # ~2 min on 2 busy cores: two one-epoch runs of 120 steps over ~400 MB
def test_a_table_several_times_the_memory_bound_streams_with_the_in_memory_curve(tmp_path, local_ray, student):
    """~400 MB of logits rows (k = 128, int32 ids, float32 log-probs: ~0.4 MB a row) as 4 shuffled
    Parquet shards, trained for one epoch straight from the files: the run completes, the worker's
    resident memory grows by less than a third of the table over the epoch (what it holds is a few
    micro-batches read, collated and queued, whatever the table's size), and the loss curve is the
    one the same rows give from memory (within 1e-5), whose worker does hold the table: its
    resident memory grows by more than half of it as the epoch touches every row."""
    rng = np.random.default_rng(6)
    big = big_kd_table(rng, 960, (380, 500), k=128, vocab=200)
    files = write_shards(big, tmp_path / "shards", rng, files=4, row_group_size=4)
    stream = run_kd(tmp_path / "stream", student, training.ParquetRows(files), workers=1, batch_size=8, epochs=1)
    memory = run_kd(tmp_path / "memory", student, big, workers=1, batch_size=8, epochs=1)
    assert [r["step"] for r in stream] == list(range(1, 121))
    assert_same_curve(memory, stream, keys=("loss", "nll", "kl", "lr", "grad_norm"), rtol=1e-5)
    growth = {name: max(r["rss_mb"] for r in rows) - rows[0]["rss_mb"] for name, rows in
              (("stream", stream), ("memory", memory))}
    table_mb = big.nbytes / 2**20
    assert growth["stream"] < table_mb / 3, (growth, table_mb)
    assert growth["memory"] > table_mb / 2, (growth, table_mb)
    assert all(0 <= r["pad_fraction"] < 0.3 and r["input_s"] > 0 for r in stream)


def dpo_table(rng, n, vocab):
    """Pairs as align's round sampler writes them: a shared prompt, two responses of different
    lengths, and reference sequence log-probs (any values: they only shift the margin)."""
    rows = []
    for i in range(n):
        start = int(rng.integers(2, 6))
        prompt = rng.integers(6, vocab, start).tolist()
        rows.append({
            "id": f"pair-{i:03d}",
            "chosen_input_ids": prompt + rng.integers(6, vocab, int(rng.integers(4, 14))).tolist(),
            "chosen_response_start": start,
            "rejected_input_ids": prompt + rng.integers(6, vocab, int(rng.integers(4, 14))).tolist(),
            "rejected_response_start": start,
            "ref_chosen_logp": float(rng.uniform(-60, -20)),
            "ref_rejected_logp": float(rng.uniform(-60, -20)),
        })
    return pa.Table.from_pylist(rows)


def test_dpo_two_workers_with_accumulation_match_one_worker(trained):
    """The align rounds' objective, nll_weight · NLL(chosen) + β-DPO: the sequence-level DPO term
    is divided by the global batch's pair count and the NLL by its chosen-token count, so 2 workers
    × 2 micro-batches of 2 pairs give the curve of 1 worker with 8 pairs."""
    (_, one), (_, two) = trained["dpo-one"], trained["dpo-two"]
    assert [r["step"] for r in one] == [1, 2, 3, 4]
    assert_same_curve(one, two, keys=("loss", "nll", "dpo", "margin", "lr"))
    np.testing.assert_allclose([r["loss"] for r in one], [DPO_LOSS["nll_weight"] * r["nll"] + r["dpo"] for r in one],
                               rtol=1e-5)
    # every epoch sees all 16 pairs: in the second one the policy prefers the chosen responses more
    assert one[2]["margin"] + one[3]["margin"] > one[0]["margin"] + one[1]["margin"]


@pytest.mark.slow  # ~75 s on 2 cores: a run, a lost worker, a restart
def test_worker_killed_mid_run_resumes_without_repeating_or_skipping(tmp_path, monkeypatch, one_worker, student, table):
    """Rows streamed from Parquet shards; the last of 2 workers SIGKILLs itself before step 6; Ray
    Train restarts the group from the last checkpoint (every 2 steps: 2 or 4) and the run ends like
    the uninterrupted in-memory one: same steps, same batches, same losses."""
    _, ref = one_worker
    files = write_shards(table, tmp_path / "shards", np.random.default_rng(8), files=2, row_group_size=5)
    monkeypatch.setenv(training.KILL_ENV, "6")
    got = run_kd(tmp_path, student, training.ParquetRows(files), workers=2, batch_size=4, checkpoint_every_steps=2)
    assert (tmp_path / ".killed-at-step-6").exists()
    summary = [(r["step"], r["attempt"], r["batch"]) for r in got]
    assert [r["step"] for r in got] == list(range(1, 10)), summary
    assert [r["batch"] for r in got] == expected_batches(table, 0, 3, 8, 2), summary
    resumed_at = min(r["step"] for r in got if r["attempt"] == 1)
    assert resumed_at in (3, 5), summary  # after checkpoint 2 or 4 (the last one Ray had registered)
    assert all(r["attempt"] == (r["step"] >= resumed_at) for r in got), summary
    assert_same_curve(ref, got)  # model, optimizer, scheduler and data position all restored
    assert (tmp_path / "model" / "config.json").exists()


def test_lora_trains_only_adapters_and_saves_a_merged_model(trained, student):
    from transformers import AutoModelForCausalLM

    out, rows = trained["lora"]
    assert [r["step"] for r in rows] == [1, 2, 3]
    before = AutoModelForCausalLM.from_pretrained(student).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    assert set(after) == set(before)  # a plain checkpoint: no lora_A/lora_B, no base_model prefix
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if ".q_proj." in k or ".v_proj." in k}
    assert not (out / "model" / "adapter_config.json").exists()


@pytest.mark.slow  # ~45 s plus the 1-worker reference run
def test_fsdp_two_workers_match_one_worker(tmp_path, one_worker, student, table):
    """strategy: fsdp (FSDP2 fully_shard per decoder layer, gloo on CPU) gives the same curve and
    the same final weights as one unsharded worker."""
    _, ref = one_worker
    got = run_kd(tmp_path, student, table, workers=2, batch_size=4, strategy="fsdp")
    assert_same_curve(ref, got)
    from transformers import AutoModelForCausalLM

    two = AutoModelForCausalLM.from_pretrained(tmp_path / "model").state_dict()
    one = AutoModelForCausalLM.from_pretrained(one_worker[0] / "model").state_dict()
    assert set(two) == set(one)
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-3, atol=1e-5)


@pytest.mark.slow  # two short trainings: 1-3 minutes on 2 cores
def test_distill_stage_trains_both_students_with_metrics_and_plot(tmp_path, local_ray, student, table):
    """The stage end to end from a logits shard: the Proxy-KD student and the α = 0 baseline, each
    with one metrics line per step (NLL and KL apart), a loss plot, and loadable models."""
    import pyarrow.parquet as pq
    from conftest import tiny_config

    from proxykd import distill
    from proxykd.config import parse_config

    cfg = parse_config(tiny_config(tmp_path / "run", distill={"alpha": 2.0, "divergence": "jsd", "tail": "renormalize",
                                                             "train": {"epochs": 1, "batch_size": 8}}))
    (tmp_path / "run" / "logits").mkdir(parents=True)
    pq.write_table(table.append_column("ll", pa.array([-1.0] * table.num_rows)), tmp_path / "run" / "logits" / "part-0.parquet")
    manifest = distill.run(cfg, student, student, "logits-hash")
    for name, folder in (("proxykd", tmp_path / "run" / "distill"), ("baseline", tmp_path / "run" / "distill" / "baseline")):
        assert manifest["models"][name] == str(folder / "model")
        rows = training.read_metrics(folder)
        assert [r["step"] for r in rows] == [1, 2, 3]
        assert all({"loss", "nll", "lr", "tokens_per_s"} <= set(r) for r in rows)
        assert all(("kl" in r) == (name == "proxykd") for r in rows)
        assert (folder / "loss.png").stat().st_size > 0
    kd = training.read_metrics(tmp_path / "run" / "distill")
    np.testing.assert_allclose([r["loss"] for r in kd], [r["nll"] + 2.0 * r["kl"] for r in kd], rtol=1e-5)
