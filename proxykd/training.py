"""One Ray Train loop for every training job in the pipeline; only the loss differs:

- `sft`: NLL of the response (warm-up SFT, and distillation with alpha = 0);
- `dpo`: nll_weight · NLL(chosen) + DPO(chosen, rejected; reference log-probs precomputed);
- `kd`:  NLL + alpha · w · top-k divergence to the proxy (`losses.nll_and_topk_kl`).

Data order is ours, not Ray Data's, so that a restarted run can continue at the exact batch: the
rows (sorted by `id`) sit once in Ray's object store, every epoch is a permutation from
`seed + epoch`, optimizer step s of the epoch takes rows [s·G, (s+1)·G) of it (G = batch_size ·
workers · grad_accum_steps), and worker r takes its own fixed slices of those. Each micro-batch
loss is a sum over its tokens divided by the token count of the whole global batch (× workers,
since DDP averages), so 1 worker and N workers, with or without accumulation, compute the same
gradient.

A checkpoint (every `checkpoint_every_steps` optimizer steps and at the end) holds
the trainable weights, optimizer, scheduler, global step, data position and metrics so far; a
restarted worker group (`FailureConfig`) or a rerun of `fit` continues from the last one. The
final checkpoint also holds the Hugging Face model (LoRA merged in), which `fit` copies to
`<out_dir>/model`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from proxykd.config import ResourcesConfig, TrainConfig

log = logging.getLogger("proxykd")

IGNORE = -100
STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.jsonl"
MODEL_DIR = "model"
# Test hook: the last worker SIGKILLs itself before this global step, once per out_dir.
KILL_ENV = "PROXYKD_TEST_KILL_AT_STEP"


# ---------------------------------------------------------------- batches (pure, tested) ----

def pad_sequences(input_ids: list, starts: list, pad_id: int, left: bool = False
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pad to the longest row: (input_ids [B,T], attention_mask [B,T], labels [B,T]) with
    labels = -100 on prompt and padding positions. Right padding by default; `left=True` puts
    the padding first, so every row's response ends at T (see `response_window`)."""
    T = max(len(x) for x in input_ids)
    B = len(input_ids)
    ids = np.full((B, T), pad_id, np.int64)
    mask = np.zeros((B, T), np.int64)
    labels = np.full((B, T), IGNORE, np.int64)
    for b, (row, start) in enumerate(zip(input_ids, starts)):
        n = len(row)
        o = T - n if left else 0
        ids[b, o:o + n] = row
        mask[b, o:o + n] = 1
        labels[b, o + start:o + n] = row[start:]
    return ids, mask, labels


