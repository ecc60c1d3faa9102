// ThreadPool and detail::parallel_for: every task exactly once, worker indices
// exclusive and in range, exceptions, concurrent callers, nesting, pool sizes.
#include "kvheads/core/parallel.hpp"
#include "thread_test_support.hpp"

#if defined(__linux__)
#include <sched.h>
#endif

#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <cstddef>
#include <memory>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

using kvheads::ThreadPool;
using kvheads::detail::parallel_for;
using kvheads::detail::workers_for;
using kvheads_test::eventually;

// Per-task run counts plus a per-worker "inside fn" flag that catches two
// concurrent calls sharing a worker index.
struct Recorder {
  explicit Recorder(std::ptrdiff_t n_tasks, int workers)
      : runs(static_cast<std::size_t>(n_tasks)), busy(static_cast<std::size_t>(workers)) {}

  void operator()(std::ptrdiff_t task, int worker) {
    if (task < 0 || task >= static_cast<std::ptrdiff_t>(runs.size())) {
      bad_task.store(true);
      return;
    }
    if (worker < 0 || worker >= static_cast<int>(busy.size())) {
      bad_worker.store(true);
      return;
    }
    if (busy[static_cast<std::size_t>(worker)].exchange(1) != 0) shared_worker.store(true);
    // A little uneven work so several workers overlap.
    volatile unsigned sink = 0;
    for (std::ptrdiff_t i = 0; i < (task % 7) * 50; ++i) sink = sink + static_cast<unsigned>(i);
    runs[static_cast<std::size_t>(task)].fetch_add(1);
    busy[static_cast<std::size_t>(worker)].store(0);
  }

  bool each_ran_once() const {
    for (const auto& count : runs)
      if (count.load() != 1) return false;
    return true;
  }

  std::vector<std::atomic<int>> runs;
  std::vector<std::atomic<int>> busy;
  std::atomic<bool> bad_task{false};
  std::atomic<bool> bad_worker{false};
  std::atomic<bool> shared_worker{false};
};

void check_every_task_once(ThreadPool& pool, std::ptrdiff_t n_tasks, int threads) {
  const int workers = workers_for(pool, n_tasks, threads);
  REQUIRE(workers >= 1);
  REQUIRE(workers <= pool.size());
  if (threads > 0) REQUIRE(workers <= threads);
  if (n_tasks > 0) REQUIRE(workers <= n_tasks);
  Recorder recorder(n_tasks, workers);
  parallel_for(pool, n_tasks, threads, recorder);
  CHECK(recorder.each_ran_once());
  CHECK_FALSE(recorder.bad_task.load());
  CHECK_FALSE(recorder.bad_worker.load());
  CHECK_FALSE(recorder.shared_worker.load());
}

}  // namespace

TEST_CASE("parallel_for runs every task exactly once", "[parallel]") {
  const int pool_size = GENERATE(1, 2, 3, 4);
  ThreadPool pool(pool_size);
  REQUIRE(pool.size() == pool_size);
  for (std::ptrdiff_t n_tasks : {0, 1, 2, 3, 17, 1000}) {
    for (int threads : {0, 1, 2, 3, 8}) {
      INFO("pool " << pool_size << ", n_tasks " << n_tasks << ", threads " << threads);
      check_every_task_once(pool, n_tasks, threads);
    }
  }
}

TEST_CASE("parallel_for on the global pool runs every task exactly once", "[parallel]") {
  ThreadPool& pool = ThreadPool::global();
  REQUIRE(&pool == &ThreadPool::global());
  REQUIRE(pool.size() >= 1);
  for (std::ptrdiff_t n_tasks : {0, 1, 2, 3, 17, 1000}) {
    for (int threads : {0, 1, 2, 3, 8}) {
      INFO("n_tasks " << n_tasks << ", threads " << threads);
      std::vector<std::atomic<int>> runs(static_cast<std::size_t>(n_tasks));
      const int workers = workers_for(pool, n_tasks, threads);
      std::atomic<bool> bad_worker{false};
      parallel_for(n_tasks, threads, [&](std::ptrdiff_t task, int worker) {
        if (worker < 0 || worker >= workers) bad_worker.store(true);
        runs[static_cast<std::size_t>(task)].fetch_add(1);
      });
      for (const auto& count : runs) CHECK(count.load() == 1);
      CHECK_FALSE(bad_worker.load());
    }
  }
}

