"""Command line: `python -m maml train ...`, `eval`, `plot` and `data` (built with fire; also
installed as the `maml` command). `--help` is argparse's layout, like `maml-export` and
`maml-serve` (`command_help`).

Bad input ends with one line on standard error, `error: ...`, and exit status 2.
Both commands also run under torchrun (`torchrun --nproc-per-node N -m maml train ...`): the
work is spread over the processes (`maml.distributed`) and rank 0 alone prints.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import json
import os
import re
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fire
import torch

from maml.allocator import keep_freed_memory
from maml.errors import Stopped, UsageError, exit_status

KINDS = {int: (int, "an integer"), float: (int | float, "a number"), str: (str, "text")}
"""What each annotated type accepts from fire's parsed values, and how an error names it."""


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """`value` as the type `hint` asks for, or a one-line error naming the option."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    options = typing.get_args(hint) if union else (hint,)
    if value is None and type(None) in options:
        return None
    plain = not isinstance(value, bool)  # bool is an int; only switches take it
    if any(kind is bool and not plain or plain and kind in KINDS and isinstance(value, KINDS[kind][0])
           for kind in options):
        return value
    if str in options and plain and isinstance(value, int | float):
        return str(value)  # fire reads `--checkpoint 2024` as a number
    if str in options and isinstance(value, list | tuple) and all(
            isinstance(v, str | int | float) and not isinstance(v, bool) for v in value):
        return ",".join(str(v) for v in value)  # fire reads `--split 0.6,0.2,0.2` as a tuple
    flag = "--" + name.replace("_", "-")
    if value is True:
        raise UsageError(f"{flag} needs a value")
    if bool in options:
        raise UsageError(f"{flag} is a switch: give {flag} alone to turn it on, or "
                         f"--no{name.replace('_', '-')}, not {flag} {value!r}")
    wanted = " or ".join(KINDS[k][1] for k in options if k in KINDS)
    raise UsageError(f"{flag} must be {wanted}, got {value!r}")


def checked(command: Callable) -> Callable:
    """Check every option against its type hint before `command` runs: fire passes a value as
    whatever it parses as (`--iterations abc` arrives as the string 'abc')."""
    signature, hints = inspect.signature(command), typing.get_type_hints(command)

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        for name, value in bound.arguments.items():
            if hints.get(name, Any) is not Any:
                bound.arguments[name] = _coerce(name, value, hints[name])
        return command(*bound.args, **bound.kwargs)

    return run


def check_options(argv: list[str]) -> frozenset[str]:
    """The options typed on the command line (`--resume` compares those alone with the saved
    run: fire passes every default too), after refusing an unknown or ambiguous one before
    anything runs. Fire would run the command first and only then complain about the option it
    could not use, so a typo would start (and overwrite) a whole training run."""
    commands = [name for name in vars(CLI) if not name.startswith("_")]
    if argv and not argv[0].startswith("-") and argv[0] not in commands:
        close = difflib.get_close_matches(argv[0], commands, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UsageError(f"unknown command {argv[0]!r}; {hint}(commands: {', '.join(commands)})")
    command = getattr(CLI, argv[0], None) if argv else None
    if command is None:
        return frozenset()  # `python -m maml --help` and the like (`command_help`)
    parameters = {n: p for n, p in inspect.signature(command).parameters.items() if n != "self"}
    known = list(parameters)
    is_flag = re.compile(r"^(--|-[a-zA-Z])").match
    given, rest, value_next, positional = set(), argv[1:], False, 0
    for i, token in enumerate(rest):
        if token == "--":
            break  # what follows is fire's own flags
        if value_next or not is_flag(token):
            positional += not value_next
            value_next = False
            continue
        value_next = "=" not in token and i + 1 < len(rest) and not is_flag(rest[i + 1])
        key = token.lstrip("-").split("=", 1)[0].replace("-", "_")
        negated = key[2:].lstrip("_") if key.startswith("no") else None
        if key in known or negated in known:
            given.add(key if key in known else negated)
        elif key in ("help", "h"):
            continue
        elif len(key) == 1 and token.startswith("-") and not token.startswith("--"):
            starting = [p for p in known if p.startswith(key)]
            if len(starting) > 1:
                names = ", ".join("--" + p.replace("_", "-") for p in starting)
                raise UsageError(f"-{key} is ambiguous for `{argv[0]}` ({names}); write the "
                                 "option out in full")
            if not starting:
                raise UsageError(f"`{argv[0]}` has no option -{key} (see {program()} "
                                 f"{argv[0]} --help)")
            given.add(starting[0])
        else:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean --{close[0].replace('_', '-')}?" if close else ""
            raise UsageError(f"`{argv[0]}` has no option --{key.replace('_', '-')}{hint} "
                             f"(see {program()} {argv[0]} --help)")
    required = [n for n, p in parameters.items() if p.default is inspect.Parameter.empty]
    missing = [n for n in required[positional:] if n not in given]
    if missing and not {"help", "h"} & {t.lstrip("-") for t in rest}:
        flags = " ".join(f"--{n.replace('_', '-')} {n.upper()}" for n in missing)
        raise UsageError(f"`{argv[0]}` needs {flags} (see {program()} {argv[0]} --help)")
    return frozenset(given)


JSON_OPTIONS = ("--model-kwargs", "--model_kwargs")


def fire_argv(argv: list[str]) -> list[str]:
    """`argv` as fire reads it.

    - `check_options` accepts `--no-first-order`, the spelling most tools use, but fire knows
      only `--nofirst-order` and would complain after the whole run: every `--no-NAME` before a
      `--` becomes `--NAME=False`.
    - fire reads `{"bias": false}` as a Python literal, where bare `false` and `null` become the
      strings 'false' and 'null' (and 'false' is true): a JSON option's text is passed on quoted,
      so that `_kwargs` parses it as JSON.
    """
    stop = argv.index("--") if "--" in argv else len(argv)
    negated = re.compile(r"--no[-_]([a-zA-Z][\w-]*)").fullmatch
    out: list[str] = []
    for i, token in enumerate(argv):
        name, eq, value = token.partition("=")
        if i < stop and (m := negated(token)):
            token = f"--{m.group(1)}=False"
        elif i < stop and name in JSON_OPTIONS and eq:
            token = f"{name}={value!r}"
        elif 0 < i < stop and argv[i - 1] in JSON_OPTIONS:
            token = repr(token)
        out.append(token)
    return out


def _kwargs(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    try:
        parsed = json.loads(value)
    except (TypeError, json.JSONDecodeError):
        raise UsageError(f"--model-kwargs must be a JSON object, got {value!r}") from None
    if not isinstance(parsed, dict):
        raise UsageError(f"--model-kwargs must be a JSON object, got {value!r}")
    return parsed


class CLI:
    """MAML meta-training and evaluation of any PyTorch model."""

    def __init__(self, given: frozenset[str] = frozenset()) -> None:
        self._given = given  # the options typed on the command line (`check_options`)

    @checked
    def train(
        self,
        dataset: str = "sinusoid",
        n_way: int | None = None,
        k_shot: int | None = None,
        q_query: int | None = None,
        inner_steps: int | None = None,
        inner_lr: float | None = None,
        eval_inner_steps: int | None = None,
        first_order: bool = False,
        learn_inner_lr: bool = False,
        norm: str | None = None,
        meta_lr: float = 1e-3,
        meta_batch_size: int | None = None,
        iterations: int | None = None,
        grad_clip: float | None = None,
        model: str | None = None,
        model_kwargs: Any = None,
        data_root: str | None = None,
        download: bool = False,
        split: str = "maml",
        val_chars: int = 50,
        image_size: int | None = None,
        channels: int | None = None,
        invert: bool = False,
        normalize: bool = False,
        augment: str | None = None,
        dataset_kwargs: Any = None,
        seed: int = 0,
        device: str = "cpu",
        engine: str = "auto",
        task_chunk: int | str | None = None,  # a number, or "auto" (sized to the budget)
        memory_budget_mb: float | None = None,
        compile: bool = False,  # noqa: A002 - the flag is --compile
        cuda_graphs: bool = False,
        bf16: bool = False,
        tf32: bool = False,
        dtype: str = "float32",
        checkpoint: str = "runs/model.pt",
        log_every: int = 50,
        val_every: int = 500,
        val_tasks: int = 100,
        checkpoint_every: int = 500,
        tensorboard: str | None = None,
        resume: bool = False,
        overwrite: bool = False,
        minutes: float | None = None,
        quiet: bool = False,
        dist_timeout: float = 300.0,
    ) -> None:
        """Meta-train a model with MAML. Unset settings take the MAML paper's defaults.

        `--minutes M` stops after M minutes with a checkpoint; `--resume` continues it later.
        So does Ctrl-C (or SIGTERM), after the iteration under way; Ctrl-C twice stops at once.

        Args:
            dataset: sinusoid, harmonic, omniglot, folder (your images: --data-root DIR of class
                folders, docs/your-own-data.md) or package.module:factory (your task source).
            n_way: classes per task (Omniglot; default 5; 20 switches to the 20-way settings).
            k_shot: support examples per class (Omniglot; 1) or per task (regression; 10).
            q_query: query examples per class (Omniglot; 15) or per task (regression; 10).
            inner_steps: SGD steps on the support set in training (1; 5 for 20-way).
            inner_lr: the inner step size (regression 0.01, 5-way 0.4, 20-way 0.1).
            eval_inner_steps: steps at validation and evaluation (10; 3 for 5-way; 5 for 20-way).
            first_order: first-order MAML (no gradient through the inner loop's gradients).
            learn_inner_lr: meta-learn a step size per parameter tensor and per step (Meta-SGD).
            norm: batch norm's statistics for a query: support (the task's support set, so each
                query is answered alone; default), tasknorm (TaskNorm-I: the support set's
                blended with the query's own; also alone) or transductive (the queries sent
                together, the MAML paper's convention).
            meta_lr: Adam's learning rate for the meta-update.
            meta_batch_size: tasks per meta-update (regression 25, 5-way 32, 20-way 16).
            iterations: meta-updates in all (regression 70000, Omniglot 60000).
            grad_clip: clip the meta-gradient to this norm (off by default).
            model: mlp, cnn, maxpool, convnet, or package.module:factory for your own nn.Module.
            model_kwargs: JSON object of arguments for the model factory, e.g. '{"hidden": 32}'.
            data_root: the Omniglot folder: npz files or the upstream folders (default
                $MAML_DATA/omniglot, else ~/.cache/maml-toolkit/omniglot; see `data`).
            download: let torchvision download Omniglot into --data-root (needs internet).
            split: maml (1200 / 423 pooled characters) or background (Lake's alphabet split);
                folder: fractions TRAIN,VAL,TEST of the classes (groups in a two-level tree;
                default 0.6,0.2,0.2) or a split file (.json or .txt).
            val_chars: meta-training characters held out for validation.
            image_size: folder: side of the square model input, in pixels (default 28).
            channels: folder: 1 (grayscale, default) or 3 (RGB).
            invert: folder: v -> 1 - v, so dark ink on light paper is ink = 1 (as Omniglot).
            normalize: folder: normalise each channel by the training images' mean and std.
            augment: folder: rot90 (rotations by 90 degrees as new classes) and/or flip
                (random horizontal flips), comma-separated; meta-training tasks only.
            dataset_kwargs: JSON object of arguments for a package.module:factory task source.
            seed: seeds the weights, the character split and the task stream.
            device: cpu, cuda or cuda:N.
            engine: auto (fastest for the device), higher (the reference loop) or batched.
            task_chunk: batched engine: tasks per chunk, or auto (sized to --memory-budget-mb).
            memory_budget_mb: batched engine: peak memory to size chunks for (CUDA: 80% of card).
            compile: batched engine: torch.compile the step (first iterations compile).
            cuda_graphs: batched engine: capture the step in a CUDA graph (--device cuda).
            bf16: batched engine: bfloat16 autocast (opt-in; changes the numbers slightly).
            tf32: TF32 matmuls and convolutions on CUDA (opt-in; changes the numbers slightly).
            dtype: float32 or float64 for the weights and tasks.
            checkpoint: where the run is saved (metrics and the best weights go beside it).
            log_every: iterations between metric lines in <run>.metrics.jsonl, for <run>.pt.
            val_every: iterations between validations on held-out tasks.
            val_tasks: tasks per validation.
            checkpoint_every: iterations between checkpoints (also at the end and on a stop).
            tensorboard: also write the metrics as TensorBoard event files to this folder.
            resume: continue the run saved at --checkpoint; it keeps what it learns with.
            overwrite: start again over the run saved at --checkpoint (refused without it).
            minutes: stop after this many minutes of this call, with a checkpoint.
            quiet: no progress bar.
            dist_timeout: under torchrun, seconds to wait for another process before failing.
        """
        from maml import distributed
        from maml.config import Config
        from maml.data import default_root
        from maml.training import train

        if minutes is not None and not 0 < minutes < float("inf"):
            raise UsageError(f"--minutes must be > 0 and finite, got {minutes}")
        if resume and overwrite:
            raise UsageError("--resume and --overwrite contradict each other; give one")
        if dataset == "folder" and data_root is None and not resume:
            raise UsageError("--dataset folder needs --data-root DIR: a folder of class folders "
                             "(DIR/<class>/*.png), see docs/your-own-data.md")
        if dataset == "folder" and not resume and os.path.isfile(os.path.expanduser(str(split))):
            split = os.path.abspath(os.path.expanduser(str(split)))
        cfg = Config(
            dataset=dataset, n_way=n_way, k_shot=k_shot, q_query=q_query,
            inner_steps=inner_steps, inner_lr=inner_lr, eval_inner_steps=eval_inner_steps,
            first_order=first_order, learn_inner_lr=learn_inner_lr, norm=norm, meta_lr=meta_lr,
            meta_batch_size=meta_batch_size, iterations=iterations, grad_clip=grad_clip,
            model=model, model_kwargs=_kwargs(model_kwargs),
            data_root=str(default_root()) if data_root is None  # absolute: eval runs anywhere
            else os.path.abspath(os.path.expanduser(data_root)),
            download=download, split=split, val_chars=val_chars, image_size=image_size,
            channels=channels, invert=invert, normalize=normalize, augment=augment,
            dataset_kwargs=_kwargs(dataset_kwargs), seed=seed, device=device,
            engine=engine, task_chunk=task_chunk, memory_budget_mb=memory_budget_mb,
            compile=compile, cuda_graphs=cuda_graphs, bf16=bf16, tf32=tf32,
            dtype=dtype, checkpoint=os.path.expanduser(checkpoint), log_every=log_every,
            val_every=val_every, val_tasks=val_tasks, checkpoint_every=checkpoint_every,
            tensorboard=tensorboard,
        )
        if not resume:  # bad settings fail here, before torchrun's ranks wait for each other
            cfg.with_defaults()
        ranks, device = distributed.start(device, dist_timeout)
        cfg = dataclasses.replace(cfg, device=device)
        try:
            result = train(cfg, resume=resume, progress=not quiet, max_minutes=minutes,
                           ranks=ranks, given=self._given, overwrite=overwrite)
        except Stopped as exc:  # rank 0 alone says so, as it alone prints
            hint = f"{exc}; add --resume to the same command to continue" if ranks.is_main else ""
            raise Stopped(hint, exc.signum) from None
        distributed.finish()
        if not ranks.is_main:
            return
        best = result["best_val"]
        print(f"trained {result['iterations']} of {result['target_iterations']} iterations "
              f"({result['seconds']:.1f} s of training); "
              f"checkpoint {result['checkpoint']}"
              + (f"; best validation {best:.4f} at iteration {result['best_iteration']}"
                 if best is not None else ""))

    @checked
    def eval(
        self,
        checkpoint: str,
        tasks: int = 600,
        inner_steps: int | None = None,
        k_shot: int | None = None,
        q_query: int | None = None,
        split: str = "test",
        seed: int = 1234,
        device: str = "cpu",
        engine: str | None = None,
        task_chunk: int | str | None = None,  # a number, or "auto" (sized to the budget)
        batch_size: int = 25,
        data_root: str | None = None,
        norm: str | None = None,
        json: bool = False,  # noqa: A002 - the flag is --json
        quiet: bool = False,
        dist_timeout: float = 300.0,
    ) -> None:
        """Adapt to new tasks from the meta-test split; report the metric with a 95% CI.

        `--k-shot` / `--q-query` evaluate with other support / query sizes than training used.
        `--norm support` measures a transductive model as `export --norm support` ships it.
        `--json` prints the result as one JSON object instead of the sentence.

        Args:
            checkpoint: the run to evaluate (from `train`).
            tasks: tasks to adapt to; the result is their mean with a 95% confidence interval.
            inner_steps: adaptation steps (default: the run's --eval-inner-steps).
            k_shot: support examples per class (Omniglot) or per task (default: the run's).
            q_query: query examples per class (Omniglot) or per task (default: the run's).
            split: test (meta-test characters), val or train.
            seed: seeds the tasks, so the same seed evaluates the same tasks.
            device: cpu, cuda or cuda:N.
            engine: auto, higher or batched (default: the run's).
            task_chunk: batched engine: tasks per chunk, or auto.
            batch_size: tasks adapted to at once.
            data_root: the Omniglot data, if it has moved since training (default: the run's).
            norm: normalise queries as another mode than the run's: support or transductive
                for a model trained in either (tasknorm only as trained).
            json: print one JSON object instead of the sentence.
            quiet: no progress bar.
            dist_timeout: under torchrun, seconds to wait for another process before failing.
        """
        import json as json_lib

        from tqdm import tqdm

        from maml import checkpoint as ckpt
        from maml import distributed
        from maml.evaluation import evaluate
        from maml.experiment import restore
        from maml.norms import served_mode
        from maml.training import select_engine

        if tasks < 1 or batch_size < 1:
            name, value = ("tasks", tasks) if tasks < 1 else ("batch-size", batch_size)
            raise UsageError(f"--{name} must be >= 1, got {value}")
        if split not in ("train", "val", "test"):
            raise UsageError(f"--split must be train, val or test, got {split!r}")
        if inner_steps is not None and inner_steps < 0:
            raise UsageError(f"--inner-steps must be >= 0, got {inner_steps}")
        if not -(2**63) <= seed < 2**64:  # what torch.Generator.manual_seed takes
            raise UsageError(f"--seed must be in [-2**63, 2**64), got {seed}")
        checkpoint = os.path.expanduser(checkpoint)  # `--checkpoint=~/x.pt`: no shell expands it
        state = ckpt.load(checkpoint)
        root = None if data_root is None else os.path.abspath(os.path.expanduser(data_root))
        overrides = {k: v for k, v in (("k_shot", k_shot), ("q_query", q_query),
                                       ("data_root", root)) if v is not None}
        ranks, device = distributed.start(device, dist_timeout)
        exp = restore({**state, "config": {**state["config"], **overrides}}, checkpoint, device)
        cfg = exp.cfg
        trained_norm = cfg.norm or "transductive"
        cfg.norm = served_mode(trained_norm, norm)
        steps = cfg.eval_inner_steps if inner_steps is None else inner_steps
        if task_chunk is not None:
            cfg.task_chunk = task_chunk
        cfg.cuda_graphs = False  # graph capture is for the training step only
        chosen = select_engine(engine or cfg.engine, cfg, ranks)
        gen = torch.Generator().manual_seed(seed)
        with tqdm(total=tasks, desc="evaluate", disable=quiet or json or not ranks.is_main) as bar:
            result = evaluate(exp.model, exp.inner_lrs, exp.source, cfg.inner_loop(steps), tasks,
                              gen, split, batch_size, chosen.adapt_predict, bar.update, ranks,
                              one_at_a_time=True)
        distributed.finish()
        if not ranks.is_main:
            return
        result.pop("per_task")
        result.update(checkpoint=checkpoint, dataset=cfg.dataset, iteration=state["iteration"],
                      trained_norm=trained_norm)
        if json:  # standard output holds the JSON alone, for `| jq` and other programs
            print(json_lib.dumps(result))
            return
        def shown(r: dict) -> str:
            return f"{r['mean']:.4f}" + ("" if r["ci95"] is None else f" +- {r['ci95']:.4f}")

        spread = "" if tasks > 1 else " (one task: no confidence interval; use --tasks 2 or more)"
        print(f"{cfg.dataset}: {result['metric']} after {steps} steps {shown(result)}, each query "
              f"sent alone {shown(result['one_at_a_time'])} ({result['norm']} normalisation"
              + ("" if cfg.norm == trained_norm else f", trained {trained_norm}")
              + f"; before adaptation {shown(result['before'])}) over {tasks} {split} tasks{spread}")


    @checked
    def plot(self, checkpoint: str, out: str | None = None) -> None:
        """Draw the run's learning curves (validation metric against iterations and seconds).

        `--checkpoint a.pt,b.pt` draws several runs in one figure, to compare them.

        Args:
            checkpoint: the run <run>.pt whose <run>.metrics.jsonl to draw; several, comma-separated.
            out: the .png (or .pdf, .svg) to write (default: <checkpoint>.curves.png beside it).
        """
        from maml.curves import plot_curves
        from maml.training import paths

        runs = [Path(c.strip()).expanduser() for c in checkpoint.split(",") if c.strip()]
        if not runs:
            raise UsageError("--checkpoint names no run; give one, or several comma-separated")
        for run in runs:
            if not paths(run)["metrics"].is_file():
                raise UsageError(f"no metrics file {paths(run)['metrics']}; train with "
                                 f"--checkpoint {run} first")
            if not paths(run)["metrics"].read_text().strip():
                raise UsageError(f"{paths(run)['metrics']} has no metric lines yet; plot after "
                                 "the first --log-every iterations")
        # label each run by its file name, with as many parent folders as tell them apart
        stems = [paths(r)["metrics"].with_name(paths(r)["metrics"].name[:-len(".metrics.jsonl")])
                 for r in runs]  # only .pt dropped: lr0.01 and lr0.05 are two runs
        depth = next((d for d in range(1, max(len(r.parts) for r in stems) + 1)
                      if len({r.parts[-d:] for r in stems}) == len(runs)), None)
        if depth is None:
            raise UsageError(f"--checkpoint names the same run twice: {checkpoint}")
        labels = ["/".join(r.parts[-depth:]) for r in stems]
        first = paths(runs[0])["metrics"]
        target = (os.path.expanduser(out) if out else
                  str(first.with_name(first.name.replace(".metrics.jsonl", ".curves.png"))))
        if Path(target).suffix.lower() not in (".png", ".pdf", ".svg"):
            raise UsageError(f"--out {target}: give a .png, .pdf or .svg file name")
        title = runs[0].name if len(runs) == 1 else f"{len(runs)} runs"
        print(plot_curves({label: paths(r)["metrics"] for label, r in zip(labels, runs)}, target,
                          title=title))

    @checked
    def data(self, data_root: str | None = None, download: bool = False) -> None:
        """Find Omniglot (or download it), build its npz arrays, print where it is and checksums.

        The folder is --data-root, else $MAML_DATA/omniglot, else ~/.cache/maml-toolkit/omniglot.
        It may hold the arrays already, the upstream folders images_background/ and
        images_evaluation/ (<Alphabet>/characterNN/XXXX_YY.png), or their zip archives: the
        arrays images_background.npz + images_evaluation.npz are built from those once.

        Args:
            data_root: the Omniglot folder (default $MAML_DATA/omniglot, else the user cache).
            download: fetch the upstream folders with torchvision first (needs internet).
        """
        from maml.data import prepare

        found = prepare(data_root, download)
        how = "built from the upstream folders" if found["built"] else "arrays found"
        print(f"Omniglot in {found['root']} ({found['characters']} characters; {how})")
        for path, digest in found["files"].items():
            print(f"{digest}  {path}")


def program() -> str:
    """How this program was started, for its help and messages: `maml` or `python -m maml`."""
    from maml.arguments import program_name

    return program_name("maml", "maml")


def _doc_parts(method: Callable) -> tuple[str, dict[str, str]]:
    """A command's description (the docstring before `Args:`) and its options' help lines."""
    doc = inspect.cleandoc(method.__doc__ or "")
    description, _, args = doc.partition("\nArgs:\n")
    helps: dict[str, str] = {}
    name = None
    for line in args.splitlines():
        match = re.match(r"^\s{4}(\w+): (.*)$", line)
        if match:
            name, helps[match[1]] = match[1], match[2]
        elif name and line.strip():
            helps[name] += " " + line.strip()
    return description.strip(), helps


def command_help(command: str | None) -> str | None:
    """`--help` of the program (`command` None) or of one command, in argparse's layout, as
    `maml-export --help` and `maml-serve --help` print theirs: a usage line, the description,
    then one entry per option spelled as typed (`--n-way N_WAY`) with its default. None for a
    name that is not a command."""
    from maml.arguments import Parser

    prog = program()
    commands = [n for n in vars(CLI) if not n.startswith("_") and callable(getattr(CLI, n))]
    if command is None:
        p = Parser(prog=prog, description=inspect.cleandoc(CLI.__doc__ or ""),
                   epilog=f"`{prog} COMMAND --help` describes a command's options.")
        sub = p.add_subparsers(title="commands", metavar="COMMAND")
        for name in commands:
            summary = _doc_parts(getattr(CLI, name))[0].splitlines()[0]
            sub.add_parser(name, help=summary.replace("%", "%%"))
        return p.format_help().rstrip()
    if command not in commands:
        return None
    method = getattr(CLI, command)
    description, helps = _doc_parts(method)
    p = Parser(prog=f"{prog} {command}", description=description)
    for name, parameter in inspect.signature(method).parameters.items():
        if name == "self":
            continue
        flag, default = "--" + name.replace("_", "-"), parameter.default
        text = helps.get(name, "").replace("%", "%%")  # argparse formats help with %
        if default is inspect.Parameter.empty:
            p.add_argument(flag, required=True, metavar=name.upper(), help=text)
        elif default is False:
            p.add_argument(flag, action="store_true", help=text)
        else:
            p.add_argument(flag, metavar=name.upper(), default=default, help=text)
    return p.format_help().rstrip()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv

    def run() -> None:
        keep_freed_memory()  # CPU iterations reuse freed memory instead of page-faulting it in
        given = check_options(argv)
        before = argv[:argv.index("--") if "--" in argv else len(argv)]
        text = None
        if before in ([], ["--help"], ["-h"]):
            text = command_help(None)
        elif len(before) > 1 and {"--help", "-h"} & set(before[1:]):
            text = command_help(before[0])
        if text is not None:
            print(text)
            return
        fire.Fire(CLI(given), command=fire_argv(argv), name=program())

    code = exit_status(run)
    from maml.distributed import exit_if_joined

    exit_if_joined(code)  # a torchrun rank: no interpreter teardown that could abort (SIGABRT)
    return code


if __name__ == "__main__":
    sys.exit(main())
