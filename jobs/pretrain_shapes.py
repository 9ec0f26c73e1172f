"""Pretrain the shapes base model with Ray Train: the VAE, then the latent UNet (flow matching).

    python jobs/pretrain_shapes.py                       # the 8 x 8 recipe (preset shapes_cpu)
    python jobs/pretrain_shapes.py model.size=tiny data.pool_size=256 run.storage_path=/tmp/runs
    ray job submit --working-dir . -- python jobs/pretrain_shapes.py --config my.yaml optim.lr=3e-4

Re-running with the same run.name and run.storage_path resumes from the latest checkpoint of
each stage (a finished VAE stage is not redone).
"""

from __future__ import annotations

import json
import os
import sys

import ray

from raypref.config import job_parser, load_config, to_dict
from raypref.pretrain import pretrain
from raypref.pretrain_config import PRESETS

if __name__ == "__main__":
    args = job_parser(__doc__, PRESETS).parse_args(sys.argv[1:])
    cfg = load_config(PRESETS[args.preset](), args.config, args.overrides)
    print(json.dumps(to_dict(cfg), indent=1))
    ray.init(address=os.environ.get("RAY_ADDRESS"))  # a running cluster if any, else a local one
    print(json.dumps(pretrain(cfg), indent=1, default=str))
