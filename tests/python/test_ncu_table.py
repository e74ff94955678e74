"""benchmarks/ncu_table.py, the GPU script's Nsight Compute summary, on hand-written ncu output
(the GPU machine is the only place the real thing runs)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "ncu_table.py"
_SPEC = importlib.util.spec_from_file_location("ncu_table", _PATH)
ncu_table = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(ncu_table)

HEADER = (
    '"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream",'
    '"Block Size","Grid Size","Device","CC","dram__throughput.avg.pct_of_peak_sustained_elapsed",'
    '"gpu__time_duration.sum","launch__registers_per_thread",'
    '"sm__throughput.avg.pct_of_peak_sustained_elapsed",'
    '"sm__warps_active.avg.pct_of_peak_sustained_active"'
)
UNITS = '"","","","","","","","","","","","%","{unit}","register/thread","%","%"'
SPP = (
    "torch_ext::spp_impl::(anonymous namespace)::spp_forward_nhwc_kernel<float>"
    "(const float *, float *, long)"
)
COPY = (
    "void torch_ext::varlen_impl::(anonymous namespace)::copy_rows<uint4, (bool)0>"
    "(const uint4 *, uint4 *, const long *, long, long, long, long)"
)


def launch(i, name, dram, duration, regs, sm, occ):
    return (
        f'"{i}","77","python3","host","{name}","1","7","(256, 1, 1)","(1024, 1, 1)","0","9.0",'
        f'"{dram}","{duration}","{regs}","{sm}","{occ}"'
    )


def test_short_names_drop_namespaces_and_parameters():
    assert ncu_table.short_name(SPP) == "spp_forward_nhwc_kernel<float>"
    assert ncu_table.short_name(COPY) == "copy_rows<uint4, (bool)0>"
    assert ncu_table.short_name("plain_kernel") == "plain_kernel"
    assert ncu_table.short_name("ns::k<a::b<int>>(int)") == "k<a::b<int>>"


def test_table_groups_launches_by_kernel_with_medians_in_microseconds():
    text = "\n".join(
        [
            "==PROF== Connected to process 77",
            HEADER,
            UNITS.format(unit="nsecond"),
            launch(0, SPP, "10.5", "2,000", "32", "20", "50"),
            launch(1, COPY, "80", "500", "24", "30", "90"),
            launch(2, SPP, "30.5", "4,000", "32", "40", "70"),
            launch(3, SPP, "20.5", "9,000", "32", "60", "60"),
            "==PROF== Disconnected from process 77",
        ]
    )
    table = ncu_table.summarize(ncu_table.read_rows(text))
    assert [row["kernel"] for row in table] == [
        "spp_forward_nhwc_kernel<float>",
        "copy_rows<uint4, (bool)0>",
    ]
    spp, copy = table
    assert spp["launches"] == 3 and copy["launches"] == 1
    assert spp["duration us"] == pytest.approx(4.0)  # median of 2, 4, 9 us
    assert spp["DRAM %"] == pytest.approx(20.5) and spp["SM %"] == pytest.approx(40)
    assert spp["occupancy %"] == pytest.approx(60) and spp["registers"] == 32
    assert copy["duration us"] == pytest.approx(0.5)
    md = ncu_table.markdown(table)
    assert md.splitlines()[0].startswith("| kernel | launches | duration us")
    assert "| spp_forward_nhwc_kernel<float> | 3 | 4.0 | 40.0 | 20.5 | 60.0 | 32 |" in md


def test_units_row_is_optional_and_other_duration_units_convert():
    text = "\n".join([HEADER, launch(0, SPP, "1", "3", "16", "2", "3")])
    (row,) = ncu_table.summarize(ncu_table.read_rows(text))
    assert row["duration us"] == pytest.approx(0.003)  # no units row: nanoseconds
    text = "\n".join(
        [HEADER, UNITS.format(unit="msecond"), launch(0, SPP, "1", "3", "16", "2", "3")]
    )
    (row,) = ncu_table.summarize(ncu_table.read_rows(text))
    assert row["duration us"] == pytest.approx(3000)


def test_output_without_a_kernel_column_is_an_error():
    with pytest.raises(ValueError, match="kernel name column"):
        ncu_table.read_rows('"ID","Something"\n"0","1"')
    assert ncu_table.read_rows("==PROF== nothing profiled") == []
