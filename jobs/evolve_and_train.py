"""Self-evolving rounds: director curation -> SFT -> Syn-Pic / OSPO preferences -> DPO -> ShapesEval.

    python jobs/evolve_and_train.py                                   # preset shapes_cpu, a local Ray
    python jobs/evolve_and_train.py --config tiny.yaml model.base=/tmp/tiny run.output_dir=/tmp/ev
    python jobs/evolve_and_train.py prefs.source=ospo train.loss.method=dpo run.rounds=2
    python jobs/evolve_and_train.py train.loss.method=rankdpo                 # Syn-Pic ranking
    python jobs/evolve_and_train.py train.loss.method=balanced                # BalancedDPO consensus pairs
    ray job submit --working-dir . -- python jobs/evolve_and_train.py --config evolve.yaml

Config: preset -> YAML (--config) -> section.key=value overrides (see raypref/evolve.py: sections
run, model, director, judge_serve, sft, prefs, synpic, ospo, train, eval). With RAY_ADDRESS set (as
``ray job submit`` does) it joins that cluster and uses its resources; otherwise it starts a local
Ray with run.num_cpus logical CPUs. Re-running with the same run.output_dir resumes after the last
finished round (round-NNN/manifest.json) and skips the finished stages of an interrupted round.
Writes run.output_dir/report.md after every round.
"""

import sys

from raypref.evolve import main

if __name__ == "__main__":
    main(sys.argv[1:])
