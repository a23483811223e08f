"""Helpers of the runtime tests: the reference outputs, random tasks, starting the service.

The reference for an exported adapter's outputs is `maml.higher_engine.adapt_predict` on its
checkpoint, with the step-size table recorded in `adapter.json`. (Kept out of `conftest.py` so
that test modules can import it by a name no other test folder uses.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]

# A prelude that makes `import torch` and `import higher` fail, to prove a code path needs neither.
NO_TORCH = (
    "import sys\n"
    "class _Block:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.split('.')[0] in ('torch', 'higher', 'torchvision'):\n"
    "            raise ImportError(f'{name} is blocked in this test')\n"
    "sys.meta_path.insert(0, _Block())\n"
)


@dataclass
class Exported:
    checkpoint: Path
    directory: Path
    meta: dict

    @property
    def classification(self) -> bool:
        return self.meta["task"] == "classification"


def make_task(meta: dict, k_shot: int, q_query: int, seed: int) -> dict[str, np.ndarray]:
    """A random task of the adapter's shapes: N-way K-shot images, or sinusoid points."""
    rng = np.random.default_rng(seed)
    shape = meta["input"]["shape"]
    if meta["task"] == "classification":
        n = meta["n_way"]
        return {"support_x": rng.random((n * k_shot, *shape), dtype=np.float32),
                "support_y": rng.permutation(np.repeat(np.arange(n), k_shot)).astype(np.int64),
                "query_x": rng.random((n * q_query, *shape), dtype=np.float32)}
    amp, phase = rng.uniform(0.1, 5.0), rng.uniform(0, np.pi)
    sx = rng.uniform(-5, 5, (k_shot, *shape)).astype(np.float32)
    return {"support_x": sx, "support_y": (amp * np.sin(sx - phase)).astype(np.float32),
            "query_x": rng.uniform(-5, 5, (q_query, *shape)).astype(np.float32)}


def reference(exp: Exported, task: dict[str, np.ndarray]) -> np.ndarray:
    """`maml.higher_engine.adapt_predict` on the checkpoint, with adapter.json's step sizes."""
    import torch

    from maml import checkpoint
    from maml.adaptation import InnerLoop
    from maml.checkpoint import load_weights
    from maml.higher_engine import adapt_predict
    from maml.models import build_model
    from maml.norms import add_parameters
    from maml.tasks import TaskBatch

    state = checkpoint.load(exp.checkpoint)
    meta = exp.meta
    example = torch.zeros(2, *meta["input"]["shape"])
    model = build_model(state["model"]["spec"], state["model"]["kwargs"], example)
    add_parameters(model, state["config"].get("norm") or "transductive")  # TaskNorm's (a, b)
    load_weights(model, state["model"]["state_dict"], str(exp.checkpoint))
    table = torch.tensor(meta["step_sizes"], dtype=torch.float32)
    inner = InnerLoop(meta["loss"], meta["steps"], lr=0.0,
                      norm=(meta.get("norm") or {}).get("mode", "transductive"))
    sx, sy, qx = (torch.from_numpy(task[k])[None] for k in ("support_x", "support_y", "query_x"))
    batch = TaskBatch(sx, sy, qx, torch.zeros(1, qx.shape[1], dtype=sy.dtype))
    return adapt_predict(model, table, batch, inner)[0].numpy()


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path


def start_server(adapter: Path, log: Path, *options: str, block_torch: bool = False) -> Server:
    """`python -m serve` on a free loopback port (bound by the server itself, no race)."""
    args = ["--adapter", str(adapter), "--port", "0", "--no-access-log", *options]
    if block_torch:  # the service must run where torch is not installed
        code = NO_TORCH + "import runpy\nrunpy.run_module('serve', run_name='__main__')\n"
        cmd = [sys.executable, "-c", code, *args]
    else:
        cmd = [sys.executable, "-m", "serve", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True,
                                env=env)
    line = proc.stdout.readline()
    if " at http://" not in line:
        proc.kill()
        raise AssertionError(f"the service did not start: {line!r}\n{log.read_text()}")
    url = line.rsplit(" at ", 1)[1].strip()
    import httpx

    for _ in range(100):  # uvicorn accepts once its startup completes
        try:
            if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                return Server(url, proc, log)
        except httpx.TransportError:
            time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"the service never became healthy:\n{log.read_text()}")


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()
    server.process.stdout.close()


