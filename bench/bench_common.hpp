#pragma once
// Helpers shared by the kvheads benchmarks:
//  - the machine's own limits, measured in the same run as the kernels: read bandwidth
//    (a vectorised sum over a buffer the size of the kernel's working set) and the fp32
//    FMA peak (a register-resident FMA loop), each on 1..N threads, best of a few runs;
//  - roofline arithmetic: the least time a case could take on this machine;
//  - per-case counters (GBps, GFLOPs, roofline_ratio, roofline_cpu, kv_bytes, cpu_util)
//    and a registry of the results, so a benchmark can print ratios computed from one
//    run in a summary table;
//  - every limit and ratio on two bases: wall time (the machine's limit when the cores
//    are ours) and CPU time (what the threads achieved while they ran, for a shared
//    machine whose other processes take the cores).
// Vector code goes through kvheads' own simd interface, so the limits are measured with
// the same vector width as the kernels.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <iterator>
#include <limits>
#include <map>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "kvheads/core/aligned_allocator.hpp"
#include "kvheads/core/fused_kernel.hpp"
#include "kvheads/simd/simd.hpp"
#if defined(__linux__)
#include <sched.h>
#endif

namespace kvheads_bench {

using Clock = std::chrono::steady_clock;

inline double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

inline constexpr double kGiga = 1e9;

// ---------------------------------------------------------------------------------------
// Data

/// Fills p[0..n) with uniform floats in [-1, 1) from a splitmix64 stream (fast enough
/// for several hundred MB; the values only need to be ordinary, finite and not all equal).
inline void fill_random(float* p, std::size_t n, std::uint64_t seed) {
  std::uint64_t state = seed * 0x9e3779b97f4a7c15ull + 0x632be59bd9b4e019ull;
  for (std::size_t i = 0; i < n; ++i) {
    state += 0x9e3779b97f4a7c15ull;
    std::uint64_t z = state;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    p[i] = float(z >> 40) * (2.0f / 16777216.0f) - 1.0f;  // 24 random bits
  }
}

inline void fill_random(std::vector<float>& v, std::uint64_t seed) { fill_random(v.data(), v.size(), seed); }

// ---------------------------------------------------------------------------------------
// Threads

/// Wall time of a multi-threaded run and the CPU time the process spent in it.
struct RunTime {
  double wall = 0;
  double cpu = 0;  // all threads (std::clock: process CPU time on POSIX)
};

/// Runs fn(thread) on `threads` threads (the caller is thread 0), released together
/// after all of them started; returns the wall time from that common start until the
/// last one finished, and the process CPU time over that interval. Thread creation is
/// outside the measured interval.
template <class Fn>
RunTime run_on_threads(int threads, Fn&& fn) {
  threads = std::max(threads, 1);
  std::atomic<int> ready{0};
  std::atomic<bool> go{false};
  std::vector<Clock::time_point> ends(static_cast<std::size_t>(threads));
  auto body = [&](int t) {
    while (!go.load(std::memory_order_acquire)) {
    }
    fn(t);
    ends[std::size_t(t)] = Clock::now();
  };
  std::vector<std::thread> workers;
  workers.reserve(std::size_t(threads - 1));
  for (int t = 1; t < threads; ++t)
    workers.emplace_back([&, t] {
      ready.fetch_add(1, std::memory_order_release);
      body(t);
    });
  while (ready.load(std::memory_order_acquire) != threads - 1) std::this_thread::yield();
  const std::clock_t cpu_start = std::clock();
  const Clock::time_point start = Clock::now();
  go.store(true, std::memory_order_release);
  body(0);
  for (std::thread& w : workers) w.join();
  RunTime time;
  time.cpu = double(std::clock() - cpu_start) / CLOCKS_PER_SEC;
  const Clock::time_point last = *std::max_element(ends.begin(), ends.end());
  time.wall = std::chrono::duration<double>(last - start).count();
  return time;
}

// ---------------------------------------------------------------------------------------
// Machine limits

/// Sum of p[0..n): several independent vector accumulators so the loop is bound by
/// loads, not by the latency of one add chain. `pages`: the decode kernels' one request
/// per 4 KiB page a few pages ahead (detail::PageAhead), which reads DRAM faster than
/// the plain loop on some cores (Zen 5, one core, 512 MiB: 33.4 against 28.6 GB/s).
inline constexpr int kSumVectors = 8;  // accumulators, and vectors read per step

template <class Isa>
float sum_floats(const float* p, std::size_t n, kvheads::detail::PageAhead pages = {}) {
  using V = typename Isa::vec;
  constexpr int kAcc = kSumVectors;
  constexpr std::size_t kStep = std::size_t(kAcc) * Isa::width;
  V acc[kAcc];
  for (int a = 0; a < kAcc; ++a) acc[a] = Isa::zero();
  std::size_t i = 0;
  for (; i + kStep <= n; i += kStep) {
    pages.row(p + i);
    for (int a = 0; a < kAcc; ++a) acc[a] = Isa::add(acc[a], Isa::load(p + i + std::size_t(a) * Isa::width));
  }
  for (int a = 1; a < kAcc; ++a) acc[0] = Isa::add(acc[0], acc[a]);
  float sum = Isa::reduce_sum(acc[0]);
  for (; i < n; ++i) sum += p[i];
  return sum;
}

/// Independent FMA chains kept in registers: kFmaChains<Isa> vectors, each updated once
/// per step, so the loop is bound by FMA throughput, not latency (latency 4 x 2 pipes = 8
/// chains needed on current cores). The chains and the loop's two constants must all fit
/// the ISA's registers: 16 chains on a 16-register ISA spill to the stack, and the loop
/// then measures the spills. AVX2 on Zen 5 (scratch probe, one core, best of 5): 105-110
/// GFLOP/s with 8-14 chains, 67 with 16; the kernels' causal prefill reached 104% of that
/// false peak.
template <class Isa>
inline constexpr int kFmaChains = Isa::registers >= 32 ? 16 : 12;

template <class Isa>
float fma_chains(std::int64_t steps, float seed) {
  using V = typename Isa::vec;
  constexpr int chains = kFmaChains<Isa>;
  static_assert(chains + 2 <= Isa::registers, "the FMA peak loop must not spill");
  V acc[chains];
  for (int c = 0; c < chains; ++c) acc[c] = Isa::broadcast(seed + 0.001f * float(c));
  const V a = Isa::broadcast(0.999999f);
  const V b = Isa::broadcast(1e-7f);
  for (std::int64_t s = 0; s < steps; ++s)
    for (int c = 0; c < chains; ++c) acc[c] = Isa::fma(acc[c], a, b);
  for (int c = 1; c < chains; ++c) acc[0] = Isa::add(acc[0], acc[c]);
  return Isa::reduce_sum(acc[0]);
}

/// How a rate is timed. `wall`: work / wall time, the machine's limit when the cores are
/// ours. `cpu`: work / (process CPU time / threads), the rate while the threads actually
/// ran; on a shared machine whose other processes take the cores it is the fairer basis
/// for a ratio (it removes descheduling, not the sharing of memory bandwidth or caches).
enum class Basis { wall, cpu };

/// The machine's own limits, measured once per run and cached.
/// Read bandwidth is measured per working-set size: summing the same buffer again and
/// again, as a benchmark attends the same K/V again and again, so a working set that
/// fits in a cache is compared with that cache's bandwidth and a large one with DRAM's.
/// Every figure exists on both bases (best run of each, separately).
class MachineLimits {
 public:
  using Isa = kvheads::simd::default_isa;

