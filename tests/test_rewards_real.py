"""Real reward models on tiny random-weight models built here and saved to a temp dir.

Nothing is downloaded: the open_clip model uses the BPE vocab shipped inside open_clip, the
transformers CLIP gets a byte-level tokenizer written here.
"""

import json

import numpy as np
import open_clip
import pytest
import torch

from raypref.rewards import REWARDS, build_reward
from raypref.rewards.aesthetic import AestheticMLP, LaionAesthetic
from raypref.rewards.clip import ClipScore
from raypref.rewards.hps import HPSv2
from raypref.rewards.imagereward import ImageRewardScore
from raypref.rewards.pickscore import PickScore

TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    # vocab_size must match open_clip's bundled BPE tokenizer (49408 tokens).
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
PROMPTS = np.array(["a red square", "two blue circles on the left", "a green triangle"])


def _images(seed=0, b=3, h=40, w=48):
    # Non-square so the resize + center-crop path is exercised.
    return np.random.default_rng(seed).integers(0, 256, size=(b, h, w, 3), dtype=np.uint8)


def _batch(seed=0):
    return {"prompt": PROMPTS.copy(), "image": _images(seed), "id": np.arange(3)}


# ---------------------------------------------------------------- tiny models on disk


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    d = tmp_path_factory.mktemp("open_clip")
    cfg_path = d / "raypref-tiny-clip.json"
    cfg_path.write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(cfg_path)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("raypref-tiny-clip")
    model.eval()
    # Random init gives logit_scale = log(1/0.07); set a distinctive value to check it is loaded.
    with torch.no_grad():
        model.logit_scale.fill_(2.0)
    plain = d / "tiny_clip.pt"
    torch.save(model.state_dict(), plain)
    hps_style = d / "tiny_hps.pt"  # HPSv2 ships {"state_dict": ...}
    torch.save({"state_dict": model.state_dict()}, hps_style)
    local_dir = d / "local"
    local_dir.mkdir()
    (local_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP, "preprocess_cfg": {}}))
    torch.save(model.state_dict(), local_dir / "open_clip_pytorch_model.bin")
    return {
        "model": model,
        "preprocess": preprocess,
        "config": str(cfg_path),
        "ckpt": str(plain),
        "hps_ckpt": str(hps_style),
        "dir": str(local_dir),
    }


def _tiny_clip_tokenizer():
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    # Byte-level BPE with no merges: every byte is a token, plus its end-of-word form.
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = 512
    vocab["<|endoftext|>"] = 513
    return CLIPTokenizer(vocab=vocab, merges=[])


@pytest.fixture(scope="module")
def tiny_hf_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    d = tmp_path_factory.mktemp("pickscore")
    model_dir, proc_dir = d / "model", d / "processor"
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=_tiny_clip_tokenizer(),
    )
    processor.save_pretrained(proc_dir)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=514,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=32,
            bos_token_id=512,
            eos_token_id=513,
            pad_token_id=513,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
        logit_scale_init_value=3.0,
    )
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    model.save_pretrained(model_dir)
    return {"model": model, "processor": processor, "model_dir": str(model_dir), "proc_dir": str(proc_dir), "root": d}


@pytest.fixture(scope="module")
def tiny_aesthetic_head(tmp_path_factory):
    d = tmp_path_factory.mktemp("aesthetic")
    torch.manual_seed(1)
    head = AestheticMLP(TINY_OPEN_CLIP["embed_dim"]).eval()
    path = d / "head.pth"
    torch.save(head.state_dict(), path)
    return {"head": head, "path": str(path), "dir": d}


@pytest.fixture(scope="module")
def rewards(tiny_open_clip, tiny_hf_clip, tiny_aesthetic_head):
    """One instance of each reward, loaded from the files above."""
    return {
        "clip": ClipScore(tiny_open_clip["ckpt"], arch=tiny_open_clip["config"]),
        "clip_dir": ClipScore(tiny_open_clip["dir"], name="clip_dir"),
        "hpsv2": HPSv2(tiny_open_clip["hps_ckpt"], arch=tiny_open_clip["config"]),
        "pickscore": PickScore(tiny_hf_clip["model_dir"], processor_path=tiny_hf_clip["proc_dir"]),
        "aesthetic_laion": LaionAesthetic(
            tiny_aesthetic_head["path"], clip_path=tiny_open_clip["ckpt"], clip_arch=tiny_open_clip["config"]
        ),
    }


ALL = ["clip", "clip_dir", "hpsv2", "pickscore", "aesthetic_laion"]
TEXT = ["clip", "clip_dir", "hpsv2", "pickscore"]


