"""The report of an evolve run: ``write_report(run_dir)`` -> ``run_dir/report.md`` and PNGs.

Reads only what the rounds wrote (``round-NNN/manifest.json`` and ``round-NNN/eval/samples/``), so
it can be rebuilt at any time (``python -m raypref.report RUN_DIR``):

    report.md            tables of every manifest's figures, links to the plots
    samples_grid.png     one row per round: the same prompts and seeds, from each round's checkpoint
    shapes_eval.png      ShapesEval overall and per category, per round
    rewards.png          mean rewards of the eval images (and of the Syn-Pic images), per round
    losses.png           final SFT and preference losses, per round
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from raypref.files import atomic_write

PLOTS = ("samples_grid.png", "shapes_eval.png", "rewards.png", "losses.png")


def load_manifests(run_dir) -> list[dict]:
    out = []
    for p in sorted(Path(run_dir).glob("round-*/manifest.json")):
        m = json.loads(p.read_text())
        m["_dir"] = str(p.parent)
        out.append(m)
    return sorted(out, key=lambda m: m["round"])


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, bbox_inches="tight"))


def plot_samples(manifests: list[dict], path: Path) -> bool:
    """One row per round, one column per fixed prompt; False if no round has samples."""
    from raypref.prefdata import decode_png

    rows = []
    for m in manifests:
        f = Path(m["_dir"]) / "eval" / "samples.json"
        if f.exists():
            samples = json.loads(f.read_text())
            rows.append((m["round"], samples, [decode_png((f.parent / s["image"]).read_bytes()) for s in samples]))
    if not rows:
        return False
    plt = _plt()
    cols = max(len(r[1]) for r in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.6 * cols, 1.7 * len(rows) + 0.4), squeeze=False)
    for i, (rnd, samples, images) in enumerate(rows):
        for j in range(cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(images):
                ax.imshow(images[j], interpolation="nearest")
                if i == 0:
                    ax.set_title(samples[j]["prompt"], fontsize=6, wrap=True)
            if j == 0:
                ax.set_ylabel(f"round {rnd}", fontsize=8)
    fig.suptitle("same prompts and seeds, each round's checkpoint", fontsize=9)
    _save(fig, path)
    plt.close(fig)
    return True


def plot_series(x, series: dict, title: str, ylabel: str, path: Path) -> bool:
    """Lines of {label: [value or None per x]}; False when there is nothing to draw."""
    series = {k: v for k, v in series.items() if any(y is not None for y in v)}
    if not series:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, ys in series.items():
        pts = [(a, b) for a, b in zip(x, ys) if b is not None]
        ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", label=label,
                linewidth=2.5 if label == "overall" else 1.2)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_xticks(list(x))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    _save(fig, path)
    plt.close(fig)
    return True


def overall_se(categories: dict[str, float], n: int) -> float | None:
    """Standard error of ShapesEval overall (the mean of the category pass rates, each over
    ``n / len(categories)`` images, binomial): how far two rounds must differ to mean anything."""
    if not categories or not n:
        return None
    per = n / len(categories)
    return float(np.sqrt(sum(p * (1 - p) / per for p in categories.values())) / len(categories))


def best_round(manifests: list[dict]) -> dict | None:
    """The manifest with the highest ShapesEval overall (the earliest on ties), or None."""
    scored = [m for m in manifests if m["scores"].get("overall") is not None]
    return max(scored, key=lambda m: (m["scores"]["overall"], -m["round"])) if scored else None


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(run_dir) -> Path:
    """Write ``run_dir/report.md`` and its PNGs from the manifests found there."""
    run_dir = Path(run_dir)
    ms = load_manifests(run_dir)
    x = [m["round"] for m in ms]
    cats = sorted({c for m in ms for c in (m["scores"].get("categories") or {})})
    made = {}
    made["samples_grid.png"] = plot_samples(ms, run_dir / "samples_grid.png")
    made["shapes_eval.png"] = plot_series(
        x, {"overall": [m["scores"].get("overall") for m in ms],
            **{c: [(m["scores"].get("categories") or {}).get(c) for m in ms] for c in cats}},
        "ShapesEval per round", "score", run_dir / "shapes_eval.png")
    reward_keys = sorted({f"{src}:{k}" for m in ms for src in ("eval", "prefs")
                          for k in (m.get("mean_rewards", {}).get(src) or {})})
    made["rewards.png"] = plot_series(
        x, {k: [(m.get("mean_rewards", {}).get(k.split(":")[0]) or {}).get(k.split(":", 1)[1]) for m in ms]
            for k in reward_keys}, "mean reward per round", "reward", run_dir / "rewards.png")
    made["losses.png"] = plot_series(
        x, {"sft": [m.get("losses", {}).get("sft") for m in ms], "preference": [m.get("losses", {}).get("pref")
                                                                               for m in ms]},
        "final training loss per round", "loss", run_dir / "losses.png")

    md = [f"# Evolve run `{run_dir.name}`", "",
          f"{len(ms)} finished round(s); round 0 is the starting checkpoint. Rebuild with "
          f"`python -m raypref.report {run_dir}`.", ""]
    if ms:
        md += ["## ShapesEval", "", _table(["round", "overall", "± se", *cats, "checkpoint"], [
            [m["round"], m["scores"].get("overall"),
             overall_se(m["scores"].get("categories") or {}, m["counts"].get("eval_images", 0)),
             *[(m["scores"].get("categories") or {}).get(c) for c in cats], f"`{m['checkpoint']}`"] for m in ms]), ""]
        best = best_round(ms)
        if best is not None:  # what to serve; chosen on this eval set, so its score is optimistic
            md += [f"Best measured round: {best['round']} (ShapesEval {_fmt(best['scores']['overall'])}), "
                   f"checkpoint `{best['checkpoint']}`. It is chosen on the same eval set, so its score is an "
                   "optimistic estimate; differences within about two standard errors are noise.", ""]
        shapes = sorted({k for m in ms for k in (m["scores"].get("shapes") or {})})
        if shapes:  # which shapes the model draws at all: a shape it cannot draw fails every category naming it
            md += ["Shape drawn, of the eval prompts naming it:", "", _table(["round", *shapes], [
                [m["round"], *[(m["scores"].get("shapes") or {}).get(k) for k in shapes]] for m in ms]), ""]
        md += ["## Data, calls and cost", "", _table(
            ["round", "director set", "sampled", "SFT rows", "pref rows", "pref pairs", "teacher calls",
             "judge calls", "cost"],
            [[m["round"], m["counts"].get("director_set"), m["counts"].get("director_sampled"),
              m["counts"].get("sft_rows"), m["counts"].get("pref_rows"), m["counts"].get("pref_pairs"),
              m.get("teacher_calls_total"), m.get("judge_calls"), m.get("cost_total")] for m in ms]), ""]
        teachers = sorted({t for m in ms for t in m.get("teacher_calls", {})})
        if teachers:
            md += ["### Teacher calls (cost)", "", _table(["round", *teachers], [
                [m["round"], *[f"{m['teacher_calls'].get(t, 0)} ({_fmt(m['teacher_cost'].get(t, 0.0))})"
                               for t in teachers]] for m in ms]), ""]
        decisions = sorted({d for m in ms for d in (m["counts"].get("director_decisions") or {})})
        if decisions:
            md += ["### Director decisions", "", _table(["round", *decisions], [
                [m["round"], *[(m["counts"].get("director_decisions") or {}).get(d, 0) for d in decisions]]
                for m in ms if m["round"] > 0]), ""]
        md += ["## Rewards and losses", "", _table(["round", *reward_keys, "SFT loss", "pref loss"], [
            [m["round"], *[(m.get("mean_rewards", {}).get(k.split(":")[0]) or {}).get(k.split(":", 1)[1])
                           for k in reward_keys], m.get("losses", {}).get("sft"), m.get("losses", {}).get("pref")]
            for m in ms]), ""]
        stages = [s for s in ("director", "sft", "prefs", "train", "eval")
                  if any(s in m.get("stage_seconds", {}) for m in ms)]
        md += ["## Stage wall times (s)", "", _table(["round", *stages, "total"], [
            [m["round"], *[m["stage_seconds"].get(s) for s in stages], sum(m["stage_seconds"].values())]
            for m in ms]), ""]
    titles = {"samples_grid.png": "Samples per round", "shapes_eval.png": "ShapesEval",
              "rewards.png": "Mean rewards", "losses.png": "Losses"}
    md += ["## Plots", ""]
    for name in PLOTS:
        if made[name]:
            md += [f"### {titles[name]}", "", f"![{titles[name]}]({name})", ""]
    return atomic_write(run_dir / "report.md", "\n".join(md))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m raypref.report RUN_DIR")
    print(write_report(sys.argv[1]))
