#pragma once
// The one parallel layer of kvheads: a persistent pool of worker threads and
// detail::parallel_for over it. Kernels never create threads; they split their
// work into tasks and hand them to parallel_for, which runs in every attend() call,
// so nothing here creates threads or allocates per call.
//
// Concurrency policy (documented choice): jobs on one pool are serialised. A
// parallel_for that finds the pool busy with another thread's job waits for it,
// then gets the whole pool, so every call sees the worker count workers_for()
// reported. A parallel_for made from inside a task (on any pool) runs inline on
// the calling thread as worker 0: nested calls never wait on a pool, so they
// cannot deadlock.
//
// OpenMP: in a program built with OpenMP (see OpenMpRuntime), the global pool starts no
// threads of its own and runs each job on an OpenMP team instead; such jobs are not
// serialised (each calling thread gets its own team, as OpenMP gives it).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <system_error>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "kvheads/core/check.hpp"

#if defined(__linux__)
#include <sched.h>
#endif
// KVHEADS_NO_FORK_HANDLERS: no pthread_atfork handlers (see ThreadPool on fork()); a child
// of fork() must then not use a pool that was running a job when the parent forked.
#if (defined(__unix__) || defined(__APPLE__)) && !defined(KVHEADS_NO_FORK_HANDLERS)
#include <pthread.h>
#define KVHEADS_DETAIL_FORK_HANDLERS 1
#endif
// KVHEADS_NO_OPENMP: this file does not offer OpenMP to the global pool even when built
// with it (the pool then uses OpenMP only if another file of the program offers it).
// OpenMP 3.0 (200805) or later: omp_get_active_level and omp_get_max_active_levels.
#if defined(_OPENMP) && _OPENMP >= 200805 && !defined(KVHEADS_NO_OPENMP)
#include <omp.h>
#define KVHEADS_DETAIL_OPENMP 1
#endif

namespace kvheads {

class ThreadPool;

namespace detail {

struct PoolAccess;

// How long an idle worker (or a caller waiting for the last workers) spins
// before sleeping: long enough to catch back-to-back calls without a futex
// round trip, short enough not to hold a core that other work needs.
inline constexpr int kSpinMicroseconds = 50;

// True while this thread runs a task of some parallel_for; a parallel_for
// started there runs inline.
inline thread_local bool in_parallel_task = false;

// A worker's share of a job's tasks: [next, end), claimed from the front.
struct alignas(64) Share {
  std::atomic<std::ptrdiff_t> next{0};
  std::ptrdiff_t end = 0;
};

// One parallel_for call. It lives on the caller's stack. Workers join it while
// the pool offers it and the caller closes it once its own share is done, then
// waits only for the workers that joined: a worker that wakes late (its wake-up
// can take longer than the whole job) neither delays the caller nor touches the
// job after it is gone.
//
// Tasks are cut into one contiguous share per worker; a worker runs its own share
// first, then takes what is left of the others', one task at a time, so uneven
// tasks still balance. A worker id is one thread for the pool's life, so with
// balanced tasks each thread gets the same tasks call after call (for attend: the
// same KV heads, the same key splits) and finds their K/V still in the caches of
// its core. The CI machine's 2 vCPUs sit on different L3s; there, 2-thread decode
// of 4096 keys went from 0.485 to 0.419 ms (GQA-8, 32 MiB of K/V) and from 2.40 to
// 2.04 ms (MHA) against the single shared counter this replaced (medians of 5-7
// alternating runs).
struct Job {
  void (*call)(void* fn, std::ptrdiff_t task, int worker) = nullptr;
  void* fn = nullptr;
  std::ptrdiff_t n_tasks = 0;
  int workers = 1;
  Share* shares = nullptr;  // [workers], the pool's, set up by the caller before it publishes the job
  alignas(64) std::atomic<int> pending{0};  // workers joined and not yet finished
  std::atomic<bool> failed{false};
  std::exception_ptr error;  // written once, by whoever sets `failed` first

  void divide() {
    for (int w = 0; w < workers; ++w) {
      shares[w].next.store(n_tasks * w / workers, std::memory_order_relaxed);
      shares[w].end = n_tasks * (w + 1) / workers;
    }
  }

