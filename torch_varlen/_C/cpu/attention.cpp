// CPU kernels of varlen::attention_forward / varlen::attention_backward (schemas in ../ops.cpp).
// The math lives in attention_kernel.h (torch-free); this file checks arguments, allocates
// outputs, builds the work lists and runs them with at::parallel_for. The kernel header is
// compiled once per x86 instruction set (AVX-512 with AMX for the bfloat16 forward,
// AVX-512, AVX2, baseline) in its own namespace and the variant is picked at run time: the
// best one the CPU (and OS) offers, capped by at::get_cpu_capability(), which honours
// ATEN_CPU_CAPABILITY (e.g. ATEN_CPU_CAPABILITY=default forces the baseline build);
// TORCH_VARLEN_CPU_NO_AMX=1 skips the AMX variant.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "cpu/attention_kernel.h"

#if defined(__x86_64__) && defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VARLEN_X86_VARIANTS 1

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi2,amx-tile,amx-bf16")
#define VARLEN_ISA_NS amx
#define VARLEN_VEC_BYTES 64
#define VARLEN_GEMM_MR 4
#define VARLEN_GEMM_NV 4
#define VARLEN_AMX 1
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // false positives in GCC 12's avx512fintrin.h
#include "cpu/attention_kernel.h"
#pragma GCC diagnostic pop
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi2")
#define VARLEN_ISA_NS avx512
#define VARLEN_VEC_BYTES 64
#define VARLEN_GEMM_MR 4
#define VARLEN_GEMM_NV 4
#include "cpu/attention_kernel.h"
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi2")
#define VARLEN_ISA_NS avx2
#define VARLEN_VEC_BYTES 32
#define VARLEN_GEMM_MR 4
#define VARLEN_GEMM_NV 2
#include "cpu/attention_kernel.h"
#pragma GCC pop_options
#endif

#define VARLEN_ISA_NS base
#define VARLEN_VEC_BYTES 16
#define VARLEN_GEMM_MR 4
#define VARLEN_GEMM_NV 2
#include "cpu/attention_kernel.h"

namespace varlen {
namespace attn {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// ------------------------------------------------------------------ messages as Python prints

std::string py_tuple(at::IntArrayRef shape) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << (shape.size() == 1 ? ",)" : ")");
  return os.str();
}

std::string py_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    case at::kFloat8_e4m3fn: return "torch.float8_e4m3fn";
    case at::kFloat8_e5m2: return "torch.float8_e5m2";
    case at::kFloat8_e4m3fnuz: return "torch.float8_e4m3fnuz";
    case at::kFloat8_e5m2fnuz: return "torch.float8_e5m2fnuz";
    default: return std::string("torch.") + c10::toString(t);
  }
}

// Python's repr of a float: the shortest round-tripping digits, with ".0" for integers.
std::string py_float(double x) {
  char buf[40];
  for (int prec = 1; prec <= 17; ++prec) {
    std::snprintf(buf, sizeof buf, "%.*g", prec, x);
    if (std::strtod(buf, nullptr) == x) break;
  }
  std::string s(buf);
  if (s.find_first_of(".eEn") == std::string::npos) s += ".0";
  return s;
}

// ------------------------------------------------------------------ argument checks

