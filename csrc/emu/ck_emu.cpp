// The CUDA emulator's scheduler and PTX semantics (see ck_emu.h).
#include "ck_emu.h"

#include <cstdlib>
#include <utility>

#include "cuda_bf16.h"
#include "cuda_fp16.h"

namespace ck {
namespace cuda {
alignas(128) unsigned char smem[ck_emu::kSmemOptin];
}  // namespace cuda
}  // namespace ck

#ifdef CK_EMU_FAST_SWITCH
// ck_emu_switch(save, to): pushes the callee-saved registers, MXCSR and the x87 control word on
// the current stack, stores its pointer in *save, and pops the same from `to`'s stack.
extern "C" void ck_emu_switch(void** save, void* to);
asm(R"(
.text
.globl ck_emu_switch
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
.size ck_emu_switch, .-ck_emu_switch
.section .note.GNU-stack,"",@progbits
.text
)");
#endif

namespace ck_emu {

namespace {
void switch_to(Context& save, Context& to) {
#ifdef CK_EMU_FAST_SWITCH
  ck_emu_switch(&save.sp, to.sp);
#else
  swapcontext(&save.uc, &to.uc);
#endif
}
}  // namespace

State& state() {
  static State s;
  return s;
}

std::string who() {
  State& s = state();
  std::ostringstream o;
  if (s.block != nullptr) {
    o << "block (" << s.block->bidx.x << "," << s.block->bidx.y << "," << s.block->bidx.z << ")";
    if (s.fiber != nullptr) o << " thread " << s.fiber->linear;
  }
  return o.str();
}

void fail(const std::string& what) {
  // thrown inside a fiber: caught by its entry, which records it and ends the block's run
  throw std::runtime_error("CUDA emulator: " + what + " (" + who() + ")");
}

void yield_to_scheduler() {
  State& s = state();
  Fiber& f = *s.fiber;
  switch_to(f.ctx, s.scheduler);
  // resumed by the scheduler; a recorded error elsewhere in the block ends this fiber too
  if (!s.block->error.empty()) throw std::runtime_error("");
}

namespace {

uint64_t splitmix64(uint64_t& x) {
  uint64_t z = (x += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// the order in which the block's threads run this round (forward and reverse: set once per block)
void schedule_round(Block& b) {
  if (state().schedule == Schedule::kShuffle)
    for (int t = b.nthreads - 1; t > 0; --t) std::swap(b.order[t], b.order[splitmix64(b.rng) % (t + 1)]);
}

void land(const PendingCopy& c) { std::memcpy(c.dst, c.bytes, 16); }

void release_block_barrier(Block& b) {
  b.bar_arrived = 0;
  ++b.bar_gen;
}

void thread_exited(Block& b, Fiber& f) {
  f.state = Fiber::kDone;
  --b.alive;
  Warp& w = b.warps[f.linear >> 5];
  --w.alive;
  if (w.arrived > 0 && b.error.empty())
    b.error = "CUDA emulator: a lane returned while others of its warp wait at " + std::string(w.kind) + " (" +
              who() + ")";
  if (!f.pending.empty() && b.error.empty())
    b.error = "CUDA emulator: a thread returned with cp.async copies it never waited for (" + who() + ")";
  f.pending.clear();
  if (b.bar_arrived > 0 && b.bar_arrived == b.alive) release_block_barrier(b);  // exited threads count
}

void fiber_entry() {
  State& s = state();
  Block& b = *s.block;
  try {
    if (b.error.empty()) b.body(b.args);  // a fiber first resumed to unwind never runs the kernel
  } catch (const std::exception& e) {
    if (b.error.empty() && e.what()[0] != '\0') b.error = e.what();
  } catch (...) {
    if (b.error.empty()) b.error = "CUDA emulator: unknown exception (" + who() + ")";
  }
  thread_exited(b, *s.fiber);
#ifdef CK_EMU_FAST_SWITCH
  Context dead;
  switch_to(dead, s.scheduler);  // never resumed
  __builtin_unreachable();
#endif
  // (ucontext: returns to uc_link, the scheduler)
}

#ifdef CK_EMU_FAST_SWITCH
// the first switch to a fiber "returns" into this, with the stack 16-byte aligned as after a call
extern "C" void ck_emu_fiber_start() { fiber_entry(); }

void make_context(Context& c, char* stack, size_t bytes) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t(15);
  auto* sp = reinterpret_cast<uint64_t*>(top);
  *--sp = 0;                                                      // fake return address of the start
  *--sp = reinterpret_cast<uint64_t>(&ck_emu_fiber_start);        // popped by ret
  for (int i = 0; i < 6; ++i) *--sp = 0;                          // rbp rbx r12 r13 r14 r15
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  --sp;
  std::memcpy(reinterpret_cast<char*>(sp), &mxcsr, 4);
  std::memcpy(reinterpret_cast<char*>(sp) + 4, &fpucw, 2);
  c.sp = sp;
}
#else
void make_context(Context& c, char* stack, size_t bytes) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = &state().scheduler.uc;
  makecontext(&c.uc, &fiber_entry, 0);
}
#endif

bool can_run(const Block& b, const Fiber& f) {
  switch (f.state) {
    case Fiber::kReady: return true;
    case Fiber::kAtBlockBarrier: return b.bar_gen != f.wait_gen;
    case Fiber::kAtWarpCollective: return b.warps[f.linear >> 5].gen != f.wait_gen;
    case Fiber::kDone: return false;
  }
  return false;
}

std::string deadlock_report(const Block& b) {
  std::ostringstream o;
  o << "CUDA emulator: deadlock in block (" << b.bidx.x << "," << b.bidx.y << "," << b.bidx.z << "):";
  int shown = 0;
  for (const Fiber& f : b.fibers) {
    if (f.state == Fiber::kDone) continue;
    if (shown++ == 8) {
      o << " ...";
      break;
    }
    o << " thread " << f.linear << " at " << (f.state == Fiber::kAtBlockBarrier ? "__syncthreads" : f.where) << ";";
  }
  o << " " << b.alive << " of " << b.nthreads << " threads not returned";
  return o.str();
}

void run_block(Block& b) {
  State& s = state();
  b.alive = b.nthreads;
  b.bar_arrived = 0;
  for (Warp& w : b.warps) {
    w.alive = 32;
    w.arrived = 0;
  }
  std::memset(ck::cuda::smem, 0xff, s.smem_bytes);
  const uint64_t linear_block = (static_cast<uint64_t>(b.bidx.z) * b.grid.y + b.bidx.y) * b.grid.x + b.bidx.x;
  b.rng = s.seed ^ (linear_block * 0xd1b54a32d192ed03ull);
  b.order.resize(b.nthreads);
  for (int t = 0; t < b.nthreads; ++t) b.order[t] = s.schedule == Schedule::kReverse ? b.nthreads - 1 - t : t;
  for (int t = 0; t < b.nthreads; ++t) {
    Fiber& f = b.fibers[t];
    f.state = Fiber::kReady;
    f.pending.clear();
    f.linear = t;
    f.tid = uint3{static_cast<unsigned>(t % b.block.x), static_cast<unsigned>((t / b.block.x) % b.block.y),
                  static_cast<unsigned>(t / (b.block.x * b.block.y))};
    make_context(f.ctx, s.stacks.data() + static_cast<size_t>(t) * kStackBytes, kStackBytes);
  }
  while (b.alive > 0 && b.error.empty()) {
    bool progressed = false;
    schedule_round(b);
    for (int t : b.order) {
      Fiber& f = b.fibers[t];
      if (!can_run(b, f)) continue;
      f.state = Fiber::kReady;
      s.fiber = &f;
      switch_to(s.scheduler, f.ctx);
      s.fiber = nullptr;
      progressed = true;
      if (!b.error.empty()) break;
    }
    if (!progressed && b.error.empty()) b.error = deadlock_report(b);
  }
  if (!b.error.empty()) {
    // unwind the fibers still parked (their destructors must run before the stacks are reused)
    for (Fiber& f : b.fibers) {
      if (f.state == Fiber::kDone) continue;
      s.fiber = &f;
      switch_to(s.scheduler, f.ctx);
      s.fiber = nullptr;
    }
  }
}

}  // namespace

void syncthreads() {
  Block& b = block();
  Fiber& f = fiber();
  // (other warps may be inside their own collectives meanwhile; lanes of one warp split between
  // here and a collective never release either, which the scheduler reports as a deadlock)
  if (++b.bar_arrived == b.alive) {
    release_block_barrier(b);
    return;
  }
  f.state = Fiber::kAtBlockBarrier;
  f.wait_gen = b.bar_gen;
  f.where = "__syncthreads";
  yield_to_scheduler();
}

void run(void (*body)(const void*), const void* args, dim3 grid, dim3 block_dim, size_t smem_bytes) {
  State& s = state();
  Block b;
  b.grid = grid;
  b.block = block_dim;
  b.nthreads = static_cast<int>(block_dim.x * block_dim.y * block_dim.z);
  if (b.nthreads % 32 != 0) throw std::runtime_error("CUDA emulator: block size must be a multiple of 32");
  b.fibers.resize(b.nthreads);
  b.warps.resize(b.nthreads / 32);
  b.body = body;
  b.args = args;
  if (s.stacks.size() < static_cast<size_t>(b.nthreads) * kStackBytes)
    s.stacks.resize(static_cast<size_t>(b.nthreads) * kStackBytes);
  s.smem_bytes = smem_bytes;
  const char* schedule = std::getenv("CK_EMU_SCHEDULE");
  const std::string mode = schedule == nullptr ? "shuffle" : schedule;
  if (mode == "shuffle") s.schedule = Schedule::kShuffle;
  else if (mode == "reverse") s.schedule = Schedule::kReverse;
  else if (mode == "forward") s.schedule = Schedule::kForward;
  else throw std::runtime_error("CUDA emulator: CK_EMU_SCHEDULE must be shuffle, reverse or forward, not " + mode);
  const char* seed = std::getenv("CK_EMU_SEED");
  s.seed = seed == nullptr ? 0 : std::strtoull(seed, nullptr, 10);
  s.block = &b;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        b.bidx = uint3{x, y, z};
        run_block(b);
        if (!b.error.empty()) {
          s.block = nullptr;
          throw std::runtime_error(b.error);
        }
      }
  s.block = nullptr;
}

