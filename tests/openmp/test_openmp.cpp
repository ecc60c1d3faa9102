// The global pool on OpenMP. This file is built with OpenMP and the kernels
// (kvheads_compiled_kernels) without, as in a program that compiles them once: the pool
// must still run attend's tasks on OpenMP teams, follow omp_set_num_threads, give the
// bits of a ThreadPool of the same size, and run inline inside a parallel region.
#include <omp.h>

#if defined(__unix__)
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#endif

#include <algorithm>
#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <cstddef>
#include <cstring>
#include <set>
#include <stdexcept>
#include <thread>
#include <vector>

#include "../test_support.hpp"
#include "../thread_test_support.hpp"

using kvheads::AttentionOptions;
using kvheads::HeadLayout;
using kvheads::ThreadPool;
using kvheads::detail::parallel_for;
using kvheads::detail::workers_for;
using namespace kvheads_test;

namespace {

// omp_set_num_threads(threads) for one test, then back.
class OmpThreads {
 public:
  explicit OmpThreads(int threads) : before_(omp_get_max_threads()) { omp_set_num_threads(threads); }
  ~OmpThreads() { omp_set_num_threads(before_); }
  OmpThreads(const OmpThreads&) = delete;
  OmpThreads& operator=(const OmpThreads&) = delete;

 private:
  int before_;
};

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

template <class Isa>
std::vector<float> attend_plain(const Problem& p, const AttentionOptions& options, std::vector<float>* lse = nullptr) {
  std::vector<float> out(p.out_size(), -123.f);
  if (lse) lse->assign(std::size_t(p.q_len) * std::size_t(p.layout.q_heads), -123.f);
  kvheads::attend<Isa>(p.q.data(), p.k.data(), p.v.data(), out.data(), p.q_len, p.kv_len, p.layout, options,
                       lse ? lse->data() : nullptr);
  return out;
}

// On OpenMP (the global pool) and on a ThreadPool of as many threads: the same tasks, so
// the same bits; both within the reference's tolerance.
template <class Isa>
void check_openmp_against_pool(const Problem& p, AttentionOptions options, ThreadPool& pool) {
  INFO(describe(p.layout, p.q_len, p.kv_len, options) << " isa " << Isa::name);
  std::vector<float> expected_lse;
  const std::vector<float> expected = p.reference(options, &expected_lse);
  options.pool = nullptr;
  std::vector<float> openmp_lse;
  const std::vector<float> openmp = attend_plain<Isa>(p, options, &openmp_lse);
  options.pool = &pool;
  std::vector<float> pool_lse;
  const std::vector<float> pooled = attend_plain<Isa>(p, options, &pool_lse);
  CHECK(relative_error(openmp, expected) <= tolerance);
  CHECK(relative_error(openmp_lse, expected_lse, 1.0) <= tolerance);
  CHECK(same_bits(openmp, pooled));
  CHECK(same_bits(openmp_lse, pool_lse));
}

}  // namespace

TEST_CASE("a program built with OpenMP runs the global pool on OpenMP teams", "[openmp]") {
  REQUIRE(kvheads::detail::openmp_runtime().load() != nullptr);
  OmpThreads two(2);
  ThreadPool& pool = ThreadPool::global();
  REQUIRE(pool.size() == 2);
  // Each task waits until both have started, so each holds its own team thread.
  std::atomic<int> started{0};
  std::atomic<bool> timed_out{false};
  int team_thread[2] = {-1, -1}, worker_of[2] = {-1, -1};
  bool in_region[2] = {false, false};
  std::thread::id ran_on[2];
  parallel_for(pool, 2, 0, [&](std::ptrdiff_t task, int worker) {
    team_thread[task] = omp_get_thread_num();
    worker_of[task] = worker;
    in_region[task] = omp_in_parallel() != 0;
    ran_on[task] = std::this_thread::get_id();
    started.fetch_add(1);
    if (!eventually([&] { return started.load() == 2; })) timed_out.store(true);
  });
  REQUIRE_FALSE(timed_out.load());
  CHECK(std::set<int>{team_thread[0], team_thread[1]} == std::set<int>{0, 1});
  CHECK(worker_of[0] == team_thread[0]);
  CHECK(worker_of[1] == team_thread[1]);
  CHECK(in_region[0]);
  CHECK(in_region[1]);
  CHECK(ran_on[0] != ran_on[1]);
  CHECK((ran_on[0] == std::this_thread::get_id() || ran_on[1] == std::this_thread::get_id()));
}