  // Runs tasks of its own share, then of the others' in turn, until none are left or a
  // task has thrown.
  void work(int worker) {
    const bool outer = in_parallel_task;
    in_parallel_task = true;
    for (int i = 0; i < workers && !failed.load(std::memory_order_relaxed); ++i) {
      Share& share = shares[(worker + i) % workers];
      while (!failed.load(std::memory_order_relaxed)) {
        const std::ptrdiff_t task = share.next.fetch_add(1, std::memory_order_relaxed);
        if (task >= share.end) break;
        try {
          call(fn, task, worker);
        } catch (...) {
          if (!failed.exchange(true, std::memory_order_relaxed)) error = std::current_exception();
        }
      }
    }
    in_parallel_task = outer;
  }
};

// Spins (yielding the core each round) until pred() holds or the spin budget
// is spent; returns whether pred() held.
template <class Pred>
bool spin_until(Pred pred) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinMicroseconds);
  for (unsigned round = 1;; ++round) {
    if (pred()) return true;
    if (round % 32 == 0 && std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::yield();
  }
}

template <class F>
void call_erased(void* fn, std::ptrdiff_t task, int worker) {
  (*static_cast<F*>(fn))(task, worker);
}

/// The OpenMP runtime, as the global pool sees it. A program's files may be built with and
/// without OpenMP (the kernels are often compiled once, in a file of their own), so every
/// file must see the same pool code: it calls OpenMP only through these pointers. A file
/// built with OpenMP defines the functions and stores them here while the program starts
/// (openmp_offered); ThreadPool::global() reads them when it creates the pool, so a
/// program with at least one such file runs the global pool on OpenMP, and one with none
/// on kvheads' own threads.
struct OpenMpRuntime {
  /// The threads a parallel region started on this thread would get, at least 1:
  /// omp_get_max_threads(), or 1 inside a parallel region when nesting is off.
  int (*team_size)();
  /// Runs job.work(thread) on every thread of a team of at most job.workers.
  void (*run)(Job& job);
};
inline std::atomic<const OpenMpRuntime*>& openmp_runtime() {
  static std::atomic<const OpenMpRuntime*> runtime{nullptr};
  return runtime;
}
// True in a child of fork() (and its children) once a file built with OpenMP registered
// the handler that sets it, at start-up: whether or not the global pool existed at the
// fork, the parent may have started OpenMP teams of its own.
inline std::atomic<bool>& forked_after_openmp() {
  static std::atomic<bool> forked{false};
  return forked;
}
inline void note_fork_in_child() noexcept { forked_after_openmp().store(true, std::memory_order_relaxed); }

#if defined(KVHEADS_DETAIL_OPENMP)
inline int openmp_team_size() {
  if (omp_get_active_level() >= omp_get_max_active_levels()) return 1;
  return std::max(1, omp_get_max_threads());
}
// A team smaller than job.workers (the runtime may grant fewer threads) still runs every
// task: each thread takes the others' shares once its own is done.
inline void openmp_run(Job& job) {
#pragma omp parallel num_threads(job.workers)
  job.work(omp_get_thread_num());
}
inline constexpr OpenMpRuntime openmp_functions{&openmp_team_size, &openmp_run};
// Offers the runtime to the global pool, with (once per program) the fork handler above;
// if that handler cannot be registered, the pool keeps its own threads, which work in a
// child of fork().
inline bool offer_openmp() noexcept {
#if defined(KVHEADS_DETAIL_FORK_HANDLERS)
  static const bool child_handler = pthread_atfork(nullptr, nullptr, &note_fork_in_child) == 0;
  if (!child_handler) return false;
#endif
  openmp_runtime().store(&openmp_functions, std::memory_order_release);
  return true;
}
inline const bool openmp_offered = offer_openmp();
#endif

/// The CPUs this thread may run on: its affinity mask on Linux (taskset, numactl, a
/// container's cpuset), which std::thread::hardware_concurrency() ignores; elsewhere, or
/// when the mask cannot be read, hardware_concurrency(). At least 1. CPU time quotas
/// (cgroup cpu.max) are not seen: pass a ThreadPool of the size you want there.
inline int usable_cpus() {
#if defined(__linux__) && defined(CPU_COUNT)
  cpu_set_t mask;
  CPU_ZERO(&mask);
  if (sched_getaffinity(0, sizeof(mask), &mask) == 0) return std::max(1, CPU_COUNT(&mask));
#endif
  return std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
}

}  // namespace detail

