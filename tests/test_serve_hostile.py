"""Both Serve apps under the attacks an outside tester ran (issue #21), each reproduced in small on
loopback: a bad prompt batched with good ones fails only itself; malformed JSON (a 4,301-digit
integer, 3,000-deep nesting) and unknown routes get a 4xx in OpenAI's error shape with no internal
text; stalled bodies neither block the service nor hold it past the body deadline; the judge checks
an image's declared size before decoding it; the judge sits behind the same bearer token and a body
limit; prompts outside the shapes grammar get a 400 from the shapes model."""

import base64
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from raypref.shapes.model import build_pipeline

KEY = "sk-test-hostile"
PROMPT = "a red circle and a blue square"
AUTH = {"Authorization": f"Bearer {KEY}"}
BODY_TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def apps(ray_local, tmp_path_factory):
    from ray import serve

    from raypref.serving.images import build_images_app
    from raypref.serving.judge import build_judge_app

    base = tmp_path_factory.mktemp("hostile") / "base"
    build_pipeline("tiny").save_pretrained(str(base))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # Serve's and the apps' own limits at their defaults: the attacks must fail against what users run
    images = serve.run(build_images_app(str(base), num_cpus=0.5, num_replicas=1, api_key=KEY, steps=2,
                                        batch_wait_timeout_s=0.2, body_timeout_s=BODY_TIMEOUT_S),
                       name="images", route_prefix="/")
    serve.run(build_judge_app("shapes", {}, num_cpus=0.5, autoscaling_config={"min_replicas": 1, "max_replicas": 1},
                              api_key=KEY, max_body_kb=2048, body_timeout_s=BODY_TIMEOUT_S,
                              max_image_pixels=512 * 512, max_request_pixels=2 * 512 * 512),
              name="judge", route_prefix="/judge")
    yield images, f"http://127.0.0.1:{port}", port
    serve.delete("images")
    serve.delete("judge")
    serve.shutdown()


def _generate(url, body, key=KEY, timeout=60):
    return requests.post(f"{url}/v1/images/generations", json=body, timeout=timeout,
                         headers={"Authorization": f"Bearer {key}"} if key else {})


def _openai_error(r, status: int) -> str:
    """The message of an OpenAI-shaped error, checking it carries no internal exception text."""
    assert r.status_code == status, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"], err
    for leak in ("Traceback", "Error:", "Exception", "File \"", "RecursionError", "ValueError"):
        assert leak not in err["message"], err["message"]
    return err["message"]


