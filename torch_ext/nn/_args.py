"""Argument checks the modules and helpers of ``torch_ext.nn`` share."""

from __future__ import annotations

import operator
from collections.abc import Sequence

# The activations DilatedConv2d fuses into its op.
ACTIVATIONS = ("none", "relu", "silu", "gelu")


def check_activation(activation, where: str) -> str:
    """``activation`` as one of ``ACTIVATIONS`` (``None`` is ``"none"``), or a clear error."""
    if activation is None:  # as users write "no activation"
        return "none"
    if not isinstance(activation, str):
        raise TypeError(
            f"{where}: activation must be None or a str, one of {ACTIVATIONS}, got "
            f"{type(activation).__name__} {activation!r}"
        )
    if activation not in ACTIVATIONS:
        raise ValueError(f"{where}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    return activation


def is_int(value) -> bool:
    """An int, or an integer type that converts losslessly (numpy, 0-d tensors); not a bool."""
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def positive_ints(values, name: str, where: str, allow_empty: bool = True) -> tuple[int, ...]:
    """``values`` as a tuple of ints ``>= 1``, or a clear error naming ``name``."""
    if not isinstance(values, Sequence) or isinstance(values, str | bytes):
        raise TypeError(
            f"{where}: {name} must be a sequence of ints >= 1, got {type(values).__name__} "
            f"{values!r}"
        )
    if not allow_empty and len(values) == 0:
        raise ValueError(f"{where}: {name} must not be empty, got {values!r}")
    for index, value in enumerate(values):
        if not is_int(value):
            raise TypeError(
                f"{where}: {name} must be a sequence of ints >= 1, got {name}[{index}] = "
                f"{value!r} ({type(value).__name__})"
            )
        if value < 1:
            raise ValueError(
                f"{where}: {name} must be a sequence of ints >= 1, got {name}[{index}] = {value}"
            )
    return tuple(operator.index(value) for value in values)
