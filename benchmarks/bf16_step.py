"""bf16 against float32 for the three training objectives of the loop (`sft`, `kd` on top-k
log-probs, `dpo` = NLL + DPO with precomputed reference log-probs), on one model and one batch:

  * agreement: the loss and its parts, and the gradient (cosine and norm ratio), computed once in
    float32 and once under bf16 autocast from the same weights (losses are always taken in
    float32 from the logits, as `training.train_loop` does);
  * speed: the fastest step time of each, the ratio bf16/fp32, and for bf16 tokens/s and model
    FLOPs utilisation, MFU = 6 · parameters · tokens/s / peak (attention FLOPs left out);
  * a short bf16 run (`--train-steps` AdamW steps on the batch) must lower every objective's loss.

    python benchmarks/bf16_step.py                                   # SmolLM2-135M's shape
    python benchmarks/bf16_step.py --hidden 2048 --layers 16 --vocab 32000   # about 1.1B

Meant for a GPU (bf16 autocast on CPU runs, but says nothing about GPU numerics or speed). The DPO
batch holds batch/2 pairs, so every objective runs the same number of sequences and tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).parent))
from distill_step import KD, build, make_batch  # noqa: E402

from proxykd import losses  # noqa: E402
from proxykd.training import collate, compute_loss  # noqa: E402

PARAMS = {"sft": {}, "kd": KD, "dpo": {"beta": 0.1, "nll_weight": 1.0}}


def batches(args, model, device) -> dict[str, dict]:
    rng = np.random.default_rng(0)
    kd = make_batch(rng, args.batch, args.seq, args.vocab, args.k)
    pairs = args.batch // 2
    chosen, rejected = kd.slice(0, pairs), make_batch(rng, pairs, args.seq, args.vocab, 1)
    dpo = pa.table({
        "id": chosen["id"], "chosen_input_ids": chosen["input_ids"], "chosen_response_start": chosen["response_start"],
        "rejected_input_ids": rejected["input_ids"], "rejected_response_start": rejected["response_start"],
        "ref_chosen_logp": pa.array([0.0] * pairs), "ref_rejected_logp": pa.array([0.0] * pairs)})
    out = {}
    for objective, table in (("sft", kd), ("kd", kd), ("dpo", dpo)):
        out[objective] = {k: torch.as_tensor(v, device=device) for k, v in collate(objective, table, 0).items()}
    # The reference is the starting model itself, in float32: the DPO term starts at log 2.
    t = out["dpo"]
    with torch.no_grad():
        seq = losses.sequence_logprobs(model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits.float(),
                                       t["labels"])
    t["ref_chosen"], t["ref_rejected"] = seq[:pairs].clone(), seq[pairs:].clone()
    return out


def loss_and_grad(model, objective, t, bf16: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast(t["input_ids"].device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
    loss, parts = compute_loss(objective, logits.float(), t, PARAMS[objective])
    loss.backward()
    grad = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return {"loss": loss.item(), **parts}, grad


def step(model, optimizer, objective, t, bf16: bool) -> float:
    with torch.autocast(t["input_ids"].device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
    loss, _ = compute_loss(objective, logits.float(), t, PARAMS[objective])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def fastest_step(model, objective, t, bf16, args, device) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)  # lr 0: timing must not move the weights
    step(model, optimizer, objective, t, bf16)
    best = float("inf")
    for _ in range(args.rounds):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.iters):
            step(model, optimizer, objective, t, bf16)
        sync(device)
        best = min(best, (time.perf_counter() - t0) / args.iters)
    del optimizer
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--train-steps", type=int, default=20)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 TFLOP/s (H100/H200 SXM: 989)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32: the reference side
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = build(args, device)
    n_params = sum(p.numel() for p in model.parameters())
    tokens = args.batch * args.seq
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"device {name}, torch {torch.__version__}, model {n_params / 1e6:.1f}M params, vocab {args.vocab}, "
          f"batch {args.batch} x {args.seq} tokens, top-k {args.k}", flush=True)
    data = batches(args, model, device)
    report = {"device": name, "params": n_params, "tokens_per_step": tokens, "objectives": {}}
    for objective, t in data.items():
        fp32, g32 = loss_and_grad(model, objective, t, bf16=False)
        bf16, g16 = loss_and_grad(model, objective, t, bf16=True)
        cos = torch.nn.functional.cosine_similarity(g32, g16, dim=0).item()
        norm_ratio = (g16.norm() / g32.norm()).item()
        del g32, g16
        # relative differences; the DPO margin starts at 0 (reference = this model), so it is absolute
        rel = {k: abs(bf16[k] - fp32[k]) / (1.0 if k == "margin" else max(abs(fp32[k]), 1e-12)) for k in fp32}
        s32 = fastest_step(model, objective, t, False, args, device)
        s16 = fastest_step(model, objective, t, True, args, device)
        mfu = 6 * n_params * tokens / s16 / (args.peak_tflops * 1e12)
        print(f"{objective}: loss fp32 {fp32['loss']:.5f} bf16 {bf16['loss']:.5f} (rel. diff "
              + ", ".join(f"{k} {v:.1e}" for k, v in rel.items())
              + f"){' (margin: absolute)' if 'margin' in rel else ''}; gradient cosine {cos:.5f}, norm bf16/fp32 {norm_ratio:.4f}", flush=True)
        print(f"{objective}: step fp32 {s32 * 1e3:.1f} ms, bf16 {s16 * 1e3:.1f} ms, bf16/fp32 time {s16 / s32:.3f}; "
              f"bf16 {tokens / s16:,.0f} tokens/s, MFU {mfu:.1%}", flush=True)
        report["objectives"][objective] = {"fp32": fp32, "bf16": bf16, "rel_diff": rel, "grad_cosine": cos,
                                           "grad_norm_ratio": norm_ratio, "step_s_fp32": s32, "step_s_bf16": s16,
                                           "bf16_over_fp32_time": s16 / s32, "tokens_per_s_bf16": tokens / s16,
                                           "mfu_bf16": mfu}
    # A short bf16 run per objective from the same starting weights: the loss must fall.
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for objective, t in data.items():
        model.load_state_dict(start)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        curve = [step(model, optimizer, objective, t, True) for _ in range(args.train_steps)]
        ok = all(np.isfinite(curve)) and curve[-1] < curve[0]
        print(f"{objective}: {args.train_steps} bf16 steps, loss {curve[0]:.4f} -> {curve[-1]:.4f} "
              f"({'falls' if ok else 'DOES NOT FALL'})", flush=True)
        report["objectives"][objective]["bf16_curve"] = curve
        report["objectives"][objective]["bf16_loss_falls"] = ok
        del optimizer
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
