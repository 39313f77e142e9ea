// Persistent thread pool with a lock-free fork/join protocol.
//
// Publication: the caller writes the job (fn, ctx, ntasks), resets the task and
// done counters, sets `slots_` (how many workers may join) and bumps
// `generation_`. A worker that sees a new generation claims a slot with a
// fetch_sub on `slots_`; only a successful claim lets it read the job. At the
// end the caller closes the job by exchanging `slots_` to 0, which tells it
// exactly how many workers joined, and waits for that many `done_` increments.
// Because claim and close are read-modify-writes of one atomic, a late worker
// can never touch a job the caller has already returned from.
//
// Waiting: after a latency-variant region (spin=true) workers spin on the
// generation for kSpinNs before parking on a condition variable, so back-to-back
// small calls skip the futex wake-up (~5-20 us); after a throughput region they
// park at once and leave the cores to others (e.g. NumPy's own BLAS threads).
#include <emmintrin.h>  // _mm_pause (SSE2, part of the x86-64 baseline)
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

#include "pykernels/runtime.h"

namespace pk {
namespace {

constexpr int64_t kSpinNs = 200 * 1000;  // 200 us: longer than a decode step's gap
constexpr int kMaxWorkers = kMaxThreads - 1;  // kMaxThreads counts the caller

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch()).count();
}

class ThreadPool {
 public:
  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lk(park_mu_);
      stop_.store(true);
    }
    park_cv_.notify_all();
    for (auto& t : workers_) t.join();
  }

  void run(int64_t ntasks, int threads, bool spin, TaskFn fn, void* ctx) {
    threads = static_cast<int>(std::min<int64_t>(threads, ntasks));
    if (threads <= 1 || !busy_.try_lock()) {
      for (int64_t t = 0; t < ntasks; ++t) fn(ctx, t, 0);
      return;
    }
    try {
      ensure_workers(threads - 1);
    } catch (...) {  // cannot start threads (e.g. resource limits): run inline
      busy_.unlock();
      for (int64_t t = 0; t < ntasks; ++t) fn(ctx, t, 0);
      return;
    }
    fn_ = fn;
    ctx_ = ctx;
    ntasks_ = ntasks;
    spin_after_.store(spin, std::memory_order_relaxed);
    next_task_.store(0, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    next_slot_.store(1, std::memory_order_relaxed);
    slots_.store(threads - 1, std::memory_order_release);  // publishes fn_/ctx_/ntasks_
    generation_.fetch_add(1, std::memory_order_seq_cst);
    if (parked_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lk(park_mu_);
      park_cv_.notify_all();
    }
    work(0);
    const int unclaimed = slots_.exchange(0, std::memory_order_acq_rel);
    const int joined = (threads - 1) - std::max(unclaimed, 0);
    while (done_.load(std::memory_order_acquire) != joined) _mm_pause();
    busy_.unlock();
  }

 private:
  void work(int slot) {
    for (;;) {
      int64_t t = next_task_.fetch_add(1, std::memory_order_relaxed);
      if (t >= ntasks_) break;
      fn_(ctx_, t, slot);
    }
  }

  void ensure_workers(int n) {
    n = std::min(n, kMaxWorkers);
    while (static_cast<int>(workers_.size()) < n) {
      workers_.emplace_back([this] { worker_loop(); });
    }
  }

  void worker_loop() {
    uint64_t seen = generation_.load(std::memory_order_acquire);
    for (;;) {
      uint64_t gen = wait_for_new_generation(seen);
      if (stop_.load()) return;
      seen = gen;
      // Claim a slot in the current job; failing means the job is full or closed.
      if (slots_.fetch_sub(1, std::memory_order_acq_rel) > 0) {
        int slot = next_slot_.fetch_add(1, std::memory_order_relaxed);
        work(slot);
        done_.fetch_add(1, std::memory_order_release);
      }
      // A failed claim leaves slots_ negative; the caller's close (exchange)
      // treats that as zero and the next job stores a fresh count.
    }
  }

  uint64_t wait_for_new_generation(uint64_t seen) {
    if (spin_after_.load(std::memory_order_relaxed)) {
      const int64_t deadline = now_ns() + kSpinNs;
      for (int i = 0;; ++i) {
        uint64_t g = generation_.load(std::memory_order_acquire);
        if (g != seen || stop_.load(std::memory_order_relaxed)) return g;
        _mm_pause();
        if ((i & 255) == 255 && now_ns() > deadline) break;
      }
    }
    std::unique_lock<std::mutex> lk(park_mu_);
    parked_.fetch_add(1, std::memory_order_seq_cst);
    park_cv_.wait(lk, [&] {
      return generation_.load(std::memory_order_seq_cst) != seen || stop_.load();
    });
    parked_.fetch_sub(1, std::memory_order_relaxed);
    return generation_.load(std::memory_order_acquire);
  }

  std::vector<std::thread> workers_;
  std::mutex busy_;  // held by the caller for the length of one region
  std::mutex park_mu_;
  std::condition_variable park_cv_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> slots_{0};
  std::atomic<int> next_slot_{1};
  std::atomic<int> done_{0};
  std::atomic<int> parked_{0};
  std::atomic<int64_t> next_task_{0};
  std::atomic<bool> spin_after_{false};
  std::atomic<bool> stop_{false};
  TaskFn fn_ = nullptr;
  void* ctx_ = nullptr;
  int64_t ntasks_ = 0;
};

