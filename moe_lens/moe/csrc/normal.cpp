// torch.randn on the CPU, bit for bit, faster: the noisy router's normal draw z (n, e) (moe_lens.moe.noisy_gate.randn).
//
// PyTorch fills a contiguous float32 tensor of 16 or more elements (at::native::templates::cpu::normal_fill) with
//   1. one uniform per element from the generator's mt19937, u = (random() & (2^24 - 1)) * 2^-24, in order;
//   2. Box-Muller on each block of 16 (NormalFill16): 8 pairs (u[j], u[j + 8]) -> (r cos t, r sin t);
//   3. when 16 does not divide the size, 16 more uniforms overwrite the last 16 elements, which get step 2 again.
// Step 1 runs one engine call at a time under the generator's lock, step 2 on one thread: 1.8 ms for (8192, 64) on the
// CI machine. Here step 1 makes whole 624-word states at once (the twist and the tempering as vector code; the
// sequence and the engine's state afterwards are the engine's own) and step 2 runs on ATen's threads, with the same
// Box-Muller code as PyTorch's kernel of this build's capability (this file is compiled for the capability PyTorch's
// kernels run at, moe/cpu_runtime.py): the AVX2 build's avx_mathfun functions, else the scalar libm code.
// tests/test_fast_normal.py checks values and the generator's state against torch.randn.
#include <torch/extension.h>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/core/MT19937RNGEngine.h>
#include <c10/util/MathConstants.h>
// PyTorch registers its normal kernel for AVX2 and not for AVX-512, where its dispatcher runs the AVX2 kernel: both
// builds take Box-Muller from avx_mathfun.h, which declares its functions only under CPU_CAPABILITY_AVX2.
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#define MOE_LENS_AVX_MATHFUN
#ifndef CPU_CAPABILITY_AVX2
#define CPU_CAPABILITY_AVX2
#include <ATen/native/cpu/avx_mathfun.h>
#undef CPU_CAPABILITY_AVX2
#else
#include <ATen/native/cpu/avx_mathfun.h>
#endif
#endif

#include <cmath>
#include <cstring>
#include <mutex>

