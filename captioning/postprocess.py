"""Caption post-processing shared by every engine: clean, judge, count, derive the short caption.

Pure Python over strings (no torch, no Ray), so it is tested everywhere and behaves the same
whichever engine produced the text.
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass

from captioning.config import QualityConfig

# Openings that carry no content ("The image shows a dog" -> "A dog"). Longest patterns first.
_BOILERPLATE = re.compile(
    r"^\s*(?:"
    r"(?:in|within)\s+(?:this|the)\s+(?:image|picture|photo(?:graph)?|scene|illustration)\s*,?\s*(?:we\s+(?:can\s+)?see\s+|there\s+(?:is|are)\s+)?"
    r"|(?:this|the)\s+(?:image|picture|photo(?:graph)?|illustration|scene)\s+"
    r"(?:shows|depicts|features|displays|presents|captures|showcases|portrays|is\s+of|contains)\s*(?:that\s+)?"
    r"|(?:this|the)\s+is\s+(?:an?\s+)?(?:image|picture|photo(?:graph)?)\s+(?:of|showing|that\s+shows)\s+"
    r"|(?:here\s+)?we\s+(?:can\s+)?see\s+"
    r")",
    re.IGNORECASE,
)
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")
# A candidate sentence end: Latin terminators (closing quotes / brackets included) before whitespace,
# or a CJK terminator. `first_sentence` then looks at what follows.
_SENTENCE_CANDIDATE = re.compile(r"(?P<punct>[.!?]+[\"'”’)\]]*)(?=\s)|(?P<cjk>[。！？]+[」』）]*)")
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt", "ft", "vs", "no", "fig", "approx",
                  "inc", "ltd", "co", "corp", "dept", "gen", "capt", "lt", "sgt", "rev", "hon", "ave", "blvd",
                  "rd", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec"}
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
_URL = re.compile(r"^(?:[a-z]+://|www\.)\S+$", re.IGNORECASE)
_FILENAME = re.compile(r"^[\w\-. ()\[\]]+\.(?:jpe?g|png|gif|webp|bmp|tiff?|heic|avif|svg)$", re.IGNORECASE)
_JUNK_WORDS = {"image", "photo", "picture", "img", "untitled", "null", "none", "nan", "n/a", "thumbnail", "default"}


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffd]")  # control chars, U+FFFD (undecodable bytes)


def normalize_whitespace(text: str) -> str:
    return re.sub(r"\s+", " ", _CONTROL.sub("", text or "")).strip()


# Brand / product words that start lowercase by convention ("iPhone", "eBay"): a caption opening with
# one of them (in any case) is not re-capitalised after its boilerplate is removed.
_KEEP_CASE = {"iphone", "ipad", "ipod", "imac", "ios", "ipados", "macos", "itunes", "icloud", "ebay", "ebook",
              "ereader", "esports", "email"}


def recapitalise(text: str) -> str:
    """Upper-case the first letter only when the first word is entirely lowercase and not a known
    lowercase-first word: "a dog" -> "A dog", but "iPhone 15" / "eBay" / "mRNA" / "pH" stay."""
    m = re.match(r"[^\W\d_][\w'-]*", text)
    if not m:
        return text
    word = m.group(0)
    if not word.islower() or word.lower().strip("'-") in _KEEP_CASE:
        return text
    return text[0].upper() + text[1:]


def strip_boilerplate(text: str) -> str:
    """Drop one boilerplate opening and re-capitalise what follows (see `recapitalise`)."""
    out = _BOILERPLATE.sub("", text, count=1)
    if out != text:
        out = recapitalise(out.lstrip(" ,:;-"))
    return out


def clean(text: str) -> str:
    return strip_boilerplate(normalize_whitespace(text))


def degenerate_reason(text: str, q: QualityConfig) -> str | None:
    """Why a cleaned caption is unusable (None if it is fine).

    Checks, in order: empty; too short; repetition loop (an n-gram repeated more than
    `max_repeat_ngram` times, or too few distinct words); cut mid-sentence (no final punctuation,
    typical of hitting max_length).
    """
    if not text:
        return "empty"
    words = re.findall(r"\w+(?:'\w+)?", text.lower())
    if len(words) < q.min_words:
        return f"too short ({len(words)} words < {q.min_words})"
    n = q.repeat_n
    if len(words) >= n:
        grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        gram, count = grams.most_common(1)[0]
        if count > q.max_repeat_ngram:
            return f"repetition loop ({' '.join(gram)!r} x{count})"
    if len(words) >= 10 and len(set(words)) / len(words) < q.min_distinct_ratio:
        return f"repetition loop ({len(set(words))} distinct of {len(words)} words)"
    if q.require_sentence_end and not _SENTENCE_END.search(text):
        return "cut mid-sentence"
    return None


def is_junk_alt(alt: str | None) -> bool:
    """Raw alt text that cannot serve as a short caption: empty, a URL, a file name, a placeholder."""
    s = normalize_whitespace(alt or "")
    if not s:
        return True
    if _URL.match(s) or _FILENAME.match(s):
        return True
    if s.lower().strip(".:-_ ") in _JUNK_WORDS:
        return True
    # Camera file stems like IMG_1234 / DSC01234 / 20190101_123456.
    if re.fullmatch(r"(?:img|dsc|dscn|dcim|pic|photo)?[_\- ]?\d{3,}(?:[_\-]\d+)*", s, re.IGNORECASE):
        return True
    return not _has_words(s)


def _has_words(s: str) -> bool:
    """Letters of any script: at least two (Latin, Cyrillic, Greek, Arabic, Hebrew, Devanagari, ...;
    vowel signs are marks, not letters, so they are not needed), or one CJK / kana / hangul character
    (one is a word there). Digits, punctuation, symbols and emoji alone are not words."""
    letters = 0
    for ch in s:
        if unicodedata.category(ch).startswith("L"):
            if _CJK.match(ch):
                return True
            letters += 1
            if letters >= 2:
                return True
    return False


def first_sentence(text: str) -> str:
    """The first sentence of a (long) caption. A '.', '!' or '?' (closing quotes / brackets kept)
    ends it when whitespace and then an upper-case letter, a digit or an opening quote follow, and the
    word before a '.' is not an abbreviation ("Mr.", "Dr.", "St.", "vs."), a dotted one ("e.g.",
    "i.e.", "U.S.", "a.m.") or an initial ("J. R. R. Tolkien"); decimals ("3.5") have no space after
    the point. CJK full stops (。！？) end a sentence without a space. No end found: the whole text."""
    text = (text or "").strip()
    for m in _SENTENCE_CANDIDATE.finditer(text):
        if m.group("cjk"):
            return text[:m.end()].strip()
        nxt = text[m.end():].lstrip().lstrip("\"'“‘([")[:1]
        if not nxt or nxt.islower() or not (nxt.isalpha() or nxt.isdigit()):
            continue  # "e.g. a dog", "... - ...": no new sentence starts here (uncased scripts pass)
        if m.group("punct").startswith(".") and _is_abbreviation(text[:m.start("punct")]):
            continue
        return text[:m.end("punct")].strip()
    return text


def _is_abbreviation(before: str) -> bool:
    """Does the text before a '.' end with an abbreviation, a dotted abbreviation or an initial?"""
    word = re.split(r"[\s(\[\"'“‘]", before)[-1]
    return (word.lower() in _ABBREVIATIONS or bool(re.fullmatch(r"(?:[^\W\d_]\.)+[^\W\d_]", word))
            or bool(re.fullmatch(r"[^\W\d_]", word) and word.isupper()))


@dataclass
class Judged:
    text: str | None  # cleaned caption, None if degenerate
    reason: str | None  # degenerate reason


def judge(raw: str | None, q: QualityConfig) -> Judged:
    text = clean(raw or "")
    reason = degenerate_reason(text, q)
    return Judged(None if reason else text, reason)


class T5Counter:
    """Counts T5 tokens (incl. EOS, as PixArt's 300-token mask does) with a local tokenizer."""

    def __init__(self, path: str | None):
        self.tok = None
        if path:
            from transformers import AutoTokenizer

            from _sigma.fetch import local_model

            self.tok = AutoTokenizer.from_pretrained(local_model(path))

    def __call__(self, texts: list[str | None]) -> list[int | None]:
        if self.tok is None:
            return [None] * len(texts)
        idx = [i for i, t in enumerate(texts) if t]
        out: list[int | None] = [None] * len(texts)
        if idx:
            enc = self.tok([texts[i] for i in idx], add_special_tokens=True)["input_ids"]
            for i, ids in zip(idx, enc):
                out[i] = len(ids)
        return out
