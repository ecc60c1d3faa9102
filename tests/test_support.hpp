#pragma once
// Shared helpers for the kvheads tests: random inputs, the reference on the same inputs,
// and a tolerance check relative to the output's magnitude.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <kvheads/kvheads.hpp>

namespace kvheads_test {

/// Normal samples (Marsaglia's polar method over 32-bit draws of mt19937), deterministic
/// per seed. Not std::normal_distribution<float>: its std::generate_canonical takes a long
/// double log on every draw, which took 60% of the largest test's time under the sanitizers.
class NormalSampler {
 public:
  explicit NormalSampler(std::uint32_t seed, float stddev = 1.f) : rng_(seed), stddev_(stddev) {}

  float operator()() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    double x, y, r2;
    do {  // a point uniform in the unit disc, not its centre
      x = double(rng_()) * 0x1p-31 - 1.0;
      y = double(rng_()) * 0x1p-31 - 1.0;
      r2 = x * x + y * y;
    } while (r2 >= 1.0 || r2 == 0.0);
    const double factor = std::sqrt(-2.0 * std::log(r2) / r2) * double(stddev_);
    spare_ = float(y * factor);
    has_spare_ = true;
    return float(x * factor);
  }

 private:
  std::mt19937 rng_;
  float stddev_;
  float spare_ = 0.f;
  bool has_spare_ = false;
};

inline std::vector<float> random_vector(std::size_t n, std::uint32_t seed, float stddev = 1.f) {
  NormalSampler normal(seed, stddev);
  std::vector<float> out(n);
  for (float& x : out) x = normal();
  return out;
}

/// Inputs of one attend() problem on plain memory.
struct Problem {
  kvheads::HeadLayout layout;
  int q_len;
  int kv_len;
  std::vector<float> q, k, v;

  Problem(kvheads::HeadLayout l, int q_length, int kv_length, std::uint32_t seed = 7)
      : layout(l),
        q_len(q_length),
        kv_len(kv_length),
        q(random_vector(std::size_t(q_length) * std::size_t(l.q_width()), seed)),
        k(random_vector(std::size_t(kv_length) * std::size_t(l.kv_width()), seed + 1)),
        v(random_vector(std::size_t(kv_length) * std::size_t(l.kv_width()), seed + 2)) {}

  std::size_t out_size() const { return q.size(); }

  std::vector<float> reference(const kvheads::AttentionOptions& options, std::vector<float>* lse = nullptr) const {
    std::vector<float> out(out_size(), -123.f);
    if (lse) lse->assign(std::size_t(q_len) * std::size_t(layout.q_heads), -123.f);
    kvheads::reference_attend(q.data(), k.data(), v.data(), out.data(), q_len, kv_len, layout, options,
                              lse ? lse->data() : nullptr);
    return out;
  }
};

/// Max |a - b| relative to max(max |b|, floor); NaN anywhere gives +inf.
inline double relative_error(const std::vector<float>& actual, const std::vector<float>& expected,
                             double floor = 1e-3) {
  if (actual.size() != expected.size()) return INFINITY;
  double magnitude = floor, worst = 0;
  for (float x : expected) magnitude = std::max(magnitude, double(std::fabs(x)));
  for (std::size_t i = 0; i < actual.size(); ++i) {
    if (std::isnan(actual[i]) != std::isnan(expected[i])) return INFINITY;
    if (std::isnan(expected[i])) continue;
    if (std::isinf(expected[i]) || std::isinf(actual[i])) {
      if (actual[i] != expected[i]) return INFINITY;
      continue;
    }
    worst = std::max(worst, std::fabs(double(actual[i]) - double(expected[i])));
  }
  return worst / magnitude;
}

inline std::string describe(const kvheads::HeadLayout& l, int q_len, int kv_len, const kvheads::AttentionOptions& o) {
  std::ostringstream s;
  s << "q_heads " << l.q_heads << " kv_heads " << l.kv_heads << " head_dim " << l.head_dim << " q_len " << q_len
    << " kv_len " << kv_len << " causal " << o.causal << " window " << o.window << " softcap " << o.softcap
    << " alibi " << o.alibi << " scale " << o.scale << " threads " << o.threads;
  return s.str();
}

/// The option sets every shape is checked with: none, each alone, and all combined.
inline std::vector<kvheads::AttentionOptions> option_sets() {
  std::vector<kvheads::AttentionOptions> sets(7);
  sets[1].causal = true;
  sets[2].window = 7;
  sets[3].softcap = 5.f;
  sets[4].alibi = true;
  sets[5].scale = 0.3f;
  sets[6].causal = true;
  sets[6].window = 20;
  sets[6].softcap = 10.f;
  sets[6].alibi = true;
  return sets;
}

constexpr double tolerance = 1e-5;

}  // namespace kvheads_test
