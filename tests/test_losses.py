"""Tests for proxykd.losses against straightforward loop/full-vocab references."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from proxykd.losses import (
    dpo_loss,
    nll_and_topk_kl,
    nll_loss,
    sequence_logprobs,
    sigmoid_weights,
    token_logprobs,
    topk_kl,
)

B, T, V, K = 3, 7, 11, 4
ATOL = {"atol": 1e-5, "rtol": 1e-5}

# (prompt_len, response_len) per sequence; remainder is right padding.
LAYOUT = [(2, 5), (3, 2), (1, 3)]


def make_batch(seed=0, v=V, k=K):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, v, (B, T), generator=g)
    labels = torch.full((B, T), -100, dtype=torch.long)
    for b, (p, r) in enumerate(LAYOUT):
        labels[b, p : p + r] = input_ids[b, p : p + r]
    logits = torch.randn(B, T, v, generator=g) * 2.0
    topk_ids = torch.zeros(B, T, k, dtype=torch.long)
    topk_lp = torch.zeros(B, T, k)
    for b in range(B):
        for t in range(T):
            if labels[b, t] != -100:
                topk_ids[b, t] = torch.randperm(v, generator=g)[:k]
                # log-probs of a partial distribution (sum < 1), as an API returns
                topk_lp[b, t] = torch.log_softmax(torch.randn(k + 3, generator=g), -1)[:k]
    return logits, labels, topk_ids, topk_lp


# ---------------------------------------------------------------- references


def ref_token_logprobs(logits, labels):
    logps = torch.zeros(B, T - 1)
    mask = torch.zeros(B, T - 1, dtype=torch.bool)
    full = torch.log_softmax(logits.float(), dim=-1)
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1] - 1):
            y = int(labels[b, t + 1])
            if y != -100:
                logps[b, t] = full[b, t, y]
                mask[b, t] = True
    return logps, mask


def ref_nll(logits, labels):
    logps, mask = ref_token_logprobs(logits, labels)
    vals = [-float(logps[b, t]) for b in range(B) for t in range(T - 1) if mask[b, t]]
    return torch.tensor(sum(vals) / len(vals))


def n_tokens(labels):
    return int((labels[:, 1:] != -100).sum())


# ---------------------------------------------------------------- token_logprobs / nll / seq


def test_token_logprobs_matches_reference():
    logits, labels, _, _ = make_batch()
    logps, mask = token_logprobs(logits, labels)
    ref_logps, ref_mask = ref_token_logprobs(logits, labels)
    assert logps.shape == (B, T - 1) and mask.dtype == torch.bool
    assert torch.equal(mask, ref_mask)
    assert int(mask.sum()) == sum(r for _, r in LAYOUT)  # prompt/pad excluded
    assert_close(logps, ref_logps, **ATOL)
    assert torch.all(logps[~mask] == 0)


def test_nll_matches_reference():
    logits, labels, _, _ = make_batch(seed=1)
    assert_close(nll_loss(logits, labels), ref_nll(logits, labels), **ATOL)
    # also equals HF-style shifted cross_entropy with ignore_index
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert_close(nll_loss(logits, labels), ce, **ATOL)


def test_sequence_logprobs_matches_reference():
    logits, labels, _, _ = make_batch(seed=2)
    ref_logps, ref_mask = ref_token_logprobs(logits, labels)
    ref = torch.stack(
        [sum(float(ref_logps[b, t]) for t in range(T - 1) if ref_mask[b, t]) * torch.ones(()) for b in range(B)]
    )
    out = sequence_logprobs(logits, labels)
    assert out.shape == (B,)
    assert_close(out, ref, **ATOL)


def test_bf16_logits_computed_in_float32():
    logits, labels, _, _ = make_batch(seed=3)
    lb = logits.bfloat16()
    logps, _ = token_logprobs(lb, labels)
    assert logps.dtype == torch.float32
    ref, _ = ref_token_logprobs(lb.float(), labels)
    assert_close(logps, ref, **ATOL)


def test_all_masked_returns_zero_with_grad():
    logits, _, topk_ids, topk_lp = make_batch(seed=4)
    labels = torch.full((B, T), -100, dtype=torch.long)
    for fn in (
        lambda x: nll_loss(x, labels),
        lambda x: topk_kl(x, labels, topk_ids, topk_lp),
    ):
        x = logits.clone().requires_grad_(True)
        loss = fn(x)
        assert loss.item() == 0.0
        loss.backward()
        assert x.grad is not None and torch.all(x.grad == 0)
    assert torch.all(sequence_logprobs(logits, labels) == 0)


# ---------------------------------------------------------------- dpo


def test_dpo_hand_computed():
    pc, pr, rc, rr = -1.0, -3.0, -2.0, -2.5
    t = lambda x: torch.tensor([x])

    def hand(beta, pc, pr, rc, rr):
        z = beta * ((pc - rc) - (pr - rr))
        return -math.log(1.0 / (1.0 + math.exp(-z)))

    expected = hand(0.1, pc, pr, rc, rr)  # z = 0.1 * (1 - (-0.5)) = 0.15
    assert expected == pytest.approx(math.log(1 + math.exp(-0.15)))
    got = dpo_loss(t(pc), t(pr), t(rc), t(rr), beta=0.1)
    assert got.item() == pytest.approx(expected, abs=1e-6)

    # beta matters
    got5 = dpo_loss(t(pc), t(pr), t(rc), t(rr), beta=0.5)
    assert got5.item() == pytest.approx(hand(0.5, pc, pr, rc, rr), abs=1e-6)
    assert abs(got5.item() - got.item()) > 1e-3

    # reference terms matter (zero refs -> different margin: 2 instead of 1.5)
    got0 = dpo_loss(t(pc), t(pr), t(0.0), t(0.0), beta=0.1)
    assert got0.item() == pytest.approx(hand(0.1, pc, pr, 0.0, 0.0), abs=1e-6)
    assert abs(got0.item() - got.item()) > 1e-4
    # swapping the two reference values flips sign of their contribution
    gots = dpo_loss(t(pc), t(pr), t(rr), t(rc), beta=0.1)
    assert gots.item() == pytest.approx(hand(0.1, pc, pr, rr, rc), abs=1e-6)


def test_dpo_batch_mean_and_grad():
    pc = torch.tensor([-1.0, -4.0, -2.0], requires_grad=True)
    pr = torch.tensor([-3.0, -1.0, -2.0], requires_grad=True)
    rc = torch.tensor([-2.0, -3.0, -1.0])
    rr = torch.tensor([-2.5, -2.0, -2.0])
    beta = 0.3
    loss = dpo_loss(pc, pr, rc, rr, beta)
    ref = sum(
        math.log1p(math.exp(-beta * ((pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item()))))
        for i in range(3)
    ) / 3
    assert loss.item() == pytest.approx(ref, abs=1e-6)
    loss.backward()
    assert torch.all(pc.grad < 0) and torch.all(pr.grad > 0)


# ---------------------------------------------------------------- top-k divergences

MODES = [(d, t) for d in ("forward", "reverse", "jsd") for t in ("renormalize", "tail_bucket")]


def _divergence(p, q, divergence, beta=0.5):
    """Σ over outcomes, in plain Python-float/torch-scalar arithmetic (0 · log 0 = 0)."""
    terms = []
    for pj, qj in zip(p, q):
        if divergence == "forward":
            terms.append(pj * (torch.log(pj) - torch.log(qj)) if pj > 0 else 0.0 * pj)
        elif divergence == "reverse":
            terms.append(qj * (torch.log(qj) - torch.log(pj)) if qj > 0 else 0.0 * qj)
        else:
            m = beta * pj + (1 - beta) * qj
            kp = pj * (torch.log(pj) - torch.log(m)) if pj > 0 else 0.0 * pj
            kq = qj * (torch.log(qj) - torch.log(m)) if qj > 0 else 0.0 * qj
            terms.append(beta * kp + (1 - beta) * kq)
    return sum(terms)


def ref_topk(logits, labels, topk_ids, topk_lp, weights=None, divergence="forward", tail="tail_bucket", beta=0.5):
    """Position by position from the dense student softmax (float64, differentiable): the top-k
    entries that are finite form the support; renormalise both over it, or add a tail bucket."""
    full = torch.softmax(logits.double(), dim=-1)
    total, count = 0.0, 0
    for b in range(logits.shape[0]):
        w = 1.0 if weights is None else float(weights[b])
        for t in range(1, logits.shape[1]):
            if labels[b, t] == -100:
                continue
            count += 1
            keep = [j for j in range(topk_ids.shape[-1]) if math.isfinite(float(topk_lp[b, t, j]))]
            p = [torch.tensor(math.exp(float(topk_lp[b, t, j])), dtype=torch.float64) for j in keep]
            q = [full[b, t - 1, int(topk_ids[b, t, j])] for j in keep]
            if tail == "renormalize":
                sp, sq = sum(p), sum(q)
                p, q = [x / sp for x in p], [x / sq for x in q]
            else:
                p, q = p + [1 - sum(p)], q + [1 - sum(q)]
            total = total + w * _divergence(p, q, divergence, beta)
    return total / count


def _kl(x, labels, ids, lp, w=None, divergence="forward", tail="tail_bucket"):
    return topk_kl(x, labels, ids, lp, w, divergence=divergence, tail=tail)


@pytest.mark.parametrize("divergence,tail", MODES)
def test_topk_divergence_matches_reference(divergence, tail):
    logits, labels, topk_ids, topk_lp = make_batch(seed=5)
    w = torch.tensor([0.2, 0.9, 0.5])
    x = logits.clone().requires_grad_(True)
    out = _kl(x, labels, topk_ids, topk_lp, w, divergence, tail)
    assert out.dim() == 0 and out.item() > 1e-3
    xr = logits.clone().double().requires_grad_(True)
    ref = ref_topk(xr, labels, topk_ids, topk_lp, w, divergence, tail)
    assert_close(out, ref.float(), **ATOL)
    out.backward()
    ref.backward()
    assert_close(x.grad, xr.grad.float(), **ATOL)
    # weights matter, and off (None) means all ones
    assert abs(out.item() - _kl(logits, labels, topk_ids, topk_lp, None, divergence, tail).item()) > 1e-4
    assert_close(_kl(logits, labels, topk_ids, topk_lp, None, divergence, tail),
                 ref_topk(logits, labels, topk_ids, topk_lp, None, divergence, tail).float(), **ATOL)


def test_the_options_give_different_losses():
    logits, labels, topk_ids, topk_lp = make_batch(seed=5)
    values = [_kl(logits, labels, topk_ids, topk_lp, None, d, t).item() for d, t in MODES]
    assert min(abs(a - b) for i, a in enumerate(values) for b in values[i + 1:]) > 1e-4


def test_jsd_beta():
    logits, labels, topk_ids, topk_lp = make_batch(seed=5)
    for beta in (0.1, 0.5, 0.9):
        out = topk_kl(logits, labels, topk_ids, topk_lp, divergence="jsd", tail="renormalize", jsd_beta=beta)
        ref = ref_topk(logits, labels, topk_ids, topk_lp, None, "jsd", "renormalize", beta)
        assert_close(out, ref.float(), **ATOL)


def test_unknown_options_fail():
    logits, labels, topk_ids, topk_lp = make_batch(seed=5)
    with pytest.raises(ValueError, match="divergence"):
        _kl(logits, labels, topk_ids, topk_lp, divergence="kl")
    with pytest.raises(ValueError, match="tail"):
        _kl(logits, labels, topk_ids, topk_lp, tail="drop")


def test_topk_weight_one_hot_equals_sample0_scaled():
    logits, labels, topk_ids, topk_lp = make_batch(seed=7)
    w = torch.tensor([1.0, 0.0, 0.0])
    weighted = _kl(logits, labels, topk_ids, topk_lp, w)
    only0 = _kl(logits[:1], labels[:1], topk_ids[:1], topk_lp[:1])
    n_all, n0 = n_tokens(labels), n_tokens(labels[:1])
    assert n0 < n_all
    assert_close(weighted * n_all, only0 * n0, **ATOL)


@pytest.mark.parametrize("divergence,tail", MODES)
def test_full_vocabulary_support_equals_the_exact_divergence(divergence, tail):
    """With k = V (the proxy's whole distribution stored), every mode is the exact divergence."""
    g = torch.Generator().manual_seed(8)
    logits, labels, _, _ = make_batch(seed=8)
    proxy = torch.randn(B, T, V, generator=g) * 2.0
    # proxy's full distribution at position t (token AT t) comes from proxy logits t-1;
    # store it under a random per-position permutation of the vocabulary.
    topk_ids = torch.zeros(B, T, V, dtype=torch.long)
    topk_lp = torch.zeros(B, T, V)
    proxy_lsm = torch.log_softmax(proxy, -1)
    for b in range(B):
        for t in range(1, T):
            perm = torch.randperm(V, generator=g)
            topk_ids[b, t] = perm
            topk_lp[b, t] = proxy_lsm[b, t - 1, perm]
    out = _kl(logits, labels, topk_ids, topk_lp, None, divergence, tail)

    # vectorised full-vocab reference with torch's kl_div
    logp = torch.log_softmax(proxy[:, :-1].double(), -1)
    logq = torch.log_softmax(logits[:, :-1].double(), -1)
    kl = lambda a, b: F.kl_div(b, a, log_target=True, reduction="none").sum(-1)  # KL(a || b)
    if divergence == "forward":
        d = kl(logp, logq)
    elif divergence == "reverse":
        d = kl(logq, logp)
    else:
        logm = torch.logaddexp(logp, logq) - math.log(2)
        d = 0.5 * kl(logp, logm) + 0.5 * kl(logq, logm)
    mask = labels[:, 1:] != -100
    ref = d[mask].mean().float()
    assert ref.item() > 1e-3
    assert_close(out, ref, **ATOL)
    # student identical to proxy -> zero divergence
    assert_close(_kl(proxy, labels, topk_ids, topk_lp, None, divergence, tail), torch.tensor(0.0), **ATOL)


@pytest.mark.parametrize("divergence,tail", MODES)
def test_padded_topk_entries_are_ignored(divergence, tail):
    """An entry with log-prob -inf (or NaN) is padding, whatever its id: the loss equals the one
    without it and matches the reference."""
    logits, labels, topk_ids, topk_lp = make_batch(seed=9)
    ids = torch.cat([topk_ids, topk_ids[..., :1]], -1)  # a duplicate id...
    lp = torch.cat([topk_lp, torch.full_like(topk_lp[..., :1], float("-inf"))], -1)  # ...that is padding
    lp[0, 3, -1] = float("nan")
    x = logits.clone().requires_grad_(True)
    out = _kl(x, labels, ids, lp, None, divergence, tail)
    assert_close(out, _kl(logits, labels, topk_ids, topk_lp, None, divergence, tail), **ATOL)
    assert_close(out, ref_topk(logits, labels, ids, lp, None, divergence, tail).float(), **ATOL)
    out.backward()
    assert torch.isfinite(x.grad).all()


def test_tail_bucket_tolerates_float16_mass_over_one():
    """Stored float16 log-probs of a near-one-hot proxy can sum to slightly more than 1."""
    logits, labels, topk_ids, _ = make_batch(seed=9)
    lp = torch.full(topk_ids.shape, -30.0)
    lp[..., 0] = torch.tensor(-1e-7).half().float() + 1e-4  # > 0: probability above 1
    x = logits.clone().requires_grad_(True)
    out = _kl(x, labels, topk_ids, lp)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(x.grad).all()


def test_kd_builds_no_vocabulary_sized_tensor_beyond_sft():
    """Count every op output (forward and backward) with at least B·(T-1)·V elements: the KD loss
    must create exactly as many as plain NLL, i.e. nothing dense from the top-k data."""
    from torch.utils._python_dispatch import TorchDispatchMode

    logits, labels, topk_ids, topk_lp = make_batch(seed=13, v=97, k=5)
    big = B * (T - 1) * 97

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            outs = out if isinstance(out, (tuple, list)) else [out]
            self.n += sum(isinstance(o, torch.Tensor) and o.numel() >= big for o in outs)
            return out

    def count(fn):
        x = logits.clone().requires_grad_(True)
        with Count() as c:
            fn(x).backward()
        return c.n

    sft = count(lambda x: nll_loss(x, labels))
    for d, t in MODES:
        kd = count(lambda x, d=d, t=t: sum(nll_and_topk_kl(x, labels, topk_ids, topk_lp, divergence=d, tail=t)))
        assert kd == sft, (d, t, kd, sft)


# ---------------------------------------------------------------- masking and gradients


def _perturb_masked(logits, labels, topk_ids, topk_lp):
    """Change logits whose target is masked and top-k entries at masked positions."""
    logits, topk_ids, topk_lp = logits.clone(), topk_ids.clone(), topk_lp.clone()
    tgt_masked = torch.cat([labels[:, 1:] == -100, torch.ones(B, 1, dtype=torch.bool)], dim=1)
    logits[tgt_masked] = torch.randn(int(tgt_masked.sum()), V) * 10
    pos_masked = labels == -100
    topk_ids[pos_masked] = torch.randint(0, V, (int(pos_masked.sum()), topk_ids.shape[-1]))
    topk_lp[pos_masked] = float("nan")  # arbitrary garbage must not leak through
    return logits, topk_ids, topk_lp


def test_masked_positions_do_not_affect_results():
    logits, labels, topk_ids, topk_lp = make_batch(seed=10)
    l2, ids2, lp2 = _perturb_masked(logits, labels, topk_ids, topk_lp)
    assert not torch.equal(l2, logits)
    assert_close(nll_loss(l2, labels), nll_loss(logits, labels), **ATOL)
    assert_close(sequence_logprobs(l2, labels), sequence_logprobs(logits, labels), **ATOL)
    assert_close(
        topk_kl(l2, labels, ids2, lp2),
        topk_kl(logits, labels, topk_ids, topk_lp),
        **ATOL,
    )
    # sanity: perturbing an unmasked position does change things
    l3 = logits.clone()
    l3[0, 2] += torch.randn(V) * 5  # labels[0, 3] is a response token
    assert abs(nll_loss(l3, labels).item() - nll_loss(logits, labels).item()) > 1e-4
    kl3 = topk_kl(l3, labels, topk_ids, topk_lp)
    assert abs(kl3.item() - topk_kl(logits, labels, topk_ids, topk_lp).item()) > 1e-4


def test_gradients_flow():
    logits, labels, topk_ids, topk_lp = make_batch(seed=11)
    losses = {
        "nll": lambda x: nll_loss(x, labels),
        "seq": lambda x: -sequence_logprobs(x, labels).sum(),
        "kl": lambda x: topk_kl(x, labels, topk_ids, topk_lp, torch.tensor([1.0, 0.5, 0.2])),
    }
    tgt_masked = torch.cat([labels[:, 1:] == -100, torch.ones(B, 1, dtype=torch.bool)], dim=1)
    for name, fn in losses.items():
        x = logits.clone().requires_grad_(True)
        fn(x).backward()
        assert x.grad is not None, name
        assert torch.isfinite(x.grad).all(), name
        assert x.grad.abs().sum() > 0, name
        assert torch.all(x.grad[tgt_masked] == 0), name


def test_gradients_with_nan_garbage_at_masked_positions():
    logits, labels, topk_ids, topk_lp = make_batch(seed=12)
    _, ids2, lp2 = _perturb_masked(logits, labels, topk_ids, topk_lp)
    x = logits.clone().requires_grad_(True)
    topk_kl(x, labels, ids2, lp2).backward()
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0


# ---------------------------------------------------------------- sigmoid_weights


def test_sigmoid_weights():
    ll = torch.tensor([-3.0, -1.0, 0.5, 2.0])
    mean, std = -0.5, 1.5
    out = sigmoid_weights(ll, mean, std)
    ref = torch.tensor([1.0 / (1.0 + math.exp(-(x - mean) / std)) for x in ll.tolist()])
    assert_close(out, ref, **ATOL)
    # tensor mean/std work too
    assert_close(sigmoid_weights(ll, torch.tensor(mean), torch.tensor(std)), ref, **ATOL)


def test_sigmoid_weights_zero_std_clamped():
    ll = torch.tensor([-1.0, 0.0, 1.0])
    out = sigmoid_weights(ll, 0.0, 0.0)
    assert torch.isfinite(out).all()
    assert_close(out, torch.tensor([0.0, 0.5, 1.0]), **ATOL)


@pytest.mark.parametrize("divergence,tail", MODES)
def test_nll_and_topk_kl_parts_and_gradients(divergence, tail):
    torch.manual_seed(7)
    B, T, V, k = 3, 9, 13, 4
    labels = torch.randint(0, V, (B, T))
    labels[0, :3] = -100
    labels[1, :5] = -100
    labels[2, 6:] = -100  # right padding
    topk_ids = torch.randint(0, V, (B, T, k))
    topk_lp = torch.log_softmax(torch.randn(B, T, k + 2), -1)[..., :k].sort(-1, descending=True).values
    weights = torch.tensor([0.2, 1.0, 0.7])
    a = torch.randn(B, T, V, requires_grad=True)
    b = a.detach().double().requires_grad_(True)
    nll, kl = nll_and_topk_kl(a, labels, topk_ids, topk_lp, weights, divergence=divergence, tail=tail)
    ref_nll = nll_loss(b, labels).double()
    ref_kl = ref_topk(b, labels, topk_ids, topk_lp, weights, divergence, tail)
    assert_close(nll, ref_nll.float(), **ATOL)
    assert_close(kl, ref_kl.float(), **ATOL)
    (nll + 3.0 * kl).backward()
    (ref_nll + 3.0 * ref_kl).backward()
    assert_close(a.grad, b.grad.float(), **ATOL)
    assert kl.item() > 0 and nll.item() > 0
    # num_tokens replaces the denominator: a global-batch count splits into exact parts
    n = int((labels[:, 1:] != -100).sum())
    parts = [nll_and_topk_kl(a[i:i + 1], labels[i:i + 1], topk_ids[i:i + 1], topk_lp[i:i + 1], weights[i:i + 1],
                             divergence=divergence, tail=tail, num_tokens=n) for i in range(B)]
    assert_close(sum(p[0] for p in parts), nll, **ATOL)
    assert_close(sum(p[1] for p in parts), kl, **ATOL)