const unsigned char* smem_ptr(const void* p, size_t bytes, const char* what) {
  const auto* c = static_cast<const unsigned char*>(p);
  const unsigned char* base = ck::cuda::smem;
  if (c < base || c + bytes > base + state().smem_bytes)
    fail(std::string(what) + ": address outside the launch's dynamic shared memory");
  if ((reinterpret_cast<uintptr_t>(c) & 15) != 0) fail(std::string(what) + ": address not 16-byte aligned");
  return c;
}

// ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16: lanes 8i..8i+7 give the row addresses
// of matrix i; register i of lane l holds matrix i's row l/4, columns 2(l%4), 2(l%4)+1 (low half
// first), or with .trans its column l/4, rows 2(l%4), 2(l%4)+1.
void ldmatrix(uint32_t* r, int nmat, bool trans, const void* p) {
  const unsigned char* row = smem_ptr(p, 16, "ldmatrix");
  warp_collective(
      "ldmatrix", 0xffffffffu, [&](uint64_t* in) { in[0] = reinterpret_cast<uintptr_t>(row); },
      [nmat, trans](uint64_t (*in)[10], uint64_t (*out)[4]) {
        auto elem = [&](int m, int rr, int cc) {
          uint16_t v;
          std::memcpy(&v, reinterpret_cast<const unsigned char*>(in[8 * m + rr][0]) + 2 * cc, 2);
          return static_cast<uint32_t>(v);
        };
        for (int l = 0; l < 32; ++l)
          for (int m = 0; m < nmat; ++m) {
            const int a = l >> 2, b = 2 * (l & 3);
            const uint32_t lo = trans ? elem(m, b, a) : elem(m, a, b);
            const uint32_t hi = trans ? elem(m, b + 1, a) : elem(m, a, b + 1);
            out[l][m] = lo | (hi << 16);
          }
      },
      [&](const uint64_t* out) {
        for (int m = 0; m < nmat; ++m) r[m] = static_cast<uint32_t>(out[m]);
      });
}

