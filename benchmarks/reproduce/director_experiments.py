"""EvolveDirector in the shapes world (issue 9, experiments 1 and 2).

``efficiency``: ShapesEval against teacher calls. Same start model, same SFT (LoRA rank 16, the
driver's recipe), same eval; the training sets differ:
    random     B grammar prompts (categories balanced), each rendered by a teacher picked at random
    director   an initial set of --init-per-category prompts (teachers round robin), then curation
               rounds (raypref.director.run_round: the start model draws each sampled prompt, the
               shapes judge compares it with the teacher's image, expands / deletes / mutates) until
               the teacher calls reach B; judge error rates from --judge-errors.
    The budget is teacher cost (the teachers' prices differ, 0.5 to 2 per image); calls are reported too.
    Claim to test: the director reaches the random-data score with several times fewer calls.
``teachers``: a tournament over the 4 teachers on --tournament-per-category prompts per category
    (every teacher renders every prompt, the judge keeps one image): the judge's selection rate per
    teacher and category (EvolveDirector's table), and SFT on the judge's picks against SFT on the
    best single teacher's images of the same prompts.

Every trained model's eval images are written as a shapes-eval dir. Prints the tables, writes
``results.json`` (re-running skips finished runs), ``table.md`` and PNG plots under --out.

    .venv/bin/python benchmarks/reproduce/director_experiments.py --out outputs/director_experiments \\
        --parts efficiency teachers --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Sampler, add_run_args, fmt, save_results, setup, train_lora  # noqa: E402

from raypref import curation_store, director, director_config, spend  # noqa: E402
from raypref.checkpoints import load_model  # noqa: E402
from raypref.config import merge  # noqa: E402
from raypref.generators import PipelineGenerator  # noqa: E402
from raypref.shapes.evaluate import run_eval  # noqa: E402
from raypref.shapes.grammar import CATEGORIES, all_prompts  # noqa: E402

TEACHERS = ("prism", "quill", "vellum", "zephyr")


def director_cfg(
    seed: int, error: float, init_per_category: int, init_teacher: str = "mix"
) -> director_config.DirectorConfig:
    return merge(director_config.shapes_cpu(), {
        "data": {"n_per_category": init_per_category, "init_teacher": init_teacher},
        "round": {"sample_fraction": 0.5, "n_expand": 2, "p_mutate": 0.2, "teacher_choice": "best"},
        "models": {"teachers": list(TEACHERS)},
        "judge": {"error_rate": error, "seed": seed},
        "run": {"seed": seed},
    })


def spent(teachers: dict) -> tuple[int, float]:
    """(teacher calls, teacher cost) so far; the teachers' prices differ (0.5 to 2 per image)."""
    calls_cost = [spend.generator_counters(t) for t in teachers.values()]
    return int(sum(c for c, _ in calls_cost)), float(sum(v for _, v in calls_cost))


def random_set(budget: float, seed: int) -> tuple[list[dict], dict]:
    """Random grammar prompts (categories in turn, distinct while a category has unused prompts), each
    rendered by a random teacher, until the teacher cost would pass ``budget`` -> (SFT rows, stats)."""
    rng = np.random.default_rng([seed, 77])
    teachers = director.build_teachers(director_cfg(seed, 0.0, 1))
    pools = {c: [all_prompts(c)[int(i)] for i in rng.permutation(len(all_prompts(c)))] for c in CATEGORIES}
    items, cost = [], 0.0
    while True:
        c = CATEGORIES[len(items) % len(CATEGORIES)]
        t = TEACHERS[int(rng.integers(len(TEACHERS)))]
        price = spend.unit_cost(teachers[t], 1.0)
        if cost + price > budget + 1e-9:
            break
        n_c = sum(1 for it in items if it[1] == c)
        items.append((pools[c][n_c % len(pools[c])], c, t, int(rng.integers(2**31 - 1))))
        cost += price
    images = [teachers[t].generate([p], [s])[0] for p, _, t, s in items]
    rows = curation_store.make_rows(
        [p for p, *_ in items],
        images,
        [t for _, _, t, _ in items],
        [s for *_, s in items],
        0,
        ["seed"] * len(items),
        [""] * len(items),
        [c for _, c, _, _ in items],
    )
    calls, cost = spent(teachers)
    sft = curation_store.to_sft_table(curation_store.DirectorDataset(curation_store.to_table(rows), 0, {})).to_pylist()
    return sft, {"teacher_calls": calls, "teacher_cost": cost, "judge_calls": 0, "rounds": 0, "set_size": len(sft)}


