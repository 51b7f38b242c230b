// A CPU emulator for the CUDA kernels of csrc/, so that their logic runs in CI (which has no GPU).
//
// tests/cuda_emu/build_emu.py compiles every csrc/*.cu file as C++ with this header included first: a
// kernel launch becomes emu::launch(...), which runs the grid one block at a time and each block's
// threads as cooperative fibers (ucontext) on the calling OS thread. A fiber runs until it reaches
// a barrier (__syncthreads, __syncwarp, a shuffle) or returns; a barrier opens when every thread of
// the block (or warp) that has not returned reaches it. The scheduler always resumes the first ready
// thread, so threads run as far ahead of the later ones as the barriers allow: thread 0 runs to its
// next barrier before thread 1 starts, and warp 0 passes every warp-level barrier it can before
// warp 1 starts. That is a schedule a GPU may legally choose. FASTBERT_EMU_ORDER=reverse makes the
// last thread the first (and the last block of the grid); a thread that reads what another writes
// with no barrier between gets a stale value in one of the two orders, so a missing barrier shows
// up as a wrong result, and so does a block that reads another block's output.
//
// What is emulated: thread / block indices, static and dynamic shared memory (filled with 0xff
// bytes, NaN in every float type, at the start of each block), __syncthreads, __syncwarp,
// full-warp __shfl_xor_sync, __launch_bounds__ (a launch with more threads fails), the launch
// limits of an H100 (grid, block, opt-in shared memory), WMMA 16x16x16 (tests/cuda_emu/include/
// mma.h) and the math intrinsics the kernels use. What is not: timing, memory coalescing, bank
// conflicts, register pressure, the exact rounding of the GPU's fast math, and anything about
// memory ordering between blocks. It checks the kernels' indexing, reductions, masking, dropout
// rule and barriers; a real GPU run (bench/gpu_run.sh) is still what proves them.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// The CUDA execution-space keywords mean nothing on the host.
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Blocks run one at a time, so a function-static array is one block's shared memory.
#define __shared__ static
// The kernels' architecture guards take the sm_90 path.
#define __CUDA_ARCH__ 900

namespace emu {

// An H100 SXM's launch limits and attributes.
constexpr int kSmCount = 132;
constexpr int kMaxThreadsPerBlock = 1024;
constexpr size_t kDefaultSmem = 48 * 1024;
constexpr size_t kMaxSmemOptin = 232448;
constexpr size_t kStackBytes = 256 * 1024;

[[noreturn]] inline void fail(const std::string& what) {
  throw std::runtime_error("cuda_emu: " + what);
}

struct Fiber {
  ucontext_t ctx;
  uint3 tid;
  int linear = 0;
  bool returned = false;  // the kernel body returned (set by the fiber itself)
  enum State { kReady, kBlockWait, kWarpWait, kDone } state = kReady;
};

struct Warp {
  int live = 0, waiting = 0;
  uint64_t slot[32];  // shuffle exchange
};

struct Block {
  dim3 dim, idx, grid;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  ucontext_t sched;
  int cur = -1, live = 0, block_waiting = 0;
  const std::function<void()>* body = nullptr;
  unsigned char* dyn_smem = nullptr;
  std::string error;  // first exception a thread raised
  std::vector<const void*> poisoned;  // static shared arrays filled with NaN bytes in this block
};

inline Block*& current() {
  static thread_local Block* block = nullptr;
  return block;
}

inline Fiber& this_fiber() { return current()->fibers[current()->cur]; }
inline int lane_id() { return this_fiber().linear & 31; }
inline Warp& this_warp() { return current()->warps[this_fiber().linear >> 5]; }

inline void yield() {
  Block& b = *current();
  swapcontext(&b.fibers[b.cur].ctx, &b.sched);
}

inline void release_block_barrier(Block& b) {
  if (b.block_waiting == 0 || b.block_waiting < b.live) return;
  for (Fiber& f : b.fibers)
    if (f.state == Fiber::kBlockWait) f.state = Fiber::kReady;
  b.block_waiting = 0;
}

inline void release_warp_barrier(Block& b, int w) {
  Warp& warp = b.warps[w];
  if (warp.waiting == 0 || warp.waiting < warp.live) return;
  for (int t = w * 32; t < std::min<int>(static_cast<int>(b.fibers.size()), (w + 1) * 32); ++t)
    if (b.fibers[t].state == Fiber::kWarpWait) b.fibers[t].state = Fiber::kReady;
  warp.waiting = 0;
}

inline void syncthreads() {
  Block& b = *current();
  Fiber& f = this_fiber();
  f.state = Fiber::kBlockWait;
  ++b.block_waiting;
  release_block_barrier(b);
  yield();
}

// Every live lane of the warp must arrive (the kernels only use full masks).
inline void syncwarp(unsigned mask = 0xffffffffu) {
  Block& b = *current();
  Fiber& f = this_fiber();
  const int w = f.linear >> 5;
  const int lanes = std::min<int>(32, static_cast<int>(b.fibers.size()) - w * 32);
  const unsigned full = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
  if (mask != full) fail("__syncwarp / shuffle with a partial mask is not emulated");
  f.state = Fiber::kWarpWait;
  ++b.warps[w].waiting;
  release_warp_barrier(b, w);
  yield();
}

template <typename T>
inline T shfl_xor(unsigned mask, T value, int lane_mask) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a 1-8 byte value");
  const int lane = lane_id();
  Warp& w = this_warp();
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  w.slot[lane] = bits;
  syncwarp(mask);
  const int src = lane ^ lane_mask;
  uint64_t got = src < 32 ? w.slot[src] : bits;
  syncwarp(mask);  // nobody overwrites a slot before every lane has read
  T out;
  std::memcpy(&out, &got, sizeof(T));
  return out;
}

