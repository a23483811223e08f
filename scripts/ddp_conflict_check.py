"""Why `maml.distributed` does not use DistributedDataParallel: run this and see.

    python -m torch.distributed.run --nproc-per-node 2 scripts/ddp_conflict_check.py

(from the repository root, with PYTHONPATH=.). On 2 CPU processes with gloo it wraps the model in
DDP and takes a meta-gradient with the reference (`higher`) engine, first through the DDP
wrapper, then through `ddp.module`, and prints what happened: higher cannot patch the wrapper,
and through `ddp.module` DDP averages nothing (each rank keeps its own gradient).
"""

import datetime
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from maml import higher_engine
from maml.config import Config
from maml.experiment import build


def main() -> None:
    if "RANK" not in os.environ or len(sys.argv) > 1:
        sys.exit("run under torchrun, without arguments: python -m torch.distributed.run "
                 "--nproc-per-node 2 scripts/ddp_conflict_check.py")
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    cfg = Config(meta_batch_size=4).with_defaults()
    exp = build(cfg)
    ddp = DistributedDataParallel(exp.model)
    batch = exp.source.sample(4, torch.Generator().manual_seed(0)).chunk(2 * rank, 2 * rank + 2)
    for name, model in [("DDP wrapper", ddp), ("ddp.module", ddp.module)]:
        for p in ddp.parameters():
            p.grad = None
        try:
            higher_engine.meta_gradient(model, None, batch, cfg.inner_loop())
        except Exception as exc:  # noqa: BLE001 - reporting what DDP + higher do is the point
            print(f"rank {rank}, {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
            continue
        grads = torch.cat([p.grad.reshape(-1) for p in ddp.parameters()])
        main_grads = grads.clone()
        dist.broadcast(main_grads, 0)
        if rank > 0:
            print(f"rank {rank}, {name}: same gradient as rank 0 (averaged): "
                  f"{torch.equal(grads, main_grads)}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