def director_set(budget: float, seed: int, error: float, base: str, args) -> tuple[list[dict], dict]:
    """Curate with the start model as the base until the teacher cost reaches ``budget`` (each round
    capped by what is left), or a round adds nothing -> (SFT rows, stats)."""
    cfg = director_cfg(seed, error, args.init_per_category)
    teachers = director.build_teachers(cfg)
    judge = cfg.judge.build()
    ds = director.build_initial_set(cfg, teachers, judge)
    gen = PipelineGenerator(base, num_inference_steps=args.sample_steps, guidance_scale=3.0)
    rounds = 0
    while spent(teachers)[1] < budget and rounds < args.max_rounds:
        before = spent(teachers)[1]
        cfg_r = merge(cfg, {"round": {"budget": float(budget - before)}})
        ds, _ = director.run_round(ds, gen, teachers, judge, cfg_r, rounds + 1)
        rounds += 1
        if spent(teachers)[1] == before:
            break  # no new teacher image this round (over budget, or nothing to expand)
    calls, cost = spent(teachers)
    stats = {"teacher_calls": calls, "teacher_cost": cost, "judge_calls": int(judge.calls), "rounds": rounds,
             "set_size": len(ds)}
    return curation_store.to_sft_table(ds).to_pylist(), stats


def sft_and_eval(rows, base, name, seed, out: Path, args) -> dict:
    t0 = time.time()
    adapter, metrics = train_lora(rows, base, {"method": "sft"}, steps=args.steps, lr=args.lr,
                                  batch_size=args.batch_size, seed=seed)
    score = run_eval(Sampler(adapter, name, args.sample_steps), args.n_per_category, args.eval_seed,
                     out / f"eval_{name}_s{seed}")
    score.update(seed_train=seed, train_seconds=time.time() - t0, rows=len(rows))
    return score


def efficiency(args, base: str, out: Path, results: dict, rpath: Path) -> None:
    for seed in args.seeds:
        for budget in args.budgets:
            key = f"random_b{budget}"
            if not any(r["seed_train"] == seed for r in results.get(key, [])):
                rows, stats = random_set(budget, seed)
                s = sft_and_eval(rows, base, key, seed, out, args)
                s.update(stats)
                results.setdefault(key, []).append(s)
                save_results(rpath, results)
                print(f"{key} seed {seed}: {s['overall']:.3f}", flush=True)
            for err in args.judge_errors:
                if err != args.judge_errors[0] and budget != max(args.budgets):
                    continue  # judge quality is compared at the largest budget only
                key = f"director_e{err:g}_b{budget}"
                if any(r["seed_train"] == seed for r in results.get(key, [])):
                    continue
                rows, stats = director_set(budget, seed, err, base, args)
                s = sft_and_eval(rows, base, key, seed, out, args)
                s.update(stats)
                results.setdefault(key, []).append(s)
                save_results(rpath, results)
                print(f"{key} seed {seed}: {s['overall']:.3f} ({stats})", flush=True)


