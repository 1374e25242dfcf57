// The CPU expert kernel of moe_lens.moe.grouped_mlp (`_CPUGroupedMLPExt`): the per-group work of a
// gated two-layer ReLU MLP bank and the whole-array passes around it, fused where torch would
// make several passes. Every function runs with the GIL released; the row arrays are contiguous
// row-major CPU tensors of one floating type (float32 or float64), the indices int64 (checked).
//
// Rows are in expert order (the A assignments sorted by expert); group g owns rows
// [start, end). `rows`/`ptr` is a CSR index by token: the rows of token t are
// rows[ptr[t]:ptr[t+1]], so token-order sums run in parallel over tokens without a zero fill
// and without a scatter.
#include <torch/extension.h>

#include <atomic>
#include <memory>

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace {

using at::Tensor;

void check_rows(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 2 && t.is_contiguous(), name,
              ": expected a contiguous 2-D CPU tensor");
}

void check_index(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 1 && t.is_contiguous() && t.scalar_type() == at::kLong, name,
              ": expected a contiguous 1-D int64 CPU tensor");
}

void check_like(const Tensor& t, const Tensor& like, const char* name) {
  TORCH_CHECK(t.is_contiguous() && t.scalar_type() == like.scalar_type(), name, ": expected a contiguous ",
              like.scalar_type(), " tensor");
}

// y[t] = sum over the rows r of token t of gate[r] * z[r] (gate 1 when undefined); y is (n, d).
void combine_rows(const Tensor& z, const std::optional<Tensor>& gate, const Tensor& rows, const Tensor& ptr,
                  const Tensor& y) {
  check_rows(z, "z");
  check_rows(y, "y");
  check_like(y, z, "y");
  check_index(rows, "rows");
  check_index(ptr, "ptr");
  TORCH_CHECK(y.size(1) == z.size(1) && ptr.numel() == y.size(0) + 1 && rows.numel() == z.size(0),
              "combine_rows: shapes do not match");
  if (gate) check_like(*gate, z, "gate");
  const int64_t n = y.size(0), d = y.size(1);
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* pp = ptr.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "combine_rows", [&] {
    const scalar_t* zp = z.data_ptr<scalar_t>();
    const scalar_t* gp = gate ? gate->data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        scalar_t* out = yp + t * d;
        const int64_t i0 = pp[t], i1 = pp[t + 1];
        if (i0 == i1) {
          std::fill(out, out + d, scalar_t(0));
          continue;
        }
        const scalar_t* src = zp + rp[i0] * d;
        const scalar_t s0 = gp ? gp[rp[i0]] : scalar_t(1);
        for (int64_t c = 0; c < d; ++c) out[c] = s0 * src[c];
        for (int64_t i = i0 + 1; i < i1; ++i) {
          src = zp + rp[i] * d;
          const scalar_t s = gp ? gp[rp[i]] : scalar_t(1);
          for (int64_t c = 0; c < d; ++c) out[c] += s * src[c];
        }
      }
    });
  });
}

// The m rows src[i] (width d) of tokens tp[s + i] summed into out (n, d) as they are made, gate-weighted when gp is given:
// out[t] = g * row for a token's first row, out[t] = out[t] + g * row after, each token's row under a lock of its own
// (state[t]: 0 untouched, 1 locked, 2 written) as two threads may hold rows of the same token. For at most two rows
// per token this is the combine pass without the (A, d) array between: a + b = b + a exactly, so the order the two
// threads come in does not change a bit. fp-contract off keeps g * row and the sum apart (a fused g * row + out
// would round in the order of arrival). Tokens no row reached are zeroed by the caller (zero_untouched).
template <typename scalar_t>
__attribute__((optimize("fp-contract=off"))) void accumulate_rows(scalar_t* out, const scalar_t* src, const int64_t* tp,
                                                                   const scalar_t* gp, int64_t s, int64_t m, int64_t d,
                                                                   std::atomic<uint8_t>* state) {
  for (int64_t i = 0; i < m; ++i, src += d) {
    const int64_t t = tp[s + i];
    std::atomic<uint8_t>& st = state[t];
    uint8_t prev = st.load(std::memory_order_relaxed);
    while (prev == 1 || !st.compare_exchange_weak(prev, 1, std::memory_order_acquire, std::memory_order_relaxed))
      prev = st.load(std::memory_order_relaxed);
    scalar_t* row = out + t * d;
    const scalar_t g = gp ? gp[s + i] : scalar_t(1);
    if (prev == 0) {
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) row[c] = g * src[c];
    } else {
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) {
        const scalar_t v = g * src[c];
        row[c] = row[c] + v;
      }
    }
    st.store(2, std::memory_order_release);
  }
}