/// A persistent pool of worker threads; attend() uses a process-wide default one, or one the user passes.
///
/// fork(): a child of a process that forked has only the thread that called fork(), not
/// the pools' workers. Each pool with workers (the global one and the user's) takes them
/// anew in the child, at its first job there, so the child keeps every thread of it. A
/// fork waits for the jobs running on any pool to finish (pthread_atfork), so no pool's
/// locks are held in the child; pool destructors in the child leave the parent's workers
/// alone. Not supported: fork() from inside a task of a pool (attend's tasks call no user
/// code), a pool created or destroyed by a task while another thread forks, and a fork
/// while another thread creates the global pool (the child inherits its creation half
/// done). KVHEADS_NO_FORK_HANDLERS leaves the handlers out.
class ThreadPool {
 public:
  /// threads: total workers including the calling thread; 0 = the CPUs the constructing
  /// thread may run on (detail::usable_cpus: its affinity mask on Linux, else hardware
  /// concurrency; at least 1).
  explicit ThreadPool(int threads = 0) {
    if (threads < 0)
      detail::throw_invalid("ThreadPool threads (", threads, ") must be >= 0 (0 = hardware concurrency)");
    size_ = threads > 0 ? threads : detail::usable_cpus();
    if (size_ == 1) return;
    shares_ = std::make_unique<detail::Share[]>(static_cast<std::size_t>(size_));
    ForkGuard::add(this);
    try {
      workers_ = start_workers();
    } catch (...) {
      ForkGuard::remove(this);
      throw;
    }
  }

  /// Joins the workers. No parallel_for may be running on this pool.
  ~ThreadPool() {
    if (size_ == 1) return;
    ForkGuard::remove(this);
    if (inherited_)
      ForkGuard::abandon(std::move(workers_));
    else
      stop_workers(*workers_);
  }

  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  /// Most workers a parallel_for on this pool uses, including the caller. For a global
  /// pool on OpenMP: the team a parallel region started on this thread would get now
  /// (omp_get_max_threads(), so OMP_NUM_THREADS and omp_set_num_threads count; 1 inside a
  /// parallel region unless nesting is on).
  int size() const {
    if (openmp_) return detail::forked_after_openmp().load(std::memory_order_relaxed) ? in_child_of_fork().size()
                                                                                     : openmp_->team_size();
    return size_;
  }

  /// The process-wide pool, created on first use and never destroyed, so it outlives every
  /// static object that might still use it. If a file of the program built with OpenMP
  /// includes kvheads (and does not define KVHEADS_NO_OPENMP), the pool runs its jobs on
  /// OpenMP teams and starts no threads; otherwise it has one worker per usable CPU (see
  /// the constructor). Jobs on OpenMP are not serialised: calls from several threads each
  /// get their own team, as OpenMP gives them. In a child of fork() such a pool runs its
  /// jobs on a pool of kvheads' own threads instead, as many as a team would have had:
  /// GNU libgomp cannot start a team in the child of a process that had started one (the
  /// child waits forever).
  static ThreadPool& global() {
    static ThreadPool* const pool = [] {
      const detail::OpenMpRuntime* const openmp = detail::openmp_runtime().load(std::memory_order_acquire);
      return openmp ? new ThreadPool(*openmp) : new ThreadPool(0);
    }();
    return *pool;
  }

 private:
  friend struct detail::PoolAccess;

