"""Tests for raypref.labels: hand-worked examples plus properties checked against brute force."""

import itertools
import math

import numpy as np
import pytest

from raypref.labels import (
    best_worst_pair,
    consensus_pairs,
    mixed_reward,
    pairs_from_metric,
    ranking,
    synpic_phi,
    win_counts,
)

# Example A: n = 2 metrics, K = 3 images.
#   metric 0: [3, 1, 2]  -> 0>1, 0>2, 2>1          wins: img0 2, img1 0, img2 1
#   metric 1: [1, 1, 5]  -> 2>0, 2>1, (0,1) tie     wins: img0 0, img1 0, img2 2
#   C = [2, 0, 3], n (K - 1) = 4  -> phi = [0.5, 0.0, 0.75]
#   strict comparisons: 3 (metric 0) + 2 (metric 1) = 5 = 2 + 0 + 3
SCORES_A = [[3.0, 1.0, 2.0], [1.0, 1.0, 5.0]]

# Example B: n = 3 metrics, K = 4 images.
#   metric 0: [4, 3, 2, 1]  wins: img0 3, img1 2, img2 1, img3 0
#   metric 1: [1, 2, 3, 4]  wins: img0 0, img1 1, img2 2, img3 3
#   metric 2: [2, 2, 1, 3]  wins: img0 1 (over 2), img1 1 (over 2), img2 0, img3 3; (0,1) tie
#   C = [4, 4, 3, 6], n (K - 1) = 9 -> phi = [4/9, 4/9, 3/9, 6/9]
#   strict comparisons: 6 + 6 + 5 = 17 = 4 + 4 + 3 + 6
SCORES_B = [[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 1.0, 3.0]]


def test_synpic_phi_hand_worked():
    np.testing.assert_allclose(synpic_phi(SCORES_A), [0.5, 0.0, 0.75])
    np.testing.assert_allclose(synpic_phi(SCORES_B), [4 / 9, 4 / 9, 3 / 9, 6 / 9])


def test_synpic_phi_all_tied_is_zero():
    # Nobody strictly beats anybody: C = 0 for every image.
    np.testing.assert_array_equal(synpic_phi([[2.0, 2.0, 2.0], [0.0, 0.0, 0.0]]), [0.0, 0.0, 0.0])


def test_win_counts_hand_worked():
    # Example A, entry (i, j) = #metrics with s_i > s_j:
    #   (0,1): m0 yes, m1 tie -> 1; (1,0): 0
    #   (0,2): m0 yes -> 1;        (2,0): m1 yes -> 1
    #   (1,2): 0;                  (2,1): m0 and m1 -> 2
    np.testing.assert_array_equal(win_counts(SCORES_A), [[0, 1, 1], [0, 0, 0], [1, 2, 0]])


def test_ranking_hand_worked_with_ties():
    # A: phi = [0.5, 0, 0.75] -> img2 first, img0 second, img1 third.
    np.testing.assert_array_equal(ranking(synpic_phi(SCORES_A)), [2, 3, 1])
    # B: phi = [4/9, 4/9, 3/9, 6/9] -> img3 1st; img0 and img1 tie -> index order: img0 2nd, img1 3rd.
    np.testing.assert_array_equal(ranking(synpic_phi(SCORES_B)), [2, 3, 4, 1])
    np.testing.assert_array_equal(ranking([0.2, 0.2, 0.2]), [1, 2, 3])
    np.testing.assert_array_equal(ranking([0.1, 0.9]), [2, 1])


