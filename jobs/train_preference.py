"""Preference-train a diffusion model with Ray Train: Diffusion-DPO, RankDPO, BalancedDPO or SFT.

    python jobs/train_preference.py --method dpo                      # preset shapes_cpu (LoRA DPO)
    python jobs/train_preference.py --method rankdpo loss.rank_weights=gain data.path=/data/prefs.parquet
    python jobs/train_preference.py --method balanced loss.ref_refresh_every=100 model.lora=false
    ray job submit --working-dir . -- python jobs/train_preference.py --preset sdxl_8xh100 --config my.yaml

Config: preset -> YAML (--config) -> --method -> section.key=value overrides. The data is the
preference Parquet of ``raypref.prefdata`` (one row per prompt, K images), read with
``ray.data.read_parquet`` and split over workers by Ray Train. Re-running with the same
run.name and run.storage_path resumes from the latest checkpoint.
"""

import sys

from raypref.train import main

if __name__ == "__main__":
    main(sys.argv[1:], __doc__)
