"""Swap an existing model's dilated (and depthwise) ``nn.Conv2d`` for ``DilatedConv2d``.

``swap_convs(model)`` replaces each matching conv, in its parent (a ModuleList, a Sequential or
any module), by ``DilatedConv2d.from_conv(conv)``, which holds the very same parameters; the
returned handle, or ``undo_swap_convs(model)``, puts the original objects back. Only the given
model instance changes: no class, function or other model is touched.
"""

from __future__ import annotations

from torch import nn

from torch_ext.nn.conv import DilatedConv2d
from torch_ext.patch._slots import Slot, find_slots

__all__ = ["SwapConvsHandle", "swap_convs", "undo_swap_convs"]

# Set on a replacement made by swap_convs: a 1-tuple holding the original conv. A tuple, not the
# module itself, so that the original is not registered as a submodule (it would show up in
# modules(), state_dict() and parameters()); it survives copy.deepcopy and pickling.
_ORIGINAL = "_swap_convs_original"


class SwapConvsHandle:
    """What ``swap_convs`` did, and how to undo it.

    Attributes:
        model: the patched model.
        swapped: qualified names of the replaced convs (``["aspp.convs.1.0", "head.3"]``); a
            conv reachable under several names is listed under the first.
        replacements: the ``DilatedConv2d`` that replaced each, in the same order.
        originals: the replaced ``nn.Conv2d`` objects, in the same order.

    Also a context manager: ``with swap_convs(model): run(model)`` undoes on exit.
    """

    def __init__(
        self, model: nn.Module, patches: list[tuple[DilatedConv2d, nn.Conv2d, list[Slot]]]
    ):
        self.model = model
        self._patches = patches
        self.swapped = [slots[0].path for _, _, slots in patches]
        self.replacements = [replacement for replacement, _, _ in patches]
        self.originals = [original for _, original, _ in patches]

    @property
    def active(self) -> bool:
        """Whether any of this handle's replacements is still in the model."""
        return any(
            slot.parent._modules.get(slot.name) is replacement
            for replacement, _, slots in self._patches
            for slot in slots
        )

    def undo(self) -> None:
        """Put every original conv back where its replacement is (the same objects).

        Convs already restored (by an earlier ``undo`` or by ``undo_swap_convs``) are left as
        they are. Raises RuntimeError, changing nothing, if some slot now holds a module that
        is neither the replacement nor the original.
        """
        for replacement, original, slots in self._patches:
            for slot in slots:
                current = slot.parent._modules.get(slot.name)
                if current is not replacement and current is not original:
                    raise RuntimeError(
                        f"undo: '{slot.path}' no longer holds the DilatedConv2d that swap_convs "
                        f"put there (it holds {type(current).__name__}); nothing was restored"
                    )
        for _, original, slots in self._patches:
            for slot in slots:
                setattr(slot.parent, slot.name, original)

    def __enter__(self) -> SwapConvsHandle:
        return self

    def __exit__(self, *exc_info) -> None:
        self.undo()

    def __repr__(self) -> str:
        state = "active" if self.active else "undone"
        return f"SwapConvsHandle({state}, swapped={self.swapped})"


def swap_convs(model: nn.Module, dilated: bool = True, depthwise: bool = False) -> SwapConvsHandle:
    """Replace matching ``nn.Conv2d`` modules of ``model`` by ``DilatedConv2d``, in place.

    A conv matches when its type is exactly ``nn.Conv2d`` (subclasses, parametrized convs and
    ``DilatedConv2d`` are left alone) and

    * ``dilated=True``: its dilation is ``> 1`` along either axis, or
    * ``depthwise=True``: it is depthwise, ``groups == in_channels > 1``.

    Each match is replaced, in its parent module (also inside ``nn.ModuleList`` and
    ``nn.Sequential``), by ``DilatedConv2d.from_conv(conv)``: the same ``Parameter`` objects
    (so optimizer state, weight tying, device and dtype are unchanged), the same training mode
    and state_dict keys, the same outputs. Hooks registered on the original conv are not
    carried over. ``undo()`` on the returned handle, or ``undo_swap_convs(model)``, restores the
    original objects.

    Args:
        model: the model to patch; it is changed in place.
        dilated: swap convs with a dilation ``> 1``.
        depthwise: also swap depthwise convs, whatever their dilation.

    Raises:
        ValueError: nothing matches; both ``dilated`` and ``depthwise`` are False; the model
            itself matches (use ``DilatedConv2d.from_conv(model)`` instead).
        TypeError: ``model`` is not an ``nn.Module``; ``dilated`` or ``depthwise`` not a bool.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"swap_convs: model must be an nn.Module, got {type(model).__name__}")
    for name, value in (("dilated", dilated), ("depthwise", depthwise)):
        if not isinstance(value, bool):
            raise TypeError(f"swap_convs: {name} must be a bool, got {value!r}")
    if not dilated and not depthwise:
        raise ValueError("swap_convs: dilated and depthwise are both False; nothing would match")
    wanted = " or ".join(
        words for words, on in (("dilated (dilation > 1)", dilated), ("depthwise", depthwise)) if on
    )

    def matches(module: nn.Module) -> bool:
        if type(module) is not nn.Conv2d:
            return False
        if dilated and any(d > 1 for d in module.dilation):
            return True
        return depthwise and module.groups > 1 and module.groups == module.in_channels

    if matches(model):
        raise ValueError(
            f"swap_convs: the model itself is a {wanted} nn.Conv2d and has no parent to be "
            "replaced in; use torch_ext.nn.DilatedConv2d.from_conv(model) instead"
        )
    found = find_slots(model, matches)
    if not found:
        raise ValueError(
            f"swap_convs: no {wanted} nn.Conv2d in {type(model).__name__} (only modules of "
            "exact type nn.Conv2d are swapped, not subclasses)"
        )
    patches = []
    for conv, slots in found:
        replacement = DilatedConv2d.from_conv(conv)
        setattr(replacement, _ORIGINAL, (conv,))
        for slot in slots:
            setattr(slot.parent, slot.name, replacement)
        patches.append((replacement, conv, slots))
    return SwapConvsHandle(model, patches)


def undo_swap_convs(model: nn.Module) -> list[str]:
    """Replace every ``DilatedConv2d`` that ``swap_convs`` put in ``model`` by its original.

    Only replacements made by ``swap_convs`` are undone (a ``DilatedConv2d`` built by hand has
    no original and stays). Returns the qualified names of the restored convs. Raises
    ValueError if ``model`` holds no such replacement.
    """
    found = find_slots(model, lambda module: isinstance(getattr(module, _ORIGINAL, None), tuple))
    if not found:
        raise ValueError(
            f"undo_swap_convs: {type(model).__name__} has no DilatedConv2d made by swap_convs "
            "to undo"
        )
    for replacement, slots in found:
        (original,) = getattr(replacement, _ORIGINAL)
        for slot in slots:
            setattr(slot.parent, slot.name, original)
    return [slots[0].path for _, slots in found]
