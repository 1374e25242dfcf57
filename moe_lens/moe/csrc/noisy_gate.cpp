// moe_lens.moe.noisy_gate._NoisyTopKGate on the CPU (Shazeer et al. 2017, eq. 3-5 and 8-10): its forward and its
// backward each as one pass per token row, on ATen's vectorised maths (at::vec: Sleef's exp and log1p and ATen's erf,
// the functions PyTorch's own CPU kernels for softplus, exp, sigmoid and erf use), instead of about 5 passes
// over (n, e) forward and 9 backward. The maths is noisy_gate.py's, op for op; only the rounding of sums may differ.
//
// Per row, with clean = logits2[:, :e], raw = logits2[:, e:] and the noise draw z:
//   std = softplus(raw) + eps         softplus(a) = a for a > 20, else log1p(exp(a)) (PyTorch's threshold)
//   H   = clean + z * std             the noisy logits
//   top, idx = the k + 1 largest H, largest first (a NaN counts as the largest, as in torch.topk; equal values
//              keep the lower expert first)
//   u   = (clean - thr) / std         thr = top[k] (the (k+1)-th largest) at the k selected experts, top[k-1]
//                                     elsewhere: the k-th largest of H with the expert itself left out
//   P   = (1 + erf(u / sqrt 2)) / 2   Phi(u), as torch.special.ndtr computes it on the CPU
//   gate = softmax(the k largest H)
// Backward, from the upstream gradients g_P (n, e) (or a broadcast row), g_top (n, k) and g_gate (n, k):
//   d top += gate * (g_gate - sum(g_gate * gate))   (the softmax)
//   G = g_P * phi(u) / std;  d clean = G;  d raw = -G * u * sigmoid(raw)
//   the thresholds: d top[k] = -(sum of G over the k selected), d top[k-1] = -(the rest) (+ g_top[k-1])
//   at the k + 1 entries of the top: d clean += d top, d raw += d top * z * sigmoid(raw)   (H = clean + z * std)
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

using at::vec::Vectorized;

template <typename T>
inline bool above(T a, T b) {
  return a > b || (std::isnan(a) && !std::isnan(b));
}

// f(offset, count, vector) over [0, e) in vectors, the last one partial (loadu/store with a count)
template <typename T, typename F>
inline void each_vec(int64_t e, const F& f) {
  using V = Vectorized<T>;
  int64_t c = 0;
  for (; c + V::size() <= e; c += V::size()) f(c, V::size());
  if (c < e) f(c, e - c);
}

template <typename T>
inline Vectorized<T> load(const T* p, int64_t count) {
  return count == Vectorized<T>::size() ? Vectorized<T>::loadu(p) : Vectorized<T>::loadu(p, count);
}

template <typename T>
inline void store(const Vectorized<T>& v, T* p, int64_t count) {
  if (count == Vectorized<T>::size())
    v.store(p);
  else
    v.store(p, count);
}

// v (expert c) into best/idx (largest first) from slot j down to its place: equal values stay behind.
template <typename T, typename G>
inline void insert(T v, int64_t c, int64_t j, T* best, int64_t* idx, const G& greater) {
  while (j > 0 && greater(v, best[j - 1])) {
    best[j] = best[j - 1];
    idx[j] = idx[j - 1];
    --j;
  }
  best[j] = v;
  idx[j] = c;
}

// The kk largest of h[0..e), largest first, into best and idx: one insertion pass, equal values keeping the lower
// index first. greater(a, b): a > b, or `above` (NaN the largest) when h holds a NaN.
template <typename T, typename G>
inline void select(const T* h, int64_t e, int64_t kk, T* best, int64_t* idx, const G& greater) {
  int64_t filled = 0;
  for (int64_t c = 0; c < e; ++c)
    if (filled < kk || greater(h[c], best[kk - 1])) insert(h[c], c, filled < kk ? filled++ : kk - 1, best, idx, greater);
}

