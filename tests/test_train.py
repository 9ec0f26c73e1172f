"""Preference training (raypref.train): every method x {LoRA, full} x {epsilon, flow} on tiny models.

The data is a tiny preference table built here from teacher renders (raypref.shapes.teachers) with
prefdata.make_row: per prompt K=4 images from four teachers with a fixed quality order
(clean > vellum > prism > smudged = the clean render plus strong pixel noise) and consensus pairs on even rows only.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from raypref import collate, heldout, train, train_config, train_state
from raypref.lora import fold_lora, load_lora, merge_lora_checkpoint
from raypref.models import load_adapter
from raypref.prefdata import make_row, to_table
from raypref.shapes.grammar import CATEGORIES, sample_prompts
from raypref.shapes.teachers import Teacher
from tests.presets import train_tiny
from tests.tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]
RES = 16
COMBOS = [(m, lora, fam) for m in train_config.METHODS for lora in (True, False) for fam in ("pixart", "shapes")]


def distinct_prompts(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n distinct (category, prompt), categories interleaved."""
    per_cat = [list(dict.fromkeys(sample_prompts(c, 4 * n, seed))) for c in CATEGORIES]
    out = {}
    for i in range(4 * n):
        for c, ps in zip(CATEGORIES, per_cat):
            if i < len(ps) and ps[i] not in out:
                out[ps[i]] = c
    assert len(out) >= n, "not enough distinct prompts"
    return [(c, p) for p, c in list(out.items())[:n]]


def make_rows(n: int, seed: int = 0, skip: int = 0) -> list[dict]:
    teachers = [
        Teacher("clean", size=RES, size_range=(3, 5)),
        Teacher("vellum", size=RES, size_range=(3, 5)),
        Teacher("prism", size=RES, size_range=(3, 5)),
    ]
    prompts = distinct_prompts(skip + n, seed)[skip:]
    rows = []
    for r, (cat, p) in enumerate(prompts):
        s = seed * 1000 + skip + r  # distinct per prompt, also across train / held-out slices
        images = [t.generate([p], [s])[0] for t in teachers]
        noisy = images[0] + np.random.default_rng(s).normal(0, 48, images[0].shape)  # the clean render, smudged
        images.append(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))
        phi = [3.0, 2.0, 1.0, 0.0]
        pairs = [(0, 3, 3, 0), (1, 2, 2, 1)] if r % 2 == 0 else []
        rows.append(make_row(p, cat, images, [t.name for t in teachers] + ["smudged"], [s] * 4, ["q"],
                             [phi], phi, [1, 2, 3, 4], pairs))
    return rows


@pytest.fixture(scope="module")
def rows():
    return make_rows(4)


def tiny_cfg(method="dpo", lora=True, workers=1, **loss) -> train_config.TrainConfig:
    cfg = train_tiny()
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, lora=lora, lora_rank=4, lora_alpha=8.0),
        loss=dataclasses.replace(cfg.loss, method=method, **loss),
        run=dataclasses.replace(cfg.run, num_workers=workers),
    )


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def probe(pipe, family_seed=0):
    """A fixed (x_t, t, cond) to compare denoiser outputs."""
    g = torch.Generator().manual_seed(family_seed)
    cfg = pipe.denoiser.config
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    flow = pipe.noise_schedule().prediction_type == "flow"
    t = torch.tensor([300.0, 700.0]) if flow else torch.tensor([300, 700])
    with torch.no_grad():
        cond = pipe.encode_prompts(["a red circle", "two squares"])
    return x, t, cond


# ----------------------------------------------------------------------------- core step


