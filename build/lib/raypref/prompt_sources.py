"""Syn-Pic's prompts: from the shapes grammar, a text file (one prompt a line) or a Parquet column;
cleaned, de-duplicated and checked against the grammar where a model or reward needs it, every
skipped prompt counted with its reason. And the per-(prompt, generator) seeds and chunk names that
make a re-run regenerate the same images."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from raypref.synpic_config import PromptsSection, SynPicConfig

SKIP_EXAMPLES = 5  # examples kept per skip reason in the summary


class _Skips:
    """Counted skips by reason, with a few examples each: nothing is dropped silently."""

    def __init__(self, on_bad: str = "skip"):
        self.on_bad, self.counts, self.examples = on_bad, defaultdict(int), defaultdict(list)

    def add(self, reason: str, example: str, error: bool = True):
        if error and self.on_bad == "error":
            raise ValueError(f"bad prompt ({reason}): {example}")
        self.counts[reason] += 1
        if len(self.examples[reason]) < SKIP_EXAMPLES:
            self.examples[reason].append(example)

    def merge(self, other: dict):
        for reason, d in other.items():
            self.counts[reason] += d["count"]
            self.examples[reason] = (self.examples[reason] + d["examples"])[:SKIP_EXAMPLES]

    def as_dict(self) -> dict:
        return {r: {"count": c, "examples": self.examples[r]} for r, c in sorted(self.counts.items())}


def _raw_prompts(cfg: PromptsSection):
    """(where, text or None if undecodable, category) from the configured source."""
    if cfg.source == "shapes":
        import random

        from raypref.shapes.grammar import CATEGORIES, all_prompts

        # distinct prompts: a row is keyed by its prompt text, so sampling with replacement would only
        # produce duplicates
        for c in CATEGORIES:
            pool = all_prompts(c)
            for p in random.Random(f"{c}:{cfg.seed}").sample(pool, min(cfg.n_per_category, len(pool))):
                yield f"shapes:{c}", p, c
        return
    path = Path(cfg.source).expanduser()
    if not path.exists():
        raise ValueError(f"prompts.source {cfg.source!r}: no such file (expected 'shapes', a .txt or a .parquet)")
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        if cfg.column not in table.column_names:
            raise ValueError(f"{path}: no column {cfg.column!r}; columns: {table.column_names}")
        col = table.column(cfg.column)
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_binary(col.type)):
            raise ValueError(f"{path}: column {cfg.column!r} must hold strings, got {col.type}")
        for i, v in enumerate(col.to_pylist()):
            if isinstance(v, bytes):
                try:
                    v = v.decode("utf-8")
                except UnicodeDecodeError:
                    yield f"{path.name} row {i}", None, ""
                    continue
            yield f"{path.name} row {i}", "" if v is None else v, ""
        return
    data = path.read_bytes()
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":  # the newline ending the last line is not an empty prompt
        lines.pop()
    for i, line in enumerate(lines, 1):
        try:
            yield f"{path.name}:{i}", line.decode("utf-8"), ""
        except UnicodeDecodeError:
            yield f"{path.name}:{i}", None, ""


def needs_grammar(cfg: SynPicConfig, generator_classes: dict | None = None) -> bool:
    """Whether prompts must parse in the shapes grammar: a teacher, a shapes checkpoint or the
    faithfulness reward only understands grammar prompts."""
    if cfg.prompts.grammar != "auto":
        return cfg.prompts.grammar == "shapes"
    if "faithfulness" in cfg.rewards.keys:
        return True
    for spec in cfg.generators.specs:
        kind, _, arg = spec.partition(":")
        if kind == "teacher" or getattr((generator_classes or {}).get(kind), "shapes", False):
            return True
        if kind == "checkpoint":
            from raypref.checkpoints import resolve_checkpoint
            from raypref.shapes.model import is_shapes_model

            if is_shapes_model(resolve_checkpoint(arg)):
                return True
    return False


def load_prompts(cfg: PromptsSection, grammar: bool) -> tuple[list[tuple[str, str]], dict]:
    """Clean prompts in a deterministic order: ([(prompt, category)], skips by reason).

    Bad prompts (undecodable bytes, empty, longer than ``max_chars``, duplicate, outside the shapes
    grammar when ``grammar``) are counted skips, or a ValueError with ``on_bad="error"``.
    Whitespace around a prompt is stripped.
    """
    from raypref.shapes.grammar import parse

    skips = _Skips(cfg.on_bad)
    seen, out = set(), []
    for where, text, category in _raw_prompts(cfg):
        if text is None:
            skips.add("undecodable", f"{where}: not UTF-8")
            continue
        text = text.strip()
        if not text:
            skips.add("empty", where)
            continue
        if len(text) > cfg.max_chars:
            skips.add("too_long", f"{where}: {len(text)} chars > prompts.max_chars={cfg.max_chars}")
            continue
        if text in seen:
            skips.add("duplicate", f"{where}: {text!r}")
            continue
        if grammar:
            try:
                category = parse(text).category
            except (ValueError, TypeError) as e:
                skips.add("not_in_grammar", f"{where}: {e}")
                continue
        seen.add(text)
        out.append((text, category))
    return out, skips.as_dict()


def derive_seed(pid: str, spec: str, base_seed: int = 0) -> int:
    """The seed of (prompt id, generator spec): a stable 31-bit hash, the same on every run."""
    h = hashlib.blake2b(f"{pid}|{spec}|{base_seed}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") & 0x7FFFFFFF


def chunk_name(i: int) -> str:
    return f"chunk-{i:05d}"
