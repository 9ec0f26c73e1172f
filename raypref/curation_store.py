"""The director's versioned training set: one Parquet file per round (``round-0003.parquet``) holding
(prompt, teacher image) samples, with the teachers' selection statistics in the file's metadata, and
its export as SFT data in the preference layout.

A version is written to a temporary file and renamed (atomic), after the round's decision log, so a
crash leaves the previous version as the latest loadable one and never a half-written file under a
version name.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from raypref import prefdata
from raypref.files import atomic_write
from raypref.prefdata import encode_png

ORIGINS = ("seed", "expand", "mutate")
VERSION_RE = re.compile(r"^round-(\d{4})\.parquet$")
STATS_KEY = b"raypref.director.stats"
ROUND_KEY = b"raypref.director.round"

SCHEMA = pa.schema([
    ("sample_id", pa.string()),  # unique in the set: "r{round added}-{n}"
    ("prompt", pa.string()),
    ("category", pa.string()),  # shapes category, or "" for free text
    ("image", pa.binary()),  # the teacher's image, PNG bytes
    ("teacher", pa.string()),
    ("seed", pa.int64()),  # the seed the teacher image was drawn with
    ("round_added", pa.int32()),
    ("origin", pa.string()),  # seed | expand | mutate
    ("parent", pa.string()),  # the prompt it was expanded / mutated from ("" for seed rows)
])


@dataclass
class DirectorDataset:
    """One version of the set: the rows, the round that produced it, and the selection statistics
    ``{"selection": {teacher: {category: [offered, selected]}}, "vs_base": {teacher: {category:
    [compared, won]}}}``."""

    table: pa.Table
    round: int = 0
    stats: dict = field(default_factory=lambda: {"selection": {}, "vs_base": {}})

    def __len__(self) -> int:
        return self.table.num_rows

    def rows(self) -> list[dict]:
        return self.table.to_pylist()


def category_of(prompt: str) -> str:
    """Shapes category of a prompt, or "" for text outside the shapes grammar."""
    from raypref.shapes.grammar import parse

    try:
        return parse(prompt).category
    except (ValueError, TypeError):
        return ""


def make_rows(prompts, images, teachers, seeds, round_added, origins, parents, categories=None, start: int = 0):
    """Rows of SCHEMA; ``images`` are [H, W, 3] uint8 arrays or PNG bytes."""
    n = len(prompts)
    if not all(len(x) == n for x in (images, teachers, seeds, origins, parents)):
        raise ValueError("make_rows: prompts, images, teachers, seeds, origins and parents must have equal lengths")
    bad = [o for o in origins if o not in ORIGINS]
    if bad:
        raise ValueError(f"unknown origin {bad[0]!r}; expected one of {ORIGINS}")
    categories = categories or [category_of(p) for p in prompts]
    return [
        {
            "sample_id": f"r{round_added:04d}-{start + i:06d}",
            "prompt": str(p),
            "category": c,
            "image": im if isinstance(im, bytes) else encode_png(im),
            "teacher": str(t),
            "seed": int(s),
            "round_added": int(round_added),
            "origin": o,
            "parent": str(par),
        }
        for i, (p, im, t, s, o, par, c) in enumerate(
            zip(prompts, images, teachers, seeds, origins, parents, categories)
        )
    ]


def to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def version_path(directory, round_idx: int) -> Path:
    if not 0 <= round_idx <= 9999:
        raise ValueError(f"round index must be in [0, 9999], got {round_idx}")
    return Path(directory).expanduser() / f"round-{round_idx:04d}.parquet"


def save(directory, dataset: DirectorDataset) -> Path:
    """Write ``dataset`` as version ``round-{dataset.round:04d}.parquet``, atomically; stats in metadata."""
    path = version_path(directory, dataset.round)
    meta = {STATS_KEY: json.dumps(dataset.stats).encode(), ROUND_KEY: str(dataset.round).encode()}
    table = dataset.table.cast(SCHEMA).replace_schema_metadata(meta)
    atomic_write(path, lambda p: pq.write_table(table, p))
    return path


def versions(directory) -> list[int]:
    """Round indices of the complete versions in ``directory``, ascending (temp files ignored)."""
    d = Path(directory).expanduser()
    if not d.is_dir():
        return []
    return sorted(int(m.group(1)) for m in (VERSION_RE.match(p.name) for p in d.iterdir()) if m)


def load(directory, round_idx: int | None = None) -> DirectorDataset:
    """Version ``round_idx`` (default: the latest) of the set in ``directory``."""
    if round_idx is None:
        found = versions(directory)
        if not found:
            raise FileNotFoundError(f"no director dataset version (round-NNNN.parquet) in {directory}")
        round_idx = found[-1]
    table = pq.read_table(version_path(directory, round_idx))
    meta = table.schema.metadata or {}
    stats = json.loads(meta[STATS_KEY]) if STATS_KEY in meta else {"selection": {}, "vs_base": {}}
    return DirectorDataset(table.replace_schema_metadata(None).cast(SCHEMA), round_idx, stats)


def write_round(directory, dataset: DirectorDataset, log: dict) -> Path:
    """Commit a round: its decision log (JSONL) and summary (JSON), then the dataset version, each
    atomically. The Parquet version comes last, so it marks the round as complete."""
    logs = Path(directory).expanduser() / "logs"
    name = f"round-{dataset.round:04d}"
    atomic_write(logs / f"{name}.jsonl",
                  lambda p: p.write_text("".join(json.dumps(d) + "\n" for d in log["decisions"])))
    atomic_write(logs / f"{name}.summary.json", lambda p: p.write_text(json.dumps(log["summary"], indent=1)))
    return save(directory, dataset)


def to_sft_table(dataset: DirectorDataset) -> pa.Table:
    """The set as SFT data in the preference layout (``raypref.prefdata.SCHEMA``) that
    ``raypref.train`` reads: one row per sample with K = 1 image (the teacher's), ``phi = [1.0]``,
    no rewards and no pairs. ``loss.method=sft`` with ``sft_target=best`` trains on that image.
    (prefdata.validate_row asks K >= 2 for preference rows, so these rows are built here directly.)
    A prompt that appears several times keeps one row per sample; ``prompt_id`` is per prompt text."""
    rows = [{
        "prompt_id": prefdata.prompt_id(row["prompt"]), "prompt": row["prompt"], "category": row["category"],
        "images": [row["image"]], "generators": [_generator_name(row["teacher"])], "seeds": [int(row["seed"])],
        "reward_names": [], "scores": [], "phi": [1.0], "ranking": [1], "pairs": [],
    } for row in dataset.rows()]
    return pa.Table.from_pylist(rows, schema=prefdata.SCHEMA)


def _generator_name(teacher: str) -> str:
    """The generator spec of a teacher name, as raypref.generators names its images."""
    return teacher if ":" in teacher else f"teacher:{teacher}"


def write_sft(path, dataset: DirectorDataset) -> Path:
    path = Path(path).expanduser()
    table = to_sft_table(dataset)
    atomic_write(path, lambda p: pq.write_table(table, p))
    return path
