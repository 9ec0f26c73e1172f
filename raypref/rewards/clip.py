"""CLIP score with open_clip, plus the local open_clip loader shared by HPSv2 and the LAION aesthetic.

Score: ``100 * cos(image_embedding, text_embedding)``, the torchmetrics ``CLIPScore`` scale but
WITHOUT its ``max(., 0)`` clamp: clamping maps every negative cosine to the same 0, which would turn
real preference information into ties when ranking K images of one prompt.
"""

from __future__ import annotations

import json
from pathlib import Path

from raypref.rewards.common import check_name, prompts_and_images, resolve_device, to_pil, with_score

__all__ = ["load_open_clip", "open_clip_cosine", "ClipScore"]

_CKPT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
# The shapes CLIP (raypref.shapes.clip, trained by jobs/train_shapes_clip.py), packaged: model_path="shipped".
SHIPPED_CLIP = Path(__file__).resolve().parent.parent / "assets" / "shapes-clip"


def load_open_clip(model_path, arch=None, *, device="cpu", precision="fp32"):
    """Load an open_clip model from LOCAL files only (nothing is downloaded).

    Two layouts:
      * ``model_path`` is a directory holding ``open_clip_config.json`` (``{"model_cfg": ...,
        "preprocess_cfg": ...}``, as open_clip's hub exports write it) and one weights file
        (``open_clip_pytorch_model.bin``, ``*.safetensors``, ...). ``arch`` must be None.
      * ``model_path`` is a checkpoint file (a state dict, or ``{"state_dict": ...}`` as HPSv2
        ships) and ``arch`` is either a built-in open_clip architecture name (``"ViT-H-14"``) or a
        path to a model-config ``.json`` (``{"embed_dim", "vision_cfg", "text_cfg", ...}``),
        registered with ``open_clip.add_model_config`` under its file stem.

    Returns:
        ``(model, preprocess, tokenizer)``: the model in eval mode on ``device``, the eval image
        transform (PIL -> float tensor ``[3, S, S]``), and the tokenizer (list of str -> int64
        ``[B, context_length]``).
    """
    import open_clip

    path = Path(model_path)
    if not path.exists():
        raise FileNotFoundError(
            f"open_clip model_path {str(model_path)!r} does not exist (expected a directory with "
            f"open_clip_config.json + weights, or a checkpoint file with arch=...)"
        )
    if path.is_dir():
        if arch is not None:
            raise ValueError(
                f"arch={arch!r} given with a model directory {str(path)!r}: "
                "the directory's open_clip_config.json defines the architecture"
            )
        if not (path / "open_clip_config.json").is_file():
            raise FileNotFoundError(f"open_clip model directory {str(path)!r} has no open_clip_config.json")
        if not any(p.suffix in _CKPT_SUFFIXES for p in path.iterdir()):
            raise FileNotFoundError(
                f"open_clip model directory {str(path)!r} holds no weights file ({', '.join(_CKPT_SUFFIXES)})"
            )
        model_name, pretrained = f"local-dir:{path}", None
    else:
        if arch is None:
            raise ValueError(
                f"model_path {str(path)!r} is a checkpoint file: "
                "pass arch= (an open_clip architecture name or a model-config .json path)"
            )
        arch = str(arch)
        if arch.endswith(".json"):
            cfg_path = Path(arch)
            if not cfg_path.is_file():
                raise FileNotFoundError(f"open_clip model config {arch!r} does not exist")
            cfg = json.loads(cfg_path.read_text())
            missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
            if missing:
                raise ValueError(
                    f"open_clip model config {arch!r} lacks {missing}; it must be a bare model config "
                    "(for a {'model_cfg': ...} file use the directory layout)"
                )
            # Re-adding the path makes this file win if another config with the same stem was added earlier.
            open_clip.add_model_config(cfg_path)
            arch = cfg_path.stem
        elif arch not in open_clip.list_models():
            raise ValueError(
                f"unknown open_clip architecture {arch!r}: "
                "give a name from open_clip.list_models() or a model-config .json path"
            )
        model_name, pretrained = arch, str(path)

    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name,
            pretrained=pretrained,
            device=resolve_device(device),
            precision=precision,
            require_pretrained=True,
        )
    except Exception as e:  # state-dict mismatch, unreadable file, ...
        raise RuntimeError(f"could not load open_clip model {model_name!r} from {str(path)!r}: {e}") from e
    tokenizer = open_clip.get_tokenizer(model_name)
    model.eval()
    return model, preprocess, tokenizer


def open_clip_cosine(model, preprocess, tokenizer, prompts, images, device):
    """Cosine similarity of each (prompt, image) pair, in one batched forward pass.

    Args:
        prompts: list of str ``[B]``; images: list of uint8 ``[H, W, 3]`` (length B).
    Returns:
        float32 ``[B]`` on CPU.
    """
    import torch

    dtype = next(model.parameters()).dtype
    pixels = torch.stack([preprocess(im) for im in to_pil(images)]).to(device, dtype=dtype)
    tokens = tokenizer(prompts).to(device)
    with torch.no_grad():
        img = model.encode_image(pixels, normalize=True)
        txt = model.encode_text(tokens, normalize=True)
    return (img * txt).sum(dim=-1).float().cpu()


class ClipScore:
    """CLIP score ``100 * cos(image, prompt)`` from a local open_clip model.

    Args:
        model_path: directory with open_clip_config.json + weights, or a checkpoint file (then pass
            ``arch``); see ``load_open_clip``. ``"shipped"``: the packaged shapes CLIP.
        arch: open_clip architecture name or model-config .json path (checkpoint-file layout only).
    """

    def __init__(self, model_path, *, arch=None, device="cpu", name="clip", precision="fp32"):
        self.name = check_name(name)
        self.device = resolve_device(device)
        if str(model_path) == "shipped":
            model_path = SHIPPED_CLIP
        self.model, self.preprocess, self.tokenizer = load_open_clip(
            model_path, arch, device=self.device, precision=precision
        )

    def __call__(self, batch: dict) -> dict:
        prompts, images = prompts_and_images(batch)
        if not images:
            return with_score(batch, self.name, [])
        cos = open_clip_cosine(self.model, self.preprocess, self.tokenizer, prompts, images, self.device)
        return with_score(batch, self.name, 100.0 * cos.numpy())
