"""Reading weight files without executing code from them.

Three formats are read, none with Python's unrestricted unpickler:
- safetensors files;
- ``torch.save`` state dicts, through ``torch.load(weights_only=True)``;
- TorchScript archives such as OpenAI's original CLIP ``.pt`` files, through a
  restricted unpickler that only rebuilds tensors and plain containers, and
  never compiles or runs the archive's code.
"""

from __future__ import annotations

import collections
import pickle
import zipfile
from pathlib import Path

import torch

from clipstyle.errors import WeightsError

_STORAGE_DTYPES = {
    "HalfStorage": torch.float16,
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _ScriptObject:
    """Stand-in for a TorchScript class: keeps its attributes, runs nothing."""

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.__dict__.update(state)


def _rebuild_tensor(flat, offset, size, stride, *_):
    return flat.as_strided(tuple(size), tuple(stride), offset).clone()


class _ArchiveUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str):
        import io

        super().__init__(io.BytesIO(data))
        self._archive = archive
        self._prefix = prefix
        self._classes: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        if module.startswith("__torch__"):
            key = f"{module}.{name}"
            if key not in self._classes:
                self._classes[key] = type(name, (_ScriptObject,), {})
            return self._classes[key]
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"refused global {module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError("unexpected persistent id")
        dtype, key = pid[1], pid[2]
        if not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError("unknown storage type")
        raw = self._archive.read(f"{self._prefix}/data/{key}")
        if not raw:
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(bytearray(raw), dtype=dtype)


def _collect_tensors(obj, prefix: str, out: dict, seen: set) -> None:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, _ScriptObject):
        for name, value in vars(obj).items():
            _collect_tensors(value, f"{prefix}.{name}" if prefix else name, out, seen)


def is_torchscript_archive(path: str | Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return any("/code/" in n for n in zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def read_torchscript_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The parameters and buffers of a TorchScript archive, by dotted name."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if not names:
                raise WeightsError("TorchScript archive without data.pkl", path)
            prefix = names[0].split("/")[0]
            root = _ArchiveUnpickler(zf.read(names[0]), zf, prefix).load()
    except WeightsError:
        raise
    except (pickle.UnpicklingError, zipfile.BadZipFile, KeyError, EOFError, ValueError, RuntimeError) as exc:
        raise WeightsError(f"not a readable TorchScript weights archive ({exc})", path) from None
    tensors: dict[str, torch.Tensor] = {}
    _collect_tensors(root, "", tensors, set())
    return tensors


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat name -> tensor mapping from any of the supported formats."""
    path = Path(path)
    if not path.exists():
        raise WeightsError("weights file not found", path)
    if not path.is_file():
        raise WeightsError("weights path is not a file", path)
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file

            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise WeightsError(f"not a readable safetensors file ({exc})", path) from None
    if is_torchscript_archive(path):
        return read_torchscript_tensors(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else "unpickling failed"
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            reason = "it holds Python objects besides tensors, and loading it could run code"
        raise WeightsError(f"refused: {reason}", path) from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsError(f"not a readable PyTorch weights file ({first})", path) from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise WeightsError("expected a state dict (a mapping of names to tensors)", path)
    if data and all(k.startswith("module.") for k in data):
        data = {k[len("module."):]: v for k, v in data.items()}
    return data


def load_into(module: torch.nn.Module, state: dict, path: str | Path, what: str,
              ignore: tuple[str, ...] = ()) -> None:
    """Copy ``state`` into ``module``; any missing, extra or mis-shaped tensor is a WeightsError."""
    expected = module.state_dict()
    state = {k: v for k, v in state.items() if k not in ignore}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensors missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} of another shape (e.g. {k}: {tuple(state[k].shape)}"
                         f" instead of {tuple(expected[k].shape)})")
        raise WeightsError(f"not {what} weights: {'; '.join(parts)}", path)
    converted = {k: state[k].to(expected[k].dtype) for k in expected}
    module.load_state_dict(converted, strict=True)
