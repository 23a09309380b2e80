// Fused softmax-KL on the GPU: the KD loss and its student gradient in one launch.
//
// Per row (s, t student and teacher logits, T the temperature, y the label, w the row weight):
//   p = softmax(s/T), q = softmax(t/T), p1 = softmax(s)
//   loss_row = soft * KD + hard_y * CE,   KD = KL(q||p) (kind 0) or H(q, p) (kind 1)
//   grad     = w * (soft/T * (p - q) + hard_y * (p1 - onehot(y)))    soft = alpha tau, hard = 1 - alpha
// hard_y = hard on a row with a label, 0 on a row whose label is -1 (it gets the soft term alone:
// the transfer set). The weights, the labels and w come from minikd/losses/conventions.py (via the
// launcher); the derivation is in minikd/losses/kd.py; this file implements the same formulas.
// ``out`` may be ``s`` itself (in place), so ``s`` carries no __restrict__, and every read of s
// that another thread's gradient write could follow (s_y) happens before a synchronization.
//
// Three kernel families compute the same per-row statistics: the row maxima ms, mt and the sums
//   Zs = sum 2^((s - ms) k),  Z1 = sum 2^((s - ms) log2 e),  Zt = sum 2^((t - mt) k),  k = log2(e)/T
//   B  = sum_{t > -inf} 2^((t - mt) k) * d,  d = ((t - mt) - (s - ms))/T (kind 0) or -(s - ms)/T (kind 1)
// so that KL = B/Zt - ln Zt + ln Zs and H = B/Zt + ln Zs, CE = ln Z1 - (s_y - ms), and the gradient
//   grad = cs 2^((s - ms) k) - ct 2^((t - mt) k) + ch 2^((s - ms) log2 e) - [c = y] w hard,
//   cs = w soft / (T Zs),  ct = w soft / (T Zt),  ch = w hard / Z1.
// Measuring every exponent from the maxima keeps them <= 0 (no overflow for |logits| up to 1e4 and
// T down to 0.01) and keeps d small, so float32 accumulation does not cancel against (ms - mt)/T.
//
// Where a row is seen in pieces (threads of a block, blocks of a cluster), each piece keeps a State
// (its maxima and sums) and States merge by the online-softmax rule (Milakov & Gimelshein 2018):
// Z *= 2^((m_old - m_new) k); B also shifts because d is measured from the maxima:
//   B <- f (B + Zt ((ms_new - ms_old) - [kind 0] (mt_new - mt_old)) / T),  f = 2^((mt_old - mt_new) k).
//
// Kernels (extern "C", one per input dtype f32 / f16 / bf16; the launcher's plan() picks one):
//   softmax_kl_rows_*_L*_E*   C <= 1024: LANES lanes a row, ELEMS elements a lane, the row in
//                             registers; maxima, then sums, then gradient (no online merging).
//                             Global memory: one read of s and t, one write of the gradient.
//   softmax_kl_cluster_*_c*   long rows, C * sizeof(T) a multiple of 16: a cluster of CL blocks a
//                             row, each block's chunk in shared memory (cp.async), States merged
//                             over distributed shared memory; again one read and one write.
//   softmax_kl_block_*        any other row: a block a row, online States, the row read twice
//                             (the second time from L1/L2 if it is still there).
//   softmax_kl_warp_*         the first design (a warp a row, online States), a benchmark baseline.
//   sum_rows                  the deterministic sum of the per-row losses (float64, fixed tree).
// The gradient is written once, in the input dtype, possibly over the student: every kernel reads
// all the values of a row it needs before a synchronization that precedes any write to that row.
// Row flags (in-kernel input checks, valid rows only): 1 = student has NaN/+inf or is all -inf,
// 2 = the same for the teacher; the caller re-checks on the host to raise the exact error.
// tests/cuda_emu runs this file unchanged on the CPU (g++ and an emulator of threads, barriers,
// shuffles, clusters and cp.async), which is how it is tested on machines without a GPU.

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#ifndef CUDART_INF_F
#define CUDART_INF_F __int_as_float(0x7f800000)   // as math_constants.h, which NVRTC may not find
#endif

#define LOG2E 1.4426950408889634f

// ---------------------------------------------------------------- Hopper features, one place
// Thread-block clusters (distributed shared memory) and cp.async, as inline PTX so that NVRTC needs
// no extra header. The CPU emulator of the tests (tests/cuda_emu/emu.h) defines MINIKD_EMU and
// supplies the same functions, so the kernels below run there unchanged. Clusters need sm_90: for
// an older GPU (NVRTC compiles for the device at hand) the cluster kernels are left out, and the
// launcher's plan does not name them there (minikd/kernels/cupy_gpu.py, ``clusters``).
#if defined(MINIKD_EMU) || !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
#define MINIKD_CLUSTERS 1
#else
#define MINIKD_CLUSTERS 0
#endif
#if !defined(MINIKD_EMU) && MINIKD_CLUSTERS
__device__ __forceinline__ unsigned char* minikd_dynamic_smem() {
    extern __shared__ __align__(16) unsigned char minikd_smem[];
    return minikd_smem;
}
__device__ __forceinline__ unsigned minikd_cluster_rank() {
    unsigned r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}
