// Scheduler of the CUDA emulator (see ck_cuda_emu.h): the threads of a block are
// fibers on the calling OS thread, run round-robin (x86-64: the 20-instruction stack
// switch below, 3x faster than ucontext's swapcontext, which makes a signal-mask system
// call per switch).  A fiber gives up the CPU only at a barrier (__syncthreads or a
// warp collective), so a barrier costs about one switch per thread.  CK_EMU_SCHEDULE
// (read per launch) sets the order of the blocks and of the threads between barriers:
// "forward" (the default), "reverse" or "shuffle[:seed]" (a fresh permutation per
// barrier interval).  A kernel whose result depends on that order has a race: a thread
// reads or writes what another writes in the same barrier interval (or a block what
// another block writes); tests/test_cuda_emulator.py runs the kernels under each.  Errors (a divergent barrier, a collective missing lanes, a bad
// launch configuration) stop the launch; cudaGetLastError then returns
// cudaErrorLaunchFailure / cudaErrorInvalidConfiguration and cudaGetErrorString the
// emulator's description.
#include <sys/mman.h>
#include <ucontext.h>

#include <cstdlib>
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "ck_cuda_emu.h"

namespace ck_emu {

thread_local Thread* g_thread = nullptr;
thread_local Block* g_block = nullptr;

namespace {

constexpr size_t kStackBytes = 256 * 1024;

#if defined(__x86_64__) && !defined(CK_EMU_UCONTEXT)
// Save the callee-saved registers, MXCSR and the x87 control word on the current stack,
// store the stack pointer to *from, load `to`, restore the same from there, return.
extern "C" void ck_emu_switch(void** from, void* to);
asm(R"(
  .text
  .p2align 4
  .type ck_emu_switch,@function
ck_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size ck_emu_switch,.-ck_emu_switch
)");

struct Context {
  void* sp = nullptr;
};
// A fresh context on [stack, stack + bytes) whose first switch-in calls entry().
void make_context(Context& c, void* stack, size_t bytes, void (*entry)()) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + bytes) & ~static_cast<uintptr_t>(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top - 72);  // entry sees rsp = 8 (mod 16), as after a call
  uint32_t csr[2];
  asm volatile("stmxcsr %0" : "=m"(csr[0]));
  asm volatile("fnstcw %0" : "=m"(csr[1]));
  std::memcpy(&sp[0], csr, 8);
  for (int i = 1; i <= 6; ++i) sp[i] = 0;  // r15 r14 r13 r12 rbx rbp
  sp[7] = reinterpret_cast<uint64_t>(entry);
  sp[8] = 0;  // entry never returns
  c.sp = sp;
}
void switch_context(Context& from, Context& to) { ck_emu_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};
void make_context(Context& c, void* stack, size_t bytes, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

struct WarpState {
  int lanes = 0;                   // lanes of this warp in the block
  int exited = 0;                  // lanes that returned
  int arrived[2] = {0, 0};         // per parity of the collective index
  uint64_t completed = 0;          // collectives completed by the whole warp
  const char* kind[2] = {nullptr, nullptr};
  unsigned char slots[2][32][kSlot];
};

// AddressSanitizer builds (csrc/cuda/emu/memcheck.sh): tell it about every stack switch,
// so that out-of-bounds accesses of the kernels are reported and the fibers' stacks are
// not mistaken for overflows.
#if defined(__SANITIZE_ADDRESS__)
void asan_start(void** fake, const void* bottom, size_t size) { __sanitizer_start_switch_fiber(fake, bottom, size); }
void asan_finish(void* fake, const void** bottom, size_t* size) { __sanitizer_finish_switch_fiber(fake, bottom, size); }
// A reused fiber stack still carries the redzones of its previous fiber's frames.
void asan_fresh_stack(void* stack, size_t bytes) { __asan_unpoison_memory_region(stack, bytes); }
#else
void asan_fresh_stack(void*, size_t) {}
void asan_start(void**, const void*, size_t) {}
void asan_finish(void*, const void**, size_t*) {}
#endif

struct CpAsync {
  void* dst;
  const void* src;
};

struct Fiber {
  Context ctx;
  void* asan_fake = nullptr;
  void* stack = nullptr;
  Thread thread;
  bool done = false;
  bool waiting = false;  // at a barrier
  std::vector<CpAsync> open;                  // issued, not yet committed
  std::vector<std::vector<CpAsync>> groups;   // committed, oldest first
  bool cp_unfenced = false;  // cp.async data landed since this thread's last fence.proxy.async
  std::vector<uint32_t> st_unfenced;  // window bytes this thread stored (st.shared) since its last fence
  std::vector<WgmmaOp> wg_open;                 // wgmma issued, not yet committed
  std::vector<std::vector<WgmmaOp>> wg_groups;  // committed, oldest first
  bool wg_fenced = false;  // wgmma.fence since this thread's last wait_group (or start)
  size_t wg_seq = 0;       // wgmma operations this thread has issued
};

// One wgmma of a warpgroup, as its first thread issued it (the others must match).
struct WgmmaIssue {
  int n;
  uint64_t desc_a, desc_b;
  bool accumulate;
  int kind;
  bool trans_b;
  bool operator==(const WgmmaIssue& o) const {
    return n == o.n && desc_a == o.desc_a && desc_b == o.desc_b && accumulate == o.accumulate && kind == o.kind &&
           trans_b == o.trans_b;
  }
};

struct BlockRun {
  Block block;
  std::vector<Fiber>* fibers = nullptr;
  std::vector<WarpState> warps;
  int nthreads = 0;
  int exited = 0;
  int bar_arrived = 0;
  uint64_t bar_gen = 0;
  uint64_t progress = 0;  // arrivals and exits: a scheduler sweep without any is a deadlock
  bool failed = false;
  std::string error;
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  Context sched;
  void* asan_fake = nullptr;
  const void* sched_bottom = nullptr;  // the scheduler's stack (AddressSanitizer annotations)
  size_t sched_size = 0;
  std::vector<std::vector<WgmmaIssue>> wg_log;  // per warpgroup, every wgmma in issue order
};

thread_local BlockRun* g_run = nullptr;
thread_local Fiber* g_fiber = nullptr;
thread_local cudaError_t g_last_error = cudaSuccess;
thread_local std::string g_last_message;
thread_local std::vector<void*> g_stacks;  // reused across launches
// Emulated shared window (smem_addr): 256 KB of host addresses from a 64 KB-aligned base,
// fixed at a launch's first smem_addr (0: none yet).
thread_local uintptr_t g_window = 0;
// Per byte of the window: 1 + the thread that stored it through the generic proxy (smem_store)
// and has not yet made it visible to the async proxy (fence_proxy_async); 0 elsewhere.  A wgmma
// reading a marked byte is an error (wgmma_execute, through smem_view).  Allocated at the first
// smem_store.
thread_local std::vector<uint16_t> g_st_writer;
thread_local bool g_st_dirty = false;  // marks may be set: cleared at the next block's start

void* stack_at(size_t i) {
  while (g_stacks.size() <= i) {
    void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      std::fprintf(stderr, "ck_cuda_emu: cannot map a fiber stack\n");
      std::abort();
    }
    g_stacks.push_back(p);
  }
  return g_stacks[i];
}

