"""The deadline-aware scheduler on a simulated clock and a simulated engine: what runs
first, how batches form, and that streams within capacity never underrun."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from ttsfleet.serving import streaming
from ttsfleet.serving.scheduler import BULK, REALTIME, TEXT, Costs, Need, Scheduler, Work

FRAME_SECONDS = 256 / 22_050
FIRST, WINDOW = Need("frames", streaming.FIRST_WINDOW), Need("frames", streaming.WINDOW)


@dataclass
class FakeStream:
    """A stream as the engine sees it, with sentences of known frame counts."""

    sentences: list[int]
    bulk: bool = False
    frames: int | None = None
    position: int = 0
    first: bool = True

    def need(self) -> Need | None:
        if self.frames is not None and self.position >= self.frames:
            self.frames = None
        if self.frames is None:
            return TEXT if self.sentences else None
        return FIRST if self.first and not self.bulk else WINDOW

    def run(self, need: Need) -> float:
        """Seconds of audio made."""
        if need.kind == "text":
            self.frames, self.position = self.sentences.pop(0), 0
            return 0.0
        assert self.frames is not None
        _, end = streaming.place(self.position, self.frames, need.frames)
        made = end - self.position
        self.position, self.first = end, False
        return made * FRAME_SECONDS


@dataclass
class Engine:
    """The measured cost of this CPU: a text part ~17 ms, 0.43 ms a frame of window."""

    text_seconds: float = 0.017
    frame_seconds: float = 0.00043
    log: list[tuple[float, Work]] = field(default_factory=list)

    def cost(self, work: Work) -> float:
        if work.need.kind == "text":
            return self.text_seconds * len(work.streams)
        return self.frame_seconds * work.need.frames * len(work.streams)


def simulate(
    arrivals: list[tuple[float, str, FakeStream]], scheduler: Scheduler, engine: Engine,
    until: float = 120.0,
) -> dict[str, float]:  # fmt: skip
    """Run until every stream is done; each stream's time to first audio."""
    streams: dict[str, FakeStream] = {}
    first: dict[str, float] = {}
    arrived: dict[str, float] = {}
    pending = sorted(arrivals, key=lambda a: a[0])
    now = 0.0
    while (pending or scheduler.streams) and now < until:
        while pending and pending[0][0] <= now:
            at, key, stream = pending.pop(0)
            streams[key], arrived[key] = stream, at
            scheduler.add(key, at, BULK if stream.bulk else REALTIME, stream.need() or TEXT)
        work = scheduler.next(now)
        if work is None:
            later = [pending[0][0]] if pending else []
            wake = scheduler.wake(now)
            now = min([*later, now + wake if wake < float("inf") else now + 1.0])
            continue
        engine.log.append((now, work))
        began, now = now, now + engine.cost(work)
        sent = {key: streams[key].run(work.need) for key in work.streams}
        for key, seconds in sent.items():
            if seconds and key not in first:
                first[key] = now - arrived[key]
        needs = {key: streams[key].need() for key in work.streams}
        scheduler.done(work, began, now, {k: s for k, s in sent.items() if s}, needs)
    return first


def sentences(rng: random.Random, seconds: float) -> list[int]:
    """Sentences of 1.5-4 s making up about `seconds` of audio."""
    out: list[int] = []
    while sum(out) * FRAME_SECONDS < seconds:
        out.append(int(rng.uniform(1.5, 4.0) / FRAME_SECONDS))
    return out


def test_a_new_streams_first_audio_goes_before_a_running_stream_that_is_not_due() -> None:
    scheduler = Scheduler()
    scheduler.add("old", 0.0, need=WINDOW)
    scheduler.done(Work(WINDOW, ("old",)), 0.0, 0.1, {"old": 1.6}, {"old": WINDOW})
    scheduler.add("new", 0.2)
    assert scheduler.next(0.2) == Work(TEXT, ("new",))
    # Once the old stream's audio is about to run out, it goes first.
    assert scheduler.next(1.6) == Work(WINDOW, ("old",))