@pytest.mark.parametrize("method,lora,family", COMBOS)
def test_two_steps_update_trainable_only(method, lora, family, rows):
    pipe = tiny_model(family)
    x, t, cond = probe(pipe)
    with torch.no_grad():
        base_out = pipe.predict(x, t, cond)
    frozen_before = {**{f"te.{n}": v for n, v in snapshot(pipe.pipe.text_encoder).items()}}
    state = train_state.build_state(tiny_cfg(method, lora), pipe=pipe)
    trainable_ids = {id(p) for p in state.params}
    frozen_before.update({f"den.{n}": p.detach().clone() for n, p in pipe.denoiser.named_parameters()
                          if id(p) not in trainable_ids})
    trainable_before = [p.detach().clone() for p in state.params]

    for _ in range(2):
        metrics = train.train_step(state, [rows])

    assert state.step == 2 and math.isfinite(metrics["loss"])
    changed = [not torch.equal(a, p.detach()) for a, p in zip(trainable_before, state.params)]
    assert all(changed), f"{changed.count(False)} of {len(changed)} trainable tensors unchanged"
    after = {**{f"te.{n}": v for n, v in snapshot(pipe.pipe.text_encoder).items()},
             **{f"den.{n}": p.detach() for n, p in pipe.denoiser.named_parameters() if id(p) not in trainable_ids}}
    assert after.keys() == frozen_before.keys()
    assert all(torch.equal(frozen_before[k], after[k]) for k in after), "a frozen parameter changed"
    with torch.no_grad():
        with train_state.reference_mode(state):
            ref_out = pipe.predict(x, t, cond)
        policy_out = pipe.predict(x, t, cond)
    torch.testing.assert_close(ref_out, base_out, rtol=0, atol=1e-6)  # reference == untouched base model
    assert (policy_out - base_out).abs().max() > 1e-6  # and the policy moved away from it
    if method == "balanced":  # rows 1 and 3 have no consensus pairs: skipped and counted, twice
        assert state.skipped_rows == 4 and metrics["prompts"] == 2
    else:
        assert state.skipped_rows == 0 and metrics["prompts"] == 4


@pytest.mark.parametrize("family", ["pixart", "shapes"])
def test_first_step_loss_matches_policy_equals_reference(family, rows):
    """LoRA starts with B = 0, so policy == reference: DPO/BalancedDPO loss is exactly log 2 per prompt,
    RankDPO's is log 2 * sum of DCG weights (hand-worked below), implicit accuracy 0 (ties are wrong)."""
    # RankDPO weights for phi = [3, 2, 1, 0]: gains 7, 3, 1, 0; 1/log2(1 + rank) for ranks 1..4
    gain = [7.0, 3.0, 1.0, 0.0]
    disc = [1.0 / math.log2(1 + r) for r in (1, 2, 3, 4)]
    w_sum = sum(abs(gain[i] - gain[j]) * abs(disc[i] - disc[j]) for i in range(4) for j in range(i + 1, 4))
    expected = {"dpo": math.log(2), "balanced": math.log(2), "rankdpo": math.log(2) * w_sum}
    for method, value in expected.items():
        state = train_state.build_state(tiny_cfg(method), pipe=tiny_model(family))
        m = train.train_step(state, [rows])
        assert m["loss"] == pytest.approx(value, rel=1e-5), method
        assert m["implicit_acc"] == 0.0 and m["kl_proxy"] == 0.0


@pytest.mark.parametrize("method", ["dpo", "rankdpo", "balanced"])
def test_sft_weight_adds_the_winners_error(method, rows):
    """loss = preference loss + sft_weight x (per prompt) mean error of the winning image(s)."""
    lam = 0.5
    state = train_state.build_state(tiny_cfg(method, sft_weight=lam), pipe=tiny_model("shapes"))
    batch = collate.collate(rows, state)
    with torch.no_grad():
        err = heldout.errors(state, batch)
        if method == "rankdpo":
            b, k = batch["phi"].shape
            win = err.view(b, k).gather(1, batch["phi"].argmax(1, keepdim=True))[:, 0]
        else:
            w, _, prow = batch["pairs"].unbind(1)
            n = torch.zeros(batch["n_rows"]).index_add(0, prow, torch.ones(len(w)))
            win = torch.zeros(batch["n_rows"]).index_add(0, prow, err[w]) / n
    m = train.train_step(state, [rows])
    assert m["loss"] == pytest.approx(m["pref_loss"] + lam * win.mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match="sft_weight"):
        tiny_cfg("sft", sft_weight=lam)
    with pytest.raises(ValueError, match="sft_weight"):
        tiny_cfg("dpo", sft_weight=-1.0)


