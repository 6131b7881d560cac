"""The local run lock (issue 22 item 5): `<output>/_lock.json` is opened without following a
symlink and must be a regular file, so a planted link cannot make the run overwrite its target."""
from __future__ import annotations

import os

import pytest

from _sigma.config import ConfigError
from _sigma.runlock import LOCK_NAME, run_lock


def test_a_symlinked_lock_is_refused_and_its_target_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    os.symlink(target, out / LOCK_NAME)
    with pytest.raises(ConfigError, match=rf"{out}/_lock.json is a symbolic link"):
        with run_lock(str(out)):
            pass
    assert target.read_text() == "keep me"
    dangling = tmp_path / "out2"
    dangling.mkdir()
    os.symlink(tmp_path / "created-by-the-lock", dangling / LOCK_NAME)
    with pytest.raises(ConfigError, match="is a symbolic link"):
        with run_lock(str(dangling)):
            pass
    assert not (tmp_path / "created-by-the-lock").exists()


def test_a_lock_that_is_not_a_regular_file_is_refused(tmp_path):
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / LOCK_NAME)
    with pytest.raises(ConfigError, match="_lock.json is not a regular file"):
        with run_lock(str(fifo)):
            pass
    folder = tmp_path / "dir"
    (folder / LOCK_NAME).mkdir(parents=True)
    with pytest.raises(ConfigError, match="_lock.json"):
        with run_lock(str(folder)):
            pass


def test_a_regular_lock_still_works_and_names_the_holder(tmp_path):
    with run_lock(str(tmp_path), command="x") as h:
        assert '"command": "x"' in (tmp_path / LOCK_NAME).read_text() and h["pid"] == os.getpid()
    with run_lock(str(tmp_path)):  # released at exit, reusable
        pass
