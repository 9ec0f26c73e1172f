"""Spend is recorded where it is paid: a PaidLedger line per call as it returns (before its result
is used), so work a crash loses still counts; read_invocations shows what each invocation paid."""

import json

import numpy as np

from raypref.shapes.teachers import PROFILES, Teacher
from raypref.spend import InvocationLedger, MeteredGenerator, MeteredJudge, PaidLedger, read_invocations, read_paid


class Dies(Exception):
    pass


def test_a_call_is_paid_before_its_result_is_used(tmp_path):
    paid = PaidLedger(tmp_path / "spend.jsonl", "inv-1", scope="job")
    gen = MeteredGenerator(Teacher("prism"), paid, "teacher:prism", default_cost=9.0)
    images = gen.generate(["a circle", "a square"], [1, 2])
    assert images.shape[0] == 2 and gen.calls == 2  # the wrapped teacher's counters pass through
    try:  # the consumer crashes right after the call returned: the call stays paid
        gen.generate(["a triangle"], [3])
        raise Dies
    except Dies:
        pass
    got = read_paid(tmp_path / "spend.jsonl")
    assert got == {"calls": {"teacher:prism": 3}, "cost": {"teacher:prism": 3 * PROFILES["prism"].cost}}

    class NoCounters:  # a generator that keeps no counters: images x default_cost
        def generate(self, prompts, seeds):
            return np.zeros((len(prompts), 2, 2, 3), np.uint8)

    MeteredGenerator(NoCounters(), paid.scoped("other"), "custom", default_cost=0.5).generate(["a"] * 4, range(4))
    assert read_paid(tmp_path / "spend.jsonl", scope="other") == {"calls": {"custom": 4}, "cost": {"custom": 2.0}}
    assert read_paid(tmp_path / "spend.jsonl", invocation="inv-2") == {"calls": {}, "cost": {}}


def test_judge_calls_are_paid_per_item_and_a_torn_line_is_skipped(tmp_path):
    from raypref.judges import ShapesJudge

    paid = PaidLedger(tmp_path / "spend.jsonl", "inv-1")
    judge = MeteredJudge(ShapesJudge(), paid)
    img = Teacher("clean").render_one("a circle", 0)
    judge.discriminate_batch(["a circle", "a circle"], [[img, img], [img, img]])
    judge.mutate_batch(3)
    assert judge.calls == judge.judge.calls > 0  # attributes pass through
    with open(tmp_path / "spend.jsonl", "a") as f:
        f.write('{"t": 1, "invocation": "inv-1", "sco')  # a crash mid-write
    assert read_paid(tmp_path / "spend.jsonl")["calls"] == {"judge": 5}
    PaidLedger(tmp_path / "spend.jsonl", "inv-2").pay("judge", 7, 0.7)  # the next writer's line survives
    assert read_paid(tmp_path / "spend.jsonl")["calls"] == {"judge": 12}
    assert read_paid(tmp_path / "spend.jsonl", invocation="inv-2") == {"calls": {"judge": 7}, "cost": {"judge": 0.7}}


def test_a_call_that_fails_part_way_is_still_paid(tmp_path):
    paid = PaidLedger(tmp_path / "spend.jsonl", "inv-1")

    class FailsAfterTwo(Teacher):  # bills two images, then the connection drops
        def generate(self, prompts, seeds):
            self.calls += 2
            self.cost += 2 * PROFILES["quill"].cost
            raise ConnectionError("dropped")

    gen = MeteredGenerator(FailsAfterTwo("quill"), paid, "teacher:quill", default_cost=9.0)
    try:
        gen.generate(["a circle"] * 3, [1, 2, 3])
    except ConnectionError:
        pass
    assert read_paid(tmp_path / "spend.jsonl")["calls"] == {"teacher:quill": 2}

    class Flaky:  # a judge keeping no counter, failing mid-batch: each item sent is paid at call_cost
        def mutate_batch(self, n):
            raise TimeoutError

    judge = MeteredJudge(Flaky(), paid, call_cost=0.25)
    try:
        judge.mutate_batch(4)
    except TimeoutError:
        pass
    assert read_paid(tmp_path / "spend.jsonl")["cost"]["judge"] == 1.0


def test_invocations_show_what_a_killed_invocation_paid(tmp_path):
    first = InvocationLedger(tmp_path)
    first.add(1, "director", teacher_calls=4, teacher_cost=4.0)  # a finished stage, committed
    first.paid.pay("teacher:prism", 4, 4.0)
    first.paid.pay("teacher:prism", 6, 6.0)  # paid in a stage the invocation never finished
    second = InvocationLedger(tmp_path)
    second.paid.pay("teacher:prism", 6, 6.0)  # the re-run redoes it
    a, b = read_invocations(tmp_path)
    assert a["teacher_calls"] == 4 and a["paid"]["calls"] == {"teacher:prism": 10}
    assert b["teacher_calls"] == 0 and b["paid"]["calls"] == {"teacher:prism": 6}
    lines = [json.loads(x) for x in (tmp_path / "spend.jsonl").read_text().splitlines()]
    assert {x["invocation"] for x in lines} == {first.id, second.id}
