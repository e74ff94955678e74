"""Argument checks the typed wrappers share before they call an op.

Python ints are unbounded; the ops take 64-bit ints. An int outside that range would reach the
op as a schema-mismatch dump naming no argument, so the wrappers check first and name it.
"""

from __future__ import annotations

import operator

import torch

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def int_arg(op: str, name: str, value):
    """``value`` as an int (or a SymInt as it is); TypeError / ValueError naming ``name``."""
    if isinstance(value, torch.SymInt):
        return value
    try:
        number = operator.index(value)  # ints, numpy integers, 0-d integer tensors
    except TypeError:
        raise TypeError(
            f"{op}(): {name} must be an int, got {type(value).__name__} {value!r}"
        ) from None
    if not _INT64_MIN <= number <= _INT64_MAX:
        raise ValueError(f"{op}(): {name} must fit in 64 bits, got {number}")
    return number


def optional_int_arg(op: str, name: str, value):
    return None if value is None else int_arg(op, name, value)