// Back to the scheduler; returns when the scheduler resumes this fiber.
void yield() {
  Fiber* f = g_fiber;
  asan_start(&f->asan_fake, g_run->sched_bottom, g_run->sched_size);
  switch_context(f->ctx, g_run->sched);
  asan_finish(f->asan_fake, nullptr, nullptr);
}

void flush_cp_async(Fiber& f, size_t keep_pending) {
  while (f.groups.size() > keep_pending) {
    if (!f.groups.front().empty()) f.cp_unfenced = true;
    for (const CpAsync& c : f.groups.front()) std::memcpy(c.dst, c.src, 16);
    f.groups.erase(f.groups.begin());
  }
}

void fiber_entry() {
  asan_finish(nullptr, &g_run->sched_bottom, &g_run->sched_size);
  Fiber* f = g_fiber;
  g_run->body(g_run->ctx);
  // a thread that exits completes its outstanding copies (they are in flight on a GPU)
  f->groups.push_back(std::move(f->open));
  flush_cp_async(*f, 0);
  if ((!f->wg_open.empty() || !f->wg_groups.empty()) && !g_run->failed) {
    g_run->failed = true;
    g_run->error = "a thread returned with wgmma operations it did not wait for (wgmma.wait_group)";
  }
  f->done = true;
  ++g_run->exited;
  ++g_run->progress;
  if (g_run->bar_arrived > 0 && !g_run->failed) {
    g_run->failed = true;
    g_run->error = "a thread returned while others of its block wait at __syncthreads";
  }
  WarpState& w = g_run->warps[f->thread.warp];
  ++w.exited;
  if ((w.arrived[0] > 0 || w.arrived[1] > 0) && !g_run->failed) {
    g_run->failed = true;
    g_run->error = "a lane returned while others of its warp wait at a warp collective";
  }
  asan_start(nullptr, g_run->sched_bottom, g_run->sched_size);  // this fiber ends
  switch_context(f->ctx, g_run->sched);  // never resumed
  std::abort();
}

