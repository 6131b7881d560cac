"""`sigma-browse --output RUN [--port 8000] [--host 127.0.0.1] [--cache-dir DIR] [--resolution R]`

Serves the browser of one run (local folder or s3:// / gs:// prefix) until Ctrl-C. It binds to
127.0.0.1 unless --host says otherwise: the page shows every caption and URL of the run and has no
login, so exposing it is a decision to make explicitly.
"""
from __future__ import annotations

import sys


def parse_args(argv=None):
    from _sigma.cli import make_parser

    ap = make_parser("sigma-browse", __doc__)
    ap.add_argument("--output", required=True, help="the run folder (local path or s3://bucket/prefix)")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=8000, help="port (0 = any free port)")
    ap.add_argument("--cache-dir", default=None,
                    help="local folder for thumbnails and tar indexes (default ~/.cache/sigma-browse/<run hash>)")
    ap.add_argument("--resolution", type=int, default=None,
                    help="bucket table of the grid's `bucket` column (default: the run's first features "
                         "resolution, else 1024)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    from _sigma import fs
    from _sigma.cli import user_error

    args = parse_args(argv)  # --help / --version answer before the web app is imported
    if not fs.is_remote(args.output) and not fs.exists(args.output):  # a typo, not a run still starting
        return user_error("sigma-browse", f"--output {args.output}: no such folder")
    from curation.browse.app import serve
    from curation.browse.store import RunError
    server = serve(args.output, args.host, args.port, args.cache_dir, args.resolution)
    browser = server.app.config["browser"]
    try:
        run = browser.run()
        print(f"{run.out}: {run.rows} rows in {len(run.parts)} parts"
              + (", candidate pairs stored" if run.has_pairs else ""), flush=True)
    except RunError as e:  # still serve: the page explains, and works once the run has a manifest
        print(f"warning: {e}", file=sys.stderr, flush=True)
    host, port = server.server_address[:2]
    print(f"browse {args.output} at http://{host}:{port}/  (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
