"""torch_ext.patch.apply_rmpad / undo_rmpad: padding-free training forward of Hugging Face causal
LMs (Llama, Qwen2, Qwen3, Mistral, Gemma 2, Gemma 3, Phi-3, OLMo 2), against the very same model
unpatched.

Tiny random models (two layers, grouped-query attention, float32; configs built here, nothing is
downloaded). Each family's config turns on what its attention passes to the attention function,
small enough to change the result: a sliding window shorter than the sequences (Mistral, Phi-3,
Gemma's sliding layers), a scaling other than 1/sqrt(head_dim) (Gemma's query_pre_attn_scalar),
attention and final logit softcapping (Gemma 2, whose reference runs transformers' eager
attention: its sdpa has no softcapping). For every family and every layout the reference is the
unpatched model run first on the same data and labels:

* padded batches (right padding, left padding, a mask with holes, a fully padded row, explicit
  position ids with left padding, ``inputs_embeds``): logits at the real tokens, exactly zero
  logits at the padded slots, the loss and every parameter's gradient, in eval and in train mode;
  the labels are -100 at padding and where the token before is padding (there the unpatched
  model predicts from a padded slot, whose logits the patched one zeroes), and the ids at padded
  slots are junk that must not matter;
* packed rows (``position_ids`` restarting at 0, no attention_mask), built by
  ``torch_ext.varlen.PackingCollator`` and by hand: against the unpatched model on each sequence
  separately (a right-padded batch of the sequences: no attention across sequences) and against
  the unpatched model on the packed rows themselves (transformers then builds a block-diagonal
  mask from the position ids, but only without a cache: ``use_cache=False``);
* the loss: with labels -100 only at padding, the mean cross entropy of the predictions made at
  real tokens (F.cross_entropy here); with ``num_items_in_batch``, sum / items; float32 for a
  bfloat16 model; ``use_cache`` forced off (no cache returned);
* the attention features: each one changes the unpatched model's result (so the tests above
  see it), and the patched model matches with it off as well; sliding windows of every size
  (one token, cutting only through holes in the mask, longer than every sequence: then the
  flash-capable varlen path runs), Qwen's ``use_sliding_window``;
* undo (handle and ``undo_rmpad``): the class's forward and the original attention back,
  outputs bitwise equal to the ones before the patch;
* refusals: models it does not know (GPT-2, BERT, the base LlamaModel, transformers models
  derived from a supported class, plain modules: the error names the class and lists the
  supported ones; a user's subclass of a supported class is accepted), bidirectional attention
  (Gemma 3), applying twice, undoing an unpatched model (and a handle twice), attention dropout
  in training (allowed in eval mode, where it does nothing), a cache; a refused call leaves the
  model as it was.
"""

from __future__ import annotations

import contextlib
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402  (after the importorskip)
    BertConfig,
    BertModel,
    DynamicCache,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    Gemma3TextModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    MistralConfig,
    MistralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import torch_ext.patch.rmpad as rmpad_module  # noqa: E402
from torch_ext.patch import RmpadHandle, apply_rmpad, undo_rmpad  # noqa: E402
from torch_ext.varlen import PackingCollator  # noqa: E402

VOCAB, BATCH, SEQ = 97, 3, 12
# Same float32 math up to summation order (per-sequence attention, [1, nnz] matmuls).
TOL = dict(rtol=1e-4, atol=1e-4)
BASE_CONFIG = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    initializer_range=0.1,  # larger than the default 0.02: peaked attention, logits of size ~1
    attn_implementation="sdpa",
)
TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # inside the tiny vocabulary
WINDOW = 4  # shorter than most test sequences: the window cuts them
GEMMA = dict(
    head_dim=16,
    query_pre_attn_scalar=24,  # scaling 24 ** -0.5, not head_dim ** -0.5
    sliding_window=WINDOW,
    layer_types=["sliding_attention", "full_attention"],
    **TOKENS,
)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": WINDOW}),
    "gemma2": (
        Gemma2Config,
        Gemma2ForCausalLM,
        {
            **GEMMA,
            "attn_logit_softcapping": 2.0,  # small: it changes these models' attention
            "final_logit_softcapping": 3.0,
            "attn_implementation": "eager",  # transformers' sdpa refuses softcapping
        },
    ),
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM, GEMMA),
    "phi3": (Phi3Config, Phi3ForCausalLM, {"sliding_window": WINDOW + 2, **TOKENS}),
    "olmo2": (Olmo2Config, Olmo2ForCausalLM, TOKENS),
}

