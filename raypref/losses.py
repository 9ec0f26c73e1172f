"""Preference losses for diffusion models, as pure functions of per-sample denoising errors.

Every function here takes ``err``: the per-sample mean squared error between the model's
prediction and its training target (noise, velocity or flow target), i.e.
``F.mse_loss(pred, target, reduction="none").mean(dim=[1, 2, 3])``, and the same quantity
``ref_err`` for the frozen reference model, computed at the *same* noise and timestep.
A lower error means a higher (implicit) likelihood, so every "score" below is
``err - ref_err`` and a preferred image should get the *lower* score.

Losses return one value per prompt, shape ``[B]``; the caller reduces them (usually ``.mean()``),
which keeps weighting and gradient accumulation explicit in the training loop.

This module imports torch only (no diffusers, no ray), so data and eval code can use it freely.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "diffusion_dpo_logits",
    "diffusion_dpo_loss",
    "dpo_metrics",
    "implicit_reward",
    "kl_proxy",
    "rank_positions",
    "pairwise_dpo_weights",
    "rank_dpo_loss",
    "rank_pair_accuracy",
    "balanced_dpo_loss",
    "sft_loss",
    "WEIGHT_KINDS",
]

WEIGHT_KINDS = ("dcg", "gain", "uniform")


# ----------------------------------------------------------------------------- validation


def _check_beta(beta: float) -> float:
    if isinstance(beta, torch.Tensor):
        if beta.numel() != 1:
            raise ValueError(f"beta must be a scalar, got a tensor of shape {tuple(beta.shape)}")
        beta = beta.item()
    if isinstance(beta, bool):
        raise ValueError(f"beta must be a positive finite number, got {beta!r}")
    try:
        value = float(beta)
    except (TypeError, ValueError):
        raise ValueError(f"beta must be a positive finite number, got {beta!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"beta must be a positive finite number, got {beta!r}")
    return value


def _check_tensors(**tensors: torch.Tensor) -> torch.Size:
    """All arguments are tensors of one shape with at least one dim; returns that shape."""
    shape = None
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() == 0:
            raise ValueError(f"{name} must have a batch dimension, got a 0-dim tensor")
        if shape is None:
            shape = t.shape
        elif t.shape != shape:
            shapes = ", ".join(f"{n}={tuple(v.shape)}" for n, v in tensors.items())
            raise ValueError(f"shape mismatch: {shapes} must all be equal")
    return shape


def _check_ranked(err: torch.Tensor, ref_err: torch.Tensor, phi: torch.Tensor) -> None:
    _check_tensors(err=err, ref_err=ref_err, phi=phi)
    if err.dim() != 2:
        raise ValueError(f"err must have shape [B, K], got {tuple(err.shape)}")
    _check_phi(phi)


def _check_phi(phi: torch.Tensor) -> None:
    if not isinstance(phi, torch.Tensor):
        raise ValueError(f"phi must be a torch.Tensor, got {type(phi).__name__}")
    if phi.dim() != 2:
        raise ValueError(f"phi must have shape [B, K], got {tuple(phi.shape)}")
    if phi.shape[1] < 2:
        raise ValueError(f"ranking needs K >= 2 candidates per prompt, got K={phi.shape[1]}")
    if phi.is_floating_point() and not bool(torch.isfinite(phi).all()):
        bad = phi[~torch.isfinite(phi)]
        raise ValueError(f"phi must be finite, got non-finite values {bad.tolist()[:5]}")


# ----------------------------------------------------------------------------- Diffusion-DPO


def diffusion_dpo_logits(
    err_w: torch.Tensor,
    err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Diffusion-DPO logit (implicit reward margin) ``r_w - r_l``, shape ``[B]``.

    ``-0.5 * beta * ((err_w - err_l) - (ref_err_w - ref_err_l))``, with the paper's beta
    (see :func:`diffusion_dpo_loss`). Positive when the policy lowered the winner's error
    relative to the reference more than the loser's. Swapping winner and loser flips its sign.

    Args:
        err_w, err_l: ``[B]`` policy denoising errors of the preferred / rejected image.
        ref_err_w, ref_err_l: ``[B]`` reference-model errors at the same noise and t.
        beta: KL strength, > 0.
    """
    beta = _check_beta(beta)
    _check_tensors(err_w=err_w, err_l=err_l, ref_err_w=ref_err_w, ref_err_l=ref_err_l)
    return -0.5 * beta * ((err_w - err_l) - (ref_err_w - ref_err_l))


