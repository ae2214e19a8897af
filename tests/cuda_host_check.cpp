// Host-side check of the CUDA kernels' element loops and chunk table, without a GPU.
//
// csrc/cuda/elementwise.h's per-thread routines are __host__ __device__; no element is shared
// between threads, so running threads 0 .. nthreads-1 one after the other on the CPU gives
// exactly what the kernel's threads write. This program checks, for float / half / bfloat16,
// aligned (vector path) and misaligned (scalar path) buffers and many lengths:
// - update: every element is updated exactly once and bitwise as adai::update does it element
//   by element (with g = grad * grad_mul), nothing outside the chunk is touched, the
//   per-thread sums add up; a skipped step writes nothing; v_sum's per-thread sums equal
//   update's bitwise (whatever path each takes);
// - stats: each thread's four sums (adai_math.h's StatsSum: g^2, (g + l2 theta)^2, g theta,
//   theta^2, g unscaled) are bitwise adai_math.h's element values added in the canonical
//   order, equal on the vector and scalar paths, and add up exactly over threads; a tensor's
//   share of the statistics row (stats_tensor_row);
// - update_args: the rows summed in row order, adai::globals, the skip conditions, the
//   gradient multiplier and the learning rate from lr_tensor;
// and it checks the chunk table (multi_tensor.h) against a linear search. Built and run by
// tests/test_cuda_build.py with g++; prints "OK" and exits 0 on success.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "cuda/elementwise.h"
#include "cuda/multi_tensor.h"

using adai::Consts;
using namespace adai;
using namespace adai::cuda;

static int g_failures = 0;

#define CHECK(cond, ...)                                         \
  do {                                                           \
    if (!(cond)) {                                               \
      if (++g_failures <= 20) {                                  \
        std::printf("FAIL %s:%d: ", __FILE__, __LINE__);         \
        std::printf(__VA_ARGS__);                                \
        std::printf("\n");                                       \
      }                                                          \
    }                                                            \
  } while (0)

// A buffer of `n` elements of U starting `offset` elements after a 64-byte boundary, with
// kGuard guard elements on both sides.
template <typename U>
struct Buf {
  static constexpr int kGuard = 16;
  std::vector<unsigned char> raw;
  U* data;
  int64_t n;
  Buf(int64_t n_, int offset) : raw(sizeof(U) * (n_ + 2 * kGuard + 64) + 128), n(n_) {
    auto addr = reinterpret_cast<std::uintptr_t>(raw.data());
    addr = (addr + 63) & ~static_cast<std::uintptr_t>(63);
    data = reinterpret_cast<U*>(addr) + kGuard + offset;
  }
  U* begin_guard() { return data - kGuard; }
  int64_t span() const { return n + 2 * kGuard; }
};

template <typename U>
bool same_bytes(const Buf<U>& a, const Buf<U>& b) {
  return std::memcmp(a.data - Buf<U>::kGuard, b.data - Buf<U>::kGuard,
                     sizeof(U) * (a.n + 2 * Buf<U>::kGuard)) == 0;
}

template <typename U>
void copy_buf(Buf<U>& dst, const Buf<U>& src) {
  std::memcpy(dst.data - Buf<U>::kGuard, src.data - Buf<U>::kGuard,
              sizeof(U) * (src.n + 2 * Buf<U>::kGuard));
}

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

template <typename T>
const char* type_name() {
  if (sizeof(T) == 4) return "float";
  return std::is_same<T, c10::Half>::value ? "half" : "bfloat16";
}

// UpdateArgs as a launch would derive them, without the rows: the given multiplier, inv_vbar.
UpdateArgs make_args(const Consts& c, float grad_mul, float inv_vbar, bool skip = false) {
  UpdateArgs a;
  a.c = c;
  a.grad_mul = grad_mul;
  a.inv_vbar = inv_vbar;
  a.skip = skip;
  return a;
}

