"""The VLM judge as a Ray Serve deployment, with dynamic batching and autoscaling.

    from raypref.serving.judge import build_judge_app
    handle = serve.run(build_judge_app("shapes", {"error_rate": 0.1}, num_cpus=1), name="judge",
                       route_prefix="/judge")
    handle.discriminate.remote(prompt, [img_a, img_b]).result()   # from the driver or any Ray task

Over HTTP (JSON, images as base64 PNG, optionally as data URLs), POST to ``<route_prefix>/<op>``:

    /discriminate {"prompt": str, "images": [png, ...]}   -> {"index": int | null}
    /vqa          {"image": png, "questions": [str, ...]}  -> {"p_yes": [float, ...]}
    /questions    {"prompt": str}                          -> {"questions": [str, ...]}
    /expand       {"prompt": str, "n": int}                -> {"prompts": [str, ...]}
    /mutate       {}                                       -> {"prompt": str}
    GET /stats                                             -> batch sizes seen and judge counters

    GET /health                                            -> {"status": "ok"} (never needs the key)

Errors, on every route, use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` with no
internal exception text: 400 malformed body or bad field, 401 without the bearer token when
``api_key`` is set, 404, 405, 408 body not received within ``body_timeout_s``, 413 body over
``max_body_kb``, 503 over ``max_pending`` requests in progress. An image's declared size is checked
against ``max_image_pixels`` (and the request's images together against ``max_request_pixels``) from
its PNG header before it is decoded, and decoding runs off the event loop. Requests of all ops share
one ``@serve.batch`` queue; a batch is split by op and each part goes to the judge's batch form (a
failing part is retried item by item, so a bad request fails only itself). As a Serve config entry:
``import_path: raypref.serving.judge:app_builder`` with ``args`` = build_judge_app's keyword arguments.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from raypref.judges import build_judge
from raypref.judges.common import check_image, decode_png_b64
from raypref.serving.http import (
    APIError, Admission, check_auth, internal_error, parse_json, read_body, unicode_error,
)
from raypref.shapes.grammar import GrammarError

OPS = ("discriminate", "vqa", "questions", "expand", "mutate")


class ReplicaPixels:
    """Decoded pixels a replica holds across its requests (they wait in the batch queue decoded):
    at most ``limit``; a request that would pass it gets 503, and gives its pixels back when answered."""

    def __init__(self, limit: int):
        self.limit, self.held = limit, 0


@dataclass
class ImageBudget:
    """Pixels one request's images may have: each at most ``per_image``, together at most ``per_request``,
    and within what the ``replica`` has left (taken as each image's header is read, before decoding)."""

    per_image: int = 2048 * 2048
    per_request: int = 4 * 2048 * 2048
    replica: ReplicaPixels | None = None
    used: int = 0

    def take(self, width: int, height: int) -> None:
        if width * height > self.per_image:
            raise ValueError(f"the image is {width} x {height} pixels; the limit is {self.per_image} pixels")
        if self.used + width * height > self.per_request:
            raise ValueError(f"the request's images have more than {self.per_request} pixels together")
        if self.replica is not None:
            if self.replica.held + width * height > self.replica.limit:
                raise APIError(503, "the judge holds too many images in progress; retry shortly",
                               type="server_error", code="overloaded", headers={"Retry-After": "1"})
            self.replica.held += width * height
        self.used += width * height

    def release(self) -> None:
        if self.replica is not None:
            self.replica.held -= self.used
        self.used = 0


def _text(v) -> bool:
    """A non-empty string that is valid Unicode text."""
    return isinstance(v, str) and bool(v) and unicode_error(v) is None


def _str(payload: dict, key: str) -> str:
    v = payload.get(key)
    if not _text(v):
        raise ValueError(f"field {key!r} must be a non-empty string of valid Unicode text")
    return v


def _str_list(payload: dict, key: str) -> list[str]:
    v = payload.get(key)
    if not isinstance(v, list) or not v or not all(_text(x) for x in v):
        raise ValueError(f"field {key!r} must be a non-empty list of non-empty strings of valid Unicode text")
    return v


def _image(x, where: str, budget: ImageBudget) -> np.ndarray:
    try:
        if isinstance(x, str):
            return check_image(decode_png_b64(x, check_size=budget.take))
        image = check_image(x)
        budget.take(image.shape[1], image.shape[0])
        return image
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def validate(op: str, payload: dict, budget: ImageBudget | None = None) -> tuple:
    """(op, payload) -> the op's positional arguments; ValueError saying what is wrong.
    Images may be arrays (handle) or base64 PNG strings (HTTP), within ``budget``'s pixels."""
    budget = budget or ImageBudget()
    if op not in OPS:
        raise KeyError(f"unknown op {op!r}; expected one of {', '.join(OPS)}")
    if not isinstance(payload, dict):
        raise ValueError(f"the request body must be a JSON object, got {type(payload).__name__}")
    if op == "discriminate":
        images = payload.get("images")
        if not isinstance(images, list) or not images:
            raise ValueError("field 'images' must be a non-empty list of images")
        images = [_image(x, f"images[{i}]", budget) for i, x in enumerate(images)]
        if len({im.shape for im in images}) != 1:
            raise ValueError(f"all images must have the same shape, got {sorted({im.shape for im in images})}")
        return _str(payload, "prompt"), images
    if op == "vqa":
        return _image(payload.get("image"), "image", budget), _str_list(payload, "questions")
    if op == "questions":
        return (_str(payload, "prompt"),)
    if op == "expand":
        n = payload.get("n")
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 1024:
            raise ValueError(f"field 'n' must be an integer in [1, 1024], got {n!r}")
        return _str(payload, "prompt"), n
    return ()  # mutate


def run_batch(judge, items: list[tuple[str, tuple]]) -> list:
    """[(op, args)] -> one result per item (an Exception object for an item that failed): items
    grouped by op, each group through the judge's batch form."""
    out: list = [None] * len(items)
    groups: dict[str, list[int]] = {}
    for i, (op, _) in enumerate(items):
        groups.setdefault(op, []).append(i)
    for op, idx in groups.items():
        args = [items[i][1] for i in idx]
        try:
            results = _batch_call(judge, op, args)
        except Exception:  # one bad item must not fail its batch-mates: retry them one by one
            results = []
            for a in args:
                try:
                    results.append(_batch_call(judge, op, [a])[0])
                except Exception as e:
                    results.append(e)
        for i, r in zip(idx, results):
            out[i] = r
    return out


def _batch_call(judge, op: str, args: list[tuple]) -> list:
    if op == "discriminate":
        return judge.discriminate_batch([a[0] for a in args], [a[1] for a in args])
    if op == "vqa":
        return judge.vqa_batch([a[0] for a in args], [a[1] for a in args])
    if op == "questions":
        return judge.questions_batch([a[0] for a in args])
    if op == "expand":  # n may differ between requests
        return [judge.expand_batch([p], n)[0] for p, n in args]
    if op == "mutate":
        return judge.mutate_batch(len(args))
    raise KeyError(op)


def _jsonable(op: str, result):
    key = {"discriminate": "index", "vqa": "p_yes", "questions": "questions", "expand": "prompts",
           "mutate": "prompt"}[op]
    return {key: result}


class JudgeDeployment:
    """One replica: a judge backend behind a shared dynamic-batching queue."""

    def __init__(self, backend: str, backend_kwargs: dict | None, max_batch_size: int, batch_wait_timeout_s: float,
                 api_key: str | None = None, max_body_kb: float = 8192.0, body_timeout_s: float = 10.0,
                 max_pending: int = 256, max_image_pixels: int = 2048 * 2048,
                 max_request_pixels: int = 4 * 2048 * 2048, max_replica_pixels: int = 32 * 2048 * 2048):
        self.judge = build_judge(backend, **(backend_kwargs or {}))
        self._batched.set_max_batch_size(max_batch_size)
        self._batched.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batch_sizes: list[int] = []
        self.api_key, self.body_timeout_s = api_key, body_timeout_s
        self.max_body_bytes = int(max_body_kb * 1024)
        self.admission = Admission(max_pending)
        self.pixels = (max_image_pixels, max_request_pixels)
        # decoded images wait in the batch queue: bound what all requests together may hold
        self.replica_pixels = ReplicaPixels(max_replica_pixels)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _batched(self, items: list[tuple[str, tuple]]) -> list:
        self.batch_sizes.append(len(items))
        # A thread keeps the event loop free to queue the next batch while a slow backend
        # (HTTP or a local VLM) works; max_concurrent_batches=1 keeps the judge single-threaded.
        return await asyncio.to_thread(run_batch, self.judge, items)

    async def _run(self, op: str, payload: dict):
        """The op's result, or the exception the judge raised for this request alone (returned);
        ValueError (or APIError 503) when the payload is invalid."""
        budget = ImageBudget(*self.pixels, replica=self.replica_pixels)
        try:
            # decoding PNGs takes time: off the event loop, so other requests keep being read and queued
            args = await asyncio.to_thread(validate, op, payload, budget)
            return await self._batched((op, args))
        finally:
            budget.release()

    async def _submit(self, op: str, payload: dict):
        result = await self._run(op, payload)
        if isinstance(result, Exception):
            raise result
        return result

    # DeploymentHandle API: handle.<op>.remote(...)
    async def discriminate(self, prompt: str, images) -> int | None:
        return await self._submit("discriminate", {"prompt": prompt, "images": list(images)})

    async def vqa(self, image, questions) -> list[float]:
        return await self._submit("vqa", {"image": image, "questions": list(questions)})

    async def questions(self, prompt: str) -> list[str]:
        return await self._submit("questions", {"prompt": prompt})

    async def expand(self, prompt: str, n: int) -> list[str]:
        return await self._submit("expand", {"prompt": prompt, "n": n})

    async def mutate(self) -> str:
        return await self._submit("mutate", {})

    def stats(self) -> dict:
        return {"batch_sizes": list(self.batch_sizes), **self.judge.counters()}

    # HTTP API
    async def __call__(self, request: Request) -> JSONResponse:
        op = request.url.path.rstrip("/").rsplit("/", 1)[-1]
        try:
            if op == "health" and request.method == "GET":
                return JSONResponse({"status": "ok"})
            check_auth(request, self.api_key)
            if op == "stats":
                return JSONResponse(self.stats())
            if op not in OPS:
                raise APIError(404, f"unknown op {op!r}; POST to one of {', '.join(OPS)}", code="unknown_op")
            if request.method != "POST":
                raise APIError(405, f"{op} takes POST, got {request.method}", headers={"Allow": "POST"})
            with self.admission:
                body = await read_body(request, self.max_body_bytes, self.body_timeout_s)
                payload = await asyncio.to_thread(parse_json, body) if len(body) > 65536 else parse_json(body)
                try:
                    result = await self._run(op, payload)
                except (ValueError, TypeError, KeyError) as e:  # the payload's fields (validate)
                    raise APIError(400, str(e).strip("'\"")) from None
                if isinstance(result, GrammarError):  # a prompt or question the shapes judge rejects
                    raise APIError(400, str(result))
                if isinstance(result, Exception):  # anything else the backend raised: its text stays here
                    raise internal_error(f"judge {op}", result)
        except APIError as e:
            return e.response()
        return JSONResponse(_jsonable(op, result))


def build_judge_app(
    backend: str = "shapes",
    backend_kwargs: dict | None = None,
    *,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    autoscaling_config: dict | None = None,
    max_batch_size: int = 16,
    batch_wait_timeout_s: float = 0.01,
    max_ongoing_requests: int | None = None,
    api_key: str | None = None,
    max_body_kb: float = 8192.0,
    body_timeout_s: float = 10.0,
    max_pending: int = 256,
    max_image_pixels: int = 2048 * 2048,
    max_request_pixels: int = 4 * 2048 * 2048,
    max_replica_pixels: int = 32 * 2048 * 2048,
    name: str = "JudgeDeployment",
):
    """The judge as a Serve application (``serve.run(build_judge_app(...))``).

    Resources and scaling are arguments, never hard-coded. ``autoscaling_config`` defaults to 1 to 2
    replicas targeting ``max_batch_size`` ongoing requests each. ``api_key`` (a string) puts every route
    but /health behind ``Authorization: Bearer <key>``. ``max_ongoing_requests`` (Serve's per-replica
    cap) defaults to ``max_pending + 64``, above the app's own 503 limit, so that stalled uploads
    cannot take every slot.
    """
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    for key, value in (("max_body_kb", max_body_kb), ("body_timeout_s", body_timeout_s), ("max_pending", max_pending),
                       ("max_image_pixels", max_image_pixels), ("max_request_pixels", max_request_pixels),
                       ("max_replica_pixels", max_replica_pixels)):
        if not value > 0:
            raise ValueError(f"{key} must be > 0, got {value}")
    if api_key is not None and not api_key:
        raise ValueError("api_key must be a non-empty string or None (no auth)")
    if batch_wait_timeout_s < 0:
        raise ValueError(f"batch_wait_timeout_s must be >= 0, got {batch_wait_timeout_s}")
    if autoscaling_config is None:
        autoscaling_config = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": max_batch_size}
    deployment = serve.deployment(
        JudgeDeployment,
        name=name,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        autoscaling_config=autoscaling_config,
        max_ongoing_requests=max_ongoing_requests or max_pending + 64,
    )
    return deployment.bind(backend, backend_kwargs or {}, max_batch_size, batch_wait_timeout_s, api_key=api_key,
                           max_body_kb=max_body_kb, body_timeout_s=body_timeout_s, max_pending=max_pending,
                           max_image_pixels=max_image_pixels, max_request_pixels=max_request_pixels,
                           max_replica_pixels=max_replica_pixels)


def app_builder(args: dict):
    """Serve config-file entry point (``import_path: raypref.serving.judge:app_builder``)."""
    return build_judge_app(**args)
