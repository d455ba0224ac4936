"""``moe-parity train``: the command line of the training-parity run (registered by ``parity.cli``).

    moe-parity train [--preset NAME | --config FILE | --hf PATH --layer N] [--weights FILE] [--seed 0]
                     [--steps 50] [--optimizer adamw|sgd] [--lr 1e-3] [--weight-decay 0] [--momentum 0]
                     [--eps 1e-8] [--clip 1.0 | --no-clip] [--bias-lr 1e-3] [--dtype float32|bfloat16]
                     [--batch 4] [--seq-len 32] [--factor 4] [--micro-batches 2] [--no-invariance]
                     [--out DIR] [--json] [--quiet]

Exit status: 0 the band held and every invariance row passed (WARN included); 1 otherwise; 2 bad usage
(one line on stderr). The option parsing helpers (config sources, number types, ``--out`` checks)
are ``parity.cli``'s, so ``train`` and ``run`` accept and refuse the same values.
"""

from __future__ import annotations

import argparse
import math
import os
import time

from parity import cli
from parity.train.optim import OPTIMIZERS
from parity.train.task import TRAIN_DTYPES

EXIT_CODES = ("exit status: 0 every band and invariance row passed (WARN rows included); 1 a row failed; "
              "2 bad usage")


def positive_float_arg(text: str) -> float:
    """A finite number > 0 (``--lr``, ``--clip``)."""
    v = cli._number(text)
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number > 0")
    return v


def unit_interval_arg(text: str) -> float:
    """A number in [0, 1) (``--momentum``, ``--beta1``, ``--beta2``)."""
    v = cli._number(text)
    if not math.isfinite(v) or not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a number in [0, 1)")
    return v


