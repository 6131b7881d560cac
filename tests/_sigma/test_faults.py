"""The kill hook's commit gate (issue 22 item 15): with SIGMA_KILL_AT=stage:n, at most n commits of
the stage can ever be written, however many commit tasks run at once or outlive the killed driver;
the rest block until the run is killed. No clock involved: the test waits for states, not times."""
from __future__ import annotations

import os
import threading

from _sigma import faults


def test_gate_lets_exactly_n_commits_through(tmp_path, monkeypatch):
    monkeypatch.setenv("SIGMA_KILL_AT", "stats:2")
    monkeypatch.setenv("SIGMA_KILL_MARKER", str(tmp_path / "killed"))
    assert faults.gate("other") is None  # another stage: no gate
    gate = faults.gate("stats")
    assert gate[:2] == ("stats", 2) and gate == faults.gate("stats")  # one folder per driver process
    returned: list[int] = []
    lock = threading.Lock()

    def commit(group: int) -> None:
        faults.before_commit(gate, group)
        with lock:
            returned.append(group)

    threads = [threading.Thread(target=commit, args=(g,), daemon=True) for g in range(6)]
    for t in threads:
        t.start()
    folder = gate[2]

    def claimed() -> int:
        names = os.listdir(folder) if os.path.isdir(folder) else []
        return sum(1 for n in names if open(os.path.join(folder, n)).read())

    while claimed() < 2:
        threading.Event().wait(0.01)  # until two slots are claimed (a state, not a time)
    owners = sorted(int(open(os.path.join(folder, n)).read()) for n in os.listdir(folder))
    for g in owners:
        threads[g].join()  # the two owners go on to commit
    assert sorted(os.listdir(folder)) == ["stats-1", "stats-2"] and sorted(returned) == owners
    faults.before_commit(gate, owners[0])  # a retried task of an owner gets its slot back
    assert [t.is_alive() for g, t in enumerate(threads) if g not in owners] == [True] * 4  # never commit
    assert sorted(returned) == owners


def test_no_gate_without_a_marker_or_a_kill(monkeypatch):
    monkeypatch.delenv("SIGMA_KILL_AT", raising=False)
    assert faults.gate("stats") is None
    faults.before_commit(None, 1)  # a no-op
    monkeypatch.setenv("SIGMA_KILL_AT", "stats:1")
    monkeypatch.delenv("SIGMA_KILL_MARKER", raising=False)
    assert faults.gate("stats") is None
