"""The dispatcher is the list: every ``torch_ext::`` op, as the dispatcher itself enumerates them,
has what an op of this library must have.

For each op (each overload counts: ``"dilated_conv2d"``, ``"dilated_conv2d.padding"``):

* a schema (an ``m.impl`` without an ``m.def`` shows up as an op without one);
* a CPU kernel (CPU, or a composite kernel, which runs on every device);
* a Meta / fake kernel (Meta, a composite kernel, or a Python ``register_fake``);
* autograd behaviour: a kernel at an autograd key (a derivative, or ``non_differentiable()`` /
  ``refusing_grad()`` for the ops declared non-differentiable), or CompositeImplicitAutograd;
* a CUDA kernel (or a composite one) if and only if the library was built with CUDA, unless its
  family declares it CPU-only (``CPU_ONLY``, with the reason);
* sample inputs, declared once per family in ``tests/python/samples/<family>.py``, on which
  ``torch.library.opcheck`` passes (CPU, and CUDA where built and available), and whose fake
  output sizes are data-dependent exactly for the ops the family declares ``DATA_DEPENDENT``.

An op added to the library without these fails here, named. The checks are plain functions that
return what is missing; ``test_the_checks_*`` run them on throwaway ops of another namespace
that lack each piece, so a check that stopped seeing a gap would fail too.
"""

from __future__ import annotations

import inspect
import re
import types
from pathlib import Path

import pytest
import samples
import torch
import torch.utils._pytree as pytree

import torch_ext

NAMESPACE = "torch_ext"
COMPOSITE_KEYS = (
    "CompositeImplicitAutograd",
    "CompositeExplicitAutograd",
    "CompositeExplicitAutogradNonFunctional",
)
OPCHECK_DEFAULT_UTILS = tuple(
    inspect.signature(torch.library.opcheck).parameters["test_utils"].default
)
CUDA_BUILT = "CUDA" in torch_ext.compiled_backends()
REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- the dispatcher's view


def namespace_ops(namespace: str) -> list[str]:
    """Every op of `namespace` the dispatcher knows, without the namespace: "name" for a default
    overload, "name.overload" otherwise (the dispatcher's own spelling)."""
    prefix = namespace + "::"
    return sorted(
        name[len(prefix) :]
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith(prefix)
    )


def split(op: str) -> tuple[str, str]:
    name, _, overload = op.partition(".")
    return name, overload


def overload_of(namespace: str, op: str) -> torch._ops.OpOverload:
    name, overload = split(op)
    return getattr(getattr(getattr(torch.ops, namespace), name), overload or "default")


def has_kernel(qualname: str, *keys: str) -> bool:
    return any(torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key) for key in keys)


def has_python_fake(qualname: str) -> bool:
    """Whether torch.library.register_fake (or the older register_abstract) gave the op a fake
    kernel in Python."""
    try:
        from torch._library.simple_registry import singleton
    except ImportError:  # pragma: no cover - torch moved it; the Meta key still tells
        return False
    get = getattr(singleton, "get", None)
    entry = get(qualname) if get is not None else singleton.find(qualname)
    holder = getattr(entry, "fake_impl", None) or getattr(entry, "abstract_impl", None)
    return getattr(holder, "kernel", None) is not None


def registered_at(qualname: str) -> str | None:
    """The file:line of the op's schema, from the dispatcher's own record."""
    found = re.search(r"^debug: registered at (\S+)$", torch._C._dispatch_dump(qualname), re.M)
    if not found:
        return None
    where = found.group(1)
    try:
        return str(Path(where).relative_to(REPO))
    except ValueError:
        return where


# ---------------------------------------------------------------- the checks
# Each returns None when the op is fine, else what is missing (the test's failure message).


def schema_problem(qualname: str) -> str | None:
    name, overload = qualname.partition(".")[::2]
    try:
        torch._C._dispatch_find_schema_or_throw(name, overload)
    except RuntimeError:
        dump = torch._C._dispatch_dump(qualname).strip()
        return (
            f"{qualname} has kernels but no schema: an m.impl without an m.def (a misspelt op "
            f"name?). The dispatcher's record:\n{dump}"
        )
    return None


def cpu_problem(qualname: str) -> str | None:
    if has_kernel(qualname, "CPU", *COMPOSITE_KEYS):
        return None
    return (
        f"{qualname} has no CPU kernel: register one in TORCH_LIBRARY_IMPL({split(qualname)[0]}"
        f", CPU, m) (or a CompositeExplicitAutograd / CompositeImplicitAutograd kernel)"
    )


