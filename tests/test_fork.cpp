// attend() in a child of fork(): the child has only the thread that forked, so pools whose
// workers (and, mid-job, whose locks) belonged to the parent's other threads must still
// work there, on all their threads, with the same results. Processes that fork workers
// (a Python multiprocessing pool, a pre-forking server) do this. Not in the ThreadSanitizer
// phase of CI: TSan does not support starting threads after a multi-threaded fork.
#include <catch2/catch.hpp>

#if defined(__unix__) || defined(__APPLE__)

#include <signal.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstring>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "test_support.hpp"
#include "thread_test_support.hpp"

using kvheads::AttentionOptions;
using kvheads::ThreadPool;
using namespace kvheads_test;

namespace {

std::vector<float> run(const Problem& problem, const AttentionOptions& options) {
  std::vector<float> out(problem.out_size());
  kvheads::attend(problem.q.data(), problem.k.data(), problem.v.data(), out.data(), problem.q_len, problem.kv_len,
                  problem.layout, options);
  return out;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// What a child reports through its exit status.
enum ChildResult : int {
  kChildOk = 0,
  kGlobalPoolWrong = 1,
  kUserPoolWrong = 2,
  kNewPoolWrong = 3,
  kChildThrew = 4,
  kChildForkedAgainWrong = 5,
  kOneThreadOnly = 6,
};

std::string describe_status(int status) {
  std::ostringstream s;
  if (WIFSIGNALED(status)) {
    s << "the child was killed by signal " << WTERMSIG(status);
    if (WTERMSIG(status) == SIGALRM) s << " (SIGALRM: it hung)";
  } else if (WIFEXITED(status)) {
    s << "the child exited with " << WEXITSTATUS(status);
  } else {
    s << "the child stopped with status " << status;
  }
  return s.str();
}

}  // namespace

TEST_CASE("a child of fork() runs attend on every pool, even one busy with a job when it forked", "[fork]") {
  // MQA decode over 3000 keys on 2 threads: key splits give both workers tasks.
  const Problem problem({8, 1, 64}, 1, 3000, 91);
  AttentionOptions on_global;
  on_global.threads = 2;
  auto user_pool = std::make_unique<ThreadPool>(2);
  AttentionOptions on_user = on_global;
  on_user.pool = user_pool.get();
  const std::vector<float> expected = run(problem, on_global);
  REQUIRE(same_bits(run(problem, on_user), expected));
  // A pool the children never use, only destroy.
  auto idle_pool = std::make_unique<ThreadPool>(2);
  REQUIRE(runs_two_tasks_at_once(*idle_pool));
  REQUIRE(runs_two_tasks_at_once(ThreadPool::global()));

  // Two threads keep both pools busy: without the fork handlers most forks would land while
  // a job runs on each (the child then hung); with them, each fork waits for those jobs.
  // Their outputs are allocated once: AddressSanitizer before LLVM 18 does not lock its
  // allocator around fork(), so a child could inherit it locked by one of them.
  std::atomic<bool> stop{false};
  std::atomic<long> busy_calls{0};
  std::vector<std::thread> busy;
  for (const AttentionOptions* options : {&on_global, &on_user})
    busy.emplace_back([&, options] {
      std::vector<float> out(problem.out_size());
      while (!stop.load()) {
        kvheads::attend(problem.q.data(), problem.k.data(), problem.v.data(), out.data(), problem.q_len,
                        problem.kv_len, problem.layout, *options);
        busy_calls.fetch_add(1);
      }
    });
  while (busy_calls.load() < 40) std::this_thread::yield();

  constexpr int kForks = 12;
  std::string failure;
  for (int round = 0; round < kForks && failure.empty(); ++round) {
    const pid_t pid = fork();
    if (pid == 0) {
      // The child: no Catch2 here (its state, and its crash handlers, are the parent's
      // copy); the exit status says what went wrong, and SIGALRM ends a child that hangs.
      for (int sig : {SIGSEGV, SIGABRT, SIGBUS, SIGFPE, SIGILL}) std::signal(sig, SIG_DFL);
      alarm(30);
      int result = kChildOk;
      try {
        if (!same_bits(run(problem, on_global), expected)) result = kGlobalPoolWrong;
        else if (!same_bits(run(problem, on_user), expected)) result = kUserPoolWrong;
        else if (!runs_two_tasks_at_once(ThreadPool::global()) || !runs_two_tasks_at_once(*user_pool))
          result = kOneThreadOnly;
        else {
          ThreadPool own(2);
          AttentionOptions on_own = on_global;
          on_own.pool = &own;
          if (!same_bits(run(problem, on_own), expected)) result = kNewPoolWrong;
        }
        if (result == kChildOk && round == 0) {
          // A grandchild, forked by a child whose pools restarted their workers.
          const pid_t grandchild = fork();
          if (grandchild == 0) {
            alarm(30);
            _exit(same_bits(run(problem, on_global), expected) && same_bits(run(problem, on_user), expected)
                      ? kChildOk
                      : kChildForkedAgainWrong);
          }
          int status = 0;
          if (grandchild < 0 || waitpid(grandchild, &status, 0) != grandchild || !WIFEXITED(status) ||
              WEXITSTATUS(status) != kChildOk)
            result = kChildForkedAgainWrong;
        }
        // Inherited pools' destructors must not wait for the parent's workers: one this child
        // never used, and one it restarted.
        idle_pool.reset();
        user_pool.reset();
      } catch (...) {
        result = kChildThrew;
      }
      _exit(result);
    }
    if (pid < 0) {
      failure = "fork() failed";
      break;
    }
    int status = 0;
    if (waitpid(pid, &status, 0) != pid) failure = "waitpid() failed";
    else if (!WIFEXITED(status) || WEXITSTATUS(status) != kChildOk)
      failure = "fork " + std::to_string(round) + ": " + describe_status(status);
  }
  stop.store(true);
  for (std::thread& t : busy) t.join();
  INFO(failure);
  CHECK(failure.empty());
  // The parent's pools are unharmed by the forks.
  CHECK(same_bits(run(problem, on_global), expected));
  CHECK(same_bits(run(problem, on_user), expected));
}

#endif
