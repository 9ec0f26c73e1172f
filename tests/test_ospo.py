"""OSPO pair building (raypref.ospo, its job entry point and jobs/build_ospo.py).

The judge is the real analytic ``raypref.judges.ShapesJudge(error_rate=0.0)``; the models are the
procedural teachers and a tiny random-weight shapes pipeline saved to tmp_path and loaded through
``raypref.generators`` (the real loading code).
"""

import dataclasses
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from raypref import ospo, ospo_config, perturbation
from raypref.config import load_config
from raypref.generators import build_generator
from raypref.judges import ShapesJudge
from raypref.prefdata import SCHEMA, decode_png, to_table, validate_row
from raypref.shapes.detect import check_results, passes
from raypref.shapes.grammar import CATEGORIES, all_prompts, parse
from tests.presets import config_file, ospo_tiny, train_tiny


def _cfg(**sections):
    cfg = ospo_tiny()
    return dataclasses.replace(cfg, **{k: dataclasses.replace(getattr(cfg, k), **v) for k, v in sections.items()})


@pytest.fixture(scope="module")
def scorer():
    return ospo.VQAScorer(judge=ShapesJudge(error_rate=0.0))


# ----------------------------------------------------------------------------- perturbation


def _diff(base: str, pert: str) -> str:
    """Independent statement of 'exactly one binding changed': the binding's name, else an error."""
    a, b = parse(base), parse(pert)
    oa, ob = a.objects, b.objects
    if a.category == "counting":
        assert b.category == "counting" and ob[0] == oa[0] and len(ob) != len(oa), (base, pert)
        return "count"
    if len(ob) == len(oa) - 1:  # one object dropped, the other kept with all its attributes
        assert b.relation is None and a.relation is None, (base, pert)
        (i,) = [i for i in range(2) if oa[1 - i] == ob[0]]
        return f"obj{i}"
    assert len(oa) == len(ob) and a.category == b.category, (base, pert)
    if a.relation != b.relation:
        assert oa == ob, (base, pert)
        return "relation"
    changed = [(i, k) for i in range(len(oa)) for k in ("shape", "color") if getattr(oa[i], k) != getattr(ob[i], k)]
    if len(changed) == 2 and {k for _, k in changed} == {"color"}:  # a swap: same colours, exchanged
        assert (ob[0].color, ob[1].color) == (oa[1].color, oa[0].color)
        assert [o.shape for o in oa] == [o.shape for o in ob]
        return "obj0.color<->obj1.color"
    assert len(changed) == 1, (base, pert, changed)
    return f"obj{changed[0][0]}.{changed[0][1]}"


def test_every_perturbation_keeps_grammar_and_changes_exactly_one_binding():
    # Candidates per prompt, worked by hand: single 2 other shapes; two_object 2 replacements (the
    # third shape) + 2 drops; counting 2 other numbers; colors 7 other colours; position 1 reverse
    # + 2 other relations; color_attr 1 swap + 2 objects x 6 unused colours + 2 drops.
    expected = {"single_object": 2, "two_object": 4, "counting": 2, "colors": 7, "position": 3, "color_attr": 15}
    total = 0
    for cat in CATEGORIES:
        for prompt in all_prompts(cat):
            cands = perturbation.candidate_perturbations(prompt)
            assert len(cands) == expected[cat], prompt
            assert len({c.perturbed for c in cands}) == len(cands), prompt
            for c in cands:
                parse(c.perturbed)  # inside the grammar
                assert c.perturbed != prompt and c.base == prompt and c.category == cat
                assert c.operation in perturbation.OPERATIONS[cat]
                assert _diff(prompt, c.perturbed) == c.binding, c
            total += len(cands)
    assert total == 3 * 2 + 6 * 4 + 9 * 2 + 24 * 7 + 24 * 3 + 336 * 15


def test_operation_semantics_on_examples():
    got = {(c.operation, c.perturbed) for c in perturbation.candidate_perturbations("a circle left of a square")}
    assert got == {("reverse_relation", "a circle right of a square"), ("change_relation", "a circle above a square"),
                   ("change_relation", "a circle below a square")}
    got = {
        (c.operation, c.perturbed) for c in perturbation.candidate_perturbations("a red circle and a cyan triangle")
    }
    assert ("swap_colors", "a cyan circle and a red triangle") in got
    assert ("drop_object", "a red circle") in got and ("drop_object", "a cyan triangle") in got
    assert ("replace_color", "a red circle and a blue triangle") in got
    assert ("replace_color", "a cyan circle and a cyan triangle") not in got  # would leave the grammar
    assert {c.perturbed for c in perturbation.candidate_perturbations("three squares")} == {
        "two squares",
        "four squares",
    }