template <typename scalar_t>
void zero_untouched(scalar_t* out, const std::atomic<uint8_t>* state, int64_t n, int64_t d) {
  for (int64_t t = 0; t < n; ++t)
    if (state[t].load(std::memory_order_relaxed) == 0) std::fill(out + t * d, out + (t + 1) * d, scalar_t(0));
}

// The rows gathered by token are scattered over dy: the hardware prefetcher only starts within a row, so each row's
// cache lines are asked for kPrefetchRows rows ahead (backward gather 1.96 -> 1.37 ms a thread at n = 8192, d = 256,
// k = 2, e = 64 on the 2-core CI machine, where the matmuls' traffic has pushed dy out of the caches).
constexpr int64_t kPrefetchRows = 4;

template <typename scalar_t>
inline void prefetch_row(const scalar_t* row, int64_t d) {
#if defined(__GNUC__) || defined(__clang__)
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < d * int64_t(sizeof(scalar_t)); b += 64) __builtin_prefetch(p + b);
#endif
}

// One group's rows [s, s + m) of the upstream gradient gathered UNGATED into the scratch `out` (m, d):
// out[i] = dy[token[s + i]]; in the same pass, when wanted, db2 = sum_i gate[s + i] * out[i] (dbp, (d,)) and
// ds[s + i] = out[i] . b2 (dsp; the bias part of the gate's gradient, the rest is added in relu_back_dot).
template <typename scalar_t>
void gather_rows(const scalar_t* dyp, const int64_t* tp, const scalar_t* gp, const scalar_t* b2p, scalar_t* out,
                 scalar_t* dbp, scalar_t* dsp, int64_t s, int64_t m, int64_t d) {
  if (dbp) std::fill(dbp, dbp + d, scalar_t(0));
  for (int64_t i = 0; i < m; ++i, out += d) {
    const scalar_t* src = dyp + tp[s + i] * d;
    const scalar_t g = gp[s + i];
    if (i + kPrefetchRows < m) prefetch_row(dyp + tp[s + i + kPrefetchRows] * d, d);
    if (dsp) {
      scalar_t acc = 0;
      if (dbp) {
#pragma omp simd reduction(+ : acc)
        for (int64_t c = 0; c < d; ++c) {
          out[c] = src[c];
          dbp[c] += g * src[c];
          acc += src[c] * b2p[c];
        }
      } else {
#pragma omp simd reduction(+ : acc)
        for (int64_t c = 0; c < d; ++c) {
          out[c] = src[c];
          acc += src[c] * b2p[c];
        }
      }
      dsp[s + i] = acc;
    } else if (dbp) {
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) {
        out[c] = src[c];
        dbp[c] += g * src[c];
      }
    } else {
      std::copy(src, src + d, out);
    }
  }
}

// The rows of the largest listed group (rows [starts[i], ends[i])): what a per-thread scratch block must hold.
inline int64_t largest_group(const std::vector<int64_t>& starts, const std::vector<int64_t>& ends) {
  int64_t rows = 0;
  for (size_t i = 0; i < starts.size(); ++i) rows = std::max(rows, ends[i] - starts[i]);
  return rows;
}