def test_consensus_pairs_hand_worked():
    # A: (0,1): 1 vote vs 0 (m1 tie) -> (0,1,1,0)
    #    (0,2): m0 for 0, m1 for 2 -> 1 vs 1 -> dropped
    #    (1,2): m0 and m1 for 2 -> (2,1,2,0)
    assert consensus_pairs(SCORES_A) == [(0, 1, 1, 0), (2, 1, 2, 0)]
    # B: (0,1): m0 for 0, m1 for 1, m2 tie -> 1 vs 1 -> dropped
    #    (0,2): m0, m2 for 0; m1 for 2 -> (0,2,2,1)
    #    (0,3): m0 for 0; m1, m2 for 3 -> (3,0,2,1)
    #    (1,2): m0, m2 for 1; m1 for 2 -> (1,2,2,1)
    #    (1,3): m0 for 1; m1, m2 for 3 -> (3,1,2,1)
    #    (2,3): m0 for 2; m1, m2 for 3 -> (3,2,2,1)
    assert consensus_pairs(SCORES_B) == [(0, 2, 2, 1), (3, 0, 2, 1), (1, 2, 2, 1), (3, 1, 2, 1), (3, 2, 2, 1)]


def test_consensus_pairs_all_tied_is_empty():
    assert consensus_pairs([[1.0, 1.0, 1.0]]) == []


def test_mixed_reward_hand_worked():
    # A, metric 0: [3,1,2], mean 2, pop. std sqrt(2/3) -> z = [1, -1, 0] / sqrt(2/3)
    #    metric 1: [1,1,5], mean 7/3, deviations [-4/3, -4/3, 8/3], var 32/9, std 4*sqrt(2)/3
    #              -> z = [-1/sqrt2, -1/sqrt2, 2/sqrt2]
    r = math.sqrt(2 / 3)
    z0 = np.array([1 / r, -1 / r, 0.0])
    z1 = np.array([-1, -1, 2]) / math.sqrt(2)
    np.testing.assert_allclose(mixed_reward(SCORES_A, [1.0, 1.0]), z0 + z1)
    np.testing.assert_allclose(mixed_reward(SCORES_A, [0.25, 2.0]), 0.25 * z0 + 2.0 * z1)
    # z0 + z1 = [0.5176, -1.9319, 1.4142]: img2 best, img1 worst.
    np.testing.assert_allclose(mixed_reward(SCORES_A, [1.0, 1.0]), [0.51764, -1.93185, 1.41421], atol=1e-5)


def test_mixed_reward_zero_spread_metric_contributes_zero():
    # metric 1 is constant -> contributes 0 whatever its weight; metric 0 z = [-1, 0, 1]/sqrt(2/3).
    r = math.sqrt(2 / 3)
    out = mixed_reward([[1.0, 2.0, 3.0], [4.0, 4.0, 4.0]], [2.0, 5.0])
    np.testing.assert_allclose(out, 2.0 * np.array([-1 / r, 0.0, 1 / r]))
    np.testing.assert_array_equal(mixed_reward([[7.0, 7.0]], [1.0]), [0.0, 0.0])


def test_best_worst_and_metric_pairs():
    assert best_worst_pair([0.3, 0.9, 0.1, 0.5]) == (1, 2)
    # Ties for best and worst go to the lowest index.
    assert best_worst_pair([2.0, 5.0, 5.0, 1.0, 1.0]) == (1, 3)
    assert best_worst_pair([4.0, 4.0]) is None
    # [3, 1, 3]: (0,1) -> 0 wins; (0,2) tie, dropped; (1,2) -> 2 wins.
    assert pairs_from_metric([3.0, 1.0, 3.0]) == [(0, 1), (2, 1)]


# ---------------------------------------------------------------- properties (random, seeded)


def _random_scores(rng, n, k, ties=True):
    s = rng.normal(size=(n, k))
    if ties:  # round to a coarse grid so ties actually happen
        s = np.round(s * 2) / 2
    return s


def _strict_comparisons(s):
    # Brute force: number of (metric, unordered pair) with a strict winner.
    n, k = s.shape
    return sum(1 for m in range(n) for i, j in itertools.combinations(range(k), 2) if s[m, i] != s[m, j])


@pytest.mark.parametrize("seed", range(20))
def test_phi_total_equals_strict_comparisons(seed):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(1, 5)), int(rng.integers(2, 7))
    s = _random_scores(rng, n, k)
    phi = synpic_phi(s)
    assert np.all((phi >= 0) & (phi <= 1))
    assert phi.sum() * n * (k - 1) == pytest.approx(_strict_comparisons(s))