def _solid_png(width: int, height: int) -> bytes:
    """A valid single-colour RGB PNG of any size, compressed row by row (little memory): a 9000 x 9000
    one is 0.3 MB on the wire and 243 MB decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = b"\x00" + b"\x80" * (3 * width)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _stall(port: int, path: str, n: int, token: bool) -> list[socket.socket]:
    """``n`` connections that send headers promising 1000 body bytes, send 15, and wait."""
    conns = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        auth = f"Authorization: Bearer {KEY}\r\n" if token else ""
        s.sendall((f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{auth}"
                   "Content-Length: 1000\r\n\r\n" + '{"prompt": "a c').encode())
        conns.append(s)
    return conns


def _status_line(s: socket.socket) -> str:
    data = b""
    while b"\r\n" not in data:
        more = s.recv(4096)
        if not more:
            break
        data += more
    return data.split(b"\r\n", 1)[0].decode()


# ---------------------------------------------------------------------------------------------- 1. isolation
def test_a_bad_prompt_fails_only_itself_not_its_batch_mates(apps):
    handle, url, _ = apps
    bodies = [{"prompt": PROMPT, "seed": s} for s in range(6)]
    bodies.insert(3, {"prompt": "two circles \ud800", "seed": 9})  # a lone surrogate: valid JSON, not text
    before = len(handle.stats.remote().result()["batch_sizes"])
    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        responses = list(pool.map(lambda b: _generate(url, b), bodies))
    assert "lone surrogate" in _openai_error(responses[3], 400)
    assert [r.status_code for i, r in enumerate(responses) if i != 3] == [200] * 6
    assert max(handle.stats.remote().result()["batch_sizes"][before:]) > 1  # they did share batches


def test_a_batch_that_fails_is_retried_request_by_request():
    from raypref.serving.images import generate_isolated

    calls = []

    def generate(prompts, seeds):  # fails whenever the poisoned prompt is in the call
        calls.append(list(prompts))
        if "poison" in prompts:
            raise RuntimeError("tokenizer exploded")
        return np.stack([np.full((2, 2, 3), s, np.uint8) for s in seeds])

    out = generate_isolated(generate, [("a", [1, 2]), ("poison", [3]), ("b", [4])])
    assert isinstance(out[1], RuntimeError)
    assert [o[:, 0, 0, 0].tolist() for o in (out[0], out[2])] == [[1, 2], [4]]
    assert calls == [["a", "a", "poison", "b"], ["a", "a"], ["poison"], ["b"]]
    assert isinstance(generate_isolated(generate, [("poison", [1])])[0], RuntimeError)


# ---------------------------------------------------------------------------------------------- 2. malformed
@pytest.mark.parametrize("path", ["/v1/images/generations", "/judge/discriminate", "/judge/mutate"])
def test_malformed_json_is_a_400_in_openai_shape_on_every_route(apps, path):
    _, url, _ = apps
    bodies = {
        "a 4,301-digit integer": b'{"prompt": "a circle", "seed": ' + b"7" * 4301 + b"}",
        "3,000-deep nesting": b"[" * 3000 + b"]" * 3000,
        "NaN": b'{"prompt": "a circle", "seed": NaN}',
        "not UTF-8": b'{"prompt": "\xff"}',
        "truncated": b'{"prompt": "a ci',
    }
    for what, body in bodies.items():
        r = requests.post(url + path, data=body, headers={**AUTH, "Content-Type": "application/json"}, timeout=60)
        assert _openai_error(r, 400), what


def test_unknown_routes_and_methods_get_openai_errors(apps):
    _, url, _ = apps
    assert "no route" in _openai_error(requests.get(f"{url}/v1/nothing", headers=AUTH, timeout=30), 404)
    assert "not allowed" in _openai_error(requests.get(f"{url}/v1/images/generations", headers=AUTH, timeout=30), 405)
    assert "unknown op" in _openai_error(requests.post(f"{url}/judge/paint", json={}, headers=AUTH, timeout=30), 404)
    assert "takes POST" in _openai_error(requests.get(f"{url}/judge/mutate", headers=AUTH, timeout=30), 405)


def test_overload_is_a_503_in_openai_shape():
    from raypref.serving.http import Admission, APIError

    admission = Admission(2)
    with admission, admission:
        with pytest.raises(APIError) as e, admission:
            pass
        assert e.value.status == 503 and e.value.headers["Retry-After"] == "1"
    with admission:  # slots come back when requests finish, failed or not
        assert admission.active == 1


# ---------------------------------------------------------------------------------------------- 3. stalled bodies
def test_stalled_bodies_neither_block_the_service_nor_hold_it(apps):
    _, url, port = apps
    stalled = _stall(port, "/v1/images/generations", 20, token=True)
    stalled += _stall(port, "/judge/discriminate", 40, token=False)
    try:
        time.sleep(0.5)  # they have all reached the replicas
        t0 = time.time()
        r = _generate(url, {"prompt": PROMPT, "seed": 1}, timeout=30)
        assert r.status_code == 200 and time.time() - t0 < BODY_TIMEOUT_S  # answered while they stall
        r = requests.post(f"{url}/judge/mutate", json={}, headers=AUTH, timeout=30)
        assert r.status_code == 200 and "prompt" in r.json()
        # the stalled ones: the judge's (no token) were refused at once; the images' time out
        got = {}

        def read(i, s):
            got[i] = _status_line(s)

        threads = [threading.Thread(target=read, args=(i, s)) for i, s in enumerate(stalled)]
        [t.start() for t in threads]
        [t.join(BODY_TIMEOUT_S + 20) for t in threads]
        assert all(got.get(i, "").endswith("408 Request Timeout") for i in range(20)), got
        assert all(got.get(i, "").endswith("401 Unauthorized") for i in range(20, 60)), got
    finally:
        for s in stalled:
            s.close()


# ---------------------------------------------------------------------------------------------- 4. image sizes
def test_the_judge_checks_declared_image_size_before_decoding(apps):
    _, url, _ = apps
    huge = base64.b64encode(_solid_png(9000, 9000)).decode()
    assert len(huge) < 1_000_000
    t0 = time.time()
    r = requests.post(f"{url}/judge/discriminate", json={"prompt": "a circle", "images": [huge, huge]},
                      headers=AUTH, timeout=60)
    assert "9000 x 9000 pixels" in _openai_error(r, 400) and time.time() - t0 < 5
    ok = base64.b64encode(_solid_png(500, 500)).decode()  # within one image's limit (512 x 512) ...
    r = requests.post(f"{url}/judge/discriminate", json={"prompt": "a circle", "images": [ok, ok, ok]},
                      headers=AUTH, timeout=60)
    assert "together" in _openai_error(r, 400)  # ... but three exceed the request's (2 x 512 x 512)
    r = requests.post(f"{url}/judge/discriminate", json={"prompt": "a circle", "images": [ok, ok]},
                      headers=AUTH, timeout=60)
    assert r.status_code == 200 and set(r.json()) == {"index"}
    import io

    from PIL import Image

    tiff = io.BytesIO()
    Image.new("RGB", (8, 8)).save(tiff, format="TIFF")  # PNG only: no other decoder sees client bytes
    r = requests.post(f"{url}/judge/vqa", json={"image": base64.b64encode(tiff.getvalue()).decode(),
                                                "questions": ["is there a circle?"]}, headers=AUTH, timeout=60)
    assert "not a base64-encoded PNG" in _openai_error(r, 400)
    r = requests.post(f"{url}/judge/expand", json={"prompt": "a circle \ud800", "n": 2}, headers=AUTH, timeout=60)
    assert "valid Unicode" in _openai_error(r, 400)


def test_a_replica_bounds_the_pixels_all_its_requests_hold():
    from raypref.serving.http import APIError
    from raypref.serving.judge import ImageBudget, ReplicaPixels

    replica = ReplicaPixels(limit=300)
    a, b = ImageBudget(200, 400, replica), ImageBudget(200, 400, replica)
    a.take(10, 10), a.take(10, 10)
    with pytest.raises(APIError) as e:
        b.take(10, 11)  # 200 + 110 > 300: the replica is full while a waits
    assert e.value.status == 503 and replica.held == 200
    a.release()  # a answered: its pixels come back
    b.take(10, 11)
    assert replica.held == 110


# ---------------------------------------------------------------------------------------------- 5. judge auth
def test_the_judge_has_the_bearer_token_and_a_body_limit(apps):
    _, url, _ = apps
    assert "API key" in _openai_error(requests.post(f"{url}/judge/mutate", json={}, timeout=30), 401)
    assert "API key" in _openai_error(requests.post(f"{url}/judge/mutate", json={},
                                                    headers={"Authorization": "Bearer sk-wrong"}, timeout=30), 401)
    assert _openai_error(requests.get(f"{url}/judge/stats", timeout=30), 401)
    assert requests.post(f"{url}/judge/mutate", json={}, headers=AUTH, timeout=30).status_code == 200
    assert requests.get(f"{url}/judge/health", timeout=30).json() == {"status": "ok"}  # open, for balancers
    r = requests.post(f"{url}/judge/mutate", data=b" " * 2_200_000, headers=AUTH, timeout=30)  # max_body_kb=2048
    assert "limit" in _openai_error(r, 413)


# ---------------------------------------------------------------------------------------------- 6. grammar
def test_the_shapes_model_answers_400_to_prompts_outside_its_grammar(apps, tmp_path):
    from raypref.models import load_adapter
    from raypref.serving.http import APIError
    from raypref.serving.images import check_prompt, model_grammar

    _, url, _ = apps
    r = _generate(url, {"prompt": "a photo of a cat on a sofa"})
    assert "not in the shapes grammar" in _openai_error(r, 400) and r.json()["error"]["param"] == "prompt"
    assert _generate(url, {"prompt": "three triangles", "seed": 2}).status_code == 200
    # the grammar is the shapes model's: 'auto' finds it; 'none' (a real model) takes free text
    build_pipeline("tiny").save_pretrained(str(tmp_path / "m"))
    assert model_grammar(str(tmp_path / "m"), "auto") == "shapes" and model_grammar("x", "none") is None
    model = load_adapter(str(tmp_path / "m"))
    check_prompt(model, "a photo of a cat", None)
    with pytest.raises(APIError, match="shapes grammar"):
        check_prompt(model, "a photo of a cat", "shapes")
    with pytest.raises(ValueError, match="prompt_grammar"):
        model_grammar("x", "english")
