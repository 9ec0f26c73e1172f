"""What a run pays for: per-teacher image counts and costs, and each driver invocation's own bill.

Two views of spend, because a crash separates them. **Paid**: ``PaidLedger`` appends one line to
``spend.jsonl`` for every generator or judge call the moment it returns, before its result is used
(flushed and fsynced), so work paid for and then lost to a crash still counts. **Committed**: what
the stages record for the work they kept (Syn-Pic's chunk stats, a stage's ``spent``).
``TeacherLedger`` counts a teacher's images and cost from the generator's own counters when it keeps
them (what the "API" billed), else images x a default cost. ``InvocationLedger`` appends one line
per driver invocation to ``invocations.jsonl`` with the calls that invocation's finished stages made;
``read_invocations`` adds what each invocation paid according to ``spend.jsonl``, so a resumed run
can be checked to pay only for unfinished work, and a crash's cost is visible.
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


def invocation_id() -> str:
    """This process's invocation: its pid and start time (unique across re-runs of one run dir)."""
    return f"{os.getpid()}-{time.time():.6f}"


class PaidLedger:
    """Append-only ``spend.jsonl``: one line ``{"t", "invocation", "scope", "source", "calls", "cost"}``
    per paid call, written (flushed, fsynced) when the call returns and before its result is used.
    ``scope`` names the job that paid (a Syn-Pic output dir, a driver stage) so one file serves a run.
    Picklable: a Ray Data actor gets a copy and appends to the same file (one ``write`` per line with
    ``O_APPEND``, so lines of concurrent writers do not interleave)."""

    def __init__(self, path, invocation: str | None = None, scope: str = ""):
        self.path, self.invocation, self.scope = str(path), invocation or invocation_id(), scope

    def scoped(self, scope: str) -> PaidLedger:
        return PaidLedger(self.path, self.invocation, scope)

    def pay(self, source: str, calls: int, cost: float = 0.0) -> None:
        line = json.dumps({"t": time.time(), "invocation": self.invocation, "scope": self.scope,
                           "source": source, "calls": int(calls), "cost": float(cost)}) + "\n"
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":  # a crash tore the last line: start a new one
                line = "\n" + line
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)


def pay(paid, source: str, calls: int, cost: float) -> None:
    """Record a paid call in ``paid``: a PaidLedger, or a Ray actor holding one (``ledger_actor``; ``pay.remote``,
    waited for, so the line is on disk before the call's result moves on)."""
    if paid is None:
        return
    if hasattr(paid.pay, "remote"):
        import ray

        ray.get(paid.pay.remote(source, calls, cost))
    else:
        paid.pay(source, calls, cost)


def ledger_actor(paid: PaidLedger):
    """``paid`` in a zero-CPU actor pinned to this node: the generator actors, wherever they run, append
    through it to the driver's file."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(PaidLedger).options(num_cpus=0, scheduling_strategy=node).remote(
        paid.path, paid.invocation, paid.scope)


def read_paid(path, scope: str | None = None, invocation: str | None = None) -> dict:
    """Totals of ``spend.jsonl`` (lines of ``scope`` / ``invocation`` when given):
    {"calls": {source: n}, "cost": {source: x}}. A torn last line (a crash mid-write) is skipped."""
    out: dict = {"calls": {}, "cost": {}}
    p = Path(path)
    for line in p.read_text().splitlines() if p.exists() else []:
        try:
            e = json.loads(line)
        except json.JSONDecodeError:
            continue
        if (scope is None or e["scope"] == scope) and (invocation is None or e["invocation"] == invocation):
            out["calls"][e["source"]] = out["calls"].get(e["source"], 0) + e["calls"]
            out["cost"][e["source"]] = out["cost"].get(e["source"], 0.0) + e["cost"]
    return out


class MeteredJudge:
    """A judge whose batch calls are paid into a ``PaidLedger`` (source "judge", ``call_cost`` each) when
    they return or fail: the judge's own call counter when it keeps one (a served judge counts what it
    sent), else one call per item; everything else passes through."""

    def __init__(self, judge, paid: PaidLedger, call_cost: float = 0.0):
        self.judge, self.paid, self.call_cost = judge, paid, call_cost

    def __getattr__(self, name):
        return getattr(self.judge, name)

    def _metered(self, name, n, *args):
        before = getattr(self.judge, "calls", None)
        try:
            return getattr(self.judge, name)(*args)
        finally:  # a call that failed after it was sent was still paid
            after = getattr(self.judge, "calls", None)
            calls = after - before if isinstance(before, int) and isinstance(after, int) else n
            self.paid.pay("judge", calls, calls * self.call_cost)

    def discriminate_batch(self, prompts, images):
        return self._metered("discriminate_batch", len(prompts), prompts, images)

    def vqa_batch(self, images, questions):
        return self._metered("vqa_batch", len(images), images, questions)

    def expand_batch(self, prompts, n):
        return self._metered("expand_batch", len(prompts), prompts, n)

    def mutate_batch(self, n):
        return self._metered("mutate_batch", n, n)


class MeteredGenerator:
    """A generator whose ``generate`` calls are paid into a ``PaidLedger`` as they return: calls and cost
    from its own counters when it keeps them, else images x ``default_cost``."""

    def __init__(self, gen, paid: PaidLedger, source: str, default_cost: float):
        self.gen, self.paid, self.source, self.default_cost = gen, paid, source, default_cost

    def __getattr__(self, name):
        return getattr(self.gen, name)

    def generate(self, prompts, seeds):
        before = generator_counters(self.gen)
        try:
            return self.gen.generate(prompts, seeds)
        finally:  # paid even when the call fails part-way (the counters say what went out)
            after = generator_counters(self.gen)
            if before is None or after is None:
                self.paid.pay(self.source, len(prompts), len(prompts) * self.default_cost)
            else:
                self.paid.pay(self.source, after[0] - before[0], after[1] - before[1])


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
            calls, cost = len(prompts), len(prompts) * self.default_cost
        else:
            calls, cost = after[0] - before[0], after[1] - before[1]
        self.calls[name] += calls
        self.cost[name] += cost
        return images


class InvocationLedger:
    """This invocation's own teacher/judge calls (not those of stages it skipped)."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "invocations.jsonl"
        self.id = invocation_id()
        self.paid = PaidLedger(run_dir / "spend.jsonl", self.id)  # what the stages pay, as they pay it
        self.record = {"pid": os.getpid(), "started": time.time(), "invocation": self.id, "rounds": [], "stages": [],
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
    """invocations.jsonl's records, each with ``paid``: what that invocation paid per spend.jsonl
    (including the work of a stage it did not finish)."""
    p = Path(run_dir) / "invocations.jsonl"
    records = [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()] if p.exists() else []
    for rec in records:
        if "invocation" in rec:
            rec["paid"] = read_paid(Path(run_dir) / "spend.jsonl", invocation=rec["invocation"])
    return records