def test_perturb_sampling_is_seeded_distinct_and_balanced_over_operations():
    p = "a red circle and a cyan triangle"
    a = perturbation.perturb(p, 4, seed=3)
    assert a == perturbation.perturb(p, 4, seed=3) and len({x.perturbed for x in a}) == 4
    assert len(perturbation.perturb(p, 100)) == 15  # fewer candidates than asked: all of them
    assert {x.operation for x in perturbation.perturb(p, 15, operations=("swap_colors",))} == {"swap_colors"}
    # Operations are drawn uniformly before candidates: with {swap (1 candidate), replace (12)}
    # and m = 2, P(swap drawn) = 1/2 + 1/2 * 1/2 = 3/4 (uniform over candidates would give 2/13).
    prompts = all_prompts("color_attr")
    hit = np.mean(
        [
            any(x.operation == "swap_colors" for x in perturbation.perturb(q, 2, ("swap_colors", "replace_color")))
            for q in prompts
        ]
    )
    assert 0.65 < hit < 0.85, hit
    with pytest.raises(ValueError, match="not in the shapes grammar"):
        perturbation.perturb("a dog", 2)


# ----------------------------------------------------------------------------- VQA scores and filtering


def test_vqa_summary_by_hand():
    s = ospo.vqa_summary([1.0, 0.0, 0.75])  # s = mean(1, -1, 0.5) = 1/6
    assert s["score"] == pytest.approx(1 / 6) and s["any_yes"] and not s["all_yes"] and s["n_questions"] == 3
    assert ospo.vqa_summary([0.5, 0.2])["any_yes"] is False  # 0.5 is not a yes
    with pytest.raises(ValueError):
        ospo.vqa_summary([])
    with pytest.raises(ValueError):
        ospo.vqa_summary([1.2])


def test_filter_and_select_on_hand_built_answers():
    f, v = ospo_config.FilterSection(), ospo.vqa_summary
    slots = [
        (v([1, 1, 0]), v([0, 0, 0])),  # chosen S = 1/3 < 0.6                    -> chosen_low_score
        (v([0, 0, 0]), v([0, 0, 0])),  # chosen has no yes                       -> chosen_no_yes
        (v([1, 1, 1]), v([1, 1, 1])),  # rejected passes every question          -> rejected_passes_all
        (v([1, 1, 0.9]), v([1, 0, 1])),  # S = 2.8 / 3 = 0.933, kept candidate
        (v([1, 1, 1]), v([1, 1, 0])),  # S = 1, rejected S = 1/3, kept candidate
        (v([1, 1, 1]), v([0, 0, 0])),  # S = 1, rejected S = -1: same chosen score, wider margin -> KEPT
        (v([1, 1, 1]), v([0, 0, 0])),  # identical to 5: the tie goes to the lower index
        (v([1, 1, 1, 1, 0]), v([0, 0, 0, 0, 0])),  # S = 3/5 = 0.6 exactly: passes (>=)
    ]
    best, reasons = ospo.select_slot(slots, f)
    assert best == 5
    assert reasons == ["chosen_low_score", "chosen_no_yes", "rejected_passes_all", None, None, None, None, None]
    assert ospo.select_slot(slots[:3], f) == (None, reasons[:3])
    assert ospo.select_slot([slots[3], slots[7]], f)[0] == 0  # 0.933 beats 0.6


def test_assemble_ospo_rows_from_hand_built_results():
    cfg = _cfg(generate={"slots": 2})
    p = perturbation.Perturbation("a red square", "a blue square", "replace_color", "obj0.color", "colors")
    s0, s1 = (ospo.slot_seed(p.base, s, cfg.generate.seed, 0) for s in range(2))
    img = lambda k: np.full((4, 4, 3), k, np.uint8)  # noqa: E731
    v = ospo.vqa_summary
    results = {
        ("a red square", s0, p.base): {"image": img(1), **v([1, 0])},  # S = 0: dropped (low score)
        ("a blue square", s0, p.base): {"image": img(2), **v([1, 0])},
        ("a red square", s1, p.base): {"image": img(3), **v([1, 1])},
        ("a blue square", s1, p.base): {"image": img(4), **v([1, 0])},
    }
    rows, records, summary = ospo.assemble_ospo([p], [(p.base, p.perturbed)], results, cfg)
    (row,) = rows
    assert [decode_png(b)[0, 0, 0] for b in row["images"]] == [3, 4]  # [chosen, rejected] of slot 1
    assert row["prompt"] == "a red square" and row["category"] == "colors"
    assert row["seeds"] == [s1, s1] and row["phi"] == [1.0, 0.0] and row["ranking"] == [1, 2]
    assert row["generators"] == ["ospo:base", "ospo:perturbed:replace_color"]
    assert row["reward_names"] == ["vqa"] and row["scores"] == [[1.0, 0.0]]
    assert row["pairs"] == [{"i": 0, "j": 1, "votes_i": 1, "votes_j": 0}]
    assert records[0]["slot"] == 1 and records[0]["slot_reasons"] == ["chosen_low_score", None]
    assert summary["kept"] == 1 and summary["dropped"]["chosen_low_score"] == 1
    assert summary["per_operation"] == {"replace_color": 1}


