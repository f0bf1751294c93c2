// A C++ user of torch_varlen: load the operator library, then call varlen::pad and
// varlen::unpad through the dispatcher, with no Python anywhere.
//   usage: varlen_cpp_example path/to/libtorch_varlen.so
#include <ATen/core/dispatch/Dispatcher.h>
#include <dlfcn.h>
#include <torch/torch.h>

#include <iostream>

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: " << argv[0] << " path/to/libtorch_varlen.so\n";
    return 2;
  }
  if (!dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL)) {
    std::cerr << "cannot load " << argv[1] << ": " << dlerror() << "\n";
    return 1;
  }
  // Lengths 2, 4, 3 padded to seqlen 4 -> cu_seqlens [0, 2, 6, 9].
  auto mask = torch::tensor({{1, 1, 0, 0}, {1, 1, 1, 1}, {1, 1, 1, 0}}, torch::kBool);
  auto hidden = torch::randn({3, 4, 8});
  auto unpad = c10::Dispatcher::singleton()
                   .findSchemaOrThrow("varlen::unpad", "")
                   .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, c10::SymInt, at::Tensor>(
                       const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&)>();
  auto [packed, indices, cu_seqlens, max_seqlen, seqused] = unpad.call(hidden, mask, std::nullopt);
  auto pad = c10::Dispatcher::singleton()
                 .findSchemaOrThrow("varlen::pad", "")
                 .typed<at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymInt, c10::SymInt)>();
  auto restored = pad.call(packed, indices, 3, 4);
  const bool ok = cu_seqlens.equal(torch::tensor({0, 2, 6, 9}, torch::kInt32)) &&
                  max_seqlen == 4 && packed.size(0) == 9 &&
                  restored.equal(hidden * mask.unsqueeze(-1));
  std::cout << "cu_seqlens = " << cu_seqlens << "\nmax_seqlen = " << max_seqlen
            << "\nround trip " << (ok ? "OK" : "FAILED") << std::endl;
  return ok ? 0 : 1;
}
