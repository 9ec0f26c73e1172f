"""OSPO's data recipe (Object-centric Self-improving Preference Optimization, arXiv 2506.02015) for
diffusion models: preference pairs whose two images differ in exactly ONE object binding.

The paper's MLLM (1) writes initial prompts per compositional category, (2) perturbs each prompt in
one object-level binding (replace an attribute or object, swap attributes, drop an object),
(3) densifies both prompts, (4) renders base and perturbed prompt with the SAME noise, (5) scores both
images with yes/no questions decomposed from the base prompt and filters, and (6) trains on the
resulting (chosen = image of the base prompt, rejected = image of the perturbed prompt), both
conditioned on the base prompt; the trained model builds the next round's pairs. We keep that recipe
and feed the pairs to our diffusion DPO trainers in the ``raypref.prefdata`` layout (K = 2).

Our reading of the paper's framing (abstract and summaries; the method section was not available to
the search tool): the rejected image is the model's OWN rendering of a minimally perturbed prompt,
so it is a hard negative that shares everything but the perturbed binding with the chosen image.
The VQA score is ``s = p(yes) - p(no)`` averaged over the base prompt's questions; the filter
thresholds (chosen: some yes and S >= 0.6; rejected: must fail at least one question) are the ones
of our issue 7 and are config values (``FilterSection``).

Shapes world mapping of OSPO's categories: colour -> ``colors``, shape -> ``single_object`` and
``two_object``, counting -> ``counting``, spatial -> ``position``, colour attribution ->
``color_attr``; "complex" (multi-clause prompts) has no counterpart in the grammar and is skipped.

Densification is OFF by default in the shapes world: the shapes model's tokenizer knows only the
grammar's words (anything else becomes [UNK], and prompts are truncated at 12 tokens) and ShapesEval
and the shapes judge parse only the grammar, so a dense prompt would condition the model on noise
and could not be scored. ``densify.mode="record"`` computes dense prompts for inspection only
(generation and the Parquet rows keep the grammar prompts); ``"condition"`` (real models) renders
and stores the dense prompts, and is refused for grammar prompts.

Everything here is a plain function of prompts, images and answers, except the callable
:class:`VQAScorer` (load a judge in ``__init__``, map a batch dict in ``__call__``) that also runs in
Ray Data's ``map_batches``. Training is injected into :func:`ospo_rounds`; the job (:func:`main`) injects LoRA DPO from
``raypref.train``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow.parquet as pq

from raypref.checkpoints import resolve_checkpoint
from raypref.generators import GENERATORS, build_generator
from raypref.ospo_config import PRESETS, FilterSection, OSPOConfig
from raypref.perturbation import Perturbation, dense_pair, densify, initial_prompts, perturbations
from raypref.prefdata import make_row, to_table
from raypref.shapes.grammar import parse

# Filtering reasons, in the order they are checked (the summary counts them).
REASONS = ("chosen_no_yes", "chosen_low_score", "rejected_passes_all")


# ----------------------------------------------------------------------------- 4. shared-seed generation


def slot_seed(base: str, slot: int, seed: int = 0, round_index: int = 0) -> int:
    """The seed of (base prompt, slot): the base image and every perturbed image of that slot share it."""
    h = hashlib.blake2b(f"ospo:{seed}:{round_index}:{base}:{slot}".encode(), digest_size=4).digest()
    return int.from_bytes(h, "big") & 0x7FFFFFFF


def generation_items(pairs: list[tuple[str, str, str]], slots: int, seed: int = 0, round_index: int = 0) -> list[dict]:
    """The images to render and score, deduplicated.

    ``pairs``: (key prompt, conditioning base, conditioning perturbed) per perturbation, where the
    key prompt (the base prompt) seeds the slot and supplies the VQA questions. Returns dicts
    {"prompt": text to render, "seed", "question_prompt"}; base and perturbed images of a slot
    share the seed, so their images differ only where the prompts do.
    """
    items = {}
    for key, base, pert in pairs:
        for s in range(slots):
            sd = slot_seed(key, s, seed, round_index)
            for text in (base, pert):
                items.setdefault((text, sd, key), {"prompt": text, "seed": sd, "question_prompt": key})
    return list(items.values())


def render(generator, items: list[dict], batch_size: int = 64) -> list[np.ndarray]:
    """Plain (no Ray) rendering of ``items`` with ``generator.generate(prompts, seeds)``."""
    out = []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        out += list(generator.generate([x["prompt"] for x in chunk], [x["seed"] for x in chunk]))
    return out


# ----------------------------------------------------------------------------- 5. VQA scoring and filtering


def vqa_summary(p_yes, yes_threshold: float = 0.5) -> dict:
    """[Q] p(yes) -> {"score": mean(p(yes) - p(no)) in [-1, 1], "any_yes", "all_yes", "n_questions"}."""
    p = np.asarray(p_yes, dtype=np.float64)
    if p.ndim != 1 or len(p) == 0 or not np.all((p >= 0) & (p <= 1)):
        raise ValueError(f"p_yes must be a non-empty list of probabilities, got {list(p_yes)}")
    yes = p > yes_threshold
    return {"score": float(np.mean(2 * p - 1)), "any_yes": bool(yes.any()), "all_yes": bool(yes.all()),
            "n_questions": int(len(p))}


class VQAScorer:
    """Batch callable: {"image" [B, H, W, 3], "question_prompt" [B]} -> adds "score", "any_yes",
    "all_yes" ([B] each), from the judge's questions about the question prompt (the BASE prompt)."""

    def __init__(self, backend: str = "shapes", yes_threshold: float = 0.5, judge=None, **judge_kwargs):
        from raypref.judges import build_judge

        self.judge = judge if judge is not None else build_judge(backend, **judge_kwargs)
        self.yes_threshold = float(yes_threshold)
        self._questions: dict[str, list[str]] = {}

    def questions(self, prompt: str) -> list[str]:
        if prompt not in self._questions:
            qs = list(self.judge.questions(prompt))
            if not qs:
                raise ValueError(f"the judge produced no questions for {prompt!r}")
            self._questions[prompt] = qs
        return self._questions[prompt]

    def score(self, image: np.ndarray, question_prompt: str) -> dict:
        return vqa_summary(self.judge.vqa(image, self.questions(str(question_prompt))), self.yes_threshold)

    def __call__(self, batch: dict) -> dict:
        res = [self.score(im, qp) for im, qp in zip(batch["image"], batch["question_prompt"])]
        out = dict(batch)
        for k in ("score", "any_yes", "all_yes"):
            out[k] = np.array([r[k] for r in res])
        return out


