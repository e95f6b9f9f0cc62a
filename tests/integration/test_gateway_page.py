"""The gateway's page (`GET /`) in a real headless Chromium, used as a person uses it:
paste a token, load the voices, speak each format and hear it while it streams."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.integration.test_gateway import OPENAI_MODELS, OPENAI_VOICES, VOICE, Setup
from ttsfleet.harness import TritonProcess, wait_for
from ttsfleet.triton import contract

REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO / "out" / "artifacts" / "gateway-page.png"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/lib/chromium/chromium")  # Debian's
TEXT = "The page plays this sentence while it streams."
STREAMED_BY_MEDIA_SOURCE = ("mp3", "aac")
LONG = " ".join([TEXT, "It goes on for a while, so there is time to stop it."] * 3)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, triton: TritonProcess) -> Iterator[Setup]:
    made = Setup(tmp_path_factory.mktemp("gateway-page"), triton)
    # No reply cache: every format the page asks for streams from the replica, as a
    # first request does (the WAV fetched to compare with would be replayed otherwise).
    made.write([triton.grpc_address], cacheBytes=0)
    made.gateway.start()
    yield made
    made.gateway.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).is_file():
        pytest.fail(
            f"No Chromium at {CHROMIUM}: run `make deps` (or set CHROMIUM to a Chromium binary)",
            pytrace=False,
        )
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")  # Debian's Chromium, never a download
        with sync_playwright() as playwright:
            launched = playwright.chromium.launch(
                executable_path=CHROMIUM, headless=True,
                args=["--autoplay-policy=no-user-gesture-required"],
            )  # fmt: skip
            yield launched
            launched.close()


@pytest.fixture
def page(browser: Browser, gateway: Setup) -> Iterator[Page]:
    """The page in a fresh profile (empty localStorage); fails a test on any uncaught
    script error."""
    context = browser.new_context()
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda err: errors.append(str(err)))
    opened.goto(f"{gateway.gateway.url}/")
    yield opened
    context.close()
    assert errors == []


@pytest.fixture(scope="module")
def wav_seconds(gateway: Setup) -> float:
    """How long TEXT lasts, fetched as WAV straight from the gateway."""
    response = gateway.post({"model": "tts-1", "voice": "alloy", "input": TEXT,
                             "response_format": "wav"})  # fmt: skip
    assert response.status_code == 200, response.text
    rate = int.from_bytes(response.content[24:28], "little")
    return (len(response.content) - 44) / 2 / rate


def spoken(page: Page) -> dict[str, Any]:
    """`window.ttsfleet` once the reply has been played and decoded (or refused)."""
    page.wait_for_function("window.ttsfleet && window.ttsfleet.done", timeout=30_000)
    run: dict[str, Any] = page.evaluate("({...window.ttsfleet})")
    return run


def start(page: Page, token: str, text: str, fmt: str = "mp3", transport: str = "http") -> None:
    """Fill the form as a user does and press Speak."""
    page.fill("#token", token)
    page.fill("#text", text)
    page.select_option("#format", fmt)
    page.select_option("#transport", transport)
    page.click("#speak")


def stopped(page: Page, token: str, transport: str) -> dict[str, Any]:
    """A long text started, then Stop pressed once its first bytes came."""
    start(page, token, LONG, transport=transport)
    page.wait_for_function("window.ttsfleet.firstByteMs !== null", timeout=30_000)
    page.click("#stop")
    return spoken(page)


def test_the_page_is_served_without_a_token(gateway: Setup) -> None:
    response = httpx2.get(f"{gateway.gateway.url}/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "ttsfleet token --cluster ttsfleet" in response.text
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", response.text)  # self-contained


def test_speaking_without_a_token_shows_the_401_message(page: Page) -> None:
    page.click("#speak")
    run = spoken(page)
    assert run["error"].startswith("401")
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error")).to_contain_text("You didn't provide an API key")


def test_a_pasted_token_loads_the_voices_and_is_kept(page: Page, gateway: Setup) -> None:
    token = gateway.token()
    page.fill("#token", token)
    page.click("#load")
    expect(page.locator("#model option")).to_have_count(len(OPENAI_MODELS))
    assert set(page.locator("#model option").all_inner_texts()) == set(OPENAI_MODELS)
    assert set(page.locator("#voice option").all_inner_texts()) == {*OPENAI_VOICES, VOICE}
    page.reload()
    assert page.input_value("#token") == token
    expect(page.locator("#voice option")).to_have_count(len(OPENAI_VOICES) + 1)  # loaded again


@pytest.mark.parametrize("fmt", ["mp3", "aac", "pcm", "wav", "opus", "flac"])
def test_each_format_plays_as_long_as_the_wav(
    page: Page, gateway: Setup, wav_seconds: float, fmt: str
) -> None:
    start(page, gateway.token(), TEXT, fmt)
    run = spoken(page)
    assert run["error"] is None, run["error"]
    assert run["format"] == fmt
    assert run["bytes"] > 0 and run["chunks"] >= 1 and run["firstByteMs"] > 0
    assert run["decodedSeconds"] == pytest.approx(wav_seconds, rel=0.1, abs=0.1)
    expect(page.locator("#stat-seconds")).to_have_text(f"{run['decodedSeconds']:.2f} s")
    expect(page.locator("#error")).to_be_hidden()
    if fmt in STREAMED_BY_MEDIA_SOURCE:  # the <audio> element is playing the stream
        page.wait_for_function("document.getElementById('player').currentTime > 0", timeout=5_000)
        assert page.evaluate("document.getElementById('player').played.length") > 0
    assert run["playing"] and run["contextState"] in (None, "running")
    if fmt in ("pcm", "wav"):  # Web Audio
        assert run["contextState"] == "running"
    if fmt in ("opus", "flac"):  # the page says why these wait for the whole reply
        expect(page.locator("#format-note")).to_contain_text("when the whole reply has arrived")
    if fmt == "mp3":
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=SCREENSHOT, full_page=True)


@pytest.mark.parametrize("fmt", ["mp3", "pcm"])
def test_the_websocket_plays_too_with_the_token_in_its_first_message(
    page: Page, gateway: Setup, wav_seconds: float, fmt: str
) -> None:
    start(page, gateway.token(), TEXT, fmt, "websocket")
    run = spoken(page)
    assert run["error"] is None, run["error"]
    assert run["bytes"] > 0 and run["chunks"] >= 1
    assert run["decodedSeconds"] == pytest.approx(wav_seconds, rel=0.1, abs=0.1)
    assert run["playing"]
    page.fill("#token", "not-a-token")  # refused as on HTTP, the reason shown
    page.click("#speak")
    run = spoken(page)
    assert run["error"] and "invalid_api_key" in run["error"]
    expect(page.locator("#error")).to_be_visible()


def test_stop_on_the_websocket_cancels_the_context(page: Page, gateway: Setup) -> None:
    cancelled = {"fleet": "speech/joe", "reason": "cancelled"}
    before = gateway.gateway.metric(contract.GATEWAY_CONTEXTS, **cancelled)
    run = stopped(page, gateway.token(), "websocket")
    assert run["error"] is None
    wait_for(
        "the gateway to cancel the context",
        lambda: gateway.gateway.metric(contract.GATEWAY_CONTEXTS, **cancelled) > before,
        timeout=15,
    )


def test_stop_ends_the_stream_and_the_sound(page: Page, gateway: Setup) -> None:
    run = stopped(page, gateway.token(), "http")
    assert run["error"] is None
    expect(page.locator("#status")).to_have_text("Stopped.")
    expect(page.locator("#stop")).to_be_disabled()
    assert page.evaluate("document.getElementById('player').paused")
    # The gateway saw the client go and let go of the replica's stream.
    fleet = {"fleet": "speech/joe"}
    wait_for(
        "the gateway to end the stream",
        lambda: gateway.gateway.metric(contract.GATEWAY_INFLIGHT_STREAMS, **fleet) == 0,
        timeout=15,
    )


def test_wav_split_anywhere_plays_every_sample(page: Page) -> None:
    """Chunks split the 44-byte header and 16-bit samples anywhere: the Web Audio player
    reads the rate from the header and carries the odd byte over."""
    got = page.evaluate("""() => {
        const player = new PcmPlayer(true, {});
        const samples = [];
        player.schedule = (floats) => samples.push(...floats);
        const header = new Uint8Array(44);
        new DataView(header.buffer).setUint32(24, 16000, true);
        const pcm = new Int16Array([0, 16384, -16384, 32767, -32768, 1, -1]);
        const all = concat([header, new Uint8Array(pcm.buffer)]);
        for (let i = 0; i < all.length; i += 3) player.push(all.subarray(i, i + 3));
        return {rate: player.rate, samples};
    }""")
    assert got["rate"] == 16_000
    expected = [0, 16384, -16384, 32767, -32768, 1, -1]
    assert got["samples"] == [v / 32768 for v in expected]
