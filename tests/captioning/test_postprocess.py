"""Post-processing: boilerplate, whitespace, degenerate output, junk alt text, short captions."""
import pytest

from captioning import postprocess as pp
from captioning.config import QualityConfig
from captioning.worker import short_caption

Q = QualityConfig()


@pytest.mark.parametrize("raw,expected", [
    ("The image shows a red car parked on a street.", "A red car parked on a street."),
    ("In this image, a dog runs across a field.", "A dog runs across a field."),
    ("In this picture we can see two people walking.", "Two people walking."),
    ("This is a photo of a quiet lake at dawn.", "A quiet lake at dawn."),
    ("The picture depicts a castle.", "A castle."),
    ("A cat sleeps. The image shows it clearly.", "A cat sleeps. The image shows it clearly."),  # only openings
])
def test_strip_boilerplate(raw, expected):
    assert pp.clean(raw) == expected


def test_whitespace_normalised():
    assert pp.clean("  a  dog\n\n runs\tfast .  ") == "a dog runs fast ."
    assert pp.normalize_whitespace(" a \n b\t c ") == "a b c"


@pytest.mark.parametrize("text,reason", [
    ("", "empty"),
    ("A dog.", "too short"),
    ("A red car on a red car on a red car on a red car on a red car on a road.", "repetition loop"),
    ("the the the the dog dog dog dog the the the dog dog the.", "repetition loop"),
    ("A large brown dog is running across the green field towards the", "cut mid-sentence"),
])
def test_degenerate(text, reason):
    got = pp.degenerate_reason(text, Q)
    assert got is not None and got.startswith(reason)


def test_good_caption_passes():
    text = ("A large brown dog runs across a green field under a blue sky, with a line of pine trees "
            "and a small wooden house in the background.")
    assert pp.degenerate_reason(text, Q) is None
    assert pp.judge("The image shows " + text[0].lower() + text[1:], Q).text == text


@pytest.mark.parametrize("alt,junk", [
    (None, True), ("", True), ("   ", True), ("IMG_2031.jpg", True), ("DSC01234", True),
    ("https://example.com/a.jpg", True), ("www.example.com/x", True), ("image", True), ("photo.png", True),
    ("12345", True), ("a red square on a table", False), ("Eiffel tower at night", False),
])
def test_junk_alt(alt, junk):
    assert pp.is_junk_alt(alt) is junk


def test_short_caption_derivation():
    long = "A red square sits on a wooden table. Light comes from the left."
    assert short_caption("IMG_2031.jpg", long) == ("A red square sits on a wooden table.", True)
    assert short_caption("a  red square", long) == ("a red square", False)
    assert short_caption("", None) == (None, False)


def test_t5_token_count(tiny_models):
    from transformers import AutoTokenizer

    path = str(tiny_models / "t5")
    counter = pp.T5Counter(path)
    texts = ["a red car on a street.", None, "word " * 400]
    got = counter(texts)
    tok = AutoTokenizer.from_pretrained(path)
    assert got[0] == len(tok(texts[0])["input_ids"]) and tok(texts[0])["input_ids"][-1] == tok.eos_token_id
    assert got[1] is None and got[2] > 300
    assert pp.T5Counter(None)(texts) == [None, None, None]
