"""The compilation columns of ``moe-parity run --compile`` (issue 18).

Next to each torch column "torch:<device>" a "torch:<device>+compile" column runs the same layer under
``torch.compile`` (``TorchRunner(compile=True)``); next to each JAX column "jax:<platform>", which runs
under ``nnx.jit``, a "jax:<platform>+eager" column runs the same steps op by op
(``JaxRunner(jit=False)``). The harness compares every pair of columns, so the rows
"torch:cpu+compile vs torch:cpu" and "jax:cpu+eager vs jax:cpu" say what compilation changed (0 when
the bits are the same). Other columns (hf, reference, sharded) get no compiled twin.
"""

from __future__ import annotations

from collections.abc import Sequence

from parity.backends.base import Runner


def compiled_twin(runner: Runner, **hooks) -> Runner | None:
    """The compiled (torch) or eager (JAX) twin of ``runner``, or None for a column without one."""
    from parity.backends.jax_backend import JaxRunner
    from parity.backends.torch_backend import TorchRunner

    if type(runner) is TorchRunner and not runner.compile:
        return TorchRunner(runner.device, compile=True, **hooks)
    if type(runner) is JaxRunner and runner.jit:
        return JaxRunner(runner.platform, jit=False, **hooks)
    return None


def with_compile_columns(runners: Sequence[Runner], **hooks) -> list[Runner]:
    """``runners`` with each one's twin (``compiled_twin``) right after it; ``hooks`` go to the twins."""
    out: list[Runner] = []
    for r in runners:
        out.append(r)
        twin = compiled_twin(r, **hooks)
        if twin is not None and all(t.name != twin.name for t in runners):
            out.append(twin)
    return out
