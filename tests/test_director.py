"""EvolveDirector's curation loop: the judge expands what the base model fails and deletes what it
already does; versioned atomic Parquet; calls and cost counted; seeded; config validated."""

import dataclasses
import json
import os

import numpy as np
import pytest

from raypref import curation_store, director, director_config, files, spend
from raypref.generators import build_generator
from raypref.config import load_config
from raypref.judges import ShapesJudge
from raypref.prefdata import decode_png
from raypref.shapes.detect import passes
from raypref.shapes.grammar import all_prompts, parse
from raypref.shapes.teachers import SkillProfile, Teacher
from tests.presets import director_tiny

SIZE = 16


def _cfg(tmp_path, **round_kw) -> director_config.DirectorConfig:
    cfg = director_tiny()
    return dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, directory=str(tmp_path / "set")),
        round=dataclasses.replace(cfg.round, **round_kw),
    )


def _teacher(name, cost=1.0, **errors) -> Teacher:
    """A procedural model with known skills: error[c] = 1 always fails c, 0 never does."""
    return Teacher(name, SkillProfile(dict(errors), cost=cost), size=SIZE)


def _set(items, teachers) -> curation_store.DirectorDataset:
    """Round 0 from [(prompt, teacher name)], each rendered by that teacher with seed = position."""
    images = [teachers[t].generate([p], [i])[0] for i, (p, t) in enumerate(items)]
    rows = curation_store.make_rows([p for p, _ in items], images, [t for _, t in items], list(range(len(items))), 0,
                       ["seed"] * len(items), [""] * len(items))
    for t in teachers.values():  # the initial set is not part of any round's bill
        t.calls, t.cost = 0, 0.0
    return curation_store.DirectorDataset(curation_store.to_table(rows), 0)


# ---------------------------------------------------------------------------------------- the must-show
def test_colour_blind_base_expands_colours_and_deletes_counting(tmp_path):
    colours = all_prompts("colors")[:4] + all_prompts("color_attr")[:3]
    counting = all_prompts("counting")[:5]
    teachers = {"clean": _teacher("clean")}
    ds = _set([(p, "clean") for p in colours + counting], teachers)
    base = _teacher("base", colors=1.0, color_attr=1.0, counting=0.0)  # fails colours, counts perfectly
    judge = ShapesJudge(error_rate=0.0, seed=0)
    cfg = _cfg(tmp_path, sample_fraction=1.0, n_expand=2, p_mutate=0.0, dedup=True)

    new, log = director.run_round(ds, base, teachers, judge, cfg, 1)

    by_prompt = {d["prompt"]: d for d in log["decisions"]}
    assert set(by_prompt) == set(colours + counting)
    for p in colours:
        d = by_prompt[p]
        assert (d["decision"], d["winner"], d["judge_answer"]) == ("expand", "teacher", 1), d
        assert len(d["new_prompts"]) + len(d["skipped"]) == 2
    for p in counting:
        d = by_prompt[p]
        assert (d["decision"], d["winner"], d["judge_answer"]) == ("delete", "base", 0), d
        assert d["new_prompts"] == [] and d["skipped"] == []
    per_cat = log["summary"]["decisions_per_category"]
    assert per_cat["colors"]["expand"] == 4 and per_cat["color_attr"]["expand"] == 3
    assert per_cat["counting"]["delete"] == 5
    assert sum(per_cat["counting"].values()) == 5 and per_cat["colors"]["delete"] == 0

    # the new set: counting gone, colour prompts kept, expansions of the same category added
    rows = new.rows()
    assert not any(r["category"] == "counting" for r in rows)
    assert {r["prompt"] for r in rows if r["origin"] == "seed"} == set(colours)
    added = [r for r in rows if r["origin"] == "expand"]
    assert len(added) == log["summary"]["added"]["expand"] > 0
    assert len({r["prompt"] for r in rows}) == len(rows)  # dedup
    for r in added:
        assert r["round_added"] == 1 and r["teacher"] == "clean" and r["parent"] in colours
        assert parse(r["prompt"]).category == parse(r["parent"]).category
        assert passes(parse(r["prompt"]), decode_png(r["image"]))  # the clean teacher's image is right
    assert new.stats["vs_base"]["clean"]["colors"] == [4, 4]
    assert new.stats["vs_base"]["clean"]["counting"] == [5, 0]


