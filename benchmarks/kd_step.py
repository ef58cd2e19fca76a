"""Time (and on GPU, peak memory) of one Proxy-KD training step versus a plain SFT step (α = 0),
same model, same batch, same process: the cost of distilling from top-k soft labels.

    python benchmarks/kd_step.py                 # CPU: a small Llama, vocab 32k
    python benchmarks/kd_step.py --hidden 1024 --layers 8 --batch 8 --seq 512   # e.g. on a GPU

Prints, for k in --topk: SFT ms/step, KD ms/step, their ratio, and tokens/s.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pyarrow as pa
import torch

from proxykd.training import collate, compute_loss


def make_batch(rng: np.random.Generator, batch: int, seq: int, vocab: int, k: int) -> pa.Table:
    rows = []
    for _ in range(batch):
        start = int(rng.integers(seq // 4, seq // 2))
        ids = rng.integers(0, vocab, seq).astype(np.int32)
        n = seq - start
        topk = np.stack([rng.choice(vocab, k, replace=False) for _ in range(n)]).astype(np.int32)
        lp = np.sort(np.log(rng.dirichlet(np.ones(k), n)), axis=1)[:, ::-1].astype(np.float16)
        rows.append({"input_ids": ids.tolist(), "response_start": start, "topk_ids": topk.tolist(),
                     "topk_logprobs": lp.tolist(), "weight": float(rng.uniform())})
    return pa.Table.from_pylist(rows)


def step_time(model, optimizer, objective: str, tensors: dict, params: dict, iters: int, device) -> float:
    def one():
        logits = model(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"]).logits
        loss, _ = compute_loss(objective, logits.float(), tensors, params)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    one()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        one()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--topk", type=int, nargs="+", default=[10, 20])
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                      num_key_value_heads=max(1, args.hidden // 64), max_position_embeddings=args.seq)
    model = LlamaForCausalLM(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    rng = np.random.default_rng(0)
    tokens = args.batch * args.seq
    print(f"device {device}, model {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
          f"vocab {args.vocab}, batch {args.batch} x {args.seq} tokens")
    print("k   | SFT ms/step | KD ms/step | KD/SFT | KD tokens/s")
    for k in args.topk:
        arrays = collate("kd", make_batch(rng, args.batch, args.seq, args.vocab, k), pad_id=0)
        tensors = {name: torch.as_tensor(v, device=device) for name, v in arrays.items()}
        # Interleave the two so drift on a shared machine hits both alike.
        sft, kd = [], []
        for _ in range(3):
            sft.append(step_time(model, optimizer, "sft", tensors, {}, args.iters, device))
            kd.append(step_time(model, optimizer, "kd", tensors, {"alpha": 1.0, "sample_weighting": True},
                                args.iters, device))
        s, d = float(np.median(sft)), float(np.median(kd))
        print(f"{k:<3} | {s * 1e3:11.1f} | {d * 1e3:10.1f} | {d / s:6.3f} | {tokens / d:11.0f}")


if __name__ == "__main__":
    main()
