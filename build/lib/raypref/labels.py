"""Preference labels from reward scores, for one prompt.

Every function here takes the scores of the K images generated for ONE prompt, as a
``[n_metrics, K]`` array (higher = better for every metric), and is pure numpy.

* Syn-Pic (RankDPO, arXiv 2410.18013, Algorithm 1): ``synpic_phi`` counts, over metrics and
  ordered pairs, how often each image wins; ``ranking`` turns that into ranks.
* Consensus vote (BalancedDPO, arXiv 2503.12575): each metric votes on each pair, and the pair
  is labelled by majority vote in preference space (``consensus_pairs``).
* Baselines: ``mixed_reward`` (weighted sum of z-normalised rewards, "reward mixing") and
  ``best_worst_pair`` / ``pairs_from_metric`` (single-reward DPO).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "check_scores",
    "win_counts",
    "synpic_phi",
    "ranking",
    "consensus_pairs",
    "mixed_reward",
    "best_worst_pair",
    "pairs_from_metric",
]


def check_scores(scores) -> np.ndarray:
    """Validate and return ``scores`` as float64 ``[n_metrics, K]``.

    Raises ValueError for a wrong rank, no metric, K < 2, or a NaN/inf entry (naming the metric
    index and the image index of the first bad entry).
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"scores must be [n_metrics, K], got shape {s.shape}")
    n, k = s.shape
    if n < 1:
        raise ValueError(f"scores must hold at least one metric, got shape {s.shape}")
    if k < 2:
        raise ValueError(f"need K >= 2 images per prompt to form a preference, got K={k}")
    bad = np.argwhere(~np.isfinite(s))
    if len(bad):
        m, i = (int(x) for x in bad[0])
        raise ValueError(f"non-finite score {s[m, i]} for metric {m}, image {i}")
    return s


def _check_1d(score) -> np.ndarray:
    s = np.asarray(score, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"score must be 1-D [K], got shape {s.shape}")
    return check_scores(s[None, :])[0]


def win_counts(scores) -> np.ndarray:
    """Pairwise metric votes.

    Args:
        scores: ``[n_metrics, K]``.
    Returns:
        int64 ``[K, K]``: entry ``(i, j)`` is the number of metrics on which image i scores strictly
        higher than image j (equal scores vote for neither; the diagonal is 0).
    """
    s = check_scores(scores)
    return (s[:, :, None] > s[:, None, :]).sum(axis=0).astype(np.int64)


def synpic_phi(scores) -> np.ndarray:
    """Syn-Pic preference probability of each image (RankDPO Algorithm 1).

    ``phi_i = C_i / (n (K - 1))`` where ``C_i`` counts the (metric, other image) pairs in which image
    i scores strictly higher. ``phi_i`` is in [0, 1]: the chance that image i beats a random other
    image under a random metric.

    Args:
        scores: ``[n_metrics, K]``.
    Returns:
        float64 ``[K]``.
    """
    s = check_scores(scores)
    n, k = s.shape
    c = win_counts(s).sum(axis=1)
    return c / (n * (k - 1))


def ranking(phi) -> np.ndarray:
    """Ranks (1 = best) by ``phi`` descending; ties keep index order (stable).

    Args:
        phi: ``[K]``.
    Returns:
        int64 ``[K]``: ``rank[i]`` of image i, a permutation of 1..K.
    """
    p = _check_1d(phi)
    order = np.argsort(-p, kind="stable")
    ranks = np.empty(len(p), dtype=np.int64)
    ranks[order] = np.arange(1, len(p) + 1)
    return ranks


def consensus_pairs(scores) -> list[tuple[int, int, int, int]]:
    """Majority-vote preference pairs (BalancedDPO-style aggregation in preference space).

    Each metric votes for the strictly higher-scored image of a pair (a tie votes for neither). A
    pair is kept when one image has strictly more votes; tied pairs are dropped.

    Args:
        scores: ``[n_metrics, K]``.
    Returns:
        list of ``(winner, loser, votes_for_winner, votes_for_loser)``, each unordered pair at most
        once, in order of ``(min(i, j), max(i, j))``.
    """
    v = win_counts(scores)
    k = v.shape[0]
    pairs = []
    for i in range(k):
        for j in range(i + 1, k):
            if v[i, j] > v[j, i]:
                pairs.append((i, j, int(v[i, j]), int(v[j, i])))
            elif v[j, i] > v[i, j]:
                pairs.append((j, i, int(v[j, i]), int(v[i, j])))
    return pairs


def mixed_reward(scores, weights) -> np.ndarray:
    """Reward-mixing baseline: weighted sum of per-metric z-normalised rewards.

    Each metric is z-normalised over the K images of this prompt (population std); a metric whose
    K scores are all equal carries no preference and contributes 0.

    Args:
        scores: ``[n_metrics, K]``.
        weights: ``[n_metrics]``, finite.
    Returns:
        float64 ``[K]``.
    """
    s = check_scores(scores)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (s.shape[0],):
        raise ValueError(f"weights must have shape ({s.shape[0]},), got {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError(f"weights must be finite, got {w.tolist()}")
    mean = s.mean(axis=1, keepdims=True)
    std = s.std(axis=1, keepdims=True)
    safe = np.where(std > 0, std, 1.0)
    z = np.where(std > 0, (s - mean) / safe, 0.0)
    return w @ z


def best_worst_pair(score) -> tuple[int, int] | None:
    """Single-reward DPO label: (best image, worst image) under one metric.

    Ties for best/worst go to the lowest index. Returns None when all K scores are equal (the
    metric expresses no preference).

    Args:
        score: ``[K]``.
    """
    s = _check_1d(score)
    best, worst = int(np.argmax(s)), int(np.argmin(s))
    if s[best] == s[worst]:
        return None
    return best, worst


def pairs_from_metric(score) -> list[tuple[int, int]]:
    """All strictly ordered ``(winner, loser)`` pairs under one metric, in ``(min, max)`` order.

    Args:
        score: ``[K]``.
    """
    s = _check_1d(score)
    k = len(s)
    out = []
    for i in range(k):
        for j in range(i + 1, k):
            if s[i] > s[j]:
                out.append((i, j))
            elif s[j] > s[i]:
                out.append((j, i))
    return out
