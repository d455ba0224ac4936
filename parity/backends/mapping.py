"""Weight-name mappings: canonical weights (DESIGN.md "Canonical weights") <-> a module's own tensors.

A mapping is ``{module_name: spec}``; ``module_name`` is the module's parameter or buffer path
(torch ``named_parameters`` / ``named_buffers`` names; Flax: the variable's path joined with ".",
e.g. ``"experts.gate_proj.value"`` is written ``"experts.gate_proj"``). ``spec`` is one of

- ``"experts.w1"``: the canonical tensor as it is;
- ``"experts.w1.T"``: with its last two axes swapped (``[E, H, D]`` -> ``[E, D, H]``; a Flax
  ``Linear`` kernel ``[in, out]`` from a canonical ``[out, in]`` weight);
- ``Param("experts.w1", "experts.w3", transpose=(0, 2, 1), axis=2)``: each canonical tensor permuted
  by ``transpose`` (``numpy.transpose`` axes), then the tensors concatenated along ``axis`` (a fused
  gate/up projection);
- ``"experts.w1[3]"`` (or ``"experts.w1[3].T"``, ``Param(..., expert=3)``): expert 3's slice ``[H, D]``,
  for a module holding one Linear per expert; every expert of the tensor must be mapped once.

Gradients travel back the same way: the module's gradient is split along ``axis`` into the pieces'
sizes and each piece permuted back. Every function here is NumPy only; ``MappingError`` (a
``ValueError``) names each offending key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

BUFFERS = ("expert_bias", "tokens_per_expert")


class MappingError(ValueError):
    """A weight-name mapping that does not fit the canonical weights or the module."""


@dataclass(frozen=True, init=False)
class Param:
    """One module tensor made of canonical tensors: each permuted by ``transpose``, then joined on ``axis``."""

    sources: tuple[str, ...]
    transpose: tuple[int, ...] | None
    axis: int
    expert: int | None

    def __init__(self, *sources: str, transpose: tuple[int, ...] | None = None, axis: int = 0,
                 expert: int | None = None):
        if not sources or not all(isinstance(s, str) for s in sources):
            raise MappingError(f"Param needs one or more canonical names, got {sources!r}")
        if expert is not None and (isinstance(expert, bool) or not isinstance(expert, int) or expert < 0):
            raise MappingError(f"Param{tuple(sources)}: expert={expert!r} must be an integer >= 0")
        object.__setattr__(self, "sources", tuple(sources))
        object.__setattr__(self, "transpose", None if transpose is None else tuple(int(a) for a in transpose))
        object.__setattr__(self, "axis", int(axis))
        object.__setattr__(self, "expert", expert)

    def _take(self, name: str, weights: Mapping[str, np.ndarray]) -> np.ndarray:
        """The canonical tensor, or its slice ``[expert]`` (one expert of a per-expert module list)."""
        a = np.asarray(weights[name])
        if self.expert is None:
            return a
        if a.ndim == 0 or self.expert >= a.shape[0]:
            raise MappingError(f"'{name}[{self.expert}]': the canonical tensor has shape {list(a.shape)}")
        return a[self.expert]

    def _perm(self, ndim: int) -> tuple[int, ...] | None:
        if self.transpose is None:
            return None
        if sorted(self.transpose) != list(range(ndim)):
            raise MappingError(f"Param{self.sources}: transpose={self.transpose} is not a permutation of the "
                               f"{ndim} axes of the canonical tensor")
        return self.transpose

    def build(self, weights: Mapping[str, np.ndarray]) -> np.ndarray:
        """The module tensor from canonical ``weights``."""
        parts = []
        for name in self.sources:
            a = self._take(name, weights)
            perm = self._perm(a.ndim)
            parts.append(a if perm is None else np.transpose(a, perm))
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=self.axis)

    def split(self, grad: np.ndarray, weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The module tensor's gradient as gradients of the canonical tensors (shapes of ``weights``)."""
        grad = np.asarray(grad)
        out = {}
        if len(self.sources) == 1:
            pieces = [grad]
        else:
            sizes = []
            for name in self.sources:
                a = self._take(name, weights)
                perm = self._perm(a.ndim)
                sizes.append((a.shape if perm is None else tuple(a.shape[p] for p in perm))[self.axis])
            pieces = np.split(grad, np.cumsum(sizes)[:-1], axis=self.axis)
        for name, piece in zip(self.sources, pieces, strict=True):
            perm = self._perm(piece.ndim)
            out[name] = piece if perm is None else np.transpose(piece, np.argsort(perm))
        return out


_INDEXED = re.compile(r"^(?P<name>.+?)\[(?P<expert>\d+)\](?P<t>\.T)?$")


def parse(spec) -> Param:
    """A ``Param`` from a mapping value (see the module docstring)."""
    if isinstance(spec, Param):
        return spec
    if isinstance(spec, str):
        m = _INDEXED.match(spec)
        if m:  # "experts.w1[3]" / "experts.w1[3].T": one expert's slice
            cls = _SwapLast if m.group("t") else Param
            return cls(m.group("name"), expert=int(m.group("expert")))
        if spec.endswith(".T"):
            return _SwapLast(spec[:-2])
        return Param(spec)
    raise MappingError(f"mapping value {spec!r} is not a canonical name, 'name.T' or a Param")


