"""make demo without weights, and the example scripts for clusters (issue 16, items 15 and 16)."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from clipstyle.errors import WeightsError
from clipstyle.models.loading import load_models

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """Empty caches, and every download fails at once; the list records the attempts."""
    import open_clip.factory
    import torch.hub

    tried = []

    def no_network(what):
        def fail(*args, **kwargs):
            tried.append(what)
            raise OSError("network is unreachable")

        return fail

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr("clipstyle.models.loading.hub_unreachable", lambda: None)  # the downloads are tried
    monkeypatch.setattr(open_clip.factory, "download_pretrained", no_network("clip"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network("vgg"))
    return tried


def test_missing_weights_are_all_named_at_once_before_any_model_is_built(tmp_path, offline, monkeypatch):
    import clipstyle.models.loading as loading

    monkeypatch.setattr(loading, "load_clip", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(WeightsError) as info:
        load_models(cache_dir=str(tmp_path / "hf"))
    message = str(info.value)
    assert "CLIP ViT-B-32/openai" in message and "VGG-19 ImageNet (vgg19-dcbb9e9d.pth" in message
    assert "--clip-weights FILE and --vgg-weights FILE" in message
    assert offline == ["clip"]  # offline: no second wait for VGG-19's download


def test_only_the_missing_weights_are_named(tmp_path, offline, monkeypatch):
    import clipstyle.models.loading as loading

    monkeypatch.setattr(loading, "load_clip", lambda *a, **k: pytest.fail("a model was built"))
    cached_vgg = tmp_path / "torch" / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth"
    cached_vgg.parent.mkdir(parents=True)
    cached_vgg.write_bytes(b"cached")
    with pytest.raises(WeightsError) as info:
        load_models(cache_dir=str(tmp_path / "hf"))
    assert "VGG" not in str(info.value) and "--clip-weights FILE" in str(info.value)
    assert offline == ["clip"]


def test_make_demo_says_how_to_pass_weights_and_leaves_no_report(tmp_path):
    """The demo recipe, run by make with a stand-in clipstyle that fails as without weights."""
    if subprocess.run(["make", "--version"], capture_output=True).returncode != 0:
        pytest.skip("make is not installed")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / ".installed").touch()
    fake = venv / "bin" / "clipstyle"
    fake.write_text("#!/bin/sh\necho 'clipstyle: error: weights not cached and not downloadable' >&2\nexit 1\n")
    fake.chmod(0o755)
    python = venv / "bin" / "python"
    python.write_text("#!/bin/sh\necho ''\n")
    python.chmod(0o755)
    result = subprocess.run(
        ["make", "-s", "-f", str(ROOT / "Makefile"), "demo", f"VENV={venv}", "-o", f"{venv}/.installed"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "DEMO_ARGS='--clip-weights" in result.stderr and "--vgg-weights" in result.stderr, result.stderr
    assert not (tmp_path / "out" / "demo.jsonl").exists()


# --- item 16: the example scripts ---------------------------------------------------------------


@pytest.fixture
def fake_path(tmp_path):
    """A PATH whose clipstyle prints its arguments, one per line, and whose parallel runs each
    line of its input through the shell as GNU parallel does ({} replaced)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "clipstyle").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" >> "$CALLS"\necho --- >> "$CALLS"\n')
    (bin_dir / "parallel").write_text(
        '#!/usr/bin/env bash\nwhile [ "${1#-}" != "$1" ]; do [ "$1" = -j ] && shift; shift; done\n'
        'cmd="$1"\nwhile read -r arg; do bash -c "${cmd//\\{\\}/$arg}"; done\n'
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(tmp_path / "calls")}


def calls(tmp_path) -> list[list[str]]:
    text = (tmp_path / "calls").read_text()
    return [c.strip("\n").split("\n") for c in text.split("---\n") if c.strip()]


EXTRA = ["--clip-weights", "my weights/ViT-B-32.pt", "--steps", "300"]


