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
import math
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch

from clipstyle.errors import WeightsError, require_file

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


class _ArchiveUnpickler(pickle.Unpickler):
    """Rebuilds tensors and TorchScript objects' attributes; any other global is refused.

    Memory stays proportional to the file: each storage is read once, and a
    tensor may not hold more elements than its storage (a stride-0 record could
    otherwise claim terabytes), nor all tensors together more than twice the
    storages' bytes.
    """

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str):
        import io

        super().__init__(io.BytesIO(data))
        self._archive = archive
        self._prefix = prefix
        self._classes: dict[str, type] = {}
        self._storages: dict[str, torch.Tensor] = {}
        self._budget = 1 << 20  # bytes that rebuilt tensors may still take

    def find_class(self, module: str, name: str):
        if module.startswith("__torch__"):
            key = f"{module}.{name}"
            if key not in self._classes:
                self._classes[key] = type(name, (_ScriptObject,), {})
            return self._classes[key]
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return self._rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name}")

    def _rebuild_tensor(self, flat, offset, size, stride, *_):
        size, stride = tuple(size), tuple(stride)
        if (
            not isinstance(flat, torch.Tensor)
            or len(size) != len(stride)
            or not all(type(v) is int and v >= 0 for v in (offset, *size, *stride))
        ):
            raise pickle.UnpicklingError("malformed tensor record")
        numel = math.prod(size)
        nbytes = numel * flat.element_size()
        if numel > flat.numel() or nbytes > self._budget:
            raise pickle.UnpicklingError("tensor record larger than its storage")
        self._budget -= nbytes
        return flat.as_strided(size, stride, offset).clone()

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
            raise pickle.UnpicklingError("unexpected persistent id")
        dtype, key = pid[1], str(pid[2])
        if not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError("unknown storage type")
        if key not in self._storages:
            raw = _read_entry(self._archive, f"{self._prefix}/data/{key}")
            self._budget += 2 * len(raw)
            self._storages[key] = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        storage = self._storages[key]
        return storage if storage.dtype == dtype else storage.view(dtype)


def _check_pickle_stream(data: bytes) -> None:
    """Walk the opcodes without building anything. Python's own unpickler allocates
    what a length field claims before reading it, so one flipped byte could ask
    for gigabytes; here a length past the end of the data is an error."""
    import io
    import pickletools

    try:
        for _ in pickletools.genops(io.BytesIO(data)):
            pass
    except Exception as exc:  # noqa: BLE001 - ValueError for most malformations
        raise ValueError(f"malformed pickle data: {_first_line(exc)}") from None


