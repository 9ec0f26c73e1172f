"""LAION aesthetic predictor ("improved-aesthetic-predictor", christophschuhmann): an MLP on the
L2-normalised CLIP image embedding, trained to regress AVA/LAION-Logos/SAC ratings (~1-10).

The released head ``sac+logos+ava1-l14-linearMSE.pth`` is a state dict for the MLP below
(keys ``layers.{0,2,4,6,7}.{weight,bias}``) on OpenAI CLIP ViT-L/14 (embed dim 768); in open_clip
that CLIP is ``arch="ViT-L-14-quickgelu"`` with a local state-dict checkpoint, or a local
open_clip directory. The prompt is not used.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from PIL import Image

from raypref.rewards.clip import load_open_clip
from raypref.rewards.common import batch_images, check_name, resolve_device, to_pil, with_score

__all__ = ["AestheticMLP", "LaionAesthetic"]  # noqa: F822 - AestheticMLP comes from the module __getattr__


@cache
def _mlp_class():
    # Defined on first use so that importing raypref.rewards (every reward actor does) needs no torch.
    from torch import nn

    class AestheticMLP(nn.Module):
        """The improved-aesthetic-predictor head: ``[B, embed_dim] -> [B, 1]``.

        Layout kept verbatim (incl. the dropouts, inactive in eval) so released state dicts load as-is.
        """

        def __init__(self, input_size: int = 768):
            super().__init__()
            self.input_size = input_size
            self.layers = nn.Sequential(
                nn.Linear(input_size, 1024),
                nn.Dropout(0.2),
                nn.Linear(1024, 128),
                nn.Dropout(0.2),
                nn.Linear(128, 64),
                nn.Dropout(0.1),
                nn.Linear(64, 16),
                nn.Linear(16, 1),
            )

        def forward(self, x):
            return self.layers(x)

    return AestheticMLP


def __getattr__(name: str):
    if name == "AestheticMLP":  # ``from raypref.rewards.aesthetic import AestheticMLP`` still works
        return _mlp_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _load_head_state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        import torch

        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or "layers.0.weight" not in sd:
        raise ValueError(
            f"aesthetic head {str(path)!r} is not an improved-aesthetic-predictor state dict (no 'layers.0.weight')"
        )
    return sd


class LaionAesthetic:
    """LAION aesthetic score of each image.

    Args:
        model_path: the MLP head weights file (``.pth``/``.pt``/``.safetensors``).
        clip_path: the CLIP image encoder, as for ``load_open_clip``: an open_clip directory, or a
            checkpoint file with ``clip_arch``.
        clip_arch: open_clip architecture name or model-config .json (checkpoint-file layout).
    """

    def __init__(
        self,
        model_path,
        *,
        clip_path,
        clip_arch="ViT-L-14-quickgelu",
        device="cpu",
        name="aesthetic_laion",
        precision="fp32",
    ):
        self.name = check_name(name)
        self.device = resolve_device(device)
        head_path = Path(model_path)
        if not head_path.is_file():
            raise FileNotFoundError(f"aesthetic head model_path {str(model_path)!r} is not a file")
        if Path(clip_path).is_dir():
            clip_arch = None  # the directory's open_clip_config.json defines the architecture
        import torch

        self.clip, self.preprocess, _ = load_open_clip(clip_path, clip_arch, device=self.device, precision=precision)

        # The head's input width follows the CLIP embedding width (768 for ViT-L/14).
        with torch.no_grad():
            dummy = self.preprocess(Image.new("RGB", (8, 8)))[None].to(
                self.device, dtype=next(self.clip.parameters()).dtype
            )
            embed_dim = self.clip.encode_image(dummy).shape[-1]
        sd = _load_head_state_dict(head_path)
        if sd["layers.0.weight"].shape[1] != embed_dim:
            raise ValueError(
                f"aesthetic head {str(head_path)!r} expects {sd['layers.0.weight'].shape[1]}-d embeddings "
                f"but the CLIP model gives {embed_dim}-d"
            )
        self.head = _mlp_class()(embed_dim)
        self.head.load_state_dict(sd, strict=True)
        self.head.eval().to(self.device)

    def __call__(self, batch: dict) -> dict:
        import torch

        images = batch_images(batch)
        if not images:
            return with_score(batch, self.name, [])
        dtype = next(self.clip.parameters()).dtype
        pixels = torch.stack([self.preprocess(im) for im in to_pil(images)]).to(self.device, dtype=dtype)
        with torch.no_grad():
            emb = self.clip.encode_image(pixels, normalize=True).float()
            scores = self.head(emb).squeeze(-1)
        return with_score(batch, self.name, scores.cpu().numpy())