# ---------------------------------------------------------------- helpers


@contextlib.contextmanager
def seeded(seed: int):
    """torch's global RNG seeded inside, restored on exit."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def make_model(family: str, seed: int = 0, **overrides) -> nn.Module:
    config_cls, model_cls, extra = FAMILIES[family]
    config = config_cls(**{**BASE_CONFIG, **extra, **overrides})
    with seeded(seed):
        model = model_cls(config)
    return model.float().eval()


def random_ids(shape, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def padding_mask(layout: str) -> torch.Tensor:
    """A [BATCH, SEQ] bool mask, True at the real tokens."""
    if layout == "right":
        lengths = [SEQ, 7, 3]
        return torch.arange(SEQ) < torch.tensor(lengths)[:, None]
    if layout == "left":
        lengths = [SEQ, 5, 9]
        return torch.arange(SEQ) >= SEQ - torch.tensor(lengths)[:, None]
    if layout == "holes":
        rows = ["110011101111", "011101111100", "101010101011"]
        return torch.tensor([[c == "1" for c in row] for row in rows])
    raise AssertionError(layout)


def safe_labels(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ids as labels, -100 at padding and where the token before (in the row) is padding."""
    after_padding = F.pad(~mask[:, :-1], (1, 0), value=False)
    return ids.masked_fill(~mask | after_padding, -100)


def run(model: nn.Module, **inputs):
    """(logits, loss, {name: grad}) of one forward and loss.backward() from zeroed gradients."""
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


def assert_same_grads(got: dict, want: dict, **tol) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], **(tol or TOL), msg=name)


def assert_patched(model: nn.Module) -> None:
    assert "forward" in vars(model)  # an instance attribute
    assert model.config._attn_implementation == "torch_ext_varlen"
    assert "torch_ext_varlen" in transformers.AttentionInterface._global_mapping


def reference_attention(model: nn.Module) -> str:
    """The attention implementation the test model was built with."""
    for _, model_cls, extra in FAMILIES.values():
        if isinstance(model, model_cls):
            return extra.get("attn_implementation", BASE_CONFIG["attn_implementation"])
    raise AssertionError(type(model))


def assert_restored(model: nn.Module) -> None:
    assert "forward" not in vars(model)
    assert model.forward.__func__ is type(model).forward
    assert model.config._attn_implementation == reference_attention(model)


