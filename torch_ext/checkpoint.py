"""Gradient checkpointing for ``nn.Module``: full, selective, and with the saved inputs on the CPU.

``checkpoint_wrapper(module)`` returns a ``CheckpointWrapper`` whose forward runs ``module``
under non-reentrant ``torch.utils.checkpoint.checkpoint``: the forward keeps only the inputs of
the region and the backward recomputes the rest. ``policy="selective"`` keeps the outputs of the
ops in ``EXPENSIVE_OPS`` (matrix products, convolutions, attention, torch_ext's pooling ops) and
recomputes only the cheap ones. ``torch_ext.patch.apply_checkpointing`` wraps the layers of an
existing model in place.
"""

from __future__ import annotations

import contextlib
import functools
import sys

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

__all__ = ["EXPENSIVE_OPS", "POLICIES", "CheckpointWrapper", "checkpoint_wrapper", "mark_expensive"]

POLICIES = ("full", "selective")

# Ops as the selective policy sees them: below autograd, after composite ops have decomposed
# (linear and matmul arrive as mm / addmm / bmm, conv2d as convolution, SDPA as one of its
# backend ops or, on the math path, as bmm).
_EXPENSIVE_ATEN = (
    "mm.default",
    "addmm.default",
    "_addmm_activation.default",
    "bmm.default",
    "baddbmm.default",
    "convolution.default",
    "_scaled_dot_product_flash_attention.default",
    "_scaled_dot_product_flash_attention_for_cpu.default",
    "_scaled_dot_product_efficient_attention.default",
    "_scaled_dot_product_cudnn_attention.default",
    "_scaled_dot_product_fused_attention_overrideable.default",
    "_flash_attention_forward.default",
    "_efficient_attention_forward.default",
)


def _aten_op(qualified: str):
    """``torch.ops.aten.<name>.<overload>``, or None where this torch build lacks it."""
    name, overload = qualified.split(".")
    packet = getattr(torch.ops.aten, name, None)
    return None if packet is None else getattr(packet, overload, None)


EXPENSIVE_OPS: set = {op for op in map(_aten_op, _EXPENSIVE_ATEN) if op is not None}
"""The ops whose outputs ``policy="selective"`` keeps. Read at every forward, so an op added
(``mark_expensive``) or removed (``EXPENSIVE_OPS.discard``) applies to existing wrappers too."""


def mark_expensive(op) -> None:
    """Add an op to ``EXPENSIVE_OPS``: the selective policy keeps its outputs, never recomputes.

    Args:
        op: an ``OpOverload`` such as ``torch.ops.mylib.myop.default``, or an
            ``OpOverloadPacket`` such as ``torch.ops.mylib.myop`` (every overload of it).
    """
    if isinstance(op, torch._ops.OpOverloadPacket):
        EXPENSIVE_OPS.update(getattr(op, name) for name in op.overloads())
    elif isinstance(op, torch._ops.OpOverload):
        EXPENSIVE_OPS.add(op)
    else:
        raise TypeError(
            "mark_expensive: op must be a torch.ops OpOverload (torch.ops.ns.op.default) or "
            f"OpOverloadPacket (torch.ops.ns.op), got {type(op).__name__}: {op!r}"
        )


# torch_ext's own expensive ops (spp reaches the policy as _spp_forward, below its autograd).
mark_expensive(torch.ops.torch_ext.sppf.default)
mark_expensive(torch.ops.torch_ext._spp_forward.default)