def teachers_part(args, base: str, out: Path, results: dict, rpath: Path) -> None:
    for seed in args.seeds:
        if any(r["seed_train"] == seed for r in results.get("tournament", [])):
            continue
        cfg = director_cfg(seed, args.judge_errors[0], args.tournament_per_category, init_teacher="tournament")
        teachers = director.build_teachers(cfg)
        ds = director.build_initial_set(cfg, teachers, cfg.judge.build())
        rates = director.selection_rates(ds.stats)
        overall = {t: float(np.mean([v for v in rates.get(t, {}).values() if v == v] or [0.0])) for t in TEACHERS}
        best = max(TEACHERS, key=lambda t: overall[t])
        picked = curation_store.to_sft_table(ds).to_pylist()
        # The best single teacher's images of the same prompts (one more call each, same seeds).
        single = []
        for row in picked:
            image = teachers[best].generate([row["prompt"]], [row["seeds"][0]])[0]
            single.append({**row, "images": [curation_store.encode_png(image)], "generators": [f"teacher:{best}"]})
        s_t = sft_and_eval(picked, base, "tournament", seed, out, args)
        s_t.update(selection_rates=rates, picks=len(picked))
        s_b = sft_and_eval(single, base, "best_single", seed, out, args)
        s_b.update(teacher=best)
        results.setdefault("tournament", []).append(s_t)
        results.setdefault("best_single", []).append(s_b)
        save_results(rpath, results)
        print(f"teachers seed {seed}: tournament {s_t['overall']:.3f}, best single ({best}) {s_b['overall']:.3f}",
              flush=True)


def mean_selection_rates(results: dict, cats: list[str]) -> np.ndarray:
    """[teacher, category] selection rate of the tournaments, mean over seeds (nan: never offered)."""
    return np.array([[np.nanmean([r["selection_rates"].get(t, {}).get(c, np.nan) for r in results["tournament"]])
                      for c in cats] for t in TEACHERS])


def report(results: dict, args, out: Path) -> str:
    cats = list(results["start"][0]["categories"])
    lines = ["| training set | teacher cost | teacher calls | set size | " + " | ".join(cats) + " | overall |",
             "|---" * (len(cats) + 5) + "|"]
    order = ["start"] + sorted((k for k in results if k.startswith(("random_", "director_"))),
                               key=lambda k: (k.split("_b")[0], int(k.split("_b")[1])))
    for key in order:
        runs = results[key]
        cost = fmt([r.get("teacher_cost", 0) for r in runs]) if key != "start" else "0"
        calls = fmt([r.get("teacher_calls", 0) for r in runs]) if key != "start" else "0"
        size = fmt([r.get("rows", 0) for r in runs]) if key != "start" else "-"
        lines.append(
            f"| {key} | {cost} | {calls} | {size} | "
            + " | ".join(fmt([r["categories"][c] for r in runs]) for c in cats)
            + f" | {fmt([r['overall'] for r in runs])} |"
        )
    if "tournament" in results:
        lines += ["", "| teacher | " + " | ".join(cats) + " | mean |", "|---" * (len(cats) + 2) + "|"]
        for t, rates in zip(TEACHERS, mean_selection_rates(results, cats)):
            lines.append(f"| {t} | " + " | ".join(f"{v:.2f}" for v in rates) + f" | {np.nanmean(rates):.2f} |")
        lines += ["", "| SFT on | " + " | ".join(cats) + " | overall |", "|---" * (len(cats) + 2) + "|"]
        for key in ("start", "tournament", "best_single"):
            runs = results[key]
            label = (
                key
                if key != "best_single"
                else "best_single (" + ", ".join(sorted({r["teacher"] for r in runs})) + ")"
            )
            lines.append(f"| {label} | " + " | ".join(fmt([r["categories"][c] for r in runs]) for c in cats)
                         + f" | {fmt([r['overall'] for r in runs])} |")
    return "\n".join(lines)


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for key, runs in results.items():
        if key.startswith(("random_", "director_")):
            series.setdefault(key.split("_b")[0], []).append(
                (np.mean([r["teacher_cost"] for r in runs]), np.mean([r["overall"] for r in runs]),
                 np.std([r["overall"] for r in runs], ddof=1) if len(runs) > 1 else 0.0))
    if not series:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, pts in sorted(series.items()):
        pts.sort()
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                    label=name)
    ax.axhline(results["start"][0]["overall"], color="k", lw=0.8, ls="--", label="start")
    ax.set_xscale("log")
    ax.set_xlabel("teacher cost")
    ax.set_ylabel("ShapesEval overall")
    ax.legend(fontsize=8)
    ax.set_title("SFT data efficiency: random vs director-curated")
    fig.tight_layout()
    fig.savefig(out / "director_efficiency.png", dpi=110)
    plt.close(fig)


