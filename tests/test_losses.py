"""Tests for raypref.losses: hand-worked arithmetic and the algorithms' promises.

Expected values are computed here with ``math`` from the papers' formulas, never copied
from the implementation's output.
"""

import math
import subprocess
import sys

import pytest
import torch

from raypref import losses as L

LOG2 = math.log(2.0)
INV_LOG2_3 = 1.0 / math.log2(3.0)  # 1 / D(2): discount of rank 2


def nls(x: float) -> float:
    """-logsigmoid(x) = log(1 + exp(-x)), by hand."""
    return math.log1p(math.exp(-x))


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


# ----------------------------------------------------------------------------- import


def test_import_needs_torch_only():
    code = (
        "import sys, raypref.losses\n"
        "heavy = {'diffusers', 'ray', 'transformers', 'accelerate', 'peft'}\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & heavy)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ----------------------------------------------------------------------------- Diffusion-DPO

# Two prompts, beta = 100 (paper convention, so the logit scale is 0.5 * 100 = 50).
#   row 0: (0.10 - 0.12) - (0.11 - 0.11) = -0.02  -> logit = -50 * -0.02 = +1.0
#   row 1: (0.20 - 0.19) - (0.20 - 0.20) = +0.01  -> logit = -50 * +0.01 = -0.5
ERR_W, ERR_L = t(0.10, 0.20), t(0.12, 0.19)
REF_W, REF_L = t(0.11, 0.20), t(0.11, 0.20)


def test_diffusion_dpo_hand_worked():
    loss = L.diffusion_dpo_loss(ERR_W, ERR_L, REF_W, REF_L, beta=100.0)
    assert loss.shape == (2,)
    expected = [nls(1.0), nls(-0.5)]  # log(1 + e^-1), log(1 + e^0.5)
    torch.testing.assert_close(loss, t(*expected), rtol=0, atol=1e-12)
    logits = L.diffusion_dpo_logits(ERR_W, ERR_L, REF_W, REF_L, beta=100.0)
    torch.testing.assert_close(logits, t(1.0, -0.5), rtol=0, atol=1e-12)


def test_dpo_soft_label_is_bradley_terry_cross_entropy_and_a_tie_is_symmetric():
    z = [1.0, -0.5]  # the logits of test_diffusion_dpo_hand_worked
    ones = t(1.0, 1.0)
    torch.testing.assert_close(L.diffusion_dpo_loss(ERR_W, ERR_L, REF_W, REF_L, 100.0, label=ones),
                               L.diffusion_dpo_loss(ERR_W, ERR_L, REF_W, REF_L, 100.0), rtol=0, atol=1e-12)
    tie = L.diffusion_dpo_loss(ERR_W, ERR_L, REF_W, REF_L, 100.0, label=t(0.5, 0.5))
    torch.testing.assert_close(tie, t(*[0.5 * (nls(x) + nls(-x)) for x in z]), rtol=0, atol=1e-12)
    swapped = L.diffusion_dpo_loss(ERR_L, ERR_W, REF_L, REF_W, 100.0, label=t(0.5, 0.5))
    torch.testing.assert_close(tie, swapped, rtol=0, atol=1e-12)  # a tie has no first image
    # label 0 is the pair read the other way round
    torch.testing.assert_close(L.diffusion_dpo_loss(ERR_W, ERR_L, REF_W, REF_L, 100.0, label=t(0.0, 0.0)),
                               L.diffusion_dpo_loss(ERR_L, ERR_W, REF_L, REF_W, 100.0), rtol=0, atol=1e-12)
    # at policy == reference a tie costs log 2 and pulls nowhere; off it, it pulls the margin back to 0
    err = t(0.3, 0.7).requires_grad_()
    loss = L.diffusion_dpo_loss(err, t(0.5, 0.2), t(0.3, 0.7), t(0.5, 0.2), 100.0, label=t(0.5, 0.5))
    torch.testing.assert_close(loss, t(LOG2, LOG2), rtol=0, atol=1e-12)
    loss.sum().backward()
    assert err.grad.abs().max() < 1e-12
    away = t(0.35, 0.7).requires_grad_()  # winner's error raised: margin < 0, the tie pushes it back down
    L.diffusion_dpo_loss(away, t(0.5, 0.2), t(0.3, 0.7), t(0.5, 0.2), 100.0, label=t(0.5, 0.5)).sum().backward()
    assert away.grad[0] > 0
    with pytest.raises(ValueError, match="label"):
        L.diffusion_dpo_loss(ERR_W, ERR_L, REF_W, REF_L, 100.0, label=t(1.5, 0.5))


def test_dpo_metrics_hand_worked():
    m = L.dpo_metrics(ERR_W, ERR_L, REF_W, REF_L, beta=100.0)
    # d_w = err_w - ref_w = [-0.01, 0.00]; d_l = err_l - ref_l = [0.01, -0.01]
    # row 0: -0.01 < 0.01 (right); row 1: 0.00 < -0.01 false (wrong)  -> accuracy 1/2
    assert m["implicit_acc"].item() == 0.5
    assert m["margin"].item() == pytest.approx((1.0 - 0.5) / 2, abs=1e-12)
    # r = -50 * d: r_w = [0.5, 0], r_l = [-0.5, 0.5]
    assert m["reward_w"].item() == pytest.approx(0.25, abs=1e-12)
    assert m["reward_l"].item() == pytest.approx(0.0, abs=1e-12)
    assert m["kl_proxy"].item() == pytest.approx((-0.01 + 0.0 + 0.01 - 0.01) / 4, abs=1e-12)
    assert m["policy_err"].item() == pytest.approx((0.10 + 0.20 + 0.12 + 0.19) / 4, abs=1e-12)
    assert m["ref_err"].item() == pytest.approx((0.11 + 0.20 + 0.11 + 0.20) / 4, abs=1e-12)
    # margin is r_w - r_l
    assert m["margin"].item() == pytest.approx(m["reward_w"].item() - m["reward_l"].item(), abs=1e-12)


def test_diffusion_dpo_matches_diffusers_convention():
    """Paper beta = 2 * diffusers' beta_dpo: diffusers computes
    -logsigmoid(beta_dpo * (ref_diff - model_diff)) with beta_dpo = 2500 where the paper uses 5000."""
    g = torch.Generator().manual_seed(0)
    e = 0.1 + 0.01 * torch.rand(4, 8, generator=g, dtype=torch.float64)
    model_diff, ref_diff = e[0] - e[1], e[2] - e[3]
    expected = [nls(2500.0 * (r - m)) for m, r in zip(model_diff.tolist(), ref_diff.tolist())]
    loss = L.diffusion_dpo_loss(e[0], e[1], e[2], e[3], beta=5000.0)
    torch.testing.assert_close(loss, t(*expected), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("beta", [1.0, 5000.0])
def test_dpo_policy_equals_reference_gives_log2(beta):
    g = torch.Generator().manual_seed(1)
    err_w, err_l = torch.rand(2, 16, generator=g, dtype=torch.float64)
    loss = L.diffusion_dpo_loss(err_w, err_l, err_w.clone(), err_l.clone(), beta)
    assert torch.equal(loss, torch.full_like(loss, LOG2))
    m = L.dpo_metrics(err_w, err_l, err_w, err_l, beta)
    assert m["implicit_acc"].item() == 0.0  # strict: ties are not counted as right
    assert m["margin"].item() == 0.0 and m["kl_proxy"].item() == 0.0
    assert L.kl_proxy(err_w, err_w).item() == 0.0


def test_swapping_winner_and_loser_flips_margin():
    g = torch.Generator().manual_seed(2)
    a, b, ra, rb = 0.1 + 0.01 * torch.rand(4, 32, generator=g, dtype=torch.float64)
    fwd = L.diffusion_dpo_logits(a, b, ra, rb, 300.0)
    bwd = L.diffusion_dpo_logits(b, a, rb, ra, 300.0)
    torch.testing.assert_close(bwd, -fwd, rtol=0, atol=0)
    m_f, m_b = L.dpo_metrics(a, b, ra, rb, 300.0), L.dpo_metrics(b, a, rb, ra, 300.0)
    assert m_b["margin"].item() == pytest.approx(-m_f["margin"].item())
    # no exact ties in random data: each pair is right in exactly one orientation
    assert m_f["implicit_acc"].item() + m_b["implicit_acc"].item() == pytest.approx(1.0)
    # -logsigmoid(x) - -logsigmoid(-x) = -x: the swapped loss is the mirrored one
    torch.testing.assert_close(
        L.diffusion_dpo_loss(b, a, rb, ra, 300.0) - L.diffusion_dpo_loss(a, b, ra, rb, 300.0), fwd
    )


def test_dpo_gradient_lowers_winner_error_and_raises_loser_error():
    err_w = torch.tensor([0.1, 0.2], dtype=torch.float64, requires_grad=True)
    err_l = torch.tensor([0.15, 0.1], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([0.12, 0.12], dtype=torch.float64)
    L.diffusion_dpo_loss(err_w, err_l, ref, ref, 50.0).sum().backward()
    assert (err_w.grad > 0).all() and (err_l.grad < 0).all()
    # d/d err_w of -logsigmoid(-0.5 b x) = 0.5 b sigmoid(0.5 b x), x = err_w - err_l: equal and opposite
    x = (err_w - err_l).detach()
    torch.testing.assert_close(err_w.grad, 25.0 * torch.sigmoid(25.0 * x))
    torch.testing.assert_close(err_l.grad, -err_w.grad)


# ----------------------------------------------------------------------------- RankDPO

# Row 0: phi = [1, 3, 2] -> ranks tau = [3, 1, 2]; G = 2^phi - 1 = [1, 7, 3];
#        1/D(tau) = 1/log2(1 + tau) = [1/2, 1, 1/log2 3].
#        Ordered pairs (i preferred over j):
#          (1, 0): Delta = |7 - 1| * |1 - 1/2|           = 3
#          (1, 2): Delta = |7 - 3| * |1 - 1/log2 3|       = 4 (1 - 1/log2 3)
#          (2, 0): Delta = |3 - 1| * |1/log2 3 - 1/2|     = 2 (1/log2 3 - 1/2)
#        s = err - ref = [0.05, -0.05, 0.00], beta = 10:
#          (1, 0): -beta (s1 - s0) = 1.0;  (1, 2): 0.5;  (2, 0): 0.5
# Row 1: phi = [2, 2, 0] -> tie between 0 and 1 broken by index: tau = [1, 2, 3];
#        G = [3, 3, 0]; 1/D = [1, 1/log2 3, 1/2]. (0, 1) is no pair (equal phi).
#          (0, 2): Delta = 3 * (1 - 1/2)          = 1.5
#          (1, 2): Delta = 3 * (1/log2 3 - 1/2)
#        s = [0.0, -0.1, 0.1]: (0, 2): -beta (s0 - s2) = 1.0;  (1, 2): 2.0
PHI = t([1.0, 3.0, 2.0], [2.0, 2.0, 0.0])
ERR = t([0.30, 0.10, 0.20], [0.20, 0.10, 0.30])
REF = t([0.25, 0.15, 0.20], [0.20, 0.20, 0.20])
D10, D12, D20 = 3.0, 4.0 * (1.0 - INV_LOG2_3), 2.0 * (INV_LOG2_3 - 0.5)
E02, E12 = 1.5, 3.0 * (INV_LOG2_3 - 0.5)


def test_rank_dpo_weights_hand_worked():
    w = L.pairwise_dpo_weights(PHI, "dcg")
    expected = t(
        [[0.0, 0.0, 0.0], [D10, 0.0, D12], [D20, 0.0, 0.0]],
        [[0.0, 0.0, E02], [0.0, 0.0, E12], [0.0, 0.0, 0.0]],
    )
    torch.testing.assert_close(w, expected, rtol=0, atol=1e-12)
    gain = L.pairwise_dpo_weights(PHI, "gain")
    expected_gain = t(
        [[0.0, 0.0, 0.0], [6.0, 0.0, 4.0], [2.0, 0.0, 0.0]],
        [[0.0, 0.0, 3.0], [0.0, 0.0, 3.0], [0.0, 0.0, 0.0]],
    )
    torch.testing.assert_close(gain, expected_gain, rtol=0, atol=1e-12)
    uniform = L.pairwise_dpo_weights(PHI, "uniform")
    expected_uniform = t(
        [[0.0, 0.0, 0.0], [1.0, 0.0, 1.0], [1.0, 0.0, 0.0]],
        [[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]],
    )
    assert torch.equal(uniform, expected_uniform)


def test_rank_dpo_loss_hand_worked():
    loss = L.rank_dpo_loss(ERR, REF, PHI, beta=10.0)
    assert loss.shape == (2,)
    row0 = D10 * nls(1.0) + D12 * nls(0.5) + D20 * nls(0.5)
    row1 = E02 * nls(1.0) + E12 * nls(2.0)
    torch.testing.assert_close(loss, t(row0, row1), rtol=1e-10, atol=1e-12)
    # the ablations go through the same code path with other weights
    uni = L.rank_dpo_loss(ERR, REF, PHI, beta=10.0, weights="uniform")
    torch.testing.assert_close(uni, t(nls(1.0) + 2 * nls(0.5), nls(1.0) + nls(2.0)), rtol=1e-10, atol=1e-12)
    gain = L.rank_dpo_loss(ERR, REF, PHI, beta=10.0, weights="gain")
    torch.testing.assert_close(
        gain, t(6 * nls(1.0) + 4 * nls(0.5) + 2 * nls(0.5), 3 * nls(1.0) + 3 * nls(2.0)), rtol=1e-10, atol=1e-12
    )
    # a precomputed weight tensor gives the same result as the kind name
    w = L.pairwise_dpo_weights(PHI, "dcg")
    torch.testing.assert_close(L.rank_dpo_loss(ERR, REF, PHI, 10.0, weights=w), loss)


def test_rank_dpo_rows_are_independent():
    """Vectorised over B: each row's loss equals the loss of that row alone."""
    full = L.rank_dpo_loss(ERR, REF, PHI, beta=10.0)
    for b in range(2):
        one = L.rank_dpo_loss(ERR[b : b + 1], REF[b : b + 1], PHI[b : b + 1], beta=10.0)
        torch.testing.assert_close(one, full[b : b + 1])


def test_rank_positions_ties_follow_index_order():
    assert L.rank_positions(t([1.0, 3.0, 3.0, 0.0])).tolist() == [[3, 1, 2, 4]]
    assert L.rank_positions(t([5.0, 5.0, 5.0])).tolist() == [[1, 2, 3]]
    assert L.rank_positions(torch.tensor([[0, 2, 2, 2, 1]])).tolist() == [[5, 1, 2, 3, 4]]


def test_tie_break_sets_the_discounts():
    # phi = [0, 2, 2]: tau = [3, 1, 2] (index 1 before index 2), G = [0, 3, 3]
    #   (1, 0): |3 - 0| * |1 - 1/2| = 1.5 ;  (2, 0): |3 - 0| * |1/log2 3 - 1/2|
    # The other tie order would swap these two weights.
    w = L.pairwise_dpo_weights(t([0.0, 2.0, 2.0]), "dcg")[0]
    assert w[1, 0].item() == pytest.approx(1.5, abs=1e-12)
    assert w[2, 0].item() == pytest.approx(3.0 * (INV_LOG2_3 - 0.5), abs=1e-12)
    assert w[1, 2].item() == 0.0 and w[2, 1].item() == 0.0  # equal phi: no pair


@pytest.mark.parametrize("kind", L.WEIGHT_KINDS)
def test_equal_phi_gives_no_pair(kind):
    phi = torch.full((3, 4), 1.5, dtype=torch.float64)
    assert torch.equal(L.pairwise_dpo_weights(phi, kind), torch.zeros(3, 4, 4, dtype=torch.float64))
    err = torch.rand(3, 4, dtype=torch.float64, requires_grad=True)
    loss = L.rank_dpo_loss(err, torch.rand(3, 4, dtype=torch.float64), phi, beta=7.0, weights=kind)
    assert torch.equal(loss.detach(), torch.zeros(3, dtype=torch.float64))
    loss.sum().backward()
    assert torch.equal(err.grad, torch.zeros_like(err))
    # and the tied pair contributes nothing when mixed with untied ones:
    # phi = [1, 1, 0] with uniform weights has exactly the two pairs (0, 2) and (1, 2)
    uni = L.pairwise_dpo_weights(t([1.0, 1.0, 0.0]), "uniform")
    assert uni.sum().item() == 2.0 and uni[0, 0, 1].item() == 0.0 and uni[0, 1, 0].item() == 0.0


def test_k2_rank_dpo_is_weighted_pairwise_dpo_at_twice_beta():
    """K = 2: rank_dpo_loss(beta) == Delta_wl * diffusion_dpo_loss(2 * beta), with
    Delta_wl = (2^phi_w - 2^phi_l) * (1/D(1) - 1/D(2)) = (2^phi_w - 2^phi_l) * (1 - 1/log2 3)."""
    g = torch.Generator().manual_seed(3)
    err = 0.1 + 0.01 * torch.rand(6, 2, generator=g, dtype=torch.float64)
    ref = 0.1 + 0.01 * torch.rand(6, 2, generator=g, dtype=torch.float64)
    phi = t([0.2, 0.9], [1.5, 0.1], [3.0, 2.0], [0.0, 1.0], [0.7, 0.6], [2.0, 2.5])
    beta = 400.0
    w_idx = phi.argmax(dim=1)
    l_idx = 1 - w_idx
    rows = torch.arange(6)
    dpo = L.diffusion_dpo_loss(err[rows, w_idx], err[rows, l_idx], ref[rows, w_idx], ref[rows, l_idx], 2 * beta)
    delta = t(*[(2 ** max(p) - 2 ** min(p)) * (1.0 - INV_LOG2_3) for p in phi.tolist()])
    gain = t(*[2 ** max(p) - 2 ** min(p) for p in phi.tolist()])
    torch.testing.assert_close(L.rank_dpo_loss(err, ref, phi, beta), delta * dpo)
    torch.testing.assert_close(L.rank_dpo_loss(err, ref, phi, beta, weights="gain"), gain * dpo)
    torch.testing.assert_close(L.rank_dpo_loss(err, ref, phi, beta, weights="uniform"), dpo)


@pytest.mark.parametrize("kind", L.WEIGHT_KINDS)
def test_rank_policy_equals_reference_gives_log2_times_weights(kind):
    err = torch.rand(2, 4, dtype=torch.float64)
    phi = t([0.0, 1.0, 2.0, 3.0], [1.0, 0.5, 1.0, 0.0])
    loss = L.rank_dpo_loss(err, err.clone(), phi, beta=123.0, weights=kind)
    w = L.pairwise_dpo_weights(phi, kind)
    torch.testing.assert_close(loss, LOG2 * w.sum(dim=(-1, -2)), rtol=1e-12, atol=0)
    if kind == "uniform":
        # row 0: all 4 distinct -> 6 pairs; row 1: one tie (1.0, 1.0) -> 5 pairs
        torch.testing.assert_close(loss, t(6 * LOG2, 5 * LOG2), rtol=1e-12, atol=0)


def test_rank_gradient_pushes_best_down_and_worst_up():
    err = torch.full((1, 3), 0.2, dtype=torch.float64, requires_grad=True)
    phi = t([0.5, 2.0, 1.0])  # best is index 1, worst is index 0
    L.rank_dpo_loss(err, err.detach().clone(), phi, beta=10.0).sum().backward()
    assert err.grad[0, 1] > 0 and err.grad[0, 0] < 0
    # at s = 0 each pair (i, j) adds W_ij * beta / 2 to dL/ds_i and subtracts it from dL/ds_j
    w = L.pairwise_dpo_weights(phi)[0]
    expected = 5.0 * (w.sum(dim=1) - w.sum(dim=0))
    torch.testing.assert_close(err.grad[0], expected)


def test_rank_pair_accuracy_hand_worked():
    # row 0 pairs: (1,0): s1=-0.05 < s0=0.05 right; (1,2): -0.05 < 0 right; (2,0): 0 < 0.05 right
    # row 1 pairs: (0,2): 0 < 0.1 right; (1,2): -0.1 < 0.1 right  -> 5/5
    assert L.rank_pair_accuracy(ERR, REF, PHI).item() == 1.0
    # reversing the preferences: the same 5 pairs, now every one wrong
    assert L.rank_pair_accuracy(ERR, REF, -PHI).item() == 0.0


# ----------------------------------------------------------------------------- BalancedDPO, SFT


def test_balanced_dpo_is_vote_weighted_dpo():
    # same pairs as the Diffusion-DPO hand example; votes 3-0 and 2-1 of 3 metrics
    vote = t(1.0, 1.0 / 3.0)
    loss = L.balanced_dpo_loss(ERR_W, ERR_L, REF_W, REF_L, 100.0, vote_weight=vote)
    torch.testing.assert_close(loss, t(nls(1.0), nls(-0.5) / 3.0), rtol=0, atol=1e-12)
    unweighted = L.balanced_dpo_loss(ERR_W, ERR_L, REF_W, REF_L, 100.0)
    torch.testing.assert_close(unweighted, L.diffusion_dpo_loss(ERR_W, ERR_L, REF_W, REF_L, 100.0), rtol=0, atol=0)


def test_sft_loss():
    err = t(0.1, 0.3)
    assert torch.equal(L.sft_loss(err), err)
    torch.testing.assert_close(L.sft_loss(t([0.1, 0.3], [0.2, 0.6])), t(0.2, 0.4), rtol=0, atol=1e-15)


# ----------------------------------------------------------------------------- gradient accumulation


class TinyDenoiser(torch.nn.Module):
    """pred = x * scale + bias: enough parameters to make err depend on them."""

    def __init__(self, dim):
        super().__init__()
        g = torch.Generator().manual_seed(4)
        self.scale = torch.nn.Parameter(torch.randn(dim, generator=g, dtype=torch.float64))
        self.bias = torch.nn.Parameter(torch.randn(dim, generator=g, dtype=torch.float64))

    def err(self, x, target):  # x, target: [..., D] -> [...]
        return ((x * self.scale + self.bias - target) ** 2).mean(dim=-1)


def _dpo(err, ref, phi, vote):
    return L.diffusion_dpo_loss(err[:, 0], err[:, 1], ref[:, 0], ref[:, 1], 20.0)


def _rank(err, ref, phi, vote):
    return L.rank_dpo_loss(err, ref, phi, 5.0)


def _rank_uniform(err, ref, phi, vote):
    return L.rank_dpo_loss(err, ref, phi, 5.0, weights="uniform")


def _balanced(err, ref, phi, vote):
    return L.balanced_dpo_loss(err[:, 0], err[:, 1], ref[:, 0], ref[:, 1], 20.0, vote_weight=vote)


def _sft(err, ref, phi, vote):
    return L.sft_loss(err)


@pytest.mark.parametrize("loss_fn", [_dpo, _rank, _rank_uniform, _balanced, _sft])
def test_gradient_accumulation_matches_full_batch(loss_fn):
    B, K, D = 7, 3, 5
    g = torch.Generator().manual_seed(5)
    x = torch.randn(B, K, D, generator=g, dtype=torch.float64)
    target = torch.randn(B, K, D, generator=g, dtype=torch.float64)
    phi = torch.randint(0, 3, (B, K), generator=g).to(torch.float64)
    vote = torch.rand(B, generator=g, dtype=torch.float64)
    model = TinyDenoiser(D)
    with torch.no_grad():
        ref = ((x * 0.9 - target) ** 2).mean(dim=-1)  # a fixed reference model's errors

    loss_fn(model.err(x, target), ref, phi, vote).mean().backward()
    full = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    # unequal micro-batches: each micro mean is scaled by its share n_i / B of the batch
    start = 0
    for n in (3, 1, 3):
        sl = slice(start, start + n)
        micro = loss_fn(model.err(x[sl], target[sl]), ref[sl], phi[sl], vote[sl]).mean()
        (micro * n / B).backward()
        start += n
    assert start == B
    for p, g_full in zip(model.parameters(), full):
        assert g_full.abs().sum() > 0
        torch.testing.assert_close(p.grad, g_full, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- bad inputs

E2 = torch.rand(2, 3, dtype=torch.float64)
P2 = t([1.0, 0.0, 2.0], [0.0, 0.0, 1.0])
V = torch.rand(4, dtype=torch.float64)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: L.diffusion_dpo_loss(V, V, V, V[:3], 1.0), "shape mismatch"),
        (lambda: L.diffusion_dpo_loss(V, V, V, V, 0.0), "beta"),
        (lambda: L.diffusion_dpo_loss(V, V, V, V, -5.0), "beta"),
        (lambda: L.diffusion_dpo_loss(V, V, V, V, float("nan")), "beta"),
        (lambda: L.diffusion_dpo_loss(V, V, V, V, float("inf")), "beta"),
        (lambda: L.diffusion_dpo_loss(V, V, V, V, "big"), "beta"),
        (lambda: L.diffusion_dpo_loss(V, V, V, V.tolist(), 1.0), "torch.Tensor"),
        (lambda: L.diffusion_dpo_loss(V[0], V[0], V[0], V[0], 1.0), "batch dimension"),
        (lambda: L.dpo_metrics(V, V[:2], V, V, 1.0), "shape mismatch"),
        (lambda: L.rank_dpo_loss(E2, E2, P2, 0.0), "beta"),
        (lambda: L.rank_dpo_loss(E2, E2[:, :2], P2, 1.0), "shape mismatch"),
        (lambda: L.rank_dpo_loss(E2, E2, P2[:, :2], 1.0), "shape mismatch"),
        (lambda: L.rank_dpo_loss(E2[:, :1], E2[:, :1], P2[:, :1], 1.0), "K >= 2"),
        (lambda: L.rank_dpo_loss(E2[0], E2[0], P2[0], 1.0), r"\[B, K\]"),
        (lambda: L.rank_dpo_loss(E2, E2, t([1.0, float("nan"), 0.0], [0.0, 1.0, 2.0]), 1.0), "finite"),
        (lambda: L.rank_dpo_loss(E2, E2, t([1.0, float("inf"), 0.0], [0.0, 1.0, 2.0]), 1.0), "finite"),
        (lambda: L.rank_dpo_loss(E2, E2, P2, 1.0, weights="ndcg"), "kind"),
        (lambda: L.rank_dpo_loss(E2, E2, P2, 1.0, weights=torch.ones(2, 3)), "weights"),
        (lambda: L.pairwise_dpo_weights(t([1.0]), "dcg"), "K >= 2"),
        (lambda: L.pairwise_dpo_weights(t([1.0, float("-inf")]), "gain"), "finite"),
        (lambda: L.rank_positions(t([float("nan"), 1.0])), "finite"),
        (lambda: L.balanced_dpo_loss(V, V, V, V, 1.0, vote_weight=V[:2]), "vote_weight"),
        (lambda: L.balanced_dpo_loss(V, V, V, V, 1.0, vote_weight=-V), "vote_weight"),
        (lambda: L.balanced_dpo_loss(V, V, V, V, 1.0, vote_weight=V * float("nan")), "vote_weight"),
        (lambda: L.sft_loss(torch.rand(2, 3, 4)), r"\[B\] or \[B, K\]"),
    ],
)
def test_bad_inputs_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
