"""Gradient checkpointing: torch_ext.checkpoint.checkpoint_wrapper and torch_ext.patch.

The reference is always the same model without checkpointing, run on the same data with the
same seed: losses and every parameter's gradient must agree (float64, tight tolerances), for a
small MLP, a tiny Hugging Face style transformer (whose layer class is ``TinyDecoderLayer``,
found by name as a real ``LlamaDecoderLayer`` would be) and a conv net on torch_ext's pooling
ops. Memory and recomputation are measured: saved tensors through saved_tensors_hooks, live
storages through a TorchDispatchMode, recomputed ops by counting the ops run in the backward.

This file is also the worker of the distributed test: ``python test_checkpoint.py
--ddp-worker RANK WORLD INIT_FILE OUT`` (see ``run_ddp_worker``).
"""

from __future__ import annotations

import copy
import sys
from collections import Counter
from pathlib import Path

import distributed_workers
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import torch_ext
from torch_ext.checkpoint import EXPENSIVE_OPS, CheckpointWrapper, checkpoint_wrapper
from torch_ext.patch import apply_checkpointing, undo_checkpointing

CUDA_SKIP = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")

# Checkpointing recomputes the same ops on the same values: float64 results agree to rounding.
TIGHT = dict(rtol=1e-12, atol=1e-14)
DIM, HEADS, VOCAB, SEQ, BATCH = 16, 2, 23, 8, 4
aten = torch.ops.aten

# ---------------------------------------------------------------- models


class Block(nn.Module):
    """A residual MLP block: the layer of the small MLP."""

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return x + self.drop(self.fc2(torch.tanh(self.fc1(self.norm(x)))))


class MLP(nn.Module):
    def __init__(self, depth: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        self.inp = nn.Linear(6, DIM)
        self.blocks = nn.Sequential(*[Block(DIM, dropout) for _ in range(depth)])
        self.head = nn.Linear(DIM, 3)

    def forward(self, x):
        return self.head(self.blocks(self.inp(x)))


class TinyAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, x, attention_mask=None):
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attention_mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.o_proj(y.transpose(1, 2).reshape(b, t, c))


class TinyDecoderLayer(nn.Module):
    """Pre-norm attention + MLP, called like a Hugging Face decoder layer (mask as keyword)."""

    attention_type = "full_attention"  # read by the model through the wrapper, as HF code does

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(dim)
        self.self_attn = TinyAttention(dim, HEADS, dropout)
        self.post_attention_layernorm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, hidden_states, attention_mask=None):
        attn = self.self_attn(self.input_layernorm(hidden_states), attention_mask=attention_mask)
        hidden_states = hidden_states + self.drop(attn)
        return hidden_states + self.drop(self.mlp(self.post_attention_layernorm(hidden_states)))


