"""The shapes base model: a stock diffusers ``StableDiffusionPipeline`` small enough to train on a CPU.

Components (all stock classes, built locally, no hub): an ``AutoencoderKL`` (downsampling 4 at
32 x 32, so 8 x 8 x 4 latents), a ``UNet2DConditionModel`` on those latents, a tiny transformers
``CLIPTextModel`` and a word-level tokenizer over the grammar's vocabulary (``tokenizers`` wrapped
as a ``PreTrainedTokenizerFast``). The denoiser is trained by flow matching (velocity target,
``raypref.diffusion.NoiseSchedule("flow")``); the scheduler is DPM-Solver++ with flow sigmas, which
``StableDiffusionPipeline`` drives like any SD1.5 scheduler. So the project loads it through the
same adapter as a real SD1.5 checkpoint (``raypref.models.SD15Adapter``).

Why latents and a UNet: on these CPUs a convolutional denoiser on a tiny VAE's latents learned the
shapes' geometry far faster than pixel- or latent-space transformers (docs/results.md, pilots).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from raypref.shapes.grammar import VOCAB

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")  # ids 0..3; eos != 2 (CLIP's legacy pooling rule)
MAX_TOKENS = 12  # the longest prompt has 7 words


@dataclass(frozen=True)
class ModelSize:
    """Architecture of a shapes model: image resolution, VAE, UNet and text encoder widths."""

    resolution: int
    vae_channels: tuple[int, ...]  # one encoder/decoder block each; downsampling 2 ** (len - 1)
    vae_groups: int
    latent_channels: int
    unet_channels: tuple[int, ...]  # cross-attention in every block but the lowest
    unet_groups: int
    attention_head_dim: int
    text_hidden: int
    text_layers: int
    # which UNet blocks, top to bottom, have (self- and cross-) attention; () = all but the lowest.
    # Self-attention over 16 x 16 latents costs 2.5 x a whole 8 x 8 UNet step on a CPU.
    unet_attention: tuple[bool, ...] = ()

    def __post_init__(self):
        if self.unet_attention and len(self.unet_attention) != len(self.unet_channels):
            raise ValueError(f"unet_attention {self.unet_attention} needs one entry per UNet block "
                             f"({len(self.unet_channels)})")

    @property
    def attention_blocks(self) -> tuple[bool, ...]:
        n = len(self.unet_channels)
        return self.unet_attention or (True,) * (n - 1) + (False,)

    @property
    def latent_size(self) -> int:
        return self.resolution // 2 ** (len(self.vae_channels) - 1)


SIZES = {
    "tiny": ModelSize(resolution=16, vae_channels=(8, 16), vae_groups=8, latent_channels=4, unet_channels=(16, 32),
                      unet_groups=8, attention_head_dim=8, text_hidden=32, text_layers=1),
    "small": ModelSize(resolution=32, vae_channels=(16, 32, 32), vae_groups=16, latent_channels=4,
                       unet_channels=(64, 128, 128), unet_groups=32, attention_head_dim=8, text_hidden=128,
                       text_layers=2),
    # pilots (issue 16): 16 x 16 x 4 latents (VAE downsampling 2), so a square's corner is a latent
    # feature rather than a sub-cell detail; no attention at 16 x 16, so a step costs what small's does
    "latent16": ModelSize(resolution=32, vae_channels=(16, 32), vae_groups=16, latent_channels=4,
                          unet_channels=(32, 64, 128), unet_groups=16, attention_head_dim=8, text_hidden=128,
                          text_layers=2, unet_attention=(False, True, False)),
    "latent16_wide": ModelSize(resolution=32, vae_channels=(16, 32), vae_groups=16, latent_channels=4,
                               unet_channels=(48, 96, 128), unet_groups=16, attention_head_dim=8, text_hidden=128,
                               text_layers=2, unet_attention=(False, True, False)),
    # pilot: twice the latent channels (easier reconstruction, a larger space to denoise)
    "small_z8": ModelSize(resolution=32, vae_channels=(16, 32, 32), vae_groups=16, latent_channels=8,
                          unet_channels=(64, 128, 128), unet_groups=32, attention_head_dim=8, text_hidden=128,
                          text_layers=2),
}


def model_size(size: str | ModelSize) -> ModelSize:
    if isinstance(size, ModelSize):
        return size
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; known: {', '.join(SIZES)}")
    return SIZES[size]


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


def build_text_encoder(size: str | ModelSize, vocab_size: int) -> CLIPTextModel:
    s = model_size(size)
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=s.text_hidden, intermediate_size=2 * s.text_hidden,
        projection_dim=s.text_hidden, num_hidden_layers=s.text_layers, num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    ))


def build_vae(size: str | ModelSize, seed: int = 0) -> AutoencoderKL:
    """A randomly initialised ``AutoencoderKL``; ``scaling_factor`` is set once trained
    (``raypref.pretrain``) so that scaled latents have unit standard deviation."""
    s = model_size(size)
    torch.manual_seed(seed)
    n = len(s.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=s.vae_channels, layers_per_block=1,
        latent_channels=s.latent_channels, norm_num_groups=s.vae_groups, sample_size=s.resolution,
    )


def build_unet(size: str | ModelSize, seed: int = 0) -> UNet2DConditionModel:
    s = model_size(size)
    torch.manual_seed(seed)
    attention = s.attention_blocks
    return UNet2DConditionModel(
        sample_size=s.latent_size, in_channels=s.latent_channels, out_channels=s.latent_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        block_out_channels=s.unet_channels, layers_per_block=1, cross_attention_dim=s.text_hidden,
        attention_head_dim=s.attention_head_dim, norm_num_groups=s.unet_groups,
    )


def build_scheduler() -> DPMSolverMultistepScheduler:
    """Flow matching (sigma = t / 1000, velocity prediction) sampled by DPM-Solver++; unlike
    ``FlowMatchEulerDiscreteScheduler`` it has the ``scale_model_input`` / ``init_noise_sigma``
    that ``StableDiffusionPipeline`` calls."""
    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000, use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=1.0,
        steps_offset=1,  # what StableDiffusionPipeline would rewrite it to (unused by flow sigmas)
    )


def assemble(vae, unet, text_encoder, tokenizer=None, scheduler=None) -> StableDiffusionPipeline:
    """A stock ``StableDiffusionPipeline`` from shapes components (no safety checker)."""
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer or build_tokenizer(), unet=unet,
        scheduler=scheduler or build_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def build_pipeline(size: str | ModelSize = "small", seed: int = 0, vae: AutoencoderKL | None = None):
    """A randomly initialised shapes pipeline (a stock ``StableDiffusionPipeline``); ``vae`` reuses a
    trained autoencoder."""
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    text_encoder = build_text_encoder(size, len(tokenizer))
    return assemble(vae if vae is not None else build_vae(size, seed), build_unet(size, seed), text_encoder,
                    tokenizer)


def encode_text(pipe: StableDiffusionPipeline, prompts: list[str]) -> torch.Tensor:
    """Prompts -> text encoder hidden states [B, L, D] with gradients (for pretraining), tokenised
    exactly as ``StableDiffusionPipeline.encode_prompt`` does."""
    ids = pipe.tokenizer(
        list(prompts), padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    ).input_ids.to(pipe.text_encoder.device)
    return pipe.text_encoder(ids)[0]


def is_shapes_model(path) -> bool:
    """Whether the saved pipeline at ``path`` has the shapes world's word-level tokenizer, so it reads
    grammar prompts only (its other words are [UNK])."""
    f = Path(path) / "tokenizer" / "tokenizer.json"
    if not f.exists():
        return False
    model = json.loads(f.read_text()).get("model", {})
    return model.get("type") == "WordLevel" and set(model.get("vocab", {})) <= set(SPECIAL_TOKENS + VOCAB)
