"""Canonical weights: the flat name -> array mapping both backends load (DESIGN.md, "Canonical weights").

Stored as safetensors, PyTorch layout (``[out, in]``). Never pickle.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from parity.config import MoEConfig

#: dtypes a canonical weights file may store; anything else (integers, bool, float8 ...) is refused
FLOAT_DTYPES = ("float64", "float32", "bfloat16", "float16")


class WeightsError(ValueError):
    """Weights that do not match a config, a file that cannot be read as safetensors, a tensor of a
    dtype outside ``FLOAT_DTYPES``, or NaN/Inf values that were not allowed."""


def dtype_name(value) -> str:
    """The NumPy dtype name of an array-like ("float32", "bfloat16" via ml_dtypes, "int32" ...)."""
    return str(np.asarray(value).dtype)


def check_float_dtypes(mapping: Mapping[str, object], what: str = "weights") -> None:
    """Raise ``WeightsError`` naming every tensor whose dtype is not in ``FLOAT_DTYPES``.

    Integer and bool tensors are never read as floats: a weights file of int32 values is a mistake,
    not a layer.
    """
    bad = [f"{k!r} is {dtype_name(v)}" for k, v in mapping.items() if dtype_name(v) not in FLOAT_DTYPES]
    if bad:
        raise WeightsError(f"{what} must be floating point ({', '.join(FLOAT_DTYPES)}): {'; '.join(bad)}")


def nonfinite_counts(mapping: Mapping[str, object]) -> dict[str, dict[str, int]]:
    """name -> {"NaN": n, "+Inf": n, "-Inf": n} (non-zero counts only) of every tensor holding NaN/Inf."""
    out = {}
    for k, v in mapping.items():
        a = np.asarray(v).astype(np.float64)  # bfloat16 (ml_dtypes) and float16 included
        counts = {"NaN": int(np.isnan(a).sum()), "+Inf": int(np.isposinf(a).sum()), "-Inf": int(np.isneginf(a).sum())}
        counts = {kind: n for kind, n in counts.items() if n}
        if counts:
            out[k] = counts
    return out


def check_finite(mapping: Mapping[str, object], what: str = "weights") -> None:
    """Raise ``WeightsError`` (one line) naming every tensor holding NaN/Inf and how many of each.

    The harness compares NaN/Inf only when asked (``allow_nonfinite`` / ``--allow-nonfinite``): a NaN
    weight otherwise makes both sides NaN, which is no evidence that they agree.
    """
    bad = nonfinite_counts(mapping)
    if bad:
        listed = "; ".join(f"{k!r}: " + ", ".join(f"{n} {kind}" for kind, n in c.items()) for k, c in bad.items())
        raise WeightsError(f"{what} hold non-finite values ({listed}); pass --allow-nonfinite "
                           f"(allow_nonfinite=True) to compare NaN/Inf positions as masks")


#: canonical vectors that scale (Gemma 4's router and expert-input norms), initialised around 1
SCALE_VECTORS = ("router.scale", "router.per_expert_scale", "expert_input_norm.weight")
#: canonical additive biases (GPT-OSS's router and expert projections)
BIASES = ("router.gate.bias", "experts.b1", "experts.b2", "experts.b3")


def canonical_shapes(cfg: MoEConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every canonical tensor for ``cfg``."""
    e, d, h = cfg.num_experts, cfg.dim, cfg.hidden_dim
    shapes = {
        "router.gate.weight": (e, d),
        "experts.w1": (e, h, d),
        "experts.w2": (e, d, h),
        "experts.w3": (e, h, d),
        "expert_bias": (e,),
        "tokens_per_expert": (e,),
    }
    if cfg.num_shared_experts:
        hs = cfg.shared_dim
        shapes.update({
            "shared_expert.w1.weight": (hs, d),
            "shared_expert.w2.weight": (d, hs),
            "shared_expert.w3.weight": (hs, d),
        })
    if cfg.shared_expert_gate:
        shapes["shared_expert_gate.weight"] = (1, d)
    if cfg.router_bias:  # GPT-OSS's router Linear bias (step 1)
        shapes["router.gate.bias"] = (e,)
    if cfg.expert_proj_bias:  # GPT-OSS's expert projection biases (step 7)
        shapes.update({"experts.b1": (e, h), "experts.b2": (e, d), "experts.b3": (e, h)})
    if cfg.router_input_norm:  # Gemma 4's router input scale
        shapes["router.scale"] = (d,)
    if cfg.per_expert_scale:  # Gemma 4's per-expert routing-weight scale
        shapes["router.per_expert_scale"] = (e,)
    if cfg.expert_input_norm:  # Gemma 4's pre_feedforward_layernorm_2 weight
        shapes["expert_input_norm.weight"] = (d,)
    return shapes