  /// Measures read bandwidth at every size in `working_sets` (bytes) and the FMA peak,
  /// each on every thread count in `thread_counts`; best of `repetitions` runs.
  void measure(std::vector<std::size_t> working_sets, const std::vector<int>& thread_counts, int repetitions = 5) {
    std::sort(working_sets.begin(), working_sets.end());
    working_sets.erase(std::unique(working_sets.begin(), working_sets.end()), working_sets.end());
    thread_counts_ = thread_counts;
    for (int threads : thread_counts) fma_[threads] = measure_fma_gflops(threads, repetitions);
    if (working_sets.empty()) return;
    // One buffer as large as the largest working set; smaller sets are its prefixes.
    // Allocated as a KvCache's planes are (huge pages where the system gives them), so
    // the kernels are held to the bandwidth their own memory can deliver.
    std::vector<float, kvheads::detail::AlignedAllocator<float>> buffer(working_sets.back() / sizeof(float) + 1, 1.0f);
    for (std::size_t bytes : working_sets)
      for (int threads : thread_counts)
        read_[{bytes, threads}] = measure_read_gbps(buffer.data(), bytes / sizeof(float), threads, repetitions);
  }

  /// GB/s (1e9 bytes/s) reading a working set of `bytes` (the nearest measured size at
  /// or above it, else the largest) on `threads` threads; 0 when nothing was measured.
  double read_gbps(std::size_t bytes, int threads, Basis basis = Basis::wall) const {
    double found = 0;
    for (const auto& [key, rates] : read_) {
      if (key.second != threads) continue;
      found = rates.on(basis);
      if (key.first >= bytes) break;
    }
    return found;
  }

