"""Chat VLM judges: the judge protocol over a ``_chat(text, image) -> (reply, p_yes)`` primitive, for
any OpenAI-compatible endpoint (vLLM, Ray Serve LLM, hosted APIs) or a local transformers VLM."""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from raypref.judges.common import (
    DISCRIMINATE_TEMPLATE,
    EXPAND_SHAPES_HINT,
    EXPAND_TEMPLATE,
    MUTATE_SHAPES_HINT,
    MUTATE_TEMPLATE,
    QUESTIONS_TEMPLATE,
    VQA_TEMPLATE,
    _BatchForms,
    _check_images,
    _same_category,
    check_image,
    combine_pair,
    encode_png_b64,
    in_shapes_grammar,
    parse_choice,
    parse_lines,
    parse_yes_no,
)
from raypref.shapes.grammar import parse


class _ChatJudge(_BatchForms):
    """The judge protocol over a chat VLM. A subclass provides ``_chat(text, image=None)`` returning
    (reply text, p(yes) from token probabilities or None); ``self.max_retries``, ``self.rng``,
    ``self.upscale`` and ``self.shapes_grammar`` are set by the subclass."""

    def _ask(self, text: str, image, parse_fn, want_p_yes: bool = False):
        """Ask up to 1 + max_retries times until ``parse_fn(reply)`` is not None; every call and
        every unparsable reply counted. Returns the parsed value or None."""
        for _ in range(1 + self.max_retries):
            self._count(calls=1)
            reply, p_yes = self._chat(text, image, want_p_yes)
            value = parse_fn(reply)
            if value is not None:
                return p_yes if (want_p_yes and p_yes is not None) else value
            self._count(unparsable=1)
        return None

    def _count(self, calls: int = 0, unparsable: int = 0):
        with self._lock:  # batch forms may ask from several threads
            self.calls += calls
            self.unparsable += unparsable

    def _compare(self, prompt: str, a: np.ndarray, b: np.ndarray) -> int | str | None:
        """0 if ``a`` is better, 1 if ``b``, "neither", or None (unparsable). Order shown is random."""
        with self._lock:
            swap = self.rng.random() < 0.5
        canvas = combine_pair(b, a, self.upscale) if swap else combine_pair(a, b, self.upscale)
        choice = self._ask(DISCRIMINATE_TEMPLATE.format(prompt=prompt), canvas, parse_choice)
        if choice not in ("A", "B"):
            return choice
        return int((choice == "B") != swap)

    def discriminate(self, prompt: str, images) -> int | None:
        """One image: a yes/no "does it show the prompt". Two: one comparison. More: a knockout
        tournament (the current winner meets the next image; an unparsable match keeps it).
        None when the last decisive answer was "neither", or when nothing could be parsed."""
        images = _check_images(images)
        if len(images) == 1:
            p = self._ask(VQA_TEMPLATE.format(question=f'Does this image show "{prompt}"?'), images[0], parse_yes_no)
            return 0 if p is not None and p >= 0.5 else None
        winner, ok = 0, False
        for j in range(1, len(images)):
            r = self._compare(prompt, images[winner], images[j])
            if r in (0, 1):
                winner, ok = (j if r == 1 else winner), True
            elif r == "neither":
                ok = False
        return winner if ok else None

    def vqa(self, image, questions) -> list[float]:
        """p(yes) per question: from token probabilities when the backend returns them, else 1/0
        from the text; 0.5 (no information) when no reply could be parsed."""
        image = check_image(image)
        out = []
        for q in questions:
            p = self._ask(VQA_TEMPLATE.format(question=q), image, parse_yes_no, want_p_yes=True)
            out.append(0.5 if p is None else float(p))
        return out

    def _valid(self, line: str, original: str | None, shapes: bool) -> bool:
        if "\n" in line or not line.strip() or line == original:
            return False
        if shapes:
            return _same_category(line, parse(original).category) if original else in_shapes_grammar(line)
        return True

    def expand(self, prompt: str, n: int) -> list[str]:
        """Up to ``n`` distinct variations. Shapes-grammar prompts must come back in the grammar and
        the same category; other prompts as non-empty single lines. A reply with no valid line is
        unparsable (counted, retried)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        shapes = in_shapes_grammar(prompt)
        text = EXPAND_TEMPLATE.format(n=n, prompt=prompt) + (EXPAND_SHAPES_HINT if shapes else "")
        out: list[str] = []
        for _ in range(1 + self.max_retries):
            if len(out) >= n:
                break
            self._count(calls=1)
            reply, _ = self._chat(text, None, False)
            lines = [x for x in parse_lines(reply) if self._valid(x, prompt, shapes) and x not in out]
            if not lines:
                self._count(unparsable=1)
            out += lines[: n - len(out)]
        return out

    def mutate(self) -> str | None:
        """A fresh prompt (in the shapes grammar when ``shapes_grammar``); None if none parsed."""
        text = MUTATE_TEMPLATE + (MUTATE_SHAPES_HINT if self.shapes_grammar else "")

        def first_valid(reply):
            lines = parse_lines(reply)
            return lines[0] if len(lines) == 1 and self._valid(lines[0], None, self.shapes_grammar) else None

        return self._ask(text, None, first_valid)

    def questions(self, prompt: str) -> list[str]:
        def qs(reply):
            lines = [x for x in parse_lines(reply) if x.endswith("?")]
            return lines or None

        return self._ask(QUESTIONS_TEMPLATE.format(prompt=prompt), None, qs) or []


def _p_yes_from_top(top: dict[str, float]) -> float | None:
    """{token: logprob} of the first answer token -> p(yes) / (p(yes) + p(no)), or None."""
    yes = sum(np.exp(lp) for t, lp in top.items() if t.strip().lower() == "yes")
    no = sum(np.exp(lp) for t, lp in top.items() if t.strip().lower() == "no")
    return float(yes / (yes + no)) if yes + no > 0 else None


class OpenAIJudge(_ChatJudge):
    """A judge over any OpenAI-compatible chat-completions endpoint, through the ``openai`` client.

    Images go as base64 PNG data URLs; a comparison shows both images on ONE canvas labelled (A)
    and (B) in random order (EvolveDirector's prompt). ``top_logprobs > 0`` asks the server for
    token log-probabilities so that vqa returns a soft p(yes); servers that ignore it give 1/0.
    The batch forms send up to ``concurrency`` requests at once (vLLM batches them on its side);
    with concurrency > 1 which pair is shown in which order is still random but no longer seeded.
    """

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key: str = "EMPTY",
        max_retries: int = 2,
        temperature: float = 0.0,
        max_tokens: int = 128,
        top_logprobs: int = 5,
        upscale: int = 1,
        shapes_grammar: bool = False,
        seed: int = 0,
        timeout: float = 60.0,
        concurrency: int = 8,
    ):
        from openai import OpenAI

        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.model, self.max_retries, self.temperature = model, int(max_retries), float(temperature)
        self.max_tokens, self.top_logprobs, self.upscale = int(max_tokens), int(top_logprobs), int(upscale)
        self.shapes_grammar = bool(shapes_grammar)
        self.rng = random.Random(f"openai-judge:{seed}")
        # The client's own retries cover transport errors; ours cover unparsable answers.
        self.client = OpenAI(base_url=base_url, api_key=api_key, timeout=timeout)
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.concurrency = int(concurrency)
        self._lock = threading.Lock()
        self.calls = 0
        self.unparsable = 0

    def _map(self, fn, *iterables) -> list:
        if self.concurrency == 1:
            return list(map(fn, *iterables))
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(fn, *iterables))

    def discriminate_batch(self, prompts, images_lists) -> list[int | None]:
        if len(prompts) != len(images_lists):
            raise ValueError(f"{len(prompts)} prompts but {len(images_lists)} image lists")
        return self._map(self.discriminate, prompts, images_lists)

    def vqa_batch(self, images, questions_lists) -> list[list[float]]:
        if len(images) != len(questions_lists):
            raise ValueError(f"{len(images)} images but {len(questions_lists)} question lists")
        return self._map(self.vqa, images, questions_lists)

    def expand_batch(self, prompts, n: int) -> list[list[str]]:
        return self._map(lambda p: self.expand(p, n), prompts)

    def questions_batch(self, prompts) -> list[list[str]]:
        return self._map(self.questions, prompts)

    def mutate_batch(self, n: int) -> list[str]:
        return self._map(lambda _: self.mutate(), range(n))

    def _chat(self, text: str, image, want_p_yes: bool):
        content = [{"type": "text", "text": text}]
        if image is not None:
            content.append(
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + encode_png_b64(image)}}
            )
        kwargs = {}
        if want_p_yes and self.top_logprobs > 0:
            kwargs = {"logprobs": True, "top_logprobs": self.top_logprobs}
        resp = self.client.chat.completions.create(
            model=self.model,
            messages=[{"role": "user", "content": content}],
            temperature=self.temperature,
            max_tokens=self.max_tokens,
            **kwargs,
        )
        choice = resp.choices[0]
        reply = choice.message.content or ""
        p_yes = None
        lp = getattr(choice, "logprobs", None)
        if want_p_yes and lp is not None and lp.content:
            first = lp.content[0]
            top = {t.token: t.logprob for t in (first.top_logprobs or [])} or {first.token: first.logprob}
            p_yes = _p_yes_from_top(top)
        return reply, p_yes


class TransformersJudge(_ChatJudge):
    """A judge over a local VLM: ``AutoModelForImageTextToText`` + ``AutoProcessor`` from a LOCAL
    path (e.g. LLaVA, Qwen2-VL), greedy decoding. vqa's p(yes) comes from the first generated
    token's logits over the tokens "yes"/"no" (any case, with or without a leading space) when the
    vocabulary has them."""

    def __init__(
        self,
        model_path: str,
        device: str = "cpu",
        dtype: str = "float32",
        max_new_tokens: int = 16,
        max_retries: int = 1,
        upscale: int = 1,
        shapes_grammar: bool = False,
        seed: int = 0,
    ):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.processor = AutoProcessor.from_pretrained(model_path)
        self.model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=getattr(torch, dtype))
        self.model.to(device).eval()
        self.device, self.max_new_tokens, self.max_retries = device, int(max_new_tokens), int(max_retries)
        self.upscale, self.shapes_grammar = int(upscale), bool(shapes_grammar)
        self.rng = random.Random(f"transformers-judge:{seed}")
        self._lock = threading.Lock()
        tok = self.processor.tokenizer
        vocab = tok.get_vocab()
        ids = lambda words: sorted({vocab[w] for w in words if w in vocab})  # noqa: E731
        self._yes_ids = ids(["yes", "Yes", "YES", "\u2581yes", "\u2581Yes", "\u0120yes", "\u0120Yes"])
        self._no_ids = ids(["no", "No", "NO", "\u2581no", "\u2581No", "\u0120no", "\u0120No"])
        self.calls = 0
        self.unparsable = 0

    def _chat(self, text: str, image, want_p_yes: bool):
        import torch
        from PIL import Image

        content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": text}]
        chat = self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        images = [Image.fromarray(check_image(image))] if image is not None else None
        inputs = self.processor(text=[chat], images=images, return_tensors="pt").to(self.device)
        with torch.no_grad():
            out = self.model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                output_scores=True, return_dict_in_generate=True,
            )
        new = out.sequences[0, inputs["input_ids"].shape[1]:]
        reply = self.processor.tokenizer.decode(new, skip_special_tokens=True)
        p_yes = None
        if want_p_yes and self._yes_ids and self._no_ids and out.scores:
            probs = torch.softmax(out.scores[0][0].float(), -1)
            yes, no = probs[self._yes_ids].sum().item(), probs[self._no_ids].sum().item()
            p_yes = yes / (yes + no) if yes + no > 0 else None
        return reply, p_yes
