"""The r=auto controller against a fake clock and a fake timing table (tests/autofakes.py): r rises with
the backlog, falls back to 0 when idle, never picks a dominated r, respects the floor, sheds only when
the floor cannot meet the target, and does not oscillate under a steady load. Deterministic: the
simulations below move the fake clock from event to event, nothing sleeps."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
from autofakes import MAX_BATCH, R_MAX, FakeClock, cpu_like, warmed_table, with_slow_r20

from tome_serve.auto.controller import AutoController, Backlog, Overloaded, Waiting

TARGET_S = 0.25


def controller(clock: FakeClock, seconds=cpu_like, hold_s: float = 1.0, lanes: int = 1) -> AutoController:
    table = warmed_table(seconds)
    return AutoController(table.snapshot, MAX_BATCH, R_MAX, lanes=lanes, hold_s=hold_s, clock=clock)


def queue(clock: FakeClock, count: int, target_s: float = TARGET_S, max_r: int = R_MAX) -> list[Waiting]:
    return [Waiting(clock(), target_s, max_r) for _ in range(count)]


def test_a_lone_request_on_an_idle_server_gets_r0():
    clock = FakeClock()
    decision = controller(clock).decide(queue(clock, 1), busy_s=())
    assert (decision.r, decision.needed_r, decision.batch_size, decision.late) == (0, 0, 1, 0)
    assert decision.predicted_s == pytest.approx(cpu_like(0, 1))


def test_r_rises_with_the_backlog():
    clock = FakeClock()
    chosen = []
    for count in (1, 8, 16, 24, 32, 48):
        chosen.append(controller(clock).decide(queue(clock, count), busy_s=()).r)
    assert chosen == sorted(chosen)
    assert chosen[0] == 0 and chosen[-1] == R_MAX
    # Work already running counts too.
    assert controller(clock).decide(queue(clock, 16), busy_s=(0.1,)).r > chosen[2]


def test_the_needed_r_is_the_smallest_that_keeps_every_request_on_time():
    clock = FakeClock()
    decision = controller(clock).decide(queue(clock, 24), busy_s=())
    # 3 batches back to back: the last finishes at 3 * t(r, 8); the smallest grid r within 250 ms.
    smallest = min(r for r in range(0, R_MAX + 1, 4) if 3 * cpu_like(r, 8) <= TARGET_S)
    assert decision.needed_r == decision.r == smallest
    assert decision.late == 0


def test_r_falls_back_to_0_after_the_hold_without_batches():
    clock = FakeClock()
    auto = controller(clock, hold_s=1.0)
    assert auto.decide(queue(clock, 48), busy_s=()).r == R_MAX
    clock.advance(0.5)
    assert auto.decide(queue(clock, 8), busy_s=()).r == R_MAX, "held: the burst was 0.5 s ago"
    clock.advance(0.6)
    decision = auto.decide(queue(clock, 1), busy_s=())
    assert (decision.r, decision.needed_r) == (0, 0)


def test_r_steps_down_through_the_levels_the_load_needed():
    clock = FakeClock()
    auto = controller(clock, hold_s=1.0)
    high = auto.decide(queue(clock, 48), busy_s=()).r
    clock.advance(0.4)
    middle = auto.decide(queue(clock, 24), busy_s=())
    assert 0 < middle.needed_r < high and middle.r == high
    clock.advance(0.7)  # the burst left the window, the middle load did not
    assert auto.decide(queue(clock, 8), busy_s=()).r == middle.needed_r
    clock.advance(1.0)
    assert auto.decide(queue(clock, 1), busy_s=()).r == 0


def test_a_dominated_r_is_never_chosen():
    clock = FakeClock()
    chosen = set()
    for count in range(1, 48):
        for busy_s in ((), (0.05,), (0.1,)):
            auto = controller(clock, with_slow_r20, hold_s=0.0)
            decision = auto.decide(queue(clock, count), busy_s)
            chosen.add(decision.r)
            if decision.batch_size == 1:
                assert decision.r == 0, "every r > 0 is slower than r=0 at batch 1"
    assert 20 not in chosen
    assert {0, 16, 24} <= chosen


def test_hysteresis_never_holds_a_dominated_r_either():
    clock = FakeClock()
    auto = controller(clock, hold_s=1.0)
    assert auto.decide(queue(clock, 48), busy_s=()).r == R_MAX
    clock.advance(0.1)
    # The held r=24 is dominated at batch 1: the lone request runs at r=0, which is faster.
    assert auto.decide(queue(clock, 1), busy_s=()).r == 0


def test_the_floor_of_every_request_in_the_batch_caps_r():
    clock = FakeClock()
    requests = queue(clock, 48)
    requests[3] = Waiting(clock(), TARGET_S, max_r=8)
    assert controller(clock).decide(requests, busy_s=()).r == 8
    requests[3] = Waiting(clock(), TARGET_S, max_r=10)  # between grid points: the grid r below
    assert controller(clock).decide(requests, busy_s=()).r == 8
    server_cap = AutoController(warmed_table().snapshot, MAX_BATCH, max_r=12, clock=clock)
    assert server_cap.decide(queue(clock, 48), busy_s=()).r == 12


def test_hopeless_requests_do_not_force_the_strongest_merge():
    clock = FakeClock()
    stale = [Waiting(clock() - 1.0, TARGET_S, R_MAX)]  # already past its deadline
    decision = controller(clock).decide(stale + queue(clock, 3), busy_s=())
    assert (decision.r, decision.late) == (0, 1)


def test_admission_refuses_only_past_what_the_floor_can_do():
    clock = FakeClock()
    auto = controller(clock)
    ahead = queue(clock, 56)
    auto.admit(ahead[:20], (), Waiting(clock(), TARGET_S, R_MAX))  # r=24 can
    with pytest.raises(Overloaded):
        auto.admit(ahead[:20], (), Waiting(clock(), TARGET_S, max_r=0))  # but not at floor r=0
    with pytest.raises(Overloaded) as refused:
        auto.admit(ahead, (), Waiting(clock(), TARGET_S, R_MAX))
    # The same prediction: behind 56 requests (7 full batches at r=24) it finishes with the 8th batch
    # (assumed full: under load, later arrivals fill it); the retry is the predicted lateness.
    finish = 8 * cpu_like(R_MAX, 8)
    assert refused.value.retry_after_s == pytest.approx(finish - TARGET_S)


def test_admission_takes_a_target_that_not_even_an_idle_server_meets():
    clock = FakeClock()
    impossible = Waiting(clock(), target_s=0.001, max_r=R_MAX)
    controller(clock).admit(queue(clock, 40), (), impossible)  # refusing would not help it


def test_the_arrival_rate_counts_every_offered_request_over_its_window():
    clock = FakeClock()
    auto = controller(clock)
    for _ in range(400):
        clock.advance(0.005)
        auto.admit([], (), Waiting(clock(), TARGET_S, R_MAX))
    assert len(auto._arrivals) <= 201, "arrivals older than the window are dropped at admission"
    assert auto.arrival_rate() == pytest.approx(200.0, abs=1.0)
    # 200/s: beyond r=16's full batches (154 images/s), within r=20's (182/s)? No: r=24's (222/s).
    assert auto.decide(queue(clock, 8), busy_s=()).needed_r == 24
    clock.advance(0.5025)  # half the arrivals left the window (off the 5 ms grid: no ties)
    assert auto.arrival_rate() == pytest.approx(100.0)
    # 100/s: beyond r=0's full batches (95/s), within r=4's (105/s).
    assert auto.decide(queue(clock, 8), busy_s=()).needed_r == 4


def test_two_lanes_halve_the_wait_of_later_batches():
    clock = FakeClock()
    one, two = controller(clock), controller(clock, lanes=2)
    requests = queue(clock, 32)
    assert two.decide(requests, ()).r < one.decide(requests, ()).r


@dataclass
class Served:
    decisions: list[tuple[float, int, int]] = field(default_factory=list)
    """(time, r, batch size) of every batch."""
    shed: int = 0
    late: int = 0
    answered: int = 0

    def r_changes(self, after: float, batch_size: int | None = None) -> int:
        """Changes of r between consecutive batches (of ``batch_size`` only, if given: a partial
        batch may run at a smaller r because the held one is dominated at its size)."""
        rs = [r for t, r, size in self.decisions if t >= after and batch_size in (None, size)]
        return sum(a != b for a, b in zip(rs, rs[1:], strict=False))

    def mean_r(self) -> float:
        return sum(r for _, r, _ in self.decisions) / len(self.decisions)


def serve(
    auto: AutoController, clock: FakeClock, arrivals: list[float], seconds=cpu_like, lanes: int = 1
) -> Served:
    """``lanes`` inference threads fed by ``auto``: admission at each arrival, a batch whenever a
    thread is free, each taking the fake's true time. Event-driven on the fake clock."""
    served, waiting, free, pending = Served(), [], [clock()] * lanes, list(arrivals)
    while pending or waiting:
        lane = min(range(lanes), key=free.__getitem__)
        if waiting and free[lane] <= (pending[0] if pending else float("inf")):
            clock.now = max(free[lane], clock.now)
            decision = auto.decide(waiting, busy_s(free, clock.now))
            batch, waiting = waiting[: decision.batch_size], waiting[decision.batch_size :]
            free[lane] = clock.now + seconds(decision.r, len(batch))
            served.decisions.append((clock.now, decision.r, len(batch)))
            served.answered += len(batch)
            served.late += sum(free[lane] > w.deadline for w in batch)
            continue
        clock.now = pending.pop(0)
        request = Waiting(clock.now, TARGET_S, R_MAX)
        try:
            auto.admit(waiting, busy_s(free, clock.now), request)
        except Overloaded:
            served.shed += 1
            continue
        waiting.append(request)
    return served


