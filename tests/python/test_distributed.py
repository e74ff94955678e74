"""Distributed training with torch_ext: FSDP2 (``fully_shard``) and DDP against one process.

The processes are started by ``distributed_workers`` (gloo on the CPU, a ``file://``
rendezvous; the same code runs with NCCL on GPUs), once per launch, and each launch checks
several configurations against a single-process run of the same global batch, in float64 with
tight tolerances:

* ``apply_checkpointing`` + ``fully_shard`` on a tiny Hugging Face Llama (padded rows; the model
  called as a training loop calls it: labels, ``num_items_in_batch``, the KV cache left at its
  default): every step's loss, every gradient (each rank's local shard against the matching
  ``torch.chunk`` of the reference gradient, and the gathered ``full_tensor()``), the parameters
  after the SGD steps, and that every layer's forward ran twice (the recomputation); layers
  wrapped then sharded, sharded then wrapped, full and selective policies.
* ``apply_rmpad`` + ``fully_shard``: ``PackingCollator`` packs of the global batch split across
  the ranks as ``DistributedSampler`` splits a dataset; the same checks against the unpatched
  model on the packed rows; patched before and after sharding, and with ``apply_checkpointing``.
  The two Llama tests share one launch (importing transformers is most of a worker's time).
* ``SegmentationMetrics`` under a 2-D device mesh, data parallel x tensor parallel, in four
  processes (the smallest world where the data-parallel group is neither one process nor all of
  them): with ``process_group=mesh.get_group("dp")`` every image counts once; with the
  tensor-parallel group or the default group every image counts once per tensor-parallel rank;
  out-of-range labels are counted over the metric's group; a process outside the given group
  gets a clear error.
* A net of ``DilatedConv2d``, ``ASPP`` and ``SpatialPyramidPooling`` trained under DDP and under
  FSDP2 (ASPP a unit; every conv a unit of its own), then evaluated (ASPP's inference path, with
  ``SegmentationMetrics`` over the default group).

The LM losses are sums over a rank's predicted tokens divided by the global number of them
(``num_items_in_batch``), and go backward multiplied by the world size, because DDP and FSDP2
average the gradients over the processes: the ranks' losses then add up to the global loss and
the averaged gradients are the global batch's, however the tokens fall on the ranks.

This file is also the worker: ``python test_distributed.py --ddp-worker RANK WORLD INIT_FILE OUT
JOB`` (see ``run_worker``).
"""

from __future__ import annotations

import sys
from collections import Counter

import distributed_workers
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_ext  # noqa: F401  (loads the op library)
from torch_ext.metrics import MetricsResult, SegmentationMetrics, segmentation_metrics
from torch_ext.nn import ASPP, DilatedConv2d, SpatialPyramidPooling

WORLD = 2
TIMEOUT_S = 120
STEPS = 2
LR = 0.5
# float64: sharding changes only how sums are split (reduce-scatter, all-gather, all-reduce).
TIGHT = dict(rtol=1e-10, atol=1e-12)

# ---------------------------------------------------------------- shared helpers


def plain_name(name: str) -> str:
    """A parameter's name without the wrappers' ``module.`` (CheckpointWrapper, DDP)."""
    return name.replace(".module.", ".").removeprefix("module.")


def fsdp_mesh(world: int):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world,))


def rank_rows(rows: int, rank: int, world: int) -> list[int]:
    """The rows ``DistributedSampler(shuffle=False)`` gives a rank. rows % world == 0: else the
    sampler repeats rows to even out the ranks, and the global batch is not the same."""
    from torch.utils.data import DistributedSampler

    assert rows % world == 0, (rows, world)
    return list(DistributedSampler(range(rows), num_replicas=world, rank=rank, shuffle=False))