# ---------------------------------------------------------------- generic contract


@pytest.mark.parametrize("key", ALL)
def test_output_column_shape_dtype_and_passthrough(rewards, key):
    reward = rewards[key]
    batch = _batch()
    out = reward(batch)
    col = f"score_{reward.name}"
    assert set(out) == set(batch) | {col}
    assert out is not batch and col not in batch  # input dict not mutated
    for k in batch:
        assert out[k] is batch[k]
    s = out[col]
    assert isinstance(s, np.ndarray) and s.dtype == np.float32 and s.shape == (3,)
    assert np.all(np.isfinite(s))


@pytest.mark.parametrize("key", ALL)
def test_deterministic_and_batch_invariant(rewards, key):
    reward = rewards[key]
    col = f"score_{reward.name}"
    batch = _batch()
    full = reward(batch)[col]
    np.testing.assert_array_equal(reward(_batch())[col], full)
    singles = np.concatenate(
        [reward({"prompt": batch["prompt"][i : i + 1], "image": batch["image"][i : i + 1]})[col] for i in range(3)]
    )
    np.testing.assert_allclose(singles, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("key", ALL)
def test_scores_depend_on_image(rewards, key):
    reward = rewards[key]
    col = f"score_{reward.name}"
    same_prompt = np.array(["a red square"] * 3)
    s = reward({"prompt": same_prompt, "image": _images(seed=5)})[col]
    assert np.ptp(s) > 1e-6
    # Swapping the images permutes the scores (per-row scoring, no cross-row leakage).
    imgs = _images(seed=5)
    s_perm = reward({"prompt": same_prompt, "image": imgs[[2, 0, 1]]})[col]
    np.testing.assert_allclose(s_perm, s[[2, 0, 1]], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("key", TEXT)
def test_text_rewards_depend_on_prompt(rewards, key):
    reward = rewards[key]
    col = f"score_{reward.name}"
    one_image = np.repeat(_images(seed=6)[:1], 3, axis=0)
    s = reward({"prompt": PROMPTS, "image": one_image})[col]
    assert np.ptp(s) > 1e-6


def test_aesthetic_ignores_prompt(rewards):
    reward = rewards["aesthetic_laion"]
    a = reward(_batch())["score_aesthetic_laion"]
    b = reward({"prompt": np.array(["x", "y", "z"]), "image": _images(0)})["score_aesthetic_laion"]
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("key", ALL)
def test_variable_size_images_and_empty_batch(rewards, key):
    reward = rewards[key]
    col = f"score_{reward.name}"
    fixed = _images(seed=3)
    # Ray Data hands ragged images over as an object array.
    ragged = np.empty(3, dtype=object)
    for i in range(3):
        ragged[i] = fixed[i]
    np.testing.assert_allclose(
        reward({"prompt": PROMPTS, "image": ragged})[col], reward({"prompt": PROMPTS, "image": fixed})[col], rtol=1e-6
    )
    mixed = [fixed[0], _images(seed=4, b=1, h=64, w=32)[0]]
    assert reward({"prompt": PROMPTS[:2], "image": mixed})[col].shape == (2,)
    empty = reward({"prompt": np.array([], dtype=str), "image": np.zeros((0, 32, 32, 3), np.uint8)})[col]
    assert empty.shape == (0,) and empty.dtype == np.float32


# ---------------------------------------------------------------- independent references


def _cos_reference(model, preprocess, prompts, images):
    """cos(image, text) straight from the in-memory open_clip model (before it was saved)."""
    from PIL import Image

    tok = open_clip.get_tokenizer("raypref-tiny-clip")
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(Image.fromarray(im)) for im in images]))
        txt = model.encode_text(tok(list(prompts)))
    img = img.numpy() / np.linalg.norm(img.numpy(), axis=1, keepdims=True)
    txt = txt.numpy() / np.linalg.norm(txt.numpy(), axis=1, keepdims=True)
    return (img * txt).sum(axis=1)


def test_clip_score_matches_reference(rewards, tiny_open_clip):
    ref = 100.0 * _cos_reference(tiny_open_clip["model"], tiny_open_clip["preprocess"], PROMPTS, _images(0))
    np.testing.assert_allclose(rewards["clip"](_batch())["score_clip"], ref, rtol=1e-4, atol=1e-4)
    # The local-dir layout loads the same weights.
    np.testing.assert_allclose(rewards["clip_dir"](_batch())["score_clip_dir"], ref, rtol=1e-4, atol=1e-4)