def factor_arg(text: str) -> float:
    v = cli._number(text)
    if not math.isfinite(v) or v < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 1")
    return v


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``train`` on the ``moe-parity`` subparsers."""
    t = sub.add_parser("train", help="K training steps in torch and JAX against their float64 runs (drift band, "
                                     "invariance rows)", epilog=EXIT_CODES)
    t.add_argument("--preset", help="a preset name (see `moe-parity presets`); default 'default'")
    t.add_argument("--config", help="TOML or JSON file of MoEConfig fields")
    t.add_argument("--hf", metavar="PATH", help="a Hugging Face checkpoint directory (needs parity.hf)")
    t.add_argument("--layer", type=cli.non_negative_int, help="layer index for --hf (default 0; only with --hf)")
    t.add_argument("--weights", metavar="FILE", help="initial canonical weights (.safetensors); default: from --seed")
    t.add_argument("--seed", type=cli.non_negative_int, default=0, help="seed of weights, teacher and data (default 0)")
    t.add_argument("--steps", type=cli.positive_int, default=50, help="optimizer steps (default 50)")
    t.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw", help="default adamw")
    t.add_argument("--lr", type=positive_float_arg, default=1e-3, help="learning rate (default 1e-3)")
    t.add_argument("--weight-decay", type=cli.tolerance_arg, default=0.0,
                   help="AdamW: decoupled (times lr); SGD: L2 added to the gradient (default 0)")
    t.add_argument("--momentum", type=unit_interval_arg, default=0.0, help="SGD momentum in [0, 1) (default 0)")
    t.add_argument("--beta1", type=unit_interval_arg, default=0.9)
    t.add_argument("--beta2", type=unit_interval_arg, default=0.999)
    t.add_argument("--eps", type=cli.tolerance_arg, default=1e-8, help="AdamW epsilon, outside the square root")
    t.add_argument("--clip", type=positive_float_arg, default=1.0, help="max global gradient norm (default 1.0)")
    t.add_argument("--no-clip", action="store_true", help="no gradient clipping")
    t.add_argument("--bias-lr", type=cli.tolerance_arg, default=1e-3,
                   help="update_expert_bias rate, when the config uses the bias (default 1e-3)")
    t.add_argument("--dtype", choices=TRAIN_DTYPES, default="float32",
                   help="float32 (truth: float64) or bfloat16 (float32 master weights; truth: float32)")
    t.add_argument("--batch", type=cli.positive_int, default=4)
    t.add_argument("--seq-len", type=cli.positive_int, default=32)
    t.add_argument("--factor", type=factor_arg, default=4.0,
                   help="the drift band: torch vs JAX within FACTOR x each one's drift from its truth (default 4)")
    t.add_argument("--micro-batches", type=cli.positive_int, default=2,
                   help="n of the gradient-accumulation row (must divide --batch; default 2)")
    t.add_argument("--no-invariance", action="store_true", help="skip the invariance rows")
    t.add_argument("--out", metavar="DIR", help="write report.json, report.md and PNG plots here")
    t.add_argument("--json", action="store_true", help="print report.json to stdout instead of the table")
    t.add_argument("--quiet", action="store_true", help="no progress line")
    t.add_argument("--no-compile-cache", action="store_true", help="do not keep JAX's compiled programs (as run)")
    t.set_defaults(func=cmd_train)
    return t


def layer_source(args):
    """``(cfg, weights or None, label, weights_source)`` from --preset / --config / --hf / --weights."""
    from parity.weights import WeightsError, load_weights

    sources = [n for n, v in (("--preset", args.preset), ("--config", args.config), ("--hf", args.hf)) if v]
    if len(sources) > 1:
        raise cli.UsageError(f"give at most one of --preset, --config, --hf (got {', '.join(sources)})")
    if args.layer is not None and not args.hf:
        raise cli.UsageError(f"--layer {args.layer} needs --hf PATH (it picks a layer of a Hugging Face checkpoint)")
    weights = None
    if args.hf:
        layer = 0 if args.layer is None else args.layer
        cfg, weights = cli._read_hf(args.hf, layer)
        label, source = f"hf:{os.path.basename(os.path.normpath(args.hf))}#layer{layer}", f"{args.hf} layer {layer}"
    elif args.config:
        cfg, label = cli.read_config_file(args.config), f"config:{os.path.basename(args.config)}"
    elif args.weights and not args.preset and cli.weights_file_config(args.weights) is not None:
        cfg, label = cli.weights_file_config(args.weights), f"weights:{os.path.basename(args.weights)}"
    else:
        label = args.preset or "default"
        cfg = cli._preset(label).config
    if weights is None and args.weights:
        try:
            weights = load_weights(args.weights, cfg)
        except WeightsError as exc:
            raise cli.UsageError(str(exc)) from None
        source = os.path.abspath(args.weights)
    elif weights is None:
        source = f"parity.weights.init_weights(seed={args.seed})"
    return cfg, weights, label, source


def cmd_train(args) -> int:
    from parity.train.optim import OptimizerSpec
    from parity.train.task import TrainSettings

    if args.out:
        cli.check_out_dir(args.out)
    if args.batch % args.micro_batches:
        raise cli.UsageError(f"--micro-batches {args.micro_batches} does not divide --batch {args.batch}")
    cfg, weights, label, source = layer_source(args)
    try:
        spec = OptimizerSpec(name=args.optimizer, lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum,
                             betas=(args.beta1, args.beta2), eps=args.eps,
                             clip_norm=None if args.no_clip else args.clip)
        if args.optimizer == "adamw" and args.momentum:
            raise ValueError(f"--momentum {args.momentum:g} is an SGD option; AdamW's are --beta1/--beta2")
        settings = TrainSettings(cfg=cfg, optimizer=spec, dtype=args.dtype, steps=args.steps, batch=args.batch,
                                 seq_len=args.seq_len, seed=args.seed, bias_lr=args.bias_lr, factor=args.factor,
                                 micro_batches=args.micro_batches, invariance=not args.no_invariance,
                                 preset=label, weights_source=source)
    except ValueError as exc:
        raise cli.UsageError(str(exc)) from None
    for mod in ("torch", "jax", "flax", "optax"):
        import importlib.util

        if importlib.util.find_spec(mod) is None:
            raise cli.UsageError(f"`train` needs torch and jax ({mod} is not installed); {cli.INSTALL_HINT}")
    if not args.no_compile_cache:
        cli._compile_cache()
    import torch

    torch.set_num_threads(1)  # NOTE: the layers are tiny; one thread is fastest and the runs stay reproducible
    from rich.console import Console
    from rich.markup import escape

    from parity.train.run import run_training

    err = Console(stderr=True)
    progress = None
    if not (args.quiet or args.json):
        status = err.status("training")
        status.start()
        progress = status.update
    t0 = time.perf_counter()
    try:
        report = run_training(settings, weights, progress=(lambda text: progress(escape(text))) if progress else None)
    finally:
        if progress is not None:
            status.stop()
    report.timing["wall_time_s"] = round(time.perf_counter() - t0, 3)
    if args.out:
        from parity.train.plots import save_plots

        cli.write_outputs(report, args.out, save_plots)
    if args.json:
        print(report.to_json())
        return report.exit_code
    out = cli._console()
    out.print(report.rich_table(width=out.width))
    for line in report.headline():
        out.print(escape(line))
    state = "[green]PASS[/]" if report.passed else "[bold red]FAIL[/]"
    out.print(f"{state} ({escape(report.verdict.summary())}) in {report.timing['wall_time_s']:.1f} s"
              + (f"; report in {escape(args.out)}" if args.out else ""))
    return report.exit_code
