"""One rank of a hand-launched 2-process run, for `test_distributed.py` (not collected by pytest).

`python tests/dist_worker.py READY_DIR FAULT CLI-ARGS...` with RANK/WORLD_SIZE/MASTER_* set:
waits until every rank has imported torch (so start-up skew cannot trip a short --dist-timeout),
then runs `python -m maml CLI-ARGS...`. FAULT is `none`, or `stall:N` / `die:N` to hang forever or
exit abruptly at this rank's Nth meta-gradient, simulating a stuck or crashed process.
"""

import os
import sys
import time
from pathlib import Path

from maml import higher_engine
from maml.__main__ import main

ready, fault, argv = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
if fault != "none":
    mode, at = fault.split(":")
    calls = {"n": 0}
    real = higher_engine.meta_gradient

    def faulty(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == int(at):
            if mode == "die":
                os._exit(3)
            time.sleep(3600)
        return real(*args, **kwargs)

    higher_engine.meta_gradient = faulty

(ready / os.environ["RANK"]).touch()
while len(list(ready.iterdir())) < int(os.environ["WORLD_SIZE"]):
    time.sleep(0.05)
sys.exit(main(argv))
