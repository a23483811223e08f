"""Built-in models, and how any model is named so that later tools can rebuild it.

A model is named by a *spec*: `"package.module:factory"` plus keyword arguments (JSON on the
command line). The spec is stored in every checkpoint; `build_model(spec, kwargs)` rebuilds the
same architecture anywhere. Built-in short names are aliases for factories in this module.

The models are plain `nn.Module`s: MAML needs no special layers.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import torch
from torch import nn

from maml.adaptation import check_adaptable, use_batch_statistics
from maml.errors import UsageError


def sinusoid_mlp(hidden: int = 40, layers: int = 2, in_features: int = 1, out_features: int = 1):
    """The MAML paper's regression network: 1-40-40-1 with ReLU."""
    widths = [in_features] + [hidden] * layers
    blocks: list[nn.Module] = []
    for a, b in zip(widths, widths[1:]):
        blocks += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*blocks, nn.Linear(widths[-1], out_features))


def _conv_block(c_in: int, c_out: int, **conv: Any) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, **conv), nn.BatchNorm2d(c_out), nn.ReLU()]


class SpatialMean(nn.Module):
    """Mean over the spatial dimensions: (B, C, H, W) -> (B, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def omniglot_cnn(n_way: int = 5, in_channels: int = 1, hidden: int = 64, blocks: int = 4):
    """The MAML paper's Omniglot network: 4 x [3x3 conv stride 2, BatchNorm, ReLU], mean, linear."""
    layers: list[nn.Module] = []
    for i in range(blocks):
        layers += _conv_block(in_channels if i == 0 else hidden, hidden, stride=2, padding=1)
    return nn.Sequential(*layers, SpatialMean(), nn.Linear(hidden, n_way))


def maxpool_cnn(
    n_way: int = 5, in_channels: int = 1, hidden: int = 64, blocks: int = 4, image_size: int = 28
):
    """The max-pool variant (MAML's MiniImagenet style): [3x3 conv, BN, ReLU, 2x2 max-pool] x 4.

    The paper's mini-ImageNet network is `hidden=32` on 84x84 RGB: `--model maxpool
    --model-kwargs '{"hidden": 32}' --image-size 84 --channels 3`."""
    layers: list[nn.Module] = []
    side = image_size
    for i in range(blocks):
        layers += _conv_block(in_channels if i == 0 else hidden, hidden, padding=1)
        if side >= 2:  # small images (8x8 digits) stop pooling at 1x1
            layers.append(nn.MaxPool2d(2))
            side //= 2
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(hidden * side * side, n_way))


