"""Float32 reads of single tensors of a safetensors checkpoint directory (never pickle).

One file or shards listed by ``model.safetensors.index.json``; dtypes NumPy lacks (BF16, F8_E4M3)
are decoded from their raw bytes, so reading needs neither torch nor transformers. Block-quantised
FP8 weights (DeepSeek-V3's release: ``float8_e4m3fn`` plus ``weight_scale_inv`` per 128x128 block)
are dequantised by ``dequantize``.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from parity.hf.registry import HFImportError

INDEX_FILE = "model.safetensors.index.json"


def _fp8_e4m3fn_table() -> np.ndarray:
    """float32 value of each of the 256 float8_e4m3fn bit patterns (bias 7, no inf, 0x7f/0xff NaN)."""
    b = np.arange(256)
    sign = np.where(b & 0x80, -1.0, 1.0)
    exp = (b >> 3) & 0xF
    man = b & 0x7
    val = np.where(exp == 0, man / 8.0 * 2.0 ** -6, (1 + man / 8.0) * 2.0 ** (exp - 7.0))
    val = np.where((exp == 15) & (man == 7), np.nan, val)
    return (sign * val).astype(np.float32)


_NUMPY_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16}


class Checkpoint:
    """Key -> shard file of a checkpoint directory, and float32 reads of single tensors."""

    def __init__(self, path: Path):
        self.path = path
        self._headers: dict[str, dict] = {}
        index = path / INDEX_FILE
        if not index.is_file():
            found = sorted(path.glob("*.safetensors.index.json"))
            index = found[0] if found else None
        self.index = index
        if index is not None:
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise HFImportError(f"cannot read the weight_map of index {str(index)!r}: {exc}") from exc
            self.weight_map: dict[str, str] = dict(weight_map)
        else:
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise HFImportError(f"{str(path)!r} holds no *.safetensors file and no {INDEX_FILE}")
            self.weight_map = {}
            for file in files:
                for key in self._header(file):
                    self.weight_map[key] = file.name

    def _file(self, key: str) -> Path:
        name = self.weight_map[key]
        file = self.path / name
        if not file.is_file():
            where = f"listed in index {str(self.index)!r}" if self.index else "expected"
            raise HFImportError(
                f"shard {name!r} ({where}, holding {key!r}) is missing from {str(self.path)!r}"
            )
        return file

    def _header(self, file: Path) -> dict:
        if file.name in self._headers:
            return self._headers[file.name]
        try:
            with open(file, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HFImportError(f"cannot read {str(file)!r} as safetensors: {exc}") from exc
        header.pop("__metadata__", None)
        header = {k: dict(v, _data_start=8 + n) for k, v in header.items()}
        self._headers[file.name] = header
        return header

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._header(self._file(key))[key]["shape"])

    def read(self, key: str) -> np.ndarray:
        """Tensor ``key`` as float32 (BF16 / F8_E4M3 decoded from raw bytes); U8 as uint8 (packed
        codes that a family decodes: ``Family.unpack``)."""
        file = self._file(key)
        info = self._header(file)[key]
        dtype, shape = info["dtype"], tuple(info["shape"])
        if dtype in _NUMPY_DTYPES:
            from safetensors import safe_open

            with safe_open(os.fspath(file), framework="numpy") as f:
                return np.asarray(f.get_tensor(key), dtype=np.float32)
        start, end = info["data_offsets"]
        raw = np.fromfile(file, dtype=np.uint8, count=end - start, offset=info["_data_start"] + start)
        if dtype == "BF16":
            return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
        if dtype == "F8_E4M3":
            return _fp8_e4m3fn_table()[raw].reshape(shape)
        if dtype == "U8":  # packed codes (GPT-OSS's MXFP4 blocks and scales), decoded by the family
            return raw.reshape(shape)
        raise HFImportError(f"tensor {key!r} in {str(file)!r} has dtype {dtype}, which cannot be imported "
                            f"(supported: F64, F32, F16, BF16, F8_E4M3)")


def dequantize(w: np.ndarray, scale_inv: np.ndarray, key: str) -> np.ndarray:
    """Block FP8 dequantisation (DeepSeek-V3): each [b0, b1] block of the last two dims times its scale."""
    r, c = w.shape[-2:]
    sr, sc = scale_inv.shape[-2:]
    b0, b1 = -(-r // sr), -(-c // sc)
    if scale_inv.shape[:-2] != w.shape[:-2] or -(-r // b0) != sr or -(-c // b1) != sc:
        raise HFImportError(f"{key!r}: scale_inv shape {list(scale_inv.shape)} does not tile weight shape "
                            f"{list(w.shape)}")
    full = np.repeat(np.repeat(scale_inv, b0, axis=-2), b1, axis=-1)[..., :r, :c]
    return (w * full).astype(np.float32)

