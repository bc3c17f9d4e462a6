// Host simulator of csrc/'s kernels (feature `host-sim`): runs the kernels' own source on
// CPU threads, so their indexing, reductions, barriers and the P2P protocol can be tested
// on a machine without a GPU (tests/host_sim_*.rs; src/backend/cuda/host_sim.rs is the
// Rust side).
//
// A block runs on one OS thread; each of its CUDA threads is a fiber with its own
// stack, scheduled cooperatively: a fiber runs until it reaches a barrier, a shuffle, a spin
// (clock64, __nanosleep, an acquire load), or returns. Scheduling is round-robin in thread
// order, so a run is deterministic for a given launch unless blocks talk to each other.
//   __syncthreads: completes when every live thread of the block has arrived (threads that
//     returned count as arrived, as on the hardware since Volta);
//   __shfl_xor_sync(0xffffffff, ...): every lane of the warp must be alive and arrive; a
//     lane that returned is reported as an error (undefined behaviour on a GPU);
//   a state in which no fiber can run and some have not returned is a deadlock: reported
//     with each waiting thread's barrier, and the launch fails.
// Blocks run one after another on the caller's thread, or (concurrent) each on its own OS
// thread at once: what kernels need whose blocks wait for each other (grid barriers) or for
// other ranks' blocks (the P2P all-reduce).
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <atomic>
#include <chrono>
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
  uint64_t gen = 0;  // the barrier generation it waits to see pass
  int or_result = 0;
};

struct Block {
  std::vector<Fiber> fibers;
  FiberCtx sched;
  int current = -1;
  int live = 0;
  // __syncthreads
  int arrived = 0;
  uint64_t block_gen = 0;
  int or_acc = 0;
  int or_last = 0;
  // warp barriers, one per warp
  std::vector<int> warp_arrived;
  std::vector<uint64_t> warp_gen;
  std::vector<uint64_t> warp_slots;  // 32 per warp
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

// Back to the scheduler; returns when this fiber is picked again.
void switch_out() {
  Block* b = tl_block;
  ctx_switch(b->fibers[b->current].ctx, b->sched);
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
  // this fiber never resumes: mark it done so the scheduler can wind the block down
  cur().wait = Wait::Done;
  b->live--;
  switch_out();
  abort();  // unreachable: a done fiber is never resumed
}

// Every fiber starts here, on its block's OS thread (so tl_block is its block).
void fiber_main() {
  Block* b = tl_block;
  b->thunk(b->ctx);
  Fiber& f = b->fibers[b->current];
  f.wait = Wait::Done;
  b->live--;
  // a returning thread counts as arrived at a pending __syncthreads
  if (b->live > 0 && b->arrived > 0 && b->arrived == b->live) {
    b->arrived = 0;
    b->or_last = b->or_acc;
    b->or_acc = 0;
    b->block_gen++;
  }
  // a warp barrier with this lane missing can never complete: the deadlock check reports it
  ctx_switch(f.ctx, b->sched);
  abort();  // a done fiber is never resumed
}

bool runnable(const Block& b, const Fiber& f) {
  switch (f.wait) {
    case Wait::None:
      return true;
    case Wait::Block:
      return b.block_gen != f.gen;
    case Wait::Warp:
      return b.warp_gen[f.linear / 32] != f.gen;
    case Wait::Done:
      return false;
  }
  return false;
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
  b.warp_slots.assign((size_t)warps * 32, 0);
  b.fibers.resize(n);
  if (tl_stack_bytes != stack_bytes) {
    tl_stacks.clear();
    tl_stack_bytes = stack_bytes;
  }
  while ((int)tl_stacks.size() < n) tl_stacks.emplace_back(new char[stack_bytes]);
  sim_block_idx = bidx;
  sim_block_dim = bdim;
  sim_grid_dim = grid;
  tl_block = &b;
  for (int i = 0; i < n; ++i) {
    Fiber& f = b.fibers[i];
    f.linear = i;
    f.tid = SimDim3{(unsigned)(i % bdim.x), (unsigned)((i / bdim.x) % bdim.y),
                    (unsigned)(i / (bdim.x * bdim.y))};
    ctx_make(f.ctx, tl_stacks[i].get(), stack_bytes, fiber_main);
  }
  b.live = n;
  int next = 0;
  while (b.live > 0) {
    int pick = -1;
    for (int k = 0; k < n; ++k) {
      const int i = (next + k) % n;
      if (runnable(b, b.fibers[i])) {
        pick = i;
        break;
      }
    }
    if (pick < 0) {
      if (b.error.empty()) b.error = deadlock_report(b);
      break;
    }
    Fiber& f = b.fibers[pick];
    if (f.wait == Wait::Block || f.wait == Wait::Warp) f.wait = Wait::None;
    b.current = pick;
    sim_thread_idx = f.tid;
    ctx_switch(b.sched, f.ctx);
    if (!b.error.empty()) break;
    next = pick + 1;
  }
  tl_block = nullptr;
  return b.error;
}

}  // namespace

