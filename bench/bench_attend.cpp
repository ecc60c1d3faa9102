// bench_attend: kvheads::attend() against this machine's own limits and a naive Eigen
// baseline, for MHA, GQA-8 and MQA (q_heads 32, head_dim 128, fp32).
//
//   decode  (q_len 1) against a KvCache<float> at kv_len 4096 and 16384: memory-bound;
//   causal prefill (q_len = kv_len) on plain memory at 512 and 2048: compute-bound;
//   each on 1 and 2 threads, each with "/kvheads" and "/eigen" runs on the same inputs;
//   decode with the K/V out of cache ("/layers:N"): one cache per layer of a model,
//   attended in turn, so each call finds its K/V evicted by the other layers' (kvheads only);
//   decode with the K/V in cache ("/in_cache"): a cache of kInCacheBytes, small enough to
//   stay in L3, so its time per key is the kernel's without the DRAM stream (kvheads only).
//
// Before the benchmarks run, the machine's read bandwidth (per K/V working-set size) and
// fp32 FMA peak are measured and printed; every run reports GBps, GFLOPs, roofline_ratio
// and kv_bytes, and a summary table of ratios from this run is printed at the end; then
// the targets are measured again in rounds that alternate short bursts of the limits
// with the cases' own calls ("Targets side by side").
// See bench/README.md for how to read it and the targets.

// g++ 12 reports -Wmaybe-uninitialized inside its own AVX-512 intrinsics when Eigen's
// GEMM packing inlines them (GCC PR 105593: the unmasked forms pass _mm512_undefined_ps()).
// The warning is located in immintrin.h, so it is silenced for the headers' text only,
// which must therefore be the first includes of this file.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <Eigen/Core>
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "bench_common.hpp"
#include "kvheads/attend.hpp"
#include "kvheads/core/parallel.hpp"
#include "kvheads/head_layout.hpp"
#include "kvheads/kv_cache.hpp"
#include "kvheads/options.hpp"

namespace {

using kvheads_bench::format;
using kvheads_bench::Result;
using kvheads_bench::Timing;
using kvheads_bench::Work;

constexpr int kQHeads = 32;
constexpr int kHeadDim = 128;
constexpr int kKvHeads[] = {32, 8, 1};
// Decode of 16384 keys for the group sizes between the standard ones (groups of 2, 8 and
// 16 query heads), which take other tiles in the kernel: not targets, no Eigen run.
constexpr int kOtherKvHeads[] = {16, 4, 2};
constexpr int kDecodeLens[] = {4096, 16384};
constexpr int kPrefillLens[] = {512, 2048};
constexpr int kThreadCounts[] = {1, 2};
// A model's decode step attends every layer's cache in turn (with the layers' weights
// streamed in between), so one layer's K/V is long gone from L2/L3 when the next token
// reaches it; a single cache attended again and again stays in L3 when it fits (MQA:
// 4 and 16 MiB). The "/layers:N" decode cases rotate through N caches of at least this
// many bytes in all, several times any last-level cache of our machines.
constexpr std::size_t kColdWorkingSet = std::size_t(256) << 20;

// Where decode time goes: the same decode with a cache this small (8 MiB: 256 keys for
// MHA, 1024 for GQA-8, 8192 for MQA) stays in L3 between calls, so its time per key is
// the arithmetic and cache traffic alone; set against the time to stream the large case's
// K/V at the measured bandwidth, it shows whether the two overlap.
constexpr std::size_t kInCacheBytes = std::size_t(8) << 20;

// The targets of the "Fast kernels" issue (bench/README.md).
constexpr double kDecodeRooflineTarget = 1.25;  // decode 16384: time <= 1.25 x roofline
constexpr double kPrefillPeakTarget = 0.60;     // prefill 2048 GQA-8, 1 thread: >= 60% of FMA peak
constexpr double kPrefillScalingTarget = 1.8;   // ... and 2 threads >= 1.8x faster than 1
constexpr double kEigenSpeedupTarget = 5.0;     // every case >= 5x faster than the baseline
constexpr double kGqaBytesRatioTarget = 0.8;    // decode MHA / GQA-8 time >= 0.8 x bytes ratio

enum class Kind { decode, prefill };

/// One benchmark case (an implementation suffix "/kvheads" or "/eigen" completes the name).
struct Case {
  Kind kind = Kind::decode;
  int kv_heads = 0;
  int len = 0;  // kv_len (decode) or q_len = kv_len (prefill)
  int threads = 1;
  int layers = 1;  // decode: caches attended in turn, one per call (> 1: K/V out of cache)
  bool in_cache = false;  // decode: a kInCacheBytes cache, for the time breakdown only
  bool plain = false;     // decode: plain [tokens][kv_heads][head_dim] memory, not a KvCache

  kvheads::HeadLayout layout() const { return kvheads::make_layout(kQHeads, kv_heads, kHeadDim); }
  int q_len() const { return kind == Kind::decode ? 1 : len; }
  int kv_len() const { return len; }
  bool causal() const { return kind == Kind::prefill; }

