"""ImageReward (arXiv 2304.05977): a BLIP-based reward model, via the ``image-reward`` package.

``image-reward`` is NOT a raypref dependency: it pins ``timm==0.6.13`` and ``fairscale==0.4.13``
(open_clip here needs a current timm), and its BLIP text encoder calls
``BertTokenizer.from_pretrained("bert-base-uncased")`` at construction, i.e. it needs that
tokenizer in the local Hugging Face cache (run with ``HF_HUB_OFFLINE=1``). Install it in a separate
environment to use this reward.

Score: ImageReward's own normalised reward (``(mlp(feature) - 0.167) / 1.033``), one pair at a time
(the package's ``score`` is not batched).
"""

from __future__ import annotations

from pathlib import Path

from raypref.rewards.common import check_name, prompts_and_images, resolve_device, to_pil, with_score

__all__ = ["ImageRewardScore"]

_INSTALL_HINT = (
    "the ImageReward reward needs the `image-reward` package (pip install image-reward), which is not "
    "installed; it is kept out of raypref's dependencies because it pins timm==0.6.13 and "
    "fairscale==0.4.13, and it loads the 'bert-base-uncased' tokenizer from the Hugging Face cache"
)


class ImageRewardScore:
    """ImageReward reward from local files.

    Args:
        model_path: ``ImageReward.pt`` (the released state dict).
        med_config: ``med_config.json`` (BLIP text-encoder config shipped next to it).
    """

    def __init__(self, model_path, *, med_config, device="cpu", name="imagereward"):
        try:
            import ImageReward as RM
        except ImportError as e:
            raise ImportError(_INSTALL_HINT) from e
        self.name = check_name(name)
        self.device = resolve_device(device)
        for what, p in (("model_path", model_path), ("med_config", med_config)):
            if not Path(p).is_file():
                raise FileNotFoundError(f"ImageReward {what} {str(p)!r} is not a file (nothing is downloaded)")
        # A file path (not a model name) makes RM.load skip its hub download.
        self.model = RM.load(str(model_path), device=str(self.device), med_config=str(med_config))
        self.model.eval()

    def __call__(self, batch: dict) -> dict:
        import torch

        prompts, images = prompts_and_images(batch)
        with torch.no_grad():
            scores = [self.model.score(p, im) for p, im in zip(prompts, to_pil(images))]
        return with_score(batch, self.name, scores)
