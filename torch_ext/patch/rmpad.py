"""Remove padding once for a whole Hugging Face decoder model: ``apply_rmpad(model)``.

The patched model's forward unpads the batch once, before the embedding, runs the unchanged
decoder (embedding, every layer's norms, projections, rotary embeddings and MLP, the final norm
and the LM head) on the real tokens only, as one ``[1, nnz]`` row, and pads the logits back once
(the loss is computed on the real tokens). Attention is ``torch_ext.varlen.attention`` over the
global ``cu_seqlens``, registered in transformers' ``AttentionInterface``, so no token attends
across sequences. Right padding, left padding, holes and packed rows (``position_ids`` restarting
at 0, no ``attention_mask``) all work.

Supported: transformers >= 4.56 with the causal-LM classes of Llama, Qwen2, Qwen3, Mistral,
Gemma 2, Gemma 3 (text-only ``Gemma3ForCausalLM``), Phi-3 and OLMo 2 (and subclasses of them
defined outside transformers; a transformers model derived from one is another architecture and
is refused), training and scoring (no generation cache). What these families pass to the
attention function is implemented exactly: their scaling (Gemma's ``query_pre_attn_scalar``),
sliding windows (Mistral, Phi-3, Gemma, Qwen's ``use_sliding_window``: a query sees the keys at
most ``window - 1`` slots of the padded row before it, as transformers' mask counts them, holes
included) and attention logit softcapping (Gemma 2). A layer whose window cuts no sequence and
that has no softcapping runs ``varlen.attention`` (flash-attention on CUDA); the others run
attention per sequence with a boolean mask (``scaled_dot_product_attention``, or transformers'
eager formula where softcapping is on). Bidirectional attention (Gemma's
``use_bidirectional_attention``) and attention dropout in training are refused.
A ``PackingCollator`` batch can be passed as is (``model(**batch)``): a sequence starts at each
row's first real token and at every position id 0, with or without an attention mask.
Anything else gets a ValueError naming what is not supported, never a silent no-op. Only the
given model instance changes (its ``forward`` attribute and ``config._attn_implementation``);
``undo()`` restores both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from torch_ext import varlen
from torch_ext.varlen._attention import _per_sequence

__all__ = ["ATTENTION_NAME", "RmpadHandle", "apply_rmpad", "undo_rmpad"]

ATTENTION_NAME = "torch_ext_varlen"
SUPPORTED_CLASSES = (
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "MistralForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "Phi3ForCausalLM",
    "Olmo2ForCausalLM",
)
LAYER_TYPES = ("full_attention", "sliding_attention")
MIN_TRANSFORMERS = (4, 56)

# Set on a patched model: (original _attn_implementation, the handle).
_STATE = "_torch_ext_rmpad"
# Extra attention kwargs of a model with sliding windows: each token's slot in its padded row
# (int64 [nnz]) and the longest slot span of a sequence (a window at least this long cuts none).
_SLOTS = "torch_ext_slots"
_SPAN = "torch_ext_window_span"


def _transformers():
    try:
        import transformers
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ValueError("apply_rmpad: transformers is not installed") from error
    version = tuple(int(part) for part in transformers.__version__.split(".")[:2] if part.isdigit())
    if version < MIN_TRANSFORMERS:
        raise ValueError(
            f"apply_rmpad: transformers {transformers.__version__} is not supported; it needs "
            f">= {'.'.join(map(str, MIN_TRANSFORMERS))} (AttentionInterface, mask-free custom "
            "attention and the cu_seq_lens kwargs)"
        )
    return transformers


def _varlen_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout=0.0,
    scaling=None,
    sliding_window=None,
    softcap=None,
    **kwargs,
):
    """transformers' attention-function signature over our varlen attention.

    query/key/value ``[1, heads, tokens, head_dim]`` (the unpadded row); returns
    ``([1, tokens, heads, head_dim], None)`` like transformers' sdpa function. Implements what
    the supported families pass: ``scaling``, ``sliding_window`` and ``softcap``; refuses what
    it cannot do exactly (dropout, bidirectional attention, attention sinks).
    """
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None or query.shape[0] != 1:
        raise ValueError(
            f"the {ATTENTION_NAME!r} attention runs only inside a model patched by "
            "torch_ext.patch.apply_rmpad (it needs the global cu_seqlens)"
        )
    if dropout:
        raise ValueError(f"apply_rmpad: attention dropout is not supported, got {dropout}")
    if not getattr(module, "is_causal", True):
        raise ValueError(
            f"apply_rmpad: {type(module).__name__} is bidirectional (is_causal=False); only "
            "causal attention is supported"
        )
    if kwargs.get("s_aux") is not None:
        raise ValueError(
            f"apply_rmpad: {type(module).__name__}'s attention sinks are not supported"
        )
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    if sliding_window is not None:
        if kwargs.get(_SLOTS) is None:
            raise ValueError(
                f"apply_rmpad: {type(module).__name__} passes sliding_window={sliding_window} "
                "but the model's config.sliding_window is None"
            )
        if sliding_window >= kwargs[_SPAN]:
            sliding_window = None  # the window cuts no sequence: plain causal attention
    if sliding_window is None and softcap is None:
        max_seqlen = kwargs["max_length_q"]
        out = varlen.attention(q, k, v, cu_seqlens, max_seqlen, causal=True, scale=scaling)
    else:
        out = _masked_attention(
            q, k, v, cu_seqlens, kwargs.get(_SLOTS), sliding_window, softcap, scaling
        )
    return out.unsqueeze(0), None


def _masked_attention(q, k, v, cu_seqlens, slots, window, softcap, scale):
    """Causal attention per sequence with a sliding window and/or logit softcapping.

    ``q [T, Hq, D]``, ``k``/``v`` ``[T, Hkv, D]``; ``slots [T]`` each token's slot in its padded
    row: query ``i`` sees key ``j`` of its sequence when ``0 <= slots[i] - slots[j] < window``
    (transformers' sliding-window mask). With ``softcap``, transformers' eager formula:
    ``softmax(tanh(q k^T * scale / softcap) * softcap)`` in float32, cast back to q's dtype.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale

    def attend(qs, ks, vs, begin, end):
        if slots is None:
            distance = torch.arange(end - begin, device=q.device)
        else:
            distance = slots[begin:end]
        distance = distance[:, None] - distance[None, :]
        allowed = distance >= 0
        if window is not None:
            allowed &= distance < window
        if softcap is None:
            return F.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed, scale=scale)
        scores = torch.tanh(torch.matmul(qs, ks.transpose(-1, -2)) * scale / softcap) * softcap
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(probs, vs)

    return _per_sequence(q, k, v, cu_seqlens.tolist(), attend)