  /// GB/s on the largest measured working set (the DRAM figure when it exceeds the caches).
  double largest_read_gbps(int threads, Basis basis = Basis::wall) const {
    return read_gbps(std::numeric_limits<std::size_t>::max(), threads, basis);
  }

  /// fp32 GFLOP/s (an FMA counts 2) on `threads` threads; 0 when not measured.
  double fma_gflops(int threads, Basis basis = Basis::wall) const {
    const auto it = fma_.find(threads);
    return it == fma_.end() ? 0.0 : it->second.on(basis);
  }

  bool measured() const { return !fma_.empty(); }

  /// The two limits that bound one case, measured now in one short burst (best of two
  /// runs after a warm-up run, each of the read runs at least 256 MiB and each FMA run
  /// ~5-10 ms): read bandwidth over the first `bytes` of `buffer` and the FMA peak, on
  /// `threads` threads. For rounds that alternate the limits with a case's own calls, so
  /// each ratio divides two figures taken within a fraction of a second of each other.
  struct Burst {
    double read_gbps = 0;
    double fma_gflops = 0;
  };
  static Burst measure_burst(const float* buffer, std::size_t bytes, int threads) {
    constexpr int kRepetitions = 2;
    constexpr std::size_t kBurstBytesPerRun = std::size_t(256) << 20;
    constexpr std::int64_t kBurstFmaSteps = std::int64_t(1) << 20;
    return {measure_read_gbps(buffer, bytes / sizeof(float), threads, kRepetitions, kBurstBytesPerRun).wall,
            measure_fma_gflops(threads, kRepetitions, kBurstFmaSteps).wall};
  }

  /// The limits as a small table: by wall time, then by CPU time.
  void print(std::FILE* out, const char* title = "Machine limits measured in this run") const {
    std::fprintf(out, "%s (ISA %s, %d floats per vector, best of runs):\n", title, Isa::name, Isa::width);
    std::fprintf(out, "  %-26s", "");
    for (const char* basis : {"wall", "CPU time"})
      for (int threads : thread_counts_)
        std::fprintf(out, "  %8s %dt", basis, threads);
    auto row = [&](const std::string& label, auto&& value) {
      std::fprintf(out, "\n  %-26s", label.c_str());
      for (Basis basis : {Basis::wall, Basis::cpu})
        for (int threads : thread_counts_) std::fprintf(out, "  %11.1f", value(threads, basis));
    };
    row("fp32 FMA peak, GFLOP/s", [&](int threads, Basis basis) { return fma_gflops(threads, basis); });
    std::size_t last = 0;
    for (const auto& entry : read_) {
      if (entry.first.first == last) continue;
      last = entry.first.first;
      row("read GB/s @ " + size_label(last),
          [&](int threads, Basis basis) { return read_gbps(last, threads, basis); });
    }
    std::fprintf(out, "\n");
    std::fflush(out);
  }