def test_bulk_runs_only_when_no_live_stream_is_due_or_new() -> None:
    scheduler = Scheduler()
    scheduler.add("bulk", 0.0, BULK, WINDOW)
    scheduler.add("live", 0.0, need=WINDOW)
    scheduler.done(Work(WINDOW, ("live",)), 0.0, 0.1, {"live": 0.1}, {"live": WINDOW})
    assert scheduler.next(0.15).streams == ("live",)  # due: 50 ms of audio left
    scheduler.done(Work(WINDOW, ("live",)), 0.15, 0.2, {"live": 2.0}, {"live": WINDOW})
    assert scheduler.next(0.3).streams[0] == "bulk"  # live is 1.9 s ahead: bulk goes first
    scheduler.add("newcomer", 0.3)
    assert scheduler.next(0.3).streams == ("newcomer",)


def test_a_stream_far_ahead_runs_only_when_nothing_else_waits() -> None:
    scheduler = Scheduler(max_lead=3.0, sizes=(1,))
    scheduler.add("a", 0.0, need=WINDOW)
    scheduler.done(Work(WINDOW, ("a",)), 0.0, 0.1, {"a": 5.0}, {"a": WINDOW})
    scheduler.add("bulk", 0.2, BULK, WINDOW)
    # bulk before a stream 4.9 s ahead; nobody waits for it: it may be cut short
    assert scheduler.next(0.2) == Work(WINDOW, ("bulk",), cuttable=True)
    scheduler.drop("bulk")
    # alone: the engine does not idle, and the work says nobody waits for it
    assert scheduler.next(0.2) == Work(WINDOW, ("a",), eager=True, cuttable=True)
    assert scheduler.next(0.2, busy={"a"}) is None
    # a caller whose other lane already runs such work keeps this one free
    assert scheduler.next(0.2, eager=False) is None
    scheduler.add("new", 0.2, need=WINDOW)
    assert scheduler.next(0.2, eager=False) == Work(WINDOW, ("new",))
    scheduler.drop("new")
    scheduler.drop("a")
    assert scheduler.next(2.2) is None and scheduler.wake(2.2) == float("inf")


def test_only_work_nobody_waits_for_may_be_cut_short() -> None:
    """Bulk, and live streams at least `low_lead` ahead, may be cut short for a new
    stream's first audio; a first audio, a due chunk, or a stream less than `low_lead`
    ahead may not, nor a batch holding any of them."""
    scheduler = Scheduler(sizes=(1, 2), low_lead=1.0, max_lead=3.0)
    scheduler.add("new", 0.0)
    assert scheduler.next(0.0) == Work(TEXT, ("new",))  # a first audio: not cuttable
    scheduler.drop("new")
    for key, lead in (("due", 0.1), ("near", 0.5), ("ahead", 2.0), ("far", 5.0)):
        scheduler.add(key, 0.0, need=WINDOW)
        scheduler.done(Work(WINDOW, (key,)), 0.0, 0.0, {key: lead}, {key: WINDOW})
    assert scheduler.next(0.0, {"near", "ahead", "far"}) == Work(WINDOW, ("due",))
    assert scheduler.next(0.0, {"due", "ahead", "far"}) == Work(WINDOW, ("near",))
    assert scheduler.next(0.0, {"due", "near", "far"}) == Work(WINDOW, ("ahead",), cuttable=True)
    assert scheduler.next(0.0, {"due", "near", "ahead"}) == Work(
        WINDOW, ("far",), eager=True, cuttable=True
    )
    # a batch of a stream ahead and one near its listener is not
    assert scheduler.next(0.0, {"due", "far"}) == Work(WINDOW, ("near", "ahead"))
    scheduler.add("bulk", 0.0, BULK)
    assert scheduler.next(0.0, {"due", "near", "ahead", "far"}) == Work(
        TEXT, ("bulk",), cuttable=True
    )
    # ... and none is cut while a playing stream is short of audio (under `low_lead`)
    assert scheduler.short(0.0)
    scheduler.drop("due")
    scheduler.drop("near")
    assert not scheduler.short(0.0) and scheduler.short(1.5)