def _register_attention(transformers) -> None:
    interface = transformers.AttentionInterface
    if ATTENTION_NAME not in interface._global_mapping:
        interface.register(ATTENTION_NAME, _varlen_attention)


def _transformers_class(model: nn.Module):
    """The first class of the model's MRO defined in transformers, or None.

    A user's subclass of a supported class is that class; a transformers model derived from one
    is another architecture (another attention or extra token mixing) and is itself.
    """
    for cls in type(model).__mro__:
        if cls.__module__.split(".")[0] == "transformers":
            return cls
    return None


def _check_model(model: nn.Module) -> None:
    name = type(model).__name__
    family = _transformers_class(model)
    if family is None or family.__name__ not in SUPPORTED_CLASSES or not hasattr(model, "config"):
        derived = [c.__name__ for c in type(model).__mro__[1:] if c.__name__ in SUPPORTED_CLASSES]
        origin = f" (derived from {derived[0]}, but a different model)" if derived else ""
        raise ValueError(
            f"apply_rmpad: {name} is not supported{origin}; supported: "
            f"{', '.join(SUPPORTED_CLASSES)}"
        )
    config = model.config
    unknown = sorted(set(getattr(config, "layer_types", None) or ()) - set(LAYER_TYPES))
    if unknown:
        raise ValueError(
            f"apply_rmpad: {name}'s layer types {unknown} are not supported (only {LAYER_TYPES})"
        )
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError(
            f"apply_rmpad: {name} with use_bidirectional_attention=True is not supported "
            "(causal attention only)"
        )
    if hasattr(model, _STATE):
        raise ValueError(f"apply_rmpad: this {name} is already patched (undo_rmpad(model) first)")


