// pow(x, e) on Vectorized<float> for the CPU kernel (AdaiV2's two pows per element), as
// 2^(e * log2(x)), inline, without calls into SLEEF.
//
// Why: Vectorized<float>::pow (SLEEF powf, 1 ulp, evaluated in extended precision) cost more
// than the whole rest of the update. SLEEF's exp(e * log(x)) halves that, but the calls stay
// opaque to the compiler, and a perf profile of the update still showed twice the time of
// the rest of it inside Sleef_finz_logf16 / expf16. Inline, the polynomials below cost about
// a quarter of SLEEF's powf (in-cache microbenchmark, AVX-512: ~15 vs ~60 ns per 16 lanes).
//
// Method (AVX-512 and AVX2 builds; the generic build calls std::pow per lane), per lane:
// - x = m 2^k with m in [0.75, 1.5) (AVX-512 getmant / getexp; AVX2 from the exponent bits,
//   subnormals pre-scaled by 2^24);
// - log2(m) = 2 log2(e) atanh(s), s = (m - 1) / (m + 1) (AVX-512: rcp14 and a Newton step;
//   AVX2: a division), |s| <= 0.2, the atanh series to s^9 (truncation 0.16 ulp);
// - y = e k + e log2(m) in one fma (e k exact inside it), so y is rounded once;
// - 2^y = 2^n p(r), n = round(y), r = y - n in [-0.5, 0.5], p a degree-6 fit (relative error
//   0.27 ulp with its float coefficients, p(0) = 1 exactly); the scaling by 2^n gives the
//   overflow to inf and the underflow to subnormals and 0.
//
// Accuracy: relative error at most about (|e ln x| + 2) ulp of float. The dominant term is
// the rounding of y, amplified by the exponential (any pow computed in float through a
// logarithm has it; powf avoids it with extended precision). Measured against a float64 pow
// for 4M x spread log-uniformly over [2^-149, 2^30] and e in [0.25, 1] (normal results):
// at most |e ln x| + 1.6 ulp, on AVX-512 and AVX2. For Adai's arguments (vhat / vbar near 1,
// 1 - beta1 in [eps, 1]) that is 2 to 10 ulp, below the error fp32 already has in
// vhat / vbar. Exact cases: pow(1, e) = 1; pow(x, 0) = 1 for every x (NaN included);
// pow(+-0, e) = 0 and pow(inf, e) = inf for e > 0; NaN or negative x gives NaN (powf also
// gives NaN there, except for x = -inf). Results within ~|e ln x| ulp of FLT_MAX may round
// up to inf. Only e >= 0 is supported (all the kernel needs).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cfloat>
#include <cmath>
#include <limits>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace adai_vec {

using fVec = at::vec::Vectorized<float>;

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// x = m * 2^k with m in [0.75, 1.5), for finite x > 0 (normal or subnormal). Other x: on
// AVX-512 those of |x|, with k = -inf for 0, k = inf for inf, NaN for NaN; on AVX2
// unspecified values (pow blends its special cases afterwards).
inline void split_exponent(const fVec& x, fVec& k, fVec& m) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 mm = _mm512_getmant_ps(x, _MM_MANT_NORM_p75_1p5, _MM_MANT_SIGN_zero);
  __m512 kk = _mm512_getexp_ps(x);  // floor(log2 x), subnormals included
  // a mantissa in [1.5, 2) came back halved: one more in the exponent
  const __mmask16 halved = _mm512_cmp_ps_mask(mm, _mm512_set1_ps(1.0f), _CMP_LT_OQ);
  kk = _mm512_mask_add_ps(kk, halved, kk, _mm512_set1_ps(1.0f));
  k = fVec(kk);
  m = fVec(mm);
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 xv = x;
  const __m256 tiny = _mm256_cmp_ps(xv, _mm256_set1_ps(FLT_MIN), _CMP_LT_OQ);
  const __m256 xs = _mm256_blendv_ps(xv, _mm256_mul_ps(xv, _mm256_set1_ps(16777216.0f)), tiny);
  const __m256i bits = _mm256_castps_si256(xs);
  __m256 kk = _mm256_cvtepi32_ps(
      _mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(127)));
  kk = _mm256_sub_ps(kk, _mm256_and_ps(tiny, _mm256_set1_ps(24.0f)));
  __m256 mm = _mm256_castsi256_ps(_mm256_or_si256(
      _mm256_and_si256(bits, _mm256_set1_epi32(0x007fffff)), _mm256_set1_epi32(0x3f800000)));
  const __m256 big = _mm256_cmp_ps(mm, _mm256_set1_ps(1.5f), _CMP_GE_OQ);
  mm = _mm256_blendv_ps(mm, _mm256_mul_ps(mm, _mm256_set1_ps(0.5f)), big);
  kk = _mm256_add_ps(kk, _mm256_and_ps(big, _mm256_set1_ps(1.0f)));
  k = fVec(kk);
  m = fVec(mm);
