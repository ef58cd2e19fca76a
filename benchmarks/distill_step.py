"""Time and peak memory of one Proxy-KD training step versus a plain SFT step (α = 0): same model,
same batch, the step of the training loop (forward, loss, backward, clip, AdamW). Target: KD/SFT
time ≤ 1.15 and at most 10 % more peak memory, at k = 10 and k = 20.

    python benchmarks/distill_step.py                 # CPU: a 20.6M-parameter Llama, vocab 32k
    python benchmarks/distill_step.py --hidden 2048 --layers 16 --batch 8 --seq 1024   # e.g. on a GPU

This times the step alone, on a batch collated before the clock starts; `benchmarks/train_input.py`
times the stage's whole loop, input included (read from Parquet, collate, prefetch), against a plain
loop over pre-built tensors, and gives the end-to-end KD/SFT ratio.

Time: the two steps interleaved in one process, --rounds rounds of --iters steps each; the
fastest round of each counts (as timeit does): on a shared machine other jobs only ever add time,
so the minimum is the figure least disturbed by them. Peak memory:
  * GPU: torch.cuda.max_memory_allocated over the timed steps (bf16 autocast, as in training);
  * CPU: torch has no allocator statistics on CPU, so each (objective, k) runs in a fresh
    subprocess and reports its peak resident set (ru_maxrss) and the resident set just before its
    first step (model, optimizer, batch loaded). "step peak" = the difference: the memory the step
    itself needs (activations, logits, gradients, AdamW state), which is where KD could add
    anything; the whole-process peak also holds the Python and torch libraries.
On a GPU it also prints tokens/s and model FLOPs utilisation, MFU = 6 · parameters · tokens/s /
peak FLOPs (attention FLOPs left out; --peak-tflops defaults to the dense bf16 figure of an
H100 SXM, 989).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import torch

from proxykd.training import collate, compute_loss

KD = {"alpha": 1.0, "sample_weighting": True, "divergence": "forward", "tail": "tail_bucket"}


def make_batch(rng: np.random.Generator, batch: int, seq: int, vocab: int, k: int) -> pa.Table:
    rows = []
    for i in range(batch):
        start = int(rng.integers(seq // 4, seq // 2))
        ids = rng.integers(0, vocab, seq).astype(np.int32)
        n = seq - start
        topk = np.stack([rng.choice(vocab, k, replace=False) for _ in range(n)]).astype(np.int32)
        lp = np.sort(np.log(rng.dirichlet(np.ones(k + 5), n))[:, :k], axis=1)[:, ::-1].astype(np.float16)
        rows.append({"id": str(i), "input_ids": ids.tolist(), "response_start": start, "topk_ids": topk.tolist(),
                     "topk_logprobs": lp.tolist(), "weight": float(rng.uniform())})
    return pa.Table.from_pylist(rows)


def build(args, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    heads = max(1, args.hidden // 64)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=args.seq, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(device)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-5)


def tensors_for(args, k, device):
    arrays = collate("kd", make_batch(np.random.default_rng(k), args.batch, args.seq, args.vocab, k), pad_id=0)
    return {name: torch.as_tensor(v, device=device) for name, v in arrays.items()}


def train_step(model, optimizer, objective, t, device):
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
    loss, _ = compute_loss(objective, logits.float(), t, KD if objective == "kd" else {})
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def timed(model, optimizer, objective, t, iters, device) -> tuple[float, int]:
    """Seconds per step and peak GPU bytes (0 on CPU) over `iters` steps after one warm-up."""
    train_step(model, optimizer, objective, t, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(iters):
        train_step(model, optimizer, objective, t, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    return (time.perf_counter() - t0) / iters, peak


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def child(args) -> None:
    """One objective in a fresh process: print resident memory before the first step and the peak."""
    device = torch.device("cpu")
    model, optimizer = build(args, device)
    t = tensors_for(args, args.k, device)
    base = rss_mb()
    for _ in range(2):
        train_step(model, optimizer, args.child, t, device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"base_mb": base, "peak_mb": peak}))


def cpu_memory(args, objective, k) -> dict:
    cmd = [sys.executable, __file__, "--child", objective, "--k", str(k), "--hidden", str(args.hidden),
           "--layers", str(args.layers), "--vocab", str(args.vocab), "--batch", str(args.batch), "--seq", str(args.seq)]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--topk", type=int, nargs="+", default=[10, 20])
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="GPU peak dense bf16 TFLOP/s, for MFU")
    ap.add_argument("--child", choices=["sft", "kd"], help=argparse.SUPPRESS)
    ap.add_argument("--k", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, optimizer = build(args, device)
    n_params = sum(p.numel() for p in model.parameters())
    tokens = args.batch * args.seq
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"device {name}, model {n_params / 1e6:.1f}M params, vocab {args.vocab}, batch {args.batch} x {args.seq} tokens")
    for k in args.topk:
        t = tensors_for(args, k, device)
        times, peaks = {"sft": [], "kd": []}, {"sft": 0, "kd": 0}
        for _ in range(args.rounds):
            for objective in ("sft", "kd"):
                s, p = timed(model, optimizer, objective, t, args.iters, device)
                times[objective].append(s)
                peaks[objective] = max(peaks[objective], p)
        s, d = min(times["sft"]), min(times["kd"])
        print(f"k = {k}: SFT {s * 1e3:.1f} ms/step, KD {d * 1e3:.1f} ms/step, KD/SFT time {d / s:.3f}")
        if device.type == "cuda":
            gb = {o: v / 2**30 for o, v in peaks.items()}
            print(f"        peak GPU memory SFT {gb['sft']:.2f} GiB, KD {gb['kd']:.2f} GiB, KD/SFT {gb['kd'] / gb['sft']:.3f}")
            for objective, sec in (("sft", s), ("kd", d)):
                mfu = 6 * n_params * tokens / sec / (args.peak_tflops * 1e12)
                print(f"        {objective}: {tokens / sec:,.0f} tokens/s, MFU {mfu:.1%}")
        else:
            mem = {o: cpu_memory(args, o, k) for o in ("sft", "kd")}
            step = {o: m["peak_mb"] - m["base_mb"] for o, m in mem.items()}
            print(f"        step peak SFT {step['sft']:.0f} MB, KD {step['kd']:.0f} MB, KD/SFT {step['kd'] / step['sft']:.3f}; "
                  f"process peak SFT {mem['sft']['peak_mb']:.0f} MB, KD {mem['kd']['peak_mb']:.0f} MB, "
                  f"KD/SFT {mem['kd']['peak_mb'] / mem['sft']['peak_mb']:.3f}")
            print(f"        KD {tokens / d:,.0f} tokens/s")


if __name__ == "__main__":
    main()