def filter_reason(chosen: dict, rejected: dict, cfg: FilterSection) -> str | None:
    """Why a (chosen, rejected) slot is dropped (one of REASONS), or None when it is kept.
    ``chosen`` / ``rejected`` are :func:`vqa_summary` dicts."""
    if not chosen["any_yes"]:
        return "chosen_no_yes"
    if chosen["score"] < cfg.min_chosen_score:
        return "chosen_low_score"
    if rejected["all_yes"]:
        return "rejected_passes_all"
    return None


def select_slot(slots: list[tuple[dict, dict]], cfg: FilterSection) -> tuple[int | None, list[str | None]]:
    """The kept slot among [(chosen, rejected)] summaries, and each slot's drop reason (None = kept
    candidate). The kept slot has the highest chosen score; ties go to the lower rejected score
    (the wider margin), then to the lower slot index. None when every slot is dropped."""
    reasons = [filter_reason(c, r, cfg) for c, r in slots]
    ok = [i for i, why in enumerate(reasons) if why is None]
    if not ok:
        return None, reasons
    return min(ok, key=lambda i: (-slots[i][0]["score"], slots[i][1]["score"], i)), reasons


# ----------------------------------------------------------------------------- 6. rows


def ospo_row(p: Perturbation, prompt: str, chosen_image, rejected_image, seed: int,
             chosen_score: float, rejected_score: float) -> dict:
    """A prefdata row with K = 2: [chosen (base prompt's image), rejected (perturbed prompt's)]."""
    return make_row(
        prompt, p.category, [chosen_image, rejected_image],
        ["ospo:base", f"ospo:perturbed:{p.operation}"], [seed, seed],
        ["vqa"], [[chosen_score, rejected_score]], [1.0, 0.0], [1, 2], [(0, 1, 1, 0)],
    )


