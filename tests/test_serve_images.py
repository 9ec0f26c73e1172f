"""The image model as a Ray Serve app with an OpenAI-compatible images API: the official openai client
gets PNGs of the model's size that match the model run locally with the same seeds; bad requests get
a 4xx in OpenAI's error shape and the app keeps serving; 50 concurrent requests succeed (batched);
a LoRA checkpoint is served with its adapter applied. Serve listens on an OS-assigned free port."""

import base64
import io
import os
import socket
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch

from diffusers import StableDiffusionPipeline

from raypref.models import SD15Adapter, load_adapter
from raypref.serving.images import APIError, app_builder, build_images_app, parse_size, validate_request
from raypref.shapes.model import build_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "sk-test-raypref"
STEPS, GUIDANCE = 2, 3.0
PROMPT = "a red circle and a blue square"  # in the shapes grammar: the tiny model is a shapes model
APP_ARGS = dict(num_cpus=0.5, num_replicas=1, api_key=KEY, max_n=3, max_body_kb=2, max_batch_size=8,
                batch_wait_timeout_s=0.05, steps=STEPS, guidance=GUIDANCE)


def _png(b64: str) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    """Same image up to one uint8 level (batched matmuls may round differently)."""
    return a.shape == b.shape and int(np.abs(a.astype(int) - b.astype(int)).max()) <= 1


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny base pipeline, and a LoRA for it (perturbed, so that it changes the images), saved the
    diffusers way; the in-memory LoRA pipeline is the reference for what the server must produce."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    root = tmp_path_factory.mktemp("images")
    build_pipeline("tiny").save_pretrained(str(root / "base"))
    lora_pipe = build_pipeline("tiny")  # same seed: the same base weights
    # lora_alpha == r: a LoRA file without metadata loads back with scale alpha / r = 1
    lora_pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in lora_pipe.unet.named_parameters():
            if "lora_B" in name:  # zero at init: the adapter would be a no-op
                p.copy_(torch.randn(p.shape, generator=g))
    StableDiffusionPipeline.save_lora_weights(
        str(root / "lora"), unet_lora_layers=get_peft_model_state_dict(lora_pipe.unet)
    )
    return {"base": str(root / "base"), "lora": str(root / "lora"), "lora_pipe": SD15Adapter(lora_pipe),
            "base_model": load_adapter(str(root / "base"))}


@pytest.fixture(scope="module")
def server(ray_local, models):
    from ray import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    handle = serve.run(build_images_app(models["base"], **APP_ARGS), name="images", route_prefix="/")
    serve.run(build_images_app(models["base"], models["lora"], name="ImagesLora", **APP_ARGS),
              name="images-lora", route_prefix="/lora")
    yield handle, f"http://127.0.0.1:{port}"
    serve.delete("images")
    serve.delete("images-lora")
    serve.shutdown()


