"""Backend columns of the parity report, by name ("framework:device").

``make_runner("torch:cpu")`` builds one; ``KNOWN_BACKENDS`` lists the names the CLI accepts and
``DEFAULT_BACKENDS`` those ``moe-parity run`` tries (absent ones are reported as skipped). A later
sharded runner ("torch-ep2:cpu", issue 5) is one more entry in ``_FACTORIES``. Importing this package
imports no framework.
"""

from __future__ import annotations

from parity.backends.base import Runner, Tensors

DEFAULT_BACKENDS = ("torch:cpu", "torch:cuda", "torch:npu", "jax:cpu", "jax:gpu")
KNOWN_BACKENDS = DEFAULT_BACKENDS + ("jax:tpu", "hf:cpu", "reference:cpu")
SHORTHANDS = {"torch": "torch:cpu", "jax": "jax:cpu", "hf": "hf:cpu", "reference": "reference:cpu"}


def normalize_backend(name: str) -> str:
    """Canonical backend name; ``ValueError`` listing the known ones when ``name`` is not one."""
    name = SHORTHANDS.get(name.strip().lower(), name.strip().lower())
    if name not in KNOWN_BACKENDS:
        raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(KNOWN_BACKENDS)}")
    return name


def make_runner(name: str, *, hf_path: str | None = None, hf_layer: int = 0, **hooks) -> Runner:
    """Build the runner for a backend name (see ``normalize_backend``); hooks go to ``Runner``."""
    name = normalize_backend(name)
    framework, device = name.split(":")
    if framework == "torch":
        from parity.backends.torch_backend import TorchRunner

        return TorchRunner(device, **hooks)
    if framework == "jax":
        from parity.backends.jax_backend import JaxRunner

        return JaxRunner(device, **hooks)
    if framework == "hf":
        from parity.backends.hf_backend import HFRunner

        return HFRunner(hf_path, hf_layer, device, **hooks)
    from parity.backends.reference_backend import ReferenceRunner

    return ReferenceRunner(name, **hooks)


__all__ = ["DEFAULT_BACKENDS", "KNOWN_BACKENDS", "Runner", "Tensors", "make_runner", "normalize_backend"]
