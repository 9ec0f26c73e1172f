"""The evolve driver (raypref.evolve, jobs/evolve_and_train.py), its report and the raypref CLI.

Tiny and real: a 16 x 16 random-weight shapes pipeline saved to tmp_path, two procedural teachers,
one prompt per category, two optimizer steps per training, the judge served by Ray Serve.
"""

import hashlib
import re
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from raypref import evolve, evolve_config, spend, stages
from raypref.config import load_config
from tests.presets import config_file, evolve_tiny

ROOT = Path(__file__).resolve().parent.parent
MANIFEST_KEYS = {
    "round", "finished_at", "checkpoint", "parent_checkpoint", "datasets", "counts", "teacher_calls", "teacher_cost",
    "teacher_calls_total", "judge_calls", "judge_cost", "cost_total", "scores", "mean_rewards", "losses",
    "stage_seconds", "methods",
}


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from raypref.shapes.model import build_pipeline

    path = tmp_path_factory.mktemp("base") / "pipeline"
    build_pipeline("tiny", seed=0).save_pretrained(path)
    return path


def tiny_cfg(base, out, *extra):
    return load_config(evolve_tiny(), None, [f"model.base={base}", f"run.output_dir={out}", "run.progress=false",
                                             *extra])


def tree_state(*dirs) -> dict:
    """{path: (sha256, mtime_ns)} of every file under ``dirs``."""
    out = {}
    for d in dirs:
        for p in sorted(Path(d).rglob("*")):
            if p.is_file():
                out[str(p)] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return out


