"""Syn-Pic: a ranked preference dataset from K generators and n reward models, no human labels.

RankDPO's data recipe (arXiv 2410.18013) on Ray Data. For N prompts:

    prompts -> [generator 1 pool] -> ... -> [generator K pool]     one actor pool per generator
            -> [reward 1 pool] -> ... -> [reward n pool]           each scores all K images of a row
            -> label task (phi, ranking, consensus pairs, PNG)      pure function of the stored scores
            -> driver: chunk-XXXXX.parquet in prefdata.SCHEMA + the Pick-a-Pic pairwise export

(``run.layout=fused`` replaces the K + n pools by one pool whose actors run every generator and
reward in turn: the same rows, fewer processes, for a single small machine.)

A row of the stream is one prompt, so "group per prompt" needs no shuffle: generator k writes
columns ``seed_k, image_k, cost_k`` and reward r writes ``score_<r>_k``. The seed of image k is a hash
of (prompt id, generator spec, base seed), so a re-run regenerates the same image.

Resume: prompts are cut into fixed-size chunks in a deterministic order; a chunk is committed by
writing ``data/chunk-XXXXX.parquet`` through a temp file and a rename (last, after its Pick-a-Pic
export and stats), and a re-run skips every committed chunk, so no generator (and no paid teacher)
is ever called again for a committed (prompt, generator, seed). ``run.window_chunks`` (default 1)
bounds how many chunks one Ray Data execution streams, hence how much uncommitted work a driver
crash can lose. A dead actor is restarted by Ray Data and its batch retried (``run.max_restarts``).

Output directory::

    manifest.json                 what the chunks were built from (a re-run must match it)
    data/chunk-00000.parquet      prefdata.SCHEMA rows
    pickapic/chunk-00000.parquet  prefdata.PICKAPIC_SCHEMA rows (caption, jpg_0, jpg_1, label_0)
    stats/chunk-00000.json        calls, cost per generator, skips of the chunk (committed work)
    spend.jsonl                   every paid generator batch, appended as it returns (spend.PaidLedger)
    summary.json                  the run summary (this run and totals; ``paid`` next to committed)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raypref import labels, prefdata
from raypref.config import to_dict
from raypref.files import atomic_write
from raypref.prompt_sources import _Skips, chunk_name, derive_seed, load_prompts, needs_grammar
from raypref.spend import PaidLedger, ledger_actor, pay, read_paid
from raypref.synpic_config import PRESETS, GeneratorsSection, SynPicConfig


# ------------------------------------------------------------------------------------------------ stages
def generator_options(cfg: GeneratorsSection, kind: str) -> dict:
    """Constructor kwargs of a generator kind (custom kinds get every option)."""
    device = "cuda" if cfg.num_gpus > 0 else "cpu"
    ckpt = {"num_inference_steps": cfg.num_inference_steps, "guidance_scale": cfg.guidance_scale, "device": device}
    if kind == "teacher":
        return {"size": cfg.image_size}
    if kind == "checkpoint":
        return ckpt
    return {"size": cfg.image_size, **ckpt}


class GenerateStage:
    """Generator k of a row: {"prompt" [B], "seed_k" [B]} -> adds "image_k" [B, H, W, 3] uint8 and
    "cost_k" [B] float64 (the generator's spend on the batch, spread over its images). The batch's
    calls and cost are paid into ``paid`` as soon as the generator returns."""

    def __init__(self, spec: str, slot: int, options: dict, factory=None, paid=None):
        from raypref.generators import build_generator

        kind, _, arg = spec.partition(":")
        self.gen = factory(arg, **options) if factory is not None else build_generator(spec, **options)
        self.spec, self.slot, self.paid = spec, slot, paid

    def _calls(self) -> int | None:
        from raypref.spend import generator_counters

        counters = generator_counters(self.gen)
        return None if counters is None else counters[0]

    def _spent(self) -> float:
        cost = getattr(self.gen, "cost", None)
        if cost is None:
            cost = getattr(getattr(self.gen, "teacher", None), "cost", 0.0)
        return float(cost)

    def __call__(self, batch: dict) -> dict:
        prompts = [str(p) for p in batch["prompt"]]
        before, calls_before = self._spent(), self._calls()
        images = np.asarray(self.gen({"prompt": prompts, "seed": np.asarray(batch[f"seed_{self.slot}"])})["image"])
        calls_after = self._calls()
        calls = len(prompts) if calls_before is None or calls_after is None else calls_after - calls_before
        pay(self.paid, self.spec, calls, self._spent() - before)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != len(prompts) or images.shape[-1] != 3:
            raise ValueError(f"generator {self.spec} returned {images.dtype} {images.shape}, "
                             f"expected uint8 [{len(prompts)}, H, W, 3]")
        out = dict(batch)
        out[f"image_{self.slot}"] = images
        out[f"cost_{self.slot}"] = np.full(len(prompts), (self._spent() - before) / max(len(prompts), 1))
        return out


class ScoreStage:
    """Reward ``key`` on all K images of a row: adds "score_<key>_k" [B] float32 for k < K."""

    def __init__(self, key: str, model_path: str, device: str, n_slots: int, factory=None):
        from raypref.rewards import build_reward

        kwargs = {"name": key}
        if model_path:
            kwargs["model_path"] = model_path
        if device != "cpu":
            kwargs["device"] = device
        self.reward = factory(**kwargs) if factory is not None else build_reward(key, **kwargs)
        self.key, self.n_slots = key, n_slots

    def __call__(self, batch: dict) -> dict:
        out = dict(batch)
        for k in range(self.n_slots):
            scored = self.reward({"prompt": np.asarray(batch["prompt"]), "image": batch[f"image_{k}"]})
            out[f"score_{self.key}_{k}"] = np.asarray(scored[f"score_{self.key}"], dtype=np.float32)
        return out


class FusedStage:
    """run.layout=fused: every generator, then every reward, in one actor. Takes the constructor kwargs
    of each GenerateStage and ScoreStage, in order; the batch dict comes out as the pools layout's."""

    def __init__(self, generators: list[dict], rewards: list[dict]):
        self.stages = [GenerateStage(**kw) for kw in generators] + [ScoreStage(**kw) for kw in rewards]

    def __call__(self, batch: dict) -> dict:
        for stage in self.stages:
            batch = stage(batch)
        return batch


EXTRA_FIELDS = [("index", pa.int64()), ("chunk", pa.int64()), ("cost", pa.list_(pa.float64())),
                ("skip", pa.string())]
STREAM_SCHEMA = pa.schema(list(prefdata.SCHEMA) + [pa.field(n, t) for n, t in EXTRA_FIELDS])


def label_batch(batch: dict, specs: tuple, reward_keys: tuple) -> pa.Table:
    """Rows of K scored images -> STREAM_SCHEMA: prefdata.SCHEMA (labels from raypref.labels, PNG
    images) plus index, chunk, cost [K] and skip ("" or why the row must not be written, e.g. a
    reward returned NaN)."""
    rows = []
    for i, prompt in enumerate(batch["prompt"]):
        prompt = str(prompt)
        k_slots = range(len(specs))
        scores = np.array([[batch[f"score_{r}_{k}"][i] for k in k_slots] for r in reward_keys], dtype=np.float64)
        base = {"index": int(batch["index"][i]), "chunk": int(batch["chunk"][i]),
                "cost": [float(batch[f"cost_{k}"][i]) for k in k_slots], "skip": ""}
        bad = np.argwhere(~np.isfinite(scores))
        if len(bad):
            r, k = (int(x) for x in bad[0])
            rows.append({**base, "prompt_id": prefdata.prompt_id(prompt), "prompt": prompt,
                         "category": str(batch["category"][i]), "images": [], "generators": [], "seeds": [],
                         "reward_names": [], "scores": [], "phi": [], "ranking": [], "pairs": [],
                         "skip": f"nan_score: reward {reward_keys[r]} gave {scores[r, k]} "
                                 f"for {specs[k]} on {prompt!r}"})
            continue
        phi = labels.synpic_phi(scores)
        row = prefdata.make_row(
            prompt, str(batch["category"][i]), [np.asarray(batch[f"image_{k}"][i]) for k in k_slots], list(specs),
            [int(batch[f"seed_{k}"][i]) for k in k_slots], list(reward_keys), scores, phi, labels.ranking(phi),
            labels.consensus_pairs(scores),
        )
        rows.append({**row, **base})
    return pa.Table.from_pylist(rows, schema=STREAM_SCHEMA)


def build_dataset(items: list[dict], cfg: SynPicConfig, generator_classes=None, reward_classes=None, paid=None):
    """The Ray Data stream over ``items`` (rows: index, chunk, prompt, category, seed_k); generators pay
    into ``paid`` (see ``pay``)."""
    import ray

    g, r = cfg.generators, cfg.rewards
    n_blocks = max(1, math.ceil(len(items) / g.batch_size))
    ds = ray.data.from_items(items, override_num_blocks=n_blocks)
    retry = {k: v for k, v in (("max_restarts", cfg.run.max_restarts), ("max_task_retries", cfg.run.max_task_retries))
             if v >= 0}
    gen_kwargs = [{"spec": spec, "slot": k, "options": generator_options(g, spec.partition(":")[0]),
                   "factory": (generator_classes or {}).get(spec.partition(":")[0]), "paid": paid}
                  for k, spec in enumerate(g.specs)]
    device = "cuda" if (g.num_gpus if cfg.run.layout == "fused" else r.num_gpus) > 0 else "cpu"
    reward_kwargs = [{"key": key, "model_path": path, "device": device, "n_slots": len(g.specs),
                      "factory": (reward_classes or {}).get(key)}
                     for key, _, path in (spec.partition(":") for spec in r.specs)]
    if cfg.run.layout == "fused":
        ds = ds.map_batches(
            FusedStage, fn_constructor_kwargs={"generators": gen_kwargs, "rewards": reward_kwargs},
            compute=ray.data.ActorPoolStrategy(size=g.pool_size),
            num_cpus=g.num_cpus, num_gpus=g.num_gpus, batch_size=g.batch_size, batch_format="numpy", **retry,
        )
    else:
        for k, kwargs in enumerate(gen_kwargs):
            ds = ds.map_batches(
                GenerateStage, fn_constructor_kwargs=kwargs,
                compute=ray.data.ActorPoolStrategy(size=g.pool_size_of(k)),
                num_cpus=g.num_cpus, num_gpus=g.num_gpus, batch_size=g.batch_size, batch_format="numpy", **retry,
            )
        for kwargs in reward_kwargs:
            ds = ds.map_batches(
                ScoreStage, fn_constructor_kwargs=kwargs,
                compute=ray.data.ActorPoolStrategy(size=r.pool_size),
                num_cpus=r.num_cpus, num_gpus=r.num_gpus, batch_size=r.batch_size, batch_format="numpy", **retry,
            )
    return ds.map_batches(
        label_batch, fn_kwargs={"specs": tuple(g.specs), "reward_keys": tuple(r.keys)},
        num_cpus=cfg.run.label_num_cpus, batch_size=r.batch_size, batch_format="numpy",
    )


# -------------------------------------------------------------------------------------------------- run
def check_resources(cfg: SynPicConfig, cpus: float, gpus: float) -> None:
    """Raise ValueError unless every actor pool plus one label task fits ``cpus`` / ``gpus``.

    Actors hold their CPUs for the whole run: pools that take every CPU leave none for Ray Data's
    own tasks and the stream stalls forever (the 2-CPU deadlock), so this is checked up front.
    """
    g, r = cfg.generators, cfg.rewards
    if cfg.run.layout == "fused":
        need_cpu, need_gpu = g.pool_size * g.num_cpus + cfg.run.label_num_cpus, g.pool_size * g.num_gpus
    else:
        gen_actors = sum(g.pool_size_of(k) for k in range(len(g.specs)))
        need_cpu = gen_actors * g.num_cpus + len(r.specs) * r.pool_size * r.num_cpus + cfg.run.label_num_cpus
        need_gpu = gen_actors * g.num_gpus + len(r.specs) * r.pool_size * r.num_gpus
    if need_cpu > cpus + 1e-9 or need_gpu > gpus + 1e-9:
        raise ValueError(
            f"the actor pools plus a label task need {need_cpu:g} CPUs and {need_gpu:g} GPUs but the cluster has "
            f"{cpus:g} CPUs and {gpus:g} GPUs; lower generators/rewards .num_cpus, .num_gpus, .pool_size or "
            ".pool_sizes "
            "(or set run.check_resources=false on an autoscaling cluster)"
        )


def _write_chunk(out: Path, c: int, table: pa.Table, specs) -> dict:
    """Commit chunk ``c``: Pick-a-Pic export, stats, then the data file (the completion marker)."""
    table = table.sort_by("index")
    skip = table.column("skip").to_pylist()
    keep = pa.array([s == "" for s in skip])
    data = table.filter(keep).select(prefdata.SCHEMA.names).cast(prefdata.SCHEMA)
    costs = np.array(table.column("cost").to_pylist(), dtype=np.float64).reshape(len(table), len(specs))
    labels_skips = _Skips()
    for s in skip:
        if s:
            labels_skips.add(s.split(":")[0], s, error=False)
    stats = {
        "chunk": c, "prompts": len(table), "rows": len(data), "images": len(table) * len(specs),
        "calls": {spec: len(table) for spec in specs},
        "cost": {spec: float(costs[:, k].sum()) for k, spec in enumerate(specs)},
        "pairs": int(sum(len(p) for p in data.column("pairs").to_pylist())),
        "skips": labels_skips.as_dict(),
    }
    name = chunk_name(c)
    atomic_write(out / "pickapic" / f"{name}.parquet", lambda p: pq.write_table(prefdata.to_pickapic(data), p))
    atomic_write(out / "stats" / f"{name}.json", lambda p: p.write_text(json.dumps(stats, indent=1)))
    atomic_write(out / "data" / f"{name}.parquet", lambda p: pq.write_table(data, p))
    return stats


def _manifest(cfg: SynPicConfig, prompts: list[tuple[str, str]]) -> dict:
    h = hashlib.sha256("\n".join(p for p, _ in prompts).encode()).hexdigest()
    return {"n_prompts": len(prompts), "prompts_sha256": h, "chunk_size": cfg.run.chunk_size,
            "generators": list(cfg.generators.specs), "generator_seed": cfg.generators.seed,
            # what else changes an image: chunks of a run must not mix sizes or samplers
            "image_size": cfg.generators.image_size, "num_inference_steps": cfg.generators.num_inference_steps,
            "guidance_scale": cfg.generators.guidance_scale, "rewards": list(cfg.rewards.specs)}


def _log(cfg: SynPicConfig, msg: str) -> None:
    if cfg.run.progress:
        print(f"[synpic] {msg}", file=sys.stderr, flush=True)


def run(cfg: SynPicConfig, *, generator_classes: dict | None = None, reward_classes: dict | None = None,
        paid: PaidLedger | None = None) -> dict:
    """Build (or resume) the Syn-Pic dataset of ``cfg`` in ``cfg.run.output_dir``; returns the summary.

    ``generator_classes`` maps extra spec kinds to factories called as ``factory(ARG, **options)``;
    ``reward_classes`` maps reward keys to factories called as ``factory(name=KEY, ...)`` (both are
    looked up before the built-in ones). Every generator batch is paid into ``paid`` (default:
    ``OUTPUT_DIR/spend.jsonl``; a driver passes its run's ledger) as it returns, through a ledger actor
    on this node, so the summary's ``paid`` includes work a crash lost; its ``calls``/``cost`` are what
    the committed chunks used. Ray must be initialised by the caller.
    """
    t0 = time.time()
    out = Path(cfg.run.output_dir).expanduser().resolve()
    paid = (paid or PaidLedger(out / "spend.jsonl")).scoped(str(out))
    specs, reward_keys = tuple(cfg.generators.specs), tuple(cfg.rewards.keys)
    from raypref.rewards import REWARDS

    for key in reward_keys:
        if key not in REWARDS and key not in (reward_classes or {}):
            raise ValueError(f"unknown reward {key!r}; known rewards: {sorted(REWARDS)}")
    for spec in specs:
        kind = spec.partition(":")[0]
        if kind not in ("teacher", "checkpoint") and kind not in (generator_classes or {}):
            raise ValueError(f"bad generator spec {spec!r}; expected teacher:NAME or checkpoint:PATH")

    if cfg.run.check_resources:
        import ray

        if ray.is_initialized():
            res = ray.cluster_resources()
            check_resources(cfg, res.get("CPU", 0.0), res.get("GPU", 0.0))
    prompts, input_skips = load_prompts(cfg.prompts, needs_grammar(cfg, generator_classes))
    if not prompts:
        raise ValueError(f"no usable prompts in {cfg.prompts.source!r}; skipped: {input_skips}")
    for sub in ("data", "pickapic", "stats"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    manifest = _manifest(cfg, prompts)
    mpath = out / "manifest.json"
    if mpath.exists():
        old = json.loads(mpath.read_text())
        diff = {k: (old.get(k), v) for k, v in manifest.items() if old.get(k) != v}
        if diff:
            raise ValueError(f"{out} holds a Syn-Pic run built from different inputs ({diff}); "
                             "use a new run.output_dir or the same prompts/generators/rewards/chunk_size")
    else:
        atomic_write(mpath, lambda p: p.write_text(json.dumps(manifest, indent=1)))

    size = cfg.run.chunk_size
    n_chunks = math.ceil(len(prompts) / size)
    done = [c for c in range(n_chunks) if (out / "data" / f"{chunk_name(c)}.parquet").exists()]
    pending = [c for c in range(n_chunks) if c not in set(done)]
    if cfg.run.max_chunks:
        pending = pending[:cfg.run.max_chunks]
    _log(cfg, f"{len(prompts)} prompts in {n_chunks} chunks: {len(done)} already done, {len(pending)} to build now")

    ledger = ledger_actor(paid) if pending else None
    try:
        window = cfg.run.window_chunks or max(len(pending), 1)
        written, gen_time, new_images = [], 0.0, 0
        for w in range(0, len(pending), window):
            chunks = pending[w:w + window]
            items = []
            for c in chunks:
                for idx in range(c * size, min((c + 1) * size, len(prompts))):
                    p, cat = prompts[idx]
                    pid = prefdata.prompt_id(p)
                    seeds = {f"seed_{k}": derive_seed(pid, s, cfg.generators.seed) for k, s in enumerate(specs)}
                    items.append({"index": idx, "chunk": c, "prompt": p, "category": cat, **seeds})
            expected = {c: min((c + 1) * size, len(prompts)) - c * size for c in chunks}
            buffers: dict[int, list[pa.Table]] = defaultdict(list)
            have: dict[int, int] = defaultdict(int)
            tw = time.time()
            ds = build_dataset(items, cfg, generator_classes, reward_classes, ledger)
            for block in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                chunk_col = np.asarray(block.column("chunk").to_numpy())
                for c in np.unique(chunk_col):
                    c = int(c)
                    part = block.filter(pa.array(chunk_col == c))
                    buffers[c].append(part)
                    have[c] += len(part)
                    if have[c] > expected[c]:
                        raise RuntimeError(
                            f"chunk {c}: got {have[c]} rows for {expected[c]} prompts (a row came twice)")
                    if have[c] == expected[c]:
                        stats = _write_chunk(out, c, pa.concat_tables(buffers.pop(c)), specs)
                        written.append(stats)
                        new_images += stats["images"]
                        el = gen_time + time.time() - tw
                        _log(
                            cfg,
                            f"chunk {c + 1}/{n_chunks} written: {stats['rows']} rows, "
                            f"{len(done) + len(written)}/{n_chunks} done, {new_images / max(el, 1e-9):.1f} images/s, "
                            f"cost {sum(stats['cost'].values()):g}",
                        )
            gen_time += time.time() - tw
            missing = {c: (have[c], expected[c]) for c in chunks if have[c] != expected[c]}
            if missing:
                raise RuntimeError(f"the stream ended with incomplete chunks (rows, expected): {missing}")
    finally:  # the ledger actor must not outlive the run, failed or not
        if ledger is not None:
            import ray

            ray.kill(ledger)
    summary = _summary(cfg, out, n_chunks, done, written, input_skips, len(prompts), time.time() - t0, gen_time)
    summary["this_run"]["paid"] = read_paid(paid.path, paid.scope, paid.invocation)
    summary["total"]["paid"] = read_paid(paid.path, paid.scope)
    atomic_write(out / "summary.json", lambda p: p.write_text(json.dumps(summary, indent=1)))
    _log(cfg, f"summary: {out / 'summary.json'}")
    return summary


def _summary(cfg, out: Path, n_chunks, done_before, written, input_skips, n_prompts, wall, gen_time) -> dict:
    specs = cfg.generators.specs

    def totals(stats_list):
        skips = _Skips()
        for s in stats_list:
            skips.merge(s["skips"])
        return {
            "chunks": len(stats_list), "prompts": sum(s["prompts"] for s in stats_list),
            "rows": sum(s["rows"] for s in stats_list), "images": sum(s["images"] for s in stats_list),
            "pairs": sum(s["pairs"] for s in stats_list),
            "calls": {g: sum(s["calls"][g] for s in stats_list) for g in specs},
            "cost": {g: sum(s["cost"][g] for s in stats_list) for g in specs},
            "label_skips": skips.as_dict(),
        }

    all_stats = [json.loads(p.read_text()) for p in sorted((out / "stats").glob("chunk-*.json"))
                 if (out / "data" / f"{p.stem}.parquet").exists()]
    this_run = totals(written)
    this_run.update(wall_seconds=wall, generate_seconds=gen_time,
                    images_per_second=this_run["images"] / gen_time if gen_time > 0 else 0.0,
                    chunks_skipped_as_done=len(done_before))
    total = totals(all_stats)
    return {
        "output_dir": str(out), "finished": total["chunks"] == n_chunks, "n_prompts": n_prompts,
        "n_chunks": n_chunks, "input_skips": input_skips, "this_run": this_run, "total": total,
        "config": to_dict(cfg),
    }


def main(argv: list[str] | None = None, description: str | None = None) -> dict:
    """The Syn-Pic job: parse the config, join (or start) Ray, build or resume the dataset."""
    import json

    import ray

    from raypref.config import job_parser, load_config

    args = job_parser(description or __doc__.split("\n")[0], PRESETS).parse_args(argv)
    cfg = load_config(PRESETS[args.preset](), args.config, args.overrides)
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"))  # a running cluster if any, else a local one
    summary = run(cfg)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=1))
    return summary