  /// The same figures as benchmark context (console header and JSON "context").
  void add_context() const {
    benchmark::AddCustomContext("kvheads_isa", Isa::name);
    for (int threads : thread_counts_) {
      benchmark::AddCustomContext("fma_peak_GFLOPs_" + std::to_string(threads) + "t",
                                  fixed(fma_gflops(threads), 1));
      benchmark::AddCustomContext("fma_peak_GFLOPs_" + std::to_string(threads) + "t_cpu",
                                  fixed(fma_gflops(threads, Basis::cpu), 1));
      for (const auto& entry : read_)
        if (entry.first.second == threads) {
          const std::string key = "read_GBps_" + std::to_string(threads) + "t_" + size_label(entry.first.first);
          benchmark::AddCustomContext(key, fixed(entry.second.wall, 1));
          benchmark::AddCustomContext(key + "_cpu", fixed(entry.second.cpu, 1));
        }
    }
  }

  static std::string size_label(std::size_t bytes) {
    const double mib = double(bytes) / (1024.0 * 1024.0);
    if (mib >= 1.0) return fixed(mib, mib == std::floor(mib) ? 0 : 1) + "MiB";
    return fixed(double(bytes) / 1024.0, 0) + "KiB";
  }

  static std::string fixed(double value, int decimals) {
    char text[64];
    std::snprintf(text, sizeof text, "%.*f", decimals, value);
    return text;
  }

 private:
  /// A rate on both bases.
  struct Rates {
    double wall = 0;
    double cpu = 0;
    double on(Basis basis) const { return basis == Basis::wall ? wall : cpu; }
  };

  // Best (shortest) wall and per-thread CPU time over the runs, as rates of `work`.
  struct Best {
    double wall = std::numeric_limits<double>::infinity();
    double cpu = std::numeric_limits<double>::infinity();
    void add(const RunTime& time, int threads) {
      wall = std::min(wall, time.wall);
      cpu = std::min(cpu, time.cpu / threads);
    }
    Rates rates(double work) const { return {work / wall, work / cpu}; }
  };

  /// The better of two loops: the plain sum and the sum with the decode kernels'
  /// page-ahead requests (see sum_floats), each timed on its own, so no kernel is held to
  /// a bandwidth its own requests beat.
  // Small sets are summed several times per run so one run lasts long enough to time
  // well (>= ~5 ms even at L2 speed; a sub-millisecond run is at the mercy of one
  // interrupt and of the CPU clock's accounting granularity).
  static constexpr std::size_t kMinBytesPerRun = std::size_t(1) << 30;
  static constexpr std::int64_t kFmaSteps = std::int64_t(1) << 22;  // ~20-40 ms per run

  static Rates measure_read_gbps(const float* buffer, std::size_t n, int threads, int repetitions,
                                 std::size_t min_bytes_per_run = kMinBytesPerRun) {
    using Page = kvheads::detail::PageAhead;
    constexpr std::ptrdiff_t step_bytes = kSumVectors * Isa::width * std::ptrdiff_t(sizeof(float));
    const Rates plain = measure_sum_gbps(buffer, n, threads, repetitions, Page{}, min_bytes_per_run);
    const Rates ahead = measure_sum_gbps(buffer, n, threads, repetitions,
                                         Page::rows(step_bytes, kvheads::detail::Tiling<Isa>::pages_ahead_few),
                                         min_bytes_per_run);
    return {std::max(plain.wall, ahead.wall), std::max(plain.cpu, ahead.cpu)};
  }