class TinyForCausalLM(nn.Module):
    def __init__(self, layers: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList([TinyDecoderLayer(DIM, dropout) for _ in range(layers)])
        self.norm = nn.LayerNorm(DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)
        self.lm_head.weight = self.embed_tokens.weight  # tied, as in many HF models

    def forward(self, input_ids):
        t = input_ids.shape[1]
        mask = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()
        hidden_states = self.embed_tokens(input_ids)
        for layer in self.layers:
            assert layer.attention_type == "full_attention"
            hidden_states = layer(hidden_states, attention_mask=mask)
        return self.lm_head(self.norm(hidden_states))


class PoolBlock(nn.Module):
    """conv -> SiLU -> torch_ext.sppf -> 1x1 conv: YOLO's SPPF neck in small."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.mix = nn.Conv2d(3 * cout, cout, 1)

    def forward(self, x):
        return self.mix(torch_ext.sppf(F.silu(self.conv(x)), kernel_size=3, repeats=2))


class SppHead(nn.Module):
    """torch_ext.spp to a fixed-length vector, then a classifier."""

    def __init__(self, channels: int, levels=(1, 2)) -> None:
        super().__init__()
        self.levels = levels
        self.fc = nn.Linear(channels * sum(level * level for level in levels), 3)

    def forward(self, x):
        return self.fc(torch_ext.spp(x, self.levels))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(PoolBlock(3, 4), PoolBlock(4, 4))
        self.head = SppHead(4)

    def forward(self, x):
        return self.head(self.blocks(x))


# kind -> (constructor, the layer types to checkpoint)
MODELS = {
    "mlp": (MLP, Block),
    "transformer": (TinyForCausalLM, None),  # None: found by class name, like HF layers
    "convnet": (ConvNet, (PoolBlock, SppHead)),
}


def make_model(kind: str, seed: int = 0, **options) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[kind][0](**options).double()


def make_batch(kind: str, seed: int = 1, batch: int = BATCH):
    gen = torch.Generator().manual_seed(seed)
    if kind == "transformer":
        return torch.randint(0, VOCAB, (batch, SEQ), generator=gen), None
    if kind == "convnet":
        x = torch.randn(batch, 3, 9, 7, generator=gen, dtype=torch.float64)
    else:
        x = torch.randn(batch, 6, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, 3, (batch,), generator=gen)


def compute_loss(model, kind, batch):
    x, y = batch
    out = model(x)
    if kind == "transformer":
        return F.cross_entropy(out[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))
    return F.cross_entropy(out, y)


def plain_name(name: str) -> str:
    """A parameter's name in the unwrapped model."""
    return name.replace(".module.", ".").removeprefix("module.")


def loss_and_grads(model, kind, batch, seed=123):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the dropout masks
    loss = compute_loss(model, kind, batch)
    loss.backward()
    grads = {plain_name(n): p.grad.detach().clone() for n, p in model.named_parameters()}
    return loss.detach(), grads


def assert_same_grads(actual: dict, expected: dict, **tolerance) -> None:
    assert actual.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, msg=name, **(tolerance or TIGHT))


def count_forwards(layers) -> Counter:
    """How often each layer's forward runs (the recomputation runs it again)."""
    calls = Counter()
    for index, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda *_, index=index: calls.update([index]))
    return calls


class OpCounter(TorchDispatchMode):
    """Counts the aten (and torch_ext) ops run below autograd while active."""

    def __init__(self) -> None:
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func] += 1
        return func(*args, **(kwargs or {}))


