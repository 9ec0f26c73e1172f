"""Rows of the preference table -> training batches: which images of a ranking row each method
forwards (``select``), and one stacked forward batch with per-prompt noise and timesteps (``collate``)."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import torch

from raypref.train_config import LossSection
from raypref.train_state import TrainState, autocast, phase

COLUMNS = ["prompt_id", "prompt", "images", "generators", "phi", "pairs"]


def select(
    row: dict, cfg: LossSection, keep_ties: bool = False
) -> tuple[list[int], list[tuple[int, int, float]]] | None:
    """Which images of a row to forward, and the (winner, loser, weight) pairs among them.

    Indices in the pairs are positions in the returned image list. None: the row gives no
    training signal for this method (all phi tied, no consensus pairs, no image of the generator).
    ``keep_ties`` (DPO, ``data.ties=keep``): pairs of equal phi are kept too, as (first, second) ties; an
    all-tied row gives the tie (0, 1) under ``best_worst``.
    """
    phi = np.asarray(row["phi"], dtype=np.float64)
    k = len(phi)
    if cfg.method == "rankdpo":
        return (list(range(k)), []) if phi.max() > phi.min() else None
    if cfg.method == "sft":
        if cfg.sft_target == "best":
            return [int(np.argmax(phi))], []
        idx = [i for i, g in enumerate(row["generators"]) if g == cfg.sft_generator]
        return (idx, []) if idx else None
    if cfg.method == "balanced":
        pairs = row["pairs"] or []
        if not pairs:
            return None
        idx = sorted({p["i"] for p in pairs} | {p["j"] for p in pairs})
        pos = {v: n for n, v in enumerate(idx)}
        out = []
        for p in pairs:
            w = 1.0
            if cfg.vote_weighting:
                total = p["votes_i"] + p["votes_j"]
                w = (p["votes_i"] - p["votes_j"]) / total if total > 0 else 0.0
            out.append((pos[p["i"]], pos[p["j"]], float(w)))
        return idx, out
    # dpo
    tied = phi.max() <= phi.min()
    if tied and not (keep_ties and k > 1):
        return None
    if cfg.dpo_pairs == "best_worst":
        return ([0, 1] if tied else [int(np.argmax(phi)), int(np.argmin(phi))]), [(0, 1, 1.0)]
    ties = [(i, j, 1.0) for i in range(k) for j in range(i + 1, k) if phi[i] == phi[j]] if keep_ties else []
    return list(range(k)), [(i, j, 1.0) for i in range(k) for j in range(k) if phi[i] > phi[j]] + ties


def fit(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An image at the model's (height, width): resized so it covers it (bicubic), then centre-cropped,
    as diffusers' DPO script prepares Pick-a-Pic's mixed sizes. Images already that size are untouched."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    from PIL import Image

    scale = max(h / image.shape[0], w / image.shape[1])
    rh, rw = max(h, round(image.shape[0] * scale)), max(w, round(image.shape[1] * scale))
    im = Image.fromarray(image).resize((rw, rh), Image.BICUBIC)
    top, left = (rh - h) // 2, (rw - w) // 2
    return np.asarray(im.crop((left, top, left + w, top + h)))


def _row_seed(seed: int, step: int, pid: str) -> int:
    return (int(seed) * 1_000_003 + int(step) * 7919 + int(pid[:15], 16)) % (2**63 - 1)


def collate(rows: list[dict], state: TrainState) -> dict:
    """Rows of the preference table -> one forward batch.

    If no row is usable: ``{"n_rows": 0, "skipped": len(rows)}``. Else a dict with ``x0`` [N, C, H, W],
    ``noise`` like x0,
    ``t`` [N], ``cond`` (per image), ``row`` [N] (prompt index of each image), ``pairs`` [P, 3]
    long (winner, loser, prompt), ``pair_w`` [P] and ``pair_label`` [P] (1, or 0.5 for a tie),
    ``phi`` [B, K] (rankdpo), ``n_rows`` B, ``skipped`` (rows without signal).
    """
    from raypref.prefdata import decode_png

    cfg, pipe = state.cfg.loss, state.pipe
    schedule = pipe.noise_schedule()
    if cfg.t_logit_mean is not None:
        schedule = dataclasses.replace(schedule, logit_mean=cfg.t_logit_mean)
    keys, row_of, prompts, pairs, pair_w, pair_label, phis, noises = [], [], [], [], [], [], [], []
    skipped = 0
    size = pipe.default_size()
    cache = state.latents if state.cfg.data.cache == "latents" else None
    with phase(state, "data"):
        keep_ties = state.cfg.data.ties == "keep"
        picked = [(row, select(row, cfg, keep_ties)) for row in rows]
        # an image's latents are a function of its bytes (the VAE is frozen, x0 its posterior mean)
        row_keys = [[hashlib.blake2b(row["images"][i], digest_size=16).digest() for i in sel[0]] if sel else []
                    for row, sel in picked]
        todo = {}  # images to decode and encode, by digest
        for (row, sel), ks in zip(picked, row_keys):
            for i, key in zip(sel[0] if sel else [], ks):
                if (cache is None or key not in cache) and key not in todo:
                    todo[key] = fit(decode_png(row["images"][i]), size)
    for (row, sel), ks in zip(picked, row_keys):
        if sel is None:
            skipped += 1
            continue
        idx, row_pairs = sel
        b, base = len(prompts), len(keys)
        prompts.append(row["prompt"])
        keys += ks
        row_of += [b] * len(idx)
        pairs += [(base + i, base + j, b) for i, j, _ in row_pairs]
        pair_w += [w for _, _, w in row_pairs]
        pair_label += [0.5 if row["phi"][idx[i]] == row["phi"][idx[j]] else 1.0 for i, j, _ in row_pairs]
        phis.append([float(v) for v in row["phi"]])
        noises.append(_row_seed(state.cfg.data.seed, state.step, row["prompt_id"]))
    if not prompts:
        return {"n_rows": 0, "skipped": skipped}
    with torch.no_grad():
        with phase(state, "encode"):
            fresh = {}
            if todo:
                encoded = pipe.encode_images(np.stack(list(todo.values()))).to(state.device, torch.float32)
                fresh = dict(zip(todo, encoded))
                if cache is not None:
                    cache.update((k, v.to("cpu", copy=True)) for k, v in fresh.items())
            x0 = torch.stack([fresh[k] if k in fresh else cache[k].to(state.device) for k in keys])
        row_t = torch.as_tensor(row_of, device=state.device)
        noise_rows, t_rows = [], []
        for b, s in enumerate(noises):  # one noise, t and prompt dropout per prompt, shared by its images
            g = torch.Generator().manual_seed(s)
            t_rows.append(schedule.sample_timesteps(1, generator=g))
            noise_rows.append(torch.randn(x0.shape[1:], generator=g))
            if state.cfg.data.cfg_dropout > 0 and torch.rand((), generator=g) < state.cfg.data.cfg_dropout:
                prompts[b] = ""
        noise = torch.stack(noise_rows).to(state.device)[row_t]
        t = torch.cat(t_rows).to(state.device)[row_t]
        with autocast(state), phase(state, "encode"):
            cond = pipe.encode_prompts(prompts)
        cond = {k: v.detach().float()[row_t] for k, v in cond.items()}
    out = {"x0": x0, "noise": noise, "t": t, "cond": cond, "row": row_t, "n_rows": len(prompts),
           "skipped": skipped,
           "pairs": torch.as_tensor(pairs, dtype=torch.long, device=state.device).reshape(-1, 3),
           "pair_w": torch.as_tensor(pair_w, dtype=torch.float32, device=state.device),
           "pair_label": torch.as_tensor(pair_label, dtype=torch.float32, device=state.device)}
    if cfg.method == "rankdpo":
        ks = {len(p) for p in phis}
        if len(ks) != 1:
            raise ValueError(f"rankdpo needs the same K for every prompt of a batch, got K in {sorted(ks)}")
        out["phi"] = torch.as_tensor(phis, dtype=torch.float32, device=state.device)
    return out
