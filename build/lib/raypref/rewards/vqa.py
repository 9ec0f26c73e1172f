"""VQA reward: a judge (VLM) answers the prompt's yes/no questions about the image (DSG / VQAScore style).

Score = mean p(yes) over the questions the judge derives from the prompt. Any ``raypref.judges``
backend works: ``shapes`` (the analytic judge; ``error_rate`` simulates a weak VLM), ``openai`` (a
served VLM behind an OpenAI-compatible endpoint) or ``transformers`` (a local VLM). It differs from
``faithfulness`` in what it sees: the judge's questions and answers, errors included, not the
detector's constraint fractions.
"""

from __future__ import annotations

import numpy as np

from raypref.rewards.common import check_name, prompts_and_images, with_score


class VQAReward:
    """{"prompt": [B] str, "image": [B, H, W, 3] uint8} -> adds "score_{name}" [B] float32 in [0, 1]."""

    def __init__(self, model_path: str | None = None, *, judge: str | None = None, name: str = "vqa",
                 device: str = "cpu", **judge_kwargs):
        """``model_path``: a local VLM directory (the ``transformers`` judge); without it the analytic
        ``shapes`` judge, by default wrong on 10 % of answers (``error_rate``), like a fair VLM.
        ``judge`` / ``judge_kwargs`` pick any backend of ``raypref.judges.JUDGES`` explicitly."""
        from raypref.judges import build_judge

        self.name = check_name(name)
        if judge is None:
            judge = "transformers" if model_path else "shapes"
        if model_path:
            judge_kwargs.update(model_path=model_path, device=device)
        elif judge == "shapes":
            judge_kwargs.setdefault("error_rate", 0.1)
        self.judge = build_judge(judge, **judge_kwargs)

    def __call__(self, batch: dict) -> dict:
        prompts, images = prompts_and_images(batch)
        questions = self.judge.questions_batch(prompts)
        empty = [p for p, qs in zip(prompts, questions) if not qs]
        if empty:
            raise ValueError(f"the judge asked no question about prompt {empty[0]!r}")
        answers = self.judge.vqa_batch(images, questions)
        scores = np.array([float(np.mean(a)) for a in answers], dtype=np.float32)
        return with_score(batch, self.name, scores)