class LiveStorages(TorchDispatchMode):
    """Weak references to every storage the ops create while active; ``live_bytes()`` sums
    those still alive: what the forward left in memory (saved tensors, caches, outputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.refs = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ref = StorageWeakRef(storage)
                self.refs.setdefault(ref.cdata, (ref, storage.nbytes()))
        return out

    def live_bytes(self) -> int:
        return sum(nbytes for ref, nbytes in self.refs.values() if not ref.expired())


def checkpointed(kind, model, **options):
    """A deep copy of model with its layers wrapped, and the handle."""
    patched = copy.deepcopy(model)
    return patched, apply_checkpointing(patched, MODELS[kind][1], **options)


# ---------------------------------------------------------------- same losses and gradients

CONFIGS = [
    pytest.param(dict(policy="full"), id="full"),
    pytest.param(dict(policy="selective"), id="selective"),
    pytest.param(dict(policy="full", offload=True), id="full-offload"),
    pytest.param(dict(policy="selective", offload=True), id="selective-offload"),
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("kind", list(MODELS))
def test_gradients_equal_plain_model(kind, config):
    plain = make_model(kind)
    patched, handle = checkpointed(kind, plain, **config)
    batch = make_batch(kind)
    calls = count_forwards(w.module for w in handle.wrappers)
    expected_loss, expected = loss_and_grads(plain, kind, batch)
    loss, grads = loss_and_grads(patched, kind, batch)
    torch.testing.assert_close(loss, expected_loss, **TIGHT)
    assert_same_grads(grads, expected)
    # Every wrapped layer ran twice: the forward, and its recomputation in the backward.
    assert calls == {index: 2 for index in range(len(handle.wrappers))}


@pytest.mark.parametrize("policy", ["full", "selective"])
@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_dropout_gradients_equal_plain_model(kind, policy):
    plain = make_model(kind, dropout=0.3)
    patched, _ = checkpointed(kind, plain, policy=policy)
    batch = make_batch(kind)
    expected_loss, expected = loss_and_grads(plain, kind, batch, seed=7)
    loss, grads = loss_and_grads(patched, kind, batch, seed=7)
    torch.testing.assert_close(loss, expected_loss, **TIGHT)
    assert_same_grads(grads, expected)
    # Dropout is really on: another seed gives another loss.
    other_loss, _ = loss_and_grads(plain, kind, batch, seed=8)
    assert not torch.allclose(other_loss, expected_loss)


def test_wrapper_forwards_args_and_kwargs():
    layer = make_model("transformer").layers[0]
    wrapper = checkpoint_wrapper(layer, policy="selective")
    x = torch.randn(2, 5, DIM, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(5, 5, generator=torch.Generator().manual_seed(0)) > 0.3
    mask.fill_diagonal_(True)  # no row fully masked
    expected = layer(x, attention_mask=mask)
    (grad_x,) = torch.autograd.grad(expected.square().sum(), x)
    actual = wrapper(x, attention_mask=mask)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    torch.testing.assert_close(torch.autograd.grad(actual.square().sum(), x)[0], grad_x, **TIGHT)
    # The mask matters, so it did reach the layer.
    assert not torch.allclose(wrapper(x), expected)


def test_no_grad_runs_module_once():
    plain = make_model("mlp")
    wrapper = checkpoint_wrapper(plain.blocks[0])
    calls = count_forwards([plain.blocks[0]])
    x = torch.randn(3, DIM, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(wrapper(x), plain.blocks[0](x), rtol=0, atol=0)
    assert calls[0] == 2  # one call each: no checkpoint machinery, no recomputation


@pytest.mark.parametrize("policy", ["full", "selective"])
def test_torch_compile_fullgraph(policy):
    plain = make_model("mlp")
    patched, _ = checkpointed("mlp", plain, policy=policy)
    batch = make_batch("mlp")
    expected_loss, expected = loss_and_grads(plain, "mlp", batch)
    compiled = torch.compile(patched, backend="aot_eager", fullgraph=True)  # no graph break
    try:
        loss, grads = loss_and_grads(compiled, "mlp", batch)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(loss, expected_loss, **TIGHT)
    assert_same_grads({k.removeprefix("_orig_mod."): g for k, g in grads.items()}, expected)


# ---------------------------------------------------------------- the wrapper as a module


def test_wrapper_module_parameters_and_state_dict():
    layer = make_model("transformer").layers[0]
    wrapper = checkpoint_wrapper(layer)
    assert wrapper.module is layer and wrapper.unwrap() is layer
    assert [id(p) for p in wrapper.parameters()] == [id(p) for p in layer.parameters()]
    assert wrapper.self_attn is layer.self_attn  # attributes fall through to the layer
    assert wrapper.attention_type == "full_attention"
    plain_keys = list(layer.state_dict())
    assert list(wrapper.state_dict()) == ["module." + key for key in plain_keys]
    # Plain and prefixed state dicts both load (strict), and the values arrive.
    other = make_model("transformer", seed=5).layers[0]
    result = wrapper.load_state_dict(other.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    for key, value in other.state_dict().items():
        torch.testing.assert_close(layer.state_dict()[key], value, rtol=0, atol=0)
    prefixed = checkpoint_wrapper(make_model("transformer", seed=6).layers[0]).state_dict()
    wrapper.load_state_dict(prefixed)
    for key, value in prefixed.items():
        torch.testing.assert_close(layer.state_dict()[key.removeprefix("module.")], value)
    with pytest.raises(RuntimeError, match="Missing key"):
        wrapper.load_state_dict({})
    assert "policy='full', offload=False" in repr(wrapper)


def test_patched_model_loads_plain_state_dict():
    plain = make_model("transformer", seed=3)
    patched, handle = checkpointed("transformer", make_model("transformer"))
    assert all(".module." in key for key in patched.state_dict() if key.startswith("layers."))
    patched.load_state_dict(plain.state_dict())
    batch = make_batch("transformer")
    torch.testing.assert_close(
        compute_loss(patched, "transformer", batch), compute_loss(plain, "transformer", batch)
    )
    handle.undo()
    assert list(patched.state_dict()) == list(plain.state_dict())


def test_wrapper_argument_errors():
    block = Block(4, 0.0)
    with pytest.raises(ValueError, match="policy must be one of"):
        checkpoint_wrapper(block, policy="sometimes")
    with pytest.raises(TypeError, match="offload must be a bool"):
        checkpoint_wrapper(block, offload="cpu")
    with pytest.raises(TypeError, match="must be an nn.Module"):
        checkpoint_wrapper(lambda x: x)
    with pytest.raises(ValueError, match="already a CheckpointWrapper"):
        checkpoint_wrapper(checkpoint_wrapper(block))
    wrapped_sequential = checkpoint_wrapper(nn.Sequential(block, nn.Tanh()))
    assert wrapped_sequential[0] is block


# ---------------------------------------------------------------- what is recomputed


def backward_op_counts(model, kind, batch) -> Counter:
    loss = compute_loss(model, kind, batch)
    with OpCounter() as counter:
        loss.backward()
    return counter.counts


def expensive(counts: Counter) -> int:
    return sum(n for op, n in counts.items() if op in EXPENSIVE_OPS)


def test_selective_keeps_matrix_products_and_recomputes_the_rest():
    plain = make_model("transformer")
    batch = make_batch("transformer")
    counts = {"plain": backward_op_counts(plain, "transformer", batch)}
    for policy in ("full", "selective"):
        model, _ = checkpointed("transformer", plain, policy=policy)
        counts[policy] = backward_op_counts(model, "transformer", batch)
    # The backward itself multiplies matrices (the gradients); full recomputation adds the
    # forward's products, selective adds none.
    assert expensive(counts["full"]) >= expensive(counts["plain"]) + 3 * 4  # 4 linears a layer
    assert expensive(counts["selective"]) == expensive(counts["plain"])
    # Cheap ops are recomputed under both policies: one GELU, two layer norms per layer.
    for policy in ("full", "selective"):
        assert counts[policy][aten.gelu.default] == 3, policy
        assert counts[policy][aten.native_layer_norm.default] == 6, policy
    assert counts["plain"][aten.gelu.default] == 0


def test_selective_keeps_torch_ext_ops_and_convolutions():
    plain = make_model("convnet")
    batch = make_batch("convnet")
    sppf, spp = torch.ops.torch_ext.sppf.default, torch.ops.torch_ext._spp_forward.default
    assert {sppf, spp} <= EXPENSIVE_OPS
    assert torch.ops.torch_ext.confusion_matrix.default not in EXPENSIVE_OPS
    full, _ = checkpointed("convnet", plain, policy="full")
    counts = backward_op_counts(full, "convnet", batch)
    assert counts[sppf] == 2 and counts[spp] == 1
    # (early stop: the last 1x1 conv of a block saves its inputs before it runs, so the
    # recomputation ends there)
    assert counts[aten.convolution.default] == 2 and counts[aten.silu.default] == 2
    selective, _ = checkpointed("convnet", plain, policy="selective")
    counts = backward_op_counts(selective, "convnet", batch)
    assert counts[sppf] == 0 and counts[spp] == 0 and counts[aten.convolution.default] == 0
    assert counts[aten.silu.default] == 2


def test_mark_expensive():
    plain = make_model("transformer")
    model, _ = checkpointed("transformer", plain, policy="selective")
    batch = make_batch("transformer")
    assert aten.gelu.default not in EXPENSIVE_OPS
    torch_ext.checkpoint.mark_expensive(aten.gelu)  # a packet: every overload
    try:
        assert {aten.gelu.default, aten.gelu.out} <= EXPENSIVE_OPS
        counts = backward_op_counts(model, "transformer", batch)  # existing wrappers see it
        assert counts[aten.gelu.default] == 0
        assert counts[aten.native_layer_norm.default] == 6
    finally:
        EXPENSIVE_OPS.difference_update(getattr(aten.gelu, n) for n in aten.gelu.overloads())
    with pytest.raises(TypeError, match="OpOverload"):
        torch_ext.checkpoint.mark_expensive("aten::gelu")


# ---------------------------------------------------------------- memory, measured


def saved_bytes(model, kind, batch) -> int:
    """Bytes of the tensors autograd saves during the forward (seen by an outer hook)."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = compute_loss(model, kind, batch)
    loss.backward()  # what was saved still serves the backward
    return total


