"""Reading tensors lazily from safetensors (or weights-only pickle) files, writing them atomically."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from smoe.checkpoint.formats import CheckpointError


class TensorFiles:
    """All tensors of a checkpoint directory by name, opened lazily (memory-mapped)."""

    def __init__(self, path: Path, fmt: str):
        self.path = path
        self._where: dict[str, object] = {}  # name -> open safetensors handle or loaded dict
        files = sorted(path.glob("*.safetensors"))
        if fmt == "consolidated":
            files = [f for f in files if f.name.startswith("consolidated")] or files
        if files:
            for f in files:
                handle = self._open(f)
                for k in handle.keys():
                    self._where[k] = handle
            self._check_index()
        else:
            pickles = sorted(path.glob("*.bin")) + sorted(path.glob("*.pth"))
            if not pickles:
                raise CheckpointError(f"{path} has a config but no weight files (*.safetensors, *.bin, *.pth)")
            for f in pickles:
                state = self._load_pickle(f)
                for k in state:
                    self._where[k] = state

    @staticmethod
    def _open(file: Path):
        try:
            return safe_open(str(file), framework="pt", device="cpu")
        except (SafetensorError, OSError, Exception) as e:  # safetensors raises several types
            raise CheckpointError(f"{file} is not a readable safetensors file (truncated or corrupt?): {e}") from None

    @staticmethod
    def _load_pickle(file: Path) -> dict:
        try:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise CheckpointError(f"{file} could not be loaded as weights only (pickle files are never "
                                  f"unpickled in full): {e}") from None

    def _check_index(self) -> None:
        index = self.path / "model.safetensors.index.json"
        if not index.exists():
            return
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
        missing = sorted(set(weight_map.values()) - {p.name for p in self.path.glob("*.safetensors")})
        if missing:
            raise CheckpointError(f"{index} names shard files that are missing: {', '.join(missing)}")

    def keys(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        src = self._where[name]
        if isinstance(src, dict):
            return tuple(src[name].shape)
        return tuple(src.get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        src = self._where[name]
        try:
            return src[name] if isinstance(src, dict) else src.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{self.path}: tensor {name} could not be read (truncated file?): {e}") from None


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like '5GB', '500MB'."""
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    for unit, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6),
                       ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


@contextmanager
def atomic_path(final: Path):
    """Yield a temporary path beside `final`; on success fsync it and rename it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_json(file: Path, obj: dict) -> None:
    with atomic_path(file) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], max_shard_size: int | str,
                      single_name: str) -> None:
    """Write tensors into shards of at most max_shard_size bytes (an index when more than one)."""
    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    n = len(shards)
    stem = single_name.removesuffix(".safetensors")
    names = [single_name] if n == 1 else [f"{stem}-{j + 1:05d}-of-{n:05d}.safetensors" for j in range(n)]
    for old in path.glob(f"{stem}*.safetensors"):  # shards of an earlier save would be read back
        if old.name not in names:
            old.unlink()
    weight_map = {}
    for shard, fname in zip(shards, names):
        with atomic_path(path / fname) as tmp:
            save_file({k: v.detach().contiguous().clone() for k, v in shard.items()}, str(tmp),
                      metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    index = path / f"{stem}.safetensors.index.json"
    if n > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        write_json(index, {"metadata": {"total_size": total}, "weight_map": weight_map})
    elif index.exists():
        index.unlink()