void stop(const std::string& what) {
  if (!g_run->failed) {
    g_run->failed = true;
    g_run->error = what;
  }
  for (;;) yield();  // the scheduler abandons the block
}

}  // namespace

[[noreturn]] void fail(const std::string& what) {
  if (g_run == nullptr) {
    std::fprintf(stderr, "ck_cuda_emu: %s\n", what.c_str());
    std::abort();
  }
  stop(what);
  std::abort();
}

void syncthreads() {
  BlockRun& r = *g_run;
  if (r.exited > 0) fail("__syncthreads reached after a thread of the block returned (divergent barrier)");
  const uint64_t gen = r.bar_gen;
  ++r.progress;
  if (++r.bar_arrived == r.nthreads) {
    r.bar_arrived = 0;
    ++r.bar_gen;
    return;
  }
  g_fiber->waiting = true;
  while (r.bar_gen == gen) yield();
  g_fiber->waiting = false;
}

const unsigned char* warp_exchange(const void* mine, size_t bytes, const char* kind) {
  BlockRun& r = *g_run;
  Thread& t = g_fiber->thread;
  WarpState& w = r.warps[t.warp];
  if (w.lanes != 32) fail(std::string(kind) + " in a warp of " + std::to_string(w.lanes) + " threads");
  if (w.exited > 0) fail(std::string(kind) + " reached after a lane of the warp returned");
  const int p = static_cast<int>(t.collectives & 1);
  if (w.arrived[p] == 0) {
    w.kind[p] = kind;
  } else if (w.kind[p] != kind && std::strcmp(w.kind[p], kind) != 0) {  // (one literal: one pointer, mostly)
    fail(std::string("lanes of warp ") + std::to_string(t.warp) + " called different warp collectives (" + w.kind[p] +
         ", " + kind + ")");
  }
  std::memcpy(w.slots[p][t.lane], mine, bytes);
  ++r.progress;
  if (++w.arrived[p] == w.lanes) {
    w.arrived[p] = 0;
    ++w.completed;
  } else {
    g_fiber->waiting = true;
    while (w.completed <= t.collectives) {
      if (w.exited > 0) fail(std::string(kind) + " reached after a lane of the warp returned");
      yield();
    }
    g_fiber->waiting = false;
  }
  ++t.collectives;
  return &w.slots[p][0][0];
}

void cp_async16(void* smem, const void* gmem) {
  // cp.async.cg 16 bytes: both addresses 16-byte aligned (a misaligned one faults on a GPU)
  if ((reinterpret_cast<uintptr_t>(smem) | reinterpret_cast<uintptr_t>(gmem)) & 15u)
    fail("cp.async: a 16-byte copy from or to an address that is not 16-byte aligned");
  g_fiber->open.push_back(CpAsync{smem, gmem});
}
void cp_async_commit() { g_fiber->groups.push_back(std::move(g_fiber->open)); g_fiber->open.clear(); }
void cp_async_wait(int pending) { flush_cp_async(*g_fiber, static_cast<size_t>(pending < 0 ? 0 : pending)); }

