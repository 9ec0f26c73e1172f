"""What a run pays for: per-teacher image counts and costs, and each driver invocation's own bill.

``TeacherLedger`` counts a teacher's images and cost from the generator's own counters when it keeps
them (what the "API" billed), else images x a default cost. ``InvocationLedger`` appends one line
per driver invocation to ``invocations.jsonl`` with the calls that invocation made, so a resumed run
can be checked to pay only for unfinished work.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from raypref.files import atomic_write


def generator_counters(gen) -> tuple[int, float] | None:
    """(calls, cost) reported by a generator (a Teacher, or a wrapper holding one in ``.teacher``)."""
    for obj in (gen, getattr(gen, "teacher", None)):
        if obj is not None and hasattr(obj, "calls") and hasattr(obj, "cost"):
            return int(obj.calls), float(obj.cost)
    return None


def unit_cost(gen, default: float) -> float:
    """Cost of one image from ``gen``: its skill profile's cost, else ``default``."""
    for obj in (gen, getattr(gen, "teacher", None)):
        profile = getattr(obj, "profile", None)
        if profile is not None and hasattr(profile, "cost"):
            return float(profile.cost)
    return float(default)


def generate(gen, prompts, seeds, batch_size: int) -> list[np.ndarray]:
    """``gen.generate`` in batches -> [B] images [H, W, 3] uint8."""
    out: list[np.ndarray] = []
    for i in range(0, len(prompts), batch_size):
        images = np.asarray(gen.generate(list(prompts[i:i + batch_size]), [int(s) for s in seeds[i:i + batch_size]]))
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"generator {getattr(gen, 'name', gen)!r} returned {images.shape} {images.dtype}, "
                             "expected [B, H, W, 3] uint8")
        out.extend(images)
    return out


class TeacherLedger:
    """Counts teacher images and cost per teacher: from the generator's own counters when it keeps
    them (so the numbers are what the 'API' billed), else images x ``default_cost``."""

    def __init__(self, teachers: dict, default_cost: float):
        self.teachers, self.default_cost = teachers, default_cost
        self.calls = {t: 0 for t in teachers}
        self.cost = {t: 0.0 for t in teachers}

    def render(self, name: str, prompts, seeds, batch_size: int) -> list[np.ndarray]:
        gen = self.teachers[name]
        before = generator_counters(gen)
        images = generate(gen, prompts, seeds, batch_size)
        after = generator_counters(gen)
        if before is None or after is None:
            self.calls[name] += len(prompts)
            self.cost[name] += len(prompts) * self.default_cost
        else:
            self.calls[name] += after[0] - before[0]
            self.cost[name] += after[1] - before[1]
        return images


class InvocationLedger:
    """This invocation's own teacher/judge calls (not those of stages it skipped)."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "invocations.jsonl"
        self.record = {"pid": os.getpid(), "started": time.time(), "rounds": [], "stages": [],
                       "teacher_calls": 0, "teacher_cost": 0.0, "judge_calls": 0}
        self._write()  # an invocation that runs nothing is recorded too

    def add(self, r: int, stage: str, teacher_calls: int = 0, teacher_cost: float = 0.0, judge_calls: int = 0):
        if r not in self.record["rounds"]:
            self.record["rounds"].append(r)
        self.record["stages"].append(f"{r}:{stage}")
        self.record["teacher_calls"] += int(teacher_calls)
        self.record["teacher_cost"] += float(teacher_cost)
        self.record["judge_calls"] += int(judge_calls)
        self._write()

    def _write(self):
        # one line per invocation, rewritten in place (atomically) as the invocation progresses
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        mine = json.dumps(self.record)
        key = f'"pid": {self.record["pid"]}, "started": {json.dumps(self.record["started"])}'
        lines = [ln for ln in lines if key not in ln] + [mine]
        atomic_write(self.path, "\n".join(lines) + "\n")


def read_invocations(run_dir) -> list[dict]:
    p = Path(run_dir) / "invocations.jsonl"
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()] if p.exists() else []