  static Rates measure_sum_gbps(const float* buffer, std::size_t n, int threads, int repetitions,
                                kvheads::detail::PageAhead pages, std::size_t min_bytes_per_run) {
    const std::size_t bytes = n * sizeof(float);
    const std::size_t passes = std::max<std::size_t>(1, (min_bytes_per_run + bytes - 1) / bytes);
    std::vector<float> sinks(static_cast<std::size_t>(threads));
    Best best;
    for (int rep = 0; rep < repetitions + 1; ++rep) {  // +1: the first run warms caches/TLB
      const RunTime time = run_on_threads(threads, [&](int t) {
        const std::size_t begin = n * std::size_t(t) / std::size_t(threads);
        const std::size_t end = n * std::size_t(t + 1) / std::size_t(threads);
        float sum = 0;
        for (std::size_t pass = 0; pass < passes; ++pass) {
          sum += sum_floats<Isa>(buffer + begin, end - begin, pages);
          benchmark::ClobberMemory();
        }
        sinks[std::size_t(t)] = sum;
      });
      if (rep > 0) best.add(time, threads);
    }
    benchmark::DoNotOptimize(sinks.data());
    return best.rates(double(bytes) * double(passes) / kGiga);
  }

  static Rates measure_fma_gflops(int threads, int repetitions, std::int64_t steps = kFmaSteps) {
    volatile float seed = 0.5f;                              // unknown to the compiler
    const float start = seed;
    std::vector<float> sinks(static_cast<std::size_t>(threads));
    Best best;
    for (int rep = 0; rep < repetitions + 1; ++rep) {  // +1: the first run lets clocks settle
      const RunTime time =
          run_on_threads(threads, [&](int t) { sinks[std::size_t(t)] = fma_chains<Isa>(steps, start + float(t)); });
      if (rep > 0) best.add(time, threads);
    }
    benchmark::DoNotOptimize(sinks.data());
    const double flops = double(threads) * double(steps) * kFmaChains<Isa> * Isa::width * 2.0;
    return best.rates(flops / kGiga);
  }

  std::vector<int> thread_counts_;
  std::map<std::pair<std::size_t, int>, Rates> read_;  // (bytes, threads) -> GB/s
  std::map<int, Rates> fma_;                          // threads -> GFLOP/s
};

/// The process-wide limits (measure() them once in main, before running benchmarks).
inline MachineLimits& machine_limits() {
  static MachineLimits limits;
  return limits;
}

// ---------------------------------------------------------------------------------------
// Roofline and counters

/// What one call of a case moves and computes.
struct Work {
  double bytes = 0;             // bytes that must be streamed (e.g. K + V)
  double flops = 0;             // useful fp32 flops (a multiply-add counts 2)
  std::size_t working_set = 0;  // bytes whose read bandwidth bounds the case
  int threads = 1;
};

/// The least time the case could take here: max(bytes / bandwidth, flops / FMA peak).
/// On Basis::cpu it is the least CPU time per thread (compare with Timing::cpu / threads).
inline double roofline_seconds(const Work& work, Basis basis = Basis::wall,
                               const MachineLimits& limits = machine_limits()) {
  const double bandwidth = limits.read_gbps(work.working_set, work.threads, basis) * kGiga;
  const double peak = limits.fma_gflops(work.threads, basis) * kGiga;
  const double memory = bandwidth > 0 ? work.bytes / bandwidth : 0.0;
  const double compute = peak > 0 ? work.flops / peak : 0.0;
  return std::max(memory, compute);
}

/// Per-iteration wall times of a benchmark loop.
struct Timing {
  double mean = 0;  // seconds per call (what Google Benchmark reports with manual time)
  double best = 0;  // fastest single call
  double cpu = 0;   // process CPU seconds per call, all threads (std::clock)
  std::int64_t iterations = 0;
  /// The CPU the calling thread was on after most calls (Linux; -1 elsewhere). A VM's
  /// cores can differ in speed (see bench/README.md), and a 1-thread case runs wherever
  /// the scheduler puts it: this tells two runs' figures apart.
  int main_cpu = -1;

