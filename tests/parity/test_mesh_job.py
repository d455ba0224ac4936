"""parity.mesh_job's hang detection (``report_progress`` / ``wait_for``) and tests/setup_once.py, in process.

The real workers are exercised in tests/torch/test_parallel.py and tests/jax/test_parallel.py.
"""

from __future__ import annotations

import threading
import time

import pytest

from parity.mesh_job import PROGRESS_ENV, report_progress, wait_for
from tests.setup_once import SetupOnce


class FakeProcess:
    """A ``Popen`` stand-in that exits with ``code`` once ``done`` is set."""

    def __init__(self, code=0):
        self.code, self.done = code, threading.Event()

    def poll(self):
        return self.code if self.done.is_set() else None


def _worker(path, monkeypatch, proc, steps, pause_s, exits=True):
    monkeypatch.setenv(PROGRESS_ENV, str(path))

    def run():
        for i in range(steps):
            time.sleep(pause_s)
            report_progress(f"step {i + 1}")
        if exits:
            proc.done.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_slow_progress_is_not_a_hang(tmp_path, monkeypatch):
    proc, path = FakeProcess(), tmp_path / "progress.log"
    t = _worker(path, monkeypatch, proc, steps=6, pause_s=0.1)  # 0.6 s in all, the bound 0.35 s
    wait_for([proc], str(path), 0.35, "fake run", lambda codes: codes[0] is not None, poll_s=0.01)
    t.join()
    assert path.read_text().splitlines() == [f"step {i}" for i in range(1, 7)]


def test_no_progress_is_a_hang_naming_the_last_step(tmp_path, monkeypatch):
    proc, path = FakeProcess(), tmp_path / "progress.log"
    _worker(path, monkeypatch, proc, steps=1, pause_s=0.05, exits=False)  # one step, then silence
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"fake run: no progress for timeout_s=0.3 s .*last: step 1"):
        wait_for([proc], str(path), 0.3, "fake run", lambda codes: codes[0] is not None, poll_s=0.01)
    assert time.monotonic() - start < 30


def test_report_progress_without_a_parent_is_a_no_op(monkeypatch):
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    report_progress("nobody listens")


def test_setup_once_reports_a_failure_once():
    calls = []

    def start():
        calls.append(1)
        raise TimeoutError("the world hung\nsecond line of detail")

    setup = SetupOnce("the test world", start)
    with pytest.raises(TimeoutError, match="the world hung"):  # the first test: the real exception
        setup.get()
    for _ in range(2):  # every later test: one line pointing back, the setup not run again
        with pytest.raises(pytest.fail.Exception) as info:
            setup.get()
        assert str(info.value) == ("the test world failed once, in the first test that used it (traceback "
                                   "there): TimeoutError: the world hung")
        assert not info.value.pytrace
    assert calls == [1]
    ok = SetupOnce("fine", lambda: calls.append(2) or "value")
    assert ok.get() == ok.get() == "value" and calls == [1, 2]
