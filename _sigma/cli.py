"""What every console script shares: its name in `--help`, `--version`, defaults shown for every
option, user errors as one line with exit status 2, and where library chatter goes.

Light on purpose (argparse + the standard library): `sigma-* --help` must answer in well under
two seconds, so entry points build their parser before importing torch, Ray or transformers.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys

EXIT_USAGE = 2  # the status argparse uses for usage errors; ours for every error in the user's input


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _v

    try:
        return _v("sigma-pipeline")
    except PackageNotFoundError:  # a checkout run without `pip install`
        return "0+checkout"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks (stage lists, examples) and ends every option's help
    with its default: `(default: X)`, `(default: off)` for flags, `(default: not set)` for None."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or "default:" in text or action.default is argparse.SUPPRESS \
                or not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            return text
        d = action.default
        if action.required:
            return f"{text} (required)".strip()
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            shown = "on" if d else "off"
        elif d is None:
            shown = "not set"
        elif isinstance(d, (list, tuple)) and not d:
            shown = "none"
        else:
            shown = "%(default)s"
        return f"{text} (default: {shown})".strip()


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `prog: error: ... (see prog --help)`, exit status 2."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def make_parser(prog: str, doc: str | None = None, epilog: str | None = None, **kw) -> Parser:
    """A parser named after the console script; its description is the module docstring."""
    ap = Parser(prog=prog, description=(doc or "").strip() or None, epilog=epilog, formatter_class=HelpFormatter, **kw)
    ap.add_argument("--version", action="version", version=f"%(prog)s (sigma-pipeline {version()})")
    return ap


def add_verbose(ap) -> None:
    ap.add_argument("--verbose", action="store_true",
                    help="also print Ray Data / Ray Train / img2dataset logs here (they always go to <output>/logs/)")


class UsageExit(SystemExit):
    """Exit status 2 whose str() is the one-line message (already printed by `fail`)."""

    def __init__(self, message: str):
        super().__init__(EXIT_USAGE)
        self.message = message

    def __str__(self):
        return self.message


def fail(prog: str, message: str):
    """Print the one-line error and raise UsageExit (exit status 2), for code deep inside a command."""
    user_error(prog, message)
    raise UsageExit(f"{prog}: error: {' '.join(str(message).split())}")


def config_pipelines(config: str = "pipelines.yaml") -> list[str]:
    """The pipeline names of a config file ([] when it is not there or not readable): for --help."""
    import yaml

    try:
        with open(config) as f:
            doc = yaml.safe_load(f)
        return sorted((doc or {}).get("pipelines") or {})
    except (OSError, yaml.YAMLError, AttributeError):
        return []


def pipelines_note(config: str = "pipelines.yaml") -> str:
    """' (pipelines.yaml here: a, b, c)' when the default config is in the working directory."""
    names = config_pipelines(config)
    return f" ({config} here: {', '.join(names)})" if names else ""


def user_error(prog: str, message: str) -> int:
    """Report an error in the user's input on one line; returns the exit status to use (2)."""
    first = " ".join(str(message).split())  # one line, whatever the message held
    print(f"{prog}: error: {first}", file=sys.stderr)
    return EXIT_USAGE


def require_exists(what: str, path: str | None, kind: str = "file or folder") -> str | None:
    """None when `path` (local path or URI) exists, else the one-line complaint."""
    from _sigma import fs

    if not path:
        return None
    try:
        if fs.exists(path) or (fs.is_remote(path) and fs.isdir(path)):
            return None
    except (OSError, ValueError) as e:
        return f"{what} {path}: cannot be read ({str(e).splitlines()[0][:200]})"
    return f"{what} {path}: no such {kind}"


# Loggers of the libraries whose INFO/WARNING chatter buries our progress bars and summaries.
CHATTY = ("ray", "ray.data", "ray.train", "ray.tune", "img2dataset", "transformers", "diffusers", "urllib3",
          "filelock", "fsspec", "botocore", "s3fs")


def route_logs(output: str | None, verbose: bool = False, name: str = "run") -> str:
    """Send the libraries' log records to `<output>/logs/<name>.log`; returns that file's local path.
    An object-store output gets a local spool file, uploaded to `<output>/logs/` when the process
    exits. With `verbose` the records also stay on the console."""
    import atexit
    import tempfile

    from _sigma import fs

    if output and not fs.is_remote(output):
        d = os.path.join(fs.normalize(output), "logs")
    else:
        d = tempfile.mkdtemp(prefix="sigma-logs-")
        if output:
            target = fs.join(fs.normalize(output), "logs", f"{name}.log")
            atexit.register(_upload_log, os.path.join(d, f"{name}.log"), target)
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, f"{name}.log")
    _routed.update(path=path, verbose=verbose)
    _attach()
    if not verbose:
        os.environ["SIGMA_LOG_DIR"] = d  # init_ray / img2dataset read it: quiet console, logs here
    return path


_routed: dict = {}
_handlers: dict[str, logging.Handler] = {}


def _attach() -> None:
    path, verbose = _routed["path"], _routed["verbose"]
    if path not in _handlers:
        h = logging.FileHandler(path)
        h.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        _handlers[path] = h
    handler = _handlers[path]
    for lname in CHATTY:
        lg = logging.getLogger(lname)
        if handler not in lg.handlers:
            lg.addHandler(handler)
        lg.setLevel(logging.INFO)
        if not verbose:
            lg.propagate = False
            for h in list(lg.handlers):
                if h is not handler and isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                    lg.removeHandler(h)


def reroute_logs() -> None:
    """Detach the console handlers a library installed after route_logs (ray.data does on import)."""
    if _routed.get("path"):
        _attach()


def _upload_log(local: str, target: str) -> None:
    from _sigma import fs

    try:
        if os.path.exists(local):
            fs.write_bytes(target, open(local, "rb").read())
    except OSError as e:  # the run's result does not depend on its log
        print(f"warning: could not upload the log to {target}: {e}", file=sys.stderr)


@contextlib.contextmanager
def stdout_to(path: str):
    """Send this process's stdout, at the file-descriptor level, to `path` for the block: library
    prints and the processes it spawns (img2dataset's workers) land in the log, not on the console."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(path, "a") as f:
        os.dup2(f.fileno(), 1)
        try:
            with contextlib.redirect_stdout(f):
                yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
