"""Reproduce a benchmark of the MAML paper end to end: train, evaluate, export, check the export.

    python scripts/reproduce.py omniglot-5w1s --minutes 14      # a slot; run again to continue
    python scripts/reproduce.py sinusoid --iterations 70000     # the full protocol
    python scripts/reproduce.py --table                         # README table from the results

Each run trains (resuming `OUT/<name>/model.pt` when it exists, so slots of a few minutes add
up to one run), evaluates on 600 meta-test tasks with a 95% confidence interval (the last
weights, as the paper does; `--weights best`: those best on the validation tasks), exports the
adapter as ONNX, evaluates the ONNX adapter with onnxruntime on exactly the same 600 tasks (the
two must agree), and writes `OUT/<name>/result.json` and the learning curves
`OUT/<name>/curves.png`. A run that stopped before the protocol's iterations (by `--minutes`,
or a smaller `--iterations`) is marked partial.
`--table` also draws the 5-way 1-shot variants that have run (second order, first order, learned
step sizes, the `support` and `tasknorm` normalisation modes) into one figure,
`OUT/omniglot-5w1s-variants.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from maml import checkpoint  # noqa: E402
from maml.allocator import keep_freed_memory  # noqa: E402
from maml.arguments import Parser  # noqa: E402
from maml.config import Config  # noqa: E402
from maml.curves import plot_curves  # noqa: E402
from maml.data import ENV, default_root  # noqa: E402
from maml.errors import Stopped, UsageError, exit_status  # noqa: E402
from maml.evaluation import eval_batches, evaluate, summary  # noqa: E402
from maml.experiment import restore  # noqa: E402
from maml.training import paths, select_engine, train  # noqa: E402

EVAL_SEED, EVAL_TASKS = 1234, 600

# name: (training settings, evaluations [(k_shot, steps)], paper's number(s), what the paper reports)
# Every paper row trains in the paper's normalisation mode (`transductive`), as the paper reports
# it; `omniglot-5w1s-support` and `omniglot-5w1s-tasknorm` are the 5-way 1-shot row in the two
# non-transductive modes, whose queries are answered one at a time (the same numbers as together,
# in those modes), to compare with the paper's.
PAPER = {"norm": "transductive"}
# the paper's 5-way 1-shot number, beside the rows measured with each query sent alone
ALONE = {"1-shot, 3 steps, each query alone (the paper's 98.7 sends them together)": (98.7, 0.4)}
BENCHMARKS: dict[str, dict] = {
    "omniglot-5w1s": dict(train=dict(PAPER, dataset="omniglot", n_way=5, k_shot=1), evals=[(1, 3)],
                          paper={"1-shot, 3 steps": (98.7, 0.4)}),
    "omniglot-5w5s": dict(train=dict(PAPER, dataset="omniglot", n_way=5, k_shot=5), evals=[(5, 3)],
                          paper={"5-shot, 3 steps": (99.9, 0.1)}),
    "omniglot-20w1s": dict(train=dict(PAPER, dataset="omniglot", n_way=20, k_shot=1), evals=[(1, 5)],
                           paper={"1-shot, 5 steps": (95.8, 0.3)}),
    "omniglot-20w5s": dict(train=dict(PAPER, dataset="omniglot", n_way=20, k_shot=5), evals=[(5, 5)],
                           paper={"5-shot, 5 steps": (98.9, 0.2)}),
    "omniglot-5w1s-first-order": dict(
        train=dict(PAPER, dataset="omniglot", n_way=5, k_shot=1, first_order=True), evals=[(1, 3)],
        paper={"1-shot, 3 steps": (98.3, 0.5)}),
    "omniglot-5w1s-learned-lr": dict(
        train=dict(PAPER, dataset="omniglot", n_way=5, k_shot=1, learn_inner_lr=True), evals=[(1, 3)],
        paper={"1-shot, 3 steps (target, beyond the paper)": (99.0, None)}),
    "omniglot-5w1s-support": dict(
        train=dict(dataset="omniglot", n_way=5, k_shot=1, norm="support"), evals=[(1, 3)],
        paper=ALONE),
    "omniglot-5w1s-tasknorm": dict(
        train=dict(dataset="omniglot", n_way=5, k_shot=1, norm="tasknorm"), evals=[(1, 3)],
        paper=ALONE),
    "sinusoid": dict(
        train=dict(PAPER, dataset="sinusoid", k_shot=10, inner_steps=1, inner_lr=0.01),
        evals=[(5, 1), (5, 5), (5, 10), (10, 1), (10, 5), (10, 10)],
        paper={"5-shot, 1 step": (0.67, None), "5-shot, 5 steps": (0.38, None),
               "5-shot, 10 steps": (0.35, None)}),
}


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores)"


def onnx_check(ckpt: Path, out: Path, k_shot: int, steps: int, tasks: int, reference: list[float],
               quiet: bool = False):
    """Export with `steps` steps; evaluate the ONNX adapter on the same tasks as the reference."""
    import serve
    from export.build import export_checkpoint

    export_checkpoint(str(ckpt), str(out), steps=steps, formats="onnx", check=True,
                      log=lambda line: print("  export:", line))
    adapter = serve.load(out)
    state = checkpoint.load(ckpt)
    exp = restore({**state, "config": {**state["config"], "k_shot": k_shot}}, str(ckpt), "cpu")
    values = []
    gen = torch.Generator().manual_seed(EVAL_SEED)
    bar = tqdm(total=tasks, desc="ONNX adapter", disable=quiet)
    for batch in eval_batches(exp.source, tasks, gen):
        for sx, sy, qx, qy in zip(*(t.numpy() for t in batch.tensors())):
            outputs = np.asarray(adapter.adapt_predict(sx, sy, qx))
            if exp.cfg.loss == "cross_entropy":
                values.append(float((outputs.argmax(-1) == qy).mean()))
            else:
                values.append(float(((outputs - qy) ** 2).mean()))
        bar.update(len(batch))
    bar.close()
    ours = torch.tensor(values, dtype=torch.float64)
    ref = torch.tensor(reference, dtype=torch.float64)
    return {**summary(ours), "tasks": tasks, "max_task_diff": (ours - ref).abs().max().item(),
            # equal up to float32 rounding (accuracies are multiples of 1/Q, so exactly equal)
            "tasks_equal": int((ours - ref).abs().le(1e-5 * ref.abs().clamp_min(1.0)).sum())}


def protocol_iterations(name: str) -> int:
    """The paper's number of meta-iterations for a benchmark (60000 Omniglot, 70000 sinusoid)."""
    return Config(**BENCHMARKS[name]["train"]).with_defaults().iterations