def place_topk(topk_ids: list, topk_logprobs: list, starts: list, T: int, offsets: list | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Scatter per-row top-k lists (one entry per response position) to [B, T, k] aligned with
    the token positions (row b's tokens begin at `offsets[b]`, 0 without padding first); prompt
    and padding positions stay 0 and are masked by the labels."""
    k = len(topk_ids[0][0])
    ids = np.zeros((len(topk_ids), T, k), np.int64)
    lps = np.zeros((len(topk_ids), T, k), np.float32)
    for b, (rid, rlp, start) in enumerate(zip(topk_ids, topk_logprobs, starts)):
        n, at = len(rid), start + (offsets[b] if offsets else 0)
        ids[b, at : at + n] = np.asarray(rid, np.int64)
        lps[b, at : at + n] = np.asarray(rlp, np.float32)
    return ids, lps


def response_window(arrays: dict[str, np.ndarray]) -> tuple[int, dict[str, np.ndarray]]:
    """(first, arrays cut to positions [first, T)): the model only needs logits from the position
    before the batch's first response token on (`logits_to_keep = T - first`), and every loss
    reads labels and top-k from the same window. With left padding the window is the longest
    response + 1 positions, whatever the prompt lengths: with short answers after long prompts,
    most of the vocabulary-wide work (the head, the log-sum-exp) is skipped. `input_ids`,
    `attention_mask` and `position_ids` stay whole (the model reads the prompt)."""
    labelled = (arrays["labels"] != IGNORE).any(0)
    first = max(int(np.argmax(labelled)) - 1, 0) if labelled.any() else 0
    full = ("input_ids", "attention_mask", "position_ids")
    return first, {k: v if k in full or v.ndim < 2 else v[:, first:] for k, v in arrays.items()}


def collate(objective: str, batch: pa.Table, pad_id: int, left_pad: bool = False) -> dict[str, np.ndarray]:
    """Padded arrays of one micro-batch. `left_pad=True` (the training loop's choice) pads first
    and adds `position_ids` counting from each row's first token, so the rows' results equal
    those of right padding."""
    if objective == "dpo":
        # Chosen and rejected share one forward pass: rows [0, B) chosen, [B, 2B) rejected.
        ids = batch["chosen_input_ids"].to_pylist() + batch["rejected_input_ids"].to_pylist()
        starts = batch["chosen_response_start"].to_pylist() + batch["rejected_response_start"].to_pylist()
        input_ids, mask, labels = pad_sequences(ids, starts, pad_id, left_pad)
        out = {
            "input_ids": input_ids,
            "attention_mask": mask,
            "labels": labels,
            "ref_chosen": batch["ref_chosen_logp"].to_numpy().astype(np.float32),
            "ref_rejected": batch["ref_rejected_logp"].to_numpy().astype(np.float32),
        }
    else:
        starts = batch["response_start"].to_pylist()
        rows = batch["input_ids"].to_pylist()
        input_ids, mask, labels = pad_sequences(rows, starts, pad_id, left_pad)
        out = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
        if objective == "kd":
            T = input_ids.shape[1]
            out["topk_ids"], out["topk_logprobs"] = place_topk(
                batch["topk_ids"].to_pylist(), batch["topk_logprobs"].to_pylist(), starts, T,
                [T - len(r) for r in rows] if left_pad else None)
            out["weight"] = batch["weight"].to_numpy().astype(np.float32)
    if left_pad:
        out["position_ids"] = np.maximum(mask.cumsum(1) - 1, 0)
    return out


def response_tokens(table: pa.Table, objective: str) -> np.ndarray:
    """Per row, the number of positions the NLL counts (labels[1:] != -100): the response tokens
    not at position 0. For DPO, those of the chosen response."""
    prefix = "chosen_" if objective == "dpo" else ""
    lengths = np.asarray([len(x) for x in table[f"{prefix}input_ids"].to_pylist()], np.int64)
    starts = table[f"{prefix}response_start"].to_numpy().astype(np.int64)
    return lengths - np.maximum(starts, 1)


def epoch_order(num_rows: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_rows) if shuffle else np.arange(num_rows)


def steps_per_epoch(num_rows: int, global_batch: int, parts: int) -> int:
    """Full global batches, plus the last partial one if every micro-batch of it gets a row."""
    return num_rows // global_batch + (num_rows % global_batch >= parts)


def step_rows(order: np.ndarray, step_in_epoch: int, global_batch: int) -> np.ndarray:
    return order[step_in_epoch * global_batch : (step_in_epoch + 1) * global_batch]


def worker_micro_batches(rows: np.ndarray, rank: int, world: int, accum: int) -> list[np.ndarray]:
    """Worker `rank`'s `accum` micro-batches of one global batch: fixed contiguous slices, the
    same whichever way the batch is split, so no randomness enters the sharding."""
    return np.array_split(rows, world * accum)[rank * accum : (rank + 1) * accum]


def batch_fingerprint(ids: list[str]) -> str:
    return hashlib.sha1("\n".join(ids).encode()).hexdigest()[:12]


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base lr for optimizer step `step` (0-based) of `total`: linear warm-up
    over `warmup` steps, then constant, linear decay to 0 or cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def compute_loss(objective: str, logits, t: dict, params: dict, num_tokens=None, num_sequences=None):
    """Return (loss, {part: float}) for one micro-batch of tensors `t`. Token-level parts are
    sums divided by `num_tokens`, sequence-level ones by `num_sequences` (default: this batch's)."""
    from proxykd import losses

    if objective == "sft":
        nll = losses.nll_loss(logits, t["labels"], num_tokens)
        return nll, {"nll": nll.item()}
    if objective == "kd":
        weights = t["weight"] if params["sample_weighting"] else None
        nll, kl = losses.nll_and_topk_kl(
            logits, t["labels"], t["topk_ids"], t["topk_logprobs"], weights,
            divergence=params.get("divergence", "forward"), tail=params.get("tail", "tail_bucket"),
            jsd_beta=params.get("jsd_beta", 0.5), num_tokens=num_tokens,
        )
        return nll + params["alpha"] * kl, {"nll": nll.item(), "kl": kl.item()}
    if objective == "dpo":
        B = t["ref_chosen"].shape[0]
        n_seq = B if num_sequences is None else num_sequences
        seq = losses.sequence_logprobs(logits, t["labels"])
        dpo = losses.dpo_loss(seq[:B], seq[B:], t["ref_chosen"], t["ref_rejected"], params["beta"], n_seq)
        nll = losses.nll_loss(logits[:B], t["labels"][:B], num_tokens)
        margin = ((seq[:B] - t["ref_chosen"]) - (seq[B:] - t["ref_rejected"])).detach().sum() / n_seq
        return params["nll_weight"] * nll + dpo, {"nll": nll.item(), "dpo": dpo.item(), "margin": margin.item()}
    raise ValueError(f"unknown objective {objective!r}")


# ---------------------------------------------------------------- the worker loop ----

def _build_model(config: dict, tc: TrainConfig):
    import ray.train.torch
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(tc.seed)  # LoRA's initial A matrices: the same on every worker
    model = AutoModelForCausalLM.from_pretrained(config["model_path"], dtype=torch.float32)
    if tc.lora is not None:
        from peft import LoraConfig, get_peft_model

        lc = tc.lora
        model = get_peft_model(model, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                                 target_modules=lc.target_modules, task_type="CAUSAL_LM"))
    if tc.strategy == "ddp":
        return ray.train.torch.prepare_model(model)
    # FSDP2: every decoder layer its own shard group, then the root (embeddings, head). Ray's
    # prepare_model(parallel_strategy="fsdp") would do FSDP1 on GPUs only; this runs on CPU too.
    from torch.distributed.fsdp import fully_shard

    model.to(ray.train.torch.get_device())
    layer_types = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in layer_types:
            fully_shard(module)
    return fully_shard(model)


def _state_options(tc: TrainConfig, **kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Full (gathered) state dicts work alike for a plain model, DDP and FSDP; with LoRA only the
    # trainable adapter weights go into the checkpoint (the base comes from model_path).
    return StateDictOptions(full_state_dict=True, ignore_frozen_params=tc.lora is not None, **kw)


def _save_hf_model(model, tc: TrainConfig, tokenizer, path: Path, rank: int) -> None:
    """The plain Hugging Face folder vLLM and the server load: LoRA merged, no wrapper."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return
    inner = model.module if hasattr(model, "module") else model
    if tc.lora is not None:
        inner.merge_and_unload().save_pretrained(path)  # the end of training: merging in place is fine
    else:
        inner.save_pretrained(path, state_dict=full)
    tokenizer.save_pretrained(path)


def load_state(path: Path) -> dict:
    """A checkpoint's state, unpickled with weights_only: tensors and plain containers only, so a
    tampered checkpoint cannot run code (what `train_loop` saves is nothing else)."""
    import torch

    return torch.load(path, weights_only=True, map_location="cpu")


def train_loop(config: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from transformers import AutoTokenizer

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tc = TrainConfig(**config["train"])
    objective, name = config["objective"], config["name"]
    device = ray.train.torch.get_device()
    tokenizer = AutoTokenizer.from_pretrained(config["model_path"])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    table = ray.get(config["table"])
    ntok = response_tokens(table, objective)
    seq_lengths = np.asarray([len(x) for x in table["chosen_input_ids" if objective == "dpo" else "input_ids"].to_pylist()])
    ids = table["id"].to_pylist()
    G = tc.batch_size * world * tc.grad_accum_steps
    per_epoch = steps_per_epoch(table.num_rows, G, world * tc.grad_accum_steps)
    total = per_epoch * tc.epochs

    model = _build_model(config, tc)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, tc.warmup_steps, tc.lr_schedule))

    step, history, attempt = 0, [], 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # a restarted run: continue after the last checkpointed step
        with checkpoint.as_directory() as local:
            state = load_state(Path(local) / STATE_FILE)
        if (state["rows"], state["global_batch"]) != (table.num_rows, G):  # the data position would be wrong
            raise RuntimeError(f"[{name}] checkpoint was made with {state['rows']} rows and global batch "
                               f"{state['global_batch']}, now {table.num_rows} and {G}: use a fresh out_dir")
        set_model_state_dict(model, state["model"], options=_state_options(tc, strict=tc.lora is None))
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=_state_options(tc))
        scheduler.load_state_dict(state["scheduler"])
        step, history, attempt = state["step"], state["history"], state["attempt"] + 1
        if rank == 0:
            print(f"[{name}] resumed from step {step} (epoch {step // per_epoch}, batch {step % per_epoch})", flush=True)
    metrics_path = Path(config["metrics_path"])
    if rank == 0:  # the live log: what the checkpoint holds, then one line per step
        metrics_path.write_text("".join(json.dumps(h) + "\n" for h in history))

    bf16 = tc.bf16 if tc.bf16 is not None else device.type == "cuda"
    kill_at = config.get("kill_at_step")
    model.train()
    order_epoch, order = -1, None
    while step < total:
        epoch, i = divmod(step, per_epoch)
        if epoch != order_epoch:
            order_epoch, order = epoch, epoch_order(table.num_rows, tc.seed, epoch, tc.shuffle)
        rows = step_rows(order, i, G)
        if kill_at == step + 1 and rank == world - 1:
            marker = metrics_path.parent / f".killed-at-step-{kill_at}"
            if not marker.exists():  # first attempt only
                marker.touch()
                os.kill(os.getpid(), signal.SIGKILL)
        t0 = time.time()
        # DDP averages gradients over workers: scale so the sum over everything is one global mean.
        num_tokens = max(int(ntok[rows].sum()), 1) / world
        num_sequences = len(rows) / world
        parts: dict[str, float] = {}
        micro = worker_micro_batches(rows, rank, world, tc.grad_accum_steps)
        for m, mrows in enumerate(micro):
            first, arrays = response_window(collate(objective, table.take(mrows), pad_id, left_pad=True))
            t = {k: torch.as_tensor(v, device=device) for k, v in arrays.items()}
            keep = t["input_ids"].shape[1] - first
            last = m == len(micro) - 1
            # Gradients are reduced across workers only after the last micro-batch.
            if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
                model.set_requires_gradient_sync(last)
            sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
            with sync:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    logits = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"],
                                   position_ids=t["position_ids"], logits_to_keep=keep).logits
                loss, p = compute_loss(objective, logits.float(), t, config["loss"], num_tokens, num_sequences)
                loss.backward()
            p["loss"] = loss.item()
            for k, v in p.items():
                parts[k] = parts.get(k, 0.0) + v
        grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if world > 1:  # each worker holds its share of the global mean: add them up
            keys = sorted(parts)
            v = torch.tensor([parts[k] for k in keys], dtype=torch.float64, device=device)
            dist.all_reduce(v)
            parts = {k: float(x) / world for k, x in zip(keys, v.tolist())}
        step += 1
        row = {"step": step, "epoch": epoch, "batch": batch_fingerprint([ids[r] for r in rows]),
               **parts, "grad_norm": float(grad_norm), "lr": lr,
               "tokens_per_s": float(seq_lengths[rows].sum()) / max(time.time() - t0, 1e-9), "attempt": attempt}
        history.append(row)
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if step % 10 == 0 or step == 1 or step == total:
                print(f"[{name}] epoch {epoch} step {step}/{total} "
                      + " ".join(f"{k} {parts[k]:.4f}" for k in sorted(parts))
                      + f" lr {lr:.2e} tok/s {row['tokens_per_s']:.0f}", flush=True)

        # Only checkpoints go through ray.train.report: a report waits until Ray Train's
        # controller polls the worker (every 2 s by default), which would cap training at about
        # one step per poll; every step's metrics are in metrics.jsonl already.
        if step % tc.checkpoint_every_steps and step != total:
            continue
        opts = _state_options(tc, cpu_offload=True)
        state = {"model": get_model_state_dict(model, options=opts),
                 "optimizer": get_optimizer_state_dict(model, optimizer, options=opts)}
        with tempfile.TemporaryDirectory() as tmp:
            if step == total:
                _save_hf_model(model, tc, tokenizer, Path(tmp) / MODEL_DIR, rank)
            if rank == 0:
                state.update(scheduler=scheduler.state_dict(), step=step, epoch=step // per_epoch,
                             batch_in_epoch=step % per_epoch, rows=table.num_rows, global_batch=G,
                             history=history, attempt=attempt)
                torch.save(state, Path(tmp) / STATE_FILE)
            ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)


# ---------------------------------------------------------------- driver side ----

def fit(
    *,
    name: str,
    objective: str,
    model_path: str,
    table: pa.Table,
    out_dir: Path,
    train: TrainConfig,
    resources: ResourcesConfig,
    loss: dict,
) -> Path:
    """Train on the rows of `table` and return `<out_dir>/model` (a Hugging Face folder).
    `out_dir/_ray` holds Ray Train's run state and checkpoints; rerunning with the same out_dir
    resumes from them. `out_dir/metrics.jsonl` gets one line per optimizer step as it happens."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if table.num_rows == 0:
        raise ValueError(f"{name}: no training rows")
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {"name": name, "objective": objective, "model_path": model_path, "train": train.model_dump(),
              "loss": loss, "table": ray.put(table.sort_by("id")),
              "metrics_path": str((out_dir / METRICS_FILE).resolve())}
    if os.environ.get(KILL_ENV):
        config["kill_at_step"] = int(os.environ[KILL_ENV])
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=resources.train_workers, use_gpu=resources.use_gpu, resources_per_worker={"CPU": 1}
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str((out_dir / "_ray").resolve()),
            failure_config=FailureConfig(max_failures=train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    final = out_dir / MODEL_DIR
    tmp = out_dir / ".checkpoint.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    result.checkpoint.to_directory(str(tmp))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp / MODEL_DIR, final)
    shutil.rmtree(tmp)
    return final


def read_metrics(out_dir: Path) -> list[dict]:
    path = out_dir / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def plot_metrics(out_dir: Path, keys: tuple[str, ...] = ("loss", "nll", "kl", "dpo")) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(out_dir)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in keys:
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), label=key)
    ax.set_xlabel("optimizer step")
    ax.legend()
    ax.set_title(out_dir.name)
    fig.tight_layout()
    path = out_dir / "loss.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
