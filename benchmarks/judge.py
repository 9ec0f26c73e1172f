"""Judge throughput through Ray Serve, with and without dynamic batching.

    python benchmarks/judge.py                          # shapes judge, 256 requests, batch 1 vs 16
    python benchmarks/judge.py --requests 64 --http     # over HTTP as well (thread pool of clients)
    python benchmarks/judge.py --backend openai --backend-kwargs '{"model": "judge-vlm", "base_url": "http://127.0.0.1:8000/v1"}'

Each request is one ``discriminate`` of a (passing, failing) pair of teacher renders; all
requests are in flight at once (N concurrent). Prints requests/s and the batch sizes the replica saw.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_requests(n: int, seed: int = 0):
    from raypref.shapes.grammar import CATEGORIES, eval_prompts
    from raypref.shapes.teachers import SkillProfile, Teacher

    good, bad = Teacher("clean"), Teacher("bad", profile=SkillProfile({c: 1.0 for c in CATEGORIES}))
    pool = [(p, [good.render_one(p, i), bad.render_one(p, i)]) for i, (_, p) in enumerate(eval_prompts(4, seed))]
    return [pool[i % len(pool)] for i in range(n)]


def run_one(backend, backend_kwargs, max_batch_size, reqs, http_url=None, num_cpus=1.0, clients=32):
    from ray import serve

    from raypref.judges.common import encode_png_b64
    from raypref.serving.judge import build_judge_app

    name = f"judge-bench-b{max_batch_size}"
    app = build_judge_app(backend, backend_kwargs, num_cpus=num_cpus, max_batch_size=max_batch_size,
                          autoscaling_config={"min_replicas": 1, "max_replicas": 1}, name=name)
    handle = serve.run(app, name=name, route_prefix=f"/{name}")
    for p, ims in reqs[:4]:  # warm up
        handle.discriminate.remote(p, ims).result()
    out = {}
    t0 = time.perf_counter()
    responses = [handle.discriminate.remote(p, ims) for p, ims in reqs]
    [r.result() for r in responses]
    out["handle"] = len(reqs) / (time.perf_counter() - t0)
    if http_url:
        import requests

        bodies = [{"prompt": p, "images": [encode_png_b64(im) for im in ims]} for p, ims in reqs]
        url = f"{http_url}/{name}/discriminate"
        with ThreadPoolExecutor(clients) as pool, requests.Session() as s:
            t0 = time.perf_counter()
            codes = list(pool.map(lambda b: s.post(url, json=b, timeout=120).status_code, bodies))
            out["http"] = len(reqs) / (time.perf_counter() - t0)
        assert set(codes) == {200}, set(codes)
    sizes = handle.stats.remote().result()["batch_sizes"]
    out["mean_batch"] = sum(sizes) / max(1, len(sizes))
    serve.delete(name)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="shapes")
    ap.add_argument("--backend-kwargs", default="{}", help="JSON dict for the backend's constructor")
    ap.add_argument("--requests", type=int, default=256, help="N concurrent requests per setting")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per judge replica")
    ap.add_argument("--http", action="store_true", help="also measure over HTTP")
    args = ap.parse_args(argv)

    import ray
    from ray import serve

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(include_dashboard=False, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    reqs = make_requests(args.requests)
    print(f"backend={args.backend} requests={args.requests} (all concurrent)")
    print(f"{'max_batch_size':>14} {'handle req/s':>13} {'http req/s':>11} {'mean batch':>11}")
    try:
        for bs in args.batch_sizes:
            r = run_one(args.backend, json.loads(args.backend_kwargs), bs, reqs,
                        http_url=f"http://127.0.0.1:{port}" if args.http else None, num_cpus=args.num_cpus)
            http = f"{r['http']:11.1f}" if "http" in r else f"{'-':>11}"
            print(f"{bs:>14} {r['handle']:13.1f} {http} {r['mean_batch']:11.2f}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