def check_out(folder: Path) -> None:
    """Refuse an --out whose path to the run's folder runs into a file, before any training."""
    for part in (folder, *folder.parents):
        if part.exists():
            if not part.is_dir():
                raise UsageError(f"--out: {part} is a file, not a folder; choose another --out")
            return


def check_seed(ckpt: Path, seed: int | None) -> None:
    """A typed --seed must be the resumed run's (it seeds the weights, split and tasks)."""
    if seed is None or not ckpt.is_file():
        return
    before = checkpoint.load(ckpt)["config"].get("seed")
    if before != seed:
        raise UsageError(f"--seed {seed} differs from the run in {ckpt.parent} (seed {before}); "
                         "drop --seed to continue it, or give another --out for a new run")


def run(name: str, args: argparse.Namespace) -> dict:
    bench = BENCHMARKS[name]
    folder = Path(args.out) / name
    ckpt = folder / "model.pt"
    check_out(folder)
    check_seed(ckpt, args.seed)
    settings = dict(bench["train"], checkpoint=str(ckpt), device=args.device, engine=args.engine,
                    data_root=args.data_root, val_every=args.val_every, log_every=args.log_every,
                    seed=0 if args.seed is None else args.seed)
    if args.iterations is not None:
        settings["iterations"] = args.iterations
    cfg = Config(**settings)
    resume = ckpt.is_file()
    print(f"== {name}: {'resuming' if resume else 'starting'} on {machine()} ==")
    t0 = time.perf_counter()
    try:
        # a resumed run compares the seed only when it was typed (the others may change)
        given = [k for k in settings if k != "seed" or args.seed is not None]
        trained = train(cfg, resume=resume, progress=not args.quiet, max_minutes=args.minutes,
                        given=given)
    except Stopped as exc:  # Ctrl-C: no evaluation of a run cut short; running again resumes it
        raise Stopped(f"{exc}; run the same command again to continue", exc.signum) from None
    wall = time.perf_counter() - t0
    state = checkpoint.load(ckpt, args.device)
    run_cfg = Config.from_dict(state["config"])
    protocol = protocol_iterations(name)  # a shorter --iterations is not the paper's protocol
    complete = state["iteration"] >= protocol
    result = {
        "benchmark": name, "machine": machine(), "device": args.device,
        # the engine as auto resolved it (recorded by train), else as configured
        "engine": state["metrics"].get("engine") or run_cfg.engine, "iterations": state["iteration"],
        "target_iterations": run_cfg.iterations, "protocol_iterations": protocol,
        "complete": complete,
        "minutes_capped": args.minutes is not None,
        "training_seconds": state["metrics"].get("seconds"), "this_slot_seconds": wall,
        "best_val": trained["best_val"], "settings": run_cfg.to_dict(), "paper": bench["paper"],
        "evaluations": [], "torch": str(torch.__version__),
    }
    engine = select_engine(run_cfg.engine)
    # model selection on the validation tasks (never the meta-test tasks evaluated below)
    best = paths(ckpt)["best"]
    chosen = best if args.weights == "best" and best.is_file() else ckpt
    if args.weights == "best" and chosen == ckpt:
        print(f"  warning: --weights best, but no validation has run yet ({best} is missing); "
              "evaluating the final weights", file=sys.stderr)
    if chosen != ckpt:
        state = checkpoint.load(chosen, args.device)
    result["weights"] = {"chosen": "best" if chosen == best else "final",
                         "iteration": state["iteration"]}
    print(f"  evaluating the {result['weights']['chosen']} weights "
          f"(iteration {state['iteration']} of {result['iterations']})")
    for k_shot, steps in bench["evals"]:
        exp = restore({**state, "config": {**state["config"], "k_shot": k_shot}}, str(chosen),
                      args.device)
        gen = torch.Generator().manual_seed(EVAL_SEED)
        inner = exp.cfg.inner_loop(steps)
        # a non-transductive row is also measured as its adapters are used: each query alone
        alone = inner.norm != "transductive" and inner.loss == "cross_entropy"
        with tqdm(total=args.tasks, desc=f"evaluate {k_shot}-shot, {steps} step(s)",
                  disable=args.quiet) as bar:
            r = evaluate(exp.model, exp.inner_lrs, exp.source, inner, args.tasks, gen,
                         adapt_predict=engine.adapt_predict, progress=bar.update,
                         one_at_a_time=alone)
        scale = 100.0 if r["metric"] == "accuracy" else 1.0
        row = {"k_shot": k_shot, "steps": steps, "metric": r["metric"], "mean": r["mean"] * scale,
               "ci95": r["ci95"] * scale, "tasks": r["tasks"], "per_task": r["per_task"]}
        if alone:
            row["alone"] = {k: r["one_at_a_time"][k] * scale for k in ("mean", "ci95")}
        print(f"  {k_shot}-shot, {steps} step(s): {row['mean']:.3f} +- {row['ci95']:.3f} "
              f"({r['metric']}{', %' if scale == 100 else ''}, {args.tasks} tasks)"
              + (f"; each query alone {row['alone']['mean']:.3f} +- {row['alone']['ci95']:.3f}"
                 if alone else ""))
        result["evaluations"].append(row)
    first = result["evaluations"][0]
    if not args.skip_onnx:
        onnx = onnx_check(chosen, folder / "adapter", first["k_shot"], first["steps"], args.tasks,
                          first["per_task"], args.quiet)
        scale = 100.0 if first["metric"] == "accuracy" else 1.0
        onnx.update(mean=onnx["mean"] * scale, ci95=onnx["ci95"] * scale)
        print(f"  ONNX adapter on the same tasks: {onnx['mean']:.3f} +- {onnx['ci95']:.3f}, "
              f"{onnx['tasks_equal']}/{onnx['tasks']} tasks identical, "
              f"largest per-task difference {onnx['max_task_diff']:.2e}")
        result["onnx"] = onnx
    metrics = paths(ckpt)["metrics"]
    result["seconds_to_98"] = seconds_to(metrics, 0.98) if first["metric"] == "accuracy" else None
    plot_curves({name: metrics}, folder / "curves.png", title=f"{name} on {machine()}")
    for row in result["evaluations"]:
        row.pop("per_task")
    (folder / "result.json").write_text(json.dumps(result, indent=2))
    print(f"  wrote {folder / 'result.json'} and {folder / 'curves.png'}\n")
    header, rule, *rows = table(Path(args.out)).splitlines()
    print("\n".join([header, rule, *(row for row in rows if row.startswith(f"| {name} |"))]))
    return result


