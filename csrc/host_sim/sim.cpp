// Host simulator of csrc/'s kernels (feature `host-sim`): runs the kernels' own source on
// CPU threads, so their indexing, reductions, barriers and the P2P protocol can be tested
// on a machine without a GPU (tests/host_sim_*.rs; src/backend/cuda/host_sim.rs is the
// Rust side).
//
// A block runs on one OS thread; each of its CUDA threads is a fiber with its own
// stack, scheduled cooperatively: a fiber runs until it reaches a barrier, a shuffle, a spin
// (clock64, __nanosleep, an acquire load), or returns. Scheduling is a FIFO ready queue that
// starts in thread order (a spinning fiber goes to its back; a completed barrier queues its
// waiters in arrival order), so a run is deterministic for a given launch unless blocks talk
// to each other.
//   __syncthreads: completes when every live thread of the block has arrived (threads that
//     returned count as arrived, as on the hardware since Volta);
//   __shfl_xor_sync(0xffffffff, ...): every lane of the warp must be alive and arrive; a
//     lane that returned is reported as an error (undefined behaviour on a GPU);
//   a state in which no fiber can run and some have not returned is a deadlock: reported
//     with each waiting thread's barrier, and the launch fails.
// Blocks are taken in index order by the caller's thread and the idle helpers of a pool (one
// fewer than the cores; SYNCDROP_SIM_BLOCK_THREADS sets the total), or (concurrent) each
// run on its own OS thread at once: what kernels need whose blocks wait for each other (grid
// barriers) or for other ranks' blocks (the P2P all-reduce).
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "cuda_bf16.h"

// ---- fiber contexts ---------------------------------------------------------------------------
// x86-64: a hand-written switch that saves the callee-saved registers and the stack pointer
// (about 10 ns; swapcontext also saves the signal mask with a system call, about 1.3 us, which
// made a 1024-thread block with a hundred barriers take a second). Elsewhere: ucontext.
#if defined(__x86_64__)
extern "C" void syncdrop_sim_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .globl syncdrop_sim_switch
    .type syncdrop_sim_switch,@function