ThreadPool* g_pool = nullptr;
std::once_flag g_pool_once;

void reset_after_fork() {
  // The child has only the forking thread: the parent's workers do not exist
  // and the pool's mutexes may be held. Abandon (leak) that object and start a
  // fresh one lazily, so kernels called from a forked child work.
  g_pool = new ThreadPool();
}

ThreadPool& pool() {
  std::call_once(g_pool_once, [] {
    g_pool = new ThreadPool();
    pthread_atfork(nullptr, nullptr, reset_after_fork);
  });
  return *g_pool;
}

int initial_threads() {
  if (const char* env = std::getenv("PYKERNELS_NUM_THREADS")) {
    int n = std::atoi(env);
    if (n >= 1) return std::min(n, kMaxWorkers + 1);
  }
  return cpu_features().cores;
}

std::atomic<int> g_default_threads{0};

}  // namespace

void parallel_for(int64_t ntasks, int threads, bool spin, TaskFn fn, void* ctx) {
  if (ntasks <= 0) return;
  pool().run(ntasks, threads, spin, fn, ctx);
}

int default_num_threads() {
  int n = g_default_threads.load(std::memory_order_relaxed);
  if (n == 0) {
    n = initial_threads();
    g_default_threads.store(n, std::memory_order_relaxed);
  }
  return n;
}

void set_default_num_threads(int n) {
  g_default_threads.store(std::max(1, std::min(n, kMaxWorkers + 1)));
}

double measure_fork_join_ns(int threads, bool spin, int reps) {
  if (reps < 1 || threads < 1) return 0.0;  // the Python layer rejects these
  // Every task waits until all `threads` tasks have started, so the region
  // really forks to `threads` threads (a no-op region could be finished by the
  // caller alone before any worker woke up). 10 ms timeout: if the pool is busy
  // with another caller's region, the tasks run inline and must not deadlock.
  struct Barrier {
    std::atomic<int> arrived{0};
    int expected;
  } bar;
  bar.expected = threads;
  auto task = [](void* c, int64_t, int) {
    auto* b = static_cast<Barrier*>(c);
    b->arrived.fetch_add(1);
    const int64_t deadline = now_ns() + 10 * 1000 * 1000;
    while (b->arrived.load() < b->expected && now_ns() < deadline) _mm_pause();
  };
  std::vector<int64_t> t(static_cast<size_t>(reps));
  for (int r = -10; r < reps; ++r) {
    bar.arrived.store(0);
    int64_t t0 = now_ns();
    parallel_for(threads, threads, spin, task, &bar);
    if (r >= 0) t[r] = now_ns() - t0;
  }
  std::nth_element(t.begin(), t.begin() + reps / 2, t.end());
  return static_cast<double>(t[reps / 2]);
}

}  // namespace pk
