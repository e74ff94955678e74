"""torch_ext.patch.apply_rmpad / undo_rmpad: padding-free training forward of Hugging Face causal
LMs (Llama, Qwen2, Qwen3), against the very same model unpatched.

Tiny random models (two layers, grouped-query attention, float32; configs built here, nothing is
downloaded). For every family and every layout the reference is the unpatched model run first on
the same data and labels:

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
* undo (handle and ``undo_rmpad``): the class's forward and "sdpa" back, outputs bitwise equal to
  the ones before the patch;
* refusals: models that are not Llama/Qwen2/Qwen3 causal LMs (GPT-2, the base LlamaModel, plain
  modules), applying twice, undoing an unpatched model (and a handle twice), sliding-window
  configs, attention dropout in training (allowed in eval mode, where it does nothing), a cache;
  a refused call leaves the model as it was.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402  (after the importorskip)
    DynamicCache,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

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
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),
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


def assert_restored(model: nn.Module) -> None:
    assert "forward" not in vars(model)
    assert model.forward.__func__ is type(model).forward
    assert model.config._attn_implementation == "sdpa"


# ---------------------------------------------------------------- padded batches


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("layout", ["right", "left", "holes"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_padded_batches_match_unpatched_model(family, layout, mode):
    model = make_model(family).train(mode == "train")
    mask = padding_mask(layout)
    ids = random_ids((BATCH, SEQ), seed=1)  # junk ids at the padded slots, too
    labels = safe_labels(ids, mask)
    inputs = dict(input_ids=ids, attention_mask=mask.long(), labels=labels)
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


@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_rows_by_hand(family):
    model = make_model(family)
    layout = [[4, 6, 2], [7, 5], [SEQ]]  # full rows, no padding tail
    sequences, segments, rows, positions = [], [], [], []
    for row, lengths in enumerate(layout):
        start = 0
        for n in lengths:
            sequences.append(random_ids((n,), seed=30 + len(sequences)))
            segments.append((row, start))
            start += n
        rows.append(torch.cat(sequences[-len(lengths) :]))
        positions.append(torch.cat([torch.arange(n) for n in lengths]))
    ids, position_ids = torch.stack(rows), torch.stack(positions)
    labels = ids.clone()
    for row, start in segments:
        labels[row, start] = -100
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
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(
        (TypeError, ValueError), match=r"GPT2LMHeadModel is not supported.*LlamaForCausalLM"
    ):
        apply_rmpad(gpt2)
    assert_untouched(gpt2, attn=None)
    base = LlamaModel(LlamaConfig(**BASE_CONFIG))
    with pytest.raises((TypeError, ValueError), match="LlamaModel is not supported"):
        apply_rmpad(base)
    assert_untouched(base)
    with pytest.raises((TypeError, ValueError), match="Linear is not supported"):
        apply_rmpad(nn.Linear(3, 3))
    with pytest.raises((TypeError, ValueError), match="dict is not supported"):
        apply_rmpad({})


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


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
@pytest.mark.parametrize("max_window_layers", [0, 1])  # every layer / the second layer
def test_sliding_window_is_refused(family, max_window_layers):
    model = make_model(
        family, use_sliding_window=True, sliding_window=4, max_window_layers=max_window_layers
    )
    assert "sliding_attention" in model.config.layer_types
    with pytest.raises(ValueError, match="sliding-window attention is not supported"):
        apply_rmpad(model)
    assert_untouched(model)


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