// body(l, i) for every listed group i (rows [starts[i], ends[i])): in this thread (threads <= 1; l = 0), or on
// `threads` threads of ATen's pool (l the thread's slot), each taking the next group not yet taken, largest first,
// with its matmuls on that one thread (BLAS and ATen run single-threaded inside a parallel region). Taking groups as
// threads come free keeps both busy to the end when one runs slower (another process, a cache-cold group): paired
// against lists fixed in advance by rows, 1.024 and 1.035 at e = 64, d = 256, h = 128 on the 2-core CI machine.
// Every group writes only its own rows and gradient slices, and slot l runs on one thread, so per-slot scratch needs
// no lock; a group's results do not depend on the slot that ran it.
template <typename F>
void run_groups_on_threads(const std::vector<int64_t>& starts, const std::vector<int64_t>& ends, int64_t threads, const F& body) {
  if (threads <= 1 || starts.size() < 2) {
    for (size_t i = 0; i < starts.size(); ++i) body(int64_t{0}, i);
    return;
  }
  std::vector<size_t> order(starts.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return ends[a] - starts[a] > ends[b] - starts[b]; });
  std::atomic<size_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    at::NoGradGuard no_grad;  // grad mode is per thread
    for (int64_t l = begin; l < end; ++l)
      for (size_t j = next.fetch_add(1); j < order.size(); j = next.fetch_add(1)) body(l, order[j]);
  });
}

// Forward of the groups listed (ids, starts, ends): xs = x[token] (the group's rows gathered into expert order,
// xs is saved for backward), hidden = relu(xs W1 + b1), z = hidden W2 + b2, written straight into their rows; on
// `threads` threads of whole groups (run_groups_on_threads). Each group gathers its own rows right before its first addmm, on
// its thread, so the matmul reads them from that core's cache rather than from one whole-array gather pass.
void forward_groups_impl(const Tensor& x, const Tensor& token, const Tensor& xs, const Tensor& hidden, const Tensor* z,
                         const Tensor* gate, const Tensor* y, const Tensor& w1, const Tensor& b1, const Tensor& w2,
                         const Tensor& b2, const std::vector<int64_t>& ids, const std::vector<int64_t>& starts,
                         const std::vector<int64_t>& ends, int64_t threads) {
  check_rows(x, "x");
  check_rows(xs, "xs");
  check_like(xs, x, "xs");
  check_index(token, "token");
  TORCH_CHECK(xs.size(1) == x.size(1) && token.numel() == xs.size(0), "forward_groups: shapes do not match");
  const int64_t n = x.size(0), d = x.size(1);
  const int64_t* tp = token.data_ptr<int64_t>();
  for (int64_t r = 0; r < token.numel(); ++r)
    TORCH_CHECK_INDEX(tp[r] >= 0 && tp[r] < n, "forward_groups: token ", tp[r], " out of range [0, ", n, ")");
  if (y) {
    check_rows(*y, "y");
    check_like(*y, x, "y");
    check_like(*gate, x, "gate");
    TORCH_CHECK(y->sizes() == x.sizes() && gate->numel() == token.numel(), "forward_groups: y or gate do not match");
  }
  const int64_t rows = largest_group(starts, ends);  // each thread's z scratch (y given) holds it
  std::vector<Tensor> blocks(std::max<int64_t>(threads, 1));
  std::unique_ptr<std::atomic<uint8_t>[]> state(y ? new std::atomic<uint8_t>[n]() : nullptr);
  at::NoGradGuard no_grad;
  run_groups_on_threads(starts, ends, threads, [&](int64_t l, size_t i) {
    const int64_t g = ids[i], s = starts[i], m = ends[i] - starts[i];
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "forward_groups_gather", [&] {
      const scalar_t* xp = x.data_ptr<scalar_t>();
      scalar_t* out = xs.data_ptr<scalar_t>() + s * d;
      for (int64_t r = s; r < s + m; ++r, out += d) std::copy(xp + tp[r] * d, xp + tp[r] * d + d, out);
    });
    Tensor hg = hidden.narrow(0, s, m);
    if (y && !blocks[l].defined()) blocks[l] = at::empty({rows, d}, x.options());  // slot l's, touched on its thread
    Tensor zg = y ? blocks[l].narrow(0, 0, m) : z->narrow(0, s, m);
    at::addmm_out(hg, b1[g], xs.narrow(0, s, m), w1[g]);
    hg.relu_();
    at::addmm_out(zg, b2[g], hg, w2[g]);
    if (y)
      AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "forward_groups_combine", [&] {
        accumulate_rows<scalar_t>(y->data_ptr<scalar_t>(), zg.data_ptr<scalar_t>(), tp, gate->data_ptr<scalar_t>(), s,
                                  m, d, state.get());
      });
  });
  if (y)
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "forward_groups_zero", [&] {
      zero_untouched<scalar_t>(y->data_ptr<scalar_t>(), state.get(), n, d);
    });
}

