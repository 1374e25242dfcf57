// The selection step of moe_lens.moe.noisy_gate._NoisyTopKGate's forward on the CPU (Shazeer et al. 2017, eq. 3-5
// and 8-10): the same maths as its PyTorch ops, in one pass per token row instead of an addcmul, a topk and three
// more passes over (n, e). The transcendental functions stay PyTorch's vectorised ops (softplus before, Phi after).
// Per row, with clean = logits2[:, :e], std = softplus(logits2[:, e:]) + eps and the noise draw z:
//   H   = clean + z * std             the noisy logits
//   top, idx = the k + 1 largest H, largest first (a NaN counts as the largest, as in torch.topk; equal values
//              keep the lower expert first)
//   u   = (clean - thr) / std         thr = top[k] (the (k+1)-th largest) at the k selected experts, top[k-1]
//                                     elsewhere: the k-th largest of H with the expert itself left out
// noisy_gate.py then takes P = ndtr(u); the backward stays in PyTorch ops and reads std, u and idx.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>

namespace {

template <typename T>
inline bool above(T a, T b) {
  return a > b || (std::isnan(a) && !std::isnan(b));
}

template <typename T>
void select_rows(const T* lp, const T* zp, const T* sp, int64_t e, int64_t k, T* up, T* tp, int64_t* ip,
                 int64_t begin, int64_t end) {
  const int64_t kk = k + 1;
  for (int64_t r = begin; r < end; ++r) {
    const T* clean = lp + r * 2 * e;
    const T* zr = zp + r * e;
    const T* sr = sp + r * e;
    T* ur = up + r * e;
    T* top = tp + r * kk;
    int64_t* idx = ip + r * kk;
    int64_t filled = 0;
    for (int64_t c = 0; c < e; ++c) {
      const T v = clean[c] + zr[c] * sr[c];
      if (filled < kk || above(v, top[filled - 1])) {  // insert v, keeping top[0..filled) largest first
        int64_t j = filled < kk ? filled++ : kk - 1;
        while (j > 0 && above(v, top[j - 1])) {
          top[j] = top[j - 1];
          idx[j] = idx[j - 1];
          --j;
        }
        top[j] = v;
        idx[j] = c;
      }
    }
    const T kth = top[k - 1], next = top[k];
    for (int64_t c = 0; c < e; ++c) ur[c] = (clean[c] - kth) / sr[c];
    for (int64_t j = 0; j < k; ++j) {
      const int64_t c = idx[j];
      ur[c] = ((clean[c] - kth) + (kth - next)) / sr[c];  // as noisy_gate.py: (clean - kth) + (kth - next)
    }
  }
}

}  // namespace

// logits2 (n, 2e), z and std (n, e): contiguous CPU float32/float64; writes u (n, e), top and idx (n, k + 1).
void noisy_gate_select(const at::Tensor& logits2, const at::Tensor& z, const at::Tensor& std_, int64_t k,
                       const at::Tensor& u, const at::Tensor& top, const at::Tensor& idx) {
  const int64_t n = z.size(0), e = z.size(1);
  TORCH_CHECK(logits2.device().is_cpu() && logits2.is_contiguous() && z.is_contiguous() && logits2.dim() == 2 &&
                  z.dim() == 2 && logits2.size(0) == n && logits2.size(1) == 2 * e &&
                  z.scalar_type() == logits2.scalar_type(),
              "noisy_gate_select: expected contiguous CPU logits2 (n, 2e) and z (n, e) of one floating type");
  TORCH_CHECK(k >= 1 && k < e, "noisy_gate_select: needs 1 <= k < e");
  for (const auto* t : {&std_, &u, &top})
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == z.scalar_type() && t->size(0) == n,
                "noisy_gate_select: std, u and top must be contiguous, of z's dtype and n rows");
  TORCH_CHECK(idx.is_contiguous() && idx.scalar_type() == at::kLong && idx.size(1) == k + 1 && top.size(1) == k + 1 &&
                  std_.size(1) == e && u.size(1) == e,
              "noisy_gate_select: bad shapes");
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "noisy_gate_select", [&] {
    const scalar_t* lp = logits2.data_ptr<scalar_t>();
    const scalar_t* zp = z.data_ptr<scalar_t>();
    const scalar_t* sp = std_.data_ptr<scalar_t>();
    scalar_t* up = u.data_ptr<scalar_t>();
    scalar_t* tp = top.data_ptr<scalar_t>();
    int64_t* ip = idx.data_ptr<int64_t>();
    at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
      select_rows<scalar_t>(lp, zp, sp, e, k, up, tp, ip, begin, end);
    });
  });
}
