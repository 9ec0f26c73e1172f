"""Pick-a-Pic-layout preference data as training input.

The de facto layout of diffusion preference sets (Pick-a-Pic v2, HPDv2-style exports, raypref's own
``prefdata.to_pickapic``): one row per pair, ``caption`` (str), ``jpg_0`` / ``jpg_1`` (encoded image
bytes, or Hugging Face's image struct ``{"bytes", "path"}``), ``label_0`` (1: image 0 preferred, 0:
image 1 preferred, 0.5: a tie). ``to_rows`` turns a batch of such rows into the K = 2 rows training
reads (``collate.COLUMNS``): the preferred image first is not assumed, ``phi`` carries the label, and
one (winner, loser) pair. Ties carry no preference for the pairwise losses and are dropped.

Files: Parquet shards (a file or a directory), or a Hugging Face ``Dataset.save_to_disk`` directory
(Arrow stream files), read without the ``datasets`` package. ``check`` reads every file once,
streaming, before any step: a missing column, a caption that is not
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
    """The Parquet files of ``path`` (a file, or a directory searched recursively), else the Arrow
    files of a Hugging Face ``Dataset.save_to_disk`` directory; sorted."""
    p = Path(path).expanduser()
    if not p.is_dir():
        if p.exists():
            return [p]
        raise ValueError(f"no Parquet file at {path}")
    found = sorted(p.rglob("*.parquet")) or sorted(p.rglob("*.arrow"))
    if not found:
        raise ValueError(f"no Parquet file (nor a save_to_disk dataset's .arrow files) at {path}")
    return found


def is_arrow(path: str) -> bool:
    """Whether ``path`` is a Hugging Face save_to_disk dataset (Arrow stream files), not Parquet."""
    return files(path)[0].suffix == ".arrow"


def _schema(f: Path) -> pa.Schema:
    if f.suffix == ".arrow":
        with pa.memory_map(str(f)) as src:
            return pa.ipc.open_stream(src).schema
    return pq.read_schema(f)


def batches(f: Path, batch_rows: int = 256, columns=COLUMNS):
    """``columns`` of one Parquet or Arrow-stream file, a record batch at a time (never the whole file)."""
    if f.suffix == ".arrow":
        with pa.memory_map(str(f)) as src:
            for batch in pa.ipc.open_stream(src):
                yield batch.select(list(columns))
        return
    yield from pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=list(columns))


def detect_format(path: str) -> str:
    """'pickapic' when the first file has the Pick-a-Pic columns, else 'raypref'."""
    return "pickapic" if set(COLUMNS) <= set(_schema(files(path)[0]).names) else "raypref"


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


def check(path: str, batch_rows: int = 256, keep_ties: bool = False) -> dict:
    """Every row of every file, streaming; ValueError naming the file, row and column of the first
    bad cell, or when no row would train (all ties, unless ``keep_ties``). -> {"files", "rows", "pairs", "ties"}."""
    stats = {"files": 0, "rows": 0, "pairs": 0, "ties": 0}
    for f in files(path):
        missing = [c for c in COLUMNS if c not in _schema(f).names]
        if missing:
            raise ValueError(f"{f}: missing column(s) {missing} of the Pick-a-Pic layout {list(COLUMNS)}")
        row = 0
        for batch in batches(f, batch_rows):
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
    if not stats["pairs"] and not (keep_ties and stats["ties"]):
        raise ValueError(f"{path}: {stats['rows']} rows but no preference (every label is a tie)")
    return stats


def file_pairs(batch: dict):
    """Ray Data ``map_batches`` generator over a batch of {"file": path}: each file's Pick-a-Pic rows, a
    record batch at a time, images as bytes (how save_to_disk datasets stream; Parquet uses read_parquet)."""
    for f in batch["file"]:
        for b in batches(Path(str(f))):
            t = pa.Table.from_batches([b])
            for c in ("jpg_0", "jpg_1"):
                t = t.set_column(t.schema.get_field_index(c), c,
                                 pa.array([image_bytes(v) for v in t[c].to_pylist()], pa.binary()))
            yield t.set_column(t.schema.get_field_index("label_0"), "label_0", t["label_0"].cast(pa.float64()))


def read(path: str):
    """The Pick-a-Pic rows of ``path`` as a Ray Dataset (images as bytes), streamed."""
    import ray

    if is_arrow(path):  # a save_to_disk dataset: one read task per Arrow file
        return ray.data.from_items([{"file": str(f)} for f in files(path)]).map_batches(
            file_pairs, batch_size=1, batch_format="numpy")
    return ray.data.read_parquet([str(f) for f in files(path)], columns=list(COLUMNS))


def to_rows(batch: pa.Table, ties: str = "skip") -> pa.Table:
    """Pick-a-Pic rows -> training rows (``collate.COLUMNS``). Ties are dropped, or with ``ties="keep"``
    become rows of phi [0.5, 0.5] and no pair (``collate.select`` makes them DPO ties). A ``map_batches``
    function (pyarrow in and out), so the whole set is never in memory."""
    from raypref.collate import COLUMNS as TRAIN_COLUMNS
    from raypref.prefdata import SCHEMA, prompt_id

    cols = batch.select(list(COLUMNS)).to_pydict()
    out = {c: [] for c in TRAIN_COLUMNS}
    for caption, a, b, label in zip(cols["caption"], cols["jpg_0"], cols["jpg_1"], cols["label_0"]):
        label = float(label)
        if label == 0.5 and ties != "keep":
            continue
        w, lo = (0, 1) if label == 1.0 else (1, 0)
        out["prompt_id"].append(prompt_id(caption))
        out["prompt"].append(caption)
        out["images"].append([image_bytes(a), image_bytes(b)])
        out["generators"].append(["pickapic:0", "pickapic:1"])
        out["phi"].append([label, 1.0 - label])
        out["pairs"].append([] if label == 0.5 else [{"i": w, "j": lo, "votes_i": 1, "votes_j": 0}])
    schema = pa.schema([SCHEMA.field(c) for c in TRAIN_COLUMNS])
    return pa.Table.from_pydict(out, schema=schema)


def example_table(images: list[np.ndarray], captions: list[str], labels: list[float]) -> pa.Table:
    """A Pick-a-Pic table of PNG pairs (images[2i], images[2i + 1]) for tests and examples."""
    from raypref.prefdata import encode_png

    return pa.Table.from_pydict({
        "caption": captions, "jpg_0": [encode_png(im) for im in images[0::2]],
        "jpg_1": [encode_png(im) for im in images[1::2]], "label_0": [float(x) for x in labels]})


def group_to_rows(group: pa.Table) -> pa.Table:
    """All pairs of one caption -> ``prefdata.SCHEMA`` rows. Its distinct images (by content) and the
    pairs' (winner, loser) edges: when the edges have no cycle the caption becomes one K-image ranking
    row (phi = the image's depth in the order, scaled to [0, 1]; the pairs kept as consensus pairs),
    so RankDPO sees the whole ranking; a cycle (inconsistent labels) keeps each pair as its own K = 2
    row. Ties are dropped. A ``map_groups`` function (pyarrow in and out)."""
    import hashlib

    from raypref.labels import ranking
    from raypref.prefdata import SCHEMA, make_row

    cols = group.to_pydict()
    caption = cols["caption"][0]
    images, index, edges = [], {}, []
    for a, b, label in zip(cols["jpg_0"], cols["jpg_1"], cols["label_0"]):
        if float(label) == 0.5:
            continue
        ids = []
        for im in (image_bytes(a), image_bytes(b)):
            key = hashlib.sha1(im).hexdigest()
            if key not in index:
                index[key] = len(images)
                images.append(im)
            ids.append(index[key])
        edges.append((ids[0], ids[1]) if float(label) == 1.0 else (ids[1], ids[0]))
    if not edges:
        return pa.Table.from_pylist([], schema=SCHEMA)

    def row(imgs, phi, pairs):
        return make_row(caption, "", imgs, [f"pickapic:{i}" for i in range(len(imgs))], [0] * len(imgs),
                        ["label"], [phi], phi, ranking(phi), [(i, j, 1, 0) for i, j in pairs])

    depth = _depths(len(images), sorted(set(edges)))
    if depth is None or len(images) == 2:  # a cycle, or just one pair: pairwise rows
        return pa.Table.from_pylist([row([images[w], images[lo]], [1.0, 0.0], [(0, 1)]) for w, lo in edges],
                                    schema=SCHEMA)
    top = max(depth)
    return pa.Table.from_pylist([row(images, [d / top for d in depth], sorted(set(edges)))], schema=SCHEMA)


def _depths(n: int, edges: list[tuple[int, int]]) -> list[int] | None:
    """Longest path from each node down to a sink of the (winner -> loser) graph; None on a cycle."""
    below = {i: [lo for w, lo in edges if w == i] for i in range(n)}
    depth: dict[int, int] = {}
    active: set[int] = set()

    def visit(i: int) -> int | None:
        if i in depth:
            return depth[i]
        if i in active:
            return None
        active.add(i)
        sub = [visit(j) for j in below[i]]
        active.discard(i)
        if any(d is None for d in sub):
            return None
        depth[i] = 1 + max(sub) if sub else 0
        return depth[i]

    out = [visit(i) for i in range(n)]
    return None if any(d is None for d in out) else out


def convert(path: str, out: str) -> dict:
    """Pick-a-Pic data at ``path`` -> raypref's layout (``prefdata.SCHEMA`` Parquet files in ``out``),
    rows grouped per caption by Ray Data (a shuffle, never the whole set in one process); -> counts."""
    stats = check(path)
    if Path(out).expanduser().exists() and any(Path(out).expanduser().iterdir()):
        raise ValueError(f"{out} is not empty; convert writes into a new directory")
    read(path).groupby("caption").map_groups(group_to_rows, batch_format="pyarrow").write_parquet(
        str(Path(out).expanduser().resolve()))
    table = pq.read_table(str(Path(out).expanduser()), columns=["images"])
    k = [len(x) for x in table.column("images").to_pylist()]
    return {**stats, "rows_written": len(k), "ranking_rows": sum(x > 2 for x in k),
            "pair_rows": sum(x == 2 for x in k)}