// A skipped step writes nothing (and sums nothing), on either path.
template <typename T>
void check_skipped_update(Buf<T>& p, Buf<T>& g, Buf<float>& m, Buf<float>& v, Buf<float>& b,
                          int nthreads, bool aligned, float inv_bc2, const UpdateArgs& skip,
                          int offset) {
  const int64_t len = p.n;
  Buf<T> p0(len, offset);
  Buf<float> m0(len, offset), v0(len, offset), b0(len, offset);
  copy_buf(p0, p); copy_buf(m0, m); copy_buf(v0, v); copy_buf(b0, b);
  float total = 0.0f;
  for (int tid = 0; tid < nthreads; ++tid) {
    total += update_thread<T>(tid, nthreads, p.data, g.data, m.data, v.data, b.data, len,
                              aligned, inv_bc2, skip);
  }
  CHECK(total == 0.0f && same_bytes(p, p0) && same_bytes(m, m0) && same_bytes(v, v0) &&
            same_bytes(b, b0),
        "update<%s> len=%lld offset=%d: a skipped step wrote", type_name<T>(), (long long)len,
        offset);
}

// v_sum over the new v, on either path, gives every thread's sum of update bitwise.
void check_v_sum_matches_update(const Buf<float>& v, const std::vector<float>& per_thread,
                                const char* tn, int offset) {
  const int nthreads = static_cast<int>(per_thread.size());
  for (bool v_aligned : {aligned16(v.data), false}) {
    bool same = true;
    for (int tid = 0; tid < nthreads; ++tid) {
      const float s = v_sum_thread(tid, nthreads, v.data, v.n, v_aligned);
      same = same && std::memcmp(&s, &per_thread[tid], sizeof(float)) == 0;
    }
    CHECK(same, "v_sum<%s> len=%lld offset=%d threads=%d aligned=%d: differs from update's",
          tn, (long long)v.n, offset, nthreads, (int)v_aligned);
  }
}

template <typename T>
void check_update(int64_t len, int offset, int nthreads, const Consts& c, float grad_mul,
                  uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> unit(0.01f, 1.0f);
  Buf<T> p(len, offset), g(len, offset);
  Buf<float> m(len, offset), v(len, offset), b(len, offset);
  for (int64_t e = -Buf<T>::kGuard; e < len + Buf<T>::kGuard; ++e) {
    p.data[e] = static_cast<T>(normal(rng));
    g.data[e] = static_cast<T>(normal(rng));
    m.data[e] = 0.1f * normal(rng);
    v.data[e] = unit(rng);
    b.data[e] = unit(rng);
  }
  Buf<T> pe(len, offset), ge(len, offset);
  Buf<float> me(len, offset), ve(len, offset), be(len, offset);
  copy_buf(pe, p); copy_buf(ge, g); copy_buf(me, m); copy_buf(ve, v); copy_buf(be, b);

  const float inv_bc2 = static_cast<float>(1.0 / adai::bias_correction2(0.99, 3.0));
  const float inv_vbar = 1.7f;
  double v_expected = 0.0;
  for (int64_t e = 0; e < len; ++e) {
    float th = static_cast<float>(pe.data[e]);
    v_expected += adai::update(th, static_cast<float>(ge.data[e]) * grad_mul, me.data[e],
                               ve.data[e], be.data[e], inv_bc2, inv_vbar, c);
    pe.data[e] = static_cast<T>(th);
  }

  const bool aligned = aligned16(p.data) && aligned16(g.data) && aligned16(m.data) &&
                       aligned16(v.data) && aligned16(b.data);
  const char* tn = type_name<T>();
  check_skipped_update(p, g, m, v, b, nthreads, aligned, inv_bc2,
                       make_args(c, grad_mul, inv_vbar, /*skip=*/true), offset);
  const UpdateArgs args = make_args(c, grad_mul, inv_vbar);
  double v_sum = 0.0;
  std::vector<float> per_thread(nthreads);
  for (int tid = 0; tid < nthreads; ++tid) {
    per_thread[tid] = update_thread<T>(tid, nthreads, p.data, g.data, m.data, v.data, b.data,
                                       len, aligned, inv_bc2, args);
    v_sum += per_thread[tid];
  }
  check_v_sum_matches_update(v, per_thread, tn, offset);
  CHECK(same_bytes(p, pe), "update<%s> len=%lld offset=%d threads=%d mul=%g: params differ",
        tn, (long long)len, offset, nthreads, grad_mul);
  CHECK(same_bytes(g, ge), "update<%s> len=%lld offset=%d: grads were written", tn,
        (long long)len, offset);
  CHECK(same_bytes(m, me) && same_bytes(v, ve) && same_bytes(b, be),
        "update<%s> len=%lld offset=%d threads=%d mul=%g: states differ", tn, (long long)len,
        offset, nthreads, grad_mul);
  CHECK(std::fabs(v_sum - v_expected) <= 1e-5 * std::fabs(v_expected) + 1e-30,
        "update<%s> len=%lld: v sum %.9g, expected %.9g", tn, (long long)len, v_sum,
        v_expected);
}

