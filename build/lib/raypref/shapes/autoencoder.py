"""The shapes VAE's training helpers and its check: edge-weighted reconstruction loss weights, the
latent scaling factor, and ShapesEval of its reconstructions of clean renders (the ceiling any
denoiser can reach through this decoder)."""

from __future__ import annotations

import numpy as np
import torch

from raypref.shapes.grammar import eval_prompts
from raypref.shapes.render import SIZE_RANGE


def edge_weights(pixels: torch.Tensor, edge_weight: float) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 1, H, W]: ``edge_weight`` where a pixel differs from a 4-neighbour, else 1
    (a square's corners and a triangle's slopes are few pixels that the fill-ratio rule counts)."""
    diff = torch.zeros_like(pixels[:, :1])
    dx = (pixels[..., :, 1:] != pixels[..., :, :-1]).any(1, keepdim=True).float()
    dy = (pixels[..., 1:, :] != pixels[..., :-1, :]).any(1, keepdim=True).float()
    diff[..., :, 1:] += dx
    diff[..., :, :-1] += dx
    diff[..., 1:, :] += dy
    diff[..., :-1, :] += dy
    return 1.0 + (edge_weight - 1.0) * (diff > 0).float()


@torch.no_grad()
def latent_scaling_factor(vae, pixels: torch.Tensor) -> float:
    """1 / std of the posterior means of ``pixels`` (SD's convention: scaled latents have unit std)."""
    z = torch.cat([vae.encode(pixels[i:i + 256].to(vae.device)).latent_dist.mean for i in range(0, len(pixels), 256)])
    return float(1.0 / z.std())


@torch.no_grad()
def reconstruct(vae, images: np.ndarray) -> np.ndarray:
    """[B, H, W, 3] uint8 -> the VAE's reconstructions (posterior mean, decoded), uint8 as diffusers rounds."""
    from raypref.models import float_images_to_uint8, images_to_pixels

    pixels = images_to_pixels(images).to(vae.device)
    out = torch.cat([vae.decode(vae.encode(pixels[i:i + 256]).latent_dist.mean).sample
                     for i in range(0, len(pixels), 256)])
    return float_images_to_uint8((out / 2 + 0.5).permute(0, 2, 3, 1).cpu().numpy())


def reconstruction_eval(vae, n_per_category: int, size_range=SIZE_RANGE, seed: int = 0) -> dict:
    """ShapesEval of the VAE's reconstructions of clean eval renders (``eval_prompts(n, seed)``):
    what a perfect denoiser could at best score through this decoder."""
    from raypref.shapes.detect import shapes_eval
    from raypref.shapes.teachers import Teacher

    prompts = [p for _, p in eval_prompts(n_per_category, seed)]
    res = int(vae.config.sample_size)
    images = Teacher("clean", size=res, size_range=tuple(size_range)).generate(prompts, list(range(len(prompts))))
    return shapes_eval(prompts, list(reconstruct(vae, images)))
