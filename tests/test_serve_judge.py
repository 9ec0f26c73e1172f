"""The judge as a Ray Serve deployment: same answers through a handle, a Ray task and HTTP;
dynamic batching; malformed requests rejected with a 4xx that says why, without taking it down."""

import os
import socket
import sys

import numpy as np
import pytest
import requests

from raypref.judges import ShapesJudge
from raypref.judges.common import encode_png_b64
from raypref.shapes.grammar import eval_prompts
from raypref.shapes.teachers import Teacher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BACKEND = {"error_rate": 0.25, "seed": 3}  # noisy on purpose: answers must still match a local judge


@pytest.fixture(scope="module")
def judge_app(ray_local):
    from ray import serve

    from raypref.serving.judge import build_judge_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_judge_app(
        "shapes", BACKEND, num_cpus=0.5, max_batch_size=8, batch_wait_timeout_s=0.1,
        autoscaling_config={"min_replicas": 1, "max_replicas": 1},
    )
    handle = serve.run(app, name="judge", route_prefix="/judge")
    yield handle, f"http://127.0.0.1:{port}/judge"
    serve.shutdown()


@pytest.fixture(scope="module")
def renders():
    teacher = Teacher("vellum")  # a mix of passing and failing renders
    return [
        (p, teacher.render_one(p, i), teacher.render_one(p, i + 100)) for i, (_, p) in enumerate(eval_prompts(2, 4))
    ]


def _post(url, op, payload):
    return requests.post(f"{url}/{op}", json=payload, timeout=60)


def test_handle_http_and_task_agree_with_local_judge(judge_app, renders):
    import ray

    handle, url = judge_app
    local = ShapesJudge(**BACKEND)

    @ray.remote(num_cpus=0)
    def from_task(h, prompt, images):
        return h.discriminate.remote(prompt, images).result()

    for p, a, b in renders:
        want = local.discriminate(p, [a, b])
        assert handle.discriminate.remote(p, [a, b]).result() == want
        r = _post(url, "discriminate", {"prompt": p, "images": [encode_png_b64(a), encode_png_b64(b)]})
        assert r.status_code == 200 and r.json() == {"index": want}
        qs = local.questions(p)
        assert handle.questions.remote(p).result() == qs
        assert _post(url, "questions", {"prompt": p}).json() == {"questions": qs}
        p_yes = local.vqa(a, qs)
        assert handle.vqa.remote(a, qs).result() == p_yes
        assert _post(url, "vqa", {"image": "data:image/png;base64," + encode_png_b64(a), "questions": qs}).json() == {
            "p_yes": p_yes}
    p, a, b = renders[3]
    assert ray.get(from_task.remote(handle, p, [a, b])) == local.discriminate(p, [a, b])
    out = _post(url, "expand", {"prompt": p, "n": 3}).json()["prompts"]
    assert len(out) == 3 and all(isinstance(x, str) for x in out)
    assert isinstance(handle.mutate.remote().result(), str)


def test_concurrent_requests_are_batched(judge_app, renders):
    handle, _ = judge_app
    before = len(handle.stats.remote().result()["batch_sizes"])
    local = ShapesJudge(**BACKEND)
    responses = [handle.discriminate.remote(p, [a, b]) for p, a, b in renders]  # all in flight at once
    assert [r.result() for r in responses] == [local.discriminate(p, [a, b]) for p, a, b in renders]
    stats = handle.stats.remote().result()
    sizes = stats["batch_sizes"][before:]
    assert sum(sizes) == len(renders)
    assert max(sizes) > 1, sizes
    assert max(sizes) <= 8  # max_batch_size
    assert stats["calls"] >= len(renders)


def test_malformed_requests_get_4xx_and_the_deployment_stays_up(judge_app, renders):
    handle, url = judge_app
    p, a, b = renders[0]
    def error(r, status):  # OpenAI's error shape, the message naming what was wrong
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        return err["message"]

    bad = requests.post(f"{url}/discriminate", data=b"{not json", timeout=60)
    assert "not valid JSON" in error(bad, 400)
    assert "'prompt'" in error(_post(url, "discriminate", {"images": [encode_png_b64(a)]}), 400)
    r = _post(url, "discriminate", {"prompt": p, "images": [encode_png_b64(a), "aGVsbG8="]})
    assert "images[1]" in error(r, 400) and "PNG" in error(r, 400)
    r = _post(url, "discriminate", {"prompt": "a purple cow", "images": [encode_png_b64(a)]})
    assert "not in the shapes grammar" in error(r, 400)
    r = _post(url, "vqa", {"image": encode_png_b64(a), "questions": ["is it a dog?"]})
    assert "not one the shapes judge asks" in error(r, 400)
    assert "'n'" in error(_post(url, "expand", {"prompt": p, "n": "three"}), 400)
    assert "unknown op" in error(_post(url, "paint", {}), 404)
    assert "takes POST" in error(requests.get(f"{url}/discriminate", timeout=60), 405)
    with pytest.raises(ValueError, match="uint8"):
        handle.discriminate.remote(p, [a.astype(np.float32)]).result()
    # still serving, through both paths
    want = ShapesJudge(**BACKEND).discriminate(p, [a, b])
    assert _post(url, "discriminate", {"prompt": p, "images": [encode_png_b64(a), encode_png_b64(b)]}).json() == {
        "index": want
    }
    assert handle.discriminate.remote(p, [a, b]).result() == want


def test_build_args_and_llm_config_example():
    """The GPU config example validates as a Serve config and its judge app builds (without
    importing ray.serve.llm or vllm); bad build arguments are rejected by name."""
    import yaml
    from ray.serve.deployment import Application
    from ray.serve.schema import ServeDeploySchema

    from raypref.serving.judge import app_builder, build_judge_app

    with open(os.path.join(ROOT, "serve", "llm_judge_example.yaml")) as f:
        cfg = yaml.safe_load(f)
    schema = ServeDeploySchema.model_validate(cfg)
    apps = {a.name: a for a in schema.applications}
    assert apps["vlm"].import_path == "ray.serve.llm:build_openai_app"
    assert apps["judge"].import_path == "raypref.serving.judge:app_builder"
    llm = apps["vlm"].args["llm_configs"][0]
    judge_args = apps["judge"].args
    assert judge_args["backend"] == "openai"
    assert judge_args["backend_kwargs"]["model"] == llm["model_loading_config"]["model_id"]
    assert isinstance(app_builder(judge_args), Application)
    assert "ray.serve.llm" not in sys.modules and "vllm" not in sys.modules
    with pytest.raises(ValueError, match="max_batch_size"):
        build_judge_app(max_batch_size=0)