def sharded_grads(model: nn.Module) -> dict:
    """{name: (this rank's local shard or None, the whole gradient)}. FSDP2's gradients are
    DTensors sharded on dim 0; gathering them is a collective (every rank calls it)."""
    from torch.distributed.tensor import DTensor, Shard

    out = {}
    for name, param in model.named_parameters():
        grad = param.grad
        if isinstance(grad, DTensor):
            assert tuple(grad.placements) == (Shard(0),), (name, grad.placements)
            out[plain_name(name)] = (grad.to_local().clone(), grad.full_tensor())
        else:
            out[plain_name(name)] = (None, grad.detach().clone())
    return out


def full_params(model: nn.Module) -> dict:
    from torch.distributed.tensor import DTensor

    return {
        plain_name(name): (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for name, p in model.named_parameters()
    }


def assert_grads_equal(got: dict, want: dict, rank: int, sharded: bool) -> None:
    """Gathered gradients equal the reference's; with FSDP2 also this rank's local shard, its
    part of ``torch.chunk(reference, WORLD)`` (empty past the last chunk), as FSDP2 shards."""
    assert got.keys() == want.keys()
    for name, (local, full) in got.items():
        torch.testing.assert_close(full, want[name], **TIGHT, msg=f"{name} (gathered)")
        if sharded:
            assert local is not None, f"{name}: the gradient is not a DTensor"
            chunks = torch.chunk(want[name], WORLD, dim=0)
            expected = chunks[rank] if rank < len(chunks) else want[name][:0]
            assert local.shape == expected.shape, (name, local.shape, expected.shape)
            torch.testing.assert_close(local, expected, **TIGHT, msg=f"{name} (rank {rank})")


def assert_params_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TIGHT, msg=name)


def count_forwards(layers) -> Counter:
    """How often each layer's forward runs (the recomputation runs it again)."""
    calls = Counter()
    for index, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda *_, index=index: calls.update([index]))
    return calls


# ================================================================ tiny Llama: checkpointing, rmpad


def llama_helpers():
    """test_rmpad's tiny configs and helpers (imported here: they import transformers)."""
    import test_rmpad

    return test_rmpad


def llama_model() -> nn.Module:
    return llama_helpers().make_model("llama", seed=3).double().train()


def padded_llama_batches() -> list[dict]:
    """STEPS global batches of four padded rows (holes, left, right, none; junk ids at the
    padding), labels -100 at the padding and after it."""
    h = llama_helpers()
    right, left, holes = (h.padding_mask(layout) for layout in ("right", "left", "holes"))
    batches = []
    for step in range(STEPS):
        mask = torch.stack([holes[step], left[1 + step], right[1 + step], right[0]])
        ids = h.random_ids(mask.shape, seed=40 + step)
        labels = h.safe_labels(ids, mask)
        batches.append(dict(input_ids=ids, attention_mask=mask.long(), labels=labels))
    return batches


def packed_llama_batches() -> list[dict]:
    """STEPS global batches of PackingCollator packs (an even number of rows each), without the
    collator's global cu_seqlens: a rank gets rows, and apply_rmpad reads the boundaries from
    the position ids."""
    from torch_ext.varlen import PackingCollator

    h = llama_helpers()
    collate = PackingCollator(capacity=16)
    batches = []
    for step, lengths in enumerate([[5, 9, 3, 7, 4, 6, 2, 11, 8], [12, 3, 3, 9, 5, 1, 6, 10]]):
        examples = [
            {"input_ids": h.random_ids((n,), seed=60 + 10 * step + i)}
            for i, n in enumerate(lengths)
        ]
        packs = collate(examples)
        assert packs["input_ids"].shape[0] % WORLD == 0, packs["input_ids"].shape
        keys = ("input_ids", "labels", "position_ids", "attention_mask")
        batches.append({key: packs[key] for key in keys})
    return batches


def predicted_tokens(labels: torch.Tensor) -> int:
    """How many tokens the causal LM loss predicts (labels other than -100 after the shift)."""
    return int((labels[:, 1:] != -100).sum())