def test_hpsv2_matches_hps_score_py(rewards, tiny_open_clip):
    # HPSv2 score.py: diag(image_features @ text_features.T) of the model's output_dict features.
    from PIL import Image

    model, pre = tiny_open_clip["model"], tiny_open_clip["preprocess"]
    images = _images(0)
    tok = open_clip.get_tokenizer("raypref-tiny-clip")
    model.output_dict = True
    try:
        with torch.no_grad():
            out = model(torch.stack([pre(Image.fromarray(im)) for im in images]), tok(list(PROMPTS)))
    finally:
        model.output_dict = False
    ref = torch.diagonal(out["image_features"] @ out["text_features"].T).numpy()
    np.testing.assert_allclose(rewards["hpsv2"](_batch())["score_hpsv2"], ref, rtol=1e-4, atol=1e-5)
    assert np.all(np.abs(ref) <= 1.0)
    # An open_clip directory works too; the default arch="ViT-H-14" is then ignored.
    np.testing.assert_allclose(HPSv2(tiny_open_clip["dir"])(_batch())["score_hpsv2"], ref, rtol=1e-4, atol=1e-5)


def test_pickscore_matches_clipmodel_forward(rewards, tiny_hf_clip):
    # PickScore README: logit_scale.exp() * cos  ==  diag(CLIPModel(...).logits_per_image).
    from PIL import Image

    model, processor = tiny_hf_clip["model"], tiny_hf_clip["processor"]
    inputs = processor(
        text=list(PROMPTS), images=[Image.fromarray(im) for im in _images(0)], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        ref = torch.diagonal(model(**inputs).logits_per_image).numpy()
    got = rewards["pickscore"](_batch())["score_pickscore"]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    # logit_scale was initialised to 3.0: |score| <= e^3 (cosine in [-1, 1]).
    assert np.all(np.abs(got) <= np.exp(3.0) + 1e-4)


def test_aesthetic_matches_head_on_normalised_embedding(rewards, tiny_open_clip, tiny_aesthetic_head):
    from PIL import Image

    model, pre = tiny_open_clip["model"], tiny_open_clip["preprocess"]
    with torch.no_grad():
        emb = model.encode_image(torch.stack([pre(Image.fromarray(im)) for im in _images(0)])).numpy()
        emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)  # L2-normalised, as the predictor expects
        ref = tiny_aesthetic_head["head"](torch.from_numpy(emb)).squeeze(-1).numpy()
    np.testing.assert_allclose(
        rewards["aesthetic_laion"](_batch())["score_aesthetic_laion"], ref, rtol=1e-4, atol=1e-5
    )


def test_aesthetic_mlp_layout_matches_released_keys():
    # sac+logos+ava1-l14-linearMSE.pth holds exactly these keys and shapes (for 768-d ViT-L/14).
    sd = AestheticMLP(768).state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes == {
        "layers.0.weight": (1024, 768), "layers.0.bias": (1024,),
        "layers.2.weight": (128, 1024), "layers.2.bias": (128,),
        "layers.4.weight": (64, 128), "layers.4.bias": (64,),
        "layers.6.weight": (16, 64), "layers.6.bias": (16,),
        "layers.7.weight": (1, 16), "layers.7.bias": (1,),
    }


# ---------------------------------------------------------------- errors


def test_bad_paths_give_clear_errors(tmp_path, tiny_open_clip, tiny_hf_clip, tiny_aesthetic_head):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="nope"):
        ClipScore(missing, arch=tiny_open_clip["config"])
    with pytest.raises(FileNotFoundError, match="nope"):
        HPSv2(missing)
    with pytest.raises(FileNotFoundError, match="nope"):
        PickScore(missing)
    with pytest.raises(FileNotFoundError, match="nope"):
        PickScore(tiny_hf_clip["model_dir"], processor_path=missing)
    with pytest.raises(FileNotFoundError, match="nope"):
        LaionAesthetic(missing, clip_path=tiny_open_clip["ckpt"], clip_arch=tiny_open_clip["config"])
    with pytest.raises(FileNotFoundError, match="nope"):
        LaionAesthetic(tiny_aesthetic_head["path"], clip_path=missing, clip_arch=tiny_open_clip["config"])
    with pytest.raises(FileNotFoundError, match="nope.json"):
        ClipScore(tiny_open_clip["ckpt"], arch=str(tmp_path / "nope.json"))
    # A directory without open_clip_config.json / without weights.
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        ClipScore(str(empty))
    with pytest.raises(FileNotFoundError, match="config.json"):
        PickScore(str(empty))
    (empty / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP}))
    with pytest.raises(FileNotFoundError, match="no weights"):
        ClipScore(str(empty))


