"""The shapes CLIP: a tiny open_clip model from a custom config, trained contrastively on shapes renders.

Saved in open_clip's local-directory layout (``open_clip_config.json`` + ``open_clip_model.safetensors``)
so ``raypref.rewards.clip.ClipScore(path)`` loads it with the same code as any real CLIP. Like real
CLIP it learns what distinguishes captions within a batch (mostly which shapes and colours are
present) and is weaker at counting and spatial relations; ``probe`` measures that per category.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from raypref.shapes.grammar import CATEGORIES, sample_prompts

MODEL_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 96, "patch_size": 4, "head_width": 32},
    # open_clip's BPE vocabulary (49408 tokens, shipped inside the package) dominates the size:
    # a 32-wide text tower keeps the model under 10 MB
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 3},
}
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
WEIGHTS = "open_clip_model.safetensors"


def build_model(seed: int = 0):
    """A randomly initialised shapes CLIP and its tokenizer."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.CLIP(**MODEL_CFG)
    return model, open_clip.get_tokenizer("ViT-B-32", context_length=MODEL_CFG["text_cfg"]["context_length"])


def _pixels(images: np.ndarray) -> torch.Tensor:
    """[B, H, W, 3] uint8 -> [B, 3, H, W] normalised exactly as the saved preprocess config does."""
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def save(model, out_dir: str | Path) -> Path:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"model_cfg": MODEL_CFG,
           "preprocess_cfg": {"size": MODEL_CFG["vision_cfg"]["image_size"], "mean": list(MEAN), "std": list(STD),
                              "interpolation": "bicubic", "resize_mode": "shortest"}}
    (out / "open_clip_config.json").write_text(json.dumps(cfg, indent=1))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / WEIGHTS))
    return out


def train(out_dir: str | Path, steps: int = 1500, batch_size: int = 128, lr: float = 1e-3,
          pool_size: int = 20000, teacher: str = "clean", seed: int = 0, log_every: int = 100) -> dict:
    """Contrastive (InfoNCE) training on (prompt, teacher render) pairs; saves to ``out_dir``."""
    from raypref.shapes.teachers import render_pool

    model, tokenizer = build_model(seed)
    prompts, images = render_pool(teacher, pool_size, 32, (3, 7), seed)
    x_all, tokens_all = _pixels(images), tokenizer(prompts)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed)
    t0, log = time.time(), []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(len(prompts), (batch_size,), generator=gen)
        img = torch.nn.functional.normalize(model.encode_image(x_all[idx]), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(tokens_all[idx]), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.T
        # identical prompts in a batch are not negatives of each other
        same = torch.tensor([[prompts[i] == prompts[j] for j in idx.tolist()] for i in idx.tolist()])
        target = same.float() / same.sum(1, keepdim=True)
        loss = 0.5 * (torch.nn.functional.cross_entropy(logits, target)
                      + torch.nn.functional.cross_entropy(logits.T, target.T))
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if (step + 1) % log_every == 0:
            log.append({"step": step + 1, "loss": loss.item(), "s": time.time() - t0})
            print(log[-1], flush=True)
    model.eval()
    save(model, out_dir)
    return {"steps": steps, "final_loss": log[-1]["loss"] if log else float("nan"), "seconds": time.time() - t0}


def probe(clip_dir: str | Path, n_per_category: int = 100, seed: int = 1) -> dict[str, float]:
    """Per category, how often the CLIP scores a correct render above a wrong one for the same prompt
    (the wrong one made by the category's typical mistake). 0.5 is chance."""
    from raypref.rewards.clip import ClipScore
    from raypref.shapes.detect import passes
    from raypref.shapes.grammar import parse
    from raypref.shapes.render import layout, rasterize, render
    from raypref.shapes.teachers import wrong_scene

    scorer = ClipScore(str(clip_dir))
    rng = np.random.default_rng(seed)
    out = {}
    for c in CATEGORIES:
        prompts, good, bad = [], [], []
        for p in sample_prompts(c, n_per_category, seed):
            scene = parse(p)
            good_im = render(scene, rng)
            for _ in range(100):
                objs, rel = wrong_scene(scene, rng)
                try:
                    bad_im = rasterize(layout(objs, rng, 32, (4, 7), rel), 32)
                except RuntimeError:
                    continue
                if not passes(scene, bad_im):
                    break
            prompts.append(p)
            good.append(good_im)
            bad.append(bad_im)
        s_good = scorer({"prompt": np.array(prompts), "image": np.stack(good)})["score_clip"]
        s_bad = scorer({"prompt": np.array(prompts), "image": np.stack(bad)})["score_clip"]
        out[c] = float(np.mean(s_good > s_bad))
    return out