# ----------------------------------------------------------------------------- shared seeds


def test_base_and_perturbed_share_seeds():
    perts = perturbation.perturb("a circle and a square", 2)
    items = ospo.generation_items([(p.base, p.base, p.perturbed) for p in perts], slots=3)
    # 3 base images (shared by both perturbations) + 3 per perturbation
    assert len(items) == 3 + 2 * 3
    base_seeds = sorted(x["seed"] for x in items if x["prompt"] == "a circle and a square")
    for p in perts:
        assert sorted(x["seed"] for x in items if x["prompt"] == p.perturbed) == base_seeds
    assert len(set(base_seeds)) == 3 and all(x["question_prompt"] == "a circle and a square" for x in items)
    assert ospo.slot_seed("a circle", 0, round_index=1) != ospo.slot_seed("a circle", 0, round_index=0)


def test_same_seed_same_image_teacher():
    gen = build_generator("teacher:quill")
    a = gen.generate(["a red circle", "a blue circle", "a red circle"], [5, 5, 5])
    assert np.array_equal(a[0], a[2])
    assert np.array_equal(gen.generate(["a red circle"], [5])[0], a[0])  # batch composition does not matter


def test_same_seed_same_image_tiny_pipeline_and_build(tmp_path, scorer):
    from raypref.shapes.model import build_pipeline

    build_pipeline("tiny", seed=0).save_pretrained(tmp_path / "tiny")
    gen = build_generator(f"checkpoint:{tmp_path / 'tiny'}", num_inference_steps=2)
    a = gen.generate(["a red circle", "a blue circle", "a red circle"], [11, 11, 11])
    assert a.shape == (3, 16, 16, 3)
    assert np.array_equal(a[0], a[2])
    assert np.array_equal(gen.generate(["a red circle"], [11])[0], a[0])
    assert not np.array_equal(gen.generate(["a red circle"], [12])[0], a[0])
    # A whole build on the random model: nothing crashes, every dropped slot has a reason.
    cfg = _cfg(prompts={"per_category": 1, "categories": ("colors", "counting")}, generate={"slots": 1})
    rows, records, summary = ospo.build_pairs(cfg, gen, scorer)
    assert summary["perturbations"] == 4 and summary["kept"] + summary["dropped_pairs"] == 4
    assert sum(summary["dropped"].values()) == summary["dropped_pairs"]  # one slot per pair
    for row in rows:
        validate_row(row)


# ----------------------------------------------------------------------------- rows, layout, trainer


def test_ospo_rows_validate_load_and_mean_what_they_say(tmp_path, scorer):
    from raypref.collate import select
    from raypref.train_config import LossSection

    cfg = ospo_tiny()
    rows, records, summary = ospo.build_pairs(cfg, build_generator(cfg.generate.generator), scorer)
    assert summary["perturbations"] == 6 * 2 * 2 and len(rows) == summary["kept"] > 0
    path = tmp_path / "ospo.parquet"
    pq.write_table(to_table(rows), path)
    table = pq.read_table(path)
    assert table.schema.equals(SCHEMA) and table.num_rows == len(rows)
    kept = [r for r in records if r["kept"]]
    for row, rec in zip(table.to_pylist(), kept):
        validate_row(row)
        chosen, rejected = (decode_png(b) for b in row["images"])
        assert row["prompt"] == rec["base"] and row["seeds"][0] == row["seeds"][1]
        # Independent check with ShapesEval: the chosen image passes the base prompt, the rejected
        # one fails it (S >= 0.6 with an error-free judge means every question holds).
        assert passes(row["prompt"], chosen)
        assert not all(ok for _, ok in check_results(row["prompt"], rejected))
        assert row["generators"][1] == f"ospo:perturbed:{rec['operation']}"
        assert select(row, LossSection(method="dpo")) == ([0, 1], [(0, 1, 1.0)])
        assert select(row, LossSection(method="rankdpo")) == ([0, 1], [])


