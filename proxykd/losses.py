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

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100

__all__ = [
    "IGNORE_INDEX",
    "token_logprobs",
    "nll_loss",
    "sequence_logprobs",
    "dpo_loss",
    "topk_forward_kl",
    "nll_and_topk_kl",
    "sigmoid_weights",
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


def nll_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Token-mean negative log-likelihood over unmasked response tokens.

    loss = -Σ_{b,t: mask} logps[b, t] / Σ mask   (0, with grad graph, if Σ mask = 0)
    """
    logps, mask = token_logprobs(logits, labels)
    n = mask.sum()
    if n.item() == 0:
        return logits.float().sum() * 0.0
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
) -> Tensor:
    """DPO loss, averaged over the batch (inputs: [B] sequence log-probs).

    loss = mean_b -logsigmoid(beta * ((π_c - ref_c) - (π_r - ref_r)))
    """
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin).mean()


def topk_forward_kl(
    logits: Tensor,
    labels: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    weights: Tensor | None = None,
) -> Tensor:
    """Forward KL from the proxy's top-k distribution to the student.

    ``topk_ids`` / ``topk_logprobs`` [B, T, k] are aligned with ``labels``:
    entry t describes the token AT position t, so the student's distribution
    for it comes from ``logits[:, t-1]``. Only positions with
    ``labels[:, t] != -100`` count (t >= 1).

    p_j   = softmax(topk_logprobs[b, t])_j          (renormalised over top-k)
    q_j   = log softmax(logits[b, t-1])[topk_ids[b, t, j]]   (NOT renormalised)
    KL_bt = Σ_j p_j (log p_j - log q_j)
    loss  = Σ_{b,t: mask} w_b KL_bt / Σ mask        (0, with grad graph, if Σ mask = 0)

    ``weights`` [B] default to ones.
    """
    return nll_and_topk_kl(logits, labels, topk_ids, topk_logprobs, weights)[1]


def _weighted_kl_sum(log_q: Tensor, proxy_logprobs: Tensor, mask: Tensor, weights: Tensor | None) -> Tensor:
    """Σ_{b,t: mask} w_b Σ_j p_j (log p_j − log_q_j), p = softmax(proxy_logprobs) over k."""
    mask_k = mask.unsqueeze(-1)
    lp = torch.where(mask_k, proxy_logprobs.float(), torch.zeros_like(log_q))
    p = torch.log_softmax(lp, dim=-1).exp()  # [B, T-1, k]
    # xlogy handles p_j = 0 (proxy log-prob -inf) as 0 * log 0 = 0.
    kl = (torch.special.xlogy(p, p) - p * log_q).sum(-1)  # [B, T-1]
    kl = torch.where(mask, kl, torch.zeros_like(kl))
    if weights is not None:
        kl = kl * weights.to(kl.dtype).unsqueeze(-1)
    return kl.sum()


def nll_and_topk_kl(
    logits: Tensor,
    labels: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(nll_loss(...), topk_forward_kl(...))`` of one batch with a single log-sum-exp over the
    vocabulary and a single gather (label id and top-k ids together): the vocabulary-wide work, the
    expensive part, is then the same as for plain SFT."""
    shift_logits = logits[:, :-1].float()
    mask = labels[:, 1:] != IGNORE_INDEX
    n = mask.sum()
    if n.item() == 0:
        zero = logits.float().sum() * 0.0
        return zero, zero
    mask_k = mask.unsqueeze(-1)
    target = torch.where(mask, labels[:, 1:], torch.zeros_like(labels[:, 1:])).unsqueeze(-1)
    ids = torch.where(mask_k, topk_ids[:, 1:], torch.zeros_like(topk_ids[:, 1:]))
    picked = shift_logits.gather(-1, torch.cat([target, ids.to(target.dtype)], -1))
    logps = picked - shift_logits.logsumexp(-1, keepdim=True)  # [B, T-1, 1 + k]
    nll = -torch.where(mask, logps[..., 0], torch.zeros_like(logps[..., 0])).sum() / n
    return nll, _weighted_kl_sum(logps[..., 1:], topk_logprobs[:, 1:], mask, weights) / n


def sigmoid_weights(ll: Tensor, mean, std) -> Tensor:
    """Per-sample weights w = sigmoid((ll - mean) / max(std, 1e-6))."""
    std_t = torch.as_tensor(std, dtype=ll.dtype, device=ll.device).clamp_min(1e-6)
    return torch.sigmoid((ll - mean) / std_t)
