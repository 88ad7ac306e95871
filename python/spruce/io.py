"""Checkpoint I/O: safetensors files and sharded directories, read lazily and written atomically.

Reading memory-maps the files (``safetensors.safe_open``): :meth:`Checkpoint.get` returns one
tensor backed by the page cache, so a whole model is never loaded at once. Writing streams: the
header of every shard is laid out up front from the tensors' names, dtypes and shapes, then each
tensor is written at its offset as it is produced, into temporary files that are renamed into
place only when every tensor has been written. An error or interruption leaves no partial output.

A producer that fills tensors in file order can write them without a copy and in the background:
:meth:`CheckpointWriter.slot` lends a reusable buffer laid out like the tensor's place in its file,
:meth:`CheckpointWriter.commit` hands it to a writer thread that appends it with direct I/O (whole
blocks, bypassing the page cache) while the producer fills the next slot. Two slots exist, so at
most two tensors are in flight.
"""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
import struct
import threading
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
#: Alignment of direct I/O (file offsets, lengths and memory): the page size covers every block
#: size Linux file systems use.
_BLOCK = mmap.PAGESIZE


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
        self._streams: list[_Stream] = []
        self._slots: list[_Slot] = []
        self._lent: dict[str, _Slot] = {}
        self._last: _Slot | None = None
        self._turns = 0

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
            f.flush()
            self._streams.append(_Stream(tmp, f, header))
        self._open = True
        return self

    def _check(self, name: str) -> tuple[int, int, TensorSpec]:
        if not self._open:
            raise CheckpointError("CheckpointWriter.write called outside its `with` block")
        if name not in self._place:
            raise CheckpointError(f"tensor {name!r} was not declared to the writer")
        if name in self._written or name in self._lent:
            raise CheckpointError(f"tensor {name!r} written twice")
        return self._place[name]

    def slot(self, name: str) -> torch.Tensor:
        """A buffer of tensor ``name``'s dtype and shape to fill, then :meth:`commit`.

        The buffer is reused for later tensors once its content is written: fill it and commit it
        before asking for the slot after next. Waits while both slots are being written.
        """
        shard, offset, spec = self._check(name)
        if len(self._lent) >= 2:
            raise CheckpointError("CheckpointWriter.slot: commit a lent slot before taking a third")
        if not self._slots:
            size = max((s.nbytes for _, _, s in self._place.values()), default=0)
            self._slots = [_Slot(size + 2 * _BLOCK) for _ in range(2)]
        # The free slot whose write was queued first (its write is the likelier to be done).
        slot = min((s for s in self._slots if s not in self._lent.values()), key=lambda s: s.turn)
        slot.wait()
        # The data starts at the file offset's position within a block, so that direct I/O can
        # write whole blocks straight from the slot.
        phase = (len(self._headers[shard]) + offset) % _BLOCK
        self._lent[name] = slot
        slot.phase, slot.nbytes = phase, spec.nbytes
        if not spec.nbytes:
            return torch.empty(spec.shape, dtype=spec.dtype)
        flat = torch.frombuffer(slot.mem, dtype=torch.uint8, count=spec.nbytes, offset=phase)
        return flat.view(spec.dtype).view(spec.shape)

    def commit(self, name: str) -> None:
        """Queues the filled slot of ``name`` to be written in the background."""
        slot = self._lent.pop(name, None)
        if slot is None:
            raise CheckpointError(f"CheckpointWriter.commit: no slot was lent for {name!r}")
        shard, offset, _ = self._place[name]
        self._written.add(name)
        stream = self._streams[shard]
        pos = len(self._headers[shard]) + offset
        # Writes run one after the other, in commit order (file order for a producer that
        # follows it), each on its own thread that first waits for the one before.
        prev, self._last = self._last, slot
        self._turns += 1
        slot.turn = self._turns
        slot.start(lambda: stream.put(slot, pos), after=prev)

    def _drain(self) -> None:
        """Waits for every background write; raises the first error one met."""
        errors = []
        for s in self._slots:
            try:
                s.wait()
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)
        if errors:
            raise errors[0]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Writes one tensor at its place."""
        shard, offset, spec = self._check(name)
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise CheckpointError(
                f"tensor {name!r} has dtype {tensor.dtype} and shape {tuple(tensor.shape)}, "
                f"expected {spec.dtype} and {spec.shape}"
            )
        t = tensor.detach().to("cpu").contiguous()
        self._drain()
        self._streams[shard].buffered()
        f = self._files[shard]
        f.seek(len(self._headers[shard]) + offset)
        if t.numel():
            f.write(memoryview(t.view(torch.uint8).reshape(-1).numpy()))
        f.flush()
        self._written.add(name)

    def close(self) -> None:
        try:
            self._drain()
        except BaseException:
            self.abort()
            raise
        missing = [n for n in self._place if n not in self._written]
        if missing:
            self.abort()
            raise CheckpointError(
                f"{len(missing)} declared tensor(s) never written (first: {missing[0]!r}); "
                "no output was produced"
            )
        try:
            for st in self._streams:
                st.finish()
        except BaseException:
            self.abort()
            raise
        self._release_slots()
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

    def _release_slots(self) -> None:
        for st in self._streams:
            st.close()
        self._lent.clear()
        self._slots = []
        self._last = None

    def abort(self) -> None:
        for s in self._slots:
            try:
                s.wait()
            except BaseException:  # noqa: BLE001, S110 - the output is discarded anyway
                pass
        self._release_slots()
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


class _Slot:
    """A reusable page-aligned buffer and the background write of its content (one at a time)."""

    def __init__(self, size: int):
        self.mem = mmap.mmap(-1, max(size, _BLOCK))
        self.phase = 0
        self.nbytes = 0
        self.turn = 0
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self, job: Any, after: _Slot | None = None) -> None:
        """Runs ``job`` on a thread, once the write of ``after`` (if any) has ended."""
        before = None if after is None or after is self else after._thread

        def run() -> None:
            try:
                if before is not None:
                    before.join()
                job()
            except BaseException as e:  # noqa: BLE001 - handed to the producer in wait()
                self._error = e

        self._thread = threading.Thread(target=run, name="spruce-writer", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Waits for the write in progress; raises its error (once)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        err, self._error = self._error, None
        if err is not None:
            raise err


class _Stream:
    """Appends to one temporary shard file with direct I/O while the writes come in file order.

    Direct I/O writes whole blocks from block-aligned memory at block-aligned offsets: the bytes of
    the last, partial block (``carry``) wait for the next write, which copies them in front of its
    data in the slot (the slot places the data at its file offset's phase). A write out of order,
    or a file system without direct I/O, falls back to buffered writes for the rest of the file.
    """

    def __init__(self, path: Path, f: Any, header: bytes):
        self.f = f
        self.pos = len(header)
        self.carry = header[len(header) - len(header) % _BLOCK :]
        self.lock = threading.Lock()
        self.fd: int | None = None
        direct = getattr(os, "O_DIRECT", 0)
        if direct:
            try:
                self.fd = os.open(path, os.O_WRONLY | direct)
            except OSError:
                self.fd = None

    def put(self, slot: _Slot, pos: int) -> None:
        """Writes ``slot.nbytes`` bytes of the slot (at ``slot.phase``) at file offset ``pos``."""
        with self.lock:
            view = memoryview(slot.mem)
            n, phase = slot.nbytes, slot.phase
            if self.fd is not None and pos == self.pos and phase == len(self.carry):
                view[:phase] = self.carry
                total = phase + n
                full = total - total % _BLOCK
                try:
                    _pwrite_all(self.fd, view[:full], pos - phase)
                except OSError as e:
                    if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                        raise
                    # a file system that opens with O_DIRECT but refuses the write: write the
                    # same bytes buffered, and stay buffered
                    os.close(self.fd)
                    self.fd, self.carry = None, b""
                    _pwrite_all(self.f.fileno(), view[:total], pos - phase)
                    return
                self.carry = bytes(view[full:total])
                self.pos = pos + n
            else:
                self._buffered_locked()
                _pwrite_all(self.f.fileno(), view[phase : phase + n], pos)

    def buffered(self) -> None:
        """Leaves direct I/O: the pending partial block is written, later writes are buffered."""
        with self.lock:
            self._buffered_locked()

    def _buffered_locked(self) -> None:
        if self.fd is not None:
            if self.carry:
                _pwrite_all(self.f.fileno(), memoryview(self.carry), self.pos - len(self.carry))
            os.close(self.fd)
            self.fd = None
        self.carry = b""

    def finish(self) -> None:
        """Writes the last partial block (padded to a whole block, then truncated back)."""
        with self.lock:
            if self.fd is None or not self.carry:
                return
            block = mmap.mmap(-1, _BLOCK)
            try:
                block[: len(self.carry)] = self.carry
                _pwrite_all(self.fd, memoryview(block), self.pos - len(self.carry))
            finally:
                block.close()
            os.ftruncate(self.fd, self.pos)
            self.carry = b""

    def close(self) -> None:
        with self.lock:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None


def _pwrite_all(fd: int, data: memoryview, pos: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, pos)
        data, pos = data[n:], pos + n


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