def test_random_weight_base_model_through_a_real_checkpoint(tmp_path):
    """A real diffusers checkpoint (tiny, random weights: it draws noise) as the base model. The log's
    base seed reproduces the base image, and each decision follows the judge's constraint scores."""
    from raypref.generators import PipelineGenerator
    from raypref.shapes.model import build_pipeline

    build_pipeline("tiny", seed=0).save_pretrained(tmp_path / "base")
    base = PipelineGenerator(str(tmp_path / "base"), num_inference_steps=3)
    teachers = {"clean": _teacher("clean")}
    prompts = [all_prompts(c)[0] for c in ("colors", "counting", "position", "color_attr")]
    ds = _set([(p, "clean") for p in prompts], teachers)
    cfg = _cfg(tmp_path, sample_fraction=1.0, n_expand=1, p_mutate=0.0)
    judge = ShapesJudge(0.0, 0)
    new, log = director.run_round(ds, base, teachers, judge, cfg, 1)
    assert log["summary"]["base_calls"] == 4
    for d, row in zip(log["decisions"], ds.rows()):
        image = base.generate([d["prompt"]], [d["base_seed"]])[0]
        s_base, s_teacher = judge.scores(d["prompt"], [image, decode_png(row["image"])])
        assert s_teacher == 1.0  # the clean teacher meets every constraint
        assert d["decision"] == ("expand" if s_teacher > s_base else "delete"), (d, s_base)
    # noise never counts exactly: counting always expands
    assert log["decisions"][1]["decision"] == "expand"
    assert len(new) == 4 - log["summary"]["decisions"]["delete"] + log["summary"]["added"]["expand"]


# ---------------------------------------------------------------------------------------- calls and cost
def test_calls_and_cost_are_counted_hand_worked(tmp_path):
    # Two always-right teachers (a: 1.0 per image, b: 0.5), a base that fails colours only.
    teachers = {"a": _teacher("a", cost=1.0), "b": _teacher("b", cost=0.5)}
    c = all_prompts("colors")
    k = all_prompts("counting")
    ds = _set([(c[0], "a"), (c[1], "a"), (c[2], "b"), (k[0], "b"), (k[1], "b")], teachers)
    base = _teacher("base", colors=1.0)
    judge = ShapesJudge(0.0, seed=1)
    cfg = _cfg(tmp_path, sample_fraction=1.0, n_expand=2, p_mutate=1.0, teacher_choice="tournament", dedup=False)
    cfg = dataclasses.replace(cfg, judge=dataclasses.replace(cfg.judge, call_cost=0.25))

    new, log = director.run_round(ds, base, teachers, judge, cfg, 1)
    s = log["summary"]
    # colours: 3 expands x 2 prompts by the sample's teacher: a 4 images (4.0), b 2 images (1.0)
    # counting: 2 delete+mutate, each a tournament over both teachers: a 2 (2.0), b 2 (1.0)
    assert s["decisions"] == {"expand": 3, "delete": 0, "delete+mutate": 2, "undecided": 0}
    assert s["teacher_calls"] == {"a": 6, "b": 4} and (teachers["a"].calls, teachers["b"].calls) == (6, 4)
    assert s["teacher_cost"] == {"a": 6.0, "b": 2.0} and (teachers["a"].cost, teachers["b"].cost) == (6.0, 2.0)
    # judge: 5 comparisons + 3 expands + 2 mutates + 2 tournament comparisons, 0.25 each
    assert s["judge_calls"] == 12 == judge.calls
    assert s["judge_cost"] == 3.0 and s["cost"] == 11.0
    assert sum(d["cost"] for d in log["decisions"]) == pytest.approx(11.0)
    assert sum(d["judge_calls"] for d in log["decisions"]) == 12
    assert s["size_after"] == len(new) == 5 - 2 + 6 + 2
    # expansions rendered by the sample's own teacher; tournaments: both teachers are right, so the
    # judge takes the first image offered, and the offer order is shuffled per prompt
    rows = new.rows()
    parent_teacher = {c[0]: "a", c[1]: "a", c[2]: "b"}
    mutated = []
    for r in rows:
        if r["origin"] == "expand":
            assert r["teacher"] == parent_teacher[r["parent"]]
        if r["origin"] == "mutate":
            assert r["parent"] in k[:2]
            mutated.append(r["teacher"])
    sel = new.stats["selection"]
    assert sum(v[0] for v in sel["a"].values()) == 2 and sum(v[0] for v in sel["b"].values()) == 2
    picks = {t: sum(v[1] for v in sel[t].values()) for t in ("a", "b")}
    assert picks == {t: mutated.count(t) for t in ("a", "b")} and sum(picks.values()) == 2


