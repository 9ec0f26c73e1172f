"""What every judge backend shares: image transport (PNG as base64 text, side-by-side pairs), the
prompt templates and answer parsers of the chat backends, and the batch forms."""

from __future__ import annotations

import base64
import hashlib
import io
import re

import numpy as np

from raypref.shapes.grammar import COLORS, RELATIONS, parse


def check_image(image) -> np.ndarray:
    """Validate one image: [H, W, 3] uint8 numpy array (returned as such)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an [H, W, 3] uint8 image, got shape {image.shape} dtype {image.dtype}")
    return image


def encode_png_b64(image: np.ndarray) -> str:
    """[H, W, 3] uint8 -> base64 PNG string (no data-URL prefix)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(check_image(image)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png_b64(data: str, check_size=None) -> np.ndarray:
    """base64 PNG (optionally a ``data:image/png;base64,`` URL) -> [H, W, 3] uint8.

    Raises ValueError saying why when ``data`` is not a base64-encoded image. ``check_size(width,
    height)`` sees the size the image declares in its header before any pixel is decoded, and raises
    ValueError to refuse it: a solid 9000 x 9000 PNG is 0.7 MB of base64 but 243 MB decoded."""
    from PIL import Image

    if not isinstance(data, str):
        raise ValueError(f"an image must be a base64 PNG string, got {type(data).__name__}")
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    try:
        raw = base64.b64decode(data, validate=True)
        im = Image.open(io.BytesIO(raw), formats=["PNG"])  # reads the header only; PNG, no other decoder
    except Exception:  # binascii.Error, PIL.UnidentifiedImageError, ...: not the client's business which
        raise ValueError("not a base64-encoded PNG image") from None
    with im:
        if check_size is not None:
            check_size(*im.size)
        try:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
        except Exception:  # truncated or corrupt pixel data
            raise ValueError("not a decodable PNG image (truncated or corrupt pixel data)") from None


# Layout of the (A)/(B) canvas: a label strip on top, panel A left, a gap, panel B right.
LABEL_HEIGHT = 16
GAP = 8
BORDER_RGB = (255, 255, 255)


def combine_pair(a: np.ndarray, b: np.ndarray, upscale: int = 1) -> np.ndarray:
    """Two [H, W, 3] uint8 images -> one canvas [LABEL_HEIGHT + H*k, 2*W*k + GAP, 3] uint8 with
    "(A)" above the left panel and "(B)" above the right one (k = ``upscale``, nearest neighbour)."""
    from PIL import Image, ImageDraw

    a, b = check_image(a), check_image(b)
    if a.shape != b.shape:
        raise ValueError(f"images to compare must have the same shape, got {a.shape} and {b.shape}")
    if upscale < 1:
        raise ValueError(f"upscale must be >= 1, got {upscale}")
    a, b = (np.repeat(np.repeat(x, upscale, 0), upscale, 1) for x in (a, b))
    h, w, _ = a.shape
    canvas = np.zeros((LABEL_HEIGHT + h, 2 * w + GAP, 3), np.uint8)
    canvas[:LABEL_HEIGHT] = BORDER_RGB
    canvas[:, w:w + GAP] = BORDER_RGB
    canvas[LABEL_HEIGHT:, :w] = a
    canvas[LABEL_HEIGHT:, w + GAP:] = b
    pil = Image.fromarray(canvas)
    draw = ImageDraw.Draw(pil)
    draw.text((2, 2), "(A)", fill=(0, 0, 0))
    draw.text((w + GAP + 2, 2), "(B)", fill=(0, 0, 0))
    return np.asarray(pil).copy()


def split_pair(canvas: np.ndarray, upscale: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`combine_pair`: canvas -> (A, B) at the original resolution."""
    canvas = check_image(canvas)
    h, total_w, _ = canvas.shape
    w = (total_w - GAP) // 2
    if h <= LABEL_HEIGHT or w <= 0 or 2 * w + GAP != total_w:
        raise ValueError(f"canvas of shape {canvas.shape} is not an (A)/(B) pair")
    a, b = canvas[LABEL_HEIGHT:, :w], canvas[LABEL_HEIGHT:, w + GAP:]
    return a[::upscale, ::upscale].copy(), b[::upscale, ::upscale].copy()


DISCRIMINATE_TEMPLATE = (
    "The image shows two pictures side by side: (A) on the left and (B) on the right. "
    'Which one aligns better with the text description "{prompt}"? '
    "Answer <(A) is better> or <(B) is better>."
)
VQA_TEMPLATE = "{question} Answer with yes or no."
EXPAND_TEMPLATE = (
    'Write {n} variations of the text-to-image prompt "{prompt}". Keep its structure and category, '
    "and change the objects, colours or relations. One prompt per line, nothing else."
)
EXPAND_SHAPES_HINT = (
    " Use only the words of the original prompt's grammar: shapes circle, square, triangle; colours "
    + ", ".join(COLORS) + "; relations " + ", ".join(RELATIONS) + "; numbers two, three, four."
)
MUTATE_TEMPLATE = "Write one new text-to-image prompt, unrelated to any earlier one. Answer with the prompt only."
MUTATE_SHAPES_HINT = (
    " It must follow one of these templates: 'a {shape}', 'a {shape} and a {shape}', '{number} {shape}s', "
    "'a {color} {shape}', 'a {shape} {relation} a {shape}', 'a {color} {shape} and a {color} {shape}'."
)
QUESTIONS_TEMPLATE = (
    'Decompose the text-to-image prompt "{prompt}" into atomic yes/no questions about the image '
    "(objects, counts, colours, relations). One question per line, each ending with '?', nothing else."
)

_CHOICE = re.compile(r"\(?\s*([AB])\s*\)?\s+is\s+(?:the\s+)?better", re.IGNORECASE)
_NEITHER = re.compile(r"\b(neither|none)\b", re.IGNORECASE)
_YES_NO = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)
_LIST_MARK = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s*")


def parse_choice(text: str) -> str | None:
    """A reply to the discrimination prompt -> "A", "B", "neither", or None (unparsable).

    Accepts "(A) is better", "<(B) is better>", "A is better."; an answer naming both or neither
    letter is unparsable unless it explicitly says neither/none."""
    found = {m.group(1).upper() for m in _CHOICE.finditer(text or "")}
    if len(found) == 1:
        return found.pop()
    if not found and _NEITHER.search(text or ""):
        return "neither"
    return None


def parse_yes_no(text: str) -> float | None:
    """A reply to a yes/no question -> 1.0 (yes), 0.0 (no), or None (unparsable)."""
    m = _YES_NO.match(text or "")
    return None if m is None else float(m.group(1).lower() == "yes")


def parse_lines(text: str) -> list[str]:
    """A list-style reply -> its non-empty lines, with list marks and surrounding quotes removed."""
    out = []
    for line in (text or "").splitlines():
        line = _LIST_MARK.sub("", line).strip().strip("\"'<>").strip()
        if line:
            out.append(line)
    return out


def in_shapes_grammar(prompt: str) -> bool:
    try:
        parse(prompt)
        return True
    except (ValueError, TypeError):
        return False


def _same_category(prompt: str, category: str) -> bool:
    try:
        return parse(prompt).category == category
    except (ValueError, TypeError):
        return False


def _digest(*parts) -> float:
    """A uniform number in [0, 1) from the content of ``parts`` (str, bytes or arrays)."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(p.tobytes() if isinstance(p, np.ndarray) else str(p).encode())
        h.update(b"\x00")
    return int.from_bytes(h.digest(), "big") / 2**64


class _BatchForms:
    """Batch forms as loops over the single forms; a backend may override any of them."""

    def discriminate_batch(self, prompts, images_lists) -> list[int | None]:
        if len(prompts) != len(images_lists):
            raise ValueError(f"{len(prompts)} prompts but {len(images_lists)} image lists")
        return [self.discriminate(p, ims) for p, ims in zip(prompts, images_lists)]

    def expand_batch(self, prompts, n: int) -> list[list[str]]:
        return [self.expand(p, n) for p in prompts]

    def mutate_batch(self, n: int) -> list[str]:
        return [self.mutate() for _ in range(n)]

    def vqa_batch(self, images, questions_lists) -> list[list[float]]:
        if len(images) != len(questions_lists):
            raise ValueError(f"{len(images)} images but {len(questions_lists)} question lists")
        return [self.vqa(im, qs) for im, qs in zip(images, questions_lists)]

    def questions_batch(self, prompts) -> list[list[str]]:
        return [self.questions(p) for p in prompts]

    def counters(self) -> dict:
        return {"calls": self.calls, "unparsable": self.unparsable}


def _check_images(images) -> list[np.ndarray]:
    if len(images) == 0:
        raise ValueError("discriminate needs at least one image, got none")
    return [check_image(im) for im in images]