def meta_problem(qualname: str) -> str | None:
    if has_kernel(qualname, "Meta", *COMPOSITE_KEYS) or has_python_fake(qualname):
        return None
    return (
        f"{qualname} has no Meta / fake kernel, so torch.compile, torch.export and FakeTensor "
        "cannot trace it: register a Meta kernel in TORCH_LIBRARY_IMPL(..., Meta, m), or a "
        "torch.library.register_fake in the Python package when the output sizes depend on "
        "the data"
    )


def autograd_problem(qualname: str, cuda_built: bool) -> str | None:
    if has_kernel(qualname, "Autograd", "CompositeImplicitAutograd"):
        return None
    per_backend = ["AutogradCPU"] + (["AutogradCUDA"] if cuda_built else [])
    if all(has_kernel(qualname, key) for key in per_backend):
        return None
    return (
        f"{qualname} has no autograd kernel: register its derivative in "
        "TORCH_LIBRARY_IMPL(..., Autograd, m), or declare it non-differentiable there with "
        "torch_ext::non_differentiable() (integer / non-tensor results) or "
        "torch_ext::refusing_grad() (private float kernels); without one, autograd silently "
        "treats its outputs as constants"
    )


def cuda_problem(qualname: str, cuda_built: bool, cpu_only: str | None) -> str | None:
    """A CUDA kernel (or a composite one) iff CUDA was built; none at all for a CPU-only op."""
    direct = has_kernel(qualname, "CUDA")
    composite = has_kernel(qualname, *COMPOSITE_KEYS)
    if cpu_only is not None:
        if direct or composite:
            kind = "a CUDA kernel" if direct else "a composite kernel, which runs on CUDA"
            return (
                f"{qualname} is declared CPU-only ({cpu_only!r}) but has {kind}: remove it "
                "from its family's CPU_ONLY in tests/python/samples/"
            )
        return None
    if cuda_built and not (direct or composite):
        return (
            f"{qualname} has no CUDA kernel although the library was built with CUDA: register "
            "one in TORCH_LIBRARY_IMPL(..., CUDA, m), or, for a host-side op, declare it in "
            "CPU_ONLY of its family's module in tests/python/samples/ with the reason"
        )
    if not cuda_built and direct:
        return f"{qualname} has a CUDA kernel although the library was built without CUDA"
    return None


def no_samples_message(op: str, qualname: str) -> str:
    where = registered_at(qualname)
    defined = f" (its schema is defined at {where})" if where else ""
    return (
        f"{qualname} has no sample inputs{defined}: add it to sample_inputs(device) of its "
        "family's module tests/python/samples/<family>.py (a new module for a new family), "
        f'as "{op}": [Sample(args, kwargs), ...]; see tests/python/samples/__init__.py'
    )


