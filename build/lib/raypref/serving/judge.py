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

Malformed requests get a 4xx with {"error": why}; the replica keeps serving. Requests of all ops
share one ``@serve.batch`` queue; a batch is split by op and each part goes to the judge's batch
form. As a Serve config entry: ``import_path: raypref.serving.judge:app_builder`` with ``args`` =
build_judge_app's keyword arguments.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from raypref.judges import build_judge
from raypref.judges.common import check_image, decode_png_b64

OPS = ("discriminate", "vqa", "questions", "expand", "mutate")


def _str(payload: dict, key: str) -> str:
    v = payload.get(key)
    if not isinstance(v, str) or not v:
        raise ValueError(f"field {key!r} must be a non-empty string, got {v!r:.80}")
    return v


def _str_list(payload: dict, key: str) -> list[str]:
    v = payload.get(key)
    if not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v):
        raise ValueError(f"field {key!r} must be a non-empty list of non-empty strings")
    return v


def _image(x, where: str) -> np.ndarray:
    try:
        return check_image(decode_png_b64(x) if isinstance(x, str) else x)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def validate(op: str, payload: dict) -> tuple:
    """(op, payload) -> the op's positional arguments; ValueError saying what is wrong.
    Images may be arrays (handle) or base64 PNG strings (HTTP)."""
    if op not in OPS:
        raise KeyError(f"unknown op {op!r}; expected one of {', '.join(OPS)}")
    if not isinstance(payload, dict):
        raise ValueError(f"the request body must be a JSON object, got {type(payload).__name__}")
    if op == "discriminate":
        images = payload.get("images")
        if not isinstance(images, list) or not images:
            raise ValueError("field 'images' must be a non-empty list of images")
        images = [_image(x, f"images[{i}]") for i, x in enumerate(images)]
        if len({im.shape for im in images}) != 1:
            raise ValueError(f"all images must have the same shape, got {sorted({im.shape for im in images})}")
        return _str(payload, "prompt"), images
    if op == "vqa":
        return _image(payload.get("image"), "image"), _str_list(payload, "questions")
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

    def __init__(self, backend: str, backend_kwargs: dict | None, max_batch_size: int, batch_wait_timeout_s: float):
        self.judge = build_judge(backend, **(backend_kwargs or {}))
        self._batched.set_max_batch_size(max_batch_size)
        self._batched.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batch_sizes: list[int] = []

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _batched(self, items: list[tuple[str, tuple]]) -> list:
        self.batch_sizes.append(len(items))
        # A thread keeps the event loop free to queue the next batch while a slow backend
        # (HTTP or a local VLM) works; max_concurrent_batches=1 keeps the judge single-threaded.
        return await asyncio.to_thread(run_batch, self.judge, items)

    async def _submit(self, op: str, payload: dict):
        args = validate(op, payload)
        result = await self._batched((op, args))
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
        if op == "stats":
            return JSONResponse(self.stats())
        if op not in OPS:
            return JSONResponse({"error": f"unknown op {op!r}; POST to one of {', '.join(OPS)}"}, status_code=404)
        if request.method != "POST":
            return JSONResponse({"error": f"{op} takes POST, got {request.method}"}, status_code=405)
        try:
            payload = json.loads(await request.body() or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return JSONResponse({"error": f"request body is not valid JSON: {e}"}, status_code=400)
        try:
            result = await self._submit(op, payload)
        except (ValueError, TypeError) as e:  # bad fields, or a prompt/question the judge rejects
            return JSONResponse({"error": str(e)}, status_code=422)
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
    name: str = "JudgeDeployment",
):
    """The judge as a Serve application (``serve.run(build_judge_app(...))``).

    Resources and scaling are arguments, never hard-coded. ``autoscaling_config`` defaults to 1 to 2
    replicas targeting ``max_batch_size`` ongoing requests each; ``max_ongoing_requests`` defaults to
    max(16, 2 * max_batch_size) so that a full batch can queue while the previous one runs.
    """
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    if batch_wait_timeout_s < 0:
        raise ValueError(f"batch_wait_timeout_s must be >= 0, got {batch_wait_timeout_s}")
    if autoscaling_config is None:
        autoscaling_config = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": max_batch_size}
    deployment = serve.deployment(
        JudgeDeployment,
        name=name,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        autoscaling_config=autoscaling_config,
        max_ongoing_requests=max_ongoing_requests or max(16, 2 * max_batch_size),
    )
    return deployment.bind(backend, backend_kwargs or {}, max_batch_size, batch_wait_timeout_s)


def app_builder(args: dict):
    """Serve config-file entry point (``import_path: raypref.serving.judge:app_builder``)."""
    return build_judge_app(**args)
