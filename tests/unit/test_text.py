"""Text normalisation: what the phonemiser would misread is spelled out."""

from __future__ import annotations

import pytest

from ttsfleet.serving.text import normalize, number_words


@pytest.mark.parametrize(
    ("n", "words"),
    [
        (0, "zero"),
        (13, "thirteen"),
        (42, "forty-two"),
        (100, "one hundred"),
        (1984, "one thousand nine hundred eighty-four"),
        (2_000_005, "two million five"),
        (10**12, "one trillion"),
    ],
)
def test_numbers_in_words(n: int, words: str) -> None:
    assert number_words(n) == words


@pytest.mark.parametrize(
    ("text", "spoken"),
    [
        ("  Hello \n\t world  ", "Hello world"),
        ("Dr. Smith and Mr. Jones", "Doctor Smith and Mister Jones"),
        ("It costs $3.50", "It costs three dollars and fifty cents"),
        ("$1 only", "one dollar only"),
        ("Up 12.5% today", "Up twelve point five percent today"),
        (
            "Population 1,234,567",
            "Population one million two hundred thirty-four thousand five hundred sixty-seven",
        ),
        ("It was -5 degrees", "It was minus five degrees"),
        ("Tom & Jerry", "Tom and Jerry"),
        ("fruit, e.g. apples", "fruit, for example apples"),
    ],
)
def test_normalize(text: str, spoken: str) -> None:
    assert normalize(text) == spoken
