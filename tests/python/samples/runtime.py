"""Samples of the ops that report how the library runs (csrc/common/runtime_info.cpp)."""

from __future__ import annotations

from . import Sample

OPCHECK_SKIPS = {
    "_cpu_capability": {
        "test_aot_dispatch_dynamic": "returns a str: the sub-test compares the eager and the "
        "AOTAutograd outputs with torch.testing.assert_close, which cannot compare strings "
        "(TypeError: No comparison pair was able to handle inputs of type <class 'str'>)",
    },
}


def sample_inputs(device: str) -> dict[str, list[Sample]]:
    # No tensor arguments: the same call on every device.
    return {"_cpu_capability": [Sample((), label="no-args")]}