  static std::string layout_name(int kv_heads) {
    if (kv_heads == kQHeads) return "MHA";
    if (kv_heads == 1) return "MQA";
    return "GQA-" + std::to_string(kv_heads);
  }
  /// e.g. "decode/kv_len:16384/GQA-8/threads:2", "decode/kv_len:16384/MQA/layers:16/threads:1"
  std::string name() const {
    return std::string(kind == Kind::decode ? "decode/kv_len:" : "prefill/len:") + std::to_string(len) + "/" +
           layout_name(kv_heads) + (layers > 1 ? "/layers:" + std::to_string(layers) : "") +
           (in_cache ? "/in_cache" : "") + (plain ? "/plain" : "") + "/threads:" + std::to_string(threads);
  }
  bool cold() const { return layers > 1; }
  bool standard_heads() const {
    return std::find(std::begin(kKvHeads), std::end(kKvHeads), kv_heads) != std::end(kKvHeads);
  }
  /// Not one of the standard cases: no Eigen run, no target.
  bool diagnostic() const { return cold() || in_cache || plain || !standard_heads(); }
  /// Cases that share inputs (all but the thread count).
  std::string data_key() const { return name().substr(0, name().rfind("/threads:")); }

  /// K+V bytes of one call's cache.
  double kv_bytes() const { return 2.0 * kv_heads * double(len) * kHeadDim * sizeof(float); }

  /// Per call: K+V bytes streamed, and useful flops: 4 x q_heads x head_dim per visible
  /// (query, key) pair (Q.K and P.V, a multiply-add counting 2 each). The working set is
  /// every layer's cache, which is what the bandwidth is measured over.
  Work work() const {
    Work work;
    const double pairs = kind == Kind::decode ? double(len) : double(len) * double(len + 1) / 2.0;
    work.flops = 4.0 * kQHeads * kHeadDim * pairs;
    work.bytes = kv_bytes();
    work.working_set = std::size_t(work.bytes) * std::size_t(layers);
    work.threads = threads;
    return work;
  }
};

std::vector<Case> all_cases() {
  std::vector<Case> cases;
  for (Kind kind : {Kind::decode, Kind::prefill})
    for (int len : kind == Kind::decode ? std::vector<int>(std::begin(kDecodeLens), std::end(kDecodeLens))
                                        : std::vector<int>(std::begin(kPrefillLens), std::end(kPrefillLens)))
      for (int kv_heads : kKvHeads)
        for (int threads : kThreadCounts) cases.push_back(Case{kind, kv_heads, len, threads});
  // The same decode cases with their K/V out of cache, where one cache alone is smaller
  // than kColdWorkingSet (a larger one already streams from DRAM every call).
  for (int len : kDecodeLens)
    for (int kv_heads : kKvHeads) {
      Case c{Kind::decode, kv_heads, len, 1};
      const auto bytes = std::size_t(c.kv_bytes());
      if (bytes >= kColdWorkingSet) continue;
      c.layers = int((kColdWorkingSet + bytes - 1) / bytes);
      for (int threads : kThreadCounts) {
        c.threads = threads;
        cases.push_back(c);
      }
    }
  for (int kv_heads : kKvHeads)
    for (int threads : kThreadCounts) {
      Case c{Kind::decode, kv_heads, 1, threads};
      c.len = int(kInCacheBytes / std::size_t(c.kv_bytes()));
      c.in_cache = true;
      cases.push_back(c);
    }
  for (int kv_heads : kOtherKvHeads)
    for (int threads : kThreadCounts) cases.push_back(Case{Kind::decode, kv_heads, 16384, threads});
  // Decode of 16384 keys from plain memory, where the KV heads interleave (MQA's one head
  // is contiguous either way).
  for (int kv_heads : kKvHeads)
    for (int threads : kThreadCounts) {
      if (kv_heads == 1) continue;
      Case c{Kind::decode, kv_heads, 16384, threads};
      c.plain = true;
      cases.push_back(c);
    }
  return cases;
}

// ---------------------------------------------------------------------------------------
// Inputs: random Q and K/V (in a KvCache for decode, plain [tokens][kv_heads][head_dim]
// for prefill and /plain decode). Only one case's inputs live at a time (the largest cache is 512 MiB);
// cases that share them run back to back.

/// Where K and V of one call live: element (token j, kv head h, i) at
/// k[j * token_stride + h * head_stride + i].
struct KvView {
  const float* k = nullptr;
  const float* v = nullptr;
  std::ptrdiff_t token_stride = 0;
  std::ptrdiff_t head_stride = 0;
};

struct Inputs {
  std::string key;
  std::vector<float> q, k, v;       // k, v: prefill only
  std::vector<float> out;           // kvheads' output
  std::vector<float> baseline_out;  // Eigen's output
  std::vector<std::unique_ptr<kvheads::KvCache<float>>> caches;  // decode only: one per layer
  std::size_t next_layer = 0;                                     // decode: the next call's cache

  std::ptrdiff_t kv_token_stride = 0;  // prefill: kv_heads * head_dim

