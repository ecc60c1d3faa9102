// KvCache::append of 1 token (a decode step) and of 512 (a prefill chunk) into fp32,
// bf16, fp16 and int8 caches (8 KV heads x head_dim 128), next to the overflow check a
// bf16 / fp16 append makes before storing anything: its vector form
// (simd::max_finite_magnitude, what append runs) and the scalar loop it replaced, on the
// same values. The summary prints each check's share of the fp16 append and the scalar
// loop's time over the vector pass's, all from this one run.
//
// Run: ./build/bench/bench_append
#include <benchmark/benchmark.h>

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
    const double fp16 = at("fp16"), vector_check = at("check_vector"), scalar_check = at("check_scalar");
    if (fp16 <= 0 || vector_check <= 0 || scalar_check <= 0) continue;
    std::printf("  %d token(s): fp16 append %.0f ns; its check %.0f ns (%.1f%% of the append); the scalar loop it "
                "replaced %.0f ns (%.1f%% of the append, %.1fx the vector pass)\n",
                tokens, fp16, vector_check, 100 * vector_check / fp16, scalar_check, 100 * scalar_check / fp16,
                scalar_check / vector_check);
  }
}
