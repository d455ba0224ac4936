"""``moe-parity``: run the parity harness from the command line.

Subcommands::

    moe-parity run [--preset NAME | --config FILE | --hf PATH --layer N] [--weights FILE]
                   [--dtype float32] [--backends torch:cpu,jax:cpu] [--batch 2] [--seq-len 8]
                   [--steps 3] [--lock-routing] [--out DIR] [--json] ...
    moe-parity presets
    moe-parity init-weights (--preset NAME | --config FILE) --out FILE [--seed 0]
    moe-parity import-hf PATH --layer N --out FILE
    moe-parity compare A B [--factor 10] [--all]   (A, B: report.json files or run --out directories)
    moe-parity train [--preset NAME | --config FILE | --hf PATH] [--steps 50] [--optimizer adamw|sgd] ...
                     (training parity; parity.train.command)

Exit status: 0 every check passed, 1 a check failed, 2 bad usage or nothing could run (one line on
stderr saying why; for weights that do not match the config, the list of offending keys follows).
Every argument is checked before any backend is built: numbers (tolerances >= 0 and finite, seeds
>= 0, sizes > 0), ``--out`` (a writable directory, or one that can be created), ``--weights`` (a
float safetensors file without NaN/Inf unless ``--allow-nonfinite``), ``--mesh`` against the config
(``num_experts % ep == 0``, ``hidden_dim % tp == 0``). Frameworks are imported only when a backend runs.

``run`` keeps JAX's compiled programs in a persistent cache (``parity.backends.jax_backend.default_cache_dir``:
``$MOE_PARITY_JAX_CACHE``, else ``$XDG_CACHE_HOME/moe-parity/jax``, else ``~/.cache/moe-parity/jax``;
``--no-compile-cache`` or ``MOE_PARITY_JAX_CACHE=off`` turns it off). Its table fits the terminal
(``parity.report.Report.rich_table``; compact below 110 columns or with ``--compact``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import re
import sys
import tempfile
import time

from parity.config import MoEConfig
from parity.metrics import DTYPES

PROG = "moe-parity"
INSTALL_HINT = ('install a framework: pip install "moe-parity[torch]" and/or pip install "moe-parity[jax]" '
                "(CPU-only PyTorch: pip install torch --index-url https://download.pytorch.org/whl/cpu)")
EXIT_CODES = ("exit status: 0 every check passed (WARN rows included); 1 a check failed; 2 bad usage, or none "
              "of the selected backends could run (a SKIP for every one)")
MESH_RE = re.compile(r"^(ep|tp|etp|dp)=\d+(x(ep|tp|etp|dp)=\d+)*$")


def _console(**kwargs):
    """A rich console: the terminal's width, or ``$COLUMNS``, or 120 columns when piped to a file."""
    from rich.console import Console

    width = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 120
    return Console(width=width, **kwargs)


class UsageError(Exception):
    """Bad usage: printed as ``moe-parity: error: <message>``, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # NOTE: argparse reads "-1e-9" or "-inf" after a flag as another flag ("expected one argument"),
        # which hides the bad value; every negative number is a value here (no flag looks like one).
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-inf(inity)?$", re.I)

    def error(self, message):  # one line, not argparse's usage block
        raise UsageError(message)


# --------------------------------------------------------------------------------------------------
# configuration sources
def read_config_file(path: str) -> MoEConfig:
    """MoEConfig from a TOML or JSON file of its fields (top level, or under a ``[config]``/``[moe]`` table)."""
    if not os.path.isfile(path):
        raise UsageError(f"config file {path!r} does not exist")
    with open(path, "rb") as f:
        raw = f.read()
    data = None
    errors = []
    loaders = ("json", "toml") if path.endswith(".json") else ("toml", "json")
    for kind in loaders:
        try:
            if kind == "json":
                data = json.loads(raw.decode("utf-8"))
            else:
                try:
                    import tomllib
                except ModuleNotFoundError:  # Python 3.10
                    import tomli as tomllib
                data = tomllib.loads(raw.decode("utf-8"))
            break
        except Exception as exc:
            errors.append(f"{kind}: {exc}")
    if data is None:
        raise UsageError(f"cannot parse config file {path!r} as TOML or JSON ({'; '.join(errors)})")
    if not isinstance(data, dict):
        raise UsageError(f"config file {path!r} must hold a table of MoEConfig fields")
    for key in ("config", "moe"):
        if set(data) == {key} and isinstance(data[key], dict):
            data = data[key]
    try:
        return MoEConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"config file {path!r}: {exc}") from None


def weights_file_config(path: str) -> MoEConfig | None:
    """The MoEConfig stored in a weights file's metadata by ``init-weights`` / ``import-hf`` (or None)."""
    try:
        from safetensors import safe_open

        with safe_open(path, framework="numpy") as f:
            meta = f.metadata() or {}
        return MoEConfig.from_dict(json.loads(meta["moe_config"])) if "moe_config" in meta else None
    except Exception:
        return None


