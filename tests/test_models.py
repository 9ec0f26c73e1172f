"""raypref.models on tiny random-weight pipelines of every family, built here and saved to a temp dir
(as diffusers' own fast tests build them; tokenizers are built locally, nothing is downloaded)."""

import json
import shutil
import string

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from raypref.diffusion import per_sample_error
from raypref.models import (
    ADAPTERS,
    PixArtAdapter,
    SD3Adapter,
    SD15Adapter,
    SDXLAdapter,
    images_to_pixels,
    load_adapter,
)

PROMPTS = ["a red cube", "two blue balls left of the cube"]
RES = 32  # pixels; every tiny VAE downsamples by 2 -> 16 x 16 latents
SD3_SHIFT_FACTOR, SD3_SCALING = 0.0609, 1.5035  # the diffusers SD3 test VAE's values
DEFAULT_SCALING = 0.18215  # AutoencoderKL's default (SD1.x)

# family -> (adapter class, prediction type, text sequence length of encode_prompts)
EXPECTED = {
    "sd15": (SD15Adapter, "epsilon", 77),
    "sd2": (SD15Adapter, "v_prediction", 77),
    "sdxl": (SDXLAdapter, "epsilon", 77),
    "pixart": (PixArtAdapter, "epsilon", 120),
    "pixart_sigma": (PixArtAdapter, "epsilon", 300),
    "sd3": (SD3Adapter, "flow", 77 + 256),
}
FAMILIES = list(EXPECTED)