// Thread tid's four sums as adai_math.h gives them element by element, added in the
// canonical order (groups tid, tid + nthreads, ... in increasing element order).
template <typename T, bool kL2>
StatsSums canonical_stats(int tid, int nthreads, const T* g, const T* p, int64_t len,
                          float inv_scale, const Consts& c) {
  StatsSums s = {{0.0f, 0.0f, 0.0f, 0.0f}};
  for (int64_t q = tid; q * kGroup < len; q += nthreads) {
    for (int64_t e = q * kGroup; e < len && e < (q + 1) * kGroup; ++e) {
      const float ge = static_cast<float>(g[e]) * inv_scale;
      s.v[kSumGg] += ge * ge;
      if (kL2) {
        const float th = static_cast<float>(p[e]);
        s.v[kSumGradSq] += adai::grad_sq(ge, th, c);
        s.v[kSumGt] += ge * th;
        s.v[kSumTt] += th * th;
      }
    }
  }
  return s;
}

bool same_sums(const StatsSums& a, const StatsSums& b) {
  return std::memcmp(&a, &b, sizeof(StatsSums)) == 0;
}

// Integer-valued data and a power-of-two scale: every term and every partial sum is exact in
// float, so the per-thread sums must add up to the element-wise totals exactly (each element
// counted exactly once); also bitwise the canonical sums.
template <typename T, bool kL2>
void check_stats(int64_t len, int offset, int nthreads, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> small(-2, 2);
  Buf<T> p(len, offset), g(len, offset);
  for (int64_t e = -Buf<T>::kGuard; e < len + Buf<T>::kGuard; ++e) {
    p.data[e] = static_cast<T>(static_cast<float>(small(rng)));
    g.data[e] = static_cast<T>(static_cast<float>(small(rng)));
  }
  const float inv_scale = 0.5f;
  const Consts c = adai::make_consts(0.0, 0.0, 0.99, 0.0, kL2 ? 1.0 : 0.0, false, 1.0);
  double gg = 0.0, grad_sq = 0.0, gt = 0.0, tt = 0.0;
  for (int64_t e = 0; e < len; ++e) {
    const double gd = 0.5 * static_cast<double>(static_cast<float>(g.data[e]));
    const double th = static_cast<double>(static_cast<float>(p.data[e]));
    gg += gd * gd;
    if (kL2) {
      grad_sq += (gd + th) * (gd + th);
      gt += gd * th;
      tt += th * th;
    }
  }
  const bool aligned = aligned16(g.data) && (!kL2 || aligned16(p.data));
  double sum[4] = {0.0, 0.0, 0.0, 0.0};
  bool canonical = true;
  for (int tid = 0; tid < nthreads; ++tid) {
    const StatsSums s =
        stats_thread<T, kL2>(tid, nthreads, g.data, p.data, len, aligned, inv_scale, c);
    canonical = canonical && same_sums(s, canonical_stats<T, kL2>(tid, nthreads, g.data,
                                                                  p.data, len, inv_scale, c));
    for (int k = 0; k < kStatsSums; ++k) sum[k] += s.v[k];
  }
  CHECK(sum[kSumGg] == gg && sum[kSumGradSq] == grad_sq && sum[kSumGt] == gt &&
            sum[kSumTt] == tt,
        "stats<%s,l2=%d> len=%lld offset=%d threads=%d: (%.17g %.17g %.17g %.17g) != "
        "(%.17g %.17g %.17g %.17g)",
        type_name<T>(), (int)kL2, (long long)len, offset, nthreads, sum[0], sum[1], sum[2],
        sum[3], gg, grad_sq, gt, tt);
  CHECK(canonical, "stats<%s,l2=%d> len=%lld offset=%d threads=%d: not the canonical sums",
        type_name<T>(), (int)kL2, (long long)len, offset, nthreads);
}