def _save_expensive(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """The selective policy: keep what is costly to recompute, recompute everything else."""
    if op in EXPENSIVE_OPS:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


class CheckpointWrapper(nn.Module):
    """Runs ``self.module`` under non-reentrant activation checkpointing.

    Build it with ``checkpoint_wrapper``. The wrapped module is the submodule ``module``, so its
    parameters are the wrapper's, and state_dict keys gain a ``"module."`` prefix
    (``"attn.weight"`` becomes ``"module.attn.weight"``; a model patched in place saves
    ``"layers.0.module.attn.weight"``). ``load_state_dict`` accepts both forms: keys without
    the prefix are given it. Attributes the wrapper does not have are looked up on the wrapped
    module (``wrapper.self_attn``), as code around Hugging Face layers expects.

    Without grad mode (``torch.no_grad``, inference) the module runs directly: there is nothing
    to save, so nothing to checkpoint. With it, a Hugging Face KV cache handed to the module (a
    ``transformers`` ``Cache`` in any keyword) is not passed on, and ``use_cache`` becomes False:
    the recomputation would fill the cache a second time (transformers' own checkpointing turns
    the cache off too).
    """

    def __init__(self, module: nn.Module, policy: str = "full", offload: bool = False) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"checkpoint_wrapper: module must be an nn.Module, got {type(module).__name__}"
            )
        if isinstance(module, CheckpointWrapper):
            raise ValueError(
                "checkpoint_wrapper: module is already a CheckpointWrapper (of "
                f"{type(module.module).__name__}); wrapping twice would recompute twice"
            )
        _check_options(policy, offload, "checkpoint_wrapper")
        self.module = module
        self.policy = policy
        self.offload = offload
        self.register_load_state_dict_pre_hook(_add_module_prefix)

    def forward(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self.module(*args, **kwargs)
        kwargs = _without_kv_cache(kwargs)
        # Keyword values travel as positional inputs of the checkpoint: so they are saved (and
        # offloaded) like the others, and their devices count when the RNG state is stashed
        # (a layer called as layer(hidden_states=x) must still replay CUDA dropout exactly).
        names = tuple(kwargs)
        count = len(args)

        def run(*inputs):
            return self.module(*inputs[:count], **dict(zip(names, inputs[count:], strict=True)))

        options = {}
        if self.policy == "selective":
            # Built here, not once globally, so that torch.compile can trace it (dynamo accepts
            # a functools.partial it sees created, not one read from a module global).
            options["context_fn"] = functools.partial(
                create_selective_checkpoint_contexts, _save_expensive
            )
        with self._offload_context():
            return checkpoint(run, *args, *kwargs.values(), use_reentrant=False, **options)

    def _offload_context(self):
        """Where the region's saved inputs go: the CPU (pinned when CUDA is there) or nowhere."""
        if not self.offload:
            return contextlib.nullcontext()
        return torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())

    def unwrap(self) -> nn.Module:
        """The wrapped module, the very object given to ``checkpoint_wrapper``."""
        return self.module

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            module = self._modules.get("module")
            if name == "module" or module is None:
                raise
            return getattr(module, name)

    def __getitem__(self, index):
        return self.module[index]  # a wrapped nn.Sequential or nn.ModuleList stays indexable

    def extra_repr(self) -> str:
        return f"policy={self.policy!r}, offload={self.offload}"


# Hugging Face layers take a KV cache that they fill in place (a transformers Cache, passed as
# `cache`, `past_key_values` or `past_key_value` depending on the version). Filled inside a
# checkpointed layer, it would be filled again by the recomputation; transformers' own gradient
# checkpointing turns the cache off for the same reason.
def _is_kv_cache(value) -> bool:
    cache_utils = sys.modules.get("transformers.cache_utils")  # no transformers, no HF cache
    return cache_utils is not None and isinstance(value, cache_utils.Cache)


def _without_kv_cache(kwargs: dict) -> dict:
    if not any(_is_kv_cache(value) for value in kwargs.values()):
        return kwargs
    cleared = {name: None if _is_kv_cache(value) else value for name, value in kwargs.items()}
    if "use_cache" in cleared:
        cleared["use_cache"] = False
    return cleared


def _check_options(policy, offload, caller: str) -> None:
    if policy not in POLICIES:
        raise ValueError(f"{caller}: policy must be one of {POLICIES}, got {policy!r}")
    if not isinstance(offload, bool):
        raise TypeError(f"{caller}: offload must be a bool, got {offload!r}")


def _add_module_prefix(module, state_dict, prefix, *unused) -> None:
    """load_state_dict pre-hook: give keys saved from the unwrapped module the "module." prefix.

    A key already carrying it is left alone, so a wrapped module whose own child is named
    ``module`` needs its keys in the prefixed form.
    """
    inner = prefix + "module."
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        state_dict[inner + key[len(prefix) :]] = state_dict.pop(key)


def checkpoint_wrapper(
    module: nn.Module, policy: str = "full", offload: bool = False
) -> CheckpointWrapper:
    """Wrap ``module`` so that its forward is recomputed in the backward instead of stored.

    Args:
        module: any ``nn.Module``; its forward may take any positional and keyword arguments.
        policy: ``"full"`` keeps only the inputs of the module and recomputes its whole forward
            in the backward. ``"selective"`` also keeps the outputs of the ops in
            ``EXPENSIVE_OPS`` (matrix products, convolutions, attention, torch_ext's pooling
            ops) and recomputes only the cheap ones (norms, activations, elementwise), through
            ``torch.utils.checkpoint.create_selective_checkpoint_contexts``. An output kept this
            way must not be modified in place later in the module (torch raises in the
            backward if it was).
        offload: keep the tensors the checkpoint saves (the module's inputs) in CPU memory,
            pinned when CUDA is available, through ``torch.autograd.graph.save_on_cpu``, and
            copy them back in the backward. The outputs kept by ``policy="selective"`` are held
            by the checkpoint itself and stay on the device.

    Dropout and other random ops give the same values in the recomputation as in the forward
    (the RNG state is stashed and restored), so gradients equal those of the plain module.
    State that the forward changes is changed again by the recomputation: keep modules such as
    BatchNorm in training mode (running statistics) outside the wrapped module.

    Returns:
        A ``CheckpointWrapper``; ``.module`` or ``.unwrap()`` is ``module`` itself.
    """
    return CheckpointWrapper(module, policy=policy, offload=offload)
