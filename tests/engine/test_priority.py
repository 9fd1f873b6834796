"""Priority classes in the scheduler, with hand-made runner outputs: the higher class is
admitted and scheduled first, the lower one preempted first, and ageing stops starvation."""

from __future__ import annotations

from tests.engine.test_scheduler import make, req, step
from yun.engine.request import RequestStatus


def test_higher_priority_waiting_request_is_admitted_first():
    s = make(max_seqs=1)
    batch = [req(f"b{i}", 3, priority=0) for i in range(3)]
    for r in batch:
        s.add_request(r)
    inter = req("i", 3, priority=1)
    s.add_request(inter)  # arrives last, admitted first
    out = s.schedule()
    assert [x.request.request_id for x in out.scheduled] == ["i"]


def test_equal_priorities_stay_first_come_first_served():
    s = make(max_seqs=2)
    for i in range(4):
        s.add_request(req(f"r{i}", 3, priority=1))
    out = s.schedule()
    assert [x.request.request_id for x in out.scheduled] == ["r0", "r1"]


def test_lower_priority_is_preempted_first_even_when_admitted_earlier():
    s = make(num_blocks=6, block_size=4, budget=64)
    low, high = req("low", 8, max_tokens=16, priority=0), req("high", 8, max_tokens=16,
                                                                priority=1)
    s.add_request(low)
    step(s)  # "low" admitted alone
    s.add_request(high)
    out = step(s)
    while not out.preempted:
        out = step(s)
    assert out.preempted == [low]  # the newest is "high", but "low" has the lower class
    assert low.status == RequestStatus.PREEMPTED and high.status == RequestStatus.RUNNING
    while not high.is_finished:
        step(s)
    while not low.is_finished:
        step(s)
    assert len(low.output_token_ids) == 16 and s.kv.num_free_blocks == 6


def test_ageing_lets_a_waiting_low_priority_request_overtake_a_fresh_high_one():
    s = make(max_seqs=1)
    now = [1000.0]
    s.clock = lambda: now[0]
    old = req("old-batch", 3, priority=0)
    old.arrival_time = 1000.0 - 2 * s.config.priority_aging_s  # has waited two periods
    fresh = req("fresh-interactive", 3, priority=1)
    fresh.arrival_time = 1000.0
    s.add_request(fresh)
    s.add_request(old)
    out = s.schedule()
    assert [x.request.request_id for x in out.scheduled] == ["old-batch"]


def test_running_requests_are_scheduled_highest_class_first_under_a_small_budget():
    s = make(budget=4, max_seqs=4)
    low = req("low", 4, priority=0)
    s.add_request(low)
    step(s)  # low's prompt
    high = req("high", 12, priority=1)
    s.add_request(high)
    out = step(s)  # low decodes 1; high gets the other 3 tokens of the budget
    assert [x.request.request_id for x in out.scheduled] == ["low", "high"]
    out = step(s)  # now both run: high is served first and takes the whole budget
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("high", 4)]


def test_a_higher_class_takes_the_slot_of_the_lowest_running_request():
    s = make(max_seqs=2)
    b1, b2 = req("b1", 3, max_tokens=20, priority=0), req("b2", 3, max_tokens=20, priority=0)
    s.add_request(b1)
    s.add_request(b2)
    step(s)
    step(s)
    inter = req("i", 3, priority=1)
    s.add_request(inter)
    out = step(s)  # both slots were taken: the newest batch request makes room
    assert out.preempted == [b2] and b2.status == RequestStatus.PREEMPTED
    assert "i" in [x.request.request_id for x in out.scheduled]
    while not inter.is_finished:
        step(s)
    while not (b1.is_finished and b2.is_finished):
        step(s)
    assert len(b2.output_token_ids) == 20 and s.kv.num_free_blocks == 64


def test_an_aged_running_request_is_not_preempted_by_a_fresh_higher_class():
    s = make(max_seqs=1)
    now = [1000.0]
    s.clock = lambda: now[0]
    old = req("old", 3, max_tokens=20, priority=0)
    old.arrival_time = 1000.0
    s.add_request(old)
    step(s)
    now[0] += s.config.priority_aging_s  # "old" has aged one level: it ties with "i"
    inter = req("i", 3, priority=1)
    inter.arrival_time = now[0]
    s.add_request(inter)
    out = step(s)
    assert not out.preempted and [x.request.request_id for x in out.scheduled] == ["old"]