// Random data and scale: the vector path (aligned) and the scalar path give every thread the
// canonical sums, bitwise, so a result does not depend on where a tensor starts.
template <typename T, bool kL2>
void check_stats_paths(int64_t len, int nthreads, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Buf<T> p(len, 0), g(len, 0);
  for (int64_t e = 0; e < len; ++e) {
    p.data[e] = static_cast<T>(normal(rng));
    g.data[e] = static_cast<T>(1000.0f * normal(rng));
  }
  const float scale = 1024.0f + 3.0f;
  const float inv_scale = inv_grad_scale(&scale);
  const Consts c = adai::make_consts(0.0, 0.0, 0.99, 0.0, kL2 ? 0.3 : 0.0, false, 1.0);
  for (int tid = 0; tid < nthreads; ++tid) {
    const StatsSums a =
        stats_thread<T, kL2>(tid, nthreads, g.data, p.data, len, true, inv_scale, c);
    const StatsSums b =
        stats_thread<T, kL2>(tid, nthreads, g.data, p.data, len, false, inv_scale, c);
    const StatsSums e =
        canonical_stats<T, kL2>(tid, nthreads, g.data, p.data, len, inv_scale, c);
    CHECK(same_sums(a, b) && same_sums(a, e),
          "stats<%s,l2=%d> len=%lld thread %d: vector path %.9g, scalar path %.9g, "
          "canonical %.9g (gg)",
          type_name<T>(), (int)kL2, (long long)len, tid, a.v[kSumGg], b.v[kSumGg],
          e.v[kSumGg]);
    if (!kL2) {
      CHECK(a.v[kSumGradSq] == 0.0f && a.v[kSumGt] == 0.0f && a.v[kSumTt] == 0.0f,
            "stats without L2 summed grad_sq/gt/tt");
    }
  }
}

// A non-finite parameter without L2 decay does not reach v, m (0 * inf would be NaN).
void check_no_l2_ignores_theta() {
  const Consts c = adai::make_consts(1e-2, 0.1, 0.99, 1e-3, 0.0, false, 1.0);
  for (float th0 : {std::numeric_limits<float>::infinity(),
                    std::numeric_limits<float>::quiet_NaN()}) {
    float th = th0, m = 0.1f, v = 0.5f, b = 0.5f;
    const float v_new = adai::update(th, 0.25f, m, v, b, 2.0f, 1.5f, c);
    CHECK(std::isfinite(v_new) && std::isfinite(m) && std::isfinite(b),
          "theta=%g without L2 decay poisoned the state", th0);
    CHECK(adai::grad_sq(0.5f, th0, c) == 0.25f, "grad_sq read theta without L2 decay");
  }
  const Consts w = adai::make_consts(1e-2, 0.1, 0.99, 1e-3, 1e-2, true, 1.0);  // decoupled
  CHECK(adai::effective_grad(0.5f, std::numeric_limits<float>::infinity(), w) == 0.5f,
        "decoupled decay changed the gradient");
}

// A tensor's share of the statistics row, against the formulas of docs/design.md.
void check_stats_tensor_row() {
  const double beta2 = 0.99, v_sum = 12.5;
  const float k = 3.0f;
  const double s[kStatsSums] = {7.0, 9.5, -1.25, 4.0};  // gg, grad_sq, gt, tt
  const double bc2 = 1.0 - std::pow(beta2, 3.0), w = (1.0 - beta2) / bc2;
  double row[kStatsColumns];
  for (double& x : row) x = -1.0;
  stats_tensor_row(beta2, 0.0f, v_sum, k, s, row);
  CHECK(row[kA] == beta2 * v_sum / bc2 && row[kB] == w * 7.0 && row[kBgg] == w * 7.0 &&
            row[kBgt] == 0.0 && row[kBtt] == 0.0 && row[kGn] == 7.0 && row[kN] == -1.0,
        "stats row without L2");
  const float l2 = 0.25f;  // exact in float and double
  stats_tensor_row(beta2, l2, v_sum, k, s, row);
  CHECK(row[kA] == beta2 * v_sum / bc2 && row[kB] == w * 9.5 && row[kBgg] == w * 7.0 &&
            row[kBgt] == w * (-1.25 * 0.5) && row[kBtt] == w * (4.0 * 0.0625) &&
            row[kGn] == 7.0 && row[kN] == -1.0,
        "stats row with L2");
  // Consistency: unclipped, A + B == A + Bgg + Bgt + Btt when grad_sq = gg + 2 l2 gt + l2^2 tt.
  const double s2[kStatsSums] = {3.0, 3.0 + 2 * 0.25 * 2.0 + 0.0625 * 8.0, 2.0, 8.0};
  stats_tensor_row(beta2, l2, 0.0, 1.0f, s2, row);
  CHECK(row[kB] == row[kBgg] + row[kBgt] + row[kBtt], "expanded B");
}