  /// The K/V of the next call (prefill, or decode of one layer; the Eigen baseline does
  /// not run the layered cases).
  KvView view() const {
    if (!caches.empty()) {
      const kvheads::KvCache<float>& cache = *caches.front();
      return {cache.keys(), cache.values(), cache.token_stride(), cache.head_stride()};
    }
    return {k.data(), v.data(), kv_token_stride, kHeadDim};
  }
  /// Decode: the cache of the next call, rotating over the layers.
  kvheads::KvCache<float>& next_cache() {
    kvheads::KvCache<float>& cache = *caches[next_layer];
    next_layer = (next_layer + 1) % caches.size();
    return cache;
  }
};

/// A cache of `kv_len` random tokens, different for every `layer`.
std::unique_ptr<kvheads::KvCache<float>> random_cache(const kvheads::HeadLayout& layout, int kv_len, int layer) {
  auto cache = std::make_unique<kvheads::KvCache<float>>(layout, kv_len);
  constexpr int kChunk = 256;
  std::vector<float> k(std::size_t(kChunk) * std::size_t(layout.kv_width()));
  std::vector<float> v(k.size());
  const std::uint64_t seed = 2 + 2 * std::uint64_t(layer) * std::uint64_t(kv_len);
  for (int first = 0; first < kv_len; first += kChunk) {
    const int n = std::min(kChunk, kv_len - first);
    kvheads_bench::fill_random(k, seed + 2 * std::uint64_t(first));
    kvheads_bench::fill_random(v, seed + 1 + 2 * std::uint64_t(first));
    cache->append(k.data(), v.data(), n);
  }
  return cache;
}

/// The inputs of case c (and of every case with its data_key).
void make_inputs(const Case& c, Inputs& in) {
  const kvheads::HeadLayout layout = c.layout();
  const std::size_t q_floats = std::size_t(c.q_len()) * std::size_t(layout.q_width());
  in.q.resize(q_floats);
  kvheads_bench::fill_random(in.q, 1);
  in.out.assign(q_floats, 0.f);
  in.baseline_out.assign(q_floats, 0.f);
  const std::size_t kv_floats = std::size_t(c.kv_len()) * std::size_t(layout.kv_width());
  if (c.kind == Kind::decode && !c.plain) {
    for (int layer = 0; layer < c.layers; ++layer) in.caches.push_back(random_cache(layout, c.kv_len(), layer));
  } else {
    in.k.resize(kv_floats);
    in.v.resize(kv_floats);
    kvheads_bench::fill_random(in.k, 2);
    kvheads_bench::fill_random(in.v, 3);
  }
  in.kv_token_stride = layout.kv_width();
  in.key = c.data_key();
}

/// The benchmarks' inputs: one case's at a time, kept while cases that share them run.
Inputs& current_inputs() {
  static Inputs current;
  return current;
}

Inputs& inputs_for(const Case& c) {
  Inputs& current = current_inputs();
  if (current.key == c.data_key()) return current;
  current = Inputs{};  // release the previous case's memory first
  make_inputs(c, current);
  return current;
}

// ---------------------------------------------------------------------------------------
// The two implementations

kvheads::AttentionOptions options_for(const Case& c) {
  kvheads::AttentionOptions options;
  options.causal = c.causal();
  options.threads = c.threads;
  return options;
}

void run_kvheads(const Case& c, Inputs& in) {
  const kvheads::AttentionOptions options = options_for(c);
  if (c.kind == Kind::decode && !c.plain)
    kvheads::attend(in.q.data(), c.q_len(), in.next_cache(), in.out.data(), options);
  else
    kvheads::attend(in.q.data(), in.k.data(), in.v.data(), in.out.data(), c.q_len(), c.kv_len(), c.layout(), options);
}

/// The naive way: per query head, S = scale * Q_h K_h^T as one Eigen GEMM (the whole
/// q_len x kv_len matrix), causal mask, row softmax, O_h = P V_h; heads spread over the
/// kvheads pool (Eigen itself is single-threaded without OpenMP). Q, K, V and O are
/// mapped in place with strides, no copies; only the score matrices are allocated, once,
/// outside the timed region.
class EigenBaseline {
 public:
  using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using ConstMap = Eigen::Map<const RowMatrix, Eigen::Unaligned, Eigen::OuterStride<>>;
  using Map = Eigen::Map<RowMatrix, Eigen::Unaligned, Eigen::OuterStride<>>;

  explicit EigenBaseline(const Case& c) : case_(c) {
    const int workers = kvheads::detail::workers_for(kvheads::ThreadPool::global(), kQHeads, c.threads);
    scores_.assign(std::size_t(workers), RowMatrix(c.q_len(), c.kv_len()));
    sums_.assign(std::size_t(workers), Eigen::VectorXf(c.q_len()));
  }

  void run(const float* q, const KvView& kv, float* out) {
    const kvheads::HeadLayout layout = case_.layout();
    const int q_len = case_.q_len();
    const int kv_len = case_.kv_len();
    const int d = layout.head_dim;
    const float scale = 1.0f / std::sqrt(float(d));
    const std::ptrdiff_t first_pos = std::ptrdiff_t(kv_len) - q_len;
    kvheads::detail::parallel_for(
        kvheads::ThreadPool::global(), layout.q_heads, case_.threads, [&](std::ptrdiff_t h, int worker) {
          const int kv_head = layout.kv_head_of(int(h));
          const ConstMap q_h(q + h * d, q_len, d, Eigen::OuterStride<>(layout.q_width()));
          const ConstMap k_h(kv.k + kv_head * kv.head_stride, kv_len, d, Eigen::OuterStride<>(kv.token_stride));
          const ConstMap v_h(kv.v + kv_head * kv.head_stride, kv_len, d, Eigen::OuterStride<>(kv.token_stride));
          RowMatrix& s = scores_[std::size_t(worker)];
          Eigen::VectorXf& sums = sums_[std::size_t(worker)];
          s.noalias() = scale * (q_h * k_h.transpose());
          for (int i = 0; i < q_len; ++i) {
            const Eigen::Index visible = case_.causal() ? Eigen::Index(first_pos + i + 1) : kv_len;
            auto row = s.row(i);
            const float max = row.head(visible).maxCoeff();
            row.head(visible) = (row.head(visible).array() - max).exp().matrix();
            row.tail(kv_len - visible).setZero();
            sums(i) = row.head(visible).sum();
          }
          Map o_h(out + h * d, q_len, d, Eigen::OuterStride<>(layout.q_width()));
          o_h.noalias() = s * v_h;
          for (int i = 0; i < q_len; ++i) o_h.row(i) /= sums(i);
        });
  }

