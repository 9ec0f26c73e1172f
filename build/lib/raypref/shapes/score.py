"""Analytic scorers of the shapes world: two reward models that disagree by design.

- ``faithfulness(prompt, image)``: the fraction of the prompt's constraints the image meets
  (a VQAScore / DSG-like score in [0, 1]; 1.0 exactly when ShapesEval passes).
- ``aesthetic(image)``: sharp edges, clean background, no speckle, pure colours; in [0, 1]
  and 1.0 for a clean render, whatever the prompt.
"""

from __future__ import annotations

import numpy as np

from raypref.shapes.detect import PALETTE_RGB, _check_image, check_results, classify_pixels, components, min_pixels
from raypref.shapes.grammar import BACKGROUND

_BG = np.array(BACKGROUND, dtype=np.float64)


def faithfulness(prompt: str, image: np.ndarray) -> float:
    """Fraction of the prompt's constraints met by ``image`` ([H, W, 3] uint8), in [0, 1]."""
    results = check_results(prompt, image)
    return sum(ok for _, ok in results) / len(results)


def aesthetic(image: np.ndarray) -> float:
    """Image quality in [0, 1], independent of the prompt: the product of
    background cleanliness (distance of background pixels from the background colour),
    colour purity (distance of object pixels from their palette colour),
    edge sharpness (share of in-between pixels, as blur makes) and
    absence of speckle (foreground fragments too small to be objects)."""
    image = _check_image(image).astype(np.float64)
    labels = classify_pixels(image.astype(np.uint8))
    h, w = labels.shape
    fg = labels >= 0
    d_bg = np.sqrt(((image - _BG) ** 2).sum(-1))
    d_fg = np.sqrt(((image - PALETTE_RGB[np.maximum(labels, 0)]) ** 2).sum(-1))
    clean_bg = np.exp(-d_bg[~fg].mean() / 25.0) if (~fg).any() else 0.0
    purity = np.exp(-d_fg[fg].mean() / 40.0) if fg.any() else 1.0
    # in-between pixels: neither near the background nor near their palette colour
    between = ((np.minimum(d_bg, np.where(fg, d_fg, np.inf)) > 35.0)).mean()
    sharp = np.exp(-4.0 * between)
    small = sum(len(c) < min_pixels(h, w) for c in components(labels))
    no_speckle = np.exp(-small / 8.0)
    return float(clean_bg * purity * sharp * no_speckle)