  // The worker threads and everything they wait on, in one object so that a child of
  // fork() can leave the parent's whole set behind (its condition variables may list
  // waiters that do not exist there) and start a fresh one.
  struct Workers {
    explicit Workers(int size) : wake(std::make_unique<std::condition_variable[]>(static_cast<std::size_t>(size))) {}
    std::vector<std::thread> threads;                 // workers 1 .. size - 1
    std::unique_ptr<std::condition_variable[]> wake;  // wake[id] wakes worker id
    std::mutex mutex;                                 // guards the fields below and the waits
    std::condition_variable done;                     // the last worker of a job -> its caller
    std::atomic<std::uint64_t> generation{0};         // bumped per job (written under mutex)
    detail::Job* job = nullptr;                       // the open job, if any
    int job_workers = 0;
    bool stop = false;
    Workers* next_abandoned = nullptr;  // see ForkGuard::abandon
  };

  // The pthread_atfork handlers, over every pool with workers. Before a fork they take
  // each pool's serial_ lock, so the fork waits for running jobs and no job is half done
  // in the child; after it they release the locks, and in the child they mark every pool
  // inherited_.
  class ForkGuard {
   public:
    static void add(ThreadPool* pool) {
      Registry& registry = get();
      std::lock_guard<std::mutex> lock(registry.mutex);
      registry.pools.push_back(pool);
    }
    static void remove(ThreadPool* pool) {
      Registry& registry = get();
      std::lock_guard<std::mutex> lock(registry.mutex);
      registry.pools.erase(std::find(registry.pools.begin(), registry.pools.end(), pool));
    }
    // Keeps, never to be destroyed, the workers a child of fork() inherited: their threads
    // are the parent's, so there is nothing to join, and their condition variables may list
    // waiters that do not exist here. Kept reachable, so leak checkers do not report them.
    // A lock-free list: run() calls this holding serial_, which before_fork() takes after
    // the registry's mutex, so taking that mutex here could deadlock with a fork.
    static void abandon(std::unique_ptr<Workers> workers) noexcept {
      static std::atomic<Workers*> abandoned{nullptr};
      Workers* const kept = workers.release();
      kept->next_abandoned = abandoned.load(std::memory_order_relaxed);
      while (!abandoned.compare_exchange_weak(kept->next_abandoned, kept, std::memory_order_release,
                                              std::memory_order_relaxed)) {
      }
    }

   private:
    struct Registry {
      std::mutex mutex;
      std::vector<ThreadPool*> pools;
    };
    // Created on first use with the handlers registered, and never destroyed, like global().
    static Registry& get() {
      static Registry* const registry = [] {
        auto made = std::make_unique<Registry>();
#if defined(KVHEADS_DETAIL_FORK_HANDLERS)
        if (int error = pthread_atfork(&before_fork, &in_parent, &in_child); error != 0)
          throw std::system_error(error, std::generic_category(), "kvheads ThreadPool: pthread_atfork");
#endif
        published().store(made.get(), std::memory_order_release);
        return made.release();
      }();
      return *registry;
    }
    // The registry as the handlers see it: they must not wait on get()'s initialisation,
    // which may be registering them, holding glibc's lock on the handler list, while a
    // fork runs them. Null until the handlers are registered.
    static std::atomic<Registry*>& published() {
      static std::atomic<Registry*> registry{nullptr};
      return registry;
    }
    // What before_fork() locked, for the after-fork handler of the same thread (the child's
    // one thread is a copy of it): the registry may be published in between.
    static Registry*& locked() {
      static thread_local Registry* registry = nullptr;
      return registry;
    }
    static void before_fork() noexcept {
      Registry* const registry = published().load(std::memory_order_acquire);
      locked() = registry;
      if (!registry) return;
      registry->mutex.lock();
      for (ThreadPool* pool : registry->pools) pool->serial_.lock();
    }
    static void in_parent() noexcept {
      Registry* const registry = locked();
      if (!registry) return;
      for (ThreadPool* pool : registry->pools) pool->serial_.unlock();
      registry->mutex.unlock();
    }
    static void in_child() noexcept {
      Registry* const registry = locked();
      if (!registry) return;
      for (ThreadPool* pool : registry->pools) {
        pool->inherited_ = true;
        pool->serial_.unlock();
      }
      registry->mutex.unlock();
    }
  };

