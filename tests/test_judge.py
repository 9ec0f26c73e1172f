"""The VLM judge: the analytic shapes backend, the OpenAI backend against a real HTTP server that
speaks the chat-completions API, and the transformers backend on a tiny random-weight LLaVA."""

import math
import re
import socket
import sys
import threading
import time

import numpy as np
import pytest

import raypref.shapes.detect  # noqa: F401  (the module; raypref.shapes re-exports a function `detect`)
from raypref.judges import JUDGES, OpenAIJudge, ShapesJudge, TransformersJudge, build_judge
from raypref.judges.common import (
    combine_pair,
    decode_png_b64,
    encode_png_b64,
    parse_choice,
    parse_lines,
    parse_yes_no,
    split_pair,
)
from raypref.shapes.grammar import CATEGORIES, eval_prompts, parse
from raypref.shapes.render import Placed, rasterize
from raypref.shapes.teachers import SkillProfile, Teacher

D = sys.modules["raypref.shapes.detect"]
ALWAYS_WRONG = SkillProfile({c: 1.0 for c in CATEGORIES})


def _pairs(n_per_category, seed=0):
    """(prompt, passing render, failing render) triples over all categories."""
    good, bad = Teacher("clean"), Teacher("bad", profile=ALWAYS_WRONG)
    return [(p, good.render_one(p, seed + i), bad.render_one(p, seed + i))
            for i, (_, p) in enumerate(eval_prompts(n_per_category, seed))]


# --------------------------------------------------------------------------------------- shapes

def test_judges_dict_and_build():
    assert JUDGES == {"shapes": ShapesJudge, "openai": OpenAIJudge, "transformers": TransformersJudge}
    with pytest.raises(ValueError, match="unknown judge backend 'nope'"):
        build_judge("nope")
    with pytest.raises(ValueError, match="error_rate"):
        ShapesJudge(error_rate=1.5)


def test_shapes_scores_hand_worked():
    # A red circle alone for "a red circle and a blue square": circle yes, square no, red circle
    # yes, blue square no -> 2 of 4 constraints.
    img = rasterize([Placed("circle", "red", 10.0, 10.0, 5.0)], 32)
    both = rasterize([Placed("circle", "red", 8.0, 8.0, 5.0), Placed("square", "blue", 23.0, 23.0, 5.0)], 32)
    j = ShapesJudge()
    assert j.scores("a red circle and a blue square", [img, both]) == [0.5, 1.0]
    assert j.discriminate("a red circle and a blue square", [img, both]) == 1
    assert j.discriminate("a red circle and a blue square", [img, img]) == 0  # tie -> lowest index
    assert j.discriminate("a triangle", [img, both]) is None  # nothing met
    assert ShapesJudge(threshold=1.0).discriminate("a red circle and a blue square", [img]) is None
    assert ShapesJudge(threshold=0.5).discriminate("a red circle and a blue square", [img]) == 0
    assert j.calls == 3  # three discriminate calls; scores() is not a model query


def test_shapes_discriminate_picks_passing_teacher_render():
    j = ShapesJudge()
    rng = np.random.default_rng(0)
    for p, good, bad in _pairs(3):
        assert D.passes(p, good) and not D.passes(p, bad)
        k = int(rng.integers(3))
        images = [bad, bad, bad]
        images[k] = good
        assert j.discriminate(p, images) == k, p
    with pytest.raises(ValueError, match="uint8"):
        j.discriminate("a circle", [np.zeros((8, 8, 3), np.float32)])
    with pytest.raises(ValueError, match="at least one image"):
        j.discriminate("a circle", [])
    with pytest.raises(ValueError, match="not in the shapes grammar"):
        j.discriminate("a dog", [good])


