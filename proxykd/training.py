"""One Ray Train loop for every training job in the pipeline; only the loss differs:

- `sft`: NLL of the response (warm-up SFT, and distillation with alpha = 0);
- `dpo`: nll_weight · NLL(chosen) + DPO(chosen, rejected; reference log-probs precomputed);
- `kd`:  NLL + alpha · w · top-k divergence to the proxy (`losses.nll_and_topk_kl`).

Data order is ours, not Ray Data's, so that a restarted run can continue at the exact batch. The
rows come either from an in-memory table (sitting once in Ray's object store) or straight from
Parquet files (`ParquetRows`: a stage's shards, local or on shared storage); either way the driver
builds a small `RowIndex` (id, token counts, response start, and file / row group / row), sorted by
`id`, and the order is computed on it: every epoch is a permutation from `seed + epoch`, optimizer
step s of the epoch takes rows [s·G, (s+1)·G) of it (G = batch_size · workers · grad_accum_steps),
those are sorted by padded length (stable) and cut into workers × grad_accum_steps contiguous
micro-batches, dealt to the workers in snake order. Sorting inside the global batch leaves its rows,
and so its gradient, unchanged, but puts rows of similar length together (less padding; the
`pad_fraction` metric). Each worker reads only its own micro-batches' rows (from Parquet: by row
group, in bounded memory) and collates them with numpy from the Arrow buffers, in a background
thread a few micro-batches ahead of the step. Each micro-batch loss is a sum over its tokens divided
by the token count of the whole global batch (× workers, since DDP averages), so 1 worker and N
workers, with or without accumulation, compute the same gradient.

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
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from proxykd import storage
from proxykd.config import ResourcesConfig, TrainConfig

log = logging.getLogger("proxykd")

IGNORE = -100
STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.jsonl"
MODEL_DIR = "model"
# Test hook: the last worker SIGKILLs itself before this global step, once per out_dir.
KILL_ENV = "PROXYKD_TEST_KILL_AT_STEP"


# ---------------------------------------------------------------- batches (pure, tested) ----

def pad_flat(values: np.ndarray, lengths: np.ndarray, starts: np.ndarray, pad_id: int, left: bool = False
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`pad_sequences` of rows given as one flat array of their tokens and per-row lengths (what
    an Arrow list column is): one vectorised scatter, no Python loop over rows."""
    lengths = np.asarray(lengths, np.int64)
    B, T = len(lengths), int(lengths.max()) if len(lengths) else 0
    first = (T - lengths) if left else np.zeros(B, np.int64)  # column of each row's first token
    within = np.arange(len(values)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    flat = np.repeat(np.arange(B) * T + first, lengths) + within
    ids = np.full(B * T, pad_id, np.int64)
    mask = np.zeros(B * T, np.int64)
    labels = np.full(B * T, IGNORE, np.int64)
    ids[flat] = values
    mask[flat] = 1
    response = within >= np.repeat(np.asarray(starts, np.int64), lengths)
    labels[flat[response]] = values[response]
    return ids.reshape(B, T), mask.reshape(B, T), labels.reshape(B, T)


def pad_sequences(input_ids: list, starts: list, pad_id: int, left: bool = False
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pad to the longest row: (input_ids [B,T], attention_mask [B,T], labels [B,T]) with
    labels = -100 on prompt and padding positions. Right padding by default; `left=True` puts
    the padding first, so every row's response ends at T (see `response_window`)."""
    lengths = np.asarray([len(x) for x in input_ids], np.int64)
    values = np.concatenate([np.asarray(x, np.int64) for x in input_ids]) if input_ids else np.zeros(0, np.int64)
    return pad_flat(values, lengths, np.asarray(starts, np.int64), pad_id, left)


def place_topk_flat(ids: np.ndarray, logprobs: np.ndarray, counts: np.ndarray, starts: np.ndarray, T: int,
                    offsets: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`place_topk` of top-k entries given flat: `ids` and `logprobs` [N, k], the entries of
    row b being the next `counts[b]` ones; one vectorised scatter."""
    counts = np.asarray(counts, np.int64)
    B, k = len(counts), ids.shape[1]
    at = np.asarray(starts, np.int64) + (np.asarray(offsets, np.int64) if offsets is not None else 0)
    col = np.repeat(at, counts) + np.arange(len(ids)) - np.repeat(np.cumsum(counts) - counts, counts)
    if len(col) and (col.max() >= T or col.min() < 0):
        raise ValueError("a row has more top-k entries than response positions")
    flat = np.repeat(np.arange(B) * T, counts) + col
    out_ids = np.zeros((B * T, k), np.int64)
    out_lps = np.zeros((B * T, k), np.float32)
    out_ids[flat] = ids
    out_lps[flat] = logprobs
    return out_ids.reshape(B, T, k), out_lps.reshape(B, T, k)


def place_topk(topk_ids: list, topk_logprobs: list, starts: list, T: int, offsets: list | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Scatter per-row top-k lists (one entry per response position) to [B, T, k] aligned with
    the token positions (row b's tokens begin at `offsets[b]`, 0 without padding first); prompt
    and padding positions stay 0 and are masked by the labels."""
    k = len(next(r for r in topk_ids if len(r))[0])
    ids = np.concatenate([np.asarray(r, np.int64).reshape(-1, k) for r in topk_ids])
    lps = np.concatenate([np.asarray(r, np.float32).reshape(-1, k) for r in topk_logprobs])
    return place_topk_flat(ids, lps, np.asarray([len(r) for r in topk_ids]), np.asarray(starts), T,
                           None if offsets is None else np.asarray(offsets))


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


def _list_values(column) -> tuple[pa.Array, np.ndarray]:
    """(the child array, per-row lengths) of an Arrow list column, read from its buffers."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if arr.null_count:
        raise ValueError(f"a list column has {arr.null_count} null rows")
    return arr.flatten(), pc.list_value_length(arr).to_numpy(zero_copy_only=False).astype(np.int64)


def _numpy(arr: pa.Array) -> np.ndarray:
    return arr.to_numpy(zero_copy_only=False)


def _topk_flat(column) -> tuple[np.ndarray, np.ndarray]:
    """(entries [N, k], per-row entry counts) of a list<list<number>> column with k per entry."""
    inner, counts = _list_values(column)
    values, ks = _list_values(inner)
    k = int(ks[0]) if len(ks) else 0
    if len(ks) and (ks != k).any():
        raise ValueError(f"top-k entries of different sizes ({sorted(set(ks.tolist()))[:5]}) in one batch")
    return _numpy(values).reshape(-1, max(k, 1)) if k else np.zeros((0, 1)), counts


def collate(objective: str, batch: pa.Table, pad_id: int, left_pad: bool = False) -> dict[str, np.ndarray]:
    """Padded arrays of one micro-batch, built from the Arrow buffers with numpy (no per-row
    Python lists). `left_pad=True` (the training loop's choice) pads first and adds `position_ids`
    counting from each row's first token, so the rows' results equal those of right padding."""
    if objective == "dpo":
        # Chosen and rejected share one forward pass: rows [0, B) chosen, [B, 2B) rejected.
        (cv, cl), (rv, rl) = _list_values(batch["chosen_input_ids"]), _list_values(batch["rejected_input_ids"])
        starts = np.concatenate([_numpy(batch["chosen_response_start"]), _numpy(batch["rejected_response_start"])])
        input_ids, mask, labels = pad_flat(np.concatenate([_numpy(cv), _numpy(rv)]), np.concatenate([cl, rl]),
                                           starts, pad_id, left_pad)
        out = {
            "input_ids": input_ids,
            "attention_mask": mask,
            "labels": labels,
            "ref_chosen": _numpy(batch["ref_chosen_logp"]).astype(np.float32),
            "ref_rejected": _numpy(batch["ref_rejected_logp"]).astype(np.float32),
        }
    else:
        starts = _numpy(batch["response_start"]).astype(np.int64)
        values, lengths = _list_values(batch["input_ids"])
        input_ids, mask, labels = pad_flat(_numpy(values), lengths, starts, pad_id, left_pad)
        out = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
        if objective == "kd":
            T = input_ids.shape[1]
            ids, counts = _topk_flat(batch["topk_ids"])
            lps, lp_counts = _topk_flat(batch["topk_logprobs"])
            if ids.shape != lps.shape or (counts != lp_counts).any():
                raise ValueError("topk_ids and topk_logprobs do not match in shape")
            if (counts > lengths - starts).any():
                raise ValueError("a row has more top-k entries than response positions")
            out["topk_ids"], out["topk_logprobs"] = place_topk_flat(
                ids, lps, counts, starts, T, (T - lengths) if left_pad else None)
            out["weight"] = _numpy(batch["weight"]).astype(np.float32)
    if left_pad:
        out["position_ids"] = np.maximum(out["attention_mask"].cumsum(1) - 1, 0)
    return out


def response_tokens(table: pa.Table, objective: str) -> np.ndarray:
    """Per row, the number of positions the NLL counts (labels[1:] != -100): the response tokens
    not at position 0. For DPO, those of the chosen response."""
    prefix = "chosen_" if objective == "dpo" else ""
    _, lengths = _list_values(table[f"{prefix}input_ids"])
    starts = _numpy(table[f"{prefix}response_start"]).astype(np.int64)
    return lengths - np.maximum(starts, 1)


def epoch_order(num_rows: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_rows) if shuffle else np.arange(num_rows)


def steps_per_epoch(num_rows: int, global_batch: int, parts: int) -> int:
    """Full global batches, plus the last partial one if every micro-batch of it gets a row."""
    return num_rows // global_batch + (num_rows % global_batch >= parts)


def step_rows(order: np.ndarray, step_in_epoch: int, global_batch: int) -> np.ndarray:
    return order[step_in_epoch * global_batch : (step_in_epoch + 1) * global_batch]


def length_sorted(rows: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """A global batch's rows ordered by padded length (stable: ties keep the epoch order), so the
    micro-batches cut from it hold rows of similar length and need little padding. Which rows form
    the global batch is unchanged, and so is its gradient (a sum over its rows)."""
    return rows[np.argsort(lengths[rows], kind="stable")]


def worker_micro_batches(rows: np.ndarray, rank: int, world: int, accum: int) -> list[np.ndarray]:
    """Worker `rank`'s `accum` micro-batches of one global batch: the batch cut into world × accum
    contiguous slices, dealt to the workers in snake order (slot a: slices a·world … a·world +
    world − 1, every other slot reversed), so with length-sorted rows each worker gets short and
    long slices alike. Fixed for a given (world, accum): no randomness enters the sharding."""
    slices = np.array_split(rows, world * accum)
    return [slices[a * world + (rank if a % 2 == 0 else world - 1 - rank)] for a in range(accum)]


def padding_fraction(micro_batches: list[np.ndarray], lengths: np.ndarray) -> float:
    """Padding positions over all positions of the padded micro-batches (each padded to its own
    longest sequence); `lengths` [rows, sequences per row] (DPO: chosen and rejected)."""
    tokens = padded = 0
    for m in micro_batches:
        seq = lengths[m].reshape(-1)
        if len(seq):
            tokens += int(seq.sum())
            padded += int(seq.max()) * len(seq)
    return 1.0 - tokens / padded if padded else 0.0


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


# ---------------------------------------------------------------- training rows ----

def _sequence_columns(names: list[str]) -> tuple[list[str], str]:
    """(the token columns of a row, the response-start column of the first): DPO pairs have two."""
    if "chosen_input_ids" in names:
        return ["chosen_input_ids", "rejected_input_ids"], "chosen_response_start"
    return ["input_ids"], "response_start"


def read_columns(objective: str) -> list[str]:
    """The columns a worker reads for `objective` (the SFT baseline reads no top-k)."""
    if objective == "dpo":
        return ["chosen_input_ids", "chosen_response_start", "rejected_input_ids", "rejected_response_start",
                "ref_chosen_logp", "ref_rejected_logp"]
    return ["input_ids", "response_start"] + (["topk_ids", "topk_logprobs", "weight"] if objective == "kd" else [])


@dataclass
class RowIndex:
    """What the data order and the batch plan are computed over: one entry per training row,
    sorted by id. `lengths` [rows, sequences] holds each sequence's token count (DPO: chosen,
    rejected), `starts` the first sequence's response start, and `where` [rows, 3] the row's
    place (file, row group, row in group) when it is read from Parquet in place. About 50 bytes a
    row: a million rows are one small object for every worker."""

    ids: pa.Array
    lengths: np.ndarray
    starts: np.ndarray
    where: np.ndarray | None = None

    @property
    def num_rows(self) -> int:
        return len(self.ids)

    def response_tokens(self) -> np.ndarray:
        """As `response_tokens`: the positions the NLL counts, per row (DPO: the chosen response)."""
        return self.lengths[:, 0] - np.maximum(self.starts, 1)

    def fingerprint(self) -> str:
        """A hash of the ids in order: a checkpoint resumes only on the rows it was made with."""
        h = hashlib.sha1()
        for chunk in range(0, self.num_rows, 65536):
            h.update("\n".join(self.ids.slice(chunk, 65536).to_pylist()).encode() + b"\n")
        return h.hexdigest()[:16]


def _sorted_index(ids: pa.Array, lengths: np.ndarray, starts: np.ndarray, where: np.ndarray | None) -> RowIndex:
    order = pc.sort_indices(ids).to_numpy()
    ids = ids.take(pa.array(order))
    if len(ids) > 1:
        dup = pc.equal(ids.slice(1), ids.slice(0, len(ids) - 1)).to_numpy(zero_copy_only=False)
        if dup.any():
            raise ValueError(f"training rows: id {ids[int(np.argmax(dup))].as_py()!r} occurs more than once "
                             "(are two shards holding the same rows?)")
    return RowIndex(ids, lengths[order], starts[order], None if where is None else where[order])


def table_index(table: pa.Table) -> RowIndex:
    """The index of an in-memory table (rows in the table's order, then sorted by id)."""
    seq, start = _sequence_columns(table.column_names)
    lengths = np.stack([_list_values(table[c])[1] for c in seq], axis=1)
    ids = table["id"].combine_chunks() if table.num_rows else pa.array([], pa.string())
    return _sorted_index(ids, lengths, _numpy(table[start]).astype(np.int64), None)


def parquet_index(files: list[str], ids=None) -> RowIndex:
    """The index of the rows stored in Parquet `files` (`ids`: only the rows with these ids), read
    in row-group batches: only the id, token and response-start columns, a batch at a time, files
    in parallel threads, so memory stays bounded by the index itself."""
    from concurrent.futures import ThreadPoolExecutor

    def one(f: int):
        pf = pq.ParquetFile(storage.open_input(files[f]), pre_buffer=False)
        seq, start = _sequence_columns(pf.schema_arrow.names)
        parts = []
        for g in range(pf.num_row_groups):
            row = 0
            for batch in pf.iter_batches(batch_size=8192, row_groups=[g], columns=["id", *seq, start], use_threads=False):
                n = batch.num_rows
                lengths = np.stack([_list_values(batch[c])[1] for c in seq], axis=1)
                where = np.stack([np.full(n, f), np.full(n, g), np.arange(row, row + n)], axis=1)
                parts.append((batch["id"], lengths, _numpy(batch[start]).astype(np.int64), where))
                row += n
        return len(seq), parts

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results = list(pool.map(one, range(len(files))))
    kinds = {k for k, parts in results if parts}
    if len(kinds) > 1:
        raise ValueError("training rows: the Parquet files mix DPO pairs and single sequences")
    parts = [p for _, ps in results for p in ps]
    if not parts:
        return RowIndex(pa.array([], pa.string()), np.zeros((0, 1), np.int64), np.zeros(0, np.int64),
                        np.zeros((0, 3), np.int64))
    all_ids = pa.concat_arrays([p[0] for p in parts])
    lengths = np.concatenate([p[1] for p in parts])
    starts = np.concatenate([p[2] for p in parts])
    where = np.concatenate([p[3] for p in parts]).astype(np.int64)
    if ids is not None:
        wanted = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else (
            ids if isinstance(ids, pa.Array) else pa.array(list(ids), pa.string()))
        keep = pc.is_in(all_ids, value_set=wanted).to_numpy(zero_copy_only=False)
        all_ids, lengths, starts, where = all_ids.filter(pa.array(keep)), lengths[keep], starts[keep], where[keep]
    return _sorted_index(all_ids, lengths, starts, where)


class ParquetRows:
    """Training rows read in place from Parquet files (local paths, a shared mount, or any URI
    pyarrow's filesystems open), optionally only the rows whose id is in `ids`. `fit` builds the
    index once (`index()`, kept for the next `fit` on the same rows); each worker then reads only
    the rows of its own micro-batches."""

    def __init__(self, files, ids=None):
        self.files = [str(f) for f in files]
        self.ids = ids
        self._index: RowIndex | None = None

    @classmethod
    def from_folder(cls, folder, ids=None) -> "ParquetRows":
        """A stage folder's shards (`artifacts.shard_files`: a broken shard is quarantined), by
        location: in a run folder in object storage the workers read them from the store."""
        from proxykd import artifacts

        return cls([storage.location(f) for f in artifacts.shard_files(folder)], ids)

    def index(self) -> RowIndex:
        if self._index is None:
            self._index = parquet_index(self.files, self.ids)
        return self._index

    @property
    def num_rows(self) -> int:
        return self.index().num_rows


class TableReader:
    """Rows of an in-memory table (from Ray's object store), by index position."""

    def __init__(self, table: pa.Table):
        self.table = table

    def take(self, positions: np.ndarray, columns: list[str]) -> pa.Table:
        return self.table.select(columns).take(pa.array(positions))


class ShardReader:
    """Rows of Parquet files by index position, through `where` (file, row group, row): each row
    group is read in batches of `batch_rows` rows from its start up to the last row wanted, and
    only the wanted rows are kept. Memory stays bounded whatever the files' size: batches of about
    `batch_bytes` (at most `batch_rows` rows; a read holds about 10 × batch_bytes of Arrow memory
    whatever the group's size), at most `max_cursors` open reads (a cursor lets the next read of a
    group continue where the last one stopped: an unshuffled epoch reads every group once) and
    `max_open` open files. Reading a row decodes its group up to it: with shuffled rows the cost
    per row is about half a row group, so small row groups (the logits stage writes 16-row
    shards) suit training best."""

    def __init__(self, files: list[str], where: np.ndarray, batch_rows: int = 256, batch_bytes: int = 1 << 20,
                 max_open: int = 16, max_cursors: int = 2):
        self.files, self.where = files, where
        self.batch_rows, self.batch_bytes = batch_rows, batch_bytes
        self.max_open, self.max_cursors = max_open, max_cursors
        self._open: OrderedDict = OrderedDict()
        self._cursors: OrderedDict = OrderedDict()

    def _file(self, f: int) -> pq.ParquetFile:
        pf = self._open.pop(f, None)
        if pf is None:
            # Small row groups (the logits stage's) are fetched in one coalesced read (pre_buffer:
            # about 30 % faster); big ones column page by page, so memory stays bounded.
            source = storage.open_input(self.files[f])
            md = pq.read_metadata(source)
            small = all(md.row_group(g).total_byte_size <= 16 << 20 for g in range(md.num_row_groups))
            pf = pq.ParquetFile(source, metadata=md, pre_buffer=small, buffer_size=0 if small else 1 << 20)
            while len(self._open) >= self.max_open:
                self._open.popitem(last=False)
        self._open[f] = pf
        return pf

    def _group_rows(self, f: int, g: int, want: np.ndarray, columns: tuple[str, ...]) -> pa.Table:
        """Rows `want` (sorted, unique) of row group g of file f, in that order."""
        key = (f, g, columns)
        cursor = self._cursors.pop(key, None)
        if cursor is None or cursor[1] > want[0]:  # none yet, or the rows lie before it: start over
            pf = self._file(f)
            group = pf.metadata.row_group(g)  # uncompressed bytes of all columns: an upper bound
            rows = int(np.clip(self.batch_bytes * group.num_rows // max(group.total_byte_size, 1), 1, self.batch_rows))
            it = pf.iter_batches(batch_size=rows, row_groups=[g], columns=list(columns), use_threads=False)
            cursor = (it, 0, None)
        it, pos, batch = cursor  # `batch` holds rows [pos, pos + len(batch)) of the group
        pieces, j = [], 0
        while j < len(want):
            if batch is not None and want[j] < pos + batch.num_rows:
                end = int(np.searchsorted(want, pos + batch.num_rows))
                pieces.append(batch.take(pa.array(want[j:end] - pos)))
                j = end
                continue
            if batch is not None:
                pos += batch.num_rows
            batch = next(it, None)
            if batch is None:
                raise IndexError(f"{self.files[f]}: row group {g} has no row {int(want[j])} (the file changed?)")
        self._cursors[key] = (it, pos, batch)
        while len(self._cursors) > self.max_cursors:
            self._cursors.popitem(last=False)
        return pa.Table.from_batches(pieces)

    def take(self, positions: np.ndarray, columns: list[str]) -> pa.Table:
        w = self.where[positions]
        order = np.lexsort((w[:, 2], w[:, 1], w[:, 0]))
        w = w[order]
        cut = np.flatnonzero(np.r_[True, (w[1:, 0] != w[:-1, 0]) | (w[1:, 1] != w[:-1, 1])])
        pieces = []
        for a, b in zip(cut, np.r_[cut[1:], len(w)]):
            want, inverse = np.unique(w[a:b, 2], return_inverse=True)
            t = self._group_rows(int(w[a, 0]), int(w[a, 1]), want, tuple(columns))
            pieces.append(t if len(want) == b - a else t.take(pa.array(inverse)))
        return pa.concat_tables(pieces).take(pa.array(np.argsort(order)))


class Prefetch:
    """Runs an iterator in a background thread, at most `depth` items ahead of the consumer: the
    next micro-batches are read and collated while the current one trains (pyarrow, numpy and
    torch release the GIL in their work). An exception in the thread is raised by `next`."""

    _END = object()

    def __init__(self, items, depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(items,), daemon=True, name="proxykd-prefetch")
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, items) -> None:
        try:
            for item in items:
                if not self._put((None, item)):
                    return
            self._put((None, self._END))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._put((e, None))

    def __iter__(self):
        return self

    def __next__(self):
        error, item = self._queue.get()
        if error is not None:
            raise error
        if item is self._END:
            raise StopIteration
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def _rss_mb() -> float:
    """This process's resident memory now, MB (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return 0.0


# ---------------------------------------------------------------- the worker loop ----

def say(line: str) -> None:
    """One line of the worker's live log, written once. Ray Train patches `print` in its workers to
    write to stdout *and* log to stderr (Ray wraps the worker's stdout), and Ray forwards both, so
    every printed step line reached the driver twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _build_model(config: dict, tc: TrainConfig):
    import ray.train.torch
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(tc.seed)  # LoRA's initial A matrices: the same on every worker
    model = AutoModelForCausalLM.from_pretrained(storage.fetch(config["model_path"]), dtype=torch.float32)
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


def step_plan(index: RowIndex, order: np.ndarray, step_in_epoch: int, G: int, world: int, accum: int
              ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """(the global batch's rows in epoch order, its rows sorted by padded length, all world ×
    accum micro-batches in slice order) of one optimizer step."""
    rows = step_rows(order, step_in_epoch, G)
    ordered = length_sorted(rows, index.lengths.max(1))
    return rows, ordered, np.array_split(ordered, world * accum)


def micro_batch_stream(index: RowIndex, reader, objective: str, pad_id: int, tc: TrainConfig, rank: int,
                       world: int, start: int, total: int, per_epoch: int, pin: bool = False):
    """This worker's micro-batches of steps [start, total), in training order: (step, slot, first
    position of the response window, tensors, seconds spent reading and collating)."""
    import torch

    columns = read_columns(objective)
    order_epoch, order = -1, None
    G = tc.batch_size * world * tc.grad_accum_steps
    for step in range(start, total):
        epoch, i = divmod(step, per_epoch)
        if epoch != order_epoch:
            order_epoch, order = epoch, epoch_order(index.num_rows, tc.seed, epoch, tc.shuffle)
        _, ordered, _ = step_plan(index, order, i, G, world, tc.grad_accum_steps)
        for slot, mrows in enumerate(worker_micro_batches(ordered, rank, world, tc.grad_accum_steps)):
            t0 = time.perf_counter()
            first, arrays = response_window(collate(objective, reader.take(mrows, columns), pad_id, left_pad=True))
            tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
            if pin:
                tensors = {k: v.pin_memory() for k, v in tensors.items()}
            yield step, slot, first, tensors, time.perf_counter() - t0


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
    tokenizer = AutoTokenizer.from_pretrained(storage.fetch(config["model_path"]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # The rows: an in-memory table from the object store, or read in place from Parquet files
    # (only this worker's micro-batches, in bounded memory); the order is planned on the index.
    index: RowIndex = ray.get(config["index"])
    reader = TableReader(ray.get(config["table"])) if "table" in config else ShardReader(config["files"], index.where)
    num_rows, ntok, seq_lengths = index.num_rows, index.response_tokens(), index.lengths[:, 0]
    G = tc.batch_size * world * tc.grad_accum_steps
    per_epoch = steps_per_epoch(num_rows, G, world * tc.grad_accum_steps)
    total = per_epoch * tc.epochs

    model = _build_model(config, tc)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, tc.warmup_steps, tc.lr_schedule))

    step, history, attempt, data = 0, [], 0, index.fingerprint()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # a restarted run: continue after the last checkpointed step
        with checkpoint.as_directory() as local:
            state = load_state(Path(local) / STATE_FILE)
        # the data position would be wrong (older checkpoints have no data fingerprint)
        if (state["rows"], state["global_batch"], state.get("data", data)) != (num_rows, G, data):
            raise RuntimeError(f"[{name}] checkpoint was made with {state['rows']} rows (data {state.get('data')}) "
                               f"and global batch {state['global_batch']}, now {num_rows} (data {data}) and {G}: "
                               "use a fresh out_dir")
        set_model_state_dict(model, state["model"], options=_state_options(tc, strict=tc.lora is None))
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=_state_options(tc))
        scheduler.load_state_dict(state["scheduler"])
        step, history, attempt = state["step"], state["history"], state["attempt"] + 1
        if rank == 0:
            say(f"[{name}] resumed from step {step} (epoch {step // per_epoch}, batch {step % per_epoch})")
    metrics_path = storage.local_path(config["metrics_path"])  # (this node's mirror, for a run in object storage)
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    if rank == 0:  # the live log: what the checkpoint holds, then one line per step
        metrics_path.write_text("".join(json.dumps(h) + "\n" for h in history))

    bf16 = tc.bf16 if tc.bf16 is not None else device.type == "cuda"
    kill_at = config.get("kill_at_step")
    model.train()
    # The next micro-batches are read and collated in a thread while this one trains.
    feed = Prefetch(micro_batch_stream(index, reader, objective, pad_id, tc, rank, world, step, total, per_epoch,
                                       pin=device.type == "cuda"), depth=2 * tc.grad_accum_steps)
    order_epoch, order = -1, None
    while step < total:
        epoch, i = divmod(step, per_epoch)
        if epoch != order_epoch:
            order_epoch, order = epoch, epoch_order(num_rows, tc.seed, epoch, tc.shuffle)
        rows, _, micro_all = step_plan(index, order, i, G, world, tc.grad_accum_steps)
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
        input_s = wait_s = 0.0
        for m in range(tc.grad_accum_steps):
            w0 = time.perf_counter()
            at, slot, first, t, seconds = next(feed)
            wait_s += time.perf_counter() - w0
            input_s += seconds
            assert (at, slot) == (step, m), f"input stream at step {at} slot {slot}, loop at {step} {m}"
            t = {k: v.to(device, non_blocking=True) for k, v in t.items()}
            keep = t["input_ids"].shape[1] - first
            last = m == tc.grad_accum_steps - 1
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
        now = time.time()
        row = {"step": step, "epoch": epoch, "batch": batch_fingerprint(index.ids.take(pa.array(rows)).to_pylist()),
               **parts, "grad_norm": float(grad_norm), "lr": lr,
               "tokens": int(seq_lengths[rows].sum()),
               "tokens_per_s": float(seq_lengths[rows].sum()) / max(now - t0, 1e-9), "attempt": attempt,
               # input: this worker's read + collate time in the step (in the prefetch thread) and
               # the time the step waited for it; padding over the global batch's micro-batches
               "input_s": round(input_s, 6), "input_wait_s": round(wait_s, 6),
               "pad_fraction": round(padding_fraction(micro_all, index.lengths), 6),
               "rss_mb": round(_rss_mb(), 1), "time": now}
        history.append(row)
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if step % 10 == 0 or step == 1 or step == total:
                say(f"[{name}] epoch {epoch} step {step}/{total} "
                    + " ".join(f"{k} {parts[k]:.4f}" for k in sorted(parts))
                    + f" lr {lr:.2e} tok/s {row['tokens_per_s']:.0f}")

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
                             batch_in_epoch=step % per_epoch, rows=num_rows, global_batch=G, data=data,
                             history=history, attempt=attempt)
                torch.save(state, Path(tmp) / STATE_FILE)
            ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)
        if rank == 0:  # (a run folder in object storage: the steps so far, beside the checkpoint)
            storage.push(metrics_path)
    feed.close()


# ---------------------------------------------------------------- driver side ----

def fit(
    *,
    name: str,
    objective: str,
    model_path: str,
    table: pa.Table | ParquetRows,
    out_dir: Path,
    train: TrainConfig,
    resources: ResourcesConfig,
    loss: dict,
) -> Path:
    """Train on `table`'s rows and return `<out_dir>/model` (a Hugging Face folder). `table` is
    an in-memory table (small ones: align's; it goes to Ray's object store once) or `ParquetRows`
    (a stage's shards, read in place: the workers read only their micro-batches' rows, so a table
    larger than memory or the object store trains in bounded memory). Both give the same batches.
    `out_dir/_ray` holds Ray Train's run state and checkpoints (in the object store for a run folder
    there); rerunning with the same out_dir resumes from them. `out_dir/metrics.jsonl` gets one line per optimizer step as it happens."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if isinstance(table, ParquetRows):
        index, source = table.index(), {"files": table.files}
    else:
        table = table.sort_by("id")
        index, source = table_index(table), {"table": table}
    if index.num_rows == 0:
        raise ValueError(f"{name}: no training rows")
    out_dir.mkdir(parents=True, exist_ok=True)
    if "table" in source:
        source["table"] = ray.put(source["table"])
    config = {"name": name, "objective": objective, "model_path": model_path, "train": train.model_dump(),
              "loss": loss, "index": ray.put(index), **source,
              "metrics_path": storage.location((out_dir / METRICS_FILE).resolve())}
    if os.environ.get(KILL_ENV):
        config["kill_at_step"] = int(os.environ[KILL_ENV])
    # Ray Train keeps its run state and checkpoints in the object store itself for a run folder
    # there: a rerun on any machine resumes from them.
    storage_path, storage_fs = storage.train_storage(out_dir / "_ray")
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(**scaling_kwargs(resources)),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    storage.pull(out_dir / METRICS_FILE)  # (written by rank 0, which may have run on another node)
    final = out_dir / MODEL_DIR
    tmp = out_dir / ".checkpoint.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    result.checkpoint.to_directory(str(tmp))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp / MODEL_DIR, final)
    shutil.rmtree(tmp)
    storage.push(final)
    return final


def scaling_kwargs(resources: ResourcesConfig) -> dict:
    """Ray Train's ScalingConfig keywords: `train_workers` workers, each asking for
    `resources.train` (CPUs, GPUs, memory, accelerator type; 1 CPU, and 1 GPU with `use_gpu`, where
    it sets none): the demand an autoscaler turns into GPU nodes."""
    gpus = resources.train_gpus
    per_worker = {"CPU": resources.train_cpus}
    if gpus > 0:
        per_worker["GPU"] = gpus
    if resources.train.memory_gb is not None:
        per_worker["memory"] = int(resources.train.memory_gb * 2**30)
    kwargs = {"num_workers": resources.train_workers, "use_gpu": gpus > 0, "resources_per_worker": per_worker}
    if resources.train.accelerator_type is not None:
        kwargs["accelerator_type"] = resources.train.accelerator_type
    return kwargs


def fits_at_once(cluster: dict[str, float], scaling: dict) -> int:
    """How many trainings of shape `scaling` (scaling_kwargs) the cluster's total resources hold
    side by side; at least 1 (an autoscaling cluster that has no GPU node yet trains one at a
    time, and its autoscaler adds the node)."""
    need = {r: v * scaling["num_workers"] for r, v in scaling["resources_per_worker"].items() if v > 0}
    return max(1, min(int(cluster.get(r, 0) // v) for r, v in need.items())) if need else 1


def fit_concurrently(runs: list[dict], resources: ResourcesConfig) -> list[Path]:
    """`fit(**run)` for each of `runs`, as many at once as the cluster holds (`fits_at_once`),
    in the order given; returns their model folders in that order. Independent trainings (the
    report's arms, distill's two students) then overlap their Ray Train start-up and share a
    cluster's nodes instead of queueing on one; each is seeded, so the result is the same."""
    import concurrent.futures

    import ray

    if len(runs) <= 1:
        return [fit(**run) for run in runs]
    at_once = min(len(runs), fits_at_once(ray.cluster_resources(), scaling_kwargs(resources)))
    with concurrent.futures.ThreadPoolExecutor(max_workers=at_once, thread_name_prefix="fit") as pool:
        return list(pool.map(lambda run: fit(**run), runs))


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
    storage.push(path)
    return path
