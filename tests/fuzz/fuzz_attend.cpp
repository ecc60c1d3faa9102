// libFuzzer target for attend(): the input bytes choose a head layout, lengths, options, a
// path (plain memory, float/bf16 cache, ring cache), an ISA this CPU runs and a seed for the
// data; the kernel's output and log-sum-exp must match kvheads::reference_attend within
// 1e-4 (relative to the largest |v|), and hold a NaN exactly where the reference does.
// Any mismatch abort()s with a description of the case.
//
// Lengths: q_len 0..40 with kv_len 0..300, or (a flag) q_len 0..2 with kv_len 300..3000,
// where decode splits the keys across threads.
// Data modes: normal (N(0, 1) data, any scale), large (integer data times powers of two,
// so every logit is exact in fp32 and reaches 1e4 .. 1e30; no ALiBi there, since adding a
// small bias to a huge fp32 logit rounds), NaN (up to three NaN planted in q, k or v) and
// inf (up to three of +-inf, +-FLT_MAX, +-FLT_MAX / 2, +-1e38 planted in q, k, v or a sink).
// The inf mode is compared with the fp32 limits the README documents taken into account
// (see InfModeCheck): only where fp32 cannot hold the reference's result may it differ.
//
// Build and run (see tests/fuzz/README.md; -march=native compiles the AVX2/AVX-512 paths in):
//   clang++ -std=c++17 -g -O1 -march=native -fsanitize=fuzzer,address,undefined -Iinclude \
//     -I/usr/include/eigen3 tests/fuzz/fuzz_attend.cpp -o build-fuzz/fuzz_attend
//   build-fuzz/fuzz_attend -max_total_time=60 <scratch-corpus-dir> tests/fuzz/corpus/attend
// Built with -DKVHEADS_FUZZ_STANDALONE it has a main() that runs the files named on the
// command line once each (the seed-corpus regression test in ctest uses that).
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "kvheads/attend.hpp"
#include "kvheads/core/logits.hpp"
#include "kvheads/core/reference.hpp"
#include "kvheads/kv_cache.hpp"
#include "kvheads/simd/simd.hpp"