# ---------------------------------------------------------------- padded batches


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("layout", ["right", "left", "holes"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_padded_batches_match_unpatched_model(family, layout, mode):
    check_padded(make_model(family).train(mode == "train"), layout)


def padded_inputs(layout: str) -> tuple[torch.Tensor, dict]:
    """(mask, model inputs) of check_padded's batch: junk ids at the padded slots, too."""
    mask = padding_mask(layout)
    ids = random_ids((BATCH, SEQ), seed=1)
    return mask, dict(input_ids=ids, attention_mask=mask.long(), labels=safe_labels(ids, mask))


def check_padded(model: nn.Module, layout: str) -> torch.Tensor:
    """The patched model against the unpatched one on a padded batch, then undo; returns the
    reference logits."""
    mask, inputs = padded_inputs(layout)
    ids = inputs["input_ids"]
    ref_logits, ref_loss, ref_grads = run(model, **inputs, use_cache=False)

    handle = apply_rmpad(model)
    assert isinstance(handle, RmpadHandle)
    assert_patched(model)
    logits, loss, grads = run(model, **inputs)
    assert logits.shape == (BATCH, SEQ, VOCAB) and logits.dtype == torch.float32
    torch.testing.assert_close(logits[mask], ref_logits[mask], **TOL)
    assert torch.all(logits[~mask] == 0)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, **TOL)
    assert_same_grads(grads, ref_grads)

    # The ids at the padded slots are never read.
    junk = torch.where(mask, ids, random_ids((BATCH, SEQ), seed=2))
    assert torch.equal(run(model, **{**inputs, "input_ids": junk})[0], logits)

    handle.undo()
    assert_restored(model)
    again_logits, again_loss, _ = run(model, **inputs, use_cache=False)
    assert torch.equal(again_logits, ref_logits) and torch.equal(again_loss, ref_loss)
    return ref_logits


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fully_padded_row(family):
    """A row without real tokens: zero logits; the other rows as if it were not there."""
    model = make_model(family)
    mask = padding_mask("holes")
    mask[1] = False
    ids = random_ids((BATCH, SEQ), seed=3)
    labels = safe_labels(ids, mask)
    keep = torch.tensor([0, 2])
    ref_logits, ref_loss, ref_grads = run(
        model,
        input_ids=ids[keep],
        attention_mask=mask[keep].long(),
        labels=labels[keep],
        use_cache=False,
    )
    handle = apply_rmpad(model)
    logits, loss, grads = run(model, input_ids=ids, attention_mask=mask.long(), labels=labels)
    handle.undo()
    assert torch.all(logits[1] == 0)
    torch.testing.assert_close(logits[keep][mask[keep]], ref_logits[mask[keep]], **TOL)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    assert_same_grads(grads, ref_grads)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_explicit_position_ids_with_padding(family):
    """Left padding with given positions, gaps included: each real token keeps its own."""
    model = make_model(family)
    mask = padding_mask("left")
    ids = random_ids((BATCH, SEQ), seed=4)
    # Increasing by 1 to 3 per token (rotary embeddings see relative positions only: a constant
    # shift of a row would change nothing), arbitrary at the padded slots.
    steps = torch.randint(1, 4, (BATCH, SEQ), generator=torch.Generator().manual_seed(5))
    position_ids = torch.where(mask, (steps * mask).cumsum(-1), random_ids((BATCH, SEQ), 6))
    inputs = dict(
        input_ids=ids,
        attention_mask=mask.long(),
        position_ids=position_ids,
        labels=safe_labels(ids, mask),
    )
    ref_logits, ref_loss, ref_grads = run(model, **inputs, use_cache=False)
    default_logits = model(input_ids=ids, attention_mask=mask.long(), use_cache=False).logits
    assert not torch.allclose(default_logits[mask], ref_logits[mask], **TOL)  # positions matter
    handle = apply_rmpad(model)
    logits, loss, grads = run(model, **inputs)
    handle.undo()
    torch.testing.assert_close(logits[mask], ref_logits[mask], **TOL)
    assert torch.all(logits[~mask] == 0)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    assert_same_grads(grads, ref_grads)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_inputs_embeds(family):
    model = make_model(family).train()
    mask = padding_mask("holes")
    ids = random_ids((BATCH, SEQ), seed=5)
    labels = safe_labels(ids, mask)
    embeds = model.get_input_embeddings()(ids).detach()

    def run_embeds(**kwargs):
        leaf = embeds.clone().requires_grad_()
        logits, loss, grads = run(
            model, inputs_embeds=leaf, attention_mask=mask.long(), labels=labels, **kwargs
        )
        return logits, loss, grads, leaf.grad

    ref_logits, ref_loss, ref_grads, ref_embeds_grad = run_embeds(use_cache=False)
    handle = apply_rmpad(model)
    logits, loss, grads, embeds_grad = run_embeds()
    from_ids = model(input_ids=ids, attention_mask=mask.long()).logits
    handle.undo()
    torch.testing.assert_close(logits[mask], ref_logits[mask], **TOL)
    assert torch.all(logits[~mask] == 0)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    assert_same_grads(grads, ref_grads)
    torch.testing.assert_close(embeds_grad, ref_embeds_grad, **TOL)
    assert torch.all(embeds_grad[~mask] == 0)  # padded inputs do not reach the loss
    torch.testing.assert_close(from_ids.detach(), logits, rtol=0, atol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_no_padding_at_all(family):
    """Neither attention_mask nor position_ids: every row is one sequence, as unpatched."""
    model = make_model(family)
    ids = random_ids((BATCH, SEQ), seed=6)
    ref_logits, ref_loss, ref_grads = run(model, input_ids=ids, labels=ids, use_cache=False)
    handle = apply_rmpad(model)
    logits, loss, grads = run(model, input_ids=ids, labels=ids)
    handle.undo()
    torch.testing.assert_close(logits, ref_logits, **TOL)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    assert_same_grads(grads, ref_grads)


# ---------------------------------------------------------------- packed rows


def separate_reference(model: nn.Module, sequences: list[torch.Tensor]):
    """The unpatched model on each sequence alone: a right-padded batch of the sequences.

    Labels are the ids with -100 at each sequence's first token (as PackingCollator makes
    them) and at the padding. Returns (per-sequence logits, loss, grads).
    """
    longest = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), longest, dtype=torch.long)
    mask = torch.zeros(len(sequences), longest, dtype=torch.bool)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = seq
        mask[i, : len(seq)] = True
    labels = ids.masked_fill(~mask, -100)
    labels[:, 0] = -100
    logits, loss, grads = run(
        model, input_ids=ids, attention_mask=mask.long(), labels=labels, use_cache=False
    )
    return [logits[i, : len(seq)] for i, seq in enumerate(sequences)], loss, grads