def diffusion_dpo_loss(
    err_w: torch.Tensor,
    err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    beta: float,
    label: torch.Tensor | None = None,
) -> torch.Tensor:
    """Diffusion-DPO loss per prompt, shape ``[B]`` (Wallace et al. 2023, arXiv 2311.12908).

    ``loss = -logsigmoid(-0.5 * beta * ((err_w - err_l) - (ref_err_w - ref_err_l)))``

    With ``label`` ``[B]`` (the probability that the first image is preferred; None means 1) it is the
    Bradley-Terry cross-entropy ``-(label * logsigmoid(z) + (1 - label) * logsigmoid(-z))``, z the logit
    above. ``label = 0.5`` is a tie (Pick-a-Pic's ``label_0 = 0.5``): the loss is symmetric in the two
    images, minimal at z = 0, so a tie pulls the implicit reward margin back to zero rather than
    being dropped.

    The winner and loser of a pair must be noised with the same noise and the same t
    (the paper's code repeats one noise / timestep draw for both halves of the batch).

    Beta convention: the paper's. Its official code writes ``scale_term = -0.5 * beta_dpo``
    and uses ``beta_dpo = 5000`` for SD1.5 (the paper's T * omega(lambda_t) factor is folded
    into beta). diffusers' ``examples/research_projects/diffusion_dpo/train_diffusion_dpo.py``
    drops the 0.5 (``-logsigmoid(beta_dpo * (ref_diff - model_diff))``) and uses
    ``beta_dpo = 2500``: the same objective. So ``beta_here = 2 * beta_dpo_diffusers``.

    At policy == reference every prompt's loss is exactly ``log 2``.

    Args:
        err_w, err_l: ``[B]`` policy denoising errors of the preferred / rejected image.
        ref_err_w, ref_err_l: ``[B]`` reference-model errors at the same noise and t.
        beta: KL strength in the paper's convention, > 0.

        label: optional ``[B]`` in [0, 1], the first image's preference probability (0.5: a tie).

    Returns:
        ``[B]`` per-prompt losses; take ``.mean()`` for the batch loss.
    """
    z = diffusion_dpo_logits(err_w, err_l, ref_err_w, ref_err_l, beta)
    if label is None:
        return -F.logsigmoid(z)
    if label.shape != z.shape or bool(((label < 0) | (label > 1)).any()):
        raise ValueError(f"label must be [B] = {list(z.shape)} in [0, 1], got shape {list(label.shape)}")
    return -(label * F.logsigmoid(z) + (1 - label) * F.logsigmoid(-z))


def implicit_reward(err: torch.Tensor, ref_err: torch.Tensor, beta: float) -> torch.Tensor:
    """Diffusion-DPO implicit reward ``r = -0.5 * beta * (err - ref_err)``, same shape as ``err``.

    Paper's beta convention, so ``r_w - r_l`` is exactly :func:`diffusion_dpo_logits`.
    """
    beta = _check_beta(beta)
    _check_tensors(err=err, ref_err=ref_err)
    return -0.5 * beta * (err - ref_err)


def kl_proxy(err: torch.Tensor, ref_err: torch.Tensor) -> torch.Tensor:
    """Mean of ``err - ref_err`` over all elements: a 0-dim tensor.

    A cheap drift monitor, not a KL: it is the (unscaled) implicit log-ratio of the policy to
    the reference on the training images and may be negative. It is 0 at policy == reference
    and grows in magnitude as the policy moves away; a large positive value means the policy
    fits the data worse than the reference did (the known Diffusion-DPO failure mode where
    both winner and loser errors go up).
    """
    _check_tensors(err=err, ref_err=ref_err)
    return (err - ref_err).detach().mean()


@torch.no_grad()
def dpo_metrics(
    err_w: torch.Tensor,
    err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    beta: float,
) -> dict[str, torch.Tensor]:
    """Logging metrics for a Diffusion-DPO batch; every value is a detached 0-dim tensor.

    - ``implicit_acc``: fraction of prompts with ``(err_w - ref_err_w) < (err_l - ref_err_l)``
      (strict: ties count as wrong, as in the paper's code; at policy == reference it is 0).
    - ``margin``: mean of :func:`diffusion_dpo_logits` (``r_w - r_l``, paper's beta).
    - ``reward_w`` / ``reward_l``: mean implicit rewards of winners / losers.
    - ``kl_proxy``: :func:`kl_proxy` over winners and losers together.
    - ``policy_err`` / ``ref_err``: mean raw denoising errors.
    """
    logits = diffusion_dpo_logits(err_w, err_l, ref_err_w, ref_err_l, beta)
    d_w, d_l = err_w - ref_err_w, err_l - ref_err_l
    return {
        "implicit_acc": (d_w < d_l).float().mean(),
        "margin": logits.mean(),
        "reward_w": implicit_reward(err_w, ref_err_w, beta).mean(),
        "reward_l": implicit_reward(err_l, ref_err_l, beta).mean(),
        "kl_proxy": 0.5 * (d_w.mean() + d_l.mean()),
        "policy_err": 0.5 * (err_w.mean() + err_l.mean()),
        "ref_err": 0.5 * (ref_err_w.mean() + ref_err_l.mean()),
    }