namespace {
float half_bits_to_float(uint16_t v, __half*) { return __half2float(__half{v}); }
float half_bits_to_float(uint16_t v, __nv_bfloat16*) { return __bfloat162float(__nv_bfloat16{v}); }
}  // namespace

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32, lane l, g = l/4, t = l%4:
// A (16x16): a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..];
// B (16x8, k x n): b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g];
// C/D (16x8): d0 = D[g][2t], d1 = D[g][2t+1], d2 = D[g+8][2t], d3 = D[g+8][2t+1].
// (The same layouts as CUTLASS's cute MMA_Traits of SM80_16x8x16: A (4,8),(2,2,2):(32,1),(16,8,128),
// B (4,8),(2,2):(16,1),(8,64), C (4,8),(2,2):(32,1),(16,8), column-major flat coordinates.)
// Products of 16-bit floats are exact in fp32; they are summed in fp32 in k order after c.
template <typename T>
void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  warp_collective(
      "mma.sync", 0xffffffffu,
      [&](uint64_t* in) {
        for (int i = 0; i < 4; ++i) in[i] = a[i];
        in[4] = b0;
        in[5] = b1;
        for (int i = 0; i < 4; ++i) in[6 + i] = to_bits(d[i]);
      },
      [](uint64_t (*in)[10], uint64_t (*out)[4]) {
        float A[16][16], B[16][8], C[16][8];
        auto half = [](uint64_t reg, int hi) {
          return half_bits_to_float(static_cast<uint16_t>(reg >> (16 * hi)), static_cast<T*>(nullptr));
        };
        for (int l = 0; l < 32; ++l) {
          const int g = l >> 2, t = l & 3;
          for (int h = 0; h < 2; ++h) {
            A[g][2 * t + h] = half(in[l][0], h);
            A[g + 8][2 * t + h] = half(in[l][1], h);
            A[g][2 * t + 8 + h] = half(in[l][2], h);
            A[g + 8][2 * t + 8 + h] = half(in[l][3], h);
            B[2 * t + h][g] = half(in[l][4], h);
            B[2 * t + 8 + h][g] = half(in[l][5], h);
          }
          C[g][2 * t] = from_bits<float>(in[l][6]);
          C[g][2 * t + 1] = from_bits<float>(in[l][7]);
          C[g + 8][2 * t] = from_bits<float>(in[l][8]);
          C[g + 8][2 * t + 1] = from_bits<float>(in[l][9]);
        }
        for (int i = 0; i < 16; ++i)
          for (int j = 0; j < 8; ++j) {
            float acc = C[i][j];
            for (int k = 0; k < 16; ++k) acc += A[i][k] * B[k][j];
            C[i][j] = acc;
          }
        for (int l = 0; l < 32; ++l) {
          const int g = l >> 2, t = l & 3;
          out[l][0] = to_bits(C[g][2 * t]);
          out[l][1] = to_bits(C[g][2 * t + 1]);
          out[l][2] = to_bits(C[g + 8][2 * t]);
          out[l][3] = to_bits(C[g + 8][2 * t + 1]);
        }
      },
      [&](const uint64_t* out) {
        for (int i = 0; i < 4; ++i) d[i] = from_bits<float>(out[i]);
      });
}
template void mma_16816<__half>(float (&)[4], const uint32_t (&)[4], uint32_t, uint32_t);
template void mma_16816<__nv_bfloat16>(float (&)[4], const uint32_t (&)[4], uint32_t, uint32_t);

