"""The Syn-Pic job's config (``raypref.synpic``): prompts, generators, rewards, run; the CPU preset."""

from __future__ import annotations

from dataclasses import dataclass, field

from raypref.config import check


@dataclass(frozen=True)
class PromptsSection:
    source: str = field(
        default="shapes",
        metadata={"help": '"shapes" (the grammar), a .txt file (one prompt a line) or a .parquet file'},
    )
    column: str = field(default="prompt", metadata={"help": "Parquet column holding the prompts"})
    n_per_category: int = field(
        default=50, metadata={"help": "shapes: distinct prompts per category (capped at the category's size)"}
    )
    seed: int = field(default=0, metadata={"help": "shapes: which prompts are drawn"})
    max_chars: int = 300
    grammar: str = field(
        default="auto",
        metadata={"help": "auto: check the shapes grammar when a shapes generator/reward is used | shapes | none"},
    )
    on_bad: str = field(
        default="skip", metadata={"help": "skip (counted in the summary) | error (ValueError at the first bad prompt)"}
    )

    def __post_init__(self):
        check(bool(self.source), "prompts.source must not be empty")
        check(self.n_per_category >= 1, f"prompts.n_per_category must be >= 1, got {self.n_per_category}")
        check(self.max_chars >= 1, f"prompts.max_chars must be >= 1, got {self.max_chars}")
        check(self.grammar in ("auto", "shapes", "none"),
              f"prompts.grammar must be auto|shapes|none, got {self.grammar!r}")
        check(self.on_bad in ("skip", "error"), f"prompts.on_bad must be skip|error, got {self.on_bad!r}")


@dataclass(frozen=True)
class GeneratorsSection:
    specs: tuple[str, ...] = (
        "teacher:prism", "teacher:quill", "teacher:vellum", "teacher:zephyr", "checkpoint:shipped",
    )
    image_size: int = field(
        default=32, metadata={"help": "teachers' render size (checkpoints sample at their own resolution)"}
    )
    num_inference_steps: int = 30
    guidance_scale: float = 3.0
    seed: int = field(default=0, metadata={"help": "mixed into every per-(prompt, generator) seed"})
    pool_size: int = field(default=1, metadata={"help": "actors per generator"})
    # Per-generator actor counts aligned with ``specs`` (empty: ``pool_size`` for each). The model
    # generators cost ~100x a procedural teacher per image, so only their pools are worth widening.
    pool_sizes: tuple[int, ...] = ()
    num_cpus: float = field(
        default=0.25,
        metadata={"help": "per actor; fractional so actor pools never take every CPU (the 2-CPU deadlock)"},
    )
    num_gpus: float = field(default=0.0, metadata={"help": "per actor (> 0 puts checkpoints on cuda)"})
    batch_size: int = 16

    def __post_init__(self):
        check(len(self.specs) >= 2, f"generators.specs needs K >= 2 generators to rank, got {list(self.specs)}")
        check(len(set(self.specs)) == len(self.specs), f"generators.specs has duplicates: {list(self.specs)}")
        for s in self.specs:
            kind, _, arg = s.partition(":")
            check(bool(kind) and bool(arg),
                  f"generator spec {s!r} must look like KIND:ARG (teacher:NAME, checkpoint:PATH)")
        check(self.image_size >= 8, f"generators.image_size must be >= 8, got {self.image_size}")
        check(self.num_inference_steps >= 1,
              f"generators.num_inference_steps must be >= 1, got {self.num_inference_steps}")
        _check_pool("generators", self.pool_size, self.num_cpus, self.num_gpus, self.batch_size)
        check(not self.pool_sizes or len(self.pool_sizes) == len(self.specs),
              f"generators.pool_sizes needs one entry per spec ({len(self.specs)}), got {list(self.pool_sizes)}")
        check(all(int(n) >= 1 for n in self.pool_sizes),
              f"generators.pool_sizes entries must be >= 1, got {list(self.pool_sizes)}")

    def pool_size_of(self, k: int) -> int:
        """Actors for generator ``specs[k]``."""
        return int(self.pool_sizes[k]) if self.pool_sizes else self.pool_size