def test_shapes_error_rate_is_seeded_and_flips_that_fraction():
    triples = _pairs(25)  # 150 inputs
    clean = [ShapesJudge().discriminate(p, [g, b]) for p, g, b in triples]
    assert clean == [0] * len(triples)
    assert ShapesJudge(error_rate=0.0, seed=5).discriminate_batch(
        [p for p, _, _ in triples], [[g, b] for _, g, b in triples]) == clean
    noisy = ShapesJudge(error_rate=0.3, seed=1)
    a = [noisy.discriminate(p, [g, b]) for p, g, b in triples]
    assert a == [noisy.discriminate(p, [g, b]) for p, g, b in triples]  # same input, same answer
    flipped = np.mean([x != 0 for x in a])
    assert 0.2 <= flipped <= 0.4, flipped  # 0.3 +- 2.7 standard deviations at n=150
    assert {x for x in a if x != 0} <= {1, None}
    other_seed = [ShapesJudge(error_rate=0.3, seed=2).discriminate(p, [g, b]) for p, g, b in triples]
    assert other_seed != a
    # vqa flips p(yes) at about the same rate
    nv = ShapesJudge(error_rate=0.3, seed=1)
    truth, got = [], []
    for p, g, _ in triples:
        qs = ShapesJudge().questions(p)
        truth += ShapesJudge().vqa(g, qs)
        got += nv.vqa(g, qs)
    assert 0.2 <= np.mean(np.array(truth) != np.array(got)) <= 0.4


def test_shapes_expand_keeps_category_and_mutate_parses():
    j = ShapesJudge(seed=3)
    for cat in CATEGORIES:
        p = eval_prompts(1, 7)[CATEGORIES.index(cat)][1]
        out = j.expand(p, 5)
        assert len(out) == 5
        for q in out:
            assert parse(q).category == cat and q != p
        if cat != "single_object":  # only 2 other single-object prompts exist
            assert len(set(out)) == 5
    assert j.expand_batch(["a circle", "two squares"], 2)[1][0].endswith("s")
    muts = j.mutate_batch(40)
    assert len({parse(m).category for m in muts}) >= 4
    assert ShapesJudge(seed=3).mutate_batch(5) == ShapesJudge(seed=3).mutate_batch(5)
    with pytest.raises(ValueError, match="not in the shapes grammar"):
        j.expand("a purple cow", 2)


def test_shapes_questions_and_vqa_agree_with_shapes_eval():
    j = ShapesJudge()
    prism = Teacher("prism")  # fails position / counting often: a mix of passes and failures
    outcomes = []
    for i, (_, p) in enumerate(eval_prompts(4, 11)):
        img = prism.render_one(p, i)
        qs = j.questions(p)
        assert qs == [q for q, _ in D.check_results(p, img)]
        p_yes = j.vqa(img, qs)
        assert all((x == 1.0) == ok for x, (_, ok) in zip(p_yes, D.check_results(p, img)))
        outcomes.append((all(x == 1.0 for x in p_yes), D.passes(p, img)))
    assert all(a == b for a, b in outcomes)
    assert {b for _, b in outcomes} == {True, False}
    with pytest.raises(ValueError, match="not one the shapes judge asks"):
        j.vqa(img, ["is it a dog?"])


# ------------------------------------------------------------------------ helpers and parsing

def test_pair_canvas_roundtrip_and_png():
    a = np.zeros((8, 8, 3), np.uint8)
    b = np.zeros((8, 8, 3), np.uint8)
    a[1, 2] = (220, 40, 40)
    b[5, 6] = (40, 80, 230)
    c = combine_pair(a, b, upscale=3)
    assert c.shape == (16 + 24, 2 * 24 + 8, 3)
    assert tuple(c[16 + 3 * 1, 3 * 2]) == (220, 40, 40)  # A's pixel, upscaled, left panel
    assert tuple(c[16 + 3 * 5 + 2, 24 + 8 + 3 * 6 + 2]) == (40, 80, 230)  # B's pixel, right panel
    ra, rb = split_pair(c, 3)
    assert (ra == a).all() and (rb == b).all()
    assert (c[:16] != 255).any()  # the labels are drawn
    assert (decode_png_b64(encode_png_b64(a)) == a).all()
    assert (decode_png_b64("data:image/png;base64," + encode_png_b64(b)) == b).all()
    with pytest.raises(ValueError, match="not a base64-encoded PNG"):
        decode_png_b64("aGVsbG8=")


def test_answer_parsers():
    assert parse_choice("<(A) is better>") == "A"
    assert parse_choice("I think B is better.") == "B"
    assert parse_choice("(A) is better, no wait, (B) is better") is None
    assert parse_choice("Neither matches.") == "neither"
    assert parse_choice("zebra") is None and parse_choice("") is None
    assert parse_yes_no("Yes.") == 1.0 and parse_yes_no(" no, it is not") == 0.0
    assert parse_yes_no("maybe yes") is None
    assert parse_lines('1. a circle\n- "two squares"\n\n  * a red square') == [
        "a circle",
        "two squares",
        "a red square",
    ]


