// Decode against fp32, bf16, fp16 and int8 KV caches: the bytes streamed halve and quarter,
// so a memory-bound decode's time should follow. Each case reports the standard counters
// of bench_common.hpp (GBps of *stored* K/V bytes, roofline_ratio against the read
// bandwidth measured in this run) and a summary of time ratios to the fp32 cache.
//
// Run: ./build/bench/bench_cache_storage [--benchmark_filter=kv_len:16384]
#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <kvheads/kvheads.hpp>

#include "bench_common.hpp"

namespace {

constexpr int kQHeads = 32;
constexpr int kHeadDim = 128;
constexpr int kKvHeads[] = {32, 8, 1};
constexpr int kKvLens[] = {4096, 16384};
constexpr int kThreads[] = {1, 2};

template <class T>
const char* storage_name() {
  if constexpr (std::is_same_v<T, kvheads::bf16>) return "bf16";
  if constexpr (std::is_same_v<T, kvheads::fp16>) return "fp16";
  if constexpr (std::is_same_v<T, std::int8_t>) return "int8";
  return "fp32";
}

std::string case_name(const char* storage, int kv_heads, int kv_len, int threads) {
  const std::string layout = kv_heads == kQHeads ? "MHA" : kv_heads == 1 ? "MQA" : "GQA-" + std::to_string(kv_heads);
  return std::string("decode/") + storage + "/kv_len:" + std::to_string(kv_len) + "/" + layout +
         "/threads:" + std::to_string(threads);
}

template <class T>
void bench_decode(benchmark::State& state, int kv_heads, int kv_len, int threads) {
  const kvheads::HeadLayout layout{kQHeads, kv_heads, kHeadDim};
  // One cache per shape and type, kept across thread counts.
  static std::map<std::pair<int, int>, std::unique_ptr<kvheads::KvCache<T>>> caches;
  auto& cache = caches[{kv_heads, kv_len}];
  if (!cache) {
    caches.clear();  // the largest fp32 cache is 512 MiB: keep one alive at a time
    auto& fresh = caches[{kv_heads, kv_len}];
    fresh = std::make_unique<kvheads::KvCache<T>>(layout, kv_len);
    std::vector<float> k(std::size_t(256) * std::size_t(layout.kv_width())), v(k.size());
    for (int first = 0; first < kv_len; first += 256) {
      kvheads_bench::fill_random(k, 2 + std::uint64_t(first));
      kvheads_bench::fill_random(v, 3 + std::uint64_t(first));
      fresh->append(k.data(), v.data(), std::min(256, kv_len - first));
    }
  }
  auto& live = caches[{kv_heads, kv_len}];
  std::vector<float> q(std::size_t(layout.q_width())), out(q.size());
  kvheads_bench::fill_random(q, 1);
  kvheads::AttentionOptions options;
  options.threads = threads;
  kvheads::attend(q.data(), 1, *live, out.data(), options);  // warm: pool and scratch
  const kvheads_bench::Timing timing =
      kvheads_bench::timed_loop(state, [&] { kvheads::attend(q.data(), 1, *live, out.data(), options); });
  kvheads_bench::Work work;
  work.bytes = double(live->bytes_per_token()) * kv_len;
  work.flops = 4.0 * kQHeads * kHeadDim * kv_len;
  work.working_set = std::size_t(work.bytes);
  work.threads = threads;
  kvheads_bench::set_counters(state, work, timing);
  kvheads_bench::Result& result = kvheads_bench::results()[case_name(storage_name<T>(), kv_heads, kv_len, threads)];
  result.work = work;
  result.timing = timing;
}

template <class T>
void register_type() {
  for (int kv_len : kKvLens)
    for (int kv_heads : kKvHeads)
      for (int threads : kThreads)
        benchmark::RegisterBenchmark(case_name(storage_name<T>(), kv_heads, kv_len, threads).c_str(),
                                     [=](benchmark::State& state) { bench_decode<T>(state, kv_heads, kv_len, threads); })
            ->UseManualTime()
            ->Unit(benchmark::kMillisecond);
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  // Register type by type so each shape's caches of one type run back to back.
  register_type<float>();
  register_type<kvheads::bf16>();
  register_type<kvheads::fp16>();
  register_type<std::int8_t>();

  std::vector<std::size_t> working_sets;
  for (int kv_len : kKvLens)
    for (int kv_heads : kKvHeads)
      for (std::size_t bytes_per_value : {4, 2, 1})
        working_sets.push_back(std::size_t(2) * std::size_t(kv_heads) * std::size_t(kv_len) * kHeadDim * bytes_per_value);
  kvheads_bench::MachineLimits& limits = kvheads_bench::machine_limits();
  limits.measure(working_sets, std::vector<int>(std::begin(kThreads), std::end(kThreads)));
  limits.print(stdout);
  limits.add_context();
  benchmark::RunSpecifiedBenchmarks();

  std::printf("\nSummary: time relative to the fp32 cache (bytes ratio in brackets), roofline ratio\n");
  for (int kv_len : kKvLens)
    for (int kv_heads : kKvHeads)
      for (int threads : kThreads) {
        const kvheads_bench::Result* base = kvheads_bench::find_result(case_name("fp32", kv_heads, kv_len, threads));
        if (!base) continue;
        std::printf("%-40s", case_name("*", kv_heads, kv_len, threads).c_str());
        for (const char* type : {"fp32", "bf16", "fp16", "int8"}) {
          const kvheads_bench::Result* r = kvheads_bench::find_result(case_name(type, kv_heads, kv_len, threads));
          if (!r) continue;
          std::printf("  %s %.2fx (%.2f) roof %.2f", type, r->timing.mean / base->timing.mean,
                      r->work.bytes / base->work.bytes, kvheads_bench::roofline_ratio(r->timing, r->work));
        }
        std::printf("\n");
      }
  benchmark::Shutdown();
  return 0;
}
