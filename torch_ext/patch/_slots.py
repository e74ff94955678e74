"""Where modules sit in a model: the search the patches share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Slot:
    """One place a module sits in the model: ``parent._modules[name]``, at ``path``."""

    parent: nn.Module
    name: str
    path: str


def find_slots(
    model: nn.Module,
    matches: Callable[[nn.Module], bool],
    on_non_match: Callable[[nn.Module, str], bool] | None = None,
) -> list[tuple[nn.Module, list[Slot]]]:
    """Every distinct module below ``model`` that ``matches``, in module order, with all the
    slots it sits in (a module reached under several names is listed once).

    The search does not go inside a match. ``on_non_match(child, path)`` (when given) sees each
    other child first and returns False to keep the search out of it (it may also raise).
    """
    found: dict[int, tuple[nn.Module, list[Slot]]] = {}
    visited: set[int] = set()

    def visit(parent: nn.Module, prefix: str) -> None:
        if id(parent) in visited:
            return
        visited.add(id(parent))
        for name, child in parent._modules.items():
            if child is None:
                continue
            path = prefix + name
            if matches(child):
                found.setdefault(id(child), (child, []))[1].append(Slot(parent, name, path))
            elif on_non_match is None or on_non_match(child, path):
                visit(child, path + ".")

    visit(model, "")
    return list(found.values())
