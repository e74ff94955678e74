// Autograd of the metrics ops: counts and the in-place accumulation of counts have no
// derivative, so both are declared non-differentiable (they run below autograd). The metrics of
// a confusion matrix are a CompositeImplicitAutograd op: autograd sees its ATen ops.

#include <torch/library.h>

#include "common/non_differentiable.h"

TORCH_LIBRARY_IMPL(torch_ext, Autograd, m) {
  m.impl("confusion_matrix", torch_ext::non_differentiable());
  m.impl("_confusion_matrix_accumulate", torch_ext::non_differentiable());
}