// update_args: rows summed in row order with any strides, adai::globals on the totals, skip
// conditions, multiplier and learning rate.
void check_update_args() {
  const Consts c = adai::make_consts(1e-2, 0.1, 0.99, 1e-3, 0.0, false, 1.0);
  // Rows whose float64 sum depends on the order: (2^60 - 2^60) + 1 = 1, but
  // (1 - 2^60) + 2^60 = 0.
  const double big = 1152921504606846976.0;  // 2^60
  std::vector<double> rows = {
      big,  2.0, 2.0, 0.0, 0.0, 16.0, 10.0,  // A B Bgg Bgt Btt Gn N
      -big, 1.0, 1.0, 0.0, 0.0, 9.0,  5.0,
      1.0,  0.5, 0.5, 0.0, 0.0, 0.0,  1.0,
  };
  double totals[kStatsColumns] = {0, 0, 0, 0, 0, 0, 0};
  for (int r = 0; r < 3; ++r) {
    for (int k = 0; k < kStatsColumns; ++k) totals[k] += rows[r * kStatsColumns + k];
  }
  CHECK(totals[kA] == 1.0 && (1.0 - big) + big == 0.0, "test rows: the order must matter");
  // The same rows as a column-major (transposed) view: row stride 1, column stride 3.
  std::vector<double> cm(rows.size());
  for (int r = 0; r < 3; ++r) {
    for (int k = 0; k < kStatsColumns; ++k) cm[k * 3 + r] = rows[r * kStatsColumns + k];
  }
  for (int layout = 0; layout < 2; ++layout) {
    UpdateInputs in{};
    in.stats = layout == 0 ? rows.data() : cm.data();
    in.rows = 3;
    in.row_stride = layout == 0 ? kStatsColumns : 1;
    in.col_stride = layout == 0 ? 1 : 3;
    in.c = c;
    const UpdateArgs a = update_args(in);
    const Globals gl = adai::globals(totals, 0.0, false, false);
    CHECK(a.inv_vbar == gl.inv_vbar && a.grad_mul == 1.0f && !a.skip && a.c.lr == c.lr &&
              a.c.lr_wd == 0.0f,
          "update_args layout %d: inv_vbar %.9g vs %.9g", layout, a.inv_vbar, gl.inv_vbar);
    CHECK(a.inv_vbar == static_cast<float>(16.0 / 4.5), "update_args: rows in row order");
  }
  // No rows: vbar := 0 rule, nothing skipped.
  {
    UpdateInputs in{};
    in.c = c;
    const UpdateArgs a = update_args(in);
    CHECK(a.inv_vbar == 0.0f && !a.skip && a.grad_mul == 1.0f, "update_args without rows");
  }
}