def _client(url, key=KEY):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def _post(url, body=None, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(f"{url}/v1/images/generations", json=body, headers=headers, timeout=120, **kw)


def _reference(model, prompt, seeds):
    return model.generate([prompt] * len(seeds), list(seeds), num_inference_steps=STEPS, guidance_scale=GUIDANCE)


# ---------------------------------------------------------------------------------------------- HTTP
def test_openai_client_gets_the_models_images(server, models):
    _, url = server
    client = _client(url)
    r = client.images.generate(prompt=PROMPT, n=2, size="16x16", response_format="b64_json", extra_body={"seed": 7})
    assert isinstance(r.created, int) and len(r.data) == 2
    images = [_png(d.b64_json) for d in r.data]
    assert all(im.shape == (16, 16, 3) for im in images)
    want = _reference(models["base_model"], PROMPT, [7, 8])  # image i uses seed + i
    assert _close(images[0], want[0]) and _close(images[1], want[1])
    assert not np.array_equal(images[0], images[1])
    # deterministic by seed: the same request again, and image 1 == a request seeded 8
    again = client.images.generate(prompt=PROMPT, n=2, size="16x16", response_format="b64_json",
                                   extra_body={"seed": 7}, model="raypref-images")
    assert all(np.array_equal(_png(d.b64_json), im) for d, im in zip(again.data, images))
    one = client.images.generate(prompt=PROMPT, response_format="b64_json", extra_body={"seed": 8})
    assert len(one.data) == 1 and _close(_png(one.data[0].b64_json), images[1])
    # no seed: a random one, echoed in a header, that reproduces the image
    raw = _post(url, {"prompt": PROMPT})
    assert raw.status_code == 200
    seed = int(raw.headers["x-raypref-seed"])
    assert _close(_png(raw.json()["data"][0]["b64_json"]), _reference(models["base_model"], PROMPT, [seed])[0])
    assert [m.id for m in client.models.list().data] == ["raypref-images"]
    health = requests.get(f"{url}/health", timeout=30)  # no token needed
    assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["size"] == "16x16"


def test_bad_requests_get_4xx_with_a_message_and_the_app_keeps_serving(server):
    import openai

    _, url = server
    cases = [  # (body, key, status, param, words in the message)
        ({"n": 1}, KEY, 400, "prompt", "'prompt' is required"),
        ({"prompt": "  "}, KEY, 400, "prompt", "non-empty"),
        ({"prompt": PROMPT, "n": 0}, KEY, 400, "n", "[1, 3]"),
        ({"prompt": PROMPT, "n": 4}, KEY, 400, "n", "[1, 3]"),
        ({"prompt": PROMPT, "n": "2"}, KEY, 400, "n", "integer"),
        ({"prompt": PROMPT, "size": "32x32"}, KEY, 400, "size", "'16x16' only"),
        ({"prompt": PROMPT, "size": "big"}, KEY, 400, "size", "WIDTHxHEIGHT"),
        ({"prompt": PROMPT, "response_format": "url"}, KEY, 400, "response_format", "b64_json"),
        ({"prompt": PROMPT, "seed": -1}, KEY, 400, "seed", "'seed'"),
        ({"prompt": PROMPT, "model": "dall-e-3"}, KEY, 404, "model", "does not exist"),
        ({"prompt": PROMPT, "steps": 100}, KEY, 400, "steps", "unrecognized"),
        ({"prompt": PROMPT}, "sk-wrong", 401, None, "API key"),
        ({"prompt": PROMPT}, None, 401, None, "API key"),
        ({"prompt": "x" * 4000}, KEY, 413, None, "limit"),  # max_body_kb=2
    ]
    for body, key, status, param, words in cases:
        r = _post(url, body, key=key)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert words in err["message"] and err["param"] == param and err["type"], (body, err)
    r = requests.post(f"{url}/v1/images/generations", data=b"{not json", timeout=60,
                      headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert requests.get(f"{url}/v1/models", timeout=60).status_code == 401
    # the official client surfaces the same errors as its typed exceptions
    with pytest.raises(openai.BadRequestError, match="b64_json"):
        _client(url).images.generate(prompt=PROMPT, response_format="url")
    with pytest.raises(openai.AuthenticationError):
        _client(url, key="sk-wrong").images.generate(prompt=PROMPT)
    # still serving
    r = _post(url, {"prompt": PROMPT, "n": 3, "seed": 1})
    assert r.status_code == 200 and len(r.json()["data"]) == 3


def test_50_concurrent_requests_succeed_and_are_batched(server, models):
    handle, url = server
    before = len(handle.stats.remote().result()["batch_sizes"])
    seeds = list(range(100, 150))
    with ThreadPoolExecutor(max_workers=50) as pool:  # local only, 50 threads
        responses = list(pool.map(lambda s: _post(url, {"prompt": PROMPT, "seed": s}), seeds))
    assert [r.status_code for r in responses] == [200] * 50
    got = [_png(r.json()["data"][0]["b64_json"]) for r in responses]
    want = _reference(models["base_model"], PROMPT, seeds)
    assert all(_close(g, w) for g, w in zip(got, want))
    sizes = handle.stats.remote().result()["batch_sizes"][before:]
    assert sum(sizes) == 50 and max(sizes) > 1 and max(sizes) <= 8, sizes  # max_batch_size=8


def test_lora_checkpoint_is_served_with_its_adapter(server, models):
    _, url = server
    seeds = [3, 4]
    r = _client(f"{url}/lora").images.generate(prompt=PROMPT, n=2, size="16x16", response_format="b64_json",
                                               extra_body={"seed": 3})
    served = [_png(d.b64_json) for d in r.data]
    base = _reference(models["base_model"], PROMPT, seeds)
    with_lora = _reference(models["lora_pipe"], PROMPT, seeds)  # the in-memory adapter that was saved
    assert not any(_close(s, b) for s, b in zip(served, base))  # the adapter changes the images ...
    assert all(_close(s, w) for s, w in zip(served, with_lora))  # ... exactly as it did before saving


# ---------------------------------------------------------------------------------------------- no Ray
def test_validate_request_by_hand():
    kw = dict(size=(16, 16), max_n=4, model_name="m")
    assert validate_request({"prompt": "p", "n": 3, "seed": 5}, **kw) == ("p", [5, 6, 7])
    assert validate_request({"prompt": "p", "size": "16x16", "model": "m", "user": "u"}, **kw)[1][0] >= 0
    assert parse_size("640x480") == (640, 480)
    with pytest.raises(ValueError, match="'16'"):
        parse_size("16")
    with pytest.raises(APIError, match=r"2\*\*63") as e:
        validate_request({"prompt": "p", "n": 2, "seed": 2**63 - 2}, **kw)  # seed + 1 would overflow
    assert e.value.status == 400 and e.value.param == "seed"
    with pytest.raises(APIError, match="JSON object"):
        validate_request(["p"], **kw)


def test_builders_and_serve_config(models):
    """serve/config.yaml validates as a Serve deploy config, both its apps build through their
    builders, and serve run's string arguments are converted; bad build arguments are rejected."""
    import yaml
    from pydantic import ValidationError
    from ray.serve.deployment import Application
    from ray.serve.schema import ServeDeploySchema

    from raypref.serving.judge import app_builder as judge_builder

    with open(os.path.join(ROOT, "serve", "config.yaml")) as f:
        cfg = yaml.safe_load(f)
    schema = ServeDeploySchema.model_validate(cfg)
    assert schema.http_options.host == "127.0.0.1"
    apps = {a.name: a for a in schema.applications}
    assert apps["images"].import_path == "raypref.serving.images:app_builder" and apps["images"].route_prefix == "/"
    assert apps["judge"].import_path == "raypref.serving.judge:app_builder"
    assert isinstance(app_builder(apps["images"].args), Application)
    assert isinstance(judge_builder(apps["judge"].args), Application)
    # `serve run raypref.serving.images:app_builder checkpoint=... num_cpus=0.5 max_n=2` passes strings
    app = app_builder({"checkpoint": models["base"], "num_cpus": "0.5", "max_n": "2", "num_replicas": "1"})
    assert isinstance(app, Application)
    with pytest.raises(ValidationError, match="max_n"):
        app_builder({"max_n": "two"})
    with pytest.raises(ValidationError, match="num_gpu"):
        app_builder({"num_gpu": 1})  # typo'd name
    with pytest.raises(ValueError, match="max_n"):
        build_images_app(max_n=0)
    with pytest.raises(ValueError, match="not both"):
        build_images_app(num_replicas=1, autoscaling_config={"min_replicas": 1, "max_replicas": 2})
    with pytest.raises(ValueError, match="max_body_kb"):
        build_images_app(max_body_kb=0)
