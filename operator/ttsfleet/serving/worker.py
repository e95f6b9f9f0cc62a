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
    def cancelled(self) -> bool: ...

    def audio(self, samples: Audio) -> None: ...

    def end(self, error: str | None = None) -> None: ...


class Worker:
    def __init__(
        self, engine: ChunkedSynthesizer, *, sizes: Iterable[int] = (1,),
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:  # fmt: skip
        self.engine = engine
        self.scheduler = Scheduler(sizes=sizes)
        self._clock = clock
        self._streams: dict[Hashable, tuple[Stream, Sink]] = {}
        self._keys = itertools.count()
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="tts-scheduler", daemon=True)

    def start(self) -> Worker:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the work running now; streams still open end with an error."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout)

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
                sink.end("the model is unloading: retry on another replica")
                return
            key = next(self._keys)
            self._streams[key] = (stream, sink)
            self.scheduler.add(key, self._clock(), priority, need)
            self._wake.notify()

    def _next(self) -> Work | None:
        """The next work, waiting for some; None once stopped."""
        with self._wake:
            while not self._closed:
                now = self._clock()
                work = self.scheduler.next(now)
                if work is not None:
                    return work
                self._wake.wait(min(self.scheduler.wake(now), IDLE_POLL_SECONDS))
            for key in list(self._streams):
                self._end(key, "the model is unloading: retry on another replica")
            return None

    def _end(self, key: Hashable, error: str | None = None) -> None:
        """Drop stream `key` and tell its sink (under the lock)."""
        _, sink = self._streams.pop(key)
        self.scheduler.drop(key)
        with contextlib.suppress(Exception):  # the client is gone: nothing to tell
            sink.end(error)

    def _run(self) -> None:
        while (work := self._next()) is not None:
            live = self._live(work)
            if live:
                self._step(Work(work.need, tuple(key for key, _, _ in live)), live)

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

    def _step(self, work: Work, live: list[tuple[Hashable, Stream, Sink]]) -> None:
        """Run `work`, send what it made, and tell the scheduler."""
        began = self._clock()
        try:
            made = self._make(work, [stream for _, stream, _ in live])
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
            sent[key] = audio.size / self.engine.sample_rate
        with self._wake:
            needs: dict[Hashable, Need | None] = {key: s.need() for key, s, _ in live}
            self.scheduler.done(work, began, ended, sent, needs)
            for key, _, _ in live:
                if needs[key] is None or key in gone:
                    self._end(key)

    def _make(self, work: Work, streams: list[Stream]) -> list[Audio | None]:
        if work.need.kind == "text":
            for stream in streams:
                self.engine.run_text(stream)
            return [None] * len(streams)
        return list(self.engine.run_frames(streams, work.need.frames))
