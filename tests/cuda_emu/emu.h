// A CPU emulator of the few CUDA features minikd's kernels use, so that the test suite can run the
// real softmax_kl.cu on a machine without a GPU (compiled with g++ -DMINIKD_EMU).
//
// Every CUDA thread of a block is an OS thread; the blocks of one cluster run at the same time,
// clusters one after another. __syncthreads, warp shuffles and cluster barriers are std::barriers,
// so a kernel that forgets a barrier reads what the race left (and tests can catch it). It checks
// what real hardware leaves undefined: a shuffle whose partner lane has exited, a full-mask shuffle
// from a partial warp, cluster ranks out of range. cp.async copies are deferred to the wait that
// covers them (the latest moment the hardware may complete them), so reading a stage before
// waiting for it reads the poison left in shared memory (0xFF bytes: NaN in every float format).
// Static __shared__ variables become function statics: such kernels must run one block at a time
// (cluster size 1); clustered kernels keep all their shared state in dynamic shared memory.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#define MINIKD_EMU 1
#undef __shared__
#define __shared__ static
#define __align__(n) alignas(n)
#define __cluster_dims__(...)
#define CUDART_INF_F INFINITY
#define CUDART_NAN_F NAN

// CUDA's integer min/max are global functions
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
using std::isnan;

struct EmuDim3 { unsigned x = 1, y = 1, z = 1; };

namespace emu {
struct Warp {
    std::barrier<> bar{32};
    uint64_t slot[32] = {};
    std::atomic<bool> exited[32] = {};
};
struct Block {
    std::unique_ptr<std::barrier<>> bar;
    std::unique_ptr<Warp[]> warps;
    std::vector<unsigned char> smem_store;
    unsigned char* smem = nullptr;   // 16-byte aligned, smem_size bytes usable
    size_t smem_size = 0;
    std::atomic<unsigned> exit_phase{0};   // cluster barriers its threads had passed when they left
};
struct Cluster {
    std::unique_ptr<std::barrier<>> bar;
    std::vector<Block*> blocks;
    std::mutex lock;
    std::vector<std::pair<unsigned, unsigned>> remote_reads;   // (target rank, reader's barrier count)
};
struct Copy { void* dst; const void* src; int group; };
struct Thread {
    Block* block = nullptr;
    Cluster* cluster = nullptr;
    unsigned rank = 0, tid = 0;
    unsigned cluster_phase = 0;  // cluster barriers passed
    std::vector<Copy> pending;   // cp.async not yet performed
    int committed = 0;           // groups committed so far
};
inline thread_local Thread self;
inline std::atomic<int> n_errors{0};
inline std::string first_error;
inline std::atomic<bool> error_claimed{false};
inline void fail(const char* what) {
    if (!error_claimed.exchange(true)) first_error = what;
    ++n_errors;
}
}  // namespace emu

inline thread_local EmuDim3 threadIdx, blockIdx;
inline EmuDim3 blockDim, gridDim;

inline void __syncthreads() { emu::self.block->bar->arrive_and_wait(); }

template <typename V> inline V emu_shuffle(unsigned mask, V v, unsigned src_of_lane) {
    if (mask != 0xffffffffu) emu::fail("shuffle with a partial mask");
    const unsigned lane = emu::self.tid & 31;
    emu::Warp& w = emu::self.block->warps[emu::self.tid >> 5];
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(V));
    w.slot[lane] = bits;
    w.bar.arrive_and_wait();
    if (w.exited[src_of_lane].load()) emu::fail("shuffle from a lane that has exited");
    bits = w.slot[src_of_lane];
    w.bar.arrive_and_wait();
    V out;
    std::memcpy(&out, &bits, sizeof(V));
    return out;
}
template <typename V> inline V __shfl_xor_sync(unsigned mask, V v, int lane_mask, int width = 32) {
    const unsigned lane = emu::self.tid & 31;
    unsigned src = lane ^ (unsigned)lane_mask;
    if ((src & ~(unsigned)(width - 1)) != (lane & ~(unsigned)(width - 1))) src = lane;
    return emu_shuffle(mask, v, src);
}
template <typename V> inline V __shfl_sync(unsigned mask, V v, int src_lane, int width = 32) {
    const unsigned lane = emu::self.tid & 31;
    return emu_shuffle(mask, v, (lane & ~(unsigned)(width - 1)) + ((unsigned)src_lane & (unsigned)(width - 1)));
}

