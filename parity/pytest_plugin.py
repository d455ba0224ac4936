"""The moe-parity pytest plugin (entry point ``pytest11``: loaded by every pytest run once installed).

Fixtures, for a team's own tests of its MoE port (docs/columns.md, "pytest"):

- ``moe_preset``: a preset name, the test parametrised over ``--moe-presets`` (comma list) or the ini
  option ``moe_parity_presets`` (default "default");
- ``moe_dtype``: a dtype, parametrised over ``--moe-dtypes`` / ``moe_parity_dtypes`` (default
  "float32,bfloat16");
- ``moe_parity``: ``check(column, **kwargs)``, ``parity.testing.assert_moe_parity`` with the test's
  ``moe_preset`` / ``moe_dtype`` when it uses those fixtures.

Loading the plugin imports pytest only (parity.testing, NumPy and the frameworks are imported when a
test asks for ``moe_parity``), and it parametrises only tests that name its fixtures.
"""

from __future__ import annotations

import pytest

DEFAULT_PRESETS = "default"
DEFAULT_DTYPES = "float32,bfloat16"


def pytest_addoption(parser):
    group = parser.getgroup("moe-parity", "moe-parity: parity checks of MoE layers")
    group.addoption("--moe-presets", default=None, help=f"presets the moe_preset fixture runs over "
                                                         f"(comma list; default {DEFAULT_PRESETS!r})")
    group.addoption("--moe-dtypes", default=None, help=f"dtypes the moe_dtype fixture runs over "
                                                        f"(comma list; default {DEFAULT_DTYPES!r})")
    parser.addini("moe_parity_presets", "presets of the moe_preset fixture (comma or space list)", default="")
    parser.addini("moe_parity_dtypes", "dtypes of the moe_dtype fixture (comma or space list)", default="")


def _values(config, option: str, ini: str, default: str) -> list[str]:
    text = config.getoption(option) or config.getini(ini) or default
    return [v for v in text.replace(",", " ").split() if v]


def pytest_generate_tests(metafunc):
    """Parametrise the tests that use ``moe_preset`` / ``moe_dtype`` (checked names: a typo is a usage
    error naming the valid ones)."""
    if "moe_preset" in metafunc.fixturenames:
        presets = _values(metafunc.config, "--moe-presets", "moe_parity_presets", DEFAULT_PRESETS)
        from parity.presets import PRESETS

        bad = [p for p in presets if p not in PRESETS]
        if bad:
            raise pytest.UsageError(f"moe-parity: unknown preset(s) {', '.join(bad)}; known: {', '.join(PRESETS)}")
        metafunc.parametrize("moe_preset", presets, ids=[f"preset={p}" for p in presets])
    if "moe_dtype" in metafunc.fixturenames:
        dtypes = _values(metafunc.config, "--moe-dtypes", "moe_parity_dtypes", DEFAULT_DTYPES)
        from parity.metrics import DTYPES

        bad = [d for d in dtypes if d not in DTYPES]
        if bad:
            raise pytest.UsageError(f"moe-parity: unknown dtype(s) {', '.join(bad)}; known: {', '.join(DTYPES)}")
        metafunc.parametrize("moe_dtype", dtypes, ids=[f"dtype={d}" for d in dtypes])


@pytest.fixture
def moe_parity(request):
    """``check(column, **kwargs)`` -> the report; ``AssertionError`` with the failing rows (see
    ``parity.testing.assert_moe_parity``). Uses the test's ``moe_preset`` / ``moe_dtype`` parameters
    unless the call gives ``preset=`` / ``dtype=`` / ``config=``."""
    from parity.testing import assert_moe_parity

    defaults = {}
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    if "moe_preset" in params:
        defaults["preset"] = params["moe_preset"]
    if "moe_dtype" in params:
        defaults["dtype"] = params["moe_dtype"]

    def check(column, **kwargs):
        return assert_moe_parity(column, **{**defaults, **kwargs})

    return check
