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


# Issue 12 item 7. Before: first_sentence("Mr. Smith ...") == "Mr.", every non-Latin alt text was
# junk, and "The image shows iPhone ..." became "IPhone ...". Each case below failed then.
@pytest.mark.parametrize("text,first", [
    ("Mr. Smith stands next to a red car. He smiles.", "Mr. Smith stands next to a red car."),
    ("A tool, e.g. a hammer, lies on a bench. Nothing else.", "A tool, e.g. a hammer, lies on a bench."),
    ("A shelf with books, i.e. novels. A lamp.", "A shelf with books, i.e. novels."),
    ("Dr. Jones and Mrs. Lee sit at St. Mary's. Rain falls.", "Dr. Jones and Mrs. Lee sit at St. Mary's."),
    ("The bottle holds 3.5 liters of water. It is green.", "The bottle holds 3.5 liters of water."),
    ("A portrait of J. R. R. Tolkien at his desk. Books around.", "A portrait of J. R. R. Tolkien at his desk."),
    ("A flag of the U.S. Navy on a ship. Waves.", "A flag of the U.S. Navy on a ship."),
    ("A cat sleeps. The image shows it clearly.", "A cat sleeps."),
    ('He holds a sign saying "Stop." Cars wait.', 'He holds a sign saying "Stop."'),
    ("Look at the sky! Stars everywhere.", "Look at the sky!"),
    ("It costs 5. Then 6.", "It costs 5."),
    ("No sentence end here", "No sentence end here"),
    ("一只猫在沙发上睡觉。旁边有一只狗。", "一只猫在沙发上睡觉。"),
    ("Кошка спит на диване. Собака лает.", "Кошка спит на диване."),
])
def test_first_sentence(text, first):
    assert pp.first_sentence(text) == first


@pytest.mark.parametrize("alt", ["Эйфелева башня ночью", "埃菲尔铁塔", "猫", "東京タワー", "برج إيفل ليلا",
                                 "מגדל אייפל", "हिंदी पाठ", "Πύργος του Άιφελ", "에펠탑"])
def test_non_latin_alt_text_is_not_junk(alt):
    assert not pp.is_junk_alt(alt)
    assert short_caption(alt, "A long caption. More.") == (alt, False)


@pytest.mark.parametrize("alt", ["😀😀", "---", "a", "Ω", "12 34", "__"])
def test_no_letters_is_junk(alt):
    assert pp.is_junk_alt(alt)


@pytest.mark.parametrize("raw,expected", [
    ("The image shows iPhone 15 on a desk.", "iPhone 15 on a desk."),
    ("The image shows eBay's logo on a screen.", "eBay's logo on a screen."),
    ("This image depicts mRNA strands in a lab.", "mRNA strands in a lab."),
    ("The image shows ipad and a pencil.", "ipad and a pencil."),  # a known lowercase-first word
    ("The image shows a dog.", "A dog."),
    ("The image shows élan in a dance.", "Élan in a dance."),
    ("The image shows NASA's rocket.", "NASA's rocket."),
])
def test_recapitalise_only_lowercase_words(raw, expected):
    assert pp.clean(raw) == expected