TEST_CASE("workers_for caps by pool size, threads and tasks", "[parallel]") {
  ThreadPool pool(3);
  CHECK(workers_for(pool, 0, 0) == 1);
  CHECK(workers_for(pool, 1, 0) == 1);
  CHECK(workers_for(pool, 2, 0) == 2);
  CHECK(workers_for(pool, 100, 0) == 3);
  CHECK(workers_for(pool, 100, 8) == 3);
  CHECK(workers_for(pool, 100, 2) == 2);
  CHECK(workers_for(pool, 100, 1) == 1);
  ThreadPool single(1);
  CHECK(single.size() == 1);
  CHECK(workers_for(single, 100, 0) == 1);
  CHECK(workers_for(single, 100, 4) == 1);
}

TEST_CASE("ThreadPool(0) uses the CPUs the thread may run on", "[parallel]") {
  ThreadPool pool(0);
  ThreadPool by_default;
  CHECK(by_default.size() == pool.size());
#if defined(__linux__) && defined(CPU_COUNT)
  cpu_set_t allowed;
  CPU_ZERO(&allowed);
  REQUIRE(sched_getaffinity(0, sizeof(allowed), &allowed) == 0);
  CHECK(pool.size() == CPU_COUNT(&allowed));
  // Restricted to one CPU (as under `taskset -c N`), a pool of hardware_concurrency()
  // workers would oversubscribe it.
  int first_cpu = 0;
  while (!CPU_ISSET(first_cpu, &allowed)) ++first_cpu;
  cpu_set_t one;
  CPU_ZERO(&one);
  CPU_SET(first_cpu, &one);
  REQUIRE(sched_setaffinity(0, sizeof(one), &one) == 0);
  const int pinned_size = ThreadPool(0).size();
  REQUIRE(sched_setaffinity(0, sizeof(allowed), &allowed) == 0);
  CHECK(pinned_size == 1);
#else
  const int hardware = static_cast<int>(std::thread::hardware_concurrency());
  CHECK(pool.size() == (hardware > 0 ? hardware : 1));
#endif
}

TEST_CASE("a negative thread count names the value", "[parallel]") {
  CHECK_THROWS_AS(ThreadPool(-3), std::invalid_argument);
  CHECK_THROWS_WITH(ThreadPool(-3), Catch::Contains("-3"));
}

TEST_CASE("the requested workers all run at once, the caller among them", "[parallel]") {
  ThreadPool pool(3);
  // Each task waits until all three have started, so each sits on its own worker.
  std::atomic<int> started{0};
  std::atomic<bool> timed_out{false};
  std::vector<std::thread::id> ran_on(3);
  std::vector<int> worker_of(3, -1);
  parallel_for(pool, 3, 0, [&](std::ptrdiff_t task, int worker) {
    ran_on[static_cast<std::size_t>(task)] = std::this_thread::get_id();
    worker_of[static_cast<std::size_t>(task)] = worker;
    started.fetch_add(1);
    if (!eventually([&] { return started.load() == 3; })) timed_out.store(true);
  });
  REQUIRE_FALSE(timed_out.load());
  CHECK(std::set<std::thread::id>(ran_on.begin(), ran_on.end()).size() == 3);
  CHECK(std::set<int>(worker_of.begin(), worker_of.end()) == std::set<int>{0, 1, 2});
  bool caller_took_part = false;
  for (std::size_t i = 0; i < 3; ++i) {
    if (ran_on[i] == std::this_thread::get_id()) {
      caller_took_part = true;
      CHECK(worker_of[i] == 0);
    }
  }
  CHECK(caller_took_part);
}