def test_noise_shared_per_prompt_and_independent_of_split(rows):
    state = train_state.build_state(tiny_cfg("rankdpo"), pipe=tiny_model("shapes"))
    whole = collate.collate(rows, state)
    halves = [collate.collate(rows[:2], state), collate.collate(rows[2:], state)]
    assert whole["x0"].shape == (16, 4, RES // 2, RES // 2)  # B * K latents, one forward
    noise = whole["noise"].view(4, 4, -1)
    assert torch.equal(noise[:, :1].expand_as(noise), noise)  # K images of a prompt share the noise
    assert not torch.equal(noise[0, 0], noise[1, 0])
    assert torch.equal(whole["t"].view(4, 4)[:, :1].expand(4, 4), whole["t"].view(4, 4))
    torch.testing.assert_close(torch.cat([h["noise"] for h in halves]), whole["noise"], rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([h["t"] for h in halves]), whole["t"], rtol=0, atol=0)
    state.step += 1
    assert not torch.equal(collate.collate(rows, state)["noise"], whole["noise"])  # fresh draw each step


def test_t_logit_mean_draws_higher_noise_levels_and_is_flow_only(rows):
    base = train_state.build_state(tiny_cfg("dpo"), pipe=tiny_model("shapes"))
    high = train_state.build_state(tiny_cfg("dpo", t_logit_mean=2.5), pipe=tiny_model("shapes"))
    schedule = base.pipe.noise_schedule()
    assert (schedule.prediction_type, schedule.shift, schedule.logit_mean) == ("flow", 1.0, 0.0)
    t0, t1 = [], []
    for step in range(8):
        base.step = high.step = step
        t0.append(collate.collate(rows, base)["t"])
        t1.append(collate.collate(rows, high)["t"])
    s0, s1 = (torch.cat(t).double() / schedule.num_train_timesteps for t in (t0, t1))
    # the same normal draw, moved by 2.5 on the logit scale: every noise level higher
    torch.testing.assert_close(torch.logit(s1) - torch.logit(s0), torch.full_like(s0, 2.5), rtol=0, atol=1e-4)
    assert s1.median() > 0.85 > 0.5 > s0.min()
    with pytest.raises(ValueError, match="loss.t_logit_mean is for flow-matching models"):
        train_state.build_state(tiny_cfg("dpo", t_logit_mean=1.0), pipe=tiny_model("pixart"))
    with pytest.raises(ValueError, match="loss.t_logit_mean must be"):
        tiny_cfg("dpo", t_logit_mean=float("inf"))


def test_cfg_dropout_trains_some_rows_on_the_empty_prompt(rows):
    """data.cfg_dropout replaces a row's prompt by "" (all its images), drawn from the row's noise
    stream: about the asked fraction over steps, the same however rows are split, none when 0."""
    cfg = tiny_cfg("dpo")
    state = train_state.build_state(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, cfg_dropout=0.5)),
                          pipe=tiny_model("shapes"))
    key = next(iter(state.pipe.encode_prompts([""])))
    empty = state.pipe.encode_prompts([""])[key][0]
    prompts = state.pipe.encode_prompts([r["prompt"] for r in rows])[key]
    dropped = []
    for step in range(10):
        state.step = step
        whole = collate.collate(rows, state)
        halves = [collate.collate(rows[:2], state), collate.collate(rows[2:], state)]
        torch.testing.assert_close(torch.cat([h["cond"][key] for h in halves]), whole["cond"][key], rtol=0, atol=0)
        for b in range(len(rows)):
            conds = whole["cond"][key][whole["row"] == b]
            is_empty = [torch.equal(c, empty) for c in conds]
            assert len(set(is_empty)) == 1  # every image of a prompt sees the same prompt
            assert is_empty[0] or torch.equal(conds[0], prompts[b])
            dropped.append(is_empty[0])
    assert 0.3 <= np.mean(dropped) <= 0.7, np.mean(dropped)
    plain = train_state.build_state(cfg, pipe=tiny_model("shapes"))
    assert not any(torch.equal(c, empty) for c in collate.collate(rows, plain)["cond"][key])
    with pytest.raises(ValueError, match="cfg_dropout"):
        dataclasses.replace(cfg.data, cfg_dropout=1.0)