TEST_CASE("the global pool on OpenMP follows omp_set_num_threads", "[openmp]") {
  ThreadPool& pool = ThreadPool::global();
  for (int threads : {1, 2, 3}) {
    OmpThreads setting(threads);
    CHECK(pool.size() == threads);
    CHECK(workers_for(pool, 100, 0) == threads);
    CHECK(workers_for(pool, 100, 2) == std::min(2, threads));
    CHECK(workers_for(pool, 1, 0) == 1);
    // Every task once, on a worker in range, from a team of that size.
    std::vector<std::atomic<int>> runs(50);
    std::atomic<bool> bad_worker{false}, bad_team{false};
    parallel_for(pool, 50, 0, [&](std::ptrdiff_t task, int worker) {
      runs[std::size_t(task)].fetch_add(1);
      if (worker < 0 || worker >= threads) bad_worker.store(true);
      if (threads > 1 && omp_get_num_threads() != threads) bad_team.store(true);
    });
    for (const auto& count : runs) CHECK(count.load() == 1);
    CHECK_FALSE(bad_worker.load());
    CHECK_FALSE(bad_team.load());
  }
}

TEST_CASE("a task's exception on OpenMP reaches the caller and the pool stays usable", "[openmp]") {
  OmpThreads two(2);
  ThreadPool& pool = ThreadPool::global();
  CHECK_THROWS_WITH(parallel_for(pool, 8, 0,
                                 [](std::ptrdiff_t task, int) {
                                   if (task == 5) throw std::runtime_error("task 5 failed");
                                 }),
                    "task 5 failed");
  std::atomic<int> ran{0};
  parallel_for(pool, 8, 0, [&](std::ptrdiff_t, int) { ran.fetch_add(1); });
  CHECK(ran.load() == 8);
}

TEST_CASE("attend on OpenMP gives the bits of a ThreadPool of as many threads, MHA, GQA and MQA", "[openmp][attend]") {
  // Three threads, more than the CI machine's CPUs: a call that ran on a pool of one
  // worker per CPU instead would split MQA's keys differently and not give these bits.
  OmpThreads three(3);
  ThreadPool pool(3);
  AttentionOptions causal;
  causal.causal = true;
  AttentionOptions combined = option_sets().back();
  // Lengths of 1000 keys and more split the keys of MQA's and GQA's few tasks over the
  // threads (then merge; MQA's 3100 keys in 6 parts on 3 workers, 4 on 2); head_dim 36 is
  // a tail of every vector width.
  const std::vector<std::pair<int, int>> lengths = {{1, 1}, {1, 2}, {1, 17}, {17, 17}, {1, 3100}, {2, 1100}, {17, 1000}};
  for (int threads : {0, 1, 2})
    for (int head_dim : {36, 128})
      for (const HeadLayout& layout : {HeadLayout{8, 8, head_dim}, HeadLayout{8, 2, head_dim}, HeadLayout{8, 1, head_dim}})
        for (auto [q_len, kv_len] : lengths) {
          const Problem p(layout, q_len, kv_len, std::uint32_t(head_dim * 13 + q_len * 7 + kv_len + layout.kv_heads));
          for (AttentionOptions options : {AttentionOptions{}, causal, combined}) {
            options.threads = threads;
            check_openmp_against_pool<kvheads::simd::default_isa>(p, options, pool);
          }
          AttentionOptions options;
          options.threads = threads;
          check_openmp_against_pool<kvheads::simd::scalar>(p, options, pool);
        }
}

TEST_CASE("decode from a KvCache on OpenMP matches the reference and a ThreadPool", "[openmp][attend]") {
  OmpThreads two(2);
  ThreadPool pool(2);
  for (const HeadLayout& layout : {HeadLayout{8, 8, 64}, HeadLayout{8, 2, 64}, HeadLayout{8, 1, 64}}) {
    const Problem p(layout, 1, 1500, 99u + std::uint32_t(layout.kv_heads));
    kvheads::KvCache<float> cache(layout, p.kv_len);
    cache.append(p.k.data(), p.v.data(), p.kv_len);
    AttentionOptions options;
    std::vector<float> openmp(p.out_size()), pooled(p.out_size());
    kvheads::attend(p.q.data(), p.q_len, cache, openmp.data(), options);
    options.pool = &pool;
    kvheads::attend(p.q.data(), p.q_len, cache, pooled.data(), options);
    INFO("kv_heads " << layout.kv_heads);
    CHECK(relative_error(openmp, p.reference(AttentionOptions{})) <= tolerance);
    CHECK(same_bits(openmp, pooled));
  }
}

