// Fused softmax-divergence on the GPU: the KD loss and its student gradient in one launch.
//
// Per row (s, t student and teacher logits, T the temperature, y the label, w the row weight):
//   p = softmax(s/T), q = softmax(t/T), p1 = softmax(s)
//   loss_row = soft * D(p, q) + hard_y * CE,   CE = -log p1_y
//   grad     = w * (soft * dD/ds + hard_y * (p1 - onehot(y)))     soft = alpha tau, hard = 1 - alpha
// with D chosen by `kind` (minikd/losses/divergences.py defines and derives each; a = dD/dp):
//   0 "kl"          KL(q||p)                            dD/ds = (p - q)/T
//   1 "ce"          H(q, p)                             dD/ds = (p - q)/T
//   2 "reverse_kl"  KL(p||q)                            dD/ds_k = p_k (r_k - D)/T,  r = log p - log q
//   3 "jsd"         beta KL(q||m) + (1-beta) KL(p||m),  dD/ds_k = (1-beta) p_k (lp_k - sum_c p_c lp_c)/T,
//                   m = beta q + (1-beta) p             lp = log p - log m
//   4 "tvd"         (1/2) sum |p - q|                   dD/ds_k = p_k (a_k - sum_c p_c a_c)/T,
//                                                       a = sign(p - q)/2 with sign(0) = 0
// JSD at beta = 0 is KL(q||p) and at beta = 1 KL(p||q) (the reference's endpoint rule): the launcher
// sends kind 0 / 2 for those, deciding on the float64 beta, and passes beta and 1 - beta each
// rounded from float64 (a float32 1 - beta would lose the digits of a beta near 1).
// hard_y = hard on a row with a label, 0 on a row whose label is -1 (it gets the soft term alone:
// the transfer set). The weights, the labels and w come from minikd/losses/conventions.py (via the
// launcher); the derivation is in minikd/losses/kd.py; this file implements the same formulas.
// ``out`` may be ``s`` itself (in place), so ``s`` carries no __restrict__, and every read of s
// that another thread's gradient write could follow (s_y) happens before a synchronization.
//
// Pass 1. Every kernel family computes the same per-row statistics: the row maxima ms, mt and the sums
//   Zs = sum 2^((s - ms) k),  Z1 = sum 2^((s - ms) log2 e),  Zt = sum 2^((t - mt) k),  k = log2(e)/T
//   B  = sum_{t > -inf} 2^((t - mt) k) * d,  d = ((t - mt) - (s - ms))/T (kind 0) or -(s - ms)/T (kind 1)
// so that KL = B/Zt - ln Zt + ln Zs and H = B/Zt + ln Zs, CE = ln Z1 - (s_y - ms), and the gradient
//   grad = cs 2^((s - ms) k) - ct 2^((t - mt) k) + ch 2^((s - ms) log2 e) - [c = y] w hard,
//   cs = w soft / (T Zs),  ct = w soft / (T Zt),  ch = w hard / Z1.
// Measuring every exponent from the maxima keeps them <= 0 (no overflow for |logits| up to 1e4 and
// T down to 0.01) and keeps d small, so float32 accumulation does not cancel against (ms - mt)/T.
// (B is kinds 0 and 1's alone; the other kinds skip it.)
//
// Pass 2 (kinds 2-4). With ds = s - ms, dt = t - mt (<= 0), es = 2^(ds k) = Zs p, et = 2^(dt k) = Zt q:
//   log p = ds/T - ln Zs,  log q = dt/T - ln Zt,  d = log p - log q = (ds - dt)/T - L,  L = ln Zs - ln Zt.
// Their terms need Zs and Zt (through L or p, q), so once pass 1's statistics of the whole row are
// merged, a second pass over the row sums, from the final maxima (no online rescaling; the sums of
// the pieces just add, in a fixed tree):
//   kind 2: R = sum_{s > -inf} es x,  x = (ds - dt)/T  (+inf where t = -inf: the student has mass there)
//           D = R/Zs - L;   dD/ds_k = es_k (x_k - R/Zs) / (T Zs)      (L cancels in r_k - D)
//   kind 3: Jq = sum_{t > -inf} et lq,  Jp = sum_{s > -inf} es lp,   lq = log q - log m,  lp = log p - log m:
//             both sides with mass: lq = -log(beta + (1-beta) e^d),  lp = -log((1-beta) + beta e^-d)
//             (log_mix: the reference's log1p((1-beta) expm1(d)) form near d = 0, where the ratio
//             cancels; for |d| > 1 a sum of two non-negative terms, the larger factored out)
//             the teacher alone: lq = -log beta;  the student alone: lp = -log(1 - beta)
//           D = beta Jq/Zt + (1-beta) Jp/Zs;   dD/ds_k = (1-beta) es_k (lp_k - Jp/Zs) / (T Zs)
//   kind 4: with p = es/Zs and q = et/Zt as rounded here (both passes compute the same float32 values,
//           so a class has one sign in the sums and in the gradient): V = sum |p - q| and the masses
//           of p where p > q, p < q, p = q: P+, P-, P0;
//           D = V/2;   dD/ds_k = es_k c_k / (T Zs),  c = P- + P0/2 (p > q), -(P+ + P0/2) (p < q),
//           (P- - P+)/2 (p = q): a_k - sum_c p_c a_c as sums of masses, not 1/2 minus nearly 1/2
//           (the reference's _project_sign, so the dominant class keeps its relative accuracy).
// -inf classes: 0 log 0 = 0 everywhere; a student class at -inf (p = 0) adds nothing to R, Jp, the
// masses, and gets no soft gradient. Kind 2: a class where the student has mass and the teacher none
// makes D = +inf, the reference's value (it differs only where its float64 p underflows, log p < -745:
// there it adds 0); such a row has no gradient, and every entry of it is NaN (the reference gives NaN
// and -inf there). Kinds 3, 4 are finite for every row: the one-sided JSD terms are -log beta,
// -log(1 - beta) times the mass, and TVD counts the mass p or q puts where the other has none.
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
// Every family computes every kind. Pass 2 (kinds 2-4) reads the row where the family keeps it:
// registers (rows), shared memory (cluster); the block and warp kernels read it from global memory
// once more (three reads of s and t instead of two, the extra ones likely from L2).
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
#ifndef CUDART_NAN_F
#define CUDART_NAN_F __int_as_float(0x7fffffff)
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
    int kind;         // KIND_KL ... KIND_TVD (the header's numbering)
    int share;        // T == 1 (conventions.shares_exponential): softmax(s) is softmax(s/T)
    float beta;       // JSD's mixture weight (kind 3), and 1 - beta rounded from float64
    float beta_c;
};