# ------------------------------------------------------------------------------- tiny components
def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: 256 printable stand-ins for the 256 byte values."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def clip_tokenizer() -> CLIPTokenizer:
    """A real byte-level BPE CLIPTokenizer with a tiny vocabulary (single bytes + a few merges)."""
    chars = _bytes_to_unicode()
    merges = [("r", "e"), ("t", "h"), ("th", "e</w>"), ("c", "u"), ("cu", "b"), ("cub", "e</w>")]
    vocab = {}
    for tok in [*chars, *(c + "</w>" for c in chars), *(a + b for a, b in merges), "<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(tok, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def t5_tokenizer() -> T5Tokenizer:
    """A real Unigram T5Tokenizer over letters and digits."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(c, -3.0) for c in string.ascii_lowercase + string.digits]
    vocab += [("▁" + c, -2.5) for c in string.ascii_lowercase]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def clip_config(tok: CLIPTokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=32, hidden_act="gelu", layer_norm_eps=1e-5,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )


def t5_encoder(tok: T5Tokenizer) -> T5EncoderModel:
    return T5EncoderModel(T5Config(
        vocab_size=len(tok), d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))


def tiny_vae(**kw) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=2,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, sample_size=RES, **kw,
    )


def tiny_unet(**kw) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=RES // 2, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=2, **kw,
    )


def build_sd15():
    torch.manual_seed(0)
    tok = clip_tokenizer()
    return StableDiffusionPipeline(
        unet=tiny_unet(cross_attention_dim=32, attention_head_dim=2), vae=tiny_vae(),
        text_encoder=CLIPTextModel(clip_config(tok)), tokenizer=tok,
        scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def build_sdxl():
    torch.manual_seed(0)
    tok = clip_tokenizer()
    unet = tiny_unet(
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 time ids * 8 + pooled projection dim
        cross_attention_dim=64,  # both encoders' hidden states concatenated
    )
    return StableDiffusionXLPipeline(
        unet=unet, vae=tiny_vae(), text_encoder=CLIPTextModel(clip_config(tok)), tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(clip_config(tok)), tokenizer_2=clip_tokenizer(),
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         steps_offset=1, timestep_spacing="leading"),
        image_encoder=None, feature_extractor=None,
    )


def build_pixart():
    torch.manual_seed(0)
    tok = t5_tokenizer()
    transformer = PixArtTransformer2DModel(
        sample_size=RES // 2, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=3,
        caption_channels=32, in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6,
    )
    return PixArtAlphaPipeline(
        transformer=transformer, vae=tiny_vae(), text_encoder=t5_encoder(tok), tokenizer=tok,
        scheduler=DPMSolverMultistepScheduler(),
    )


def build_sd3():
    torch.manual_seed(0)
    t5_tok = t5_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=RES // 2, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64,
    )
    tok = clip_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        vae=tiny_vae(use_quant_conv=False, use_post_quant_conv=False, shift_factor=SD3_SHIFT_FACTOR,
                     scaling_factor=SD3_SCALING),
        text_encoder=CLIPTextModelWithProjection(clip_config(tok)), tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(clip_config(tok)), tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5_encoder(t5_tok), tokenizer_3=t5_tok,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )


def _set_class_name(path, class_name):
    index = path / "model_index.json"
    config = json.loads(index.read_text())
    config["_class_name"] = class_name
    index.write_text(json.dumps(config))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """family -> directory of a saved tiny pipeline."""
    root = tmp_path_factory.mktemp("pipelines")
    paths = {}
    for family, build in [("sd15", build_sd15), ("sdxl", build_sdxl), ("pixart", build_pixart), ("sd3", build_sd3)]:
        paths[family] = root / family
        build().save_pretrained(paths[family])
    # SD2-style: the same checkpoint with a v_prediction scheduler config.
    paths["sd2"] = root / "sd2"
    shutil.copytree(paths["sd15"], paths["sd2"])
    v_scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction")
    v_scheduler.save_pretrained(paths["sd2"] / "scheduler")
    # PixArt-sigma: the same components under PixArtSigmaPipeline (T5 sequence length 300).
    paths["pixart_sigma"] = root / "pixart_sigma"
    shutil.copytree(paths["pixart"], paths["pixart_sigma"])
    _set_class_name(paths["pixart_sigma"], "PixArtSigmaPipeline")
    return paths


# ------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_generate_encode_predict(family, checkpoints):
    adapter_cls, prediction_type, seq_len = EXPECTED[family]
    adapter = load_adapter(checkpoints[family])
    assert type(adapter) is adapter_cls
    expected_denoiser = adapter.pipe.unet if family in ("sd15", "sd2", "sdxl") else adapter.pipe.transformer
    assert adapter.denoiser is expected_denoiser

    images = adapter.generate(PROMPTS, [11, 12], num_inference_steps=2, height=RES, width=RES)
    assert images.shape == (2, RES, RES, 3) and images.dtype == np.uint8

    # x0 = (VAE posterior mean - shift) * scaling, with hand-known shift/scaling per family.
    x0 = adapter.encode_images(images)
    assert x0.shape == (2, 4, RES // 2, RES // 2) and not x0.requires_grad
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        mean = adapter.pipe.vae.encode(pixels).latent_dist.mean
    shift, scale = (SD3_SHIFT_FACTOR, SD3_SCALING) if family == "sd3" else (0.0, DEFAULT_SCALING)
    torch.testing.assert_close(x0, (mean - shift) * scale)

    schedule = adapter.noise_schedule()
    assert schedule.prediction_type == prediction_type
    g = torch.Generator().manual_seed(0)
    t = schedule.sample_timesteps(2, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    x_t = schedule.add_noise(x0, noise, t)

    cond = adapter.encode_prompts(PROMPTS)
    assert cond["encoder_hidden_states"].shape[:2] == (2, seq_len)
    assert all(not v.requires_grad for v in cond.values())
    pred = adapter.predict(x_t, t, cond)
    assert pred.shape == x_t.shape
    err = per_sample_error(pred, schedule.target(x0, noise, t))
    assert err.shape == (2,) and torch.isfinite(err).all()
    # The error must carry gradient to the denoiser: that is what preference training updates.
    err.sum().backward()
    grads = [p.grad for p in adapter.denoiser.parameters() if p.grad is not None]
    assert grads and any(gr.abs().sum() > 0 for gr in grads)


@pytest.mark.parametrize("family", FAMILIES)
def test_predict_matches_the_stock_pipeline_denoiser_call(family, checkpoints):
    """encode_prompts + predict reproduce the denoiser call inside the stock pipeline (no CFG),
    including SDXL's time ids and pooled embeds and PixArt's attention mask."""
    adapter = load_adapter(checkpoints[family])
    calls = []
    handle = adapter.denoiser.register_forward_hook(
        lambda module, args, kwargs, out: calls.append((args, kwargs, out)), with_kwargs=True
    )
    try:
        # 2 steps: PixArt's 1-step branch indexes a DPMSolver output that does not exist.
        adapter.pipe(prompt=PROMPTS, num_inference_steps=2, guidance_scale=1.0, height=RES, width=RES,
                     generator=torch.Generator().manual_seed(0), output_type="latent", **adapter.call_kwargs)
    finally:
        handle.remove()
    args, kwargs, out = calls[0]
    x_t = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
    t = args[1] if len(args) > 1 else kwargs["timestep"]
    t = t.reshape(-1).expand(x_t.shape[0])
    assert x_t.shape[0] == len(PROMPTS)

    pred = adapter.predict(x_t, t, adapter.encode_prompts(PROMPTS))
    torch.testing.assert_close(pred, out[0][:, : x_t.shape[1]], rtol=1e-5, atol=1e-5)
    # Batch-first conditioning: the second sample alone gives the second row.
    alone = adapter.predict(x_t[1:], t[1:], adapter.encode_prompts(PROMPTS[1:]))
    torch.testing.assert_close(alone, pred[1:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_is_deterministic_per_seed_and_batch_independent(family, checkpoints):
    adapter = load_adapter(checkpoints[family])
    kw = dict(num_inference_steps=2, height=RES, width=RES)
    batch = adapter.generate(PROMPTS, [3, 4], **kw)
    assert np.array_equal(batch, adapter.generate(PROMPTS, [3, 4], **kw))
    alone = adapter.generate(PROMPTS[1:], [4], **kw)[0]
    # Batched vs single matmuls round differently: allow one uint8 level.
    assert np.abs(alone.astype(int) - batch[1].astype(int)).max() <= 1
    other_seed = adapter.generate(PROMPTS[1:], [5], **kw)[0]
    assert np.abs(other_seed.astype(int) - batch[1].astype(int)).max() > 5
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        adapter.generate(PROMPTS, [1], **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_checkpoint_loads_in_stock_diffusers(family, checkpoints, tmp_path):
    adapter = load_adapter(checkpoints[family])
    adapter.save_pretrained(tmp_path / "saved")
    stock = DiffusionPipeline.from_pretrained(tmp_path / "saved")
    assert type(stock) is type(adapter.pipe)
    stock.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=2, guidance_scale=4.0, height=RES, width=RES)
    ours = adapter.generate(PROMPTS[:1], [7], **kw)
    theirs = stock(prompt=PROMPTS[:1], generator=torch.Generator().manual_seed(7), output_type="np",
                   **kw, **adapter.call_kwargs).images
    theirs = (np.clip(theirs, 0, 1) * 255).round().astype(np.uint8)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1
    # ... and it loads back through our loader as the same family.
    assert type(load_adapter(tmp_path / "saved")) is EXPECTED[family][0]


@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl", "pixart"])
def test_noise_schedule_matches_the_scheduler(family, checkpoints):
    adapter = load_adapter(checkpoints[family])
    schedule = adapter.noise_schedule()
    assert schedule.prediction_type == EXPECTED[family][1]
    assert torch.equal(schedule.alphas_cumprod(), adapter.pipe.scheduler.alphas_cumprod)


def test_sd3_noise_schedule_is_shifted_flow(checkpoints):
    schedule = load_adapter(checkpoints["sd3"]).noise_schedule()
    assert (schedule.prediction_type, schedule.shift) == ("flow", 3.0)


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_bfloat16_load_encode_predict(family, checkpoints):
    adapter = load_adapter(checkpoints[family], dtype=torch.bfloat16)
    assert adapter.denoiser.dtype == torch.bfloat16 and adapter.pipe.vae.dtype == torch.bfloat16
    images = np.random.default_rng(0).integers(0, 256, (2, RES, RES, 3), dtype=np.uint8)
    x0 = adapter.encode_images(images).float()
    schedule = adapter.noise_schedule()
    t = schedule.sample_timesteps(2, generator=torch.Generator().manual_seed(0))
    noise = torch.randn_like(x0)
    pred = adapter.predict(schedule.add_noise(x0, noise, t), t, adapter.encode_prompts(PROMPTS))
    assert pred.dtype == torch.bfloat16 and pred.shape == x0.shape
    assert torch.isfinite(per_sample_error(pred, schedule.target(x0, noise, t))).all()


# ------------------------------------------------------------------------------- loading / errors
def test_load_adapter_errors(checkpoints, tmp_path):
    with pytest.raises(ValueError, match="unknown model family 'flux'"):
        load_adapter(checkpoints["sd15"], family="flux")
    # A family that does not match the checkpoint's pipeline class.
    with pytest.raises(ValueError, match="StableDiffusionPipeline"):
        load_adapter(checkpoints["sd15"], family="sdxl")
    # An unknown pipeline class in model_index.json.
    (tmp_path / "flux").mkdir()
    (tmp_path / "flux" / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match="unknown pipeline class 'FluxPipeline'"):
        load_adapter(tmp_path / "flux")
    with pytest.raises(ValueError, match="model_index.json"):
        load_adapter(tmp_path / "missing")
    assert set(ADAPTERS) == {"sd15", "sdxl", "pixart", "sd3"}


def test_adapter_rejects_wrong_pipeline_and_bad_images(checkpoints):
    sd15 = load_adapter(checkpoints["sd15"])
    with pytest.raises(ValueError, match="SDXLAdapter needs one of StableDiffusionXLPipeline"):
        SDXLAdapter(sd15.pipe)
    with pytest.raises(ValueError, match="uint8"):
        sd15.encode_images(np.zeros((1, RES, RES, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        images_to_pixels(np.zeros((RES, RES, 3), np.uint8))
    # Hand-worked pixel mapping: 0 -> -1, 255 -> 1, 51 -> 51/127.5 - 1 = -0.6.
    px = images_to_pixels(np.array([[[[0, 255, 51]]]], np.uint8))
    torch.testing.assert_close(px.flatten(), torch.tensor([-1.0, 1.0, -0.6]))
