// A CUDA driver and cuBLAS for machines without a GPU (feature `host-sim`): build.rs links this
// file, the simulator (sim.cpp) and every csrc/*.cu kernel into one shared library, named
// libcuda.so, with libcublas.so a link to it. Put its folder on LD_LIBRARY_PATH and cudarc
// loads it instead of NVIDIA's driver, so the CUDA backend's own host code -- contexts,
// streams, events, module loading, kernel launches with the real argument structs, CUDA-graph
// capture and replay, peer pointers between virtual ranks, cuBLAS GEMMs -- runs end to end,
// with each kernel executed by the simulator. `scripts/test.sh` runs the GPU test suites this
// way (scripts/sim-gpu.sh runs any command under it).
//
// Memory is host memory (a device pointer is a host address; every device is one address
// space). Each stream runs its work in order on a worker thread of its own, asynchronously
// to the host and to other streams, as a GPU does: events complete when their stream reaches
// them, cuStreamWaitEvent holds a stream until then, a copy to pageable host memory returns
// once done, one from it is staged at the call, page-locked copies really are asynchronous.
// A stream's missing wait is therefore a real race here, and SYNCDROP_SIM_JITTER_US=N (a
// random sleep of up to N us before each op) shakes the interleavings. The legacy stream
// runs on the calling thread. Ranks' kernels run concurrently, which the P2P all-reduce
// needs. A call that waits for the whole device (cuCtxSynchronize, cuMemFree) waits for
// every stream of it, other threads' included, so a rank that makes one while a peer spins
// for it stalls as on a GPU. What a real driver refuses, this one refuses too, loudly: a
// capture that calls a synchronising or allocating API from the capturing thread, a pageable
// host copy inside a capture, a side stream left unjoined at the end of a capture, a kernel
// the simulator finds deadlocked or misusing a warp shuffle (a sticky launch failure, as on
// a GPU: later work is skipped, event markers still complete). Not modelled: timing (events
// read the host clock when reached), concurrency within a graph (its nodes replay in capture
// order), the memory model, out-of-bounds accesses.
#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <memory>
#include <random>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "cuda_bf16.h"
#include "sim_registry.h"

extern "C" int syncdrop_sim_launch(SimDim3 grid, SimDim3 block, int concurrent,
                                   void (*thunk)(void*), void* ctx, size_t stack_bytes,
                                   char* err, size_t err_len);

namespace {

typedef int CUresult;
constexpr int OK = 0;
constexpr int E_INVALID_VALUE = 1;
constexpr int E_OUT_OF_MEMORY = 2;
constexpr int E_NOT_INITIALIZED = 3;
constexpr int E_INVALID_DEVICE = 101;
constexpr int E_INVALID_CONTEXT = 201;
constexpr int E_INVALID_HANDLE = 400;
constexpr int E_ILLEGAL_STATE = 401;
constexpr int E_NOT_FOUND = 500;
constexpr int E_PEER_ACCESS_ALREADY_ENABLED = 704;
constexpr int E_PEER_ACCESS_NOT_ENABLED = 705;
constexpr int E_LAUNCH_FAILED = 719;
constexpr int E_NOT_READY = 600;
constexpr int E_NOT_SUPPORTED = 801;
constexpr int E_CAPTURE_UNSUPPORTED = 900;
constexpr int E_CAPTURE_INVALIDATED = 901;
constexpr int E_CAPTURE_MERGE = 902;
constexpr int E_CAPTURE_UNMATCHED = 903;
constexpr int E_CAPTURE_UNJOINED = 904;
constexpr int E_CAPTURED_EVENT = 907;

using Op = std::function<CUresult()>;

struct Stream;
struct Graph {
  std::vector<Op> ops;
  Stream* origin = nullptr;
  int mode = 0;  // 0 global, 1 thread-local, 2 relaxed
  std::thread::id owner;
  bool invalid = false;
  std::string why;
  std::set<Stream*> joined;
};
struct Stream {
  Graph* cap = nullptr;
  long long last = 0;                  // sequence number of the last op captured on it
  std::map<Stream*, long long> waited;  // per stream: the op up to which this one waited
  // Execution (every stream but the legacy one): ops run in order on the stream's own worker
  // thread, as a GPU runs a stream's work asynchronously to the host and to other streams.
  int dev = 0;
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::function<void()>> queue;
  unsigned long long issued = 0, done = 0;
  bool worker = false, destroyed = false;
};
struct Event {
  double ms = 0;
  Graph* cap = nullptr;
  Stream* stream = nullptr;
  long long seq = 0;
  // Outside captures (under g_ev_mu): the latest record's number, the latest one its stream
  // has reached, ops still queued that touch the event, and whether it was destroyed (it is
  // deleted by the last of them, as a GPU frees an event still in flight).
  unsigned long long target = 0, reached = 0;
  int pending = 0;
  bool dead = false;
};
struct Ctx {
  int dev;
  std::set<int> peers;
};
struct Module {};
struct Kernel {
  std::string name;
  SimBinder bind;
  bool concurrent;
};
struct Func {
  const Kernel* k;
};
struct Exec {
  // shared with launches still queued: a destroyed graph finishes the launches in flight
  std::shared_ptr<const std::vector<Op>> ops;
};

std::mutex g_mu;  // capture state and the pinned-memory table
std::atomic<int> g_sticky{OK};
std::atomic<long long> g_seq{0};
Stream g_null_stream;
std::vector<Graph*> g_captures;            // active captures
std::vector<Stream*> g_streams;            // every stream made (kept: workers may outlive it)
// event completion: waiters sleep on g_ev_cv (never destroyed: a stream worker may still
// wait on it while the process exits)
std::mutex& g_ev_mu = *new std::mutex;
std::condition_variable& g_ev_cv = *new std::condition_variable;
std::map<uintptr_t, size_t> g_pinned;      // page-locked host allocations
// Device allocations: start -> (bytes, live). Freed blocks stay mapped (filled with 0xFF) in a
// quarantine of up to 2 GiB before they go back to the allocator, so a kernel handed a
// pointer into freed memory -- a graph replaying a buffer that was since dropped, say -- is
// caught at launch instead of silently reading whatever reused the memory.
struct Alloc {
  size_t bytes;
  bool live;
};
std::map<uintptr_t, Alloc> g_allocs;
std::vector<std::pair<uintptr_t, size_t>> g_quarantine;
size_t g_quarantined = 0;
constexpr size_t QUARANTINE_BYTES = (size_t)2 << 30;
thread_local Ctx* tl_ctx = nullptr;
const auto g_t0 = std::chrono::steady_clock::now();

std::unordered_map<std::string, Kernel>& registry() {
  static std::unordered_map<std::string, Kernel> r;
  return r;
}

int env_int(const char* name, int dflt) {
  const char* v = getenv(name);
  return v && *v ? atoi(v) : dflt;
}
int devices() { return std::max(1, env_int("SYNCDROP_SIM_DEVICES", 1)); }
Ctx* primary(int dev) {
  static Ctx ctxs[64];
  static std::once_flag once;
  std::call_once(once, [] {
    for (int i = 0; i < 64; ++i) ctxs[i].dev = i;
  });
  return &ctxs[dev];
}
Stream* S(void* s) { return s ? static_cast<Stream*>(s) : &g_null_stream; }
double now_ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - g_t0)
      .count();
}