def check_packed(model, ids, position_ids, labels, segments, sequences):
    """segments[i] = (row, start) of sequences[i] inside the packed rows ids [P, S]."""
    separate_logits, separate_loss, separate_grads = separate_reference(model, sequences)
    packed = dict(input_ids=ids, position_ids=position_ids, labels=labels)
    direct_logits, direct_loss, direct_grads = run(model, **packed, use_cache=False)
    # transformers builds a block-diagonal mask from packed position ids (attention_mask=None,
    # no cache): the unpatched model on the packed rows is a second, full-grid reference.
    for (row, start), seq, want in zip(segments, sequences, separate_logits, strict=True):
        torch.testing.assert_close(direct_logits[row, start : start + len(seq)], want, **TOL)
    torch.testing.assert_close(direct_loss, separate_loss, **TOL)

    handle = apply_rmpad(model)
    logits, loss, grads = run(model, **packed)
    handle.undo()
    assert_restored(model)
    assert logits.shape == (*ids.shape, VOCAB)
    for (row, start), seq, want in zip(segments, sequences, separate_logits, strict=True):
        torch.testing.assert_close(logits[row, start : start + len(seq)], want, **TOL)
    torch.testing.assert_close(logits, direct_logits, **TOL)
    torch.testing.assert_close(loss, separate_loss, **TOL)
    torch.testing.assert_close(loss, direct_loss, **TOL)
    assert_same_grads(grads, separate_grads)
    assert_same_grads(grads, direct_grads)
    assert torch.equal(run(model, **packed, use_cache=False)[0], direct_logits)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_rows_from_packing_collator(family):
    model = make_model(family).train()
    lengths = [5, 9, 3, 7, 4, 6, 2, 1]  # distinct: a sequence is found by its length
    sequences = [random_ids((n,), seed=10 + i) for i, n in enumerate(lengths)]
    batch = PackingCollator(capacity=16)([{"input_ids": s} for s in sequences])
    ids, position_ids = batch["input_ids"], batch["position_ids"]
    assert ids.shape[0] >= 2 and (batch["attention_mask"] == 0).any()  # rows with padding tails
    # Where each sequence went: the starts of the real (attention_mask 1) segments.
    by_length = {len(s): i for i, s in enumerate(sequences)}
    segments = [None] * len(sequences)
    rows, starts = torch.nonzero(position_ids == 0, as_tuple=True)
    for row, start in zip(rows.tolist(), starts.tolist(), strict=True):
        if batch["attention_mask"][row, start]:
            end = start + 1
            while end < ids.shape[1] and position_ids[row, end] != 0:
                end += 1
            index = by_length[end - start]
            assert torch.equal(ids[row, start:end], sequences[index])
            segments[index] = (row, start)
    assert all(s is not None for s in segments)
    # No attention_mask: the padding tail is one more (label-free) sequence of its row.
    check_packed(model, ids, position_ids, batch["labels"], segments, sequences)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_whole_packing_collator_batch_with_its_attention_mask(family):
    # model(**batch): the mask drops the padding tails, the position ids still split the rows
    # into sequences (the extra cu_seqlens / max_seqlen keys are accepted and ignored).
    model = make_model(family).eval()
    lengths = [5, 9, 3, 7]
    sequences = [random_ids((n,), seed=40 + i) for i, n in enumerate(lengths)]
    batch = PackingCollator(capacity=16)([{"input_ids": s} for s in sequences])
    _, separate_loss, _ = separate_reference(model, sequences)
    handle = apply_rmpad(model)
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    handle.undo()
    torch.testing.assert_close(out.loss, separate_loss, **TOL)
    real = batch["attention_mask"].bool()
    assert torch.equal(out.logits[~real], torch.zeros_like(out.logits[~real]))
    # Hidden states come back padded like the logits: [P, capacity, hidden], zeros at padding.
    for hidden in out.hidden_states:
        assert hidden.shape[:2] == batch["input_ids"].shape
        assert torch.equal(hidden[~real], torch.zeros_like(hidden[~real]))