@pytest.mark.parametrize("lora", [True, False])
def test_reference_refresh_copies_policy(lora, rows):
    state = train_state.build_state(tiny_cfg("balanced", lora, ref_refresh_every=1), pipe=tiny_model("shapes"))
    train.train_step(state, [rows])
    x, t, cond = probe(state.pipe)
    with torch.no_grad():
        policy = state.pipe.predict(x, t, cond)
        with train_state.reference_mode(state):
            ref = state.pipe.predict(x, t, cond)
    torch.testing.assert_close(ref, policy, rtol=0, atol=1e-6)
    m = train.train_step(state, [rows])  # policy == refreshed reference again
    assert m["loss"] == pytest.approx(math.log(2), rel=1e-5)


def test_sft_generator_target_and_bad_config(rows):
    state = train_state.build_state(tiny_cfg("sft", sft_target="generator", sft_generator="vellum"),
                          pipe=tiny_model("pixart"))
    b = collate.collate(rows, state)
    assert b["x0"].shape[0] == 4  # one vellum image per prompt
    with pytest.raises(ValueError, match="loss.method"):
        tiny_cfg("ppo")
    with pytest.raises(ValueError, match="ref_refresh_every"):
        tiny_cfg("dpo", ref_refresh_every=5)
    with pytest.raises(ValueError, match="batch_size"):
        dataclasses.replace(train_tiny(), optim=dataclasses.replace(train_tiny().optim, batch_size=3))


def test_cached_epochs_read_once_and_replay_only_complete_epochs():
    reads = []

    def read_epoch():
        reads.append(1)
        yield from ([{"i": i}] for i in range(3))

    epochs = train.cached_epochs(read_epoch)
    first = epochs()
    next(first)  # an epoch abandoned after one micro-batch is not cached as complete
    assert [b[0]["i"] for b in epochs()] == [0, 1, 2] and len(reads) == 2
    assert [b[0]["i"] for b in epochs()] == [0, 1, 2] and len(reads) == 2  # replayed, not read again
    assert [b[0]["i"] for b in epochs()] == [0, 1, 2] and len(reads) == 2


def test_select_hand_worked():
    row = {"phi": [0.2, 0.9, 0.1, 0.9], "generators": ["a", "b", "a", "c"],
           "pairs": [{"i": 3, "j": 0, "votes_i": 3, "votes_j": 1}, {"i": 1, "j": 2, "votes_i": 2, "votes_j": 0}]}
    assert collate.select(row, train_config.LossSection(method="dpo")) == ([1, 2], [(0, 1, 1.0)])  # first max, min
    assert collate.select(row, train_config.LossSection(method="sft")) == ([1], [])
    assert collate.select(row, train_config.LossSection(method="sft", sft_target="generator", sft_generator="a")) == (
        [0, 2],
        [],
    )
    sft_z = train_config.LossSection(method="sft", sft_target="generator", sft_generator="z")
    assert collate.select(row, sft_z) is None
    # images 0, 1, 2, 3 are all in pairs; (3 beats 0) by 3:1 votes -> weight 0.5, (1 beats 2) 2:0 -> 1.0
    assert collate.select(row, train_config.LossSection(method="balanced", vote_weighting=True)) == (
        [0, 1, 2, 3], [(3, 0, 0.5), (1, 2, 1.0)])
    assert collate.select({**row, "pairs": []}, train_config.LossSection(method="balanced")) is None
    tied = {**row, "phi": [1.0, 1.0, 1.0, 1.0]}
    assert (
        collate.select(tied, train_config.LossSection(method="dpo")) is None
        and collate.select(tied, train_config.LossSection(method="rankdpo")) is None
    )


def test_select_keeps_ties_only_when_asked():
    dpo, every = train_config.LossSection(method="dpo"), train_config.LossSection(method="dpo", dpo_pairs="all")
    tie = {"phi": [0.5, 0.5], "generators": ["pickapic:0", "pickapic:1"], "pairs": []}
    assert collate.select(tie, dpo) is None and collate.select(tie, dpo, keep_ties=True) == ([0, 1], [(0, 1, 1.0)])
    part = {"phi": [0.9, 0.2, 0.9], "generators": ["a", "b", "c"], "pairs": []}
    assert collate.select(part, every) == ([0, 1, 2], [(0, 1, 1.0), (2, 1, 1.0)])
    assert collate.select(part, every, keep_ties=True) == ([0, 1, 2], [(0, 1, 1.0), (2, 1, 1.0), (0, 2, 1.0)])


