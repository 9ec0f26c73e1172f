"""Shared pieces of the paper reproductions: in-process LoRA training from preference-layout rows,
evaluation through run_eval (a shapes-eval dir per checkpoint), win rates and mean ± sd tables."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from raypref import evolve_config, train, train_state  # noqa: E402
from raypref.lora import fold_lora  # noqa: E402
from raypref.prefdata import decode_png  # noqa: E402


class Sampler:
    """``generate(prompts, seeds)`` over a model adapter (what run_eval calls)."""

    def __init__(self, adapter, name: str, steps: int = 20, guidance: float = 3.0):
        self.adapter, self.name, self.steps, self.guidance = adapter, name, steps, guidance

    def generate(self, prompts, seeds):
        return self.adapter.generate(list(prompts), [int(s) for s in seeds], num_inference_steps=self.steps,
                                     guidance_scale=self.guidance)


def train_lora(rows: list[dict], base: str, loss: dict, *, steps: int, lr: float, batch_size: int, seed: int,
               sft_weight: float = 0.0, lora: bool = True, cfg_dropout: float = 0.0, max_seconds: float = 0.0):
    """LoRA (rank 16, the driver's targets; or full fine-tuning with ``lora=False``) trained in this
    process on preference-layout ``rows`` (K = 1 rows for SFT) for ``steps`` steps, or fewer where
    ``max_seconds`` > 0 runs out first; returns (the adapter with the LoRA folded in, the last step's
    metrics)."""
    import time

    base_cfg = evolve_config.train_recipe("dpo", steps, lr, batch=batch_size, lora=lora)
    loss = {"sft_weight": sft_weight, **loss}
    cfg = replace(base_cfg, model=replace(base_cfg.model, path=base, lora_seed=seed),
                  loss=replace(base_cfg.loss, **loss), data=replace(base_cfg.data, seed=seed, cfg_dropout=cfg_dropout))
    state = train_state.build_state(cfg)
    rng = np.random.default_rng(seed)
    metrics, start = {}, time.time()
    for _ in range(steps):
        if max_seconds and time.time() - start >= max_seconds:
            break
        batch = [rows[i] for i in rng.choice(len(rows), size=batch_size, replace=len(rows) < batch_size)]
        metrics = train.train_step(state, [batch]) or metrics
    if lora:
        fold_lora(state.pipe.denoiser)
    state.pipe.denoiser.eval()
    return state.pipe, metrics


def score_eval_dir(eval_dir: Path, rewards: dict) -> dict[str, np.ndarray]:
    """Per-metric scores [N] of a shapes-eval dir's images, in manifest order."""
    items = [json.loads(line) for line in (Path(eval_dir) / "manifest.jsonl").read_text().splitlines()]
    prompts = np.array([it["prompt"] for it in items])
    images = np.stack([decode_png((Path(eval_dir) / it["image"]).read_bytes()) for it in items])
    return {m: np.asarray(r({"prompt": prompts, "image": images})[f"score_{r.name}"], dtype=np.float64)
            for m, r in rewards.items()}


def names(prompt: str, word: str) -> bool:
    """Whether ``prompt`` names ``word`` (or its plural: counting prompts say "squares")."""
    return any(w in (word, word + "s") for w in prompt.split())


def subset_scores(eval_dir: Path, word: str, naming: bool = False) -> dict[str, float]:
    """Per-category pass rate of a shapes-eval dir over the prompts that name ``word`` (``naming``) or
    do not name it."""
    per: dict[str, list[bool]] = {}
    for line in (Path(eval_dir) / "manifest.jsonl").read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            if names(r["prompt"], word) == naming:
                per.setdefault(r["category"], []).append(bool(r["passed"]))
    return {c: sum(v) / len(v) for c, v in per.items()}


def win_rate(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of prompts where a beats b (ties count one half)."""
    return float(np.mean((a > b) + 0.5 * (a == b)))


def fmt(values: list[float]) -> str:
    """mean ± sample sd (just the mean for one value)."""
    v = np.asarray(values, dtype=np.float64)
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v.mean():.3f}"


def load_results(path: Path, args=None, ignore: tuple[str, ...] = ()) -> dict:
    """Finished runs of an interrupted experiment (re-running skips them). With ``args`` (argparse), the
    options they were made with are kept beside them (``recipe.json``) and a re-run with other options
    is refused, since it would skip runs of another recipe; ``--out``, ``--seeds``, ``--threads`` and the
    options in ``ignore`` (ones that only pick which runs to do) may change."""
    results = json.loads(path.read_text()) if path.exists() else {}
    if args is None:
        return results
    skip = {"out", "seeds", "threads", *ignore}
    recipe = json.loads(json.dumps({k: v for k, v in vars(args).items() if k not in skip}))
    rpath = path.with_name("recipe.json")
    if rpath.exists():
        old = json.loads(rpath.read_text())
        diff = sorted(k for k in recipe.keys() | old.keys() if old.get(k) != recipe.get(k))
        if diff:
            sys.exit(f"{path.parent} holds runs of another recipe (differs in: {', '.join(diff)}); "
                     "use a new --out or the same options")
    elif results:
        sys.exit(f"{path.parent} holds runs without a recorded recipe (an older run); use a new --out")
    path.parent.mkdir(parents=True, exist_ok=True)
    rpath.write_text(json.dumps(recipe, indent=1))
    return results


def save_results(path: Path, results: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=float))
    tmp.replace(path)


def add_run_args(ap, *, steps: int, lr: float) -> None:
    """The options every in-process reproduction shares: training size, evaluation, threads."""
    ap.add_argument("--model", default="shipped", help="starting checkpoint ('shipped' or a pipeline dir)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--lr", type=float, default=lr)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--n-per-category", type=int, default=20, help="ShapesEval prompts per category")
    ap.add_argument("--eval-seed", type=int, default=0)
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)


def setup(args, ignore: tuple[str, ...] = ()) -> tuple[Path, str, Path, dict]:
    """Threads, the output dir, the starting checkpoint -> (out, base, results.json path, finished runs of
    this recipe; ``ignore`` as in ``load_results``)."""
    import torch

    from raypref.checkpoints import resolve_checkpoint

    torch.set_num_threads(args.threads)
    out = Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    rpath = out / "results.json"
    return out, str(resolve_checkpoint(args.model)), rpath, load_results(rpath, args, ignore)