#define KIND_KL 0
#define KIND_CE 1
#define KIND_REVERSE_KL 2
#define KIND_JSD 3
#define KIND_TVD 4

// Partial state of a row: maxima and the sums of the header comment.
struct State {
    float ms, mt, Zs, Z1, Zt, B;
    float ts;         // the teacher's logit where the student has its maximum (the largest, on a tie)
    int bad_s, bad_t;
};

__device__ __forceinline__ State empty_state() {
    State a;
    a.ms = -CUDART_INF_F; a.mt = -CUDART_INF_F;
    a.Zs = 0.f; a.Z1 = 0.f; a.Zt = 0.f; a.B = 0.f;
    a.ts = -CUDART_INF_F;
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
        a.ts = t;
    } else if (s == a.ms) {
        a.ts = fmaxf(a.ts, t);
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
        float d = p.kind == KIND_KL ? ((t - a.mt) - sd) * p.inv_T : -sd * p.inv_T;
        a.Zt += e;
        if (e > 0.f && p.kind <= KIND_CE) a.B += e * d;   // 0 * inf would be NaN: no teacher mass, nothing
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
    const float ts = a.ms > b.ms ? a.ts : b.ms > a.ms ? b.ts : fmaxf(a.ts, b.ts);   // the same for any order
    shift_to(a, ms, mt, p);
    shift_to(b, ms, mt, p);
    a.Zs += b.Zs; a.Z1 += b.Z1; a.Zt += b.Zt; a.B += b.B;
    a.ts = ts;
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
        b.ts = __shfl_xor_sync(0xffffffffu, a.ts, off);
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

// ---------------------------------------------------------------- pass 2 (kinds 2-4)

// Pass 2's sums (the header): kind 2 R; kind 3 Jq, Jp; kind 4 V, P+, P-, P0.
struct Second {
    float v0, v1, v2, v3;
};

__device__ __forceinline__ Second empty_second() {
    Second b;
    b.v0 = 0.f; b.v1 = 0.f; b.v2 = 0.f; b.v3 = 0.f;
    return b;
}

// What pass 2 and the gradient take from a row's statistics: 1/Zs, 1/Zt, L = ln Zs - ln Zt, JSD's
// one-sided log ratios; after pass 2, g (kind 2: R/Zs = sum p x; kind 3: Jp/Zs = sum p lp) and TVD's
// coefficients c_k (the header).
struct RowConst {
    float inv_Zs, inv_Zt, L;
    float lp_alone, lq_alone;   // -log(1 - beta): the student alone has mass; -log beta: the teacher alone
    float log_r;                // log(beta / (1 - beta))
    float top;                  // kind 2: x, kind 3: lp + log(1 - beta), at the student's maximum (s = ms, t = ts)
    float g, c_plus, c_minus, c_zero;
    bool infinite;              // kind 2: D = +inf
};

__device__ __forceinline__ bool second_pass(const Params& p) { return p.soft != 0.f && p.kind >= KIND_REVERSE_KL; }

// log(a + b e^x), a, b >= 0, a + b = 1: the log of JSD's mixture over one of its parts (m/q = beta +
// (1-beta) e^d, m/p = (1-beta) + beta e^-d). Near x = 0, where the ratio cancels, the reference's
// log1p(b expm1(x)) (divergences._jsd_log_ratios); for |x| > 1 a sum of two non-negative terms with
// the larger factored out: no cancellation, no overflow (expm1f overflows past x = 88), and accurate
// for a or b near 0 (where log1p's argument would near -1).
__device__ __forceinline__ float log_mix(float x, float a, float b) {
    if (fabsf(x) <= 1.f) return log1pf(b * expm1f(x));
    return x > 0.f ? x + logf(b + a * expf(-x)) : logf(a + b * expf(x));
}

// log(1 + e^z) without overflow, accurate where it is tiny (z << 0)
__device__ __forceinline__ float softplus(float z) { return z > 0.f ? z + log1pf(expf(-z)) : log1pf(expf(z)); }

// For a class where the student has mass, from ds = s - ms, dt = t - mt: kind 2's x = (ds - dt)/T;
// kind 3's lp = log p - log m (for the loss) and ap = lp + log(1 - beta) = -log(1 + r e^-d),
// r = beta / (1 - beta) (for the gradient, where a constant shift of lp cancels: without the
// constant -log(1 - beta), which every class's lp nears where the teacher has little mass, the
// differences ap_k - ap_top keep their digits). One expression each, so that the class at the
// student's maximum gives bit for bit the `top` of row_constants.
__device__ __forceinline__ float x_of(float ds, float dt, const Params& p) { return (ds - dt) * p.inv_T; }
__device__ __forceinline__ float lp_of(float ds, float dt, bool qs, const RowConst& c, const Params& p) {
    return qs ? -log_mix(-(x_of(ds, dt, p) - c.L), p.beta_c, p.beta) : c.lp_alone;
}
__device__ __forceinline__ float ap_of(float ds, float dt, bool qs, const RowConst& c, const Params& p) {
    return qs ? -softplus(c.log_r - (x_of(ds, dt, p) - c.L)) : 0.f;
}

// The gradient's projection sum_c p_c a_c cancels against a_k at the student's dominant class when
// p is nearly one-hot (1 - p_top below float32's resolution of a_top). Pass 2 therefore also sums
//   H = sum_c es_c (a_top - a_c),   so that   a_k - sum_c p_c a_c = (a_k - a_top) + H / Zs,
// which is 0 + a small sum of small terms at the top class (the reference recomputes that entry
// as minus the sum of the others, _balance: the same accuracy). top: a at s = ms, t = ts.
__device__ __forceinline__ void set_top(RowConst& c, const State& a, const Params& p) {
    const float dt = a.ts - a.mt;   // ds = 0
    if (p.kind == KIND_REVERSE_KL) c.top = x_of(0.f, dt, p);
    else if (p.kind == KIND_JSD) c.top = ap_of(0.f, dt, a.ts > -CUDART_INF_F, c, p);
}

// For an unflagged row (Zs, Zt >= 1: each holds its maximum's 2^0).
__device__ __forceinline__ RowConst row_constants(const State& a, const Params& p) {
    RowConst c;
    c.inv_Zs = 1.f / a.Zs;
    c.inv_Zt = 1.f / a.Zt;
    c.L = logf(a.Zs) - logf(a.Zt);
    c.lp_alone = -logf(p.beta_c);
    c.lq_alone = -logf(p.beta);
    c.log_r = c.lp_alone - c.lq_alone;
    c.g = 0.f; c.c_plus = 0.f; c.c_minus = 0.f; c.c_zero = 0.f;
    c.infinite = false;
    c.top = 0.f;
    set_top(c, a, p);
    return c;
}

// One element's share of pass 2's sums (kind 2: R, H; kind 3: Jq, Jp, H; kind 4: V, P+, P-, P0);
// `c` from row_constants and set_top.
__device__ __forceinline__ void add_second(Second& acc, float s, float t, const State& a, const RowConst& c,
                                           const Params& p) {
    const bool ps = s > -CUDART_INF_F, qs = t > -CUDART_INF_F;   // the student / teacher has mass here
    const float ds = s - a.ms, dt = t - a.mt;
    const float es = ps ? exp2f(ds * p.k) : 0.f;
    if (p.kind == KIND_REVERSE_KL) {
        if (!ps) return;
        if (!qs) {   // p log(p/0) = +inf, even where es underflows (p > 0 all the same)
            acc.v0 += CUDART_INF_F;
            return;
        }
        const float x = x_of(ds, dt, p);
        acc.v0 += es * x;
        acc.v1 += es * (c.top - x);
        return;
    }
    const float et = qs ? exp2f(dt * p.k) : 0.f;
    if (p.kind == KIND_JSD) {   // a side whose weight is 0 (beta rounded to 0 or 1) adds nothing, not 0 * inf
        if (qs && p.beta > 0.f)
            acc.v0 -= et * (ps ? log_mix(x_of(ds, dt, p) - c.L, p.beta, p.beta_c) : -c.lq_alone);
        if (ps && p.beta_c > 0.f) {
            acc.v1 += es * lp_of(ds, dt, qs, c, p);
            acc.v2 += es * (c.top - ap_of(ds, dt, qs, c, p));
        }
        return;
    }
    const float pc = es * c.inv_Zs, qc = et * c.inv_Zt;   // kind 4; 0 and 0 where neither has mass
    acc.v0 += fabsf(pc - qc);
    if (pc > qc) acc.v1 += pc;
    else if (pc < qc) acc.v2 += pc;
    else acc.v3 += pc;
}

// The row's pass-2 constants from its summed Second.
__device__ __forceinline__ void second_constants(RowConst& c, const Second& b, const State& a, const Params& p) {
    if (p.kind == KIND_REVERSE_KL) {
        c.infinite = b.v0 == CUDART_INF_F;
        c.g = b.v1 / a.Zs;
    } else if (p.kind == KIND_JSD) {
        c.g = b.v2 / a.Zs;
    } else {
        c.c_plus = b.v2 + 0.5f * b.v3;
        c.c_minus = -(b.v1 + 0.5f * b.v3);
        c.c_zero = 0.5f * (b.v2 - b.v1);
    }
}

// es_k times what multiplies it in dD/ds_k (T Zs) for kinds 2-4 (the header); es = 2^((s - ms) k),
// computed by the caller exactly as pass 2 computed it (TVD's sign must be the same in both).
__device__ __forceinline__ float soft_factor(float s, float t, float es, const State& a, const RowConst& c,
                                             const Params& p) {
    if (p.kind == KIND_REVERSE_KL && c.infinite) return CUDART_NAN_F;   // D = +inf: no gradient
    if (!(s > -CUDART_INF_F)) return 0.f;                               // p = 0
    const bool qs = t > -CUDART_INF_F;
    const float ds = s - a.ms, dt = t - a.mt;
    if (p.kind == KIND_REVERSE_KL) return es * ((x_of(ds, dt, p) - c.top) + c.g);   // qs: else D = +inf
    if (p.kind == KIND_JSD) return p.beta_c > 0.f ? p.beta_c * es * ((ap_of(ds, dt, qs, c, p) - c.top) + c.g) : 0.f;
    const float et = qs ? exp2f(dt * p.k) : 0.f;
    const float pc = es * c.inv_Zs, qc = et * c.inv_Zt;
    return es * (pc > qc ? c.c_plus : pc < qc ? c.c_minus : c.c_zero);
}

// xor butterflies: every lane ends with the same sums (the same tree up to commutation)
__device__ __forceinline__ Second warp_sum(Second b) {
    for (int off = 16; off > 0; off >>= 1) {
        b.v0 += __shfl_xor_sync(0xffffffffu, b.v0, off);
        b.v1 += __shfl_xor_sync(0xffffffffu, b.v1, off);
        b.v2 += __shfl_xor_sync(0xffffffffu, b.v2, off);
        b.v3 += __shfl_xor_sync(0xffffffffu, b.v3, off);
    }
    return b;
}

// A block's pass-2 sums in a fixed tree: each warp by shuffles, then warp 0 over the warps' sums
// (through warp_parts, 32 slots of shared memory). The result is in every lane of warp 0.
__device__ __forceinline__ Second block_sum(Second b, Second* warp_parts) {
    b = warp_sum(b);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, n_warps = blockDim.x >> 5;
    if (lane == 0) warp_parts[warp] = b;
    __syncthreads();
    Second r = empty_second();
    if (warp == 0) {
        if (lane < n_warps) r = warp_parts[lane];
        r = warp_sum(r);
    }
    return r;
}

// ---------------------------------------------------------------- row loss and gradient

// The loss of an unflagged row from its State, pass 2's sums and constants; sy = s_y - ms.
__device__ __forceinline__ float row_loss_value(const State& a, const Second& b, const RowConst& c, float sy,
                                                const Params& p) {
    float loss = 0.f;
    if (p.soft != 0.f) {
        float kd;
        switch (p.kind) {
            case KIND_KL: kd = a.B / a.Zt - logf(a.Zt) + logf(a.Zs); break;
            case KIND_CE: kd = a.B / a.Zt + logf(a.Zs); break;
            case KIND_REVERSE_KL: kd = b.v0 / a.Zs - c.L; break;   // +inf stays +inf
            case KIND_JSD: kd = p.beta * (b.v0 / a.Zt) + p.beta_c * (b.v1 / a.Zs); break;
            default: kd = 0.5f * b.v0; break;
        }
        loss += p.soft * kd;
    }
    if (p.hard != 0.f) loss += p.hard * (logf(a.Z1) - sy);
    return loss;
}

// Row loss and flags from the merged state (one thread per row calls it).
__device__ __forceinline__ void finish_row(const State& a, const Second& b, const RowConst& c, float s_y,
                                           const Params& p, float* row_loss, signed char* flags, long long row) {
    int flag = row_flag(a);
    if (flag) {
        flags[row] = (signed char)flag;
        row_loss[row] = 0.f;
        return;
    }
    row_loss[row] = row_loss_value(a, b, c, s_y - a.ms, p);
}

// One gradient element from the logits; `label` is what the hard term subtracts at the label.
__device__ __forceinline__ float grad_element(float s, float t, bool is_label, const State& a, const RowConst& c,
                                              float cs, float ct, float ch, float label, const Params& p) {
    const float ds = s - a.ms;
    float g = 0.f, es = 0.f;
    if (p.soft != 0.f) {
        es = exp2f(ds * p.k);
        g = p.kind <= KIND_CE ? cs * es - ct * exp2f((t - a.mt) * p.k) : cs * soft_factor(s, t, es, a, c, p);
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
    const bool bad = row_flag(a) != 0;
    Second b = empty_second();
    RowConst rc = {};
    if (!bad) rc = row_constants(a, p);
    if (!bad && second_pass(p)) {   // each lane reads again only the elements it will overwrite itself
        for (int c = lane; c < p.C; c += 32) add_second(b, to_f(s[base + c]), to_f(t[base + c]), a, rc, p);
        b = warp_sum(b);
        second_constants(rc, b, a, p);
    }
    if (lane == 0) finish_row(a, b, rc, s_y, p, row_loss, flags, row);
    if (bad) {
        for (int c = lane; c < p.C; c += 32) out[base + c] = from_f<T>(0.f);
        return;
    }
    float cs, ct, ch;
    coefficients(w, a.Zs, a.Zt, a.Z1, p, cs, ct, ch);
    for (int c = lane; c < p.C; c += 32) {
        float g = grad_element(to_f(s[base + c]), to_f(t[base + c]), c == y, a, rc, cs, ct, ch, ch * a.Z1, p);
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
// operations against more warps per SM, settled by the benchmark's variants. Kinds 2-4 keep the
// logits in either form (pass 2 and the gradient take their exponentials again from them).
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
    float ts = -CUDART_INF_F;                        // the teacher where the student has its maximum
    if (p.kind == KIND_REVERSE_KL || p.kind == KIND_JSD) {
#pragma unroll
        for (int j = 0; j < ELEMS; ++j) ts = sv[j] == ms ? fmaxf(ts, tv[j]) : ts;
        ts = group_max<LANES>(ts);
    }
    // The sums; each element's three exponentials then replace its logits in registers (sv <- es,
    // tv <- et, e1v <- e1): the gradient needs only them, so each is computed once, not twice.
    float Zs = 0.f, Z1 = 0.f, Zt = 0.f, B = 0.f, sy = 0.f;
    float e1v[KEEP ? ELEMS : 1];
    const bool keep = KEEP && p.kind <= KIND_CE;
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
                const float d = p.kind == KIND_KL ? (dt - ds) * p.inv_T : -ds * p.inv_T;   // +inf: the true, infinite KL
                if (et > 0.f && p.kind <= KIND_CE) B += et * d;
            }
            Zs += es;
            Z1 += e1;
            Zt += et;
            if (j * LANES + sub == y) sy = ds;       // CE needs s_y - ms
            if (keep) {
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
    State a;
    a.ms = ms; a.mt = mt; a.Zs = Zs; a.Z1 = Z1; a.Zt = Zt; a.B = B; a.ts = ts; a.bad_s = bad_s; a.bad_t = bad_t;
    const int flag = live ? row_flag(a) : 0;
    const bool zero = !live || flag;
    Second b = empty_second();
    RowConst rc = {};
    if (!zero) rc = row_constants(a, p);
    if (second_pass(p)) {   // the same for every lane: all take part in the shuffles
        if (!zero) {
#pragma unroll
            for (int j = 0; j < ELEMS; ++j) add_second(b, sv[j], tv[j], a, rc, p);   // padding: -inf, adds 0
        }
        b.v0 = group_sum<LANES>(b.v0);
        b.v1 = group_sum<LANES>(b.v1);
        b.v2 = group_sum<LANES>(b.v2);
        b.v3 = group_sum<LANES>(b.v3);
        if (!zero) second_constants(rc, b, a, p);
    }
    if (!active) return;                             // after the last shuffle
    if (sub == 0) {
        if (flag) flags[row] = (signed char)flag;
        row_loss[row] = zero ? 0.f : row_loss_value(a, b, rc, sy, p);
    }
    float cs = 0.f, ct = 0.f, ch = 0.f;
    if (!zero) coefficients(w, Zs, Zt, Z1, p, cs, ct, ch);
    const float wh = zero ? 0.f : w * p.hard;
#pragma unroll
    for (int j = 0; j < ELEMS; ++j) {
        const int c = j * LANES + sub;
        if (c < p.C) {
            float g = 0.f;
            if (!zero && keep) {   // the stored exponentials
                g = cs * sv[j] - ct * tv[j] + ch * e1v[KEEP ? j : 0] - (c == y ? wh : 0.f);
            } else if (!zero) {    // computed again from the logits
                g = grad_element(sv[j], tv[j], c == y, a, rc, cs, ct, ch, wh, p);
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
    __shared__ Second warp_sums[32];
    __shared__ Second row_sums;
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
    const bool bad = row_flag(a) != 0;
    Second sums = empty_second();
    RowConst rc = {};
    if (!bad) rc = row_constants(a, p);
    if (!bad && second_pass(p)) {   // the same for every thread of the block
        // the row read again: no thread writes a gradient before block_sum's barrier
        if (VEC > 1) {
            const Pack<T, VEC>* sv = reinterpret_cast<const Pack<T, VEC>*>(s + base);
            const Pack<T, VEC>* tv = reinterpret_cast<const Pack<T, VEC>*>(t + base);
            for (int i = threadIdx.x; i < n_vec; i += blockDim.x) {
                Pack<T, VEC> xs = sv[i], xt = tv[i];
#pragma unroll
                for (int j = 0; j < VEC; ++j) add_second(sums, to_f(xs.v[j]), to_f(xt.v[j]), a, rc, p);
            }
        } else {
            for (int c = threadIdx.x; c < p.C; c += blockDim.x)
                add_second(sums, to_f(s[base + c]), to_f(t[base + c]), a, rc, p);
        }
        sums = block_sum(sums, warp_sums);
        if (threadIdx.x == 0) row_sums = sums;
        __syncthreads();
        sums = row_sums;
        second_constants(rc, sums, a, p);
    }
    if (threadIdx.x == 0) finish_row(a, sums, rc, s_y, p, row_loss, flags, row);
    if (bad) {
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
                g.v[j] = from_f<T>(grad_element(to_f(xs.v[j]), to_f(xt.v[j]), (long long)i * VEC + j == y, a, rc, cs, ct,
                                                ch, ch * a.Z1, p));
            ov[i] = g;   // 16-byte store
        }
    } else {
        for (int c = threadIdx.x; c < p.C; c += blockDim.x)
            out[base + c] = from_f<T>(grad_element(to_f(s[base + c]), to_f(t[base + c]), c == y, a, rc, cs, ct, ch,
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
// Kinds 2-4 run pass 2 over the chunk in shared memory and exchange its sums (Second) the same way.
// Shared memory: SMEM_HEAD bytes of States and sums, then the student chunk, then the teacher chunk.
#define SMEM_HEAD 1280   // >= 34 States of 36 bytes and 2 Seconds of 16, a multiple of 128
static_assert(34 * sizeof(State) + 2 * sizeof(Second) <= SMEM_HEAD, "the cluster kernel's head");
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
    Second* block_sums = reinterpret_cast<Second*>(warp_states + 34);   // pass 2: this block's chunk
    Second* row_sums = block_sums + 1;                      // pass 2: the whole row
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
    const bool bad = row_flag(a) != 0;
    Second sums = empty_second();
    RowConst rc = {};
    if (!bad) rc = row_constants(a, p);
    if (!bad && second_pass(p)) {   // the same in every block of the cluster (the same State)
        for (int i = tid; i < n; i += nthreads) {
            const P xs = ss[i], xt = ts[i];
#pragma unroll
            for (int k = 0; k < VEC; ++k) add_second(sums, to_f(xs.v[k]), to_f(xt.v[k]), a, rc, p);
        }
        // warp_states is free again (its last reads were before the cluster barrier above)
        sums = block_sum(sums, reinterpret_cast<Second*>(warp_states));
        if (tid == 0) *block_sums = sums;
        cluster_barrier<CL>();   // every block's sums are written
        if (warp == 0) {
            Second r = empty_second();
            if (lane < CL) r = CL > 1 ? *minikd_cluster_map(block_sums, (unsigned)lane) : *block_sums;
            r = warp_sum(r);     // the same inputs in the same lanes: the same sums in every block
            if (lane == 0) *row_sums = r;
        }
        __syncthreads();
        sums = *row_sums;
        second_constants(rc, sums, a, p);
    }
    if (rank == 0 && tid == 0) finish_row(a, sums, rc, s_y, p, row_loss, flags, row);
    float cs, ct, ch;
    coefficients(w, a.Zs, a.Zt, a.Z1, p, cs, ct, ch);
    for (int i = tid; i < n; i += nthreads) {
        const P xs = ss[i], xt = ts[i];
        P g;
#pragma unroll
        for (int k = 0; k < VEC; ++k)
            g.v[k] = from_f<T>(bad ? 0.f : grad_element(to_f(xs.v[k]), to_f(xt.v[k]), (long long)(v0 + i) * VEC + k == y,
                                                        a, rc, cs, ct, ch, ch * a.Z1, p));
        og[i] = g;   // 16-byte store
    }
    if (CL > 1) minikd_cluster_sync();   // no block leaves while another may still read its block_state / block_sums
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
// carries the divergence in bits 0-2 (KIND_KL ... KIND_TVD) and `share` (T == 1) in bit 3; beta and
// beta_c (1 - beta) are JSD's (kind 3; any value for the others).
#define KERNEL_ARGS(T)                                                                                     \
    const T *s, const T *t, const long long *labels, const float *weights, long long N, int C, float k,    \
        float inv_T, float soft, float hard, int kind, float beta, float beta_c, T *out, float *row_loss,  \
        signed char *flags
#define MAKE_PARAMS Params p; p.N = N; p.C = C; p.k = k; p.inv_T = inv_T; p.soft = soft; p.hard = hard; \
    p.kind = kind & 7; p.share = (kind >> 3) & 1; p.beta = beta; p.beta_c = beta_c;

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