// z (A, d) = each group's expert outputs, in expert order (combine_rows sums them by token).
void forward_groups(const Tensor& x, const Tensor& token, const Tensor& xs, const Tensor& hidden, const Tensor& z,
                    const Tensor& w1, const Tensor& b1, const Tensor& w2, const Tensor& b2,
                    const std::vector<int64_t>& ids, const std::vector<int64_t>& starts,
                    const std::vector<int64_t>& ends, int64_t threads) {
  forward_groups_impl(x, token, xs, hidden, &z, nullptr, nullptr, w1, b1, w2, b2, ids, starts, ends, threads);
}

// y (n, d) = sum over the rows r of token t of gate[r] * z[r], each group's outputs summed in as they are made
// (accumulate_rows; at most two rows per token, for a result that does not depend on the threads' timing).
void forward_groups_combined(const Tensor& x, const Tensor& token, const Tensor& xs, const Tensor& hidden,
                             const Tensor& gate, const Tensor& y, const Tensor& w1, const Tensor& b1, const Tensor& w2,
                             const Tensor& b2, const std::vector<int64_t>& ids, const std::vector<int64_t>& starts,
                             const std::vector<int64_t>& ends, int64_t threads) {
  forward_groups_impl(x, token, xs, hidden, nullptr, &gate, &y, w1, b1, w2, b2, ids, starts, ends, threads);
}

// One group's (m, q) rows: ds[r] += v[r] . h[r] (DS), then v[r] becomes u[r] = gate[r] * v[r] * [h[r] > 0] in place,
// and db1 = column sums of u (DB). gp and dsp point at the group's first row.
template <typename scalar_t, bool DS, bool DB>
void relu_back_dot_rows(scalar_t* vp, const scalar_t* hp, const scalar_t* gp, scalar_t* dsp, scalar_t* db, int64_t m,
                        int64_t q) {
  if (DB) std::fill(db, db + q, scalar_t(0));
  for (int64_t r = 0; r < m; ++r) {
    scalar_t* vr = vp + r * q;
    const scalar_t* hr = hp + r * q;
    const scalar_t g = gp[r];
    scalar_t acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t c = 0; c < q; ++c) {
      if (DS) acc += vr[c] * hr[c];
      const scalar_t u = hr[c] > 0 ? g * vr[c] : scalar_t(0);
      vr[c] = u;
      if (DB) db[c] += u;
    }
    if (DS) dsp[r] += acc;
  }
}

template <typename scalar_t>
void relu_back_dot(scalar_t* vp, const scalar_t* hp, const scalar_t* gp, scalar_t* dsp, scalar_t* db, int64_t m,
                   int64_t q) {
  if (dsp && db) relu_back_dot_rows<scalar_t, true, true>(vp, hp, gp, dsp, db, m, q);
  else if (dsp) relu_back_dot_rows<scalar_t, true, false>(vp, hp, gp, dsp, db, m, q);
  else if (db) relu_back_dot_rows<scalar_t, false, true>(vp, hp, gp, dsp, db, m, q);
  else relu_back_dot_rows<scalar_t, false, false>(vp, hp, gp, dsp, db, m, q);
}

// rows[r] *= scale[r] for the m rows of width d.
template <typename scalar_t>
void scale_rows(scalar_t* rows, const scalar_t* scale, int64_t m, int64_t d) {
  for (int64_t r = 0; r < m; ++r, rows += d) {
    const scalar_t sr = scale[r];
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) rows[c] *= sr;
  }
}

