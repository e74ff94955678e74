"""Gradient checkpointing of an existing model's layers, in place and reversibly.

``apply_checkpointing(model)`` replaces each matching layer, in its parent (a ModuleList, a
Sequential or any module), by a ``CheckpointWrapper`` of it; the returned handle, or
``undo_checkpointing(model)``, puts the original objects back. Only the given model instance
changes: no class, function or other model is touched.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from torch_ext.checkpoint import CheckpointWrapper, _check_options, checkpoint_wrapper
from torch_ext.patch._slots import Slot, find_slots

__all__ = ["CheckpointingHandle", "apply_checkpointing", "undo_checkpointing"]

_HF_SUFFIX = "DecoderLayer"


class CheckpointingHandle:
    """What ``apply_checkpointing`` did, and how to undo it.

    Attributes:
        model: the patched model.
        wrapped: qualified names of the wrapped layers (``["layers.0", "layers.2"]``); a layer
            reachable under several names is listed under the first.
        wrappers: the ``CheckpointWrapper`` of each, in the same order.

    Also a context manager: ``with apply_checkpointing(model): train(model)`` undoes on exit.
    """

    def __init__(self, model: nn.Module, patches: list[tuple[CheckpointWrapper, list[Slot]]]):
        self.model = model
        self._patches = patches
        self.wrapped = [slots[0].path for _, slots in patches]
        self.wrappers = [wrapper for wrapper, _ in patches]

    @property
    def active(self) -> bool:
        """Whether any of this handle's wrappers is still in the model."""
        return any(
            slot.parent._modules.get(slot.name) is wrapper
            for wrapper, slots in self._patches
            for slot in slots
        )

    def undo(self) -> None:
        """Put every original layer back where its wrapper is (the same objects).

        Layers already restored (by an earlier ``undo`` or by ``undo_checkpointing``) are left
        as they are. Raises RuntimeError, changing nothing, if some slot now holds a module that
        is neither the wrapper nor the original.
        """
        for wrapper, slots in self._patches:
            for slot in slots:
                current = slot.parent._modules.get(slot.name)
                if current is not wrapper and current is not wrapper.module:
                    raise RuntimeError(
                        f"undo: '{slot.path}' no longer holds the CheckpointWrapper that "
                        f"apply_checkpointing put there (it holds {type(current).__name__}); "
                        "nothing was restored"
                    )
        for wrapper, slots in self._patches:
            for slot in slots:
                setattr(slot.parent, slot.name, wrapper.module)

    def __enter__(self) -> CheckpointingHandle:
        return self

    def __exit__(self, *exc_info) -> None:
        self.undo()

    def __repr__(self) -> str:
        state = "active" if self.active else "undone"
        return f"CheckpointingHandle({state}, wrapped={self.wrapped})"


def apply_checkpointing(
    model: nn.Module,
    layer_types=None,
    every: int = 1,
    policy: str = "full",
    offload: bool = False,
) -> CheckpointingHandle:
    """Wrap layers of ``model`` in ``CheckpointWrapper``, in place.

    Each matching layer is replaced, in its parent module (also inside ``nn.ModuleList`` and
    ``nn.Sequential``), by ``checkpoint_wrapper(layer, policy, offload)``. The layer object is
    kept inside the wrapper, so parameters, optimizer state and weight tying are unchanged;
    parameter and state_dict names gain ``.module`` (``layers.0.module.mlp.weight``), and the
    wrappers load state dicts saved without it. ``undo()`` on the returned handle, or
    ``undo_checkpointing(model)``, restores the original objects.

    Args:
        model: the model to patch; it is changed in place.
        layer_types: a module class or a tuple of classes to wrap (``isinstance``). ``None``
            means Hugging Face style decoder layers: modules whose class name ends in
            "DecoderLayer" (``LlamaDecoderLayer``, ``Qwen2DecoderLayer``, ...). A match is
            wrapped as a whole; nothing inside it is searched.
        every: wrap every ``every``-th match in module order, starting with the first
            (matches 0, every, 2 * every, ...); 1 wraps all.
        policy, offload: as in ``torch_ext.checkpoint.checkpoint_wrapper``.

    Raises:
        ValueError: nothing matches; a match is already inside a CheckpointWrapper (undo
            first); the model uses Hugging Face's own gradient checkpointing (some module has
            ``gradient_checkpointing = True``, set by ``gradient_checkpointing_enable()``);
            the model itself matches (wrap it with ``checkpoint_wrapper`` instead); bad
            ``every`` or ``policy``.
        TypeError: ``layer_types`` is not a class or a tuple of classes; ``offload`` not a bool.

    With Hugging Face models, the wrapped layers get no KV cache while grad mode is on (the
    recomputation would fill it twice; transformers' own checkpointing does the same), so a
    training loop may call the model as it is, ``use_cache`` left at its default.
    """
    matches_type, description = _matcher(layer_types)
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"apply_checkpointing: every must be an int >= 1, got {every!r}")
    _check_options(policy, offload, "apply_checkpointing")
    if matches_type(model):
        raise ValueError(
            f"apply_checkpointing: the model itself is a {description} "
            f"({type(model).__name__}) and has no parent to be replaced in; "
            "use torch_ext.checkpoint.checkpoint_wrapper(model) instead"
        )
    _refuse_hf_checkpointing(model)
    found = _find_layers(model, matches_type)
    if not found:
        raise ValueError(
            f"apply_checkpointing: no {description} in {type(model).__name__}; pass "
            "layer_types=<the layer class> (for example type(model.layers[0]))"
        )
    patches = []
    for index, (layer, slots) in enumerate(found):
        if index % every == 0:
            wrapper = checkpoint_wrapper(layer, policy=policy, offload=offload)
            for slot in slots:
                setattr(slot.parent, slot.name, wrapper)
            patches.append((wrapper, slots))
    return CheckpointingHandle(model, patches)


