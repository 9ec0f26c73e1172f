"""Held-out implicit-reward accuracy: how often the policy ranks a held-out preference pair like its
label (DPO's implicit reward, policy vs reference), averaged over noise draws."""

from __future__ import annotations

import copy

import torch

from raypref.collate import collate
from raypref.train import errors
from raypref.train_config import DataSection, LossSection, TrainConfig
from raypref.train_state import TrainState


@torch.no_grad()
def heldout_accuracy(state: TrainState, rows: list[dict], n_draws: int = 4, seed: int = 1234,
                     pairs: str = "best_worst", batch_size: int = 16) -> dict[str, float]:
    """Implicit reward accuracy of the policy vs its reference on held-out pairs.

    A pair (w, l) is correct when ``err_w - ref_err_w < err_l - ref_err_l``, with errors averaged
    over ``n_draws`` shared (noise, t) draws per prompt. ``pairs``: "best_worst" by phi, or
    "consensus" (the rows' BalancedDPO pairs). Returns accuracy, mean margin (paper beta of
    ``state.cfg.loss``) and the number of pairs.
    """
    if pairs not in ("best_worst", "consensus"):
        raise ValueError(f"pairs must be best_worst|consensus, got {pairs!r}")
    loss_cfg = LossSection(method="dpo" if pairs == "best_worst" else "balanced", beta=state.cfg.loss.beta)
    eval_state = copy.copy(state)
    eval_state.cfg = TrainConfig(model=state.cfg.model, data=DataSection(path=state.cfg.data.path, seed=seed),
                                 loss=loss_cfg, optim=state.cfg.optim, run=state.cfg.run)
    den = state.pipe.denoiser
    was_training = den.training
    den.eval()
    d_w, d_l = [], []
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            acc_w = acc_l = None
            for draw in range(n_draws):
                eval_state.step = draw  # the draw index keys the noise
                b = collate(chunk, eval_state)
                if b["n_rows"] == 0:
                    break
                ref, err = errors(eval_state, b, reference=True), errors(eval_state, b)
                w, lo, _ = b["pairs"].unbind(1)
                dw, dl = err[w] - ref[w], err[lo] - ref[lo]
                acc_w = dw if acc_w is None else acc_w + dw
                acc_l = dl if acc_l is None else acc_l + dl
            if acc_w is not None:
                d_w.append(acc_w / n_draws)
                d_l.append(acc_l / n_draws)
    finally:
        den.train(was_training)
    if not d_w:
        return {"accuracy": float("nan"), "margin": float("nan"), "pairs": 0}
    dw, dl = torch.cat(d_w), torch.cat(d_l)
    return {"accuracy": (dw < dl).float().mean().item(),
            "margin": (-0.5 * state.cfg.loss.beta * (dw - dl)).mean().item(), "pairs": int(dw.numel())}
