"""transformers' own MoE block as a parity column ("hf:cpu"): forward output only.

Uses ``parity.hf`` (issue 6): ``hf_block(path, layer, dtype_name) -> torch.nn.Module`` and
``hf_forward(block, x [B,S,D]) -> out [B,S,D]``. The block loads its weights from the checkpoint
itself; the harness feeds the other columns the same layer through ``parity.hf.read_hf_layer``.
Skipped (with the reason) when ``parity.hf`` or transformers is missing or no ``--hf`` path is given.
"""

from __future__ import annotations

import importlib
import importlib.util

import numpy as np

from parity.backends.base import Runner, Tensors


class HFRunner(Runner):
    capabilities = frozenset({"forward"})

    def __init__(self, path: str | None = None, layer: int = 0, device: str = "cpu", **hooks):
        super().__init__(**hooks)
        self.path, self.layer, self.device = path, layer, device
        self.name = f"hf:{device}"

    def unavailable(self) -> str | None:
        if self.path is None:
            return "needs a Hugging Face checkpoint (--hf PATH --layer N)"
        if self.device != "cpu":
            return f"only hf:cpu is supported (got hf:{self.device})"
        for mod in ("transformers", "parity.hf"):
            try:
                if importlib.util.find_spec(mod) is None:
                    return f"{mod} is not installed"
            except ModuleNotFoundError as exc:
                return f"{mod} is not installed ({exc})"
        return None

    def forward(self, cfg, weights, x, dtype, selected_experts=None) -> Tensors:
        hf = importlib.import_module("parity.hf")
        block = hf.hf_block(self.path, self.layer, dtype)
        out = np.asarray(hf.hf_forward(block, np.asarray(x, np.float64).astype(
            np.float64 if dtype == "float64" else np.float32)), np.float64)
        t = Tensors()
        t.put("out", out, dtype)
        return t
