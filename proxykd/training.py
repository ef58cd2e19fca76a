"""One Ray Train loop for every training job in the pipeline; only the loss differs:

- `sft`: NLL of the response (warm-up SFT, and distillation with alpha = 0);
- `dpo`: nll_weight · NLL(chosen) + DPO(chosen, rejected; reference log-probs precomputed);
- `kd`:  NLL + alpha · w · top-k forward KL to the proxy.

The driver-side `fit` runs a `TorchTrainer` (DDP over `train_workers`), checkpoints the Hugging Face
model, optimizer and epoch after every epoch (a restarted run continues from the last one) and
copies the final model to `<out_dir>/model`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
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


# ---------------------------------------------------------------- batches (pure, tested) ----

def pad_sequences(input_ids: list, starts: list, pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-pad to the longest row: (input_ids [B,T], attention_mask [B,T], labels [B,T]) with
    labels = -100 on prompt and padding positions."""
    T = max(len(x) for x in input_ids)
    B = len(input_ids)
    ids = np.full((B, T), pad_id, np.int64)
    mask = np.zeros((B, T), np.int64)
    labels = np.full((B, T), IGNORE, np.int64)
    for b, (row, start) in enumerate(zip(input_ids, starts)):
        n = len(row)
        ids[b, :n] = row
        mask[b, :n] = 1
        labels[b, start:n] = row[start:]
    return ids, mask, labels


def place_topk(topk_ids: list, topk_logprobs: list, starts: list, T: int) -> tuple[np.ndarray, np.ndarray]:
    """Scatter per-row top-k lists (one entry per response position) to [B, T, k] aligned with
    the token positions; prompt and padding positions stay 0 and are masked by the labels."""
    k = len(topk_ids[0][0])
    ids = np.zeros((len(topk_ids), T, k), np.int64)
    lps = np.zeros((len(topk_ids), T, k), np.float32)
    for b, (rid, rlp, start) in enumerate(zip(topk_ids, topk_logprobs, starts)):
        n = len(rid)
        ids[b, start : start + n] = np.asarray(rid, np.int64)
        lps[b, start : start + n] = np.asarray(rlp, np.float32)
    return ids, lps


def collate(objective: str, batch: pa.Table, pad_id: int) -> dict[str, np.ndarray]:
    if objective == "dpo":
        # Chosen and rejected share one forward pass: rows [0, B) chosen, [B, 2B) rejected.
        ids = batch["chosen_input_ids"].to_pylist() + batch["rejected_input_ids"].to_pylist()
        starts = batch["chosen_response_start"].to_pylist() + batch["rejected_response_start"].to_pylist()
        input_ids, mask, labels = pad_sequences(ids, starts, pad_id)
        return {
            "input_ids": input_ids,
            "attention_mask": mask,
            "labels": labels,
            "ref_chosen": batch["ref_chosen_logp"].to_numpy().astype(np.float32),
            "ref_rejected": batch["ref_rejected_logp"].to_numpy().astype(np.float32),
        }
    starts = batch["response_start"].to_pylist()
    input_ids, mask, labels = pad_sequences(batch["input_ids"].to_pylist(), starts, pad_id)
    out = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    if objective == "kd":
        out["topk_ids"], out["topk_logprobs"] = place_topk(
            batch["topk_ids"].to_pylist(), batch["topk_logprobs"].to_pylist(), starts, input_ids.shape[1]
        )
        out["weight"] = batch["weight"].to_numpy().astype(np.float32)
    return out


def compute_loss(objective: str, logits, t: dict, params: dict):
    """Return (loss, {part: float}) for one batch of tensors `t`."""
    import torch

    from proxykd import losses

    if objective == "sft":
        nll = losses.nll_loss(logits, t["labels"])
        return nll, {"nll": nll.item()}
    if objective == "kd":
        weights = t["weight"] if params["sample_weighting"] else None
        nll, kl = losses.nll_and_topk_kl(logits, t["labels"], t["topk_ids"], t["topk_logprobs"], weights)
        return nll + params["alpha"] * kl, {"nll": nll.item(), "kl": kl.item()}
    if objective == "dpo":
        B = t["ref_chosen"].shape[0]
        seq = losses.sequence_logprobs(logits, t["labels"])
        dpo = losses.dpo_loss(seq[:B], seq[B:], t["ref_chosen"], t["ref_rejected"], params["beta"])
        nll = losses.nll_loss(logits[:B], t["labels"][:B])
        with torch.no_grad():
            margin = ((seq[:B] - t["ref_chosen"]) - (seq[B:] - t["ref_rejected"])).mean()
        return params["nll_weight"] * nll + dpo, {"nll": nll.item(), "dpo": dpo.item(), "margin": margin.item()}
    raise ValueError(f"unknown objective {objective!r}")


