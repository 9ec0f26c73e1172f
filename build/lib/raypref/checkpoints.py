"""Where a model lives: the packaged shapes base model, a pipeline directory, or a Ray Train checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

SHIPPED_BASE = Path(__file__).resolve().parent / "assets" / "shapes-base"


def resolve_checkpoint(path: str | Path) -> Path:
    """``shipped`` -> the packaged base model; a Ray Train checkpoint dir -> its ``pipeline/``."""
    p = SHIPPED_BASE if str(path) == "shipped" else Path(path).expanduser()
    if (p / "pipeline" / "model_index.json").exists():
        p = p / "pipeline"
    if not (p / "model_index.json").exists():
        raise ValueError(f"no diffusers pipeline (model_index.json) at {p}")
    return p


def load_model(path: str, device="cpu"):
    """A model adapter (``denoiser``, ``noise_schedule``, ``encode_prompts``, ``encode_images``,
    ``predict``, ``save_pretrained``) from a saved pipeline directory; the family (SD1.5, SDXL,
    PixArt, SD3; the shapes model is SD1.5-family) comes from its model_index.json. ``shipped`` is the packaged
    shapes base model; a Ray Train checkpoint directory resolves to its ``pipeline/``."""
    from raypref.models import load_adapter

    local = os.path.expanduser(path)
    if path == "shipped" or os.path.isdir(local):
        local = str(resolve_checkpoint(local if path != "shipped" else path))
    return load_adapter(local, device=device)
