"""An expensive module-wide setup (a multi-process world) that runs once and, if it fails, reports once.

A ``pytest.fixture(scope="module")`` that raises is re-raised by pytest for every test that uses it,
each with the full traceback (7 tests, 7 copies of a 48-line TimeoutError). ``SetupOnce`` keeps the
first outcome instead: the first test that asks gets the exception with its traceback, every later
one fails at setup with one line pointing back to it.

    WORLD = SetupOnce("the 4-device JAX worker", start_world)

    @pytest.fixture
    def world():
        return WORLD.get()
"""

from __future__ import annotations

from collections.abc import Callable

import pytest


class SetupOnce:
    """Run ``start()`` on the first ``get()``; later calls return its result or fail in one line."""

    def __init__(self, name: str, start: Callable[[], object]):
        self.name, self.start = name, start
        self.done, self.value, self.error, self.first = False, None, None, ""

    def get(self, request: pytest.FixtureRequest | None = None):
        if not self.done:
            self.done = True
            self.first = request.node.nodeid if request is not None else "the first test that used it"
            try:
                self.value = self.start()
            except Exception as exc:
                self.error = exc
                raise
        if self.error is not None:
            line = f"{type(self.error).__name__}: {self.error}".splitlines()[0][:200]
            pytest.fail(f"{self.name} failed once, in {self.first} (traceback there): {line}", pytrace=False)
        return self.value
