"""The preference dataset layout shared by Syn-Pic, BalancedDPO, OSPO and the trainers.

One Parquet row per prompt, K images per prompt:

| column        | type                                   | meaning                                     |
| ------------- | -------------------------------------- | ------------------------------------------- |
| prompt_id     | string                                 | stable id (same prompt text -> same id)     |
| prompt        | string                                 |                                             |
| category      | string                                 | shapes category, or "" for free text        |
| images        | list<binary> [K]                       | PNG bytes                                   |
| generators    | list<string> [K]                       | who made each image                         |
| seeds         | list<int64> [K]                        | the seed each image was generated with      |
| reward_names  | list<string> [n]                       | metrics, in the order of ``scores``          |
| scores        | list<list<float>> [n][K]               | per-metric scores                           |
| phi           | list<float> [K]                        | Syn-Pic preference probability (RankDPO)    |
| ranking       | list<int32> [K]                        | rank by phi, from 1                         |
| pairs         | list<struct<i, j, votes_i, votes_j>>   | consensus pairs, ``i`` the winner (BalancedDPO) |

The pairwise export (``to_pickapic``) has Pick-a-Pic's columns ``caption, jpg_0, jpg_1, label_0``
that HF ``datasets`` and the Diffusion-DPO scripts read (label_0 = 1 when jpg_0 is preferred).
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow as pa

PAIR_TYPE = pa.struct([("i", pa.int32()), ("j", pa.int32()), ("votes_i", pa.int32()), ("votes_j", pa.int32())])
SCHEMA = pa.schema([
    ("prompt_id", pa.string()),
    ("prompt", pa.string()),
    ("category", pa.string()),
    ("images", pa.list_(pa.binary())),
    ("generators", pa.list_(pa.string())),
    ("seeds", pa.list_(pa.int64())),
    ("reward_names", pa.list_(pa.string())),
    ("scores", pa.list_(pa.list_(pa.float32()))),
    ("phi", pa.list_(pa.float32())),
    ("ranking", pa.list_(pa.int32())),
    ("pairs", pa.list_(PAIR_TYPE)),
])
PICKAPIC_SCHEMA = pa.schema([
    ("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()), ("label_0", pa.float32()),
])


def prompt_id(prompt: str) -> str:
    """A stable id for a prompt's text (16 hex digits)."""
    return hashlib.blake2b(prompt.encode(), digest_size=8).hexdigest()


def encode_png(image: np.ndarray) -> bytes:
    """[H, W, 3] uint8 -> PNG bytes (lossless)."""
    from PIL import Image

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected [H, W, 3] uint8, got {image.shape} {image.dtype}")
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """Image bytes (PNG or JPEG) -> [H, W, 3] uint8."""
    from PIL import Image

    try:
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    except Exception as e:  # PIL raises several types for corrupt data
        raise ValueError(f"undecodable image bytes ({len(data)} bytes): {e}") from e


def validate_row(row: dict) -> None:
    """Check one row's internal consistency; raise ValueError saying what is wrong."""
    k = len(row["images"])
    if k < 2:
        raise ValueError(f"prompt {row.get('prompt')!r}: need >= 2 images, got {k}")
    for col in ("generators", "seeds", "phi", "ranking"):
        if len(row[col]) != k:
            raise ValueError(f"prompt {row.get('prompt')!r}: column {col} has {len(row[col])} entries, images {k}")
    if len(row["scores"]) != len(row["reward_names"]):
        raise ValueError(f"prompt {row.get('prompt')!r}: {len(row['scores'])} score rows, "
                         f"{len(row['reward_names'])} reward names")
    for name, s in zip(row["reward_names"], row["scores"]):
        if len(s) != k or not np.all(np.isfinite(s)):
            raise ValueError(f"prompt {row.get('prompt')!r}: reward {name} scores must be {k} finite numbers, got {s}")
    for p in row["pairs"]:
        if not (0 <= p["i"] < k and 0 <= p["j"] < k and p["i"] != p["j"]):
            raise ValueError(f"prompt {row.get('prompt')!r}: bad pair {p}")