def packed_rows(layout, seed: int):
    """Rows packed by hand from random sequences of the given lengths per row:
    (ids, position_ids, labels with -100 at each sequence's first token, segments, sequences)."""
    sequences, segments, rows, positions = [], [], [], []
    for row, lengths in enumerate(layout):
        start = 0
        for n in lengths:
            sequences.append(random_ids((n,), seed=seed + len(sequences)))
            segments.append((row, start))
            start += n
        rows.append(torch.cat(sequences[-len(lengths) :]))
        positions.append(torch.cat([torch.arange(n) for n in lengths]))
    ids, position_ids = torch.stack(rows), torch.stack(positions)
    labels = ids.clone()
    for row, start in segments:
        labels[row, start] = -100
    return ids, position_ids, labels, segments, sequences


@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_rows_by_hand(family):
    model = make_model(family)
    layout = [[4, 6, 2], [7, 5], [SEQ]]  # full rows, no padding tail
    ids, position_ids, labels, segments, sequences = packed_rows(layout, seed=30)
    check_packed(model, ids, position_ids, labels, segments, sequences)

    # Plain labels: the last token of a sequence predicts the next sequence's first token,
    # within the row, exactly as the unpatched model's loss on the packed rows does.
    ref = model(input_ids=ids, position_ids=position_ids, labels=ids, use_cache=False).loss
    handle = apply_rmpad(model)
    loss = model(input_ids=ids, position_ids=position_ids, labels=ids).loss
    handle.undo()
    torch.testing.assert_close(loss, ref, **TOL)


# ---------------------------------------------------------------- loss details


@pytest.mark.parametrize("family", list(FAMILIES))
def test_num_items_in_batch(family):
    model = make_model(family)
    mask = padding_mask("right")
    ids = random_ids((BATCH, SEQ), seed=7)
    labels = safe_labels(ids, mask)
    items = torch.tensor(50)
    inputs = dict(
        input_ids=ids, attention_mask=mask.long(), labels=labels, num_items_in_batch=items
    )
    ref = model(**inputs, use_cache=False)
    handle = apply_rmpad(model)
    out = model(**inputs)
    handle.undo()
    # Independently: the summed cross entropy of next-token predictions, over 50.
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
    summed = F.cross_entropy(
        out.logits.reshape(-1, VOCAB).float(), shifted.reshape(-1), reduction="sum"
    )
    torch.testing.assert_close(out.loss, summed / 50, **TOL)
    torch.testing.assert_close(out.loss, ref.loss, **TOL)


