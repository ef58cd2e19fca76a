"""Throughput and storage of the logits stage: the stage's vLLM scorer (the class its Ray Data
actors run) against a straightforward transformers loop (batch forward, log_softmax, topk) over the
same rows, same model, same machine; then the bytes per token of the stored top-k columns.

    python benchmarks/logits_throughput.py                  # CPU: a ~20M-parameter Llama, vocab 32k
    python benchmarks/logits_throughput.py --hidden 1024 --layers 12 --rows 512 --batch 32   # e.g. GPU
    python benchmarks/logits_throughput.py --model HF_FOLDER --text README.md DESIGN.md   # a real model

By default the model is a random Llama and the rows random token ids: speed depends on neither,
but log-probs of a trained model on real text are spread differently and compress differently;
`--model` with `--text` (files cut into rows with the model's tokenizer) measures that.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from proxykd.config import ResourcesConfig
from proxykd.logits import PARQUET_OPTIONS
from proxykd.models import build_byte_tokenizer, load_tokenizer
from proxykd.vllm_actors import (
    Scorer,
    engine_kwargs,
    logprob_columns,
    token_id_type,
    topk_columns,
)


def build_model(out_dir: str, hidden: int, layers: int, vocab: int, max_len: int) -> None:
    """A random Llama with a `vocab`-wide head. The byte tokenizer only serves vLLM's start-up:
    rows are token ids, and vLLM accepts any id below the model's vocabulary size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_byte_tokenizer(out_dir)
    heads = max(1, hidden // 64)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_len,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out_dir)


def make_rows(rng: np.random.Generator, n: int, vocab: int, prompt: tuple[int, int], response: tuple[int, int]):
    starts = rng.integers(*prompt, n)
    lengths = starts + rng.integers(*response, n)
    ids = [rng.integers(0, vocab, int(t)).tolist() for t in lengths]
    return ids, starts.tolist()


def text_rows(tokenizer, paths: list[str], rng: np.random.Generator, n: int, prompt: tuple[int, int],
              response: tuple[int, int]):
    """Consecutive pieces of the files' token stream (wrapping around) as rows."""
    stream = []
    for path in paths:
        with open(path) as f:
            stream += tokenizer(f.read(), add_special_tokens=False)["input_ids"]
    ids, starts, pos = [], [], 0
    for _ in range(n):
        start = int(rng.integers(*prompt))
        length = start + int(rng.integers(*response))
        if pos + length > len(stream):
            pos = 0
        ids.append(stream[pos : pos + length])
        starts.append(start)
        pos += length
    return ids, starts


def batches(ids: list, starts: list, size: int) -> list[pa.Table]:
    return [pa.table({"id": [f"r{j}" for j in range(i, min(i + size, len(ids)))],
                      "input_ids": pa.array(ids[i:i + size], pa.list_(pa.int32())),
                      "response_start": pa.array(starts[i:i + size], pa.int32())})
            for i in range(0, len(ids), size)]


def hf_scores(model, table: pa.Table, k: int, device) -> list[tuple]:
    """The straightforward loop: right-pad, forward, dense log_softmax [B, T, V], topk at the
    response positions; the same (topk_ids, topk_logprobs, token_logprobs) triples as the scorer."""
    rows, starts = table["input_ids"].to_pylist(), table["response_start"].to_pylist()
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r)
        mask[b, : len(r)] = 1
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(), -1)
        out = []
        for b, (r, s) in enumerate(zip(rows, starts)):
            pos = logp[b, s - 1 : len(r) - 1]  # logits at t-1 predict token t
            top = pos.topk(k)
            actual = pos.gather(1, ids[b, s : len(r)].to(device).unsqueeze(1)).squeeze(1)
            out.append((top.indices.int().cpu().numpy(), top.values.cpu().numpy(), actual.cpu().numpy()))
    return out


