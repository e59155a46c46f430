"""Weight and style files (issue 5): nothing in a file is ever executed, and a
missing, corrupt or foreign file gives one line naming it and what was expected."""

from __future__ import annotations

import collections
import io
import os
import pickle
import random
import struct
import zipfile

import pytest
import torch
from torch import nn

from clipstyle.errors import WeightsError
from clipstyle.method.unet import StyleNet
from clipstyle.models.weights import is_torchscript_archive, load_into, read_state_dict

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.save` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning"),
]


class Payload:
    """Unpickling this would run a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


class OpenPayload:
    """Unpickling this would create ``marker`` without a shell, through builtins.open."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def refused(path, *words):
    with pytest.raises(WeightsError) as e:
        read_state_dict(path)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    for word in words:
        assert word in message, message
    return message


@pytest.mark.parametrize("payload", [Payload, OpenPayload])
def test_malicious_torch_save_file_is_refused(tmp_path, payload):
    marker = tmp_path / "pwned"
    path = tmp_path / "style.pt"
    torch.save({"weight": torch.zeros(2), "extra": payload(marker)}, path)  # torch.save's zip layout
    assert zipfile.is_zipfile(path)
    refused(path, "refused", "could run code")
    assert not marker.exists()


@pytest.mark.parametrize("payload", [Payload, OpenPayload])
def test_malicious_plain_pickle_is_refused(tmp_path, payload):
    marker = tmp_path / "pwned"
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        path = tmp_path / f"weights{protocol}.pth"
        path.write_bytes(pickle.dumps({"weight": payload(marker)}, protocol=protocol))
        message = refused(path)
        # torch's weights-only reader names the class, or stops earlier at an opcode it does not take
        assert "refused: it holds Python objects" in message or "corrupt pickle data" in message
    assert not marker.exists()


def _torchscript_like(path, data_pkl: bytes, with_code: bool = True) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", data_pkl)
        if with_code:
            zf.writestr("archive/code/__torch__/model.py", "def forward(self, x):\n    return x\n")
        zf.writestr("archive/version", "3\n")


@pytest.mark.parametrize("payload", [Payload, OpenPayload])
@pytest.mark.parametrize("with_code", [True, False])
def test_torchscript_like_archive_calling_os_system_is_refused(tmp_path, payload, with_code):
    marker = tmp_path / "pwned"
    path = tmp_path / "ViT-B-32.pt"
    _torchscript_like(path, pickle.dumps(payload(marker), protocol=2), with_code)
    assert is_torchscript_archive(path) == with_code  # with code/: our unpickler; without: torch's
    message = refused(path, "refused: it holds Python objects besides tensors", "could run code")
    assert "system" in message or "open" in message
    assert not marker.exists()


def test_torchscript_object_disguised_as_torch_class_runs_nothing(tmp_path):
    """A REDUCE on a class the restricted unpickler stands in for fails instead of calling anything."""
    marker = tmp_path / "pwned"
    evil = (
        b"\x80\x02c__torch__.os\nsystem\nq\x00X"
        + len(f"touch {marker}").to_bytes(4, "little")
        + f"touch {marker}".encode()
        + b"\x85R."
    )  # __torch__.os.system("touch marker")
    path = tmp_path / "m.pt"
    _torchscript_like(path, evil)
    refused(path, "TorchScript")
    assert not marker.exists()


def test_real_torchscript_archive_is_read_without_running_it(tmp_path):
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(3, 2)
            self.register_buffer("scale", torch.tensor([2.0]))

        def forward(self, x):
            return self.proj(x) * self.scale

    torch.manual_seed(0)
    module = Tiny()
    path = tmp_path / "tiny.pt"
    torch.jit.save(torch.jit.script(module), str(path))
    assert is_torchscript_archive(path)
    tensors = read_state_dict(path)
    assert set(tensors) == set(module.state_dict())
    for name, value in module.state_dict().items():
        assert torch.equal(tensors[name], value)
    fresh = Tiny()
    load_into(fresh, tensors, path, "Tiny")
    assert torch.equal(fresh.proj.weight, module.proj.weight)


def test_missing_empty_folder_text_truncated(tmp_path):
    refused(tmp_path / "nope.pt", "not found")
    refused(tmp_path, "not a file")
    (tmp_path / "empty.pt").write_bytes(b"")
    refused(tmp_path / "empty.pt", "empty")
    (tmp_path / "readme.pt").write_text("see https://example.com for the weights")
    refused(tmp_path / "readme.pt", "expected a PyTorch state dict, safetensors or a TorchScript archive")
    torch.save({"w": torch.ones(64)}, tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "half.pt").write_bytes(data[: len(data) // 2])
    refused(tmp_path / "half.pt", "not a readable weights file")


def test_not_a_state_dict(tmp_path):
    for name, obj in (
        ("list.pt", [torch.ones(2)]),
        ("ints.pt", {1: torch.ones(2)}),
        ("mixed.pt", {"w": torch.ones(2), "epoch": 3}),
        ("tensor.pt", torch.ones(2)),
    ):
        torch.save(obj, tmp_path / name)
        refused(tmp_path / name, "expected a state dict")


def test_checkpoint_wrappers_are_unwrapped(tmp_path):
    torch.save(
        {"state_dict": {"module.a": torch.ones(2), "module.b": torch.zeros(1)}, "epoch": 3}, tmp_path / "ckpt.pt"
    )
    state = read_state_dict(tmp_path / "ckpt.pt")
    assert sorted(state) == ["a", "b"] and torch.equal(state["a"], torch.ones(2))


def test_safetensors_by_suffix_or_by_content(tmp_path):
    from safetensors.torch import save_file

    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    save_file(tensors, str(tmp_path / "w.safetensors"))
    assert torch.equal(read_state_dict(tmp_path / "w.safetensors")["a"], tensors["a"])
    save_file(tensors, str(tmp_path / "w.bin"))  # renamed safetensors file: recognised by its header
    assert torch.equal(read_state_dict(tmp_path / "w.bin")["a"], tensors["a"])
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-8])
    refused(tmp_path / "cut.safetensors", "not a readable safetensors file")
    torch.save(tensors, tmp_path / "pickled.safetensors")
    refused(tmp_path / "pickled.safetensors", "safetensors")


def test_style_file_for_another_architecture_names_file_and_expected(tmp_path):
    net = StyleNet()
    path = tmp_path / "style.safetensors"
    state = read_state_dict_roundtrip(tmp_path, StyleNet(width=8).state_dict())
    with pytest.raises(WeightsError) as e:
        load_into(net, state, path, "StyleNet")
    message = str(e.value)
    assert message.startswith(f"{path}: not StyleNet weights: ") and "of another shape" in message
    assert "\n" not in message
    with pytest.raises(WeightsError) as e:
        load_into(net, {"fc.weight": torch.ones(2)}, path, "StyleNet")
    assert "tensors missing" in str(e.value) and "unexpected (e.g. fc.weight)" in str(e.value)
    good = StyleNet()
    load_into(net, read_state_dict_roundtrip(tmp_path, good.state_dict()), path, "StyleNet")
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), good.state_dict().values()))


def read_state_dict_roundtrip(tmp_path, state):
    path = tmp_path / "roundtrip.pt"
    torch.save(state, path)
    return read_state_dict(path)


class _StorageRef:
    pass


class _Rebuild:
    """Pickles as torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)."""

    def __init__(self, storage, size, stride):
        self.args = (storage, 0, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


class _ArchivePickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", torch.FloatStorage, "0", "cpu", 4)
        return None


def _archive_with_tensor_record(path, size, stride, compress=False):
    buf = io.BytesIO()
    _ArchivePickler(buf, protocol=2).dump({"w": _Rebuild(_StorageRef(), size, stride)})
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", buf.getvalue())
        zf.writestr("archive/code/__torch__/m.py", "")
        kind = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
        zf.writestr("archive/data/0", struct.pack("<4f", 1, 2, 3, 4), compress_type=kind)


def test_torchscript_tensor_records_are_read_and_bounded(tmp_path):
    ok = tmp_path / "ok.pt"
    _archive_with_tensor_record(ok, (2, 2), (2, 1))
    assert torch.equal(_read_w(ok), torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    # stride 0 lets a 16-byte storage claim 2^40 elements: refused, nothing allocated
    bomb = tmp_path / "bomb.pt"
    _archive_with_tensor_record(bomb, (2**20, 2**20), (0, 0))
    refused(bomb, "larger than its storage")


def test_compression_bomb_inside_an_archive_is_refused(tmp_path):
    path = tmp_path / "zipbomb.pt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02}q\x00." + bytes(20 << 20))  # 20 MB of zeros, ~20 kB stored
        zf.writestr("archive/code/__torch__/m.py", "")
    assert path.stat().st_size < 100_000
    refused(path, "compression bomb")


def _read_w(path):
    """The tensor ``w`` of a hand-made archive whose root is a plain dict."""
    from clipstyle.models.weights import _ArchiveUnpickler

    with zipfile.ZipFile(path) as zf:
        return _ArchiveUnpickler(zf.read("archive/data.pkl"), zf, "archive").load()["w"]


class _Fuzzed(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return self.proj(x)


def _read_and_load(path):
    """The state dict that ``path`` gives and the module it loads into, or the WeightsError
    that refuses it; any other exception propagates."""
    try:
        state = read_state_dict(path)
        module = _Fuzzed()
        load_into(module, state, path, "Fuzzed")
    except WeightsError as exc:
        return exc, None
    return state, module


def _mutate(data: bytes, rng: random.Random, cut: bool) -> tuple[bytes, str]:
    """1 to 6 random bytes set and, if ``cut``, the end cut off; with the mutation in words."""
    data = bytearray(data)
    steps = []
    for _ in range(rng.randint(1, 6)):
        at, value = rng.randrange(len(data)), rng.randrange(256)
        steps.append(f"byte {at} {data[at]:#04x}->{value:#04x}")
        data[at] = value
    if cut:
        end = rng.randrange(1, len(data))
        steps.append(f"cut to {end} of {len(data)} bytes")
        data = data[:end]
    return bytes(data), ", ".join(steps)


def test_corrupted_torchscript_archives_read_and_load_or_fail_with_one_line(tmp_path):
    """Every mutated archive either reads as a state dict that loads (a harmless flip) or is
    refused with one WeightsError line naming it; any other exception fails, naming the mutation.
    Runs last: without the bounds tested above, a flipped byte can claim terabytes."""
    original = _Fuzzed()
    good = tmp_path / "good.pt"
    torch.jit.save(torch.jit.script(original), str(good))
    with zipfile.ZipFile(good) as zf:
        parts = {n: zf.read(n) for n in zf.namelist()}
    data_name = next(n for n in parts if n.endswith("/data.pkl"))

    def archive(path, pkl):
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in parts.items():
                zf.writestr(name, pkl if name == data_name else data)
        return path

    # unmutated, the rebuilt archive loads: what the mutated ones give is the mutations' doing
    state, module = _read_and_load(archive(tmp_path / "control.pt", parts[data_name]))
    assert module is not None, state
    for name, tensor in original.state_dict().items():
        assert torch.equal(module.state_dict()[name], tensor), name
    rng = random.Random(3)
    outcomes = collections.Counter()
    for i in range(30):
        pkl, mutation = _mutate(parts[data_name], rng, cut=i % 3 == 0)
        path = archive(tmp_path / f"bad{i}.pt", pkl)
        mutation = f"{path.name} ({data_name}: {mutation})"
        try:
            result, module = _read_and_load(path)
        except Exception as exc:  # noqa: BLE001 - the failure this test exists for, named
            pytest.fail(f"{mutation}: {type(exc).__name__} instead of WeightsError: {exc}")
        if module is None:
            message = str(result)
            assert message.startswith(f"{path}: ") and "\n" not in message, f"{mutation}: {message!r}"
            outcomes["refused"] += 1
        else:
            assert isinstance(result, dict) and set(result) == set(module.state_dict()), f"{mutation}: {result!r}"
            for name, tensor in module.state_dict().items():
                assert torch.equal(tensor, result[name].to(tensor.dtype)), f"{mutation}: {name}"
            outcomes["loaded"] += 1
    assert outcomes["refused"], outcomes  # the mutations did corrupt: the refusals were checked
