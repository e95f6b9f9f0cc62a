"""Listeners for `benchmarks/serving_bench.py`: N people each hearing story after story.

A listener asks for a story of at least 15 s of audio, plays it at 1x on its own
clock from the moment its first audio arrives, and asks for the next one when playback
ends (so the load does not ease when the server is slow: the listeners' clocks, not
the server, set the pace). Start times are spread over the first story, seeded: the
same run gives the same arrivals. Per stream: time to first audio (to the first
response carrying samples) and underruns (the buffer ran dry after playback began;
playback resumes when the next chunk comes, and its stall is counted).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ttsfleet import harness
from ttsfleet.triton import aio

SENTENCES = (
    "Thanks for calling the support line, my name is Joe and I will be helping you today.",
    "Your order left our warehouse this morning and should arrive on Thursday.",
    "If the parcel is late, we will refund the shipping cost without any questions.",
    "I can also move the delivery to your office, if that is easier for you.",
    "Please keep your order number handy, it starts with the letters T and F.",
    "The weather in the mountains may slow the trucks down by a day or two.",
    "Our team works every day of the week, from eight in the morning to ten at night.",
    "Is there anything else that I can help you with while I have you on the line?",
    "The new plan includes unlimited calls, fifty gigabytes of data, and free roaming.",
    "You can cancel at any time, and the first month costs nothing at all.",
)
CHARACTERS_PER_STORY = 260  # about 15 s of this voice


def story(rng: random.Random) -> str:
    picked: list[str] = []
    while sum(len(s) + 1 for s in picked) < CHARACTERS_PER_STORY:
        picked.append(rng.choice(SENTENCES))
    return " ".join(picked)


@dataclass
class Heard:
    ttfa: float  # seconds from asking to the first samples
    audio: float  # seconds of audio
    underruns: int
    stalled: float  # seconds the buffer was empty after playback began
    error: str = ""


def play(arrivals: Sequence[tuple[float, float]]) -> tuple[int, float]:
    """(underruns, seconds stalled) for chunks arriving at `t` with `d` seconds of audio
    each, played at 1x from the first."""
    if not arrivals:
        return 0, 0.0
    runs_out = arrivals[0][0] + arrivals[0][1]
    count, stalled = 0, 0.0
    for at, seconds in arrivals[1:]:
        if at > runs_out:
            count, stalled = count + 1, stalled + at - runs_out
            runs_out = at
        runs_out += seconds
    return count, stalled


async def hear(stub: Any, text: str) -> Heard:
    asked = time.perf_counter()
    chunks: list[tuple[float, float]] = []
    try:
        async for chunk in aio.stream(stub, text):
            chunks.append((time.perf_counter(), chunk.audio.size / chunk.sample_rate))
    except aio.UpstreamError as err:
        return Heard(0.0, 0.0, 0, 0.0, str(err))
    if not chunks:
        return Heard(0.0, 0.0, 0, 0.0, "no audio")
    underruns, stalled = play(chunks)
    audio = sum(seconds for _, seconds in chunks)
    return Heard(chunks[0][0] - asked, audio, underruns, stalled)


async def listen(
    address: str, listeners: int, seconds: float, seed: int = 11,
    alongside: Callable[[], Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """`listeners` people for `seconds` (no story starts after that; those started
    finish); `alongside`, if given, is awaited at the same time (a bulk load)."""
    rng = random.Random(seed)  # noqa: S311 - a benchmark's arrivals
    channels = aio.Channels()
    stub = channels.stub(address)
    heard: list[Heard] = []
    start = time.perf_counter()

    async def listener(offset: float) -> None:
        await asyncio.sleep(offset)
        while time.perf_counter() - start < seconds:
            asked = time.perf_counter()
            result = await hear(stub, story(rng))
            heard.append(result)
            if result.error:
                await asyncio.sleep(1.0)
                continue
            ends = asked + result.ttfa + result.audio + result.stalled
            await asyncio.sleep(max(0.0, ends - time.perf_counter()))

    offsets = [rng.uniform(0, 15.0) for _ in range(listeners)]
    tasks = [listener(offset) for offset in offsets]
    if alongside is not None:
        tasks.append(alongside())
    await asyncio.gather(*tasks)
    await channels.close()
    return summary(listeners, heard)


def summary(listeners: int, heard: list[Heard]) -> dict[str, Any]:
    good = [h for h in heard if not h.error]
    ttfa = [h.ttfa * 1000 for h in good]
    return {
        "concurrency": listeners,
        "streams": len(heard),
        "errors": len(heard) - len(good),
        "error_examples": sorted({h.error for h in heard if h.error})[:3],
        "ttfa_ms": {
            name: round(harness.percentile(ttfa, q), 1) if ttfa else None
            for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))
        },
        "underruns": sum(h.underruns for h in good),
        "streams_with_underruns": sum(1 for h in good if h.underruns),
        "stalled_seconds": round(sum(h.stalled for h in good), 2),
        "audio_seconds": round(sum(h.audio for h in good), 1),
    }