// The checks of meta/attention.py::check_attention_shapes, with the same messages.
void check_shapes(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_q,
                  const Tensor& cu_k, const OptTensor& alibi, const OptTensor& cu_q_pad,
                  const OptTensor& cu_k_pad, int64_t left, int64_t right, double softcap,
                  double dropout_p, const OptTensor& rng_state) {
  for (auto [name, t] : {std::pair<const char*, const Tensor*>{"q", &q}, {"k", &k}, {"v", &v}}) {
    TORCH_CHECK(t->dim() == 3, name, " must be (total, nheads, headdim), got shape ", py_tuple(t->sizes()));
    const auto dt = t->scalar_type();
    TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat || dt == at::kDouble ||
                    dt == at::kFloat8_e4m3fn,
                name, " must be float16, bfloat16, float32 or float64 (or float8_e4m3fn for the FP8 "
                "forward), got ", py_dtype(dt));
  }
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "q, k and v must share a dtype, got ", py_dtype(q.scalar_type()), ", ",
              py_dtype(k.scalar_type()), ", ", py_dtype(v.scalar_type()));
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(),
              "q, k and v must be on one device, got ", q.device(), ", ", k.device(), ", ", v.device());
  TORCH_CHECK(k.size(2) == q.size(2), "q and k must have the same head dim, got ", q.size(2),
              " and ", k.size(2));
  TORCH_CHECK(v.size(0) == k.size(0) && v.size(1) == k.size(1),
              "v must be (total_k, nheads_k, headdim_v) with k's first two dims ",
              py_tuple(k.sizes().slice(0, 2)), ", got ", py_tuple(v.sizes()));
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "nheads (", q.size(1),
              ") must be divisible by nheads_k (", k.size(1), ")");
  const int64_t batch = cu_q.dim() == 1 ? cu_q.size(0) - 1 : -1;
  const std::pair<const char*, const Tensor*> cus[] = {
      {"cu_seqlens_q", &cu_q},
      {"cu_seqlens_k", &cu_k},
      {"cu_seqlens_q_padded", cu_q_pad ? &*cu_q_pad : nullptr},
      {"cu_seqlens_k_padded", cu_k_pad ? &*cu_k_pad : nullptr}};
  for (auto [name, t] : cus) {
    if (!t) continue;
    TORCH_CHECK(t->scalar_type() == at::kInt, name, " must be int32, got ", py_dtype(t->scalar_type()));
    TORCH_CHECK(t->dim() == 1 && t->size(0) >= 1, name, " must be 1-D of shape (batch+1,), got ",
                py_tuple(t->sizes()));
    TORCH_CHECK(t->size(0) == batch + 1, name, " must have batch+1 = ", batch + 1,
                " entries like cu_seqlens_q, got ", t->size(0));
    TORCH_CHECK(t->device() == q.device(), name, " must be on q's device ", q.device(), ", got ", t->device());
  }
  if (alibi) {
    TORCH_CHECK(alibi->scalar_type() == at::kFloat, "alibi_slopes must be float32, got ",
                py_dtype(alibi->scalar_type()));
    const bool per_head = alibi->dim() == 1 && alibi->size(0) == q.size(1);
    const bool per_batch = alibi->dim() == 2 && alibi->size(0) == batch && alibi->size(1) == q.size(1);
    TORCH_CHECK(per_head || per_batch, "alibi_slopes must be (nheads,) = (", q.size(1),
                ",) or (batch, nheads) = (", batch, ", ", q.size(1), "), got ", py_tuple(alibi->sizes()));
    TORCH_CHECK(alibi->device() == q.device(), "alibi_slopes must be on q's device ", q.device(),
                ", got ", alibi->device());
  }
  TORCH_CHECK(left >= -1 && right >= -1,
              "window_size entries must be >= -1 (-1 = unbounded), got (", left, ", ", right, ")");
  TORCH_CHECK(softcap >= 0, "softcap must be >= 0 (0 = off), got ", py_float(softcap));
  TORCH_CHECK(0 <= dropout_p && dropout_p < 1, "dropout_p must be in [0, 1), got ", py_float(dropout_p));
  if (dropout_p > 0) {
    TORCH_CHECK(rng_state.has_value(), "rng_state ([seed, offset] int64) is required when dropout_p > 0");
    TORCH_CHECK(rng_state->scalar_type() == at::kLong && rng_state->dim() == 1 && rng_state->size(0) == 2,
                "rng_state must be int64 of shape (2,), got ", py_dtype(rng_state->scalar_type()), " ",
                py_tuple(rng_state->sizes()));
    TORCH_CHECK(rng_state->device() == q.device(), "rng_state must be on q's device ", q.device(),
                ", got ", rng_state->device());
  }
}

// FP8 attention, as meta/attention.py::check_descales: float8_e4m3fn q/k/v, no dropout; each
// descale None, (1,) or (batch, nheads_k) float32 on q's device.
void check_descales(const Tensor& q, const Tensor& k, int64_t batch, double dropout_p,
                    const OptTensor& q_descale, const OptTensor& k_descale, const OptTensor& v_descale) {
  const std::pair<const char*, const OptTensor*> descales[] = {
      {"q_descale", &q_descale}, {"k_descale", &k_descale}, {"v_descale", &v_descale}};
  if (q.scalar_type() != at::kFloat8_e4m3fn) {
    for (auto [name, d] : descales)
      TORCH_CHECK(!d->has_value(), name, " is only for float8_e4m3fn q, k and v (FP8 attention), "
                  "got q of dtype ", py_dtype(q.scalar_type()));
    return;
  }
  TORCH_CHECK(dropout_p == 0, "dropout is not supported with float8_e4m3fn q, k and v (FP8 attention "
              "is inference only), got dropout_p=", py_float(dropout_p));
  for (auto [name, d] : descales) {
    if (!d->has_value()) continue;
    const Tensor& t = **d;
    TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", py_dtype(t.scalar_type()));
    const bool per_tensor = t.dim() == 1 && t.size(0) == 1;
    const bool per_head = t.dim() == 2 && t.size(0) == batch && t.size(1) == k.size(1);
    TORCH_CHECK(per_tensor || per_head, name, " must be (1,) (per tensor) or (batch, nheads_k) = (",
                batch, ", ", k.size(1), "), got ", py_tuple(t.sizes()));
    TORCH_CHECK(t.device() == q.device(), name, " must be on q's device ", q.device(), ", got ", t.device());
  }
}

// cu_seqlens values (the fakes cannot read them): starts at 0, non-decreasing, inside the
// buffer; with a padded layout every physical sequence lies inside the buffer, after the
// previous one. Returns the contiguous logical and physical-start arrays.
struct SeqLayout {
  Tensor cu;     // logical cu_seqlens, contiguous
  Tensor start;  // physical starts, contiguous (== cu without padding)
};