@dataclass(frozen=True)
class RewardsSection:
    specs: tuple[str, ...] = field(
        default=("faithfulness", "aesthetic"),
        metadata={"help": "KEY or KEY:MODEL_PATH, KEY in raypref.rewards.REWARDS"},
    )
    pool_size: int = 1
    num_cpus: float = 0.25
    num_gpus: float = 0.0
    batch_size: int = 16

    def __post_init__(self):
        check(len(self.specs) >= 1, "rewards.specs needs at least one reward")
        keys = [s.partition(":")[0] for s in self.specs]
        check(len(set(keys)) == len(keys), f"rewards.specs has duplicate keys: {keys}")
        for k in keys:
            check(k.isidentifier(), f"reward key {k!r} must be an identifier (it names the column score_<key>)")
        _check_pool("rewards", self.pool_size, self.num_cpus, self.num_gpus, self.batch_size)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(s.partition(":")[0] for s in self.specs)


@dataclass(frozen=True)
class RunSection:
    output_dir: str = "~/raypref_runs/synpic-shapes"
    chunk_size: int = field(default=256, metadata={"help": "prompts per committed chunk"})
    # Chunks per Ray Data execution (0: all pending in one stream). A driver crash loses at most this
    # many chunks of uncommitted work; more amortises actor start-up and keeps pools busy across chunks.
    window_chunks: int = 1
    max_chunks: int = field(
        default=0, metadata={"help": "commit at most this many new chunks, then stop (0: all); staged runs"}
    )
    label_num_cpus: float = 0.25
    # A dead generator/reward actor is restarted, and its batch retried, this often. -1 keeps Ray
    # Data's own default (restart and retry without limit); Ray 2.60 takes these only through the
    # deprecated **ray_remote_args, so they are passed only when set.
    max_restarts: int = -1
    max_task_retries: int = -1
    progress: bool = True
    check_resources: bool = field(
        default=True, metadata={"help": "refuse pools that cannot all fit the cluster (see check_resources)"}
    )
    # "pools": one actor pool per generator and per reward, each sized and placed on its own (a GPU
    # cluster: a model per GPU, a paid API teacher with its own concurrency). "fused": one pool of
    # generators.pool_size actors (generators.num_cpus / num_gpus each), every actor running all K
    # generators then all n rewards on its batch; on one small machine this starts 1 process per
    # actor instead of K + n, each importing its own copy of torch/diffusers, and hands no batch
    # between stages.
    layout: str = "pools"

    def __post_init__(self):
        check(bool(self.output_dir), "run.output_dir must not be empty")
        check(self.chunk_size >= 1, f"run.chunk_size must be >= 1, got {self.chunk_size}")
        check(self.window_chunks >= 0 and self.max_chunks >= 0, "run.window_chunks and run.max_chunks must be >= 0")
        check(self.label_num_cpus > 0, f"run.label_num_cpus must be > 0, got {self.label_num_cpus}")
        check(self.max_restarts >= -1 and self.max_task_retries >= -1,
              "run.max_restarts and run.max_task_retries must be >= -1 (-1: Ray Data's default)")
        check(self.layout in ("pools", "fused"), f"run.layout must be pools|fused, got {self.layout!r}")


@dataclass(frozen=True)
class SynPicConfig:
    prompts: PromptsSection = field(default_factory=PromptsSection)
    generators: GeneratorsSection = field(default_factory=GeneratorsSection)
    rewards: RewardsSection = field(default_factory=RewardsSection)
    run: RunSection = field(default_factory=RunSection)

    def __post_init__(self):
        check(self.run.layout == "pools" or not self.generators.pool_sizes,
              "generators.pool_sizes sizes per-generator pools (run.layout=pools); run.layout=fused has one "
              "pool of generators.pool_size actors")


def _check_pool(section, pool_size, num_cpus, num_gpus, batch_size):
    check(pool_size >= 1, f"{section}.pool_size must be >= 1, got {pool_size}")
    check(num_cpus > 0, f"{section}.num_cpus must be > 0, got {num_cpus}")
    check(num_gpus >= 0, f"{section}.num_gpus must be >= 0, got {num_gpus}")
    check(batch_size >= 1, f"{section}.batch_size must be >= 1, got {batch_size}")


def shapes_cpu() -> SynPicConfig:
    """The shapes Syn-Pic set on a CPU box: 4 paid teachers + the shipped base model, n = 4 rewards that
    disagree somewhat (detector faithfulness, analytic aesthetic, a VQA judge wrong 10 % of the time,
    the shipped shapes CLIP). 5 generator + 4 reward actors + the label task fit 2 CPUs."""
    return SynPicConfig(rewards=RewardsSection(specs=("faithfulness", "aesthetic", "vqa", "clip:shipped"),
                                               num_cpus=0.125))


PRESETS = {"shapes_cpu": shapes_cpu}