def live_forward_bytes(model, kind, batch) -> int:
    """Bytes of the storages made by the forward and still alive after it (loss held)."""
    with LiveStorages() as live:
        loss = compute_loss(model, kind, batch)
    held = live.live_bytes()
    loss.backward()
    return held


def test_checkpointing_saves_less_memory():
    kind = "transformer"
    plain = make_model(kind)
    batch = make_batch(kind, batch=8)
    full, _ = checkpointed(kind, plain, policy="full")
    selective, _ = checkpointed(kind, plain, policy="selective")
    offload, _ = checkpointed(kind, plain, policy="full", offload=True)
    saved = {name: saved_bytes(m, kind, batch) for name, m in
             [("plain", plain), ("full", full), ("offload", offload)]}  # fmt: skip
    # Full checkpointing saves only each layer's input ([8, 8, 16] float64 = 8 KiB, plus its
    # bool mask) where the plain layer saves every activation.
    layer_input = 8 * SEQ * DIM * 8
    assert saved["full"] < saved["plain"] / 3, saved
    assert saved["plain"] - saved["full"] > 3 * 5 * layer_input, saved
    # With offload, save_on_cpu (inside the wrapper) takes the layer inputs: the outer hook
    # sees none of them.
    assert saved["full"] - saved["offload"] == 3 * (layer_input + SEQ * SEQ), saved
    # Live storages also see what selective checkpointing keeps outside saved tensors (the
    # matrix products' outputs): plain > selective > full.
    live = {name: live_forward_bytes(m, kind, batch) for name, m in
            [("plain", plain), ("full", full), ("selective", selective)]}  # fmt: skip
    assert live["full"] < live["selective"] < live["plain"], live
    assert live["full"] < live["plain"] / 3, live


