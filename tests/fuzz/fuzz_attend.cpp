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
// small bias to a huge fp32 logit rounds) and NaN (up to three NaN planted in q, k or v).
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
#include <random>
#include <string>
#include <vector>

#include "kvheads/attend.hpp"
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
enum class Mode { normal, large, nan };

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
};

const char* path_name(Path p) {
  switch (p) {
    case Path::plain: return "plain";
    case Path::cache: return "cache";
    case Path::cache_bf16: return "cache_bf16";
    default: return "ring";
  }
}

const char* mode_name(Mode m) { return m == Mode::normal ? "normal" : m == Mode::large ? "large" : "nan"; }

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
  c.mode = mode % 3 == 0 ? Mode::nan : mode % 3 == 1 ? Mode::normal : Mode::large;
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
  if (c.path == Path::cache_bf16) {  // the bf16 cache then stores exactly these values
    for (float& x : c.k) x = bf16_round(x);
    for (float& x : c.v) x = bf16_round(x);
  }
  if (sinks) {
    std::normal_distribution<float> normal(0.f, 2.f);
    c.sinks.resize(std::size_t(q_heads));
    for (float& s : c.sinks) s = normal(rng);
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

void run_case(const Case& c) {
  const std::size_t n_out = std::size_t(c.q_len) * c.layout.q_width();
  const std::size_t n_lse = std::size_t(c.q_len) * c.layout.q_heads;
  std::vector<float> want(n_out, -7.f), want_lse(n_lse, -7.f);
  kvheads::reference_attend(c.q.data(), c.k.data(), c.v.data(), want.data(), c.q_len, c.kv_len, c.layout, c.options,
                            want_lse.data());
  std::vector<float> got(n_out, -9.f), got_lse(n_lse, -9.f);
  const IsaRunner& runner = runners()[std::size_t(c.isa)];
  (c.path == Path::plain ? runner.plain : runner.cached)(c, got.data(), c.with_lse ? got_lse.data() : nullptr);

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