syncdrop_sim_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size syncdrop_sim_switch,.-syncdrop_sim_switch
    .section .note.GNU-stack,"",@progbits
    .text
)");
struct FiberCtx {
  void* sp = nullptr;
};
// A context that starts `entry` (which must never return) on `stack`.
inline void ctx_make(FiberCtx& c, char* stack, size_t bytes, void (*entry)()) {
  void** sp = reinterpret_cast<void**>(((uintptr_t)stack + bytes) & ~(uintptr_t)15);
  *--sp = nullptr;                          // entry's return address: it never returns
  *--sp = reinterpret_cast<void*>(entry);  // where the first switch's `ret` lands
  for (int i = 0; i < 6; ++i) *--sp = nullptr;  // rbp rbx r12 r13 r14 r15
  c.sp = sp;
}
inline void ctx_switch(FiberCtx& from, FiberCtx& to) { syncdrop_sim_switch(&from.sp, to.sp); }
#else
struct FiberCtx {
  ucontext_t uc;
};
inline void ctx_make(FiberCtx& c, char* stack, size_t bytes, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
inline void ctx_switch(FiberCtx& from, FiberCtx& to) { swapcontext(&from.uc, &to.uc); }
#endif

thread_local SimDim3 sim_thread_idx;
thread_local SimDim3 sim_block_idx;
thread_local SimDim3 sim_block_dim;
thread_local SimDim3 sim_grid_dim;

namespace {

enum class Wait { None, Block, Warp, Done };

struct Fiber {
  FiberCtx ctx;
  SimDim3 tid;
  int linear = 0;
  Wait wait = Wait::None;
};

// The scheduler runs the fibers of its ready queue in order; a fiber leaves it when it
// waits at a barrier and is queued again (in arrival order) when the barrier completes, so a
// pick costs O(1) however many threads wait (a scan over 1,024 waiting threads at every
// warp shuffle of a block's final reduction dominated the simulated decode step).
struct Block {
  std::vector<Fiber> fibers;
  FiberCtx sched;
  int current = -1;
  int live = 0;
  std::deque<int> ready;
  // __syncthreads
  int arrived = 0;
  std::vector<int> block_waiters;
  int or_acc = 0;
  int or_last = 0;
  // warp shuffles, per warp: arrivals, generation, lanes that returned, and two slot banks
  // of 32 (generation g publishes into bank g % 2: a lane cannot publish generation g + 2
  // before every lane has arrived at g + 1, by which time each has read generation g)
  std::vector<int> warp_arrived;
  std::vector<uint64_t> warp_gen;
  std::vector<int> warp_done;
  std::vector<uint64_t> warp_slots;
  // spins (sim_yield calls) since a thread last made progress (a barrier or shuffle
  // completed, a thread returned), and rounds in which every live thread only spun
  long long spin_streak = 0;
  int idle_rounds = 0;
  std::string error;
  void (*thunk)(void*) = nullptr;
  void* ctx = nullptr;
};

thread_local Block* tl_block = nullptr;
// fiber stacks, kept per OS thread across blocks (uninitialised: no 16 MiB memset a block)
thread_local std::vector<std::unique_ptr<char[]>> tl_stacks;
thread_local size_t tl_stack_bytes = 0;
std::atomic<long long> g_spins{0};
const auto g_t0 = std::chrono::steady_clock::now();

Fiber& cur() { return tl_block->fibers[tl_block->current]; }

// Saves the running context in `from` and runs fiber `next` of block b.
void enter(Block* b, FiberCtx& from, int next) {
  b->current = next;
  sim_thread_idx = b->fibers[next].tid;
  ctx_switch(from, b->fibers[next].ctx);
}

// Hands the OS thread to the next ready fiber (directly: a switch through the scheduler
// would double the switches of every shuffle), or back to the scheduler when none is ready
// or the block failed; returns when this fiber is picked again (it must be queued, or
// waiting on a barrier that will queue it).
void switch_out() {
  Block* b = tl_block;
  FiberCtx& from = b->fibers[b->current].ctx;
  if (b->ready.empty() || !b->error.empty()) {
    ctx_switch(from, b->sched);
    return;
  }
  const int next = b->ready.front();
  b->ready.pop_front();
  if (next == b->current) return;  // it queued itself and nothing else is ready
  enter(b, from, next);
}

// Let the other ready threads run first, then go on.
void yield_now() {
  Block* b = tl_block;
  b->ready.push_back(b->current);
  switch_out();
}

void progress(Block* b) {
  b->spin_streak = 0;
  b->idle_rounds = 0;
}

// Fiber i may run again: queued at the back, or at the front (it runs next).
void wake(Block* b, int i, bool front = false) {
  b->fibers[i].wait = Wait::None;
  if (front) {
    b->ready.push_front(i);
  } else {
    b->ready.push_back(i);
  }
}

// The pending __syncthreads completes: its waiters are queued in arrival order.
void release_block_barrier(Block* b) {
  b->arrived = 0;
  b->or_last = b->or_acc;
  b->or_acc = 0;
  progress(b);
  for (int i : b->block_waiters) wake(b, i);
  b->block_waiters.clear();
}

// The running fiber is finished (returned, or failed): it never runs again.
void retire_current(Block* b) {
  Fiber& f = b->fibers[b->current];
  f.wait = Wait::Done;
  b->live--;
  b->warp_done[f.linear / 32]++;
  progress(b);
}

void fail(const std::string& msg) {
  Block* b = tl_block;
  if (b->error.empty()) {
    char where[160];
    const Fiber& f = cur();
    snprintf(where, sizeof where, " (block (%u,%u,%u), thread (%u,%u,%u))", sim_block_idx.x,
             sim_block_idx.y, sim_block_idx.z, f.tid.x, f.tid.y, f.tid.z);
    b->error = msg + where;
  }
  // this fiber never resumes: the scheduler sees the error and winds the block down
  retire_current(b);
  switch_out();
  abort();  // unreachable: a done fiber is never resumed
}

// Every fiber starts here, on its block's OS thread (so tl_block is its block).
void fiber_main() {
  Block* b = tl_block;
  b->thunk(b->ctx);
  retire_current(b);
  // a returning thread counts as arrived at a pending __syncthreads
  if (b->live > 0 && b->arrived > 0 && b->arrived == b->live) release_block_barrier(b);
  // a warp shuffle with this lane missing can never complete: the deadlock check reports it
  switch_out();
  abort();  // a done fiber is never resumed
}

std::string deadlock_report(const Block& b) {
  std::string s = "deadlock: no thread of the block can run;";
  int shown = 0;
  for (const Fiber& f : b.fibers) {
    if (f.wait == Wait::Done) continue;
    if (shown++ == 8) {
      s += " ...";
      break;
    }
    char t[96];
    snprintf(t, sizeof t, " thread %d waits at %s;", f.linear,
             f.wait == Wait::Block ? "__syncthreads" : "a warp shuffle");
    s += t;
  }
  return s;
}

// Runs one block to completion on this OS thread; returns the block's error, if any.
std::string run_block(SimDim3 bidx, SimDim3 bdim, SimDim3 grid, void (*thunk)(void*), void* ctx,
                      size_t stack_bytes) {
  Block b;
  b.thunk = thunk;
  b.ctx = ctx;
  const int n = (int)(bdim.x * bdim.y * bdim.z);
  const int warps = (n + 31) / 32;
  b.warp_arrived.assign(warps, 0);
  b.warp_gen.assign(warps, 0);
  b.warp_done.assign(warps, 0);
  b.warp_slots.assign((size_t)warps * 64, 0);
  b.block_waiters.reserve(n);
  b.fibers.resize(n);
  if (tl_stack_bytes != stack_bytes) {
    tl_stacks.clear();
    tl_stack_bytes = stack_bytes;
  }
  // Each stack's top is offset by 64 bytes more than the previous one's, within COLOUR bytes:
  // equally sized stacks would put every fiber's top frames in the same cache sets, and a
  // shuffle round touching 32 of them would miss the cache at every switch.
  constexpr size_t COLOUR = 32768;
  while ((int)tl_stacks.size() < n) tl_stacks.emplace_back(new char[stack_bytes + COLOUR]);
  sim_block_idx = bidx;
  sim_block_dim = bdim;
  sim_grid_dim = grid;
  tl_block = &b;
  for (int i = 0; i < n; ++i) {
    Fiber& f = b.fibers[i];
    f.linear = i;
    f.tid = SimDim3{(unsigned)(i % bdim.x), (unsigned)((i / bdim.x) % bdim.y),
                    (unsigned)(i / (bdim.x * bdim.y))};
    ctx_make(f.ctx, tl_stacks[i].get(), stack_bytes + COLOUR - (size_t)i * 64 % COLOUR,
             fiber_main);
    b.ready.push_back(i);
  }
  b.live = n;
  while (b.live > 0) {
    if (b.ready.empty()) {
      if (b.error.empty()) b.error = deadlock_report(b);
      break;
    }
    const int pick = b.ready.front();
    b.ready.pop_front();
    enter(&b, b.sched, pick);
    if (!b.error.empty()) break;
  }
  tl_block = nullptr;
  return b.error;
}

// The blocks of one non-concurrent launch, taken in index order by whichever threads work
// on it (the launching thread and idle pool helpers).
struct Job {
  SimDim3 grid, block;
  void (*thunk)(void*);
  void* ctx;
  size_t stack_bytes;
  unsigned nb;
  std::atomic<unsigned> next{0};
  std::mutex mu;
  std::condition_variable cv;
  int workers = 0;  // pool helpers that hold it (under mu)
  unsigned err_block = ~0u;
  std::string err;
  Job(SimDim3 g, SimDim3 b, void (*t)(void*), void* c, size_t sb)
      : grid(g), block(b), thunk(t), ctx(c), stack_bytes(sb), nb(g.x * g.y * g.z) {}
  // Runs blocks until none is left.
  void work() {
    for (unsigned i; (i = next.fetch_add(1)) < nb;) {
      const SimDim3 bidx{i % grid.x, (i / grid.x) % grid.y, i / (grid.x * grid.y)};
      std::string e = run_block(bidx, block, grid, thunk, ctx, stack_bytes);
      if (!e.empty()) {
        std::lock_guard<std::mutex> g(mu);
        if (i < err_block) {
          err_block = i;
          err = e;
        }
        next = nb;  // the launch has failed: no more blocks start
      }
    }
  }
  // After the launching thread's own work(): waits until no helper holds the job (it lives
  // on the launching thread's stack), so every started block has finished; returns the
  // first error.
  std::string wait() {
    std::unique_lock<std::mutex> l(mu);
    cv.wait(l, [&] { return workers == 0; });
    return err;
  }
};

// Helpers (one fewer than the cores) that take blocks of posted launches: blocks of a
// non-concurrent kernel are independent, and a single rank's decode step would otherwise
// keep one core of the machine busy.
class Pool {
 public:
  explicit Pool(int n) {
    for (int i = 0; i < n; ++i) std::thread([this] { loop(); }).detach();
  }
  void post(Job* j) {
    std::lock_guard<std::mutex> g(mu_);
    // counted before the helper runs it, so the launching thread's wait() sees it
    {
      std::lock_guard<std::mutex> jg(j->mu);
      j->workers++;
    }
    jobs_.push_back(j);
    cv_.notify_one();
  }
  // Takes back a job no helper has picked up yet (its blocks are all done by now).
  void retract(Job* j) {
    std::lock_guard<std::mutex> g(mu_);
    for (auto it = jobs_.begin(); it != jobs_.end(); ++it) {
      if (*it == j) {
        jobs_.erase(it);
        std::lock_guard<std::mutex> jg(j->mu);
        j->workers--;
        return;
      }
    }
  }

 private:
  void loop() {
    for (;;) {
      Job* j;
      {
        std::unique_lock<std::mutex> l(mu_);
        cv_.wait(l, [&] { return !jobs_.empty(); });
        j = jobs_.front();
        jobs_.pop_front();
      }
      j->work();
      std::lock_guard<std::mutex> g(j->mu);
      j->workers--;  // the count post() added: the job may go now
      j->cv.notify_all();
    }
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Job*> jobs_;
};

// The pool, or none on a one-core machine or with SYNCDROP_SIM_BLOCK_THREADS=1.
Pool* pool() {
  static Pool* p = [] () -> Pool* {
    int n = (int)std::thread::hardware_concurrency();
    if (const char* v = getenv("SYNCDROP_SIM_BLOCK_THREADS")) n = atoi(v);
    return n > 1 ? new Pool(n - 1) : nullptr;  // leaked: helpers outlive static destructors
  }();
  return p;
}

}  // namespace

extern "C" {

void sim_yield(void) {
  g_spins.fetch_add(1, std::memory_order_relaxed);
  Block* b = tl_block;
  // Once every live thread of the block has spun since the last progress, it waits on
  // another block (a peer rank's, in the P2P all-reduce): give the OS thread away, with
  // sched_yield for a few rounds and then 50 us sleeps, so spinning blocks do not take the
  // cores from the ranks they wait for (a sched_yield per spin did).
  if (++b->spin_streak > b->live) {
    b->spin_streak = 0;
    if (++b->idle_rounds < 16) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }
  yield_now();
}

long long sim_clock64(void) {
  sim_yield();
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() -
                                                              g_t0)
      .count();
}

uint64_t sim_globaltimer(void) { return (uint64_t)sim_clock64(); }

int sim_syncthreads_or(int pred) {
  Block* b = tl_block;
  b->or_acc |= pred ? 1 : 0;
  b->arrived++;
  if (b->arrived == b->live) {
    release_block_barrier(b);
    // let the others run before this thread goes on, as they would on a GPU
    yield_now();
    return b->or_last;
  }
  cur().wait = Wait::Block;
  b->block_waiters.push_back(b->current);
  switch_out();
  return b->or_last;
}

void sim_syncthreads(void) { (void)sim_syncthreads_or(0); }

uint64_t sim_shfl_xor(unsigned mask, uint64_t bits, int lane_mask) {
  Block* b = tl_block;
  Fiber& f = cur();
  const int n = (int)b->fibers.size();
  const int warp = f.linear / 32, lane = f.linear % 32;
  if (mask != 0xffffffffu) fail("__shfl_xor_sync with a partial mask is not simulated");
  if ((warp + 1) * 32 > n) fail("full-mask __shfl_xor_sync in a warp with fewer than 32 threads");
  if (b->warp_done[warp] > 0) {
    for (int l = 0; l < 32; ++l) {
      if (b->fibers[warp * 32 + l].wait == Wait::Done)
        fail("full-mask __shfl_xor_sync after lane " + std::to_string(l) + " returned");
    }
  }
  uint64_t* slots = &b->warp_slots[((size_t)warp * 2 + (b->warp_gen[warp] & 1)) * 32];
  slots[lane] = bits;
  if (++b->warp_arrived[warp] == 32) {
    // The last lane completes the shuffle: the others (all waiting) go to the front of the
    // queue, in lane order, so a warp runs its next shuffles before other warps run: its 32
    // stacks stay in the L1 cache (queued at the back, every round cycled through all the
    // block's stacks; 3x slower for a 256-thread GEMV block).
    b->warp_arrived[warp] = 0;
    b->warp_gen[warp]++;
    progress(b);
    for (int l = 31; l >= 0; --l) {
      if (l != lane) wake(b, warp * 32 + l, true);
    }
  } else {
    f.wait = Wait::Warp;
    switch_out();
  }
  return slots[lane ^ (lane_mask & 31)];
}

// Launch `thunk(ctx)` as every thread of a (grid, block) launch. concurrent: one OS thread
// per block, all at once; else the blocks shared between this thread and the block pool's
// helpers. Returns 0, or 1 with the first error (deadlock, shuffle misuse; the lowest block's,
// when several fail) written into err.
int syncdrop_sim_launch(SimDim3 grid, SimDim3 block, int concurrent, void (*thunk)(void*),
                        void* ctx, size_t stack_bytes, char* err, size_t err_len) {
  if (stack_bytes < 16384) stack_bytes = 16384;
  const unsigned nb = grid.x * grid.y * grid.z;
  std::string first;
  if (concurrent) {
    std::mutex m;
    std::vector<std::thread> ts;
    ts.reserve(nb);
    for (unsigned i = 0; i < nb; ++i) {
      ts.emplace_back([&, i] {
        const SimDim3 bidx{i % grid.x, (i / grid.x) % grid.y, i / (grid.x * grid.y)};
        std::string e = run_block(bidx, block, grid, thunk, ctx, stack_bytes);
        std::lock_guard<std::mutex> g(m);
        if (!e.empty() && first.empty()) first = e;
      });
    }
    for (auto& t : ts) t.join();
  } else {
    Job job(grid, block, thunk, ctx, stack_bytes);
    Pool* p = nb > 1 ? pool() : nullptr;
    if (p) p->post(&job);
    job.work();
    if (p) p->retract(&job);
    first = job.wait();
  }
  if (first.empty()) return 0;
  if (err && err_len) snprintf(err, err_len, "%s", first.c_str());
  return 1;
}

// How many times threads have spun (yielded in a wait loop) since the process started.
long long syncdrop_sim_spins(void) { return g_spins.load(); }

}  // extern "C"
