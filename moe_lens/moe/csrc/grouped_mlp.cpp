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

// Rows [begin, end): dz[r] = gate[r] * dy[token[r]] and, when ds is wanted (dsp), ds[r] = dy[token[r]] . z[r]
// (the gate's gradient: y = sum gate * z, z the ungated expert output).
template <typename scalar_t>
void gather_scale_dot_rows(const scalar_t* dyp, const int64_t* tp, const scalar_t* gp, const scalar_t* zp,
                           scalar_t* dzp, scalar_t* dsp, int64_t begin, int64_t end, int64_t d) {
  for (int64_t r = begin; r < end; ++r) {
    const scalar_t* src = dyp + tp[r] * d;
    scalar_t* out = dzp + r * d;
    const scalar_t s = gp[r];
    if (dsp) {
      const scalar_t* zr = zp + r * d;
      scalar_t acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t c = 0; c < d; ++c) {
        out[c] = s * src[c];
        acc += src[c] * zr[c];
      }
      dsp[r] = acc;
    } else {
      for (int64_t c = 0; c < d; ++c) out[c] = s * src[c];
    }
  }
}

// The listed groups i = 0 .. size-1 (rows [starts[i], ends[i])) split into `threads` lists of about equal rows:
// each group, largest first, goes to the list with the fewest rows so far.
std::vector<std::vector<size_t>> balance(const std::vector<int64_t>& starts, const std::vector<int64_t>& ends,
                                         int64_t threads) {
  std::vector<size_t> order(starts.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return ends[a] - starts[a] > ends[b] - starts[b]; });
  std::vector<std::vector<size_t>> lists(threads);
  std::vector<int64_t> rows(threads, 0);
  for (size_t i : order) {
    const size_t j = std::min_element(rows.begin(), rows.end()) - rows.begin();
    lists[j].push_back(i);
    rows[j] += ends[i] - starts[i];
  }
  return lists;
}

// body(i) for every listed group: in this thread (threads <= 1), or on `threads` threads of ATen's pool, each
// running whole groups of its list (`balance`) with its matmuls on that one thread (BLAS and ATen run
// single-threaded inside a parallel region). Every group writes only its own rows and gradient slices.
template <typename F>
void run_lists(const std::vector<int64_t>& starts, const std::vector<int64_t>& ends, int64_t threads, const F& body) {
  if (threads <= 1 || starts.size() < 2) {
    for (size_t i = 0; i < starts.size(); ++i) body(i);
    return;
  }
  const auto lists = balance(starts, ends, threads);
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    at::NoGradGuard no_grad;  // grad mode is per thread
    for (int64_t l = begin; l < end; ++l)
      for (size_t i : lists[l]) body(i);
  });
}

// Forward of the groups listed (ids, starts, ends): xs = x[token] (the group's rows gathered into expert order,
// xs is saved for backward), hidden = relu(xs W1 + b1), z = hidden W2 + b2, written straight into their rows; on
// `threads` threads of whole groups (run_lists). Each group gathers its own rows right before its first addmm, on
// its thread, so the matmul reads them from that core's cache rather than from one whole-array gather pass.
void forward_groups(const Tensor& x, const Tensor& token, const Tensor& xs, const Tensor& hidden, const Tensor& z,
                    const Tensor& w1, const Tensor& b1, const Tensor& w2, const Tensor& b2,
                    const std::vector<int64_t>& ids, const std::vector<int64_t>& starts,
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
  at::NoGradGuard no_grad;
  run_lists(starts, ends, threads, [&](size_t i) {
    const int64_t g = ids[i], s = starts[i], m = ends[i] - starts[i];
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "forward_groups_gather", [&] {
      const scalar_t* xp = x.data_ptr<scalar_t>();
      scalar_t* out = xs.data_ptr<scalar_t>() + s * d;
      for (int64_t r = s; r < s + m; ++r, out += d) std::copy(xp + tp[r] * d, xp + tp[r] * d + d, out);
    });
    Tensor hg = hidden.narrow(0, s, m);
    Tensor zg = z.narrow(0, s, m);
    at::addmm_out(hg, b1[g], xs.narrow(0, s, m), w1[g]);
    hg.relu_();
    at::addmm_out(zg, b2[g], hg, w2[g]);
  });
}