void complain(const std::string& msg) { fprintf(stderr, "fake CUDA: %s\n", msg.c_str()); }

// An API a capture forbids (it synchronises, or allocates): refused while this thread (or, in
// global mode, any thread) captures, and that capture is invalidated, as on a GPU.
CUresult unsafe_call(const char* what) {
  std::lock_guard<std::mutex> g(g_mu);
  bool hit = false;
  for (Graph* c : g_captures) {
    if (c->mode == 0 || (c->mode == 1 && c->owner == std::this_thread::get_id())) {
      if (!c->invalid) c->why = std::string(what) + " during stream capture";
      c->invalid = true;
      hit = true;
    }
  }
  if (hit) {
    complain(std::string(what) + " during a stream capture: refused, capture invalidated");
    return E_CAPTURE_UNSUPPORTED;
  }
  return OK;
}

// Work running now on each device's legacy stream (on callers' threads; other streams' work
// is counted by their issued/done).
std::atomic<int> g_busy[64];
int current_device() { return tl_ctx ? tl_ctx->dev : 0; }

// SYNCDROP_SIM_JITTER_US=N: a stream's worker sleeps 0..N us (random) before each op, so
// work on different streams interleaves differently from run to run (race hunting).
void jitter() {
  static const int max_us = env_int("SYNCDROP_SIM_JITTER_US", 0);
  if (max_us <= 0) return;
  thread_local std::minstd_rand rng(std::random_device{}());
  std::this_thread::sleep_for(std::chrono::microseconds(rng() % (unsigned)(max_us + 1)));
}

void stream_worker(Stream* st) {
  std::unique_lock<std::mutex> lk(st->mu);
  for (;;) {
    st->cv.wait(lk, [&] { return !st->queue.empty() || st->destroyed; });
    if (st->queue.empty()) return;  // destroyed, and its work done
    std::function<void()> op = std::move(st->queue.front());
    st->queue.pop_front();
    lk.unlock();
    jitter();
    op();
    lk.lock();
    ++st->done;
    st->cv.notify_all();
  }
}

// Wait until every op enqueued on `st` so far has run.
void drain(Stream* st) {
  if (st == &g_null_stream) return;
  std::unique_lock<std::mutex> lk(st->mu);
  const unsigned long long upto = st->issued;
  st->cv.wait(lk, [&] { return st->done >= upto; });
}

// Record into the stream's capture; else run now on the legacy stream, or queue for the
// stream's worker. Work that runs after a sticky error is skipped, as on a GPU.
CUresult enqueue(void* s, Op op, bool marker = false) {
  Stream* st = S(s);
  {
    std::lock_guard<std::mutex> g(g_mu);
    if (st->cap) {
      st->last = ++g_seq;
      st->cap->ops.push_back(std::move(op));
      return OK;
    }
  }
  const int sticky = g_sticky.load();
  if (sticky != OK && !marker) return sticky;
  if (st == &g_null_stream) {
    std::atomic<int>& busy = g_busy[current_device()];
    busy.fetch_add(1);
    const CUresult r = op();
    busy.fetch_sub(1);
    return r;
  }
  std::lock_guard<std::mutex> lk(st->mu);
  if (!st->worker) {
    st->worker = true;
    std::thread(stream_worker, st).detach();
  }
  st->queue.push_back([op = std::move(op), marker]() {
    if (g_sticky.load() != OK && !marker) return;  // (event markers still run: no waiter hangs)
    if (const CUresult r = op(); r != OK) {
      int ok = OK;
      g_sticky.compare_exchange_strong(ok, r);
    }
  });
  ++st->issued;
  st->cv.notify_all();
  return OK;
}

// A call that waits for the whole device (cuCtxSynchronize; cuMemFree and cuMemFreeHost,
// which synchronise implicitly): on a GPU it waits for every stream's work, other threads'
// included, and so does this. That is what a GPU does to virtual ranks: a rank that frees memory
// (or synchronises the context) while a peer's kernel spins waiting for this rank's next
// launch deadlocks until the peer's spin budget runs out. Said on stderr after a few seconds.
void device_wide_wait(const char* what) {
  const int dev = current_device();
  const auto t0 = std::chrono::steady_clock::now();
  const int warn_s = std::max(1, env_int("SYNCDROP_SIM_SYNC_WARN_S", 5));
  bool told = false;
  auto idle = [dev] {
    std::vector<Stream*> streams;
    {
      std::lock_guard<std::mutex> g(g_mu);
      streams = g_streams;
    }
    for (Stream* st : streams) {
      if (st->dev != dev) continue;
      std::lock_guard<std::mutex> lk(st->mu);
      if (st->done < st->issued) return false;
    }
    return g_busy[dev].load() == 0;
  };
  while (!idle()) {
    std::this_thread::sleep_for(std::chrono::microseconds(50));
    if (!told && std::chrono::steady_clock::now() - t0 > std::chrono::seconds(warn_s)) {
      told = true;
      char msg[512];
      snprintf(msg, sizeof msg,
               "%s has waited %d s for work other threads run on device %d: on a GPU it "
               "waits for the whole device, so a kernel spinning until this thread launches "
               "its part would never finish",
               what, warn_s, dev);
      complain(msg);
    }
  }
}
bool capturing(void* s) {
  std::lock_guard<std::mutex> g(g_mu);
  return S(s)->cap != nullptr;
}
bool pinned(const void* p, size_t n) {
  std::lock_guard<std::mutex> g(g_mu);
  const uintptr_t a = (uintptr_t)p;
  auto it = g_pinned.upper_bound(a);
  if (it == g_pinned.begin()) return false;
  --it;
  return a >= it->first && a + n <= it->first + it->second;
}
// A host<->device copy on stream s: inside a capture the host side must be page-locked.
CUresult host_copy(void* s, void* dst, const void* src, size_t n, const void* host) {
  if (capturing(s) && n > 0 && !pinned(host, n)) {
    {
      std::lock_guard<std::mutex> g(g_mu);
      Graph* c = S(s)->cap;
      if (!c->invalid) c->why = "a pageable host copy during stream capture";
      c->invalid = true;
    }
    complain("a copy from/to pageable host memory inside a stream capture: refused");
    return E_CAPTURE_UNSUPPORTED;
  }
  // page-locked memory: a true asynchronous copy, read or written when it runs
  const bool pageable = n > 0 && !pinned(host, n);
  if (pageable && host == src) {  // from pageable memory: staged now, so the caller may reuse it
    auto staged = std::make_shared<std::vector<char>>((const char*)src, (const char*)src + n);
    return enqueue(s, [=]() {
      memmove(dst, staged->data(), n);
      return OK;
    });
  }
  const CUresult r = enqueue(s, [=]() {
    if (n) memmove(dst, src, n);
    return OK;
  });
  if (r != OK || !pageable) return r;
  // to pageable memory: returns once the copy is done (what cudarc relies on for a Vec)
  drain(S(s));
  return g_sticky.load();
}

