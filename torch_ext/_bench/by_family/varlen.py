"""The varlen family: ``unpad_input`` + ``pad_input`` against the flash-attention-style
composition (mask sum, nonzero, cumsum and pad, a gather with expanded indices, and an index_put
into zeros) that users write or import."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import torch_ext
from torch_ext._bench.registry import Case, CheckResult, Family, compare, register

FAMILY = "varlen"

# Goal shape (issue: B=16, S=2048, hidden=1024, lengths uniform in [0.3 S, S]) and a quick one.
SHAPE = {False: (16, 2048, 1024), True: (4, 256, 64)}
TOLERANCE = {torch.float64: 0.0, torch.float32: 0.0}  # pure data movement: exact


def reference_unpad(hidden: torch.Tensor, mask: torch.Tensor):
    """The composition of flash-attention's bert_padding, written out."""
    seqlens = mask.sum(-1, dtype=torch.int32)
    indices = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
    max_seqlen = int(seqlens.max().item())
    cu_seqlens = F.pad(torch.cumsum(seqlens, 0, dtype=torch.int32), (1, 0))
    flat = hidden.reshape(hidden.shape[0] * hidden.shape[1], -1)
    gathered = torch.gather(flat, 0, indices[:, None].expand(-1, flat.shape[1]))
    return gathered.reshape(-1, *hidden.shape[2:]), indices, cu_seqlens, max_seqlen, seqlens


def reference_pad(values: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int):
    output = values.new_zeros(batch * seqlen, *values.shape[1:])
    output[indices] = values
    return output.reshape(batch, seqlen, *values.shape[1:])


def random_mask(batch: int, seqlen: int, device, generator=None) -> torch.Tensor:
    """Right padding, lengths uniform in [0.3 S, S]."""
    lengths = torch.randint(int(0.3 * seqlen), seqlen + 1, (batch,), generator=generator)
    return (torch.arange(seqlen)[None, :] < lengths[:, None]).to(device)


def ours_round_trip(hidden, mask):
    tokens, indices, _, _, _ = torch_ext.unpad_input(hidden, mask)
    return torch_ext.pad_input(tokens, indices, hidden.shape[0], hidden.shape[1])


def reference_round_trip(hidden, mask):
    tokens, indices, _, _, _ = reference_unpad(hidden, mask)
    return reference_pad(tokens, indices, hidden.shape[0], hidden.shape[1])


def checks(device: torch.device, quick: bool) -> list[CheckResult]:
    generator = torch.Generator().manual_seed(0)
    results = []
    for dtype in (torch.float64, torch.float32):
        for batch, seqlen, trailing in ((3, 17, (5,)), (2, 9, ()), (4, 33, (2, 3))):
            hidden = torch.randn(batch, seqlen, *trailing, generator=generator, dtype=dtype)
            hidden = hidden.to(device)
            mask = torch.rand(batch, seqlen, generator=generator).to(device) > 0.4
            mask[0] = False  # a fully padded row
            described = f"{[batch, seqlen, *trailing]} random holes"
            ours = torch_ext.unpad_input(hidden, mask)
            expected = reference_unpad(hidden, mask)
            for what, a, b in (
                ("hidden_unpad", ours[0], expected[0]),
                ("indices", ours[1], expected[1]),
                ("cu_seqlens", ours[2], expected[2]),
                ("seqused", ours[4], expected[4]),
            ):
                results.append(
                    compare(
                        a,
                        b,
                        TOLERANCE[dtype],
                        family=FAMILY,
                        op="unpad_input",
                        what=what,
                        inputs=described,
                    )
                )
            results.append(
                compare(
                    ours_round_trip(hidden, mask),
                    reference_round_trip(hidden, mask),
                    TOLERANCE[dtype],
                    family=FAMILY,
                    op="pad_input",
                    what="round trip",
                    inputs=described,
                )
            )
    return results


def round_trip_case(
    device: torch.device, quick: bool, backward: bool, dtype: torch.dtype = torch.float32
) -> Case:
    batch, seqlen, width = SHAPE[quick]

    def make_inputs():
        generator = torch.Generator().manual_seed(1)
        mask = random_mask(batch, seqlen, device, generator)
        hidden = torch.randn(batch, seqlen, width, device=device, dtype=dtype)
        return hidden.requires_grad_(backward), mask

    def traffic(inputs):
        hidden, mask = inputs
        row = width * hidden.element_size()
        nnz = int(mask.sum())
        # unpad reads and writes nnz rows; pad reads nnz rows and writes B * S rows (the
        # backward does the same in reverse); the mask is read once.
        read, written = 2 * nnz * row + mask.numel(), nnz * row + batch * seqlen * row
        return (2 * read, 2 * written) if backward else (read, written)

    direction = "fwd+bwd" if backward else "fwd"
    return Case(
        family=FAMILY,
        op="unpad_input+pad_input",
        label=f"unpad+pad {direction}",
        device=str(device),
        shape=f"{batch}x{seqlen}x{width}",
        dtype=str(dtype).removeprefix("torch."),
        layout="right padding, lengths U[0.3S, S]",
        backward=backward,
        make_inputs=make_inputs,
        ours=ours_round_trip,
        reference=reference_round_trip,
        traffic=traffic,
    )


# A tiny Llama-style model: (batch, seqlen, hidden, layers, heads, kv heads, intermediate, vocab).
LLAMA = {False: (8, 512, 256, 4, 8, 4, 688, 2048), True: (2, 64, 64, 2, 4, 2, 128, 256)}


def llama_case(device: torch.device, quick: bool) -> Case | None:
    """Forward + backward of a tiny Llama with ~50% padding: apply_rmpad against unpatched."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    import copy

    from torch_ext.patch import apply_rmpad

    batch, seqlen, hidden, layers, heads, kv_heads, inter, vocab = LLAMA[quick]
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=seqlen,
        attn_implementation="sdpa",
    )
    plain = LlamaForCausalLM(config).to(device).train()
    patched = copy.deepcopy(plain)
    apply_rmpad(patched)

    def make_inputs():
        generator = torch.Generator().manual_seed(2)
        lengths = torch.randint(1, seqlen + 1, (batch,), generator=generator)  # ~50% padding
        mask = (torch.arange(seqlen)[None, :] < lengths[:, None]).to(device)
        ids = torch.randint(0, vocab, (batch, seqlen), generator=generator).to(device)
        embeds = plain.get_input_embeddings()(ids).detach().requires_grad_()
        labels = ids.masked_fill(~mask, -100)
        return embeds, mask, labels

    def run(model):
        return lambda embeds, mask, labels: (
            model(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
        )

    return Case(
        family=FAMILY,
        op="apply_rmpad",
        label="tiny Llama fwd+bwd, ~50% padding: apply_rmpad vs unpatched",
        device=str(device),
        shape=f"{batch}x{seqlen} h{hidden} L{layers}",
        dtype="float32",
        layout="right padding, lengths U[1, S]",
        backward=True,
        make_inputs=make_inputs,
        ours=run(patched),
        reference=run(plain),
        compile_reference=False,
    )


def cases(device: torch.device, quick: bool) -> list[Case]:
    result = [round_trip_case(device, quick, False), round_trip_case(device, quick, True)]
    if device.type == "cuda":  # the GPU goal is stated in bfloat16
        result += [
            round_trip_case(device, quick, backward, torch.bfloat16) for backward in (False, True)
        ]
    llama = llama_case(device, quick)
    return result + ([llama] if llama is not None else [])


register(Family(name=FAMILY, checks=checks, cases=cases))