# ---------------------------------------------------------------- the worker loop ----

def train_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tc = TrainConfig(**config["train"])
    torch.manual_seed(tc.seed)
    device = ray.train.torch.get_device()
    tokenizer = AutoTokenizer.from_pretrained(config["model_path"])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    source, state = config["model_path"], None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # a restarted run: continue after the last finished epoch
        local = tempfile.mkdtemp()
        checkpoint.to_directory(local)
        source, state = local, torch.load(Path(local) / STATE_FILE, weights_only=False)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    start_epoch, history = 0, []
    if state:
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history = state["epoch"] + 1, state["history"]
        if rank == 0:
            print(f"[{config['name']}] resumed from epoch {state['epoch']}", flush=True)

    autocast = device.type == "cuda"
    shard = ray.train.get_dataset_shard("train")
    step = len(history)
    for epoch in range(start_epoch, tc.epochs):
        t0, tokens = time.time(), 0
        for batch in shard.iter_batches(batch_size=tc.batch_size, batch_format="pyarrow"):
            arrays = collate(config["objective"], batch, pad_id)
            t = {k: torch.as_tensor(v, device=device) for k, v in arrays.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
            loss, parts = compute_loss(config["objective"], logits.float(), t, config["loss"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            step += 1
            tokens += int(arrays["attention_mask"].sum()) * world
            history.append({"step": step, "epoch": epoch, "loss": loss.item(), **parts,
                            "grad_norm": float(grad_norm), "lr": tc.lr,
                            "tokens_per_s": tokens / max(time.time() - t0, 1e-9)})
            if rank == 0 and (step % 10 == 0 or step == 1):
                print(f"[{config['name']}] epoch {epoch} step {step} loss {loss.item():.4f} "
                      + " ".join(f"{k} {v:.4f}" for k, v in parts.items())
                      + f" tok/s {history[-1]['tokens_per_s']:.0f}", flush=True)
        epoch_losses = [h["loss"] for h in history if h["epoch"] == epoch]
        metrics = {"epoch": epoch, "step": step, "loss": float(np.mean(epoch_losses)) if epoch_losses else float("nan")}
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                unwrapped = model.module if hasattr(model, "module") else model
                unwrapped.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
                torch.save({"optimizer": optimizer.state_dict(), "epoch": epoch, "history": history},
                           Path(tmp) / STATE_FILE)
                with open(Path(tmp) / METRICS_FILE, "w") as f:
                    f.writelines(json.dumps(h) + "\n" for h in history)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)


# ---------------------------------------------------------------- driver side ----

def fit(
    *,
    name: str,
    objective: str,
    model_path: str,
    dataset,
    out_dir: Path,
    train: TrainConfig,
    resources: ResourcesConfig,
    loss: dict,
) -> Path:
    """Train and return `<out_dir>/model` (a Hugging Face folder). `out_dir/_ray` holds Ray
    Train's run state and checkpoints; rerunning with the same out_dir resumes from them."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out_dir.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"name": name, "objective": objective, "model_path": model_path,
                           "train": train.model_dump(), "loss": loss},
        scaling_config=ScalingConfig(
            num_workers=resources.train_workers, use_gpu=resources.use_gpu, resources_per_worker={"CPU": 1}
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str((out_dir / "_ray").resolve()),
            failure_config=FailureConfig(max_failures=2),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": dataset},
    )
    result = trainer.fit()
    final = out_dir / "model"
    tmp = out_dir / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    result.checkpoint.to_directory(str(tmp))
    os.replace(tmp / METRICS_FILE, out_dir / METRICS_FILE)
    (tmp / STATE_FILE).unlink()
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
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
    ax.set_xlabel("step")
    ax.legend()
    ax.set_title(out_dir.name)
    fig.tight_layout()
    path = out_dir / "loss.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