  /// Share of `threads` cores the process actually held while timed: about 1 when the
  /// machine was ours, well below 1 when other processes took the cores (then the times
  /// measure the machine's load as much as the code).
  double cpu_utilisation(int threads) const { return mean > 0 ? cpu / (mean * std::max(threads, 1)) : 0.0; }
};

/// Roofline ratio on the wall-time basis: mean time per call / roofline (>= 1 expected).
inline double roofline_ratio(const Timing& timing, const Work& work) {
  const double roofline = roofline_seconds(work, Basis::wall);
  return roofline > 0 ? timing.mean / roofline : 0.0;
}

/// Roofline ratio on the CPU-time basis: CPU time per call and thread / the CPU-time
/// roofline. Close to the wall-time ratio on an idle machine; the better estimate when
/// other processes held the cores (cpu_utilisation well below 1). Idle pool workers that
/// spin count as busy, so on several threads it errs on the high (pessimistic) side.
inline double cpu_roofline_ratio(const Timing& timing, const Work& work) {
  const double roofline = roofline_seconds(work, Basis::cpu);
  return roofline > 0 ? timing.cpu / std::max(work.threads, 1) / roofline : 0.0;
}

/// Runs the benchmark loop timing each call of fn() with a steady clock; reports the
/// times through SetIterationTime (register the benchmark with UseManualTime()).
template <class Fn>
Timing timed_loop(benchmark::State& state, Fn&& fn) {
  double total = 0;
  double best = std::numeric_limits<double>::infinity();
  std::int64_t iterations = 0;
  std::int64_t calls_on_cpu[64] = {};
  const std::clock_t cpu_start = std::clock();
  for (auto _ : state) {
    const Clock::time_point start = Clock::now();
    fn();
    benchmark::ClobberMemory();
    const double seconds = seconds_since(start);
    state.SetIterationTime(seconds);
    total += seconds;
    best = std::min(best, seconds);
    ++iterations;
#if defined(__linux__)
    const int cpu = sched_getcpu();  // outside the timed region
    if (cpu >= 0 && cpu < 64) ++calls_on_cpu[cpu];
#endif
  }
  const double cpu_seconds = double(std::clock() - cpu_start) / CLOCKS_PER_SEC;
  Timing timing;
  timing.iterations = iterations;
  timing.cpu = iterations > 0 ? cpu_seconds / double(iterations) : 0.0;
  timing.mean = iterations > 0 ? total / double(iterations) : 0.0;
  timing.best = iterations > 0 ? best : 0.0;
  const std::int64_t* most = std::max_element(std::begin(calls_on_cpu), std::end(calls_on_cpu));
  if (*most > 0) timing.main_cpu = int(most - std::begin(calls_on_cpu));
  return timing;
}

/// Sets the standard counters of a case from its timing (mean time per call):
/// GBps, GFLOPs, roofline_ratio (>= 1; 1 = at the machine's limit), roofline_cpu (the
/// same on the CPU-time basis), kv_bytes and cpu_util (see Timing::cpu_utilisation).
inline void set_counters(benchmark::State& state, const Work& work, const Timing& timing) {
  const double seconds = timing.mean;
  if (seconds <= 0) return;
  state.counters["cpu_util"] = timing.cpu_utilisation(work.threads);
  state.counters["GBps"] = work.bytes / seconds / kGiga;
  state.counters["GFLOPs"] = work.flops / seconds / kGiga;
  if (roofline_seconds(work) > 0) {
    state.counters["roofline_ratio"] = roofline_ratio(timing, work);
    state.counters["roofline_cpu"] = cpu_roofline_ratio(timing, work);
  }
  state.counters["kv_bytes"] = benchmark::Counter(work.bytes, benchmark::Counter::kDefaults, benchmark::Counter::kIs1024);
  if (timing.main_cpu >= 0) state.counters["main_cpu"] = timing.main_cpu;
}

// ---------------------------------------------------------------------------------------
// Results of this run, for summary tables

struct Result {
  Work work;
  Timing timing;
  double check = std::numeric_limits<double>::quiet_NaN();  // optional: e.g. max |difference|
};

/// Run name -> its last (reported) run. Google Benchmark calls a benchmark function
/// several times while it sizes the iteration count; the last call is the reported one.
inline std::map<std::string, Result>& results() {
  static std::map<std::string, Result> all;
  return all;
}

inline const Result* find_result(const std::string& name) {
  const auto it = results().find(name);
  return it == results().end() || it->second.timing.iterations == 0 ? nullptr : &it->second;
}

// ---------------------------------------------------------------------------------------
// Text output

/// Where a benchmark prints its own header and summary: stdout, unless stdout carries
/// machine-readable output (--benchmark_format=json|csv), then stderr. Call before
/// benchmark::Initialize, which consumes the flags.
inline std::FILE* text_stream(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const char* prefix = "--benchmark_format=";
    if (std::strncmp(argv[i], prefix, std::strlen(prefix)) == 0 &&
        std::strcmp(argv[i] + std::strlen(prefix), "console") != 0)
      return stderr;
  }
  return stdout;
}

