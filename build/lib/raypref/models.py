"""Model adapters: one duck-typed interface over the diffusers pipelines raypref trains.

Every adapter offers (the shapes base model is a stock ``StableDiffusionPipeline``, driven by ``SD15Adapter``):

    from_pretrained(path_or_id, *, device, dtype)   classmethod; local dir or hub id
    pipe                                            the stock diffusers pipeline
    denoiser                                        unet / transformer: what preference training updates
    noise_schedule()                                raypref.diffusion.NoiseSchedule of the pipeline's scheduler
    encode_prompts(prompts) -> dict[str, Tensor]    conditioning, batch-first, no grad
    encode_images(images)   -> x0 [B, C, h, w]      [B, H, W, 3] uint8 -> scaled VAE latent means, no grad
    predict(x_t, t, cond)   -> like x_t             one denoiser forward, no CFG (epsilon / v / velocity)
    generate(prompts, seeds, ...) -> [B, H, W, 3] uint8   stock pipeline __call__, one generator per seed
    save_pretrained(path)                           the full pipeline, loadable by DiffusionPipeline

Families: "sd15" (SD1.x/2.x: UNet + CLIPTextModel, epsilon or v_prediction), "sdxl" (two CLIP
encoders, pooled text embeds + time ids), "pixart" (alpha/sigma: T5 + PixArtTransformer2DModel),
"sd3" (two CLIPTextModelWithProjection + T5, MMDiT, flow matching).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from diffusers import (
    DiffusionPipeline,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from torch import Tensor

from raypref.diffusion import NoiseSchedule


# ---------------------------------------------------------------------------------------------- helpers
def images_to_pixels(images) -> Tensor:
    """[B, H, W, 3] uint8 (numpy or torch) -> [B, 3, H, W] float32 in [-1, 1] (the VAE's input range)."""
    x = torch.as_tensor(np.asarray(images))
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
        raise ValueError(f"expected [B, H, W, 3] uint8 images, got shape {tuple(x.shape)} dtype {x.dtype}")
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def float_images_to_uint8(images: np.ndarray) -> np.ndarray:
    """[B, H, W, 3] float in [0, 1] (diffusers output_type="np") -> uint8, rounded as diffusers' numpy_to_pil."""
    return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)


@torch.no_grad()
def vae_encode(vae, pixels: Tensor) -> Tensor:
    """Pixels [B, 3, H, W] in [-1, 1] -> x0 latents [B, C, H/f, W/f]: the posterior mean, normalised the
    way the family's pipeline un-normalises before decoding (inverse of its ``vae.decode`` input).

    SD1.x / SDXL / PixArt: z * scaling_factor; SD3 / FLUX: (z - shift_factor) * scaling_factor;
    SDXL VAEs with per-channel ``latents_mean`` / ``latents_std``: (z - mean) * scaling_factor / std.
    The mean (not a sample) makes x0 a deterministic function of the image, so the policy and the
    reference model see the same x0 for a preference pair.
    """
    z = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist.mean
    cfg = vae.config
    scale = float(cfg.scaling_factor)
    latents_mean, latents_std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if latents_mean is not None and latents_std is not None:
        mean = torch.tensor(latents_mean, device=z.device, dtype=z.dtype).view(1, -1, 1, 1)
        std = torch.tensor(latents_std, device=z.device, dtype=z.dtype).view(1, -1, 1, 1)
        return (z - mean) * scale / std
    shift = getattr(cfg, "shift_factor", None) or 0.0
    return (z - shift) * scale


def pipeline_class_name(path_or_id: str | os.PathLike) -> str:
    """``_class_name`` from a pipeline's model_index.json (local dir or hub id)."""
    try:
        config = DiffusionPipeline.load_config(str(path_or_id))
    except OSError as e:
        raise ValueError(f"cannot read model_index.json of {str(path_or_id)!r}: {e}") from e
    return str(config.get("_class_name", ""))


