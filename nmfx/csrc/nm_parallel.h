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
// One such call is not enough: on a quiet VM, timer interrupts, hypervisor steal and page
// faults also hold a thread now and then. Measured on the 2-core Zen 4 VM with the guard only
// logging (session 10, cpu_kernels.py sweeps; benchmarks record the log per case): cases in
// which other processes took <= 5% of the CPU showed at most one stall each, isolated ones of
// 0.3 to 8.8 ms, the closest two 47 ms apart; with one busy-looping process beside the kernels
// (--contend 1), stalls of 6.5-12 ms (10th-90th percentile) in most calls, 12 ms apart in the
// median (8-16 ms for half of them). The length of a wait does not tell the two apart (a
// one-off can last a scheduler slice); how soon the next one comes does. So:
//   - a stall or late start opens no window on its own (a one-off, counted in one_offs);
//   - a second one within kConfirmNs of it does: calls then run on the calling thread alone
//     for kSerialNs, then try threads again;
//   - one within a window's length after the last window ended doubles the window, up to
//     kSerialMaxNs (the contention persists); after a longer stall-free stretch the rule starts
//     over (a one-off again).
// The rule is guard_step (tests replay evidence through it: nmfx_cpu::guard_replay); the calls
// that waited or started >= kNoteNs late go to an event log (nmfx_cpu::parallel_guard_events)
// that benchmarks record. Dense torch ops do not pay that wait for small GEMVs, which MKL runs
// on one thread.
//
// Every multi-threaded loop of the kernels goes through parallel_items (a test scans the
// sources for other at::parallel_for calls).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>