def timed(fn, tables: list[pa.Table], device) -> tuple[float, list]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0, out = time.perf_counter(), []
    for t in tables:
        out.append(fn(t))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def ray_data_stage(tables: list[pa.Table], k: int, id_type: str, engine: dict,
                   res: ResourcesConfig) -> tuple[float, float]:
    """The stage's own path: Ray Data blocks through a pool of one `Scorer` actor. Returns (wall
    seconds including Ray and engine start, tokens/s after the first block arrived)."""
    import ray

    from proxykd import artifacts
    from proxykd.vllm_actors import map_kwargs

    ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        rows = tables[0].num_rows
        ds = artifacts.to_dataset(pa.concat_tables(tables), rows).map_batches(
            Scorer, fn_constructor_kwargs={"engine": engine, "top_k": k, "id_type": id_type},
            **map_kwargs(res, batch_size=rows))
        t0, first, tokens = time.perf_counter(), None, 0
        for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            if first is None:
                first = time.perf_counter()
            else:
                tokens += sum(len(x) for x in block["input_ids"].to_pylist())
        end = time.perf_counter()
    finally:
        ray.shutdown()
    return end - t0, tokens / (end - first)


def storage(results: list[tuple], k: int, id_type: str, lp_dtype: str) -> dict:
    """Bytes per response token of the stored top-k columns: raw (Arrow buffers, list offsets
    included, before Parquet) and as a Parquet file with zstd."""
    cols = topk_columns(results, id_type, lp_dtype)
    table = pa.table({**cols, **logprob_columns(results)}).select(["topk_ids", "topk_logprobs"])
    n = sum(len(r[0]) for r in results)
    sizes = {}
    for name, options in (("zstd", {"compression": "zstd"}), ("stage", PARQUET_OPTIONS)):
        buf = io.BytesIO()
        pq.write_table(table, buf, **options)
        sizes[name] = buf.tell() / n
    entry = np.dtype(id_type).itemsize + np.dtype(lp_dtype).itemsize
    return {"entry": entry, "raw": table.nbytes / n, **sizes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, nargs=2, default=[32, 96], help="prompt length range")
    ap.add_argument("--response", type=int, nargs=2, default=[64, 192], help="response length range")
    ap.add_argument("--topk", type=int, nargs="+", default=[10, 20])
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                    help="torch threads of the transformers loop (vLLM on CPU computes on all cores but one)")
    ap.add_argument("--dtype", default="float32", help="model dtype of both paths")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", help="a Hugging Face folder (with tokenizer) instead of the random Llama")
    ap.add_argument("--text", nargs="+", help="text files to cut into rows (with --model) instead of random ids")
    ap.add_argument("--ray-data", action="store_true",
                    help="also run the rows through Ray Data with a Scorer actor pool, as the stage does")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(args.threads)
    max_len = args.prompt[1] + args.response[1]
    rng = np.random.default_rng(0)
    if args.model:
        from transformers import AutoConfig

        folder = args.model
        args.vocab = AutoConfig.from_pretrained(folder).vocab_size
    else:
        tmp = tempfile.TemporaryDirectory(prefix="logits-bench-")  # removed when the script ends
        folder = tmp.name
        build_model(folder, args.hidden, args.layers, args.vocab, max_len + 1)
    if args.text:
        ids, starts = text_rows(load_tokenizer(folder), args.text, rng, args.rows, tuple(args.prompt),
                                tuple(args.response))
    else:
        ids, starts = make_rows(rng, args.rows, args.vocab, tuple(args.prompt), tuple(args.response))
    tables = batches(ids, starts, args.batch)
    tokens = sum(len(r) for r in ids)
    id_type = token_id_type(args.vocab)

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, args.dtype)).to(device).eval()
    print(f"device {device}, model {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
          f"vocab {args.vocab}, {args.rows} rows, {tokens} tokens, batch {args.batch}, "
          f"transformers threads {torch.get_num_threads()}")
    res = ResourcesConfig(vllm_gpus_per_actor=1 if device.type == "cuda" else 0)
    engine = engine_kwargs(folder, max_len + 1, 0, res, args.dtype, max_logprobs=max(20, *args.topk))
    scorer = Scorer(engine, top_k=args.topk[0], id_type=id_type, logprob_dtype="float16")

    def transformers_loop(t, k):
        return hf_scores(model, t, k, device)

    def vllm_scorer(t, k):
        scorer.k = k
        return scorer(t)

    # Warm both up, then interleave the repeats so drift on a shared machine hits both alike.
    transformers_loop(tables[0], args.topk[0])
    vllm_scorer(tables[0], args.topk[0])
    times = {(path, k): [] for path in ("hf", "vllm") for k in args.topk}
    outputs = {}
    for _ in range(args.repeats):
        for k in args.topk:
            for path, fn in (("hf", transformers_loop), ("vllm", vllm_scorer)):
                seconds, outputs[path, k] = timed(lambda t, fn=fn, k=k: fn(t, k), tables, device)
                times[path, k].append(seconds)
    hf = {k: (float(np.median(times["hf", k])), outputs["hf", k]) for k in args.topk}
    vl = {k: (float(np.median(times["vllm", k])), outputs["vllm", k]) for k in args.topk}

    print(f"\nthroughput (prompt + response tokens per second, median of {args.repeats} interleaved runs; "
          "same rows, same machine)")
    print("k   | vLLM scorer tok/s | transformers loop tok/s | vLLM/transformers")
    for k in args.topk:
        v, h = tokens / vl[k][0], tokens / hf[k][0]
        print(f"{k:<3} | {v:17.0f} | {h:23.0f} | {v / h:17.2f}")
    for k in args.topk:
        print(f"k={k} seconds per run: vLLM {[round(x, 2) for x in times['vllm', k]]}, "
              f"transformers {[round(x, 2) for x in times['hf', k]]}")

    # the two paths agree (both float32): top-1 ids equal wherever the top-2 gap is clear
    k = args.topk[0]
    v_ids = np.concatenate([np.array(r, np.int64).reshape(-1, k) for t in vl[k][1] for r in t["topk_ids"].to_pylist()])
    h_res = [r for part in hf[k][1] for r in part]
    h_ids = np.concatenate([r[0] for r in h_res])
    h_lp = np.concatenate([r[1] for r in h_res])
    clear = (h_lp[:, 0] - h_lp[:, 1]) > 1e-3
    print(f"top-1 agreement where clear: {(v_ids[clear, 0] == h_ids[clear, 0]).mean():.4f} "
          f"({clear.sum()} of {len(clear)} positions)")

    print(f"\nstorage per response token (ids {id_type}; raw = Arrow buffers before Parquet, list offsets included; "
          "Parquet: plain zstd, and the stage's writer options)")
    print("k   | log-probs | values B/entry | raw B/token | raw B/entry | zstd B/entry | stage B/token | stage B/entry")
    for k in args.topk:
        results = scorer.score(ids, starts, k)  # the scorer's own float32 values, stored either way
        for lp_dtype in ("float16", "float32"):
            s = storage(results, k, id_type, lp_dtype)
            print(f"{k:<3} | {lp_dtype:9} | {s['entry']:14d} | {s['raw']:11.1f} | {s['raw'] / k:11.2f} | "
                  f"{s['zstd'] / k:12.2f} | {s['stage']:13.1f} | {s['stage'] / k:13.2f}")
    del scorer.llm

    if args.ray_data:
        wall, rate = ray_data_stage(tables, args.topk[0], id_type, engine, res)
        print(f"\nRay Data + Scorer actor (the stage's path), k={args.topk[0]}: {wall:.1f} s wall including Ray and "
              f"engine start; {rate:.0f} tok/s after the first block = "
              f"{rate / (tokens / hf[args.topk[0]][0]):.2f} x the transformers loop")


if __name__ == "__main__":
    main()