def test_tournament_ties_are_not_credited_to_the_first_teacher():
    """Four always-right teachers and a judge that breaks ties to the first image: with the offer order
    shuffled per prompt every teacher is picked about a quarter of the time (unshuffled: all to one)."""
    teachers = {n: _teacher(n) for n in ("a", "b", "c", "d")}
    prompts = (
        all_prompts("colors") + all_prompts("single_object") + all_prompts("counting") + all_prompts("two_object")
    )
    items = [(p, "colors", None, 1000 + i) for i, p in enumerate(prompts)]  # stats filed under one category
    stats = {"selection": {}, "vs_base": {}}
    out = director._render_new(
        items, teachers, ShapesJudge(0.0, seed=0), spend.TeacherLedger(teachers, 1.0), stats, 64
    )
    picked = [who for _, who, _ in out]
    assert None not in picked
    shares = {n: picked.count(n) / len(picked) for n in teachers}
    assert all(0.12 <= v <= 0.38 for v in shares.values()), shares
    assert {n: stats["selection"][n]["colors"][1] for n in teachers} == {n: picked.count(n) for n in teachers}


def test_budget_caps_the_rounds_teacher_cost(tmp_path):
    teachers = {"a": _teacher("a", cost=1.0)}
    ds = _set([(p, "a") for p in all_prompts("colors")[:4]], teachers)
    cfg = _cfg(tmp_path, sample_fraction=1.0, n_expand=2, p_mutate=0.0, budget=3.0, dedup=False)
    new, log = director.run_round(ds, _teacher("base", colors=1.0), teachers, ShapesJudge(0.0, 0), cfg, 1)
    assert teachers["a"].calls == 3 and log["summary"]["teacher_cost"] == {"a": 3.0}
    skipped = [x for d in log["decisions"] for x in d["skipped"]]
    assert len(skipped) == 8 - 3 and all("budget" in x["reason"] for x in skipped)
    assert len(new) == 4 + 3


# ---------------------------------------------------------------------------------------- mutation
@pytest.mark.parametrize("p_mutate", [0.0, 1.0])
def test_mutate_probability(tmp_path, p_mutate):
    teachers = {"clean": _teacher("clean")}
    prompts = [all_prompts("single_object")[0], all_prompts("two_object")[0], all_prompts("counting")[0],
               all_prompts("position")[0]]
    ds = _set([(p, "clean") for p in prompts], teachers)
    base = _teacher("base")  # never wrong: every sample is deleted
    judge = ShapesJudge(0.0, 0)
    cfg = _cfg(tmp_path, sample_fraction=1.0, p_mutate=p_mutate, dedup=False)
    new, log = director.run_round(ds, base, teachers, judge, cfg, 1)
    decisions = [d["decision"] for d in log["decisions"]]
    if p_mutate == 0.0:
        assert decisions == ["delete"] * 4 and len(new) == 0 and judge.calls == 4 and teachers["clean"].calls == 0
    else:
        assert decisions == ["delete+mutate"] * 4 and judge.calls == 8 and teachers["clean"].calls == 4
        rows = new.rows()
        assert len(rows) == 4 and all(r["origin"] == "mutate" for r in rows)
        assert sorted(r["parent"] for r in rows) == sorted(prompts)
        assert all(r["category"] == parse(r["prompt"]).category for r in rows)


# ---------------------------------------------------------------------------------------- determinism
def _one_round(tmp_path, seed):
    cfg = _cfg(tmp_path)
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, seed=seed))
    teachers = director.build_teachers(cfg)
    judge = cfg.judge.build()
    ds = director.build_initial_set(cfg, teachers, judge)
    return ds, director.run_round(
        ds, build_generator(cfg.models.base, size=cfg.data.image_size), teachers, judge, cfg, 1
    )


