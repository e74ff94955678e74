"""The package around the ops: version, build information, backends, loading and its errors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torch_ext
from torch_ext import _library


def base_version(version: str) -> str:
    return version.split("+")[0]


def test_version_is_a_release_string():
    assert isinstance(torch_ext.__version__, str)
    assert re.fullmatch(r"\d+\.\d+\.\d+", torch_ext.__version__), torch_ext.__version__
    assert torch_ext.build_info()["version"] == torch_ext.__version__


def test_compiled_backends():
    backends = torch_ext.compiled_backends()
    assert "CPU" in backends
    assert set(backends) <= {"CPU", "CUDA"}
    # A copy: callers cannot change the library's record.
    backends.append("XLA")
    assert "XLA" not in torch_ext.compiled_backends()


def test_build_info_matches_the_running_torch():
    info = torch_ext.build_info()
    assert base_version(info["torch"]) == base_version(torch.__version__)
    assert Path(info["path"]).is_file()
    if "CUDA" in info["backends"]:
        assert info["cuda"]
    else:
        assert not info["cuda"]


# Which kernels each op has (CPU, Meta, autograd, CUDA exactly when built) is checked for every
# op the dispatcher lists, by tests/python/test_dispatcher.py.


def test_has_kernel_reads_the_dispatcher():
    """torch_ext.has_kernel on a throwaway op of the namespace with a CPU kernel only, and on an
    overload of the library's own (dilated_conv2d.padding: CompositeExplicitAutograd only)."""
    with torch.library._scoped_library("torch_ext", "FRAGMENT") as lib:
        lib.define("_has_kernel_probe(Tensor x) -> Tensor")
        lib.impl("_has_kernel_probe", lambda x: x.clone(), "CPU")
        # torch 2.11 looks the op up again when the library is destroyed, after its schema is
        # gone (garbage or a crash), unless torch.ops has cached the op: cache it. (For the same
        # reason the probe has a single overload.)
        getattr(torch.ops.torch_ext, "_has_kernel_probe")
        assert torch_ext.has_kernel("_has_kernel_probe", "CPU")
        for backend in ("Meta", "CUDA", "Autograd"):
            assert not torch_ext.has_kernel("_has_kernel_probe", backend), backend
    assert torch_ext.has_kernel("dilated_conv2d.padding", "CompositeExplicitAutograd")
    assert not torch_ext.has_kernel("dilated_conv2d.padding", "CPU")


def test_op_schemas_carry_the_python_defaults():
    # Every op the dispatcher lists is reached as torch.ops.torch_ext.<name>.<overload>: see
    # test_dispatcher.py::test_schema.
    schema = str(torch.ops.torch_ext.spp.default._schema)
    assert "levels=[1, 2, 4]" in schema and 'mode="max"' in schema
    assert "kernel_size=5" in str(torch.ops.torch_ext.sppf.default._schema)


def test_check_compatible_rejects_another_torch():
    path = Path(torch_ext.build_info()["path"])
    with pytest.raises(ImportError) as excinfo:
        _library.check_compatible({"torch": "1.0.0", "cuda": None}, path)
    message = str(excinfo.value)
    assert re.search("rebuild", message, re.IGNORECASE), message
    assert "1.0.0" in message and torch.__version__ in message


def test_check_compatible_accepts_the_running_torch():
    path = Path(torch_ext.build_info()["path"])
    _library.check_compatible({"torch": torch.__version__, "cuda": torch.version.cuda}, path)
    # Only the release counts: a local build tag (+cpu, +cu126) does not change the ABI check.
    _library.check_compatible(
        {"torch": base_version(torch.__version__) + "+local", "cuda": torch.version.cuda}, path
    )


@pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU-only torch")
def test_check_compatible_rejects_cuda_library_on_cpu_torch():
    path = Path(torch_ext.build_info()["path"])
    with pytest.raises(ImportError, match="(?i)rebuild"):
        _library.check_compatible({"torch": torch.__version__, "cuda": "12.4"}, path)


def test_read_build_info_of_the_loaded_library():
    path = Path(torch_ext.build_info()["path"])
    info = _library.read_build_info(path)
    assert info["version"] == torch_ext.__version__
    assert info["torch"] == torch_ext.build_info()["torch"]


def test_read_build_info_of_a_foreign_file(tmp_path):
    fake = tmp_path / "libtorch_ext.so"
    fake.write_bytes(b"\x7fELF not our library")
    with pytest.raises(ImportError, match="(?i)rebuild"):
        _library.read_build_info(fake)


def test_library_path_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXT_LIBRARY", str(tmp_path / "x.so"))
    assert _library.library_path() == tmp_path / "x.so"
    monkeypatch.delenv("TORCH_EXT_LIBRARY")
    assert _library.library_path() == Path(_library.__file__).resolve().parent / "lib" / (
        "libtorch_ext.so"
    )


def test_missing_library_is_a_clear_import_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXT_LIBRARY", str(tmp_path / "missing.so"))
    with pytest.raises(ImportError, match="TORCH_EXT_LIBRARY"):
        _library.load()


def test_tour_help_lists_the_families_and_options():
    out = subprocess.run(
        [sys.executable, "-m", "torch_ext", "--help"], capture_output=True, text=True, check=True
    ).stdout
    listed = re.search(r"--family \{([^}]*)\}", out)
    assert listed, out
    assert set(listed.group(1).split(",")) == {"spp", "conv", "varlen", "metrics", "checkpoint"}
    for option in ("--quick", "--device {cpu,cuda,all}", "--out", "--no-compile", "--threads"):
        assert option in out, option


def test_tour_refuses_an_unknown_family():
    run = subprocess.run(
        [sys.executable, "-m", "torch_ext", "--family", "nope"], capture_output=True, text=True
    )
    assert run.returncode == 2 and "invalid choice: 'nope'" in run.stderr, run.stderr
