#pragma once
// exp, the softmax's exp_nonpositive and tanh, written once over the vector interface, so
// every ISA shares the same range reduction and polynomial and therefore the same
// measured error bound; and max_finite_magnitude, the reduced-precision caches' overflow
// check.
#include <cstddef>
#include <limits>

#include "kvheads/simd/register_hint.hpp"

namespace kvheads::simd {

namespace detail {
/// e^x = p * 2^n, given x and n = round(x / ln 2), for N vectors at once; x[i] becomes p
/// (in [0.7, 1.42]). Each step runs over all N before the next, so the out-of-order core
/// sees N independent chains side by side (the Horner steps form one long chain per
/// vector); every vector goes through the same operations in the same order for any N.
template <class Isa, int N>
KVHEADS_ALWAYS_INLINE void exp_mantissa_each(typename Isa::vec (&x)[N], const typename Isa::vec (&n)[N]) {
  using V = typename Isa::vec;
  // x = n*ln2 + r with |r| <= ln2/2 (a little more when x*log2(e) rounds across a tie).
  // ln2 is split in two: ln2_hi has 9 significant bits, so x - n*ln2_hi is exact.
  KVHEADS_UNROLL for (int i = 0; i < N; ++i) x[i] = Isa::fma(n[i], Isa::broadcast(-0.693359375f), x[i]);
  KVHEADS_UNROLL for (int i = 0; i < N; ++i) x[i] = Isa::fma(n[i], Isa::broadcast(2.12194440e-4f), x[i]);
  // e^r ~ 1 + r + r^2 (c2 + c3 r + ... + c6 r^4): c2..c6 minimise the max relative
  // error on |r| <= 0.3468 (weighted Remez exchange, 3.1e-9 with exact coefficients);
  // float rounding in the Horner steps dominates what is left.
  V p[N];
  KVHEADS_UNROLL for (int i = 0; i < N; ++i) p[i] = Isa::fma(Isa::broadcast(1.381454058e-3f), x[i], Isa::broadcast(8.368745446e-3f));
  KVHEADS_UNROLL for (int i = 0; i < N; ++i) p[i] = Isa::fma(p[i], x[i], Isa::broadcast(4.166838899e-2f));
  KVHEADS_UNROLL for (int i = 0; i < N; ++i) p[i] = Isa::fma(p[i], x[i], Isa::broadcast(1.666652113e-1f));
  KVHEADS_UNROLL for (int i = 0; i < N; ++i) p[i] = Isa::fma(p[i], x[i], Isa::broadcast(4.999999404e-1f));
  KVHEADS_UNROLL for (int i = 0; i < N; ++i) p[i] = Isa::fma(p[i], x[i], Isa::broadcast(1.f));
  KVHEADS_UNROLL for (int i = 0; i < N; ++i) x[i] = Isa::fma(p[i], x[i], Isa::broadcast(1.f));
}

/// exp_mantissa_each of one vector: returns p.
template <class Isa>
typename Isa::vec exp_mantissa(typename Isa::vec x, typename Isa::vec n) {
  typename Isa::vec xs[1] = {x};
  const typename Isa::vec ns[1] = {n};
  exp_mantissa_each<Isa, 1>(xs, ns);
  return xs[0];
}
}  // namespace detail

/// e^x per lane. x < -87.33654 (including -inf) gives exactly 0; NaN gives NaN;
/// inputs above 88.37626 (including +inf) are clamped to it (softmax only evaluates x <= 0).
// Measured max relative error against std::exp in double, over every float in
// [-87.33654, 88.37626] (one bit-pattern step; all results are normal there):
// 7.71e-8 (worst at x = -26.737) on scalar, avx2, avx512 and neon alike (the same
// operations in the same order give the same bits). tests/test_simd.cpp checks 2e-7.
template <class Isa>
typename Isa::vec exp(typename Isa::vec x) {
  using V = typename Isa::vec;
  const V lowest = Isa::broadcast(-87.33654f);  // ~ln(2^-126): smallest normal result
  const V highest = Isa::broadcast(88.37626f);  // 127.5 ln 2: n stays <= 127
  // Operand order matters: min/max return their second operand on NaN, so `clamped`
  // carries a NaN through while `bounded` never holds one (pow2 gets a valid n).
  const V clamped = Isa::max(lowest, Isa::min(highest, x));
  const V bounded = Isa::min(Isa::max(x, lowest), highest);
  const V n = Isa::round(Isa::mul(bounded, Isa::broadcast(1.44269504088896341f)));
  const V result = Isa::mul(detail::exp_mantissa<Isa>(clamped, n), Isa::pow2(n));
  return Isa::select_less(x, lowest, Isa::zero(), result);
}

/// e^x per lane for x <= 0, of N vectors in place (see detail::exp_mantissa_each): the
/// softmax's weights, exp(logit - running max). With no overflow to guard against and
/// ldexp scaling by 2^n, it takes 12 vector operations on AVX-512 against exp's 19 (MQA
/// decode's softmax phase: -24% time).
/// x >= -87.33654: bit for bit exp(x), so exp's error bound holds. Below, results are
/// subnormal with |error| < 2^-125; x <= -104 (including -inf) gives exactly 0, so a
/// masked key weighs exactly 0. NaN gives NaN. x > 0 is outside the contract.
template <class Isa, int N>
KVHEADS_ALWAYS_INLINE void exp_nonpositive_each(typename Isa::vec (&x)[N]) {
  using V = typename Isa::vec;
  // e^-110 < 2^-158: 0 after ldexp on every ISA. max returns its second operand on NaN,
  // so a NaN x passes through (and -inf becomes -110).
  V n[N];
  KVHEADS_UNROLL for (int i = 0; i < N; ++i) {
    x[i] = Isa::max(Isa::broadcast(-110.f), x[i]);
    n[i] = Isa::round(Isa::mul(x[i], Isa::broadcast(1.44269504088896341f)));
  }
  detail::exp_mantissa_each<Isa, N>(x, n);
  KVHEADS_UNROLL for (int i = 0; i < N; ++i) x[i] = Isa::ldexp(x[i], n[i]);
}

/// exp_nonpositive of one vector.
template <class Isa>
typename Isa::vec exp_nonpositive(typename Isa::vec x) {
  typename Isa::vec xs[1] = {x};
  exp_nonpositive_each<Isa, 1>(xs);
  return xs[0];
}

/// tanh per lane: tanh(±inf) = ±1, NaN gives NaN.
// An odd polynomial near 0 (where 1 - e^{-2|x|} would cancel) and
// (1 - e^{-2|x|}) / (1 + e^{-2|x|}) elsewhere, sign restored afterwards.
// Measured max absolute error against std::tanh in double, over every float in
// [-20, 20]: 8.99e-8 (worst at |x| = 1.2476) on scalar, avx2, avx512 and neon alike.
// tests/test_simd.cpp checks 2e-7.
template <class Isa>
typename Isa::vec tanh(typename Isa::vec x) {
  using V = typename Isa::vec;
  const V a = Isa::abs(x);
  const V t = exp<Isa>(Isa::mul(a, Isa::broadcast(-2.f)));
  const V one = Isa::broadcast(1.f);
  const V far = Isa::div(Isa::sub(one, t), Isa::add(one, t));
  // |x| < 0.5: tanh x ~ x + x^3 (p0 + p1 x^2 + ... + p4 x^8), p0..p4 minimising the max
  // relative error on [0, 0.5] (weighted Remez exchange in x^2: 3.5e-10).
  const V x2 = Isa::mul(a, a);
  V p = Isa::broadcast(-6.647487171e-3f);
  p = Isa::fma(p, x2, Isa::broadcast(2.129799128e-2f));
  p = Isa::fma(p, x2, Isa::broadcast(-5.389919132e-2f));
  p = Isa::fma(p, x2, Isa::broadcast(1.333296448e-1f));
  p = Isa::fma(p, x2, Isa::broadcast(-3.333332837e-1f));
  const V near = Isa::fma(Isa::mul(p, x2), a, a);
  const V magnitude = Isa::select_less(a, Isa::broadcast(0.5f), near, far);
  return Isa::select_less(x, Isa::zero(), Isa::sub(Isa::zero(), magnitude), magnitude);
}

/// The largest |x| over the finite values of data[0, n), 0 when there are none (inf and
/// NaN are left out). KvCache<bf16 / fp16>::append runs it over every appended value
/// before storing any. The scalar loop it replaces, a compare pair per value that g++
/// does not vectorise at -O2 or -O3, took 11.5-23x its time (bench/bench_append, Zen 5,
/// two runs, 1 and 512 tokens of 8 KV heads x 128: this pass is 2.0-3.9% of an fp16 append).
template <class Isa>
float max_finite_magnitude(const float* data, std::ptrdiff_t n) {
  using V = typename Isa::vec;
  constexpr int width = Isa::width;
  constexpr int chains = 4;  // independent max chains, so the loop runs at the loads' pace
  const V zero = Isa::zero(), inf = Isa::broadcast(std::numeric_limits<float>::infinity());
  // |x| < inf is false for inf and NaN, which then count as 0.
  const auto finite_magnitude = [&](V x) {
    const V magnitude = Isa::abs(x);
    return Isa::select_less(magnitude, inf, magnitude, zero);
  };
  V largest[chains];
  KVHEADS_UNROLL for (V& m : largest) m = zero;
  std::ptrdiff_t i = 0;
  for (; i + chains * width <= n; i += chains * width)
    KVHEADS_UNROLL for (int c = 0; c < chains; ++c)
      largest[c] = Isa::max(largest[c], finite_magnitude(Isa::load(data + i + c * width)));
  for (; i + width <= n; i += width) largest[0] = Isa::max(largest[0], finite_magnitude(Isa::load(data + i)));
  if (i < n) largest[0] = Isa::max(largest[0], finite_magnitude(Isa::load_partial(data + i, int(n - i))));
  KVHEADS_UNROLL for (int c = 1; c < chains; ++c) largest[0] = Isa::max(largest[0], largest[c]);
  return Isa::reduce_max(largest[0]);
}

}  // namespace kvheads::simd
