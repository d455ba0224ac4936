"""Columns from outside the project: ``module:factory`` specs, installed plugins, built-in peers.

A backend spec (``moe-parity run --backends``, ``parity.testing.assert_moe_parity``) is, in order:

1. a built-in name ("torch:cpu", "jax", ...: ``parity.backends.normalize_backend``);
2. a built-in peer ("torchtitan:cpu": ``parity.backends.peers``);
3. the name of an entry point in the group ``moe_parity.backends`` (a plugin; its object is a
   factory as in 4.);
4. ``package.module:attribute``: ``attribute`` is a factory taking no argument that returns a
   ``parity.backends.Runner`` (or a Runner itself). The current directory is importable, as for
   ``python -m``.

``resolve_backend`` raises ``ColumnError`` (a ``ValueError``) with one line for an unimportable module,
a missing attribute, a factory that fails or returns something else. ``list_backends`` says for
every built-in, peer and plugin whether it can run here and, if not, why.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from dataclasses import dataclass

from parity.backends.base import Runner

ENTRY_POINT_GROUP = "moe_parity.backends"


class ColumnError(ValueError):
    """A backend spec that names no usable column (one line)."""


def is_runner(obj) -> bool:
    """A ``Runner``, or an object with what the harness calls on one."""
    return isinstance(obj, Runner) or all(hasattr(obj, a) for a in ("name", "capabilities", "unavailable", "forward"))


def entry_points() -> list:
    """The installed entry points of the ``moe_parity.backends`` group (``importlib.metadata``)."""
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def _import(module: str, what: str):
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        raise ColumnError(f"{what}: cannot import module {module!r} ({exc})") from None
    except Exception as exc:
        raise ColumnError(f"{what}: importing {module!r} raised {type(exc).__name__}: {exc}".splitlines()[0]) from None


def load_factory(spec: str):
    """The object ``spec`` ("package.module:attribute", dotted attributes allowed) names."""
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise ColumnError(f"{spec!r} is not package.module:factory")
    obj = _import(module, f"--backends {spec}")
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ColumnError(f"--backends {spec}: module {module!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def make_column(obj, what: str) -> Runner:
    """A column from a factory (called with no argument) or a runner; ``ColumnError`` otherwise."""
    if is_runner(obj) and not isinstance(obj, type):
        return obj
    if not callable(obj):
        raise ColumnError(f"{what} is a {type(obj).__name__}, not a factory returning a parity.backends.Runner")
    try:
        made = obj()
    except Exception as exc:
        raise ColumnError(f"{what}() raised {type(exc).__name__}: {exc}".splitlines()[0]) from None
    if not is_runner(made):
        raise ColumnError(f"{what}() returned {type(made).__name__}; expected a parity.backends.Runner "
                          f"(name, capabilities, unavailable(), forward(); docs/columns.md)")
    return made


def resolve_backend(spec: str, *, hf_path: str | None = None, hf_layer: int = 0) -> Runner:
    """The column a backend spec names (see the module docstring)."""
    from parity.backends import KNOWN_BACKENDS, make_runner, normalize_backend
    from parity.backends.peers import PEERS, make_peer

    spec = spec.strip()
    try:
        return make_runner(normalize_backend(spec), hf_path=hf_path, hf_layer=hf_layer)
    except ValueError:
        pass
    if spec.lower() in PEERS:
        return make_peer(spec.lower())
    eps = {ep.name: ep for ep in entry_points()}
    if spec in eps:
        try:
            obj = eps[spec].load()
        except Exception as exc:
            raise ColumnError(f"plugin {spec!r} ({eps[spec].value}): import failed: "
                              f"{type(exc).__name__}: {exc}".splitlines()[0]) from None
        return make_column(obj, f"plugin {spec!r} ({eps[spec].value})")
    if ":" in spec and ("." in spec.partition(":")[0] or spec.partition(":")[0] not in ("torch", "jax", "hf")):
        return make_column(load_factory(spec), spec)
    known = ", ".join([*KNOWN_BACKENDS, *PEERS, *eps])
    raise ColumnError(f"unknown backend {spec!r}; known backends: {known}; or give package.module:factory")


def resolve_backends(specs: str, *, hf_path: str | None = None, hf_layer: int | None = 0) -> tuple[list[str], list]:
    """``--backends`` (a comma list) -> (built-in names, in order and without repeats; the other
    columns, built). ``ColumnError`` (one line) for the first spec that names no usable column."""
    from parity.backends import normalize_backend

    names, columns = [], []
    for spec in (s.strip() for s in specs.split(",")):
        if not spec:
            continue
        try:
            names.append(normalize_backend(spec))
            continue
        except ValueError:
            pass
        columns.append(resolve_backend(spec, hf_path=hf_path, hf_layer=hf_layer or 0))
    seen = [c.name for c in columns]
    dup = next((n for n in seen if seen.count(n) > 1 or n in names), None)
    if dup:
        raise ColumnError(f"--backends names the column {dup!r} twice")
    return list(dict.fromkeys(names)), columns


def cmd_backends(args) -> int:
    """``moe-parity backends``: every column and whether it can run here (why not); exit 0."""
    rows = list_backends()
    if getattr(args, "json", False):
        import json

        print(json.dumps([r.__dict__ for r in rows], indent=2))
        return 0
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="moe-parity backends (--backends NAME, or package.module:factory)", box=None,
                  header_style="bold", pad_edge=False, padding=(0, 1, 0, 0))
    for col in ("name", "kind", "status", "why not / source"):
        table.add_column(col, overflow="fold", no_wrap=col in ("name", "kind", "status"))
    for r in rows:
        status = "[green]available[/]" if r.available else "[yellow]unavailable[/]"
        table.add_row(escape(r.name), r.kind, status, escape(r.reason or r.source or "-"))
    table.caption = (f"plugins: entry points of the group {ENTRY_POINT_GROUP!r}; columns of your own: "
                     f"docs/columns.md")
    table.caption_justify = "left"
    Console(width=None if sys.stdout.isatty() else 120).print(table)
    return 0


@dataclass
class BackendInfo:
    """One line of ``moe-parity backends``."""

    name: str
    kind: str  # "built-in" | "peer" | "plugin"
    available: bool
    reason: str
    source: str = ""


def list_backends() -> list[BackendInfo]:
    """Every built-in backend, peer and installed plugin, and whether it can run here (why not)."""
    from parity.backends import KNOWN_BACKENDS, make_runner
    from parity.backends.peers import PEERS, make_peer

    rows = []
    for name in KNOWN_BACKENDS:
        r = make_runner(name)
        reason = r.unavailable() or ""
        rows.append(BackendInfo(name, "built-in", not reason, reason))
    for name in PEERS:
        reason = make_peer(name).unavailable() or ""
        rows.append(BackendInfo(name, "peer", not reason, reason, "parity.backends.peers"))
    for ep in entry_points():
        try:
            col = make_column(ep.load(), f"plugin {ep.name!r}")
            reason = col.unavailable() or ""
        except Exception as exc:  # a broken plugin is listed with its error, never hides the others
            reason = f"plugin import error: {type(exc).__name__}: {exc}".splitlines()[0]
        rows.append(BackendInfo(ep.name, "plugin", not reason, reason, ep.value))
    return rows
