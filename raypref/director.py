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
- One Parquet file per round (``round-0003.parquet``), written to a temp file and renamed
  (``os.replace`` is atomic), after the round's decision log: a crash leaves the previous
  version as the latest loadable one and never a half-written file under a version name.
- Every random draw is seeded by (run.seed, round): same seed, judge seed and models -> same round.

Judges are duck-typed (``raypref.judge``): ``discriminate_batch``, ``expand_batch``, ``mutate_batch``
and a ``calls`` counter. :class:`HandleJudge` gives a Ray Serve ``DeploymentHandle`` of
``serve/judge.py`` that interface. Generators have ``generate(prompts, seeds) -> [B, H, W, 3] uint8``
(``raypref.generators``, ``raypref.shapes.teachers.Teacher``, a shapes pipeline).
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raypref import prefdata
from raypref.config import check
from raypref.prefdata import decode_png, encode_png

ORIGINS = ("seed", "expand", "mutate")
DECISIONS = ("expand", "delete", "delete+mutate", "undecided")
TEACHER_CHOICES = ("best", "round_robin", "tournament")
VERSION_RE = re.compile(r"^round-(\d{4})\.parquet$")
STATS_KEY = b"raypref.director.stats"
ROUND_KEY = b"raypref.director.round"

SCHEMA = pa.schema([
    ("sample_id", pa.string()),  # unique in the set: "r{round added}-{n}"
    ("prompt", pa.string()),
    ("category", pa.string()),  # shapes category, or "" for free text
    ("image", pa.binary()),  # the teacher's image, PNG bytes
    ("teacher", pa.string()),
    ("seed", pa.int64()),  # the seed the teacher image was drawn with
    ("round_added", pa.int32()),
    ("origin", pa.string()),  # seed | expand | mutate
    ("parent", pa.string()),  # the prompt it was expanded / mutated from ("" for seed rows)
])


# ------------------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class DataSection:
    directory: str = "~/raypref_runs/director/shapes"
    n_per_category: int = 32  # initial set: prompts per shapes category
    init_teacher: str = "tournament"  # a teacher name, "mix" (round robin) or "tournament"
    image_size: int = 32

    def __post_init__(self):
        check(bool(self.directory), "data.directory must not be empty")
        check(self.n_per_category >= 1, f"data.n_per_category must be >= 1, got {self.n_per_category}")
        check(self.image_size >= 8, f"data.image_size must be >= 8, got {self.image_size}")