// update_args on one row: clipping, scale, found_inf, non-finite norms, lr_tensor. (Long: a
// table of cases and the one loop that checks each.)
void check_update_args_controls() {
  const Consts c = adai::make_consts(1e-2, 0.1, 0.99, 1e-3, 0.0, false, 1.0);
  const double inf = std::numeric_limits<double>::infinity();
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const Consts cw = adai::make_consts(1e-2, 0.1, 0.99, 1e-3, 0.05, true, 1.0);
  struct Case {
    double gn;
    double max_norm;
    bool skip_nonfinite;
    float found_inf;  // < -1: no found_inf tensor (NaN counts as nonzero)
    bool expect_skip;
  };
  const Case cases[] = {
      {16.0, 0.0, false, -2.0f, false},  {16.0, 2.0, false, -2.0f, false},
      {16.0, 8.0, false, 0.0f, false},   {16.0, 0.0, false, 1.0f, true},
      {16.0, 0.0, false, -0.0f, false},  {inf, 0.0, false, -2.0f, false},
      {inf, 0.0, true, -2.0f, true},     {nan, 0.0, true, -2.0f, true},
      {inf, 1.0, false, -2.0f, true},    {nan, 1.0, false, 0.0f, true},
      {16.0, 0.0, true, 0.0f, false},
      {16.0, 0.0, false, std::numeric_limits<float>::quiet_NaN(), true},
  };
  for (const Case& k : cases) {
    const double row[kStatsColumns] = {3.0, 6.0, 5.0, 0.5, 0.5, k.gn, 4.0};
    const float scale = 3.0f, lr = 0.02f;
    const float found = k.found_inf;
    for (int variant = 0; variant < 2; ++variant) {
      UpdateInputs in{};
      in.stats = row;
      in.rows = 1;
      in.row_stride = kStatsColumns;
      in.col_stride = 1;
      in.c = variant ? cw : c;
      in.grad_scale = variant ? &scale : nullptr;
      in.found_inf = k.found_inf < -1.0f ? nullptr : &found;
      in.lr_tensor = variant ? &lr : nullptr;
      in.decoupled_wd = variant ? 0.05 : 0.0;
      in.max_grad_norm = k.max_norm;
      in.skip_nonfinite = k.skip_nonfinite;
      const UpdateArgs a = update_args(in);
      const Globals gl =
          adai::globals(row, k.max_norm, k.skip_nonfinite, in.found_inf && found != 0.0f);
      const float inv_scale = variant ? static_cast<float>(1.0 / 3.0) : 1.0f;
      CHECK(a.skip == k.expect_skip && a.skip == gl.skip,
            "update_args gn=%g max=%g skip_nonfinite=%d found_inf=%g: skip %d", k.gn,
            k.max_norm, (int)k.skip_nonfinite, k.found_inf, (int)a.skip);
      CHECK(a.inv_vbar == gl.inv_vbar && a.grad_mul == inv_scale * gl.clip,
            "update_args gn=%g max=%g: inv_vbar / grad_mul", k.gn, k.max_norm);
      if (k.gn == 16.0 && k.max_norm == 2.0) {
        const double clip = 2.0 / (4.0 + 1e-6);
        CHECK(gl.clip == static_cast<float>(clip) &&
                  gl.inv_vbar == static_cast<float>(
                                     4.0 / (3.0 + clip * clip * 5.0 + clip * 0.5 + 0.5)),
              "clipped globals");
      }
      if (k.gn == 16.0 && k.max_norm != 2.0) {
        CHECK(gl.clip == 1.0f && gl.inv_vbar == static_cast<float>(4.0 / 9.0),
              "unclipped globals");
      }
      if (variant) {
        CHECK(a.c.lr == lr && a.c.lr_wd == static_cast<float>(static_cast<double>(lr) * 0.05),
              "lr_tensor");
      } else {
        CHECK(a.c.lr == c.lr && a.c.lr_wd == c.lr_wd, "lr");
      }
    }
  }
}

void check_chunk_table(uint32_t seed) {
  std::mt19937 rng(seed);
  for (int trial = 0; trial < 50; ++trial) {
    const int64_t n = trial == 0 ? 0 : 1 + static_cast<int64_t>(rng() % 300);
    const int64_t chunk = trial % 2 ? kChunk : 1 + static_cast<int64_t>(rng() % 7);
    std::vector<int64_t> numels(n);
    for (auto& x : numels) {
      const uint32_t r = rng() % 4;
      x = r == 0 ? 0 : r == 1 ? rng() % 5 : r == 2 ? chunk * (rng() % 3) : rng() % 50000;
    }
    std::vector<int64_t> prefix(n + 1);
    const int64_t total = build_chunk_prefix(numels.data(), n, chunk, prefix.data());
    int64_t expect_total = 0;
    for (auto x : numels) expect_total += (x + chunk - 1) / chunk;
    CHECK(total == expect_total, "chunk table: total %lld != %lld", (long long)total,
          (long long)expect_total);
    // Walk the chunks tensor by tensor, as a linear search would, and compare.
    int64_t c = 0;
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t begin = 0; begin < numels[i]; begin += chunk, ++c) {
        const ChunkRef r = locate_chunk(prefix.data(), n, c, chunk);
        const int64_t len = chunk_len(numels[i], r.begin, chunk);
        const int64_t expect_len = numels[i] - begin < chunk ? numels[i] - begin : chunk;
        CHECK(r.tensor == i && r.begin == begin && len == expect_len,
              "chunk %lld: got (%lld, %lld, %lld), expected (%lld, %lld, %lld)", (long long)c,
              (long long)r.tensor, (long long)r.begin, (long long)len, (long long)i,
              (long long)begin, (long long)expect_len);
      }
    }
    CHECK(c == total, "chunk count");
  }
}