// Backward of the groups listed, without the forward's expert outputs z. Each group gathers its rows of the upstream
// gradient UNGATED, dyg[r] = dy[token[r]], into a scratch block of its thread (allocated once per thread per call),
// on its thread right before its first matmul, with db2 and the bias part of the gate's gradient in the same pass
// (gather_rows); then, as z = hidden W2 + b2 makes dy . z = (dy W2^T) . hidden + dy . b2,
//   v = dyg W2^T   ds = rowsum(v * hidden) + dyg b2   u = gate * v * [hidden > 0]   db1 = colsum u  (relu_back_dot)
//   db2 = colsum(gate * dyg)   dW2 = hidden^T (gate * dyg)  (dyg scaled in place)   dW1 = xs^T u   dxs = u W1^T
// Undefined outputs are skipped. On `threads` threads of whole groups (run_groups_on_threads).
using Opt = std::optional<Tensor>;
void backward_groups_impl(const Tensor& dy, const Tensor& token, const Tensor& gate, const Tensor& b2, const Opt& ds,
                          const Tensor& xs, const Tensor& hidden, const Opt& dxs, const Tensor* dx, const Tensor& w1,
                          const Tensor& w2, const Opt& dw1, const Opt& db1, const Opt& dw2, const Opt& db2,
                          const std::vector<int64_t>& ids, const std::vector<int64_t>& starts,
                          const std::vector<int64_t>& ends, int64_t threads) {
  check_rows(dy, "dy");
  check_rows(hidden, "hidden");
  check_rows(b2, "b2");
  check_like(hidden, dy, "hidden");
  check_like(b2, dy, "b2");
  check_like(gate, dy, "gate");
  check_index(token, "token");
  const int64_t a = token.numel(), n = dy.size(0), d = dy.size(1), q = hidden.size(1);
  TORCH_CHECK(gate.numel() == a && hidden.size(0) == a && b2.size(1) == d && w2.dim() == 3 && w2.size(1) == q &&
                  w2.size(2) == d,
              "backward_groups: shapes do not match");
  if (ds) {
    check_like(*ds, dy, "ds");
    TORCH_CHECK(ds->numel() == a, "backward_groups: ds has ", ds->numel(), " elements, not ", a);
  }
  if (dxs) {
    check_rows(*dxs, "dxs");
    check_like(*dxs, dy, "dxs");
    TORCH_CHECK(dxs->size(0) == a && dxs->size(1) == d, "backward_groups: dxs is not (A, d)");
  }
  for (size_t i = 0; i < ids.size(); ++i)
    TORCH_CHECK(ids[i] >= 0 && ids[i] < b2.size(0) && starts[i] >= 0 && starts[i] <= ends[i] && ends[i] <= a,
                "backward_groups: group ", ids[i], " rows [", starts[i], ", ", ends[i], ") out of range");
  const int64_t* tp = token.data_ptr<int64_t>();
  for (int64_t r = 0; r < a; ++r)
    TORCH_CHECK_INDEX(tp[r] >= 0 && tp[r] < n, "backward_groups: token ", tp[r], " out of range [0, ", n, ")");
  if (dx) {
    check_rows(*dx, "dx");
    check_like(*dx, dy, "dx");
    TORCH_CHECK(dx->sizes() == dy.sizes(), "backward_groups: dx is not (n, d)");
  }
  std::unique_ptr<std::atomic<uint8_t>[]> state(dx ? new std::atomic<uint8_t>[n]() : nullptr);
  const bool need_v = ds || db1 || dw1 || dxs || dx;  // u = gate * (dy W2^T) * [hidden > 0] feeds these
  const int64_t rows = largest_group(starts, ends);  // every scratch block holds it
  std::vector<Tensor> dyg_blocks(std::max<int64_t>(threads, 1)), v_blocks(dyg_blocks.size());  // one per thread slot
  at::NoGradGuard no_grad;
  run_groups_on_threads(starts, ends, threads, [&](int64_t l, size_t i) {
    const int64_t g = ids[i], s = starts[i], m = ends[i] - starts[i];
    if (!dyg_blocks[l].defined()) {  // slot l runs on one thread: its scratch, touched first there
      dyg_blocks[l] = at::empty({rows, d}, dy.options());
      if (need_v) v_blocks[l] = at::empty({rows, q}, dy.options());
    }
    Tensor dyg = dyg_blocks[l].narrow(0, 0, m);  // (m, d) ungated dy[token]
    Tensor hg = hidden.narrow(0, s, m);
    AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "backward_groups", [&] {
      const scalar_t* gp = gate.data_ptr<scalar_t>();
      scalar_t* dsp = ds ? ds->data_ptr<scalar_t>() : nullptr;
      gather_rows<scalar_t>(dy.data_ptr<scalar_t>(), tp, gp, b2.data_ptr<scalar_t>() + g * d, dyg.data_ptr<scalar_t>(),
                            db2 ? (*db2)[g].data_ptr<scalar_t>() : nullptr, dsp, s, m, d);
      if (need_v) {
        Tensor v = v_blocks[l].narrow(0, 0, m);  // (m, h)
        at::mm_out(v, dyg, w2[g].t());
        relu_back_dot<scalar_t>(v.data_ptr<scalar_t>(), hg.data_ptr<scalar_t>(), gp + s, dsp ? dsp + s : nullptr,
                                db1 ? (*db1)[g].data_ptr<scalar_t>() : nullptr, m, q);  // v is u now
      }
      if (dw2) {
        scale_rows<scalar_t>(dyg.data_ptr<scalar_t>(), gp + s, m, d);  // gate * dyg, in place
        Tensor dw2g = (*dw2)[g];
        at::mm_out(dw2g, hg.t(), dyg);
      }
    });
    if (!need_v) return;
    Tensor u = v_blocks[l].narrow(0, 0, m);
    if (dw1) {
      Tensor out = (*dw1)[g];
      at::mm_out(out, xs.narrow(0, s, m).t(), u);
    }
    if (dxs) {
      Tensor out = dxs->narrow(0, s, m);
      at::mm_out(out, u, w1[g].t());
    }
    if (dx) {  // the group's rows of dx into the dy block (done with: dW2 is made), summed into dx by token
      at::mm_out(dyg, u, w1[g].t());
      AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "backward_groups_combine", [&] {
        accumulate_rows<scalar_t>(dx->data_ptr<scalar_t>(), dyg.data_ptr<scalar_t>(), tp, nullptr, s, m, d,
                                  state.get());
      });
    }
  });
  if (dx)
    AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "backward_groups_zero", [&] {
      zero_untouched<scalar_t>(dx->data_ptr<scalar_t>(), state.get(), n, d);
    });
}

