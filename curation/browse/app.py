"""The Flask app: one page (static/index.html + app.js, no build step) over a JSON API.

Routes
  /                      the page (or a page saying why the run cannot be browsed)
  /static/<file>         the page's own files (Flask's safe_join: nothing above static/)
  /api/info|rows|row/<key>|dups/<key>|whatif|report, POST /api/reload
  /thumb/<key>           JPEG thumbnail, or an SVG placeholder saying why there is none
  /image/<key>           the image (long side <= 2048), or a page saying why it does not decode
  /run/<path>            a file of the run, only if it is in report.served_files (a listing of
                         report/, eval/, train/*/training_curves.png inside the run)
Errors are pages (or JSON under /api/), never tracebacks: the traceback goes to the server log.
"""
from __future__ import annotations

import html
import logging
import os
import threading

from flask import Flask, Response, jsonify, request, send_from_directory
from werkzeug.exceptions import HTTPException

from _sigma import fs
from curation.browse import report as report_mod
from curation.browse import whatif as whatif_mod
from curation.browse.filters import FilterError
from curation.browse.images import ImageError, Images, placeholder
from curation.browse.store import KEY_RE, Run, RunError

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
log = logging.getLogger("curation.browse")


class Browser:
    """The run behind the app, (re)loaded on demand: a run with no manifest yet becomes browsable
    as soon as it has one, without restarting the server."""

    def __init__(self, out: str, cache_dir: str | None = None, resolution: int | None = None, timeout_s: float = 30):
        self.out, self.cache_dir, self.resolution, self.timeout_s = out, cache_dir, resolution, timeout_s
        self._run: Run | None = None
        self._images: Images | None = None
        self._lock = threading.Lock()

    def run(self) -> Run:
        with self._lock:
            if self._run is None:
                self._run = Run(self.out, self.resolution, self.timeout_s)
                self._images = Images(self._run.out, self.cache_dir)
                # The what-if page's arrays (~3 s at 1M rows) load in the background meanwhile.
                threading.Thread(target=_quietly, args=(whatif_mod.arrays, self._run), daemon=True).start()
            return self._run

    def images(self) -> Images:
        self.run()
        return self._images

    def reload(self) -> Run:
        """Rebuild the table (after a stage rewrote the manifest); the old one's memory is freed."""
        with self._lock:
            old, self._run = self._run, None
        if old is not None:
            old.con.close()
        return self.run()


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except Exception:  # the request that needs it will report the error
        log.exception("background load failed")


def error_page(title: str, message: str, status: int, hint: str = "") -> Response:
    body = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<link rel='stylesheet' href='/static/style.css'></head><body class='errorpage'>"
            f"<h1 id='error-title'>{html.escape(title)}</h1><p id='error-message'>{html.escape(message)}</p>"
            f"{'<p class=hint>' + html.escape(hint) + '</p>' if hint else ''}"
            "<p><a href='/'>back to the run</a></p></body></html>")
    return Response(body, status=status, mimetype="text/html")


def _bad(message: str, status: int = 400):
    return jsonify({"error": message}), status


def _key(key: str) -> str:
    if not KEY_RE.fullmatch(key or ""):
        raise FilterError(f"not a row key: {key[:60]!r} (keys look like 00000_000012)")
    return key