# ---------------------------------------------------------------- patching


def test_apply_and_undo_restore_exact_modules_and_outputs():
    model = make_model("transformer")
    batch = make_batch("transformer")
    originals = list(model.layers)
    before_modules = [(name, module) for name, module in model.named_modules()]
    before_loss, before_grads = loss_and_grads(model, "transformer", batch)
    handle = apply_checkpointing(model)
    assert handle.wrapped == ["layers.0", "layers.1", "layers.2"] and handle.active
    assert all(isinstance(layer, CheckpointWrapper) for layer in model.layers)
    assert [layer.module for layer in model.layers] == originals
    assert [w.module for w in handle.wrappers] == originals
    assert model.lm_head.weight is model.embed_tokens.weight  # tying untouched
    loss, grads = loss_and_grads(model, "transformer", batch)
    torch.testing.assert_close(loss, before_loss, **TIGHT)
    assert_same_grads(grads, before_grads)
    handle.undo()
    assert not handle.active
    assert all(a is b for a, b in zip(model.layers, originals, strict=True))
    after_modules = list(model.named_modules())
    assert [n for n, _ in after_modules] == [n for n, _ in before_modules]
    assert all(a is b for (_, a), (_, b) in zip(after_modules, before_modules, strict=True))
    loss, grads = loss_and_grads(model, "transformer", batch)
    torch.testing.assert_close(loss, before_loss, rtol=0, atol=0)
    assert_same_grads(grads, before_grads, rtol=0, atol=0)
    handle.undo()  # a second undo changes nothing
    assert all(a is b for a, b in zip(model.layers, originals, strict=True))
    assert "undone" in repr(handle)


def test_undo_checkpointing_and_context_manager():
    model = make_model("mlp")
    originals = list(model.blocks)
    apply_checkpointing(model, Block, policy="selective")
    assert isinstance(model.blocks[1], CheckpointWrapper)  # inside nn.Sequential
    assert undo_checkpointing(model) == ["blocks.0", "blocks.1", "blocks.2"]
    assert all(a is b for a, b in zip(model.blocks, originals, strict=True))
    with pytest.raises(ValueError, match="no CheckpointWrapper"):
        undo_checkpointing(model)
    with apply_checkpointing(model, Block) as handle:
        assert handle.active and isinstance(model.blocks[0], CheckpointWrapper)
    assert not handle.active
    assert all(a is b for a, b in zip(model.blocks, originals, strict=True))


