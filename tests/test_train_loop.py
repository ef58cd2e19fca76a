"""The shared Ray Train loop: data order and sharding (pure), the lr schedule, and real Ray Train
runs of the KD and DPO objectives on a tiny Llama: 2 workers (DDP, gloo) with gradient accumulation
give the 1-worker loss curve; a worker SIGKILLed mid-run resumes from the last checkpoint with no batch
repeated or skipped (slow); FSDP matches one worker (slow); LoRA trains only the adapters and saves
a plain merged Hugging Face model."""

import itertools
import math

import numpy as np
import pyarrow as pa
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


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    spec = TinyModelSpec(hidden_size=64, num_layers=1, num_heads=2, intermediate_size=128)
    return materialize_model(ModelConfig(tiny=spec), tmp_path_factory.mktemp("student") / "model", seed=0)


@pytest.fixture(scope="module")
def table():
    return kd_table(np.random.default_rng(1), 24, vocab=200, k=4)


LOSS = {"alpha": 2.0, "sample_weighting": True, "divergence": "forward", "tail": "tail_bucket"}


def run_kd(out_dir, student, table, workers, **train):
    tc = TrainConfig(**{"epochs": 3, "lr": 3e-3, "lr_schedule": "cosine", "warmup_steps": 2, **train})
    training.fit(name="kd", objective="kd", model_path=student, table=table, out_dir=out_dir, train=tc,
                 resources=ResourcesConfig(train_workers=workers), loss=LOSS)
    return training.read_metrics(out_dir)


def expected_batches(table, tc_seed, epochs, G, parts):
    ids = table.sort_by("id")["id"].to_pylist()
    per_epoch = training.steps_per_epoch(len(ids), G, parts)
    return [training.batch_fingerprint([ids[r] for r in training.step_rows(
        training.epoch_order(len(ids), tc_seed, e, True), s, G)]) for e in range(epochs) for s in range(per_epoch)]


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory, local_ray, student, table):
    """The reference: 1 worker, global batch 8 in one micro-batch."""
    out = tmp_path_factory.mktemp("one")
    return out, run_kd(out, student, table, workers=1, batch_size=8)


def assert_same_curve(a, b, keys=("loss", "nll", "kl", "lr")):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert [r["batch"] for r in a] == [r["batch"] for r in b]
    for key in keys:
        x, y = [r[key] for r in a], [r[key] for r in b]
        np.testing.assert_allclose(x, y, rtol=1e-4, err_msg=f"{key}: {x} vs {y}")


def test_two_workers_with_accumulation_match_one_worker(tmp_path, one_worker, student, table):
    _, ref = one_worker
    assert [r["step"] for r in ref] == list(range(1, 10))  # 24 rows / 8 = 3 steps × 3 epochs
    assert ref[0]["loss"] > ref[-1]["loss"]
    assert len({r["lr"] for r in ref}) > 3  # warm-up and cosine: the lr moves
    two = run_kd(tmp_path, student, table, workers=2, batch_size=2, grad_accum_steps=2)
    assert_same_curve(ref, two)
    assert all(r["kl"] > 0 and r["tokens_per_s"] > 0 for r in two)
    assert (tmp_path / "model" / "config.json").exists()
    # the final checkpoint Ray Train keeps loads under weights_only
    states = sorted((one_worker[0] / "_ray").rglob(training.STATE_FILE))
    assert states and training.load_state(states[-1])["history"] == ref
    png = training.plot_metrics(tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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


def test_dpo_two_workers_with_accumulation_match_one_worker(tmp_path, local_ray, student):
    """The align rounds' objective, nll_weight · NLL(chosen) + β-DPO: the sequence-level DPO term
    is divided by the global batch's pair count and the NLL by its chosen-token count, so 2 workers
    × 2 micro-batches of 2 pairs give the curve of 1 worker with 8 pairs."""
    table = dpo_table(np.random.default_rng(2), 16, vocab=200)
    loss = {"beta": 0.5, "nll_weight": 0.7}

    def run(out, workers, **train):
        tc = TrainConfig(**{"epochs": 2, "lr": 3e-3, **train})
        training.fit(name="dpo", objective="dpo", model_path=student, table=table, out_dir=out, train=tc,
                     resources=ResourcesConfig(train_workers=workers), loss=loss)
        return training.read_metrics(out)

    one = run(tmp_path / "one", 1, batch_size=8)
    two = run(tmp_path / "two", 2, batch_size=2, grad_accum_steps=2)
    assert [r["step"] for r in one] == [1, 2, 3, 4]
    assert_same_curve(one, two, keys=("loss", "nll", "dpo", "margin", "lr"))
    np.testing.assert_allclose([r["loss"] for r in one], [0.7 * r["nll"] + r["dpo"] for r in one], rtol=1e-5)
    # every epoch sees all 16 pairs: in the second one the policy prefers the chosen responses more
    assert one[2]["margin"] + one[3]["margin"] > one[0]["margin"] + one[1]["margin"]


@pytest.mark.slow  # ~75 s on 2 cores: a run, a lost worker, a restart
def test_worker_killed_mid_run_resumes_without_repeating_or_skipping(tmp_path, monkeypatch, one_worker, student, table):
    """The last of 2 workers SIGKILLs itself before step 6; Ray Train restarts the group from the
    last checkpoint (every 2 steps: 2 or 4) and the run ends like the
    uninterrupted one: same steps, same batches, same losses."""
    _, ref = one_worker
    monkeypatch.setenv(training.KILL_ENV, "6")
    got = run_kd(tmp_path, student, table, workers=2, batch_size=4, checkpoint_every_steps=2)
    assert (tmp_path / ".killed-at-step-6").exists()
    summary = [(r["step"], r["attempt"], r["batch"]) for r in got]
    assert [r["step"] for r in got] == list(range(1, 10)), summary
    assert [r["batch"] for r in got] == expected_batches(table, 0, 3, 8, 2), summary
    resumed_at = min(r["step"] for r in got if r["attempt"] == 1)
    assert resumed_at in (3, 5), summary  # after checkpoint 2 or 4 (the last one Ray had registered)
    assert all(r["attempt"] == (r["step"] >= resumed_at) for r in got), summary
    assert_same_curve(ref, got)  # model, optimizer, scheduler and data position all restored
    assert (tmp_path / "model" / "config.json").exists()


def test_lora_trains_only_adapters_and_saves_a_merged_model(tmp_path, local_ray, student, table):
    from transformers import AutoModelForCausalLM

    lora = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    rows = run_kd(tmp_path, student, table, workers=1, batch_size=8, epochs=1, lr=1e-2, lora=lora)
    assert [r["step"] for r in rows] == [1, 2, 3]
    before = AutoModelForCausalLM.from_pretrained(student).state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "model").state_dict()
    assert set(after) == set(before)  # a plain checkpoint: no lora_A/lora_B, no base_model prefix
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if ".q_proj." in k or ".v_proj." in k}
    assert not (tmp_path / "model" / "adapter_config.json").exists()


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
