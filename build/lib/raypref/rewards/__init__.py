"""Reward models: callable classes mapping a batch dict to a batch dict with ``score_<name>`` added.

Each class loads in ``__init__(model_path, *, device="cpu", name=<key>, ...)`` from LOCAL files and
scores in ``__call__(batch)``, so it runs as ``ds.map_batches(Cls, fn_constructor_kwargs=...)`` in
Ray Data and directly in tests. See ``raypref.rewards.common`` for the batch convention.
"""

from raypref.rewards.aesthetic import LaionAesthetic
from raypref.rewards.clip import ClipScore
from raypref.rewards.hps import HPSv2
from raypref.rewards.imagereward import ImageRewardScore
from raypref.rewards.pickscore import PickScore
from raypref.rewards.shapes import AestheticReward, FaithfulnessReward
from raypref.rewards.vqa import VQAReward

REWARDS = {
    "clip": ClipScore,
    "pickscore": PickScore,
    "hpsv2": HPSv2,
    "aesthetic_laion": LaionAesthetic,
    "imagereward": ImageRewardScore,
    "faithfulness": FaithfulnessReward,
    "aesthetic": AestheticReward,
    "vqa": VQAReward,
}


def build_reward(key: str, **kwargs):
    """Instantiate ``REWARDS[key](**kwargs)`` (each class's default ``name`` is its key)."""
    if key not in REWARDS:
        raise ValueError(f"unknown reward {key!r}; known rewards: {sorted(REWARDS)}")
    return REWARDS[key](**kwargs)


__all__ = [
    "REWARDS",
    "build_reward",
    "ClipScore",
    "PickScore",
    "HPSv2",
    "LaionAesthetic",
    "ImageRewardScore",
    "FaithfulnessReward",
    "AestheticReward",
]
