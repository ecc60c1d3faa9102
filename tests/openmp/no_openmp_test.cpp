// KVHEADS_NO_OPENMP in a program built with OpenMP (this file is its only one that
// includes kvheads): the global pool keeps kvheads' own threads, and attend still gives
// the reference's result. Exit code 0 on success; each failure is printed.
#include <omp.h>

#include <atomic>
#include <cstdio>
#include <thread>
#include <vector>

#include "../test_support.hpp"

#if !defined(KVHEADS_NO_OPENMP)
#error "build this file with KVHEADS_NO_OPENMP"
#endif

int main() {
  int failures = 0;
  auto expect = [&](bool ok, const char* what) {
    if (!ok) {
      std::printf("FAILED: %s\n", what);
      ++failures;
    }
  };
  expect(kvheads::detail::openmp_runtime().load() == nullptr, "no file offered OpenMP to the pool");
  omp_set_num_threads(1);  // would size an OpenMP-backed pool at 1
  kvheads::ThreadPool& pool = kvheads::ThreadPool::global();
  expect(pool.size() == kvheads::detail::usable_cpus(), "the global pool has one worker per usable CPU");
  std::atomic<int> in_region{0};
  std::vector<std::thread::id> ran_on(2);
  kvheads::detail::parallel_for(pool, 2, 2, [&](std::ptrdiff_t task, int) {
    if (omp_in_parallel()) in_region.fetch_add(1);
    ran_on[std::size_t(task)] = std::this_thread::get_id();
  });
  expect(in_region.load() == 0, "no task runs in an OpenMP region");
  const kvheads_test::Problem p({8, 1, 64}, 1, 1500, 3);
  std::vector<float> out(p.out_size());
  kvheads::AttentionOptions options;
  options.threads = 2;
  kvheads::attend(p.q.data(), p.k.data(), p.v.data(), out.data(), p.q_len, p.kv_len, p.layout, options);
  expect(kvheads_test::relative_error(out, p.reference(options)) <= kvheads_test::tolerance,
         "attend matches the reference");
  std::printf("%s\n", failures == 0 ? "passed" : "failed");
  return failures == 0 ? 0 : 1;
}
