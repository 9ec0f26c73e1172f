"""The shapes base model: a stock StableDiffusionPipeline (save/load by stock classes, seeded
generation through the SD1.5 adapter, guidance, the flow schedule, the VAE helpers)."""

import json

import numpy as np
import pytest
import torch

from raypref.diffusion import per_sample_error
from raypref.models import SD15Adapter, load_adapter
from raypref.shapes.model import MAX_TOKENS, build_pipeline, build_tokenizer, is_shapes_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = SD15Adapter(build_pipeline("tiny", seed=0))
    path = tmp_path_factory.mktemp("shapes")
    model.save_pretrained(path)
    return model, path


def test_tokenizer_is_word_level_over_the_grammar():
    tok = build_tokenizer()
    ids = tok(["a red circle", ""], padding="max_length", max_length=MAX_TOKENS).input_ids
    assert ids[0][:5] == [2, tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("red"),
                          tok.convert_tokens_to_ids("circle"), 3]
    assert ids[1][:3] == [2, 3, 0]  # the empty prompt (classifier-free guidance) is [BOS][EOS] + padding
    assert tok.convert_tokens_to_ids("dog") == tok.unk_token_id


def test_loads_as_a_stock_pipeline_whose_own_call_generates(tiny):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    _, path = tiny
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["vae"] == ["diffusers", "AutoencoderKL"]
    pipe = DiffusionPipeline.from_pretrained(path)
    assert type(pipe) is StableDiffusionPipeline
    image = pipe("a circle left of a square", num_inference_steps=3).images[0]
    assert image.size == (16, 16)
    assert pipe.tokenizer("a red circle").input_ids == build_tokenizer()("a red circle").input_ids


def test_save_load_round_trip_generates_identically(tiny):
    model, path = tiny
    loaded = load_adapter(path)
    assert type(loaded) is SD15Adapter
    a = model.generate(["a red circle", "two squares"], [3, 4], num_inference_steps=3)
    b = loaded.generate(["a red circle", "two squares"], [3, 4], num_inference_steps=3)
    assert a.shape == (2, 16, 16, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert is_shapes_model(path)


def test_generation_is_seeded_and_batch_independent(tiny):
    model, _ = tiny
    one = model.generate(["a blue square"], [7], num_inference_steps=3)
    batch = model.generate(["a circle", "a blue square", "three triangles"], [1, 7, 2], num_inference_steps=3)
    assert np.abs(one[0].astype(int) - batch[1]).max() <= 1  # batched matmul rounding at most
    assert not np.array_equal(model.generate(["a blue square"], [8], num_inference_steps=3)[0], one[0])


def test_guidance_changes_the_sample(tiny):
    model, _ = tiny
    with_cfg = model.generate(["a blue square"], [7], num_inference_steps=3, guidance_scale=4.0)
    without = model.generate(["a blue square"], [7], num_inference_steps=3, guidance_scale=1.0)
    assert not np.array_equal(with_cfg, without)


def test_training_interface_gives_per_sample_errors(tiny):
    model, _ = tiny
    sched = model.noise_schedule()
    assert sched.prediction_type == "flow"
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    x0 = model.encode_images(images)
    assert x0.shape == (4, 4, 8, 8)  # the tiny VAE downsamples by 2
    noise = torch.randn_like(x0)
    t = sched.sample_timesteps(4, generator=torch.Generator().manual_seed(0))
    pred = model.predict(sched.add_noise(x0, noise, t), t, model.encode_prompts(["a circle"] * 4))
    err = per_sample_error(pred, sched.target(x0, noise, t))
    assert err.shape == (4,) and torch.isfinite(err).all()
    assert model.denoiser is model.pipe.unet


def test_encode_text_matches_the_pipelines_prompt_encoding(tiny):
    """Pretraining conditions the UNet on exactly what StableDiffusionPipeline.encode_prompt gives."""
    from raypref.shapes.model import encode_text

    model, _ = tiny
    prompts = ["a red circle", "", "four triangles"]
    with torch.no_grad():
        ours = encode_text(model.pipe, prompts)
    torch.testing.assert_close(ours, model.encode_prompts(prompts)["encoder_hidden_states"], rtol=0, atol=0)


def test_is_shapes_model_tells_a_grammar_tokenizer_from_others(tmp_path):
    from tests.test_models import build_sd15

    build_sd15().save_pretrained(tmp_path / "sd15")
    assert not is_shapes_model(tmp_path / "sd15")
    assert not is_shapes_model(tmp_path / "missing")


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown model size"):
        build_pipeline("huge")
    model = SD15Adapter(build_pipeline("tiny"))
    with pytest.raises(ValueError, match="seeds"):
        model.generate(["a circle", "a square"], [1])


def test_unet_attention_layout_follows_the_size():
    """Default: attention in every block but the lowest; a size may drop it where it is costly (16 x 16)."""
    from dataclasses import replace

    from raypref.shapes.model import SIZES, build_unet

    assert build_unet("tiny").config.down_block_types == ("CrossAttnDownBlock2D", "DownBlock2D")
    unet = build_unet("latent16")
    assert unet.config.sample_size == 16
    assert unet.config.down_block_types == ("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    assert unet.config.up_block_types == ("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    with pytest.raises(ValueError, match="one entry per UNet block"):
        build_unet(replace(SIZES["tiny"], unet_attention=(True,)))


def test_shapes_eval_cli_on_a_checkpoint(tiny, tmp_path, capsys):
    from raypref.cli import main as cli_main
    from raypref.shapes.evaluate import rescore_dir

    _, path = tiny
    out = tmp_path / "e"
    args = [
        "shapes-eval",
        "--generator",
        f"checkpoint:{path}",
        "--n-per-category",
        "2",
        "--steps",
        "2",
        "--out",
        str(out),
    ]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert f"checkpoint:{path}" in printed
    scores = json.loads((out / "scores.json").read_text())
    assert scores["n"] == 12 and rescore_dir(out)["categories"] == scores["categories"]
    assert cli_main(["shapes-eval", "--generator", f"checkpoint:{tmp_path}/missing", "--n-per-category", "1"]) == 2
    assert "no diffusers pipeline" in capsys.readouterr().err
    assert cli_main(["shapes-eval", "--rescore", str(out)]) == 0  # the same figures, from the PNGs alone
    assert f"| {scores['overall']:.3f} |" in capsys.readouterr().out
    assert cli_main(["shapes-eval", "--rescore", str(tmp_path / "missing")]) == 2
    assert "not an evaluation set" in capsys.readouterr().err


def test_shipped_base_model_loads_generates_and_fits_the_budget():
    """The packaged base model (docs/results.md): a stock StableDiffusionPipeline under 40 MB of
    safetensors that loads by name and generates seeded 32 x 32 images."""
    from raypref.checkpoints import SHIPPED_BASE
    from raypref.generators import PipelineGenerator

    weights = sum(p.stat().st_size for p in SHIPPED_BASE.rglob("*.safetensors"))
    assert 0 < weights <= 40 * 2**20
    assert json.loads((SHIPPED_BASE / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    gen = PipelineGenerator("shipped", num_inference_steps=4)
    prompts = ["a red circle", "two squares"]
    a, b = gen.generate(prompts, [0, 1]), gen.generate(prompts, [0, 1])
    assert a.shape == (2, 32, 32, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(a[0], gen.generate(prompts[:1], [2])[0])
