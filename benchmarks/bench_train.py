"""Training-step throughput of ``moe-parity train``'s loops: steps/s per backend and dtype.

    python benchmarks/bench_train.py [--preset default] [--steps 50] [--batch 4] [--seq-len 32]
                                     [--optimizer adamw] [--threads 1] [--json FILE]

For each run of ``moe-parity train`` (torch and JAX in float32, each in float64; ``--dtype bfloat16``:
bf16 compute with float32 masters, and the float32 runs) it builds the trainer, times the first step
apart (it holds JAX's compilation) and then ``--steps`` more, and prints steps/s. The data and the
initial weights are those of the command (``parity.train.task``), so the figures are the command's.
Then the whole ``moe-parity train`` run of those settings (four runs in lock step, the band, the
invariance rows) is timed once, end to end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="default")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (the command uses 1)")
    p.add_argument("--no-end-to-end", action="store_true", help="skip the timing of the whole command run")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from parity.presets import get_preset
    from parity.train import OptimizerSpec, TrainSettings
    from parity.train.jax_loop import JaxTrainer
    from parity.train.run import run_training
    from parity.train.task import Task
    from parity.train.torch_loop import TorchTrainer

    settings = TrainSettings(cfg=get_preset(args.preset).config, optimizer=OptimizerSpec(name=args.optimizer),
                             dtype=args.dtype, steps=args.steps, batch=args.batch, seq_len=args.seq_len,
                             preset=args.preset)
    task = Task(settings)
    rows = []
    runs = [(settings.dtype, settings.master_dtype), (settings.truth_dtype, settings.truth_dtype)]
    for cls in (TorchTrainer, JaxTrainer):
        for compute, master in runs:
            t0 = time.perf_counter()
            trainer = cls(settings, task.initial, compute, master)
            trainer.step(*task.batch(0))
            first = time.perf_counter() - t0
            t1 = time.perf_counter()
            for t in range(1, args.steps + 1):
                trainer.step(*task.batch(t))
            per = (time.perf_counter() - t1) / args.steps
            name = f"{cls.backend} {compute}" + (f" (master {master})" if master != compute else "")
            rows.append({"run": name, "first_step_s": round(first, 3), "step_ms": round(1e3 * per, 2),
                         "steps_per_s": round(1 / per, 1)})
            print(f"{name:28s} first step (build + compile) {first:6.2f} s   {1e3 * per:7.2f} ms/step   "
                  f"{1 / per:7.1f} steps/s", flush=True)
    result = {"preset": args.preset, "batch": args.batch, "seq_len": args.seq_len, "steps": args.steps,
              "optimizer": args.optimizer, "threads": args.threads, "rows": rows}
    if not args.no_end_to_end:
        t0 = time.perf_counter()
        report = run_training(settings)
        total = time.perf_counter() - t0
        result["end_to_end_s"] = round(total, 2)
        print(f"moe-parity train, {args.steps} steps (4 runs, band, invariance rows): {total:.1f} s "
              f"({'PASS' if report.passed else 'FAIL'})")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
