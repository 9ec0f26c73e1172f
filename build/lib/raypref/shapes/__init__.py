"""The shapes world: raypref's embedded default (see shared/shapes_world.md)."""

from raypref.shapes.detect import Detection, check_results, detect, passes, shapes_eval
from raypref.shapes.grammar import (
    CATEGORIES,
    COLORS,
    PALETTE,
    RELATIONS,
    SHAPES,
    Obj,
    Scene,
    all_prompts,
    eval_prompts,
    parse,
    sample_prompts,
)
from raypref.shapes.render import render

__all__ = [
    "CATEGORIES", "COLORS", "PALETTE", "RELATIONS", "SHAPES", "Detection", "Obj", "Scene",
    "all_prompts", "check_results", "detect", "eval_prompts", "parse", "passes", "render",
    "sample_prompts", "shapes_eval",
]