def _read_entry(archive: zipfile.ZipFile, name: str) -> bytes:
    """An archive member, refusing compression bombs (torch writes members uncompressed)."""
    info = archive.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > 64 * info.compress_size + (1 << 20):
        raise pickle.UnpicklingError(
            f"{name} expands {info.file_size // max(info.compress_size, 1)}-fold (a compression bomb)"
        )
    return archive.read(info)


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
    """A zip archive with a ``code/`` folder: TorchScript (torch.jit.save), not torch.save."""
    try:
        with zipfile.ZipFile(path) as zf:
            return any("/code/" in n for n in zf.namelist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return False


def _is_safetensors(path: Path) -> bool:
    """safetensors starts with an 8-byte little-endian header length, then a JSON object."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= 100_000_000


def _first_line(exc: BaseException) -> str:
    """The first sentence of an exception's message; its type where the message says nothing
    (a corrupt pickle can raise ``KeyError(101)``)."""
    text = str(exc).strip().splitlines()[0].strip() if str(exc).strip() else ""
    text = text.split(". ")[0].rstrip(".")
    if len(text) < 8 or isinstance(exc, KeyError):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text[:160]


def read_torchscript_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The parameters and buffers of a TorchScript archive, by dotted name."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if not names:
                raise WeightsError("TorchScript archive without data.pkl", path)
            prefix = names[0].split("/")[0]
            data = _read_entry(zf, names[0])
            _check_pickle_stream(data)
            root = _ArchiveUnpickler(data, zf, prefix).load()
            tensors: dict[str, torch.Tensor] = {}
            _collect_tensors(root, "", tensors, set())
    except WeightsError:
        raise
    except pickle.UnpicklingError as exc:
        if str(exc).startswith("GLOBAL "):
            raise WeightsError(
                f"refused: it holds Python objects besides tensors ({str(exc)[7:]}), and loading it could run code",
                path,
            ) from None
        raise WeightsError(f"refused: {_first_line(exc)}", path) from None
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: zip, pickle and tensor errors of every kind
        raise WeightsError(f"not a readable TorchScript weights archive ({_first_line(exc)})", path) from None
    return tensors


def _torch_load(path: Path):
    """``torch.load(weights_only=True)``, memory-mapped where the format allows.

    Mapped, a tensor is read from the page cache only when used: VGG-19's
    classifier (480 MB of the 548 MB file) is never read, and the rest is read
    once, by the copy that load_into makes. Files from before torch 1.6 (not a
    zip archive) cannot be mapped and are read whole.
    """
    if zipfile.is_zipfile(path):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return torch.load(path, map_location="cpu", weights_only=True)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat name -> tensor mapping from any of the supported formats."""
    path = Path(path)
    require_file(path, "weights", WeightsError)
    if path.suffix == ".safetensors" or _is_safetensors(path):
        try:
            from safetensors.torch import load_file

            data = load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise WeightsError(f"not a readable safetensors file ({_first_line(exc)})", path) from None
    elif is_torchscript_archive(path):
        data = read_torchscript_tensors(path)
    else:
        try:
            with warnings.catch_warnings():  # the library never prints; torch warns about pickle protocols
                warnings.simplefilter("ignore")
                data = _torch_load(path)
        except pickle.UnpicklingError as exc:
            # torch's weights-only unpickler names a refused class "GLOBAL module.name";
            # any other failure of it is plain corruption.
            found = re.search(r"GLOBAL ([\w.]+)", str(exc))
            if found:
                raise WeightsError(
                    f"refused: it holds Python objects besides tensors ({found.group(1)}),"
                    " and loading it could run code",
                    path,
                ) from None
            detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(exc))
            reason = detail.group(1).strip() if detail else _first_line(exc)
            raise WeightsError(
                "not a readable weights file: expected a PyTorch state dict, safetensors or a"
                f" TorchScript archive (corrupt pickle data: {reason[:120]})",
                path,
            ) from None
        except Exception as exc:  # noqa: BLE001 - corrupt files fail with many error types
            raise WeightsError(
                "not a readable weights file: expected a PyTorch state dict, safetensors or a"
                f" TorchScript archive ({_first_line(exc)})",
                path,
            ) from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()
    ):
        raise WeightsError("expected a state dict (a mapping of names to tensors)", path)
    if data and all(k.startswith("module.") for k in data):
        data = {k[len("module.") :]: v for k, v in data.items()}
    return data


def describe_mismatch(expected: dict[str, tuple], found: dict[str, tuple]) -> str | None:
    """What differs between two name -> shape mappings, in one line; None if nothing does."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [k for k in expected if k in found and found[k] != expected[k]]
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensors missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if wrong:
        k = wrong[0]
        parts.append(f"{len(wrong)} of another shape (e.g. {k}: {found[k]} instead of {expected[k]})")
    return "; ".join(parts) or None


def load_into(module: torch.nn.Module, state: dict, path: str | Path, what: str, ignore: tuple[str, ...] = ()) -> None:
    """Copy ``state`` into ``module``; any missing, extra or mis-shaped tensor is a WeightsError.

    The module's tensors are replaced by copies of the file's (in the module's
    dtypes), so ``module`` may be built on the meta device: nothing is spent
    initialising weights that are overwritten at once, and nothing stays
    mapped to the file.
    """
    expected = module.state_dict()
    state = {k: v for k, v in state.items() if k not in ignore}
    mismatch = describe_mismatch(
        {k: tuple(v.shape) for k, v in expected.items()}, {k: tuple(v.shape) for k, v in state.items()}
    )
    if mismatch:
        raise WeightsError(f"not {what} weights: {mismatch}", path)
    converted = {}
    for k, target in expected.items():
        device = torch.device("cpu") if target.is_meta else target.device
        converted[k] = state[k].to(device=device, dtype=target.dtype, memory_format=torch.contiguous_format, copy=True)
    module.load_state_dict(converted, strict=True, assign=True)
