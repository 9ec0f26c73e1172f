"""The shapes base model: a real diffusers pipeline small enough to train on a CPU.

A pixel-space ``SD3Transformer2DModel`` (flow matching, the default) or ``PixArtTransformer2DModel``
(epsilon / DDPM), a tiny transformers ``CLIPTextModel`` and a word-level tokenizer built locally
with ``tokenizers`` and wrapped as a ``PreTrainedTokenizerFast`` (no hub). Saved and loaded with
``save_pretrained`` / ``from_pretrained`` like any diffusers pipeline.

Images live in pixel space: x0 = image / 127.5 - 1, [B, 3, H, W] in [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import (
    DDIMScheduler, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, PixArtTransformer2DModel,
    SD3Transformer2DModel,
)
from diffusers.loaders import SD3LoraLoaderMixin
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from raypref.diffusion import NoiseSchedule
from raypref.models import images_to_pixels
from raypref.shapes.grammar import VOCAB

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")  # ids 0..3; eos != 2 (CLIP's legacy pooling rule)
MAX_TOKENS = 12  # the longest prompt has 7 words


@dataclass(frozen=True)
class ModelSize:
    """Architecture of a shapes model. ``hidden = heads * head_dim``."""

    resolution: int
    patch_size: int
    layers: int
    heads: int
    head_dim: int
    text_hidden: int
    text_layers: int


SIZES = {
    "tiny": ModelSize(resolution=16, patch_size=4, layers=2, heads=2, head_dim=16, text_hidden=32, text_layers=1),
    "small": ModelSize(resolution=32, patch_size=4, layers=6, heads=4, head_dim=32, text_hidden=128, text_layers=2),
    # Patch 2: each token predicts a 2 x 2 patch, so outlines are not drawn in 4 x 4 blocks; narrower
    # and shallower to cost about the same per step as "small" on a CPU.
    "small_p2": ModelSize(resolution=32, patch_size=2, layers=4, heads=2, head_dim=32, text_hidden=128, text_layers=2),
}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the grammar's vocabulary, built locally."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 2), ("[EOS]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]",
        model_max_length=MAX_TOKENS,
    )


def build_pipeline(size: str | ModelSize = "small", family: str = "sd3", seed: int = 0) -> "ShapesPipeline":
    """A randomly initialised shapes pipeline. ``family``: "sd3" (flow) or "pixart" (epsilon)."""
    if isinstance(size, str):
        if size not in SIZES:
            raise ValueError(f"unknown model size {size!r}; known: {', '.join(SIZES)}")
        size = SIZES[size]
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=size.text_hidden, intermediate_size=2 * size.text_hidden,
            projection_dim=size.text_hidden, num_hidden_layers=size.text_layers, num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS, pad_token_id=0, bos_token_id=2, eos_token_id=3,
        )
    )
    hidden = size.heads * size.head_dim
    if family == "sd3":
        transformer = SD3Transformer2DModel(
            sample_size=size.resolution, patch_size=size.patch_size, in_channels=3, out_channels=3,
            num_layers=size.layers, attention_head_dim=size.head_dim, num_attention_heads=size.heads,
            joint_attention_dim=size.text_hidden, caption_projection_dim=hidden,
            pooled_projection_dim=size.text_hidden, pos_embed_max_size=size.resolution // size.patch_size,
        )
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    elif family == "pixart":
        transformer = PixArtTransformer2DModel(
            sample_size=size.resolution, patch_size=size.patch_size, in_channels=3, out_channels=3,
            num_layers=size.layers, attention_head_dim=size.head_dim, num_attention_heads=size.heads,
            cross_attention_dim=hidden, caption_channels=size.text_hidden, norm_type="ada_norm_single",
            use_additional_conditions=False,
        )
        scheduler = DDIMScheduler(
            num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
            prediction_type="epsilon", clip_sample=True, set_alpha_to_one=True, timestep_spacing="trailing",
        )
    else:
        raise ValueError(f"unknown family {family!r}; expected 'sd3' or 'pixart'")
    return ShapesPipeline(transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def images_to_x0(images) -> torch.Tensor:
    """[B, H, W, 3] uint8 (numpy or torch) -> [B, 3, H, W] float32 in [-1, 1]: in pixel space the
    training sample x0 is the images themselves, scaled as every adapter scales its VAE input."""
    return images_to_pixels(images)


def x0_to_images(x: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> [B, H, W, 3] uint8."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


class ShapesPipeline(DiffusionPipeline, SD3LoraLoaderMixin):
    """Text -> 32 x 32 shapes image; pixel-space transformer, classifier-free guidance.

    Also the shapes world's model adapter (the interface every family's adapter in
    ``raypref.models`` offers): ``denoiser``, ``noise_schedule()``, ``encode_prompts``,
    ``encode_images``, ``predict``, ``generate`` and ``save_pretrained``. LoRA weights saved with
    ``save_lora_weights`` load back with ``load_lora_weights`` (SD3's LoRA format).
    """

    transformer_name = "transformer"
    text_encoder_name = "text_encoder"
    _lora_loadable_modules = ["transformer", "text_encoder"]
    text_encoder_2 = None  # SD3's LoRA loader also visits a second text encoder; we have none

    model_cpu_offload_seq = "text_encoder->transformer"

    def __init__(self, transformer, text_encoder, tokenizer, scheduler):
        super().__init__()
        self.register_modules(transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)

    @property
    def is_flow(self) -> bool:
        return isinstance(self.transformer, SD3Transformer2DModel)

    @property
    def resolution(self) -> int:
        return int(self.transformer.config.sample_size)

    @property
    def denoiser(self) -> torch.nn.Module:
        """The network that preference training updates."""
        return self.transformer

    def encode_images(self, images) -> torch.Tensor:
        """[B, H, W, 3] uint8 -> x0 [B, 3, H, W] in [-1, 1] (pixel space: no VAE)."""
        return images_to_x0(images).to(self.transformer.device)

    def generate(self, prompts, seeds, num_inference_steps: int = 30, guidance_scale: float = 3.0) -> np.ndarray:
        """[B] prompts and seeds -> [B, H, W, 3] uint8."""
        return self(prompts, seeds=seeds, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)

    def noise_schedule(self) -> NoiseSchedule:
        """The training-time noise schedule matching this pipeline's scheduler."""
        if self.is_flow:
            return NoiseSchedule(prediction_type="flow", shift=float(self.scheduler.config.shift))
        return NoiseSchedule.from_scheduler(self.scheduler)

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Prompts -> conditioning: ``encoder_hidden_states`` [B, L, D] and ``pooled`` [B, D]."""
        ids = self.tokenizer(
            list(prompts), padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
        ).input_ids.to(self.text_encoder.device)
        out = self.text_encoder(ids)
        return {"encoder_hidden_states": out.last_hidden_state, "pooled": out.pooler_output}

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """The network's prediction [B, 3, H, W] (velocity for flow, epsilon for pixart) at x_t, t [B]."""
        if self.is_flow:
            return self.transformer(
                hidden_states=x_t, encoder_hidden_states=cond["encoder_hidden_states"],
                pooled_projections=cond["pooled"], timestep=t, return_dict=False,
            )[0]
        out = self.transformer(
            hidden_states=x_t, encoder_hidden_states=cond["encoder_hidden_states"], timestep=t,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False,
        )[0]
        return out[:, :3]  # PixArt may predict variance channels too

    @torch.no_grad()
    def __call__(
        self,
        prompts: list[str] | str,
        seeds: list[int] | int = 0,
        num_inference_steps: int = 30,
        guidance_scale: float = 3.0,
        batch_size: int = 64,
    ) -> np.ndarray:
        """Generate one image per prompt -> [B, H, W, 3] uint8.

        Each image's initial noise comes from its own seed, so (prompt, seed) gives the same image
        whatever batch it is generated in.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        seeds = [seeds + i for i in range(len(prompts))] if isinstance(seeds, int) else list(seeds)
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        return np.concatenate(
            [self._generate(prompts[i:i + batch_size], seeds[i:i + batch_size], num_inference_steps, guidance_scale)
             for i in range(0, len(prompts), batch_size)]
        ) if prompts else np.zeros((0, self.resolution, self.resolution, 3), np.uint8)

    def _generate(self, prompts, seeds, steps, guidance):
        res, dev = self.resolution, self.transformer.device
        x = torch.stack(
            [torch.randn(3, res, res, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        ).to(dev)
        cfg = guidance != 1.0
        cond = self.encode_prompts(prompts + [""] * len(prompts) if cfg else prompts)
        self.scheduler.set_timesteps(steps, device=dev)
        x = x * getattr(self.scheduler, "init_noise_sigma", 1.0)
        for t in self.scheduler.timesteps:
            x_in = torch.cat([x, x]) if cfg else x
            x_in = self.scheduler.scale_model_input(x_in, t) if hasattr(self.scheduler, "scale_model_input") else x_in
            pred = self.predict(x_in, t.expand(x_in.shape[0]).to(dev), cond)
            if cfg:
                p_cond, p_uncond = pred.chunk(2)
                pred = p_uncond + guidance * (p_cond - p_uncond)
            x = self.scheduler.step(pred, t, x, return_dict=False)[0]
        return x0_to_images(x)