/// The 1-minute load average ("" where /proc/loadavg does not exist): a number well
/// above the thread count means other processes compete for the cores.
inline std::string load_average() {
  std::FILE* file = std::fopen("/proc/loadavg", "r");
  if (!file) return "";
  double one_minute = 0;
  const int read = std::fscanf(file, "%lf", &one_minute);
  std::fclose(file);
  return read == 1 ? MachineLimits::fixed(one_minute, 2) : "";
}

/// True when argv asks only to list the benchmarks (no need to measure anything).
inline bool listing_only(int argc, char** argv) {
  for (int i = 1; i < argc; ++i)
    if (std::strncmp(argv[i], "--benchmark_list_tests", 22) == 0 && std::strstr(argv[i], "=false") == nullptr)
      return true;
  return false;
}

/// "%.*f" of a value, or "-" when it is NaN (a ratio whose inputs did not run).
inline std::string format(double value, int decimals) {
  if (std::isnan(value)) return "-";
  return MachineLimits::fixed(value, decimals);
}

/// A plain text table with right-aligned columns (the first left-aligned).
class Table {
 public:
  explicit Table(std::vector<std::string> headers) : rows_{std::move(headers)} {}
  void add(std::vector<std::string> row) {
    row.resize(rows_.front().size());
    rows_.push_back(std::move(row));
  }
  void print(std::FILE* out) const {
    std::vector<std::size_t> widths(rows_.front().size(), 0);
    for (const auto& row : rows_)
      for (std::size_t c = 0; c < row.size(); ++c) widths[c] = std::max(widths[c], row[c].size());
    for (std::size_t r = 0; r < rows_.size(); ++r) {
      for (std::size_t c = 0; c < rows_[r].size(); ++c)
        std::fprintf(out, c == 0 ? "%-*s" : "  %*s", int(widths[c]), rows_[r][c].c_str());
      std::fprintf(out, "\n");
      if (r == 0) {
        std::size_t total = 0;
        for (std::size_t w : widths) total += w + 2;
        std::fprintf(out, "%s\n", std::string(total - 2, '-').c_str());
      }
    }
    std::fflush(out);
  }

 private:
  std::vector<std::vector<std::string>> rows_;
};

}  // namespace kvheads_bench
