"""Patches that change an existing model without editing its code: explicit and reversible.

A patch changes only the model instance it is given, returns a handle whose ``undo()`` puts
back the very objects it replaced, and raises ValueError when it finds nothing to patch.

``apply_checkpointing(model)`` wraps a model's layers (by default Hugging Face style
``*DecoderLayer`` modules) in gradient checkpointing; ``undo_checkpointing(model)`` removes it.

``swap_convs(model)`` replaces a model's dilated ``nn.Conv2d`` modules (and, with
``depthwise=True``, its depthwise ones) by ``torch_ext.nn.DilatedConv2d`` sharing their
parameters; ``undo_swap_convs(model)`` puts the original convs back.

``apply_rmpad(model)`` makes a Hugging Face causal LM (Llama, Qwen2/3, Mistral, Gemma 2/3, Phi-3,
OLMo 2) remove padding once and run every layer on real tokens only (varlen attention over the
global cu_seqlens);
``undo_rmpad(model)`` restores it.
"""

from torch_ext.patch.checkpointing import (
    CheckpointingHandle,
    apply_checkpointing,
    undo_checkpointing,
)
from torch_ext.patch.convs import SwapConvsHandle, swap_convs, undo_swap_convs
from torch_ext.patch.rmpad import RmpadHandle, apply_rmpad, undo_rmpad

__all__ = [
    "CheckpointingHandle",
    "RmpadHandle",
    "SwapConvsHandle",
    "apply_checkpointing",
    "apply_rmpad",
    "swap_convs",
    "undo_checkpointing",
    "undo_rmpad",
    "undo_swap_convs",
]