SeqLayout check_cu_values(const char* name, const Tensor& cu_in, const OptTensor& padded_in,
                          const char* tensor_name, int64_t total) {
  SeqLayout lay;
  lay.cu = cu_in.contiguous();
  const int32_t* cu = lay.cu.data_ptr<int32_t>();
  const int64_t n = lay.cu.size(0);
  TORCH_CHECK(cu[0] == 0, name, " must start at 0, got ", cu[0]);
  for (int64_t i = 1; i < n; ++i)
    TORCH_CHECK(cu[i] >= cu[i - 1], name, " must be non-decreasing, got ", cu[i - 1], " then ",
                cu[i], " at index ", i);
  if (!padded_in) {
    TORCH_CHECK(cu[n - 1] <= total, name, "[-1] must be <= ", tensor_name, ".shape[0] = ", total,
                " (the rows of ", tensor_name, "), got ", cu[n - 1]);
    lay.start = lay.cu;
    return lay;
  }
  lay.start = padded_in->contiguous();
  const int32_t* st = lay.start.data_ptr<int32_t>();
  int64_t prev_end = 0;
  for (int64_t b = 0; b + 1 < n; ++b) {
    const int64_t len = int64_t(cu[b + 1]) - cu[b];
    TORCH_CHECK(st[b] >= prev_end, name, "_padded[", b, "] = ", st[b],
                " must be >= 0 and >= the end of the previous sequence (", prev_end,
                "): sequences must be in order and must not overlap");
    TORCH_CHECK(st[b] + len <= total, name, "_padded: sequence ", b, " occupies rows [", st[b], ", ",
                st[b] + len, ") beyond ", tensor_name, ".shape[0] = ", total);
    if (len > 0) prev_end = st[b] + len;
  }
  return lay;
}

// Rows of a buffer of `total` rows that belong to no sequence, as [begin, end) intervals.
std::vector<std::pair<int64_t, int64_t>> gaps(const SeqLayout& lay, int64_t total) {
  std::vector<std::pair<int64_t, int64_t>> out;
  const int32_t* cu = lay.cu.data_ptr<int32_t>();
  const int32_t* st = lay.start.data_ptr<int32_t>();
  int64_t pos = 0;
  for (int64_t b = 0; b + 1 < lay.cu.size(0); ++b) {
    const int64_t len = int64_t(cu[b + 1]) - cu[b];
    if (len == 0) continue;
    if (st[b] > pos) out.emplace_back(pos, st[b]);
    pos = st[b] + len;
  }
  if (pos < total) out.emplace_back(pos, total);
  return out;
}

// Work items: blocks of `block` rows of every sequence (lengths from cu) and head.
std::vector<Block> make_blocks(const Tensor& cu_t, int64_t nheads, int64_t block) {
  const int32_t* cu = cu_t.data_ptr<int32_t>();
  std::vector<Block> blocks;
  for (int64_t b = 0; b + 1 < cu_t.size(0); ++b)
    for (int64_t h = 0; h < nheads; ++h)
      for (int64_t s = 0; s < int64_t(cu[b + 1]) - cu[b]; s += block)
        blocks.push_back({int32_t(b), int32_t(h), int32_t(s)});
  return blocks;
}

bool poison_outputs() {
  const char* e = std::getenv("TORCH_VARLEN_POISON_OUTPUTS");
  return e && e[0] && e[0] != '0';
}

// ------------------------------------------------------------------ kernels per ISA

template <typename scalar_t, typename acc_t>
struct KernelSet {
  using Items = void (*)(const Params<scalar_t, acc_t>&, const Block*, int64_t, int64_t, acc_t*);
  Items forward, dkdv, dq;
  void (*delta)(const Params<scalar_t, acc_t>&, const acc_t*, int64_t, int64_t, acc_t*, int64_t, int64_t);
  bool amx_bf16;  // the bfloat16 forward may use AMX tiles
};

#define VARLEN_KERNEL_SET(ns, amx_bf16)                                                    \
  KernelSet<scalar_t, acc_t> {                                                            \
    ns::forward_items<scalar_t, acc_t>, ns::backward_dkdv_items<scalar_t, acc_t>,         \
        ns::backward_dq_items<scalar_t, acc_t>, ns::delta_rows<scalar_t, acc_t>, amx_bf16 \
  }

enum class Isa { kBase, kAvx2, kAvx512, kAmx };

