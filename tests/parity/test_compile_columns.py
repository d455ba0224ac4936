"""``moe-parity run --compile``: the compiled / eager twin columns (issue 18)."""

import pytest

from parity.backends import make_runner
from parity.backends.compiled import with_compile_columns
from parity.cli import build_parser


def test_twins_follow_their_columns():
    runners = [make_runner(n) for n in ("torch:cpu", "jax:cpu", "reference:cpu")]
    names = [r.name for r in with_compile_columns(runners)]
    assert names == ["torch:cpu", "torch:cpu+compile", "jax:cpu", "jax:cpu+eager", "reference:cpu"]
    twins = with_compile_columns(runners)
    assert twins[1].compile and twins[1].device == "cpu" and not twins[3].jit
    # a twin already present is not added twice
    assert [r.name for r in with_compile_columns(twins)] == names


def test_run_parser_takes_compile():
    args = build_parser().parse_args(["run", "--compile"])
    assert args.compile is True
    assert build_parser().parse_args(["run"]).compile is False


@pytest.mark.slow
def test_compiled_torch_column_equals_eager_column():
    """torch:cpu+compile (here dynamo + AOT autograd: the eager kernels) vs torch:cpu: every forward,
    gradient and bias-step row of the pair is exact (max_abs 0), and the run passes."""
    pytest.importorskip("torch")
    from parity.backends.torch_backend import TorchRunner
    from parity.harness import Settings, run_parity
    from parity.presets import get_preset
    from parity.weights import init_weights

    cfg = get_preset("default").config
    runners = [TorchRunner("cpu"), TorchRunner("cpu", compile=True, compile_backend="aot_eager")]
    report = run_parity(Settings(cfg=cfg, steps=1), init_weights(cfg, 0), runners)
    assert report.passed
    pair = [c for c in report.checks if {c.backend, c.against} == {"torch:cpu", "torch:cpu+compile"}]
    kinds = {c.kind for c in pair}
    assert {"forward", "grad"} <= kinds, kinds
    assert all(c.max_abs == 0.0 for c in pair if c.max_abs is not None), [
        (c.id, c.max_abs) for c in pair if c.max_abs]
    f64 = [c for c in report.checks if {c.backend, c.against} == {"torch:cpu@float64", "torch:cpu+compile@float64"}]
    assert f64 and all(c.max_abs == 0.0 for c in f64)