 private:
  Case case_;
  std::vector<RowMatrix> scores_;     // per worker: [q_len][kv_len]
  std::vector<Eigen::VectorXf> sums_;  // per worker: softmax denominators
};

// ---------------------------------------------------------------------------------------
// Benchmarks

/// Runs `call` once per (case, implementation) before timing: the first call creates
/// the pool and per-thread scratch and faults in output pages, which no later call pays.
template <class Call>
void warm_up_once(const std::string& name, Call&& call) {
  static std::set<std::string> warmed;
  if (warmed.insert(name).second) call();
}

void finish(benchmark::State& state, const Case& c, const std::string& name, const Timing& timing, double check) {
  const Work work = c.work();
  kvheads_bench::set_counters(state, work, timing);
  Result& result = kvheads_bench::results()[name];
  result.work = work;
  result.timing = timing;
  result.check = check;
}

void bench_kvheads(benchmark::State& state, Case c) {
  const std::string name = c.name() + "/kvheads";
  Inputs& in = inputs_for(c);
  warm_up_once(name, [&] { run_kvheads(c, in); });
  const Timing timing = kvheads_bench::timed_loop(state, [&] { run_kvheads(c, in); });
  finish(state, c, name, timing, std::numeric_limits<double>::quiet_NaN());
  if (const Result* eigen = kvheads_bench::find_result(c.name() + "/eigen"))
    state.counters["speedup_vs_eigen"] = eigen->timing.mean / timing.mean;
}

void bench_eigen(benchmark::State& state, Case c) {
  const std::string name = c.name() + "/eigen";
  Inputs& in = inputs_for(c);
  EigenBaseline baseline(c);
  const KvView kv = in.view();
  warm_up_once(name, [&] { baseline.run(in.q.data(), kv, in.baseline_out.data()); });
  const Timing timing =
      kvheads_bench::timed_loop(state, [&] { baseline.run(in.q.data(), kv, in.baseline_out.data()); });
  // Not timed: check the baseline computes what kvheads computes.
  run_kvheads(c, in);
  double max_diff = 0;
  for (std::size_t i = 0; i < in.out.size(); ++i)
    max_diff = std::max(max_diff, double(std::abs(in.out[i] - in.baseline_out[i])));
  finish(state, c, name, timing, max_diff);
  state.counters["max_abs_diff"] = max_diff;
}

void register_benchmarks(const std::vector<Case>& cases) {
  for (const Case& c : cases) {
    if (!c.diagnostic())
      benchmark::RegisterBenchmark((c.name() + "/eigen").c_str(), bench_eigen, c)
          ->UseManualTime()
          ->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark((c.name() + "/kvheads").c_str(), bench_kvheads, c)
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond);
  }
}

// ---------------------------------------------------------------------------------------
// Summary

const char* verdict(bool ok) { return ok ? "PASS" : "FAIL"; }

constexpr double kContendedUtilisation = 0.85;

/// The kvheads run's CPU utilisation, starred when other processes took the cores.
std::string utilisation(const Result* result, int threads, bool& contended) {
  if (!result) return "-";
  const double util = result->timing.cpu_utilisation(threads);
  if (util >= kContendedUtilisation) return format(util, 2);
  contended = true;
  return format(util, 2) + "*";
}

Case with_threads(Case c, int threads) {
  c.threads = threads;
  return c;
}

/// "wall verdict" or, when the run was contended, "wall verdict, CPU-time verdict".
std::string verdicts(bool wall_ok, bool cpu_ok, bool contended) {
  std::string text = verdict(wall_ok);
  if (contended) text += std::string(" by wall time, ") + verdict(cpu_ok) + " by CPU time (contended run)";
  return text;
}

bool is_contended(const Result* result, int threads) {
  return result && result->timing.cpu_utilisation(threads) < kContendedUtilisation;
}