# ------------------------------------------------------------------ openai backend, real HTTP

class _ShapesChatServer:
    """An OpenAI chat-completions server on 127.0.0.1 whose "model" is the shapes judge. It decodes
    the one combined image, splits (A)/(B), and answers in the judge's expected format. The first
    ``garbage`` replies are garbage (to test retries and counting)."""

    def __init__(self):
        import uvicorn
        from fastapi import FastAPI, Request

        self.judge, self.garbage, self.requests, self.good_side = ShapesJudge(), 0, [], []
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            self.requests.append(body)
            return self.complete(body)

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            assert time.time() - t0 < 30, "test server did not start"
            time.sleep(0.05)

    def complete(self, body):
        content = body["messages"][0]["content"]
        text = next(c["text"] for c in content if c["type"] == "text")
        urls = [c["image_url"]["url"] for c in content if c["type"] == "image_url"]
        logprobs = None
        if self.garbage > 0:
            self.garbage -= 1
            reply = "the quick brown fox"
        elif "Which one aligns better" in text:
            assert len(urls) == 1 and urls[0].startswith("data:image/png;base64,")
            prompt = re.search(r'description "(.*?)"', text).group(1)
            a, b = split_pair(decode_png_b64(urls[0]))
            k = self.judge.discriminate(prompt, [a, b])
            self.good_side.append(k)
            reply = {0: "<(A) is better>", 1: "(B) is better."}.get(k, "Neither of them.")
        elif text.endswith("Answer with yes or no."):
            q = text[: -len(" Answer with yes or no.")]
            img = decode_png_b64(urls[0])
            m = re.fullmatch(r'Does this image show "(.*)"\?', q)
            yes = D.passes(m.group(1), img) if m else self.judge.vqa(img, [q])[0] == 1.0
            reply = "Yes" if yes else "No"
            if body.get("logprobs"):  # p(yes) = 0.9 when the answer is yes, 0.1 when no
                py = 0.9 if yes else 0.1
                top = [{"token": "Yes", "logprob": math.log(py), "bytes": None},
                       {"token": "No", "logprob": math.log(1 - py), "bytes": None}]
                logprobs = {"content": [{"token": reply, "logprob": math.log(max(py, 1 - py)), "bytes": None,
                                         "top_logprobs": top}]}
        elif "variations of the text-to-image prompt" in text:
            m = re.search(r'Write (\d+) variations of the text-to-image prompt "(.*?)"', text)
            reply = "\n".join(f"{i + 1}. {p}" for i, p in enumerate(self.judge.expand(m.group(2), int(m.group(1)))))
        elif text.startswith("Write one new text-to-image prompt"):
            reply = self.judge.mutate()
        elif text.startswith("Decompose"):
            reply = "\n".join(self.judge.questions(re.search(r'prompt "(.*?)"', text).group(1)))
        else:
            reply = "?"
        return {
            "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": logprobs,
                         "message": {"role": "assistant", "content": reply}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def chat_server():
    s = _ShapesChatServer()
    yield s
    s.close()


def _openai_judge(server, **kw):
    return OpenAIJudge(model="shapes", base_url=f"http://127.0.0.1:{server.port}/v1", **kw)


def test_openai_discriminate_pairs_and_tournament(chat_server):
    j = _openai_judge(chat_server, seed=0)
    triples = _pairs(2)
    chat_server.good_side.clear()
    for p, g, b in triples:
        assert j.discriminate(p, [g, b]) == 0
        assert j.discriminate(p, [b, g]) == 1
    # the order shown is random: the passing image appeared both as (A) and as (B)
    assert set(chat_server.good_side) == {0, 1}
    assert j.calls == 2 * len(triples) and j.unparsable == 0
    p, g, b = triples[4]
    j2 = _openai_judge(chat_server)
    assert j2.discriminate(p, [b, b, g, b]) == 2  # tournament: 3 pairwise comparisons
    assert j2.calls == 3
    blank = np.full_like(b, 24)  # background only: meets no constraint
    assert j2.discriminate(p, [blank, blank]) is None  # the server says "Neither"
    assert j2.discriminate(p, [blank, blank, g]) == 2  # "neither", then g wins its match
    assert j2.discriminate(p, [g]) == 0 and j2.discriminate(p, [b]) is None  # single image: yes/no
    assert j2.discriminate_batch([p, p], [[g, b], [b, g]]) == [0, 1]
    # batch form: concurrent requests, same answers, every call counted once
    j3 = _openai_judge(chat_server, concurrency=4)
    prompts = [t[0] for t in triples] * 2
    lists = [[g, b] for _, g, b in triples] + [[b, g] for _, g, b in triples]
    assert j3.discriminate_batch(prompts, lists) == [0] * len(triples) + [1] * len(triples)
    assert j3.counters() == {"calls": 2 * len(triples), "unparsable": 0}


def test_openai_retries_and_counts_garbage(chat_server):
    p, g, b = _pairs(1)[5]
    j = _openai_judge(chat_server, max_retries=2)
    chat_server.garbage = 2  # two garbage replies, then a good one: still the right answer
    assert j.discriminate(p, [b, g]) == 1
    assert (j.calls, j.unparsable) == (3, 2)
    chat_server.garbage = 5  # more garbage than retries: no decision, every attempt counted
    assert j.discriminate(p, [b, g]) is None
    assert (j.calls, j.unparsable) == (6, 5)
    chat_server.garbage = 0
    assert j.counters() == {"calls": 6, "unparsable": 5}


def test_openai_vqa_expand_mutate_questions(chat_server):
    p, g, b = _pairs(1)[4]  # a position prompt
    j = _openai_judge(chat_server, shapes_grammar=True)
    qs = j.questions(p)
    assert qs == [q for q, _ in D.checks(parse(p))]
    truth = [float(ok) for _, ok in D.check_results(p, b)]
    assert 0.0 in truth and 1.0 in truth
    assert j.vqa(b, qs) == pytest.approx([0.9 if t else 0.1 for t in truth])  # from logprobs
    assert _openai_judge(chat_server, top_logprobs=0).vqa(b, qs) == truth  # text only: 1/0
    out = j.expand(p, 4)
    assert len(out) == 4 and len(set(out)) == 4
    assert all(parse(q).category == "position" and q != p for q in out)
    assert parse(j.mutate()).category in CATEGORIES
    assert j.unparsable == 0
    chat_server.garbage = 1  # "the quick brown fox" is not in the grammar: counted, retried
    assert parse(j.mutate())
    assert j.unparsable == 1


# -------------------------------------------------------------- transformers backend, tiny LLaVA

def _tiny_llava(path):
    """A random-weight LLaVA (CLIP vision tower + Llama) with a word-level tokenizer: real
    architecture and processor, garbage output."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    words = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "yes", "no", "Yes", "No", "a", "circle", "square",
             "the", "image", "USER:", "ASSISTANT:"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
    )
    template = (
        "{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
        tokenizer=tokenizer, patch_size=8, chat_template=template,
        vision_feature_select_strategy="full", num_additional_image_tokens=1,  # 4 patches + CLS
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=16, patch_size=8),
        text_config=LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                                pad_token_id=0, bos_token_id=2, eos_token_id=3),
        image_token_id=4, vision_feature_select_strategy="full", vision_feature_layer=-1,
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_transformers_judge_survives_garbage(tmp_path):
    path = _tiny_llava(tmp_path / "tiny-llava")
    j = TransformersJudge(str(path), max_new_tokens=4, max_retries=1)
    p, g, b = _pairs(1)[0]
    # The vocabulary cannot even spell "(A) is better": every comparison reply is unparsable.
    assert j.discriminate(p, [g, b]) is None
    assert (j.calls, j.unparsable) == (2, 2)
    p_yes = j.vqa(g, ["is there a circle?", "is the circle red?"])
    assert len(p_yes) == 2 and all(0.0 <= x <= 1.0 for x in p_yes)
    assert j.calls >= 4 and j.unparsable >= 2
    assert isinstance(j.expand("a circle", 2), list)
    assert isinstance(j.questions("a circle"), list)
    assert j.mutate() is None or isinstance(j.mutate(), str)
    assert j.counters()["calls"] == j.calls