def test_undo_refuses_when_the_model_changed():
    model = make_model("mlp")
    handle = apply_checkpointing(model, Block)
    wrapper0 = model.blocks[0]
    model.blocks[2] = nn.Identity()
    with pytest.raises(RuntimeError, match="blocks.2.*no longer holds"):
        handle.undo()
    assert model.blocks[0] is wrapper0  # nothing was restored


def test_every_second_layer():
    model = make_model("transformer", layers=4)
    originals = list(model.layers)
    handle = apply_checkpointing(model, every=2)
    assert handle.wrapped == ["layers.0", "layers.2"]
    assert [type(layer).__name__ for layer in model.layers] == [
        "CheckpointWrapper", "TinyDecoderLayer", "CheckpointWrapper", "TinyDecoderLayer"
    ]  # fmt: skip
    assert model.layers[1] is originals[1] and model.layers[2].module is originals[2]
    handle.undo()
    handle = apply_checkpointing(model, every=3)
    assert handle.wrapped == ["layers.0", "layers.3"]
    handle.undo()
    for every in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="every must be an int >= 1"):
            apply_checkpointing(model, every=every)
    assert all(a is b for a, b in zip(model.layers, originals, strict=True))


def test_matches_are_wrapped_whole_and_shared_layers_once():
    model = make_model("transformer")
    handle = apply_checkpointing(model, (TinyDecoderLayer, nn.Linear))
    # The linears inside the decoder layers are part of them; lm_head is a match of its own.
    assert handle.wrapped == ["layers.0", "layers.1", "layers.2", "lm_head"]
    assert model.lm_head.module.weight is model.embed_tokens.weight
    handle.undo()
    shared = TinyDecoderLayer(DIM, 0.0)
    model.layers = nn.ModuleList([shared, model.layers[1], shared])
    handle = apply_checkpointing(model)
    assert handle.wrapped == ["layers.0", "layers.1"]
    assert model.layers[0] is model.layers[2] and model.layers[0].module is shared
    handle.undo()
    assert model.layers[0] is shared and model.layers[2] is shared


def test_nothing_matches_raises():
    model = make_model("mlp")
    originals = list(model.blocks)
    with pytest.raises(ValueError, match="no Hugging Face style decoder layer.*DecoderLayer"):
        apply_checkpointing(model)
    with pytest.raises(ValueError, match="no module of type Conv2d or Embedding in MLP"):
        apply_checkpointing(model, (nn.Conv2d, nn.Embedding))
    with pytest.raises(ValueError, match="the model itself"):
        apply_checkpointing(model, MLP)
    with pytest.raises(TypeError, match="layer_types must be a class"):
        apply_checkpointing(model, "Block")
    with pytest.raises(ValueError, match="policy must be one of"):
        apply_checkpointing(model, Block, policy="some")
    assert all(a is b for a, b in zip(model.blocks, originals, strict=True))


def test_double_wrap_refused():
    model = make_model("transformer")
    first = apply_checkpointing(model)
    wrappers = list(model.layers)
    with pytest.raises(ValueError, match="'layers.0.module' is already inside the Checkpoint"):
        apply_checkpointing(model)
    with pytest.raises(ValueError, match="already inside"):
        apply_checkpointing(model, TinyAttention)  # inside the wrapped layers too
    assert all(a is b for a, b in zip(model.layers, wrappers, strict=True))
    first.undo()
    model.layers[1].gradient_checkpointing = True  # what HF's gradient_checkpointing_enable sets
    with pytest.raises(ValueError, match="'layers.1' already checkpoints through Hugging Face"):
        apply_checkpointing(model)
    assert not any(isinstance(m, CheckpointWrapper) for m in model.modules())


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("policy", ["full", "selective"])
def test_training_matches_plain_model(policy):
    kind = "transformer"
    plain = make_model(kind, dropout=0.1)
    patched, _ = checkpointed(kind, plain, policy=policy)
    results = []
    for model in (plain, patched):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        losses = []
        for step in range(3):
            loss, _ = loss_and_grads(model, kind, make_batch(kind, seed=step), seed=100 + step)
            optimizer.step()
            losses.append(loss)
        results.append(
            (torch.stack(losses), {plain_name(n): p for n, p in model.named_parameters()})
        )
    (plain_losses, plain_params), (losses, params) = results
    assert plain_losses[2] < plain_losses[0]  # it learns: the steps did something
    torch.testing.assert_close(losses, plain_losses, **TIGHT)
    assert_same_grads(params, plain_params, rtol=1e-11, atol=1e-13)