void print_summary(std::FILE* out, const std::vector<Case>& cases) {
  using kvheads_bench::Basis;
  using kvheads_bench::cpu_roofline_ratio;
  using kvheads_bench::find_result;
  using kvheads_bench::roofline_ratio;
  const kvheads_bench::MachineLimits& limits = kvheads_bench::machine_limits();
  const double nan = std::numeric_limits<double>::quiet_NaN();

  std::fprintf(out,
               "\nSummary (ratios from this run; times are means per call; roofline = time / max(bytes / read "
               "bandwidth, flops / FMA peak), 1.0 = at the machine's limit; \"CPU\" columns use CPU time per "
               "thread and the limits' CPU-time figures):\n");
  kvheads_bench::Table table({"case", "kvheads ms", "eigen ms", "GB/s", "GFLOP/s", "roofline", "best-iter",
                              "roofline CPU", "% FMA peak", "% peak CPU", "vs eigen", "vs eigen CPU", "eigen roofline CPU", "2t vs 1t",
                              "cpu util", "on cpu", "max|diff|"});
  bool contended = false;
  for (const Case& c : cases) {
    const Result* mine = find_result(c.name() + "/kvheads");
    const Result* eigen = find_result(c.name() + "/eigen");
    if (!mine && !eigen) continue;
    const Work work = c.work();
    const double t = mine ? mine->timing.mean : nan;
    const double cpu_per_thread = mine ? mine->timing.cpu / c.threads : nan;
    const double roofline = kvheads_bench::roofline_seconds(work);
    const Result* one_thread = c.threads != 1 ? find_result(with_threads(c, 1).name() + "/kvheads") : nullptr;
    table.add({c.name(), format(t * 1e3, 3), format(eigen ? eigen->timing.mean * 1e3 : nan, 3),
               format(work.bytes / t / 1e9, 1), format(work.flops / t / 1e9, 1),
               format(mine ? roofline_ratio(mine->timing, work) : nan, 2),
               format(mine ? mine->timing.best / roofline : nan, 2),
               format(mine ? cpu_roofline_ratio(mine->timing, work) : nan, 2),
               format(100.0 * work.flops / t / 1e9 / limits.fma_gflops(c.threads), 1),
               format(100.0 * work.flops / cpu_per_thread / c.threads / 1e9 / limits.fma_gflops(c.threads, Basis::cpu),
                      1),
               format(eigen ? eigen->timing.mean / t : nan, 1),
               format(eigen && mine ? eigen->timing.cpu / mine->timing.cpu : nan, 1),
               format(eigen ? cpu_roofline_ratio(eigen->timing, work) : nan, 1),
               format(one_thread ? one_thread->timing.mean / t : nan, 2), utilisation(mine, c.threads, contended),
               mine && mine->timing.main_cpu >= 0 ? std::to_string(mine->timing.main_cpu) : "-",
               eigen && !std::isnan(eigen->check) ? format(eigen->check, 7) : "-"});
  }
  table.print(out);
  if (contended)
    std::fprintf(out,
                 "  * cpu util < %.2f: other processes held the cores during that run (load average now %s); its "
                 "wall time measures the machine's load as much as the kernel: read the CPU columns.\n",
                 kContendedUtilisation, kvheads_bench::load_average().c_str());

  std::fprintf(out, "\nTargets (issue \"Fast kernels\", item 5):\n");
  // Decode at 16384 within 1.25x of the roofline.
  for (const Case& c : cases) {
    if (c.kind != Kind::decode || c.len != 16384 || c.diagnostic()) continue;
    const Result* mine = find_result(c.name() + "/kvheads");
    if (!mine) continue;
    const double wall = roofline_ratio(mine->timing, c.work());
    const double cpu = cpu_roofline_ratio(mine->timing, c.work());
    std::fprintf(out, "  %-36s roofline %.2f, by CPU time %.2f  (target <= %.2f)  %s\n", c.name().c_str(), wall, cpu,
                 kDecodeRooflineTarget,
                 verdicts(wall <= kDecodeRooflineTarget, cpu <= kDecodeRooflineTarget, is_contended(mine, c.threads))
                     .c_str());
  }
  // Prefill 2048 GQA-8: fraction of the FMA peak on 1 thread, and 2-thread scaling.
  const Case prefill1{Kind::prefill, 8, 2048, 1};
  const Case prefill2{Kind::prefill, 8, 2048, 2};
  if (const Result* one = find_result(prefill1.name() + "/kvheads")) {
    const double flops = prefill1.work().flops;
    const double wall = flops / one->timing.mean / 1e9 / limits.fma_gflops(1);
    const double cpu = flops / one->timing.cpu / 1e9 / limits.fma_gflops(1, Basis::cpu);
    std::fprintf(out, "  %-36s %.1f%% of the 1-thread FMA peak, by CPU time %.1f%%  (target >= %.0f%%)  %s\n",
                 prefill1.name().c_str(), 100.0 * wall, 100.0 * cpu, 100.0 * kPrefillPeakTarget,
                 verdicts(wall >= kPrefillPeakTarget, cpu >= kPrefillPeakTarget, is_contended(one, 1)).c_str());
    if (const Result* two = find_result(prefill2.name() + "/kvheads")) {
      const double scaling = one->timing.mean / two->timing.mean;
      const bool unmeasurable = is_contended(one, 1) || is_contended(two, 2);
      std::fprintf(out, "  %-36s %.2fx faster on 2 threads than 1  (target >= %.1fx)  %s\n",
                   prefill1.data_key().c_str(), scaling, kPrefillScalingTarget,
                   unmeasurable ? "NOT MEASURABLE: other processes held the cores (cpu util)"
                                : verdict(scaling >= kPrefillScalingTarget));
    }
  }
  // Every case at least 5x faster than the Eigen baseline.
  int compared = 0;
  std::vector<std::string> slow;
  double worst = std::numeric_limits<double>::infinity();
  std::string worst_name;
  for (const Case& c : cases) {
    const Result* mine = find_result(c.name() + "/kvheads");
    const Result* eigen = find_result(c.name() + "/eigen");
    if (!mine || !eigen) continue;
    ++compared;
    const double speedup = eigen->timing.mean / mine->timing.mean;
    const double cpu_speedup = eigen->timing.cpu / mine->timing.cpu;
    if (speedup < worst) worst = speedup, worst_name = c.name();
    if (speedup < kEigenSpeedupTarget)
      slow.push_back(c.name() + " (" + format(speedup, 1) + "x, by CPU time " + format(cpu_speedup, 1) + "x)");
  }
  if (compared > 0) {
    std::fprintf(out, "  every case >= %.0fx faster than Eigen: %d of %d; slowest %s at %.1fx  %s\n",
                 kEigenSpeedupTarget, compared - int(slow.size()), compared, worst_name.c_str(), worst,
                 verdict(slow.empty()));
    for (const std::string& s : slow) std::fprintf(out, "      below target: %s\n", s.c_str());
    std::fprintf(out,
                 "      (no kernel can beat the baseline by more than the baseline's own roofline ratio: "
                 "see \"eigen roofline CPU\")\n");
  }
  // Decode at 16384: MHA / GQA-8 time ratio against the bytes ratio.
  for (int threads : kThreadCounts) {
    const Case mha{Kind::decode, kQHeads, 16384, threads};
    const Case gqa{Kind::decode, 8, 16384, threads};
    const Result* a = find_result(mha.name() + "/kvheads");
    const Result* b = find_result(gqa.name() + "/kvheads");
    if (!a || !b) continue;
    const double bytes_ratio = mha.work().bytes / gqa.work().bytes;
    const double wall = a->timing.mean / b->timing.mean / bytes_ratio;
    const double cpu = a->timing.cpu / b->timing.cpu / bytes_ratio;
    std::fprintf(out,
                 "  decode/kv_len:16384 MHA / GQA-8, threads:%d  time ratio %.2f vs bytes ratio %.2f = %.2f, by CPU "
                 "time %.2f  (target >= %.1f)  %s\n",
                 threads, wall * bytes_ratio, bytes_ratio, wall, cpu, kGqaBytesRatioTarget,
                 verdicts(wall >= kGqaBytesRatioTarget, cpu >= kGqaBytesRatioTarget,
                          is_contended(a, threads) || is_contended(b, threads))
                     .c_str());
  }

  // Not a target: decode with the K/V out of cache, against its own roofline (bandwidth
  // over every layer's cache) and the same case attending one cache again and again.
  bool header = false;
  for (const Case& c : cases) {
    if (!c.cold()) continue;
    const Result* cold = find_result(c.name() + "/kvheads");
    if (!cold) continue;
    if (!header)
      std::fprintf(out, "\nDecode with the K/V out of cache (one cache per layer, attended in turn; not a target):\n");
    header = true;
    Case warm_case = c;
    warm_case.layers = 1;
    const Result* warm = find_result(warm_case.name() + "/kvheads");
    const double bound = kvheads_bench::roofline_seconds(c.work());
    const bool memory_bound = c.work().bytes / (limits.read_gbps(c.work().working_set, c.threads) * 1e9) >=
                              c.work().flops / (limits.fma_gflops(c.threads) * 1e9);
    std::fprintf(out, "  %-44s %.3f ms, roofline %.2f (%s-bound), by CPU time %.2f; %s the warm case's time\n",
                 c.name().c_str(), cold->timing.mean * 1e3, cold->timing.mean / bound,
                 memory_bound ? "memory" : "compute", cpu_roofline_ratio(cold->timing, c.work()),
                 warm ? (format(cold->timing.mean / warm->timing.mean, 2) + "x").c_str() : "-");
  }

  // Not a target: where decode time goes at 16384 keys. Perfect overlap of the K/V
  // stream with the arithmetic would take max(in cache, stream); taking turns, their sum.
  header = false;
  for (const Case& c : cases) {
    if (!c.in_cache) continue;
    Case large = c;
    large.in_cache = false;
    large.len = 16384;
    const Result* small = find_result(c.name() + "/kvheads");
    const Result* measured = find_result(large.name() + "/kvheads");
    if (!small || !measured) continue;
    if (!header)
      std::fprintf(out,
                   "\nWhere decode time goes at kv_len 16384 (not a target): \"in cache\" = the /in_cache case's "
                   "time per key x 16384, \"stream\" = K/V bytes / read bandwidth; measured against their sum "
                   "(1.0: the two take turns) and their max (1.0: they fully overlap):\n");
    header = true;
    const double in_cache = small->timing.mean * double(large.len) / double(c.len);
    const Work work = large.work();
    const double stream = work.bytes / (limits.read_gbps(work.working_set, large.threads) * 1e9);
    const double t = measured->timing.mean;
    std::fprintf(out, "  %-36s measured %7.3f ms, in cache %7.3f, stream %7.3f; / sum %.2f, / max %.2f\n",
                 large.name().c_str(), t * 1e3, in_cache * 1e3, stream * 1e3, t / (in_cache + stream),
                 t / std::max(in_cache, stream));
  }

  // Not a target: the same decode from plain memory, whose KV heads interleave.
  header = false;
  for (const Case& c : cases) {
    if (!c.plain) continue;
    Case cached = c;
    cached.plain = false;
    const Result* plain = find_result(c.name() + "/kvheads");
    const Result* cache = find_result(cached.name() + "/kvheads");
    if (!plain || !cache) continue;
    if (!header)
      std::fprintf(out, "\nDecode from plain memory ([tokens][kv_heads][head_dim], not a target) against a KvCache:\n");
    header = true;
    std::fprintf(out, "  %-44s %7.3f ms, roofline %.2f; %.2fx the KvCache's time\n", c.name().c_str(),
                 plain->timing.mean * 1e3, roofline_ratio(plain->timing, c.work()),
                 plain->timing.mean / cache->timing.mean);
  }
  std::fflush(out);
}