def _generators(seeds) -> list[torch.Generator]:
    # CPU generators: the same (prompt, seed) gives the same initial noise on any device and in any batch.
    return [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]


# ---------------------------------------------------------------------------------------------- shared part
class _PipelineAdapter:
    """The family-independent members. Subclasses set ``pipeline_classes`` and ``denoiser_name``
    and implement ``encode_prompts`` and ``predict``."""

    pipeline_classes: tuple[type, ...] = ()
    denoiser_name = "unet"
    load_kwargs: dict = {}  # extra from_pretrained kwargs for the family
    call_kwargs: dict = {}  # extra __call__ kwargs for the family

    def __init__(self, pipe: DiffusionPipeline):
        if not isinstance(pipe, self.pipeline_classes):
            expected = ", ".join(c.__name__ for c in self.pipeline_classes)
            raise ValueError(f"{type(self).__name__} needs one of {expected}, got {type(pipe).__name__}")
        self.pipe = pipe
        self.pipe.set_progress_bar_config(disable=True)

    @classmethod
    def from_pretrained(cls, path_or_id, *, device="cpu", dtype=torch.float32, **kwargs):
        """Load a saved pipeline (local directory or hub id) whose model_index.json names one of
        ``pipeline_classes``; extra kwargs go to the pipeline's ``from_pretrained``."""
        name = pipeline_class_name(path_or_id)
        by_name = {c.__name__: c for c in cls.pipeline_classes}
        if name not in by_name:
            raise ValueError(
                f"{str(path_or_id)!r} holds a {name or 'pipeline without _class_name'}; "
                f"{cls.__name__} loads {', '.join(by_name)}"
            )
        pipe = by_name[name].from_pretrained(path_or_id, dtype=dtype, **{**cls.load_kwargs, **kwargs})
        return cls(pipe.to(device))

    @property
    def denoiser(self) -> torch.nn.Module:
        """The network preference training updates (unet or transformer)."""
        return getattr(self.pipe, self.denoiser_name)

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    def noise_schedule(self) -> NoiseSchedule:
        """The training-time noise schedule matching the pipeline's scheduler config."""
        return NoiseSchedule.from_scheduler(self.pipe.scheduler)

    def encode_images(self, images) -> Tensor:
        """[B, H, W, 3] uint8 -> x0 latents [B, C, H/f, W/f] (scaled VAE posterior mean), no grad."""
        return vae_encode(self.pipe.vae, images_to_pixels(images))

    def default_size(self) -> tuple[int, int]:
        """(height, width) the pipeline generates when none is given."""
        size = self.denoiser.config.sample_size * self.pipe.vae_scale_factor
        return int(size), int(size)

    @torch.no_grad()
    def generate(
        self, prompts, seeds, num_inference_steps: int = 30, guidance_scale: float = 5.0,
        height: int | None = None, width: int | None = None,
    ) -> np.ndarray:
        """[B] prompts and seeds -> [B, H, W, 3] uint8 via the stock pipeline ``__call__`` (with CFG).

        Each sample has its own generator, so (prompt, seed) gives the same image whatever batch it is
        generated in (up to batched-matmul rounding).
        """
        prompts, seeds = [prompts] if isinstance(prompts, str) else list(prompts), list(seeds)
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        if not prompts:
            h, w = self.default_size()
            return np.zeros((0, height or h, width or w, 3), np.uint8)
        images = self.pipe(
            prompt=prompts, generator=_generators(seeds), num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, height=height, width=width, output_type="np", **self.call_kwargs,
        ).images
        return float_images_to_uint8(images)

    def save_pretrained(self, path) -> None:
        """Save the full pipeline; loads back with ``DiffusionPipeline.from_pretrained`` or ``load_adapter``."""
        self.pipe.save_pretrained(str(path))


