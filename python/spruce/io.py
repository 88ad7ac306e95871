"""Checkpoint I/O: safetensors files and sharded directories, read lazily and written atomically.

Reading memory-maps the files (``safetensors.safe_open``): :meth:`Checkpoint.get` returns one
tensor backed by the page cache, so a whole model is never loaded at once. Writing streams: the
header of every shard is laid out up front from the tensors' names, dtypes and shapes, then each
tensor is written at its offset as it is produced, into temporary files that are renamed into
place only when every tensor has been written. An error or interruption leaves no partial output.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

__all__ = [
    "Checkpoint",
    "CheckpointWriter",
    "TensorSpec",
    "open_checkpoint",
    "load_state_dict",
    "save_state_dict",
    "DTYPES",
]

INDEX_NAME = "model.safetensors.index.json"

#: safetensors dtype codes and their torch dtypes.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_CODES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 2**20


@dataclass(frozen=True)
class TensorSpec:
    """What a writer needs to know of a tensor before its data exists."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _read_header(path: Path) -> dict[str, Any]:
    """Parses and validates a safetensors header (without reading the data)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(
                    f"{path}: file is {size} bytes, too short for a safetensors header"
                )
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(
                    f"{path}: header length ({n}) must be at most {min(_MAX_HEADER, size - 8)} bytes "
                    "(file truncated or not safetensors)"
                )
            header = json.loads(f.read(n))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read checkpoint ({e.strerror})") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header must be a JSON object")
    data_len = size - 8 - n
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry") from e
        if dtype not in DTYPES:
            raise CheckpointError(
                f"{path}: tensor {name!r} has dtype {dtype}, expected one of {', '.join(DTYPES)}"
            )
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise CheckpointError(f"{path}: tensor {name!r} has an invalid shape {shape}")
        want = math.prod(shape) * _itemsize(DTYPES[dtype])
        if not (0 <= start <= end <= data_len) or end - start != want:
            raise CheckpointError(
                f"{path}: tensor {name!r} spans bytes [{start}, {end}) but needs {want} bytes "
                f"inside a data section of {data_len} (file truncated or corrupt)"
            )
        spans.append((start, end))
    return header


class Checkpoint(Mapping[str, torch.Tensor]):
    """A read-only, lazily loaded view of a safetensors checkpoint (file or sharded directory).

    Behaves as a mapping from tensor name to tensor; each access memory-maps just that tensor.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._where: dict[str, Path] = {}
        self._info: dict[str, dict[str, Any]] = {}
        self.metadata: dict[str, str] = {}
        if self.path.is_dir():
            index = self.path / INDEX_NAME
            single = self.path / "model.safetensors"
            if index.exists():
                files = self._read_index(index)
            elif single.exists():
                files = [single]
            else:
                found = sorted(self.path.glob("*.safetensors"))
                if not found:
                    raise CheckpointError(f"{self.path}: no {INDEX_NAME} and no .safetensors files")
                files = found
        elif self.path.exists():
            files = [self.path]
        else:
            raise CheckpointError(f"{self.path}: no such checkpoint file or directory")
        for f in files:
            header = _read_header(f)
            self.metadata.update(header.pop("__metadata__", None) or {})
            for name, info in header.items():
                if name in self._where:
                    raise CheckpointError(
                        f"{f}: tensor {name!r} also appears in {self._where[name]}"
                    )
                self._where[name] = f
                self._info[name] = info
        self._handles: dict[Path, Any] = {}

    def _read_index(self, index: Path) -> list[Path]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
        files = sorted({self.path / f for f in weight_map.values()})
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{index}: shard {f.name} is listed but missing")
        return files

    # Mapping interface
    def __getitem__(self, name: str) -> torch.Tensor:
        return self.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    @property
    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self._entry(name)["dtype"]]

    def spec(self, name: str) -> TensorSpec:
        return TensorSpec(name, self.dtype(name), self.shape(name))

    def nbytes(self, name: str) -> int:
        start, end = self._entry(name)["data_offsets"]
        return int(end - start)

    def _entry(self, name: str) -> dict[str, Any]:
        try:
            return self._info[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}") from None

    def get_tensor(self, name: str) -> torch.Tensor:
        """The tensor ``name``, memory-mapped (read-only data; clone before writing to it)."""
        from safetensors import safe_open

        f = self._where.get(name)
        if f is None:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}")
        h = self._handles.get(f)
        if h is None:
            h = self._handles[f] = safe_open(str(f), framework="pt", device="cpu")
        return h.get_tensor(name)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Opens a ``.safetensors`` file or a directory (sharded with an index, or single-file)."""
    return Checkpoint(path)


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Reads a whole checkpoint into memory (cloned tensors)."""
    with open_checkpoint(path) as ck:
        return {n: ck.get_tensor(n).clone() for n in ck.names}


