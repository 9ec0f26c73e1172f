"""The aligned text-to-image model as a Ray Serve app with an OpenAI-compatible images API.

    from raypref.serving.images import build_images_app
    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    serve.run(build_images_app("shipped", lora="/ckpt/lora", num_cpus=2), name="images", route_prefix="/")

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="...")
    r = client.images.generate(prompt="two red circles", n=2, size="32x32", response_format="b64_json")

Routes (FastAPI ingress):

    POST /v1/images/generations  {"prompt": str, "n": 1..max_n, "size": "WxH", "seed": int,
                                  "response_format": "b64_json", "model": str}
                                 -> {"created": ts, "data": [{"b64_json": PNG}, ...], "size", "output_format"}
    GET  /v1/models              -> {"object": "list", "data": [{"id": model_name, ...}]}
    GET  /health                 -> {"status": "ok", ...}   (no auth: for load balancers)

Image i of a request uses seed ``seed + i`` (a random seed when omitted, echoed in the
``x-raypref-seed`` header), so a (prompt, seed) pair gives the same image in any batch. Requests
from different clients share one ``@serve.batch`` queue: one batch = one pipeline call over all
their images. Every error, on every route, uses OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` and
never carries an internal exception's text: 400 malformed body or bad field (including a prompt the
model cannot take: outside the shapes grammar when it serves the shapes model, or not encodable),
401 bad or missing bearer token (when ``api_key`` is set), 404 unknown model or route, 405, 408 body
not received within ``body_timeout_s``, 413 body over ``max_body_kb``, 503 over ``max_pending``
requests in progress, 500 (with a reference to the server log) when generation fails. A prompt is
checked before it joins a batch, and a batch that fails is retried request by request, so one bad
request fails only itself.

Runner: ``python -m raypref.serving.images --checkpoint shipped --port 8000`` (binds 127.0.0.1 unless
``--host``; the API key comes from $RAYPREF_API_KEY), or ``serve run raypref.serving.images:app_builder
checkpoint=shipped num_cpus=2``, or a Serve config entry ``import_path: raypref.serving.images:app_builder``
with ``args`` = build_images_app's keyword arguments (see serve/config.yaml).
"""

import argparse
import asyncio
import os
import secrets
import time
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException

from raypref.judges.common import encode_png_b64
from raypref.serving.http import (
    APIError, Admission, check_auth, error_response, internal_error, parse_json, read_body, unicode_error,
)

DEFAULT_MODEL_NAME = "raypref-images"
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed's range
IGNORED_FIELDS = ("user", "quality", "style", "background", "moderation", "safety_identifier")
KNOWN_FIELDS = ("prompt", "n", "size", "seed", "response_format", "model", "output_format", *IGNORED_FIELDS)
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' default LoRA file name


# ---------------------------------------------------------------------------------------------- pure parts
def parse_size(size: str) -> tuple[int, int]:
    """"WxH" -> (width, height); ValueError naming the bad value."""
    w, sep, h = size.lower().partition("x") if isinstance(size, str) else ("", "", "")
    if not sep or not w.isdigit() or not h.isdigit() or int(w) < 1 or int(h) < 1:
        raise ValueError(f"size must look like 'WIDTHxHEIGHT' (e.g. '32x32'), got {size!r}")
    return int(w), int(h)


def validate_request(payload, *, size: tuple[int, int], max_n: int, model_name: str,
                     max_prompt_chars: int = 4000) -> tuple[str, list[int]]:
    """An images/generations JSON body -> (prompt, seeds [n]); APIError (400 / 404) saying what is wrong.

    ``size`` is the model's (width, height): the only size it generates.
    """
    if not isinstance(payload, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(payload).__name__}")
    unknown = sorted(set(payload) - set(KNOWN_FIELDS))
    if unknown:
        raise APIError(400, f"unrecognized request argument(s): {', '.join(unknown)}", param=unknown[0])
    prompt = payload.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise APIError(400, f"'prompt' is required and must be a non-empty string, got {prompt!r:.80}", "prompt")
    if len(prompt) > max_prompt_chars:
        raise APIError(400, f"'prompt' has {len(prompt)} characters; the maximum is {max_prompt_chars}", "prompt")
    why = unicode_error(prompt)
    if why:
        raise APIError(400, f"'prompt' is not valid Unicode text ({why})", "prompt")
    n = payload.get("n", 1)
    n = 1 if n is None else n
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= max_n:
        raise APIError(400, f"'n' must be an integer in [1, {max_n}], got {n!r}", "n")
    if payload.get("size") not in (None, "auto"):
        try:
            w, h = parse_size(payload["size"])
        except ValueError as e:
            raise APIError(400, str(e), "size") from None
        if (w, h) != tuple(size):
            raise APIError(400, f"size {payload['size']!r} is not supported; this model generates "
                                f"'{size[0]}x{size[1]}' only", "size")
    fmt = payload.get("response_format")
    if fmt not in (None, "b64_json"):
        raise APIError(400, f"response_format {fmt!r} is not supported; use 'b64_json' "
                            "(this server does not host image URLs)", "response_format")
    if payload.get("output_format") not in (None, "png"):
        raise APIError(400, f"output_format {payload['output_format']!r} is not supported; use 'png'",
                       "output_format")
    model = payload.get("model")
    if model is not None and model != model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {model_name!r}",
                       "model", code="model_not_found")
    seed = payload.get("seed")
    if seed is None:
        seed = secrets.randbelow(2**31)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED - n:
        raise APIError(400, f"'seed' must be an integer in [0, 2**63 - 1 - n], got {seed!r:.40}", "seed")
    return prompt, [seed + i for i in range(n)]