uint32_t smem_addr(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (g_window == 0) g_window = (a & ~static_cast<uintptr_t>(0xffff)) - (a >= 0x10000 ? 0x10000 : 0);
  if (a < g_window || a - g_window >= kSmemWindow)
    fail("smem_addr: shared memory beyond the emulated 256 KB window of this launch");
  return static_cast<uint32_t>(a - g_window);
}
SmemView smem_view() {
  if (g_window == 0) fail("wgmma: a descriptor built without smem_addr");
  return SmemView{g_window, g_st_writer.empty() ? nullptr : g_st_writer.data()};
}
void fail_unfenced_read(uint32_t addr, uint16_t writer) {
  fail("wgmma reads shared memory (byte " + std::to_string(addr) + " of the window) that thread " +
       std::to_string(writer - 1) + " stored (st.shared) without a fence.proxy.async since");
}

void wgmma_fence() { g_fiber->wg_fenced = true; }
uint16_t st_writer_id() { return static_cast<uint16_t>(g_fiber - g_run->fibers->data() + 1); }
void smem_store(const void* p, size_t bytes) {
  const uint32_t o = smem_addr(p);  // (fixes the window)
  if (o + bytes > kSmemWindow) fail("smem_store: shared memory beyond the emulated 256 KB window of this launch");
  if (g_st_writer.empty()) g_st_writer.assign(kSmemWindow, 0);
  const uint16_t me = st_writer_id();
  for (uint32_t i = o; i < o + bytes; ++i)
    if (g_st_writer[i] != me) {
      g_st_writer[i] = me;
      g_fiber->st_unfenced.push_back(i);
    }
  g_st_dirty = true;
}
void fence_proxy_async() {
  Fiber& f = *g_fiber;
  f.cp_unfenced = false;
  const uint16_t me = st_writer_id();
  for (uint32_t i : f.st_unfenced)
    if (g_st_writer[i] == me) g_st_writer[i] = 0;  // (a later store by another thread keeps its mark)
  f.st_unfenced.clear();
}

void wgmma_issue(float* d, int n, uint64_t desc_a, uint64_t desc_b, bool accumulate, int kind, bool trans_b) {
  BlockRun& r = *g_run;
  Fiber& f = *g_fiber;
  if (r.nthreads % 128 != 0) fail("wgmma in a block of " + std::to_string(r.nthreads) + " threads (not whole warpgroups)");
  if (n < 8 || n > 256 || n % 8 != 0) fail("wgmma: N = " + std::to_string(n) + " (8 .. 256, a multiple of 8)");
  if (!f.wg_fenced) fail("wgmma.mma_async without a wgmma.fence after the thread's last wgmma.wait_group");
  for (const Fiber& o : *r.fibers)
    if (o.cp_unfenced)
      fail("wgmma reads shared memory while cp.async data landed without fence.proxy.async (thread " +
           std::to_string(&o - r.fibers->data()) + ")");
  wgmma_check_desc(desc_a, "a");
  wgmma_check_desc(desc_b, "b");
  if (trans_b && (desc_b >> 62) != 1)
    fail("wgmma: a transposed (N-major) B in swizzle mode " + std::to_string(desc_b >> 62) +
         " (only the 128-byte swizzle's is emulated)");
  const WgmmaIssue mine{n, desc_a, desc_b, accumulate, kind, trans_b};
  // the lanes of the warp (a warp collective: .sync.aligned), then the warps of the warpgroup
  const unsigned char* slots = warp_exchange(&mine, sizeof(mine), "wgmma.mma_async");
  for (int l = 0; l < 32; ++l) {
    WgmmaIssue other;
    std::memcpy(&other, slots + l * kSlot, sizeof(other));
    if (!(other == mine))
      fail("wgmma: lanes of warp " + std::to_string(f.thread.warp) + " issued different operands");
  }
  const size_t wg = static_cast<size_t>(f.thread.warp / 4);
  if (r.wg_log.size() <= wg) r.wg_log.resize(wg + 1);
  std::vector<WgmmaIssue>& log = r.wg_log[wg];
  if (log.size() <= f.wg_seq) {
    log.push_back(mine);
  } else if (!(log[f.wg_seq] == mine)) {
    fail("wgmma: warps of warpgroup " + std::to_string(wg) + " issued different operands");
  }
  ++f.wg_seq;
  f.wg_open.push_back(WgmmaOp{d, n, desc_a, desc_b, accumulate, kind, trans_b});
}
void wgmma_commit() {
  g_fiber->wg_groups.push_back(std::move(g_fiber->wg_open));
  g_fiber->wg_open.clear();
}
void wgmma_wait(int pending) {
  Fiber& f = *g_fiber;
  const size_t keep = static_cast<size_t>(pending < 0 ? 0 : pending);
  while (f.wg_groups.size() > keep) {
    for (const WgmmaOp& op : f.wg_groups.front()) wgmma_execute(op, f.thread.warp % 4, f.thread.lane);
    f.wg_groups.erase(f.wg_groups.begin());
  }
  f.wg_fenced = false;
}