@dataclass(frozen=True)
class RoundSection:
    rounds: int = 10
    sample_fraction: float = 0.25  # of the set, per round
    n_expand: int = 2  # new prompts per sample the teacher wins
    p_mutate: float = 0.2  # probability of a mutation per deleted sample
    teacher_choice: str = "best"  # who renders a mutated prompt: best | round_robin | tournament
    dedup: bool = True  # skip new prompts already in the set
    max_size: int = 0  # stop adding once the set has this many samples (0 = no cap)
    budget: float = 0.0  # teacher cost allowed per round (0 = no cap)
    batch_size: int = 64  # prompts per generate() call

    def __post_init__(self):
        check(self.rounds >= 1, f"round.rounds must be >= 1, got {self.rounds}")
        check(0 < self.sample_fraction <= 1, f"round.sample_fraction must be in (0, 1], got {self.sample_fraction}")
        check(self.n_expand >= 0, f"round.n_expand must be >= 0, got {self.n_expand}")
        check(0 <= self.p_mutate <= 1, f"round.p_mutate must be in [0, 1], got {self.p_mutate}")
        check(self.teacher_choice in TEACHER_CHOICES,
              f"round.teacher_choice must be one of {TEACHER_CHOICES}, got {self.teacher_choice!r}")
        check(self.max_size >= 0, f"round.max_size must be >= 0, got {self.max_size}")
        check(self.budget >= 0 and math.isfinite(self.budget), f"round.budget must be >= 0, got {self.budget}")
        check(self.batch_size >= 1, f"round.batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class ModelsSection:
    teachers: tuple[str, ...] = ("prism", "quill", "vellum", "zephyr")  # shapes teacher names or generator specs
    base: str = "checkpoint:shipped"  # generator spec of the base model
    base_steps: int = 30
    base_guidance: float = 3.0

    def __post_init__(self):
        from raypref.shapes.teachers import PROFILES

        check(len(self.teachers) >= 1, "models.teachers must name at least one teacher")
        check(len(set(self.teachers)) == len(self.teachers), f"models.teachers has duplicates: {self.teachers}")
        for t in self.teachers:
            check(":" in t or t in PROFILES, f"unknown teacher {t!r} in models.teachers; known shapes teachers: "
                                             f"{', '.join(PROFILES)} (or a generator spec 'teacher:'/'checkpoint:')")
        check(bool(self.base), "models.base must not be empty")
        check(self.base_steps >= 1, f"models.base_steps must be >= 1, got {self.base_steps}")


@dataclass(frozen=True)
class JudgeSection:
    backend: str = "shapes"  # a key of raypref.judge.JUDGES
    error_rate: float = 0.1  # shapes: a simulated weak VLM
    seed: int = 0
    model: str = ""  # openai: the served model name; transformers: a local model path
    base_url: str = ""  # openai: the endpoint (vLLM, Ray Serve LLM, a hosted API)
    call_cost: float = 0.0  # cost per judge call (a paid VLM API)
    default_teacher_cost: float = 1.0  # cost per image of a generator that does not report its own

    def __post_init__(self):
        from raypref.judge import JUDGES

        check(self.backend in JUDGES, f"judge.backend must be one of {sorted(JUDGES)}, got {self.backend!r}")
        check(0 <= self.error_rate <= 1, f"judge.error_rate must be in [0, 1], got {self.error_rate}")
        check(self.backend == "shapes" or bool(self.model), f"judge.model is required for backend {self.backend!r}")
        check(self.call_cost >= 0, f"judge.call_cost must be >= 0, got {self.call_cost}")
        check(self.default_teacher_cost >= 0,
              f"judge.default_teacher_cost must be >= 0, got {self.default_teacher_cost}")


@dataclass(frozen=True)
class RunSection:
    name: str = "director-shapes"
    seed: int = 0

    def __post_init__(self):
        check(bool(self.name), "run.name must not be empty")


@dataclass(frozen=True)
class DirectorConfig:
    data: DataSection = field(default_factory=DataSection)
    round: RoundSection = field(default_factory=RoundSection)
    models: ModelsSection = field(default_factory=ModelsSection)
    judge: JudgeSection = field(default_factory=JudgeSection)
    run: RunSection = field(default_factory=RunSection)

    def __post_init__(self):
        init = self.data.init_teacher
        check(init in ("mix", "tournament") or init in self.models.teachers,
              f"data.init_teacher must be 'mix', 'tournament' or one of models.teachers {self.models.teachers}, "
              f"got {init!r}")


def shapes_cpu() -> DirectorConfig:
    """The shapes world on a CPU: four teachers with different strengths, the shipped base model."""
    return DirectorConfig()


def tiny_test() -> DirectorConfig:
    """Seconds-long: 16 x 16, two teachers, a handful of prompts."""
    return DirectorConfig(
        data=DataSection(directory="/tmp/raypref_director_tiny", n_per_category=2, init_teacher="mix", image_size=16),
        round=RoundSection(rounds=2, sample_fraction=0.5, n_expand=1, p_mutate=0.5, batch_size=16),
        models=ModelsSection(teachers=("clean", "vellum"), base="teacher:vellum", base_steps=4),
        judge=JudgeSection(error_rate=0.0),
        run=RunSection(name="director-tiny"),
    )


PRESETS = {"shapes_cpu": shapes_cpu, "tiny_test": tiny_test}


def build_teachers(cfg: DirectorConfig) -> dict:
    """models.teachers -> {name: generator}; a bare name is a procedural shapes teacher."""
    from raypref.generators import TeacherGenerator, build_generator

    return {t: build_generator(t) if ":" in t else TeacherGenerator(t, size=cfg.data.image_size)
            for t in cfg.models.teachers}


def build_base(cfg: DirectorConfig):
    from raypref.generators import build_generator

    spec = cfg.models.base
    if spec.startswith("checkpoint:"):
        return build_generator(spec, num_inference_steps=cfg.models.base_steps, guidance_scale=cfg.models.base_guidance)
    return build_generator(spec, **({"size": cfg.data.image_size} if spec.startswith("teacher:") else {}))


def build_judge(cfg: DirectorConfig):
    from raypref.judge import build_judge as _build

    j = cfg.judge
    if j.backend == "shapes":
        return _build("shapes", error_rate=j.error_rate, seed=j.seed)
    if j.backend == "openai":
        return _build("openai", model=j.model, base_url=j.base_url or None, seed=j.seed, shapes_grammar=True)
    return _build(j.backend, model_path=j.model, seed=j.seed, shapes_grammar=True)


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


# ------------------------------------------------------------------------------------------ dataset
@dataclass
class DirectorDataset:
    """One version of the set: the rows, the round that produced it, and the selection statistics
    ``{"selection": {teacher: {category: [offered, selected]}}, "vs_base": {teacher: {category:
    [compared, won]}}}``."""

    table: pa.Table
    round: int = 0
    stats: dict = field(default_factory=lambda: {"selection": {}, "vs_base": {}})

    def __len__(self) -> int:
        return self.table.num_rows

    def rows(self) -> list[dict]:
        return self.table.to_pylist()


def category_of(prompt: str) -> str:
    """Shapes category of a prompt, or "" for text outside the shapes grammar."""
    from raypref.shapes.grammar import parse

    try:
        return parse(prompt).category
    except (ValueError, TypeError):
        return ""


def make_rows(prompts, images, teachers, seeds, round_added, origins, parents, categories=None, start: int = 0):
    """Rows of SCHEMA; ``images`` are [H, W, 3] uint8 arrays or PNG bytes."""
    n = len(prompts)
    if not all(len(x) == n for x in (images, teachers, seeds, origins, parents)):
        raise ValueError("make_rows: prompts, images, teachers, seeds, origins and parents must have equal lengths")
    bad = [o for o in origins if o not in ORIGINS]
    if bad:
        raise ValueError(f"unknown origin {bad[0]!r}; expected one of {ORIGINS}")
    categories = categories or [category_of(p) for p in prompts]
    return [{
        "sample_id": f"r{round_added:04d}-{start + i:06d}", "prompt": str(p), "category": c,
        "image": im if isinstance(im, bytes) else encode_png(im), "teacher": str(t), "seed": int(s),
        "round_added": int(round_added), "origin": o, "parent": str(par),
    } for i, (p, im, t, s, o, par, c) in enumerate(zip(prompts, images, teachers, seeds, origins, parents, categories))]


def to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def version_path(directory, round_idx: int) -> Path:
    if not 0 <= round_idx <= 9999:
        raise ValueError(f"round index must be in [0, 9999], got {round_idx}")
    return Path(directory).expanduser() / f"round-{round_idx:04d}.parquet"


def _atomic_write(path: Path, write) -> None:
    """``write(tmp)`` then rename over ``path``: a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def save(directory, dataset: DirectorDataset) -> Path:
    """Write ``dataset`` as version ``round-{dataset.round:04d}.parquet``, atomically; stats in metadata."""
    path = version_path(directory, dataset.round)
    meta = {STATS_KEY: json.dumps(dataset.stats).encode(), ROUND_KEY: str(dataset.round).encode()}
    table = dataset.table.cast(SCHEMA).replace_schema_metadata(meta)
    _atomic_write(path, lambda p: pq.write_table(table, p))
    return path


def versions(directory) -> list[int]:
    """Round indices of the complete versions in ``directory``, ascending (temp files ignored)."""
    d = Path(directory).expanduser()
    if not d.is_dir():
        return []
    return sorted(int(m.group(1)) for m in (VERSION_RE.match(p.name) for p in d.iterdir()) if m)


def load(directory, round_idx: int | None = None) -> DirectorDataset:
    """Version ``round_idx`` (default: the latest) of the set in ``directory``."""
    if round_idx is None:
        found = versions(directory)
        if not found:
            raise FileNotFoundError(f"no director dataset version (round-NNNN.parquet) in {directory}")
        round_idx = found[-1]
    table = pq.read_table(version_path(directory, round_idx))
    meta = table.schema.metadata or {}
    stats = json.loads(meta[STATS_KEY]) if STATS_KEY in meta else {"selection": {}, "vs_base": {}}
    return DirectorDataset(table.replace_schema_metadata(None).cast(SCHEMA), round_idx, stats)


def load_latest(directory) -> DirectorDataset:
    return load(directory)


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


# ------------------------------------------------------------------------------------------ generation
def _counters(gen) -> tuple[int, float] | None:
    """(calls, cost) reported by a generator (a Teacher, or a wrapper holding one in ``.teacher``)."""
    for obj in (gen, getattr(gen, "teacher", None)):
        if obj is not None and hasattr(obj, "calls") and hasattr(obj, "cost"):
            return int(obj.calls), float(obj.cost)
    return None


def unit_cost(gen, default: float) -> float:
    """Cost of one image from ``gen``: its skill profile's cost, else ``default``."""
    for obj in (gen, getattr(gen, "teacher", None)):
        profile = getattr(obj, "profile", None)
        if profile is not None and hasattr(profile, "cost"):
            return float(profile.cost)
    return float(default)


def generate(gen, prompts, seeds, batch_size: int) -> list[np.ndarray]:
    """``gen.generate`` in batches -> [B] images [H, W, 3] uint8."""
    out: list[np.ndarray] = []
    for i in range(0, len(prompts), batch_size):
        images = np.asarray(gen.generate(list(prompts[i:i + batch_size]), [int(s) for s in seeds[i:i + batch_size]]))
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"generator {getattr(gen, 'name', gen)!r} returned {images.shape} {images.dtype}, "
                             "expected [B, H, W, 3] uint8")
        out.extend(images)
    return out