def assemble_ospo(perts: list[Perturbation], conditioned: list[tuple[str, str]], results: dict,
                  cfg: OSPOConfig) -> tuple[list[dict], list[dict], dict]:
    """Rows, per-pair records and summary from rendered + scored images.

    ``results[(prompt, seed, question_prompt)]`` = {"image", "score", "any_yes", "all_yes"};
    ``conditioned[i]`` = the (base, perturbed) texts that were rendered for ``perts[i]``.
    """
    rows, records = [], []
    summary = {"bases": len({p.base for p in perts}), "perturbations": len(perts), "kept": 0,
               "per_operation": {}, "kept_per_operation": {}, "dropped": {r: 0 for r in REASONS},
               "dropped_pairs": 0}
    for p, (cb, cp) in zip(perts, conditioned):
        seeds = [slot_seed(p.base, s, cfg.generate.seed, cfg.run.round_index) for s in range(cfg.generate.slots)]
        slots = [(results[(cb, sd, p.base)], results[(cp, sd, p.base)]) for sd in seeds]
        best, reasons = select_slot(slots, cfg.filter)
        summary["per_operation"][p.operation] = summary["per_operation"].get(p.operation, 0) + 1
        for why in reasons:  # per slot: why each candidate slot was rejected
            if why is not None:
                summary["dropped"][why] += 1
        rec = {"base": p.base, "perturbed": p.perturbed, "operation": p.operation, "binding": p.binding,
               "category": p.category, "kept": best is not None, "slot": best, "slot_reasons": reasons}
        if cfg.densify.mode != "off":
            rec["dense"] = [densify(p.base, cfg.densify.template), densify(p.perturbed, cfg.densify.template)] \
                if cfg.densify.mode == "record" else [cb, cp]
        if best is None:
            summary["dropped_pairs"] += 1
        else:
            c, r = slots[best]
            rows.append(ospo_row(p, cb, c["image"], r["image"], seeds[best], c["score"], r["score"]))
            summary["kept"] += 1
            summary["kept_per_operation"][p.operation] = summary["kept_per_operation"].get(p.operation, 0) + 1
            rec.update(seed=seeds[best], chosen_score=c["score"], rejected_score=r["score"])
        records.append(rec)
    return rows, records, summary


def naive_items(prompts, seed: int = 0, round_index: int = 0) -> list[dict]:
    """Two samples (different seeds) per prompt, for the naive-pairs baseline."""
    return [{"prompt": p, "seed": slot_seed(p, s, seed, round_index), "question_prompt": p}
            for p in prompts for s in range(2)]


def assemble_naive(prompts, results: dict, cfg: OSPOConfig) -> tuple[list[dict], list[dict], dict]:
    """Naive pairs: the two samples of a prompt ranked by VQA score (winner first); ties dropped,
    as they carry no preference. Same row layout as OSPO (generators "naive:sample")."""
    rows, records = [], []
    summary = {"prompts": len(prompts), "kept": 0, "dropped": {"tie": 0}}
    for p in prompts:
        seeds = [slot_seed(p, s, cfg.generate.seed, cfg.run.round_index) for s in range(2)]
        a, b = (results[(p, sd, p)] for sd in seeds)
        rec = {"prompt": p, "seeds": seeds, "scores": [a["score"], b["score"]], "kept": a["score"] != b["score"]}
        records.append(rec)
        if a["score"] == b["score"]:
            summary["dropped"]["tie"] += 1
            continue
        (w, sw), (lo, sl) = sorted([(a, seeds[0]), (b, seeds[1])], key=lambda x: -x[0]["score"])
        cat = ""
        try:
            cat = parse(p).category
        except ValueError:
            pass
        rows.append(make_row(p, cat, [w["image"], lo["image"]], ["naive:sample", "naive:sample"], [sw, sl],
                             ["vqa"], [[w["score"], lo["score"]]], [1.0, 0.0], [1, 2], [(0, 1, 1, 0)]))
        summary["kept"] += 1
    return rows, records, summary


def score_items(items: list[dict], images, scorer: VQAScorer) -> dict:
    """{(prompt, seed, question_prompt): {"image", "score", "any_yes", "all_yes"}} for plain runs."""
    out = {}
    for it, im in zip(items, images):
        s = scorer.score(im, it["question_prompt"])
        out[(it["prompt"], it["seed"], it["question_prompt"])] = {"image": np.asarray(im), **s}
    return out


