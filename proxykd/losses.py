"""Pure torch loss functions for Proxy-KD (arXiv 2401.07013).

Conventions (HF style):
  * ``logits``: [B, T, V] from ``model(input_ids)``.
  * ``labels``: [B, T] long; equal to ``input_ids`` at response positions and
    ``-100`` at prompt and padding positions.
  * Position t's logits predict token t+1, so every function shifts
    internally: ``logits[:, :-1]`` is scored against ``labels[:, 1:]``.

All log-probs are computed in float32 as ``gather(logits) - logsumexp(logits)``
so that no [B, T, V] log-softmax copy is materialised.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100

__all__ = [
    "IGNORE_INDEX",
    "dpo_loss",
    "nll_and_topk_kl",
    "nll_loss",
    "sequence_logprobs",
    "sigmoid_weights",
    "token_logprobs",
    "topk_divergence",
    "topk_kl",
]


def token_logprobs(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token log-probs of the labels.

    logps[b, t] = log softmax(logits[b, t])[labels[b, t+1]]   (0 where masked)
    mask[b, t]  = labels[b, t+1] != -100

    Returns ``(logps [B, T-1] float32, mask [B, T-1] bool)``.
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    safe = torch.where(mask, shift_labels, torch.zeros_like(shift_labels))
    picked = shift_logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    lse = shift_logits.logsumexp(-1)
    logps = torch.where(mask, picked - lse, torch.zeros_like(picked))
    return logps, mask


def nll_loss(logits: Tensor, labels: Tensor, num_tokens: Tensor | float | None = None) -> Tensor:
    """Negative log-likelihood summed over unmasked response tokens, divided by ``num_tokens``
    (default: their number; 0, with a grad graph, when there are none)."""
    logps, mask = token_logprobs(logits, labels)
    n = mask.sum().clamp_min(1) if num_tokens is None else num_tokens
    return -logps.sum() / n


def sequence_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """Sum of response-token log-probs per sequence: [B], Σ_t logps[b, t] over mask."""
    logps, _ = token_logprobs(logits, labels)
    return logps.sum(-1)


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
    num_sequences: Tensor | float | None = None,
) -> Tensor:
    """DPO loss over the batch (inputs: [B] sequence log-probs), summed and divided by
    ``num_sequences`` (default B, i.e. the batch mean).

    loss = Σ_b -logsigmoid(beta * ((π_c - ref_c) - (π_r - ref_r))) / num_sequences
    """
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    n = policy_chosen.shape[0] if num_sequences is None else num_sequences
    return -F.logsigmoid(beta * margin).sum() / n


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − e^x) for x ≤ 0, clamped just below 0 so a (numerically) full top-k leaves a tiny,
    finite tail instead of log 0."""
    return torch.log(-torch.expm1(x.clamp(max=-1e-6)))


def topk_divergence(
    log_q: Tensor,
    log_p: Tensor,
    valid: Tensor,
    divergence: str = "forward",
    tail: str = "tail_bucket",
    jsd_beta: float = 0.5,
) -> Tensor:
    """Divergence between the proxy and the student on the proxy's top-k support, per position.

    ``log_q`` [..., k]: the student's full-vocabulary log-probs at the top-k ids (not renormalised);
    ``log_p`` [..., k]: the proxy's top-k log-probs as stored (also full-vocabulary log-probs);
    ``valid`` [..., k]: entries that count (padded top-k entries and masked positions are False).

    ``tail`` says what happens to the mass outside the top-k ids:
      * ``renormalize``: both distributions are renormalised over the (valid) top-k ids;
      * ``tail_bucket``: one extra outcome holds the rest, 1 − Σ p_topk for the proxy and
        1 − Σ q_topk for the student, so the student is also pushed to leave the same mass
        outside the proxy's top-k as the proxy does.
    ``divergence``: ``forward`` KL(p‖q) (the paper's), ``reverse`` KL(q‖p), or ``jsd``:
    β·KL(p‖m) + (1−β)·KL(q‖m), m = β·p + (1−β)·q.

    Returns [...] (0 where no entry is valid). Nothing here is vocabulary-sized.
    """
    any_valid = valid.any(-1, keepdim=True)
    valid = valid & any_valid
    # Invalid entries get -inf (zero mass); positions with nothing valid get a harmless uniform
    # placeholder so no NaN appears anywhere in the graph, then contribute 0.
    neg_inf = torch.tensor(float("-inf"), dtype=log_q.dtype, device=log_q.device)
    lp = torch.where(valid, log_p.to(log_q.dtype), neg_inf)
    lq = torch.where(valid, log_q, neg_inf)
    lp = torch.where(any_valid, lp, torch.zeros_like(lp))
    lq = torch.where(any_valid, lq, torch.zeros_like(lq))
    if tail == "tail_bucket":
        lp = torch.cat([lp, _log1mexp(lp.logsumexp(-1, keepdim=True))], -1)
        lq = torch.cat([lq, _log1mexp(lq.logsumexp(-1, keepdim=True))], -1)
        valid = torch.cat([valid, any_valid], -1)
    elif tail != "renormalize":
        raise ValueError(f"unknown tail {tail!r}: renormalize or tail_bucket")
    # The tail bucket is renormalised too: stored float16 proxy log-probs can sum a hair over 1.
    lp, lq = torch.log_softmax(lp, -1), torch.log_softmax(lq, -1)
    zero = torch.zeros_like(lp)
    lp, lq = torch.where(valid, lp, zero), torch.where(valid, lq, zero)  # finite everywhere
    p = torch.where(valid, lp.exp(), zero)
    q = torch.where(valid, lq.exp(), zero)
    if divergence == "forward":
        d = p * (lp - lq)
    elif divergence == "reverse":
        d = q * (lq - lp)
    elif divergence == "jsd":
        b = jsd_beta
        lm = torch.logaddexp(lp + math.log(b), lq + math.log1p(-b))
        d = b * p * (lp - lm) + (1 - b) * q * (lq - lm)
    else:
        raise ValueError(f"unknown divergence {divergence!r}: forward, reverse or jsd")
    return torch.where(valid, d, zero).sum(-1) * any_valid.squeeze(-1)


