"""Syn-Pic pipeline: end to end on tiny teachers + a tiny random shapes model, resume after an
interruption, a generator actor killed mid-run, and bad inputs.

Ray runs are the slow part, so two module fixtures build datasets once and several tests read them.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raypref import labels, prefdata, prompt_sources, synpic, synpic_config
from raypref.generators import TeacherGenerator
from raypref.rewards.shapes import AestheticReward
from raypref.shapes.teachers import PROFILES
from tests.presets import config_file, synpic_tiny

N_PROMPTS = 12  # tiny_test: 2 per category x 6 categories, chunks of 4


class LoggedTeacher(TeacherGenerator):
    """A real shapes teacher that appends one line per generated image to ``log`` (an independent
    count of calls, surviving actor deaths) and, with ``crash_marker``, kills its own process once."""

    shapes = True

    def __init__(self, name, size=32, log="", crash_marker="", delay=0.0, **_):
        super().__init__(name, size=size)
        self.log, self.crash_marker, self.delay = log, crash_marker, delay

    def __call__(self, batch):
        time.sleep(self.delay)
        if self.crash_marker and not os.path.exists(self.crash_marker):
            Path(self.crash_marker).write_text("crashed once")
            os._exit(1)  # the actor process dies mid-batch, like an OOM kill
        out = super().__call__(batch)
        with open(self.log, "a") as f:  # O_APPEND: one write per batch, lines never interleave
            f.write("".join(f"{self.name}\t{p}\t{int(s)}\n" for p, s in zip(batch["prompt"], batch["seed"])))
        return out


class NaNOnPrompt(AestheticReward):
    """The real aesthetic reward, except NaN for one prompt (a reward model that misbehaves)."""

    def __init__(self, name="aesthetic", bad_prompt="", **_):
        super().__init__(name=name)
        self.bad_prompt = bad_prompt

    def __call__(self, batch):
        out = super().__call__(batch)
        s = out[f"score_{self.name}"].copy()
        s[np.asarray([str(p) == self.bad_prompt for p in batch["prompt"]])] = np.nan
        out[f"score_{self.name}"] = s
        return out


@pytest.fixture(scope="module", autouse=True)
def _pickle_test_classes():
    # Ray workers cannot import this test module: ship its classes by value.
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _cfg(out, specs, rewards=("faithfulness", "aesthetic"), **run_kw):
    cfg = synpic_tiny()
    return replace(cfg, generators=replace(cfg.generators, specs=tuple(specs)),
                   rewards=replace(cfg.rewards, specs=tuple(rewards)),
                   run=replace(cfg.run, output_dir=str(out), **run_kw))


def _calls(log: Path) -> list[tuple[str, str, int]]:
    if not log.exists():
        return []
    return [(g, p, int(s)) for g, p, s in (line.split("\t") for line in log.read_text().splitlines())]


@pytest.fixture(scope="module")
def built(ray_local, tmp_path_factory):
    """Run 1 stops after one chunk (an interruption); run 2 resumes and finishes."""
    from raypref.shapes.model import build_pipeline

    tmp = tmp_path_factory.mktemp("synpic")
    build_pipeline("tiny").save_pretrained(tmp / "base")
    log = tmp / "calls.log"
    gens = {"logged": functools.partial(LoggedTeacher, log=str(log))}
    specs = ("logged:prism", "logged:quill", f"checkpoint:{tmp / 'base'}")
    first = synpic.run(_cfg(tmp / "out", specs, max_chunks=1), generator_classes=gens)
    calls_first = _calls(log)
    files_first = sorted(os.listdir(tmp / "out" / "data"))
    second = synpic.run(_cfg(tmp / "out", specs), generator_classes=gens)
    return {"out": tmp / "out", "specs": specs, "log": log, "first": first, "second": second,
            "calls_first": calls_first, "files_first": files_first, "base": tmp / "base"}


def test_resume_after_interruption_calls_each_teacher_once_per_prompt(built):
    first, second = built["first"], built["second"]
    assert built["files_first"] == ["chunk-00000.parquet"]
    assert not first["finished"] and first["this_run"]["chunks"] == 1
    # run 1 generated exactly the first chunk (4 prompts) with each teacher
    assert len(built["calls_first"]) == 2 * 4
    assert second["finished"] and second["this_run"]["chunks_skipped_as_done"] == 1
    assert second["this_run"]["chunks"] == N_PROMPTS // 4 - 1
    calls = _calls(built["log"])
    # across both runs every (teacher, prompt) was generated exactly once: chunk 0 was not redone
    pairs = [(g, p) for g, p, _ in calls]
    assert len(pairs) == len(set(pairs)) == 2 * N_PROMPTS
    assert second["this_run"]["calls"]["logged:prism"] == N_PROMPTS - 4
    assert second["total"]["calls"]["logged:prism"] == N_PROMPTS
    # cost from the data: prism and quill cost 1.0 a call, the local checkpoint nothing
    assert second["total"]["cost"]["logged:prism"] == pytest.approx(N_PROMPTS * PROFILES["prism"].cost)
    assert second["total"]["cost"]["logged:quill"] == pytest.approx(N_PROMPTS * PROFILES["quill"].cost)
    assert second["total"]["cost"][built["specs"][2]] == 0.0
    summary = json.loads((built["out"] / "summary.json").read_text())
    assert summary["total"]["rows"] == N_PROMPTS and summary["this_run"]["images_per_second"] > 0


def test_dataset_loads_with_ray_and_hf_datasets(built):
    import datasets
    import ray

    ds = ray.data.read_parquet(str(built["out"] / "data"))
    assert ds.count() == N_PROMPTS
    assert set(ds.schema().names) == set(prefdata.SCHEMA.names)
    hf = datasets.load_dataset("parquet", data_files=sorted(glob.glob(str(built["out"] / "data" / "*.parquet"))),
                               split="train")
    assert len(hf) == N_PROMPTS
    expected = [p for p, _ in prompt_sources.load_prompts(synpic_tiny().prompts, grammar=True)[0]]
    assert sorted(hf["prompt"]) == sorted(expected) and len(set(hf["prompt"])) == N_PROMPTS


def test_labels_match_labels_py_on_stored_scores(built):
    table = pq.read_table(str(built["out"] / "data"))
    assert table.schema.equals(prefdata.SCHEMA)
    n_pairs = 0
    for row in table.to_pylist():
        assert row["generators"] == list(built["specs"])
        assert row["reward_names"] == ["faithfulness", "aesthetic"]
        scores = np.asarray(row["scores"], dtype=np.float64)
        assert scores.shape == (2, 3)
        phi = labels.synpic_phi(scores)
        np.testing.assert_allclose(row["phi"], phi, rtol=1e-6)
        np.testing.assert_array_equal(row["ranking"], labels.ranking(np.asarray(row["phi"])))
        assert [(p["i"], p["j"], p["votes_i"], p["votes_j"]) for p in row["pairs"]] == labels.consensus_pairs(scores)
        n_pairs += len(row["pairs"])
        images = [prefdata.decode_png(b) for b in row["images"]]
        assert [im.shape for im in images] == [(16, 16, 3)] * 3
    assert n_pairs > 0


def test_stored_seed_regenerates_the_stored_image(built):
    """A re-run regenerates the same image: the teacher, fed the stored seed, reproduces the PNG."""
    row = pq.read_table(str(built["out"] / "data")).to_pylist()[5]
    teacher = TeacherGenerator("quill", size=16)
    again = teacher.generate([row["prompt"]], [row["seeds"][1]])[0]
    np.testing.assert_array_equal(prefdata.decode_png(row["images"][1]), again)
    assert row["seeds"][0] != row["seeds"][1]  # the seed depends on the generator, not only the prompt


def test_pickapic_export(built):
    import datasets

    table = pq.read_table(str(built["out"] / "data"))
    pick = datasets.load_dataset("parquet", data_files=sorted(glob.glob(str(built["out"] / "pickapic" / "*.parquet"))),
                                 split="train")
    assert set(pick.column_names) == {"caption", "jpg_0", "jpg_1", "label_0"}
    assert len(pick) == len(prefdata.to_pickapic(table))
    rows = {r["prompt"]: r for r in table.to_pylist()}
    ex = pick[0]
    row = rows[ex["caption"]]
    i = row["images"].index(ex["jpg_0"])
    j = row["images"].index(ex["jpg_1"])
    assert row["phi"][i] >= row["phi"][j] and ex["label_0"] == 1.0


def test_rerun_of_a_finished_dataset_generates_nothing(built):
    n_before = len(_calls(built["log"]))
    gens = {"logged": functools.partial(LoggedTeacher, log=str(built["log"]))}
    s = synpic.run(_cfg(built["out"], built["specs"]), generator_classes=gens)
    assert s["finished"] and s["this_run"]["chunks"] == 0 and s["this_run"]["chunks_skipped_as_done"] == N_PROMPTS // 4
    assert len(_calls(built["log"])) == n_before


def test_rerun_with_other_inputs_is_refused(built):
    cfg = _cfg(built["out"], ("teacher:prism", "teacher:vellum"))
    with pytest.raises(ValueError, match="different inputs"):
        synpic.run(cfg)


def test_job_main_wires_config_to_run(built):
    """The job (synpic.main, behind jobs/build_synpic.py): preset + CLI overrides reach synpic.run
    (here: refused, other generators)."""
    job = synpic
    with pytest.raises(ValueError, match="different inputs"):
        job.main(
            [
                "--config",
                config_file(synpic_tiny(), built["out"].parent / "tiny.yaml"),
                f"run.output_dir={built['out']}",
                "generators.specs=[teacher:prism,teacher:vellum]",
            ]
        )
    with pytest.raises(ValueError, match="unknown config key 'run.nope'"):
        job.main(["run.nope=1"])


def test_killed_generator_actor_and_nan_reward(ray_local, tmp_path):
    """A generator actor, one of a pool of two, dies mid-run (os._exit once): Ray Data restarts it and
    retries the batch, and the dataset still holds every prompt exactly once. A reward returning NaN for one prompt
    turns that prompt into a counted skip, not a row and not a silent drop."""
    prompts = [p for p, _ in prompt_sources.load_prompts(synpic_tiny().prompts, grammar=True)[0]]
    bad = prompts[7]
    marker = tmp_path / "crashed"
    log = tmp_path / "calls.log"
    gens = {"flaky": functools.partial(LoggedTeacher, log=str(log), crash_marker=str(marker))}
    rewards = {"nanny": functools.partial(NaNOnPrompt, bad_prompt=bad)}
    cfg = _cfg(tmp_path / "out", ("flaky:prism", "teacher:vellum"), rewards=("faithfulness", "nanny"),
               max_restarts=2, max_task_retries=2)
    cfg = replace(cfg, generators=replace(cfg.generators, pool_sizes=(2, 1)))
    s = synpic.run(cfg, generator_classes=gens, reward_classes=rewards)
    assert marker.exists()  # the actor really died once
    table = pq.read_table(str(tmp_path / "out" / "data"))
    assert sorted(table.column("prompt").to_pylist()) == sorted(p for p in prompts if p != bad)
    assert s["total"]["label_skips"]["nan_score"]["count"] == 1
    assert repr(bad) in s["total"]["label_skips"]["nan_score"]["examples"][0]
    assert s["total"]["prompts"] == N_PROMPTS and s["total"]["rows"] == N_PROMPTS - 1
    logged = [p for _, p, _ in _calls(log)]
    assert sorted(logged) == sorted(prompts)  # the retried batch was generated once, after the restart


def test_fused_layout_writes_the_pools_rows_and_survives_a_dead_actor(built, tmp_path):
    """run.layout=fused (one pool whose actors run every generator and reward) writes the same rows as
    the pools layout, even when its actor dies mid-batch (os._exit once) and Ray Data retries it."""
    marker, log = tmp_path / "crashed", tmp_path / "calls.log"
    gens = {"logged": functools.partial(LoggedTeacher, log=str(log), crash_marker=str(marker))}
    cfg = _cfg(tmp_path / "out", built["specs"], layout="fused", max_restarts=2, max_task_retries=2)
    s = synpic.run(replace(cfg, generators=replace(cfg.generators, pool_size=2)), generator_classes=gens)
    assert marker.exists() and s["total"]["rows"] == N_PROMPTS
    fused = {r["prompt"]: r for r in pq.read_table(str(tmp_path / "out" / "data")).to_pylist()}
    pools = {r["prompt"]: r for r in pq.read_table(str(built["out"] / "data")).to_pylist()}
    assert sorted(fused) == sorted(pools)
    for prompt, row in pools.items():
        assert fused[prompt]["seeds"] == row["seeds"] and fused[prompt]["ranking"] == row["ranking"]
        np.testing.assert_allclose(fused[prompt]["scores"], row["scores"], rtol=1e-5)
        for a, b in zip(fused[prompt]["images"], row["images"]):
            np.testing.assert_array_equal(prefdata.decode_png(a), prefdata.decode_png(b))
    assert sorted(p for _, p, _ in _calls(log)) == sorted(p for p in pools for _ in range(2))  # 2 logged teachers


def test_fused_layout_config():
    cfg = synpic_config.shapes_cpu()
    fused = replace(cfg, run=replace(cfg.run, layout="fused"),
                    generators=replace(cfg.generators, pool_size=2, num_cpus=0.5))
    synpic.check_resources(fused, cpus=2, gpus=0)  # 2 actors x 0.5 + label 0.25 = 1.25 CPUs
    with pytest.raises(ValueError, match="need 2.75 CPUs"):
        synpic.check_resources(replace(fused, generators=replace(fused.generators, pool_size=5)), cpus=2, gpus=0)
    with pytest.raises(ValueError, match=r"run\.layout must be pools\|fused"):
        replace(cfg.run, layout="stacked")
    with pytest.raises(ValueError, match="run.layout=fused has one pool"):
        replace(fused, generators=replace(fused.generators, pool_sizes=(1, 1, 1, 1, 2)))


DRIVER = """
import functools, json, sys
sys.path[:0] = [{tests!r}, {root!r}]
import ray
from ray import cloudpickle
import test_synpic as T
from raypref import synpic
cloudpickle.register_pickle_by_value(T)
ray.init(address={gcs!r}, log_to_driver=False)
cfg = T._cfg({out!r}, ("logged:prism", "logged:quill"), rewards=("aesthetic",), window_chunks=1)
synpic.run(cfg, generator_classes={{"logged": functools.partial(T.LoggedTeacher, log={log!r}, delay=1.0)}})
"""


def test_driver_killed_mid_run_resumes_without_regenerating(ray_local, tmp_path):
    """SIGKILL the driver (a separate job on the same cluster) once its first chunk is committed; the
    re-run finishes, and no committed (teacher, prompt) is generated a second time."""
    out, log = tmp_path / "out", tmp_path / "calls.log"
    code = DRIVER.format(
        tests=str(Path(__file__).resolve().parent),
        root=str(Path(__file__).resolve().parents[1]),
        gcs=ray_local.get_runtime_context().gcs_address,
        out=str(out),
        log=str(log),
    )
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 600
        while not (out / "data" / "chunk-00000.parquet").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "no chunk committed in time"
            time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()
    committed = sorted(os.listdir(out / "data"))
    assert len(committed) < N_PROMPTS // 4, "the driver finished before it was killed; the test proves nothing"
    done_prompts = set(pq.read_table(str(out / "data")).column("prompt").to_pylist())
    gens = {"logged": functools.partial(LoggedTeacher, log=str(log))}
    s = synpic.run(_cfg(out, ("logged:prism", "logged:quill"), rewards=("aesthetic",), window_chunks=1),
                   generator_classes=gens)
    assert s["finished"] and s["this_run"]["chunks_skipped_as_done"] == len(committed)
    calls = [(g, p) for g, p, _ in _calls(log)]
    for g in ("teacher:prism", "teacher:quill"):
        for p in done_prompts:
            assert calls.count((g, p)) == 1, (g, p)
    table = pq.read_table(str(out / "data"))
    assert table.num_rows == N_PROMPTS and len(set(table.column("prompt").to_pylist())) == N_PROMPTS
    # spend: committed counts each prompt once; paid counts every call made, the killed run's lost
    # (uncommitted) chunk included, as the teachers' own log does
    for name in ("prism", "quill"):
        made = sum(1 for g, _ in calls if g == f"teacher:{name}")
        assert s["total"]["calls"][f"logged:{name}"] == N_PROMPTS
        assert s["total"]["paid"]["calls"][f"logged:{name}"] == made
        assert s["total"]["paid"]["cost"][f"logged:{name}"] == pytest.approx(made * PROFILES[name].cost)
    assert sum(s["total"]["paid"]["calls"].values()) > sum(s["this_run"]["paid"]["calls"].values())


# --------------------------------------------------------------------------------------------- bad input
def _prompt_cfg(source, **kw):
    return replace(synpic_config.PromptsSection(source=str(source)), **kw)


def test_text_prompts_bad_lines_are_counted_skips(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes(b"a red circle\n\n  a square \n\xff\xfe oops\na red circle\nan octagon please\n"
                  + b"a " + b"x" * 50 + b"\ntwo triangles\n")
    prompts, skips = prompt_sources.load_prompts(_prompt_cfg(f, max_chars=40), grammar=True)
    assert prompts == [("a red circle", "colors"), ("a square", "single_object"), ("two triangles", "counting")]
    assert {r: d["count"] for r, d in skips.items()} == {
        "empty": 1, "undecodable": 1, "duplicate": 1, "not_in_grammar": 1, "too_long": 1}
    assert skips["undecodable"]["examples"] == ["p.txt:4: not UTF-8"]
    # without the grammar, free text is fine
    free, skips = prompt_sources.load_prompts(_prompt_cfg(f, max_chars=40), grammar=False)
    assert ("an octagon please", "") in free and "not_in_grammar" not in skips


def test_bad_prompt_is_an_error_when_asked(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes(b"a red circle\n\xff\n")
    with pytest.raises(ValueError, match=r"undecodable.*p.txt:2"):
        prompt_sources.load_prompts(_prompt_cfg(f, on_bad="error"), grammar=True)
    f.write_text("a red circle\na red circle\n")
    with pytest.raises(ValueError, match="duplicate"):
        prompt_sources.load_prompts(_prompt_cfg(f, on_bad="error"), grammar=True)


def test_parquet_prompts(tmp_path):
    f = tmp_path / "p.parquet"
    pq.write_table(pa.table({"text": ["a circle", None, "a circle", "a blue square"]}), f)
    prompts, skips = prompt_sources.load_prompts(_prompt_cfg(f, column="text"), grammar=True)
    assert [p for p, _ in prompts] == ["a circle", "a blue square"]
    assert skips["empty"]["count"] == 1 and skips["duplicate"]["count"] == 1
    with pytest.raises(ValueError, match="no column 'prompt'"):
        prompt_sources.load_prompts(_prompt_cfg(f), grammar=True)
    pq.write_table(pa.table({"prompt": [1, 2]}), f)
    with pytest.raises(ValueError, match="must hold strings"):
        prompt_sources.load_prompts(_prompt_cfg(f), grammar=True)


def test_shapes_prompts_are_distinct_and_capped():
    prompts, skips = prompt_sources.load_prompts(synpic_config.PromptsSection(n_per_category=5, seed=3), grammar=True)
    cats = [c for _, c in prompts]
    assert cats.count("single_object") == 3  # the grammar has only 3 single-object prompts
    assert all(cats.count(c) == 5 for c in set(cats) - {"single_object"})
    assert len({p for p, _ in prompts}) == len(prompts) and skips == {}
    again, _ = prompt_sources.load_prompts(synpic_config.PromptsSection(n_per_category=5, seed=3), grammar=True)
    assert again == prompts


def test_config_and_run_errors(tmp_path):
    with pytest.raises(ValueError, match="K >= 2"):
        synpic_config.GeneratorsSection(specs=("teacher:prism",))
    with pytest.raises(ValueError, match="num_cpus"):
        synpic_config.GeneratorsSection(num_cpus=0)
    with pytest.raises(ValueError, match="on_bad"):
        synpic_config.PromptsSection(on_bad="ignore")
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        synpic.run(_cfg(tmp_path / "o", ("teacher:prism", "teacher:quill"), rewards=("nope",)))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    cfg = _cfg(tmp_path / "o", ("teacher:prism", "teacher:quill"))
    with pytest.raises(ValueError, match="no usable prompts"):
        synpic.run(replace(cfg, prompts=_prompt_cfg(empty)))
    with pytest.raises(ValueError, match="no such file"):
        synpic.run(replace(cfg, prompts=_prompt_cfg(tmp_path / "missing.txt")))


def test_derive_seed_is_stable_and_spread():
    a = prompt_sources.derive_seed("abc", "teacher:prism")
    assert a == prompt_sources.derive_seed("abc", "teacher:prism") and 0 <= a < 2**31
    assert len({prompt_sources.derive_seed("abc", f"teacher:{t}") for t in ("prism", "quill", "vellum")}) == 3
    assert prompt_sources.derive_seed("abc", "teacher:prism", 1) != a


def test_check_resources_guards_the_two_cpu_deadlock():
    cfg = synpic_config.shapes_cpu()  # 5 generators at 0.25 CPU + 4 rewards at 0.125, label task 0.25: 2.0 CPUs
    synpic.check_resources(cfg, cpus=2, gpus=0)
    two = replace(cfg, generators=replace(cfg.generators, pool_size=2))  # 10 * 0.25 + 4 * 0.125 + 0.25 = 3.25
    with pytest.raises(ValueError, match="need 3.25 CPUs"):
        synpic.check_resources(two, cpus=2, gpus=0)
    gpu = replace(cfg, rewards=replace(cfg.rewards, num_gpus=1.0))  # 4 reward actors x 1 GPU
    with pytest.raises(ValueError, match="need 2 CPUs and 4 GPUs but the cluster has 8 CPUs and 1 GPUs"):
        synpic.check_resources(gpu, cpus=8, gpus=1)


def test_pool_sizes_widen_one_generator_pool():
    cfg = synpic_config.shapes_cpu()  # specs: 4 teachers, then checkpoint:shipped
    g = replace(cfg.generators, pool_sizes=(1, 1, 1, 1, 3))
    assert [g.pool_size_of(k) for k in range(5)] == [1, 1, 1, 1, 3]
    assert [cfg.generators.pool_size_of(k) for k in range(5)] == [1] * 5
    # 7 generator actors x 0.25 + 4 rewards x 0.125 + label 0.25 = 2.5 CPUs
    with pytest.raises(ValueError, match="need 2.5 CPUs"):
        synpic.check_resources(replace(cfg, generators=g), cpus=2, gpus=0)
    with pytest.raises(ValueError, match="one entry per spec"):
        replace(cfg.generators, pool_sizes=(2, 2))
    with pytest.raises(ValueError, match="entries must be >= 1"):
        replace(cfg.generators, pool_sizes=(1, 1, 1, 1, 0))