def test_kept_ties_train_at_label_half(rows):
    cfg = tiny_cfg("dpo")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, ties="keep"))
    state = train_state.build_state(cfg, pipe=tiny_model("shapes"))
    tied = [{**rows[0], "phi": [0.5] * 4}, rows[1]]
    b = collate.collate(tied, state)
    assert b["n_rows"] == 2 and b["pair_label"].tolist() == [0.5, 1.0]
    metrics = train.train_step(state, [tied])
    assert abs(metrics["loss"] - math.log(2)) < 1e-5  # policy == reference: log 2 for the tie and the pair
    skip = train_state.build_state(tiny_cfg("dpo"), pipe=tiny_model("shapes"))
    assert collate.collate(tied, skip)["n_rows"] == 1
    with pytest.raises(ValueError, match="data.ties=keep needs loss.method=dpo"):
        dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, method="rankdpo"))


def test_latents_are_encoded_once_per_image_and_reused(rows):
    cfg = tiny_cfg("rankdpo")
    calls = []

    def counting(cache):
        state = train_state.build_state(
            dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, cache=cache)), pipe=tiny_model("shapes"))
        state.pipe.pipe.vae.encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
        return state

    cached = counting("latents")
    first = collate.collate(rows, cached)
    assert calls == [16] and len(cached.latents) == 16  # 4 rows x K = 4 distinct images
    again = collate.collate(rows, cached)
    assert calls == [16]  # the second epoch: no decoding, no encoder
    torch.testing.assert_close(again["x0"], first["x0"], rtol=0, atol=0)
    calls.clear()
    plain = counting("rows")
    for _ in range(2):
        b = collate.collate(rows, plain)
    assert calls == [16, 16] and not plain.latents
    torch.testing.assert_close(b["x0"], first["x0"], rtol=0, atol=1e-6)  # the same latents as encoding afresh
    calls.clear()
    collate.collate(rows[:2], counting("latents"))
    assert calls == [8]  # a cache belongs to its train state (its model), never shared
    with pytest.raises(ValueError, match="data.cache must be none, rows or latents"):
        dataclasses.replace(cfg.data, cache="disk")


def test_dpo_all_pairs_uses_every_ordered_pair(rows):
    state = train_state.build_state(tiny_cfg("dpo", dpo_pairs="all"), pipe=tiny_model("shapes"))
    b = collate.collate(rows, state)
    assert b["x0"].shape[0] == 16 and b["pairs"].shape == (4 * 6, 3)  # K=4 distinct phi: 6 ordered pairs
    w_phi = torch.tensor([rows[0]["phi"][int(i) % 4] for i in b["pairs"][:, 0]])
    l_phi = torch.tensor([rows[0]["phi"][int(j) % 4] for j in b["pairs"][:, 1]])
    assert bool((w_phi > l_phi).all())


# ----------------------------------------------------------------------------- NaN, checkpoints, resume


@pytest.mark.parametrize("lora", [True, False])
def test_nan_loss_raises_before_checkpoint(lora, rows):
    cfg = tiny_cfg("dpo", lora)
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, max_steps=5))
    state = train_state.build_state(cfg, pipe=tiny_model("shapes"))
    saved = []

    def report(metrics, directory):
        if directory:
            saved.append((metrics["step"], sorted(os.listdir(directory))))
        if metrics["step"] == 2:  # poison the model after step 2's checkpoint
            with torch.no_grad():
                state.params[0].fill_(float("nan"))

    with pytest.raises(FloatingPointError, match="at step 3"):
        train.run_loop(state, lambda: iter([rows[:2], rows[2:]]), report)
    assert [s for s, _ in saved] == [1, 2]
    assert (
        train_state.TRAIN_STATE in saved[0][1]
        and (train_state.LORA_DIR if lora else train_state.PIPELINE_DIR) in saved[0][1]
    )
    assert state.step == 2