def seconds_to(metrics: Path, target: float) -> float | None:
    """Training seconds at the first validation at or above `target` accuracy."""
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if record.get("val_accuracy", 0.0) >= target:
            return record["seconds"]
    return None


def result_paths(out: Path, name: str) -> list[Path]:
    """A benchmark's results: `out/NAME/result.json`, then one per machine folder, as
    `out/MACHINE/NAME/result.json` (say a GPU's runs kept beside the CPU's)."""
    paths = [out / name / "result.json", *sorted(out.glob(f"*/{name}/result.json"))]
    return [p for p in paths if p.is_file()]


def table(out: Path) -> str:
    """A markdown table of every result under `out` (rows not run yet say so)."""
    header = ["benchmark", "setting", "paper", "ours (95% CI)", "ONNX adapter", "iterations",
              "training time", "engine", "machine"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name, bench in BENCHMARKS.items():
        paper = bench["paper"]
        results = [json.loads(path.read_text()) for path in result_paths(out, name)]
        if not results:
            for label, (mean, ci) in paper.items():
                shown = f"{mean}" + (f" +- {ci}" if ci else "")
                lines.append(f"| {name} | {label} | {shown} | not run yet | | | | | |")
        for r, row in ((res, row) for res in results for row in res["evaluations"]):
            label = f"{row['k_shot']}-shot, {row['steps']} step{'s' * (row['steps'] > 1)}"
            key = next((k for k in paper if k.startswith(label)), None)
            ref, label = (paper[key], key) if key else (None, label)  # keeps "(target, ...)"
            shown = "" if ref is None else f"{ref[0]}" + (f" +- {ref[1]}" if ref[1] else "")
            onnx = ""
            if "onnx" in r and row is r["evaluations"][0]:
                o = r["onnx"]
                onnx = f"{o['mean']:.2f} ({o['tasks_equal']}/{o['tasks']} tasks equal)"
            target = r.get("protocol_iterations", r["target_iterations"])
            its = f"{r['iterations']}/{target}" + ("" if r["complete"] else " (partial)")
            weights = r.get("weights", {"chosen": "final"})
            if weights["chosen"] == "best":
                its += f", best at {weights['iteration']}"
            secs = r.get("training_seconds") or 0
            n = row["tasks"]
            tasks = "" if n == 600 else f" ({n} tasks, not the protocol's 600)"
            ours = f"{row['mean']:.2f} +- {row['ci95']:.2f}"
            if "alone" in row:  # what the label names first, then the paper's protocol
                ours = (f"{row['alone']['mean']:.2f} +- {row['alone']['ci95']:.2f} alone "
                        f"({ours} together)")
            lines.append(f"| {name} | {label} | {shown} | {ours}{tasks} | "
                         f"{onnx} | {its} | {secs / 60:.1f} min | {r['engine']} | {r['machine']} |")
    return "\n".join(lines)


VARIANTS = ["omniglot-5w1s", "omniglot-5w1s-first-order", "omniglot-5w1s-learned-lr",
            "omniglot-5w1s-support", "omniglot-5w1s-tasknorm"]


def plot_variants(out: Path) -> Path | None:
    """The 5-way 1-shot variants that have run, in one figure: second order against first order
    and learned step sizes, per iteration and per training second. None if fewer than two ran."""
    runs = {name: out / name / "model.metrics.jsonl" for name in VARIANTS}
    runs = {name: path for name, path in runs.items() if path.is_file()}
    if len(runs) < 2:
        return None
    machines = {json.loads((out / n / "result.json").read_text())["machine"]
                for n in runs if (out / n / "result.json").is_file()}
    where = ", ".join(sorted(machines)) or "unknown machine"
    return plot_curves(runs, out / "omniglot-5w1s-variants.png",
                       title=f"Omniglot 5-way 1-shot variants on {where}")


CHECKOUT_DATA = ROOT.parent / "shared" / "data" / "omniglot"
"""Where this project's machines keep Omniglot: beside the checkout."""


def data_root() -> Path:
    """This script's Omniglot: $MAML_DATA/omniglot when MAML_DATA is set, else the copy beside
    the checkout when there is one, else the toolkit's default (the user cache)."""
    if os.environ.get(ENV, "").strip() or not CHECKOUT_DATA.is_dir():
        return default_root()
    return CHECKOUT_DATA


def parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("benchmark", nargs="?", choices=sorted(BENCHMARKS),
                   help="the benchmark to run, or continue where its folder has a checkpoint")
    p.add_argument("--minutes", type=float, default=None, help="training time for this slot")
    p.add_argument("--iterations", type=int, default=None, help="override the protocol's iterations")
    p.add_argument("--tasks", type=int, default=EVAL_TASKS,
                   help=f"meta-test tasks to evaluate on (default {EVAL_TASKS})")
    p.add_argument("--out", default=str(ROOT / "runs" / "reproduce"),
                   help="results folder; each benchmark writes <out>/<benchmark>/")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: cuda when there is a GPU)")
    p.add_argument("--engine", default="auto", help="auto, higher or batched")
    p.add_argument("--data-root", default=str(data_root()),
                   help="the Omniglot data (npz files or torchvision's folder layout; default "
                        "$MAML_DATA/omniglot, else ../shared/data/omniglot beside the checkout "
                        "when it exists, else ~/.cache/maml-toolkit/omniglot)")
    p.add_argument("--val-every", type=int, default=500,
                   help="iterations between validations (the learning curve's points)")
    p.add_argument("--log-every", type=int, default=50, help="iterations between metric lines")
    p.add_argument("--seed", type=int, default=None,
                   help="seeds the weights, split and tasks (default 0)")
    p.add_argument("--skip-onnx", action="store_true",
                   help="do not export and evaluate the ONNX adapter")
    p.add_argument("--weights", choices=["final", "best"], default="final",
                   help="evaluate the last weights (the paper's protocol) or those best on the "
                        "validation tasks")
    p.add_argument("--table", action="store_true",
                   help="print the results table, draw the 5-way 1-shot variants, and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    keep_freed_memory()  # as `python -m maml train`: CPU iterations reuse freed memory
    if args.table:
        if not Path(args.out).is_dir():
            p.error(f"--out {args.out} is not a folder of results; give the --out of the runs")
        print(table(Path(args.out)))
        figure = plot_variants(Path(args.out))
        if figure is not None:
            print(f"\nwrote {figure}", file=sys.stderr)
        return 0
    if args.benchmark is None:
        p.error("name a benchmark, or pass --table")
    if args.minutes is not None and not 0 < args.minutes < float("inf"):  # NaN fails too
        p.error(f"--minutes must be > 0 and finite, got {args.minutes}")
    if args.tasks < 2:
        p.error(f"--tasks must be >= 2 for a confidence interval, got {args.tasks}")
    for name in ("iterations", "val_every", "log_every"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return exit_status(lambda: run(args.benchmark, args))


if __name__ == "__main__":
    sys.exit(main())
