"""A web page over a run's manifest: `python -m curation.browse --output RUN`.

store.py (the manifest in DuckDB: filters, paging, duplicate groups), filters.py (what the WHERE
box accepts), images.py (originals from the download tars, cached thumbnails), whatif.py
(selection under other thresholds), report.py (Table 1, figures, summaries), app.py (Flask
routes), static/ (the page: plain HTML/JS/CSS, no build step).
"""
