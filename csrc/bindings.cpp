// Python module ppap_fast._C: importing it registers torch.ops.ppap_fast.*.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ppap_fast compiled ops (see torch.ops.ppap_fast)";
  m.def("cuda_compiled", []() {
#ifdef PPAP_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}