def model_size(model) -> tuple[int, int]:
    """(width, height) the model adapter generates by default."""
    h, w = model.default_size()
    return int(w), int(h)


def resolve_lora(path: str | os.PathLike) -> Path:
    """A LoRA directory (diffusers' ``save_lora_weights``) or a Ray Train checkpoint holding ``lora/``."""
    p = Path(path).expanduser()
    if (p / "lora" / LORA_WEIGHTS).exists():
        p = p / "lora"
    if not (p / LORA_WEIGHTS).exists():
        raise ValueError(f"no LoRA weights ({LORA_WEIGHTS}) at {p}")
    return p


def load_model(checkpoint: str, lora: str | None = None, device: str = "cpu"):
    """Checkpoint ("shipped", a pipeline dir or a Ray Train checkpoint) [+ LoRA] -> model adapter."""
    from raypref.checkpoints import resolve_checkpoint
    from raypref.models import load_adapter

    model = load_adapter(str(resolve_checkpoint(checkpoint)), device=device)
    if lora:
        path = str(resolve_lora(lora))
        if hasattr(model.pipe, "load_lora_weights"):  # SD/SDXL/SD3 (shapes): denoiser and any text-encoder LoRA
            model.pipe.load_lora_weights(path)
        else:  # PixArt pipelines have no LoRA loader mixin: raypref's peft injection from the same file
            from raypref.lora import load_lora

            load_lora(model, path)
    return model


