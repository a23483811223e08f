"""One rank of a 2-process run with a fault injected, for `test_distributed.py` (not collected).

`python tests/dist_worker.py READY_DIR FAULT CLI-ARGS...` with RANK/WORLD_SIZE/MASTER_* set (by
hand or by torchrun): waits until every rank has imported torch (so start-up skew cannot trip a
short --dist-timeout), then runs `python -m maml CLI-ARGS...`. FAULT applies to ranks > 0 only:
- `none`;
- `perturb`: start from different random weights (rank 0's broadcast must overwrite them);
- `stall:N` / `die:N`: hang forever / exit abruptly at the Nth meta-gradient.
"""

import os
import sys
import time
from pathlib import Path

import torch

import maml.training
from maml import higher_engine
from maml.__main__ import main

ready, fault, argv = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
mode, _, at = fault.partition(":")
injected = {"n": 0}
if int(os.environ["RANK"]) > 0 and mode == "perturb":
    real_build = maml.training.build

    def perturbed(*args, **kwargs):
        injected["n"] += 1
        exp = real_build(*args, **kwargs)
        with torch.no_grad():
            for p in exp.model.parameters():
                p.add_(torch.randn_like(p))
        return exp

    maml.training.build = perturbed
elif int(os.environ["RANK"]) > 0 and mode in ("stall", "die"):
    calls = {"n": 0}
    real_meta_gradient = higher_engine.meta_gradient

    def faulty(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == int(at):
            if mode == "die":
                os._exit(3)
            time.sleep(3600)
        return real_meta_gradient(*args, **kwargs)

    higher_engine.meta_gradient = faulty

(ready / os.environ["RANK"]).touch()
while len(list(ready.iterdir())) < int(os.environ["WORLD_SIZE"]):
    time.sleep(0.05)
code = main(argv)
if int(os.environ["RANK"]) > 0 and mode == "perturb" and not injected["n"]:
    sys.exit("dist_worker: the perturbation was never applied (did maml.training stop using build?)")
sys.exit(code)