# ---------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("override, match", [
    ("train.loss.method=sft", "train.loss.method"), ("sft.loss.method=dpo", "sft.loss.method"),
    ("sft.model.lora_rank=0", "lora_rank"), ("prefs.source=humans", "prefs.source"),
    ("run.rounds=-1", "run.rounds"), ("eval.n_per_category=0", "n_per_category"), ("model.steps=0", "model.steps"),
    ("judge_serve.proxy_location=Nowhere", "proxy_location"), ("director.round.p_mutate=2", "p_mutate"),
    ("synpic.generators.specs=[teacher:prism]", "K >= 2"), ("sft.optim.colour=1", "unknown config key"),
])
def test_bad_config_is_a_clear_error(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(evolve_tiny(), None, [override])


@pytest.mark.parametrize("override", ["sft.model.path=/x", "train.data.path=/x.parquet", "director.data.image_size=64",
                                      "synpic.run.output_dir=/x", "ospo.generate.generator=teacher:prism"])
def test_a_field_the_driver_sets_is_refused_by_name(override):
    """The driver sets the linked fields every round: setting one is an error naming it, not ignored."""
    with pytest.raises(ValueError, match=re.escape(override.split("=")[0]) + " is set by the driver"):
        load_config(evolve_config.shapes_cpu(), None, [override])
    assert set(evolve_config.LINKED) >= {override.split("=")[0]}


def _fake_stages(calls, fail=None):
    """Stages that record their calls, pay a known amount and pass the checkpoint through; ``fail``
    (round, stage) raises once, as a crash in that stage would."""

    def make(name, paid):
        def stage(cfg, ctx, sdir):
            calls.append((ctx.r, name))
            if fail is not None and (ctx.r, name) == fail[0] and not fail[1]:
                fail[1] = True
                raise RuntimeError(f"crash in round {ctx.r} {name}")
            out = {"spent": {"teacher_calls": paid, "teacher_cost": 0.5 * paid, "judge_calls": 2 * paid}}
            if name in ("sft", "train"):
                out["model"] = str(ctx.ckpt)
            if name == "eval":
                out.update(overall=0.1 * ctx.r, categories={}, shapes={}, n=6, dir=str(sdir))
            return out
        return stage

    return evolve.Stages(**{n: make(n, paid) for n, paid in zip(evolve.STAGES, (3, 0, 5, 0, 0))})


def test_round_loop_resumes_skips_finished_stages_and_bills_each_invocation(tmp_path):
    """The round loop with fake stages (seconds, no Ray): a crash in round 2's prefs stage, then a
    re-run that skips rounds 0-1 and round 2's finished stages, and an invocation ledger that bills
    each run for the stages it ran."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "model_index.json").write_text("{}")
    cfg = tiny_cfg(base, tmp_path / "run", "run.report=false")
    calls = []
    fail = [(2, "prefs"), False]
    with pytest.raises(RuntimeError, match="crash in round 2 prefs"):
        evolve.run(cfg, _fake_stages(calls, fail))
    assert calls == [(0, "eval"), *[(r, s) for r in (1, 2) for s in evolve.STAGES][:-2]]  # up to the crash
    assert evolve.finished_rounds(tmp_path / "run") == [0, 1]
    calls.clear()
    manifests = evolve.run(cfg, _fake_stages(calls, fail))
    assert calls == [(2, "prefs"), (2, "train"), (2, "eval")]  # round 2's director and sft were finished
    assert [m["scores"]["overall"] for m in manifests] == pytest.approx([0.0, 0.1, 0.2])
    first, second = spend.read_invocations(tmp_path / "run")
    assert (first["teacher_calls"], first["judge_calls"]) == (3 + 5 + 3, 2 * (3 + 5 + 3))  # r1 all, r2 director
    assert (second["teacher_calls"], second["teacher_cost"], second["stages"]) == (5, 2.5, ["2:prefs", "2:train",
                                                                                            "2:eval"])
    calls.clear()
    assert len(evolve.run(cfg, _fake_stages(calls))) == 3 and calls == []  # all finished: nothing runs


def test_presets_and_nested_overrides():
    for name, preset in evolve_config.PRESETS.items():
        cfg = preset()
        assert isinstance(cfg, evolve_config.EvolveConfig), name
        assert cfg.sft.loss.method == "sft" and cfg.train.loss.method in evolve_config.PREF_METHODS
    cfg = load_config(evolve_config.shapes_cpu(), None, ["train.loss.method=rankdpo", "sft.optim.max_steps=123",
                                             "director.data.n_per_category=7", "synpic.prompts.n_per_category=3",
                                             "prefs.source=ospo", "ospo.prompts.per_category=5"])
    assert (cfg.train.loss.method, cfg.sft.optim.max_steps, cfg.director.data.n_per_category,
            cfg.synpic.prompts.n_per_category, cfg.prefs.source, cfg.ospo.prompts.per_category) == \
        ("rankdpo", 123, 7, 3, "ospo", 5)
    assert evolve_config.shapes_cpu().model.base == "shipped"


def test_ospo_prefs_stage(tiny_base, tmp_path):
    """prefs.source=ospo: pairs of the current model (tiny OSPO preset: rendered without Ray)."""
    cfg = tiny_cfg(tiny_base, tmp_path / "run", "prefs.source=ospo")
    sdir = tmp_path / "prefs"
    sdir.mkdir()
    ctx = stages.RoundContext(run_dir=tmp_path / "run", r=1, ckpt=tiny_base, stats={"sft": {"model": str(tiny_base)}})
    out = stages.stage_prefs(cfg, ctx, sdir)
    table = pq.read_table(out["data"])
    assert out["source"] == "ospo" and out["rows"] == table.num_rows > 0 and "spent" not in out  # no teacher paid
    assert all(len(row["images"]) == 2 and row["phi"] == [1.0, 0.0] for row in table.to_pylist())
    assert not (sdir / "ospo.tmp").exists() and out["summary"]["parquet"] == out["data"]


# ---------------------------------------------------------------------------------------- end to end
def test_report_standard_error_and_best_round():
    from raypref.report import best_round, overall_se

    # two categories of 50 images each: sqrt(0.5 * 0.5 / 50 + 0) / 2
    assert overall_se({"a": 0.5, "b": 0.0}, 100) == pytest.approx(math.sqrt(0.25 / 50) / 2)
    # the driver's eval: 6 categories x 50 images near 0.25 -> about 0.025
    assert overall_se(dict.fromkeys("abcdef", 0.25), 300) == pytest.approx(0.025)
    assert overall_se({}, 0) is None
    ms = [{"round": r, "scores": {"overall": v}} for r, v in enumerate((0.3, 0.3, 0.2))]
    assert best_round(ms)["round"] == 0  # ties go to the earlier round
    ms[2]["scores"]["overall"] = 0.4
    assert best_round(ms)["round"] == 2
    assert best_round([{"round": 0, "scores": {"overall": None}}]) is None and best_round([]) is None


@pytest.mark.slow  # minutes: two Ray Train fits and a Syn-Pic build per round
@pytest.mark.timeout(1500)
def test_two_rounds_end_to_end(tiny_base, tmp_path, ray_local):
    from raypref.checkpoints import resolve_checkpoint
    from raypref.prefdata import decode_png
    from raypref.shapes.evaluate import rescore_dir

    out = tmp_path / "run"
    cfg = tiny_cfg(tiny_base, out)
    manifests = evolve.run(cfg)
    assert [m["round"] for m in manifests] == [0, 1, 2]
    for r, m in enumerate(manifests):
        on_disk = json.loads((out / f"round-{r:03d}" / "manifest.json").read_text())
        assert on_disk == m and MANIFEST_KEYS <= set(m), MANIFEST_KEYS - set(m)
        # the written eval set re-scores, from its PNGs alone, to the manifest's scores
        again = rescore_dir(m["datasets"]["eval"])
        assert again["overall"] == pytest.approx(m["scores"]["overall"])
        assert again["categories"] == pytest.approx(m["scores"]["categories"])
        assert again["shapes"] == pytest.approx(m["scores"]["shapes"])
        assert m["counts"]["eval_images"] == 6 * cfg.eval.n_per_category
        assert set(m["mean_rewards"]["eval"]) == {"faithfulness", "aesthetic"}
    m0, m1, m2 = manifests
    assert m0["checkpoint"] == str(tiny_base) and set(m0["stage_seconds"]) == {"eval"}
    assert m0["teacher_calls_total"] == 0 and m0["losses"]["sft"] is None
    for prev, m in ((m0, m1), (m1, m2)):
        assert m["parent_checkpoint"] == prev["checkpoint"] != m["checkpoint"]
        resolve_checkpoint(m["checkpoint"])  # a loadable diffusers pipeline
        assert set(m["stage_seconds"]) == set(evolve.STAGES) and all(v > 0 for v in m["stage_seconds"].values())
        assert m["losses"]["sft"] is not None and m["losses"]["pref"] is not None
        # counts agree with the datasets on disk
        assert pq.read_metadata(m["datasets"]["sft"]).num_rows == m["counts"]["sft_rows"] == \
            pq.read_metadata(m["datasets"]["director_set"]).num_rows == m["counts"]["director_set"]
        assert pq.read_table(m["datasets"]["prefs"]).num_rows == m["counts"]["pref_rows"]
        # Syn-Pic: 6 categories x 1 prompt, one image per prompt per teacher; prism and quill cost 1 each
        assert m["teacher_calls"]["prefs/teacher:prism"] == m["teacher_calls"]["prefs/teacher:quill"] == 6
        assert m["teacher_cost"]["prefs/teacher:prism"] == pytest.approx(6.0)
    # director: round 1 pays the initial set (6 prompts, "mix" = one teacher call each) plus its round
    init = json.loads((out / "director" / "initial.json").read_text())
    assert sum(init["teacher_calls"].values()) == 6
    for r, m in ((1, m1), (2, m2)):
        summ = json.loads((out / "director" / "logs" / f"round-{r:04d}.summary.json").read_text())
        director_calls = sum(v for k, v in m["teacher_calls"].items() if k.startswith("director/"))
        assert director_calls == sum(summ["teacher_calls"].values()) + (6 if r == 1 else 0)
        assert m["judge_calls"] == summ["judge_calls"] + (init["judge_calls"] if r == 1 else 0) > 0
        assert m["counts"]["director_sampled"] == summ["sampled"]
    # the report: tables of every round, the plots, a labelled grid of the same prompts each round
    report = (out / "report.md").read_text()
    for name in ("samples_grid.png", "shapes_eval.png", "rewards.png", "losses.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({name})" in report
    assert report.count(f"| `{m2['checkpoint']}` |") == 1 and "| 2 | " in report
    assert (
        "Shape drawn, of the eval prompts naming it:" in report and "| round | circle | square | triangle |" in report
    )
    best = max(manifests, key=lambda m: (m["scores"]["overall"], -m["round"]))
    assert f"Best measured round: {best['round']} " in report and f"checkpoint `{best['checkpoint']}`" in report
    samples = [json.loads((out / f"round-{r:03d}" / "eval" / "samples.json").read_text()) for r in range(3)]
    assert samples[0] == samples[1] == samples[2]  # same prompts and seeds in every row
    assert [s["prompt"] for s in samples[0]] == list(cfg.eval.report_prompts)
    first = decode_png((out / "round-000" / "eval" / samples[0][0]["image"]).read_bytes())
    assert first.shape == (16, 16, 3)
    # a finished run re-run does nothing: no stage runs, no file of a round changes
    before = tree_state(*(out / f"round-{r:03d}" for r in range(3)))
    evolve.run(cfg)
    assert tree_state(*(out / f"round-{r:03d}" for r in range(3))) == before
    assert spend.read_invocations(out)[-1]["stages"] == []


# ---------------------------------------------------------------------------------------- kill and resume
def _driver(base, out, log):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, str(ROOT / "jobs" / "evolve_and_train.py"), "--config",
           config_file(evolve_tiny(), Path(out).parent / "evolve_tiny.yaml"),
           f"model.base={base}", f"run.output_dir={out}", "run.num_cpus=4"]
    # a session of its own: the kill below reaches the driver and the local Ray it started, nothing else
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.slow  # minutes: three driver rounds in a subprocess, killed and re-run
@pytest.mark.timeout(1800)
def test_killed_in_round_2_resumes_without_redoing_round_1(tiny_base, tmp_path):
    out = tmp_path / "run"
    with open(tmp_path / "first.log", "wb") as log:
        proc = _driver(tiny_base, out, log)
        started = out / "round-002" / "director" / "stage.json"
        deadline = time.time() + 1200
        while not started.exists():  # round 1 finished (its manifest exists) and round 2's director ran
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "round 2 never started"
            time.sleep(0.5)
        assert (out / "round-001" / "manifest.json").exists()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "round-002" / "manifest.json").exists()
    keep = [out / "round-000", out / "round-001"]
    before = tree_state(*keep)
    before.update(tree_state(out / "round-002" / "director"))
    director_versions = {p.name: p.stat().st_mtime_ns for p in (out / "director").glob("round-*.parquet")}
    assert set(director_versions) == {"round-0000.parquet", "round-0001.parquet", "round-0002.parquet"}
    n_invocations = len(spend.read_invocations(out))

    with open(tmp_path / "second.log", "wb") as log:
        proc = _driver(tiny_base, out, log)
        assert proc.wait(timeout=1200) == 0, (tmp_path / "second.log").read_text()[-3000:]
    m2 = json.loads((out / "round-002" / "manifest.json").read_text())
    assert MANIFEST_KEYS <= set(m2) and m2["round"] == 2
    after = tree_state(*keep)
    after.update(tree_state(out / "round-002" / "director"))
    assert after == before  # round 0 and 1, and round 2's finished director stage, untouched
    assert {p.name: p.stat().st_mtime_ns for p in (out / "director").glob("round-*.parquet")} == director_versions
    invocations = spend.read_invocations(out)
    assert len(invocations) == n_invocations + 1
    rerun = invocations[-1]
    assert rerun["rounds"] == [2] and "2:director" not in rerun["stages"] and "2:train" in rerun["stages"]
    # the re-run paid only for round 2's unfinished stages: here Syn-Pic's teachers, if its stage re-ran
    prefs_calls = sum(v for k, v in m2["teacher_calls"].items() if k.startswith("prefs/"))
    assert rerun["teacher_calls"] == (prefs_calls if "2:prefs" in rerun["stages"] else 0)
    assert rerun["judge_calls"] == 0  # the director's round 2 was committed before the kill
    assert (out / "report.md").exists() and "| 2 | " in (out / "report.md").read_text()


# ---------------------------------------------------------------------------------------- ray job submit
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_ray_job_submit_on_a_throwaway_cluster(tiny_base, tmp_path):
    """scripts/ray_job_submit.sh: its own head (temp dir, free ports), the driver as a Ray Job, SUCCEEDED."""
    out = tmp_path / "run"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHON": sys.executable,
           "CONFIG": config_file(evolve_tiny(), tmp_path / "evolve_tiny.yaml")}
    env.pop("RAY_ADDRESS", None)
    res = subprocess.run(["bash", str(ROOT / "scripts" / "ray_job_submit.sh"), str(out), f"model.base={tiny_base}",
                          "run.rounds=1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1700)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert "job status: SUCCEEDED" in res.stdout
    assert (out / "round-001" / "manifest.json").exists() and (out / "report.md").exists()


# ---------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("command, options", [
    ("evolve", ["--preset", "--config", "overrides", "shapes_cpu"]),
    ("train", ["--preset", "--config", "--method", "overrides"]),
    ("synpic", ["--preset", "--config", "overrides"]),
    ("ospo", ["--preset", "--config", "--train-method", "overrides"]),
    ("serve", ["--images", "--checkpoint", "--judge", "--host", "--port", "127.0.0.1"]),
    ("shapes-eval", ["--generator", "--n-per-category", "--seed", "--out"]),
])
def test_cli_help_of_every_subcommand(command, options):
    res = subprocess.run([sys.executable, "-m", "raypref.cli", command, "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    for opt in options:
        assert opt in res.stdout, (command, opt)


def test_cli_top_level_help_lists_every_subcommand():
    from raypref.cli import build_parser

    text = build_parser().format_help()
    for command in ("synpic", "ospo", "train", "evolve", "shapes-eval", "serve"):
        assert command in text
    assert subprocess.run([sys.executable, "-m", "raypref.cli", "evolve", "run.rounds=-1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300).returncode == 2