// 64-bit chunk indices (a tensor of 2^31 + 5 elements after small ones), and the table layout.
void check_chunk_table_large() {
  const int64_t big = (int64_t{1} << 31) + 5;
  const int64_t numels[3] = {7, big, 3};
  int64_t prefix[4];
  const int64_t total = build_chunk_prefix(numels, 3, kChunk, prefix);
  CHECK(total == 1 + (big + kChunk - 1) / kChunk + 1, "large total");
  const ChunkRef last = locate_chunk(prefix, 3, total - 2, kChunk);
  CHECK(last.tensor == 1 && last.begin == (big - 1) / kChunk * kChunk &&
            chunk_len(big, last.begin, kChunk) == big - last.begin,
        "large tensor's last chunk");
  for (int cols : {1, 4, 6}) {
    const TableLayout layout = table_layout(1001, 5003, cols, cols + 2);
    CHECK(layout.prefix_off % 16 == 0 && layout.meta_off % 16 == 0 &&
              layout.partial_off % 16 == 0 && layout.tensor_off % 16 == 0 &&
              layout.total_bytes % 16 == 0 &&
              layout.meta_off >= layout.prefix_off + 8 * 1002 &&
              layout.host_bytes >= layout.meta_off + sizeof(TensorMeta) * 1001 &&
              layout.tensor_off >= layout.partial_off + 8 * 5003 * cols &&
              layout.total_bytes >= layout.tensor_off + 8 * 1001 * (cols + 2),
          "table layout, %d columns", cols);
  }
  const TableLayout one = table_layout(1000, 5000);
  CHECK(one.tensor_off >= one.partial_off + 8 * 5000 &&
            one.total_bytes >= one.tensor_off + 8 * 1000,
        "table layout, default columns");
}

template <typename T>
void check_type(uint32_t seed) {
  const int64_t lens[] = {0, 1, 3, 4, 7, 8, 9, 15, 16, 17, 31, 33, 255, 1000, 2047, 2048,
                          2049, 4099, 8191, 8192, 8193, 16383, kChunk};
  const Consts consts[] = {
      adai::make_consts(1e-2, 0.1, 0.99, 1e-3, 0.0, false, 1.0),
      adai::make_consts(1e-2, 0.1, 0.99, 1e-3, 5e-2, false, 1.0),
      adai::make_consts(1e-2, 0.1, 0.99, 1e-3, 5e-2, true, 0.5),
  };
  for (const int64_t len : lens) {
    for (int offset : {0, 1, 3, 4}) {
      for (int nthreads : {kBlock, 32, 7}) {
        for (const Consts& c : consts) {
          for (float mul : {1.0f, 0.37f}) check_update<T>(len, offset, nthreads, c, mul, seed++);
        }
        check_stats<T, false>(len, offset, nthreads, seed++);
        check_stats<T, true>(len, offset, nthreads, seed++);
      }
      if (offset == 0) {
        check_stats_paths<T, false>(len, kBlock, seed++);
        check_stats_paths<T, true>(len, 7, seed++);
      }
    }
  }
}

int main() {
  check_chunk_table(1);
  check_chunk_table_large();
  check_no_l2_ignores_theta();
  check_stats_tensor_row();
  check_update_args();
  check_update_args_controls();
  check_type<float>(100);
  check_type<c10::Half>(200000);
  check_type<c10::BFloat16>(400000);
  if (g_failures) {
    std::printf("%d failures\n", g_failures);
    return 1;
  }
  std::printf("OK\n");
  return 0;
}
