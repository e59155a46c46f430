"""What a step asks of the host: operators dispatched, kernels launched, host reads.

On a GPU a step's fixed cost is the host's: every operator costs some
microseconds of Python and dispatch before its kernel is queued, and every
read of a device value (``.item()``, ``float(t)``, a data-dependent shape)
stops the host until the device has caught up. Both can be counted on the CPU,
where the same code runs the same operators, with a TorchDispatchMode: it sees
every ATen operator call that reaches the backends (autograd's backward
operators included), each once, at the top level (what an operator calls
inside its own kernel is not seen).

- calls: every operator dispatched;
- launches: the calls that would launch a kernel on a GPU: all but views
  (``view``, ``expand``, ``slice``, ``transpose``...), ``detach``/``alias``,
  empty allocations and profiler markers;
- host_reads: calls whose result the host must wait for: ``_local_scalar_dense``
  (``item()``, ``float()``, ``bool()`` of a tensor), and operators whose output
  shape depends on the values (``nonzero``, ``masked_select``, ``unique``,
  ``repeat_interleave`` without ``output_size``, indexing with a boolean mask).

A copy to the host (``.cpu()``) is a host read on a GPU but not on the CPU,
where it is not even dispatched: :class:`OpCounter` cannot see it there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Operators that launch no kernel: aliases, detaches, allocations without a fill.
_NO_KERNEL = {
    "detach",
    "alias",
    "lift_fresh",
    "empty",
    "empty_strided",
    "empty_like",
    "_unsafe_view",
    "set_",
    "resize_",
}
# Operators whose result (a value or a shape) the host has to wait for.
_HOST_READS = {
    "_local_scalar_dense",
    "nonzero",
    "masked_select",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "is_nonzero",
    "equal",
}


class HostReadError(AssertionError):
    """A host read happened where none is allowed (HostReadGuard)."""


@dataclass
class OpCounts:
    """Operators of one watched stretch (one step): see the module's docstring."""

    calls: int = 0
    launches: int = 0
    host_reads: int = 0

    def to_dict(self) -> dict:
        return {"calls": self.calls, "launches": self.launches, "host_reads": self.host_reads}


def _name(func) -> str:
    return func._schema.name.split("::", 1)[-1]


def is_host_read(func, args, kwargs=None) -> bool:
    """Whether calling ``func`` on ``args`` makes the host wait for a device value."""
    name = _name(func)
    if name in _HOST_READS:
        return True
    if name == "repeat_interleave":  # with a tensor of repeats, the output's length is their sum
        return func._overloadname in ("Tensor", "self_Tensor") and (kwargs or {}).get("output_size") is None
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
        indices = args[1] if len(args) > 1 else ()
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())
    return False


def launches_kernel(func) -> bool:
    """Whether ``func`` would launch a kernel on a GPU (views, detaches and allocations do not)."""
    if not _name(func) or func.namespace != "aten":
        return False
    return not (func.is_view or _name(func) in _NO_KERNEL)


class OpCounter(TorchDispatchMode):
    """Counts operators per stretch: each ``with counter:`` is one stretch, appended to ``steps``.

    The loop enters it around each step's work (stylize_many's ``watch``), so
    ``steps[i]`` holds step i's counts; reads of the losses and callbacks are
    outside it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[OpCounts] = []

    def __enter__(self):
        self.steps.append(OpCounts())
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        counts = self.steps[-1]
        counts.calls += 1
        counts.launches += launches_kernel(func)
        if is_host_read(func, args, kwargs):
            counts.host_reads += 1
            self.on_host_read(func)
        return func(*args, **(kwargs or {}))

    def on_host_read(self, func) -> None:
        """Called at each host read (HostReadGuard raises)."""


class HostReadGuard(OpCounter):
    """An OpCounter that fails at the first host read (tests: no read may enter a step)."""

    def on_host_read(self, func) -> None:
        raise HostReadError(f"host read of a device value inside a step: {func}")
