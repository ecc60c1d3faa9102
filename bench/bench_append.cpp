// KvCache::append of 1 token (a decode step) and of 512 (a prefill chunk) into fp32,
// bf16, fp16 and int8 caches (8 KV heads x head_dim 128), next to the parts of an append
// that were once scalar loops, each beside the loop it replaced, on the same values:
//   - the overflow check a bf16 / fp16 append makes before storing anything: its vector
//     form (simd::max_finite_magnitude, what append runs) and the scalar loop;
//   - fp16 conversion: simd::narrow (what append runs) and fp16::from_float lane by lane;
//   - int8 quantisation: KvStorage<int8_t>::store (what append runs) and the loop it
//     replaced, written with std::isfinite, std::fmax and std::clamp.
// The summary prints, from this one run, each append's time over bf16's, the check's
// share of the fp16 append, and each old loop's time over its replacement's.
//
// Run: ./build/bench/bench_append
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include <kvheads/kvheads.hpp>

#include "bench_common.hpp"

namespace {

const kvheads::HeadLayout kLayout{32, 8, 128};
constexpr int kTokens[] = {1, 512};

std::map<std::string, double> g_ns_per_call;  // case name -> mean ns per call

std::vector<float> values(int tokens, std::uint64_t seed) {
  std::vector<float> data(std::size_t(tokens) * std::size_t(kLayout.kv_width()));
  kvheads_bench::fill_random(data, seed);
  return data;
}

template <class T>
void bench_append(benchmark::State& state) {
  const int tokens = int(state.range(0));
  const std::vector<float> k = values(tokens, 1), v = values(tokens, 2);
  kvheads::KvCache<T> cache(kLayout, tokens);
  for (auto _ : state) {
    cache.append(k.data(), v.data(), tokens);
    cache.clear();
    benchmark::ClobberMemory();
  }
}

/// The check as append runs it, over k and v.
void bench_vector_check(benchmark::State& state) {
  const int tokens = int(state.range(0));
  const std::vector<float> k = values(tokens, 1), v = values(tokens, 2);
  const auto n = std::ptrdiff_t(k.size());
  for (auto _ : state) {
    float largest = kvheads::simd::max_finite_magnitude<kvheads::simd::default_isa>(k.data(), n);
    largest = std::max(largest, kvheads::simd::max_finite_magnitude<kvheads::simd::default_isa>(v.data(), n));
    benchmark::DoNotOptimize(largest);
  }
}

/// The scalar loop the vector pass replaced (kv_cache.hpp before 0bb3129), as a baseline.
void bench_scalar_check(benchmark::State& state) {
  const int tokens = int(state.range(0));
  const std::vector<float> k = values(tokens, 1), v = values(tokens, 2);
  const float limit = 65520.f, largest_float = std::numeric_limits<float>::max();
  const auto overflows = [&](float x) { return std::fabs(x) >= limit && std::fabs(x) <= largest_float; };
  for (auto _ : state) {
    bool any = false;
    for (float x : k) any |= overflows(x);
    for (float x : v) any |= overflows(x);
    benchmark::DoNotOptimize(any);
  }
}

/// fp16 conversion of k and v, as append runs it (narrow == true) or lane by lane.
template <bool narrow>
void bench_fp16_conversion(benchmark::State& state) {
  const int tokens = int(state.range(0));
  const std::vector<float> k = values(tokens, 1), v = values(tokens, 2);
  std::vector<kvheads::fp16> k_out(k.size()), v_out(v.size());
  const auto n = std::ptrdiff_t(k.size());
  for (auto _ : state) {
    if constexpr (narrow) {
      kvheads::simd::narrow<kvheads::simd::default_isa>(k.data(), k_out.data(), n);
      kvheads::simd::narrow<kvheads::simd::default_isa>(v.data(), v_out.data(), n);
    } else {
      for (std::ptrdiff_t i = 0; i < n; ++i) k_out[std::size_t(i)] = kvheads::fp16::from_float(k[std::size_t(i)]);
      for (std::ptrdiff_t i = 0; i < n; ++i) v_out[std::size_t(i)] = kvheads::fp16::from_float(v[std::size_t(i)]);
    }
    benchmark::DoNotOptimize(k_out.data());
    benchmark::DoNotOptimize(v_out.data());
    benchmark::ClobberMemory();
  }
}

/// int8 quantisation as kv_cache.hpp did it before the loops were made vectorisable.
void old_int8_store(const float* src, std::int8_t* dst, float* scale, int n) {
  float max = 0.f;
  bool finite = true;
  for (int i = 0; i < n; ++i) {
    finite = finite && std::isfinite(src[i]);
    max = std::fmax(max, std::fabs(src[i]));
  }
  if (!finite) {
    std::fill_n(dst, n, std::int8_t{0});
    *scale = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  *scale = max / 127.f;
  const double inverse = max > 0.f ? 127.0 / double(max) : 0.0;
  for (int i = 0; i < n; ++i) dst[i] = std::int8_t(std::clamp(std::nearbyint(double(src[i]) * inverse), -127.0, 127.0));
}

/// int8 quantisation of k and v row by row, as append runs it (current == true) or the old way.
template <bool current>
void bench_int8_quantisation(benchmark::State& state) {
  const int tokens = int(state.range(0));
  const std::vector<float> k = values(tokens, 1), v = values(tokens, 2);
  std::vector<std::int8_t> k_out(k.size()), v_out(v.size());
  const int head_dim = kLayout.head_dim, rows = tokens * kLayout.kv_heads;
  std::vector<float> scales(2 * std::size_t(rows));
  for (auto _ : state) {
    for (int row = 0; row < rows; ++row) {
      const std::size_t at = std::size_t(row) * std::size_t(head_dim);
      if constexpr (current) {
        kvheads::detail::KvStorage<std::int8_t>::store(k.data() + at, k_out.data() + at, &scales[2 * std::size_t(row)], head_dim);
        kvheads::detail::KvStorage<std::int8_t>::store(v.data() + at, v_out.data() + at, &scales[2 * std::size_t(row) + 1], head_dim);
      } else {
        old_int8_store(k.data() + at, k_out.data() + at, &scales[2 * std::size_t(row)], head_dim);
        old_int8_store(v.data() + at, v_out.data() + at, &scales[2 * std::size_t(row) + 1], head_dim);
      }
    }
    benchmark::DoNotOptimize(k_out.data());
    benchmark::DoNotOptimize(v_out.data());
    benchmark::ClobberMemory();
  }
}

double ns_per_unit(benchmark::TimeUnit unit) {
  switch (unit) {
    case benchmark::kMicrosecond: return 1e3;
    case benchmark::kMillisecond: return 1e6;
    case benchmark::kSecond: return 1e9;
    default: return 1.0;
  }
}

std::string name(const char* what, int tokens) { return std::string("append/") + what + "/tokens:" + std::to_string(tokens); }

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  for (int tokens : kTokens) {
    benchmark::RegisterBenchmark(name("fp32", tokens).c_str(), bench_append<float>)->Arg(tokens);
    benchmark::RegisterBenchmark(name("bf16", tokens).c_str(), bench_append<kvheads::bf16>)->Arg(tokens);
    benchmark::RegisterBenchmark(name("fp16", tokens).c_str(), bench_append<kvheads::fp16>)->Arg(tokens);
    benchmark::RegisterBenchmark(name("int8", tokens).c_str(), bench_append<std::int8_t>)->Arg(tokens);
    benchmark::RegisterBenchmark(name("check_vector", tokens).c_str(), bench_vector_check)->Arg(tokens);
    benchmark::RegisterBenchmark(name("check_scalar", tokens).c_str(), bench_scalar_check)->Arg(tokens);
    benchmark::RegisterBenchmark(name("fp16_narrow", tokens).c_str(), bench_fp16_conversion<true>)->Arg(tokens);
    benchmark::RegisterBenchmark(name("fp16_lane_by_lane", tokens).c_str(), bench_fp16_conversion<false>)->Arg(tokens);
    benchmark::RegisterBenchmark(name("int8_quantise", tokens).c_str(), bench_int8_quantisation<true>)->Arg(tokens);
    benchmark::RegisterBenchmark(name("int8_quantise_old", tokens).c_str(), bench_int8_quantisation<false>)->Arg(tokens);
  }
  // Keep each case's mean time per call for the summary.
  class Collector : public benchmark::ConsoleReporter {
   public:
    void ReportRuns(const std::vector<Run>& runs) override {
      for (const Run& run : runs)
        if (run.run_type == Run::RT_Iteration && run.iterations > 0)
          g_ns_per_call[run.benchmark_name()] = run.GetAdjustedRealTime() * ns_per_unit(run.time_unit);
      ConsoleReporter::ReportRuns(runs);
    }
  } reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  benchmark::Shutdown();

  std::printf("\nSummary (mean ns per call, this run):\n");
  for (int tokens : kTokens) {
    const auto at = [&](const char* what) {
      const auto found = g_ns_per_call.find(name(what, tokens) + "/" + std::to_string(tokens));
      return found == g_ns_per_call.end() ? 0.0 : found->second;
    };
    const double fp32 = at("fp32"), bf16 = at("bf16"), fp16 = at("fp16"), int8 = at("int8");
    const double vector_check = at("check_vector"), scalar_check = at("check_scalar");
    const double narrow = at("fp16_narrow"), lane_by_lane = at("fp16_lane_by_lane");
    const double quantise = at("int8_quantise"), quantise_old = at("int8_quantise_old");
    if (fp32 <= 0 || bf16 <= 0 || fp16 <= 0 || int8 <= 0 || vector_check <= 0 || scalar_check <= 0 || narrow <= 0 ||
        lane_by_lane <= 0 || quantise <= 0 || quantise_old <= 0)
      continue;  // a filter left a case out
    std::printf("  %d token(s): append time over bf16's: fp32 %.2fx, fp16 %.2fx, int8 %.2fx (bf16 %.0f ns)\n", tokens,
                fp32 / bf16, fp16 / bf16, int8 / bf16, bf16);
    std::printf("    fp16 check %.0f ns (%.1f%% of the fp16 append); the scalar loop it replaced: %.1fx its time\n",
                vector_check, 100 * vector_check / fp16, scalar_check / vector_check);
    std::printf("    fp16 conversion %.0f ns (%.1f%% of the fp16 append); lane by lane: %.1fx its time\n", narrow,
                100 * narrow / fp16, lane_by_lane / narrow);
    std::printf("    int8 quantisation %.0f ns (%.1f%% of the int8 append); the old loops: %.1fx its time\n", quantise,
                100 * quantise / int8, quantise_old / quantise);
  }
}
