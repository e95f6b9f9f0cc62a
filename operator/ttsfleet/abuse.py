"""Abusive clients of the speech gateway, for its tests and `make bench-gateway`.

Each sends one kind of abuse at a gateway on loopback and counts what came back, by
status code (or `closed` when the gateway hung up, `timeout` when it kept the client
waiting past what a clean refusal takes): bad tokens, a flood of connections that send
nothing, bodies sent a byte a second, slow readers that open streams and never read,
and bodies of 1 MB.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

SPEECH = "/v1/audio/speech"
BODY = {
    "model": "tts-1",
    "voice": "alloy",
    "input": "Abuse, abuse, abuse.",
    "response_format": "pcm",
}


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80


async def _request(
    url: str, head: dict[str, str], body: bytes, *, read: bool = True, timeout: float = 30
) -> tuple[str, asyncio.StreamWriter | None]:
    """One HTTP/1.1 POST: its status code (or closed/timeout), and, with `read` False,
    the open connection after the status line (the body left unread)."""
    host, port = _address(url)
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError):
        return "refused", None
    # Connection: close, so that the end of the response is the end of the connection.
    lines = [f"POST {SPEECH} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}",
             "Content-Type: application/json", "Connection: close",
             *(f"{k}: {v}" for k, v in head.items())]  # fmt: skip
    try:
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        status = await asyncio.wait_for(reader.readline(), timeout)
    except TimeoutError:
        writer.close()
        return "timeout", None
    except OSError:
        writer.close()
        return "closed", None
    code = status.split(b" ")[1].decode() if status.count(b" ") >= 2 else "closed"
    if not read:
        return code, writer
    with contextlib.suppress(OSError, TimeoutError):
        await asyncio.wait_for(reader.read(), timeout)
    writer.close()
    return code, None


async def bad_tokens(
    url: str, count: int, concurrency: int = 32, spread: float = 0.0
) -> Counter[str]:
    """`count` speech requests with tokens that are not valid: garbage, a JWT signed by
    a stranger's key, none at all; as fast as they go, or evenly over `spread` seconds."""
    from ttsfleet.gateway import auth  # noqa: PLC0415

    stranger = auth.sign(
        auth.new_signing_key(), issuer="https://evil.test", audience="x", subject="x"
    )
    tokens = ["Bearer not-a-token", f"Bearer {stranger}", "Basic dXNlcjpwYXNz", ""]
    body = json.dumps(BODY).encode()
    outcomes: Counter[str] = Counter()
    queue = list(range(count))

    start = asyncio.get_running_loop().time()

    async def worker() -> None:
        while queue:
            i = queue.pop()
            if spread:  # request i is due at its share of the spread
                due = start + spread * (count - 1 - i) / count
                await asyncio.sleep(max(0.0, due - asyncio.get_running_loop().time()))
            token = tokens[i % len(tokens)]
            head = {"Authorization": token} if token else {}
            code, _ = await _request(url, head, body)
            outcomes[code] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes


async def _hold(url: str, count: int, within: float, head: bytes | None) -> Counter[str]:
    """`count` connections that send `head` and then a byte a second (or, with no head,
    nothing at all): how many the gateway closed within `within` seconds (`closed`;
    whether it answered first or not) and how many it still held open (`held`)."""
    host, port = _address(url)
    outcomes: Counter[str] = Counter()

    async def one() -> None:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            outcomes["refused"] += 1
            return
        deadline = asyncio.get_running_loop().time() + within
        try:
            if head is not None:
                writer.write(head)
            while (left := deadline - asyncio.get_running_loop().time()) > 0:
                if head is not None:
                    writer.write(b" ")
                    await writer.drain()
                with contextlib.suppress(TimeoutError):
                    if not await asyncio.wait_for(reader.read(1024), min(left, 1.0)):
                        outcomes["closed"] += 1  # an answer first (a 401) or not
                        return
            outcomes["held"] += 1
        except OSError:
            outcomes["closed"] += 1
        finally:
            writer.close()

    await asyncio.gather(*(one() for _ in range(count)))
    return outcomes


async def idle_flood(url: str, count: int, within: float) -> Counter[str]:
    """`count` connections that send nothing (see `_hold`)."""
    return await _hold(url, count, within, None)


