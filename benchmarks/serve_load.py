"""Serving under mixed hostile load: valid image requests with stalled uploads and malformed requests
in flight at the same time, against `raypref serve --images --judge shapes` with an API key (loopback).

    .venv/bin/python benchmarks/serve_load.py                    # 200 valid, 20 stalled, 20 malformed
    .venv/bin/python benchmarks/serve_load.py --valid 50 --steps 10

Valid requests are distinct (prompt, seed) image generations of the shipped shapes model, all sent at
once; stalled connections send headers promising 1,000 body bytes, send 15 and wait (half to the
images app with the token, half to the judge without); malformed requests cover each attack of
issue #21 (a 4,301-digit integer, 3,000-deep nesting, a lone surrogate, a prompt outside the grammar,
a 9000 x 9000 PNG to the judge, the judge without a token, an unknown route, a bad method, a body
over the limit, broken JSON). Prints the status counts per kind, the valid requests' latency and,
as its last line, ``serve_load: 5xx N, malformed 4xx M/K, valid ok V/W, p50 X s, p95 Y s``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import struct
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np

KEY = "sk-bench"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def solid_png(width: int, height: int) -> bytes:
    """A single-colour RGB PNG compressed row by row (small on the wire, huge decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = b"\x00" + b"\x80" * (3 * width)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def malformed_requests() -> list[tuple[str, str, str, bytes, dict]]:
    """(name, method, path, body, headers) of the attacks; each must get a 4xx."""
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    huge = base64.b64encode(solid_png(9000, 9000)).decode()
    gen = "/v1/images/generations"
    cases = [
        ("4301-digit integer", "POST", gen, b'{"prompt": "a circle", "seed": ' + b"7" * 4301 + b"}", auth),
        ("3000-deep nesting", "POST", gen, b"[" * 3000 + b"]" * 3000, auth),
        ("lone surrogate", "POST", gen, json.dumps({"prompt": "two circles \ud800"}).encode(), auth),
        ("outside the grammar", "POST", gen, json.dumps({"prompt": "a photo of a cat"}).encode(), auth),
        ("broken JSON", "POST", gen, b'{"prompt": "a ci', auth),
        ("body over the limit", "POST", gen, json.dumps({"prompt": "a" * 40_000}).encode(), auth),
        ("unknown route", "GET", "/v1/nothing", b"", auth),
        ("bad method", "GET", gen, b"", auth),
        ("judge: 9000 x 9000 PNGs", "POST", "/judge/discriminate",
         json.dumps({"prompt": "a circle", "images": [huge, huge]}).encode(), auth),
        ("judge: no token", "POST", "/judge/mutate", b"{}", {"Content-Type": "application/json"}),
        ("judge: 3000-deep nesting", "POST", "/judge/vqa", b"[" * 3000 + b"]" * 3000, auth),
        ("judge: 4301-digit integer", "POST", "/judge/expand",
         b'{"prompt": "a circle", "n": ' + b"7" * 4301 + b"}", auth),
    ]
    return cases


def stall(port: int, path: str, token: bool) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=120)
    auth = f"Authorization: Bearer {KEY}\r\n" if token else ""
    s.sendall((f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{auth}"
               "Content-Length: 1000\r\n\r\n" + '{"prompt": "a c').encode())
    return s