@pytest.mark.parametrize("lora", [True, False])
def test_checkpoint_resume_matches_uninterrupted(lora, rows, tmp_path):
    cfg = tiny_cfg("rankdpo", lora)
    straight = train_state.build_state(cfg, pipe=tiny_model("pixart"))
    for _ in range(3):
        train.train_step(straight, [rows])
    first = train_state.build_state(cfg, pipe=tiny_model("pixart"))
    train.train_step(first, [rows])
    train_state.save_checkpoint(first, str(tmp_path))
    resumed = train_state.build_state(cfg, pipe=tiny_model("pixart"))
    train_state.load_checkpoint(resumed, str(tmp_path))
    assert resumed.step == 1
    for _ in range(2):
        train.train_step(resumed, [rows])
    for a, b in zip(straight.params, resumed.params):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def trained_lora_checkpoint(family, method, rows, tmp_path):
    """A tiny base saved to tmp_path/base, 2 LoRA steps of ``method``, checkpoint in tmp_path/ckpt."""
    base = tiny_model(family)
    base.save_pretrained(tmp_path / "base")
    state = train_state.build_state(tiny_cfg(method, True), pipe=load_adapter(tmp_path / "base"))
    for _ in range(2):
        train.train_step(state, [rows])
    train_state.save_checkpoint(state, str(tmp_path / "ckpt"))
    return base, state


@pytest.mark.parametrize("family", ["shapes", "pixart"])
def test_lora_checkpoint_loads_into_fresh_pipeline(family, rows, tmp_path):
    base, state = trained_lora_checkpoint(family, "dpo", rows, tmp_path)
    lora_dir = tmp_path / "ckpt" / train_state.LORA_DIR
    assert (lora_dir / "pytorch_lora_weights.safetensors").exists()
    fresh = [load_adapter(tmp_path / "base") for _ in range(2)]
    load_lora(fresh[0], str(lora_dir))  # the helper (stock load_lora_adapter for the UNet, peft for pixart)
    if family == "shapes":
        fresh[1].pipe.load_lora_weights(str(lora_dir))  # the stock diffusers loader (StableDiffusionLoraLoaderMixin)
    else:  # PixArtTransformer2DModel has no PEFT mixin in diffusers: no stock LoRA loader exists
        fresh = fresh[:1]
    x, t, cond = probe(base)
    with torch.no_grad():
        trained = state.pipe.predict(x, t, cond)
        plain = base.predict(x, t, cond)
        assert (trained - plain).abs().max() > 1e-5
        for f in fresh:
            torch.testing.assert_close(f.predict(x, t, cond), trained, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["pixart", "shapes"])
def test_merged_lora_checkpoint_is_a_plain_pipeline_with_the_same_outputs(family, rows, tmp_path):
    base, state = trained_lora_checkpoint(family, "sft", rows, tmp_path)
    merge_lora_checkpoint(
        str(tmp_path / "base"), str(tmp_path / "ckpt" / train_state.LORA_DIR), str(tmp_path / "merged")
    )
    merged = load_adapter(tmp_path / "merged")
    assert not any("lora" in n for n, _ in merged.denoiser.named_parameters())
    assert sum(p.numel() for p in merged.denoiser.parameters()) == sum(p.numel() for p in base.denoiser.parameters())
    x, t, cond = probe(base)
    with torch.no_grad():
        trained = state.pipe.predict(x, t, cond)
        assert (trained - base.predict(x, t, cond)).abs().max() > 1e-5
        torch.testing.assert_close(merged.predict(x, t, cond), trained, rtol=1e-4, atol=1e-5)
    assert fold_lora(merged.denoiser) == 0  # nothing left to fold


def test_full_checkpoint_is_a_diffusers_pipeline(rows, tmp_path):
    state = train_state.build_state(tiny_cfg("sft", False), pipe=tiny_model("shapes"))
    train.train_step(state, [rows])
    train_state.save_checkpoint(state, str(tmp_path))
    loaded = load_adapter(tmp_path / train_state.PIPELINE_DIR)
    x, t, cond = probe(loaded)
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict(x, t, cond), state.pipe.predict(x, t, cond), rtol=0, atol=1e-6)


def test_heldout_accuracy_at_init_and_bad_args(rows):
    state = train_state.build_state(tiny_cfg("dpo"), pipe=tiny_model("shapes"))
    out = heldout.heldout_accuracy(state, rows, n_draws=2)
    assert out == {"accuracy": 0.0, "margin": 0.0, "pairs": 4}  # policy == reference: every pair tied
    assert heldout.heldout_accuracy(state, rows, n_draws=1, pairs="consensus")["pairs"] == 4  # 2 rows x 2 pairs
    with pytest.raises(ValueError, match="pairs"):
        heldout.heldout_accuracy(state, rows, pairs="random")