def _preset(name: str):
    from parity.presets import get_preset

    try:
        return get_preset(name)
    except KeyError as exc:
        raise UsageError(exc.args[0]) from None


def _read_hf(path: str, layer: int):
    if importlib.util.find_spec("parity.hf") is None:
        raise UsageError("--hf needs parity.hf (the Hugging Face importer, `pip install moe-parity[hf]`)")
    try:
        hf = importlib.import_module("parity.hf")
    except ImportError as exc:
        raise UsageError(f"--hf: cannot import parity.hf: {exc}") from None
    try:
        return hf.read_hf_layer(path, layer)
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise UsageError(f"--hf {path} --layer {layer}: {exc}") from None


# --------------------------------------------------------------------------------------------------
# argument types (argparse turns an ArgumentTypeError into "argument --flag: <message>", one line)
def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def tolerance_arg(text: str) -> float:
    """A tolerance: a finite number >= 0 (a negative or NaN one would pass every check)."""
    v = _number(text)
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 0")
    return v


def finite_arg(text: str) -> float:
    v = _number(text)
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number")
    return v


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"{text!r} must be an integer >= {low}")
        return v
    parse.__name__ = f"integer >= {low}"
    return parse


non_negative_int, positive_int = _int_at_least(0), _int_at_least(1)


def check_out_dir(path: str, flag: str = "--out") -> None:
    """``UsageError`` unless ``path`` is a directory this process can write a file in, or one it can
    create. Checked before the run, so that no result is lost: the missing directories are created,
    a file is written and removed, and the directories made for the probe are removed again."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path!r} exists and is not a directory")
    missing, probe = [], os.path.abspath(path)
    while not os.path.exists(probe):
        missing.append(probe)
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UsageError(f"{flag} {path!r}: {probe!r} is not a directory, so {path!r} cannot be created")
    created = []
    try:
        for d in reversed(missing):
            os.mkdir(d)
            created.append(d)
        fd, name = tempfile.mkstemp(dir=path, prefix=".moe-parity-probe-")
        os.close(fd)
        os.remove(name)
    except OSError as exc:
        raise UsageError(f"{flag} {path!r}: cannot write there ({exc.strerror or exc})") from None
    finally:
        for d in reversed(created):
            os.rmdir(d)


def check_out_file(path: str, flag: str = "--out") -> None:
    """``UsageError`` unless ``path`` names a file (not a directory) in an existing writable directory."""
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path!r} is a directory; expected a file name such as weights.safetensors")
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise UsageError(f"{flag} {path!r}: directory {d!r} does not exist")
    try:
        fd, name = tempfile.mkstemp(dir=d, prefix=".moe-parity-probe-")
        os.close(fd)
        os.remove(name)
    except OSError as exc:
        raise UsageError(f"{flag} {path!r}: cannot write in {d!r} ({exc.strerror or exc})") from None


def parse_tolerances(args) -> dict:
    """``--atol/--rtol`` (every dtype) and ``--tol DTYPE=RTOL,ATOL`` -> parity.metrics overrides.

    Every value must be a finite number >= 0 (``UsageError`` naming the bad one)."""
    out: dict[str, dict[str, float]] = {}
    if args.rtol is not None:
        out.setdefault("*", {})["rtol"] = args.rtol
    if args.atol is not None:
        out.setdefault("*", {})["atol"] = args.atol
    for spec in args.tol or []:
        m = re.fullmatch(r"(\w+)=([^,]+),([^,]+)", spec)
        if not m or m.group(1) not in DTYPES:
            raise UsageError(f"--tol {spec!r}: expected DTYPE=RTOL,ATOL with DTYPE one of {', '.join(DTYPES)}")
        try:
            out[m.group(1)] = {"rtol": tolerance_arg(m.group(2)), "atol": tolerance_arg(m.group(3))}
        except argparse.ArgumentTypeError as exc:
            raise UsageError(f"--tol {spec!r}: RTOL and ATOL must be finite numbers >= 0 ({exc})") from None
    return out


def parse_mesh(spec: str) -> dict[str, int]:
    """"ep=2", "tp=2", "ep=2xtp=2" -> {"ep": 2, "tp": 2}."""
    if not MESH_RE.fullmatch(spec):
        raise UsageError(f"--mesh {spec!r}: expected AXIS=N[xAXIS=N...] with AXIS in ep, tp, etp, dp (e.g. ep=2xtp=2)")
    return {k: int(v) for k, v in (part.split("=") for part in spec.split("x"))}


def _compile_cache() -> str | None:
    """Turn on JAX's persistent compilation cache (``parity.backends.jax_backend.default_cache_dir``);
    the directory, or None when it is off or cannot be created (then the run compiles as usual)."""
    from parity.backends.jax_backend import default_cache_dir, enable_compile_cache

    directory = default_cache_dir()
    if directory is None:
        return None
    try:
        enable_compile_cache(directory)
    except OSError:
        return None
    return directory


class _RichProgress:
    """Adapter from the harness's progress protocol to a rich progress bar (on stderr)."""

    def __init__(self, progress):
        self.p, self.task = progress, None

    def start(self, total):
        self.task = self.p.add_task("parity", total=total)

    def advance(self, description):
        self.p.update(self.task, advance=1, description=description)