TEST_CASE("one worker runs inline on the caller", "[parallel]") {
  ThreadPool pool(3);
  ThreadPool single(1);
  const auto caller = std::this_thread::get_id();
  bool off_caller = false;
  std::ptrdiff_t expected = 0;
  bool in_order = true;
  parallel_for(pool, 50, 1, [&](std::ptrdiff_t task, int worker) {
    if (std::this_thread::get_id() != caller || worker != 0) off_caller = true;
    if (task != expected++) in_order = false;
  });
  CHECK(in_order);
  parallel_for(single, 50, 0, [&](std::ptrdiff_t, int worker) {
    if (std::this_thread::get_id() != caller || worker != 0) off_caller = true;
  });
  parallel_for(pool, 1, 0, [&](std::ptrdiff_t, int worker) {
    if (std::this_thread::get_id() != caller || worker != 0) off_caller = true;
  });
  CHECK_FALSE(off_caller);
}

TEST_CASE("uneven tasks balance across workers", "[parallel]") {
  ThreadPool pool(2);
  // Task 0 is slow; whoever takes it must leave nearly all the quick ones to the other.
  constexpr std::ptrdiff_t n_tasks = 100;
  std::vector<int> worker_of(n_tasks, -1);
  parallel_for(pool, n_tasks, 0, [&](std::ptrdiff_t task, int worker) {
    worker_of[static_cast<std::size_t>(task)] = worker;
    if (task == 0) std::this_thread::sleep_for(std::chrono::milliseconds(200));
  });
  int with_slow = 0;
  for (int worker : worker_of)
    if (worker == worker_of[0]) ++with_slow;
  CHECK(with_slow < n_tasks / 2);
}

TEST_CASE("each worker starts on its own contiguous share of the tasks", "[parallel]") {
  // The first task of each share waits until all three have started, so no worker can
  // finish its share and take from another's before that share's owner has begun: each
  // worker's first task is the start of its share, in every call (what keeps a worker on
  // the same KV heads, and their K/V in its core's caches, call after call).
  ThreadPool pool(3);
  constexpr std::ptrdiff_t n_tasks = 10;  // shares [0, 3), [3, 6), [6, 10)
  for (int call = 0; call < 3; ++call) {
    INFO("call " << call);
    std::atomic<int> started{0};
    std::atomic<bool> timed_out{false};
    std::vector<std::ptrdiff_t> first_task(3, -1);
    std::vector<int> runs(n_tasks, 0);
    parallel_for(pool, n_tasks, 0, [&](std::ptrdiff_t task, int worker) {
      ++runs[static_cast<std::size_t>(task)];  // each task runs once, so no two threads touch one entry
      if (first_task[static_cast<std::size_t>(worker)] < 0) first_task[static_cast<std::size_t>(worker)] = task;
      if (task == 0 || task == 3 || task == 6) {
        started.fetch_add(1);
        if (!eventually([&] { return started.load() == 3; })) timed_out.store(true);
      }
    });
    REQUIRE_FALSE(timed_out.load());
    CHECK(first_task == std::vector<std::ptrdiff_t>{0, 3, 6});
    CHECK(runs == std::vector<int>(n_tasks, 1));
  }
}

TEST_CASE("an exception in a task reaches the caller and the pool stays usable", "[parallel]") {
  ThreadPool pool(3);
  for (int threads : {0, 1, 2}) {
    INFO("threads " << threads);
    std::atomic<int> ran{0};
    CHECK_THROWS_WITH(parallel_for(pool, 200, threads,
                                   [&](std::ptrdiff_t task, int) {
                                     ran.fetch_add(1);
                                     if (task == 5) throw std::runtime_error("task five failed");
                                   }),
                      "task five failed");
    CHECK(ran.load() >= 1);
    check_every_task_once(pool, 1000, threads);
  }
  // Every task throws: exactly one of the exceptions comes out.
  CHECK_THROWS_AS(parallel_for(pool, 64, 0, [](std::ptrdiff_t task, int) { throw static_cast<int>(task); }), int);
  check_every_task_once(pool, 1000, 0);
  // The global overload propagates too.
  CHECK_THROWS_AS(parallel_for(100, 0, [](std::ptrdiff_t task, int) {
                    if (task == 50) throw std::logic_error("global");
                  }),
                  std::logic_error);
}