// cp.async.cg.shared.global [dst], [src], 16, src_bytes: src_bytes bytes copied, the rest of the
// 16 zero-filled; both addresses 16-byte aligned. The copy lands in shared memory at once or at the
// thread's next wait, as the schedule says (the hardware may complete it at any time in between).
void cp_async_16(void* dst, const void* src, int src_bytes) {
  auto* d = const_cast<unsigned char*>(smem_ptr(dst, 16, "cp.async (destination)"));
  if (src_bytes < 0 || src_bytes > 16) fail("cp.async: source size outside [0, 16]");
  if (src_bytes > 0 && (reinterpret_cast<uintptr_t>(src) & 15) != 0) fail("cp.async: source not 16-byte aligned");
  PendingCopy c;
  c.dst = d;
  std::memcpy(c.bytes, src, static_cast<size_t>(src_bytes));
  std::memset(c.bytes + src_bytes, 0, static_cast<size_t>(16 - src_bytes));
  const Schedule mode = state().schedule;
  const bool at_wait = mode == Schedule::kReverse || (mode == Schedule::kShuffle && (splitmix64(block().rng) & 1));
  if (at_wait) fiber().pending.push_back(c);
  else land(c);
}

// cp.async.wait_group 0: every copy of this thread has landed
void cp_async_wait_all() {
  for (const PendingCopy& c : fiber().pending) land(c);
  fiber().pending.clear();
}

}  // namespace ck_emu
