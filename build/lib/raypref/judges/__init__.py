"""The VLM judge ("director" of EvolveDirector, arXiv 2410.07133): decides, sample by sample, which
image follows its prompt best, expands and mutates prompts, and answers DSG-style yes/no questions.

A judge is duck-typed. Every backend has:

- ``discriminate(prompt, images) -> int | None``: index of the image that aligns best with the
  prompt, None when none does (or when no answer could be parsed);
- ``expand(prompt, n) -> list[str]``: variations that keep the prompt's structure / category and
  change objects, colours or relations;
- ``mutate() -> str``: a fresh prompt, unrelated to any given one;
- ``vqa(image, questions) -> list[float]``: p(yes) per yes/no question;
- ``questions(prompt) -> list[str]``: the prompt decomposed into yes/no questions (DSG-style);
- the batch forms ``discriminate_batch(prompts, images_lists)``, ``expand_batch(prompts, n)``,
  ``mutate_batch(n)``, ``vqa_batch(images, questions_lists)``, ``questions_batch(prompts)``;
- counters ``calls`` (model queries) and ``unparsable`` (answers that could not be parsed).

Images are [H, W, 3] uint8 numpy arrays. Backends (the literal dict ``JUDGES``):

- ``shapes``: analytic, over the ShapesEval detector, with an optional ``error_rate`` that simulates
  a weak VLM; prompt expansion / mutation through the shapes grammar.
- ``openai``: any OpenAI-compatible chat endpoint (vLLM, Ray Serve LLM, hosted APIs).
- ``transformers``: a local VLM (``AutoModelForImageTextToText`` + ``AutoProcessor``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from raypref.config import check
from raypref.judges.chat import OpenAIJudge, TransformersJudge
from raypref.judges.shapes import ShapesJudge

JUDGES = {"shapes": ShapesJudge, "openai": OpenAIJudge, "transformers": TransformersJudge}


def build_judge(backend: str, **kwargs):
    """Instantiate ``JUDGES[backend](**kwargs)``."""
    if backend not in JUDGES:
        raise ValueError(f"unknown judge backend {backend!r}; known: {sorted(JUDGES)}")
    return JUDGES[backend](**kwargs)


@dataclass(frozen=True)
class JudgeSection:
    """The judge of every job that uses one (director, OSPO, the driver, ``raypref serve``)."""

    backend: str = field(default="shapes", metadata={"help": "a key of raypref.judges.JUDGES"})
    error_rate: float = field(default=0.0, metadata={"help": "shapes: fraction of wrong answers (a weak VLM)"})
    seed: int = 0
    model: str = field(default="", metadata={"help": "openai: the served model name; transformers: a local path"})
    base_url: str = field(default="", metadata={"help": "openai: the endpoint (vLLM, Ray Serve LLM, a hosted API)"})
    call_cost: float = field(default=0.0, metadata={"help": "cost per judge call (a paid VLM API)"})
    shapes_grammar: bool = field(default=True, metadata={"help": "chat judges: prompts they write stay in the "
                                                                 "shapes grammar (false for real-world prompts)"})

    def __post_init__(self):
        check(self.backend in JUDGES, f"judge.backend must be one of {sorted(JUDGES)}, got {self.backend!r}")
        check(0 <= self.error_rate <= 1, f"judge.error_rate must be in [0, 1], got {self.error_rate}")
        check(self.backend == "shapes" or bool(self.model), f"judge.model is required for backend {self.backend!r}")
        check(self.call_cost >= 0, f"judge.call_cost must be >= 0, got {self.call_cost}")

    def kwargs(self) -> dict:
        """The backend's constructor arguments (what a Serve replica builds the judge from)."""
        if self.backend == "shapes":
            return {"error_rate": self.error_rate, "seed": self.seed}
        if self.backend == "openai":
            return {"model": self.model, "base_url": self.base_url or None, "seed": self.seed,
                    "shapes_grammar": self.shapes_grammar}
        return {"model_path": self.model, "seed": self.seed, "shapes_grammar": self.shapes_grammar}

    def build(self):
        """The judge itself."""
        return build_judge(self.backend, **self.kwargs())