// every thread of every block of the cluster arrives; release/acquire: shared-memory writes before
// the barrier are visible to the other blocks after it
__device__ __forceinline__ void minikd_cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
// the address of the same shared-memory object in block `rank` of the cluster (a generic address)
template <typename P> __device__ __forceinline__ P* minikd_cluster_map(P* ptr, unsigned rank) {
    unsigned long long out;
    asm volatile("mapa.u64 %0, %1, %2;" : "=l"(out) : "l"(ptr), "r"(rank));
    return reinterpret_cast<P*>(out);
}
// 16 bytes global -> shared, asynchronous (L2 only: the data is read once from global memory)
__device__ __forceinline__ void minikd_cp_async16(void* smem_dst, const void* gmem_src) {
    unsigned dst;
    asm volatile("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(dst) : "l"(smem_dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(dst), "l"(gmem_src) : "memory");
}
__device__ __forceinline__ void minikd_cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
// wait until at most N of this thread's committed groups are still in flight
template <int N> __device__ __forceinline__ void minikd_cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory");
}
#endif

template <typename T> __device__ __forceinline__ float to_f(T x);
template <> __device__ __forceinline__ float to_f<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

struct Params {
    long long N;
    int C;
    float k;          // log2(e) / T
    float inv_T;
    float soft;       // alpha * tau
    float hard;       // 1 - alpha; a kernel sets its copy to 0 for a row without a label (y = -1)
    int kind;         // 0: KL(q||p), 1: H(q, p)
    int share;        // T == 1 (conventions.shares_exponential): softmax(s) is softmax(s/T)
};

// Partial state of a row: maxima and the sums of the header comment.
struct State {
    float ms, mt, Zs, Z1, Zt, B;
    int bad_s, bad_t;
};

__device__ __forceinline__ State empty_state() {
    State a;
    a.ms = -CUDART_INF_F; a.mt = -CUDART_INF_F;
    a.Zs = 0.f; a.Z1 = 0.f; a.Zt = 0.f; a.B = 0.f;
    a.bad_s = 0; a.bad_t = 0;
    return a;
}

// 2^((m_old - m_new) k), with an empty sum (m_old = -inf) scaling to 0 instead of NaN.
__device__ __forceinline__ float rescale(float m_old, float m_new, float k) {
    return m_old == -CUDART_INF_F ? 0.f : exp2f((m_old - m_new) * k);
}

// Branches skip the work a term with weight 0 does not need: alpha = 1 (hard = 0) or a row without
// a label needs no softmax(s), alpha = 0 (soft = 0) no tempered softmax; at T = 1 (share, set by the
// host) the two student exponentials coincide, and the tempered one serves both.
__device__ __forceinline__ bool same_exp(const Params& p) { return p.soft != 0.f && p.share; }

__device__ __forceinline__ void add_element(State& a, float s, float t, const Params& p) {
    a.bad_s |= (isnan(s) || s == CUDART_INF_F);
    a.bad_t |= (isnan(t) || t == CUDART_INF_F);
    if (s > a.ms) {
        float f = rescale(a.ms, s, p.k);
        float f1 = rescale(a.ms, s, LOG2E);
        if (a.Zt > 0.f) a.B += a.Zt * (s - a.ms) * p.inv_T;
        a.Zs *= f; a.Z1 *= f1; a.ms = s;
    }
    if (t > a.mt) {
        float f = rescale(a.mt, t, p.k);
        if (a.Zt > 0.f) a.B -= (p.kind == 0 ? a.Zt * (t - a.mt) * p.inv_T : 0.f);
        a.B *= f; a.Zt *= f; a.mt = t;
    }
    if (s > -CUDART_INF_F) {
        const float ds = s - a.ms;
        const float es = p.soft != 0.f ? exp2f(ds * p.k) : 0.f;
        a.Zs += es;
        if (p.hard != 0.f) a.Z1 += same_exp(p) ? es : exp2f(ds * LOG2E);
    }
    if (p.soft != 0.f && t > -CUDART_INF_F) {
        float e = exp2f((t - a.mt) * p.k);
        // a student class at -inf where the teacher has mass: d = +inf, the true (infinite) KL;
        // written out because (-inf) - (-inf) would be NaN while the row's student max is -inf
        float sd = s == -CUDART_INF_F ? -CUDART_INF_F : s - a.ms;
        float d = p.kind == 0 ? ((t - a.mt) - sd) * p.inv_T : -sd * p.inv_T;
        a.Zt += e;
        if (e > 0.f) a.B += e * d;   // 0 * inf would be NaN: a class with no teacher mass adds nothing
    }
}