class RmpadHandle:
    """What ``apply_rmpad`` did; ``undo()`` restores the model's forward and attention."""

    def __init__(self, model: nn.Module, original_attention: str) -> None:
        self.model = model
        self.original_attention = original_attention

    @property
    def active(self) -> bool:
        return (
            getattr(self.model, _STATE, None) is not None and self.model._torch_ext_rmpad[1] is self
        )

    def undo(self) -> None:
        """Restores the class's forward and the original attention implementation."""
        if not self.active:
            raise ValueError("undo: this apply_rmpad patch is no longer in place")
        undo_rmpad(self.model)

    def __enter__(self) -> RmpadHandle:
        return self

    def __exit__(self, *exc_info) -> None:
        if self.active:
            self.undo()

    def __repr__(self) -> str:
        return f"RmpadHandle({type(self.model).__name__}, active={self.active})"


def _plan(input_like: torch.Tensor, attention_mask, position_ids):
    """(indices, cu_seqlens, max_seqlen, positions of the real tokens) for a [B, S] batch.

    A sequence starts at each row's first real token and, when position_ids are given, at every
    real token whose position id is 0 (packed rows, with or without an attention mask).
    """
    batch, seqlen = input_like.shape[:2]
    device = input_like.device
    if attention_mask is None and position_ids is not None:  # packed rows: every token is real
        cu_seqlens, max_seqlen = varlen.cu_seqlens_from_position_ids(position_ids)
        indices = torch.arange(batch * seqlen, device=device)
        return indices, cu_seqlens.to(device), max_seqlen, position_ids.reshape(-1)
    if attention_mask is None:
        attention_mask = torch.ones(batch, seqlen, dtype=torch.bool, device=device)
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, seqlen):
        raise ValueError(
            f"apply_rmpad: attention_mask must be 2-D {(batch, seqlen)}, got "
            f"{tuple(attention_mask.shape)}"
        )
    indices, cu_seqlens, max_seqlen, _ = torch.ops.torch_ext._unpad_plan(attention_mask)
    if position_ids is None:  # the unpatched model's default: 0 .. S - 1 in every row
        position_ids = torch.arange(seqlen, device=device).expand(batch, seqlen)
        return indices, cu_seqlens, max_seqlen, position_ids.reshape(-1).index_select(0, indices)
    positions = position_ids.reshape(-1).index_select(0, indices)
    starts = positions == 0
    starts[cu_seqlens[:-1][cu_seqlens[:-1] < cu_seqlens[1:]].long()] = True  # rows' first tokens
    bounds = torch.nonzero(starts).flatten()
    cu_seqlens = torch.cat([bounds, bounds.new_tensor([positions.numel()])]).to(torch.int32)
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    max_seqlen = int(lengths.max()) if lengths.numel() else 0
    return indices, cu_seqlens, max_seqlen, positions


def _window_kwargs(indices: torch.Tensor, cu_seqlens: torch.Tensor, seqlen: int) -> dict:
    """The extra attention kwargs of a model with sliding windows: every token's slot in its
    padded row and the longest slot span of a sequence (first to last token, holes included)."""
    slots = indices % seqlen
    tokens = slots.numel()
    if tokens == 0:
        return {_SLOTS: slots, _SPAN: 0}
    starts, ends = cu_seqlens[:-1].long(), cu_seqlens[1:].long()
    spans = slots[(ends - 1).clamp(min=0)] - slots[starts.clamp(max=tokens - 1)] + 1
    return {_SLOTS: slots, _SPAN: int(torch.where(ends > starts, spans, 0).max())}