# ---------------------------------------------------------------- CUDA


@CUDA_SKIP
@pytest.mark.parametrize("policy", ["full", "selective"])
def test_cuda_dropout_gradients_equal_plain_model(policy):
    kind = "transformer"
    plain = make_model(kind, dropout=0.3).cuda()
    patched, _ = checkpointed(kind, plain, policy=policy, offload=True)
    x, _ = make_batch(kind)
    batch = (x.cuda(), None)
    expected_loss, expected = loss_and_grads(plain, kind, batch, seed=7)
    loss, grads = loss_and_grads(patched, kind, batch, seed=7)
    torch.testing.assert_close(loss, expected_loss, **TIGHT)
    assert_same_grads(grads, expected)


@CUDA_SKIP
def test_cuda_offload_moves_layer_inputs_off_the_device():
    kind = "transformer"
    plain = make_model(kind, layers=4).cuda()
    x = torch.randint(0, VOCAB, (16, 64), generator=torch.Generator().manual_seed(0)).cuda()
    held = {}
    for offload in (False, True):
        model, _ = checkpointed(kind, plain, policy="full", offload=offload)
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        loss = compute_loss(model, kind, (x, None))
        held[offload] = torch.cuda.memory_allocated() - start
        loss.backward()
        del loss
    layer_input = 16 * 64 * DIM * 8
    # Layers 1..3 take the previous layer's output, which only the checkpoint holds: offloaded,
    # it leaves the device (layer 0's input, the embedding output, too).
    assert held[False] - held[True] >= 3 * layer_input, held


# ---------------------------------------------------------------- distributed (two processes)

WORLD = 2
DDP_TIMEOUT_S = 60
DDP_CONFIGS = [("full", False), ("selective", True)]
DDP_STEPS = 2


def ddp_batches():
    """The global batch of each step: rank r trains on rows r::WORLD."""
    return [make_batch("transformer", seed=50 + step, batch=2 * WORLD) for step in range(DDP_STEPS)]


def train_steps(model, shard):
    """DDP_STEPS SGD steps; the gradients of each step and the final parameters."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    grads = []
    for batch in ddp_batches():
        _, step_grads = loss_and_grads(model, "transformer", shard(batch))
        grads.append(step_grads)
        optimizer.step()
    params = {plain_name(n): p.detach().clone() for n, p in model.named_parameters()}
    return grads, params


def run_ddp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    """One rank: trains checkpointed copies of the model under DDP on its shard of each batch."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    distributed_workers.init_process_group(rank, world, init_file, DDP_TIMEOUT_S // 2)
    try:
        results = {}
        for policy, offload in DDP_CONFIGS:
            model = make_model("transformer")
            handle = apply_checkpointing(model, policy=policy, offload=offload)
            assert len(handle.wrapped) == 3
            ddp = DDP(model)
            results[policy, offload] = train_steps(ddp, lambda b: (b[0][rank::world], None))
        torch.save(results, out)
    finally:
        dist.destroy_process_group()


def run_workers(tmp_path: Path) -> list[dict]:
    return distributed_workers.run_workers(__file__, tmp_path, WORLD, DDP_TIMEOUT_S)


def test_ddp_checkpointed_gradients_equal_full_batch(tmp_path):
    expected_grads, expected_params = train_steps(make_model("transformer"), lambda b: b)
    results = run_workers(tmp_path)
    for result in results:
        assert set(result) == set(DDP_CONFIGS)
        for grads, params in result.values():
            for step in range(DDP_STEPS):
                assert_same_grads(grads[step], expected_grads[step])
            assert_same_grads(params, expected_params)
    # The shards differ, so equal all-reduced gradients are not a coincidence of equal data.
    x0, _ = ddp_batches()[0]
    assert not torch.equal(x0[0::WORLD], x0[1::WORLD])


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "--ddp-worker":
    _, _, rank_arg, world_arg, init_arg, out_arg = sys.argv
    run_ddp_worker(int(rank_arg), int(world_arg), init_arg, out_arg)