namespace {

using kvheads::AttentionOptions;
using kvheads::HeadLayout;

/// Reads the input front to back; past its end every read is 0.
struct Reader {
  const std::uint8_t* data;
  std::size_t size;
  std::uint8_t byte() {
    if (size == 0) return 0;
    --size;
    return *data++;
  }
  std::uint16_t u16() { return std::uint16_t(byte() | (byte() << 8)); }
  std::uint32_t u32() { return std::uint32_t(u16()) | (std::uint32_t(u16()) << 16); }
};

enum class Path { plain, cache, cache_bf16, ring };
enum class Mode { normal, large, nan, inf };

/// One value the inf mode planted, kept to describe a failing case.
struct Plant {
  char where;  // 'q', 'k', 'v' or 's' (a sink)
  std::size_t index;
  float value;
};

struct Case {
  HeadLayout layout{};
  int q_len = 0, kv_len = 0;
  AttentionOptions options;
  std::vector<float> sinks;
  Path path = Path::plain;
  Mode mode = Mode::normal;
  bool with_lse = false;
  int isa = 0;
  std::uint32_t seed = 0;
  std::vector<float> q, k, v;
  int chunk = 1;  // append chunk size for the cache paths
  std::vector<Plant> plants;
};

const char* path_name(Path p) {
  switch (p) {
    case Path::plain: return "plain";
    case Path::cache: return "cache";
    case Path::cache_bf16: return "cache_bf16";
    default: return "ring";
  }
}

const char* mode_name(Mode m) {
  return m == Mode::normal ? "normal" : m == Mode::large ? "large" : m == Mode::nan ? "nan" : "inf";
}

/// The ISAs compiled in that this CPU runs, with a runner each.
struct IsaRunner {
  const char* name;
  void (*plain)(const Case&, float*, float*);
  void (*cached)(const Case&, float*, float*);
};

template <class T>
void fill_cache(kvheads::KvCache<T>& cache, const Case& c) {
  for (int done = 0; done < c.kv_len;) {
    const int n = std::min(c.chunk, c.kv_len - done);
    cache.append(c.k.data() + std::ptrdiff_t(done) * c.layout.kv_width(),
                 c.v.data() + std::ptrdiff_t(done) * c.layout.kv_width(), n);
    done += n;
  }
}

template <class Isa>
void run_plain(const Case& c, float* out, float* lse) {
  kvheads::attend<Isa>(c.q.data(), c.k.data(), c.v.data(), out, c.q_len, c.kv_len, c.layout, c.options, lse);
}

template <class Isa>
void run_cached(const Case& c, float* out, float* lse) {
  if (c.path == Path::cache_bf16) {
    kvheads::KvCache<kvheads::bf16> cache(c.layout, c.kv_len);
    fill_cache(cache, c);
    kvheads::attend<Isa>(c.q.data(), c.q_len, cache, out, c.options, lse);
  } else if (c.path == Path::ring) {
    auto cache = kvheads::KvCache<float>::ring(c.layout, c.options.window, std::max(1, c.q_len));
    fill_cache(cache, c);
    kvheads::attend<Isa>(c.q.data(), c.q_len, cache, out, c.options, lse);
  } else {
    kvheads::KvCache<float> cache(c.layout, c.kv_len);
    fill_cache(cache, c);
    kvheads::attend<Isa>(c.q.data(), c.q_len, cache, out, c.options, lse);
  }
}

const std::vector<IsaRunner>& runners() {
  static const std::vector<IsaRunner> list = [] {
    std::vector<IsaRunner> out;
    kvheads::simd::for_each_enabled_isa([&](auto isa) {
      using Isa = decltype(isa);
      if (kvheads::simd::cpu_supports<Isa>()) out.push_back({Isa::name, &run_plain<Isa>, &run_cached<Isa>});
    });
    return out;
  }();
  return list;
}

float bf16_round(float x) { return kvheads::bf16::from_float(x).to_float(); }

/// KVHEADS_FUZZ_MODE=normal|large|nan|inf fuzzes that data mode alone (a failing input
/// then reproduces with the same setting).
std::optional<Mode> only_mode() {
  static const std::optional<Mode> mode = []() -> std::optional<Mode> {
    const char* name = std::getenv("KVHEADS_FUZZ_MODE");
    if (!name || !*name) return std::nullopt;
    for (Mode m : {Mode::normal, Mode::large, Mode::nan, Mode::inf})
      if (std::string(name) == mode_name(m)) return m;
    std::fprintf(stderr, "KVHEADS_FUZZ_MODE=%s: not one of normal, large, nan, inf\n", name);
    std::exit(2);
  }();
  return mode;
}

Case decode(Reader& in) {
  Case c;
  const int q_heads = 1 + in.byte() % 16;
  std::vector<int> divisors;
  for (int d = 1; d <= q_heads; ++d)
    if (q_heads % d == 0) divisors.push_back(d);
  const int kv_heads = divisors[in.byte() % divisors.size()];
  c.layout = HeadLayout{q_heads, kv_heads, 1 + in.byte() % 80};
  c.q_len = in.byte() % 41;
  c.kv_len = in.u16() % 301;
  const std::uint8_t flags = in.byte();
  c.options.causal = flags & 1;
  c.options.alibi = flags & 2;
  const bool softcap = flags & 4, window = flags & 8, scale = flags & 16, sinks = flags & 32;
  c.with_lse = flags & 64;
  if (flags & 128) {  // a long context (few queries, so the reference stays quick): key splits
    c.kv_len = 300 + c.kv_len * 9;
    c.q_len %= 3;
  }
  const std::uint8_t window_byte = in.byte(), softcap_byte = in.byte(), scale_byte = in.byte();
  c.options.window = window ? 1 + window_byte % 64 : 0;
  c.options.softcap = softcap ? 0.5f + float(softcap_byte) / 8.f : 0.f;
  c.options.threads = 1 + in.byte() % 3;
  const std::uint8_t mode = in.byte();
  // The inf mode takes half of the planting slot, so the older seeds decode as before.
  c.mode = mode % 3 == 1 ? Mode::normal : mode % 3 == 2 ? Mode::large : (mode / 3) % 2 ? Mode::inf : Mode::nan;
  if (const std::optional<Mode> only = only_mode()) c.mode = *only;
  const std::uint8_t path = in.byte();
  c.path = Path(path % 4);
  c.chunk = 1 + (path >> 2) % 64;
  c.isa = in.byte() % int(runners().size());
  c.seed = in.u32();
  if (c.path != Path::plain && (c.kv_len == 0 || c.q_len > c.kv_len)) c.path = Path::plain;
  if (c.path == Path::ring && c.options.window == 0) c.path = Path::cache;

  const std::size_t n_q = std::size_t(c.q_len) * c.layout.q_width();
  const std::size_t n_kv = std::size_t(c.kv_len) * c.layout.kv_width();
  std::mt19937 rng(c.seed);
  c.q.resize(n_q);
  c.k.resize(n_kv);
  c.v.resize(n_kv);
  if (c.mode == Mode::large) {
    // Integers in [-30, 30] times powers of two: |q.k| <= 900 * 80 units, exact in fp32, and
    // the scale is a power of two too, so the kernel's logits equal the reference's.
    std::uniform_int_distribution<int> small(-30, 30);
    const float q_unit = std::ldexp(1.f, int(scale_byte % 40)), k_unit = std::ldexp(1.f, int((scale_byte >> 3) % 40));
    for (float& x : c.q) x = float(small(rng)) * q_unit;
    for (float& x : c.k) x = float(small(rng)) * k_unit;
    std::normal_distribution<float> normal(0.f, 1.f);
    for (float& x : c.v) x = normal(rng);
    c.options.scale = std::ldexp(1.f, -int(scale_byte % 4));
    c.options.alibi = false;
  } else {
    std::normal_distribution<float> normal(0.f, 1.f);
    for (auto* x : {&c.q, &c.k, &c.v})
      for (float& y : *x) y = normal(rng);
    if (scale) c.options.scale = float(1 + scale_byte) / 64.f;
  }
  if (c.mode == Mode::nan) {
    for (int i = 0; i < 3; ++i) {
      const std::uint8_t target = in.byte();
      const std::uint32_t where = in.u32();
      std::vector<float>* x = target % 4 == 0 ? &c.q : target % 4 == 1 ? &c.k : target % 4 == 2 ? &c.v : nullptr;
      if (x && !x->empty()) (*x)[where % x->size()] = std::numeric_limits<float>::quiet_NaN();
    }
  }
  // Infinities and values at the edge of fp32's range, where it overflows first.
  static constexpr float huge[] = {std::numeric_limits<float>::infinity(), std::numeric_limits<float>::max(),
                                   std::numeric_limits<float>::max() / 2, 1e38f};
  std::vector<std::pair<std::uint32_t, float>> sink_plants;
  if (c.mode == Mode::inf) {
    for (int i = 0; i < 3; ++i) {
      const std::uint8_t target = in.byte();
      const std::uint32_t where = in.u32();
      const float value = (target & 4 ? -1.f : 1.f) * huge[(target >> 3) % 4];
      std::vector<float>* x = target % 4 == 0 ? &c.q : target % 4 == 1 ? &c.k : target % 4 == 2 ? &c.v : nullptr;
      if (x && !x->empty()) {
        (*x)[where % x->size()] = value;
        c.plants.push_back({"qkv"[target % 4], where % x->size(), value});
      }
      if (!x) sink_plants.emplace_back(where, value);
    }
  }
  if (c.path == Path::cache_bf16) {  // the bf16 cache then stores exactly these values
    for (float& x : c.k) x = bf16_round(x);
    for (float& x : c.v) x = bf16_round(x);
  }
  if (sinks) {
    std::normal_distribution<float> normal(0.f, 2.f);
    c.sinks.resize(std::size_t(q_heads));
    for (float& s : c.sinks) s = normal(rng);
    for (const auto& [where, value] : sink_plants) {
      c.sinks[where % c.sinks.size()] = value;
      c.plants.push_back({'s', where % c.sinks.size(), value});
    }
    c.options.sinks = c.sinks.data();
  }
  return c;
}

[[noreturn]] void fail(const Case& c, const char* what, std::size_t index, float got, float want) {
  std::fprintf(stderr,
               "fuzz_attend MISMATCH (%s) at %zu: got %.9g, reference %.9g\n"
               "  isa %s path %s mode %s q_heads %d kv_heads %d head_dim %d q_len %d kv_len %d\n"
               "  causal %d window %d softcap %g alibi %d scale %g threads %d sinks %d lse %d chunk %d seed %u\n",
               what, index, double(got), double(want), runners()[std::size_t(c.isa)].name, path_name(c.path),
               mode_name(c.mode), c.layout.q_heads, c.layout.kv_heads, c.layout.head_dim, c.q_len, c.kv_len,
               int(c.options.causal), c.options.window, double(c.options.softcap), int(c.options.alibi),
               double(c.options.scale), c.options.threads, int(c.options.sinks != nullptr), int(c.with_lse), c.chunk,
               c.seed);
  for (const Plant& p : c.plants)  // stored values: a bf16 cache holds them rounded
    std::fprintf(stderr, "  planted %c[%zu] = %g\n", p.where, p.index,
                 double(p.where == 'q' ? c.q[p.index] : p.where == 'k' ? c.k[p.index]
                        : p.where == 'v' ? c.v[p.index] : c.sinks[p.index]));
  std::abort();
}

/// NaN exactly where the reference has NaN; elsewhere |got - want| <= tol (infinities equal).
void compare(const Case& c, const char* what, const std::vector<float>& got, const std::vector<float>& want,
             double tol) {
  for (std::size_t i = 0; i < want.size(); ++i) {
    const float a = got[i], e = want[i];
    if (std::isnan(a) || std::isnan(e)) {
      if (std::isnan(a) != std::isnan(e)) fail(c, what, i, a, e);
      continue;
    }
    if (std::isinf(a) || std::isinf(e)) {
      if (a != e) fail(c, what, i, a, e);
      continue;
    }
    if (!(std::fabs(double(a) - double(e)) <= tol)) fail(c, what, i, a, e);
  }
}

// --- The inf mode: the reference's result where fp32 can hold it, and only there leeway. ---
//
// fp32 differs from the double reference in three documented ways (README, "Extreme
// values" and "NaN stays in its rows"); each exemption below is worked out per row (or per
// output element) from the case's own numbers, so every other element is held to the rule
// of the other modes (NaN exactly where the reference has NaN, the same +-inf, else within
// 1e-4):
//  1. P.V sums values in fp32, each weighted by at most 1 (by exactly 1 when its key is the
//     running max), so an output element whose visible |v| sum to about FLT_MAX may overflow
//     to +-inf, or NaN once an inf meets its opposite or a rescale of 0: it may be
//     non-finite where the reference is not.
//  2. A key weight below 2^-126 is subnormal or 0 in fp32 (exp of a gap past ~87; 0 on
//     every ISA past 110), so a visible +-inf value behind it gives 0 * inf = NaN where the
//     reference's tiny weight gives +-inf, and a huge finite value's contribution is lost.
//     Weights under kUnderflowWeight (2^-120, room for logit error) count as such: their
//     contribution (under 2^-120 * FLT_MAX = 256 each) widens the tolerance.
//  3. Logits are fp32 (|scale * q.k| < FLT_MAX): a logit, or a q.k partial sum, past it
//     overflows to +-inf (NaN when both signs do). The expected row is then the reference's
//     arithmetic on the logits fp32 gets (a +inf logit makes the row NaN, a -inf one weight
//     0); a key whose overflow depends on summation order makes its row unknown (skipped).
//     Finite logits of 1e30 and more carry fp32 rounding of 1e23 and more, so keys within
//     that of the top one take any share of the weight: such a row must lie within the
//     span of those keys' values, its lse between their smallest and largest logit.

constexpr double kFloatMax = std::numeric_limits<float>::max();
constexpr double kInf = std::numeric_limits<double>::infinity();
/// fp32 may make a normalised weight below this 0 (2^-126 with room for logit error).
constexpr double kUnderflowWeight = 0x1p-120;
/// exp_nonpositive is exactly 0 past a gap of 110 on every ISA; 120 leaves room.
constexpr double kZeroWeightGap = 120;
/// fp32 logits this far from the reference's make keys' shares of the weight unknown.
constexpr double kImpreciseLogit = 1;

/// A key's logit as the reference computes it (double) and as fp32 can: the value fp32
/// overflows to where it does, else the reference's value, within +-error.
struct KeyLogit {
  double exact = 0, fp32 = 0, error = 0;
  bool known = true;  // false: whether, or to which sign, fp32 overflows depends on the order
};

KeyLogit key_logit(const Case& c, const float* q_row, const float* k_row, double alibi_bias) {
  const int head_dim = c.layout.head_dim;
  const float scale = c.options.effective_scale(head_dim);
  const bool scales_logits = scale > 1.f;  // FusedTask::scales_logits: else q is staged times scale
  const double sum_rounding = (head_dim + 2) * 0x1p-23;
  double exact_dot = 0, finite_sum = 0, largest = 0;  // finite_sum: of the finite |products|
  bool inf_up = false, inf_down = false, nan = false, largest_up = false;
  for (int d = 0; d < head_dim; ++d) {
    exact_dot += double(q_row[d]) * double(k_row[d]);
    const float staged_q = scales_logits ? q_row[d] : scale * q_row[d];
    const double product = double(staged_q) * double(k_row[d]);  // exact: 24 x 24 bits
    if (std::isnan(product)) {
      nan = true;
    } else if (std::isinf(product)) {
      (product > 0 ? inf_up : inf_down) = true;
    } else {
      finite_sum += std::fabs(product);
      if (std::fabs(product) > largest) largest = std::fabs(product), largest_up = product > 0;
    }
  }
  KeyLogit out;
  out.exact = double(scale) * exact_dot;
  double fp32 = out.exact, error = 0;
  const auto stays_finite = [&](double sum) { return sum * (1 + sum_rounding) < kFloatMax; };
  if (nan || (inf_up && inf_down)) {
    fp32 = std::nan("");  // in any order
  } else if (inf_up || inf_down) {
    // The inf of an inf input stays, unless the finite products overflowed the other way
    // before it was added (mul then add: NaN; an FMA onto the inf keeps the inf).
    fp32 = inf_up ? kInf : -kInf;
    out.known = stays_finite(finite_sum);
  } else if (stays_finite(finite_sum)) {
    error = sum_rounding * finite_sum * (scales_logits ? double(scale) : 1.0);
    if (scales_logits) {  // the fp32 dot times the scale
      const double low = std::fabs(out.exact) - error, high = std::fabs(out.exact) + error;
      if (low > kFloatMax * (1 + 0x1p-20)) fp32 = out.exact > 0 ? kInf : -kInf;
      else if (high * (1 + 0x1p-22) >= kFloatMax) out.known = false;
      error += std::fabs(out.exact) * 0x1p-23;
    }
  } else {
    // One product past fp32's range by more than all the others can take back overflows
    // whenever it is added (an FMA too), the others' partial sums never do, and the inf
    // stays; anything else depends on the order.
    const double others = finite_sum - largest;
    out.known = stays_finite(others) && largest - others * (1 + sum_rounding) >= 0x1p128;
    fp32 = largest_up ? kInf : -kInf;
  }
  if (!std::isfinite(fp32)) error = 0;
  const double cap = c.options.softcap;
  if (cap > 0) {
    const auto capped = [cap](double x) { return cap * std::tanh(x / cap); };
    out.exact = capped(out.exact);
    const double low = capped(fp32 - error), high = capped(fp32 + error);
    fp32 = capped(fp32);
    error = (std::isfinite(fp32) && std::isfinite(low) ? std::max(high - fp32, fp32 - low) : 0) + 0x1p-20 * cap;
  }
  out.exact += alibi_bias;
  fp32 += alibi_bias;
  if (std::isfinite(fp32)) error += 0x1p-20 * (std::fabs(alibi_bias) + std::fabs(fp32));
  out.fp32 = fp32;
  out.error = error;
  return out;
}

bool same_value(double a, double b) { return a == b || (std::isnan(a) && std::isnan(b)); }

/// What fp32 can give for one (query, head) row, by the rules atop the inf mode.
struct RowModel {
  std::ptrdiff_t first = 0, last = -1;  // visible keys
  std::vector<KeyLogit> logits;         // [key - first]
  bool known = true;
  bool overflowed = false;          // some fp32 logit is not the reference's: expect alt_out, alt_lse
  std::vector<double> weight;       // softmax weight of each visible key on the fp32 logits
  std::vector<char> may_weigh;      // the key may have weight in fp32 (within kZeroWeightGap of the top)
  bool sink_may_weigh = false;
  int weighing = 0;                 // keys (and the sink) that may
  bool imprecise = false;           // two or more may, one of them with a logit error above kImpreciseLogit
  double top_error = 0;             // the largest logit error among those that may weigh
  double lse_low = 0, lse_high = 0; // where an imprecise row's lse lies
  std::vector<float> alt_out;
  float alt_lse = 0;
};

RowModel model_row(const Case& c, std::ptrdiff_t query, int head, const std::vector<double>& slopes) {
  RowModel m;
  const HeadLayout& layout = c.layout;
  const int head_dim = layout.head_dim, kv_head = layout.kv_head_of(head);
  const std::ptrdiff_t position = std::ptrdiff_t(c.kv_len) - c.q_len + query;
  const auto range = kvheads::detail::visible_keys(position, c.kv_len, c.options.causal, c.options.window);
  m.first = range.first;
  m.last = range.last;
  const float* q_row = c.q.data() + query * layout.q_width() + std::ptrdiff_t(head) * head_dim;
  const auto v_row = [&](std::ptrdiff_t j) { return c.v.data() + j * layout.kv_width() + std::ptrdiff_t(kv_head) * head_dim; };
  for (std::ptrdiff_t j = m.first; j <= m.last; ++j) {
    const double bias = c.options.alibi ? slopes[std::size_t(head)] * double(j - position) : 0.0;
    const KeyLogit logit = key_logit(c, q_row, c.k.data() + j * layout.kv_width() + std::ptrdiff_t(kv_head) * head_dim, bias);
    m.known &= logit.known;
    m.overflowed |= !same_value(logit.exact, logit.fp32);
    m.logits.push_back(logit);
  }
  const bool has_sink = c.options.sinks != nullptr;
  const double sink = has_sink ? double(c.options.sinks[head]) : 0.0;

  // The reference's arithmetic on the fp32 logits: its result where they differ, and the
  // weights the exemptions go by.
  double max = -kInf;
  for (const KeyLogit& l : m.logits)
    if (!(l.fp32 <= max) && !std::isnan(max)) max = l.fp32;
  if (has_sink && !(sink <= max) && !std::isnan(max)) max = sink;
  const bool no_weight = max == -kInf;
  double sum = has_sink ? std::exp(sink - max) : 0.0;
  for (const KeyLogit& l : m.logits) {
    m.weight.push_back(no_weight ? 0.0 : std::exp(l.fp32 - max));
    sum += m.weight.back();
  }
  for (double& w : m.weight) w /= sum;
  const bool none_visible = m.first > m.last || no_weight;
  m.alt_out.assign(std::size_t(head_dim), 0.f);
  for (int d = 0; d < head_dim && !none_visible; ++d) {
    double acc = 0;
    for (std::ptrdiff_t j = m.first; j <= m.last; ++j)
      acc += std::exp(m.logits[std::size_t(j - m.first)].fp32 - max) * double(v_row(j)[d]);
    m.alt_out[std::size_t(d)] = float(acc / sum);
  }
  m.alt_lse = none_visible && !has_sink ? -std::numeric_limits<float>::infinity() : float(max + std::log(sum));

  // Keys fp32 surely gives weight 0 (a gap past kZeroWeightGap from a logit surely above).
  double top_low = has_sink ? sink : -kInf, top_high = top_low;
  for (const KeyLogit& l : m.logits)
    if (l.fp32 - l.error > top_low) top_low = l.fp32 - l.error;
  m.may_weigh.assign(m.logits.size(), 0);
  if (top_low > -kInf) {
    for (std::size_t j = 0; j < m.logits.size(); ++j) {
      const KeyLogit& l = m.logits[j];
      if (!(l.fp32 + l.error >= top_low - kZeroWeightGap)) continue;
      m.may_weigh[j] = 1;
      ++m.weighing;
      m.top_error = std::max(m.top_error, l.error);
      top_high = std::max(top_high, l.fp32 + l.error);
    }
    m.sink_may_weigh = has_sink && sink >= top_low - kZeroWeightGap;
    m.weighing += m.sink_may_weigh;
  }
  m.imprecise = m.weighing >= 2 && m.top_error > kImpreciseLogit;
  m.lse_low = top_low;
  m.lse_high = top_high + std::log(double(m.logits.size()) + 1.0);
  return m;
}

/// How often each exemption let a difference through (KVHEADS_FUZZ_STATS=1 prints them).
struct InfModeStats {
  long rows = 0, unknown_rows = 0, overflowed_rows = 0, imprecise_rows = 0;
  long pv_overflow = 0, underflowed_inf = 0, underflowed_finite = 0;
  ~InfModeStats() {
    if (std::getenv("KVHEADS_FUZZ_STATS"))
      std::fprintf(stderr,
                   "inf mode: %ld rows: %ld unknown (skipped), %ld with overflowed logits, %ld imprecise; "
                   "elements let through: %ld P.V overflow, %ld NaN behind an underflowed inf, %ld by a lost "
                   "underflowed contribution\n",
                   rows, unknown_rows, overflowed_rows, imprecise_rows, pv_overflow, underflowed_inf,
                   underflowed_finite);
  }
};
InfModeStats inf_stats;

void compare_inf_mode(const Case& c, const std::vector<float>& got, const std::vector<float>& want,
                      const std::vector<float>& got_lse, const std::vector<float>& want_lse) {
  const HeadLayout& layout = c.layout;
  const int head_dim = layout.head_dim;
  // The tolerance of the other modes, from the values as drawn; a planted value adds its
  // share in the rows that weigh it.
  std::vector<char> planted_v(c.v.size(), 0);
  for (const Plant& p : c.plants)
    if (p.where == 'v') planted_v[p.index] = 1;
  double drawn_v_max = 1.0;
  for (std::size_t i = 0; i < c.v.size(); ++i)
    if (!planted_v[i]) drawn_v_max = std::max(drawn_v_max, double(std::fabs(c.v[i])));
  const std::vector<double> slopes = kvheads::detail::alibi_slopes(layout.q_heads);
  for (std::ptrdiff_t query = 0; query < c.q_len; ++query) {
    for (int head = 0; head < layout.q_heads; ++head) {
      const RowModel m = model_row(c, query, head, slopes);
      ++inf_stats.rows;
      if (!m.known) {
        ++inf_stats.unknown_rows;
        continue;
      }
      inf_stats.overflowed_rows += m.overflowed;
      inf_stats.imprecise_rows += m.imprecise;
      const std::size_t row = std::size_t(query * layout.q_heads + head);
      const float* want_row = m.overflowed ? m.alt_out.data() : want.data() + row * std::size_t(head_dim);
      const float* got_row = got.data() + row * std::size_t(head_dim);
      const int kv_head = layout.kv_head_of(head);
      for (int d = 0; d < head_dim; ++d) {
        const std::size_t index = row * std::size_t(head_dim) + std::size_t(d);
        double abs_sum = 0, weighted = 0, underflowed = 0, low = m.sink_may_weigh ? 0 : kInf,
               high = m.sink_may_weigh ? 0 : -kInf;
        bool underflowed_inf = false;
        for (std::ptrdiff_t j = m.first; j <= m.last; ++j) {
          const std::size_t key = std::size_t(j - m.first);
          const double x = c.v[std::size_t(j) * layout.kv_width() + std::size_t(kv_head * head_dim + d)];
          const double w = m.weight[key];
          const bool may_underflow = m.imprecise || !m.may_weigh[key] || w < kUnderflowWeight;
          if (std::isinf(x)) underflowed_inf |= may_underflow;
          if (!std::isfinite(x)) continue;
          abs_sum += std::fabs(x);
          weighted += w * std::fabs(x);
          if (may_underflow) underflowed += w * std::fabs(x);
          if (m.may_weigh[key]) low = std::min(low, x), high = std::max(high, x);
        }
        const bool pv_may_overflow = abs_sum >= kFloatMax * (1 - 0x1p-10);
        const float a = got_row[d], e = want_row[d];
        if (std::isnan(e)) {
          if (!std::isnan(a)) fail(c, "out (inf mode: the reference is NaN)", index, a, e);
          continue;
        }
        if (std::isinf(e) && a != e) {  // an inf value with weight: +-inf, or NaN where fp32 loses the weight
          if (!std::isnan(a)) fail(c, "out (inf mode: not the reference's inf)", index, a, e);
          if (underflowed_inf) ++inf_stats.underflowed_inf;
          else if (pv_may_overflow) ++inf_stats.pv_overflow;
          else fail(c, "out (inf mode: NaN where no weight of an inf value can underflow)", index, a, e);
          continue;
        }
        if (std::isinf(e)) continue;
        if (!std::isfinite(a)) {
          if (!pv_may_overflow) fail(c, "out (inf mode: non-finite where fp32 need not be)", index, a, e);
          ++inf_stats.pv_overflow;
          continue;
        }
        const double tolerance = 1e-4 * std::max(drawn_v_max, m.imprecise ? std::max(std::fabs(low), std::fabs(high)) : weighted);
        if (m.imprecise) {
          if (!(a >= low - tolerance && a <= high + tolerance))
            fail(c, "out (inf mode: outside the values of the keys that may weigh)", index, a, e);
          continue;
        }
        const double error = std::fabs(double(a) - double(e));
        if (error <= tolerance) continue;
        if (error > tolerance + underflowed) fail(c, "out (inf mode)", index, a, e);
        ++inf_stats.underflowed_finite;
      }
      if (!c.with_lse) continue;
      const float a = got_lse[row], e = m.overflowed ? m.alt_lse : want_lse[row];
      if (std::isnan(a) || std::isnan(e)) {
        if (std::isnan(a) != std::isnan(e)) fail(c, "lse (inf mode)", row, a, e);
      } else if (m.imprecise) {
        const double tolerance = 1e-4 * std::max({1.0, std::fabs(m.lse_low), std::fabs(m.lse_high)});
        if (!(a >= m.lse_low - tolerance && a <= m.lse_high + tolerance))
          fail(c, "lse (inf mode: outside the logits of the keys that may weigh)", row, a, e);
      } else if (std::isinf(a) || std::isinf(e)) {
        if (a != e) fail(c, "lse (inf mode)", row, a, e);
      } else {
        const double tolerance = 1e-4 * std::max(1.0, std::fabs(double(e))) + m.top_error;
        if (!(std::fabs(double(a) - double(e)) <= tolerance)) fail(c, "lse (inf mode)", row, a, e);
      }
    }
  }
}

void run_case(const Case& c) {
  const std::size_t n_out = std::size_t(c.q_len) * c.layout.q_width();
  const std::size_t n_lse = std::size_t(c.q_len) * c.layout.q_heads;
  std::vector<float> want(n_out, -7.f), want_lse(n_lse, -7.f);
  kvheads::reference_attend(c.q.data(), c.k.data(), c.v.data(), want.data(), c.q_len, c.kv_len, c.layout, c.options,
                            want_lse.data());
  std::vector<float> got(n_out, -9.f), got_lse(n_lse, -9.f);
  const IsaRunner& runner = runners()[std::size_t(c.isa)];
  (c.path == Path::plain ? runner.plain : runner.cached)(c, got.data(), c.with_lse ? got_lse.data() : nullptr);
  if (c.mode == Mode::inf) return compare_inf_mode(c, got, want, got_lse, want_lse);

  // Outputs are convex combinations of values: errors scale with the largest |v|.
  double v_max = 1.0;
  for (float x : c.v)
    if (std::isfinite(x)) v_max = std::max(v_max, double(std::fabs(x)));
  compare(c, "out", got, want, 1e-4 * v_max);
  if (c.with_lse) {
    double lse_max = 1.0;
    for (float x : want_lse)
      if (std::isfinite(x)) lse_max = std::max(lse_max, double(std::fabs(x)));
    compare(c, "lse", got_lse, want_lse, 1e-4 * lse_max);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Reader in{data, size};
  const Case c = decode(in);
  run_case(c);
  return 0;
}

#ifdef KVHEADS_FUZZ_STANDALONE
// Runs every file named on the command line through the target once (no fuzzing).
int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    std::FILE* f = std::fopen(argv[i], "rb");
    if (!f) {
      std::fprintf(stderr, "cannot open %s\n", argv[i]);
      return 2;
    }
    std::vector<std::uint8_t> bytes;
    for (int ch; (ch = std::fgetc(f)) != EOF;) bytes.push_back(std::uint8_t(ch));
    std::fclose(f);
    LLVMFuzzerTestOneInput(bytes.data(), bytes.size());
    std::printf("ok %s (%zu bytes)\n", argv[i], bytes.size());
  }
  return 0;
}
#endif