void* dev_alloc(size_t bytes) {
  void* p = nullptr;
  if (posix_memalign(&p, 256, std::max<size_t>(bytes, 1)) != 0) return nullptr;
  // uninitialised device memory reads as NaN (0xFF bytes), so reading it shows up
  if (bytes <= (256u << 20)) memset(p, 0xff, bytes);
  std::lock_guard<std::mutex> g(g_mu);
  g_allocs[(uintptr_t)p] = Alloc{std::max<size_t>(bytes, 1), true};
  return p;
}
CUresult dev_free(void* p) {
  if (!p) return OK;
  std::lock_guard<std::mutex> g(g_mu);
  auto it = g_allocs.find((uintptr_t)p);
  if (it == g_allocs.end() || !it->second.live) {
    complain("cuMemFree of a pointer that is not a live allocation");
    return E_INVALID_VALUE;
  }
  it->second.live = false;
  const size_t n = it->second.bytes;
  if (n <= (256u << 20)) memset(p, 0xff, n);
  g_quarantine.emplace_back((uintptr_t)p, n);
  g_quarantined += n;
  size_t drop = 0;
  while (g_quarantined > QUARANTINE_BYTES && drop < g_quarantine.size()) {
    const auto [a, b] = g_quarantine[drop++];
    g_quarantined -= b;
    g_allocs.erase(a);
    free((void*)a);
  }
  g_quarantine.erase(g_quarantine.begin(), g_quarantine.begin() + drop);
  return OK;
}
// A kernel's pointer argument must point into a live device allocation or page-locked host
// memory (null is allowed: optional arguments).
std::string check_ptr(const void* p) {
  if (!p) return "";
  const uintptr_t a = (uintptr_t)p;
  std::lock_guard<std::mutex> g(g_mu);
  auto it = g_allocs.upper_bound(a);
  if (it != g_allocs.begin()) {
    --it;
    if (a < it->first + it->second.bytes) {
      if (it->second.live) return "";
      char m[160];
      snprintf(m, sizeof m, "points into freed device memory (offset %zu of a freed %zu-byte allocation)",
               (size_t)(a - it->first), it->second.bytes);
      return m;
    }
  }
  auto h = g_pinned.upper_bound(a);
  if (h != g_pinned.begin()) {
    --h;
    if (a < h->first + h->second) return "";
  }
  return "points to no device allocation (host memory?)";
}

// SYNCDROP_SIM_PROFILE=1: at exit, stderr gets each kernel's (and cuBLAS's) launches and
// host seconds, most expensive first -- where a slow simulated test spends its time.
struct Profile {
  std::mutex mu;
  std::map<std::string, std::pair<long long, double>> by_name;  // launches, seconds
  ~Profile() {
    if (by_name.empty()) return;
    std::vector<std::tuple<double, long long, const std::string*>> rows;  // seconds, launches
    double total = 0;
    for (auto& [name, v] : by_name) {
      rows.emplace_back(v.second, v.first, &name);
      total += v.second;
    }
    std::sort(rows.rbegin(), rows.rend());
    fprintf(stderr, "fake CUDA profile (host seconds; %.1f s in all):\n", total);
    for (auto& [sec, launches, name] : rows)
      fprintf(stderr, "  %10.2f s %10lld  %s\n", sec, launches, name->c_str());
  }
};
Profile* profile() {
  static Profile* p = getenv("SYNCDROP_SIM_PROFILE") ? new Profile : nullptr;
  return p;
}
// Runs f, charged to `name` when profiling.
template <class F>
CUresult profiled(const std::string& name, F&& f) {
  Profile* p = profile();
  if (!p) return f();
  const auto t0 = std::chrono::steady_clock::now();
  const CUresult r = f();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::lock_guard<std::mutex> g(p->mu);
  auto& v = p->by_name[name];
  v.first++;
  v.second += s;
  return r;
}
struct ProfileAtExit {
  ~ProfileAtExit() { delete profile(); }
} g_profile_at_exit;

CUresult run_kernel(const Kernel* k, SimDim3 grid, SimDim3 block, const SimCall& call) {
  for (size_t i = 0; i < call.ptrs.size(); ++i) {
    const std::string bad = check_ptr(call.ptrs[i]);
    if (!bad.empty()) {
      complain("kernel " + k->name + ": argument " + std::to_string(i) + " " + bad);
      g_sticky = E_LAUNCH_FAILED;
      return E_LAUNCH_FAILED;
    }
  }
  const SimBound& b = call.run;
  char err[2048] = {0};
  auto thunk = [](void* c) { (*static_cast<const SimBound*>(c))(); };
  const int rc = syncdrop_sim_launch(grid, block, k->concurrent ? 1 : 0, thunk,
                                     const_cast<SimBound*>(&b), 64 * 1024, err, sizeof err);
  if (rc == 0) return OK;
  char msg[2600];
  snprintf(msg, sizeof msg, "kernel %s <<<(%u,%u,%u), (%u,%u,%u)>>> failed: %s", k->name.c_str(),
           grid.x, grid.y, grid.z, block.x, block.y, block.z, err);
  complain(msg);
  g_sticky = E_LAUNCH_FAILED;
  return E_LAUNCH_FAILED;
}

size_t host_memory() {
  FILE* f = fopen("/proc/meminfo", "r");
  size_t kb = 0;
  if (f) {
    char line[256];
    while (fgets(line, sizeof line, f)) {
      if (sscanf(line, "MemAvailable: %zu kB", &kb) == 1) break;
    }
    fclose(f);
  }
  return kb ? kb * 1024 / 2 : (size_t)8 << 30;
}

