"""Batch helpers shared by the reward models.

Batch convention (project-wide, Ray Data ``batch_format="numpy"``):
``batch["prompt"]`` is a numpy array of str ``[B]``; ``batch["image"]`` is numpy uint8
``[B, H, W, 3]`` (or an object array / list of ``[H, W, 3]`` uint8 arrays when sizes differ).
A reward returns a new dict holding every input column plus ``f"score_{name}"``: float32 ``[B]``.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = [
    "batch_prompts",
    "batch_images",
    "prompts_and_images",
    "to_pil",
    "with_score",
    "check_name",
    "resolve_device",
]


def check_name(name) -> str:
    """A reward name becomes a column suffix: require a plain identifier."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(
            f"reward name must be a non-empty identifier (it names the column score_<name>), got {name!r}"
        )
    return name


def resolve_device(device):
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} requested but CUDA is not available")
    return dev


def batch_prompts(batch: dict) -> list[str]:
    """``batch["prompt"]`` as a list of str ``[B]``."""
    if "prompt" not in batch:
        raise ValueError(f"batch has no 'prompt' column; columns: {sorted(batch)}")
    prompts = batch["prompt"]
    if isinstance(prompts, str) or np.ndim(prompts) != 1:
        raise ValueError(
            f"batch['prompt'] must be 1-D [B] of str, got {type(prompts).__name__} of shape {np.shape(prompts)}"
        )
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, bytes):
            p = p.decode("utf-8")
        if not isinstance(p, str):
            raise ValueError(f"batch['prompt'][{i}] must be str, got {type(p).__name__}")
        out.append(p)
    return out


def batch_images(batch: dict) -> list[np.ndarray]:
    """``batch["image"]`` as a list of uint8 ``[H, W, 3]`` arrays (length B)."""
    if "image" not in batch:
        raise ValueError(f"batch has no 'image' column; columns: {sorted(batch)}")
    images = batch["image"]
    if isinstance(images, np.ndarray) and images.dtype != object:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"batch['image'] must be uint8 [B, H, W, 3], got shape {images.shape}")
        images = list(images)
    out = []
    for i, im in enumerate(images):
        im = np.asarray(im)
        if im.dtype != np.uint8 or im.ndim != 3 or im.shape[-1] != 3:
            raise ValueError(f"batch['image'][{i}] must be uint8 [H, W, 3], got {im.dtype} of shape {im.shape}")
        out.append(im)
    return out


def to_pil(images: list[np.ndarray]) -> list[Image.Image]:
    return [Image.fromarray(im).convert("RGB") for im in images]


def with_score(batch: dict, name: str, scores) -> dict:
    """Copy ``batch`` and add ``score_<name>`` (float32 ``[B]``)."""
    n = len(batch["image"])
    s = np.asarray(scores, dtype=np.float32).reshape(-1)
    if s.shape != (n,):
        raise ValueError(f"reward {name!r} produced {s.shape[0]} scores for a batch of {n}")
    out = dict(batch)
    out[f"score_{name}"] = s
    return out


def prompts_and_images(batch: dict) -> tuple[list[str], list[np.ndarray]]:
    """``(batch_prompts(batch), batch_images(batch))``, checked to have the same length B."""
    prompts, images = batch_prompts(batch), batch_images(batch)
    if len(prompts) != len(images):
        raise ValueError(f"batch has {len(prompts)} prompts but {len(images)} images")
    return prompts, images