def test_naive_pairs(scorer):
    cfg = _cfg(run={"mode": "naive"})
    prompts = ["a red square", "a circle"]
    v = ospo.vqa_summary
    seeds = {p: [ospo.slot_seed(p, s, 0, 0) for s in range(2)] for p in prompts}
    img = lambda k: np.full((4, 4, 3), k, np.uint8)  # noqa: E731
    results = {
        ("a red square", seeds["a red square"][0], "a red square"): {"image": img(1), **v([1, 0])},  # S = 0
        ("a red square", seeds["a red square"][1], "a red square"): {"image": img(2), **v([1, 1])},  # S = 1
        ("a circle", seeds["a circle"][0], "a circle"): {"image": img(3), **v([1])},
        ("a circle", seeds["a circle"][1], "a circle"): {"image": img(4), **v([1])},  # tie: dropped
    }
    rows, records, summary = ospo.assemble_naive(prompts, results, cfg)
    (row,) = rows
    assert [decode_png(b)[0, 0, 0] for b in row["images"]] == [2, 1]  # the winner first
    assert row["seeds"] == seeds["a red square"][::-1] and row["scores"] == [[1.0, 0.0]]
    assert summary == {"prompts": 2, "kept": 1, "dropped": {"tie": 1}}
    # End to end with a teacher: different seeds, winner scored above loser.
    rows, _, summary = ospo.build_pairs(cfg, build_generator(cfg.generate.generator), scorer)
    assert summary["prompts"] == 12 and len(rows) == summary["kept"]
    for row in rows:
        validate_row(row)
        assert row["seeds"][0] != row["seeds"][1] and row["scores"][0][0] > row["scores"][0][1]
        assert row["generators"] == ["naive:sample", "naive:sample"]


# ----------------------------------------------------------------------------- densification, LLM steps


def test_densification_is_recorded_not_conditioned_in_the_shapes_world(scorer):
    assert perturbation.densify("a red circle") == "a picture of a red circle on a dark background"
    cfg = _cfg(densify={"mode": "record"}, prompts={"per_category": 1, "categories": ("colors",)})
    rows, records, _ = ospo.build_pairs(cfg, build_generator(cfg.generate.generator), scorer)
    for rec in records:
        assert rec["dense"] == [perturbation.densify(rec["base"]), perturbation.densify(rec["perturbed"])]
    for row in rows:
        parse(row["prompt"])  # rows keep the grammar prompt
    with pytest.raises(ValueError, match="densify.mode='condition'"):
        ospo.build_pairs(_cfg(densify={"mode": "condition"}), None, scorer)
    # Free text (not grammar) is densified by the template when there is no chat judge.
    p = perturbation.Perturbation("a cat on a mat", "a dog on a mat", "llm_edit", "unknown", "")
    assert perturbation.dense_pair(p, ospo_config.DensifySection(mode="condition")) == (
        perturbation.densify("a cat on a mat"), perturbation.densify("a dog on a mat"))


def test_llm_steps_need_a_chat_judge():
    for call in (lambda: perturbation.llm_prompts(ShapesJudge(), "color", 3),
                 lambda: perturbation.llm_perturb(None, "a cat", 2),
                 lambda: perturbation.llm_densify(ShapesJudge(), "a cat", "a dog"),
                 lambda: perturbation.initial_prompts(ospo_config.PromptSection(source="llm"), ShapesJudge())):
        with pytest.raises(ValueError, match="needs a chat judge"):
            call()


def test_prompt_sources(tmp_path):
    ps = perturbation.grammar_prompts(("position", "single_object"), 5, seed=0)
    assert len(ps) == 5 + 3  # single_object has only 3 prompts
    assert [parse(p).category for p in ps] == ["position"] * 5 + ["single_object"] * 3 and len(set(ps)) == 8
    f = tmp_path / "p.txt"
    f.write_text("a red circle\n\n  two squares \na red circle\n")
    assert perturbation.file_prompts(f) == ["a red circle", "two squares"]
    with pytest.raises(ValueError, match="does not exist"):
        perturbation.file_prompts(tmp_path / "missing.txt")