@pytest.mark.parametrize(
    "task_id, task_min, count, shard",
    [("2", "2", "2", "1/2"), ("3", "2", "2", "2/2"), ("0", "0", "4", "1/4"), ("5", "1", "8", "5/8")],
)
def test_slurm_array_shards_for_arrays_starting_anywhere(tmp_path, fake_path, task_id, task_min, count, shard):
    env = {
        **fake_path,
        "SLURM_ARRAY_TASK_ID": task_id,
        "SLURM_ARRAY_TASK_MIN": task_min,
        "SLURM_ARRAY_TASK_COUNT": count,
    }
    result = subprocess.run(
        ["bash", str(ROOT / "examples" / "slurm-array.sh"), "photos/", "styled/", "a 'quoted' prompt", *EXTRA],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    (args,) = calls(tmp_path)
    assert args[args.index("--shard") + 1] == shard
    assert args[args.index("-p") + 1] == "a 'quoted' prompt"
    assert args[-len(EXTRA) :] == EXTRA


def test_parallel_passes_the_prompt_and_options_through(tmp_path, fake_path):
    result = subprocess.run(
        ["bash", str(ROOT / "examples" / "parallel.sh"), "my photos/", "styled/", "3", "ink & wash $HOME", *EXTRA],
        env=fake_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    runs = calls(tmp_path)
    assert sorted(a[a.index("--shard") + 1] for a in runs) == ["1/3", "2/3", "3/3"]
    for args in runs:
        assert args[:2] == ["run", "my photos/"] and args[args.index("-p") + 1] == "ink & wash $HOME"
        assert args[-len(EXTRA) :] == EXTRA, shlex.join(args)


@pytest.mark.parametrize("code, hint", [(1, True), (130, False)], ids=["failed", "interrupted"])
def test_make_demo_on_a_cpu_writes_snapshots_and_hints_only_after_a_failure(tmp_path, code, hint):
    """The CPU recipe asks for a snapshot every few steps (a first picture within about a minute);
    the weights hint follows a failure, not a Ctrl-C. Run by make with a stand-in clipstyle."""
    import sys

    if subprocess.run(["make", "--version"], capture_output=True).returncode != 0:
        pytest.skip("make is not installed")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / ".installed").touch()
    (venv / "bin" / "clipstyle").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{tmp_path}/args"\nexit {code}\n')
    (venv / "bin" / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')  # the real torch check
    for name in ("clipstyle", "python"):
        (venv / "bin" / name).chmod(0o755)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU: the CPU recipe
    result = subprocess.run(
        ["make", "-s", "-f", str(ROOT / "Makefile"), "demo", f"VENV={venv}", "-o", f"{venv}/.installed"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    args = (tmp_path / "args").read_text().split("\n")
    assert args[args.index("--preset") + 1] == "draft" and args[args.index("--save-every") + 1] == "3", args
    assert ("DEMO_ARGS='--clip-weights" in result.stderr) is hint, result.stderr


@pytest.mark.parametrize("switch", ["unreachable", "HF_HUB_OFFLINE"])
def test_offline_the_look_up_fails_at_once_without_the_hub_clients_retries(tmp_path, monkeypatch, switch):
    """Offline the hub client retries for most of a minute (54 s measured here): a connection
    that fails, or HF_HUB_OFFLINE=1, ends the look-up before any download is tried."""
    import socket

    import huggingface_hub.constants
    import open_clip.factory

    connects = []

    def refuse(address, timeout=None, *args, **kwargs):
        connects.append((address, timeout))
        raise OSError("Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", switch == "HF_HUB_OFFLINE")
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(open_clip.factory, "download_pretrained", lambda *a, **k: pytest.fail("a download was tried"))
    with pytest.raises(WeightsError, match="not cached and not downloadable"):
        load_models(cache_dir=str(tmp_path / "hf"))
    if switch == "HF_HUB_OFFLINE":
        assert connects == []  # not even the probe
    else:
        (address, timeout), *_ = connects
        assert 0 < timeout <= 10