@pytest.mark.parametrize("seed", range(10))
def test_consensus_matches_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    n, k = int(rng.integers(1, 6)), int(rng.integers(2, 6))
    s = _random_scores(rng, n, k)
    expected = []
    for i, j in itertools.combinations(range(k), 2):
        vi = sum(1 for m in range(n) if s[m, i] > s[m, j])
        vj = sum(1 for m in range(n) if s[m, j] > s[m, i])
        if vi > vj:
            expected.append((i, j, vi, vj))
        elif vj > vi:
            expected.append((j, i, vj, vi))
    assert consensus_pairs(s) == expected
    # Each unordered pair at most once, winner strictly ahead.
    keys = [frozenset((a, b)) for a, b, _, _ in consensus_pairs(s)]
    assert len(keys) == len(set(keys))
    assert all(va > vb for _, _, va, vb in consensus_pairs(s))


@pytest.mark.parametrize("seed", range(10))
def test_reversing_a_metric_reverses_its_votes(seed):
    rng = np.random.default_rng(200 + seed)
    s = _random_scores(rng, 3, 5)
    flipped = s.copy()
    flipped[1] = -flipped[1]
    np.testing.assert_array_equal(win_counts(flipped[1:2]), win_counts(s[1:2]).T)
    # Other metrics' votes are unchanged.
    np.testing.assert_array_equal(
        win_counts(flipped) - win_counts(flipped[1:2]), win_counts(s) - win_counts(s[1:2])
    )
    # Reversing every metric swaps every consensus winner and loser.
    swapped = sorted((b, a, va, vb) for a, b, va, vb in consensus_pairs(s))
    assert sorted(consensus_pairs(-s)) == swapped


@pytest.mark.parametrize("seed", range(10))
def test_single_metric_consistency(seed):
    rng = np.random.default_rng(300 + seed)
    s = _random_scores(rng, 1, 6)
    assert [(a, b) for a, b, _, _ in consensus_pairs(s)] == pairs_from_metric(s[0])
    # With one metric and no ties, phi_i = (#images i beats)/(K-1) gives the sort order of s.
    u = rng.permutation(6).astype(float)[None]
    np.testing.assert_array_equal(ranking(synpic_phi(u)), 6 - u[0].astype(int))


@pytest.mark.parametrize("seed", range(10))
def test_phi_invariant_to_monotone_transforms_and_equivariant_to_permutation(seed):
    rng = np.random.default_rng(400 + seed)
    s = _random_scores(rng, 3, 5)
    t = np.stack([np.exp(s[0]), 3 * s[1] - 7, s[2] ** 3])  # strictly increasing per metric
    np.testing.assert_allclose(synpic_phi(t), synpic_phi(s))
    perm = rng.permutation(5)
    np.testing.assert_allclose(synpic_phi(s[:, perm]), synpic_phi(s)[perm])


@pytest.mark.parametrize("seed", range(10))
def test_mixed_reward_affine_invariance(seed):
    rng = np.random.default_rng(500 + seed)
    s = rng.normal(size=(3, 4))
    w = rng.uniform(0.1, 2.0, size=3)
    t = s * np.array([[2.0], [0.5], [10.0]]) + np.array([[1.0], [-3.0], [100.0]])
    np.testing.assert_allclose(mixed_reward(t, w), mixed_reward(s, w), atol=1e-9)
    # z-scores sum to 0 over the K images, so the mixed reward does too.
    assert mixed_reward(s, w).sum() == pytest.approx(0.0, abs=1e-9)


def test_ranking_is_a_permutation():
    rng = np.random.default_rng(7)
    r = ranking(rng.integers(0, 3, size=9).astype(float))
    assert sorted(r.tolist()) == list(range(1, 10))


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("fn", [synpic_phi, consensus_pairs, lambda s: mixed_reward(s, [1, 1])])
def test_non_finite_scores_name_metric_and_image(fn, bad):
    s = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, bad]])
    with pytest.raises(ValueError, match=r"metric 1, image 2"):
        fn(s)


