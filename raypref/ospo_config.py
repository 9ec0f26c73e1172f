"""OSPO's job config: sections, validation and presets (``raypref.ospo`` runs it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from raypref.config import check
from raypref.judges import JudgeSection
from raypref.perturbation import ALL_OPERATIONS, DENSE_TEMPLATE, DENSIFY_MODES, OPERATIONS


@dataclass(frozen=True)
class PromptSection:
    source: str = field(default="grammar", metadata={"help": "grammar | file | llm"})
    path: str = field(default="", metadata={"help": "source=file: one prompt per line"})
    categories: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
    per_category: int = 16
    seed: int = 0

    def __post_init__(self):
        check(self.source in ("grammar", "file", "llm"),
              f"prompts.source must be grammar|file|llm, got {self.source!r}")
        check(self.source != "file" or bool(self.path), "prompts.source=file needs prompts.path")
        check(self.per_category >= 1, f"prompts.per_category must be >= 1, got {self.per_category}")
        bad = [c for c in self.categories if c not in OPERATIONS]
        check(not bad, f"prompts.categories: unknown {bad}; known: {', '.join(OPERATIONS)}")


@dataclass(frozen=True)
class PerturbSection:
    per_prompt: int = field(default=2, metadata={"help": "M perturbed prompts per base prompt"})
    operations: tuple[str, ...] = field(default=ALL_OPERATIONS, metadata={"help": "allowed operations"})
    seed: int = 0

    def __post_init__(self):
        check(self.per_prompt >= 1, f"perturb.per_prompt must be >= 1, got {self.per_prompt}")
        bad = [o for o in self.operations if o not in ALL_OPERATIONS]
        check(not bad and len(self.operations) >= 1,
              f"perturb.operations: unknown {bad or 'none given'}; known: {', '.join(ALL_OPERATIONS)}")


@dataclass(frozen=True)
class DensifySection:
    mode: str = field(
        default="off", metadata={"help": "off | record (dense text kept as metadata) | condition (real models only)"}
    )
    template: str = DENSE_TEMPLATE

    def __post_init__(self):
        check(self.mode in DENSIFY_MODES, f"densify.mode must be one of {DENSIFY_MODES}, got {self.mode!r}")
        check("{prompt}" in self.template, f"densify.template must contain '{{prompt}}', got {self.template!r}")


@dataclass(frozen=True)
class GenerateSection:
    generator: str = field(default="checkpoint:shipped", metadata={"help": "a raypref.generators spec"})
    slots: int = field(default=4, metadata={"help": "seeds per prompt; base and perturbed share each seed"})
    seed: int = 0
    num_inference_steps: int = field(default=30, metadata={"help": "checkpoint generators only"})
    guidance_scale: float = 3.0

    def __post_init__(self):
        check(":" in self.generator, f"generate.generator must be a spec like teacher:NAME, got {self.generator!r}")
        check(self.slots >= 1, f"generate.slots must be >= 1, got {self.slots}")
        check(self.num_inference_steps >= 1,
              f"generate.num_inference_steps must be >= 1, got {self.num_inference_steps}")


@dataclass(frozen=True)
class FilterSection:
    min_chosen_score: float = field(default=0.6, metadata={"help": "S = mean(p(yes) - p(no)) of the chosen image"})
    yes_threshold: float = field(default=0.5, metadata={"help": "p(yes) above this is a \"yes\""})

    def __post_init__(self):
        check(-1.0 <= self.min_chosen_score <= 1.0,
              f"filter.min_chosen_score must be in [-1, 1], got {self.min_chosen_score}")
        check(0.0 <= self.yes_threshold < 1.0, f"filter.yes_threshold must be in [0, 1), got {self.yes_threshold}")


@dataclass(frozen=True)
class RunSection:
    output: str = "~/raypref_runs/prefs/ospo.parquet"
    mode: str = field(default="ospo", metadata={"help": "ospo | naive (two random samples per prompt ranked by VQA)"})
    use_ray: str = field(
        default="auto", metadata={"help": "auto (Ray when there are >= ray_min_images images) | always | never"}
    )
    ray_min_images: int = 256
    num_actors: int = 2
    cpus_per_actor: float = 0.5
    batch_size: int = 32
    rounds: int = field(default=1, metadata={"help": "self-improvement rounds (the job trains between rounds)"})
    round_index: int = field(default=0, metadata={"help": "mixed into the seeds, so every round samples fresh images"})

    def __post_init__(self):
        check(bool(self.output), "run.output must not be empty")
        check(self.mode in ("ospo", "naive"), f"run.mode must be ospo|naive, got {self.mode!r}")
        check(self.use_ray in ("auto", "always", "never"),
              f"run.use_ray must be auto|always|never, got {self.use_ray!r}")
        check(self.num_actors >= 1 and self.batch_size >= 1, "run.num_actors and run.batch_size must be >= 1")
        check(self.cpus_per_actor > 0, f"run.cpus_per_actor must be > 0, got {self.cpus_per_actor}")
        check(self.rounds >= 1 and self.round_index >= 0, "run.rounds must be >= 1 and run.round_index >= 0")


@dataclass(frozen=True)
class OSPOConfig:
    prompts: PromptSection = field(default_factory=PromptSection)
    perturb: PerturbSection = field(default_factory=PerturbSection)
    densify: DensifySection = field(default_factory=DensifySection)
    generate: GenerateSection = field(default_factory=GenerateSection)
    judge: JudgeSection = field(default_factory=JudgeSection)
    filter: FilterSection = field(default_factory=FilterSection)
    run: RunSection = field(default_factory=RunSection)


def shapes_cpu() -> OSPOConfig:
    """The shapes recipe on a 2-core CPU: the shipped base model, 16 prompts x 6 categories, M = 2,
    4 seeds per prompt (288 pairs before filtering), the analytic judge."""
    return OSPOConfig()


PRESETS = {"shapes_cpu": shapes_cpu}
