"""Build (or resume) a Syn-Pic preference dataset with Ray Data (RankDPO's recipe, no human labels).

    python jobs/build_synpic.py                                  # preset shapes_cpu: 4 teachers + shipped base
    python jobs/build_synpic.py prompts.n_per_category=2 run.output_dir=/tmp/synpic \
        "generators.specs=[teacher:prism,teacher:quill]"
    python jobs/build_synpic.py prompts.source=prompts.txt run.output_dir=/data/synpic run.chunk_size=512
    ray job submit --working-dir . -- python jobs/build_synpic.py --config synpic.yaml

Re-running with the same run.output_dir skips every committed chunk (no generator is called again
for them) and finishes the rest. Output: DIR/data/*.parquet (prefdata.SCHEMA), DIR/pickapic/*.parquet
(caption, jpg_0, jpg_1, label_0) and DIR/summary.json.
"""

import sys

from raypref.synpic import main

if __name__ == "__main__":
    main(sys.argv[1:], __doc__)