// dxs (A, d): the rows' x gradients in expert order (combine_rows sums them by token).
void backward_groups(const Tensor& dy, const Tensor& token, const Tensor& gate, const Tensor& b2, const Opt& ds,
                     const Tensor& xs, const Tensor& hidden, const Opt& dxs, const Tensor& w1, const Tensor& w2,
                     const Opt& dw1, const Opt& db1, const Opt& dw2, const Opt& db2, const std::vector<int64_t>& ids,
                     const std::vector<int64_t>& starts, const std::vector<int64_t>& ends, int64_t threads) {
  backward_groups_impl(dy, token, gate, b2, ds, xs, hidden, dxs, nullptr, w1, w2, dw1, db1, dw2, db2, ids, starts, ends,
                       threads);
}

// dx (n, d) = the x gradient by token, each group's rows summed in as they are made (accumulate_rows; at most two
// rows per token).
void backward_groups_combined(const Tensor& dy, const Tensor& token, const Tensor& gate, const Tensor& b2,
                              const Opt& ds, const Tensor& xs, const Tensor& hidden, const Tensor& dx, const Tensor& w1,
                              const Tensor& w2, const Opt& dw1, const Opt& db1, const Opt& dw2, const Opt& db2,
                              const std::vector<int64_t>& ids, const std::vector<int64_t>& starts,
                              const std::vector<int64_t>& ends, int64_t threads) {
  backward_groups_impl(dy, token, gate, b2, ds, xs, hidden, std::nullopt, &dx, w1, w2, dw1, db1, dw2, db2, ids, starts,
                       ends, threads);
}

