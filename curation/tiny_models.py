"""`python -m curation.tiny_models --out models/tiny`: build every tiny offline model.

Random weights, real architectures, no network. Each package owns its builder in `<pkg>/tiny.py`
(`build(out_dir) -> dict of written paths`); this command only calls them in order, so tests, CI
and the demo get the whole set from one command.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from _sigma import fs

MARKER = "tiny_models.json"


PACKAGES = ("curation", "features", "captioning", "training", "eval")  # the order of _builders()


def _builders():
    # Explicit imports (no string registry): the order matters, e.g. T5 before the captioner.
    from curation import tiny as curation_tiny
    from features import tiny as features_tiny
    from captioning import tiny as captioning_tiny
    from training import tiny as training_tiny
    from eval import tiny as eval_tiny

    return [
        ("curation", curation_tiny.build),
        ("features", features_tiny.build),
        ("captioning", captioning_tiny.build),
        ("training", training_tiny.build),
        ("eval", eval_tiny.build),  # reward-model twins (ImageReward, HPSv2, PickScore)
    ]


def _source_hash(build) -> str:
    """Hash of the builder's module file(s): a changed builder rebuilds its models under --missing."""
    import hashlib
    import inspect

    mod = inspect.getmodule(build)
    files = [Path(mod.__file__)] + sorted(Path(mod.__file__).parent.glob("*tiny_modeling.py"))
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16]


def _complete(entry, build) -> bool:
    return (bool(entry) and entry.get("_source") == _source_hash(build)
            and all(Path(p).exists() for k, p in entry.items() if k != "_source"))


def build_all(out_dir: Path, only: list[str] | None = None, missing_only: bool = False) -> dict:
    """Build each package's tiny models; with missing_only, skip packages whose files all exist."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    marker = out_dir / MARKER
    written: dict = json.loads(marker.read_text()) if marker.exists() else {}
    for name, build in _builders():
        if only and name not in only:
            continue
        if missing_only and _complete(written.get(name), build):
            continue
        t0 = time.time()
        paths = build(out_dir)
        written[name] = {k: str(v) for k, v in (paths or {}).items()}
        print(f"[tiny_models] {name}: {', '.join(written[name]) or 'nothing'} ({time.time() - t0:.1f}s)", flush=True)
        written[name]["_source"] = _source_hash(build)
    fs.write_json(str(marker), written, indent=2)  # written last: a half-built folder is completed on the next call
    return written


def ensure_tiny_models(out_dir: Path) -> Path:
    """Build whatever is missing (cheap when everything exists)."""
    build_all(Path(out_dir), missing_only=True)
    return Path(out_dir)


def main(argv=None) -> None:
    from _sigma.cli import make_parser, user_error

    ap = make_parser("sigma-tiny-models", __doc__)
    ap.add_argument("--out", default="models/tiny", help="output folder")
    ap.add_argument("--only", default="", help=f"comma-separated packages to (re)build, of: {', '.join(PACKAGES)} "
                                               "(default: all)")
    ap.add_argument("--missing", action="store_true", help="build only packages whose files are missing")
    args = ap.parse_args(argv)
    bad = [s for s in args.only.split(",") if s and s not in PACKAGES]
    if bad:
        raise SystemExit(user_error("sigma-tiny-models", f"--only: unknown package {bad[0]!r}; allowed: {', '.join(PACKAGES)}"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    build_all(Path(args.out), [s for s in args.only.split(",") if s] or None, missing_only=args.missing)


if __name__ == "__main__":
    main()