// `select` with a > b for a row without NaN, a vector at a time: the lanes above the current (k+1)-th largest are
// inserted in index order (re-checked against it as it rises); most vectors past the first have none.
template <typename T>
inline void select_vec(const T* h, int64_t e, int64_t kk, T* best, int64_t* idx) {
  using V = Vectorized<T>;
  const auto greater = [](T a, T b) { return a > b; };
  const int64_t head = std::min(e, kk);
  select<T>(h, head, kk, best, idx, greater);  // the first kk: every one is inserted
  int64_t c = head;
  const int all = (1 << V::size()) - 1;
  for (; c + V::size() <= e; c += V::size()) {
    int mask = ~(V::loadu(h + c) > V(best[kk - 1])).zero_mask() & all;
    while (mask) {
      const int64_t i = c + __builtin_ctz(mask);
      mask &= mask - 1;
      if (h[i] > best[kk - 1]) insert(h[i], i, kk - 1, best, idx, greater);
    }
  }
  for (; c < e; ++c)
    if (h[c] > best[kk - 1]) insert(h[c], c, kk - 1, best, idx, greater);
}

// The kk largest of L rows at once, one row per vector lane (kk <= 8, no NaN): ht holds the rows' H column by column
// (ht[c * L + l] = H of row l at expert c); for each column an insertion network of compares and blends keeps each
// lane's kk largest, largest first, equal values keeping the lower expert first (as `select`). Writes the values and
// the experts (as T) of slot j, lane l at bv[j * L + l], bi[j * L + l].
template <typename T>
void select_lanes(const T* ht, int64_t e, int64_t kk, T* bv, T* bi) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  V best[8], bidx[8], gt[8];
  const V all = V(T(0)) == V(T(0));
  for (int64_t c = 0; c < e; ++c) {
    const V v = V::loadu(ht + c * L), vc(static_cast<T>(c));
    for (int64_t j = 0; j < kk; ++j) gt[j] = j >= c ? all : (v > best[j]);  // slots j >= c are still empty
    for (int64_t j = kk - 1; j >= 1; --j) {  // from the last slot: best[j - 1] is still the old one
      best[j] = V::blendv(best[j], V::blendv(v, best[j - 1], gt[j - 1]), gt[j]);
      bidx[j] = V::blendv(bidx[j], V::blendv(vc, bidx[j - 1], gt[j - 1]), gt[j]);
    }
    best[0] = V::blendv(best[0], v, gt[0]);
    bidx[0] = V::blendv(bidx[0], vc, gt[0]);
  }
  for (int64_t j = 0; j < kk; ++j) {
    best[j].store(bv + j * L);
    bidx[j].store(bi + j * L);
  }
}