def test_same_seed_same_round_other_seed_other_sample(tmp_path):
    ds1, (new1, log1) = _one_round(tmp_path, seed=0)
    ds2, (new2, log2) = _one_round(tmp_path, seed=0)
    assert ds1.table.equals(ds2.table) and new1.table.equals(new2.table)
    assert json.dumps(log1) == json.dumps(log2)
    _, (_, log3) = _one_round(tmp_path, seed=1)
    assert [d["sample_id"] for d in log1["decisions"]] != [d["sample_id"] for d in log3["decisions"]]
    assert log1["summary"]["sampled"] == len(ds1) // 2  # sample_fraction 0.5


# ---------------------------------------------------------------------------------------- versions on disk
def test_versions_are_atomic_and_survive_a_crash(tmp_path, monkeypatch):
    d = tmp_path / "set"
    cfg = _cfg(tmp_path, sample_fraction=1.0)
    teachers = director.build_teachers(cfg)
    judge = ShapesJudge(0.0, 0)
    ds0 = director.build_initial_set(cfg, teachers, judge)
    curation_store.save(d, ds0)
    new, log = director.run_round(ds0, _teacher("base", colors=1.0), teachers, judge, cfg, 1)
    assert not new.table.equals(ds0.table)

    def crash(src, dst):  # the process dies after writing the temp file, before the rename
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(files.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        curation_store.save(d, new)
    monkeypatch.undo()
    assert list(d.glob(".round-0001.tmp*.parquet"))  # the half-done write is there, under a temp name
    assert curation_store.versions(d) == [0]
    back = curation_store.load(d)
    assert back.round == 0 and back.table.equals(ds0.table)

    path = curation_store.write_round(d, new, log)
    assert path.name == "round-0001.parquet" and curation_store.versions(d) == [0, 1]
    back = curation_store.load(d)
    assert back.round == 1 and back.table.equals(new.table) and back.stats == new.stats
    assert curation_store.load(d, 0).table.equals(ds0.table)
    lines = (d / "logs" / "round-0001.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == json.loads(json.dumps(log["decisions"]))
    assert not [p for p in os.listdir(d) if ".tmp" in p and "0001" in p]


def test_curate_resumes_from_the_committed_versions(tmp_path):
    """The driver's call: round 1 builds and pays for the initial set, a committed round is loaded
    without new calls (and without asking for a judge), round 2 runs only round 2."""
    cfg = _cfg(tmp_path)
    teachers = director.build_teachers(cfg)
    base = build_generator(cfg.models.base, size=cfg.data.image_size)
    judge = cfg.judge.build()
    first = director.curate(cfg, 1, base, teachers, lambda: judge)
    assert curation_store.versions(cfg.data.directory) == [0, 1]
    assert first.spent["teacher_calls"] > 0 and first.spent["judge_calls"] == judge.calls
    again = director.curate(cfg, 1, base, teachers, lambda: pytest.fail("a committed round asked for a judge"))
    assert again.spent == {"teacher_calls": 0, "teacher_cost": 0.0, "judge_calls": 0}
    assert again.dataset.table.equals(first.dataset.table) and again.initial == first.initial
    ds = director.curate(cfg, 2, base, teachers, lambda: judge).dataset  # only round 2 runs
    assert curation_store.versions(cfg.data.directory) == [0, 1, 2] and ds.round == 2
    summaries = sorted(os.listdir(os.path.join(cfg.data.directory, "logs")))
    assert summaries == ["round-0001.jsonl", "round-0001.summary.json", "round-0002.jsonl", "round-0002.summary.json"]


# ---------------------------------------------------------------------------------------- stats, sft, config
def test_best_teacher_and_selection_rates():
    stats = {"selection": {"a": {"colors": [10, 2]}, "b": {"colors": [10, 8]}}}
    assert director.best_teacher(stats, "colors", ["a", "b"]) == "b"
    # no tournament data in counting: the comparisons with the base decide (b beat it 1 of 4, a 3 of 4)
    stats["vs_base"] = {"a": {"counting": [4, 3], "colors": [9, 9]}, "b": {"counting": [4, 1], "colors": [9, 0]}}
    assert director.best_teacher(stats, "counting", ["a", "b"]) == "a"
    assert director.best_teacher(stats, "colors", ["a", "b"]) == "b"  # tournament data first, even against vs_base
    # no evidence at all: the caller's rotation, so mutations spread over the teachers
    assert [director.best_teacher(stats, "position", ["a", "b", "c"], fallback=i) for i in range(4)] == [
        "a",
        "b",
        "c",
        "a",
    ]
    assert director.selection_rates(stats) == {"a": {"colors": 0.2}, "b": {"colors": 0.8}}


def test_sft_table_is_what_train_sft_reads(tmp_path):
    from raypref.collate import COLUMNS, select
    from raypref.train_config import LossSection

    teachers = {"clean": _teacher("clean")}
    prompts = all_prompts("colors")[:3]
    ds = _set([(p, "clean") for p in prompts], teachers)
    table = curation_store.to_sft_table(ds)
    assert set(COLUMNS) <= set(table.column_names) and table.num_rows == 3
    for row, src in zip(table.to_pylist(), ds.rows()):
        assert select(row, LossSection(method="sft")) == ([0], [])
        assert select(row, LossSection(method="sft", sft_target="generator", sft_generator="teacher:clean")) == (
            [0],
            [],
        )
        assert row["prompt"] == src["prompt"] and row["images"][0] == src["image"]
        assert passes(parse(row["prompt"]), decode_png(row["images"][0]))
    path = curation_store.write_sft(tmp_path / "sft.parquet", ds)
    import pyarrow.parquet as pq

    assert pq.read_table(path).equals(table)


@pytest.mark.parametrize("override", [
    "round.sample_fraction=0", "round.sample_fraction=1.5", "round.p_mutate=2", "round.n_expand=-1",
    "round.teacher_choice=cheapest", "models.teachers=[nobody]", "models.teachers=[]",
    "data.init_teacher=quill", "judge.error_rate=1.5", "judge.backend=gpt", "round.budget=-1", "round.colour=1",
])
def test_bad_config_is_an_error(override):
    with pytest.raises(ValueError):
        load_config(director_tiny(), overrides=[override])


def test_presets_and_bad_round_arguments(tmp_path):
    assert isinstance(director_config.shapes_cpu(), director_config.DirectorConfig)
    cfg = _cfg(tmp_path)
    teachers = {"clean": _teacher("clean")}
    ds = _set([("a circle", "clean")], teachers)
    with pytest.raises(ValueError, match="round_idx"):
        director.run_round(ds, _teacher("base"), teachers, ShapesJudge(), cfg, 0)
    with pytest.raises(ValueError, match="not in teachers"):
        director.run_round(ds, _teacher("base"), {"other": _teacher("other")}, ShapesJudge(), cfg, 1)
    with pytest.raises(ValueError, match="differ in shape"):
        director.run_round(ds, Teacher("base", SkillProfile({}), size=32), teachers, ShapesJudge(), cfg, 1)
    with pytest.raises(ValueError, match="origin"):
        curation_store.make_rows(
            ["a circle"], [np.zeros((SIZE, SIZE, 3), np.uint8)], ["clean"], [0], 0, ["copy"], [""]
        )


# ---------------------------------------------------------------------------------------- over Ray Serve
def test_round_through_a_serve_handle_matches_a_local_judge(tmp_path, ray_local):
    """The same round with the judge behind a DeploymentHandle (serve/judge.py) gives the same decisions."""
    from ray import serve

    from raypref.serving.judge import build_judge_app

    teachers = {"clean": _teacher("clean")}
    prompts = all_prompts("colors")[:3] + all_prompts("counting")[:3]
    cfg = _cfg(tmp_path, sample_fraction=1.0, n_expand=1, p_mutate=0.0)
    base = _teacher("base", colors=1.0)
    ds = _set([(p, "clean") for p in prompts], teachers)
    _, local = director.run_round(ds, base, teachers, ShapesJudge(0.0, 0), cfg, 1)
    handle = serve.run(build_judge_app("shapes", {"error_rate": 0.0, "seed": 0}, num_cpus=0.5,
                                       autoscaling_config={"min_replicas": 1, "max_replicas": 1}),
                       name="director-judge", route_prefix=None)
    try:
        judge = director.HandleJudge(handle)
        _, remote = director.run_round(ds, base, teachers, judge, cfg, 1)
    finally:  # shut Serve down: other test modules start it with their own HTTP options
        serve.shutdown()
    assert [d["decision"] for d in remote["decisions"]] == [d["decision"] for d in local["decisions"]]
    assert [d["decision"] for d in local["decisions"]] == ["expand"] * 3 + ["delete"] * 3
    assert judge.calls == 6 + 3 == remote["summary"]["judge_calls"]
