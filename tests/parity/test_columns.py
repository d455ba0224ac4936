"""User columns (issue 16): the torch / Flax NNX / Linen adapters on modules written here, the weight
mapping, SKIP rows for missing capabilities, peers, and the CLI with a ``module:factory`` column."""

from __future__ import annotations

import json

import numpy as np
import pytest

from parity import cli
from parity.backends.mapping import MappingError, Param, WeightMap
from parity.backends.plugins import ColumnError, resolve_backend
from parity.config import MoEConfig
from parity.harness import Settings, run_parity
from parity.report import FAIL, PASS, SKIP
from parity.weights import init_weights

torch = pytest.importorskip("torch")

#: softmax top-2 of 4, renormalised, scaled, bias in selection, weights on the expert outputs
#: (H = 16: torchtitan's grouped GEMM needs 16-byte strides in bfloat16 on CPU)
CFG = MoEConfig(dim=8, hidden_dim=16, num_experts=4, top_k=2, score_func="softmax", route_norm=True,
                route_scale=1.5, use_expert_bias=True, score_before_experts=False, expert_kernel="loop")


def _weights(cfg=CFG):
    w = init_weights(cfg, 0)
    w["expert_bias"] = np.array([0.01, -0.02, 0.0, 0.015], np.float32)[:cfg.num_experts]
    return w