template <typename T>
void forward_rows(const T* lp, const T* zp, T eps, int64_t e, int64_t k, T* sp, T* up, T* pp, T* tp, int64_t* ip,
                  T* gp, int64_t begin, int64_t end) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  const int64_t kk = k + 1;
  std::vector<T> best(kk), hbuf(L * e), ht(L * e), bv(kk * L), bi(kk * L);
  const V threshold(T(20)), veps(eps), one(T(1)), half(T(0.5)), inv_sqrt2(T(M_SQRT1_2));
  // std = softplus(raw) + eps (as PyTorch's softplus kernel) and H = clean + z * std of row r into h; true if H has NaN
  const auto prepare = [&](int64_t r, T* h) {
    const T* clean = lp + r * 2 * e;
    const T* raw = clean + e;
    const T* zr = zp + r * e;
    T* sr = sp + r * e;
    V nan(T(0));
    each_vec<T>(e, [&](int64_t c, int64_t count) {
      const V a = load(raw + c, count);
      const V s = V::blendv(a.exp().log1p(), a, a > threshold) + veps;
      store(s, sr + c, count);
      const V hv = load(clean + c, count) + load(zr + c, count) * s;
      store(hv, h + c, count);
      nan = nan | (hv != hv);  // the lanes past count were loaded as 0: never NaN
    });
    return nan.zero_mask() != (1 << V::size()) - 1;
  };
  // the top-(k+1) of row r from its H, in best and idx
  const auto select_row = [&](int64_t r, const T* h, bool nan) {
    if (nan)
      select<T>(h, e, kk, best.data(), ip + r * kk, above<T>);
    else
      select_vec<T>(h, e, kk, best.data(), ip + r * kk);
  };
  // the k largest, u and P of row r from best and idx
  const auto finish = [&](int64_t r) {
    const T* clean = lp + r * 2 * e;
    const T* sr = sp + r * e;
    T* ur = up + r * e;
    T* pr = pp + r * e;
    const int64_t* idx = ip + r * kk;
    const T kth = best[k - 1], next = best[k];
    T total = 0;  // the gate: softmax over the k kept noisy logits (best[0] is their largest)
    for (int64_t j = 0; j < k; ++j) {
      tp[r * k + j] = best[j];
      total += (gp[r * k + j] = std::exp(best[j] - best[0]));
    }
    for (int64_t j = 0; j < k; ++j) gp[r * k + j] /= total;
    const V vkth(kth);
    each_vec<T>(e, [&](int64_t c, int64_t count) {
      store((load(clean + c, count) - vkth) / load(sr + c, count), ur + c, count);
    });
    for (int64_t j = 0; j < k; ++j) {
      const int64_t c = idx[j];
      ur[c] = ((clean[c] - kth) + (kth - next)) / sr[c];  // as noisy_gate.py: (clean - kth) + (kth - next)
    }
    each_vec<T>(e, [&](int64_t c, int64_t count) {  // P = Phi(u) as torch.special.ndtr: (1 + erf(u / sqrt 2)) / 2
      store((one + (load(ur + c, count) * inv_sqrt2).erf()) * half, pr + c, count);
    });
  };
  int64_t r = begin;
  if (kk <= 8 && L > 1) {  // L rows at a time, one per vector lane (select_lanes)
    for (; r + L <= end; r += L) {
      bool nan = false;
      for (int64_t l = 0; l < L; ++l) nan = prepare(r + l, hbuf.data() + l * e) || nan;
      if (nan) {  // a NaN in the block: each row on its own
        for (int64_t l = 0; l < L; ++l) {
          const T* h = hbuf.data() + l * e;
          bool row_nan = false;
          for (int64_t c = 0; c < e; ++c) row_nan = row_nan || std::isnan(h[c]);
          select_row(r + l, h, row_nan);
          finish(r + l);
        }
        continue;
      }
      for (int64_t l = 0; l < L; ++l)
        for (int64_t c = 0; c < e; ++c) ht[c * L + l] = hbuf[l * e + c];
      select_lanes<T>(ht.data(), e, kk, bv.data(), bi.data());
      for (int64_t l = 0; l < L; ++l) {
        int64_t* idx = ip + (r + l) * kk;
        for (int64_t j = 0; j < kk; ++j) {
          best[j] = bv[j * L + l];
          idx[j] = static_cast<int64_t>(bi[j * L + l]);
        }
        finish(r + l);
      }
    }
  }
  for (; r < end; ++r) {
    const bool nan = prepare(r, hbuf.data());
    select_row(r, hbuf.data(), nan);
    finish(r);
  }
}

template <typename T>
inline T sigmoid(T a) {
  return T(1) / (T(1) + std::exp(-a));
}

