"""The thread that runs all the streams of one model instance.

Triton's `execute` only hands each request over (`submit`) and returns; this thread
asks the scheduler what to run next, runs it on the engine and gives each stream's
sink its audio. A stream whose sink says it was cancelled is dropped when its turn
comes (before anything more is made for it), which frees its slot at its next chunk.

Not Triton-specific: a sink is anything with `cancelled`, `audio` and `end`; the
Triton models give one around a response sender (`serving.backend.TritonSink`), the
tests their own.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from ttsfleet.serving.engine import Audio
from ttsfleet.serving.frames import CutShortError
from ttsfleet.serving.scheduler import BULK, REALTIME, Need, Priority, Scheduler, Work
from ttsfleet.serving.streaming import ChunkedSynthesizer, Stream

log = logging.getLogger("ttsfleet.serving")

IDLE_POLL_SECONDS = 1.0  # the longest the thread sleeps with nothing runnable
# Work that would end within this is left to end rather than cut (what it did is lost).
CUT_LEFT_SECONDS = 0.015
# Nothing is cut while the live streams need more than this share of the lanes' time:
# near capacity, work made twice is audio some stream will miss.
CUT_LOAD = 0.6


class Sink(Protocol):
    """Where a stream's audio goes. Lanes call sinks from their own threads, several at
    once: a sink that cannot take that must serialise itself (`TritonSink` does)."""

    def cancelled(self) -> bool: ...

    def audio(self, samples: Audio) -> None: ...

    def end(self, error: str | None = None) -> None: ...


@dataclass(eq=False)
class _Lane:
    """One thread running the scheduler's work on its own engine."""

    engine: ChunkedSynthesizer
    options: Any  # onnxruntime RunOptions of its runs: `terminate` cuts the run short
    work: Work | None = None  # what it runs now
    began: float = 0.0
    cut: bool = False  # told to cut `work` short