// ---------------------------------------------------------------------------------------
// The targets again, side by side with the limits
//
// The summary divides each case's mean time by limits measured once, before all the
// benchmarks. On a shared host the machine under a case changes faster than that: on
// our CI machine four runs of this bench within five minutes timed the same MQA decode
// at 2.04, 1.53, 1.90 and 1.59 ms, and a limit measured a minute before a case need not
// hold during it. So the targets are measured again in rounds: each round
// measures a case's two limits in a short burst (MachineLimits::measure_burst), then
// times a few of its calls at once, and the round's ratio divides the median call by the
// roofline from that burst. The median over the rounds is the verdict; the lowest and
// highest show how much the host moved. Ratios between two cases (MHA / GQA-8, 2 threads
// / 1) come from calls alternated within each round.

constexpr int kSideBySideRounds = 9;
// Untimed calls per case and round, before the timed ones: they bring the case's K/V (or,
// for prefill, its Q, K/V and scratch) back into the caches the burst evicted them from,
// so the timed calls see the steady state a benchmark loop measures and the burst's
// bandwidth describes (it too is best of repeated reads of one buffer). How many that
// takes depends on the last-level cache. One untimed call was the rule on Zen 5 (32 MiB
// L3), where MQA decode's first three calls after a burst took 1.63-1.77 ms and later
// ones 1.50-1.65, so even there one call was not quite enough; on the Intel Xeon (family 6 model 207, 300 MiB L3), GQA-8 decode at 16384
// (128 MiB) took 8.8, 8.8, 6.5, 4.1, 3.9, 3.9 ms, and with one untimed call the rounds put
// it at 1.75 of the roofline against 1.07 in the summary. So: at least
// kSideBySideMinWarmCalls, then more until a call is less than kSideBySideSettled faster
// than the one before it, at most kSideBySideMaxWarmCalls.
constexpr int kSideBySideMinWarmCalls = 4;
constexpr int kSideBySideMaxWarmCalls = 16;
constexpr double kSideBySideSettled = 0.03;
// Timed calls per case and round; their median is the round's time (one timed prefill
// call per round spread the rounds' 1-thread prefill over 51-75% of the FMA peak on Zen 5,
// three over 66-72%).
constexpr int kSideBySideCalls = 3;