async def trickling_bodies(url: str, count: int, within: float) -> Counter[str]:
    """`count` requests whose headers arrive and whose body then comes a byte a second
    (slowloris; see `_hold`)."""
    host, _ = _address(url)
    head = (f"POST {SPEECH} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json"
            "\r\nContent-Length: 1000\r\n\r\n")  # fmt: skip
    return await _hold(url, count, within, head.encode())


async def slow_readers(
    url: str, token: str, count: int, hold: float, texts: list[str] | None = None
) -> Counter[str]:
    """`count` speech streams opened at once by one tenant and never read for `hold`
    seconds: each gets its status line (200 within the tenant's stream cap, 429 past
    it) and is then left unread, then closed."""
    outcomes: Counter[str] = Counter()
    writers: list[asyncio.StreamWriter] = []

    async def one(i: int) -> None:
        text = (texts or [f"Slow reader number {i} never reads what it asked for."])[0]
        body = json.dumps(BODY | {"input": f"{i}: {text}"}).encode()
        code, writer = await _request(url, {"Authorization": f"Bearer {token}"}, body, read=False)
        outcomes[code] += 1
        if writer is not None:
            writers.append(writer)

    await asyncio.gather(*(one(i) for i in range(count)))
    await asyncio.sleep(hold)
    for writer in writers:
        writer.close()
    return outcomes


async def big_bodies(
    url: str, token: str, count: int, size: int = 1024 * 1024, spread: float = 0.0
) -> Counter[str]:
    """`count` requests whose JSON body is `size` bytes (a huge `input`), one after the
    other, evenly over `spread` seconds."""
    body = json.dumps(BODY | {"input": "a" * size}).encode()
    outcomes: Counter[str] = Counter()
    for _ in range(count):
        await asyncio.sleep(spread / count)
        code, _ = await _request(url, {"Authorization": f"Bearer {token}"}, body, timeout=15)
        outcomes[code] += 1
    return outcomes


async def rounds(
    url: str, slow_token: str, big_token: str, seconds: float, spread: float = 0.0
) -> dict[str, Any]:
    """Every kind of abuse at once (the bad tokens and big bodies evenly over `spread`
    seconds, the flood and the slow readers at its start), once, then again until
    `seconds` have passed: the outcomes summed."""
    from ttsfleet.gateway.server import REQUEST_SECONDS  # noqa: PLC0415

    kinds = ("bad_tokens", "flood", "trickle", "slow", "big")
    totals: dict[str, Counter[str]] = {kind: Counter() for kind in kinds}
    deadline = asyncio.get_running_loop().time() + seconds
    done = 0
    while done == 0 or asyncio.get_running_loop().time() < deadline:
        results = await asyncio.gather(
            bad_tokens(url, 1000, spread=spread),
            idle_flood(url, 300, within=REQUEST_SECONDS + 5),
            trickling_bodies(url, 50, within=REQUEST_SECONDS + 5),
            slow_readers(url, slow_token, 200, hold=5),
            big_bodies(url, big_token, 10, spread=spread),
        )
        for kind, outcome in zip(totals, results, strict=True):
            totals[kind] += outcome
        done += 1
    return {"rounds": done} | {kind: dict(counts) for kind, counts in totals.items()}


def main() -> None:
    """`python -m ttsfleet.abuse URL --slow-token T --big-token T [--seconds S]`: abuse a
    gateway (yours, on a test deployment) and print what came back, as JSON."""
    import argparse  # noqa: PLC0415

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("url", help="The gateway's base URL, e.g. http://127.0.0.1:8080")
    parser.add_argument("--slow-token", required=True, help="A valid token (slow readers).")
    parser.add_argument("--big-token", required=True, help="A valid token (1 MB bodies).")
    parser.add_argument("--seconds", type=float, default=0.0, help="Repeat for this long.")
    parser.add_argument(
        "--spread", type=float, default=0.0,
        help="Send the bad tokens and big bodies evenly over this many seconds (0: at once).",
    )  # fmt: skip
    args = parser.parse_args()
    report = rounds(args.url, args.slow_token, args.big_token, args.seconds, args.spread)
    print(json.dumps(asyncio.run(report)))


if __name__ == "__main__":
    main()
