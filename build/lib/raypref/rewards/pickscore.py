"""PickScore (arXiv 2305.01569): a CLIP-H fine-tuned on Pick-a-Pic preferences, in transformers format.

Score, as in the PickScore README: ``logit_scale.exp() * cos(image, prompt)`` (~20 for real images).
The released model (``yuvalkirstain/PickScore_v1``) is used with the processor of
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``; both must be local directories here.
"""

from __future__ import annotations

from pathlib import Path

from raypref.rewards.common import check_name, prompts_and_images, resolve_device, to_pil, with_score

__all__ = ["PickScore"]


def _check_local_dir(path, what: str, needs: tuple[str, ...]) -> str:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{what} {str(path)!r} is not a local directory (nothing is downloaded)")
    if not any((p / f).is_file() for f in needs):
        raise FileNotFoundError(f"{what} {str(path)!r} has none of {list(needs)}")
    return str(p)


class PickScore:
    """PickScore reward from local transformers directories.

    Args:
        model_path: directory of a ``CLIPModel`` (``config.json`` + weights).
        processor_path: directory of its ``CLIPProcessor`` (tokenizer + image processor); defaults to
            ``model_path``.
    """

    def __init__(self, model_path, *, processor_path=None, device="cpu", name="pickscore", dtype=None):
        import torch
        from transformers import AutoProcessor, CLIPModel

        dtype = torch.float32 if dtype is None else dtype
        self.name = check_name(name)
        self.device = resolve_device(device)
        model_dir = _check_local_dir(model_path, "PickScore model_path", ("config.json",))
        proc_dir = _check_local_dir(
            processor_path or model_path,
            "PickScore processor_path",
            ("processor_config.json", "preprocessor_config.json"),
        )
        self.processor = AutoProcessor.from_pretrained(proc_dir, local_files_only=True)
        self.model = CLIPModel.from_pretrained(model_dir, local_files_only=True, dtype=dtype).eval().to(self.device)
        self.max_length = self.model.config.text_config.max_position_embeddings

    def __call__(self, batch: dict) -> dict:
        import torch

        prompts, images = prompts_and_images(batch)
        if not images:
            return with_score(batch, self.name, [])
        pix = self.processor(images=to_pil(images), return_tensors="pt")["pixel_values"]
        text = self.processor(
            text=prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        with torch.no_grad():
            img = self.model.get_image_features(pixel_values=pix.to(self.device, dtype=self.model.dtype)).pooler_output
            txt = self.model.get_text_features(
                input_ids=text["input_ids"].to(self.device), attention_mask=text["attention_mask"].to(self.device)
            ).pooler_output
            img = img / img.norm(dim=-1, keepdim=True)
            txt = txt / txt.norm(dim=-1, keepdim=True)
            scores = self.model.logit_scale.exp() * (img * txt).sum(dim=-1)
        return with_score(batch, self.name, scores.float().cpu().numpy())
