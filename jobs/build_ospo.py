"""Build OSPO preference pairs (raypref.ospo) - or the naive-pairs baseline - and optionally run
self-improving rounds (build -> DPO -> the trained model builds the next round's pairs).

    python jobs/build_ospo.py                                   # preset shapes_cpu: shipped base model
    python jobs/build_ospo.py prompts.per_category=2 run.output=/tmp/ospo.parquet
    python jobs/build_ospo.py run.mode=naive run.output=/tmp/naive.parquet       # the comparison
    python jobs/build_ospo.py run.rounds=2 --train-preset shapes_cpu --train-method dpo
    ray job submit --working-dir . -- python jobs/build_ospo.py --config my.yaml run.use_ray=always

Config: preset -> YAML (--config) -> section.key=value overrides. Rendering and VQA run in Ray Data
(``map_batches`` with fixed actor pools and fractional CPUs) when there are at least
``run.ray_min_images`` images (or ``run.use_ray=always``), plainly otherwise; both give the same
rows. Writes ``run.output`` (Parquet, raypref.prefdata layout), ``<output>.records.jsonl`` (one
record per perturbation: base, perturbed, operation, binding, kept slot, drop reasons) and
``<output>.summary.json`` (counts per operation, filtered-out counts with reasons).

Rounds: round r's rows go to ``<output stem>.round{r}.parquet``; ``raypref.train``'s trainer
trains on them (LoRA by default, folded into a full pipeline; or full fine-tuning with
``--train-override model.lora=false``) and writes ``<output dir>/ospo_round{r}_model``, which
generates round r + 1.
"""

import sys

from raypref.ospo import main

if __name__ == "__main__":
    main(sys.argv[1:], __doc__)
