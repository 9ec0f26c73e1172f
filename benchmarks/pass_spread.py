"""Are a model's failures systematic or chance? Passes out of K own samples per training prompt.

For each category, ``--prompts`` training prompts (seeded apart from ShapesEval's), ``--k`` samples
each (different seeds); prints, split by whether the prompt names ``--shape``, how many of the K
samples pass. A prompt that fails in all K gives on-policy DPO no pair; one that passes sometimes does.

    .venv/bin/python benchmarks/pass_spread.py --model shipped --k 8 --prompts 12
"""

from __future__ import annotations

import argparse

from movability import own_samples  # benchmarks/, the script's own directory
from common import names  # benchmarks/reproduce, which importing movability puts on sys.path

from raypref.checkpoints import resolve_checkpoint
from raypref.generators import PipelineGenerator
from raypref.shapes.grammar import CATEGORIES, sample_prompts


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shipped", help="'shipped' or a pipeline dir")
    ap.add_argument("--k", type=int, default=8, help="own samples per prompt")
    ap.add_argument("--prompts", type=int, default=12, help="training prompts per category")
    ap.add_argument("--shape", default="square", help="split prompts by whether they name this word")
    ap.add_argument("--sample-steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    gen = PipelineGenerator(str(resolve_checkpoint(args.model)), num_inference_steps=args.sample_steps,
                            guidance_scale=3.0)
    out: dict[tuple[str, bool], list[int]] = {}
    for ci, c in enumerate(CATEGORIES):
        ps = sample_prompts(c, args.prompts, 4242)
        prompts = [p for p in ps for _ in range(args.k)]
        seeds = [800_000_000 + ci * 100_000 + j * 100 + k for j in range(len(ps)) for k in range(args.k)]
        _, scores = own_samples(gen, prompts, seeds)
        passed = (scores == 1.0).reshape(len(ps), args.k)
        for p, row in zip(ps, passed):
            out.setdefault((c, names(p, args.shape)), []).append(int(row.sum()))
    print(f"| category | prompts naming a {args.shape} (passes of {args.k}) | prompts naming none |")
    print("|---|---|---|")
    for c in CATEGORIES:
        cells = [", ".join(map(str, sorted(out.get((c, named), [])))) or "-" for named in (True, False)]
        print(f"| {c} | {cells[0]} | {cells[1]} |")
    return out


if __name__ == "__main__":
    main()