  // The global pool on OpenMP: no workers of its own.
  explicit ThreadPool(const detail::OpenMpRuntime& openmp) : openmp_(&openmp) {}

  // What the global pool on OpenMP runs on in a child of fork(), made there at its first
  // use, as many threads as a team would have had (OMP_NUM_THREADS=1 in a pre-forking
  // server's workers stays 1). Reading that setting starts no team.
  ThreadPool& in_child_of_fork() const {
    static ThreadPool* const pool = new ThreadPool(openmp_->team_size());
    return *pool;
  }

  // A job on an OpenMP team. Concurrent jobs are allowed, so the shares are the calling
  // thread's, reused call after call.
  void run_on_openmp(detail::Job& job) const {
    struct Shares {
      std::unique_ptr<detail::Share[]> shares;
      int count = 0;
    };
    thread_local Shares mine;
    if (mine.count < job.workers) {
      mine.shares = std::make_unique<detail::Share[]>(static_cast<std::size_t>(job.workers));
      mine.count = job.workers;
    }
    job.shares = mine.shares.get();
    job.divide();
    openmp_->run(job);
    if (job.error) std::rethrow_exception(job.error);
  }

  // A new set of workers 1 .. size_ - 1, running; if one cannot start, those started are
  // joined and the exception propagates.
  std::unique_ptr<Workers> start_workers() const {
    auto workers = std::make_unique<Workers>(size_);
    workers->threads.reserve(static_cast<std::size_t>(size_ - 1));
    try {
      for (int id = 1; id < size_; ++id)
        workers->threads.emplace_back([w = workers.get(), id] { worker_main(*w, id); });
    } catch (...) {
      stop_workers(*workers);
      throw;
    }
    return workers;
  }

  // Runs `job` on workers 0 (the caller) .. job.workers - 1, then rethrows the
  // first exception a task threw.
  void run(detail::Job& job) {
    if (openmp_)
      return detail::forked_after_openmp().load(std::memory_order_relaxed) ? in_child_of_fork().run(job)
                                                                            : run_on_openmp(job);
    {
      std::lock_guard<std::mutex> serial(serial_);
      if (inherited_) {
        // The first job in a child of fork(): the parent's workers are not here. If new
        // ones cannot start, the pool stays as it was and the next job tries again.
        std::unique_ptr<Workers> fresh = start_workers();
        ForkGuard::abandon(std::exchange(workers_, std::move(fresh)));
        inherited_ = false;
      }
      Workers& w = *workers_;
      job.shares = shares_.get();
      job.divide();
      {
        std::lock_guard<std::mutex> lock(w.mutex);
        w.job = &job;
        w.job_workers = job.workers;
        w.generation.store(w.generation.load(std::memory_order_relaxed) + 1, std::memory_order_release);
      }
      for (int id = 1; id < job.workers; ++id) w.wake[static_cast<std::size_t>(id)].notify_one();
      job.work(0);
      {
        std::lock_guard<std::mutex> lock(w.mutex);
        w.job = nullptr;  // closed: no worker joins from here on
      }
      const auto all_done = [&job] { return job.pending.load(std::memory_order_acquire) == 0; };
      if (!detail::spin_until(all_done)) {
        std::unique_lock<std::mutex> lock(w.mutex);
        w.done.wait(lock, all_done);
      }
    }
    if (job.error) std::rethrow_exception(job.error);
  }

  static void worker_main(Workers& w, int id) {
    std::uint64_t seen = 0;
    for (;;) {
      detail::spin_until([&] { return w.generation.load(std::memory_order_acquire) != seen; });
      detail::Job* job = nullptr;
      {
        std::unique_lock<std::mutex> lock(w.mutex);
        // Join only an open job that wants worker `id`; sleep through the rest.
        w.wake[static_cast<std::size_t>(id)].wait(lock, [&] {
          return w.stop ||
                 (w.job != nullptr && w.generation.load(std::memory_order_relaxed) != seen && id < w.job_workers);
        });
        if (w.stop) return;
        seen = w.generation.load(std::memory_order_relaxed);
        job = w.job;
        job->pending.fetch_add(1, std::memory_order_relaxed);  // under w.mutex, so before any close
      }
      job->work(id);
      // After this decrement the caller may return and free `job`: touch only `w`.
      // Reaching 0 before the job is closed only makes a spurious notification.
      if (job->pending.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        { std::lock_guard<std::mutex> lock(w.mutex); }  // the caller is either not waiting yet or asleep
        w.done.notify_one();
      }
    }
  }

