"""A web page over a run's manifest: `python -m curation.browse --output RUN`.

store.py (the manifest in DuckDB: build, lookups, duplicate groups), paging.py (pages that stay
fast at millions of rows), filters.py (what the WHERE box accepts), images.py (originals from the
download tars, cached thumbnails), whatif.py (selection under other thresholds), report.py
(Table 1, figures, summaries, the whitelist of served run files), app.py (Flask routes),
static/ (the page: plain HTML/JS/CSS, no build step), sample.py (synthetic runs for the tests,
the benchmark and the README screenshot).
"""
