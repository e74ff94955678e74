"""apply_checkpointing on Hugging Face models, called exactly as a training loop calls them.

A model in training mode with its KV cache at the default (``use_cache=True``): the checkpointed
layers must not fill the cache (the recomputation would fill it a second time and the backward
fail), and losses and gradients must equal those of the unpatched model. The tiny models and
helpers are test_rmpad's.
"""

from __future__ import annotations

import pytest
import torch
from test_rmpad import (
    BATCH,
    FAMILIES,
    SEQ,
    assert_same_grads,
    make_model,
    padding_mask,
    random_ids,
    run,
)

from torch_ext.patch import apply_checkpointing


def unwrapped_names(grads: dict) -> dict:
    """Parameter names of the patched model (layers.0.module.x) as the plain model's."""
    return {name.replace(".module.", "."): grad for name, grad in grads.items()}


@pytest.mark.parametrize("policy", ["full", "selective"])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_training_call_with_the_default_cache(family, masked, policy):
    model = make_model(family).train()
    ids = random_ids((BATCH, SEQ), seed=5)
    inputs = dict(input_ids=ids, labels=ids)
    if masked:
        mask = padding_mask("right")
        inputs.update(attention_mask=mask.long(), labels=ids.masked_fill(~mask, -100))
    assert model.config.use_cache  # the default a training loop inherits
    ref_logits, ref_loss, ref_grads = run(model, **inputs, use_cache=False)
    with apply_checkpointing(model, policy=policy) as handle:
        assert len(handle.wrapped) == model.config.num_hidden_layers
        logits, loss, grads = run(model, **inputs)  # use_cache left as the model has it
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(logits, ref_logits)
    assert_same_grads(unwrapped_names(grads), ref_grads)


def test_inference_keeps_the_cache():
    """Without grad mode the layers run plainly, cache included: generation is unchanged."""
    model = make_model("llama").eval()
    ids = random_ids((BATCH, SEQ), seed=6)
    with torch.no_grad():
        ref = model(input_ids=ids)
        with apply_checkpointing(model):
            out = model(input_ids=ids)
    assert out.past_key_values.get_seq_length() == SEQ
    torch.testing.assert_close(out.logits, ref.logits)