// ---- cuBLAS ---------------------------------------------------------------------------------
struct Blas {
  void* stream = nullptr;
};
float load(const void* p, int type, size_t i) {
  switch (type) {
    case 0:
      return static_cast<const float*>(p)[i];
    case 14: {
      const uint32_t bits = (uint32_t) static_cast<const uint16_t*>(p)[i] << 16;
      float f;
      memcpy(&f, &bits, 4);
      return f;
    }
    default:
      abort();
  }
}
void store(void* p, int type, size_t i, float v) {
  if (type == 0) {
    static_cast<float*>(p)[i] = v;
  } else {
    static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16(v);
  }
}
// Column-major C (m, n) = alpha op(A) (m, k) op(B) (k, n) + beta C, f32 accumulation.
// op(B)'s columns are converted to f32 once, each op(A) row once per thread, and every C
// element is a dot product of two contiguous f32 rows with eight partial sums (which the
// compiler vectorises; one running sum would serialise on the add latency).
float dot(const float* x, const float* y, int k) {
  float p[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int l = 0;
  for (; l + 8 <= k; l += 8) {
    for (int q = 0; q < 8; ++q) p[q] += x[l + q] * y[l + q];
  }
  float s = ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
  for (; l < k; ++l) s += x[l] * y[l];
  return s;
}
void gemm(int ta, int tb, int m, int n, int k, float alpha, const void* a, int at, int lda,
          const void* b, int bt, int ldb, float beta, void* c, int ct, int ldc) {
  // op(B)(l, j) -> bcols[j * k + l]
  std::vector<float> bcols((size_t)n * k);
  for (int j = 0; j < n; ++j) {
    for (int l = 0; l < k; ++l)
      bcols[(size_t)j * k + l] =
          load(b, bt, tb ? (size_t)j + (size_t)l * ldb : (size_t)l + (size_t)j * ldb);
  }
  auto rows = [&](int i0, int i1) {
    std::vector<float> arow(k);
    for (int i = i0; i < i1; ++i) {
      for (int l = 0; l < k; ++l)
        arow[l] = load(a, at, ta ? (size_t)l + (size_t)i * lda : (size_t)i + (size_t)l * lda);
      for (int j = 0; j < n; ++j) {
        const float s = dot(arow.data(), &bcols[(size_t)j * k], k);
        const size_t ci = (size_t)i + (size_t)j * ldc;
        const float old = beta == 0.f ? 0.f : beta * load(c, ct, ci);
        store(c, ct, ci, alpha * s + old);
      }
    }
  };
  const int nt = std::max(1, std::min<int>(m, (int)std::thread::hardware_concurrency()));
  std::vector<std::thread> ts;
  for (int t = 1; t < nt; ++t) ts.emplace_back(rows, m * t / nt, m * (t + 1) / nt);
  rows(0, m / nt);
  for (auto& t : ts) t.join();
}
bool blas_type_ok(int t) { return t == 0 || t == 14; }

}  // namespace

bool sim_register(const char* name, SimBinder bind, bool concurrent) {
  registry()[name] = Kernel{name, bind, concurrent};
  return true;
}

