#pragma once
// Shared helpers for the tests of threads and pools: waiting for a condition with a
// deadline, and whether a pool runs two tasks at once.
#include <atomic>
#include <chrono>
#include <cstddef>
#include <thread>

#include <kvheads/core/parallel.hpp>

namespace kvheads_test {

/// Busy-waits (yielding) until pred() holds or `timeout` passes; returns whether it held.
template <class Pred>
bool eventually(Pred pred, std::chrono::seconds timeout = std::chrono::seconds(20)) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!pred()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::yield();
  }
  return true;
}

/// Whether `pool` runs two tasks at once: each of two tasks waits up to 5 s for the other
/// to start. On the caller alone, the first task gives up, and only then the second starts.
/// A pool of one worker (the global pool on a single CPU) has nothing to check: true.
inline bool runs_two_tasks_at_once(kvheads::ThreadPool& pool) {
  if (pool.size() < 2) return true;
  std::atomic<int> started{0};
  std::atomic<bool> met{true};
  kvheads::detail::parallel_for(pool, 2, 2, [&](std::ptrdiff_t, int) {
    started.fetch_add(1);
    if (!eventually([&] { return started.load() >= 2; }, std::chrono::seconds(5))) met.store(false);
  });
  return met.load();
}

}  // namespace kvheads_test