inline void fiber_entry() {
  Block& b = *current();
  try {
    (*b.body)();
  } catch (const std::exception& e) {
    if (b.error.empty()) b.error = e.what();
  }
  b.fibers[b.cur].returned = true;
  // returning resumes the scheduler through uc_link
}

// FASTBERT_EMU_ORDER=reverse runs the blocks of a grid, and the threads of each block, from the
// last to the first.
inline bool reverse_order() {
  const char* s = std::getenv("FASTBERT_EMU_ORDER");
  return s != nullptr && std::string(s) == "reverse";
}

// Runs one block to completion.
inline void run_block(Block& b, char* stacks, bool reverse) {
  const int n = static_cast<int>(b.dim.x * b.dim.y * b.dim.z);
  b.fibers.assign(n, Fiber());
  b.warps.assign((n + 31) / 32, Warp());
  b.live = n;
  b.block_waiting = 0;
  b.poisoned.clear();
  for (int t = 0; t < n; ++t) {
    Fiber& f = b.fibers[t];
    f.linear = t;
    f.tid = make_uint3(t % b.dim.x, (t / b.dim.x) % b.dim.y, t / (b.dim.x * b.dim.y));
    b.warps[t >> 5].live++;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = stacks + static_cast<size_t>(t) * kStackBytes;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &b.sched;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  // Greedy: always resume the first ready thread in the order, so the earliest threads (and so
  // warps) run as far ahead of the others as the barriers allow.
  for (;;) {
    int t = -1;
    for (int k = 0; k < n && t < 0; ++k) {
      const int c = reverse ? n - 1 - k : k;
      if (b.fibers[c].state == Fiber::kReady) t = c;
    }
    if (t < 0) {
      if (b.live == 0) break;
      fail("deadlock: threads wait at a barrier that the others never reach");
    }
    {
      Fiber& f = b.fibers[t];
      b.cur = t;
      swapcontext(&b.sched, &f.ctx);
      // back here at a barrier or because the body returned
      if (f.returned) {
        f.state = Fiber::kDone;
        --b.live;
        Warp& w = b.warps[t >> 5];
        --w.live;
        release_warp_barrier(b, t >> 5);
        release_block_barrier(b);
      }
      if (!b.error.empty()) fail(b.error);
    }
  }
  b.cur = -1;
}

struct Config {
  dim3 grid, block;
  size_t smem;
  Config(dim3 g, dim3 b, size_t s = 0, cudaStream_t = nullptr) : grid(g), block(b), smem(s) {}
};

inline cudaError_t& last_error() {
  static cudaError_t err = cudaSuccess;
  return err;
}

inline std::map<const void*, size_t>& smem_optin() {
  static std::map<const void*, size_t> m;
  return m;
}

inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

inline void check_launch_bounds(int max_threads) {
  const Block& b = *current();
  if (static_cast<int>(b.dim.x * b.dim.y * b.dim.z) > max_threads)
    fail("block of " + std::to_string(b.dim.x * b.dim.y * b.dim.z) + " threads exceeds __launch_bounds__(" +
         std::to_string(max_threads) + "): the launch would fail on a GPU");
}

template <typename... KArgs, typename... Args>
void launch(const Config& c, void (*kernel)(KArgs...), Args&&... args) {
  const uint64_t threads = static_cast<uint64_t>(c.block.x) * c.block.y * c.block.z;
  size_t smem_limit = kDefaultSmem;
  auto it = smem_optin().find(reinterpret_cast<const void*>(kernel));
  if (it != smem_optin().end()) smem_limit = std::max(smem_limit, it->second);
  if (threads == 0 || threads > kMaxThreadsPerBlock || c.block.z > 64 || c.grid.x == 0 || c.grid.y == 0 ||
      c.grid.z == 0 || c.grid.y > 65535 || c.grid.z > 65535 || c.smem > smem_limit) {
    last_error() = cudaErrorInvalidConfiguration;
    return;
  }
  std::lock_guard<std::mutex> lock(launch_mutex());
  // Kernel arguments are copied, as a launch does.
  std::tuple<std::decay_t<KArgs>...> params(std::forward<Args>(args)...);
  const std::function<void()> body = [&] { std::apply(kernel, params); };
  std::unique_ptr<char[]> stacks(new char[static_cast<size_t>(threads) * kStackBytes]);  // not zeroed
  const bool reverse = reverse_order();
  std::vector<unsigned char> dyn(std::max<size_t>(c.smem, 1) + 128);
  unsigned char* dyn_aligned = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(dyn.data()) + 127) & ~static_cast<uintptr_t>(127));
  Block b;
  b.dim = c.block;
  b.grid = c.grid;
  b.body = &body;
  b.dyn_smem = dyn_aligned;
  Block* saved = current();
  current() = &b;
  try {
    // Blocks in x-fastest order, or (reverse) from the last block to the first: a block that
    // reads what another block writes in the same launch sees it in one order only.
    const uint64_t blocks = static_cast<uint64_t>(c.grid.x) * c.grid.y * c.grid.z;
    for (uint64_t k = 0; k < blocks; ++k) {
      const uint64_t i = reverse ? blocks - 1 - k : k;
      b.idx = dim3(static_cast<unsigned>(i % c.grid.x), static_cast<unsigned>((i / c.grid.x) % c.grid.y),
                   static_cast<unsigned>(i / (static_cast<uint64_t>(c.grid.x) * c.grid.y)));
      std::memset(dyn_aligned, 0xff, c.smem);
      run_block(b, stacks.get(), reverse);
    }
  } catch (...) {
    current() = saved;
    throw;
  }
  current() = saved;
}

