// Work items over the torch threads, and a guard against waiting for a descheduled thread.
//
// Threads take items from a shared counter, so a thread that starts late or is preempted does
// not hold the others up (static halves would). One wait remains: at::parallel_for (OpenMP)
// returns only once every thread it started has arrived. When another process holds a core
// (2-core host, one busy loop beside it), a worker may not run until the scheduler gives it a
// slice: the caller, done with every item, waits milliseconds for a thread that then finds
// nothing to do (or was preempted inside its last item). Each parallel call here measures that
// wait; one longer than kStallNs, on a thread that took no item or longer than four of the
// caller's items, marks the host contended, and calls run on the calling thread alone for the
// next kSerialNs (then try threads again). Dense torch ops do not pay that wait
// for small GEMVs, which MKL runs on one thread.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>

namespace nmfx {

constexpr int64_t kStallNs = 200'000;     // OpenMP wakes a sleeping thread in ~10-60 us
constexpr int64_t kSerialNs = 50'000'000;  // how long calls stay on one thread after a stall

struct ParallelCounters {
  std::atomic<int64_t> serial_until_ns{0};
  std::atomic<int64_t> stalls{0};        // parallel calls that waited on an idle late thread
  std::atomic<int64_t> serial_calls{0};  // calls run on one thread because of a recent stall
};

inline ParallelCounters& parallel_counters() {
  static ParallelCounters counters;
  return counters;
}

inline int64_t steady_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Marks the host contended for `ns` from now (tests: nmfx_cpu::mark_contended).
inline void mark_contended(int64_t ns) {
  parallel_counters().serial_until_ns.store(steady_ns() + ns, std::memory_order_relaxed);
}

// body(i) for every i in [0, items), on up to `threads` threads (one when the host was found
// contended within the last kSerialNs). body must be safe to call from any torch thread.
template <class Body>
void parallel_items(int64_t items, int64_t threads, const Body& body) {
  ParallelCounters& c = parallel_counters();
  threads = std::min(threads, items);
  if (threads > 1 && steady_ns() < c.serial_until_ns.load(std::memory_order_relaxed)) {
    c.serial_calls.fetch_add(1, std::memory_order_relaxed);
    threads = 1;
  }
  if (threads <= 1) {
    for (int64_t i = 0; i < items; ++i) body(i);
    return;
  }
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> idle{0};
  int64_t caller_items = 0, caller_start = 0, caller_done = 0;  // written by thread 0 only
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    const bool caller = at::get_thread_num() == 0;
    if (caller) caller_start = steady_ns();
    for (int64_t t = t0; t < t1; ++t) {
      int64_t done = 0;
      for (int64_t i = next.fetch_add(1); i < items; i = next.fetch_add(1), ++done) body(i);
      if (done == 0) idle.fetch_add(1, std::memory_order_relaxed);
      if (caller) caller_items += done;
    }
    if (caller) caller_done = steady_ns();
  });
  // The caller waited on the others past kStallNs, and longer than a few of its own items
  // take: a thread arrived too late to take any item, or was preempted inside one.
  if (caller_done == 0) return;  // ran nested (serially) inside another parallel region
  const int64_t wait = steady_ns() - caller_done;
  const int64_t per_item = (caller_done - caller_start) / std::max<int64_t>(caller_items, 1);
  if (wait > kStallNs && (idle.load(std::memory_order_relaxed) > 0 || wait > 4 * per_item)) {
    c.stalls.fetch_add(1, std::memory_order_relaxed);
    mark_contended(kSerialNs);
  }
}

// fn(begin, end) over [0, n) in chunks of `chunk`, as parallel_items on the torch threads.
template <class Fn>
void parallel_ranges(int64_t n, int64_t chunk, const Fn& fn) {
  const int64_t items = (n + chunk - 1) / chunk;
  parallel_items(items, at::get_num_threads(),
                 [&](int64_t i) { fn(i * chunk, std::min(n, (i + 1) * chunk)); });
}

}  // namespace nmfx