class _Ledger:
    """Counts teacher images and cost per teacher: from the generator's own counters when it keeps
    them (so the numbers are what the 'API' billed), else images x ``default_cost``."""

    def __init__(self, teachers: dict, default_cost: float):
        self.teachers, self.default_cost = teachers, default_cost
        self.calls = {t: 0 for t in teachers}
        self.cost = {t: 0.0 for t in teachers}

    def render(self, name: str, prompts, seeds, batch_size: int) -> list[np.ndarray]:
        gen = self.teachers[name]
        before = _counters(gen)
        images = generate(gen, prompts, seeds, batch_size)
        after = _counters(gen)
        if before is None or after is None:
            self.calls[name] += len(prompts)
            self.cost[name] += len(prompts) * self.default_cost
        else:
            self.calls[name] += after[0] - before[0]
            self.cost[name] += after[1] - before[1]
        return images


def _render_new(items, teachers: dict, judge, ledger: _Ledger, stats: dict, batch_size: int) -> list:
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
        cand = {n: ledger.render(n, [items[i][0] for i in tour], [items[i][3] for i in tour], batch_size) for n in names}
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
    ledger = _Ledger(teachers, cfg.judge.default_teacher_cost)
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
    ledger = _Ledger(teachers, cfg.judge.default_teacher_cost)
    judge_calls0 = int(getattr(judge, "calls", 0))

    # 1. base images, and the judge: base (index 0) vs the stored teacher image (index 1)
    base_before = _counters(base_generator)
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
        price = (sum(unit_cost(teachers[t], cfg.judge.default_teacher_cost) for t in names) if teacher is None
                 else unit_cost(teachers[teacher], cfg.judge.default_teacher_cost))
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
            d["teacher_cost"] += sum(unit_cost(teachers[t], cfg.judge.default_teacher_cost) for t in names)
        else:
            d["teacher_calls"] += 1
            d["teacher_cost"] += unit_cost(teachers[teacher], cfg.judge.default_teacher_cost)
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
    base_after = _counters(base_generator)
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


