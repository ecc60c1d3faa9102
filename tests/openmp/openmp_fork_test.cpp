// fork() in a program whose own OpenMP code ran a team before kvheads' global pool existed
// (the pool is made only in the child): the child must not start an OpenMP team (GNU
// libgomp would wait forever there) and must run attend on as many threads of its own as
// a team would have there, with the parent's team set to two and to one. Its own
// process, so that nothing has made the global pool before the fork. Exit code 0 on success.
#include <omp.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <thread>
#include <vector>

#include "../test_support.hpp"
#include "../thread_test_support.hpp"

namespace {

std::vector<float> attend_on(const kvheads_test::Problem& p, kvheads::ThreadPool* pool) {
  std::vector<float> out(p.out_size());
  kvheads::AttentionOptions options;
  options.threads = 2;
  options.pool = pool;
  kvheads::attend(p.q.data(), p.k.data(), p.v.data(), out.data(), p.q_len, p.kv_len, p.layout, options);
  return out;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Forks a child that checks the global pool's size, its threads and attend's bits
// (expected[w - 1]: on w workers); returns whether the child exited with 0. The child's
// team is what OpenMP says there: libgomp keeps the parent's omp_set_num_threads, LLVM's
// libomp starts afresh from OMP_NUM_THREADS or the CPU count (reading it starts no team).
bool child_passes(int parent_team, const kvheads_test::Problem& p, const std::vector<float> (&expected)[2]) {
  const pid_t pid = fork();
  if (pid < 0) return false;
  if (pid == 0) {
    for (int sig : {SIGSEGV, SIGABRT, SIGBUS, SIGFPE, SIGILL}) std::signal(sig, SIG_DFL);
    alarm(30);
    int result = 0;
    const int team = omp_get_max_threads();
    if (kvheads::ThreadPool::global().size() != team) result |= 1;
    if (!kvheads_test::runs_two_tasks_at_once(kvheads::ThreadPool::global())) result |= 2;
    if (!same_bits(attend_on(p, nullptr), expected[std::min(team, 2) - 1])) result |= 4;
    _exit(result);
  }
  int status = 0;
  if (waitpid(pid, &status, 0) != pid) return false;
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    std::printf("FAILED: child of a parent with a team of %d: %s %d (exit code bits: 1 size, 2 two tasks at once, 4 bits)\n",
                parent_team, WIFEXITED(status) ? "exit code" : "signal", WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
    return false;
  }
  return true;
}

}  // namespace

int main() {
  int failures = 0;
  if (!kvheads::detail::openmp_runtime().load()) {
    std::printf("FAILED: this file, built with OpenMP, did not offer it to the global pool\n");
    return 1;
  }
  // The program's own parallel region, before anything of kvheads runs.
  std::atomic<int> team_threads{0};
  omp_set_num_threads(2);
#pragma omp parallel
  team_threads.fetch_add(1);
  const kvheads_test::Problem p({8, 1, 64}, 1, 2100, 17);
  std::vector<float> expected[2];
  for (int workers : {1, 2}) {
    kvheads::ThreadPool pool(workers);
    expected[workers - 1] = attend_on(p, &pool);
    if (kvheads_test::relative_error(expected[workers - 1], p.reference({})) > kvheads_test::tolerance) {
      std::printf("FAILED: attend on a ThreadPool(%d) does not match the reference\n", workers);
      ++failures;
    }
  }
  for (int team : {2, 1}) {
    omp_set_num_threads(team);
    if (!child_passes(team, p, expected)) ++failures;
  }
  std::printf("the parent's region had %d threads; %s\n", team_threads.load(), failures == 0 ? "passed" : "failed");
  return failures == 0 ? 0 : 1;
}