// Bring a partial state to the maxima (ms, mt).
__device__ __forceinline__ void shift_to(State& a, float ms, float mt, const Params& p) {
    float f = rescale(a.mt, mt, p.k);
    if (a.Zt > 0.f) {
        float shift = (ms - a.ms) - (p.kind == 0 ? (mt - a.mt) : 0.f);
        a.B = f * (a.B + a.Zt * shift * p.inv_T);
    } else {
        a.B = 0.f;
    }
    a.Zt *= f;
    a.Zs *= rescale(a.ms, ms, p.k);
    a.Z1 *= rescale(a.ms, ms, LOG2E);
    a.ms = ms; a.mt = mt;
}

__device__ __forceinline__ State merge(State a, State b, const Params& p) {
    float ms = fmaxf(a.ms, b.ms), mt = fmaxf(a.mt, b.mt);
    shift_to(a, ms, mt, p);
    shift_to(b, ms, mt, p);
    a.Zs += b.Zs; a.Z1 += b.Z1; a.Zt += b.Zt; a.B += b.B;
    a.bad_s |= b.bad_s; a.bad_t |= b.bad_t;
    return a;
}

__device__ __forceinline__ State warp_merge(State a, const Params& p) {
    for (int off = 16; off > 0; off >>= 1) {
        State b;
        b.ms = __shfl_xor_sync(0xffffffffu, a.ms, off);
        b.mt = __shfl_xor_sync(0xffffffffu, a.mt, off);
        b.Zs = __shfl_xor_sync(0xffffffffu, a.Zs, off);
        b.Z1 = __shfl_xor_sync(0xffffffffu, a.Z1, off);
        b.Zt = __shfl_xor_sync(0xffffffffu, a.Zt, off);
        b.B = __shfl_xor_sync(0xffffffffu, a.B, off);
        b.bad_s = __shfl_xor_sync(0xffffffffu, a.bad_s, off);
        b.bad_t = __shfl_xor_sync(0xffffffffu, a.bad_t, off);
        a = merge(a, b, p);
    }
    return a;   // every lane holds the row's state (xor butterfly)
}

// A block's State: each warp merges by shuffles, then warp 0 merges the warps' States (through
// warp_states, 32 slots of shared memory). The result is in every lane of warp 0.
__device__ __forceinline__ State block_merge(State a, State* warp_states, const Params& p) {
    a = warp_merge(a, p);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, n_warps = blockDim.x >> 5;
    if (lane == 0) warp_states[warp] = a;
    __syncthreads();
    State b = empty_state();
    if (warp == 0) {
        if (lane < n_warps) b = warp_states[lane];
        b = warp_merge(b, p);
    }
    return b;
}

__device__ __forceinline__ int row_flag(const State& a) {
    return ((a.bad_s || a.ms == -CUDART_INF_F) ? 1 : 0) + ((a.bad_t || a.mt == -CUDART_INF_F) ? 2 : 0);
}

// The loss of an unflagged row from its State; sy = s_y - ms.
__device__ __forceinline__ float row_loss_value(const State& a, float sy, const Params& p) {
    float loss = 0.f;
    if (p.soft != 0.f) {
        float kd = p.kind == 0 ? a.B / a.Zt - logf(a.Zt) + logf(a.Zs) : a.B / a.Zt + logf(a.Zs);
        loss += p.soft * kd;
    }
    if (p.hard != 0.f) loss += p.hard * (logf(a.Z1) - sy);
    return loss;
}

// Row loss and flags from the merged state (one thread per row calls it).
__device__ __forceinline__ void finish_row(const State& a, float s_y, const Params& p, float* row_loss,
                                           signed char* flags, long long row) {
    int flag = row_flag(a);
    if (flag) {
        flags[row] = (signed char)flag;
        row_loss[row] = 0.f;
        return;
    }
    row_loss[row] = row_loss_value(a, s_y - a.ms, p);
}

// One gradient element from the logits; `label` is what the hard term subtracts at the label.
__device__ __forceinline__ float grad_element(float s, float t, bool is_label, const State& a, float cs, float ct,
                                              float ch, float label, const Params& p) {
    const float ds = s - a.ms;
    float g = 0.f, es = 0.f;
    if (p.soft != 0.f) {
        es = exp2f(ds * p.k);
        g = cs * es - ct * exp2f((t - a.mt) * p.k);
    }
    if (p.hard != 0.f) g += ch * (same_exp(p) ? es : exp2f(ds * LOG2E)) - (is_label ? label : 0.f);
    return g;
}