@pytest.mark.parametrize("layout", ["right", "left", "holes"])
def test_loss_predicts_only_from_real_tokens(layout):
    """Labels -100 only at padding: the loss is the mean cross entropy of logits[b, t] against
    labels[b, t + 1] over the real positions t whose next label is not -100. (The unpatched
    model also scores the predictions made at padded positions, e.g. the last left-padding
    slot predicting the first real token: there the two differ by design.)"""
    model = make_model("qwen3")
    mask = padding_mask(layout)
    ids = random_ids((BATCH, SEQ), seed=14)
    labels = ids.masked_fill(~mask, -100)
    handle = apply_rmpad(model)
    out = model(input_ids=ids, attention_mask=mask.long(), labels=labels)
    handle.undo()
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
    pairs = mask & (shifted != -100)
    want = F.cross_entropy(out.logits[pairs], shifted[pairs])
    torch.testing.assert_close(out.loss, want, **TOL)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bfloat16_model_gets_float32_loss(family):
    model = make_model(family).to(torch.bfloat16)
    mask = padding_mask("holes")
    ids = random_ids((BATCH, SEQ), seed=8)
    inputs = dict(input_ids=ids, attention_mask=mask.long(), labels=safe_labels(ids, mask))
    ref = model(**inputs, use_cache=False)
    handle = apply_rmpad(model)
    out = model(**inputs)
    handle.undo()
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref.loss, rtol=2e-2, atol=2e-2)


def test_use_cache_is_forced_off():
    """No cache is made, whatever config.use_cache says (True by default in these configs)."""
    model = make_model("llama")
    assert model.config.use_cache
    mask = padding_mask("right")
    ids = random_ids((BATCH, SEQ), seed=9)
    handle = apply_rmpad(model)
    plain = model(input_ids=ids, attention_mask=mask.long())
    off = model(input_ids=ids, attention_mask=mask.long(), use_cache=False)
    handle.undo()
    assert plain.cache is None and off.cache is None
    assert torch.equal(plain.logits, off.logits)


# ---------------------------------------------------------------- attention features

# Each feature of FAMILIES' configs, turned off (same weights: no parameter depends on it).
FEATURES_OFF = {
    "mistral-window": ("mistral", {"sliding_window": None}),
    "phi3-window": ("phi3", {"sliding_window": None}),
    "gemma2-window": ("gemma2", {"sliding_window": 4096}),
    "gemma2-softcap": ("gemma2", {"attn_logit_softcapping": None}),
    "gemma2-final-softcap": ("gemma2", {"final_logit_softcapping": None}),
    "gemma2-scaling": ("gemma2", {"query_pre_attn_scalar": 16}),  # = head_dim
    "gemma3-window": ("gemma3", {"sliding_window": 4096}),
    "gemma3-scaling": ("gemma3", {"query_pre_attn_scalar": 16}),
}


@pytest.mark.parametrize("case", list(FEATURES_OFF))
def test_each_attention_feature_matters(case):
    """Without the feature the unpatched model's logits change (so the tests with FAMILIES'
    configs see it), and the patched model matches the unpatched one without it as well."""
    family, off = FEATURES_OFF[case]
    with_feature, without = make_model(family), make_model(family, **off)
    for (name, a), (_, b) in zip(
        with_feature.named_parameters(), without.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), name
    mask, inputs = padded_inputs("holes")
    want = with_feature(**inputs, use_cache=False).logits
    got = check_padded(without.train(), "holes")
    assert not torch.allclose(got[mask], want[mask], **TOL)