def plan(cfg: OSPOConfig, judge=None) -> tuple[list, list, list[dict]]:
    """What a build renders: (perturbations or prompts, conditioned texts, generation items).
    Naive mode returns (prompts, [], items)."""
    prompts = initial_prompts(cfg.prompts, judge)
    if cfg.run.mode == "naive":
        return prompts, [], naive_items(prompts, cfg.generate.seed, cfg.run.round_index)
    perts = perturbations(prompts, cfg.perturb, judge)
    conditioned = [dense_pair(p, cfg.densify, judge) for p in perts]
    items = generation_items([(p.base, cb, cp) for p, (cb, cp) in zip(perts, conditioned)],
                             cfg.generate.slots, cfg.generate.seed, cfg.run.round_index)
    return perts, conditioned, items


def build_pairs(cfg: OSPOConfig, generator, scorer: VQAScorer, results: dict | None = None):
    """One plain (no Ray) build: (rows, records, summary). ``results`` may be precomputed (the
    job's Ray Data path passes them); otherwise ``generator`` renders and ``scorer`` scores."""
    judge = scorer.judge if scorer is not None else None
    what, conditioned, items = plan(cfg, judge)
    if results is None:
        results = score_items(items, render(generator, items, cfg.run.batch_size), scorer)
    if cfg.run.mode == "naive":
        return assemble_naive(what, results, cfg)
    return assemble_ospo(what, conditioned, results, cfg)


# ----------------------------------------------------------------------------- self-improvement


def ospo_rounds(cfg: OSPOConfig, model: str, make_generator: Callable[[str], object], scorer: VQAScorer,
                train: Callable[[list[dict], str, int], str], rounds: int | None = None,
                build: Callable = build_pairs) -> list[dict]:
    """Self-improving OSPO: round r's model (a generator spec) builds round r's pairs, ``train(rows,
    model, r)`` returns the next model's spec, which builds round r + 1's pairs (fresh seeds: the
    round index is mixed into them). Returns one summary dict per round."""
    rounds = cfg.run.rounds if rounds is None else rounds
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    history = []
    for r in range(rounds):
        rcfg = replace(cfg, run=replace(cfg.run, round_index=cfg.run.round_index + r),
                       generate=replace(cfg.generate, generator=model))
        rows, _, summary = build(rcfg, make_generator(model), scorer)
        if not rows:
            raise ValueError(f"round {r}: every pair was filtered out ({summary['dropped']}); nothing to train on")
        trained = train(rows, model, r)
        history.append({"round": r, "model": model, "rows": len(rows), "summary": summary, "trained": trained})
        model = trained
    return history


# ----------------------------------------------------------------------------- the job


def generator_kwargs(cfg: OSPOConfig, spec: str) -> dict:
    if spec.startswith("checkpoint:"):
        return {"num_inference_steps": cfg.generate.num_inference_steps, "guidance_scale": cfg.generate.guidance_scale}
    return {}


def use_ray(cfg: OSPOConfig, n_images: int) -> bool:
    return cfg.run.use_ray == "always" or (cfg.run.use_ray == "auto" and n_images >= cfg.run.ray_min_images)


def ray_results(cfg: OSPOConfig, items: list[dict]) -> dict:
    """Render and score ``items`` with Ray Data: two actor pools (generator, judge) with fractional
    CPUs. Returns {(prompt, seed, question_prompt): {"image", "score", "any_yes", "all_yes"}}."""
    import ray
    from ray.data import ActorPoolStrategy

    kind, _, arg = cfg.generate.generator.partition(":")
    if kind not in GENERATORS or not arg:
        raise ValueError(f"bad generator spec {cfg.generate.generator!r}")
    pool = lambda: ActorPoolStrategy(size=cfg.run.num_actors)  # noqa: E731
    ds = ray.data.from_items(items).map_batches(
        GENERATORS[kind], fn_constructor_args=(arg,),
        fn_constructor_kwargs=generator_kwargs(cfg, cfg.generate.generator),
        compute=pool(), num_cpus=cfg.run.cpus_per_actor, batch_size=cfg.run.batch_size, batch_format="numpy",
    ).map_batches(
        VQAScorer, fn_constructor_kwargs={"backend": cfg.judge.backend, "yes_threshold": cfg.filter.yes_threshold,
                                          **cfg.judge.kwargs()},
        compute=pool(), num_cpus=cfg.run.cpus_per_actor, batch_size=cfg.run.batch_size, batch_format="numpy",
    )
    out = {}
    for r in ds.take_all():
        out[(str(r["prompt"]), int(r["seed"]), str(r["question_prompt"]))] = {
            "image": np.asarray(r["image"], dtype=np.uint8), "score": float(r["score"]),
            "any_yes": bool(r["any_yes"]), "all_yes": bool(r["all_yes"]),
        }
    return out