  static void stop_workers(Workers& w) {
    {
      std::lock_guard<std::mutex> lock(w.mutex);
      w.stop = true;
    }
    for (std::size_t id = 1; id <= w.threads.size(); ++id) w.wake[id].notify_one();
    for (std::thread& thread : w.threads) thread.join();
    w.threads.clear();
  }

  int size_ = 1;
  std::unique_ptr<detail::Share[]> shares_;  // one per worker, reused by every job (jobs are serialised)
  std::mutex serial_;                        // one job at a time
  std::unique_ptr<Workers> workers_;         // none when size_ == 1
  bool inherited_ = false;                   // set in a child of fork() (under serial_), until its first job
  const detail::OpenMpRuntime* openmp_ = nullptr;  // the global pool on OpenMP; then size_ is 1
};

namespace detail {

struct PoolAccess {
  static void run(ThreadPool& pool, Job& job) { pool.run(job); }
};

// The one-worker case: every task in order on the calling thread, as worker 0.
template <class Fn>
void run_inline(std::ptrdiff_t n_tasks, Fn& fn) {
  for (std::ptrdiff_t task = 0; task < n_tasks; ++task) fn(task, 0);
}

/// Number of workers parallel_for(pool, n_tasks, threads, fn) would use: at least 1,
/// at most min(pool size, threads (<= 0 = pool size), n_tasks); 1 inside a parallel_for task.
inline int workers_for(const ThreadPool& pool, std::ptrdiff_t n_tasks, int threads) {
  if (in_parallel_task || n_tasks <= 1) return 1;
  const int limit = threads > 0 ? std::min(threads, pool.size()) : pool.size();
  return static_cast<int>(std::min<std::ptrdiff_t>(limit, n_tasks));
}

/// Runs fn(task, worker) for every task in [0, n_tasks) on at most `threads` workers
/// (<= 0 = pool size). `worker` is in [0, workers_for(pool, n_tasks, threads)) and no two
/// concurrently running calls share it, so it can index per-worker scratch. Each worker
/// starts on its own contiguous share of the tasks (the same one every call with the same
/// task and worker counts), then claims leftovers of the others' one at a time, so uneven
/// tasks balance. The caller is worker 0 and returns when every task has finished; if a
/// task throws, the remaining tasks may be skipped and the first exception is rethrown
/// here once all workers stopped.
/// One worker (threads == 1, n_tasks == 1, a pool of 1, or a call from inside a task)
/// runs inline with no synchronisation. fn is called concurrently from several threads.
template <class Fn>
void parallel_for(ThreadPool& pool, std::ptrdiff_t n_tasks, int threads, Fn&& fn) {
  if (n_tasks <= 0) return;
  const int workers = workers_for(pool, n_tasks, threads);
  if (workers == 1) {
    run_inline(n_tasks, fn);
    return;
  }
  using F = std::remove_reference_t<Fn>;
  Job job;
  job.call = &call_erased<F>;
  job.fn = const_cast<void*>(static_cast<const void*>(std::addressof(fn)));
  job.n_tasks = n_tasks;
  job.workers = workers;
  PoolAccess::run(pool, job);
}

/// parallel_for on ThreadPool::global().
template <class Fn>
void parallel_for(std::ptrdiff_t n_tasks, int threads, Fn&& fn) {
  // Work that runs inline never needs the pool, so it does not create it either.
  if (n_tasks <= 1 || threads == 1 || in_parallel_task) {
    run_inline(n_tasks, fn);
    return;
  }
  parallel_for(ThreadPool::global(), n_tasks, threads, std::forward<Fn>(fn));
}

}  // namespace detail
}  // namespace kvheads