cudaError_t take_last_error() {
  const cudaError_t e = g_last_error;
  g_last_error = cudaSuccess;
  return e;
}

const char* error_string(cudaError_t err) {
  if (err == cudaSuccess) return "no error";
  return g_last_message.c_str();
}

static void set_error(cudaError_t e, const std::string& what) {
  g_last_error = e;
  g_last_message = "CUDA emulator: " + what;
}

// The order in which blocks run and fibers are swept (CK_EMU_SCHEDULE, see the top).
struct Schedule {
  enum Kind { kForward, kReverse, kShuffle } kind = kForward;
  uint64_t state = 0x9E3779B97F4A7C15ull;
  bool bad = false;

  static Schedule from_env() {
    Schedule s;
    const char* v = std::getenv("CK_EMU_SCHEDULE");
    if (v == nullptr || *v == '\0' || std::strcmp(v, "forward") == 0) return s;
    if (std::strcmp(v, "reverse") == 0) {
      s.kind = kReverse;
    } else if (std::strncmp(v, "shuffle", 7) == 0 && (v[7] == '\0' || v[7] == ':')) {
      s.kind = kShuffle;
      if (v[7] == ':') {
        char* end = nullptr;
        const unsigned long long seed = std::strtoull(v + 8, &end, 10);
        if (end == v + 8 || *end != '\0') s.bad = true;
        s.state ^= seed * 0xBF58476D1CE4E5B9ull;
      }
      if (s.state == 0) s.state = 1;
    } else {
      s.bad = true;
    }
    return s;
  }
  uint64_t next() {  // xorshift64*
    state ^= state >> 12;
    state ^= state << 25;
    state ^= state >> 27;
    return state * 0x2545F4914F6CDD1Dull;
  }
  // A new visiting order of n items (drawn only when shuffling); at(order, k, n) is its k-th.
  void draw(std::vector<uint64_t>& order, uint64_t n) {
    if (kind != kShuffle) return;
    order.resize(n);
    for (uint64_t i = 0; i < n; ++i) order[i] = i;
    for (uint64_t i = n; i > 1; --i) std::swap(order[i - 1], order[next() % i]);
  }
  uint64_t at(const std::vector<uint64_t>& order, uint64_t k, uint64_t n) const {
    return kind == kForward ? k : kind == kReverse ? n - 1 - k : order[k];
  }
};