def busy_s(free: list[float], now: float) -> list[float]:
    return sorted(max(0.0, at - now) for at in free)


def steady(rate: float, seconds: float, start: float = 100.0) -> list[float]:
    return [start + i / rate for i in range(int(rate * seconds))]


R0_CAPACITY = MAX_BATCH / cpu_like(0, MAX_BATCH)  # images/s at r=0, full batches


def test_steady_load_above_r0_capacity_is_served_on_time_without_oscillating():
    clock = FakeClock()
    served = serve(controller(clock), clock, steady(1.5 * R0_CAPACITY, 10.0))
    assert served.shed == 0 and served.late <= 0.01 * served.answered
    assert served.r_changes(after=102.0) <= 2
    # r=12 cannot keep up with this rate (133 images/s), r=16 can (154/s): it settles there.
    assert {r for t, r, _ in served.decisions if t >= 102.0} == {16}


def poisson(rate: float, seconds: float, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    arrivals, now = [], 100.0
    while now < 100.0 + seconds:
        now += rng.expovariate(rate)
        arrivals.append(now)
    return arrivals


@pytest.mark.parametrize("load", [1.0, 1.5, 2.0])
def test_poisson_load_changes_r_rarely_and_less_than_without_hysteresis(load):
    arrivals = poisson(load * R0_CAPACITY, 20.0)
    clock = FakeClock()
    held = serve(controller(clock, hold_s=1.0), clock, arrivals)
    clock = FakeClock()
    restless = serve(controller(clock, hold_s=0.0), clock, arrivals)
    assert held.late == 0 and held.shed == 0
    changes = held.r_changes(after=101.0, batch_size=MAX_BATCH)
    assert changes <= 20, "at most one change of r per second between full batches"
    assert changes < restless.r_changes(after=101.0, batch_size=MAX_BATCH) / 1.5


def test_light_load_stays_at_r0_and_overload_sheds_what_the_floor_cannot_carry():
    clock = FakeClock()
    light = serve(controller(clock), clock, steady(0.5 * R0_CAPACITY, 10.0))
    assert light.mean_r() <= 2 and light.shed == 0 and light.late == 0
    clock = FakeClock()
    floor_capacity = MAX_BATCH / cpu_like(R_MAX, MAX_BATCH)
    over = serve(controller(clock), clock, steady(1.5 * floor_capacity, 10.0))
    assert 0.2 < over.shed / (over.shed + over.answered) < 0.45
    assert over.late <= 0.01 * over.answered, "what is admitted is answered on time"


@pytest.mark.parametrize("load", [0.5, 1.5, 3.0])
def test_two_inference_threads_answer_what_they_admit_on_time(load):
    clock = FakeClock()
    auto = controller(clock, lanes=2)
    served = serve(auto, clock, poisson(load * 2 * R0_CAPACITY, 10.0), lanes=2)
    assert served.late <= 0.01 * served.answered
    assert (served.shed == 0) == (load < 3.0), "only 3x exceeds the floor's capacity (2 x 222/s)"


def test_backlog_predicts_when_a_lane_frees():
    clock = FakeClock()
    backlog = Backlog(lanes=2, clock=clock)
    assert backlog.ahead_s() == 0.0
    running = backlog.add(0.10)
    backlog.start(running)
    assert backlog.ahead_s() == 0.0, "the second lane is free"
    other = backlog.add(0.30)
    backlog.start(other)
    clock.advance(0.04)
    assert backlog.ahead_s() == pytest.approx(0.06)
    backlog.add(0.20)  # waits for the first free lane, which then is busy until 0.26
    assert backlog.ahead_s() == pytest.approx(0.26)
    assert backlog.busy_s() == pytest.approx([0.26, 0.26])
    backlog.finish(running)
    assert backlog.ahead_s() == pytest.approx(0.20)
    clock.advance(1.0)  # "other" overran its prediction: counted as ending now, not in the past
    assert backlog.ahead_s() == pytest.approx(0.0)
    backlog.finish(other)
    assert backlog.ahead_s() == 0.0


def test_a_backlog_that_lost_its_target_still_raises_r():
    """Requests that waited out their target before reaching the queue (e.g. in decoding, under a
    burst) count with a fresh target from now: a backlog of them is merged through quickly, while one
    such request alone does not force any merging."""
    clock = FakeClock()
    stale = [Waiting(clock() - 1.0, TARGET_S, R_MAX) for _ in range(24)]
    decision = controller(clock).decide(stale, busy_s=())
    fresh = controller(clock).decide(queue(clock, 24), busy_s=())
    assert decision.needed_r == fresh.needed_r > 0
    assert controller(clock).decide(stale[:1], busy_s=()).r == 0


def test_admission_does_not_refuse_an_idle_server_s_work_when_a_full_batch_misses_the_target():
    """A target below one full batch's time (a timing table that followed a loaded machine): the
    queue's own batches decide, so an empty server admits, and a long queue still sheds."""
    clock = FakeClock()
    target = 0.8 * cpu_like(0, MAX_BATCH)
    auto = controller(clock)
    auto.admit([], busy_s=(), request=Waiting(clock(), target, 0))
    with pytest.raises(Overloaded):
        auto.admit(queue(clock, 4 * MAX_BATCH, target, 0), busy_s=(), request=Waiting(clock(), target, 0))
