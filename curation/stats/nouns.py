"""Noun extraction for the caption statistics: which texts are counted, and the spaCy batch class.

Definitions (the paper, Table 1, counts "nouns" without naming its tagger; these are ours):
- caption kinds: `raw` = manifest `caption` (alt text); `long` = `caption_long`; `derived_short` =
  `caption_short` on rows where `caption_short_derived` is true (a short caption made from the long
  one because the raw one was unusable; an underived short caption is the raw text, already counted
  as `raw`). Null or blank texts give no row, so a kind's Volume counts images that have that text.
- words: whitespace-separated tokens of the full text (`str.split()`), the unit of ACL and Figure 6.
- nouns: spaCy tokens whose coarse POS is in `StatsConfig.pos` (default NOUN and PROPN: the
  Penn-style NN* tags that noun counts usually rely on include proper nouns), as lowercase lemmas;
  a lemma must contain a letter and be at least 2 characters long (drops "4K" -> "k", "#").
  Texts longer than `max_chars` are tagged on their first `max_chars` characters.

This module never imports Ray: `caption_rows` is a plain function and `NounTagger` a class that loads
spaCy once in `__init__` and runs over a pyarrow batch in `__call__` (an actor in Ray Data).
"""
from __future__ import annotations

import pyarrow as pa

KINDS = ("raw", "long", "derived_short")
# Manifest columns each kind needs (a kind is skipped when its columns are missing: caption stage not run).
KIND_COLUMNS = {"raw": ("caption",), "long": ("caption_long",),
                "derived_short": ("caption_short", "caption_short_derived")}
SOURCE_COLUMNS = ("key", "caption", "caption_long", "caption_short", "caption_short_derived")
# spaCy components the POS tags and lemmas need; everything else is excluded at load time.
KEEP_PIPES = ("tok2vec", "transformer", "tagger", "morphologizer", "attribute_ruler", "lemmatizer",
              "trainable_lemmatizer")

TEXT_SCHEMA = pa.schema([("key", pa.string()), ("kind", pa.string()), ("text", pa.string())])
NOUN_SCHEMA = pa.schema([("key", pa.string()), ("kind", pa.string()), ("words", pa.int32()),
                         ("n_nouns", pa.int32()), ("nouns", pa.list_(pa.string())), ("error", pa.string())])


def caption_rows(table: pa.Table) -> pa.Table:
    """Manifest rows -> one row per non-blank caption text: (key, kind, text), kinds in KINDS order."""
    cols = set(table.column_names)
    keys = table.column("key").to_pylist() if "key" in cols else []
    out_k, out_kind, out_t = [], [], []
    for kind in KINDS:
        need = KIND_COLUMNS[kind]
        if not all(c in cols for c in need):
            continue
        texts = table.column(need[0]).to_pylist()
        flags = table.column(need[1]).to_pylist() if len(need) > 1 else [True] * len(texts)
        for k, t, f in zip(keys, texts, flags):
            if f is True and isinstance(t, str) and t.strip():
                out_k.append(k)
                out_kind.append(kind)
                out_t.append(t)
    return pa.table({"key": pa.array(out_k, pa.string()), "kind": pa.array(out_kind, pa.string()),
                     "text": pa.array(out_t, pa.string())})


def count_words(text: str) -> int:
    return len(text.split())


def load_spacy(model: str):
    """Load a spaCy pipeline with only the components POS tagging and lemmas need."""
    import spacy

    probe = spacy.load(model)  # cheap (<1 s); tells which components this pipeline has
    exclude = [p for p in probe.component_names if p not in KEEP_PIPES]
    del probe
    return spacy.load(model, exclude=exclude)


def doc_nouns(doc, pos: frozenset[str]) -> list[str]:
    """Lowercase lemmas of the noun tokens of one spaCy Doc (rules in the module docstring)."""
    nouns = []
    for tok in doc:
        if tok.pos_ in pos:
            lemma = (tok.lemma_ or tok.text).lower()
            if len(lemma) >= 2 and any(c.isalpha() for c in lemma):
                nouns.append(lemma)
    return nouns


class NounTagger:
    """spaCy noun extraction over a batch of (key, kind, text[, _part]) rows.

    Returns key, kind, words, n_nouns, nouns (plus any `_part` column unchanged). A text spaCy
    cannot process gets its words counted, no nouns, and a reason in `error` instead of failing
    the batch.
    """

    def __init__(self, spacy_model: str, pos=("NOUN", "PROPN"), max_chars: int = 20000, pipe_batch: int = 256):
        self.nlp = load_spacy(spacy_model)
        self.pos = frozenset(pos)
        self.max_chars = max_chars
        self.pipe_batch = pipe_batch

    def _tag(self, texts: list[str]) -> tuple[list[list[str] | None], list[str | None]]:
        clipped = [t[: self.max_chars] for t in texts]
        try:
            return [doc_nouns(d, self.pos) for d in self.nlp.pipe(clipped, batch_size=self.pipe_batch)], [None] * len(texts)
        except Exception:  # one bad text must not lose the batch: retry one by one
            nouns, errors = [], []
            for t in clipped:
                try:
                    nouns.append(doc_nouns(self.nlp(t), self.pos))
                    errors.append(None)
                except Exception as e:  # noqa: BLE001 - recorded per row
                    nouns.append([])
                    errors.append(f"{type(e).__name__}: {e}"[:200])
            return nouns, errors

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = ["" if t is None else t for t in batch.column("text").to_pylist()]
        nouns, errors = self._tag(texts)
        out = {"key": batch.column("key"), "kind": batch.column("kind"),
               "words": pa.array([count_words(t) for t in texts], pa.int32()),
               "n_nouns": pa.array([len(n) for n in nouns], pa.int32()),
               "nouns": pa.array(nouns, pa.list_(pa.string())),
               "error": pa.array(errors, pa.string())}
        if "_part" in batch.column_names:
            out["_part"] = batch.column("_part")
        return pa.table(out)
