// The package's CPU decode extension, one module compiled on first use (cpu_build.py):
//   cpu_gemv.cpp          decode-time products: a few rows times many weight matrices (namespace gemv)
//   cpu_decode_ops.cpp    the small ops of a decode step: RMS norm, rotary, attention, top k (namespace ops)
//   cpu_decode_layer.cpp  a decoder layer's step in one call, from the two above
// One module: the layer calls the others' functions directly, and one build (about a minute on
// 2 cores) replaces the two of about 25 and 15 s that a layer module of its own would have
// compiled a second time.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#endif

// Each in a namespace of its own: their helpers (in anonymous namespaces) share names.
namespace gemv {
#include "cpu_gemv.cpp"
}
namespace ops {
#include "cpu_decode_ops.cpp"
}
#include "cpu_decode_layer.cpp"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  gemv::bind_gemv(m);
  ops::bind_decode_ops(m);
  bind_decode_layer(m);
}