class CheckpointWriter:
    """Writes a checkpoint tensor by tensor, atomically.

    ``out`` is a ``.safetensors`` file path (one file) or a directory (shards named
    ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json`` when there is more
    than one shard, else ``model.safetensors``). Tensors may be written in any order; each must
    match its spec. Use as a context manager: leaving it by an exception removes everything it
    wrote; leaving it normally requires every tensor to have been written, then renames the
    finished files into place.
    """

    def __init__(
        self,
        out: str | os.PathLike[str],
        specs: Sequence[TensorSpec],
        *,
        max_shard_bytes: int = 5 * 2**30,
        metadata: Mapping[str, str] | None = None,
    ):
        self.out = Path(out)
        if max_shard_bytes <= 0:
            raise CheckpointError(f"max_shard_bytes ({max_shard_bytes}) must be > 0")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise CheckpointError("tensor names passed to CheckpointWriter must be unique")
        for s in specs:
            if s.dtype not in _CODES:
                raise CheckpointError(
                    f"tensor {s.name!r} has dtype {s.dtype}, which safetensors cannot store here"
                )
        self._single = self.out.suffix == ".safetensors"
        shards: list[list[TensorSpec]] = [[]]
        size = 0
        for s in specs:
            if not self._single and shards[-1] and size + s.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(s)
            size += s.nbytes
        n = len(shards)
        if self._single:
            self._final = [self.out]
        elif n == 1:
            self._final = [self.out / "model.safetensors"]
        else:
            self._final = [self.out / f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        meta = {"format": "pt", **dict(metadata or {})}
        self._place: dict[str, tuple[int, int, TensorSpec]] = {}
        self._headers: list[bytes] = []
        for i, shard in enumerate(shards):
            header: dict[str, Any] = {"__metadata__": meta}
            offset = 0
            for s in shard:
                header[s.name] = {
                    "dtype": _CODES[s.dtype],
                    "shape": list(s.shape),
                    "data_offsets": [offset, offset + s.nbytes],
                }
                self._place[s.name] = (i, offset, s)
                offset += s.nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            self._headers.append(struct.pack("<Q", len(raw)) + raw)
        self._written: set[str] = set()
        self._files: list[Any] = []
        self._tmp: list[Path] = []
        self._open = False

    @property
    def shard_paths(self) -> list[Path]:
        return list(self._final)

    def __enter__(self) -> CheckpointWriter:
        if not self._single:
            self.out.mkdir(parents=True, exist_ok=True)
        else:
            self.out.parent.mkdir(parents=True, exist_ok=True)
        for final, header in zip(self._final, self._headers, strict=True):
            tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
            self._tmp.append(tmp)
            f = open(tmp, "wb")  # noqa: SIM115 - closed in close()/abort()
            self._files.append(f)
            f.write(header)
        self._open = True
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Writes one tensor at its place."""
        if not self._open:
            raise CheckpointError("CheckpointWriter.write called outside its `with` block")
        if name not in self._place:
            raise CheckpointError(f"tensor {name!r} was not declared to the writer")
        if name in self._written:
            raise CheckpointError(f"tensor {name!r} written twice")
        shard, offset, spec = self._place[name]
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise CheckpointError(
                f"tensor {name!r} has dtype {tensor.dtype} and shape {tuple(tensor.shape)}, "
                f"expected {spec.dtype} and {spec.shape}"
            )
        f = self._files[shard]
        f.seek(len(self._headers[shard]) + offset)
        t = tensor.detach().to("cpu").contiguous()
        if t.numel():
            f.write(memoryview(t.view(torch.uint8).reshape(-1).numpy()))
        self._written.add(name)

    def close(self) -> None:
        missing = [n for n in self._place if n not in self._written]
        if missing:
            self.abort()
            raise CheckpointError(
                f"{len(missing)} declared tensor(s) never written (first: {missing[0]!r}); "
                "no output was produced"
            )
        for f in self._files:
            f.flush()
            os.fsync(f.fileno())
            f.close()
        if not self._single and len(self._final) > 1:
            weight_map = {n: self._final[i].name for n, (i, _, _) in self._place.items()}
            total = sum(s.nbytes for _, _, s in self._place.values())
            index_tmp = self.out / f".{INDEX_NAME}.tmp-{os.getpid()}"
            index_tmp.write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
            )
            self._tmp.append(index_tmp)
            self._final = [*self._final, self.out / INDEX_NAME]
        for tmp, final in zip(self._tmp, self._final, strict=True):
            os.replace(tmp, final)
        self._open = False

    def abort(self) -> None:
        for f in self._files:
            if not f.closed:
                f.close()
        for tmp in self._tmp:
            tmp.unlink(missing_ok=True)
        self._open = False

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()


def save_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    out: str | os.PathLike[str],
    *,
    max_shard_bytes: int = 5 * 2**30,
    metadata: Mapping[str, str] | None = None,
) -> list[Path]:
    """Writes a state dict as a safetensors file or sharded directory, atomically."""
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in state_dict.items()]
    w = CheckpointWriter(out, specs, max_shard_bytes=max_shard_bytes, metadata=metadata)
    with w:
        for n, t in state_dict.items():
            w.write(n, t)
    return w.shard_paths


def iter_tensors(path: str | os.PathLike[str]) -> Iterable[tuple[str, torch.Tensor]]:
    """Yields ``(name, tensor)`` pairs of a checkpoint one at a time (memory-mapped)."""
    with open_checkpoint(path) as ck:
        for n in ck.names:
            yield n, ck.get_tensor(n)