namespace nmfx {

constexpr int64_t kStallNs = 200'000;         // OpenMP wakes a sleeping thread in ~10-60 us
constexpr int64_t kSerialNs = 50'000'000;      // the first window on one thread after a stall
constexpr int64_t kSerialMaxNs = 1'600'000'000;  // windows double up to this while stalls recur
constexpr int64_t kConfirmNs = 20'000'000;     // a second stall this soon confirms the first
constexpr int64_t kNoteNs = 50'000;            // calls that waited this long go to the event log

// The rule's thresholds (the kernels use the defaults; tests replay evidence under others).
struct GuardRule {
  int64_t serial_ns = kSerialNs;
  int64_t serial_max_ns = kSerialMaxNs;
  int64_t confirm_ns = kConfirmNs;
};

// What the rule remembers between evidence (a stall or late start).
struct GuardState {
  int64_t serial_until_ns = 0;  // the end of the last window (0: none yet)
  int64_t window_ns = kSerialNs;  // its length
  int64_t last_evidence_ns = -1;  // a one-off that opened no window (-1: none pending)
};

// Evidence (a stall or late start) at `now`: returns the window it opens on one thread (0:
// none, a one-off). See the header comment.
inline int64_t guard_step(GuardState& s, const GuardRule& r, int64_t now) {
  int64_t window = 0;
  if (s.serial_until_ns > 0 && now - s.serial_until_ns < s.window_ns) {
    window = std::min(2 * s.window_ns, r.serial_max_ns);  // persists after the last window
  } else if (s.last_evidence_ns >= 0 && now - s.last_evidence_ns < r.confirm_ns) {
    window = r.serial_ns;  // confirms a recent one-off
  }
  if (window == 0) {
    s.last_evidence_ns = now;
    return 0;
  }
  s.last_evidence_ns = -1;
  s.window_ns = window;
  s.serial_until_ns = now + window;
  return window;
}

// One logged call (kEventFields values; see parallel_items and nm_ops.cpp's
// parallel_guard_events): when it returned, its kind (contention_kind), how long the caller
// waited after its last item, how late the other thread started after the caller did (until
// the return if it never did), the caller's busy time, items, the caller's items, idle threads
// and the window the call opened (0: none).
constexpr int kEventFields = 9;
constexpr int64_t kEventSlots = 4096;

struct ParallelCounters {
  std::atomic<int64_t> serial_until_ns{0};  // calls before this run on one thread
  std::atomic<int64_t> window_ns{kSerialNs};  // the length of the last window
  std::atomic<int64_t> stalls{0};        // parallel calls that waited on an idle late thread
  std::atomic<int64_t> serial_calls{0};  // calls run on one thread because of a recent stall
  std::atomic<int64_t> late_starts{0};   // parallel calls whose other thread started late
  std::atomic<int64_t> one_offs{0};      // stalls and late starts that opened no window
  std::atomic<int64_t> parallel_calls{0};
  std::atomic<bool> active{true};        // false: evidence is logged, calls stay on threads
  std::mutex mutex;                      // guards `state`
  GuardState state;
  std::atomic<int64_t> events_written{0};
  std::atomic<int64_t> events_read{0};  // parallel_guard_events(clear=True) read up to here
  std::atomic<int64_t> events[kEventSlots][kEventFields];  // zero: static storage
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

// Marks the host contended for `ns` from now, forgetting any pending one-off (tests:
// nmfx_cpu::mark_contended; a negative `ns` places the end of the last window in the past).
inline void mark_contended(int64_t ns) {
  ParallelCounters& c = parallel_counters();
  std::lock_guard<std::mutex> lock(c.mutex);
  c.state.serial_until_ns = steady_ns() + ns;
  c.state.last_evidence_ns = -1;
  c.serial_until_ns.store(c.state.serial_until_ns, std::memory_order_relaxed);
}

// Evidence (a stall or late start) at `now`: the rule decides the window.
inline int64_t on_contended(int64_t now) {
  ParallelCounters& c = parallel_counters();
  std::lock_guard<std::mutex> lock(c.mutex);
  const int64_t window = guard_step(c.state, GuardRule{}, now);
  if (window == 0) {
    c.one_offs.fetch_add(1, std::memory_order_relaxed);
  } else {
    c.window_ns.store(window, std::memory_order_relaxed);
    c.serial_until_ns.store(c.state.serial_until_ns, std::memory_order_relaxed);
  }
  return window;
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

// How late the other thread started after the caller did (`now - caller_start` if never).
inline int64_t late_start_ns(const CallTiming& t, int64_t now) {
  const int64_t other = t.other_start.load(std::memory_order_relaxed);
  return (other == 0 ? now : other) - t.caller_start;
}

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

// Appends one call to the event log (a ring of kEventSlots; readers see the newest).
inline void log_event(const CallTiming& t, int64_t items, int64_t now, int kind, int64_t window) {
  ParallelCounters& c = parallel_counters();
  const int64_t slot = c.events_written.fetch_add(1, std::memory_order_relaxed) % kEventSlots;
  const int64_t values[kEventFields] = {now, kind, now - t.caller_done, late_start_ns(t, now),
                                        t.caller_done - t.caller_start, items, t.caller_items,
                                        t.idle.load(std::memory_order_relaxed), window};
  for (int f = 0; f < kEventFields; ++f) c.events[slot][f].store(values[f], std::memory_order_relaxed);
}

// body(i) for every i in [0, items), on up to `threads` threads (one when the host was found
// contended within the current window). body must be safe to call from any torch thread.
template <class Body>
void parallel_items(int64_t items, int64_t threads, const Body& body) {
  ParallelCounters& c = parallel_counters();
  threads = std::min(threads, items);
  if (threads > 1 && c.active.load(std::memory_order_relaxed) &&
      steady_ns() < c.serial_until_ns.load(std::memory_order_relaxed)) {
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
  if (t.caller_done == 0) return;  // ran nested (serially) inside another parallel region
  c.parallel_calls.fetch_add(1, std::memory_order_relaxed);
  const int kind = contention_kind(t, now);
  int64_t window = 0;
  if (kind != 0) {
    (kind == 1 ? c.stalls : c.late_starts).fetch_add(1, std::memory_order_relaxed);
    window = on_contended(now);
  }
  if (kind != 0 || now - t.caller_done >= kNoteNs || late_start_ns(t, now) >= kNoteNs) {
    log_event(t, items, now, kind, window);
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