extern "C" {

void sim_yield(void) {
  g_spins.fetch_add(1, std::memory_order_relaxed);
  switch_out();
  // every fiber of the block may be spinning on another block: give the OS thread away too
  std::this_thread::yield();
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
  Fiber& f = cur();
  b->or_acc |= pred ? 1 : 0;
  b->arrived++;
  if (b->arrived == b->live) {
    b->arrived = 0;
    b->or_last = b->or_acc;
    b->or_acc = 0;
    b->block_gen++;
    // let the others run before this thread goes on, as they would on a GPU
    switch_out();
    return b->or_last;
  }
  f.wait = Wait::Block;
  f.gen = b->block_gen;
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
  for (int l = 0; l < 32; ++l) {
    if (b->fibers[warp * 32 + l].wait == Wait::Done)
      fail("full-mask __shfl_xor_sync after lane " + std::to_string(l) + " returned");
  }
  const int src = lane ^ (lane_mask & 31);
  uint64_t* slots = &b->warp_slots[(size_t)warp * 32];
  // phase 1: publish; phase 2: read the partner; a second barrier keeps the slots until all
  // lanes have read them
  for (int phase = 0; phase < 2; ++phase) {
    if (phase == 0) slots[lane] = bits;
    if (++b->warp_arrived[warp] == 32) {
      b->warp_arrived[warp] = 0;
      b->warp_gen[warp]++;
    } else {
      f.wait = Wait::Warp;
      f.gen = b->warp_gen[warp];
      switch_out();
    }
    if (phase == 0) bits = slots[src];
  }
  return bits;
}

// Launch `thunk(ctx)` as every thread of a (grid, block) launch. concurrent: one OS thread
// per block, all at once; else the blocks one after another on this thread. Returns 0, or 1
// with the first error (deadlock, shuffle misuse) written into err.
int syncdrop_sim_launch(SimDim3 grid, SimDim3 block, int concurrent, void (*thunk)(void*),
                        void* ctx, size_t stack_bytes, char* err, size_t err_len) {
  if (stack_bytes < 16384) stack_bytes = 16384;
  const unsigned nb = grid.x * grid.y * grid.z;
  std::mutex m;
  std::string first;
  auto run = [&](unsigned i) {
    const SimDim3 bidx{i % grid.x, (i / grid.x) % grid.y, i / (grid.x * grid.y)};
    std::string e = run_block(bidx, block, grid, thunk, ctx, stack_bytes);
    if (!e.empty()) {
      std::lock_guard<std::mutex> g(m);
      if (first.empty()) first = e;
    }
  };
  if (concurrent) {
    std::vector<std::thread> ts;
    ts.reserve(nb);
    for (unsigned i = 0; i < nb; ++i) ts.emplace_back(run, i);
    for (auto& t : ts) t.join();
  } else {
    for (unsigned i = 0; i < nb && first.empty(); ++i) run(i);
  }
  if (first.empty()) return 0;
  if (err && err_len) snprintf(err, err_len, "%s", first.c_str());
  return 1;
}

// How many times threads have spun (yielded in a wait loop) since the process started.
long long syncdrop_sim_spins(void) { return g_spins.load(); }

}  // extern "C"