@pytest.mark.parametrize("window", [1, 9, 11, 12])
def test_sliding_window_sizes(window, monkeypatch):
    """The window counts slots of the padded row, as transformers' mask does. In the "holes"
    batch no row has more than 9 real tokens, but two spread over all 12 slots: windows 9 to 11
    cut them only through their holes. A window of 12 or more cuts no sequence: the varlen
    (flash-capable) path runs; a shorter one, the masked path."""
    masked_calls = []
    masked = rmpad_module._masked_attention
    monkeypatch.setattr(
        rmpad_module, "_masked_attention", lambda *a: masked_calls.append(1) or masked(*a)
    )
    model = make_model("mistral", sliding_window=window)
    assert int(padding_mask("holes").sum(1).max()) == 9
    check_padded(model.train(), "holes")
    assert bool(masked_calls) == (window < SEQ)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
@pytest.mark.parametrize("max_window_layers", [0, 1])  # every layer / the second layer
def test_qwen_sliding_window(family, max_window_layers):
    model = make_model(
        family, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=max_window_layers
    )
    assert "sliding_attention" in model.config.layer_types
    mask, inputs = padded_inputs("left")
    full = make_model(family)(**inputs, use_cache=False).logits
    got = check_padded(model.train(), "left")
    assert not torch.allclose(got[mask], full[mask], **TOL)  # the window matters


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_sliding_window_on_packed_rows_by_hand(family):
    """Sequences longer than the window, packed: the window restarts with every sequence."""
    model = make_model(family).train()
    check_packed(model, *packed_rows([[9, 3], [SEQ]], seed=50))


# ---------------------------------------------------------------- undo


def test_undo_rmpad_and_reapply():
    model = make_model("qwen2")
    mask = padding_mask("left")
    ids = random_ids((BATCH, SEQ), seed=11)
    before = model(input_ids=ids, attention_mask=mask.long(), use_cache=False).logits
    apply_rmpad(model)
    assert_patched(model)
    patched = model(input_ids=ids, attention_mask=mask.long()).logits
    undo_rmpad(model)
    assert_restored(model)
    assert torch.equal(
        model(input_ids=ids, attention_mask=mask.long(), use_cache=False).logits, before
    )
    handle = apply_rmpad(model)  # applies again after an undo
    assert torch.equal(model(input_ids=ids, attention_mask=mask.long()).logits, patched)
    handle.undo()
    assert_restored(model)
    # The patch is per instance: another model of the same class is untouched.
    other = make_model("qwen2")
    handle = apply_rmpad(model)
    assert_restored(other)
    handle.undo()


# ---------------------------------------------------------------- refusals


def assert_untouched(model: nn.Module, attn: str | None = "sdpa") -> None:
    assert "forward" not in vars(model)
    if attn is not None:
        assert model.config._attn_implementation == attn


def test_unsupported_models():
    listing = re.escape(", ".join(rmpad_module.SUPPORTED_CLASSES))
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2))
    bert = BertModel(
        BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
        )
    )
    for model in (gpt2, bert):
        name = type(model).__name__
        with pytest.raises(ValueError, match=rf"{name} is not supported; supported: {listing}$"):
            apply_rmpad(model)
        assert_untouched(model, attn=None)
    base_models = (
        LlamaModel(LlamaConfig(**BASE_CONFIG)),
        Gemma3TextModel(Gemma3TextConfig(**{**BASE_CONFIG, **GEMMA})),
    )
    for model in base_models:
        with pytest.raises(ValueError, match=f"{type(model).__name__} is not supported"):
            apply_rmpad(model)
        assert_untouched(model)
    with pytest.raises((TypeError, ValueError), match="Linear is not supported"):
        apply_rmpad(nn.Linear(3, 3))
    with pytest.raises((TypeError, ValueError), match="dict is not supported"):
        apply_rmpad({})


def test_supported_classes_are_these_families():
    supported = set(rmpad_module.SUPPORTED_CLASSES)
    assert supported == {cls.__name__ for _, cls, _ in FAMILIES.values()}


class UserMistral(MistralForCausalLM):
    """A user's subclass of a supported class: the same architecture."""


def test_user_subclass_is_accepted():
    config = MistralConfig(**{**BASE_CONFIG, **FAMILIES["mistral"][2]})
    with seeded(0):
        model = UserMistral(config).eval()
    check_padded(model, "left")