def test_non_finite_1d_score_names_image():
    with pytest.raises(ValueError, match=r"image 1"):
        best_worst_pair([0.0, np.nan, 1.0])


@pytest.mark.parametrize("fn", [synpic_phi, consensus_pairs, lambda s: mixed_reward(s, [1])])
def test_k_below_two_rejected(fn):
    with pytest.raises(ValueError, match="K >= 2"):
        fn([[1.0]])


def test_bad_shapes_rejected():
    with pytest.raises(ValueError, match="n_metrics, K"):
        synpic_phi([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="weights"):
        mixed_reward(SCORES_A, [1.0])
    with pytest.raises(ValueError, match="weights"):
        mixed_reward(SCORES_A, [1.0, np.nan])
    with pytest.raises(ValueError, match="1-D"):
        ranking([[0.1, 0.2]])
    with pytest.raises(ValueError, match="K >= 2"):
        best_worst_pair([1.0])


# ----------------------------------------------------------------------------- relabel (ablations)
def _row(scores):
    from raypref.prefdata import make_row

    k = len(scores[0])
    img = np.zeros((4, 4, 3), np.uint8)
    phi = synpic_phi(scores)
    return make_row("a circle", "single_object", [img] * k, [f"g{i}" for i in range(k)], list(range(k)),
                    ["faithfulness", "aesthetic"], scores, phi, ranking(phi), consensus_pairs(scores))


def test_relabel_hand_worked():
    from raypref.prefdata import relabel

    # The two metrics disagree completely: Syn-Pic ties everything and keeps no consensus pair.
    row = _row([[3, 1, 2], [1, 3, 2]])
    assert row["phi"] == [0.5, 0.5, 0.5] and row["pairs"] == []
    assert relabel(row, "synpic") == row
    one = relabel(row, "reward:faithfulness")  # wins 2, 0, 1 of K - 1 = 2
    assert one["phi"] == [1.0, 0.0, 0.5] and one["ranking"] == [1, 3, 2]
    assert [(p["i"], p["j"], p["votes_i"], p["votes_j"]) for p in one["pairs"]] == [(0, 1, 1, 0), (0, 2, 1, 0),
                                                                                   (2, 1, 1, 0)]
    two = relabel(row, "reward:aesthetic")
    assert two["phi"] == [0.0, 1.0, 0.5]
    # Equal-weight mixing: z-scores cancel exactly, so no image is preferred.
    assert relabel(row, "mixed")["phi"] == [0.0, 0.0, 0.0] and relabel(row, "mixed")["pairs"] == []
    # Weights (2, 1): 2 z0 + z1 = 1.2247 * [1, -1, 0] -> the faithfulness order.
    assert relabel(row, "mixed", weights=[2, 1])["phi"] == [1.0, 0.0, 0.5]
    # Images, raw scores and metric names are untouched.
    assert one["images"] == row["images"] and one["scores"] == row["scores"]


def test_relabel_random_is_a_seeded_permutation_and_errors_are_clear():
    from raypref.prefdata import relabel

    row = _row([[5, 4, 3, 2], [5, 4, 3, 2]])
    a, b = relabel(row, "random", seed=1), relabel(row, "random", seed=1)
    assert a["phi"] == b["phi"]
    assert sorted(a["phi"]) == pytest.approx([0, 1 / 3, 2 / 3, 1])  # a strict order of the 4 images
    assert len(a["pairs"]) == 6
    assert any(relabel(row, "random", seed=s)["phi"] != a["phi"] for s in range(2, 8))
    with pytest.raises(ValueError, match="not 'clip'"):
        relabel(row, "reward:clip")
    with pytest.raises(ValueError, match="unknown labeling 'best'"):
        relabel(row, "best")