# ----------------------------------------------------------------------------- job + Ray Train


def test_job_config_layers(tmp_path):
    job = train
    (tmp_path / "c.yaml").write_text("optim:\n  lr: 3.0e-4\nloss:\n  method: sft\n")
    cfg = job.parse_config(["--config", str(tmp_path / "c.yaml"), "--method", "rankdpo",
                            "loss.rank_weights=gain", "model.lora_targets=[to_q, to_v]"])
    assert (cfg.loss.method, cfg.loss.rank_weights, cfg.optim.lr) == ("rankdpo", "gain", 3e-4)
    assert cfg.model.lora_targets == ("to_q", "to_v")
    assert train_config.sdxl_8xh100().micro_batch_size == 2
    with pytest.raises(ValueError, match="rank_weights"):
        job.parse_config(["loss.rank_weights=log"])


# Adam's first steps are about lr * g / (|g| + eps): where a gradient is near zero, the summation
# order of the all-reduce moves an element by a small fraction of lr (1e-3 here).
ADAM_ATOL = 5e-5


def test_torchtrainer_two_workers_match_one_worker_and_resume(ray_local, rows, tmp_path):
    """2 Ray Train workers x 2 prompts == 1 worker x 4 prompts, then a re-run resumes at step 1."""
    job = train
    tiny_model("shapes").save_pretrained(tmp_path / "base")
    table_path = tmp_path / "prefs.parquet"
    import pyarrow.parquet as pq

    pq.write_table(to_table(rows), table_path)
    cfg = tiny_cfg("dpo", True, workers=2)
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, path=str(tmp_path / "base")),
        data=dataclasses.replace(cfg.data, path=str(table_path)),
        optim=dataclasses.replace(cfg.optim, max_steps=1),
        run=dataclasses.replace(cfg.run, storage_path=str(tmp_path / "runs"), name="dp"))

    def trained_params(result):
        with result.checkpoint.as_directory() as d:
            return torch.load(os.path.join(d, train_state.TRAIN_STATE), weights_only=False)

    r1 = job.build_trainer(cfg).fit()
    s1 = trained_params(r1)
    assert s1["step"] == 1 and r1.metrics["prompts"] == 4

    local = train_state.build_state(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, num_workers=1)),
                          pipe=load_adapter(tmp_path / "base"))
    train.train_step(local, [rows])
    assert r1.metrics["loss"] == pytest.approx(math.log(2), rel=1e-5)
    for a, b in zip(local.params, s1["params"]):
        torch.testing.assert_close(b, a.detach(), rtol=0, atol=ADAM_ATOL)

    cfg2 = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, max_steps=2))
    r2 = job.build_trainer(cfg2).fit()  # same run name + storage: resumes from step 1
    s2 = trained_params(r2)
    train.train_step(local, [rows])
    assert s2["step"] == 2
    for a, b in zip(local.params, s2["params"]):
        torch.testing.assert_close(b, a.detach(), rtol=0, atol=ADAM_ATOL)


# ----------------------------------------------------------------------------- slow: learning signal


@pytest.mark.slow
@pytest.mark.parametrize("method", train_config.METHODS)
def test_each_method_raises_heldout_accuracy(method):
    """Trained briefly on tiny-model data whose winners are clean renders and losers smudged ones,
    every method must rank held-out (clean, smudged) pairs correctly more often than chance."""
    train_rows, test_rows = make_rows(32, seed=1), make_rows(24, seed=1, skip=32)  # held-out prompts
    cfg = tiny_cfg(method, True)
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=3e-3, batch_size=8))
    state = train_state.build_state(cfg, pipe=tiny_model("shapes"))
    for step in range(60):
        train.train_step(state, [train_rows[(step * 8) % 32:(step * 8) % 32 + 8]])
    out = heldout.heldout_accuracy(state, test_rows, n_draws=8)
    print(method, out)
    assert out["pairs"] == 24 and out["accuracy"] > 0.5, out
