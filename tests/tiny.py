"""Tiny real models shared by the tests: stock pipelines with random weights, built here, nothing downloaded."""

import torch

from raypref.models import PixArtAdapter, SD15Adapter
from raypref.shapes.model import build_pipeline


def tiny_model(family: str = "shapes", seed: int = 0):
    """A model adapter on a tiny random pipeline. "shapes": the shapes pipeline at 16 px (a stock
    StableDiffusionPipeline: latent UNet, flow matching, stock LoRA loader); "pixart": a tiny
    PixArt-alpha (transformer, T5, epsilon; LoRA through peft injection)."""
    if family == "shapes":
        return SD15Adapter(build_pipeline("tiny", seed=seed))
    if family == "pixart":
        from tests.test_models import build_pixart

        torch.manual_seed(seed)
        return PixArtAdapter(build_pixart())
    raise ValueError(f"unknown tiny family {family!r}")
