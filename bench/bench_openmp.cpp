// The global pool on OpenMP against kvheads' own ThreadPool, on 2 threads: decode from a
// KvCache (MHA, GQA-8, MQA), causal prefill, and an empty parallel_for (the cost of a job
// alone). Built with OpenMP (bench/CMakeLists.txt), so ThreadPool::global() runs on
// OpenMP teams; the "pool" cases pass a ThreadPool(2) in options.pool. Both split the
// work alike, so their results are the same bits and only the threads differ.
// Every shape runs in three rounds, the two variants side by side in each; the summary
// gives the OpenMP / pool time ratio of each round and their median.
//
// Run: ./build/bench/bench_openmp [--benchmark_filter=decode]
// (OMP_NUM_THREADS must allow 2 threads; OMP_WAIT_POLICY and GOMP_SPINCOUNT change how
// long OpenMP's threads spin between calls, as kvheads::detail::kSpinMicroseconds does
// for the pool's.)
#include <benchmark/benchmark.h>
#include <omp.h>

#include <algorithm>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include <kvheads/kvheads.hpp>

#include "bench_common.hpp"

namespace {

constexpr int kQHeads = 32;
constexpr int kHeadDim = 128;
constexpr int kThreads = 2;
constexpr int kRounds = 3;

struct Shape {
  std::string name;
  int kv_heads;
  int q_len;
  int kv_len;
};

std::vector<Shape> shapes() {
  return {{"decode/kv_len:4096/MHA", 32, 1, 4096},      {"decode/kv_len:4096/GQA-8", 8, 1, 4096},
          {"decode/kv_len:4096/MQA", 1, 1, 4096},       {"decode/kv_len:16384/GQA-8", 8, 1, 16384},
          {"decode/kv_len:16384/MQA", 1, 1, 16384},     {"prefill_causal/len:512/GQA-8", 8, 512, 512}};
}

std::string case_name(const std::string& shape, const char* runner, int round) {
  return shape + "/" + runner + "/round:" + std::to_string(round);
}

kvheads::ThreadPool& own_pool() {
  static kvheads::ThreadPool pool(kThreads);
  return pool;
}

void bench_attend(benchmark::State& state, const Shape& shape, bool on_openmp, int round) {
  const kvheads::HeadLayout layout{kQHeads, shape.kv_heads, kHeadDim};
  // One cache at a time, kept while its shape's cases run.
  static std::unique_ptr<kvheads::KvCache<float>> cache;
  static std::string cached_shape;
  if (!cache || cached_shape != shape.name) {
    cache.reset();
    cache = std::make_unique<kvheads::KvCache<float>>(layout, shape.kv_len);
    std::vector<float> k(std::size_t(256) * std::size_t(layout.kv_width())), v(k.size());
    for (int first = 0; first < shape.kv_len; first += 256) {
      kvheads_bench::fill_random(k, 2 + std::uint64_t(first));
      kvheads_bench::fill_random(v, 3 + std::uint64_t(first));
      cache->append(k.data(), v.data(), std::min(256, shape.kv_len - first));
    }
    cached_shape = shape.name;
  }
  std::vector<float> q(std::size_t(shape.q_len) * std::size_t(layout.q_width())), out(q.size());
  kvheads_bench::fill_random(q, 1);
  kvheads::AttentionOptions options;
  options.threads = kThreads;
  options.causal = shape.q_len > 1;
  options.pool = on_openmp ? nullptr : &own_pool();
  kvheads::attend(q.data(), shape.q_len, *cache, out.data(), options);  // warm: threads and scratch
  const kvheads_bench::Timing timing =
      kvheads_bench::timed_loop(state, [&] { kvheads::attend(q.data(), shape.q_len, *cache, out.data(), options); });
  kvheads_bench::Work work;
  work.bytes = double(cache->bytes_per_token()) * shape.kv_len;
  work.flops = 4.0 * kQHeads * kHeadDim * double(shape.kv_len) * shape.q_len * (options.causal ? 0.5 : 1.0);
  work.working_set = std::size_t(work.bytes);
  work.threads = kThreads;
  kvheads_bench::set_counters(state, work, timing);
  kvheads_bench::Result& result = kvheads_bench::results()[case_name(shape.name, on_openmp ? "openmp" : "pool", round)];
  result.work = work;
  result.timing = timing;
}

void bench_empty_job(benchmark::State& state, bool on_openmp, int round) {
  kvheads::ThreadPool& pool = on_openmp ? kvheads::ThreadPool::global() : own_pool();
  auto nothing = [](std::ptrdiff_t, int) {};
  kvheads::detail::parallel_for(pool, kThreads, kThreads, nothing);
  const kvheads_bench::Timing timing =
      kvheads_bench::timed_loop(state, [&] { kvheads::detail::parallel_for(pool, kThreads, kThreads, nothing); });
  kvheads_bench::Result& result = kvheads_bench::results()[case_name("empty_job", on_openmp ? "openmp" : "pool", round)];
  result.timing = timing;
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  if (kvheads::ThreadPool::global().size() < kThreads)
    std::printf("note: OpenMP offers %d thread(s) here (OMP_NUM_THREADS?), so its cases run on fewer than %d\n",
                kvheads::ThreadPool::global().size(), kThreads);
  std::vector<Shape> all = shapes();
  for (const Shape& shape : all)
    for (int round = 0; round < kRounds; ++round)
      for (bool on_openmp : {false, true})
        benchmark::RegisterBenchmark(case_name(shape.name, on_openmp ? "openmp" : "pool", round).c_str(),
                                     [=](benchmark::State& state) { bench_attend(state, shape, on_openmp, round); })
            ->UseManualTime()
            ->Unit(benchmark::kMicrosecond);
  for (int round = 0; round < kRounds; ++round)
    for (bool on_openmp : {false, true})
      benchmark::RegisterBenchmark(case_name("empty_job", on_openmp ? "openmp" : "pool", round).c_str(),
                                   [=](benchmark::State& state) { bench_empty_job(state, on_openmp, round); })
          ->UseManualTime()
          ->Unit(benchmark::kMicrosecond);
  benchmark::RunSpecifiedBenchmarks();

  std::printf("\nSummary: time on OpenMP / time on kvheads' ThreadPool, %d threads (per round; median)\n", kThreads);
  all.push_back({"empty_job", 0, 0, 0});
  for (const Shape& shape : all) {
    std::vector<double> ratios;
    for (int round = 0; round < kRounds; ++round) {
      const kvheads_bench::Result* pool = kvheads_bench::find_result(case_name(shape.name, "pool", round));
      const kvheads_bench::Result* openmp = kvheads_bench::find_result(case_name(shape.name, "openmp", round));
      if (pool && openmp && pool->timing.mean > 0) ratios.push_back(openmp->timing.mean / pool->timing.mean);
    }
    if (ratios.empty()) continue;
    std::printf("%-32s", shape.name.c_str());
    for (double ratio : ratios) std::printf(" %.3f", ratio);
    std::sort(ratios.begin(), ratios.end());
    std::printf("  median %.3f\n", ratios[ratios.size() / 2]);
  }
  benchmark::Shutdown();
  return 0;
}
