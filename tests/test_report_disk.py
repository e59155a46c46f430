"""A report on a full disk (issue 16, item 7): the run goes on, every output is written, the
records are written when there is room again, else the last line names the report file."""

from __future__ import annotations

import errno
import os

import pytest

import conftest
from conftest import TINY_16, counting_loader, invoke, records


@pytest.fixture
def three(tmp_path, monkeypatch):
    counting_loader(monkeypatch, "run")
    return conftest.three_photos(tmp_path)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (a device that is always full)")
def test_a_report_on_a_full_disk_does_not_stop_the_run(tmp_path, three):
    out = tmp_path / "out"
    result = invoke("run", *three, "-p", "x", "-o", out, "--report", "/dev/full", *TINY_16)
    assert result.exit_code == 1 and "Traceback" not in result.stderr and "internal error" not in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["in0-x.png", "in1-x.png", "in2-x.png"]
    lines = result.stderr.splitlines()
    warnings = [ln for ln in lines if ln.startswith("clipstyle: warning: /dev/full: cannot write the report")]
    assert len(warnings) == 1 and "the run goes on" in warnings[0]
    assert lines[-2] == "3 ok, 0 skipped, 0 failed" + lines[-2][len("3 ok, 0 skipped, 0 failed") :]
    assert lines[-1].startswith(
        "clipstyle: error: /dev/full: 3 report records could not be written "
        "(No space left on device); the outputs are kept: rerun to record them"
    )


def test_records_kept_on_a_full_disk_are_written_whole_when_there_is_room(tmp_path, three, monkeypatch):
    real, failures = os.write, []

    def write(fd, data):
        if b'"status"' in bytes(data) and len(failures) < 3:  # the disk fills up in the middle of a record
            failures.append(1)
            real(fd, bytes(data)[:10])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)
    report = tmp_path / "r.jsonl"
    result = invoke("run", *three, "-p", "x", "-o", tmp_path / "out", "--report", report, *TINY_16)
    assert result.exit_code == 0, result.stderr
    assert "cannot write the report" in result.stderr
    recs = records(report)  # no half line
    assert [r["input"] for r in recs] == [str(p) for p in three] and {r["status"] for r in recs} == {"ok"}


def test_no_report_file_when_nothing_ended(tmp_path, three, monkeypatch):
    from clipstyle.errors import WeightsError

    def no_weights(*args, **kwargs):
        raise WeightsError("CLIP weights are not in the cache")

    monkeypatch.setattr("clipstyle.jobs.plan.load_models", no_weights)
    report = tmp_path / "out" / "r.jsonl"
    result = invoke("run", *three, "-p", "x", "-o", tmp_path / "out", "--report", report, *TINY_16)
    assert result.exit_code == 1 and "not in the cache" in result.stderr
    assert not report.exists()  # no empty report left behind