class ConvNetClassifier(nn.Module):
    """The seed's classifier: unpadded 3x3 convs with BatchNorm and ReLU, flatten, linear."""

    def __init__(
        self, n_way: int = 5, in_channels: int = 1, hidden: int = 64, blocks: int = 4,
        image_size: int = 28,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(blocks):
            layers += _conv_block(in_channels if i == 0 else hidden, hidden)
        self.features = nn.Sequential(*layers)
        side = image_size - 2 * blocks
        self.head = nn.Linear(hidden * side * side, n_way)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


ALIASES = {
    "mlp": "maml.models:sinusoid_mlp",
    "cnn": "maml.models:omniglot_cnn",
    "maxpool": "maml.models:maxpool_cnn",
    "convnet": "maml.models:ConvNetClassifier",
}


def resolve_spec(spec: str) -> str:
    """Expand a short name to its `module:factory` spec."""
    return ALIASES.get(spec, spec)


def _factory(spec: str):
    full = resolve_spec(spec)
    module_name, sep, attr = full.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(
            f"model {spec!r} is neither a built-in ({', '.join(ALIASES)}) nor 'package.module:factory'"
        )
    return import_factory(full, "model", spec)


def import_factory(full: str, what: str = "model", spec: str | None = None):
    """The callable that `package.module:factory` names (`what`: "model" or "dataset")."""
    spec = full if spec is None else spec
    module_name, sep, attr = full.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"{what} {spec!r} is not 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import failure is the user's spec, not our bug
        hint = ""
        if isinstance(exc, ModuleNotFoundError) and module_name.startswith(str(exc.name)):
            hint = ("; run from the folder that holds it, or add that folder to PYTHONPATH")
        raise UsageError(f"{what} spec {spec!r}: cannot import {module_name!r} ({exc}){hint}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UsageError(f"{what} spec {spec!r}: {module_name!r} has no callable {attr!r}")
    return factory


def model_kwargs(spec: str, kwargs: dict[str, Any], n_way: int | None,
                 input_shape: tuple[int, ...] | None = None) -> dict[str, Any]:
    """The keyword arguments to store: the user's, plus what the factory takes of the task's
    shape: `n_way`, and for images `(C, H, W)` `in_channels` and `image_size` (so `cnn`,
    `maxpool` and `convnet` fit any folder of images without code)."""
    kwargs = dict(kwargs)
    shape: dict[str, Any] = {"n_way": n_way}
    if input_shape is not None and len(input_shape) == 3:
        shape.update(in_channels=int(input_shape[0]), image_size=int(input_shape[-1]))
        if (input_shape[0], input_shape[-1]) == (1, 28):
            shape = {"n_way": n_way}  # Omniglot's: the factories' defaults, as runs stored them
    try:
        params = inspect.signature(_factory(spec)).parameters
    except (TypeError, ValueError):
        params = {}
    for name, value in shape.items():
        if value is not None and name not in kwargs and name in params:
            kwargs[name] = value
    return kwargs


def build_model(
    spec: str, kwargs: dict[str, Any], example_input: torch.Tensor,
    output_shape: tuple[int, ...] | None = None,
) -> nn.Module:
    """Build the model named by `spec`, in MAML's batch-norm mode, and run it once.

    The dry run materialises lazy layers and turns an architecture that does not fit the task's
    input, or (given `output_shape`, per example) its targets, into a clear error instead of a
    traceback during training, or a loss that silently broadcasts a wrong shape. The model's
    floating-point weights take `example_input`'s dtype (the run's `--dtype`).
    """
    factory = _factory(spec)
    try:
        model = factory(**kwargs)
    except TypeError as exc:
        raise UsageError(f"model {spec!r} rejected its arguments {kwargs}: {exc} (set them "
                         "with --model-kwargs '{\"name\": value}')") from None
    except Exception as exc:  # the user's factory failed: name it and its error, no traceback
        raise UsageError(f"model factory {spec!r} raised {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"model factory {spec!r} returned {type(model).__name__}, not nn.Module")
    try:
        check_adaptable(model)
    except ValueError as exc:
        raise UsageError(f"model {spec!r}: {exc}") from None
    use_batch_statistics(model)
    model.to(example_input.dtype)  # a factory may build float64 (or float32) weights
    try:
        with torch.no_grad():
            outputs = model(example_input)
    except Exception as exc:
        raise UsageError(
            f"model {spec!r} cannot run on inputs of shape {tuple(example_input.shape)}: {exc}"
        ) from None
    if output_shape is not None:
        check_outputs(spec, outputs, len(example_input), output_shape)
    return model


def check_outputs(spec: str, outputs: Any, batch: int, expected: tuple[int, ...]) -> None:
    """The model must return one tensor of shape `(batch, *expected)`: the loss would otherwise
    fail deep inside, or broadcast a mismatched shape into a wrong but finite number."""
    if not isinstance(outputs, torch.Tensor):
        raise UsageError(
            f"model {spec!r} returns a {type(outputs).__name__}, not one tensor: the loss needs "
            "the predictions (or logits) alone, so return only those from forward"
        )
    if not outputs.is_floating_point():
        raise UsageError(f"model {spec!r} returns {outputs.dtype} outputs; the loss needs "
                         "floating-point predictions (or logits) to differentiate")
    if outputs.ndim == 0 or outputs.shape[0] != batch or tuple(outputs.shape[1:]) != expected:
        want = (f"{expected[0]} logits, one per class" if len(expected) == 1 and expected[0] > 1
                else "one value per target")
        raise UsageError(
            f"model {spec!r} returns shape {tuple(outputs.shape)} for {batch} examples, but the "
            f"tasks need {(batch, *expected)} ({want}): change its output layer"
        )