def plot_teachers(results: dict, out: Path) -> None:
    """Experiment 2: the judge's selection rate per teacher and category, and SFT on its picks vs the best
    single teacher."""
    if "tournament" not in results:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = list(results["start"][0]["categories"])
    rates = mean_selection_rates(results, cats)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.5), gridspec_kw={"width_ratios": [3, 2]})
    im = ax.imshow(rates, cmap="viridis", vmin=0, vmax=max(0.6, float(np.nanmax(rates))))
    ax.set_xticks(range(len(cats)), cats, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(TEACHERS)), TEACHERS)
    for (i, j), v in np.ndenumerate(rates):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.35 else "k", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.03)
    ax.set_title("judge's selection rate (picked / offered)")
    keys = ("start", "tournament", "best_single")
    vals = [[r["overall"] for r in results[k]] for k in keys]
    bx.bar(range(3), [np.mean(v) for v in vals], yerr=[np.std(v, ddof=1) if len(v) > 1 else 0 for v in vals],
           capsize=4, color=["0.6", "tab:orange", "tab:blue"])
    bx.set_xticks(range(3), ["start", "SFT on the\njudge's picks", "SFT on the best\nsingle teacher"], fontsize=8)
    bx.set_ylabel("ShapesEval overall")
    bx.set_title("same prompts, mean ± sd over seeds")
    fig.tight_layout()
    fig.savefig(out / "teacher_selection.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(ap, steps=60, lr=1e-3)
    ap.add_argument("--out", default="outputs/director_experiments")
    ap.add_argument("--parts", nargs="+", default=["efficiency", "teachers"], choices=["efficiency", "teachers"])
    ap.add_argument("--budgets", type=int, nargs="+", default=[48, 96, 192], help="teacher cost")
    ap.add_argument("--judge-errors", type=float, nargs="+", default=[0.1, 0.0, 0.3],
                    help="the first is used at every budget, the others at the largest")
    ap.add_argument("--init-per-category", type=int, default=2)
    ap.add_argument("--max-rounds", type=int, default=12)
    ap.add_argument("--tournament-per-category", type=int, default=10)
    args = ap.parse_args(argv)

    out, base, rpath, results = setup(args, ignore=("parts", "budgets"))  # run keys name their budget
    t0 = time.time()
    if "start" not in results:
        results["start"] = [run_eval(Sampler(load_model(base), "start", args.sample_steps), args.n_per_category,
                                     args.eval_seed, out / "eval_start")]
        save_results(rpath, results)
    if "efficiency" in args.parts:
        efficiency(args, base, out, results, rpath)
    if "teachers" in args.parts:
        teachers_part(args, base, out, results, rpath)
    md = (f"start {args.model}; SFT {args.steps} steps, LoRA rank 16, lr {args.lr}, batch {args.batch_size}; "
          f"seeds {args.seeds}; ShapesEval {args.n_per_category} per category, eval seed {args.eval_seed}; "
          f"{time.time() - t0:.0f} s\n\n" + report(results, args, out))
    print(md)
    (out / "table.md").write_text(md + "\n")
    plot(results, out)
    plot_teachers(results, out)
    return results


if __name__ == "__main__":
    main()
