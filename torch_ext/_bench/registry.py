"""The family registry: what an op family gives the tour and the benchmarks.

A family module (``torch_ext/_bench/by_family/<family>.py``) builds one :class:`Family` and
passes it to :func:`register` when imported; ``torch_ext/_bench/__init__.py`` imports every
module of that folder once. Nothing else needs to know the list of families.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

Inputs = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class CheckResult:
    """One comparison of an op with its reference on random inputs."""

    family: str
    op: str
    device: str
    dtype: str
    what: str  # what was compared, e.g. "forward" or "grad input"
    inputs: str  # shape and layout of the inputs
    max_abs_error: float
    tolerance: float
    passed: bool
    note: str = ""


@dataclass(frozen=True)
class Case:
    """One benchmark: the op against the composition a user would otherwise write.

    ``make_inputs`` builds fresh inputs on the case's device; for a forward+backward case the
    inputs to differentiate are those with ``requires_grad``. ``ours`` and ``reference`` take the
    inputs and return one tensor. ``traffic`` gives the bytes the computation must read and write
    at the least (None where bandwidth says nothing useful, e.g. compute-bound ops).

    ``compile_reference=False`` skips the compiled baseline (its compile would take longer than
    the case is worth). ``peer`` is the same computation by a peer library (e.g.
    torchmetrics), timed beside the others when given; ``peer_name`` names the library, and
    ``peer_note`` says why there is no peer timing when ``peer`` is None (e.g. "n/a:
    torchmetrics is not installed").
    """

    family: str
    op: str
    label: str
    device: str
    shape: str
    dtype: str
    layout: str
    backward: bool
    make_inputs: Callable[[], Inputs]
    ours: Callable[..., torch.Tensor]
    reference: Callable[..., torch.Tensor]
    traffic: Callable[[Inputs], tuple[int, int]] | None = None
    peer: Callable[..., torch.Tensor] | None = None
    peer_name: str = ""
    peer_note: str = ""
    compile_reference: bool = True  # False: no torch.compile baseline (e.g. a whole HF model)

    @property
    def direction(self) -> str:
        return "forward+backward" if self.backward else "forward"


@dataclass(frozen=True)
class Family:
    """An op family: its correctness checks and its benchmark cases, per device."""

    name: str
    checks: Callable[[torch.device, bool], list[CheckResult]]  # (device, quick)
    cases: Callable[[torch.device, bool], list[Case]]  # (device, quick)


_FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add a family; called once by its module at import."""
    if family.name in _FAMILIES:
        raise ValueError(f"benchmark family {family.name!r} is registered twice")
    _FAMILIES[family.name] = family
    return family


def families(names: list[str] | None = None) -> list[Family]:
    """The registered families in registration order, or those named (unknown names raise)."""
    if names is None:
        return list(_FAMILIES.values())
    unknown = [name for name in names if name not in _FAMILIES]
    if unknown:
        raise ValueError(f"unknown benchmark families {unknown}; registered: {list(_FAMILIES)}")
    return [_FAMILIES[name] for name in names]


def compare(
    actual: torch.Tensor,
    expected: torch.Tensor,
    tolerance: float,
    *,
    family: str,
    op: str,
    what: str,
    inputs: str,
) -> CheckResult:
    """A CheckResult for ``max |actual - expected| <= tolerance``; shapes must match too."""
    identity = {
        "family": family,
        "op": op,
        "device": str(actual.device),
        "dtype": str(actual.dtype),
        "what": what,
        "inputs": inputs,
    }
    if actual.shape != expected.shape:
        note = f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
        return CheckResult(
            **identity, max_abs_error=math.inf, tolerance=tolerance, passed=False, note=note
        )
    error = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    return CheckResult(
        **identity, max_abs_error=error, tolerance=tolerance, passed=bool(error <= tolerance)
    )