// The gradient's coefficients; a term with weight 0 has no sums (they were skipped), so 0, not 0/0.
__device__ __forceinline__ void coefficients(float w, float Zs, float Zt, float Z1, const Params& p, float& cs,
                                             float& ct, float& ch) {
    cs = p.soft != 0.f ? w * p.soft * p.inv_T / Zs : 0.f;
    ct = p.soft != 0.f ? w * p.soft * p.inv_T / Zt : 0.f;
    ch = p.hard != 0.f ? w * p.hard / Z1 : 0.f;
}

// ---------------------------------------------------------------- one warp per row

template <typename T>
__device__ void softmax_kl_warp(const T* s, const T* __restrict__ t, const long long* __restrict__ labels,
                                const float* __restrict__ weights, Params p, T* out, float* __restrict__ row_loss,
                                signed char* __restrict__ flags) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= p.N) return;
    const long long base = row * p.C;
    const float w = weights[row];
    if (w == 0.f) {   // a row that counts nowhere: zero gradient, not inspected
        for (int c = lane; c < p.C; c += 32) out[base + c] = from_f<T>(0.f);
        if (lane == 0) row_loss[row] = 0.f;
        return;
    }
    const long long y = labels[row];
    if (y < 0) p.hard = 0.f;   // the soft term alone
    State a = empty_state();
    for (int c = lane; c < p.C; c += 32) add_element(a, to_f(s[base + c]), to_f(t[base + c]), p);
    // s_y is read before the shuffles of the merge, which no lane passes before all arrive: with
    // out == s (in place) no lane can have overwritten it yet
    const float s_y = y >= 0 ? to_f(s[base + y]) : 0.f;
    a = warp_merge(a, p);
    if (lane == 0) finish_row(a, s_y, p, row_loss, flags, row);
    if (row_flag(a)) {
        for (int c = lane; c < p.C; c += 32) out[base + c] = from_f<T>(0.f);
        return;
    }
    float cs, ct, ch;
    coefficients(w, a.Zs, a.Zt, a.Z1, p, cs, ct, ch);
    for (int c = lane; c < p.C; c += 32) {
        float g = grad_element(to_f(s[base + c]), to_f(t[base + c]), c == y, a, cs, ct, ch, ch * a.Z1, p);
        out[base + c] = from_f<T>(g);
    }
}

// ---------------------------------------------------------------- a few lanes per row, the row in registers

