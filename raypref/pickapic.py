"""Pick-a-Pic-layout preference data as training input.

The de facto layout of diffusion preference sets (Pick-a-Pic v2, HPDv2-style exports, raypref's own
``prefdata.to_pickapic``): one row per pair, ``caption`` (str), ``jpg_0`` / ``jpg_1`` (encoded image
bytes, or Hugging Face's image struct ``{"bytes", "path"}``), ``label_0`` (1: image 0 preferred, 0:
image 1 preferred, 0.5: a tie). ``to_rows`` turns a batch of such rows into the K = 2 rows training
reads (``collate.COLUMNS``): the preferred image first is not assumed, ``phi`` carries the label, and
one (winner, loser) pair. Ties carry no preference for the pairwise losses and are dropped.

``check`` reads every file once, streaming, before any step: a missing column, a caption that is not
text, a label outside {0, 0.5, 1} or an image that does not decode is an error naming the file, the
row and the column.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
LABELS = (0.0, 0.5, 1.0)


def files(path: str) -> list[Path]:
    """The Parquet files of ``path`` (a file, or a directory searched recursively), sorted."""
    p = Path(path).expanduser()
    found = sorted(p.rglob("*.parquet")) if p.is_dir() else [p] if p.exists() else []
    if not found:
        raise ValueError(f"no Parquet file at {path}")
    return found


def detect_format(path: str) -> str:
    """'pickapic' when the first file has the Pick-a-Pic columns, else 'raypref'."""
    names = set(pq.read_schema(files(path)[0]).names)
    return "pickapic" if set(COLUMNS) <= names else "raypref"


def image_bytes(value) -> bytes | None:
    """Encoded image bytes from a cell: bytes, or Hugging Face's ``{"bytes", "path"}`` struct."""
    if isinstance(value, dict):
        value = value.get("bytes")
    return value if isinstance(value, (bytes, bytearray)) else None


def _bad_cell(column: str, value) -> str | None:
    """Why a cell of ``column`` is unusable, or None."""
    if column == "caption":
        return None if isinstance(value, str) and value.strip() else f"expected non-empty text, got {value!r:.60}"
    if column == "label_0":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and float(value) in LABELS
        return None if ok else f"expected a label in {{0, 0.5, 1}}, got {value!r}"
    data = image_bytes(value)
    if data is None:
        return f"expected encoded image bytes, got {type(value).__name__}"
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Exception:  # PIL raises several types for corrupt data
        return f"undecodable image ({len(data)} bytes)"
    return None


def check(path: str, batch_rows: int = 256) -> dict:
    """Every row of every file, streaming; ValueError naming the file, row and column of the first
    bad cell. -> {"files", "rows", "pairs", "ties"}."""
    stats = {"files": 0, "rows": 0, "pairs": 0, "ties": 0}
    for f in files(path):
        pf = pq.ParquetFile(f)
        missing = [c for c in COLUMNS if c not in pf.schema_arrow.names]
        if missing:
            raise ValueError(f"{f}: missing column(s) {missing} of the Pick-a-Pic layout {list(COLUMNS)}")
        row = 0
        for batch in pf.iter_batches(batch_size=batch_rows, columns=list(COLUMNS)):
            cols = batch.to_pydict()
            for i in range(batch.num_rows):
                for c in COLUMNS:
                    why = _bad_cell(c, cols[c][i])
                    if why:
                        raise ValueError(f"{f}: row {row + i}, column {c!r}: {why}")
                stats["ties" if float(cols["label_0"][i]) == 0.5 else "pairs"] += 1
            row += batch.num_rows
        stats["files"] += 1
        stats["rows"] += row
    if not stats["pairs"]:
        raise ValueError(f"{path}: {stats['rows']} rows but no preference (every label is a tie)")
    return stats


def to_rows(batch: pa.Table) -> pa.Table:
    """Pick-a-Pic rows -> training rows (``collate.COLUMNS``), ties dropped. A ``map_batches`` function
    (pyarrow in and out), so the whole set is never in memory."""
    from raypref.collate import COLUMNS as TRAIN_COLUMNS
    from raypref.prefdata import SCHEMA, prompt_id

    cols = batch.select(list(COLUMNS)).to_pydict()
    out = {c: [] for c in TRAIN_COLUMNS}
    for caption, a, b, label in zip(cols["caption"], cols["jpg_0"], cols["jpg_1"], cols["label_0"]):
        label = float(label)
        if label == 0.5:
            continue
        w, lo = (0, 1) if label == 1.0 else (1, 0)
        out["prompt_id"].append(prompt_id(caption))
        out["prompt"].append(caption)
        out["images"].append([image_bytes(a), image_bytes(b)])
        out["generators"].append(["pickapic:0", "pickapic:1"])
        out["phi"].append([label, 1.0 - label])
        out["pairs"].append([{"i": w, "j": lo, "votes_i": 1, "votes_j": 0}])
    schema = pa.schema([SCHEMA.field(c) for c in TRAIN_COLUMNS])
    return pa.Table.from_pydict(out, schema=schema)


def example_table(images: list[np.ndarray], captions: list[str], labels: list[float]) -> pa.Table:
    """A Pick-a-Pic table of PNG pairs (images[2i], images[2i + 1]) for tests and examples."""
    from raypref.prefdata import encode_png

    return pa.Table.from_pydict({
        "caption": captions, "jpg_0": [encode_png(im) for im in images[0::2]],
        "jpg_1": [encode_png(im) for im in images[1::2]], "label_0": [float(x) for x in labels]})
