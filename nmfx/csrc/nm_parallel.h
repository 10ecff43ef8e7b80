// Work items over the torch threads, and a guard against waiting for a descheduled thread.
//
// Threads take items from a shared counter, so a thread that starts late or is preempted does
// not hold the others up (static halves would). One wait remains: at::parallel_for (OpenMP)
// returns only once every thread it started has arrived. When another process holds a core
// (2-core host, one busy loop beside it), a worker may not run until the scheduler gives it a
// slice: the caller, done with every item, waits milliseconds for a thread that then finds
// nothing to do (or was preempted inside its last item). Each parallel call here measures that
// wait, and when the other thread started: the host counts as contended when
//   - the caller waited longer than kStallNs, on a thread that took no item or longer than four
//     of the caller's items take (a stall: the call paid a scheduler slice), or
//   - the other thread started kStallNs or more after the fork and after half of the caller's
//     own work was done (a late start: the call did not wait, but the second thread did not pay
//     for its wake-up, and the next call may wait on it).
// Calls then run on the calling thread alone for a window (kSerialNs, doubled while the stalls
// come back within a window's length of the last window's end, up to kSerialMaxNs; back to
// kSerialNs after a stall-free stretch), then try threads again. Dense torch ops do not pay
// that wait for small GEMVs, which MKL runs on one thread.
//
// Every multi-threaded loop of the kernels goes through parallel_items (a test scans the
// sources for other at::parallel_for calls).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>

namespace nmfx {

constexpr int64_t kStallNs = 200'000;         // OpenMP wakes a sleeping thread in ~10-60 us
constexpr int64_t kSerialNs = 50'000'000;      // the first window on one thread after a stall
constexpr int64_t kSerialMaxNs = 1'600'000'000;  // windows double up to this while stalls recur

struct ParallelCounters {
  std::atomic<int64_t> serial_until_ns{0};
  std::atomic<int64_t> window_ns{kSerialNs};  // the length of the last window
  std::atomic<int64_t> stalls{0};        // parallel calls that waited on an idle late thread
  std::atomic<int64_t> serial_calls{0};  // calls run on one thread because of a recent stall
  std::atomic<int64_t> late_starts{0};   // parallel calls whose other thread started late
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

// A stall or late start at `now`: the next window on one thread, twice the last one when this
// came within the last one's length after it ended (the contention persists), else kSerialNs.
inline void on_contended(int64_t now) {
  ParallelCounters& c = parallel_counters();
  const int64_t last_end = c.serial_until_ns.load(std::memory_order_relaxed);
  const int64_t last = c.window_ns.load(std::memory_order_relaxed);
  const int64_t window = now - last_end < last ? std::min(2 * last, kSerialMaxNs) : kSerialNs;
  c.window_ns.store(window, std::memory_order_relaxed);
  c.serial_until_ns.store(now + window, std::memory_order_relaxed);
}

// What one parallel call saw (written by its threads, read by the caller after the join).
struct CallTiming {
  int64_t fork = 0;           // before at::parallel_for
  int64_t caller_start = 0;   // thread 0 entered the region (0: ran nested, serially)
  int64_t caller_done = 0;    // thread 0 found no item left
  int64_t caller_items = 0;
  std::atomic<int64_t> other_start{0};  // the first other thread entered the region
  std::atomic<int64_t> idle{0};         // threads that took no item
};

// Whether a parallel call that returned at `now` stalled (1), started its other thread late
// (2) or neither (0); see the header comment.
inline int contention_kind(const CallTiming& t, int64_t now) {
  if (t.caller_done == 0) return 0;  // ran nested (serially) inside another parallel region
  const int64_t wait = now - t.caller_done;
  const int64_t busy = t.caller_done - t.caller_start;
  const int64_t per_item = busy / std::max<int64_t>(t.caller_items, 1);
  if (wait > kStallNs && (t.idle.load(std::memory_order_relaxed) > 0 || wait > 4 * per_item)) {
    return 1;
  }
  const int64_t other = t.other_start.load(std::memory_order_relaxed);
  const int64_t late = (other == 0 ? now : other) - t.fork;
  return late > kStallNs && 2 * (late - (t.caller_start - t.fork)) > busy ? 2 : 0;
}

// body(i) for every i in [0, items), on up to `threads` threads (one when the host was found
// contended within the current window). body must be safe to call from any torch thread.
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
  CallTiming t;
  t.fork = steady_ns();
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    const bool caller = at::get_thread_num() == 0;
    if (caller) {
      t.caller_start = steady_ns();
    } else {
      int64_t none = 0;
      t.other_start.compare_exchange_strong(none, steady_ns(), std::memory_order_relaxed);
    }
    for (int64_t k = t0; k < t1; ++k) {
      int64_t done = 0;
      for (int64_t i = next.fetch_add(1); i < items; i = next.fetch_add(1), ++done) body(i);
      if (done == 0) t.idle.fetch_add(1, std::memory_order_relaxed);
      if (caller) t.caller_items += done;
    }
    if (caller) t.caller_done = steady_ns();
  });
  const int64_t now = steady_ns();
  const int kind = contention_kind(t, now);
  if (kind == 0) return;
  (kind == 1 ? c.stalls : c.late_starts).fetch_add(1, std::memory_order_relaxed);
  on_contended(now);
}

// fn(begin, end) over [0, n) in chunks of `chunk`, as parallel_items on the torch threads.
template <class Fn>
void parallel_ranges(int64_t n, int64_t chunk, const Fn& fn) {
  const int64_t items = (n + chunk - 1) / chunk;
  parallel_items(items, at::get_num_threads(),
                 [&](int64_t i) { fn(i * chunk, std::min(n, (i + 1) * chunk)); });
}

}  // namespace nmfx