def split_images(images: np.ndarray, counts: list[int]) -> list[np.ndarray]:
    """[sum(counts), H, W, 3] -> one [count, H, W, 3] slice per request, in order."""
    bounds = np.cumsum([0, *counts])
    return [images[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def check_grammar_option(prompt_grammar: str) -> None:
    """ValueError unless ``prompt_grammar`` is one of the served model's grammar options."""
    if prompt_grammar not in ("auto", "shapes", "none"):
        raise ValueError(f"prompt_grammar must be 'auto', 'shapes' or 'none', got {prompt_grammar!r}")


def model_grammar(checkpoint: str, prompt_grammar: str) -> str | None:
    """'shapes' when prompts must be in the shapes grammar, else None (free text)."""
    check_grammar_option(prompt_grammar)
    if prompt_grammar == "auto":
        from raypref.checkpoints import resolve_checkpoint
        from raypref.shapes.model import is_shapes_model

        return "shapes" if is_shapes_model(resolve_checkpoint(checkpoint)) else None
    return None if prompt_grammar == "none" else "shapes"


def check_prompt(model, prompt: str, grammar: str | None) -> None:
    """400 unless the model can take ``prompt``: in the shapes grammar when ``grammar`` is 'shapes', and
    encodable by every tokenizer of the pipeline. Runs before a request joins a batch."""
    if grammar == "shapes":
        from raypref.shapes.grammar import parse

        try:
            parse(prompt)
        except ValueError as e:
            raise APIError(400, f"{e}; this server serves the shapes world's model", "prompt",
                           code="prompt_not_in_grammar") from None
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tok = getattr(model.pipe, name, None)
        if tok is None:
            continue
        try:
            tok(prompt)
        except Exception:
            raise APIError(400, "'prompt' cannot be encoded by the model's tokenizer", "prompt") from None


def generate_isolated(generate, items: list[tuple[str, list[int]]]) -> list:
    """One ``generate(prompts, seeds)`` call over a batch of requests -> one [n, H, W, 3] array per
    request, or the exception of a request that fails alone: when the batched call raises, each request
    is retried by itself, so one bad request never fails its batch-mates."""
    def run(part):
        prompts = [p for p, seeds in part for _ in seeds]
        seeds = [s for _, seeds in part for s in seeds]
        return split_images(generate(prompts, seeds), [len(seeds) for _, seeds in part])

    try:
        return run(items)
    except Exception as batch_error:
        if len(items) == 1:
            return [batch_error]
    out = []
    for item in items:
        try:
            out.append(run([item])[0])
        except Exception as e:
            out.append(e)
    return out


# ---------------------------------------------------------------------------------------------- deployment
app = FastAPI(title="raypref images", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    messages = {404: f"no route {request.method} {request.url.path}",
                405: f"{request.method} is not allowed on {request.url.path}"}
    return error_response(exc.status_code, messages.get(exc.status_code, str(exc.detail)),
                          headers=getattr(exc, "headers", None))


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(400, "malformed request")


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    return internal_error(f"{request.method} {request.url.path}", exc).response()


@serve.ingress(app)
class ImagesDeployment:
    """One replica: the model behind a shared dynamic-batching queue, with an OpenAI-style HTTP API."""

    def __init__(self, checkpoint: str, lora: str | None, *, model_name: str, api_key: str | None, max_n: int,
                 max_body_kb: float, max_batch_size: int, batch_wait_timeout_s: float, steps: int,
                 guidance: float, device: str | None, body_timeout_s: float = 10.0, max_pending: int = 256,
                 prompt_grammar: str = "auto"):
        import torch

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_model(checkpoint, lora, device=device)
        self.grammar = model_grammar(checkpoint, prompt_grammar)
        self.size = model_size(self.model)
        self.model_name, self.api_key, self.max_n = model_name, api_key, max_n
        self.max_body_bytes, self.body_timeout_s = int(max_body_kb * 1024), body_timeout_s
        self.admission = Admission(max_pending)
        self.steps, self.guidance = steps, guidance
        self.created = int(time.time())
        self._batched.set_max_batch_size(max_batch_size)
        self._batched.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batch_sizes: list[int] = []  # requests per batch
        self.images_generated = 0

    def _generate(self, prompts: list[str], seeds: list[int]) -> np.ndarray:
        images = self.model.generate(prompts, seeds, num_inference_steps=self.steps, guidance_scale=self.guidance)
        self.images_generated += len(images)
        return images

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _batched(self, items: list[tuple[str, list[int]]]) -> list:
        self.batch_sizes.append(len(items))
        # A thread keeps the event loop free to accept and queue the next batch while this one runs;
        # max_concurrent_batches=1 keeps the model single-threaded.
        return await asyncio.to_thread(generate_isolated, self._generate, items)

    async def generate(self, prompt: str, seeds: list[int]) -> np.ndarray:
        """DeploymentHandle API: [n] seeds -> [n, H, W, 3] uint8, batched with the HTTP traffic."""
        check_prompt(self.model, prompt, self.grammar)
        result = await self._batched((prompt, [int(s) for s in seeds]))
        if isinstance(result, Exception):
            raise result
        return result

    def stats(self) -> dict:
        return {"batch_sizes": list(self.batch_sizes), "images_generated": self.images_generated}

    # HTTP API
    @app.post("/v1/images/generations")
    async def images_generations(self, request: Request) -> JSONResponse:
        try:
            check_auth(request, self.api_key)
            with self.admission:
                payload = parse_json(await read_body(request, self.max_body_bytes, self.body_timeout_s))
                prompt, seeds = validate_request(payload, size=self.size, max_n=self.max_n,
                                                 model_name=self.model_name)
                check_prompt(self.model, prompt, self.grammar)
                images = await self._batched((prompt, seeds))
                if isinstance(images, Exception):  # this request alone failed; the replica keeps serving
                    raise internal_error("image generation", images)
        except APIError as e:
            return e.response()
        data = [{"b64_json": encode_png_b64(im)} for im in images]
        return JSONResponse(
            {"created": int(time.time()), "data": data, "size": f"{self.size[0]}x{self.size[1]}",
             "output_format": "png"},
            headers={"x-raypref-seed": str(seeds[0])},
        )

    @app.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        try:
            check_auth(request, self.api_key)
        except APIError as e:
            return e.response()
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "raypref"}]})

    @app.get("/health")
    async def health(self) -> JSONResponse:
        return JSONResponse({"status": "ok", "model": self.model_name, "size": f"{self.size[0]}x{self.size[1]}"})


