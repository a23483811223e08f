"""A tiny binary file of named tensors, for handing a task to programs in other languages.

The C++ example (`scripts/embed/cpp/main.cpp`) reads it; numpy writes and reads it here, so no
pickle, zip or protobuf reader is needed on either side. Layout (all little-endian):

    b"MAMLTSR1"                         magic, 8 bytes
    uint32 count                        number of tensors
    count times:
        uint32 name_length, name        UTF-8, e.g. b"support_x"
        uint8 dtype                     1 = float32, 2 = int64
        uint8 ndim, int64 shape[ndim]
        data                            C order

Command line: `python -m serve.tensor_file task.npz task.bin` converts an `.npz` holding
`support_x`, `support_y` and `query_x` into that format.
"""

from __future__ import annotations

import struct
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from maml.errors import UsageError

MAGIC = b"MAMLTSR1"
DTYPE_CODES = {np.dtype("float32"): 1, np.dtype("int64"): 2}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


def encode(tensors: Mapping[str, np.ndarray]) -> bytes:
    """The file's bytes for `{name: float32 or int64 array}`, in the mapping's order."""
    parts = [MAGIC, struct.pack("<I", len(tensors))]
    for name, value in tensors.items():
        array = np.ascontiguousarray(value)
        if array.dtype not in DTYPE_CODES:
            raise UsageError(f"tensor {name!r} is {array.dtype}; only float32 and int64 are stored")
        raw_name = name.encode()
        parts += [
            struct.pack("<I", len(raw_name)), raw_name,
            struct.pack("<BB", DTYPE_CODES[array.dtype], array.ndim),
            struct.pack(f"<{array.ndim}q", *array.shape),
            array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes(),
        ]
    return b"".join(parts)


def decode(data: bytes) -> dict[str, np.ndarray]:
    """The tensors stored in `data` (the inverse of `encode`)."""
    if data[:8] != MAGIC:
        raise UsageError("not a tensor file: it does not start with MAMLTSR1")
    try:
        (count,), pos = struct.unpack_from("<I", data, 8), 12
        out: dict[str, np.ndarray] = {}
        for _ in range(count):
            (length,) = struct.unpack_from("<I", data, pos)
            name = data[pos + 4 : pos + 4 + length].decode()
            pos += 4 + length
            code, ndim = struct.unpack_from("<BB", data, pos)
            shape = struct.unpack_from(f"<{ndim}q", data, pos + 2)
            if any(d < 0 for d in shape):
                raise ValueError(f"tensor {name!r} has a negative dimension in {shape}")
            pos += 2 + 8 * ndim
            dtype = CODE_DTYPES[code].newbyteorder("<")
            size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if pos + size > len(data):
                raise ValueError("truncated")
            out[name] = np.frombuffer(data, dtype, int(np.prod(shape)), pos).reshape(shape).copy()
            pos += size
    except (struct.error, KeyError, ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"corrupt tensor file ({exc})") from None
    return out


def save(path: str | Path, tensors: Mapping[str, np.ndarray]) -> None:
    """Write `tensors` to `path`."""
    Path(path).write_bytes(encode(tensors))


def load(path: str | Path) -> dict[str, np.ndarray]:
    """Read the tensors in `path`."""
    return decode(Path(path).read_bytes())


def _storable(array: np.ndarray) -> np.ndarray:
    """Integer arrays as int64, floating ones as float32 (what the adapter takes)."""
    if np.issubdtype(array.dtype, np.integer):
        return array.astype(np.int64)
    if np.issubdtype(array.dtype, np.floating):
        return array.astype(np.float32)
    raise UsageError(f"cannot store a {array.dtype} array; use float or integer arrays")


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of the `.npz` archive at `path`, each storable (float32 or int64)."""
    with open(path, "rb") as file:
        head = file.read(6)
    if not head.startswith(b"PK"):  # every .npz is a zip archive
        what = "a single .npy array, not" if head == b"\x93NUMPY" else "not a zip file, so not"
        raise UsageError(f"{path} is {what} an .npz archive; save the task with "
                         "np.savez(path, support_x=..., support_y=..., query_x=...)")
    try:
        with np.load(path) as npz:
            return {name: _storable(npz[name]) for name in npz.files}
    except zipfile.BadZipFile as exc:
        raise UsageError(f"{path} is a damaged .npz archive ({exc}); write it again with "
                         "np.savez") from None


def main(argv: list[str] | None = None) -> int:
    """`python -m serve.tensor_file IN.npz OUT.bin`: store an npz's arrays for the C++ example."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m serve.tensor_file IN.npz OUT.bin", file=sys.stderr)
        return 2
    try:
        arrays = read_npz(args[0])
        save(args[1], arrays)
    except (OSError, ValueError, UsageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