TEST_CASE("attend inside an OpenMP parallel region runs inline on each team thread", "[openmp][attend]") {
  OmpThreads two(2);
  // 2100 keys: one worker splits them in 2, two workers in 4, so a call that planned for
  // the team it did not get would not give these bits.
  const Problem p({8, 1, 128}, 1, 2100, 5);
  AttentionOptions one_thread;
  one_thread.threads = 1;
  const std::vector<float> expected = attend_plain<kvheads::simd::default_isa>(p, one_thread);
  std::vector<std::vector<float>> outs(2);
  int workers_inside[2] = {-1, -1};
  int team = 0;
#pragma omp parallel num_threads(2)
  {
    const int me = omp_get_thread_num();
    if (me == 0) team = omp_get_num_threads();
    workers_inside[me] = workers_for(ThreadPool::global(), 100, 0);
    outs[std::size_t(me)] = attend_plain<kvheads::simd::default_isa>(p, AttentionOptions{});
  }
  REQUIRE(team == 2);
  for (int me = 0; me < 2; ++me) {
    INFO("team thread " << me);
    CHECK(workers_inside[me] == 1);
    CHECK(same_bits(outs[std::size_t(me)], expected));
  }
  CHECK(relative_error(expected, p.reference(AttentionOptions{})) <= tolerance);
}

TEST_CASE("threads calling attend at once on OpenMP each get their own team", "[openmp][attend]") {
  OmpThreads two(2);
  const Problem p({8, 2, 64}, 3, 1200, 11);
  AttentionOptions causal;
  causal.causal = true;
  ThreadPool pool(2);
  AttentionOptions on_pool = causal;
  on_pool.pool = &pool;
  const std::vector<float> expected = attend_plain<kvheads::simd::default_isa>(p, on_pool);
  std::vector<std::vector<float>> outs(4);
  std::vector<std::thread> callers;
  for (std::size_t i = 0; i < outs.size(); ++i)
    callers.emplace_back([&, i] {
      omp_set_num_threads(2);  // each thread's own setting
      for (int round = 0; round < 5; ++round) outs[i] = attend_plain<kvheads::simd::default_isa>(p, causal);
    });
  for (std::thread& caller : callers) caller.join();
  for (const std::vector<float>& out : outs) CHECK(same_bits(out, expected));
  CHECK(relative_error(expected, p.reference(causal)) <= tolerance);
}

#if defined(__unix__)
TEST_CASE("in a child of fork() the global pool on OpenMP runs on threads of its own", "[openmp][fork]") {
  // GNU libgomp cannot start a team in the child of a process that had one (the child
  // waits forever), so the parent starts teams first; the child must still run attend on
  // two threads at once, with the bits of a ThreadPool of its size. Its size is the team
  // OpenMP would give in the child: libgomp keeps the parent's omp_set_num_threads there,
  // LLVM's libomp starts afresh from OMP_NUM_THREADS or the CPU count.
  OmpThreads two(2);
  const Problem p({8, 1, 64}, 1, 2100, 21);
  AttentionOptions options;
  options.threads = 2;
  const std::vector<float> on_openmp = attend_plain<kvheads::simd::default_isa>(p, options);
  std::vector<float> expected[2];  // on 1 and on 2 workers
  for (int workers : {1, 2}) {
    ThreadPool pool(workers);
    AttentionOptions on_pool = options;
    on_pool.pool = &pool;
    expected[workers - 1] = attend_plain<kvheads::simd::default_isa>(p, on_pool);
    REQUIRE(relative_error(expected[workers - 1], p.reference(AttentionOptions{})) <= tolerance);
  }
  const pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    for (int sig : {SIGSEGV, SIGABRT, SIGBUS, SIGFPE, SIGILL}) std::signal(sig, SIG_DFL);
    alarm(30);
    int result = 0;
    ThreadPool& global = ThreadPool::global();
    if (global.size() != omp_get_max_threads()) result |= 1;  // reading the setting starts no team
    if (!runs_two_tasks_at_once(global)) result |= 2;
    for (int round = 0; round < 3; ++round)
      if (!same_bits(attend_plain<kvheads::simd::default_isa>(p, options), expected[std::min(global.size(), 2) - 1]))
        result |= 4;
    _exit(result);
  }
  int status = 0;
  REQUIRE(waitpid(pid, &status, 0) == pid);
  INFO("child status " << status << " (exit code bits: 1 size, 2 two tasks at once, 4 bits)");
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
  // The parent's pool is still on OpenMP.
  CHECK(same_bits(attend_plain<kvheads::simd::default_isa>(p, options), on_openmp));
  bool in_region = false;
  parallel_for(ThreadPool::global(), 2, 2, [&](std::ptrdiff_t task, int) {
    if (task == 0) in_region = omp_in_parallel() != 0;
  });
  CHECK(in_region);
}
#endif
