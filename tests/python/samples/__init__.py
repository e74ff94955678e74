"""Sample inputs of every ``torch_ext`` op, one module per op family, found by discovery.

Each module of this folder (``spp.py``, ``conv.py``, ...) is a family and defines

* ``sample_inputs(device: str) -> dict[str, list[Sample]]``: for each op of the family, a few
  small valid calls on ``device``. An op is named as the dispatcher names it without the
  namespace: ``"spp"`` for a default overload, ``"dilated_conv2d.padding"`` for the overload
  ``padding``. Float inputs of differentiable ops require grad, so that opcheck's autograd
  tests run the backward;

and, when it needs them,

* ``CPU_ONLY: dict[str, str]``: ops that have a CPU kernel only, each with the reason;
* ``DATA_DEPENDENT: dict[str, str]``: ops whose output sizes depend on the input data (on some
  of the samples at least), each with a word on which sizes; their fake kernels must make
  unbacked sizes (``torch.library.get_ctx().new_dynamic_size()``);
* ``OPCHECK_SKIPS: dict[str, dict[str, str]]``: op -> {opcheck sub-test: reason} for the
  sub-tests that cannot run on the op at all. Only with a reason, and only when there is no
  other way.

``tests/python/test_dispatcher.py`` enumerates the ops from the dispatcher and requires samples
of each; an op added to the library without them fails there.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any


@dataclass
class Sample:
    """One call: ``op(*args, **kwargs)``; ``label`` names it in test ids and messages."""

    args: tuple
    kwargs: dict[str, Any] = field(default_factory=dict)
    label: str = ""


@dataclass(frozen=True)
class Family:
    """A module of this folder and what it declares."""

    name: str
    module: ModuleType
    ops: tuple[str, ...]
    cpu_only: Mapping[str, str]
    data_dependent: Mapping[str, str]
    opcheck_skips: Mapping[str, Mapping[str, str]]

    @property
    def path(self) -> str:
        return f"tests/python/samples/{self.name}.py"

    def sample_inputs(self, device: str) -> dict[str, list[Sample]]:
        return self.module.sample_inputs(device)


class SampleError(Exception):
    """A family module that breaks the rules of this folder."""


def _declared(module: ModuleType, attr: str, ops: tuple[str, ...]) -> dict:
    name = module.__name__.rpartition(".")[2]
    table = dict(getattr(module, attr, {}))
    for op, value in table.items():
        if op not in ops:
            raise SampleError(
                f"samples/{name}.py: {attr} names {op!r}, which is not an op of the family's "
                f"sample_inputs ({', '.join(ops)})"
            )
        reasons = value.values() if isinstance(value, Mapping) else [value]
        if not value or not all(isinstance(r, str) and r.strip() for r in reasons):
            raise SampleError(f"samples/{name}.py: {attr}[{op!r}] needs a reason")
    return table


def _family(module: ModuleType) -> Family:
    name = module.__name__.rpartition(".")[2]
    sample_inputs: Callable | None = getattr(module, "sample_inputs", None)
    if not callable(sample_inputs):
        raise SampleError(f"samples/{name}.py defines no sample_inputs(device)")
    ops = tuple(sample_inputs("cpu"))
    return Family(
        name=name,
        module=module,
        ops=ops,
        cpu_only=_declared(module, "CPU_ONLY", ops),
        data_dependent=_declared(module, "DATA_DEPENDENT", ops),
        opcheck_skips=_declared(module, "OPCHECK_SKIPS", ops),
    )


def collect(modules) -> dict[str, Family]:
    """op name -> its family, over family modules; an op claimed by two families is an error."""
    owner: dict[str, Family] = {}
    for module in modules:
        family = _family(module)
        for op in family.ops:
            if op in owner:
                raise SampleError(
                    f"op {op!r} has samples in two families: {owner[op].path} and {family.path}"
                )
            owner[op] = family
    return owner


@functools.cache
def families() -> dict[str, Family]:
    """op name -> its family, over every module of this folder (imported with pkgutil)."""
    names = sorted(info.name for info in pkgutil.iter_modules(__path__))
    return collect(
        importlib.import_module(f"{__name__}.{name}") for name in names if not name.startswith("_")
    )


def sample_inputs(op: str, device: str) -> list[Sample]:
    """The samples of one op on ``device``, freshly made (ops may mutate their inputs)."""
    return families()[op].sample_inputs(device)[op]