def nll_and_topk_kl(
    logits: Tensor,
    labels: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    weights: Tensor | None = None,
    *,
    divergence: str = "forward",
    tail: str = "tail_bucket",
    jsd_beta: float = 0.5,
    num_tokens: Tensor | float | None = None,
) -> tuple[Tensor, Tensor]:
    """``(NLL, weighted top-k divergence)`` of one batch, each a sum over response tokens divided
    by ``num_tokens`` (default: this batch's response tokens; the training loop passes the count
    of the whole global batch so that micro-batches and workers add up exactly).

    ``topk_ids`` / ``topk_logprobs`` [B, T, k] are aligned with ``labels``: entry t describes the
    token AT position t, so the student's distribution for it comes from ``logits[:, t-1]``. Only
    positions with ``labels[:, t] != -100`` count; top-k entries with log-prob -inf or NaN are
    padding. ``weights`` [B] scale each sample's divergence (None: all 1).

    One log-sum-exp over the vocabulary and one gather (label id and top-k ids together): the
    vocabulary-wide work, the expensive part, is the same as for plain SFT, and the student's
    log-softmax is only ever gathered at k + 1 ids per position.
    """
    shift_logits = logits[:, :-1].float()
    mask = labels[:, 1:] != IGNORE_INDEX
    n = mask.sum().clamp_min(1) if num_tokens is None else num_tokens
    mask_k = mask.unsqueeze(-1)
    target = torch.where(mask, labels[:, 1:], torch.zeros_like(labels[:, 1:])).unsqueeze(-1)
    ids = torch.where(mask_k, topk_ids[:, 1:], torch.zeros_like(topk_ids[:, 1:]))
    picked = shift_logits.gather(-1, torch.cat([target, ids.to(target.dtype)], -1))
    logps = picked - shift_logits.logsumexp(-1, keepdim=True)  # [B, T-1, 1 + k]
    nll = -torch.where(mask, logps[..., 0], torch.zeros_like(logps[..., 0])).sum() / n
    proxy = topk_logprobs[:, 1:].float()
    valid = mask_k & torch.isfinite(proxy)
    div = topk_divergence(logps[..., 1:], proxy, valid, divergence, tail, jsd_beta)  # [B, T-1]
    if weights is not None:
        div = div * weights.to(div.dtype).unsqueeze(-1)
    return nll, div.sum() / n


def topk_kl(logits: Tensor, labels: Tensor, topk_ids: Tensor, topk_logprobs: Tensor,
            weights: Tensor | None = None, **options) -> Tensor:
    """The divergence part of :func:`nll_and_topk_kl` alone (same options)."""
    return nll_and_topk_kl(logits, labels, topk_ids, topk_logprobs, weights, **options)[1]


def sigmoid_weights(ll: Tensor, mean, std) -> Tensor:
    """Per-sample weights w = sigmoid((ll - mean) / max(std, 1e-6))."""
    std_t = torch.as_tensor(std, dtype=ll.dtype, device=ll.device).clamp_min(1e-6)
    return torch.sigmoid((ll - mean) / std_t)