void run_grid(dim3 grid, dim3 block, void (*body)(void*), void* ctx) {
  const uint64_t nthreads = static_cast<uint64_t>(block.x) * block.y * block.z;
  if (nthreads == 0 || nthreads > 1024 || block.z > 64) {
    set_error(cudaErrorInvalidConfiguration, "invalid block size");
    return;
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) {
    set_error(cudaErrorInvalidConfiguration, "invalid grid (" + std::to_string(grid.x) + ", " +
                                                 std::to_string(grid.y) + ", " + std::to_string(grid.z) + ")");
    return;
  }
  Schedule schedule = Schedule::from_env();
  if (schedule.bad) {
    set_error(cudaErrorInvalidConfiguration,
              "CK_EMU_SCHEDULE must be forward, reverse, shuffle or shuffle:<seed>, not '" +
                  std::string(std::getenv("CK_EMU_SCHEDULE")) + "'");
    return;
  }
  const uint64_t nblocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  std::vector<uint64_t> block_order, fiber_order;
  schedule.draw(block_order, nblocks);
  BlockRun* outer_run = g_run;
  Fiber* outer_fiber = g_fiber;
  Thread* outer_thread = g_thread;
  Block* outer_block = g_block;
  std::vector<Fiber> fibers(nthreads);
  BlockRun r;
  r.fibers = &fibers;
  r.nthreads = static_cast<int>(nthreads);
  r.body = body;
  r.ctx = ctx;
  r.block.dim = block;
  r.block.grid = grid;
  g_run = &r;
  g_block = &r.block;
  g_window = 0;
  for (uint64_t b = 0; b < nblocks && !r.failed; ++b) {
    const uint64_t flat = schedule.at(block_order, b, nblocks);
    const unsigned bx = static_cast<unsigned>(flat % grid.x);
    const unsigned by = static_cast<unsigned>((flat / grid.x) % grid.y);
    const unsigned bz = static_cast<unsigned>(flat / (static_cast<uint64_t>(grid.x) * grid.y));
    r.block.idx = uint3{bx, by, bz};
    r.exited = 0;
    r.bar_arrived = 0;
    r.warps.assign((nthreads + 31) / 32, WarpState());
    r.wg_log.clear();
    if (g_st_dirty) {  // the last block's marks (its threads are gone)
      std::fill(g_st_writer.begin(), g_st_writer.end(), uint16_t{0});
      g_st_dirty = false;
    }
    for (uint64_t i = 0; i < nthreads; ++i) {
      Fiber& f = fibers[i];
      f.done = false;
      f.waiting = false;
      f.open.clear();
      f.groups.clear();
      f.cp_unfenced = false;
      f.st_unfenced.clear();
      f.wg_open.clear();
      f.wg_groups.clear();
      f.wg_fenced = false;
      f.wg_seq = 0;
      f.thread = Thread();
      f.thread.idx = uint3{static_cast<unsigned>(i % block.x), static_cast<unsigned>((i / block.x) % block.y),
                           static_cast<unsigned>(i / (static_cast<uint64_t>(block.x) * block.y))};
      f.thread.lane = static_cast<int>(i & 31);
      f.thread.warp = static_cast<int>(i >> 5);
      ++r.warps[i >> 5].lanes;
      f.stack = stack_at(i);
      asan_fresh_stack(f.stack, kStackBytes);
      make_context(f.ctx, f.stack, kStackBytes, fiber_entry);
    }
    int live = r.nthreads;
    while (live > 0 && !r.failed) {
      const uint64_t before = r.progress;
      live = 0;
      schedule.draw(fiber_order, nthreads);
      for (uint64_t k = 0; k < nthreads; ++k) {
        Fiber& f = fibers[schedule.at(fiber_order, k, nthreads)];
        if (f.done) continue;
        g_fiber = &f;
        g_thread = &f.thread;
        asan_start(&r.asan_fake, f.stack, kStackBytes);
        switch_context(r.sched, f.ctx);
        asan_finish(r.asan_fake, nullptr, nullptr);
        if (r.failed) break;
        if (!f.done) ++live;
      }
      if (live > 0 && !r.failed && r.progress == before) {
        r.failed = true;
        r.error = "deadlock: the threads of block (" + std::to_string(bx) + ", " + std::to_string(by) +
                  ") wait at different barriers";
      }
    }
  }
  g_run = outer_run;
  g_fiber = outer_fiber;
  g_thread = outer_thread;
  g_block = outer_block;
  if (r.failed) set_error(cudaErrorLaunchFailure, r.error);
}

}  // namespace ck_emu