template <typename T>
void backward_rows(const T* lp, const T* zp, const T* sp, const T* up, const int64_t* ip, const T* gpp,
                   int64_t gp_stride, const T* gtp, const T* gatep, const T* ggp, int64_t e, int64_t k, T* gp,
                   int64_t begin, int64_t end) {
  using V = Vectorized<T>;
  const int64_t kk = k + 1;
  std::vector<T> sparse(kk);
  const V log_c(T(-0.5 * std::log(2 * M_PI))), minus_half(T(-0.5)), one(T(1)), zero(T(0));
  for (int64_t r = begin; r < end; ++r) {
    const T* raw = lp + r * 2 * e + e;
    const T* zr = zp + r * e;
    const T* sr = sp + r * e;
    const T* ur = up + r * e;
    const int64_t* idx = ip + r * kk;
    T* g_clean = gp + r * 2 * e;
    T* g_raw = g_clean + e;
    for (int64_t j = 0; j < kk; ++j) sparse[j] = (gtp && j < k) ? gtp[r * k + j] : T(0);
    if (ggp) {  // through the gate softmax: d top_j = gate_j (g_j - sum_i g_i gate_i)
      const T* gr = ggp + r * k;
      const T* ar = gatep + r * k;
      T dot = 0;
      for (int64_t j = 0; j < k; ++j) dot += gr[j] * ar[j];
      for (int64_t j = 0; j < k; ++j) sparse[j] += ar[j] * (gr[j] - dot);
    }
    if (gpp) {
      const T* gr = gpp + r * gp_stride;
      V acc(T(0));
      each_vec<T>(e, [&](int64_t c, int64_t count) {
        const V u = load(ur + c, count);
        // G = g_P * phi(u) / std, the density's constant folded in: exp(log c - u^2 / 2)
        const V g = (log_c + minus_half * u * u).exp() * load(gr + c, count) / load(sr + c, count);
        store(g, g_clean + c, count);
        // d std / d raw = sigmoid(raw) = 1 / (1 + exp(-raw)); dP/d std * g_P = -G * u
        const V a = load(raw + c, count);
        store(zero - g * u * (one / (one + (zero - a).exp())), g_raw + c, count);
        acc = acc + (count == V::size() ? g : V::set(zero, g, count));
      });
      T total = 0;
      T lanes[V::size()];
      acc.store(lanes);
      for (int64_t l = 0; l < V::size(); ++l) total += lanes[l];
      T g_in = 0;
      for (int64_t j = 0; j < k; ++j) g_in += g_clean[idx[j]];
      // the thresholds: the (k+1)-th largest is the threshold of the top k, the k-th of the rest
      sparse[k] -= g_in;
      sparse[k - 1] -= total - g_in;
    } else {
      std::fill(g_clean, g_clean + 2 * e, T(0));
    }
    for (int64_t j = 0; j < kk; ++j) {  // H = clean + z * std at the top k + 1: dH/d clean = 1, dH/d raw = z sigmoid(raw)
      const int64_t c = idx[j];
      g_clean[c] += sparse[j];
      g_raw[c] += sparse[j] * zr[c] * sigmoid(raw[c]);
    }
  }
}

void check_rows(const at::Tensor& t, const at::Tensor& like, int64_t n, int64_t cols, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 2 && t.is_contiguous() && t.scalar_type() == like.scalar_type() &&
                  t.size(0) == n && t.size(1) == cols,
              "noisy_gate: ", name, " must be a contiguous CPU (", n, ", ", cols, ") tensor of ", like.scalar_type());
}

}  // namespace

// Forward. logits2 (n, 2e) and z (n, e): contiguous CPU float32/float64; writes std, u and P (n, e), the k largest H
// (n, k), the k + 1 largest H's experts (n, k + 1) and the gate (n, k), the softmax of the k largest H.
void noisy_gate_forward(const at::Tensor& logits2, const at::Tensor& z, double eps, int64_t k, const at::Tensor& std_,
                        const at::Tensor& u, const at::Tensor& prob, const at::Tensor& top, const at::Tensor& idx,
                        const at::Tensor& gate) {
  const int64_t n = z.size(0), e = z.size(1);
  TORCH_CHECK(z.dim() == 2 && (z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble),
              "noisy_gate_forward: z must be a float32 or float64 (n, e) tensor");
  TORCH_CHECK(k >= 1 && k < e, "noisy_gate_forward: needs 1 <= k < e");
  check_rows(logits2, z, n, 2 * e, "logits2");
  check_rows(z, z, n, e, "z");
  for (const auto* t : {&std_, &u, &prob}) check_rows(*t, z, n, e, "std, u and P");
  check_rows(top, z, n, k, "top");
  check_rows(gate, z, n, k, "gate");
  TORCH_CHECK(idx.is_contiguous() && idx.scalar_type() == at::kLong && idx.dim() == 2 && idx.size(0) == n &&
                  idx.size(1) == k + 1,
              "noisy_gate_forward: idx must be a contiguous int64 (n, k + 1) tensor");
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "noisy_gate_forward", [&] {
    at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
      forward_rows<scalar_t>(logits2.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), scalar_t(eps), e, k,
                             std_.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), prob.data_ptr<scalar_t>(),
                             top.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), gate.data_ptr<scalar_t>(), begin, end);
    });
  });
}