extern "C" {

// ---- driver: init, devices, contexts ---------------------------------------------------------
CUresult cuInit(unsigned) { return OK; }
CUresult cuDriverGetVersion(int* v) {
  *v = 13000;
  return OK;
}
CUresult cuDeviceGetCount(int* n) {
  *n = devices();
  return OK;
}
CUresult cuDeviceGet(int* d, int ordinal) {
  if (ordinal < 0 || ordinal >= devices()) return E_INVALID_DEVICE;
  *d = ordinal;
  return OK;
}
CUresult cuDeviceGetAttribute(int* v, int attrib, int dev) {
  if (dev < 0 || dev >= devices()) return E_INVALID_DEVICE;
  switch (attrib) {
    case 1:  // max threads per block
      *v = 1024;
      break;
    case 8:  // max shared memory per block
      *v = 48 * 1024;
      break;
    case 10:  // warp size
      *v = 32;
      break;
    case 13:  // clock rate in kHz: 1 GHz, so a simulated clock64() tick (1 ns) is a cycle
      *v = 1000000;
      break;
    case 16:  // SMs
      *v = std::max(1, env_int("SYNCDROP_SIM_SMS", 16));
      break;
    case 39:  // max threads per SM
      *v = 2048;
      break;
    case 75:  // compute capability
      *v = 9;
      break;
    case 76:
      *v = 0;
      break;
    case 115:  // memory pools: yes, as on the GPUs this crate targets (cudarc then allocates
               // with cuMemAllocAsync and frees with cuMemFreeAsync); SYNCDROP_SIM_MEMPOOLS=0
               // says no (cuMemAlloc / cuMemFree, which waits for the whole device)
      *v = env_int("SYNCDROP_SIM_MEMPOOLS", 1) != 0;
      break;
    default:
      *v = 0;
  }
  return OK;
}
CUresult cuDeviceGetName(char* name, int len, int dev) {
  snprintf(name, len, "syncdrop simulated GPU %d (host)", dev);
  return OK;
}
CUresult cuDeviceTotalMem_v2(size_t* bytes, int) {
  *bytes = host_memory();
  return OK;
}
CUresult cuDeviceGetPCIBusId(char* id, int len, int dev) {
  snprintf(id, len, "0000:%02x:00.0", 0x10 + dev);
  return OK;
}
CUresult cuDeviceGetUuid(unsigned char* uuid, int dev) {
  memset(uuid, 0, 16);
  uuid[0] = (unsigned char)dev;
  return OK;
}
CUresult cuDeviceGetUuid_v2(unsigned char* uuid, int dev) { return cuDeviceGetUuid(uuid, dev); }
CUresult cuDeviceCanAccessPeer(int* ok, int a, int b) {
  *ok = a != b && a < devices() && b < devices();
  return OK;
}
CUresult cuDevicePrimaryCtxRetain(void** ctx, int dev) {
  if (dev < 0 || dev >= devices()) return E_INVALID_DEVICE;
  *ctx = primary(dev);
  return OK;
}
CUresult cuDevicePrimaryCtxRelease_v2(int) { return OK; }
CUresult cuCtxSetCurrent(void* ctx) {
  tl_ctx = static_cast<Ctx*>(ctx);
  return OK;
}
CUresult cuCtxGetCurrent(void** ctx) {
  *ctx = tl_ctx;
  return OK;
}
CUresult cuCtxPushCurrent_v2(void* ctx) { return cuCtxSetCurrent(ctx); }
CUresult cuCtxPopCurrent_v2(void** ctx) {
  if (ctx) *ctx = tl_ctx;
  return OK;
}
CUresult cuCtxGetDevice(int* dev) {
  if (!tl_ctx) return E_INVALID_CONTEXT;
  *dev = tl_ctx->dev;
  return OK;
}
CUresult cuCtxSynchronize(void) {
  const CUresult r = unsafe_call("cuCtxSynchronize");
  if (r != OK) return r;
  device_wide_wait("cuCtxSynchronize");
  return g_sticky.load();
}
CUresult cuCtxEnablePeerAccess(void* peer, unsigned) {
  if (!tl_ctx) return E_INVALID_CONTEXT;
  Ctx* p = static_cast<Ctx*>(peer);
  if (p == tl_ctx || p->dev == tl_ctx->dev) return E_INVALID_DEVICE;
  std::lock_guard<std::mutex> g(g_mu);
  if (!tl_ctx->peers.insert(p->dev).second) return E_PEER_ACCESS_ALREADY_ENABLED;
  return OK;
}
CUresult cuCtxDisablePeerAccess(void* peer) {
  if (!tl_ctx) return E_INVALID_CONTEXT;
  std::lock_guard<std::mutex> g(g_mu);
  return tl_ctx->peers.erase(static_cast<Ctx*>(peer)->dev) ? OK : E_PEER_ACCESS_NOT_ENABLED;
}
CUresult cuCtxGetStreamPriorityRange(int* lo, int* hi) {
  *lo = 0;
  *hi = 0;
  return OK;
}
CUresult cuCtxSetLimit(int, size_t) { return OK; }
CUresult cuCtxGetLimit(size_t* v, int) {
  *v = 0;
  return OK;
}
CUresult cuCtxSetFlags(unsigned) { return OK; }

CUresult cuGetErrorString(int e, const char** s) {
  switch (e) {
    case OK:
      *s = "no error";
      break;
    case E_LAUNCH_FAILED:
      *s = "unspecified launch failure (simulated kernel failed: see stderr)";
      break;
    case E_CAPTURE_UNSUPPORTED:
      *s = "operation not permitted when stream is capturing";
      break;
    case E_CAPTURE_INVALIDATED:
      *s = "operation failed due to a previous error during capture";
      break;
    case E_CAPTURE_UNJOINED:
      *s = "capture was not joined with the origin stream";
      break;
    case E_NOT_FOUND:
      *s = "named symbol not found";
      break;
    default:
      *s = "error (fake CUDA driver)";
  }
  return OK;
}
CUresult cuGetErrorName(int e, const char** s) {
  static thread_local char buf[64];
  snprintf(buf, sizeof buf, "CUDA_ERROR_%d", e);
  *s = e == OK ? "CUDA_SUCCESS" : buf;
  return OK;
}

// ---- memory ---------------------------------------------------------------------------------
CUresult cuMemAlloc_v2(unsigned long long* p, size_t bytes) {
  if (CUresult r = unsafe_call("cuMemAlloc"); r != OK) return r;
  void* m = dev_alloc(bytes);
  if (!m) return E_OUT_OF_MEMORY;
  *p = (unsigned long long)(uintptr_t)m;
  return OK;
}
CUresult cuMemFree_v2(unsigned long long p) {
  if (CUresult r = unsafe_call("cuMemFree"); r != OK) return r;
  device_wide_wait("cuMemFree");
  return dev_free((void*)(uintptr_t)p);
}
// Stream-ordered allocation (memory pools; what cudarc uses where a device has them, as every
// GPU this crate targets does). Legal in a capture on a GPU (a graph memory node), but
// syncdrop allocates and frees before it captures, so here it is refused there, loudly.
CUresult pool_call_in_capture(void* s, const char* what) {
  std::lock_guard<std::mutex> g(g_mu);
  Graph* c = S(s)->cap;
  if (!c) return OK;
  if (!c->invalid) c->why = std::string(what) + " during stream capture";
  c->invalid = true;
  complain(std::string(what) +
           " in a stream capture (a graph memory node on a GPU; syncdrop allocates before "
           "capturing): refused, capture invalidated");
  return E_CAPTURE_UNSUPPORTED;
}
CUresult cuMemAllocAsync(unsigned long long* p, size_t bytes, void* s) {
  if (CUresult r = pool_call_in_capture(s, "cuMemAllocAsync"); r != OK) return r;
  void* m = dev_alloc(bytes);
  if (!m) return E_OUT_OF_MEMORY;
  *p = (unsigned long long)(uintptr_t)m;
  return OK;
}
CUresult cuMemFreeAsync(unsigned long long p, void* s) {
  if (CUresult r = pool_call_in_capture(s, "cuMemFreeAsync"); r != OK) return r;
  if (p) {  // an invalid pointer is refused now, as a GPU does, not when the free runs
    std::lock_guard<std::mutex> g(g_mu);
    auto it = g_allocs.find((uintptr_t)p);
    if (it == g_allocs.end() || !it->second.live) {
      complain("cuMemFreeAsync of a pointer that is not a live allocation");
      return E_INVALID_VALUE;
    }
  }
  return enqueue(s, [p]() { return dev_free((void*)(uintptr_t)p); });
}
CUresult cuMemGetInfo_v2(size_t* free_b, size_t* total) {
  *total = host_memory();
  *free_b = *total;
  return OK;
}
CUresult cuMemHostAlloc(void** p, size_t bytes, unsigned) {
  if (CUresult r = unsafe_call("cuMemHostAlloc"); r != OK) return r;
  if (posix_memalign(p, 256, std::max<size_t>(bytes, 1)) != 0) return E_OUT_OF_MEMORY;
  std::lock_guard<std::mutex> g(g_mu);
  g_pinned[(uintptr_t)*p] = bytes;
  return OK;
}
CUresult cuMemAllocHost_v2(void** p, size_t bytes) { return cuMemHostAlloc(p, bytes, 0); }
CUresult cuMemFreeHost(void* p) {
  if (CUresult r = unsafe_call("cuMemFreeHost"); r != OK) return r;
  device_wide_wait("cuMemFreeHost");
  {
    std::lock_guard<std::mutex> g(g_mu);
    g_pinned.erase((uintptr_t)p);
  }
  free(p);
  return OK;
}
CUresult cuMemHostGetDevicePointer_v2(unsigned long long* d, void* p, unsigned) {
  *d = (unsigned long long)(uintptr_t)p;
  return OK;
}
CUresult cuMemHostRegister_v2(void* p, size_t bytes, unsigned) {
  std::lock_guard<std::mutex> g(g_mu);
  g_pinned[(uintptr_t)p] = bytes;
  return OK;
}
CUresult cuMemHostUnregister(void* p) {
  std::lock_guard<std::mutex> g(g_mu);
  g_pinned.erase((uintptr_t)p);
  return OK;
}

#define DPTR(x) ((void*)(uintptr_t)(x))
CUresult cuMemcpyHtoD_v2(unsigned long long dst, const void* src, size_t n) {
  if (CUresult r = unsafe_call("cuMemcpyHtoD"); r != OK) return r;
  if (g_sticky != OK) return g_sticky;
  if (n) memmove(DPTR(dst), src, n);
  return OK;
}
CUresult cuMemcpyDtoH_v2(void* dst, unsigned long long src, size_t n) {
  if (CUresult r = unsafe_call("cuMemcpyDtoH"); r != OK) return r;
  if (g_sticky != OK) return g_sticky;
  if (n) memmove(dst, DPTR(src), n);
  return OK;
}
CUresult cuMemcpyDtoD_v2(unsigned long long dst, unsigned long long src, size_t n) {
  if (CUresult r = unsafe_call("cuMemcpyDtoD"); r != OK) return r;
  if (g_sticky != OK) return g_sticky;
  if (n) memmove(DPTR(dst), DPTR(src), n);
  return OK;
}
CUresult cuMemcpyHtoDAsync_v2(unsigned long long dst, const void* src, size_t n, void* s) {
  return host_copy(s, DPTR(dst), src, n, src);
}
CUresult cuMemcpyDtoHAsync_v2(void* dst, unsigned long long src, size_t n, void* s) {
  return host_copy(s, dst, DPTR(src), n, dst);
}
CUresult cuMemcpyDtoDAsync_v2(unsigned long long dst, unsigned long long src, size_t n, void* s) {
  return enqueue(s, [=]() {
    if (n) memmove(DPTR(dst), DPTR(src), n);
    return OK;
  });
}
CUresult cuMemcpyPeerAsync(unsigned long long dst, void*, unsigned long long src, void*, size_t n,
                           void* s) {
  return cuMemcpyDtoDAsync_v2(dst, src, n, s);
}
CUresult cuMemsetD8_v2(unsigned long long dst, unsigned char v, size_t n) {
  if (CUresult r = unsafe_call("cuMemsetD8"); r != OK) return r;
  if (g_sticky != OK) return g_sticky;
  memset(DPTR(dst), v, n);
  return OK;
}
CUresult cuMemsetD32_v2(unsigned long long dst, unsigned v, size_t n) {
  if (CUresult r = unsafe_call("cuMemsetD32"); r != OK) return r;
  if (g_sticky != OK) return g_sticky;
  std::fill_n(static_cast<unsigned*>(DPTR(dst)), n, v);
  return OK;
}
CUresult cuMemsetD8Async(unsigned long long dst, unsigned char v, size_t n, void* s) {
  return enqueue(s, [=]() {
    memset(DPTR(dst), v, n);
    return OK;
  });
}
CUresult cuMemsetD32Async(unsigned long long dst, unsigned v, size_t n, void* s) {
  return enqueue(s, [=]() {
    std::fill_n(static_cast<unsigned*>(DPTR(dst)), n, v);
    return OK;
  });
}

// ---- streams, events, capture ---------------------------------------------------------------
// At exit, before this library's globals go: let every stream finish its queued work (the
// workers touch the allocation table), waiting at most 10 s in all.
void drain_all_at_exit() {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  std::vector<Stream*> streams;
  {
    std::lock_guard<std::mutex> g(g_mu);
    streams = g_streams;
  }
  for (Stream* st : streams) {
    std::unique_lock<std::mutex> lk(st->mu);
    const unsigned long long upto = st->issued;
    if (!st->cv.wait_until(lk, deadline, [&] { return st->done >= upto; })) {
      complain("exit: a stream still had work queued after 10 s");
      return;
    }
  }
}
CUresult cuStreamCreate(void** s, unsigned) {
  // registered after this file's globals were built, so it runs before they are destroyed
  static const bool at_exit = (atexit(drain_all_at_exit), true);
  (void)at_exit;
  Stream* st = new Stream();
  st->dev = current_device();
  std::lock_guard<std::mutex> g(g_mu);
  g_streams.push_back(st);
  *s = st;
  return OK;
}
CUresult cuStreamCreateWithPriority(void** s, unsigned f, int) { return cuStreamCreate(s, f); }
CUresult cuStreamDestroy_v2(void* s) {
  if (!s) return E_INVALID_HANDLE;
  std::lock_guard<std::mutex> g(g_mu);
  if (S(s)->cap) {
    complain("cuStreamDestroy of a capturing stream");
    return E_ILLEGAL_STATE;
  }
  // as on a GPU, work already queued still runs; the worker then ends (the object is kept)
  Stream* st = S(s);
  std::lock_guard<std::mutex> lk(st->mu);
  st->destroyed = true;
  st->cv.notify_all();
  return OK;
}
CUresult cuStreamSynchronize(void* s) {
  {
    std::lock_guard<std::mutex> g(g_mu);
    if (Graph* c = S(s)->cap) {
      if (!c->invalid) c->why = "cuStreamSynchronize of a capturing stream";
      c->invalid = true;
      complain("cuStreamSynchronize of a capturing stream: refused, capture invalidated");
      return E_CAPTURE_UNSUPPORTED;
    }
  }
  if (CUresult r = unsafe_call("cuStreamSynchronize"); r != OK) return r;
  drain(S(s));
  return g_sticky.load();
}
CUresult cuStreamQuery(void* s) {
  if (capturing(s)) return E_CAPTURE_UNSUPPORTED;
  Stream* st = S(s);
  if (st != &g_null_stream) {
    std::lock_guard<std::mutex> lk(st->mu);
    if (st->done < st->issued) return E_NOT_READY;
  }
  return g_sticky.load();
}
CUresult cuEventCreate(void** e, unsigned) {
  *e = new Event();
  return OK;
}
CUresult cuEventDestroy_v2(void* e) {
  Event* ev = static_cast<Event*>(e);
  std::lock_guard<std::mutex> g(g_ev_mu);
  if (ev->pending > 0) {
    ev->dead = true;
  } else {
    delete ev;
  }
  return OK;
}
// An op that touched `ev` is done: delete a destroyed event after its last one.
void event_op_done(Event* ev) {
  bool del;
  {
    std::lock_guard<std::mutex> g(g_ev_mu);
    del = --ev->pending == 0 && ev->dead;
  }
  g_ev_cv.notify_all();
  if (del) delete ev;
}
CUresult cuEventRecord(void* e, void* s) {
  Event* ev = static_cast<Event*>(e);
  Stream* st = S(s);
  {
    std::lock_guard<std::mutex> g(g_mu);
    if (st->cap) {
      ev->cap = st->cap;
      ev->stream = st;
      ev->seq = st->last;
      // inside a capture a record is only a dependency edge for streams that wait on it (as
      // on a GPU without CU_EVENT_RECORD_EXTERNAL): no node, so nothing touches the event
      // when the graph replays
      return OK;
    }
    ev->cap = nullptr;
    ev->stream = st;
  }
  unsigned long long t;
  {
    std::lock_guard<std::mutex> g(g_ev_mu);
    t = ++ev->target;
    ++ev->pending;
  }
  // the event completes when its stream reaches this point (timing included)
  const CUresult r = enqueue(
      s,
      [ev, t]() {
        {
          std::lock_guard<std::mutex> g(g_ev_mu);
          ev->ms = now_ms();
          ev->reached = std::max(ev->reached, t);
        }
        event_op_done(ev);
        return OK;
      },
      true);
  if (r != OK) event_op_done(ev);
  return r;
}
// Block until `ev`'s stream has reached record number `t`.
void wait_reached(Event* ev, unsigned long long t) {
  std::unique_lock<std::mutex> lk(g_ev_mu);
  g_ev_cv.wait(lk, [ev, t] { return ev->reached >= t; });
}
bool event_done(Event* ev) {
  std::lock_guard<std::mutex> g(g_ev_mu);
  return ev->reached >= ev->target;
}
CUresult cuEventRecordWithFlags(void* e, void* s, unsigned) { return cuEventRecord(e, s); }
CUresult cuEventSynchronize(void* e) {
  {
    std::lock_guard<std::mutex> g(g_mu);
    if (static_cast<Event*>(e)->cap) return E_CAPTURED_EVENT;
  }
  Event* ev = static_cast<Event*>(e);
  unsigned long long t;
  {
    std::lock_guard<std::mutex> g(g_ev_mu);
    t = ev->target;
  }
  wait_reached(ev, t);
  return g_sticky.load();
}
CUresult cuEventQuery(void* e) {
  {
    std::lock_guard<std::mutex> g(g_mu);
    if (static_cast<Event*>(e)->cap) return E_CAPTURED_EVENT;
  }
  return event_done(static_cast<Event*>(e)) ? g_sticky.load() : E_NOT_READY;
}
CUresult cuEventElapsedTime(float* ms, void* a, void* b) {
  Event *ea = static_cast<Event*>(a), *eb = static_cast<Event*>(b);
  if (!event_done(ea) || !event_done(eb)) return E_NOT_READY;
  std::lock_guard<std::mutex> g(g_ev_mu);
  *ms = (float)(eb->ms - ea->ms);
  return OK;
}
CUresult cuEventElapsedTime_v2(float* ms, void* a, void* b) { return cuEventElapsedTime(ms, a, b); }
// Inside a capture: an edge (a side stream waiting on a captured event joins the capture).
CUresult wait_event_in_capture(Stream* st, Event* ev) {
  Graph* c = ev->cap;
  if (c && std::find(g_captures.begin(), g_captures.end(), c) != g_captures.end()) {
    if (st->cap && st->cap != c) return E_CAPTURE_MERGE;
    if (!st->cap) {
      // a side stream joins the capture (the fork pattern)
      st->cap = c;
      st->last = 0;
      st->waited.clear();
      c->joined.insert(st);
    }
    long long& w = st->waited[ev->stream];
    w = std::max(w, ev->seq);
  }
  return OK;
}
CUresult cuStreamWaitEvent(void* s, void* e, unsigned) {
  Stream* st = S(s);
  Event* ev = static_cast<Event*>(e);
  {
    std::lock_guard<std::mutex> g(g_mu);
    if (st->cap || ev->cap) return wait_event_in_capture(st, ev);
  }
  // outside a capture: the stream's later work waits for the event's latest record
  unsigned long long t;
  {
    std::lock_guard<std::mutex> g(g_ev_mu);
    t = ev->target;
    if (ev->reached >= t) return OK;
    ++ev->pending;
  }
  // (on the legacy stream the op runs, and so waits, on the caller)
  const CUresult r = enqueue(
      s,
      [ev, t]() {
        wait_reached(ev, t);
        event_op_done(ev);
        return OK;
      },
      true);
  if (r != OK) event_op_done(ev);
  return r;
}
CUresult cuStreamBeginCapture_v2(void* s, int mode) {
  std::lock_guard<std::mutex> g(g_mu);
  Stream* st = S(s);
  if (!s) {
    complain("cuStreamBeginCapture on the legacy default stream");
    return E_NOT_SUPPORTED;
  }
  if (st->cap) return E_ILLEGAL_STATE;
  Graph* c = new Graph();
  c->origin = st;
  c->mode = mode;
  c->owner = std::this_thread::get_id();
  st->cap = c;
  st->last = 0;
  st->waited.clear();
  g_captures.push_back(c);
  return OK;
}
CUresult cuStreamIsCapturing(void* s, int* status) {
  std::lock_guard<std::mutex> g(g_mu);
  Graph* c = S(s)->cap;
  *status = c ? (c->invalid ? 2 : 1) : 0;
  return OK;
}
CUresult cuStreamEndCapture(void* s, void** graph) {
  std::lock_guard<std::mutex> g(g_mu);
  Stream* st = S(s);
  Graph* c = st->cap;
  *graph = nullptr;
  if (!c || c->origin != st) return c ? E_CAPTURE_UNMATCHED : E_ILLEGAL_STATE;
  bool unjoined = false;
  for (Stream* j : c->joined) {
    auto it = st->waited.find(j);
    unjoined |= j->last > 0 && (it == st->waited.end() || it->second < j->last);
  }
  for (Stream* j : c->joined) j->cap = nullptr;
  st->cap = nullptr;
  g_captures.erase(std::find(g_captures.begin(), g_captures.end(), c));
  if (c->invalid) {
    complain("cuStreamEndCapture: the capture was invalidated by " + c->why);
    delete c;
    return E_CAPTURE_INVALIDATED;
  }
  if (unjoined) {
    complain("cuStreamEndCapture: a side stream forked into the capture has work the origin "
             "stream never waited for");
    delete c;
    return E_CAPTURE_UNJOINED;
  }
  *graph = c;
  return OK;
}
CUresult cuGraphInstantiateWithFlags(void** exec, void* graph, unsigned long long) {
  if (!graph) return E_INVALID_VALUE;
  *exec = new Exec{std::make_shared<const std::vector<Op>>(static_cast<Graph*>(graph)->ops)};
  return OK;
}
CUresult cuGraphUpload(void*, void*) { return OK; }
CUresult cuGraphLaunch(void* exec, void* s) {
  std::shared_ptr<const std::vector<Op>> ops = static_cast<Exec*>(exec)->ops;
  return enqueue(s, [ops]() {
    for (auto& op : *ops) {
      if (CUresult r = op(); r != OK) return r;
    }
    return OK;
  });
}
CUresult cuGraphExecDestroy(void* exec) {
  delete static_cast<Exec*>(exec);
  return OK;
}
CUresult cuGraphDestroy(void* graph) {
  delete static_cast<Graph*>(graph);
  return OK;
}
CUresult cuLaunchHostFunc(void* s, void (*fn)(void*), void* data) {
  return enqueue(s, [=]() {
    fn(data);
    return OK;
  });
}

// ---- modules and launches -------------------------------------------------------------------
CUresult cuModuleLoadData(void** m, const void*) {
  *m = new Module();
  return OK;
}
CUresult cuModuleUnload(void* m) {
  delete static_cast<Module*>(m);
  return OK;
}
CUresult cuModuleGetFunction(void** f, void*, const char* name) {
  auto it = registry().find(name);
  if (it == registry().end()) {
    complain(std::string("no simulated kernel named ") + name);
    return E_NOT_FOUND;
  }
  *f = new Func{&it->second};
  return OK;
}
CUresult cuFuncGetAttribute(int* v, int attrib, void*) {
  switch (attrib) {
    case 0:  // max threads per block
      *v = 1024;
      break;
    case 4:  // registers
      *v = 32;
      break;
    default:
      *v = 0;
  }
  return OK;
}
CUresult cuFuncSetAttribute(void*, int, int) { return OK; }
CUresult cuFuncSetCacheConfig(void*, int) { return OK; }
CUresult cuOccupancyMaxActiveBlocksPerMultiprocessor(int* n, void*, int block, size_t) {
  *n = std::max(1, 2048 / std::max(1, block));
  return OK;
}
CUresult cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* n, void* f, int block,
                                                             size_t smem, unsigned) {
  return cuOccupancyMaxActiveBlocksPerMultiprocessor(n, f, block, smem);
}
CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                        unsigned bz, unsigned smem, void* s, void** params, void** extra) {
  const Kernel* k = static_cast<Func*>(f)->k;
  if (extra || smem) {
    complain("cuLaunchKernel of " + k->name + ": dynamic shared memory / extra not simulated");
    return E_NOT_SUPPORTED;
  }
  if (!gx || !gy || !gz || !bx || !by || !bz || (size_t)bx * by * bz > 1024 || gy > 65535 ||
      gz > 65535) {
    char msg[256];
    snprintf(msg, sizeof msg, "cuLaunchKernel of %s: invalid launch (%u,%u,%u) x (%u,%u,%u)",
             k->name.c_str(), gx, gy, gz, bx, by, bz);
    complain(msg);
    return E_INVALID_VALUE;
  }
  SimCall c = k->bind(params);
  const SimDim3 grid{gx, gy, gz}, block{bx, by, bz};
  return enqueue(s, [k, grid, block, c]() {
    return profiled(k->name, [&] { return run_kernel(k, grid, block, c); });
  });
}
CUresult cuLaunchCooperativeKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                                   unsigned by, unsigned bz, unsigned smem, void* s,
                                   void** params) {
  return cuLaunchKernel(f, gx, gy, gz, bx, by, bz, smem, s, params, nullptr);
}