# --------------------------------------------------------------------------------------------------
def write_outputs(report, out: str, save_plots) -> None:
    """Write ``report.json``, ``report.md`` and ``save_plots(report, out)``'s PNGs into the folder ``out``
    (created if absent); shared by ``run`` and ``train``."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "report.json"), "w", encoding="utf-8") as f:
        f.write(report.to_json())
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
        f.write(report.to_markdown())
    save_plots(report, out)


def cmd_run(args) -> int:
    from parity.backends import DEFAULT_BACKENDS, make_runner
    from parity.weights import WeightsError, init_weights, load_weights

    # --- cheap checks first: nothing below may fail after a long run ---
    sources = [n for n, v in (("--preset", args.preset), ("--config", args.config), ("--hf", args.hf)) if v]
    if len(sources) > 1:
        raise UsageError(f"give at most one of --preset, --config, --hf (got {', '.join(sources)})")
    if args.layer is not None and not args.hf:
        raise UsageError(f"--layer {args.layer} needs --hf PATH (it picks a layer of a Hugging Face checkpoint)")
    if args.hf and args.layer is None:
        args.layer = 0
    if args.out:
        check_out_dir(args.out)
    tolerances = parse_tolerances(args)
    mesh = parse_mesh(args.mesh) if args.mesh else None
    if args.processes is not None and mesh is None:
        raise UsageError(f"--processes {args.processes} needs --mesh (it says how many processes host the mesh)")
    # --- what layer ---
    hf_weights = None
    preset_name = None
    if args.hf:
        cfg, hf_weights = _read_hf(args.hf, args.layer)
        preset_name = f"hf:{os.path.basename(os.path.normpath(args.hf))}#layer{args.layer}"
    elif args.config:
        cfg = read_config_file(args.config)
        preset_name = f"config:{os.path.basename(args.config)}"
    elif args.weights and not args.preset and weights_file_config(args.weights) is not None:
        cfg = weights_file_config(args.weights)
        preset_name = f"weights:{os.path.basename(args.weights)}"
    else:
        preset_name = args.preset or "default"
        cfg = _preset(preset_name).config
    if args.kernel:
        try:
            cfg = cfg.replace(expert_kernel=args.kernel)
        except ValueError as exc:
            raise UsageError(f"--kernel: {exc}") from None
    # --- which backends (built-in names, peers, plugins, package.module:factory: parity.backends.plugins) ---
    from parity.backends.plugins import resolve_backends

    try:
        names, extra_columns = resolve_backends(args.backends, hf_path=args.hf, hf_layer=args.layer) \
            if args.backends else (list(DEFAULT_BACKENDS) + (["hf:cpu"] if args.hf else []), [])
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not names and not extra_columns:
        raise UsageError("--backends is empty")
    names = list(dict.fromkeys(names))
    if mesh is not None:
        from parity.mesh_job import check_mesh

        try:
            check_mesh(mesh, args.batch, cfg=cfg)
        except ValueError as exc:
            raise UsageError(f"--mesh {args.mesh}: {exc}") from None
    runners = [make_runner(n, hf_path=args.hf, hf_layer=args.layer) for n in names] + extra_columns
    if args.compile:  # issue 18: "torch:<dev>+compile" and "jax:<plat>+eager" next to their columns
        runners = importlib.import_module("parity.backends.compiled").with_compile_columns(runners)
    if mesh is not None:
        try:
            runners += importlib.import_module("parity.mesh").make_runners(mesh, names, processes=args.processes)
        except ValueError as exc:
            raise UsageError(f"--mesh {args.mesh}: {exc}") from None
    # --- weights ---
    if hf_weights is not None:
        weights, source = hf_weights, f"{args.hf} layer {args.layer}"
    elif args.weights:
        try:
            weights = load_weights(args.weights, cfg, allow_nonfinite=args.allow_nonfinite)
        except WeightsError as exc:
            raise UsageError(str(exc)) from None
        source = os.path.abspath(args.weights)
    else:
        weights, source = init_weights(cfg, args.seed), f"parity.weights.init_weights(seed={args.seed})"

    from parity.harness import Settings, run_parity
    from parity.weights import WeightsError as _WE

    if not args.no_compile_cache and any(n.startswith("jax") for n in names):
        _compile_cache()

    try:
        settings = Settings(cfg=cfg, dtype=args.dtype, batch=args.batch, seq_len=args.seq_len, seed=args.seed,
                            steps=args.steps, bias_lr=args.bias_lr, lock_routing=args.lock_routing,
                            tolerances=tolerances, tie_tol=args.tie_tol, preset=preset_name,
                            weights_source=source, grads=not args.no_grads, allow_nonfinite=args.allow_nonfinite)
    except ValueError as exc:
        raise UsageError(str(exc)) from None

    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    out_console = _console()
    err_console = Console(stderr=True)
    t0 = time.perf_counter()
    try:
        if args.quiet or args.json:
            report = run_parity(settings, weights, runners)
        else:
            with Progress(TextColumn("[bold]{task.description:<32}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), console=err_console, transient=True) as progress:
                report = run_parity(settings, weights, runners, progress=_RichProgress(progress))
    except _WE as exc:
        raise UsageError(str(exc)) from None
    elapsed = time.perf_counter() - t0
    report.settings["wall_time_s"] = round(elapsed, 3)
    if args.out:
        from parity.plots import save_plots

        write_outputs(report, args.out, save_plots)
    if args.json:
        print(report.to_json())
    else:
        out_console.print(report.rich_table(max_rows=args.max_rows or None, out_path=args.out,
                                            width=out_console.width, compact=args.compact or None))
        for note in report.notes:
            out_console.print("[cyan]note[/] " + escape(note))
        for r in report.routing:
            if r.count:
                out_console.print("[yellow]routing[/] " + escape(f"{r.backend} vs {r.against}: {r.summary()}"))
        worst = report.worst(settings.dtype)
        if worst:
            out_console.print("worst errors in " + settings.dtype + ": " + escape(", ".join(
                f"{k} {c.max_abs:.2e} ({c.ulp_at_scale:.1f} ULP at scale, {c.tensor}, {c.backend} vs {c.against})"
                for k, c in worst.items())))
        if not report.backends_ran:
            reasons = "; ".join(f"{b['name']}: {b['reason']}" for b in report.backends)
            err_console.print(escape(f"{PROG}: error: none of the selected backends could run here ({reasons}); "
                                     f"{INSTALL_HINT} (exit status 2)"), soft_wrap=True)
            return 2
        status = "[green]PASS[/]" if report.passed else "[bold red]FAIL[/]"
        out_console.print(f"{status} in {elapsed:.1f} s" + (f"; report in {args.out}" if args.out else ""))
    return report.exit_code


def cmd_presets(args) -> int:
    from rich.table import Table

    from parity.presets import PRESETS

    if args.json:
        print(json.dumps({n: {"config": p.config.to_dict(), "source": p.source, "scaling": p.scaling,
                              "notes": p.notes} for n, p in PRESETS.items()}, indent=2))
        return 0
    console = _console()
    # one line per preset: short cells, no wrapping; sources and scaling notes are in --json
    table = Table(title="moe-parity presets (details: moe-parity presets --json)", box=None, pad_edge=False,
                  header_style="bold", padding=(0, 1, 0, 0))
    # NOTE: sizes (dim, hidden_dim: every preset is scaled down to dim 64) are left to --json, so the
    # longest model name still fits one line at 120 columns
    # name and experts are never cut (a name must copy-paste into --preset); on a narrow terminal the
    # other cells wrap at spaces instead
    widths = {"name": max(map(len, PRESETS)), "experts": max(len(f"{p.config.num_experts}+{p.config.num_shared_experts}sh")
                                                          for p in PRESETS.values())}
    for col in ("name", "routing", "experts", "balancing", "from"):
        table.add_column(col, no_wrap=col in widths, min_width=widths.get(col), overflow="fold")
    for p in PRESETS.values():
        c = p.config
        routing = f"{c.score_func} top-{c.top_k}"
        if c.num_expert_groups:
            routing += f", groups {c.num_limited_groups}/{c.num_expert_groups}"
        routing += (", norm" if c.route_norm else "") + (f" p{c.route_norm_p:g}" if c.route_norm_p else "")
        routing += (f", x{c.route_scale:g}" if c.route_scale != 1 else "") + (", rms" if c.router_input_norm else "")
        routing += ", x e-scale" if c.per_expert_scale else ""
        routing += ", " + ("before" if c.score_before_experts else "after")
        if c.capacity_factor is not None or c.expert_capacity is not None:  # (6a) capacity, keep policy
            cap = f"cf {c.capacity_factor:g}" if c.capacity_factor is not None else f"C {c.expert_capacity}"
            routing += f", {cap} {c.capacity_policy}"
        experts = f"{c.num_experts}" + (f"+{c.num_shared_experts}sh" if c.num_shared_experts else "")
        bal = ", ".join(filter(None, [
            "bias" if c.use_expert_bias else "",
            f"{c.load_balance_loss} {c.load_balance_coeff:g}" if c.load_balance_loss else "",
            f"z {c.router_z_loss_coeff:g}" if c.router_z_loss_coeff else ""])) or "-"
        source = "moe_torch defaults" if p.name == "default" else p.source.split(" (")[0].rsplit("/", 1)[-1]
        table.add_row(p.name, routing, experts, bal, source)
    table.caption = ("routing: score function, top-k, groups kept/total, route_norm (pN: by the N-norm), "
                     "route_scale, rms: RMS-normalised router input, x e-scale: per-expert scale, routing "
                     "weights before/after the experts, capacity (cf factor | C fixed) and keep policy; "
                     "experts: routed + shared; sizes: --json")
    table.caption_justify = "left"
    console.print(table)
    return 0


def cmd_init_weights(args) -> int:
    from parity.weights import init_weights

    if args.config and args.preset:
        raise UsageError("give one of --preset, --config")
    check_out_file(args.out)
    cfg = read_config_file(args.config) if args.config else _preset(args.preset or "default").config
    weights = init_weights(cfg, args.seed)
    meta = {"moe_config": json.dumps(cfg.to_dict()), "seed": str(args.seed),
            "source": args.preset or args.config or "default"}
    _save(args.out, weights, meta)
    print(f"wrote {len(weights)} tensors to {args.out}")
    return 0


def _save(path, weights, meta):
    from parity.weights import save_weights

    check_out_file(path)
    save_weights(path, weights, metadata=meta)


def cmd_import_hf(args) -> int:
    check_out_file(args.out)
    _read_hf(args.path, args.layer)  # clear usage errors first (missing module, bad path or layer)
    hf = importlib.import_module("parity.hf")
    cfg = hf.import_hf(args.path, args.layer, args.out)
    print(f"wrote layer {args.layer} of {args.path} ({cfg.num_experts} experts, top-{cfg.top_k}) to {args.out}")
    return 0


def _report_path(path: str) -> str:
    """A report.json, or a directory written by ``run --out`` (its report.json)."""
    if os.path.isdir(path):
        inner = os.path.join(path, "report.json")
        if not os.path.isfile(inner):
            raise UsageError(f"{path!r} is a directory without report.json (expected a `moe-parity run --out` "
                             f"directory or a report.json file)")
        return inner
    return path


def growth_factor_arg(text: str) -> float:
    """``--factor``: a finite number > 1."""
    v = _number(text)
    if not math.isfinite(v) or v <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number > 1")
    return v


def cmd_compare(args) -> int:
    from rich.markup import escape
    from rich.table import Table

    from parity.report import Report, compare_reports, compare_settings

    reports = []
    for path in (args.a, args.b):
        path = _report_path(path)
        try:
            reports.append(Report.load(path))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"cannot read report {path!r}: {exc}".splitlines()[0]) from None
    rows, regressed = compare_reports(*reports, factor=args.factor)
    console = _console()
    for line in compare_settings(*reports):
        console.print("[yellow]warning[/] " + escape(line) + " (rows may not be comparable)")
    table = Table(title=f"{args.a} -> {args.b}")
    for col in ("check", "A", "B", "max abs A", "max abs B", "ULP A", "ULP B", "tol x"):
        table.add_column(col, overflow="fold", no_wrap=col != "check")
    shown = [r for r in rows if args.all or r["status_a"] != r["status_b"] or r["max_abs_a"] != r["max_abs_b"]
             or r["regressed"]]
    for r in shown:
        style = "bold red" if r["regressed"] else ""
        growth = "-" if r["growth"] is None else f"{r['growth']:.3g}"
        table.add_row(escape(r["id"]), r["status_a"], r["status_b"], *(
            "-" if v is None else (f"{v:.2e}" if isinstance(v, float) else str(v))
            for v in (r["max_abs_a"], r["max_abs_b"], r["ulp_a"], r["ulp_b"])), growth, style=style)
    if shown:
        console.print(table)
    else:
        console.print(f"{len(rows)} check(s) in both reports, none changed status or max abs (--all lists them)")
    console.print(f"ULP: error in ULPs at the tensor's scale, as in `run`; tol x: B's tolerance ratio / A's. "
                  f"A regression is a check that passed (or warned) in A and fails in B, or whose tolerance "
                  f"ratio grew more than --factor {args.factor:g} times and is above 1/{args.factor:g} in B.")
    console.print(f"{len(regressed)} regression(s)" + (": " + escape(", ".join(regressed)) if regressed else ""))
    return 1 if regressed else 0


# --------------------------------------------------------------------------------------------------
def _version() -> str:
    """The installed distribution's version ("unknown" when run from a tree that is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("moe-parity")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Check that the PyTorch and JAX MoE layers agree with each other "
                                        "and with a float64 NumPy reference.", epilog=EXIT_CODES)
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    r = sub.add_parser("run", help="run the parity checks (default: preset 'default' on every backend)",
                       epilog=EXIT_CODES)
    r.add_argument("--preset", help="a preset name (see `moe-parity presets`); default 'default'")
    r.add_argument("--config", help="TOML or JSON file of MoEConfig fields")
    r.add_argument("--hf", metavar="PATH", help="a Hugging Face checkpoint directory (needs parity.hf)")
    r.add_argument("--layer", type=non_negative_int, help="layer index for --hf (default 0; only with --hf)")
    r.add_argument("--weights", metavar="FILE", help="canonical weights (.safetensors); default: from --seed")
    r.add_argument("--seed", type=non_negative_int, default=0,
                   help="seed of weights, input and cotangent, an integer >= 0 (default 0)")
    r.add_argument("--dtype", choices=DTYPES, default="float32", help="compute dtype (default float32)")
    r.add_argument("--backends", help="comma list of torch:cpu,torch:cuda,torch:npu,jax:cpu,jax:gpu,"
                                      "jax:tpu,hf:cpu,reference:cpu (default: all but hf/reference), a peer "
                                      "(torchtitan:cpu), a plugin's name, or package.module:factory (a column "
                                      "of your own, docs/columns.md); `moe-parity backends` lists them")
    r.add_argument("--kernel", help="expert_kernel override (e.g. loop, grouped_mm, ragged_dot)")
    r.add_argument("--batch", type=positive_int, default=2)
    r.add_argument("--seq-len", type=positive_int, default=8)
    r.add_argument("--steps", type=non_negative_int, default=3, help="expert-bias update steps (default 3; 0 skips)")
    r.add_argument("--bias-lr", type=finite_arg, default=1e-3, help="update_expert_bias rate (default 1e-3)")
    r.add_argument("--lock-routing", action="store_true",
                   help="feed every backend (and the reference) the first backend's selected experts")
    r.add_argument("--no-grads", action="store_true", help="skip the gradient checks")
    r.add_argument("--rtol", type=tolerance_arg, help="relative tolerance for every dtype (>= 0)")
    r.add_argument("--atol", type=tolerance_arg, help="absolute tolerance for every dtype (>= 0)")
    r.add_argument("--tol", action="append", metavar="DTYPE=RTOL,ATOL", help="per-dtype tolerance (repeatable)")
    r.add_argument("--tie-tol", type=tolerance_arg, default=1e-4,
                   help="largest selection margin counted as a near-tie (default 1e-4; >= 0)")
    r.add_argument("--allow-nonfinite", action="store_true",
                   help="accept NaN/Inf in the weights (refused by default) and compare NaN/Inf positions as masks")
    r.add_argument("--mesh", help="also run the sharded layers (CPU), e.g. ep=2, tp=2, ep=2xtp=2, dp=2xep=2 "
                                  "(dp: FSDP2 in torch)")
    r.add_argument("--processes", type=positive_int, default=None,
                   help="processes hosting the --mesh: torch one per rank (the default, the only choice); "
                        "jax default 1, or N dividing the device count (jax.distributed on 127.0.0.1)")
    r.add_argument("--out", metavar="DIR", help="write report.json, report.md and PNG plots here")
    r.add_argument("--json", action="store_true", help="print report.json to stdout instead of the table")
    r.add_argument("--max-rows", type=non_negative_int, default=None, help="terminal table rows (default all; 0 all)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument("--compact", action="store_true",
                   help="the narrow table (backend and reference in one column, no cosine); the default "
                        "below 110 columns")
    r.add_argument("--compile", action="store_true",
                   help="also run each torch column under torch.compile (torch:cpu+compile) and each JAX "
                        "column without jit (jax:cpu+eager), compared with the rest")
    r.add_argument("--no-compile-cache", action="store_true",
                   help="do not keep JAX's compiled programs between runs (default: kept in "
                        "$MOE_PARITY_JAX_CACHE, else $XDG_CACHE_HOME/moe-parity/jax, else ~/.cache/moe-parity/jax; "
                        "MOE_PARITY_JAX_CACHE=off also turns it off)")
    r.set_defaults(func=cmd_run)

    bk = sub.add_parser("backends", help="list the report's possible columns (built-in, peers, plugins) and why "
                                         "any is unavailable here")
    bk.add_argument("--json", action="store_true")
    bk.set_defaults(func=lambda a: importlib.import_module("parity.backends.plugins").cmd_backends(a))

    ps = sub.add_parser("presets", help="list the presets")
    ps.add_argument("--json", action="store_true")
    ps.set_defaults(func=cmd_presets)

    iw = sub.add_parser("init-weights", help="write deterministic canonical weights for a preset/config")
    iw.add_argument("--preset")
    iw.add_argument("--config")
    iw.add_argument("--seed", type=non_negative_int, default=0)
    iw.add_argument("--out", required=True)
    iw.set_defaults(func=cmd_init_weights)

    ih = sub.add_parser("import-hf", help="write one MoE layer of a Hugging Face checkpoint as canonical weights")
    ih.add_argument("path")
    ih.add_argument("--layer", type=non_negative_int, required=True)
    ih.add_argument("--out", required=True)
    ih.set_defaults(func=cmd_import_hf)

    cp = sub.add_parser("compare", help="compare two reports (report.json or a run --out directory; exit 1 on "
                                         "a regression: a check that passed and now fails, or error growth "
                                         "beyond --factor)")
    cp.add_argument("a", help="the earlier report: report.json or the directory holding it")
    cp.add_argument("b", help="the later report")
    cp.add_argument("--factor", type=growth_factor_arg, default=10.0,
                    help="tolerance-ratio growth counted as a regression (default 10; a finite number > 1)")
    cp.add_argument("--all", action="store_true", help="show unchanged rows too")
    cp.set_defaults(func=cmd_compare)

    from parity.train.command import add_parser as add_train_parser  # training parity (issue 17)

    add_train_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``moe-parity`` console script; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        return args.func(args)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # NOTE: `python -m parity.cli` runs this file as __main__; the subcommands' modules import parity.cli
    # (a second copy), so its main is the one whose UsageError they raise
    sys.exit(importlib.import_module("parity.cli").main())