def build_images_app(
    checkpoint: str = "shipped",
    lora: str | None = None,
    *,
    model_name: str = DEFAULT_MODEL_NAME,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    resources: dict[str, float] | None = None,
    num_replicas: int | None = None,
    autoscaling_config: dict | None = None,
    max_ongoing_requests: int | None = None,
    max_queued_requests: int = 256,
    api_key: str | None = None,
    max_n: int = 4,
    max_body_kb: float = 16.0,
    body_timeout_s: float = 10.0,
    max_pending: int = 256,
    prompt_grammar: str = "auto",
    max_batch_size: int = 8,
    batch_wait_timeout_s: float = 0.01,
    steps: int = 30,
    guidance: float = 3.0,
    device: str | None = None,
    name: str = "ImagesDeployment",
):
    """The image model as a Serve application (``serve.run(build_images_app(...), route_prefix="/")``).

    Resources and scaling are arguments, never hard-coded: ``resources`` are custom Ray resources per
    replica (e.g. ``{"gen_gpu": 1}`` from cluster.yaml); give ``num_replicas`` or ``autoscaling_config``
    (default: 1 to 2 replicas targeting ``max_batch_size`` ongoing requests each), not both.
    Each replica answers 503 (OpenAI shape, Retry-After) beyond ``max_pending`` requests in progress,
    408 to a body that has not arrived within ``body_timeout_s``, 413 beyond ``max_body_kb``.
    ``max_ongoing_requests`` (default ``max_pending + 64``) is Serve's per-replica cap; it stays above
    ``max_pending`` so that stalled uploads cannot take every slot and the app's own 503 fires before
    Serve queues (beyond ``max_queued_requests`` waiting requests Serve answers a plain-text 503).
    ``prompt_grammar``: 'auto' (the shapes grammar for the shapes model, free text otherwise), 'shapes'
    or 'none'. ``device`` defaults to CUDA when the replica has a GPU.
    """
    for key, value, low in (("max_n", max_n, 1), ("max_batch_size", max_batch_size, 1), ("steps", steps, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{key} must be an integer >= {low}, got {value!r}")
    for key, value in (("max_body_kb", max_body_kb), ("body_timeout_s", body_timeout_s)):
        if not value > 0:
            raise ValueError(f"{key} must be > 0, got {value}")
    if not isinstance(max_pending, int) or max_pending < 1:
        raise ValueError(f"max_pending must be an integer >= 1, got {max_pending!r}")
    check_grammar_option(prompt_grammar)
    if batch_wait_timeout_s < 0:
        raise ValueError(f"batch_wait_timeout_s must be >= 0, got {batch_wait_timeout_s}")
    if num_replicas is not None and autoscaling_config is not None:
        raise ValueError("give num_replicas or autoscaling_config, not both")
    if api_key is not None and not api_key:
        raise ValueError("api_key must be a non-empty string or None (no auth)")
    scaling = {"num_replicas": num_replicas} if num_replicas is not None else {
        "autoscaling_config": autoscaling_config or {
            "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": max_batch_size}}
    actor_options = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    if resources:
        actor_options["resources"] = dict(resources)
    deployment = serve.deployment(
        ImagesDeployment,
        name=name,
        ray_actor_options=actor_options,
        max_ongoing_requests=max_ongoing_requests or max_pending + 64,
        max_queued_requests=max_queued_requests,
        **scaling,
    )
    return deployment.bind(
        str(checkpoint), None if lora is None else str(lora), model_name=model_name, api_key=api_key, max_n=max_n,
        max_body_kb=max_body_kb, max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s,
        steps=steps, guidance=guidance, device=device, body_timeout_s=body_timeout_s, max_pending=max_pending,
        prompt_grammar=prompt_grammar,
    )


def app_builder(args: dict):
    """Serve entry point (``serve run raypref.serving.images:app_builder checkpoint=shipped num_cpus=2`` or
    ``import_path: raypref.serving.images:app_builder`` in a config file). ``serve run`` passes every value as a
    string: pydantic's validate_call converts them to build_images_app's annotated types and rejects
    unknown names."""
    from pydantic import validate_call

    return validate_call(build_images_app)(**args)


def main(argv: list[str] | None = None) -> None:
    """Run the images app on the local (or RAY_ADDRESS) cluster until interrupted."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default="shipped", help="'shipped', a pipeline dir or a Ray Train checkpoint")
    p.add_argument("--lora", default=None, help="a LoRA dir or a checkpoint holding lora/")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--route-prefix", default="/")
    p.add_argument("--model-name", default=DEFAULT_MODEL_NAME)
    p.add_argument("--num-cpus", type=float, default=1.0)
    p.add_argument("--num-gpus", type=float, default=0.0)
    p.add_argument("--num-replicas", type=int, default=1)
    p.add_argument("--max-n", type=int, default=4)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--api-key-env", default="RAYPREF_API_KEY",
                   help="environment variable holding the bearer token (unset or empty: no auth)")
    args = p.parse_args(argv)
    serve.start(http_options={"host": args.host, "port": args.port})
    application = build_images_app(
        args.checkpoint, args.lora, model_name=args.model_name, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
        num_replicas=args.num_replicas, api_key=os.environ.get(args.api_key_env) or None, max_n=args.max_n,
        max_batch_size=args.max_batch_size, steps=args.steps, guidance=args.guidance,
    )
    serve.run(application, name="images", route_prefix=args.route_prefix, blocking=True)


if __name__ == "__main__":
    main()