namespace {

constexpr int kN = 624, kM = 397;  // at::MERSENNE_STATE_N, at::MERSENNE_STATE_M
constexpr uint32_t kMatrixA = 0x9908b0df, kUpper = 0x80000000, kLower = 0x7fffffff;

typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef float f32x16 __attribute__((vector_size(64)));

inline u32x16 load16(const uint32_t* p) {
  u32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store16(uint32_t* p, u32x16 v) { std::memcpy(p, &v, sizeof v); }

inline uint32_t twist(uint32_t u, uint32_t v) { return (((u & kUpper) | (v & kLower)) >> 1) ^ ((0u - (v & 1u)) & kMatrixA); }

inline u32x16 twist16(u32x16 u, u32x16 v) {
  return (((u & kUpper) | (v & kLower)) >> 1) ^ ((0u - (v & 1u)) & kMatrixA);
}

// at::mt19937_engine::next_state on p[0, 624): the same recurrence, 16 words at a time where no word of a vector reads
// another of the same vector (the first 227 read only old words; the rest read new words 227 back).
void next_state(uint32_t* p) {
  int i = 0;
  for (; i + 16 <= kN - kM; i += 16) store16(p + i, load16(p + i + kM) ^ twist16(load16(p + i), load16(p + i + 1)));
  for (; i < kN - kM; ++i) p[i] = p[i + kM] ^ twist(p[i], p[i + 1]);
  for (; i + 16 <= kN - 1; i += 16)
    store16(p + i, load16(p + i + kM - kN) ^ twist16(load16(p + i), load16(p + i + 1)));
  for (; i < kN - 1; ++i) p[i] = p[i + kM - kN] ^ twist(p[i], p[i + 1]);
  p[kN - 1] = p[kM - 1] ^ twist(p[kN - 1], p[0]);
}

inline uint32_t temper(uint32_t y) {
  y ^= (y >> 11);
  y ^= (y << 7) & 0x9d2c5680;
  y ^= (y << 15) & 0xefc60000;
  return y ^ (y >> 18);
}

// float(random() & (2^24 - 1)) * 2^-24: at::uniform_real_distribution<float>(0, 1) (x * (1 - 0) + 0 is exact)
constexpr float kInv24 = 1.0f / (1 << 24);

inline void uniform_from(const uint32_t* s, float* out, int64_t m) {
  int64_t i = 0;
  for (; i + 16 <= m; i += 16) {
    u32x16 y = load16(s + i);
    y ^= (y >> 11);
    y ^= (y << 7) & 0x9d2c5680;
    y ^= (y << 15) & 0xefc60000;
    y ^= (y >> 18);
    const f32x16 f = __builtin_convertvector((i32x16)(y & 0xffffffu), f32x16) * kInv24;
    std::memcpy(out + i, &f, sizeof f);
  }
  for (; i < m; ++i) out[i] = static_cast<float>(temper(s[i]) & 0xffffffu) * kInv24;
}

// `count` successive float uniforms of the engine, as `count` calls of uniform_real_distribution<float>(0, 1) make,
// the engine's state advanced as they advance it. An engine call: if (--left == 0) next_state() (left = 624, next = 0);
// then word next++ tempered. So left - 1 words are ready; after a regeneration 624 are, as if left were 625.
void uniforms(at::mt19937_data_pod& d, float* out, int64_t count) {
  while (count > 0) {
    if (d.left_ <= 1) {
      next_state(d.state_.data());
      d.left_ = kN + 1;
      d.next_ = 0;
    }
    const int64_t take = std::min<int64_t>(count, d.left_ - 1);
    uniform_from(d.state_.data() + d.next_, out, take);
    d.next_ += static_cast<uint32_t>(take);
    d.left_ -= static_cast<int>(take);
    out += take;
    count -= take;
  }
}

// NormalFill16<float> of the PyTorch kernel that runs at this capability, with mean 0 and std 1.
#ifdef MOE_LENS_AVX_MATHFUN
inline void box_muller16(float* data) {
  const __m256 u1 = _mm256_sub_ps(_mm256_set1_ps(1.0f), _mm256_loadu_ps(data));
  const __m256 u2 = _mm256_loadu_ps(data + 8);
  const __m256 radius = _mm256_sqrt_ps(_mm256_mul_ps(_mm256_set1_ps(-2.0f), log256_ps(u1)));
  const __m256 theta = _mm256_mul_ps(_mm256_set1_ps(2.0f * c10::pi<double>), u2);
  __m256 sintheta, costheta;
  sincos256_ps(theta, &sintheta, &costheta);
  const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
  _mm256_storeu_ps(data, _mm256_fmadd_ps(_mm256_mul_ps(radius, costheta), one, zero));
  _mm256_storeu_ps(data + 8, _mm256_fmadd_ps(_mm256_mul_ps(radius, sintheta), one, zero));
}
#else
inline void box_muller16(float* data) {
  const float mean = 0.0f, stdv = 1.0f;
  for (int j = 0; j < 8; ++j) {
    const float u1 = 1 - data[j];  // [0, 1) -> (0, 1] for log
    const float u2 = data[j + 8];
    const float radius = std::sqrt(-2 * std::log(u1));
    const float theta = 2.0f * c10::pi<double> * u2;
    data[j] = std::fma(radius * std::cos(theta), stdv, mean);
    data[j + 8] = std::fma(radius * std::sin(theta), stdv, mean);
  }
}
#endif

}  // namespace

// out (contiguous float32, 16 or more elements) = torch.randn(out.shape) drawn from `generator` (the default CPU
// generator when None), bit for bit, the generator left as torch.randn leaves it.
void randn_fill(const at::Tensor& out, const std::optional<at::Generator>& generator) {
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kFloat && out.is_contiguous() && out.numel() >= 16,
              "randn_fill: out must be a contiguous CPU float32 tensor of 16 or more elements");
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
  float* data = out.data_ptr<float>();
  const int64_t size = out.numel(), tail = size % 16;
  float extra[16];
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    at::mt19937_data_pod d = gen->engine().data();
    uniforms(d, data, size);
    if (tail) uniforms(d, extra, 16);
    at::mt19937 engine;
    engine.set_data(d);
    gen->set_engine(engine);
  }
  at::parallel_for(0, size / 16, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) box_muller16(data + 16 * b);
  });
  if (tail) {  // the last 16 elements again, from 16 new uniforms
    std::memcpy(data + size - 16, extra, sizeof extra);
    box_muller16(data + size - 16);
  }
}

#ifdef MOE_LENS_NORMAL_ONLY  // this file alone as a module (tests/test_fast_normal.py builds it for other capabilities)
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("randn_fill", &randn_fill, pybind11::call_guard<pybind11::gil_scoped_release>());
}
#endif