struct Spread {
  double median = 0, low = 0, high = 0;
};

Spread spread_of(std::vector<double> values) {
  if (values.empty()) return {};
  std::sort(values.begin(), values.end());
  const std::size_t n = values.size();
  const double median = n % 2 == 1 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
  return {median, values.front(), values.back()};
}

std::string spread_text(const Spread& spread, int decimals, double factor = 1.0) {
  return format(spread.median * factor, decimals) + " [" + format(spread.low * factor, decimals) + "-" +
         format(spread.high * factor, decimals) + "]";
}

/// One case's share of a round: its calls and the limits measured just before them.
class SideBySide {
 public:
  SideBySide(const Case& c, Inputs& in) : case_(c), in_(&in) {}

  /// One round: the limits over the case's working set (a prefix of `buffer`), then calls.
  void round(const float* buffer) {
    const Work work = case_.work();
    const auto limits = kvheads_bench::MachineLimits::measure_burst(buffer, work.working_set, case_.threads);
    const double roofline =
        std::max(work.bytes / (limits.read_gbps * 1e9), work.flops / (limits.fma_gflops * 1e9));
    const double seconds = median_call();
    seconds_.push_back(seconds);
    roofline_ratios_.push_back(seconds / roofline);
    peak_fractions_.push_back(work.flops / seconds / (limits.fma_gflops * 1e9));
  }

  const Case& which() const { return case_; }
  const std::vector<double>& seconds() const { return seconds_; }
  Spread roofline_ratio() const { return spread_of(roofline_ratios_); }
  Spread peak_fraction() const { return spread_of(peak_fractions_); }

 private:
  double median_call() {
    double previous = 0;
    for (int call = 0; call < kSideBySideMaxWarmCalls; ++call) {
      const kvheads_bench::Clock::time_point start = kvheads_bench::Clock::now();
      run_kvheads(case_, *in_);
      const double seconds = kvheads_bench::seconds_since(start);
      const bool settled = call > 0 && seconds > previous * (1.0 - kSideBySideSettled);
      previous = seconds;
      if (call + 1 >= kSideBySideMinWarmCalls && settled) break;
    }
    std::vector<double> times;
    for (int call = 0; call < kSideBySideCalls; ++call) {
      const kvheads_bench::Clock::time_point start = kvheads_bench::Clock::now();
      run_kvheads(case_, *in_);
      times.push_back(kvheads_bench::seconds_since(start));
    }
    return spread_of(times).median;
  }

  Case case_;
  Inputs* in_;
  std::vector<double> seconds_, roofline_ratios_, peak_fractions_;
};

/// Per round, a's time / b's time.
Spread time_ratio(const SideBySide& a, const SideBySide& b) {
  std::vector<double> ratios;
  for (std::size_t r = 0; r < a.seconds().size() && r < b.seconds().size(); ++r)
    ratios.push_back(a.seconds()[r] / b.seconds()[r]);
  return spread_of(ratios);
}