def write_round(directory, dataset: DirectorDataset, log: dict) -> Path:
    """Commit a round: its decision log (JSONL) and summary (JSON), then the dataset version, each
    atomically. The Parquet version comes last, so it marks the round as complete."""
    logs = Path(directory).expanduser() / "logs"
    name = f"round-{dataset.round:04d}"
    _atomic_write(logs / f"{name}.jsonl",
                  lambda p: p.write_text("".join(json.dumps(d) + "\n" for d in log["decisions"])))
    _atomic_write(logs / f"{name}.summary.json", lambda p: p.write_text(json.dumps(log["summary"], indent=1)))
    return save(directory, dataset)


def run(cfg: DirectorConfig, base_generator=None, teachers: dict | None = None, judge=None) -> DirectorDataset:
    """The whole loop, resumable: load the latest version in ``data.directory`` (or build and save
    round 0), then run and commit rounds up to ``round.rounds``."""
    teachers = teachers if teachers is not None else build_teachers(cfg)
    judge = judge if judge is not None else build_judge(cfg)
    directory = cfg.data.directory
    if versions(directory):
        dataset = load_latest(directory)
    else:
        dataset = build_initial_set(cfg, teachers, judge)
        save(directory, dataset)
    if dataset.round >= cfg.round.rounds:
        return dataset
    base_generator = base_generator if base_generator is not None else build_base(cfg)
    for rnd in range(dataset.round + 1, cfg.round.rounds + 1):
        dataset, log = run_round(dataset, base_generator, teachers, judge, cfg, rnd)
        write_round(directory, dataset, log)
    return dataset