// AMX needs the CPU's AMX-TILE and AMX-BF16 and the kernel's permission to use tile data.
bool amx_usable() {
#if defined(VARLEN_X86_VARIANTS) && defined(__linux__)
  const char* off = std::getenv("TORCH_VARLEN_CPU_NO_AMX");
  if (off && off[0] && off[0] != '0') return false;
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  if (!((d >> 22) & 1) || !((d >> 24) & 1)) return false;  // AMX-BF16, AMX-TILE
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

Isa pick_isa() {
#ifdef VARLEN_X86_VARIANTS
  const std::string cap = at::get_cpu_capability();  // "DEFAULT", "AVX2", "AVX512"
  if (cap == "AVX512") return amx_usable() ? Isa::kAmx : Isa::kAvx512;
  if (cap == "AVX2") return Isa::kAvx2;
#endif
  return Isa::kBase;
}

Isa isa() {
  static const Isa chosen = pick_isa();  // once per process
  return chosen;
}

template <typename scalar_t, typename acc_t>
KernelSet<scalar_t, acc_t> kernels() {
  switch (isa()) {
#ifdef VARLEN_X86_VARIANTS
    case Isa::kAmx: return VARLEN_KERNEL_SET(amx, true);
    case Isa::kAvx512: return VARLEN_KERNEL_SET(avx512, false);
    case Isa::kAvx2: return VARLEN_KERNEL_SET(avx2, false);
#endif
    default: return VARLEN_KERNEL_SET(base, false);
  }
}

// Runs items [0, n) on at::parallel_for's threads, each with its own zeroed scratch of
// `scratch` acc_t. Items differ in cost (sequence lengths, causal bands), so the threads pull
// chunks of items from a shared counter instead of splitting the list in equal parts; every
// item is computed the same way whichever thread takes it, so results stay bitwise the same.
template <typename acc_t, typename F>
void run_items(int64_t n, int64_t scratch, const F& fn) {
  if (n == 0) return;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  const int64_t chunk = std::max<int64_t>(1, n / (threads * 16));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    std::unique_ptr<void, void (*)(void*)> buf(c10::alloc_cpu(sizeof(acc_t) * scratch), c10::free_cpu);
    std::memset(buf.get(), 0, sizeof(acc_t) * scratch);
    for (int64_t begin = next.fetch_add(chunk); begin < n; begin = next.fetch_add(chunk))
      fn(begin, std::min(begin + chunk, n), static_cast<acc_t*>(buf.get()));
  });
}

template <typename scalar_t, typename acc_t>
Params<scalar_t, acc_t> make_params(const Tensor& q, const Tensor& k, const Tensor& v,
                                    const SeqLayout& lq, const SeqLayout& lk, double scale,
                                    int64_t left, int64_t right, double softcap,
                                    const Tensor& alibi, double dropout_p, const OptTensor& rng) {
  Params<scalar_t, acc_t> p{};
  p.q = q.data_ptr<scalar_t>();
  p.k = k.data_ptr<scalar_t>();
  p.v = v.data_ptr<scalar_t>();
  p.q_s0 = q.stride(0), p.q_s1 = q.stride(1);
  p.k_s0 = k.stride(0), p.k_s1 = k.stride(1);
  p.v_s0 = v.stride(0), p.v_s1 = v.stride(1);
  p.cu_q = lq.cu.data_ptr<int32_t>();
  p.cu_k = lk.cu.data_ptr<int32_t>();
  p.start_q = lq.start.data_ptr<int32_t>();
  p.start_k = lk.start.data_ptr<int32_t>();
  p.batch = lq.cu.size(0) - 1;
  p.nheads = q.size(1), p.nheads_k = k.size(1), p.headdim = q.size(2), p.headdim_v = v.size(2);
  p.total_q = q.size(0);
  p.scale = static_cast<acc_t>(scale);
  p.softcap = static_cast<acc_t>(softcap);
  p.window_left = left, p.window_right = right;
  if (alibi.defined()) {
    p.alibi = alibi.data_ptr<float>();
    p.alibi_batch_stride = alibi.dim() == 2 ? p.nheads : 0;
  }
  p.dropout = dropout_p > 0;
  if (p.dropout) {
    const Tensor st = rng->contiguous();
    p.seed = static_cast<uint64_t>(st.data_ptr<int64_t>()[0]);
    p.offset = static_cast<uint64_t>(st.data_ptr<int64_t>()[1]);
    p.dropout_threshold = dropout_threshold(dropout_p);
    p.dropout_scale = static_cast<acc_t>(1.0 / (1.0 - dropout_p));
  }
  return p;
}

// The last dim must be contiguous; anything else is read through strides.
Tensor unit_last(const Tensor& t) { return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous(); }