// ---- the portability layer of softmax_kl.cu
inline unsigned char* minikd_dynamic_smem() { return emu::self.block->smem; }
inline unsigned minikd_cluster_rank() { return emu::self.rank; }
inline void minikd_cluster_sync() {
    emu::self.cluster->bar->arrive_and_wait();
    ++emu::self.cluster_phase;
}
template <typename P> inline P* minikd_cluster_map(P* ptr, unsigned rank) {
    emu::Cluster* c = emu::self.cluster;
    if (rank >= c->blocks.size()) { emu::fail("cluster rank out of range"); return ptr; }
    const std::ptrdiff_t off = reinterpret_cast<unsigned char*>(ptr) - emu::self.block->smem;
    if (off < 0 || (size_t)off >= emu::self.block->smem_size) emu::fail("mapped pointer is not in shared memory");
    if (rank != emu::self.rank) {   // checked after the launch: the target must not have left meanwhile
        std::lock_guard<std::mutex> g(c->lock);
        c->remote_reads.emplace_back(rank, emu::self.cluster_phase);
    }
    return reinterpret_cast<P*>(c->blocks[rank]->smem + off);
}
inline void minikd_cp_async16(void* dst, const void* src) {
    const std::ptrdiff_t off = reinterpret_cast<unsigned char*>(dst) - emu::self.block->smem;
    if (off < 0 || (size_t)off + 16 > emu::self.block->smem_size || off % 16 || (uintptr_t)src % 16)
        emu::fail("cp.async: destination outside shared memory or a misaligned address");
    emu::self.pending.push_back({dst, src, emu::self.committed});
}
inline void minikd_cp_async_commit() { ++emu::self.committed; }
template <int N> inline void minikd_cp_async_wait() {
    // groups committed before the last N are complete: perform their copies now
    auto& q = emu::self.pending;
    std::vector<emu::Copy> keep;
    for (auto& c : q) {
        if (c.group < emu::self.committed - N) std::memcpy(c.dst, c.src, 16);
        else keep.push_back(c);
    }
    q.swap(keep);
}

// ---- launch: grid blocks of `block` threads, clusters of `cluster` blocks run together
template <class Body> void emu_launch(unsigned grid, unsigned block, size_t smem, unsigned cluster, Body body) {
    if (block == 0 || block % 32 || block > 1024) { emu::fail("block size must be a multiple of 32, <= 1024"); return; }
    if (cluster == 0 || grid % cluster) { emu::fail("grid must be a multiple of the cluster size"); return; }
    gridDim = {grid, 1, 1};
    blockDim = {block, 1, 1};
    for (unsigned first = 0; first < grid; first += cluster) {
        emu::Cluster cl;
        cl.bar = std::make_unique<std::barrier<>>((std::ptrdiff_t)(cluster * block));
        std::vector<std::unique_ptr<emu::Block>> blocks;
        for (unsigned b = 0; b < cluster; ++b) {
            auto bl = std::make_unique<emu::Block>();
            bl->bar = std::make_unique<std::barrier<>>((std::ptrdiff_t)block);
            bl->warps = std::make_unique<emu::Warp[]>(block / 32);
            bl->smem_store.assign(smem + 32, 0xFF);   // poison
            uintptr_t p = reinterpret_cast<uintptr_t>(bl->smem_store.data());
            bl->smem = reinterpret_cast<unsigned char*>((p + 15) & ~uintptr_t(15));
            bl->smem_size = smem;
            cl.blocks.push_back(bl.get());
            blocks.push_back(std::move(bl));
        }
        std::vector<std::thread> threads;
        threads.reserve(cluster * block);
        for (unsigned b = 0; b < cluster; ++b)
            for (unsigned tid = 0; tid < block; ++tid)
                threads.emplace_back([&, b, tid] {
                    emu::self = emu::Thread{};
                    emu::self.block = cl.blocks[b];
                    emu::self.cluster = &cl;
                    emu::self.rank = b;
                    emu::self.tid = tid;
                    threadIdx = {tid, 0, 0};
                    blockIdx = {first + b, 0, 0};
                    body();
                    if (!emu::self.pending.empty()) emu::fail("cp.async copies never waited for");
                    // an exited thread counts as arrived at every later barrier
                    emu::Warp& w = cl.blocks[b]->warps[tid >> 5];
                    w.exited[tid & 31] = true;
                    w.bar.arrive_and_drop();
                    cl.blocks[b]->bar->arrive_and_drop();
                    unsigned seen = cl.blocks[b]->exit_phase.load();
                    while (seen < emu::self.cluster_phase &&
                           !cl.blocks[b]->exit_phase.compare_exchange_weak(seen, emu::self.cluster_phase)) {}
                    cl.bar->arrive_and_drop();
                });
        for (auto& th : threads) th.join();
        // distributed shared memory lives as long as its block: a block read at barrier count k
        // must pass at least one more cluster barrier (which the reader also reaches) before leaving
        for (auto& [target, phase] : cl.remote_reads)
            if (cl.blocks[target]->exit_phase.load() <= phase)
                emu::fail("a block left while another could still read its shared memory (cluster barrier missing)");
    }
}