// For C <= 1024. LANES consecutive lanes hold one row (32 / LANES rows per warp), ELEMS elements
// each: element c = j LANES + lane_in_row, so a warp's loads and stores cover consecutive
// addresses. The row never leaves registers and memory is touched once each way: the maxima first
// (a max over the row's lanes), then the sums from exponentials measured from the final maxima (no
// online rescaling), then the gradient from the exponentials kept in registers (three a element,
// each computed once). Padding (c >= C) holds -inf, which adds to no sum. Every
// lane runs every shuffle, rows past N included: a full-mask shuffle needs all 32 lanes.
template <int LANES> __device__ __forceinline__ float group_max(float v) {
#pragma unroll
    for (int off = LANES / 2; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    return v;
}
// xor butterfly: every lane of the group ends with the same sum (the same tree up to commutation)
template <int LANES> __device__ __forceinline__ float group_sum(float v) {
#pragma unroll
    for (int off = LANES / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}
template <int LANES> __device__ __forceinline__ int group_or(int v) {
#pragma unroll
    for (int off = LANES / 2; off > 0; off >>= 1) v |= __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

// KEEP: the exponentials stay in registers for the gradient (3 per element in all; 191 registers at
// ELEMS = 32) or are computed again (6 per element; 128 registers): fewer special-function
// operations against more warps per SM, settled by the benchmark's variants.
template <typename T, int LANES, int ELEMS, bool KEEP>
__device__ void softmax_kl_rows(const T* s, const T* __restrict__ t, const long long* __restrict__ labels,
                                const float* __restrict__ weights, Params p, T* out, float* __restrict__ row_loss,
                                signed char* __restrict__ flags) {
    const long long gtid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long row = gtid / LANES;          // LANES divides 32: a row never straddles two warps
    const int sub = (int)(gtid % LANES);
    const bool active = row < p.N;
    const long long base = row * p.C;
    const float w = active ? weights[row] : 0.f;
    const bool live = active && w != 0.f;        // a row that counts nowhere is not read
    const long long y = live ? labels[row] : -1;
    if (y < 0) p.hard = 0.f;                     // the soft term alone (or a row that is not live)
    float sv[ELEMS], tv[ELEMS];
    int bad_s = 0, bad_t = 0;
    float ms = -CUDART_INF_F, mt = -CUDART_INF_F;
#pragma unroll
    for (int j = 0; j < ELEMS; ++j) {
        const int c = j * LANES + sub;
        sv[j] = -CUDART_INF_F;
        tv[j] = -CUDART_INF_F;
        if (live && c < p.C) {
            sv[j] = to_f(s[base + c]);
            tv[j] = to_f(t[base + c]);
        }
        bad_s |= (isnan(sv[j]) || sv[j] == CUDART_INF_F);
        bad_t |= (isnan(tv[j]) || tv[j] == CUDART_INF_F);
        ms = fmaxf(ms, sv[j]);
        mt = fmaxf(mt, tv[j]);
    }
    // the row's values were all read above; with out == s no lane writes before these shuffles
    ms = group_max<LANES>(ms);
    mt = group_max<LANES>(mt);
    // The sums; each element's three exponentials then replace its logits in registers (sv <- es,
    // tv <- et, e1v <- e1): the gradient needs only them, so each is computed once, not twice.
    float Zs = 0.f, Z1 = 0.f, Zt = 0.f, B = 0.f, sy = 0.f;
    float e1v[KEEP ? ELEMS : 1];
    if (ms > -CUDART_INF_F && mt > -CUDART_INF_F) {   // otherwise the row is flagged below
#pragma unroll
        for (int j = 0; j < ELEMS; ++j) {
            const float ds = sv[j] - ms;              // -inf for padding and -inf classes
            float es = 0.f, e1 = 0.f, et = 0.f;
            if (sv[j] > -CUDART_INF_F) {
                if (p.soft != 0.f) es = exp2f(ds * p.k);
                if (p.hard != 0.f) e1 = same_exp(p) ? es : exp2f(ds * LOG2E);
            }
            if (p.soft != 0.f && tv[j] > -CUDART_INF_F) {
                const float dt = tv[j] - mt;
                et = exp2f(dt * p.k);
                const float d = p.kind == 0 ? (dt - ds) * p.inv_T : -ds * p.inv_T;   // +inf: the true, infinite KL
                if (et > 0.f) B += et * d;
            }
            Zs += es;
            Z1 += e1;
            Zt += et;
            if (j * LANES + sub == y) sy = ds;       // CE needs s_y - ms
            if (KEEP) {
                sv[j] = es;
                tv[j] = et;
                e1v[KEEP ? j : 0] = e1;
            }
        }
    }
    Zs = group_sum<LANES>(Zs);
    Z1 = group_sum<LANES>(Z1);
    Zt = group_sum<LANES>(Zt);
    B = group_sum<LANES>(B);
    sy = group_sum<LANES>(sy);                       // one lane holds it, the others add 0
    bad_s = group_or<LANES>(bad_s);
    bad_t = group_or<LANES>(bad_t);
    if (!active) return;                             // after the last shuffle
    State a;
    a.ms = ms; a.mt = mt; a.Zs = Zs; a.Z1 = Z1; a.Zt = Zt; a.B = B; a.bad_s = bad_s; a.bad_t = bad_t;
    const int flag = live ? row_flag(a) : 0;
    const bool zero = !live || flag;
    if (sub == 0) {
        if (flag) flags[row] = (signed char)flag;
        row_loss[row] = zero ? 0.f : row_loss_value(a, sy, p);
    }
    float cs = 0.f, ct = 0.f, ch = 0.f;
    if (!zero) coefficients(w, Zs, Zt, Z1, p, cs, ct, ch);
    const float wh = zero ? 0.f : w * p.hard;
#pragma unroll
    for (int j = 0; j < ELEMS; ++j) {
        const int c = j * LANES + sub;
        if (c < p.C) {
            float g = 0.f;
            if (!zero && KEEP) {   // the stored exponentials
                g = cs * sv[j] - ct * tv[j] + ch * e1v[KEEP ? j : 0] - (c == y ? wh : 0.f);
            } else if (!zero) {    // computed again from the logits
                g = grad_element(sv[j], tv[j], c == y, a, cs, ct, ch, wh, p);
            }
            out[base + c] = from_f<T>(g);
        }
    }
}

// ---------------------------------------------------------------- one block per row

template <typename T, int VEC>
struct alignas(16) Pack { T v[VEC]; };

template <typename T, int VEC>
__device__ void softmax_kl_block(const T* s, const T* __restrict__ t, const long long* __restrict__ labels,
                                 const float* __restrict__ weights, Params p, T* out, float* __restrict__ row_loss,
                                 signed char* __restrict__ flags) {
    __shared__ State warp_states[32];
    __shared__ State row_state;
    const long long row = blockIdx.x;
    const long long base = row * p.C;
    const float w = weights[row];
    const int n_vec = (VEC > 1) ? p.C / VEC : 0;   // VEC > 1 only when C % VEC == 0 (checked by the host)
    if (w == 0.f) {
        for (int c = threadIdx.x; c < p.C; c += blockDim.x) out[base + c] = from_f<T>(0.f);
        if (threadIdx.x == 0) row_loss[row] = 0.f;
        return;
    }
    const long long y = labels[row];
    if (y < 0) p.hard = 0.f;   // the soft term alone
    State a = empty_state();
    if (VEC > 1) {
        const Pack<T, VEC>* sv = reinterpret_cast<const Pack<T, VEC>*>(s + base);
        const Pack<T, VEC>* tv = reinterpret_cast<const Pack<T, VEC>*>(t + base);
        for (int i = threadIdx.x; i < n_vec; i += blockDim.x) {
            Pack<T, VEC> xs = sv[i], xt = tv[i];   // 16-byte loads
#pragma unroll
            for (int j = 0; j < VEC; ++j) add_element(a, to_f(xs.v[j]), to_f(xt.v[j]), p);
        }
    } else {
        for (int c = threadIdx.x; c < p.C; c += blockDim.x) add_element(a, to_f(s[base + c]), to_f(t[base + c]), p);
    }
    const float s_y = y >= 0 ? to_f(s[base + y]) : 0.f;   // before the barriers: pass 2 may overwrite s in place
    const State b = block_merge(a, warp_states, p);
    if (threadIdx.x == 0) row_state = b;
    __syncthreads();
    a = row_state;
    if (threadIdx.x == 0) finish_row(a, s_y, p, row_loss, flags, row);
    if (row_flag(a)) {
        for (int c = threadIdx.x; c < p.C; c += blockDim.x) out[base + c] = from_f<T>(0.f);
        return;
    }
    float cs, ct, ch;
    coefficients(w, a.Zs, a.Zt, a.Z1, p, cs, ct, ch);
    if (VEC > 1) {
        const Pack<T, VEC>* sv = reinterpret_cast<const Pack<T, VEC>*>(s + base);
        const Pack<T, VEC>* tv = reinterpret_cast<const Pack<T, VEC>*>(t + base);
        Pack<T, VEC>* ov = reinterpret_cast<Pack<T, VEC>*>(out + base);
        for (int i = threadIdx.x; i < n_vec; i += blockDim.x) {
            Pack<T, VEC> xs = sv[i], xt = tv[i], g;
#pragma unroll
            for (int j = 0; j < VEC; ++j)
                g.v[j] = from_f<T>(grad_element(to_f(xs.v[j]), to_f(xt.v[j]), (long long)i * VEC + j == y, a, cs, ct, ch,
                                                ch * a.Z1, p));
            ov[i] = g;   // 16-byte store
        }
    } else {
        for (int c = threadIdx.x; c < p.C; c += blockDim.x)
            out[base + c] = from_f<T>(grad_element(to_f(s[base + c]), to_f(t[base + c]), c == y, a, cs, ct, ch,
                                                   ch * a.Z1, p));
    }
}

// ---------------------------------------------------------------- a cluster of blocks per row, the row in shared memory

// For long rows (C of thousands to a few hundred thousand) whose length in bytes is a multiple of
// 16. The two-pass block kernel above re-reads the row for the gradient and counts on L2 to serve
// it; at C = 128k a row is 1 MB of student + teacher and 132 rows in flight exceed H100's 50 MB L2,
// so the second read would go to HBM (20 bytes an element instead of 12 in float32). Here CL blocks
// (a thread-block cluster, CL = 1, 2, 4, 8, or 16 where the launcher opts in to a non-portable
// size) split the row into CL chunks; each block copies its
// chunk into its own shared memory with cp.async (in STAGES commit groups, so that the sums of a
// stage run while the next stages are still in flight), reduces its chunk to a State, and the
// blocks exchange States through distributed shared memory: every block merges the CL States in
// rank order (the same result in every block), then writes the gradient of its chunk from shared
// memory. Global memory is read once and written once: 12 bytes an element (float32).
// Shared memory: SMEM_HEAD bytes of States, then the student chunk, then the teacher chunk.
#define SMEM_HEAD 1280   // >= 34 States of 32 bytes, a multiple of 128
#define STAGES 4
#if MINIKD_CLUSTERS

template <int CL> __device__ __forceinline__ void cluster_barrier() {
    if (CL > 1) minikd_cluster_sync(); else __syncthreads();
}

template <typename T, int CL>
__device__ void softmax_kl_cluster(const T* s, const T* __restrict__ t, const long long* __restrict__ labels,
                                   const float* __restrict__ weights, Params p, T* out, float* __restrict__ row_loss,
                                   signed char* __restrict__ flags) {
    constexpr int VEC = 16 / sizeof(T);
    typedef Pack<T, VEC> P;
    unsigned char* smem = minikd_dynamic_smem();
    State* warp_states = reinterpret_cast<State*>(smem);   // [0, 32): one per warp
    State* block_state = warp_states + 32;                  // this block's chunk
    State* row_state = warp_states + 33;                    // the whole row
    const unsigned rank = CL > 1 ? minikd_cluster_rank() : 0u;
    const long long row = blockIdx.x / CL;
    const long long base = row * p.C;
    const int n_vec = p.C / VEC;                            // C % VEC == 0 (checked by the host)
    const int chunk = (n_vec + CL - 1) / CL;
    const int v0 = min(n_vec, (int)rank * chunk);
    const int n = min(n_vec, v0 + chunk) - v0;              // packs of this block (may be 0)
    P* ss = reinterpret_cast<P*>(smem + SMEM_HEAD);
    P* ts = ss + chunk;
    const P* sg = reinterpret_cast<const P*>(s + base) + v0;
    const P* tg = reinterpret_cast<const P*>(t + base) + v0;
    P* og = reinterpret_cast<P*>(out + base) + v0;
    const int tid = threadIdx.x, nthreads = blockDim.x;
    const float w = weights[row];
    if (w == 0.f) {   // the same for every block of the cluster: all leave, none waits at a barrier
        P z;
#pragma unroll
        for (int j = 0; j < VEC; ++j) z.v[j] = from_f<T>(0.f);
        for (int i = tid; i < n; i += nthreads) og[i] = z;
        if (rank == 0 && tid == 0) row_loss[row] = 0.f;
        return;
    }
    const long long y = labels[row];
    if (y < 0) p.hard = 0.f;   // the soft term alone
    // pass 1: the chunk into shared memory; iteration j of thread tid copies pack j * nthreads + tid
    const int iters = (n + nthreads - 1) / nthreads;
#pragma unroll
    for (int g = 0; g < STAGES; ++g) {
        for (int j = g * iters / STAGES; j < (g + 1) * iters / STAGES; ++j) {
            const int i = j * nthreads + tid;
            if (i < n) {
                minikd_cp_async16(&ss[i], &sg[i]);
                minikd_cp_async16(&ts[i], &tg[i]);
            }
        }
        minikd_cp_async_commit();
    }
    // s_y before the first barrier: no block writes a gradient (perhaps over s) before all pass it
    const float s_y = (rank == 0 && tid == 0 && y >= 0) ? to_f(s[base + y]) : 0.f;
    State a = empty_state();
#pragma unroll
    for (int g = 0; g < STAGES; ++g) {
        // a thread reads only the packs it copied itself: its own wait is enough, no barrier
        if (g == 0) minikd_cp_async_wait<STAGES - 1>();
        else if (g == 1) minikd_cp_async_wait<STAGES - 2>();
        else if (g == 2) minikd_cp_async_wait<STAGES - 3>();
        else minikd_cp_async_wait<0>();
        for (int j = g * iters / STAGES; j < (g + 1) * iters / STAGES; ++j) {
            const int i = j * nthreads + tid;
            if (i < n) {
                const P xs = ss[i], xt = ts[i];
#pragma unroll
                for (int k = 0; k < VEC; ++k) add_element(a, to_f(xs.v[k]), to_f(xt.v[k]), p);
            }
        }
    }
    const State merged = block_merge(a, warp_states, p);
    if (tid == 0) *block_state = merged;
    const int warp = tid >> 5, lane = tid & 31;
    cluster_barrier<CL>();   // every block's State is written (and, CL > 1, visible to the cluster)
    if (warp == 0) {
        State b = empty_state();
        if (lane < CL) b = CL > 1 ? *minikd_cluster_map(block_state, (unsigned)lane) : *block_state;
        b = warp_merge(b, p);   // the same inputs in the same lanes: the same State in every block
        if (lane == 0) *row_state = b;
    }
    __syncthreads();
    a = *row_state;
    if (rank == 0 && tid == 0) finish_row(a, s_y, p, row_loss, flags, row);
    const bool bad = row_flag(a) != 0;
    float cs, ct, ch;
    coefficients(w, a.Zs, a.Zt, a.Z1, p, cs, ct, ch);
    for (int i = tid; i < n; i += nthreads) {
        const P xs = ss[i], xt = ts[i];
        P g;
#pragma unroll
        for (int k = 0; k < VEC; ++k)
            g.v[k] = from_f<T>(bad ? 0.f : grad_element(to_f(xs.v[k]), to_f(xt.v[k]), (long long)(v0 + i) * VEC + k == y,
                                                        a, cs, ct, ch, ch * a.Z1, p));
        og[i] = g;   // 16-byte store
    }
    if (CL > 1) minikd_cluster_sync();   // no block leaves while another may still read its block_state
}
#endif  // MINIKD_CLUSTERS

// ---------------------------------------------------------------- deterministic sum of row losses

extern "C" __global__ void sum_rows(const float* __restrict__ row_loss, long long n, double* __restrict__ total) {
    // one block of 1024 threads; fixed assignment and fixed tree: the same bits on every run.
    // Four independent accumulators per thread keep four loads in flight instead of one.
    __shared__ double part[1024];
    double acc[4] = {0.0, 0.0, 0.0, 0.0};
    const long long step = blockDim.x;
    long long i = threadIdx.x;
    for (; i + 3 * step < n; i += 4 * step) {
#pragma unroll
        for (int k = 0; k < 4; ++k) acc[k] += (double)row_loss[i + k * step];
    }
    for (; i < n; i += step) acc[0] += (double)row_loss[i];
    part[threadIdx.x] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    __syncthreads();
    for (int stride = blockDim.x >> 1; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) part[threadIdx.x] += part[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0) *total = part[0];
}

// Scalars are passed one by one (not as a struct) so that any launcher can call these. `kind`
// carries the divergence in bit 0 (0 KL, 1 cross-entropy) and `share` (T == 1) in bit 1.
#define KERNEL_ARGS(T)                                                                                     \
    const T *s, const T *t, const long long *labels, const float *weights, long long N, int C, float k,    \
        float inv_T, float soft, float hard, int kind, T *out, float *row_loss, signed char *flags
#define MAKE_PARAMS Params p; p.N = N; p.C = C; p.k = k; p.inv_T = inv_T; p.soft = soft; p.hard = hard; \
    p.kind = kind & 1; p.share = (kind >> 1) & 1;

#define ROWS(NAME, T, L, E)                                                                               \
    extern "C" __global__ void softmax_kl_rows_##NAME##_L##L##_E##E(KERNEL_ARGS(T)) {                      \
        MAKE_PARAMS softmax_kl_rows<T, L, E, true>(s, t, labels, weights, p, out, row_loss, flags);         \
    }
#define ROWS_RECOMPUTE(NAME, T, L, E)                                                                     \
    extern "C" __global__ void softmax_kl_rows_recompute_##NAME##_L##L##_E##E(KERNEL_ARGS(T)) {            \
        MAKE_PARAMS softmax_kl_rows<T, L, E, false>(s, t, labels, weights, p, out, row_loss, flags);        \
    }
#if MINIKD_CLUSTERS
#define CLUSTER(NAME, T, CL)                                                                              \
    extern "C" __global__ void __cluster_dims__(CL, 1, 1) softmax_kl_cluster_##NAME##_c##CL(KERNEL_ARGS(T)) { \
        MAKE_PARAMS softmax_kl_cluster<T, CL>(s, t, labels, weights, p, out, row_loss, flags);              \
    }