inline unsigned char* dynamic_smem() { return current()->dyn_smem; }

// A static __shared__ array's content is undefined when a block starts: the first thread of the
// block to reach its declaration fills it with 0xff bytes (NaN), the others leave it be (no thread
// can have written it before reaching the declaration itself).
inline void poison_shared_once(void* ptr, size_t bytes) {
  Block& b = *current();
  if (std::find(b.poisoned.begin(), b.poisoned.end(), ptr) != b.poisoned.end()) return;
  std::memset(ptr, 0xff, bytes);
  b.poisoned.push_back(ptr);
}

template <typename T>
inline uint32_t umulhi(T a, T b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * static_cast<uint64_t>(b)) >> 32);
}

}  // namespace emu

// Device math with no host counterpart (the GPU's versions are approximate to a few ulp).
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
// A product rounded on its own, never contracted into a fused multiply-add (the host build has no
// FMA contraction, so every product already is).
inline float __fmul_rn(float a, float b) { return a * b; }

// The kernels' view of the emulated thread.
#define threadIdx (::emu::this_fiber().tid)
#define blockIdx (::emu::current()->idx)
#define blockDim (::emu::current()->dim)
#define gridDim (::emu::current()->grid)
#define __syncthreads() ::emu::syncthreads()
#define __syncwarp(...) ::emu::syncwarp(__VA_ARGS__)
#define __shfl_xor_sync(mask, value, lane_mask) ::emu::shfl_xor((mask), (value), (lane_mask))
#define __umulhi(a, b) ::emu::umulhi<uint32_t>((a), (b))
#define __trap() ::emu::fail("__trap() reached")

// The CUDA runtime calls the launchers make, answered as an H100 would (cuda_emu_runtime.cpp). They
// are renamed so that the real libcudart, which torch may have loaded, never answers them.
namespace emu {
cudaError_t get_last_error();
const char* get_error_string(cudaError_t error);
cudaError_t func_set_attribute(const void* func, cudaFuncAttribute attr, int value);
cudaError_t device_get_attribute(int* value, cudaDeviceAttr attr, int device);
template <typename T>
inline cudaError_t func_set_attribute(T* entry, cudaFuncAttribute attr, int value) {
  return func_set_attribute(reinterpret_cast<const void*>(entry), attr, value);
}
}  // namespace emu
#define cudaGetLastError ::emu::get_last_error
#define cudaGetErrorString ::emu::get_error_string
#define cudaFuncSetAttribute ::emu::func_set_attribute
#define cudaDeviceGetAttribute ::emu::device_get_attribute
