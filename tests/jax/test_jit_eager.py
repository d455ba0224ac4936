"""moe_jax.MoE under nnx.jit vs op by op (issue 18; the "jax:cpu+eager" column of ``run --compile``).

Measured (default preset, B=2, S=8): the forward is bit-identical in float32 and bfloat16 (every aux
tensor too); the gradients of the experts are bit-identical, those of x and the router gate differ
by <= 2 float32 ULP (2.4e-7 / 4.8e-7; bf16 identical; float64 4.4e-16): jit compiles the whole
backward as one XLA program whose fused elementwise + reduction loops round differently from the
same ops compiled one at a time (softmax's VJP alone differs by 4.1e-8 in float32).
"""

import numpy as np
import pytest

pytest.importorskip("jax")
pytest.importorskip("moe_jax")

from parity.backends.base import objective_cotangent  # noqa: E402
from parity.backends.jax_backend import JaxRunner  # noqa: E402
from parity.harness import make_input, round_to  # noqa: E402
from parity.presets import get_preset  # noqa: E402
from parity.weights import init_weights  # noqa: E402

GRAD_TOL = dict(rtol=2e-6, atol=2e-6)  # float32, jit vs eager (see the module docstring)


@pytest.mark.slow
def test_jit_and_eager_forward_bits_and_gradients():
    cfg = get_preset("default").config
    w = init_weights(cfg, 0)
    x = round_to(make_input(cfg, 2, 8, 0), "float32")
    cot = round_to(objective_cotangent(x.shape, 0), "float32")
    jit, eager = JaxRunner(), JaxRunner(jit=False)
    assert (jit.name, eager.name) == ("jax:cpu", "jax:cpu+eager")
    fj, fe = jit.forward(cfg, w, x, "float32"), eager.forward(cfg, w, x, "float32")
    assert fj.keys() == fe.keys()
    for key in fj:
        assert np.isfinite(fj[key]).all(), key
        np.testing.assert_array_equal(fj[key], fe[key], err_msg=key)
    gj, ge = jit.grad(cfg, w, x, "float32", cot), eager.grad(cfg, w, x, "float32", cot)
    assert gj.keys() == ge.keys()
    for key in gj:
        assert np.isfinite(gj[key]).all(), key
        np.testing.assert_allclose(gj[key], ge[key], **GRAD_TOL, err_msg=key)
        if key.startswith("experts."):
            np.testing.assert_array_equal(gj[key], ge[key], err_msg=key)
