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
from typing import Protocol

from ttsfleet.serving.engine import Audio
from ttsfleet.serving.scheduler import BULK, REALTIME, Need, Priority, Scheduler, Work
from ttsfleet.serving.streaming import ChunkedSynthesizer, Stream

log = logging.getLogger("ttsfleet.serving")

IDLE_POLL_SECONDS = 1.0  # the longest the thread sleeps with nothing runnable


class Sink(Protocol):
    """Where a stream's audio goes. Lanes call sinks from their own threads, several at
    once: a sink that cannot take that must serialise itself (`TritonSink` does)."""

    def cancelled(self) -> bool: ...

    def audio(self, samples: Audio) -> None: ...

    def end(self, error: str | None = None) -> None: ...


class Worker:
    """One scheduler, `lanes` threads running its work side by side: each lane has its
    own engine (its own sessions of `engine.threads` threads), a stream runs in one
    lane at a time. Two single-threaded lanes on two cores make ~15 % more audio than
    one lane of two threads (small convolutions scale poorly across threads), and a
    new stream's first audio waits for half as much work already running."""

    def __init__(
        self, engine: ChunkedSynthesizer, *, sizes: Iterable[int] = (1,), lanes: int = 1,
        wide: ChunkedSynthesizer | None = None, clock: Callable[[], float] = time.perf_counter,
    ) -> None:  # fmt: skip
        self.engine = engine  # phonemises (in the callers' thread) and is the first lane
        # An engine whose sessions use every core, for a new stream's first audio when
        # no other lane is working (the first window takes 27 ms on two threads, 41 ms
        # on one): a lane that starts meanwhile shares the cores with it until it ends.
        self._wide = wide
        self._eager = 0  # lanes running work nobody waits for (see Scheduler.next)
        self.scheduler = Scheduler(sizes=sizes)
        self._clock = clock
        self._streams: dict[Hashable, tuple[Stream, Sink]] = {}
        self._running: set[Hashable] = set()
        self._keys = itertools.count()
        self._wake = threading.Condition()
        self._closed = False
        engines = [engine] + [engine.lane(engine.threads or 1) for _ in range(lanes - 1)]
        self._lanes = [
            threading.Thread(target=self._run, args=(e,), name=f"tts-lane-{n}", daemon=True)
            for n, e in enumerate(engines)
        ]

    def start(self) -> Worker:
        for lane in self._lanes:
            lane.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the work running now; streams still open end with an error."""
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        for lane in self._lanes:
            lane.join(timeout)

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
            self.scheduler.add(key, self._clock(), priority, need)
            self._wake.notify()

    def _next(self) -> tuple[Work, ChunkedSynthesizer | None] | None:
        """The next work for a lane (its streams marked running) and the wide engine if
        it runs there (a first audio while no other lane works: then no other lane can
        take the wide engine until this work ends), waiting for some; None once
        stopped."""
        with self._wake:
            while not self._closed:
                now = self._clock()
                eager = self._eager == 0  # at most one lane on it
                work = self.scheduler.next(now, busy=self._running, eager=eager)
                if work is not None:
                    self._eager += work.eager
                    first = all(self.scheduler.streams[k].started is None for k in work.streams)
                    wide = self._wide if first and not self._running else None
                    self._running.update(work.streams)
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

    def _run(self, engine: ChunkedSynthesizer) -> None:
        engine.warm()  # this lane's thread runs its shapes (a GPU's graphs are per thread)
        while (picked := self._next()) is not None:
            work, wide = picked
            try:
                live = self._live(work)
                if live:
                    kept = Work(work.need, tuple(key for key, _, _ in live))
                    self._step(wide or engine, kept, live)
            finally:
                with self._wake:
                    self._eager -= work.eager
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
        self, engine: ChunkedSynthesizer, work: Work, live: list[tuple[Hashable, Stream, Sink]]
    ) -> None:
        """Run `work` on `engine`, send what it made, and tell the scheduler."""
        began = self._clock()
        try:
            made = _make(engine, work, [stream for _, stream, _ in live])
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


def _make(engine: ChunkedSynthesizer, work: Work, streams: list[Stream]) -> list[Audio | None]:
    if work.need.kind == "text":
        for stream in streams:
            engine.run_text(stream)
        return [None] * len(streams)
    return list(engine.run_frames(streams, work.need.frames))
