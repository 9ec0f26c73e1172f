"""Image generators as batch-dict callables: load in ``__init__``, generate in ``__call__``.

A generator maps {"prompt": [B] str, "seed": [B] int} to the same batch plus "image"
([B, H, W, 3] uint8) and "generator" ([B] str), so the same class runs in Ray Data's
``map_batches`` and directly. ``generate(prompts, seeds)`` is the plain form.
Specs name them on the command line: ``teacher:NAME``, ``checkpoint:PATH`` (or ``checkpoint:shipped``).
"""

from __future__ import annotations

import numpy as np

from raypref.checkpoints import resolve_checkpoint


class TeacherGenerator:
    """A procedural shapes teacher (raypref.shapes.teachers); counts its calls and cost."""

    def __init__(self, name: str, size: int = 32):
        from raypref.shapes.teachers import Teacher

        self.teacher = Teacher(name, size=size)
        self.name = f"teacher:{name}"

    def generate(self, prompts, seeds) -> np.ndarray:
        return self.teacher.generate(list(prompts), [int(s) for s in seeds])

    def __call__(self, batch: dict) -> dict:
        return _add_images(batch, self.generate(batch["prompt"], batch["seed"]), self.name)


class PipelineGenerator:
    """A diffusers pipeline checkpoint (the shapes model or a real family) through its adapter."""

    def __init__(self, path: str, num_inference_steps: int = 30, guidance_scale: float = 3.0, device: str = "cpu"):
        from raypref.models import load_adapter

        self.path = resolve_checkpoint(path)
        self.model = load_adapter(str(self.path), device=device)
        self.name = f"checkpoint:{path}"
        self.steps, self.guidance = num_inference_steps, guidance_scale

    def generate(self, prompts, seeds) -> np.ndarray:
        return self.model.generate(
            [str(p) for p in prompts], [int(s) for s in seeds],
            num_inference_steps=self.steps, guidance_scale=self.guidance,
        )

    def __call__(self, batch: dict) -> dict:
        return _add_images(batch, self.generate(batch["prompt"], batch["seed"]), self.name)


GENERATORS = {"teacher": TeacherGenerator, "checkpoint": PipelineGenerator}


def build_generator(spec: str, **kwargs):
    """``teacher:NAME`` or ``checkpoint:PATH`` -> a generator instance."""
    kind, _, arg = spec.partition(":")
    if kind not in GENERATORS or not arg:
        raise ValueError(f"bad generator spec {spec!r}; expected one of " + ", ".join(f"{k}:..." for k in GENERATORS))
    return GENERATORS[kind](arg, **kwargs)


def _add_images(batch: dict, images: np.ndarray, name: str) -> dict:
    out = dict(batch)
    out["image"] = images
    out["generator"] = np.array([name] * len(images), dtype=object)
    return out