class _SwapLast(Param):
    """``"name.T"``: the last two axes swapped, whatever the rank."""

    def _perm(self, ndim: int) -> tuple[int, ...]:
        if ndim < 2:
            raise MappingError(f"'{self.sources[0]}.T' swaps the last two axes; the tensor has {ndim}")
        return (*range(ndim - 2), ndim - 1, ndim - 2)


class WeightMap:
    """A parsed mapping: ``{module_name: Param}`` plus the checks and conversions the adapters use."""

    def __init__(self, mapping: Mapping[str, object]):
        if not isinstance(mapping, Mapping) or not mapping:
            raise MappingError(f"a weight mapping must be a non-empty dict module_name -> spec, got {mapping!r}")
        self.params = {str(k): parse(v) for k, v in mapping.items()}
        seen: dict[str, str] = {}
        self.slices: dict[str, dict[int, str]] = {}  # canonical -> expert -> module name (per-expert lists)
        for target, p in self.params.items():
            for src in p.sources:
                if p.expert is not None:
                    if src in seen and seen[src] not in self.slices.get(src, {}).values():
                        raise MappingError(f"canonical {src!r} is mapped whole ({seen[src]!r}) and by expert")
                    if p.expert in self.slices.setdefault(src, {}):
                        raise MappingError(f"'{src}[{p.expert}]' is mapped twice "
                                           f"({self.slices[src][p.expert]!r} and {target!r})")
                    self.slices[src][p.expert] = target
                    seen.setdefault(src, target)
                    continue
                if src in seen:
                    raise MappingError(f"canonical {src!r} is mapped twice ({seen[src]!r} and {target!r})")
                seen[src] = target
        self.by_source = seen

    def buffer_target(self, canonical: str) -> str | None:
        """The module name holding canonical buffer ``canonical`` ("expert_bias" ...), or None."""
        return self.by_source.get(canonical)

    def module_arrays(self, weights: Mapping[str, np.ndarray], *, buffers: bool = True) -> dict[str, np.ndarray]:
        """``{module_name: array}`` from canonical ``weights``. Raises ``MappingError`` for a canonical
        parameter of ``weights`` that no module tensor takes (its maths would be missing from the
        column; buffers aside), or a mapped name missing from ``weights``."""
        unmapped = [k for k in weights if k not in self.by_source and k not in BUFFERS]
        if unmapped:
            raise MappingError(f"no module tensor is mapped to canonical {', '.join(map(repr, unmapped))} "
                               f"(mapped: {', '.join(sorted(self.by_source))})")
        for src, by_expert in self.slices.items():
            if src in weights and sorted(by_expert) != list(range(np.shape(weights[src])[0])):
                missing = sorted(set(range(np.shape(weights[src])[0])) - set(by_expert))
                raise MappingError(f"canonical {src!r} has {np.shape(weights[src])[0]} experts; the mapping takes "
                                   f"{sorted(by_expert)} (missing {missing})")
        out = {}
        for target, p in self.params.items():
            if not buffers and all(s in BUFFERS for s in p.sources):
                continue
            missing = [s for s in p.sources if s not in weights]
            if missing:
                if all(s in BUFFERS for s in p.sources):
                    continue
                raise MappingError(f"module {target!r} is mapped to {', '.join(map(repr, missing))}, which the "
                                   f"canonical weights lack (keys: {', '.join(sorted(weights))})")
            out[target] = p.build(weights)
        return out

    def canonical_grads(self, grads: Mapping[str, np.ndarray], weights: Mapping[str, np.ndarray]) -> dict:
        """Module gradients ``{module_name: array}`` -> ``{canonical_name: array}`` (parameters only)."""
        out: dict[str, np.ndarray] = {}
        for target, p in self.params.items():
            if all(s in BUFFERS for s in p.sources) or target not in grads:
                continue
            for name, g in p.split(grads[target], weights).items():
                if p.expert is None:
                    out[name] = g
                else:  # one expert's slice of the canonical gradient
                    out.setdefault(name, np.zeros(np.shape(weights[name]), np.result_type(g, np.float64)))
                    out[name][p.expert] = g
        return out


def check_shapes(arrays: Mapping[str, np.ndarray], module_shapes: Mapping[str, tuple[int, ...]],
                 parameters: tuple[str, ...], ignore: tuple[str, ...] = ()) -> None:
    """``MappingError`` listing every module name that is not in the module (``module_shapes``: its
    parameters and buffers), every module parameter (``parameters``) no canonical tensor fills
    (unless in ``ignore``), and every shape mismatch, all at once."""
    problems = []
    for name, a in arrays.items():
        if name not in module_shapes:
            problems.append(f"the module has no tensor {name!r}")
        elif tuple(np.shape(a)) != tuple(module_shapes[name]):
            problems.append(f"{name!r} has shape {list(module_shapes[name])} in the module, the mapping gives "
                            f"{list(np.shape(a))}")
    problems += [f"module parameter {name!r} is not mapped (list it in ignore= to keep its own value)"
                 for name in parameters if name not in arrays and name not in ignore]
    if problems:
        raise MappingError("; ".join(problems))