def llama_step(model, batch: dict, items: int, scale: int):
    """One forward and a backward of ``scale * loss`` from zeroed gradients; returns (loss,
    transformers' loss), each the sum over these rows' predicted tokens / ``items``.

    transformers computes its loss in float32 (``logits.float()``), so the loss that goes
    backward is the same cross entropy in float64, from the logits (zero at the padded slots
    under apply_rmpad, where the labels are -100 anyway).
    """
    model.zero_grad(set_to_none=True)
    out = model(**batch, num_items_in_batch=items)
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum") / items
    (loss * scale).backward()
    return loss.detach(), out.loss.detach()


def train_llama(model, batches, rank: int, world: int) -> dict:
    """STEPS SGD steps, each on this rank's rows of the global batch."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses, grads, items = [], [], []
    for batch in batches:
        rows = rank_rows(batch["input_ids"].shape[0], rank, world)
        local = {key: value[rows] for key, value in batch.items()}
        losses.append(llama_step(model, local, predicted_tokens(batch["labels"]), world))
        grads.append(sharded_grads(model))
        items.append(predicted_tokens(local["labels"]))
        optimizer.step()
    return dict(losses=losses, grads=grads, params=full_params(model), items=items)


def checkpointing_configs():
    """(order, policy)."""
    return [("wrap, shard", "full"), ("shard, wrap", "full"), ("wrap, shard", "selective")]


def rmpad_configs():
    """(order, with apply_checkpointing)."""
    return [("rmpad, shard", False), ("shard, rmpad", False), ("rmpad, shard", True)]


def run_llama_checkpointing(rank: int, world: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    from torch_ext.patch import apply_checkpointing

    mesh = fsdp_mesh(world)
    results = {}
    for order, policy in checkpointing_configs():
        model = llama_model()
        layers = model.model.layers
        if order == "wrap, shard":
            handle = apply_checkpointing(model, policy=policy)
            for wrapper in handle.wrappers:
                fully_shard(wrapper, mesh=mesh)
        else:  # the wrappers go around FSDPLlamaDecoderLayer units
            for layer in layers:
                fully_shard(layer, mesh=mesh)
            handle = apply_checkpointing(model, policy=policy)
        fully_shard(model, mesh=mesh)
        assert len(handle.wrapped) == len(layers)
        calls = count_forwards([wrapper.module for wrapper in handle.wrappers])
        result = train_llama(model, padded_llama_batches(), rank, world)
        result["forwards"] = [calls[index] for index in range(len(layers))]
        results[order, policy] = result
    return results


def run_llama_rmpad(rank: int, world: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    from torch_ext.patch import apply_checkpointing, apply_rmpad

    mesh = fsdp_mesh(world)
    results = {}
    for order, checkpointing in rmpad_configs():
        model = llama_model()
        if checkpointing:
            handle = apply_checkpointing(model)
            calls = count_forwards([wrapper.module for wrapper in handle.wrappers])
        if order == "rmpad, shard":
            apply_rmpad(model)
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        if order == "shard, rmpad":
            apply_rmpad(model)
        result = train_llama(model, packed_llama_batches(), rank, world)
        result["attention"] = model.config._attn_implementation
        if checkpointing:
            result["forwards"] = [calls[index] for index in range(len(model.model.layers))]
        results[order, checkpointing] = result
    return results


def run_llama_jobs(rank: int, world: int) -> dict:
    return {
        "checkpointing": run_llama_checkpointing(rank, world),
        "rmpad": run_llama_rmpad(rank, world),
    }


def llama_reference(batches: list[dict], packed: bool) -> dict:
    """One process, the plain model (no checkpointing, no rmpad, no sharding), the global
    batch. Packed rows go in without their mask and with no cache: transformers then builds the
    block-diagonal mask from the position ids."""
    model = llama_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses, grads = [], []
    for batch in batches:
        inputs = dict(batch)
        if packed:
            del inputs["attention_mask"]
            inputs["use_cache"] = False
        losses.append(llama_step(model, inputs, predicted_tokens(batch["labels"]), 1))
        grads.append({name: p.grad.detach().clone() for name, p in model.named_parameters()})
        optimizer.step()
    return dict(losses=losses, grads=grads, params=full_params(model))


def check_llama_results(results: list[dict], reference: dict, configs) -> None:
    for rank, result in enumerate(results):
        assert list(result) == configs
        for config, got in result.items():
            for step in range(STEPS):
                # Each rank's loss is its tokens' share of the global one.
                loss = sum(r[config]["losses"][step][0] for r in results)
                hf_loss = sum(r[config]["losses"][step][1] for r in results)
                ref_loss, ref_hf_loss = reference["losses"][step]
                torch.testing.assert_close(loss, ref_loss, **TIGHT, msg=str(config))
                assert hf_loss.dtype == torch.float32
                torch.testing.assert_close(hf_loss, ref_hf_loss, rtol=1e-6, atol=0)
                torch.testing.assert_close(hf_loss.double(), ref_loss, rtol=1e-6, atol=0)
                assert_grads_equal(got["grads"][step], reference["grads"][step], rank, True)
            assert_params_equal(got["params"], reference["params"])
            if "forwards" in got:  # forward + recomputation, every step
                assert got["forwards"] == [2 * STEPS] * len(got["forwards"]), got["forwards"]
    # The ranks' shares of the predicted tokens differ: an unweighted mean of per-rank mean
    # losses would not be the global loss.
    first = next(iter(results[0].values()))["items"]
    assert first != next(iter(results[1].values()))["items"], first


@pytest.fixture(scope="module")
def llama_results(tmp_path_factory) -> list[dict]:
    """Both Llama tests' results from one launch."""
    pytest.importorskip("transformers")
    tmp_path = tmp_path_factory.mktemp("llama")
    return distributed_workers.run_workers(__file__, tmp_path, WORLD, TIMEOUT_S, ("llama",))


