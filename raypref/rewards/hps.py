"""HPSv2 (Human Preference Score v2, arXiv 2306.09341): an open_clip ViT-H-14 fine-tuned on human
preferences. The released checkpoints (``HPS_v2_compressed.pt``, ``HPS_v2.1_compressed.pt``) are
``{"state_dict": ...}`` files for the stock open_clip ViT-H-14 architecture.

Score: ``cos(image, prompt)`` of the fine-tuned embeddings, as HPSv2's own ``score.py`` computes
it (``diag(image_features @ text_features.T)`` on normalised features), typically ~0.2-0.35.
"""

from __future__ import annotations

from pathlib import Path

from raypref.rewards.clip import load_open_clip, open_clip_cosine
from raypref.rewards.common import check_name, prompts_and_images, resolve_device, with_score

__all__ = ["HPSv2"]


class HPSv2:
    """HPSv2 reward from a local checkpoint.

    Args:
        model_path: the HPS checkpoint file, or an open_clip model directory (``arch`` is then ignored).
        arch: open_clip architecture the checkpoint is for; ``"ViT-H-14"`` for the released
            checkpoints, or a model-config .json path (tests use a tiny one).
    """

    def __init__(self, model_path, *, arch="ViT-H-14", device="cpu", name="hpsv2", precision="fp32"):
        self.name = check_name(name)
        self.device = resolve_device(device)
        if Path(model_path).is_dir():
            arch = None  # the directory's open_clip_config.json defines the architecture
        self.model, self.preprocess, self.tokenizer = load_open_clip(
            model_path, arch, device=self.device, precision=precision
        )

    def __call__(self, batch: dict) -> dict:
        prompts, images = prompts_and_images(batch)
        if not images:
            return with_score(batch, self.name, [])
        cos = open_clip_cosine(self.model, self.preprocess, self.tokenizer, prompts, images, self.device)
        return with_score(batch, self.name, cos.numpy())
