"""One deadline-aware scheduler for all the streams of a model instance. Pure: the
caller gives it the time and what each piece of work took; it says what to run next.

A stream needs one piece of work at a time: the text part of its next sentence
(`Need("text")`), or a window of frames of a fixed length (`Need("frames", 128)`).
Frames work is batched: the rows of a batch need windows of the same length, and a
batch has one of a few fixed sizes (`sizes`), so that every shape the engine runs was
seen before. The next piece goes, in this order, to
1. live streams whose audio is about to run out (**due**: less audio ahead of the
   listener than the time the next batches may take), the least ahead first;
2. live streams that have sent no audio yet, oldest first (a new stream's first audio
   goes before a running stream's chunk that is not yet due);
3. live streams less than `low_lead` seconds ahead;
4. bulk streams (`tts_batch`), oldest first: bulk fills what live streams leave;
5. live streams less than `max_lead` seconds ahead (a buffer against the next burst);
6. live streams further ahead, only when nothing else is waiting: the engine never
   idles while a stream has audio left to make (a client that waits for the whole
   reply gets it as fast as the engine can make it, not at the listener's pace).
Work of classes 4 to 6 alone is `cuttable`: nobody waits for it yet, so a caller may
cut it short (and run it again later) rather than make a new stream's first audio wait
for it, unless the engine is near capacity (a live stream `short` of audio, or the
live streams' `demand` near what the lanes make: `serving.worker`).
A stream's playback starts when its first audio leaves and runs at 1x, so the audio
ahead of the listener is `started + sent - now`. A chunk that leaves after that has
run out is an underrun (`underruns` counts them: the replica was past its capacity).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

Priority = Literal["realtime", "bulk"]
REALTIME: Priority = "realtime"
BULK: Priority = "bulk"
URGENT = 2  # classes up to this one (due chunks, first audio) are urgent
EAGER = 6  # the class of streams far ahead: work nobody waits for yet
CUTTABLE = 4  # classes from this one on (bulk, live streams >= low_lead ahead) may be cut
FREE_RIDE = 1.25  # how much longer a batch may take for rows that are not urgent
WAKE_RESOLUTION = 0.001  # seconds: the shortest wait `wake` asks for


@dataclass(frozen=True)
class Need:
    kind: Literal["text", "frames"]
    frames: int = 0  # the window's length, for "frames"


TEXT = Need("text")


@dataclass(frozen=True)
class Work:
    need: Need
    streams: tuple[Hashable, ...]
    eager: bool = False  # only streams far ahead (class 6): work nobody waits for
    # Only rows of class CUTTABLE or later (bulk, streams ahead of their listeners): a
    # lane may cut it short for a new stream's first audio.
    cuttable: bool = False


@dataclass
class _Stream:
    priority: Priority
    arrived: float
    need: Need
    started: float | None = None  # when its first audio left
    sent: float = 0.0  # seconds of audio sent

    def ahead(self, now: float) -> float:
        """Seconds of audio the listener has yet to hear (0 before the first audio)."""
        return 0.0 if self.started is None else self.started + self.sent - now


@dataclass
class Costs:
    """What work takes, learnt as it runs: an average per (need, batch size), with a
    linear guess from the nearest measured size until one is measured."""

    text_seconds: float = 0.02
    frame_seconds: float = 0.0005  # per frame of window per row
    decay: float = 0.2
    seen: dict[tuple[Need, int], float] = field(default_factory=dict)
    # Engine seconds per second of audio the windows make (context and overlap included).
    per_audio_second: float = 0.1

    def estimate(self, need: Need, batch: int) -> float:
        known = self.seen.get((need, batch))
        if known is not None:
            return known
        same = [(b, s) for (n, b), s in self.seen.items() if n == need]
        if same:
            b, s = min(same, key=lambda item: abs(item[0] - batch))
            return s * batch / b
        if need.kind == "text":
            return self.text_seconds * batch
        return self.frame_seconds * need.frames * batch

    def record(self, need: Need, batch: int, seconds: float, audio: float = 0.0) -> None:
        """`need` for `batch` rows took `seconds` and made `audio` seconds of audio."""
        known = self.seen.get((need, batch))
        self.seen[(need, batch)] = (
            seconds if known is None else known + self.decay * (seconds - known)
        )
        if need.kind == "frames" and audio > 0:
            self.per_audio_second += self.decay * (seconds / audio - self.per_audio_second)


class Scheduler:
    def __init__(
        self, *, sizes: Iterable[int] = (1, 2, 4, 8), low_lead: float = 1.0,
        max_lead: float = 3.0, margin: float = 0.05, costs: Costs | None = None,
    ) -> None:  # fmt: skip
        self.sizes = tuple(sorted(set(sizes)))
        if not self.sizes or self.sizes[0] != 1:
            raise ValueError(f"batch sizes must include 1 (got {self.sizes})")
        self.low_lead, self.max_lead, self.margin = low_lead, max_lead, margin
        self.costs = costs or Costs()
        self.streams: dict[Hashable, _Stream] = {}
        self.underruns = 0

    def add(
        self, key: Hashable, now: float, priority: Priority = REALTIME, need: Need = TEXT
    ) -> None:
        self.streams[key] = _Stream(priority, now, need)

    def drop(self, key: Hashable) -> None:
        """A stream that ended or was cancelled: its slot is free."""
        self.streams.pop(key, None)

    def ahead(self, key: Hashable, now: float) -> float:
        return self.streams[key].ahead(now)

    def demand(self) -> float:
        """Engine seconds a second the live streams need to keep playing (each plays 1 s
        of audio a second): how busy the lanes must be, whatever they run now."""
        live = sum(stream.priority == REALTIME for stream in self.streams.values())
        return live * self.costs.per_audio_second

    def short(self, now: float) -> bool:
        """Whether a playing live stream has less than `low_lead` seconds of audio ahead
        (the engine is busy keeping up: work cut short now is work it cannot spare)."""
        return any(
            stream.priority == REALTIME and stream.started is not None
            and stream.ahead(now) < self.low_lead
            for stream in self.streams.values()
        )  # fmt: skip

    def horizon(self) -> float:
        """How little audio ahead makes a stream due: time for the batch that may be
        running now and its own (each as big as the streams allow), plus a margin."""
        frames = [s.need for s in self.streams.values() if s.need.kind == "frames"]
        rows = self._fit(len(frames))
        need = max(frames, key=lambda n: n.frames, default=TEXT)
        return self.margin + 2 * max(self.costs.estimate(need, rows), self.costs.estimate(TEXT, 1))

    def _rank(self, stream: _Stream, now: float, horizon: float) -> tuple[int, float] | None:
        """(class, order within it) as the module says, None if not runnable now."""
        if stream.priority == BULK:
            return (4, stream.arrived)
        if stream.started is None:
            return (2, stream.arrived)
        ahead = stream.ahead(now)
        if ahead <= horizon:
            return (1, ahead)
        if ahead < self.low_lead:
            return (3, ahead)
        if ahead < self.max_lead:
            return (5, ahead)
        return (EAGER, ahead)

    def next(
        self, now: float, busy: Collection[Hashable] = (), *, eager: bool = True
    ) -> Work | None:
        """The piece of work to run now, or None when there is none; streams in `busy`
        (their last piece still running elsewhere) are not in it, and with `eager`
        False neither are streams far ahead (class 6: a caller with several lanes
        keeps such work to one of them, so that another is free for a new stream's
        first audio; a 200-frame window holds a lane for ~160 ms here)."""
        horizon = self.horizon()
        ranked = sorted(
            (rank, key)
            for key, stream in self.streams.items()
            if key not in busy
            and (rank := self._rank(stream, now, horizon)) is not None
            and (eager or rank[0] < EAGER)
        )
        if not ranked:
            return None
        head = self.streams[ranked[0][1]].need
        if head.kind == "text":
            order = ranked[0][0][0]
            return Work(head, (ranked[0][1],), order == EAGER, order >= CUTTABLE)
        same = [(rank, key) for rank, key in ranked if self.streams[key].need == head]
        urgent = [key for rank, key in same if rank[0] <= URGENT]
        others = [key for rank, key in same if rank[0] > URGENT]
        if not urgent:
            rows = same[: self._fit(len(others))]
            return Work(
                head, tuple(key for _, key in rows), all(r[0] == EAGER for r, _ in rows),
                all(r[0] >= CUTTABLE for r, _ in rows),
            )  # fmt: skip
        # Urgent rows (due, or a first audio) with as many others as ride for free: a
        # bigger batch only if it costs at most FREE_RIDE times the urgent rows' own
        # (on a GPU extra rows cost little; on a CPU a row costs its frames).
        size = self._fit(len(urgent))
        limit = FREE_RIDE * self.costs.estimate(head, size)
        for bigger in self.sizes:
            if size < bigger <= len(same) and self.costs.estimate(head, bigger) <= limit:
                size = bigger
        return Work(head, tuple((urgent + others)[:size]))

    def _fit(self, rows: int) -> int:
        """The largest batch size for `rows` rows."""
        return max(size for size in self.sizes if size <= max(1, rows))

    def wake(self, now: float, busy: Collection[Hashable] = ()) -> float:
        """Seconds until some stream not runnable now becomes runnable (its lead falls
        below `max_lead`); inf when there is none. Streams in `busy` are not counted:
        they become runnable when their running work ends, which the caller hears of
        (a lane waiting on another lane's stream must not poll meanwhile: each look
        takes the interpreter from the lanes that work)."""
        waits = [
            stream.ahead(now) - self.max_lead
            for key, stream in self.streams.items()
            if stream.priority == REALTIME and stream.started is not None and key not in busy
        ]
        return max(WAKE_RESOLUTION, min(waits, default=math.inf))

    def done(
        self, work: Work, began: float, ended: float, sent: Mapping[Hashable, float],
        needs: Mapping[Hashable, Need | None],
    ) -> None:  # fmt: skip
        """`work` ran from `began` to `ended`: each stream sent `sent[key]` seconds of
        audio at `ended` and now needs `needs[key]` (None: it is finished)."""
        self.costs.record(work.need, len(work.streams), ended - began, sum(sent.values()))
        for key in work.streams:
            stream = self.streams.get(key)
            if stream is None:  # dropped while its work ran
                continue
            seconds = sent.get(key, 0.0)
            if seconds > 0:
                if stream.started is None:
                    stream.started = ended
                elif stream.priority == REALTIME and stream.ahead(ended) < 0:
                    self.underruns += 1
                    stream.started = ended - stream.sent  # playback resumes from here
                stream.sent += seconds
            need = needs.get(key)
            if need is None:
                self.drop(key)
            else:
                stream.need = need
