"""Command-line parsing that the scripts and `python -m export` share (numpy- and torch-free).

`Parser` is argparse with the toolkit's way of refusing: one line `error: ...` (a misspelt
option gets the closest real one) and exit status 2, as `python -m maml` does, instead of a usage
block. A benchmark or load test that runs for minutes must not find out at the end that its
report cannot be written: `whole_numbers` and `writable_file` turn such values into one-line
`UsageError`s before any work starts.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Sequence
from pathlib import Path

from maml.errors import UsageError


def program_name(module: str, command: str) -> str:
    """`command` when this process was started as that console command (`maml-export`),
    else `python -m module`: what `--help` and the errors call the program."""
    return command if Path(sys.argv[0]).name == command else f"python -m {module}"


def whole_numbers(text: str, option: str, example: str) -> list[int]:
    """Comma-separated whole numbers >= 1 (`--procs 1,2`), or a UsageError naming `option`."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise UsageError(f"{option} takes comma-separated whole numbers >= 1, such as {example}; "
                         f"got {text!r}")
    return values


def writable_file(path: Path, option: str) -> None:
    """Refuse an output file that cannot be written, before the work that fills it: make its
    folder and open it for appending (a file that was not there is removed again)."""
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a"):
            pass
    except OSError as exc:
        why = ("a file stands where a folder is needed"
               if isinstance(exc, (FileExistsError, NotADirectoryError)) else exc.strerror or exc)
        raise UsageError(f"{option} {path} cannot be written ({why}); choose another path") \
            from None
    if not existed:
        path.unlink()


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """The one `--help` layout of `maml`, `maml-export` and `maml-serve`: paragraphs of the
    description kept apart, and `(default: X)` after an option's help unless the default is
    None, off, or already said."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = [p for p in text.split("\n\n") if p.strip()]
        return "\n\n".join(super(HelpFormatter, self)._fill_text(p, width, indent)
                            for p in paragraphs)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or action.default in (None, False, argparse.SUPPRESS)
                or not action.option_strings):
            return text
        if text.endswith("."):
            return text[:-1] + " (default: %(default)s)."
        return text + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line: `error: ...`, exit status 2, no usage block; help
    in the toolkit's layout (`HelpFormatter`)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args: Sequence[str] | None = None, namespace=None):
        tokens = sys.argv[1:] if args is None else list(args)
        self._check_spelling(tokens)
        return super().parse_known_args(tokens, namespace)

    def _check_spelling(self, tokens: list[str]) -> None:
        """An option this parser does not know, named with the closest one it does (checked
        first, so `--checkpont x` is not reported as a missing --checkpoint)."""
        known = [s for s in self._option_string_actions if s.startswith("--")]
        for token in tokens:
            if token == "--":
                break
            name = token.split("=", 1)[0]
            if not name.startswith("--") or any(k.startswith(name) for k in known):
                continue  # a value, or an option or an abbreviation argparse takes
            close = difflib.get_close_matches(name, known, n=1)
            self.error(f"unknown option {name}" + (f"; did you mean {close[0]}?" if close else
                                                    f" (see {self.prog} --help)"))

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)