# ---- a torch port written here: fused gate/up [E, D, 2H], down [E, H, D], own buffer names -----
class TorchPort(torch.nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        e, d, h = cfg.num_experts, cfg.dim, cfg.hidden_dim
        self.k, self.scale = cfg.top_k, cfg.route_scale
        self.gate = torch.nn.Linear(d, e, bias=False)
        self.gate_up = torch.nn.Parameter(torch.zeros(e, d, 2 * h))
        self.down = torch.nn.Parameter(torch.zeros(e, h, d))
        self.register_buffer("bias", torch.zeros(e))
        self.register_buffer("counts", torch.zeros(e))

    def forward(self, x):
        acc = torch.promote_types(x.dtype, torch.float32)
        t = x.reshape(-1, x.shape[-1])
        logits = t.to(acc) @ self.gate.weight.to(acc).T
        scores = logits.softmax(-1)
        idx = torch.sort(scores + self.bias, dim=-1, descending=True, stable=True).indices[:, :self.k]
        w = scores.gather(-1, idx)
        w = w / (w.sum(-1, keepdim=True) + 1e-20) * self.scale
        counts = torch.bincount(idx.reshape(-1), minlength=scores.shape[-1]).float()
        if self.training:
            self.counts += counts
        out = torch.zeros(t.shape, dtype=acc)
        h = self.down.shape[1]
        for e in range(scores.shape[-1]):
            rows, slot = (idx == e).nonzero(as_tuple=True)
            gu = t[rows] @ self.gate_up[e]
            y = (torch.nn.functional.silu(gu[:, :h]) * gu[:, h:]) @ self.down[e]
            out.index_add_(0, rows, y.to(acc) * w[rows, slot, None].to(acc))
        return out.to(x.dtype).reshape(x.shape), {"selected_experts": idx, "scores": scores, "routing_weights": w,
                                                  "router_logits": logits, "tokens_per_expert": counts}


TORCH_MAP = {"gate.weight": "router.gate.weight",
             "gate_up": Param("experts.w1", "experts.w3", transpose=(0, 2, 1), axis=2),
             "down": "experts.w2.T", "bias": "expert_bias", "counts": "tokens_per_expert"}


def make_torch_column():
    """A factory as ``--backends tests.parity.test_columns:make_torch_column`` names it."""
    from parity.backends.torch_module import TorchModuleColumn

    return TorchModuleColumn(TorchPort, TORCH_MAP, name="torch-port")


def _run(columns, dtype="float32", steps=2, grads=True, cfg=CFG, weights=None):
    s = Settings(cfg=cfg, dtype=dtype, batch=2, seq_len=4, steps=steps, grads=grads)
    return run_parity(s, _weights(cfg) if weights is None else weights, columns)


def _rows(report, backend, status=None):
    return [c for c in report.checks if c.backend.startswith(backend) and (status is None or c.status == status)]


# ---- mapping ---------------------------------------------------------------------------------------
def test_mapping_round_trips_fused_and_transposed_tensors():
    w = _weights()
    m = WeightMap(TORCH_MAP)
    arrays = m.module_arrays(w)
    assert arrays["gate_up"].shape == (4, 8, 32) and arrays["down"].shape == (4, 16, 8)
    np.testing.assert_array_equal(arrays["gate_up"][..., :16], np.transpose(w["experts.w1"], (0, 2, 1)))
    np.testing.assert_array_equal(arrays["gate_up"][..., 16:], np.transpose(w["experts.w3"], (0, 2, 1)))
    back = m.canonical_grads(arrays, w)
    for name in ("experts.w1", "experts.w3", "experts.w2", "router.gate.weight"):
        np.testing.assert_array_equal(back[name], w[name])
    assert set(back) == {"experts.w1", "experts.w3", "experts.w2", "router.gate.weight"}


def test_mapping_per_expert_slices_of_a_module_list():
    w = _weights()
    per_expert = {f"experts.{e}.{n}.weight": f"experts.{c}[{e}]" for e in range(4)
                  for n, c in (("gate", "w1"), ("up", "w3"), ("down", "w2"))}
    m = WeightMap({**per_expert, "gate.weight": "router.gate.weight"})
    arrays = m.module_arrays(w)
    np.testing.assert_array_equal(arrays["experts.2.up.weight"], w["experts.w3"][2])
    back = m.canonical_grads(arrays, w)
    for name in ("experts.w1", "experts.w2", "experts.w3"):
        np.testing.assert_array_equal(back[name], w[name])
    del per_expert["experts.3.down.weight"]
    with pytest.raises(MappingError, match=r"'experts.w2' has 4 experts; the mapping takes \[0, 1, 2\] \(missing \[3\]\)"):
        WeightMap({**per_expert, "gate.weight": "router.gate.weight"}).module_arrays(w)


def test_mapping_errors_name_the_keys():
    with pytest.raises(MappingError, match="'experts.w1' is mapped twice"):
        WeightMap({"a": "experts.w1", "b": "experts.w1.T"})
    with pytest.raises(MappingError, match="no module tensor is mapped to canonical 'experts.w2'"):
        WeightMap({k: v for k, v in TORCH_MAP.items() if k != "down"}).module_arrays(_weights())


# ---- torch adapter -------------------------------------------------------------------------------
def test_torch_module_column_passes_every_check():
    from parity.backends import make_runner

    report = _run([make_torch_column(), make_runner("torch:cpu")])
    assert report.count(FAIL) == 0, [c.id for c in report.checks if c.status == FAIL]
    mine = _rows(report, "torch-port")
    kinds = {c.kind for c in mine if c.status == PASS}
    assert kinds == {"forward", "routing", "grad", "bias"}
    # gradients of x and every canonical parameter, against its own float64 run and torch:cpu
    grads = {c.tensor for c in mine if c.kind == "grad" and c.against == "torch-port@float64"}
    assert grads == {"x", "router.gate.weight", "experts.w1", "experts.w2", "experts.w3"}
    assert not _rows(report, "torch-port", SKIP)


def test_planted_bug_in_a_torch_column_fails():
    from parity.backends.torch_module import TorchModuleColumn

    swapped = {**TORCH_MAP, "gate_up": Param("experts.w3", "experts.w1", transpose=(0, 2, 1), axis=2)}
    report = _run([TorchModuleColumn(TorchPort, swapped, name="swapped")], steps=0, grads=False)
    assert any(c.id == "forward/out/swapped~reference" and c.status == FAIL for c in report.checks)


def test_missing_capabilities_are_skip_rows_never_pass():
    from parity.backends.torch_module import TorchModuleColumn

    class OutOnly(TorchPort):
        def forward(self, x):
            return super().forward(x)[0]

    mapping = {k: v for k, v in TORCH_MAP.items() if k not in ("bias", "counts")}
    col = TorchModuleColumn(OutOnly, mapping, name="out-only", has_aux=False, grads=False)
    report = _run([col], cfg=CFG.replace(use_expert_bias=False), weights=init_weights(CFG, 0))
    skips = {c.id: c.note for c in report.checks if c.status == SKIP}
    assert set(skips) == {"capability/aux/out-only", "capability/grad/out-only", "capability/bias/out-only"}
    assert "no aux tensors" in skips["capability/aux/out-only"]
    assert "expert_bias and tokens_per_expert" in skips["capability/bias/out-only"]
    passed = {c.id for c in report.checks if c.status == PASS}
    assert passed == {"forward/out/out-only~reference"}


def test_a_mapping_that_leaves_a_parameter_out_is_an_error_row():
    from parity.backends.torch_module import TorchModuleColumn

    mapping = {k: v for k, v in TORCH_MAP.items() if k != "gate.weight"}
    mapping["down"] = "experts.w2.T"
    col = TorchModuleColumn(TorchPort, {**mapping, "gate.weight": "router.gate.weight.T"}, name="bad-map")
    report = _run([col], steps=0, grads=False)
    err = [c for c in report.checks if c.kind == "error"]
    assert err and err[0].status == FAIL and "'gate.weight' has shape [4, 8]" in err[0].note


# ---- Flax NNX / Linen adapters ---------------------------------------------------------------------
def _jax_maths(jnp, x, kernel, w1, w3, w2, bias, k, scale):
    """The layer of CFG in jnp; kernel [D, E], w1/w3 [E, D, H], w2 [E, H, D]. -> (out, aux)."""
    import jax

    acc = jnp.promote_types(x.dtype, jnp.float32)
    t = x.reshape(-1, x.shape[-1])
    logits = t.astype(acc) @ kernel.astype(acc)
    scores = jax.nn.softmax(logits, -1)
    idx = jnp.argsort(-(scores + bias), axis=-1, stable=True)[:, :k]
    w = jnp.take_along_axis(scores, idx, -1)
    w = w / (w.sum(-1, keepdims=True) + 1e-20) * scale
    h = jax.nn.silu(jnp.einsum("nd,edh->neh", t, w1)) * jnp.einsum("nd,edh->neh", t, w3)
    y = jnp.einsum("neh,ehd->ned", h, w2).astype(acc)  # every expert, then the k chosen ones
    out = (jnp.take_along_axis(y, idx[..., None], 1) * w[..., None].astype(acc)).sum(1)
    counts = jnp.zeros(scores.shape[-1], jnp.float32).at[idx.reshape(-1)].add(1.0)
    aux = {"selected_experts": idx, "scores": scores, "routing_weights": w, "router_logits": logits,
           "tokens_per_expert": counts}
    return out.astype(x.dtype).reshape(x.shape), aux


FLAX_MAP = {"router.kernel": "router.gate.weight.T", "w1": "experts.w1.T", "w3": "experts.w3.T",
            "w2": "experts.w2.T", "bias": "expert_bias", "counts": "tokens_per_expert"}


@pytest.mark.slow  # three XLA compilations (forward, gradient, bias step): ~30 s on a loaded 2-core machine
def test_nnx_module_column_passes_every_check():
    pytest.importorskip("flax")
    import jax.numpy as jnp
    from flax import nnx

    from parity.backends.flax_module import NNXModuleColumn

    class Counts(nnx.Variable):
        pass

    class NNXPort(nnx.Module):
        def __init__(self, cfg: MoEConfig):
            e, d, h = cfg.num_experts, cfg.dim, cfg.hidden_dim
            self.k, self.scale, self.deterministic = cfg.top_k, cfg.route_scale, False
            self.router = nnx.Linear(d, e, use_bias=False, rngs=nnx.Rngs(0))
            self.w1, self.w3 = nnx.Param(jnp.zeros((e, d, h))), nnx.Param(jnp.zeros((e, d, h)))
            self.w2 = nnx.Param(jnp.zeros((e, h, d)))
            self.bias, self.counts = Counts(jnp.zeros(e)), Counts(jnp.zeros(e))

        def __call__(self, x):
            out, aux = _jax_maths(jnp, x, self.router.kernel[...], self.w1[...], self.w3[...], self.w2[...],
                                  self.bias[...], self.k, self.scale)
            if not self.deterministic:
                self.counts.set_value(self.counts[...] + aux["tokens_per_expert"])
            return out, aux

    report = _run([NNXModuleColumn(NNXPort, FLAX_MAP, name="nnx-port")])
    assert report.count(FAIL) == 0, [(c.id, c.note) for c in report.checks if c.status == FAIL]
    mine = _rows(report, "nnx-port")
    assert {c.kind for c in mine if c.status == PASS} == {"forward", "routing", "grad", "bias"}
    assert {c.tensor for c in mine if c.kind == "grad"} == {"x", "router.gate.weight", "experts.w1",
                                                            "experts.w2", "experts.w3"}


@pytest.mark.slow  # XLA compilations of the forward and the gradient: ~30 s on a loaded 2-core machine
def test_linen_module_column_forward_and_grads_bias_is_a_skip_row():
    pytest.importorskip("flax")
    import jax.numpy as jnp
    from flax import linen

    from parity.backends.flax_module import LinenModuleColumn

    class LinenPort(linen.Module):
        cfg: MoEConfig

        @linen.compact
        def __call__(self, x):
            c = self.cfg
            kernel = self.param("kernel", linen.initializers.zeros, (c.dim, c.num_experts))
            w1 = self.param("w1", linen.initializers.zeros, (c.num_experts, c.dim, c.hidden_dim))
            w3 = self.param("w3", linen.initializers.zeros, (c.num_experts, c.dim, c.hidden_dim))
            w2 = self.param("w2", linen.initializers.zeros, (c.num_experts, c.hidden_dim, c.dim))
            return _jax_maths(jnp, x, kernel, w1, w3, w2, 0.0, c.top_k, c.route_scale)

    mapping = {"kernel": "router.gate.weight.T", "w1": "experts.w1.T", "w3": "experts.w3.T", "w2": "experts.w2.T"}
    col = LinenModuleColumn(LinenPort(CFG.replace(use_expert_bias=False)), mapping, name="linen-port")
    report = _run([col], cfg=CFG.replace(use_expert_bias=False), weights=init_weights(CFG, 0))
    assert report.count(FAIL) == 0, [(c.id, c.note) for c in report.checks if c.status == FAIL]
    assert {c.kind for c in _rows(report, "linen-port", PASS)} == {"forward", "routing", "grad"}
    assert [c.id for c in report.checks if c.status == SKIP] == ["capability/bias/linen-port"]


# ---- peers ---------------------------------------------------------------------------------------
def test_torchtitan_peer_is_skipped_with_its_reason_or_runs():
    import importlib.util

    from parity.backends.peers import make_peer, torchtitan_unsupported

    assert "score_before_experts=True" in torchtitan_unsupported(MoEConfig())
    assert torchtitan_unsupported(CFG) is None
    col = make_peer("torchtitan:cpu")
    report = _run([col], steps=0, grads=False)
    if importlib.util.find_spec("torchtitan") is None:
        assert "torchtitan is not installed" in col.unavailable()
        assert [(c.id, c.status) for c in report.checks] == [("backend/torchtitan:cpu", SKIP)]
    else:  # installed: it runs; in float32 its bf16 experts fail the forward tolerance (docs/columns.md)
        assert "torchtitan:cpu" in report.backends_ran
        assert any(c.id == "routing/selected_experts/torchtitan:cpu~reference" for c in report.checks)


def test_peer_with_a_config_it_cannot_express_is_skipped():
    from parity.backends.peers import make_peer

    col = make_peer("torchtitan:cpu")
    col.unavailable = lambda: None  # as if installed: the config alone decides
    report = _run([col], cfg=CFG.replace(score_before_experts=True), steps=0, grads=False)
    rows = [(c.id, c.status) for c in report.checks]
    assert rows == [("backend/torchtitan:cpu", SKIP)]
    assert "score_before_experts=True" in report.backends[0]["reason"]


# ---- resolving specs and the CLI ----------------------------------------------------------------
def test_resolve_module_factory_and_its_errors():
    col = resolve_backend("tests.parity.test_columns:make_torch_column")
    assert col.name == "torch-port" and "grad" in col.capabilities
    for spec, msg in [("no_such_pkg.mod:f", "cannot import module 'no_such_pkg.mod'"),
                      ("tests.parity.test_columns:nope", "has no attribute 'nope'"),
                      ("tests.parity.test_columns:CFG", "is a MoEConfig, not a factory"),
                      ("parity.config:MoEConfig", "returned MoEConfig; expected a parity.backends.Runner"),
                      ("bogus", "unknown backend 'bogus'")]:
        with pytest.raises(ColumnError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            resolve_backend(spec)


def test_cli_runs_a_module_factory_column(capsys, tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(CFG.to_dict()))
    code = cli.main(["run", "--config", str(cfg), "--backends", "tests.parity.test_columns:make_torch_column,torch",
                     "--batch", "2", "--seq-len", "4", "--steps", "1", "--json", "--no-compile-cache"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0, [c for c in report["checks"] if c["status"] == "FAIL"]
    assert report["summary"]["backends_ran"] == ["torch:cpu", "torch-port"]
    assert any(c["id"] == "grad/experts.w1/torch:cpu~torch-port" and c["status"] == "PASS" for c in report["checks"])


@pytest.mark.parametrize("spec, msg", [
    ("no_such_pkg.mod:make", "cannot import module 'no_such_pkg.mod'"),
    ("tests.parity.test_columns:missing", "module 'tests.parity.test_columns' has no attribute 'missing'"),
    ("parity.config:MoEConfig", "returned MoEConfig; expected a parity.backends.Runner"),
])
def test_cli_bad_column_is_one_line_exit_2(capsys, spec, msg):
    assert cli.main(["run", "--backends", spec]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("moe-parity: error: ") and msg in err
