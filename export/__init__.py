"""Export a meta-trained checkpoint as a fixed-step adapter: TorchScript, ONNX and `.pt2`.

`python -m export --checkpoint ckpt.pt --out DIR` traces the adaptation routine of
`maml.adaptation` (the meta-learned init, N SGD steps on the support loss, prediction) into aten
graphs, one per entry point (adapt, predict, adapt_predict), writes them in every format with an
`adapter.json` describing them, and checks that each file reproduces the training-time inner loop
before it reports success.
"""