// The dispatch plan of token-major assignments (the slot routers': token[i] = i / s, s = A / n per token) by a
// stable counting sort on the expert id, O(A + e): order (A,) = expert.argsort(stable=True) (a counting sort is
// stable, so the same permutation), sorted_token (A,) = token[order], counts (e,) = bincount(expert, minlength=e),
// rows (A,) the inverse permutation (rows[i] = where assignment i went; assignment i is token i / s's slot i % s).
// An empty list when the assignments are not token-major (expert_choice): the caller sorts them another way.
// An expert id outside [0, e) raises IndexError (index_add in the argsort path raised one too).
std::vector<Tensor> token_major_plan(const Tensor& token, const Tensor& expert, int64_t n, int64_t e) {
  check_index(token, "token");
  check_index(expert, "expert");
  const int64_t a = expert.numel();
  TORCH_CHECK(token.numel() == a && n >= 0 && e > 0, "token_major_plan: shapes do not match");
  if (n == 0 || a == 0 || a % n != 0) return {};
  const int64_t s = a / n;
  const int64_t* tp = token.data_ptr<int64_t>();
  const int64_t* ep = expert.data_ptr<int64_t>();
  for (int64_t t = 0, i = 0; t < n; ++t)
    for (int64_t j = 0; j < s; ++j, ++i)
      if (tp[i] != t) return {};
  Tensor counts = at::zeros({e}, expert.options());
  int64_t* cp = counts.data_ptr<int64_t>();
  for (int64_t i = 0; i < a; ++i) {
    TORCH_CHECK_INDEX(ep[i] >= 0 && ep[i] < e, "token_major_plan: expert id ", ep[i], " of assignment ", i,
                      " out of range [0, ", e, ")");
    ++cp[ep[i]];
  }
  std::vector<int64_t> next(e);  // the next free row of each expert's group
  for (int64_t g = 0, start = 0; g < e; ++g) {
    next[g] = start;
    start += cp[g];
  }
  Tensor order = at::empty({a}, expert.options()), sorted_token = at::empty({a}, expert.options());
  Tensor rows = at::empty({a}, expert.options());
  int64_t* op = order.data_ptr<int64_t>();
  int64_t* sp = sorted_token.data_ptr<int64_t>();
  int64_t* rp = rows.data_ptr<int64_t>();
  for (int64_t t = 0, i = 0; t < n; ++t)
    for (int64_t j = 0; j < s; ++j, ++i) {
      const int64_t r = next[ep[i]]++;
      op[r] = i;
      sp[r] = t;
      rp[i] = r;
    }
  return {order, sorted_token, counts, rows};
}

// How many distinct threads one at::parallel_for over 64 items (grain 1) ran on: at::get_num_threads() when the
// module was compiled with OpenMP, 1 when not (at::parallel_for is a header template: without OpenMP at compile
// time it runs serially). tests/test_grouped_cpu.py checks it.
int64_t parallel_for_threads() {
  std::vector<int> used(64, -1);
  at::parallel_for(0, 64, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) used[i] = at::get_thread_num();
  });
  std::sort(used.begin(), used.end());
  return std::unique(used.begin(), used.end()) - used.begin();
}

}  // namespace

// csrc/noisy_gate.cpp: the noisy top-k gate's forward and backward, built into the same module.
void noisy_gate_forward(const at::Tensor& logits2, const at::Tensor& z, double eps, int64_t k, const at::Tensor& std_,
                        const at::Tensor& u, const at::Tensor& prob, const at::Tensor& top, const at::Tensor& idx,
                        const at::Tensor& gate);
void noisy_gate_backward(const at::Tensor& logits2, const at::Tensor& z, const at::Tensor& std_, const at::Tensor& u,
                         const at::Tensor& idx, const std::optional<at::Tensor>& g_prob,
                         const std::optional<at::Tensor>& g_top, const at::Tensor& gate,
                         const std::optional<at::Tensor>& g_gate, const at::Tensor& grad);
at::Tensor row_argmax(const at::Tensor& x);
void softmax_stats(const at::Tensor& logits, const at::Tensor& probs, const at::Tensor& top1, const at::Tensor& lse,
                   const at::Tensor& entropy);
// csrc/normal.cpp: torch.randn bit for bit, the uniforms in whole mt19937 states, Box-Muller on ATen's threads.
void randn_fill(const at::Tensor& out, const std::optional<at::Generator>& generator);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using rg = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("combine_rows", &combine_rows, rg());
  m.def("forward_groups", &forward_groups, rg());
  m.def("forward_groups_combined", &forward_groups_combined, rg());
  m.def("backward_groups", &backward_groups, rg());
  m.def("backward_groups_combined", &backward_groups_combined, rg());
  m.def("token_major_plan", &token_major_plan, rg());
  m.def("noisy_gate_forward", &noisy_gate_forward, rg());
  m.def("noisy_gate_backward", &noisy_gate_backward, rg());
  m.def("row_argmax", &row_argmax, rg());
  m.def("softmax_stats", &softmax_stats, rg());
  m.def("randn_fill", &randn_fill, rg());
  m.def("parallel_for_threads", &parallel_for_threads, rg());
}