at::ScalarType lse_dtype(const Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

struct Prepared {
  Tensor q, k, v, alibi;
  SeqLayout lq, lk;
};

Prepared prepare(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_q,
                 const Tensor& cu_k, const OptTensor& alibi, const OptTensor& cu_q_pad,
                 const OptTensor& cu_k_pad, int64_t left, int64_t right, double softcap,
                 double dropout_p, const OptTensor& rng_state) {
  check_shapes(q, k, v, cu_q, cu_k, alibi, cu_q_pad, cu_k_pad, left, right, softcap, dropout_p, rng_state);
  Prepared pr;
  pr.lq = check_cu_values("cu_seqlens_q", cu_q, cu_q_pad, "q", q.size(0));
  pr.lk = check_cu_values("cu_seqlens_k", cu_k, cu_k_pad, "k", k.size(0));
  pr.q = unit_last(q), pr.k = unit_last(k), pr.v = unit_last(v);
  if (alibi) pr.alibi = alibi->contiguous();
  return pr;
}

// ------------------------------------------------------------------ ops

// FP8: float8_e4m3fn t (total, heads, d) times its descale, in float32. The descale is None
// (1), (1,) per tensor, or (batch, nheads_k) per sequence and kv head, applied to every row of
// sequence b (its physical rows from lay) and every head of kv head group h; rows outside
// every sequence keep factor 1 (no kernel reads them).
Tensor dequantize(const Tensor& t, const OptTensor& descale, const SeqLayout& lay, int64_t nheads_k) {
  const Tensor x = t.to(at::kFloat);
  if (!descale) return x;
  if (descale->dim() == 1) return x * *descale;
  const Tensor d = descale->contiguous();
  Tensor rows = at::ones({t.size(0), nheads_k}, d.options());
  const int32_t* cu = lay.cu.data_ptr<int32_t>();
  const int32_t* start = lay.start.data_ptr<int32_t>();
  const float* dp = d.data_ptr<float>();
  float* rp = rows.data_ptr<float>();
  for (int64_t b = 0; b + 1 < lay.cu.size(0); ++b)
    for (int64_t r = start[b]; r < int64_t(start[b]) + cu[b + 1] - cu[b]; ++r)
      std::copy(dp + b * nheads_k, dp + (b + 1) * nheads_k, rp + r * nheads_k);
  return x * rows.repeat_interleave(t.size(1) / nheads_k, 1).unsqueeze(-1);
}

// sink, as meta/attention.py::check_sink: (nheads,) in softmax_lse's dtype on q's device.
void check_sink(const Tensor& q, const OptTensor& sink) {
  if (!sink) return;
  TORCH_CHECK(sink->dim() == 1 && sink->size(0) == q.size(1), "sink must be (nheads,) = (", q.size(1),
              ",), got ", py_tuple(sink->sizes()));
  TORCH_CHECK(sink->scalar_type() == lse_dtype(q), "sink must be ", py_dtype(lse_dtype(q)),
              " (softmax_lse's dtype), got ", py_dtype(sink->scalar_type()));
  TORCH_CHECK(sink->device() == q.device(), "sink must be on q's device ", q.device(), ", got ",
              sink->device());
}

// The CPU runs our kernels only: None, "auto" and "torch_varlen" select them.
void check_backend(const std::optional<c10::string_view>& backend) {
  TORCH_CHECK(!backend || *backend == "auto" || *backend == "torch_varlen",
              "backend must be None, 'auto' or 'torch_varlen' for CPU tensors ('fa4', 'triton' and "
              "'hopper' need CUDA), "
              "got '", std::string(*backend), "'");
}

// ------------------------------------------------------------------ paged KV / seqused_k

// Shapes, as meta/attention.py::check_paged_kv (same messages).
void check_paged_shapes(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_q,
                        const OptTensor& cu_k_pad, const OptTensor& block_table,
                        const OptTensor& seqused_k, int64_t num_splits) {
  const int64_t batch = cu_q.dim() == 1 ? cu_q.size(0) - 1 : -1;
  TORCH_CHECK(num_splits >= 0, "num_splits must be >= 0 (0 = heuristic), got ", num_splits);
  if (seqused_k) {
    TORCH_CHECK(seqused_k->scalar_type() == at::kInt, "seqused_k must be int32, got ",
                py_dtype(seqused_k->scalar_type()));
    TORCH_CHECK(seqused_k->dim() == 1 && seqused_k->size(0) == batch, "seqused_k must have shape (",
                batch, ",), got ", py_tuple(seqused_k->sizes()));
    TORCH_CHECK(seqused_k->device() == q.device(), "seqused_k must be on q's device ", q.device(),
                ", got ", seqused_k->device());
  }
  if (!block_table) return;
  const Tensor& bt = *block_table;
  TORCH_CHECK(bt.scalar_type() == at::kInt, "block_table must be int32, got ", py_dtype(bt.scalar_type()));
  TORCH_CHECK(bt.dim() == 2 && bt.size(0) == batch, "block_table must be (batch, max_blocks) with batch = ",
              batch, ", got shape ", py_tuple(bt.sizes()));
  TORCH_CHECK(bt.device() == q.device(), "block_table must be on q's device ", q.device(), ", got ", bt.device());
  for (auto [name, t] : {std::pair<const char*, const Tensor*>{"k", &k}, {"v", &v}})
    TORCH_CHECK(t->dim() == 4, "with a block_table, ", name, " must be a cache (num_blocks, block_size, "
                "nheads_k, headdim), got shape ", py_tuple(t->sizes()));
  TORCH_CHECK(v.size(0) == k.size(0) && v.size(1) == k.size(1),
              "v must be (num_blocks, block_size, nheads_k, headdim_v) with k's first two dims ",
              py_tuple(k.sizes().slice(0, 2)), ", got ", py_tuple(v.sizes()));
  TORCH_CHECK(k.size(1) > 0 && k.size(1) % 16 == 0,
              "paged KV block_size (k.shape[1]) must be a positive multiple of 16, got ", k.size(1));
  TORCH_CHECK(!cu_k_pad, "cu_seqlens_k_padded must be None with a block_table (keys live in the cache's blocks)");
}

// Paged KV or seqused_k on the CPU: the keys each sequence reads, gathered into packed k, v
// (one copy of the used keys, then the packed kernel runs unchanged). Checks every value read:
// lengths >= 0; packed rows inside k; paged lengths within the block table and the block ids
// of the used blocks inside the cache. Messages start with the CUDA device asserts' text
// (kernels/checks.py). Returns (k, v, cu_seqlens_k) of the packed keys.
std::tuple<Tensor, Tensor, Tensor> gather_keys(const Tensor& k, const Tensor& v, const Tensor& cu_k_in,
                                               const OptTensor& cu_k_pad, const OptTensor& block_table,
                                               const OptTensor& seqused_k) {
  const bool paged = block_table.has_value();
  const int64_t total_k = paged ? std::numeric_limits<int64_t>::max() : k.size(0);
  const SeqLayout lay = check_cu_values("cu_seqlens_k", cu_k_in, paged ? std::nullopt : cu_k_pad, "k", total_k);
  const int64_t batch = lay.cu.size(0) - 1;
  const int32_t* cu = lay.cu.data_ptr<int32_t>();
  const int32_t* st = lay.start.data_ptr<int32_t>();
  const Tensor used = seqused_k ? seqused_k->contiguous() : Tensor();
  std::vector<int64_t> rows;
  std::vector<int32_t> cu_out{0};
  const Tensor bt = paged ? block_table->contiguous() : Tensor();
  const int64_t bs = paged ? k.size(1) : 1, nb = k.size(0), max_blocks = paged ? bt.size(1) : 0;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t len = used.defined() ? int64_t(used.data_ptr<int32_t>()[b]) : int64_t(cu[b + 1]) - cu[b];
    TORCH_CHECK(len >= 0, "seqused_k must be >= 0: seqused_k[", b, "] = ", len);
    if (paged) {
      TORCH_CHECK(len <= max_blocks * bs, "paged KV: a sequence's key count exceeds the block_table's "
                  "capacity max_blocks * block_size: sequence ", b, " has ", len, " keys, capacity ",
                  max_blocks, " * ", bs, " = ", max_blocks * bs);
      const int32_t* ids = bt.data_ptr<int32_t>() + b * max_blocks;
      for (int64_t j = 0; j < len; ++j) {
        const int64_t id = ids[j / bs];
        TORCH_CHECK(id >= 0 && id < nb, "paged KV: block_table holds a block id outside [0, num_blocks): "
                    "block_table[", b, ", ", j / bs, "] = ", id, " with num_blocks = ", nb);
        rows.push_back(id * bs + j % bs);
      }
    } else {
      TORCH_CHECK(int64_t(st[b]) + len <= k.size(0), "seqused_k: a sequence's keys [start, start + seqused_k) "
                  "lie beyond k.shape[0]: sequence ", b, " reads rows [", st[b], ", ", st[b] + len,
                  ") of ", k.size(0));
      for (int64_t j = 0; j < len; ++j) rows.push_back(st[b] + j);
    }
    TORCH_CHECK(int64_t(cu_out.back()) + len <= std::numeric_limits<int32_t>::max(),
                "the sequences' key counts must sum to less than 2^31");
    cu_out.push_back(int32_t(cu_out.back() + len));
  }
  const Tensor idx = at::tensor(rows, at::TensorOptions().dtype(at::kLong));
  const Tensor cu_k = at::tensor(cu_out, at::TensorOptions().dtype(at::kInt));
  if (!paged) return {k.index_select(0, idx), v.index_select(0, idx), cu_k};
  // (num_blocks * block_size, nheads_k, headdim) views of the caches (a copy only for caches
  // whose block and slot strides do not merge)
  const Tensor kf = k.reshape({k.size(0) * bs, k.size(2), k.size(3)});
  const Tensor vf = v.reshape({v.size(0) * bs, v.size(2), v.size(3)});
  return {kf.index_select(0, idx), vf.index_select(0, idx), cu_k};
}