def test_fsdp2_checkpointing_llama(llama_results):
    reference = llama_reference(padded_llama_batches(), packed=False)
    results = [result["checkpointing"] for result in llama_results]
    check_llama_results(results, reference, checkpointing_configs())


def test_fsdp2_rmpad_packed_llama(llama_results):
    reference = llama_reference(packed_llama_batches(), packed=True)
    results = [result["rmpad"] for result in llama_results]
    check_llama_results(results, reference, rmpad_configs())
    for result in results:
        for got in result.values():
            assert got["attention"] == "torch_ext_varlen"  # still patched after the training


# ================================================================ SegmentationMetrics on a 2-D mesh

MESH_WORLD = 4  # dp = 2 x tp = 2
K, IGNORE = 5, 255


def metric_shards() -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Each data-parallel shard's (pred, target) batches; the tensor-parallel ranks of a shard
    see the same batches, as they see the same images."""
    from test_metrics_stream import label_batch, score_batch

    gen = torch.Generator().manual_seed(77)
    return [
        [label_batch((2, 5, 7), gen), score_batch((1, 6, 4), gen)],
        [label_batch((3, 4, 3), gen, torch.int32), score_batch((2, 3, 5), gen)],
    ]


def bad_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """rank + 1 out-of-range pred labels, the first at flat index 2 * rank + 1."""
    pred = torch.zeros(2, 9, dtype=torch.long)
    pred.view(-1)[2 * rank + 1 : 3 * rank + 2] = K
    return pred, torch.ones_like(pred)


def run_metrics_mesh(rank: int, world: int) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
    pairs = metric_shards()[mesh.get_local_rank("dp")]
    groups = {"dp": mesh.get_group("dp"), "tp": mesh.get_group("tp"), "default": None}
    results = {}
    try:
        SegmentationMetrics(K, process_group=mesh)
    except TypeError as error:
        results["mesh"] = str(error)
    for name, group in groups.items():
        metric = SegmentationMetrics(K, IGNORE, device="cpu", process_group=group)
        assert metric.process_group is group
        for pred, target in pairs:
            metric.update(pred, target)
        results[name] = dict(
            local=metric.confusion_matrix, synced=metric.sync(), computed=list(metric.compute())
        )
        metric.update(*bad_batch(rank))
        try:
            metric.compute()
            results[name]["error"] = None
        except ValueError as error:
            results[name]["error"] = str(error)
    # new_group gives the processes outside the group a sentinel, not a group.
    outsider = dist.new_group([0, 1])
    try:
        metric = SegmentationMetrics(K, IGNORE, device="cpu", process_group=outsider)
        for pred, target in pairs:
            metric.update(pred, target)
        results["outsider"] = metric.sync()
    except ValueError as error:
        results["outsider"] = str(error)
    return results


def test_segmentation_metrics_on_a_2d_mesh(tmp_path):
    from test_metrics_stream import numpy_confusion_matrix

    per_shard = [torch.from_numpy(numpy_confusion_matrix(pairs)) for pairs in metric_shards()]
    everything = per_shard[0] + per_shard[1]
    results = distributed_workers.run_workers(
        __file__, tmp_path, MESH_WORLD, TIMEOUT_S, ("metrics-mesh",)
    )
    for rank, result in enumerate(results):
        assert 'mesh.get_group("dp")' in result.get("mesh", ""), result.get("mesh")
        dp, tp = divmod(rank, 2)  # the mesh [[0, 1], [2, 3]]: dp groups {0, 2} and {1, 3}
        # Over the data-parallel group every image counts once; over the tensor-parallel group
        # (the same images) and over the default group (all four) every image counts twice.
        expected = {"dp": everything, "tp": 2 * per_shard[dp], "default": 2 * everything}
        for name, matrix in expected.items():
            got = result[name]
            torch.testing.assert_close(got["local"], per_shard[dp], rtol=0, atol=0)
            torch.testing.assert_close(got["synced"], matrix, rtol=0, atol=0, msg=name)
            for field, value, want in zip(
                MetricsResult._fields, got["computed"], segmentation_metrics(matrix), strict=True
            ):
                torch.testing.assert_close(value, want, rtol=0, atol=0, equal_nan=True, msg=field)
        # Out-of-range labels are counted, and the first one found, over the metric's group.
        members = {"dp": [tp, tp + 2], "tp": [2 * dp, 2 * dp + 1], "default": [0, 1, 2, 3]}
        for name, ranks in members.items():
            error = result[name]["error"]
            assert error is not None, (rank, name)
            where = "over all ranks" if name == "default" else "over process_group"
            assert f"{sum(r + 1 for r in ranks)} pixel(s) ({where})" in error, (rank, error)
            assert f"flat index {2 * min(ranks) + 1}, in pred" in error, (rank, error)
        if rank < 2:
            torch.testing.assert_close(result["outsider"], 2 * per_shard[0], rtol=0, atol=0)
        else:
            assert "not a member of process_group" in result["outsider"], result["outsider"]


def test_segmentation_metrics_process_group_argument():
    with pytest.raises(TypeError, match="process_group must be None or a torch.distributed"):
        SegmentationMetrics(K, process_group="dp")
    assert SegmentationMetrics(K).process_group is None
    # Without torch.distributed initialized, the default group means no sync.
    metric = SegmentationMetrics(K, IGNORE, device="cpu")
    for pred, target in metric_shards()[0]:
        metric.update(pred, target)
    torch.testing.assert_close(metric.sync(), metric.confusion_matrix, rtol=0, atol=0)


# ================================================================ a conv net: DDP and FSDP2

CONV_ROWS = 4  # the global batch: two images a rank (ASPP's pooling BatchNorm needs two)
SEG_CLASSES, IMAGE_CLASSES = 4, 3


class ConvNet(nn.Module):
    """Segmentation and image-classification heads on dilated convs, ASPP and SPP."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = DilatedConv2d(3, 8, 3, padding=1, activation="relu")
        self.body = DilatedConv2d(8, 6, 3, padding=2, dilation=2, activation="silu")
        self.aspp = ASPP(6, 8, rates=(1, 2), dropout=0.0)
        self.seg_head = DilatedConv2d(8, SEG_CLASSES, 1)
        self.spp = SpatialPyramidPooling((1, 2, 3))
        self.cls_head = nn.Linear(self.spp.output_features(8), IMAGE_CLASSES)

    def forward(self, x):
        features = self.aspp(self.body(self.stem(x)))
        return self.seg_head(features), self.cls_head(self.spp(features))