# ------------------------------------------------------------------------------------------ training output
def to_sft_table(dataset: DirectorDataset) -> pa.Table:
    """The set as SFT data in the preference layout (``raypref.prefdata.SCHEMA``) that
    ``raypref.train`` reads: one row per sample with K = 1 image (the teacher's), ``phi = [1.0]``,
    no rewards and no pairs. ``loss.method=sft`` with ``sft_target=best`` trains on that image.
    (prefdata.validate_row asks K >= 2 for preference rows, so these rows are built here directly.)
    A prompt that appears several times keeps one row per sample; ``prompt_id`` is per prompt text."""
    rows = [{
        "prompt_id": prefdata.prompt_id(row["prompt"]), "prompt": row["prompt"], "category": row["category"],
        "images": [row["image"]], "generators": [_generator_name(row["teacher"])], "seeds": [int(row["seed"])],
        "reward_names": [], "scores": [], "phi": [1.0], "ranking": [1], "pairs": [],
    } for row in dataset.rows()]
    return pa.Table.from_pylist(rows, schema=prefdata.SCHEMA)


def _generator_name(teacher: str) -> str:
    """The generator spec of a teacher name, as raypref.generators names its images."""
    return teacher if ":" in teacher else f"teacher:{teacher}"


def write_sft(path, dataset: DirectorDataset) -> Path:
    path = Path(path).expanduser()
    table = to_sft_table(dataset)
    _atomic_write(path, lambda p: pq.write_table(table, p))
    return path


# ------------------------------------------------------------------------------------------ optional Ray
def ray_generate(generator_cls, generator_args: tuple, prompts, seeds, batch_size: int = 16,
                 num_actors: int = 1, num_cpus: float = 1.0) -> list[np.ndarray]:
    """The base model's images of a round through Ray Data: an actor pool of ``generator_cls(*args)``
    (batch-dict callables of ``raypref.generators``) -> [B] images, in input order."""
    import ray
    from ray.data import ActorPoolStrategy

    ds = ray.data.from_items([{"i": i, "prompt": str(p), "seed": int(s)} for i, (p, s) in enumerate(zip(prompts, seeds))])
    out = ds.map_batches(
        generator_cls, fn_constructor_args=generator_args, batch_size=batch_size, batch_format="numpy",
        compute=ActorPoolStrategy(size=num_actors), num_cpus=num_cpus,
    ).select_columns(["i", "image"]).take_all()
    out.sort(key=lambda row: int(row["i"]))
    return [np.asarray(row["image"], dtype=np.uint8) for row in out]