# ----------------------------------------------------------------------------- self-improvement


def test_ospo_rounds_next_round_uses_the_trained_model(scorer):
    cfg = _cfg(prompts={"per_category": 1})
    calls = []

    def train(rows, model, r):
        calls.append((r, model, len(rows), sorted({row["seeds"][0] for row in rows})))
        return ["teacher:quill", "teacher:prism"][r]  # the "trained" model of round r

    made = []

    def make_generator(spec):
        made.append(spec)
        return build_generator(spec)

    history = ospo.ospo_rounds(cfg, "teacher:vellum", make_generator, scorer, train, rounds=2)
    assert made == ["teacher:vellum", "teacher:quill"]
    assert [h["model"] for h in history] == ["teacher:vellum", "teacher:quill"]
    assert [h["trained"] for h in history] == ["teacher:quill", "teacher:prism"]
    assert [c[0] for c in calls] == [0, 1] and all(c[2] > 0 for c in calls)
    assert not set(calls[0][3]) & set(calls[1][3])  # fresh seeds each round
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        ospo.ospo_rounds(cfg, "teacher:vellum", make_generator, scorer, train, rounds=0)


# ----------------------------------------------------------------------------- config and job


def test_config_overrides_and_errors():
    cfg = load_config(ospo_config.shapes_cpu(), None, ["perturb.per_prompt=3", "generate.slots=2", "run.mode=naive"])
    assert cfg.perturb.per_prompt == 3 and cfg.generate.slots == 2 and cfg.run.mode == "naive"
    for bad in (["perturb.operations=[shuffle]"], ["densify.mode=always"], ["prompts.categories=[complex]"],
                ["generate.slots=0"], ["filter.min_chosen_score=2"], ["run.use_ray=maybe"], ["nope.x=1"]):
        with pytest.raises(ValueError):
            load_config(ospo_config.shapes_cpu(), None, bad)


def test_job_plain_and_ray_data_give_the_same_rows(tmp_path, ray_local):
    job = ospo
    base = ["--config", config_file(ospo_tiny(), tmp_path / "tiny.yaml"), "prompts.per_category=1"]
    plain = job.main(base + [f"run.output={tmp_path / 'plain.parquet'}", "run.use_ray=never"])
    viaray = job.main(base + [f"run.output={tmp_path / 'ray.parquet'}", "run.use_ray=always", "run.num_actors=1",
                              "run.batch_size=4"])
    a, b = pq.read_table(tmp_path / "plain.parquet"), pq.read_table(tmp_path / "ray.parquet")
    assert a.num_rows == plain["rows"] > 0 and a.equals(b)
    summary = json.loads((tmp_path / "ray.summary.json").read_text())
    assert summary["perturbations"] == 12 and summary["kept"] == viaray["rows"] == a.num_rows
    assert set(summary["dropped"]) == set(ospo.REASONS)
    assert sum(summary["per_operation"].values()) == 12
    lines = (tmp_path / "ray.records.jsonl").read_text().splitlines()
    assert len(lines) == 12 and {"base", "perturbed", "operation", "binding"} <= set(json.loads(lines[0]))


def test_job_trainer_hands_the_next_round_a_full_pipeline(ray_local, scorer, tmp_path):
    """The job's between-rounds training (LoRA DPO, tiny preset) folds the adapter into a plain pipeline."""
    import torch

    from raypref.models import load_adapter
    from raypref.shapes.model import build_pipeline

    build_pipeline("tiny", seed=0).save_pretrained(tmp_path / "base")
    cfg = _cfg(run={"output": str(tmp_path / "ospo.parquet")})
    rows, _, _ = ospo.build_pairs(cfg, build_generator("teacher:vellum", size=16), scorer)  # the model is 16 x 16
    assert rows
    train = ospo.make_trainer(cfg, ["--config", config_file(train_tiny(), tmp_path / "train.yaml"), "--method", "dpo",
                                    f"run.storage_path={tmp_path / 'runs'}", "run.num_workers=1"])
    spec = train(rows, f"checkpoint:{tmp_path / 'base'}", 0)
    model = load_adapter(spec.partition(":")[2])
    base = load_adapter(tmp_path / "base")
    assert not any("lora" in n for n, _ in model.denoiser.named_parameters())
    changed = [n for (n, a), (_, b) in zip(model.denoiser.named_parameters(), base.denoiser.named_parameters())
               if not torch.equal(a, b)]
    assert changed and all(".attn" in n for n in changed), changed[:5]  # tiny preset: LoRA on attention only