def conv_model(frozen_bn: bool) -> ConvNet:
    """float64, seeded; BatchNorm with random affine parameters and running statistics, in eval
    mode when frozen (as when fine-tuning with a few images a process)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        model = ConvNet().double()
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                nn.init.uniform_(module.weight, 0.5, 1.5)
                nn.init.uniform_(module.bias, -0.2, 0.2)
                module.running_mean.uniform_(-0.3, 0.3)
                module.running_var.uniform_(0.5, 2.0)
    model.train()
    if frozen_bn:
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
    return model


def conv_batches() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """STEPS global batches (images [4, 3, 9, 11], pixel labels, image labels), then one for
    the evaluation after the training."""
    gen = torch.Generator().manual_seed(21)
    return [
        (
            torch.randn(CONV_ROWS, 3, 9, 11, generator=gen, dtype=torch.float64),
            torch.randint(0, SEG_CLASSES, (CONV_ROWS, 9, 11), generator=gen),
            torch.randint(0, IMAGE_CLASSES, (CONV_ROWS,), generator=gen),
        )
        for _ in range(STEPS + 1)
    ]


def conv_loss(model, images, pixels, labels):
    seg, logits = model(images)
    return F.cross_entropy(seg, pixels) + F.cross_entropy(logits, labels)


def conv_configs():
    """(wrapping, frozen BatchNorm). With batch statistics every process normalizes by its own
    images (torch's SyncBatchNorm is CUDA-only); the reference does the same, shard by shard."""
    return [
        ("ddp", True),
        ("fsdp2 blocks", True),
        ("fsdp2 every conv", True),
        ("ddp", False),
        ("fsdp2 blocks", False),
    ]


def wrap_conv_model(model: ConvNet, wrapping: str, world: int) -> nn.Module:
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    if wrapping == "ddp":
        return DDP(model)
    mesh = fsdp_mesh(world)
    if wrapping == "fsdp2 blocks":
        fully_shard(model.aspp, mesh=mesh)
    else:  # ASPP's convs too: its inference path must not read their sharded weights
        for module in model.modules():
            if isinstance(module, DilatedConv2d):
                fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def run_convnet(rank: int, world: int) -> dict:
    batches = conv_batches()
    results = {}
    for wrapping, frozen_bn in conv_configs():
        model = wrap_conv_model(conv_model(frozen_bn), wrapping, world)
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        losses, grads = [], []
        for images, pixels, labels in batches[:STEPS]:
            rows = rank_rows(CONV_ROWS, rank, world)
            model.zero_grad(set_to_none=True)
            # Equal shards, mean losses: the mean over the ranks is the global batch's.
            loss = conv_loss(model, images[rows], pixels[rows], labels[rows])
            loss.backward()
            losses.append(loss.detach())
            grads.append(sharded_grads(model))
            optimizer.step()
        result = dict(losses=losses, grads=grads, params=full_params(model))
        if frozen_bn:  # evaluation, and the metric over the default group
            images, pixels, _ = batches[STEPS]
            rows = rank_rows(CONV_ROWS, rank, world)
            model.eval()
            metric = SegmentationMetrics(SEG_CLASSES, device="cpu")
            with torch.no_grad():
                seg, logits = model(images[rows])
            metric.update(seg, pixels[rows])
            result["eval"] = (seg, logits, metric.sync(), list(metric.compute()))
        results[wrapping, frozen_bn] = result
    return results


def conv_reference(frozen_bn: bool) -> dict:
    model = conv_model(frozen_bn)
    batches = conv_batches()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses, grads = [], []
    for images, pixels, labels in batches[:STEPS]:
        model.zero_grad(set_to_none=True)
        if frozen_bn:
            loss = conv_loss(model, images, pixels, labels)
        else:  # the ranks' shards one after the other, each with its own batch statistics
            shards = [rank_rows(CONV_ROWS, rank, WORLD) for rank in range(WORLD)]
            loss = sum(conv_loss(model, images[r], pixels[r], labels[r]) for r in shards) / WORLD
        loss.backward()
        losses.append(loss.detach())
        grads.append({name: p.grad.detach().clone() for name, p in model.named_parameters()})
        optimizer.step()
    result = dict(losses=losses, grads=grads, params=full_params(model))
    images, pixels, _ = batches[STEPS]
    model.eval()
    with torch.no_grad():
        seg, logits = model(images)
    pairs = SEG_CLASSES * pixels.flatten() + seg.argmax(1).flatten()
    matrix = torch.bincount(pairs, minlength=SEG_CLASSES**2).reshape(SEG_CLASSES, SEG_CLASSES)
    result["eval"] = (seg, logits, matrix)
    return result


def test_convnet_trains_under_ddp_and_fsdp2(tmp_path):
    references = {frozen_bn: conv_reference(frozen_bn) for frozen_bn in (True, False)}
    results = distributed_workers.run_workers(__file__, tmp_path, WORLD, TIMEOUT_S, ("convnet",))
    for rank, result in enumerate(results):
        assert list(result) == conv_configs()
        for (wrapping, frozen_bn), got in result.items():
            reference = references[frozen_bn]
            for step in range(STEPS):
                loss = sum(r[wrapping, frozen_bn]["losses"][step] for r in results) / WORLD
                torch.testing.assert_close(loss, reference["losses"][step], **TIGHT)
                sharded = wrapping != "ddp"
                assert_grads_equal(got["grads"][step], reference["grads"][step], rank, sharded)
            assert_params_equal(got["params"], reference["params"])
            if frozen_bn:
                seg, logits, synced, computed = got["eval"]
                ref_seg, ref_logits, ref_matrix = reference["eval"]
                rows = rank_rows(CONV_ROWS, rank, WORLD)
                torch.testing.assert_close(seg, ref_seg[rows], **TIGHT)
                torch.testing.assert_close(logits, ref_logits[rows], **TIGHT)
                torch.testing.assert_close(synced, ref_matrix, rtol=0, atol=0)
                for field, value, want in zip(
                    MetricsResult._fields, computed, segmentation_metrics(ref_matrix), strict=True
                ):
                    torch.testing.assert_close(value, want, equal_nan=True, msg=field)


# ================================================================ worker entry point

JOBS = {"llama": run_llama_jobs, "metrics-mesh": run_metrics_mesh, "convnet": run_convnet}


def run_worker(rank: int, world: int, init_file: str, out: str, job: str) -> None:
    """One rank of a launch: runs JOBS[job] and saves what it returns."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    distributed_workers.init_process_group(rank, world, init_file, TIMEOUT_S // 2)
    try:
        torch.save(JOBS[job](rank, world), out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__" and len(sys.argv) == 7 and sys.argv[1] == "--ddp-worker":
    _, _, rank_arg, world_arg, init_arg, out_arg, job_arg = sys.argv
    run_worker(int(rank_arg), int(world_arg), init_arg, out_arg, job_arg)