def undo_checkpointing(model: nn.Module) -> list[str]:
    """Replace every CheckpointWrapper in ``model`` by the module it wraps, in place.

    Also undoes wrappers made by hand with ``checkpoint_wrapper`` and set into the model.
    Returns the qualified names of the restored layers. Raises ValueError if ``model`` has no
    CheckpointWrapper below it (a wrapper can not replace itself: use ``model.unwrap()``).
    """
    found = _find_layers(model, lambda module: isinstance(module, CheckpointWrapper))
    if not found:
        raise ValueError(
            f"undo_checkpointing: {type(model).__name__} has no CheckpointWrapper to undo"
        )
    for wrapper, slots in found:
        for slot in slots:
            setattr(slot.parent, slot.name, wrapper.module)
    return [slots[0].path for _, slots in found]


def _matcher(layer_types):
    """(predicate, words for error messages) of ``layer_types``."""
    if layer_types is None:
        return (
            lambda module: type(module).__name__.endswith(_HF_SUFFIX),
            f"Hugging Face style decoder layer (class name ending in {_HF_SUFFIX!r})",
        )
    types = (layer_types,) if isinstance(layer_types, type) else layer_types
    if not isinstance(types, Iterable) or isinstance(types, str | bytes):
        raise TypeError(
            "apply_checkpointing: layer_types must be a class, a tuple of classes or None, "
            f"got {layer_types!r}"
        )
    types = tuple(types)
    if not types or not all(isinstance(t, type) for t in types):
        raise TypeError(
            "apply_checkpointing: layer_types must be a class, a tuple of classes or None, "
            f"got {layer_types!r}"
        )
    names = " or ".join(t.__name__ for t in types)
    return (lambda module: isinstance(module, types)), f"module of type {names}"


def _refuse_hf_checkpointing(model: nn.Module) -> None:
    for path, module in model.named_modules():
        if getattr(module, "gradient_checkpointing", False) is True:
            raise ValueError(
                f"apply_checkpointing: '{path or type(model).__name__}' already checkpoints "
                "through Hugging Face (gradient_checkpointing = True); call "
                "model.gradient_checkpointing_disable() (activation_checkpointing_disable() in "
                "transformers 5) first, or use that instead"
            )


def _find_layers(model: nn.Module, matches) -> list[tuple[nn.Module, list[Slot]]]:
    """Every distinct matching module in module order, with all the slots it sits in.

    Does not search inside a match. Raises ValueError for a match inside a CheckpointWrapper
    that is not itself the match: wrapping it would checkpoint twice.
    """

    def look_inside(child: nn.Module, path: str) -> bool:
        if isinstance(child, CheckpointWrapper):
            _refuse_match_inside(child, matches, path)
            return False
        return True

    return find_slots(model, matches, look_inside)


def _refuse_match_inside(wrapper: CheckpointWrapper, matches, path: str) -> None:
    for inner_path, module in wrapper.named_modules(prefix=path):
        if module is not wrapper and matches(module):
            raise ValueError(
                f"apply_checkpointing: '{inner_path}' is already inside the CheckpointWrapper "
                f"at '{path}'; refusing to checkpoint it twice (undo_checkpointing(model) first)"
            )