def check_weights(mapping: Mapping[str, object], cfg: MoEConfig, *, optional: tuple[str, ...] = ()) -> None:
    """Raise ``WeightsError`` listing every missing, extra or mis-shaped key (expected vs given shape).

    ``optional`` names keys that may be absent (e.g. the buffers ``expert_bias`` / ``tokens_per_expert``).
    """
    expected = canonical_shapes(cfg)
    problems = []
    for name, shape in expected.items():
        if name not in mapping:
            if name not in optional:
                problems.append(f"missing {name!r} (expected shape {list(shape)})")
            continue
        given = tuple(np.shape(mapping[name]))
        if given != shape:
            problems.append(f"{name!r} has shape {list(given)}, expected {list(shape)}")
    for name in mapping:
        if name not in expected:
            problems.append(f"unexpected {name!r} (shape {list(np.shape(mapping[name]))})")
    if problems:
        raise WeightsError("weights do not match the config:\n  " + "\n  ".join(problems))


def init_weights(cfg: MoEConfig, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    """Deterministic random canonical weights (NumPy PCG64 from ``seed``), scaled like a trained layer.

    Linear weights ~ N(0, 1/fan_in); ``expert_bias`` small random values when ``use_expert_bias``
    (so that it matters in tests) else zeros; ``tokens_per_expert`` zeros.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in canonical_shapes(cfg).items():
        if name == "tokens_per_expert":
            out[name] = np.zeros(shape, dtype=np.float32)
        elif name == "expert_bias":
            bias = rng.normal(0.0, 0.02, shape) if cfg.use_expert_bias else np.zeros(shape)
            out[name] = bias.astype(np.float32)
        elif name in BIASES:  # additive biases: N(0, 0.1^2), large enough to move routing and outputs
            out[name] = (0.1 * rng.standard_normal(shape)).astype(dtype)
        elif name in SCALE_VECTORS:  # multiplicative scales (Gemma 4 initialises them to 1): 1 + N(0, 0.25^2)
            out[name] = (1.0 + 0.25 * rng.standard_normal(shape)).astype(dtype)
        else:
            out[name] = (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(dtype)
    return out


def save_weights(path: str | os.PathLike, mapping: Mapping[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write a canonical mapping as safetensors (contiguous NumPy arrays).

    The file gets the mode any new file gets here (0666 less the umask): safetensors writes through a
    private temporary file (mode 0600), which would make a shared weights file unreadable to others.
    """
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in mapping.items()}, os.fspath(path), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def load_weights(path: str | os.PathLike, cfg: MoEConfig | None = None, *,
                 allow_nonfinite: bool = False) -> dict[str, np.ndarray]:
    """Read a safetensors file into NumPy arrays (bfloat16 via ``ml_dtypes`` when present), as stored.

    Raises ``WeightsError`` for a missing path, a directory, a corrupt file, a tensor whose dtype is
    not in ``FLOAT_DTYPES``, NaN/Inf values (each tensor and count named; unless ``allow_nonfinite``)
    or (with ``cfg``) weights that do not match the config.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    if os.path.isdir(path):
        raise WeightsError(f"weights file {path!r} is a directory; expected a .safetensors file")
    if not os.path.isfile(path):
        raise WeightsError(f"weights file {path!r} does not exist")
    try:
        with safe_open(path, framework="numpy") as f:
            mapping = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for every kind of corruption
        raise WeightsError(f"cannot read weights file {path!r} as safetensors: {exc}") from exc
    check_float_dtypes(mapping, f"tensors of {path!r}")
    if not allow_nonfinite:
        check_finite(mapping, f"tensors of {path!r}")
    if cfg is not None:
        check_weights(mapping, cfg, optional=("expert_bias", "tokens_per_expert"))
    return mapping
