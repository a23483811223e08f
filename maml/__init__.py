"""MAML meta-training of any PyTorch model.

Import what you need from its modules; this package imports nothing heavy on its own, so that
`maml.images` (numpy only) can be used by runtimes without torch.

- `maml.adaptation`: what adaptation means (loss, SGD steps, step sizes, batch-norm mode).
- `maml.higher_engine`: meta-gradients one task at a time through `higher` (the reference).
- `maml.train`, `maml.evaluate`: the training loop and evaluation.
- `maml.tasks`: sinusoid, harmonic and Omniglot task distributions.
- `maml.models`: built-in models and model specs.
"""

__version__ = "0.1.0"