def test_transformers_model_derived_from_a_supported_class_is_refused():
    """A transformers model built on a supported class is another architecture (modular
    transformers derives models this way): refused, named."""
    derived = type(
        "Mistral9ForCausalLM",
        (MistralForCausalLM,),
        {"__module__": "transformers.models.mistral9.modeling_mistral9"},
    )
    model = derived(MistralConfig(**BASE_CONFIG))
    with pytest.raises(
        ValueError,
        match=r"Mistral9ForCausalLM is not supported \(derived from MistralForCausalLM, but a "
        r"different model\); supported: ",
    ):
        apply_rmpad(model)
    assert_untouched(model)


def test_bidirectional_attention_is_refused():
    model = make_model("gemma3", use_bidirectional_attention=True)
    with pytest.raises(
        ValueError, match="Gemma3ForCausalLM with use_bidirectional_attention=True is not supported"
    ):
        apply_rmpad(model)
    assert_untouched(model)
    # A layer made bidirectional after the patch is refused at the forward.
    model = make_model("gemma3")
    handle = apply_rmpad(model)
    model.model.layers[1].self_attn.is_causal = False
    with pytest.raises(ValueError, match="Gemma3Attention is bidirectional"):
        model(input_ids=random_ids((BATCH, SEQ), seed=16))
    handle.undo()


def test_unknown_layer_type_is_refused():
    model = make_model("gemma3")
    model.config.layer_types = ["chunked_attention", "full_attention"]
    with pytest.raises(ValueError, match=r"layer types \['chunked_attention'\] are not supported"):
        apply_rmpad(model)
    assert_untouched(model)


def test_apply_twice_and_undo_unpatched():
    model = make_model("llama")
    with pytest.raises(ValueError, match="LlamaForCausalLM is not patched by apply_rmpad"):
        undo_rmpad(model)
    assert_untouched(model)
    handle = apply_rmpad(model)
    patched_forward = model.forward
    with pytest.raises(ValueError, match="LlamaForCausalLM is already patched"):
        apply_rmpad(model)
    assert model.forward is patched_forward  # the refused apply changed nothing
    handle.undo()
    with pytest.raises(ValueError, match="not patched"):
        undo_rmpad(model)
    with pytest.raises(ValueError, match="no longer in place"):
        handle.undo()
    assert_restored(model)


def dropout_model_and_inputs():
    model = make_model("llama", attention_dropout=0.1)
    mask = padding_mask("right")
    ids = random_ids((BATCH, SEQ), seed=12)
    inputs = dict(input_ids=ids, attention_mask=mask.long(), labels=ids.masked_fill(~mask, -100))
    return model, mask, inputs


def test_attention_dropout_in_training_is_refused():
    model, _, inputs = dropout_model_and_inputs()
    model.train()
    handle = None
    with pytest.raises(ValueError, match="dropout"):  # when applying or at the forward
        handle = apply_rmpad(model)
        model(**inputs)
    if handle is not None:
        handle.undo()
    assert_restored(model)


def test_attention_dropout_in_eval_mode_is_allowed():
    """Dropout does nothing in eval mode (scoring): the patch works and matches."""
    model, mask, inputs = dropout_model_and_inputs()
    ref = model(**inputs, use_cache=False)
    handle = apply_rmpad(model)
    out = model(**inputs)
    handle.undo()
    torch.testing.assert_close(out.logits[mask], ref.logits[mask], **TOL)
    torch.testing.assert_close(out.loss, ref.loss, **TOL)
    # Switched to training while patched: refused at the forward.
    handle = apply_rmpad(model)
    model.train()
    with pytest.raises(ValueError, match="attention dropout is not supported"):
        model(**inputs)
    handle.undo()


def test_cache_is_refused():
    model = make_model("llama")
    ids = random_ids((BATCH, SEQ), seed=13)
    handle = apply_rmpad(model)
    for name in ("cache", "past_key_values"):
        with pytest.raises((TypeError, ValueError), match=f"{name} is not supported"):
            model(input_ids=ids, **{name: DynamicCache(config=model.config)})
    handle.undo()