def outputs_have_unbacked_sizes(overload: torch._ops.OpOverload, sample: samples.Sample) -> bool:
    """Runs the op on fake copies of the sample's tensors (static input sizes): whether an
    output size (or SymInt output) is unbacked, i.e. depends on the data."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv, free_unbacked_symbols

    mode = FakeTensorMode(shape_env=ShapeEnv(), static_shapes=True)
    args, kwargs = pytree.tree_map_only(
        torch.Tensor, mode.from_tensor, (sample.args, sample.kwargs)
    )
    with mode:
        out = overload(*args, **kwargs)
    leaves = [
        leaf for leaf in pytree.tree_leaves(out) if isinstance(leaf, (torch.Tensor, torch.SymInt))
    ]
    return bool(free_unbacked_symbols(leaves))


# ---------------------------------------------------------------- the library's ops

OPS = namespace_ops(NAMESPACE)


def qualname_of(op: str) -> str:
    return f"{NAMESPACE}::{op}"


def family_of(op: str) -> samples.Family:
    family = samples.families().get(op)
    if family is None:
        pytest.fail(no_samples_message(op, qualname_of(op)), pytrace=False)
    return family


def test_the_dispatcher_lists_the_library():
    assert OPS, f"the dispatcher knows no {NAMESPACE}:: op; was the library loaded?"
    # Another view of the dispatcher: the ops with a kernel at some key.
    keys = ("CPU", "CUDA", "Meta", "Autograd", *COMPOSITE_KEYS)
    with_kernels = {
        name[len(NAMESPACE) + 2 :]
        for key in keys
        for name in torch._C._dispatch_get_registrations_for_dispatch_key(key)
        if name.startswith(NAMESPACE + "::")
    }
    assert with_kernels == set(OPS), (
        f"ops without any kernel: {sorted(set(OPS) - with_kernels)}; "
        f"kernels of ops registered after this module was collected (register ops when "
        f"torch_ext is imported): {sorted(with_kernels - set(OPS))}"
    )


def test_no_impl_without_a_def():
    dangling = [
        record
        for record in torch._C._dispatch_find_dangling_impls()
        if re.search(rf"^name: {NAMESPACE}::", record, re.M)
    ]
    assert not dangling, "kernels registered for ops that were never defined:\n" + "\n".join(
        dangling
    )


@pytest.mark.parametrize("op", OPS)
def test_schema(op):
    problem = schema_problem(qualname_of(op))
    assert problem is None, problem
    assert overload_of(NAMESPACE, op).name() == qualname_of(op)


@pytest.mark.parametrize("op", OPS)
def test_cpu_kernel(op):
    problem = cpu_problem(qualname_of(op))
    assert problem is None, problem


@pytest.mark.parametrize("op", OPS)
def test_meta_kernel(op):
    problem = meta_problem(qualname_of(op))
    assert problem is None, problem


@pytest.mark.parametrize("op", OPS)
def test_autograd(op):
    problem = autograd_problem(qualname_of(op), CUDA_BUILT)
    assert problem is None, problem


@pytest.mark.parametrize("op", OPS)
def test_cuda_kernel_iff_cuda_built(op):
    cpu_only = samples.families()[op].cpu_only.get(op) if op in samples.families() else None
    problem = cuda_problem(qualname_of(op), CUDA_BUILT, cpu_only)
    assert problem is None, problem


@pytest.mark.parametrize("op", OPS)
def test_has_samples(op):
    family = family_of(op)
    for device in ("cpu",) + (("cuda",) if CUDA_BUILT and torch.cuda.is_available() else ()):
        made = family.sample_inputs(device).get(op)
        assert made, f"{family.path}: sample_inputs({device!r})[{op!r}] is empty"
        for sample in made:
            assert isinstance(sample, samples.Sample), (family.path, op, sample)
            assert isinstance(sample.args, tuple) and isinstance(sample.kwargs, dict), sample


def test_samples_name_only_dispatcher_ops():
    unknown = {op: family.path for op, family in samples.families().items() if op not in set(OPS)}
    assert not unknown, (
        f"samples of ops the dispatcher does not know (renamed or removed? an overload is "
        f'named "op.overload"): {unknown}'
    )


def test_opcheck_skips_name_opcheck_sub_tests():
    for op, family in samples.families().items():
        for sub_test in family.opcheck_skips.get(op, {}):
            assert sub_test in OPCHECK_DEFAULT_UTILS, (
                f"{family.path}: OPCHECK_SKIPS[{op!r}] names {sub_test!r}, not one of "
                f"opcheck's {OPCHECK_DEFAULT_UTILS}"
            )


@pytest.mark.parametrize("op", OPS)
def test_data_dependent_shapes_are_declared(op):
    qualname = qualname_of(op)
    family = family_of(op)
    if meta_problem(qualname) is not None:
        pytest.skip(f"{qualname} has no fake kernel (test_meta_kernel fails)")
    overload = overload_of(NAMESPACE, op)
    dynamic = [
        sample.label
        for sample in family.sample_inputs("cpu")[op]
        if outputs_have_unbacked_sizes(overload, sample)
    ]
    if op in family.data_dependent:
        assert dynamic, (
            f"{family.path} declares {op} DATA_DEPENDENT, but on none of its samples does its "
            "fake kernel make a data-dependent (unbacked) size: add a sample where it does, or "
            "remove the declaration"
        )
    else:
        assert not dynamic, (
            f"{qualname}'s fake kernel makes data-dependent sizes on samples {dynamic}: declare "
            f"it in DATA_DEPENDENT of {family.path}"
        )


@pytest.mark.parametrize("op", OPS)
def test_opcheck(op, device):
    family = family_of(op)
    if device == "cuda":
        if not CUDA_BUILT:
            pytest.skip("torch_ext was built without CUDA kernels")
        if op in family.cpu_only:
            pytest.skip(f"{op} is CPU-only: {family.cpu_only[op]}")
    skips = family.opcheck_skips.get(op, {})
    utils = [util for util in OPCHECK_DEFAULT_UTILS if util not in skips]
    overload = overload_of(NAMESPACE, op)
    failures = []
    for i, sample in enumerate(family.sample_inputs(device)[op]):
        try:
            torch.library.opcheck(overload, sample.args, sample.kwargs, test_utils=utils)
        except Exception as error:  # every sample runs; all failures are reported
            cause = error.__cause__ or error
            failures.append(
                f"sample {sample.label or i} of {family.path}: {error}\n    caused by "
                f"{type(cause).__name__}: {cause}"
            )
    assert not failures, f"opcheck of {overload} on {device}:\n" + "\n".join(failures)


# ---------------------------------------------------------------- the checks see what they should

SELFTEST = "torch_ext_selftest"


# The throwaway library lives as long as the process: under torch 2.11, destroying a library
# whose ops were looked up leaves the registry answering later lookups with freed memory
# (UnicodeDecodeError in torch._C._jit_get_operation, seen at the fixture's teardown).
_SELFTEST_LIBRARY: list = []


def _register_selftest_ops() -> None:
    lib = torch.library.Library(SELFTEST, "FRAGMENT")
    _SELFTEST_LIBRARY.append(lib)
    lib.define("cpu_only(Tensor x) -> Tensor")
    lib.impl("cpu_only", lambda x: x.clone(), "CPU")

    lib.define("complete(Tensor x) -> Tensor")
    lib.impl("complete", lambda x: x.clone(), "CPU")
    lib.impl("complete", lambda x: x.clone(), "CUDA")
    torch.library.register_fake(f"{SELFTEST}::complete", lambda x: x.new_empty(x.shape), lib=lib)

    def below_autograd(x):
        with torch._C._AutoDispatchBelowAutograd():
            return getattr(torch.ops, SELFTEST).complete(x)

    lib.impl("complete", below_autograd, "Autograd")

    lib.define("composite(Tensor x) -> Tensor")
    lib.define("composite.twice(Tensor x) -> Tensor")
    lib.impl("composite", lambda x: x * 2, "CompositeImplicitAutograd")
    lib.impl("composite.twice", lambda x: x * 4, "CompositeImplicitAutograd")

    lib.define("data_dependent(Tensor x) -> Tensor")
    lib.impl("data_dependent", lambda x: x[x > 0], "CPU")

    def data_dependent_fake(x):
        return x.new_empty(torch.library.get_ctx().new_dynamic_size())

    torch.library.register_fake(f"{SELFTEST}::data_dependent", data_dependent_fake, lib=lib)


@pytest.fixture(scope="module")
def selftest_ops():
    """Throwaway ops, each lacking (or having) the pieces the checks look for:

    * ``cpu_only``: a CPU kernel and nothing else;
    * ``complete``: CPU, CUDA, a Python fake kernel and a non-differentiable Autograd kernel;
    * ``composite`` and its overload ``composite.twice``: CompositeImplicitAutograd only;
    * ``data_dependent``: CPU and a fake kernel whose output size is unbacked.
    """
    if not _SELFTEST_LIBRARY:
        _register_selftest_ops()
    return {op: f"{SELFTEST}::{op}" for op in namespace_ops(SELFTEST)}


def test_the_checks_enumerate_ops_and_overloads(selftest_ops):
    assert sorted(selftest_ops) == [
        "complete",
        "composite",
        "composite.twice",
        "cpu_only",
        "data_dependent",
    ]
    assert overload_of(SELFTEST, "composite.twice")(torch.ones(1)).item() == 4
    assert all(schema_problem(q) is None for q in selftest_ops.values())


def test_the_checks_report_an_op_with_only_a_cpu_kernel(selftest_ops):
    q = selftest_ops["cpu_only"]
    assert cpu_problem(q) is None
    assert "no Meta / fake kernel" in meta_problem(q)
    assert "no autograd kernel" in autograd_problem(q, cuda_built=False)
    assert "no autograd kernel" in autograd_problem(q, cuda_built=True)
    assert "no CUDA kernel" in cuda_problem(q, cuda_built=True, cpu_only=None)
    assert cuda_problem(q, cuda_built=False, cpu_only=None) is None
    assert cuda_problem(q, cuda_built=True, cpu_only="a host-side algorithm") is None
    assert not has_python_fake(q)


def test_the_checks_accept_a_complete_op(selftest_ops):
    q = selftest_ops["complete"]
    assert has_python_fake(q)
    assert cpu_problem(q) is None and meta_problem(q) is None
    assert autograd_problem(q, cuda_built=True) is None
    assert cuda_problem(q, cuda_built=True, cpu_only=None) is None
    # ... but not a CUDA kernel in a library built without CUDA, nor one on a CPU-only op.
    assert "built without CUDA" in cuda_problem(q, cuda_built=False, cpu_only=None)
    assert "declared CPU-only" in cuda_problem(q, cuda_built=True, cpu_only="host-side")


@pytest.mark.parametrize("op", ["composite", "composite.twice"])
def test_the_checks_accept_a_composite_op(selftest_ops, op):
    q = selftest_ops[op]
    assert cpu_problem(q) is None and meta_problem(q) is None
    assert autograd_problem(q, cuda_built=True) is None
    assert cuda_problem(q, cuda_built=True, cpu_only=None) is None
    assert cuda_problem(q, cuda_built=False, cpu_only=None) is None
    # A composite kernel runs on CUDA, so the op is not CPU-only.
    assert "composite kernel" in cuda_problem(q, cuda_built=True, cpu_only="host-side")


def test_the_checks_see_data_dependent_sizes(selftest_ops):
    x = torch.tensor([1.0, -2.0, 3.0])
    dynamic = overload_of(SELFTEST, "data_dependent")
    assert outputs_have_unbacked_sizes(dynamic, samples.Sample((x,)))
    assert not outputs_have_unbacked_sizes(overload_of(SELFTEST, "complete"), samples.Sample((x,)))


def test_the_checks_report_a_dangling_impl():
    with torch.library._scoped_library(SELFTEST, "FRAGMENT") as lib:
        lib.impl("never_defined", lambda x: x, "CPU")
        assert "never_defined" in namespace_ops(SELFTEST)
        assert "no schema" in schema_problem(f"{SELFTEST}::never_defined")


def test_a_missing_sample_names_the_place_to_add_it(selftest_ops):
    message = no_samples_message("cpu_only", selftest_ops["cpu_only"])
    assert "tests/python/samples/<family>.py" in message and "sample_inputs" in message
    assert '"cpu_only": [Sample(' in message
    # The library's ops point at the C++ file that defines their schema.
    where = registered_at(qualname_of(OPS[0]))
    assert where and re.search(r"\.(cpp|cu|cc):\d+$", where), where
    assert where in no_samples_message(OPS[0], qualname_of(OPS[0]))
    with pytest.raises(pytest.fail.Exception, match="has no sample inputs"):
        family_of("no_such_op")


# ---------------------------------------------------------------- discovery


def family_module(name: str, ops: dict, **declared) -> types.ModuleType:
    module = types.ModuleType(f"samples.{name}")
    module.sample_inputs = lambda device: {op: list(made) for op, made in ops.items()}
    for attr, value in declared.items():
        setattr(module, attr, value)
    return module


def test_discovery_refuses_an_op_in_two_families():
    a = family_module("a", {"x": [samples.Sample(())]})
    b = family_module("b", {"y": [], "x": [samples.Sample(())]})
    with pytest.raises(samples.SampleError, match=r"'x'.*samples/a\.py.*samples/b\.py"):
        samples.collect([a, b])
    assert set(samples.collect([a])) == {"x"}


def test_discovery_refuses_declarations_of_unknown_ops_or_without_reason():
    ops = {"x": [samples.Sample(())]}
    with pytest.raises(samples.SampleError, match="CPU_ONLY names 'y'"):
        samples.collect([family_module("a", ops, CPU_ONLY={"y": "host"})])
    with pytest.raises(samples.SampleError, match="needs a reason"):
        samples.collect([family_module("a", ops, OPCHECK_SKIPS={"x": {}})])
    with pytest.raises(samples.SampleError, match="no sample_inputs"):
        samples.collect([types.ModuleType("samples.empty")])


def test_discovery_finds_every_module_of_the_folder():
    folder = Path(samples.__file__).parent
    modules = {path.stem for path in folder.glob("*.py") if not path.stem.startswith("_")}
    assert {family.name for family in samples.families().values()} == modules