def _patched_forward(model: nn.Module, original):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    def forward(
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        **kwargs,
    ):
        # A PackingCollator batch's own boundaries: the same ones _plan derives from the mask and
        # the position ids.
        kwargs.pop("cu_seqlens", None)
        kwargs.pop("max_seqlen", None)
        for unsupported in ("cache", "past_key_values"):
            if kwargs.get(unsupported) is not None:
                raise ValueError(
                    f"apply_rmpad: {unsupported} is not supported (training and scoring only; "
                    "undo the patch to generate)"
                )
        if use_cache:
            raise ValueError("apply_rmpad: use_cache=True is not supported (no generation cache)")
        if not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
            raise ValueError("apply_rmpad: logits_to_keep is not supported")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("apply_rmpad: pass exactly one of input_ids and inputs_embeds")
        source = input_ids if input_ids is not None else inputs_embeds
        batch, seqlen = source.shape[:2]
        indices, cu_seqlens, max_seqlen, positions = _plan(source, attention_mask, position_ids)
        tokens = varlen.index_first_axis(source.reshape(batch * seqlen, *source.shape[2:]), indices)
        if getattr(model.config, "sliding_window", None) is not None:
            kwargs.update(_window_kwargs(indices, cu_seqlens, seqlen))
        outputs = original(
            input_ids=tokens[None] if input_ids is not None else None,
            inputs_embeds=tokens[None] if inputs_embeds is not None else None,
            attention_mask=None,
            position_ids=positions[None],
            use_cache=False,
            cu_seq_lens_q=cu_seqlens,
            cu_seq_lens_k=cu_seqlens,
            max_length_q=max_seqlen,
            max_length_k=max_seqlen,
            **kwargs,
        )
        logits = outputs.logits[0]  # [nnz, vocab]
        loss = None
        if labels is not None:
            # Shift within each row of the padded batch (as the unpatched loss does), then keep
            # the real tokens: no label crosses from one sequence into the next.
            shifted = F.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1).index_select(0, indices)
            loss_kwargs = {
                key: kwargs[key] for key in ("num_items_in_batch", "ignore_index") if key in kwargs
            }
            loss = model.loss_function(
                logits=logits[None],
                labels=None,
                vocab_size=model.config.vocab_size,
                shift_labels=shifted[None],
                **loss_kwargs,
            )
        hidden_states = outputs.hidden_states
        if hidden_states is not None:  # [1, nnz, H] each -> [B, S, H]
            hidden_states = tuple(
                varlen.pad_input(h[0], indices, batch, seqlen) for h in hidden_states
            )
        return CausalLMOutputWithPast(
            loss=loss,
            logits=varlen.pad_input(logits, indices, batch, seqlen),
            hidden_states=hidden_states,
            attentions=outputs.attentions,
        )

    return forward


def apply_rmpad(model: nn.Module) -> RmpadHandle:
    """Patches ``model`` (a causal LM of a family in ``SUPPORTED_CLASSES``) to run on real tokens
    only.

    Returns a handle whose ``undo()`` (or ``undo_rmpad(model)``) restores the model. Logits,
    loss and gradients equal the unpatched model's on real tokens (padded positions get zero
    logits); tokens never attend across sequences.

    Raises:
        ValueError: an unsupported model class (named, with the supported ones), transformers
            version or configuration (bidirectional attention, layer types other than full and
            sliding attention; attention dropout in training, at the forward), or a model
            already patched.
    """
    transformers = _transformers()
    _check_model(model)
    _register_attention(transformers)
    original_attention = model.config._attn_implementation
    handle = RmpadHandle(model, original_attention)
    original_forward = model.forward  # the class's forward, bound to this model
    model.forward = _patched_forward(model, original_forward)
    model.config._attn_implementation = ATTENTION_NAME
    object.__setattr__(model, _STATE, (original_attention, handle))
    return handle


def undo_rmpad(model: nn.Module) -> None:
    """Restores a model patched by ``apply_rmpad``; ValueError when it is not patched."""
    state = getattr(model, _STATE, None)
    if state is None:
        raise ValueError(f"undo_rmpad: this {type(model).__name__} is not patched by apply_rmpad")
    original_attention, _ = state
    del model.forward  # the instance attribute; the class's forward shows again
    model.config._attn_implementation = original_attention
    object.__delattr__(model, _STATE)