// Backward: the gradient of logits2 (n, 2e) into grad, from the forward's logits2, z, std, u and idx and the upstream
// g_prob (n, e) with unit column stride (row stride e, or 0 for a broadcast row; undefined: zero), g_top (n, k)
// contiguous (undefined: zero) and g_gate (n, k) contiguous (undefined: zero) with the forward's gate.
void noisy_gate_backward(const at::Tensor& logits2, const at::Tensor& z, const at::Tensor& std_, const at::Tensor& u,
                         const at::Tensor& idx, const std::optional<at::Tensor>& g_prob,
                         const std::optional<at::Tensor>& g_top, const at::Tensor& gate,
                         const std::optional<at::Tensor>& g_gate, const at::Tensor& grad) {
  const int64_t n = z.size(0), e = z.size(1), k = idx.size(1) - 1;
  TORCH_CHECK(z.dim() == 2 && (z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble) && k >= 1 && k < e,
              "noisy_gate_backward: bad z or idx");
  check_rows(logits2, z, n, 2 * e, "logits2");
  check_rows(z, z, n, e, "z");
  check_rows(std_, z, n, e, "std");
  check_rows(u, z, n, e, "u");
  check_rows(grad, z, n, 2 * e, "grad");
  TORCH_CHECK(idx.is_contiguous() && idx.scalar_type() == at::kLong && idx.dim() == 2 && idx.size(0) == n,
              "noisy_gate_backward: idx must be a contiguous int64 (n, k + 1) tensor");
  if (g_prob)
    TORCH_CHECK(g_prob->scalar_type() == z.scalar_type() && g_prob->dim() == 2 && g_prob->size(0) == n &&
                    g_prob->size(1) == e && g_prob->stride(1) == 1 && (g_prob->stride(0) == e || g_prob->stride(0) == 0),
                "noisy_gate_backward: g_prob must be (n, e) with unit column stride and row stride e or 0");
  if (g_top) check_rows(*g_top, z, n, k, "g_top");
  check_rows(gate, z, n, k, "gate");
  if (g_gate) check_rows(*g_gate, z, n, k, "g_gate");
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "noisy_gate_backward", [&] {
    const scalar_t* gpp = g_prob ? g_prob->data_ptr<scalar_t>() : nullptr;
    const int64_t gp_stride = g_prob ? g_prob->stride(0) : 0;
    const scalar_t* gtp = g_top ? g_top->data_ptr<scalar_t>() : nullptr;
    const scalar_t* ggp = g_gate ? g_gate->data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
      backward_rows<scalar_t>(logits2.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), std_.data_ptr<scalar_t>(),
                              u.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), gpp, gp_stride, gtp,
                              gate.data_ptr<scalar_t>(), ggp, e, k,
                              grad.data_ptr<scalar_t>(), begin, end);
    });
  });
}

// (n,) the index of each row's largest entry of a contiguous (n, e) float32/float64 tensor, as torch.argmax(dim=-1):
// the first of equal maxima, a NaN counting as the largest (the first NaN).
at::Tensor row_argmax(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous() && x.size(1) > 0 &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "row_argmax: expected a contiguous CPU float32/float64 (n, e) tensor with e > 0");
  const int64_t n = x.size(0), e = x.size(1);
  at::Tensor out = at::empty({n}, x.options().dtype(at::kLong));
  int64_t* op = out.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "row_argmax", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    using V = Vectorized<scalar_t>;
    at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
      const V lowest(-std::numeric_limits<scalar_t>::infinity());
      scalar_t lanes[V::size()];
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = xp + r * e;
        V mx = lowest;  // the row's maximum, NaN if it holds one (at::vec::maximum propagates NaN)
        each_vec<scalar_t>(e, [&](int64_t c, int64_t count) {
          mx = at::vec::maximum(mx, count == V::size() ? V::loadu(row + c) : V::set(lowest, V::loadu(row + c, count), count));
        });
        mx.store(lanes);
        scalar_t m = lanes[0];
        for (int64_t l = 1; l < V::size(); ++l) m = above(lanes[l], m) ? lanes[l] : m;
        int64_t best = 0;  // the first entry equal to it (the first NaN)
        if (std::isnan(m))
          while (!std::isnan(row[best])) ++best;
        else
          while (row[best] != m) ++best;
        op[r] = best;
      }
    });
  });
  return out;
}

// The sum of v's lanes, through the aligned scratch `lanes` (whole-vector store, then scalar loads).
template <typename T>
inline T lane_sum(const Vectorized<T>& v, T* lanes) {
  v.store(lanes);
  T s = 0;
  for (int64_t l = 0; l < Vectorized<T>::size(); ++l) s += lanes[l];
  return s;
}