// u *= [h > 0] in place, and db1 = column sums of the result when db1 is defined. u, h: (m, q).
template <typename scalar_t>
void relu_back_colsum(scalar_t* up, const scalar_t* hp, scalar_t* db, int64_t m, int64_t q) {
  if (db) std::fill(db, db + q, scalar_t(0));
  for (int64_t r = 0; r < m; ++r) {
    scalar_t* ur = up + r * q;
    const scalar_t* hr = hp + r * q;
    if (db) {
      for (int64_t c = 0; c < q; ++c) {
        const scalar_t v = hr[c] > 0 ? ur[c] : scalar_t(0);
        ur[c] = v;
        db[c] += v;
      }
    } else {
      for (int64_t c = 0; c < q; ++c) ur[c] = hr[c] > 0 ? ur[c] : scalar_t(0);
    }
  }
}

// Backward of the groups listed. Each group first gathers its rows of the upstream gradient into expert order,
// on its thread right before its first matmul (which then reads them from cache), with the gate and the gate's
// gradient fused in: dz[r] = gate[r] * dy[token[r]], ds[r] = dy[token[r]] . z[r] (gather_scale_dot_rows); then
//   dpre = (dz W2^T) * [hidden > 0]   dW2 = hidden^T dz   db2 = colsum dz
//   dW1 = xs^T dpre   db1 = colsum dpre   dxs = dpre W1^T
// Undefined outputs are skipped. dxs may be dz itself: a group's dxs rows are written last, after
// its dz rows have been read for the last time. On `threads` threads of whole groups (run_lists).
using Opt = std::optional<Tensor>;
void backward_groups(const Tensor& dy, const Tensor& token, const Tensor& gate, const Tensor& z, const Tensor& dz,
                     const Opt& ds, const Tensor& xs, const Tensor& hidden, const Opt& dxs, const Tensor& w1,
                     const Tensor& w2, const Opt& dw1, const Opt& db1, const Opt& dw2, const Opt& db2,
                     const std::vector<int64_t>& ids, const std::vector<int64_t>& starts,
                     const std::vector<int64_t>& ends, int64_t threads) {
  check_rows(dy, "dy");
  check_rows(dz, "dz");
  check_rows(z, "z");
  check_like(dz, dy, "dz");
  check_like(z, dy, "z");
  check_like(gate, dy, "gate");
  check_index(token, "token");
  TORCH_CHECK(dz.sizes() == z.sizes() && dy.size(1) == dz.size(1) && token.numel() == dz.size(0) &&
                  gate.numel() == dz.size(0),
              "backward_groups: shapes do not match");
  if (ds) check_like(*ds, dy, "ds");
  const int64_t n = dy.size(0), d = dy.size(1);
  const int64_t* tp = token.data_ptr<int64_t>();
  for (int64_t r = 0; r < token.numel(); ++r)
    TORCH_CHECK_INDEX(tp[r] >= 0 && tp[r] < n, "backward_groups: token ", tp[r], " out of range [0, ", n, ")");
  at::NoGradGuard no_grad;
  run_lists(starts, ends, threads, [&](size_t i) {
    const int64_t g = ids[i], s = starts[i], m = ends[i] - starts[i];
    AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "gather_scale_dot", [&] {
      gather_scale_dot_rows<scalar_t>(dy.data_ptr<scalar_t>(), tp, gate.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(),
                                      dz.data_ptr<scalar_t>(), ds ? ds->data_ptr<scalar_t>() : nullptr, s, s + m, d);
    });
    Tensor dzg = dz.narrow(0, s, m);
    Tensor hg = hidden.narrow(0, s, m);
    Tensor u = at::mm(dzg, w2[g].t());  // (m, h): gate * dy W2^T
    if (dw2) {
      Tensor out = (*dw2)[g];
      at::mm_out(out, hg.t(), dzg);
    }
    if (db2) {
      Tensor out = (*db2)[g];
      at::sum_out(out, dzg, 0);
    }
    AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "relu_back_colsum", [&] {
      relu_back_colsum<scalar_t>(u.data_ptr<scalar_t>(), hg.data_ptr<scalar_t>(),
                                 db1 ? (*db1)[g].data_ptr<scalar_t>() : nullptr, m, u.size(1));
    });
    if (dw1) {
      Tensor out = (*dw1)[g];
      at::mm_out(out, xs.narrow(0, s, m).t(), u);
    }
    if (dxs) {
      Tensor out = dxs->narrow(0, s, m);
      at::mm_out(out, u, w1[g].t());
    }
  });
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using rg = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("combine_rows", &combine_rows, rg());
  m.def("forward_groups", &forward_groups, rg());
  m.def("backward_groups", &backward_groups, rg());
  m.def("token_major_plan", &token_major_plan, rg());
  m.def("noisy_gate_forward", &noisy_gate_forward, rg());
  m.def("noisy_gate_backward", &noisy_gate_backward, rg());
  m.def("row_argmax", &row_argmax, rg());
  m.def("parallel_for_threads", &parallel_for_threads, rg());
}
