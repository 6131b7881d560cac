"""The WHERE box: what a filter may be, and the ready-made ones.

A filter is ONE boolean SQL expression over the columns of the materialised manifest table `m`.
It is checked here (no ';', balanced parentheses outside strings and comments, a length limit),
then placed on its own lines inside `SELECT ... FROM m WHERE (\\n<filter>\\n)` so that a `--`
comment cannot swallow the closing parenthesis, and parsed by DuckDB, which must see exactly one
SELECT. The connection it runs on has external access disabled and its configuration locked
(store.py), so `read_csv('/etc/passwd')` inside an expression is refused by DuckDB itself.
"""
from __future__ import annotations

import re

MAX_CHARS = 4000


class FilterError(ValueError):
    """A filter refused before or by DuckDB; the message is shown to the user as is."""


def _scan(where: str) -> None:
    """Reject ';' anywhere and parentheses that close the WHERE's own '(' (depth below zero) or
    stay open. Quotes ('..', "..") and comments (--, /* */) are skipped when counting."""
    if ";" in where:
        raise FilterError("a filter is one SQL expression: ';' is not allowed (inside a string, write chr(59))")
    depth, i, n = 0, 0, len(where)
    while i < n:
        c = where[i]
        if c in "'\"":
            j = i + 1
            while j < n:
                if where[j] == c:
                    if j + 1 < n and where[j + 1] == c:  # '' / "" escape
                        j += 2
                        continue
                    break
                j += 1
            if j >= n:
                raise FilterError(f"unterminated {c} quote")
            i = j + 1
            continue
        if where.startswith("--", i):
            nl = where.find("\n", i)
            i = n if nl < 0 else nl + 1
            continue
        if where.startswith("/*", i):
            end = where.find("*/", i + 2)
            if end < 0:
                raise FilterError("unterminated /* comment")
            i = end + 2
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth < 0:
                raise FilterError("unbalanced parentheses: a ')' closes more than the filter opened")
        i += 1
    if depth:
        raise FilterError(f"unbalanced parentheses: {depth} '(' not closed")


def normalize(where: str | None) -> str:
    """The checked filter text ('true' when empty). Raises FilterError."""
    where = (where or "").strip()
    if not where:
        return "true"
    if len(where) > MAX_CHARS:
        raise FilterError(f"filter longer than {MAX_CHARS} characters")
    _scan(where)
    return where


def wrap(where: str) -> str:
    """`(\\n<filter>\\n)`: the filter on its own lines (a trailing -- comment ends at the newline)."""
    return f"(\n{where}\n)"


def check_single_select(sql: str) -> None:
    """DuckDB's own parser must see exactly one SELECT statement in the query built around a filter."""
    import duckdb

    try:
        stmts = duckdb.extract_statements(sql)
    except duckdb.Error as e:
        raise FilterError(first_line(e)) from None
    if len(stmts) != 1 or stmts[0].type != duckdb.StatementType.SELECT:
        raise FilterError("a filter must be one expression inside a SELECT")


def first_line(e: BaseException) -> str:
    """DuckDB errors carry a caret diagram after the first lines; keep the readable part."""
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    keep = []
    for ln in lines:
        if ln.startswith("LINE "):
            break
        keep.append(ln)
    return " ".join(keep)[:500] or type(e).__name__


# Macros defined on the table's database: filters cannot contain ';', reject_reason is ';'-joined.
MACROS = ("CREATE MACRO has_reason(r, x) AS coalesce(list_contains(string_split(r, ';'), x), false)",)


def presets(reasons: list[str], buckets: list[tuple[str, int]], columns: set[str], t5_max: int = 300) -> list[dict]:
    """Ready-made filters: {label, where}. Rejected by each reason present, selected, degenerate
    captions, captions over the T5 limit, duplicates, failed rows, the most common aspect bucket."""
    out = [{"label": "all rows", "where": ""}]
    if "selected" in columns:
        out.append({"label": "selected", "where": "selected"})
    for r in reasons:
        lit = "'" + r.replace("'", "''") + "'"
        out.append({"label": f"rejected: {r}", "where": f"has_reason(reject_reason, {lit})"})
    out += [{"label": "degenerate captions", "where": "caption_status = 'degenerate'"},
            {"label": f"over {t5_max} T5 tokens", "where": f"caption_t5_tokens > {int(t5_max)}"},
            {"label": "duplicates (dropped)", "where": "duplicate_of IS NOT NULL"},
            {"label": "not ok (failed rows)", "where": "status <> 'ok'"},
            # the score stage's filters (LAION's usual cuts; null when the filter was off)
            {"label": "nsfw > 0.5", "where": "nsfw > 0.5"},
            {"label": "watermark > 0.5", "where": "watermark > 0.5"},
            {"label": "clip_similarity < 0.28", "where": "clip_similarity < 0.28"},
            {"label": "alt text over 77 CLIP tokens", "where": "text_truncated"}]
    for b, _n in buckets[:1]:
        out.append({"label": f"bucket {b}", "where": f"bucket = '{b}'"})
    return out


_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def quote_ident(name: str) -> str:
    """A column name as a DuckDB identifier (names come from the manifest schema, not the user)."""
    return name if _IDENT.match(name) else '"' + name.replace('"', '""') + '"'
