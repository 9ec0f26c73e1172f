"""The shapes world's analytic rewards as batch-dict callables (run directly or in ``map_batches``)."""

from __future__ import annotations

import numpy as np

from raypref.shapes.score import aesthetic, faithfulness


class FaithfulnessReward:
    """{"prompt": [B] str, "image": [B, H, W, 3] uint8} -> adds "score_{name}" [B] float32."""

    def __init__(self, name: str = "faithfulness"):
        self.name = name

    def __call__(self, batch: dict) -> dict:
        out = dict(batch)
        out[f"score_{self.name}"] = np.array(
            [faithfulness(str(p), im) for p, im in zip(batch["prompt"], batch["image"])], dtype=np.float32
        )
        return out


class AestheticReward:
    """{"image": [B, H, W, 3] uint8} -> adds "score_{name}" [B] float32 (prompt-independent)."""

    def __init__(self, name: str = "aesthetic"):
        self.name = name

    def __call__(self, batch: dict) -> dict:
        out = dict(batch)
        out[f"score_{self.name}"] = np.array([aesthetic(im) for im in batch["image"]], dtype=np.float32)
        return out
