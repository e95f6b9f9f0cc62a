"""Text normalisation before phonemisation: numbers, abbreviations, symbols, whitespace.

English only (the voices ttsfleet ships are en_US). Pure functions.
"""

from __future__ import annotations

import re

_ONES = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen",
]  # fmt: skip
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_SCALES = ((10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (1000, "thousand"))

ABBREVIATIONS = {
    "mr.": "mister",
    "mrs.": "missus",
    "ms.": "miss",
    "dr.": "doctor",
    "st.": "saint",
    "prof.": "professor",
    "jr.": "junior",
    "sr.": "senior",
    "vs.": "versus",
    "etc.": "et cetera",
    "e.g.": "for example",
    "i.e.": "that is",
    "approx.": "approximately",
    "no.": "number",
}


def number_words(n: int) -> str:
    """0 <= n < 10**15 in words: 1984 -> 'one thousand nine hundred eighty-four'."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return f"{_ONES[hundreds]} hundred" + (f" {number_words(rest)}" if rest else "")
    for scale, word in _SCALES:
        if n >= scale:
            high, rest = divmod(n, scale)
            return f"{number_words(high)} {word}" + (f" {number_words(rest)}" if rest else "")
    raise ValueError(n)  # pragma: no cover - the scales cover every n >= 1000


def _number(match: re.Match[str]) -> str:
    sign, whole, fraction = match["sign"], match["whole"].replace(",", ""), match["fraction"]
    if len(whole) > 15:
        return " ".join(_ONES[int(d)] for d in whole)  # read long digit strings digit by digit
    words = number_words(int(whole))
    if fraction:
        words += " point " + " ".join(_ONES[int(d)] for d in fraction)
    return ("minus " if sign else "") + words


_NUMBER = re.compile(
    r"(?P<sign>(?<![\w.])-)?(?P<whole>\d{1,3}(?:,\d{3})+|\d+)(?:\.(?P<fraction>\d+))?"
)
_MONEY = re.compile(r"\$(\d+(?:,\d{3})*)(?:\.(\d{2}))?")
_PERCENT = re.compile(r"(\d+(?:\.\d+)?)\s?%")
_SPACE = re.compile(r"\s+")


def _money(match: re.Match[str]) -> str:
    dollars = int(match[1].replace(",", ""))
    text = f"{match[1]} dollar" + ("" if dollars == 1 else "s")
    if match[2] and int(match[2]):
        cents = int(match[2])
        text += f" and {cents} cent" + ("" if cents == 1 else "s")
    return text


def _abbreviation(match: re.Match[str]) -> str:
    word = match[0]
    spoken = ABBREVIATIONS[word.lower()]
    return spoken.capitalize() if word[0].isupper() else spoken


_ABBREVIATION = re.compile(
    r"(?<!\w)(" + "|".join(re.escape(a) for a in ABBREVIATIONS) + r")(?!\w)", re.IGNORECASE
)


def normalize(text: str) -> str:
    """Spell out what the phonemiser would read badly; collapse whitespace."""
    text = _SPACE.sub(" ", text).strip()
    text = _ABBREVIATION.sub(_abbreviation, text)
    text = _MONEY.sub(_money, text)
    text = _PERCENT.sub(r"\1 percent", text)
    text = text.replace("&", " and ")
    text = _NUMBER.sub(_number, text)
    return _SPACE.sub(" ", text).strip()


# Voice-agent replies (33 to 88 characters): the load of `ttsfleet bench` and the GPU benchmark.
SAMPLE_REPLIES = (
    "Thanks for calling. How can I help you today?",
    "Your order number is 4512. It shipped this morning and should arrive on Friday.",
    "I can help with that. Could you tell me the email address on the account?",
    "The balance on your card is $245.10. Your next payment is due on the 3rd.",
    "Sure. I have moved your appointment to Tuesday at 2 PM. Is there anything else?",
    "Let me check. One moment please.",
    "Your flight leaves at 7:45 from gate 12. Boarding starts 30 minutes before departure.",
    "I'm sorry, I didn't catch that. Could you say it again?",
)
