// Host-side check of the CUDA kernels' element loops and chunk table, without a GPU.
//
// csrc/cuda/elementwise.h's per-thread routines are __host__ __device__; no element is shared
// between threads, so running threads 0 .. nthreads-1 one after the other on the CPU gives
// exactly what the kernel's threads write. This program checks, for float / half / bfloat16,
// aligned (vector path) and misaligned (scalar path) buffers and many lengths, that every
// element is updated exactly once and bitwise as adai::update does it element by element,
// that nothing outside the chunk is touched, that the per-thread sums add up, and that
// sum_v's per-thread sums equal update's bitwise (whatever path each takes), as do the
// stats sums of the vector and scalar paths; it also checks the chunk table (multi_tensor.h)
// against a linear search. Built and run by tests/test_cuda_build.py with g++; prints "OK"
// and exits 0 on success.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "cuda/elementwise.h"
#include "cuda/multi_tensor.h"

using adai::Consts;
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

template <typename T>
void check_update(int64_t len, int offset, int nthreads, const Consts& c, uint32_t seed) {
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
    v_expected += adai::update(th, static_cast<float>(ge.data[e]), me.data[e], ve.data[e],
                               be.data[e], inv_bc2, inv_vbar, c);
    pe.data[e] = static_cast<T>(th);
  }

  const bool aligned = aligned16(p.data) && aligned16(g.data) && aligned16(m.data) &&
                       aligned16(v.data) && aligned16(b.data);
  double v_sum = 0.0;
  std::vector<float> per_thread(nthreads);
  for (int tid = 0; tid < nthreads; ++tid) {
    per_thread[tid] = update_thread<T>(tid, nthreads, p.data, g.data, m.data, v.data, b.data,
                                       len, aligned, inv_bc2, inv_vbar, c);
    v_sum += per_thread[tid];
  }
  // sum_v over the new v, on either path, gives every thread's sum bitwise.
  for (bool v_aligned : {aligned16(v.data), false}) {
    bool same = true;
    for (int tid = 0; tid < nthreads; ++tid) {
      const float s = vsum_thread(tid, nthreads, v.data, len, v_aligned);
      same = same && std::memcmp(&s, &per_thread[tid], sizeof(float)) == 0;
    }
    CHECK(same, "sum_v<%s> len=%lld offset=%d threads=%d aligned=%d: differs from update's",
          type_name<T>(), (long long)len, offset, nthreads, (int)v_aligned);
  }
  const char* tn = type_name<T>();
  CHECK(same_bytes(p, pe), "update<%s> len=%lld offset=%d threads=%d: params differ", tn,
        (long long)len, offset, nthreads);
  CHECK(same_bytes(g, ge), "update<%s> len=%lld offset=%d: grads were written", tn,
        (long long)len, offset);
  CHECK(same_bytes(m, me) && same_bytes(v, ve) && same_bytes(b, be),
        "update<%s> len=%lld offset=%d threads=%d: states differ", tn, (long long)len, offset,
        nthreads);
  CHECK(std::fabs(v_sum - v_expected) <= 1e-5 * std::fabs(v_expected) + 1e-30,
        "update<%s> len=%lld: v sum %.9g, expected %.9g", tn, (long long)len, v_sum,
        v_expected);
}

// Integer-valued data: every (g + l2 * theta)^2 and every partial sum is exact in float, so
// the per-thread sums must add up to the element-wise total exactly (each element counted
// exactly once).
template <typename T, bool kL2>
void check_stats(int64_t len, int offset, int nthreads, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> small(-2, 2);
  Buf<T> p(len, offset), g(len, offset);
  for (int64_t e = -Buf<T>::kGuard; e < len + Buf<T>::kGuard; ++e) {
    p.data[e] = static_cast<T>(static_cast<float>(small(rng)));
    g.data[e] = static_cast<T>(static_cast<float>(small(rng)));
  }
  const Consts c = adai::make_consts(0.0, 0.0, 0.99, 0.0, kL2 ? 1.0 : 0.0, false, 1.0);
  double expected = 0.0;
  for (int64_t e = 0; e < len; ++e) {
    const double ge = static_cast<double>(static_cast<float>(g.data[e])) +
                      (kL2 ? static_cast<double>(static_cast<float>(p.data[e])) : 0.0);
    expected += ge * ge;
  }
  const bool aligned = aligned16(g.data) && (!kL2 || aligned16(p.data));
  double sum = 0.0;
  for (int tid = 0; tid < nthreads; ++tid) {
    sum += stats_thread<T, kL2>(tid, nthreads, g.data, p.data, len, aligned, c);
  }
  CHECK(sum == expected, "stats<%s,l2=%d> len=%lld offset=%d threads=%d: %.17g != %.17g",
        type_name<T>(), (int)kL2, (long long)len, offset, nthreads, sum, expected);
}

// Random data: the vector path (aligned) and the scalar path give every thread the same sum,
// bitwise (the canonical order), so a result does not depend on where a tensor starts.
template <typename T, bool kL2>
void check_stats_paths(int64_t len, int nthreads, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Buf<T> p(len, 0), g(len, 0);
  for (int64_t e = 0; e < len; ++e) {
    p.data[e] = static_cast<T>(normal(rng));
    g.data[e] = static_cast<T>(normal(rng));
  }
  const Consts c = adai::make_consts(0.0, 0.0, 0.99, 0.0, kL2 ? 0.3 : 0.0, false, 1.0);
  for (int tid = 0; tid < nthreads; ++tid) {
    const float a = stats_thread<T, kL2>(tid, nthreads, g.data, p.data, len, true, c);
    const float b = stats_thread<T, kL2>(tid, nthreads, g.data, p.data, len, false, c);
    CHECK(std::memcmp(&a, &b, sizeof(float)) == 0,
          "stats<%s,l2=%d> len=%lld thread %d: vector path %.9g, scalar path %.9g",
          type_name<T>(), (int)kL2, (long long)len, tid, a, b);
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
  // 64-bit: a tensor of 2^31 + 5 elements after small ones.
  const int64_t big = (int64_t{1} << 31) + 5;
  const int64_t numels[3] = {7, big, 3};
  int64_t prefix[4];
  const int64_t total = build_chunk_prefix(numels, 3, kChunk, prefix);
  CHECK(total == 1 + (big + kChunk - 1) / kChunk + 1, "large total");
  const ChunkRef last = locate_chunk(prefix, 3, total - 2, kChunk);
  CHECK(last.tensor == 1 && last.begin == (big - 1) / kChunk * kChunk &&
            chunk_len(big, last.begin, kChunk) == big - last.begin,
        "large tensor's last chunk");
  const TableLayout layout = table_layout(1000, 5000);
  CHECK(layout.prefix_off % 16 == 0 && layout.meta_off % 16 == 0 &&
            layout.partial_off % 16 == 0 && layout.tensor_off % 16 == 0 &&
            layout.meta_off >= layout.prefix_off + 8 * 1001 &&
            layout.host_bytes >= layout.meta_off + sizeof(TensorMeta) * 1000 &&
            layout.tensor_off >= layout.partial_off + 8 * 5000 &&
            layout.total_bytes >= layout.tensor_off + 8 * 1000,
        "table layout");
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
        for (const Consts& c : consts) check_update<T>(len, offset, nthreads, c, seed++);
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