// ---- cuBLAS (libcublas.so is a link to this library) ----------------------------------------
int cublasCreate_v2(void** h) {
  *h = new Blas();
  return 0;
}
int cublasDestroy_v2(void* h) {
  delete static_cast<Blas*>(h);
  return 0;
}
int cublasSetStream_v2(void* h, void* s) {
  static_cast<Blas*>(h)->stream = s;
  return 0;
}
int cublasGetStream_v2(void* h, void** s) {
  *s = static_cast<Blas*>(h)->stream;
  return 0;
}
int cublasSetMathMode(void*, int) { return 0; }
int cublasSetWorkspace_v2(void*, void*, size_t) { return 0; }
int cublasGetVersion_v2(void*, int* v) {
  *v = 130000;
  return 0;
}
// transa/transb: 0 N, 1 T. Types: 0 f32, 14 bf16. Compute: f32 (alpha, beta are host floats).
int cublasGemmEx(void* h, int ta, int tb, int m, int n, int k, const void* alpha, const void* a,
                 int at, int lda, const void* b, int bt, int ldb, const void* beta, void* c, int ct,
                 int ldc, int, int) {
  if (!blas_type_ok(at) || !blas_type_ok(bt) || !blas_type_ok(ct) || ta > 1 || tb > 1) {
    complain("cublasGemmEx: only N/T and f32/bf16 are simulated");
    return 15;  // CUBLAS_STATUS_NOT_SUPPORTED
  }
  if (m < 0 || n < 0 || k < 0) return 7;  // CUBLAS_STATUS_INVALID_VALUE
  const float al = *static_cast<const float*>(alpha), be = *static_cast<const float*>(beta);
  const CUresult r = enqueue(static_cast<Blas*>(h)->stream, [=]() {
    for (const void* p : {a, b, (const void*)c}) {
      const std::string bad = check_ptr(p);
      if (!bad.empty()) {
        complain("cublasGemmEx: an operand " + bad);
        g_sticky = E_LAUNCH_FAILED;
        return E_LAUNCH_FAILED;
      }
    }
    return profiled("cublasGemmEx", [&] {
      gemm(ta, tb, m, n, k, al, a, at, lda, b, bt, ldb, be, c, ct, ldc);
      return OK;
    });
  });
  return r == OK ? 0 : 13;  // CUBLAS_STATUS_EXECUTION_FAILED
}
int cublasGemmStridedBatchedEx(void* h, int ta, int tb, int m, int n, int k, const void* alpha,
                               const void* a, int at, int lda, long long sa, const void* b, int bt,
                               int ldb, long long sb, const void* beta, void* c, int ct, int ldc,
                               long long sc, int batch, int compute, int algo) {
  const size_t ea = at == 0 ? 4 : 2, eb = bt == 0 ? 4 : 2, ec = ct == 0 ? 4 : 2;
  for (int i = 0; i < batch; ++i) {
    const int r = cublasGemmEx(h, ta, tb, m, n, k, alpha, (const char*)a + i * sa * ea, at, lda,
                               (const char*)b + i * sb * eb, bt, ldb, beta,
                               (char*)c + i * sc * ec, ct, ldc, compute, algo);
    if (r) return r;
  }
  return 0;
}
int cublasSgemm_v2(void* h, int ta, int tb, int m, int n, int k, const float* alpha,
                   const float* a, int lda, const float* b, int ldb, const float* beta, float* c,
                   int ldc) {
  return cublasGemmEx(h, ta, tb, m, n, k, alpha, a, 0, lda, b, 0, ldb, beta, c, 0, ldc, 68, -1);
}

}  // extern "C"