void print_side_by_side(std::FILE* out, const std::vector<Case>& cases) {
  // The target cases this run timed (the filter may have left some out).
  std::vector<Case> decode, prefill;
  for (const Case& c : cases) {
    if (c.diagnostic() || !kvheads_bench::find_result(c.name() + "/kvheads")) continue;
    if (c.kind == Kind::decode && c.len == 16384) decode.push_back(c);
    if (c.kind == Kind::prefill && c.len == 2048 && c.kv_heads == 8) prefill.push_back(c);
  }
  if (decode.empty() && prefill.empty()) return;
  current_inputs() = Inputs{};  // the benchmarks' inputs are no longer needed

  std::fprintf(out,
               "\nTargets side by side (%d rounds; each measures a case's read bandwidth and FMA peak in a short "
               "burst, then, after %d-%d untimed calls (until they stop getting faster), times %d of its calls; "
               "median [lowest-highest] of the rounds' ratios):\n",
               kSideBySideRounds, kSideBySideMinWarmCalls, kSideBySideMaxWarmCalls, kSideBySideCalls);
  std::fflush(out);
  std::map<std::string, Inputs> inputs;  // by data_key: every case's inputs at once
  std::vector<SideBySide> runs;
  std::size_t largest = 0;
  for (const std::vector<Case>* group : {&decode, &prefill})
    for (const Case& c : *group) {
      Inputs& in = inputs[c.data_key()];
      if (in.key.empty()) make_inputs(c, in);
      warm_up_once(c.name() + "/kvheads", [&] { run_kvheads(c, in); });
      runs.emplace_back(c, in);
      largest = std::max(largest, c.work().working_set);
    }
  std::vector<float, kvheads::detail::AlignedAllocator<float>> buffer(largest / sizeof(float) + 1, 1.0f);
  for (int round = 0; round < kSideBySideRounds; ++round)
    for (SideBySide& run : runs) run.round(buffer.data());

  auto find_run = [&](const Case& c) -> const SideBySide* {
    for (const SideBySide& run : runs)
      if (run.which().name() == c.name()) return &run;
    return nullptr;
  };
  for (const SideBySide& run : runs) {
    const Case& c = run.which();
    if (c.kind == Kind::decode) {
      const Spread ratio = run.roofline_ratio();
      std::fprintf(out, "  %-36s roofline %s  (target <= %.2f)  %s\n", c.name().c_str(), spread_text(ratio, 2).c_str(),
                   kDecodeRooflineTarget, verdict(ratio.median <= kDecodeRooflineTarget));
    } else if (c.threads == 1) {
      const Spread fraction = run.peak_fraction();
      std::fprintf(out, "  %-36s %s%% of the 1-thread FMA peak  (target >= %.0f%%)  %s\n", c.name().c_str(),
                   spread_text(fraction, 1, 100.0).c_str(), 100.0 * kPrefillPeakTarget,
                   verdict(fraction.median >= kPrefillPeakTarget));
    }
  }
  const SideBySide* prefill_one = find_run(Case{Kind::prefill, 8, 2048, 1});
  const SideBySide* prefill_two = find_run(Case{Kind::prefill, 8, 2048, 2});
  if (prefill_one && prefill_two) {
    const Spread scaling = time_ratio(*prefill_one, *prefill_two);
    std::fprintf(out, "  %-36s %sx faster on 2 threads than 1  (target >= %.1fx)  %s\n",
                 prefill_one->which().data_key().c_str(), spread_text(scaling, 2).c_str(), kPrefillScalingTarget,
                 verdict(scaling.median >= kPrefillScalingTarget));
  }
  for (int threads : kThreadCounts) {
    const SideBySide* mha = find_run(Case{Kind::decode, kQHeads, 16384, threads});
    const SideBySide* gqa = find_run(Case{Kind::decode, 8, 16384, threads});
    if (!mha || !gqa) continue;
    const double bytes_ratio = mha->which().work().bytes / gqa->which().work().bytes;
    const Spread ratio = time_ratio(*mha, *gqa);
    const Spread against_bytes{ratio.median / bytes_ratio, ratio.low / bytes_ratio, ratio.high / bytes_ratio};
    std::fprintf(out,
                 "  decode/kv_len:16384 MHA / GQA-8, threads:%d  time ratio %s vs bytes ratio %.2f = %s  (target "
                 ">= %.1f)  %s\n",
                 threads, spread_text(ratio, 2).c_str(), bytes_ratio, spread_text(against_bytes, 2).c_str(),
                 kGqaBytesRatioTarget, verdict(against_bytes.median >= kGqaBytesRatioTarget));
  }
  std::fflush(out);
}

}  // namespace

int main(int argc, char** argv) {
  std::FILE* text = kvheads_bench::text_stream(argc, argv);
  const bool listing = kvheads_bench::listing_only(argc, argv);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;

  const std::vector<Case> cases = all_cases();
  register_benchmarks(cases);

  std::vector<std::size_t> working_sets;
  for (const Case& c : cases) working_sets.push_back(c.work().working_set);
  const std::vector<int> thread_counts(std::begin(kThreadCounts), std::end(kThreadCounts));
  if (!listing) {
    kvheads_bench::MachineLimits& limits = kvheads_bench::machine_limits();
    limits.measure(working_sets, thread_counts);
    limits.print(text);
    limits.add_context();
    const std::string load = kvheads_bench::load_average();
    if (!load.empty()) {
      std::fprintf(text, "  load average (1 min): %s\n", load.c_str());
      benchmark::AddCustomContext("load_average_at_start", load);
    }
    std::fprintf(text, "\n");
    std::fflush(text);
  }

  benchmark::RunSpecifiedBenchmarks();
  if (!listing) {
    print_summary(text, cases);
    print_side_by_side(text, cases);
    // The limits again: if they moved, the machine's load changed during the run and the
    // ratios above carry that uncertainty.
    kvheads_bench::MachineLimits after;
    after.measure(working_sets, thread_counts);
    std::fprintf(text, "\n");
    after.print(text, "Drift check: the limits measured again after the benchmarks");
    std::fprintf(text, "  load average (1 min): %s\n", kvheads_bench::load_average().c_str());
  }
  benchmark::Shutdown();
  return 0;
}
