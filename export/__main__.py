"""Command line: `python -m export --checkpoint ckpt.pt --out DIR [...]`.

Bad input (missing or foreign checkpoint, unwritable folder, an operator with no ONNX
translation, a failed verification) ends with one line `error: ...` and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from maml.arguments import Parser, program_name
from maml.errors import exit_status


def parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=program_name("export", "maml-export"),
        description="Export a meta-trained checkpoint as a fixed-step adapter "
                    "(ONNX, TorchScript, torch.export .pt2) and verify it.")
    p.add_argument("--checkpoint", required=True, help="a checkpoint from `python -m maml train`")
    p.add_argument("--out", required=True, help="folder to write (replaced atomically)")
    p.add_argument("--steps", type=int, default=None,
                   help="SGD steps (default: the run's eval_inner_steps)")
    p.add_argument("--inner-lr", type=float, default=None,
                   help="constant step size (default: the run's learned step sizes or inner_lr)")
    p.add_argument("--formats", default="onnx,torchscript,pt2",
                   help="comma-separated subset of onnx,torchscript,pt2")
    p.add_argument("--no-verify", action="store_true", help="skip the parity check")
    p.add_argument("--tasks", type=int, default=3,
                   help="test tasks per support size for the parity check")
    p.add_argument("--seed", type=int, default=0, help="seed of the parity-check tasks")
    p.add_argument("--norm", default=None, choices=("transductive", "support", "tasknorm"),
                   help="how predict normalises queries (default: as trained); `--norm support` "
                        "makes a transductive model's adapter answer each query alone")
    p.add_argument("--data-root", default=None,
                   help="the Omniglot data, if it has moved since training (default: the run's)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from export.build import export_checkpoint

    return exit_status(lambda: export_checkpoint(
        args.checkpoint, args.out, args.steps, args.inner_lr, args.formats, not args.no_verify,
        args.tasks, args.seed, data_root=args.data_root, norm=args.norm))


if __name__ == "__main__":
    sys.exit(main())
