"""``clipstyle run --executor ray``: the command-line side of clipstyle.jobs.ray_executor."""

from __future__ import annotations

import sys

from clipstyle.cli.common import close_bar, echo_outcome, echo_warning, progress_bar
from clipstyle.jobs.batch import Events


def check_executor(
    executor: str,
    devices: str | None,
    ray_address: str | None,
    ray_workers: int | None,
    ray_cpus: int | None,
    device: str = "auto",
) -> None:
    """Refuse, before anything is written, options that do not go together, a missing Ray, and a
    cluster address that cannot be joined (the cluster is joined here)."""
    import click

    if executor != "ray":
        given = [
            name
            for name, value in (
                ("--ray-address", ray_address),
                ("--ray-workers", ray_workers),
                ("--ray-cpus-per-worker", ray_cpus),
            )
            if value is not None
        ]
        if given:
            raise click.UsageError(f"{given[0]} needs --executor ray")
        return
    if devices:
        raise click.UsageError(
            "--devices is for the local executor; with --executor ray each GPU of the cluster gets a worker"
        )
    if (device or "").strip().lower().startswith("cuda:"):
        # Ray shows each worker only the GPU it gives it, as cuda:0
        raise click.UsageError(
            f"--device {device} names a card of this machine; with --executor ray each worker uses "
            "the GPU Ray gives it (--device cuda or auto)"
        )
    import os

    from clipstyle.jobs.ray_executor import connect, import_ray

    ray = import_ray()
    address = ray_address or os.environ.get("RAY_ADDRESS")
    if address:  # joined now, so that a cluster that is not there fails before any folder is made
        connect(ray, address)


class Overall(Events):
    """One bar for the whole run: pairs done, failed, throughput (not one per worker)."""

    def __init__(self, quiet: bool, total: int):
        self.quiet, self.total, self.failed = quiet, total, 0
        self.bar = None
        if not quiet:
            self.bar = progress_bar(total=total, unit="pair", smoothing=0.05)

    def finished(self, pair, record) -> None:
        self._echo(lambda: echo_outcome(record, self.quiet, f"wrote {record['output']}"))
        if self.bar is not None:
            self.failed += record["status"] == "failed"
            self.bar.set_postfix(failed=self.failed, refresh=False)
            self.bar.update(1)

    def note(self, pair, message) -> None:
        self._echo(lambda: echo_warning(pair.input.path if pair is not None else None, message))

    def _echo(self, write) -> None:
        if self.bar is None:
            write()
            return
        from tqdm import tqdm

        with tqdm.external_write_mode(file=sys.stderr):
            write()

    def close(self) -> None:
        bar, self.bar = self.bar, None
        close_bar(bar)