#else
#define CLUSTER(NAME, T, CL)
#endif

// The (LANES, ELEMS) pairs of the launcher's plan (minikd/kernels/cupy_gpu.py): ELEMS = 4 and
// LANES = 1..32 for C <= 128, LANES = 32 and ELEMS = 8, 16, 32 for C <= 1024 (also "recompute").
#define INSTANTIATE(NAME, T)                                                                              \
    extern "C" __global__ void softmax_kl_warp_##NAME(KERNEL_ARGS(T)) {                                    \
        MAKE_PARAMS softmax_kl_warp<T>(s, t, labels, weights, p, out, row_loss, flags);                     \
    }                                                                                                     \
    extern "C" __global__ void softmax_kl_block_##NAME(KERNEL_ARGS(T)) {                                   \
        MAKE_PARAMS softmax_kl_block<T, 1>(s, t, labels, weights, p, out, row_loss, flags);                 \
    }                                                                                                     \
    extern "C" __global__ void softmax_kl_block_vec_##NAME(KERNEL_ARGS(T)) {                               \
        MAKE_PARAMS softmax_kl_block<T, 16 / sizeof(T)>(s, t, labels, weights, p, out, row_loss, flags);    \
    }                                                                                                     \
    ROWS(NAME, T, 1, 4) ROWS(NAME, T, 2, 4) ROWS(NAME, T, 4, 4) ROWS(NAME, T, 8, 4) ROWS(NAME, T, 16, 4)   \
    ROWS(NAME, T, 32, 4) ROWS(NAME, T, 32, 8) ROWS(NAME, T, 32, 16) ROWS(NAME, T, 32, 32)                  \
    ROWS_RECOMPUTE(NAME, T, 32, 8) ROWS_RECOMPUTE(NAME, T, 32, 16) ROWS_RECOMPUTE(NAME, T, 32, 32)         \
    CLUSTER(NAME, T, 1) CLUSTER(NAME, T, 2) CLUSTER(NAME, T, 4) CLUSTER(NAME, T, 8) CLUSTER(NAME, T, 16)

INSTANTIATE(f32, float)
INSTANTIATE(f16, __half)
INSTANTIATE(bf16, __nv_bfloat16)