std::tuple<Tensor, Tensor> attention_forward_cpu(
    const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, const Tensor& cu_seqlens_q,
    const Tensor& cu_seqlens_k, c10::SymInt /*max_seqlen_q*/, c10::SymInt /*max_seqlen_k*/,
    double softmax_scale, int64_t window_left, int64_t window_right, double softcap,
    const OptTensor& alibi_slopes, const OptTensor& cu_seqlens_q_padded,
    const OptTensor& cu_seqlens_k_padded, double dropout_p, const OptTensor& rng_state,
    bool /*deterministic*/, const OptTensor& q_descale, const OptTensor& k_descale,
    const OptTensor& v_descale, std::optional<c10::string_view> backend, const OptTensor& sink_in,
    const OptTensor& block_table, const OptTensor& seqused_k, int64_t num_splits) {
  check_backend(backend);
  check_paged_shapes(q_in, k_in, v_in, cu_seqlens_q, cu_seqlens_k_padded, block_table, seqused_k, num_splits);
  if (block_table || seqused_k) {
    // the 3-D shape checks first (on (num_blocks, nheads_k, headdim) views of a cache)
    const Tensor k3 = block_table ? k_in.select(1, 0) : k_in, v3 = block_table ? v_in.select(1, 0) : v_in;
    check_shapes(q_in, k3, v3, cu_seqlens_q, cu_seqlens_k, alibi_slopes, cu_seqlens_q_padded,
                 cu_seqlens_k_padded, window_left, window_right, softcap, dropout_p, rng_state);
    auto [k, v, cu_k] = gather_keys(k_in, v_in, cu_seqlens_k, cu_seqlens_k_padded, block_table, seqused_k);
    return attention_forward_cpu(q_in, k, v, cu_seqlens_q, cu_k, 0, 0, softmax_scale, window_left,
                                 window_right, softcap, alibi_slopes, cu_seqlens_q_padded, std::nullopt,
                                 dropout_p, rng_state, false, q_descale, k_descale, v_descale, backend,
                                 sink_in, std::nullopt, std::nullopt, 0);
  }
  const Prepared pr = prepare(q_in, k_in, v_in, cu_seqlens_q, cu_seqlens_k, alibi_slopes,
                              cu_seqlens_q_padded, cu_seqlens_k_padded, window_left, window_right,
                              softcap, dropout_p, rng_state);
  check_descales(q_in, k_in, cu_seqlens_q.size(0) - 1, dropout_p, q_descale, k_descale, v_descale);
  check_sink(q_in, sink_in);
  if (q_in.scalar_type() == at::kFloat8_e4m3fn) {
    // FP8: dequantize to float32, run the float32 kernel, return out in bfloat16 (lse float32).
    const int64_t hk = k_in.size(1);
    auto [out, lse] = attention_forward_cpu(
        dequantize(pr.q, q_descale, pr.lq, hk), dequantize(pr.k, k_descale, pr.lk, hk),
        dequantize(pr.v, v_descale, pr.lk, hk), cu_seqlens_q, cu_seqlens_k, 0, 0, softmax_scale,
        window_left, window_right, softcap, alibi_slopes, cu_seqlens_q_padded, cu_seqlens_k_padded,
        dropout_p, rng_state, false, std::nullopt, std::nullopt, std::nullopt, backend, sink_in,
        std::nullopt, std::nullopt, 0);
    return {out.to(at::kBFloat16), lse};
  }
  const Tensor &q = pr.q, &k = pr.k, &v = pr.v;
  const int64_t total_q = q.size(0), H = q.size(1);
  Tensor out = at::empty({total_q, H, v.size(2)}, q.options());
  Tensor lse = at::empty({H, total_q}, q.options().dtype(lse_dtype(q)));
  if (poison_outputs()) {
    out.fill_(std::numeric_limits<double>::quiet_NaN());
    lse.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  for (auto [a, b] : gaps(pr.lq, total_q)) {
    out.narrow(0, a, b - a).zero_();
    lse.narrow(1, a, b - a).fill_(-std::numeric_limits<double>::infinity());
  }
  const std::vector<Block> blocks = make_blocks(pr.lq.cu, H, kBlockM);
  const Tensor sink = sink_in ? sink_in->contiguous() : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "varlen_attention_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto p = make_params<scalar_t, acc_t>(q, k, v, pr.lq, pr.lk, softmax_scale, window_left,
                                          window_right, softcap, pr.alibi, dropout_p, rng_state);
    p.out = out.data_ptr<scalar_t>();
    p.lse = lse.data_ptr<acc_t>();
    p.sink = sink.defined() ? sink.data_ptr<acc_t>() : nullptr;
    const auto ks = kernels<scalar_t, acc_t>();
    p.amx_bf16 = ks.amx_bf16 && q.scalar_type() == at::kBFloat16;
    run_items<acc_t>(int64_t(blocks.size()), forward_scratch(p.headdim, p.headdim_v),
                     [&](int64_t b, int64_t e, acc_t* s) { ks.forward(p, blocks.data(), b, e, s); });
  });
  return {out, lse};
}