def make_row(prompt, category, images, generators, seeds, reward_names, scores, phi, ranking, pairs) -> dict:
    """One validated row of SCHEMA; ``images`` are [K, H, W, 3] uint8 arrays or PNG bytes."""
    row = {
        "prompt_id": prompt_id(prompt), "prompt": prompt, "category": category or "",
        "images": [im if isinstance(im, bytes) else encode_png(im) for im in images],
        "generators": [str(g) for g in generators], "seeds": [int(s) for s in seeds],
        "reward_names": [str(r) for r in reward_names],
        "scores": [[float(v) for v in s] for s in np.asarray(scores, dtype=np.float64).reshape(len(reward_names), -1)],
        "phi": [float(v) for v in phi], "ranking": [int(v) for v in ranking],
        "pairs": [{"i": int(i), "j": int(j), "votes_i": int(vi), "votes_j": int(vj)} for i, j, vi, vj in pairs],
    }
    validate_row(row)
    return row


def to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def to_pickapic(table: pa.Table) -> pa.Table:
    """Pairwise export: per row, its consensus pairs if any, else (best, worst) by phi.
    jpg_0 is always the preferred image (label_0 = 1)."""
    out = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": []}
    for row in table.to_pylist():
        pairs = [(p["i"], p["j"]) for p in row["pairs"]]
        if not pairs:
            phi = np.asarray(row["phi"])
            if phi.max() > phi.min():
                pairs = [(int(phi.argmax()), int(phi.argmin()))]
        for i, j in pairs:
            out["caption"].append(row["prompt"])
            out["jpg_0"].append(row["images"][i])
            out["jpg_1"].append(row["images"][j])
            out["label_0"].append(1.0)
    return pa.Table.from_pydict(out, schema=PICKAPIC_SCHEMA)


def relabel(row: dict, labeling: str, weights=None, seed: int = 0) -> dict:
    """The same row (prompt, images, raw scores) with its labels (phi, ranking, pairs) rebuilt from
    a different view of the scores; the ablations' way to compare labelings on one set of images.

    labeling:
        ``synpic``        phi and consensus pairs over all n metrics (what Syn-Pic writes).
        ``reward:NAME``   one metric only: phi = wins / (K - 1), every strictly ordered pair.
        ``mixed``         reward mixing: the weighted sum of z-normalised metrics
                          (``labels.mixed_reward``, ``weights`` [n], default equal) as one metric.
        ``random``        a random order of the K images, seeded by (``seed``, prompt_id): the floor.
    """
    from raypref import labels

    scores = np.asarray(row["scores"], dtype=np.float64)  # [n, K]
    names = list(row["reward_names"])
    if labeling == "synpic":
        metric = scores
    elif labeling.startswith("reward:"):
        name = labeling.partition(":")[2]
        if name not in names:
            raise ValueError(f"relabel {labeling!r}: the row has rewards {names}, not {name!r}")
        metric = scores[[names.index(name)]]
    elif labeling == "mixed":
        w = np.ones(len(names)) if weights is None else np.asarray(weights, dtype=np.float64)
        metric = labels.mixed_reward(scores, w)[None]
    elif labeling == "random":
        rng = np.random.default_rng([int(seed), int(row["prompt_id"][:15], 16)])
        metric = rng.permutation(scores.shape[1]).astype(np.float64)[None]
    else:
        raise ValueError(f"unknown labeling {labeling!r}; expected synpic, reward:NAME, mixed or random")
    phi = labels.synpic_phi(metric)
    return make_row(row["prompt"], row["category"], row["images"], row["generators"], row["seeds"], names, scores,
                    phi, labels.ranking(phi), labels.consensus_pairs(metric))