#endif
}

// p * 2^n for integral n in [-160, 160] (over- and underflow as a float multiply would).
inline fVec scale_by_pow2(const fVec& p, const fVec& n) {
#if defined(CPU_CAPABILITY_AVX512)
  return fVec(_mm512_scalef_ps(p, n));
#elif defined(CPU_CAPABILITY_AVX2)
  // two factors 2^n1 * 2^n2, each a normal float for |n| <= 160
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i n1 = _mm256_srai_epi32(ni, 1);
  const __m256i n2 = _mm256_sub_epi32(ni, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  return fVec(_mm256_mul_ps(_mm256_mul_ps(p, s1), s2));
#endif
}

// 1 / d for d in [1.75, 2.5): AVX-512 rcp14 (14 bits) and one Newton step, about 1 ulp, at a
// fraction of a division's cost; elsewhere a division.
inline fVec reciprocal(const fVec& d) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 r = _mm512_rcp14_ps(d);
  // r (2 - d r)
  return fVec(_mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f))));
#else
  return fVec(_mm256_div_ps(_mm256_set1_ps(1.0f), d));
#endif
}

#endif  // AVX512 || AVX2

// pow(x, e) for e >= 0; see the top of this file.
inline fVec pow(const fVec& x, const fVec& e) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  using at::vec::fmadd;
  const fVec one(1.0f);
  fVec k, m;
  split_exponent(x, k, m);
  // y = e log2(x) = e k + e 2 log2(e) atanh(s), the product e k exact inside the fma: one
  // rounding of y
  const fVec s = (m - one) * reciprocal(m + one);
  const fVec z = s * s;
  fVec q = fmadd(z, fVec(1.0f / 9.0f), fVec(1.0f / 7.0f));
  q = fmadd(q, z, fVec(1.0f / 5.0f));
  q = fmadd(q, z, fVec(1.0f / 3.0f));
  q = fmadd(q, z, one);
  const fVec e_log2m = (s * (e * fVec(2.8853900817779268f))) * q;
  // 2^y, y clamped to where the result is 0 or inf anyway (also makes y - round(y) finite
  // for x = 0 and x = inf)
  const fVec y = at::vec::clamp(fmadd(e, k, e_log2m), fVec(-160.0f), fVec(160.0f));
  const fVec n = y.round();  // nearest, ties to even
  const fVec r = y - n;
  fVec p = fmadd(r, fVec(0.00015353361959569156f), fVec(0.0013398873852565885f));
  p = fmadd(p, r, fVec(0.00961843691766262f));
  p = fmadd(p, r, fVec(0.055503323674201965f));
  p = fmadd(p, r, fVec(0.24022647738456726f));
  p = fmadd(p, r, fVec(0.6931471824645996f));
  p = fmadd(p, r, one);
  fVec res = scale_by_pow2(p, n);
  // special cases, as powf
  const fVec zero(0.0f);
#if defined(CPU_CAPABILITY_AVX2)
  const fVec inf(std::numeric_limits<float>::infinity());
  res = fVec::blendv(res, zero, x == zero);
  res = fVec::blendv(res, inf, x == inf);
#endif
  // (AVX-512: getexp(+-0) = -inf gives 0, getexp(inf) = inf gives inf, NaN stays NaN)
  res = fVec::blendv(fVec(std::numeric_limits<float>::quiet_NaN()), res, x >= zero);
  return fVec::blendv(res, one, e == fVec(0.0f));  // pow(x, 0) = 1, NaN x included
#else
  // The generic build: std::pow per lane.
  return x.pow(e);
#endif
}

}  // namespace adai_vec
