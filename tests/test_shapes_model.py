"""The shapes base model: a real diffusers pipeline (save/load, seeded generation, guidance, schedules)."""

import numpy as np
import pytest
import torch

from raypref.diffusion import per_sample_error
from raypref.shapes.model import MAX_TOKENS, ShapesPipeline, build_pipeline, build_tokenizer, images_to_x0, x0_to_images


@pytest.fixture(scope="module", params=["sd3", "pixart"])
def tiny(request, tmp_path_factory):
    pipe = build_pipeline("tiny", request.param, seed=0)
    path = tmp_path_factory.mktemp(request.param)
    pipe.save_pretrained(path)
    return pipe, path


def test_tokenizer_is_word_level_over_the_grammar():
    tok = build_tokenizer()
    ids = tok(["a red circle", ""], padding="max_length", max_length=MAX_TOKENS).input_ids
    assert ids[0][:5] == [2, tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("red"),
                          tok.convert_tokens_to_ids("circle"), 3]
    assert ids[1][:3] == [2, 3, 0]  # the empty prompt (classifier-free guidance) is [BOS][EOS] + padding
    assert tok.convert_tokens_to_ids("dog") == tok.unk_token_id


def test_save_load_round_trip_generates_identically(tiny):
    pipe, path = tiny
    loaded = ShapesPipeline.from_pretrained(path)
    assert type(loaded.transformer) is type(pipe.transformer)
    a = pipe(["a red circle", "two squares"], seeds=[3, 4], num_inference_steps=3)
    b = loaded(["a red circle", "two squares"], seeds=[3, 4], num_inference_steps=3)
    assert a.shape == (2, 16, 16, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)


def test_components_load_with_stock_classes(tiny):
    import json

    from diffusers import AutoModel, SchedulerMixin
    from transformers import AutoTokenizer, CLIPTextModel

    pipe, path = tiny
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == "ShapesPipeline"
    assert index["transformer"][0] == "diffusers" and index["text_encoder"] == ["transformers", "CLIPTextModel"]
    transformer = AutoModel.from_pretrained(str(path), subfolder="transformer")
    assert type(transformer) is type(pipe.transformer)
    assert CLIPTextModel.from_pretrained(path / "text_encoder").config.eos_token_id == 3
    loaded_tok = AutoTokenizer.from_pretrained(path / "tokenizer")
    assert loaded_tok("a red circle").input_ids == pipe.tokenizer("a red circle").input_ids
    assert isinstance(type(pipe.scheduler).from_pretrained(str(path), subfolder="scheduler"), SchedulerMixin)


def test_generation_is_seeded_and_batch_independent(tiny):
    pipe, _ = tiny
    one = pipe(["a blue square"], seeds=[7], num_inference_steps=3)
    batch = pipe(["a circle", "a blue square", "three triangles"], seeds=[1, 7, 2], num_inference_steps=3)
    assert np.array_equal(one[0], batch[1])
    assert not np.array_equal(pipe(["a blue square"], seeds=[8], num_inference_steps=3)[0], one[0])


def test_guidance_changes_the_sample(tiny):
    pipe, _ = tiny
    with_cfg = pipe(["a blue square"], seeds=[7], num_inference_steps=3, guidance_scale=4.0)
    without = pipe(["a blue square"], seeds=[7], num_inference_steps=3, guidance_scale=1.0)
    assert not np.array_equal(with_cfg, without)


def test_training_interface_gives_per_sample_errors(tiny):
    pipe, _ = tiny
    sched = pipe.noise_schedule()
    assert sched.prediction_type == ("flow" if pipe.is_flow else "epsilon")
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    x0 = pipe.encode_images(images)
    assert x0.shape == (4, 3, 16, 16) and x0.min() >= -1 and x0.max() <= 1
    noise = torch.randn_like(x0)
    t = sched.sample_timesteps(4, generator=torch.Generator().manual_seed(0))
    pred = pipe.predict(sched.add_noise(x0, noise, t), t, pipe.encode_prompts(["a circle"] * 4))
    err = per_sample_error(pred, sched.target(x0, noise, t))
    assert err.shape == (4,) and torch.isfinite(err).all()
    assert pipe.denoiser is pipe.transformer


def test_pixel_conversion_round_trips():
    im = np.random.default_rng(1).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    assert np.array_equal(x0_to_images(images_to_x0(im)), im)
    with pytest.raises(ValueError):
        images_to_x0(im.astype(np.float32))


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown model size"):
        build_pipeline("huge")
    with pytest.raises(ValueError, match="unknown family"):
        build_pipeline("tiny", "unet")
    pipe = build_pipeline("tiny")
    with pytest.raises(ValueError, match="seeds"):
        pipe(["a circle", "a square"], seeds=[1])


def test_shapes_eval_cli_on_a_checkpoint(tiny, tmp_path, capsys):
    import json

    from raypref.cli import main as cli_main
    from raypref.shapes.evaluate import rescore_dir

    pipe, path = tiny
    if not pipe.is_flow:
        pytest.skip("one family is enough for the CLI path")
    out = tmp_path / "e"
    args = ["shapes-eval", "--generator", f"checkpoint:{path}", "--n-per-category", "2", "--steps", "2", "--out", str(out)]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert f"checkpoint:{path}" in printed
    scores = json.loads((out / "scores.json").read_text())
    assert scores["n"] == 12 and rescore_dir(out)["categories"] == scores["categories"]
    assert cli_main(["shapes-eval", "--generator", f"checkpoint:{tmp_path}/missing", "--n-per-category", "1"]) == 2
    assert "no diffusers pipeline" in capsys.readouterr().err


def test_shipped_base_model_loads_generates_and_fits_the_budget():
    """The packaged base model (docs/results.md): a diffusers pipeline under 20 MB of safetensors that
    loads by name and generates seeded 32 x 32 images."""
    from raypref.generators import SHIPPED_BASE, PipelineGenerator

    weights = sum(p.stat().st_size for p in SHIPPED_BASE.rglob("*.safetensors"))
    assert 0 < weights <= 20 * 2**20
    gen = PipelineGenerator("shipped", num_inference_steps=4)
    prompts = ["a red circle", "two squares"]
    a, b = gen.generate(prompts, [0, 1]), gen.generate(prompts, [0, 1])
    assert a.shape == (2, 32, 32, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(a[0], gen.generate(prompts[:1], [2])[0])