def status_of(s: socket.socket) -> str:
    data = b""
    try:
        while b"\r\n" not in data:
            more = s.recv(4096)
            if not more:
                break
            data += more
    except OSError as e:
        return f"error {type(e).__name__}"
    finally:
        s.close()
    line = data.split(b"\r\n", 1)[0].decode(errors="replace")
    return line.split(" ", 2)[1] if line.count(" ") >= 1 else "closed"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--valid", type=int, default=200, help="valid image requests, all sent at once")
    ap.add_argument("--stalled", type=int, default=20, help="stalled uploads (half images, half judge)")
    ap.add_argument("--malformed", type=int, default=20, help="malformed requests (the attack list, cycled)")
    ap.add_argument("--checkpoint", default="shipped")
    ap.add_argument("--steps", type=int, default=30, help="sampling steps of the images app")
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--ray-cpus", type=int, default=4)
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    import requests
    from ray import serve

    from raypref.serving.images import build_images_app
    from raypref.serving.judge import build_judge_app
    from raypref.shapes.grammar import eval_prompts

    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_images_app(args.checkpoint, num_cpus=1, num_replicas=1, api_key=KEY, steps=args.steps,
                               max_batch_size=args.max_batch_size), name="images", route_prefix="/")
    serve.run(build_judge_app("shapes", {}, num_cpus=0.5, autoscaling_config={"min_replicas": 1, "max_replicas": 1},
                              api_key=KEY), name="judge", route_prefix="/judge")
    print(f"[serve_load] images ({args.checkpoint}, {args.steps} steps) and judge up at {url}", flush=True)

    prompts = [p for _, p in eval_prompts(max(1, args.valid // 6 + 1), 1)]
    valid = [{"prompt": prompts[i % len(prompts)], "seed": 10_000 + i} for i in range(args.valid)]
    attacks = malformed_requests()
    attacks = [attacks[i % len(attacks)] for i in range(args.malformed)]

    def post_valid(body):
        t0 = time.time()
        try:
            r = requests.post(f"{url}/v1/images/generations", json=body, timeout=600,
                              headers={"Authorization": f"Bearer {KEY}"})
            return str(r.status_code), time.time() - t0
        except requests.RequestException as e:
            return f"error {type(e).__name__}", time.time() - t0

    def send_attack(case):
        name, method, path, body, headers = case
        try:
            r = requests.request(method, url + path, data=body or None, headers=headers, timeout=600)
            ok_shape = "error" in r.json() and set(r.json()["error"]) == {"message", "type", "param", "code"}
            return name, str(r.status_code), ok_shape
        except (requests.RequestException, ValueError) as e:
            return name, f"error {type(e).__name__}", False

    stalled = [stall(port, "/v1/images/generations" if i % 2 == 0 else "/judge/discriminate", token=i % 2 == 0)
               for i in range(args.stalled)]
    t0 = time.time()
    with ThreadPoolExecutor(max_workers=args.valid + args.malformed + args.stalled) as pool:
        valid_f = [pool.submit(post_valid, b) for b in valid]
        attack_f = [pool.submit(send_attack, a) for a in attacks]
        stalled_f = [pool.submit(status_of, s) for s in stalled]
        valid_r = [f.result() for f in valid_f]
        attack_r = [f.result() for f in attack_f]
        stalled_r = [f.result() for f in stalled_f]
    wall = time.time() - t0
    serve.shutdown()
    ray.shutdown()

    lat = np.array([t for s, t in valid_r if s == "200"])
    codes = {"valid": Counter(s for s, _ in valid_r), "malformed": Counter(s for _, s, _ in attack_r),
             "stalled": Counter(stalled_r)}
    n5xx = sum(n for c in codes.values() for s, n in c.items() if s.startswith("5") or s.startswith("error"))
    m4xx = sum(1 for _, s, shape in attack_r if s.startswith("4") and shape)
    for kind, c in codes.items():
        print(f"{kind:>9}: " + ", ".join(f"{s} x{n}" for s, n in sorted(c.items())))
    for name, s, shape in sorted(set(attack_r)):
        print(f"  malformed {name!r}: {s}{'' if shape else ' (not in the OpenAI error shape)'}")
    p50, p95 = (float(np.percentile(lat, q)) for q in (50, 95)) if len(lat) else (float("nan"),) * 2
    print(f"wall {wall:.1f} s for {args.valid} valid requests ({len(lat) / wall:.1f} requests/s)")
    print(f"serve_load: 5xx {n5xx}, malformed 4xx {m4xx}/{len(attack_r)}, valid ok {len(lat)}/{args.valid}, "
          f"p50 {p50:.2f} s, p95 {p95:.2f} s")
    return {"codes": codes, "p50": p50, "p95": p95, "wall": wall}


if __name__ == "__main__":
    main()