# ----------------------------------------------------------------------------- RankDPO


def rank_positions(phi: torch.Tensor) -> torch.Tensor:
    """Rank of each candidate by ``phi`` descending, starting at 1; shape ``[B, K]`` (long).

    Ties keep index order (a stable sort): ``phi = [1, 3, 3, 0]`` gives ``[3, 1, 2, 4]``.
    """
    _check_phi(phi)
    order = torch.argsort(phi, dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    positions = torch.arange(1, phi.shape[1] + 1, device=phi.device).expand_as(order)
    return ranks.scatter_(-1, order, positions)


@torch.no_grad()
def pairwise_dpo_weights(phi: torch.Tensor, kind: str = "dcg") -> torch.Tensor:
    """Pair weights ``W[b, i, j]`` for "i preferred over j", shape ``[B, K, K]``.

    ``W[b, i, j] = 0`` unless ``phi[b, i] > phi[b, j]`` (so equal phi gives no pair and the
    diagonal is 0). For the ordered pairs:

    - ``"dcg"`` (RankDPO, Karthik et al., arXiv 2410.18013):
      ``Delta_ij = |G_i - G_j| * |1/D(tau_i) - 1/D(tau_j)|`` with gains ``G = 2**phi - 1``,
      discounts ``D(tau) = log2(1 + tau)`` and ``tau`` from :func:`rank_positions`
      (ranks from 1, ties in index order), i.e. the change in DCG from swapping i and j.
    - ``"gain"``: ``|G_i - G_j|`` only (ablation: DPO with gain weights, no rank discount).
    - ``"uniform"``: 1 (ablation: plain multi-pair DPO over all ordered pairs).

    Weights are constants of the data: computed without gradient, in ``phi``'s float dtype.
    Gains are exponential in phi, so phi should be on a small scale (ranks, or scores
    normalised to a few units); ``2**phi`` overflows float32 beyond phi ~ 128.

    Args:
        phi: ``[B, K]`` finite preference scores (higher is better), K >= 2.
        kind: one of ``"dcg"``, ``"gain"``, ``"uniform"``.
    """
    if kind not in WEIGHT_KINDS:
        raise ValueError(f"kind must be one of {WEIGHT_KINDS}, got {kind!r}")
    _check_phi(phi)
    if not phi.is_floating_point():
        phi = phi.float()
    mask = (phi[:, :, None] > phi[:, None, :]).to(phi.dtype)
    if kind == "uniform":
        return mask
    gain = torch.exp2(phi) - 1
    weights = (gain[:, :, None] - gain[:, None, :]).abs()
    if kind == "dcg":
        inv_discount = 1.0 / torch.log2(1.0 + rank_positions(phi).to(phi.dtype))
        weights = weights * (inv_discount[:, :, None] - inv_discount[:, None, :]).abs()
    return weights * mask


def rank_dpo_loss(
    err: torch.Tensor,
    ref_err: torch.Tensor,
    phi: torch.Tensor,
    beta: float,
    weights: str | torch.Tensor = "dcg",
) -> torch.Tensor:
    """RankDPO loss per prompt, shape ``[B]`` (Karthik et al. 2024, arXiv 2410.18013).

    With scores ``s_i = err_i - ref_err_i`` (all K images of a prompt noised with the same
    noise and t) and pair weights ``W`` from :func:`pairwise_dpo_weights`:

    ``loss_b = -sum_{i, j : phi_i > phi_j} W_ij * logsigmoid(-beta * (s_i - s_j))``

    a plain sum over ordered pairs, not normalised by the number of pairs or the weights.
    At policy == reference it equals ``log 2 * W.sum((-1, -2))``.

    Beta convention: RankDPO's, which has no 0.5, so it is *half* the paper beta of
    :func:`diffusion_dpo_loss` (and equal to diffusers' ``beta_dpo``). For K = 2 with
    ``phi_w > phi_l``::

        rank_dpo_loss(err, ref_err, phi, beta)
            == Delta_wl * diffusion_dpo_loss(err_w, err_l, ref_err_w, ref_err_l, 2 * beta)
        Delta_wl = (2**phi_w - 2**phi_l) * (1 - 1 / log2(3))

    and with ``weights="uniform"`` the factor is 1 (exactly Diffusion-DPO at ``2 * beta``).
    Equal phi gives loss 0.

    Args:
        err: ``[B, K]`` policy denoising errors of the K candidates of each prompt.
        ref_err: ``[B, K]`` reference errors at the same noise and t.
        phi: ``[B, K]`` finite preference scores, higher is better; K >= 2.
        beta: > 0, RankDPO convention (see above).
        weights: ``"dcg"`` (RankDPO), ``"gain"``, ``"uniform"``, or a precomputed
            ``[B, K, K]`` tensor (e.g. from :func:`pairwise_dpo_weights`).

    Returns:
        ``[B]`` per-prompt losses; take ``.mean()`` for the batch loss.
    """
    beta = _check_beta(beta)
    _check_ranked(err, ref_err, phi)
    if isinstance(weights, str):
        w = pairwise_dpo_weights(phi, weights)
    else:
        w = weights
        expected = (*phi.shape, phi.shape[1])
        if not isinstance(w, torch.Tensor) or tuple(w.shape) != expected:
            got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
            raise ValueError(f"weights must be a str or a tensor of shape {expected}, got {got}")
    s = err - ref_err
    diff = s[:, :, None] - s[:, None, :]  # [B, K, K], diff[b, i, j] = s_i - s_j
    pair_loss = -F.logsigmoid(-beta * diff)
    return (w.to(pair_loss.dtype) * pair_loss).sum(dim=(-1, -2))


@torch.no_grad()
def rank_pair_accuracy(err: torch.Tensor, ref_err: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """Fraction of ordered pairs (phi_i > phi_j) with ``s_i < s_j``: a detached 0-dim tensor.

    The ranked analogue of Diffusion-DPO's implicit reward accuracy, pooled over the batch.
    NaN if the batch has no ordered pair (all phi tied).
    """
    _check_ranked(err, ref_err, phi)
    s = err - ref_err
    ordered = phi[:, :, None] > phi[:, None, :]
    correct = (s[:, :, None] < s[:, None, :]) & ordered
    return correct.sum().float() / ordered.sum().float()


# ----------------------------------------------------------------------------- BalancedDPO, SFT


def balanced_dpo_loss(
    err_w: torch.Tensor,
    err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    beta: float,
    vote_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """BalancedDPO loss per prompt, shape ``[B]`` (arXiv 2503.12575).

    BalancedDPO aggregates several reward metrics by majority vote over *preferences*
    (each metric votes for one image of the pair) instead of averaging reward values; the
    winner / loser labels therefore come from the data stage, and the per-pair objective is
    plain Diffusion-DPO on those consensus pairs:

    ``loss = vote_weight * diffusion_dpo_loss(err_w, err_l, ref_err_w, ref_err_l, beta)``

    ``vote_weight`` (optional, ``[B]``, finite, >= 0) lets the caller weight pairs by how
    decisive the vote was, e.g. ``(votes_w - votes_l) / n_metrics``; None means 1. Beta is in
    the paper convention of :func:`diffusion_dpo_loss`. BalancedDPO's periodic refresh of the
    reference model is a training-loop concern and is not handled here.
    """
    loss = diffusion_dpo_loss(err_w, err_l, ref_err_w, ref_err_l, beta)
    if vote_weight is None:
        return loss
    if not isinstance(vote_weight, torch.Tensor):
        raise ValueError(f"vote_weight must be a torch.Tensor or None, got {type(vote_weight).__name__}")
    if vote_weight.shape != loss.shape:
        raise ValueError(
            f"shape mismatch: vote_weight={tuple(vote_weight.shape)} must equal err_w={tuple(err_w.shape)}"
        )
    if not bool(torch.isfinite(vote_weight).all()) or bool((vote_weight < 0).any()):
        raise ValueError(f"vote_weight must be finite and >= 0, got {vote_weight.tolist()[:8]}")
    return vote_weight.to(loss.dtype) * loss


def sft_loss(err: torch.Tensor) -> torch.Tensor:
    """Plain denoising loss per prompt on chosen / teacher images, shape ``[B]``.

    EvolveDirector-style supervised fine-tuning: the loss is the denoising error itself.
    ``err`` of shape ``[B]`` is returned as is; ``[B, K]`` (several chosen images or noise
    draws per prompt) is averaged over K. No reference model and no beta.
    """
    _check_tensors(err=err)
    if err.dim() > 2:
        raise ValueError(f"err must have shape [B] or [B, K], got {tuple(err.shape)}")
    return err if err.dim() == 1 else err.mean(dim=1)