def test_bad_arch_and_mismatched_weights(tmp_path, tiny_open_clip, tiny_aesthetic_head):
    with pytest.raises(ValueError, match="arch="):
        ClipScore(tiny_open_clip["ckpt"])
    with pytest.raises(ValueError, match="unknown open_clip architecture 'ViT-Nope'"):
        ClipScore(tiny_open_clip["ckpt"], arch="ViT-Nope")
    # A checkpoint for another architecture fails loudly, not silently random.
    other = dict(TINY_OPEN_CLIP, embed_dim=8)
    other_cfg = tmp_path / "raypref-tiny-clip-8.json"
    other_cfg.write_text(json.dumps(other))
    with pytest.raises(RuntimeError, match="could not load open_clip model"):
        ClipScore(tiny_open_clip["ckpt"], arch=str(other_cfg))
    # Aesthetic head for 768-d embeddings on a 16-d CLIP.
    big = tmp_path / "head768.pth"
    torch.save(AestheticMLP(768).state_dict(), big)
    with pytest.raises(ValueError, match="768-d embeddings"):
        LaionAesthetic(str(big), clip_path=tiny_open_clip["ckpt"], clip_arch=tiny_open_clip["config"])
    not_head = tmp_path / "not_head.pth"
    torch.save({"w": torch.zeros(2)}, not_head)
    with pytest.raises(ValueError, match="layers.0.weight"):
        LaionAesthetic(str(not_head), clip_path=tiny_open_clip["ckpt"], clip_arch=tiny_open_clip["config"])


def test_bad_batches(rewards):
    reward = rewards["clip"]
    with pytest.raises(ValueError, match="'image'"):
        reward({"prompt": PROMPTS})
    with pytest.raises(ValueError, match="'prompt'"):
        reward({"image": _images(0)})
    with pytest.raises(ValueError, match="uint8"):
        reward({"prompt": PROMPTS, "image": _images(0).astype(np.float32)})
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        reward({"prompt": PROMPTS, "image": _images(0)[..., :1]})
    with pytest.raises(ValueError, match="3 prompts but 2 images"):
        reward({"prompt": PROMPTS, "image": _images(0)[:2]})
    with pytest.raises(ValueError, match="identifier"):
        ClipScore("unused", name="bad name")


def test_imagereward_missing_package_message(tmp_path):
    try:
        import ImageReward  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install image-reward"):
            ImageRewardScore(str(tmp_path / "ImageReward.pt"), med_config=str(tmp_path / "med_config.json"))
    else:
        with pytest.raises(FileNotFoundError, match="ImageReward.pt"):
            ImageRewardScore(str(tmp_path / "ImageReward.pt"), med_config=str(tmp_path / "med_config.json"))


# ---------------------------------------------------------------- registry


def test_registry_and_build_reward(tiny_open_clip):
    for key in ("clip", "pickscore", "hpsv2", "aesthetic_laion", "imagereward", "faithfulness", "aesthetic"):
        assert key in REWARDS
    reward = build_reward("clip", model_path=tiny_open_clip["ckpt"], arch=tiny_open_clip["config"], name="clip_b")
    assert isinstance(reward, ClipScore)
    assert "score_clip_b" in reward(_batch())
    with pytest.raises(ValueError, match=r"unknown reward 'nope'.*'clip'"):
        build_reward("nope")
    # Each class's default name is its registry key (so the column is score_<key>).
    import inspect

    for key, cls in REWARDS.items():
        default = inspect.signature(cls.__init__).parameters["name"].default
        assert default == key, (key, default)


# ---------------------------------------------------------------- Ray Data


def test_runs_in_ray_data_map_batches(tiny_open_clip):
    # The actor process must re-register the custom open_clip config from its path by itself.
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        images = _images(seed=7, b=5)
        prompts = [f"prompt number {i}" for i in range(5)]
        ds = ray.data.from_items(
            [{"prompt": p, "image": im, "id": i} for i, (p, im) in enumerate(zip(prompts, images))]
        )
        rows = ds.map_batches(
            ClipScore,
            fn_constructor_kwargs=dict(model_path=tiny_open_clip["ckpt"], arch=tiny_open_clip["config"]),
            batch_size=2,
            concurrency=1,
            batch_format="numpy",
        ).take_all()
    finally:
        if started:
            ray.shutdown()
    rows = sorted(rows, key=lambda r: r["id"])
    assert [r["prompt"] for r in rows] == prompts
    direct = ClipScore(tiny_open_clip["ckpt"], arch=tiny_open_clip["config"])(
        {"prompt": np.array(prompts), "image": images}
    )
    np.testing.assert_allclose([r["score_clip"] for r in rows], direct["score_clip"], rtol=1e-4, atol=1e-4)
