"""Fixtures of the eval tests (helpers live in evaldata.py)."""
import pytest

from evaldata import make_output


@pytest.fixture()
def fake_out(tmp_path):
    out = tmp_path / "run"
    facts = make_output(out)
    return out, facts
