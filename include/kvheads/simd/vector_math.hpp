#pragma once
// exp and tanh written once over the vector interface, so every ISA shares the same
// range reduction and polynomial and therefore the same measured error bound.
namespace kvheads::simd {

/// e^x per lane. Relative error bound stated and tested in tests/test_simd.cpp.
/// x < -87.33654 (including -inf) gives exactly 0; NaN gives NaN; inputs above
/// 88.37626 are clamped (softmax only evaluates x <= 0).
template <class Isa>
typename Isa::vec exp(typename Isa::vec x) {
  using V = typename Isa::vec;
  const V lowest = Isa::broadcast(-87.33654f);
  const V highest = Isa::broadcast(88.37626f);
  // Operand order matters: min/max return their second operand on NaN.
  V clamped = Isa::max(lowest, Isa::min(highest, x));
  // x = n*ln2 + r with |r| <= ln2/2; ln2 split in two so n*ln2_hi is exact.
  const V n = Isa::round(Isa::mul(clamped, Isa::broadcast(1.44269504088896341f)));
  V r = Isa::fma(n, Isa::broadcast(-0.693359375f), clamped);
  r = Isa::fma(n, Isa::broadcast(2.12194440e-4f), r);
  // Taylor series of e^r to degree 7 (truncation < 6e-9 on |r| <= 0.347).
  V p = Isa::broadcast(1.f / 5040.f);
  p = Isa::fma(p, r, Isa::broadcast(1.f / 720.f));
  p = Isa::fma(p, r, Isa::broadcast(1.f / 120.f));
  p = Isa::fma(p, r, Isa::broadcast(1.f / 24.f));
  p = Isa::fma(p, r, Isa::broadcast(1.f / 6.f));
  p = Isa::fma(p, r, Isa::broadcast(0.5f));
  p = Isa::fma(p, r, Isa::broadcast(1.f));
  p = Isa::fma(p, r, Isa::broadcast(1.f));
  const V result = Isa::mul(p, Isa::pow2(n));
  return Isa::select_less(x, lowest, Isa::zero(), result);
}

/// tanh per lane: an odd polynomial near 0 (where 1 - e^{-2|x|} would cancel) and
/// (1 - e^{-2|x|}) / (1 + e^{-2|x|}) elsewhere, sign restored afterwards.
template <class Isa>
typename Isa::vec tanh(typename Isa::vec x) {
  using V = typename Isa::vec;
  const V a = Isa::abs(x);
  const V t = exp<Isa>(Isa::mul(a, Isa::broadcast(-2.f)));
  const V one = Isa::broadcast(1.f);
  const V far = Isa::div(Isa::sub(one, t), Isa::add(one, t));
  // |x| < 0.5: tanh x = x - x^3/3 + 2x^5/15 - 17x^7/315 + 62x^9/2835 - ...
  const V x2 = Isa::mul(a, a);
  V p = Isa::broadcast(-1382.f / 155925.f);
  p = Isa::fma(p, x2, Isa::broadcast(62.f / 2835.f));
  p = Isa::fma(p, x2, Isa::broadcast(-17.f / 315.f));
  p = Isa::fma(p, x2, Isa::broadcast(2.f / 15.f));
  p = Isa::fma(p, x2, Isa::broadcast(-1.f / 3.f));
  const V near = Isa::fma(Isa::mul(p, x2), a, a);
  const V magnitude = Isa::select_less(a, Isa::broadcast(0.5f), near, far);
  return Isa::select_less(x, Isa::zero(), Isa::sub(Isa::zero(), magnitude), magnitude);
}

}  // namespace kvheads::simd