# ---------------------------------------------------------------------------------------------- families
class SD15Adapter(_PipelineAdapter):
    """Stable Diffusion 1.x / 2.x: UNet2DConditionModel on VAE latents, CLIPTextModel conditioning.
    Prediction type (epsilon or v_prediction) comes from the scheduler config."""

    pipeline_classes = (StableDiffusionPipeline,)
    denoiser_name = "unet"
    # The NSFW checker blacks out images, which would poison preference labels; generation is offline.
    load_kwargs = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """-> ``encoder_hidden_states`` [B, 77, D]."""
        emb, _ = self.pipe.encode_prompt(
            list(prompts), self.pipe._execution_device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return {"encoder_hidden_states": emb}

    def predict(self, x_t: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """x_t [B, 4, h, w], t [B] -> epsilon or v [B, 4, h, w]."""
        unet = self.pipe.unet
        return unet(
            x_t.to(unet.dtype), t.to(unet.device), encoder_hidden_states=cond["encoder_hidden_states"],
            return_dict=False,
        )[0]


class SDXLAdapter(_PipelineAdapter):
    """SDXL: UNet with text_time added conditioning; two CLIP text encoders (hidden states concatenated,
    the second one's projected pooled output as ``text_embeds``) and micro-conditioning time ids."""

    pipeline_classes = (StableDiffusionXLPipeline,)
    denoiser_name = "unet"

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """-> ``encoder_hidden_states`` [B, 77, D1 + D2], ``pooled`` [B, P]."""
        emb, _, pooled, _ = self.pipe.encode_prompt(
            list(prompts), device=self.pipe._execution_device, num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )
        return {"encoder_hidden_states": emb, "pooled": pooled}

    def time_ids(self, x_t: Tensor, pooled: Tensor) -> Tensor:
        """[B, 6] micro-conditioning for un-cropped images of x_t's pixel size: original size = target
        size = (h * f, w * f), crop (0, 0) - what the pipeline uses for its own samples."""
        size = (x_t.shape[-2] * self.pipe.vae_scale_factor, x_t.shape[-1] * self.pipe.vae_scale_factor)
        ids = self.pipe._get_add_time_ids(
            size, (0, 0), size, dtype=pooled.dtype, text_encoder_projection_dim=int(pooled.shape[-1])
        )
        return ids.to(pooled.device).repeat(x_t.shape[0], 1)

    def predict(self, x_t: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """x_t [B, 4, h, w], t [B] -> epsilon or v [B, 4, h, w]. ``cond["time_ids"]`` [B, 6] overrides
        the default micro-conditioning."""
        unet = self.pipe.unet
        pooled = cond["pooled"]
        time_ids = cond["time_ids"] if "time_ids" in cond else self.time_ids(x_t, pooled)
        return unet(
            x_t.to(unet.dtype), t.to(unet.device), encoder_hidden_states=cond["encoder_hidden_states"],
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}, return_dict=False,
        )[0]


class PixArtAdapter(_PipelineAdapter):
    """PixArt-alpha / PixArt-sigma: PixArtTransformer2DModel on VAE latents, T5 conditioning with an
    attention mask, epsilon prediction (the learned-variance channels are dropped)."""

    pipeline_classes = (PixArtAlphaPipeline, PixArtSigmaPipeline)
    denoiser_name = "transformer"
    # Exact requested size (no aspect-ratio bins) and raw captions, so generation sees the same text
    # conditioning as encode_prompts (caption cleaning would need bs4/ftfy and changes the prompt).
    call_kwargs = {"use_resolution_binning": False, "clean_caption": False}

    @property
    def max_sequence_length(self) -> int:
        return 300 if isinstance(self.pipe, PixArtSigmaPipeline) else 120  # the pipelines' defaults

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """-> ``encoder_hidden_states`` [B, L, D], ``encoder_attention_mask`` [B, L] (L = 120 alpha, 300 sigma)."""
        emb, mask, _, _ = self.pipe.encode_prompt(
            list(prompts), do_classifier_free_guidance=False, device=self.pipe._execution_device,
            clean_caption=False, max_sequence_length=self.max_sequence_length,
        )
        return {"encoder_hidden_states": emb, "encoder_attention_mask": mask}

    def predict(self, x_t: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """x_t [B, C, h, w], t [B] -> epsilon [B, C, h, w]."""
        tr = self.pipe.transformer
        added = {"resolution": None, "aspect_ratio": None}
        if tr.use_additional_conditions:  # PixArt-alpha 1024: image size and aspect ratio, as the pipeline
            b, f = x_t.shape[0], self.pipe.vae_scale_factor
            h, w = x_t.shape[-2] * f, x_t.shape[-1] * f
            dtype = cond["encoder_hidden_states"].dtype
            added = {
                "resolution": torch.tensor([[h, w]], dtype=dtype, device=x_t.device).repeat(b, 1),
                "aspect_ratio": torch.tensor([[h / w]], dtype=dtype, device=x_t.device).repeat(b, 1),
            }
        out = tr(
            x_t.to(tr.dtype), encoder_hidden_states=cond["encoder_hidden_states"],
            encoder_attention_mask=cond["encoder_attention_mask"], timestep=t.to(tr.device),
            added_cond_kwargs=added, return_dict=False,
        )[0]
        return out[:, : x_t.shape[1]]  # learned sigma: the first C channels are epsilon


class SD3Adapter(_PipelineAdapter):
    """Stable Diffusion 3: SD3Transformer2DModel (MMDiT) on VAE latents, flow matching (velocity).
    Conditioning: two CLIPTextModelWithProjection (hidden states concatenated, zero-padded to T5's width
    and joined with T5's tokens; pooled outputs concatenated)."""

    pipeline_classes = (StableDiffusion3Pipeline,)
    denoiser_name = "transformer"

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """-> ``encoder_hidden_states`` [B, 77 + 256, D], ``pooled`` [B, P1 + P2]."""
        prompts = list(prompts)
        emb, _, pooled, _ = self.pipe.encode_prompt(
            prompts, prompts, prompts, device=self.pipe._execution_device, num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )
        return {"encoder_hidden_states": emb, "pooled": pooled}

    def predict(self, x_t: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """x_t [B, C, h, w], t [B] float in (0, 1000) (= sigma * 1000) -> velocity [B, C, h, w]."""
        tr = self.pipe.transformer
        return tr(
            hidden_states=x_t.to(tr.dtype), timestep=t.to(tr.device),
            encoder_hidden_states=cond["encoder_hidden_states"], pooled_projections=cond["pooled"], return_dict=False,
        )[0]


ADAPTERS = {"sd15": SD15Adapter, "sdxl": SDXLAdapter, "pixart": PixArtAdapter, "sd3": SD3Adapter}

# model_index.json _class_name -> family
FAMILY_OF_PIPELINE = {
    "StableDiffusionPipeline": "sd15",
    "StableDiffusionXLPipeline": "sdxl",
    "PixArtAlphaPipeline": "pixart",
    "PixArtSigmaPipeline": "pixart",
    "StableDiffusion3Pipeline": "sd3",
}


def load_adapter(path_or_id, family: str | None = None, *, device="cpu", dtype=torch.float32, **kwargs):
    """Load a saved pipeline as its family's adapter. ``family`` (one of ADAPTERS) is inferred from
    model_index.json's ``_class_name`` when None."""
    if family is None:
        name = pipeline_class_name(path_or_id)
        if name not in FAMILY_OF_PIPELINE:
            raise ValueError(
                f"unknown pipeline class {name or '(none)'!r} in {str(path_or_id)!r}; "
                f"known: {', '.join(FAMILY_OF_PIPELINE)}"
            )
        family = FAMILY_OF_PIPELINE[name]
    if family not in ADAPTERS:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(ADAPTERS)}")
    return ADAPTERS[family].from_pretrained(path_or_id, device=device, dtype=dtype, **kwargs)