class Worker:
    """One scheduler, `lanes` threads running its work side by side: each lane has its
    own engine (its own sessions of `engine.threads` threads), a stream runs in one
    lane at a time. Two single-threaded lanes on two cores make ~15 % more audio than
    one lane of two threads (small convolutions scale poorly across threads), and a
    new stream's first audio waits for half as much work already running.

    With `cut`, a new stream whose first audio would wait (every lane working) cuts
    short a lane's work that nobody waits for (`Work.cuttable`: bulk, streams ahead of
    their listeners; onnxruntime stops it within ~2 ms), unless it is past its half
    or about to end, or the engine is near capacity (`_cut_for_first_audio`): that
    work runs again later, and the new stream's first audio does not wait for a
    200-frame window (~150 ms on one core here). Off for GPU instances, whose windows
    take a few milliseconds."""

    def __init__(
        self, engine: ChunkedSynthesizer, *, sizes: Iterable[int] = (1,), lanes: int = 1,
        wide: ChunkedSynthesizer | None = None, clock: Callable[[], float] = time.perf_counter,
        cut: bool = True,
    ) -> None:  # fmt: skip
        self.engine = engine  # phonemises (in the callers' thread) and is the first lane
        # An engine whose sessions use every core, for a new stream's first audio when
        # no other lane is working (the first window takes 27 ms on two threads, 41 ms
        # on one): a lane that starts meanwhile shares the cores with it until it ends.
        self._wide = wide
        self.scheduler = Scheduler(sizes=sizes)
        self._clock = clock
        self._streams: dict[Hashable, tuple[Stream, Sink]] = {}
        self._running: set[Hashable] = set()
        self._keys = itertools.count()
        self._wake = threading.Condition()
        self._closed = False
        self._cut = cut
        self.cuts = 0  # works cut short
        import onnxruntime  # noqa: PLC0415 - the serving extra

        engines = [engine] + [engine.lane(engine.threads or 1) for _ in range(lanes - 1)]
        self._lanes = [_Lane(e, onnxruntime.RunOptions()) for e in engines]
        self._threads = [
            threading.Thread(target=self._run, args=(lane,), name=f"tts-lane-{n}", daemon=True)
            for n, lane in enumerate(self._lanes)
        ]

    def start(self) -> Worker:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the work running now; streams still open end with an error."""
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        for thread in self._threads:
            thread.join(timeout)

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def submit(self, text: str, rate: float, sink: Sink, priority: Priority = REALTIME) -> None:
        """A new stream of `text` (phonemised here, in the caller's thread; a
        RequestError is the caller's to report)."""
        stream = self.engine.open(text, rate, bulk=priority == BULK)
        need = stream.need()
        if need is None:  # nothing to say
            sink.end()
            return
        with self._wake:
            if self._closed:
                sink.end(UNLOADING)
                return
            key = next(self._keys)
            self._streams[key] = (stream, sink)
            now = self._clock()
            self.scheduler.add(key, now, priority, need)
            self._wake.notify()
            if priority == REALTIME and self._cut:
                self._cut_for_first_audio(now)

    def _cut_for_first_audio(self, now: float) -> None:
        """When every lane works, cut short the cuttable work that began last (the
        least lost), if it would not end within CUT_LEFT_SECONDS and has more left to
        run than it ran (under the lock). Near capacity nothing is cut (a live stream
        short of audio, or the live streams needing more than CUT_LOAD of the lanes):
        the engine's time goes to audio, not to work made twice."""
        scheduler = self.scheduler
        if (
            any(lane.work is None for lane in self._lanes)  # one is free for the new stream
            or scheduler.short(now)
            or scheduler.demand() > CUT_LOAD * len(self._lanes)
        ):
            return
        costs = scheduler.costs

        def left(lane: _Lane) -> float:
            assert lane.work is not None
            return costs.estimate(lane.work.need, len(lane.work.streams)) - (now - lane.began)

        cuttable = [
            lane for lane in self._lanes
            if lane.work is not None and lane.work.cuttable and not lane.cut
            # what the new stream would wait for exceeds what is lost (its time so far)
            and left(lane) > max(CUT_LEFT_SECONDS, now - lane.began)
        ]  # fmt: skip
        if cuttable:
            lane = max(cuttable, key=lambda lane: lane.began)
            lane.cut = True
            lane.options.terminate = True

    def _next(self, lane: _Lane) -> tuple[Work, ChunkedSynthesizer | None] | None:
        """The next work for `lane` (its streams marked running) and the wide engine if
        it runs there (a first audio while no other lane works: then no other lane can
        take the wide engine until this work ends), waiting for some; None once
        stopped."""
        with self._wake:
            while not self._closed:
                now = self._clock()
                # work nobody waits for (see Scheduler.next): at most one lane on it
                eager = not any(
                    other.work is not None and other.work.eager for other in self._lanes
                )
                work = self.scheduler.next(now, busy=self._running, eager=eager)
                if work is not None:
                    first = all(self.scheduler.streams[k].started is None for k in work.streams)
                    wide = self._wide if first and not self._running else None
                    self._running.update(work.streams)
                    lane.work, lane.began, lane.cut = work, now, False
                    lane.options.terminate = False
                    return work, wide
                self._wake.wait(min(self.scheduler.wake(now, self._running), IDLE_POLL_SECONDS))
            for key in [k for k in self._streams if k not in self._running]:
                self._end(key, UNLOADING)
            return None

    def _end(self, key: Hashable, error: str | None = None) -> None:
        """Drop stream `key` and tell its sink (under the lock)."""
        _, sink = self._streams.pop(key)
        self.scheduler.drop(key)
        with contextlib.suppress(Exception):  # the client is gone: nothing to tell
            sink.end(error)

    def _run(self, lane: _Lane) -> None:
        lane.engine.warm()  # this lane's thread runs its shapes (a GPU's graphs are per thread)
        while (picked := self._next(lane)) is not None:
            work, wide = picked
            try:
                live = self._live(work)
                if live:
                    kept = Work(work.need, tuple(key for key, _, _ in live))
                    self._step(wide or lane.engine, kept, live, lane.options)
            finally:
                with self._wake:
                    lane.work = None
                    self._running.difference_update(work.streams)
                    self._wake.notify_all()
                    if self._closed:  # a stream that ran while stopping ends now
                        for key in [k for k in work.streams if k in self._streams]:
                            self._end(key, UNLOADING)

    def _live(self, work: Work) -> list[tuple[Hashable, Stream, Sink]]:
        """`work`'s streams whose clients are still there; the others end now."""
        live = []
        for key in work.streams:
            stream, sink = self._streams[key]
            if sink.cancelled():
                with self._wake:
                    self._end(key)
            else:
                live.append((key, stream, sink))
        return live

    def _step(
        self, engine: ChunkedSynthesizer, work: Work, live: list[tuple[Hashable, Stream, Sink]],
        options: Any,
    ) -> None:  # fmt: skip
        """Run `work` on `engine`, send what it made, and tell the scheduler (nothing,
        when it was cut short: its streams are as they were, and wait their turn)."""
        began = self._clock()
        try:
            made = _make(engine, work, [stream for _, stream, _ in live], options)
        except CutShortError:
            with self._wake:
                self.cuts += 1
            return
        except Exception as err:  # these streams fail; the others go on
            log.exception("synthesis failed")
            with self._wake:
                for key, _, _ in live:
                    self._end(key, f"synthesis failed: {err}")
            return
        ended = self._clock()
        sent: dict[Hashable, float] = {}
        gone = set()
        for (key, _, sink), audio in zip(live, made, strict=True):
            if audio is None:
                continue
            try:
                sink.audio(audio)
            except Exception:  # the client went: make no more of its audio
                log.debug("stream %s: its client is gone", key, exc_info=True)
                gone.add(key)
                continue
            sent[key] = audio.size / engine.sample_rate
        with self._wake:
            needs: dict[Hashable, Need | None] = {key: s.need() for key, s, _ in live}
            self.scheduler.done(work, began, ended, sent, needs)
            for key, _, _ in live:
                if needs[key] is None or key in gone:
                    self._end(key)


UNLOADING = "the model is unloading: retry on another replica"


def _make(
    engine: ChunkedSynthesizer, work: Work, streams: list[Stream], options: Any
) -> list[Audio | None]:
    if work.need.kind == "text":
        for stream in streams:
            engine.run_text(stream, options)
        return [None] * len(streams)
    return list(engine.run_frames(streams, work.need.frames, options=options))
