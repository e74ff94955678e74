"""The op families of the tour and the benchmarks: one module each, found by
``torch_ext._bench`` on import (every module in this package; importing one registers its
family, see ``torch_ext/_bench/registry.py``)."""
