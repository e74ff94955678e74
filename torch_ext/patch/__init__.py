"""Patches that change an existing model without editing its code: explicit and reversible.

A patch changes only the model instance it is given, returns a handle whose ``undo()`` puts
back the very objects it replaced, and raises ValueError when it finds nothing to patch.

``apply_checkpointing(model)`` wraps a model's layers (by default Hugging Face style
``*DecoderLayer`` modules) in gradient checkpointing; ``undo_checkpointing(model)`` removes it.
"""

from torch_ext.patch.checkpointing import (
    CheckpointingHandle,
    apply_checkpointing,
    undo_checkpointing,
)

__all__ = ["CheckpointingHandle", "apply_checkpointing", "undo_checkpointing"]