// The router's clean distribution and its per-token statistics in one pass per row, from logits (n, e) with rows
// `stride` apart (the clean half of the router's (n, 2e) matmul output): probs = softmax(logits) (n, e), top1 (n,)
// = probs.argmax(dim=-1) (torch.argmax's choice among equal or NaN values), lse (n,) = logsumexp(logits) and
// entropy (n,) = lse - sum_i p_i l_i clamped at 0 (losses.entropy_from_lse; 0 l = 0 at l = -inf), instead of a softmax, an argmax, two
// gathers and a dot product over (n, e).
void softmax_stats(const at::Tensor& logits, const at::Tensor& probs, const at::Tensor& top1, const at::Tensor& lse,
                   const at::Tensor& entropy) {
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 2 && logits.stride(1) == 1 && logits.size(1) > 0 &&
                  (logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble),
              "softmax_stats: expected CPU float32/float64 logits (n, e) with e > 0 and unit column stride");
  const int64_t n = logits.size(0), e = logits.size(1), stride = logits.stride(0);
  TORCH_CHECK(probs.is_contiguous() && probs.sizes() == logits.sizes() && probs.scalar_type() == logits.scalar_type() &&
                  top1.is_contiguous() && top1.numel() == n && top1.scalar_type() == at::kLong && lse.is_contiguous() &&
                  lse.numel() == n && lse.scalar_type() == logits.scalar_type() && entropy.is_contiguous() &&
                  entropy.numel() == n && entropy.scalar_type() == logits.scalar_type(),
              "softmax_stats: outputs do not match the logits");
  int64_t* tp = top1.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "softmax_stats", [&] {
    using T = scalar_t;
    using V = Vectorized<T>;
    const T* lp = logits.data_ptr<T>();
    T* pp = probs.data_ptr<T>();
    T* sp = lse.data_ptr<T>();
    T* hp = entropy.data_ptr<T>();
    at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
      const V lowest(-std::numeric_limits<T>::infinity());
      alignas(64) T lanes[V::size()];
      for (int64_t r = begin; r < end; ++r) {
        const T* row = lp + r * stride;
        T* prow = pp + r * e;
        V mx = lowest;  // NaN if the row holds one (at::vec::maximum propagates NaN)
        each_vec<T>(e, [&](int64_t c, int64_t count) {
          mx = at::vec::maximum(mx, count == V::size() ? V::loadu(row + c) : V::set(lowest, V::loadu(row + c, count), count));
        });
        mx.store(lanes);
        T m = lanes[0];
        for (int64_t l = 1; l < V::size(); ++l) m = above(lanes[l], m) ? lanes[l] : m;
        V sum(T(0)), dot(T(0));
        each_vec<T>(e, [&](int64_t c, int64_t count) {
          const V l = load(row + c, count);
          V t = (l - V(m)).exp();
          if (count < V::size()) t = V::set(V(T(0)), t, count);
          store(t, prow + c, count);
          sum = sum + t;
          dot = dot + V::blendv(V(T(0)), t * l, t != V(T(0)));  // p_i l_i = 0 where p_i = 0 (l_i = -inf)
        });
        const T s = lane_sum(sum, lanes), tl = lane_sum(dot, lanes);
        const T inv = T(1) / s;
        // The largest probability is exactly inv, at the largest logits (exp(0) = 1): top1 is the first entry equal to
        // inv (exp may round logits just below the maximum to 1 too, and torch.argmax of probs takes the first of
        // those). A NaN or infinite row makes inv NaN and every probability NaN: the first NaN is entry 0.
        int64_t best = std::isnan(inv) ? 0 : -1;
        each_vec<T>(e, [&](int64_t c, int64_t count) {
          const V p = load(prow + c, count) * V(inv);
          store(p, prow + c, count);
          if (best < 0) {
            const int hit = (p == V(inv)).zero_mask() ^ ((1 << V::size()) - 1);  // zero_mask: bit l set where lane l is 0
            const int live = count == V::size() ? hit : hit & ((1 << count) - 1);
            if (live) best = c + __builtin_ctz(live);
          }
        });
        tp[r] = best < 0 ? 0 : best;
        const T lse_r = m + std::log(s);
        sp[r] = lse_r;
        const T h = lse_r - tl * inv;
        hp[r] = h > T(0) || std::isnan(h) ? h : T(0);  // clamp_min(0), NaN stays NaN
      }
    });
  });
}
