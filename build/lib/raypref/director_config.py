"""The EvolveDirector curation config (``raypref.director``): sections, validation, the shapes preset."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from raypref.config import check
from raypref.judges import JudgeSection

TEACHER_CHOICES = ("best", "round_robin", "tournament")


@dataclass(frozen=True)
class DataSection:
    directory: str = "~/raypref_runs/director/shapes"
    n_per_category: int = field(default=32, metadata={"help": "initial set: prompts per shapes category"})
    init_teacher: str = field(
        default="tournament", metadata={"help": 'a teacher name, "mix" (round robin) or "tournament"'}
    )
    image_size: int = 32

    def __post_init__(self):
        check(bool(self.directory), "data.directory must not be empty")
        check(self.n_per_category >= 1, f"data.n_per_category must be >= 1, got {self.n_per_category}")
        check(self.image_size >= 8, f"data.image_size must be >= 8, got {self.image_size}")


@dataclass(frozen=True)
class RoundSection:
    rounds: int = 10
    sample_fraction: float = field(default=0.25, metadata={"help": "of the set, per round"})
    n_expand: int = field(default=2, metadata={"help": "new prompts per sample the teacher wins"})
    p_mutate: float = field(default=0.2, metadata={"help": "probability of a mutation per deleted sample"})
    teacher_choice: str = field(
        default="best", metadata={"help": "who renders a mutated prompt: best | round_robin | tournament"}
    )
    dedup: bool = field(default=True, metadata={"help": "skip new prompts already in the set"})
    max_size: int = field(default=0, metadata={"help": "stop adding once the set has this many samples (0 = no cap)"})
    budget: float = field(default=0.0, metadata={"help": "teacher cost allowed per round (0 = no cap)"})
    batch_size: int = field(default=64, metadata={"help": "prompts per generate() call"})

    def __post_init__(self):
        check(self.rounds >= 1, f"round.rounds must be >= 1, got {self.rounds}")
        check(0 < self.sample_fraction <= 1, f"round.sample_fraction must be in (0, 1], got {self.sample_fraction}")
        check(self.n_expand >= 0, f"round.n_expand must be >= 0, got {self.n_expand}")
        check(0 <= self.p_mutate <= 1, f"round.p_mutate must be in [0, 1], got {self.p_mutate}")
        check(self.teacher_choice in TEACHER_CHOICES,
              f"round.teacher_choice must be one of {TEACHER_CHOICES}, got {self.teacher_choice!r}")
        check(self.max_size >= 0, f"round.max_size must be >= 0, got {self.max_size}")
        check(self.budget >= 0 and math.isfinite(self.budget), f"round.budget must be >= 0, got {self.budget}")
        check(self.batch_size >= 1, f"round.batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class ModelsSection:
    teachers: tuple[str, ...] = field(
        default=("prism", "quill", "vellum", "zephyr"), metadata={"help": "shapes teacher names or generator specs"}
    )
    base: str = field(default="checkpoint:shipped", metadata={"help": "generator spec of the base model"})
    base_steps: int = 30
    base_guidance: float = 3.0
    default_teacher_cost: float = field(default=1.0, metadata={"help": "cost per image of a generator that "
                                                                       "does not report its own"})

    def __post_init__(self):
        from raypref.shapes.teachers import PROFILES

        check(len(self.teachers) >= 1, "models.teachers must name at least one teacher")
        check(len(set(self.teachers)) == len(self.teachers), f"models.teachers has duplicates: {self.teachers}")
        for t in self.teachers:
            check(":" in t or t in PROFILES, f"unknown teacher {t!r} in models.teachers; known shapes teachers: "
                                             f"{', '.join(PROFILES)} (or a generator spec 'teacher:'/'checkpoint:')")
        check(bool(self.base), "models.base must not be empty")
        check(self.base_steps >= 1, f"models.base_steps must be >= 1, got {self.base_steps}")
        check(self.default_teacher_cost >= 0,
              f"models.default_teacher_cost must be >= 0, got {self.default_teacher_cost}")


@dataclass(frozen=True)
class RunSection:
    name: str = "director-shapes"
    seed: int = 0

    def __post_init__(self):
        check(bool(self.name), "run.name must not be empty")


@dataclass(frozen=True)
class DirectorConfig:
    data: DataSection = field(default_factory=DataSection)
    round: RoundSection = field(default_factory=RoundSection)
    models: ModelsSection = field(default_factory=ModelsSection)
    judge: JudgeSection = field(default_factory=lambda: JudgeSection(error_rate=0.1))  # a weak simulated VLM
    run: RunSection = field(default_factory=RunSection)

    def __post_init__(self):
        init = self.data.init_teacher
        check(init in ("mix", "tournament") or init in self.models.teachers,
              f"data.init_teacher must be 'mix', 'tournament' or one of models.teachers {self.models.teachers}, "
              f"got {init!r}")


def shapes_cpu() -> DirectorConfig:
    """The shapes world on a CPU: four teachers with different strengths, the shipped base model."""
    return DirectorConfig()
