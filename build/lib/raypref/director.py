"""EvolveDirector's curation loop (arXiv 2410.07133): a dynamic training set that a VLM judge curates.

The set holds (prompt, teacher image) samples. Each round samples a fraction of it, lets the base
model draw each sampled prompt, and asks the judge whether the base image or the teacher's image
follows the prompt better:

- teacher wins -> keep the sample, and EXPAND: ``judge.expand(prompt, n_expand)`` gives new prompts
  of the same kind, rendered by the winning teacher (the one that made the sample's image) and added;
- base wins (ties included: the base model already does it) -> DELETE the sample, and with
  probability ``p_mutate`` MUTATE: ``judge.mutate()`` gives a fresh prompt, rendered by a teacher
  chosen by ``round.teacher_choice`` and added;
- no answer (the judge says neither image, or its reply could not be parsed) -> keep, unchanged.

Design choices (why):

- Teachers are paid per image, so a prompt's teacher images are bought ONCE, when the prompt enters
  the set. With several teachers the choice among them happens there (``teacher_choice``):
  ``tournament`` renders the prompt with every teacher (one paid call each) and one
  ``discriminate`` over all their images, offered in a per-prompt shuffled order, keeps the
  judge's pick (none if it picks none);
  ``best`` renders with the teacher of the highest selection rate in the prompt's category so far
  (one call); ``round_robin`` cycles (one call). The stored image is the winner, so a round's
  "base vs best teacher" is one comparison of the base image with the stored image, with no new
  paid call. Expansions are rendered by the sample's own (winning) teacher, as in the paper.
- The base image is shown first (index 0): the shapes judge breaks ties to the lowest index, so a
  base image as good as the teacher's deletes the sample.
- Selection statistics (EvolveDirector's table of selection rates): ``selection`` counts, per
  teacher and category, how often a teacher's image entered a tournament and how often the judge
  picked it; ``vs_base`` counts how often a stored teacher image was compared with the base image
  and won. They live in the Parquet file's metadata, so they are versioned with the data.
- One Parquet file per round (``raypref.curation_store``), committed after the round's decision log.
- Every random draw is seeded by (run.seed, round): same seed, judge seed and models -> same round.

Judges are duck-typed (``raypref.judges``): ``discriminate_batch``, ``expand_batch``, ``mutate_batch``
and a ``calls`` counter. :class:`HandleJudge` gives a Ray Serve ``DeploymentHandle`` of
``raypref.serving.judge`` that interface. Generators have ``generate(prompts, seeds) -> [B, H, W, 3] uint8``
(``raypref.generators``, ``raypref.shapes.teachers.Teacher``, a shapes pipeline).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raypref.curation_store import (
    DirectorDataset,
    category_of,
    load,
    make_rows,
    save,
    to_table,
    versions,
    write_round,
)
from raypref.director_config import DirectorConfig
from raypref.files import atomic_write_json, read_json
from raypref.prefdata import decode_png
from raypref.spend import TeacherLedger, generate, generator_counters, unit_cost

DECISIONS = ("expand", "delete", "delete+mutate", "undecided")


def build_teachers(cfg: DirectorConfig) -> dict:
    """models.teachers -> {name: generator}; a bare name is a procedural shapes teacher."""
    from raypref.generators import TeacherGenerator, build_generator

    return {t: build_generator(t) if ":" in t else TeacherGenerator(t, size=cfg.data.image_size)
            for t in cfg.models.teachers}


# ------------------------------------------------------------------------------------------ judge over Serve
class HandleJudge:
    """The judge protocol over a Ray Serve ``DeploymentHandle`` of ``serve/judge.py``.

    Batch forms send every request before waiting, so the deployment's ``@serve.batch`` groups them.
    ``calls`` counts requests sent (a chat backend's retries happen server-side: see its /stats)."""

    def __init__(self, handle):
        self.handle = handle
        self.calls = 0
        self.unparsable = 0

    def _gather(self, responses) -> list:
        self.calls += len(responses)
        return [r.result() for r in responses]

    def discriminate(self, prompt, images):
        return self.discriminate_batch([prompt], [images])[0]

    def discriminate_batch(self, prompts, images_lists):
        if len(prompts) != len(images_lists):
            raise ValueError(f"{len(prompts)} prompts but {len(images_lists)} image lists")
        return self._gather([self.handle.discriminate.remote(p, list(ims)) for p, ims in zip(prompts, images_lists)])

    def expand(self, prompt, n):
        return self.expand_batch([prompt], n)[0]

    def expand_batch(self, prompts, n):
        return self._gather([self.handle.expand.remote(p, n) for p in prompts])

    def mutate(self):
        return self.mutate_batch(1)[0]

    def mutate_batch(self, n):
        return self._gather([self.handle.mutate.remote() for _ in range(n)])


# ------------------------------------------------------------------------------------------ statistics
def _bump(stats: dict, kind: str, teacher: str, category: str, seen: int, won: int) -> None:
    cell = stats.setdefault(kind, {}).setdefault(teacher, {}).setdefault(category, [0, 0])
    cell[0] += seen
    cell[1] += won


def selection_rates(stats: dict, kind: str = "selection") -> dict:
    """{teacher: {category: rate}} = selected / offered (``kind="vs_base"``: won / compared)."""
    return {t: {c: (v[1] / v[0] if v[0] else float("nan")) for c, v in cats.items()}
            for t, cats in stats.get(kind, {}).items()}


def best_teacher(stats: dict, category: str, teachers: list[str], fallback: int = 0) -> str:
    """The teacher most likely to be picked in ``category``: the highest Laplace-smoothed rate
    (won + 1) / (seen + 2) from tournament selections when any teacher has some in ``category``, else
    from the rounds' comparisons with the base model (``vs_base``); with no evidence at all,
    ``teachers[fallback % len(teachers)]`` (the caller rotates it, so mutations spread over the
    teachers rather than all going to the first). Ties go to the earlier teacher."""
    for kind in ("selection", "vs_base"):
        cells = [stats.get(kind, {}).get(t, {}).get(category, [0, 0]) for t in teachers]
        if any(seen for seen, _ in cells):
            rates = [(won + 1) / (seen + 2) for seen, won in cells]
            return teachers[max(range(len(teachers)), key=lambda i: (rates[i], -i))]
    return teachers[fallback % len(teachers)]


def _render_new(items, teachers: dict, judge, ledger: TeacherLedger, stats: dict, batch_size: int) -> list:
    """Render new prompts. ``items``: [(prompt, category, teacher name or None for a tournament, seed)].
    Returns [(image or None, teacher or None, judge answer or None)] in order: a tournament renders
    with every teacher, one discriminate over all, and keeps the pick (None when the judge picks none)."""
    out: list = [None] * len(items)
    names = list(teachers)
    by_teacher: dict[str, list[int]] = {}
    tour = [i for i, it in enumerate(items) if it[2] is None]
    for i, it in enumerate(items):
        if it[2] is not None:
            by_teacher.setdefault(it[2], []).append(i)
    for name, idx in by_teacher.items():
        images = ledger.render(name, [items[i][0] for i in idx], [items[i][3] for i in idx], batch_size)
        for i, im in zip(idx, images):
            out[i] = (im, name, None)
    if tour:
        cand = {
            n: ledger.render(n, [items[i][0] for i in tour], [items[i][3] for i in tour], batch_size) for n in names
        }
        # Offer the teachers' images in an order shuffled per prompt (seeded by the item's seed): a
        # judge that breaks ties to the first image would otherwise credit the first teacher with
        # every tie and bias the selection rates.
        orders = [[names[j] for j in np.random.default_rng([int(items[i][3]), 7]).permutation(len(names))]
                  for i in tour]
        answers = judge.discriminate_batch([items[i][0] for i in tour], [[cand[n][k] for n in order]
                                                                        for k, order in enumerate(orders)])
        for k, (i, a, order) in enumerate(zip(tour, answers, orders)):
            a = None if a is None or not 0 <= int(a) < len(names) else int(a)
            winner = None if a is None else order[a]
            for n in names:
                _bump(stats, "selection", n, items[i][1], 1, int(n == winner))
            out[i] = (None, None, None) if winner is None else (cand[winner][k], winner, names.index(winner))
    return out


# ------------------------------------------------------------------------------------------ initial set
def build_initial_set(cfg: DirectorConfig, teachers: dict, judge=None) -> DirectorDataset:
    """Round 0: ``data.n_per_category`` distinct grammar prompts per shapes category (fewer when a
    category has fewer prompts), rendered by ``data.init_teacher`` (a name, "mix" = round robin over
    the teachers, or "tournament", which needs ``judge`` and seeds the selection statistics)."""
    from raypref.shapes.grammar import CATEGORIES, all_prompts

    names = list(teachers)
    init = cfg.data.init_teacher
    if init not in ("mix", "tournament") and init not in teachers:
        raise ValueError(f"init_teacher {init!r} is not one of the teachers {names}")
    if init == "tournament" and judge is None:
        raise ValueError("init_teacher='tournament' needs a judge")
    rng = np.random.default_rng([cfg.run.seed, 0, 0])
    items = []
    for c in CATEGORIES:
        pool = all_prompts(c)
        picks = rng.choice(len(pool), size=min(cfg.data.n_per_category, len(pool)), replace=False)
        for p in sorted(int(k) for k in picks):
            teacher = None if init == "tournament" else (names[len(items) % len(names)] if init == "mix" else init)
            items.append((pool[p], c, teacher, int(rng.integers(2**31 - 1))))
    stats: dict = {"selection": {}, "vs_base": {}}
    ledger = TeacherLedger(teachers, cfg.models.default_teacher_cost)
    rendered = _render_new(items, teachers, judge, ledger, stats, cfg.round.batch_size)
    kept = [(it, r) for it, r in zip(items, rendered) if r[0] is not None]
    rows = make_rows(
        [it[0] for it, _ in kept], [r[0] for _, r in kept], [r[1] for _, r in kept], [it[3] for it, _ in kept],
        0, ["seed"] * len(kept), [""] * len(kept), [it[1] for it, _ in kept],
    )
    return DirectorDataset(to_table(rows), 0, stats)


# ------------------------------------------------------------------------------------------ one round
def run_round(dataset: DirectorDataset, base_generator, teachers: dict, judge, cfg: DirectorConfig,
              round_idx: int) -> tuple[DirectorDataset, dict]:
    """One curation round -> (the new set, the round's log ``{"decisions": [...], "summary": {...}}``).

    ``teachers``: {name: generator}; every teacher named in the set must be there (it renders the
    expansions of its own samples). Decisions are as in the module docstring; a new prompt is
    skipped (logged with its reason) when it is already in the set (``dedup``), when the set is
    full (``max_size``), when the round's teacher cost would exceed ``budget``, or when a
    tournament's judge picks no image.
    """
    r = cfg.round
    if round_idx <= dataset.round:
        raise ValueError(f"round_idx must be > the dataset's round {dataset.round}, got {round_idx}")
    rows = dataset.rows()
    missing = sorted({row["teacher"] for row in rows} - set(teachers))
    if missing:
        raise ValueError(f"the set has samples of teachers {missing} that are not in teachers {list(teachers)}")
    names = list(teachers)
    stats = copy.deepcopy(dataset.stats)
    rng = np.random.default_rng([cfg.run.seed, round_idx])
    n = len(rows)
    k = min(n, math.ceil(r.sample_fraction * n))
    idx = sorted(int(i) for i in rng.choice(n, size=k, replace=False)) if k else []
    base_seeds = [int(s) for s in rng.integers(2**31 - 1, size=k)]
    u_mutate = rng.random(k)
    sampled = [rows[i] for i in idx]
    ledger = TeacherLedger(teachers, cfg.models.default_teacher_cost)
    judge_calls0 = int(getattr(judge, "calls", 0))

    # 1. base images, and the judge: base (index 0) vs the stored teacher image (index 1)
    base_before = generator_counters(base_generator)
    base_images = generate(base_generator, [s["prompt"] for s in sampled], base_seeds, r.batch_size)
    teacher_images = [decode_png(s["image"]) for s in sampled]
    for s, b, t in zip(sampled, base_images, teacher_images):
        if b.shape != t.shape:
            raise ValueError(f"base image {b.shape} and teacher image {t.shape} of {s['prompt']!r} differ in shape; "
                             "set data.image_size to the base model's resolution")
    answers = judge.discriminate_batch([s["prompt"] for s in sampled],
                                       [[b, t] for b, t in zip(base_images, teacher_images)]) if k else []

    # 2. decisions
    decisions = []
    for j, (s, a) in enumerate(zip(sampled, answers)):
        a = None if a is None else int(a)
        winner = {0: "base", 1: "teacher"}.get(a)
        if winner is not None:
            _bump(stats, "vs_base", s["teacher"], s["category"], 1, int(winner == "teacher"))
        if winner == "teacher":
            decision = "expand"
            reason = f"the judge prefers the teacher's image: the base model fails {s['category'] or 'this prompt'}"
        elif winner == "base":
            decision = "delete+mutate" if u_mutate[j] < r.p_mutate else "delete"
            reason = "the judge prefers the base image (or ties): the base model already does this"
        else:
            decision = "undecided"
            reason = f"the judge picked neither image (answer {a!r}): keep the sample unchanged"
        decisions.append({
            "round": round_idx, "sample_id": s["sample_id"], "prompt": s["prompt"], "category": s["category"],
            "decision": decision, "winner": winner, "judge_answer": a, "teacher": s["teacher"],
            "base_seed": base_seeds[j], "reason": reason, "judge_calls": 1, "new_prompts": [], "skipped": [],
            "teacher_calls": 0, "teacher_cost": 0.0,
        })

    # 3. new prompts: expansions (the winning teacher) and mutations (teacher_choice)
    exp = [d for d in decisions if d["decision"] == "expand" and r.n_expand > 0]
    mut = [d for d in decisions if d["decision"] == "delete+mutate"]
    expansions = judge.expand_batch([d["prompt"] for d in exp], r.n_expand) if exp else []
    mutations = judge.mutate_batch(len(mut)) if mut else []
    for d in exp + mut:
        d["judge_calls"] += 1
    deleted = {d["sample_id"] for d in decisions if d["winner"] == "base"}
    kept = [row for row in rows if row["sample_id"] not in deleted]
    present = {row["prompt"] for row in kept}
    size = len(kept)
    budget_left = r.budget if r.budget > 0 else math.inf
    rr = sum(len(v) for v in stats.get("selection", {}).values())  # round-robin offset, varies by round
    items, owners = [], []  # (prompt, category, teacher or None, seed), decision it belongs to
    candidates = [(d, p, "expand") for d, ps in zip(exp, expansions) for p in (ps or [])]
    candidates += [(d, p, "mutate") for d, p in zip(mut, mutations)]
    for d, p, origin in candidates:
        if not isinstance(p, str) or not p:
            d["skipped"].append({"prompt": p, "reason": "the judge gave no prompt"})
            continue
        category = d["category"] if origin == "expand" else category_of(p)
        rotation = round_idx + rr + len(items)
        if origin == "expand":
            teacher = d["teacher"]
        elif r.teacher_choice == "tournament" and len(names) > 1:
            teacher = None
        elif r.teacher_choice == "best":
            teacher = best_teacher(stats, category, names, fallback=rotation)
        else:
            teacher = names[rotation % len(names)]
        price = (sum(unit_cost(teachers[t], cfg.models.default_teacher_cost) for t in names) if teacher is None
                 else unit_cost(teachers[teacher], cfg.models.default_teacher_cost))
        why = ("already in the set" if r.dedup and p in present else
               "the set is full (round.max_size)" if r.max_size and size >= r.max_size else
               "over the round's teacher budget" if price > budget_left + 1e-12 else None)
        if why:
            d["skipped"].append({"prompt": p, "reason": why})
            continue
        present.add(p)
        size += 1
        budget_left -= price
        items.append((p, category, teacher, int(rng.integers(2**31 - 1))))
        owners.append((d, origin))

    rendered = _render_new(items, teachers, judge, ledger, stats, r.batch_size)
    new_rows = []
    for (p, category, teacher, seed), (d, origin), (image, who, pick) in zip(items, owners, rendered):
        if teacher is None:  # tournament: every teacher was paid for this prompt
            d["judge_calls"] += 1
            d["teacher_calls"] += len(names)
            d["teacher_cost"] += sum(unit_cost(teachers[t], cfg.models.default_teacher_cost) for t in names)
        else:
            d["teacher_calls"] += 1
            d["teacher_cost"] += unit_cost(teachers[teacher], cfg.models.default_teacher_cost)
        if image is None:
            d["skipped"].append({"prompt": p, "reason": "tournament: the judge picked no teacher image"})
            continue
        d["new_prompts"].append({"prompt": p, "origin": origin, "teacher": who, "seed": seed})
        new_rows.append((p, image, who, seed, origin, d["prompt"], category))
    added = []
    if new_rows:
        p_, im_, t_, s_, o_, par_, c_ = (list(col) for col in zip(*new_rows))
        added = make_rows(p_, im_, t_, s_, round_idx, o_, par_, c_)
    judge_calls = int(getattr(judge, "calls", 0)) - judge_calls0
    for d in decisions:
        d["judge_cost"] = d["judge_calls"] * cfg.judge.call_cost
        d["cost"] = d["teacher_cost"] + d["judge_cost"]

    new = DirectorDataset(to_table(kept + added), round_idx, stats)
    base_after = generator_counters(base_generator)
    summary = _summary(round_idx, n, decisions, added, ledger, judge_calls, cfg, len(new),
                       None if base_before is None or base_after is None else base_after[0] - base_before[0], k)
    return new, {"decisions": decisions, "summary": summary}


def _summary(round_idx, size_before, decisions, added, ledger, judge_calls, cfg, size_after, base_calls, k) -> dict:
    per_cat: dict = {}
    for d in decisions:
        cell = per_cat.setdefault(d["category"], {x: 0 for x in DECISIONS})
        cell[d["decision"]] += 1
    teacher_cost = float(sum(ledger.cost.values()))
    judge_cost = judge_calls * cfg.judge.call_cost
    return {
        "round": round_idx, "size_before": size_before, "size_after": size_after, "sampled": k,
        "decisions": {x: sum(d["decision"] == x for d in decisions) for x in DECISIONS},
        "decisions_per_category": per_cat,
        "added": {o: sum(row["origin"] == o for row in added) for o in ("expand", "mutate")},
        "skipped": sum(len(d["skipped"]) for d in decisions),
        "teacher_calls": dict(ledger.calls), "teacher_cost": dict(ledger.cost),
        "base_calls": k if base_calls is None else base_calls,
        "judge_calls": judge_calls, "judge_cost": judge_cost, "cost": teacher_cost + judge_cost,
    }


# ------------------------------------------------------------------------------------------ the driver's call
@dataclass
class CurationResult:
    """One curation round as the driver sees it: the round's set, its summary, the initial set's bill
    (round 1 carries it) and what this call itself paid (nothing when the round was committed)."""

    dataset: DirectorDataset
    summary: dict
    initial: dict
    spent: dict  # {"teacher_calls", "teacher_cost", "judge_calls"} paid by this call

    @property
    def teacher_calls(self) -> dict:
        return _sum_dicts(self.summary["teacher_calls"], self.initial.get("teacher_calls", {}))

    @property
    def teacher_cost(self) -> dict:
        return _sum_dicts(self.summary["teacher_cost"], self.initial.get("teacher_cost", {}))

    @property
    def judge_calls(self) -> int:
        return int(self.summary["judge_calls"]) + int(self.initial.get("judge_calls", 0))

    @property
    def judge_cost(self) -> float:
        return float(self.summary["judge_cost"]) + float(self.initial.get("judge_cost", 0.0))


def _sum_dicts(a: dict, b: dict) -> dict:
    return {k: a.get(k, 0) + b.get(k, 0) for k in sorted(set(a) | set(b))}


def _teacher_counters(teachers: dict) -> tuple[dict, dict]:
    calls, cost = {}, {}
    for name, gen in teachers.items():
        c = generator_counters(gen)
        calls[name], cost[name] = (c if c is not None else (0, 0.0))
    return calls, cost


def curate(cfg: DirectorConfig, r: int, base_generator, teachers: dict, get_judge) -> CurationResult:
    """Round ``r`` (>= 1) of curation in ``cfg.data.directory``, resumable: round 1 first builds (and
    pays for) the initial set unless it is committed; a committed round is loaded, not re-run (no
    new calls). ``get_judge()`` is called only when a judge is needed, so a resumed round starts no
    judge server."""
    directory = Path(cfg.data.directory).expanduser()
    spent = {"teacher_calls": 0, "teacher_cost": 0.0, "judge_calls": 0}
    initial: dict = {}
    if r == 1 and 0 not in versions(directory):
        judge = get_judge()
        j0 = judge.calls
        ds0 = build_initial_set(cfg, teachers, judge)
        calls, cost = _teacher_counters(teachers)
        initial = {"teacher_calls": calls, "teacher_cost": cost, "judge_calls": judge.calls - j0,
                   "judge_cost": (judge.calls - j0) * cfg.judge.call_cost, "size": len(ds0)}
        atomic_write_json(directory / "initial.json", initial)
        save(directory, ds0)
        spent = {"teacher_calls": sum(calls.values()), "teacher_cost": sum(cost.values()),
                 "judge_calls": initial["judge_calls"]}
    elif r == 1:
        initial = read_json(directory / "initial.json")
    if r in versions(directory):
        dataset = load(directory, r)
    else:
        previous = load(directory, max(v for v in versions(directory) if v < r))
        dataset, log = run_round(previous, base_generator, teachers, get_judge(), cfg, r)
        write_round(directory, dataset, log)
        sm = log["summary"]
        spent = {"teacher_calls": spent["teacher_calls"] + sum(sm["teacher_calls"].values()),
                 "teacher_cost": spent["teacher_cost"] + sum(sm["teacher_cost"].values()),
                 "judge_calls": spent["judge_calls"] + sm["judge_calls"]}
    summary = read_json(directory / "logs" / f"round-{r:04d}.summary.json")
    return CurationResult(dataset, summary, initial, spent)