def build_round(cfg: OSPOConfig, spec: str, scorer: VQAScorer):
    """(rows, records, summary) of one build, with Ray Data or plainly."""
    _, _, items = plan(cfg, scorer.judge)
    if use_ray(cfg, len(items)):
        import ray

        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS"))  # a running cluster if any, else a local one
        return build_pairs(cfg, None, scorer, results=ray_results(cfg, items))
    return build_pairs(cfg, build_generator(spec, **generator_kwargs(cfg, spec)), scorer)


def write_outputs(path: str | Path, rows: list[dict], records: list[dict], summary: dict) -> dict:
    """Parquet + records JSONL + summary JSON; returns the summary with the written paths."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(to_table(rows), path)
    rec_path, sum_path = path.with_suffix(".records.jsonl"), path.with_suffix(".summary.json")
    rec_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {**summary, "rows": len(rows), "parquet": str(path), "records": str(rec_path)}
    sum_path.write_text(json.dumps(summary, indent=1))
    return summary


def make_trainer(cfg: OSPOConfig, train_args: list[str]):
    """``train(rows, model_spec, r) -> next model spec``: LoRA (or full) preference training with
    ``raypref.train`` (configured by ``train_args``, its command line: --preset / --config / --method /
    overrides) on round r's rows, folded into a full pipeline that generates round r + 1."""
    out = Path(cfg.run.output).expanduser()

    def train(rows, model, r):
        data = out.with_name(f"{out.stem}.round{r}.parquet")
        pq.write_table(to_table(rows), data)
        if not model.startswith("checkpoint:"):
            raise ValueError(f"only checkpoint:... models can be trained, got {model!r}")
        export = out.parent / f"ospo_round{r}_model"
        base = str(resolve_checkpoint(model.partition(":")[2]))
        from raypref import train
        from raypref.train_state import write_full_model

        cfg = train.parse_config([*train_args, f"data.path={data}", f"model.path={base}",
                                  f"run.name=ospo-round{r}", "run.export_dir="])
        result = train.build_trainer(cfg).fit()
        with result.checkpoint.as_directory() as d:  # LoRA folded in: the next round generates with it
            write_full_model(d, cfg, str(export))
        return f"checkpoint:{export}"

    return train


def main(argv: list[str] | None = None, description: str | None = None) -> dict:
    """The OSPO job: build pairs (or the naive baseline) once, or run self-improving rounds."""
    from raypref.config import job_parser, load_config, to_dict

    parser = job_parser(description or __doc__.split("\n")[0], PRESETS)
    parser.add_argument("--train-preset", default="shapes_cpu", help="train_preference preset (rounds > 1)")
    parser.add_argument("--train-method", default="dpo", help="dpo | rankdpo (K = 2) | balanced")
    parser.add_argument("--train-override", action="append", default=[], help="section.key=value for training")
    args = parser.parse_args(argv)
    cfg = load_config(PRESETS[args.preset](), args.config, args.overrides)
    print(json.dumps(to_dict(cfg), indent=1))
    scorer = VQAScorer(cfg.judge.backend, cfg.filter.yes_threshold, **cfg.judge.kwargs())

    if cfg.run.rounds == 1:
        rows, records, summary = build_round(cfg, cfg.generate.generator, scorer)
        summary = write_outputs(cfg.run.output, rows, records, summary)
    else:
        if cfg.run.mode != "ospo":
            raise ValueError("run.rounds > 1 is OSPO self-improvement; use run.mode=ospo")
        train = make_trainer(cfg, ["--preset", args.train_preset, "--method", args.train_method, *args.train_override])
        history = ospo_rounds(cfg, cfg.generate.generator, lambda spec: spec, scorer, train,
                              build=lambda c, spec, s: build_round(c, spec, s))
        summary = {"rounds": history, "final_model": history[-1]["trained"]}
        Path(cfg.run.output).expanduser().with_suffix(".summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1, default=str))
    return summary