void check_like(const char* name, const Tensor& t, at::IntArrayRef shape, at::ScalarType dtype,
                const Tensor& q) {
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", py_tuple(shape), ", got ", py_tuple(t.sizes()));
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", py_dtype(dtype), ", got ", py_dtype(t.scalar_type()));
  TORCH_CHECK(t.device() == q.device(), name, " must be on q's device ", q.device(), ", got ", t.device());
}

std::tuple<Tensor, Tensor, Tensor> attention_backward_cpu(
    const Tensor& grad_out_in, const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
    const Tensor& out_in, const Tensor& softmax_lse, const Tensor& cu_seqlens_q,
    const Tensor& cu_seqlens_k, c10::SymInt /*max_seqlen_q*/, c10::SymInt /*max_seqlen_k*/,
    double softmax_scale, int64_t window_left, int64_t window_right, double softcap,
    const OptTensor& alibi_slopes, const OptTensor& cu_seqlens_q_padded,
    const OptTensor& cu_seqlens_k_padded, double dropout_p, const OptTensor& rng_state,
    bool /*deterministic*/, const OptTensor& grad_lse, std::optional<c10::string_view> backend) {
  check_backend(backend);
  TORCH_CHECK(q_in.scalar_type() != at::kFloat8_e4m3fn,
              "FP8 attention is forward-only: there is no backward for float8_e4m3fn q, k, v "
              "(train with bfloat16 or float16 inputs)");
  const Prepared pr = prepare(q_in, k_in, v_in, cu_seqlens_q, cu_seqlens_k, alibi_slopes,
                              cu_seqlens_q_padded, cu_seqlens_k_padded, window_left, window_right,
                              softcap, dropout_p, rng_state);
  const Tensor &q = pr.q, &k = pr.k, &v = pr.v;
  const int64_t total_q = q.size(0), H = q.size(1), Dv = v.size(2);
  const std::vector<int64_t> out_shape{total_q, H, Dv}, lse_shape{H, total_q};
  check_like("grad_out", grad_out_in, out_shape, q.scalar_type(), q);
  check_like("out", out_in, out_shape, q.scalar_type(), q);
  check_like("softmax_lse", softmax_lse, lse_shape, lse_dtype(q), q);
  if (grad_lse) check_like("grad_lse", *grad_lse, lse_shape, lse_dtype(q), q);
  const Tensor grad_out = unit_last(grad_out_in), out = unit_last(out_in);
  const Tensor lse = softmax_lse.contiguous();
  const Tensor glse = grad_lse ? *grad_lse : Tensor();

  // empty_like keeps q's strides for dense q, as the fake does; rows are written through strides
  Tensor dq = at::empty_like(q_in), dk = at::empty_like(k_in), dv = at::empty_like(v_in);
  if (poison_outputs()) {
    for (Tensor* t : {&dq, &dk, &dv}) t->fill_(std::numeric_limits<double>::quiet_NaN());
  }
  for (auto [a, b] : gaps(pr.lq, total_q)) dq.narrow(0, a, b - a).zero_();
  for (auto [a, b] : gaps(pr.lk, k.size(0))) {
    dk.narrow(0, a, b - a).zero_();
    dv.narrow(0, a, b - a).zero_();
  }
  Tensor delta = at::empty({H, total_q}, lse.options());
  const std::vector<Block> qblocks = make_blocks(pr.lq.cu, H, kBlockM);
  const std::vector<Block> kblocks = make_blocks(pr.lk.cu, k.size(1), kBlockN);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "varlen_attention_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto p = make_params<scalar_t, acc_t>(q, k, v, pr.lq, pr.lk, softmax_scale, window_left,
                                          window_right, softcap, pr.alibi, dropout_p, rng_state);
    p.dout = grad_out.data_ptr<scalar_t>();
    p.dout_s0 = grad_out.stride(0), p.dout_s1 = grad_out.stride(1);
    p.out_saved = out.data_ptr<scalar_t>();
    p.out_s0 = out.stride(0), p.out_s1 = out.stride(1);
    p.lse_saved = lse.data_ptr<acc_t>();
    p.delta = delta.data_ptr<acc_t>();
    p.dq = dq.data_ptr<scalar_t>(), p.dk = dk.data_ptr<scalar_t>(), p.dv = dv.data_ptr<scalar_t>();
    p.dq_s0 = dq.stride(0), p.dq_s1 = dq.stride(1), p.dq_s2 = dq.stride(2);
    p.dk_s0 = dk.stride(0), p.dk_s1 = dk.stride(1), p.dk_s2 = dk.stride(2);
    p.dv_s0 = dv.stride(0), p.dv_s1 = dv.stride(1), p.dv_s2 = dv.stride(2);
    const auto ks = kernels<scalar_t, acc_t>();
    const acc_t* glse_ptr = glse.defined() ? glse.data_ptr<acc_t>() : nullptr;
    const int64_t g0 = glse.defined() ? glse.stride(0) : 0, g1 = glse.defined() ? glse.stride(1) : 0;
    acc_t* delta_ptr = delta.data_ptr<acc_t>();
    at::parallel_for(0, total_q, 256, [&](int64_t b, int64_t e) {
      ks.delta(p, glse_ptr, g0, g1, delta_ptr, b, e);
    });
    run_items<acc_t>(int64_t(kblocks.size()), backward_dkdv_scratch(p.headdim, p.headdim_v),
                     [&](int64_t b, int64_t e, acc_t* s) { ks.dkdv(p, kblocks.data(), b, e, s); });
    run_items<acc_t>(int64_t(qblocks.size()), backward_dq_scratch(p.headdim, p.headdim_v),
                     [&](int64_t b, int64_t e, acc_t* s) { ks.dq(p, qblocks.data(), b, e, s); });
  });
  return {dq, dk, dv};
}

}  // namespace
}  // namespace attn
}  // namespace varlen

TORCH_LIBRARY_IMPL(varlen, CPU, m) {
  m.impl("attention_forward", &varlen::attn::attention_forward_cpu);
  m.impl("attention_backward", &varlen::attn::attention_backward_cpu);
}