TEST_CASE("several threads can share one pool", "[parallel]") {
  const int pool_size = GENERATE(1, 3);
  ThreadPool pool(pool_size);
  std::atomic<bool> failed{false};
  std::vector<std::thread> callers;
  for (int c = 0; c < 4; ++c) {
    callers.emplace_back([&pool, &failed, c] {
      for (int round = 0; round < 100; ++round) {
        const std::ptrdiff_t n_tasks = 1 + (round * 7 + c * 13) % 60;
        const int threads = round % 4;
        const int workers = workers_for(pool, n_tasks, threads);
        Recorder recorder(n_tasks, workers);
        parallel_for(pool, n_tasks, threads, recorder);
        if (!recorder.each_ran_once() || recorder.bad_task.load() || recorder.bad_worker.load() ||
            recorder.shared_worker.load())
          failed.store(true);
      }
    });
  }
  for (auto& caller : callers) caller.join();
  CHECK_FALSE(failed.load());
}

TEST_CASE("nested parallel_for runs inline without deadlock", "[parallel]") {
  ThreadPool pool(3);
  ThreadPool other(2);
  constexpr std::ptrdiff_t outer_tasks = 12, inner_tasks = 16;
  std::vector<std::atomic<int>> runs(static_cast<std::size_t>(outer_tasks * inner_tasks));
  std::atomic<bool> inner_not_inline{false};
  parallel_for(pool, outer_tasks, 0, [&](std::ptrdiff_t outer, int) {
    const auto me = std::this_thread::get_id();
    if (workers_for(pool, inner_tasks, 0) != 1) inner_not_inline.store(true);
    // The same pool, another pool and the global pool: all inline.
    ThreadPool& target = outer % 3 == 0 ? pool : outer % 3 == 1 ? other : ThreadPool::global();
    parallel_for(target, inner_tasks, 0, [&](std::ptrdiff_t inner, int worker) {
      if (worker != 0 || std::this_thread::get_id() != me) inner_not_inline.store(true);
      runs[static_cast<std::size_t>(outer * inner_tasks + inner)].fetch_add(1);
    });
    parallel_for(inner_tasks, 0, [&](std::ptrdiff_t, int worker) {
      if (worker != 0 || std::this_thread::get_id() != me) inner_not_inline.store(true);
    });
  });
  for (const auto& count : runs) CHECK(count.load() == 1);
  CHECK_FALSE(inner_not_inline.load());
  // Outside any task, the pool is parallel again.
  CHECK(workers_for(pool, inner_tasks, 0) == 3);
}

TEST_CASE("parallel_for accepts const, mutable and temporary callables", "[parallel]") {
  ThreadPool pool(2);
  std::vector<std::atomic<int>> runs(10);
  const auto by_const_ref = [&runs](std::ptrdiff_t task, int) { runs[static_cast<std::size_t>(task)]++; };
  parallel_for(pool, 10, 0, by_const_ref);
  auto by_ref = [&runs](std::ptrdiff_t task, int) mutable { runs[static_cast<std::size_t>(task)]++; };
  parallel_for(pool, 10, 0, by_ref);
  parallel_for(pool, 10, 0, [&runs](std::ptrdiff_t task, int) { runs[static_cast<std::size_t>(task)]++; });
  for (const auto& count : runs) CHECK(count.load() == 3);
}

TEST_CASE("pools can be created and destroyed repeatedly", "[parallel]") {
  for (int i = 0; i < 20; ++i) {
    ThreadPool pool(1 + i % 4);
    if (i % 2 == 0) check_every_task_once(pool, 17, 0);
  }
}