def create_app(out: str, cache_dir: str | None = None, resolution: int | None = None, timeout_s: float = 30) -> Flask:
    b = Browser(out, cache_dir, resolution, timeout_s)
    app = Flask(__name__, static_folder=None)
    app.json.sort_keys = False
    app.config["browser"] = b

    @app.errorhandler(RunError)
    def _run_error(e: RunError):
        if request.path.startswith("/api/"):
            return _bad(str(e), e.status)
        return error_page("Cannot browse this run", str(e), e.status,
                          "Reload this page once the run exists; the server does not need a restart.")

    @app.errorhandler(FilterError)
    def _filter_error(e: FilterError):
        if request.path.startswith("/api/"):
            return _bad(str(e))
        return error_page("Bad request", str(e), 400)

    @app.errorhandler(404)
    def _not_found(e):
        if request.path.startswith("/api/"):
            return _bad("not found", 404)
        return error_page("Not found", f"{request.path[:200]} is not part of this browser or of the run", 404)

    @app.errorhandler(405)
    def _method(e):
        return error_page("Method not allowed", request.method, 405)

    @app.errorhandler(Exception)
    def _crash(e):
        if isinstance(e, HTTPException):  # 400, 413, ... from werkzeug itself
            if request.path.startswith("/api/"):
                return _bad(e.description or e.name, e.code or 400)
            return error_page(e.name, e.description or e.name, e.code or 400)
        log.exception("unhandled error on %s", request.path)
        if request.path.startswith("/api/"):
            return _bad(f"internal error: {type(e).__name__}: {str(e)[:300]}", 500)
        return error_page("Internal error", f"{type(e).__name__}: {str(e)[:300]}", 500,
                          "The details are in the server's log.")

    @app.get("/")
    def index():
        b.run()  # RunError -> the error page
        return send_from_directory(STATIC, "index.html")

    @app.get("/favicon.ico")
    def favicon():
        return Response(status=204)

    @app.get("/static/<path:name>")
    def static_file(name):
        return send_from_directory(STATIC, name)

    @app.get("/api/info")
    def api_info():
        return jsonify(b.run().info())

    @app.get("/api/rows")
    def api_rows():
        a = request.args
        try:
            offset, limit = int(a.get("offset", 0)), int(a.get("limit", 48))
        except ValueError:
            raise FilterError("offset and limit must be integers") from None
        return jsonify(b.run().page(a.get("where", ""), a.get("sort", "key"), a.get("desc") in ("1", "true"),
                                    offset, limit))

    @app.get("/api/row/<key>")
    def api_row(key):
        row = b.run().row(_key(key))
        if row is None:
            return _bad(f"no row {key} in this run", 404)
        image = {"ok": True, "error": None}
        try:
            b.images().thumbnail(key)
        except ImageError as e:
            image = {"ok": False, "error": str(e)}
        return jsonify({"key": key, "columns": [[k, v] for k, v in row.items()], "image": image})

    @app.get("/api/dups/<key>")
    def api_dups(key):
        g = b.run().dup_group(_key(key))
        return jsonify(g) if g is not None else _bad(f"no row {key} in this run", 404)

    @app.get("/api/whatif")
    def api_whatif():
        return jsonify(whatif_mod.whatif(b.run(), dict(request.args)))

    @app.get("/api/report")
    def api_report():
        return jsonify(report_mod.report(b.run().out))

    @app.post("/api/reload")
    def api_reload():
        return jsonify({"rows": b.reload().rows})

    @app.get("/thumb/<key>")
    def thumb(key):
        run = b.run()
        if not run.has_key(_key(key)):
            return Response(placeholder("no such row"), 404, mimetype="image/svg+xml")
        try:
            data = b.images().thumbnail(key)
        except ImageError as e:
            reason = "does not decode" if "decode" in str(e) else "not downloaded"
            return Response(placeholder(reason), 200, mimetype="image/svg+xml", headers={"X-Image-Error": str(e)[:200]})
        return Response(data, mimetype="image/jpeg", headers={"Cache-Control": "max-age=300"})

    @app.get("/image/<key>")
    def image(key):
        if not b.run().has_key(_key(key)):
            return error_page("No such row", f"{key} is not in this run's manifest", 404)
        try:
            return Response(b.images().full(key), mimetype="image/jpeg")
        except ImageError as e:
            return error_page("Image unavailable", str(e), 422,
                              "The manifest row is still there; the downloaded bytes cannot be shown.")

    @app.get("/run/<path:rel>")
    def run_file(rel):
        out = b.run().out
        if rel not in report_mod.served_files(out):
            return error_page("Not found", f"{rel[:200]} is not a report file of this run", 404)
        target = fs.join(out, *rel.split("/"))
        local = fs.local_path(target)
        if local and not os.path.realpath(local).startswith(os.path.realpath(out) + os.sep):
            return error_page("Not found", f"{rel[:200]} leads outside the run", 404)  # a symlink out of it
        ext = os.path.splitext(rel)[1].lower()
        return Response(fs.read_bytes(target), mimetype=report_mod.SERVED_EXT[ext])

    return app


def serve(out: str, host: str = "127.0.0.1", port: int = 8000, cache_dir: str | None = None,
          resolution: int | None = None, quiet: bool = False):
    """A threaded WSGI server (werkzeug) for the app, not yet serving: call serve_forever()."""
    from werkzeug.serving import make_server

    if quiet:
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
    return make_server(host, port, create_app(out, cache_dir, resolution), threaded=True)
