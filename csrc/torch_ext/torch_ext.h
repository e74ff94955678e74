#pragma once

// Everything torch_ext offers C++ programs. Including this header (in any one translation unit)
// also keeps the linker from dropping libtorch_ext.so, whose op registrations a program needs
// even when it calls the ops only through the dispatcher.

#include "torch_ext/build_info.h"
#include "torch_ext/checkpoint.h"
#include "torch_ext/conv.h"
#include "torch_ext/metrics.h"
#include "torch_ext/spp.h"
#include "torch_ext/varlen.h"

namespace torch_ext::detail {
[[maybe_unused]] inline const int link_anchor_value = link_anchor();
}  // namespace torch_ext::detail