def test_demand_is_the_engine_time_the_live_streams_need() -> None:
    """Each live stream plays a second of audio a second; what that costs the engine is
    learnt from the windows run (bulk needs no pace)."""
    scheduler = Scheduler()
    for key in range(4):
        scheduler.add(key, 0.0, need=WINDOW)
    scheduler.add("bulk", 0.0, BULK, WINDOW)
    assert scheduler.demand() == pytest.approx(4 * Costs().per_audio_second)
    for _ in range(40):  # 0.3 s of engine for 1.5 s of audio
        scheduler.done(Work(WINDOW, (0,)), 0.0, 0.3, {0: 1.5}, {0: WINDOW})
    assert scheduler.demand() == pytest.approx(4 * 0.2, rel=1e-3)


def test_batches_have_a_fixed_size_and_one_window_length() -> None:
    scheduler = Scheduler(sizes=(1, 2, 4, 8))
    running = [f"s{n}" for n in range(7)]
    for key in running:
        scheduler.add(key, 0.0, need=WINDOW)
    sent = dict.fromkeys(running, 0.05)
    scheduler.done(Work(WINDOW, tuple(running)), 0.0, 0.1, sent, dict.fromkeys(running, WINDOW))
    scheduler.add("first", 0.1, need=FIRST)
    work = scheduler.next(0.1)  # seven due streams: four of them, then the others
    assert work is not None and work.need == WINDOW and len(work.streams) == 4
    assert Scheduler(sizes=(1,)).sizes == (1,)
    with pytest.raises(ValueError, match="include 1"):
        Scheduler(sizes=(2, 4))


def test_costs_are_learnt_and_guessed_linearly_until_measured() -> None:
    costs = Costs()
    costs.record(WINDOW, 2, 0.2)
    assert costs.estimate(WINDOW, 4) == pytest.approx(0.4)
    costs.record(WINDOW, 4, 0.3)
    assert costs.estimate(WINDOW, 4) == pytest.approx(0.3)
    costs.record(WINDOW, 4, 0.5)
    assert 0.3 < costs.estimate(WINDOW, 4) < 0.5


@pytest.mark.parametrize(
    ("count", "spread", "worst_first_audio"), [(1, 2, 0.1), (4, 2, 0.2), (8, 2, 0.4), (16, 15, 0.5)]
)
def test_live_streams_within_capacity_never_underrun(
    count: int, spread: float, worst_first_audio: float
) -> None:
    """15 s streams arriving over `spread` seconds, on this CPU's measured costs: every
    stream plays through, and its first audio comes soon (simulated time)."""
    rng = random.Random(count)
    arrivals = [
        (rng.uniform(0, spread), f"s{n}", FakeStream(sentences(rng, 15.0))) for n in range(count)
    ]
    scheduler = Scheduler()
    first = simulate(arrivals, scheduler, Engine())
    assert len(first) == count
    assert scheduler.underruns == 0
    assert max(first.values()) < worst_first_audio


def test_past_capacity_the_underruns_are_counted() -> None:
    rng = random.Random(1)
    arrivals = [(0.0, f"s{n}", FakeStream(sentences(rng, 10.0))) for n in range(40)]
    scheduler = Scheduler()
    simulate(arrivals, scheduler, Engine())
    assert scheduler.underruns > 0


def test_bulk_fills_idle_time_without_making_live_streams_late() -> None:
    def live() -> list[tuple[float, str, FakeStream]]:
        rng = random.Random(7)
        return [(rng.uniform(0, 1), f"live{n}", FakeStream(sentences(rng, 15.0))) for n in range(8)]

    alone = simulate(live(), Scheduler(), Engine())
    rng = random.Random(8)
    bulk = [(0.0, f"bulk{n}", FakeStream(sentences(rng, 20.0), bulk=True)) for n in range(4)]
    scheduler, engine = Scheduler(), Engine()
    first = simulate(live() + bulk, scheduler, engine)
    assert scheduler.underruns == 0
    # A live stream's first audio waits at most for the bulk window running when it
    # came (a window is not interrupted), never for bulk work queued before it.
    window = engine.frame_seconds * streaming.WINDOW
    assert max(t for k, t in first.items() if k.startswith("live")) <= max(alone.values()) + window
    # Bulk got real work done while the live streams played (not only after them).
    bulk_work = [w for at, w in engine.log if at < 15.0 and w.streams[0].startswith("bulk")]
    assert len(bulk_work) > 10
