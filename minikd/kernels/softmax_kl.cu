// Fused softmax-KL on the GPU: the KD loss and its student gradient in one launch.
//
// Per row (s, t student and teacher logits, T the temperature, y the label, w the row weight):
//   p = softmax(s/T), q = softmax(t/T), p1 = softmax(s)
//   loss_row = soft * KD + hard * CE,   KD = KL(q||p) (kind 0) or H(q, p) (kind 1)
//   grad     = w * (soft/T * (p - q) + hard * (p1 - onehot(y)))      soft = alpha T^2, hard = 1 - alpha
// (the derivation is in minikd/losses/kd.py; this file implements the same formulas).
// ``out`` may be ``s`` itself (in place), so ``s`` carries no __restrict__, and every read of s
// that another thread's gradient write could follow (s_y) happens before a synchronization.
//
// One pass computes, online, the row maxima ms, mt and the sums
//   Zs = sum 2^((s - ms) k),  Z1 = sum 2^((s - ms) log2 e),  Zt = sum 2^((t - mt) k),  k = log2(e)/T
//   B  = sum_{t > -inf} 2^((t - mt) k) * d,  d = ((t - mt) - (s - ms))/T (kind 0) or -(s - ms)/T (kind 1)
// so that KL = B/Zt - ln Zt + ln Zs and H = B/Zt + ln Zs, CE = ln Z1 - (s_y - ms).
// When a running maximum grows, the sums are rescaled (the online softmax of Milakov & Gimelshein
// 2018): Z *= 2^((m_old - m_new) k); B also shifts because d is measured from the maxima:
//   B <- f (B + Zt ((ms_new - ms_old) - [kind 0] (mt_new - mt_old)) / T),  f = 2^((mt_old - mt_new) k).
// The same rule merges two partial states (threads of a warp, warps of a block). Shifting by the
// maxima keeps every exponent <= 0 (no overflow for |logits| up to 1e4 and T down to 0.01) and keeps
// d small, so float32 accumulation does not cancel against (ms - mt)/T.
//
// A second pass re-reads the row (from L1/L2: rows of up to a few hundred KB stay resident) and
// writes the gradient once, in the input dtype, possibly over the student (each element is read
// before the same thread writes it, and the whole row's first pass ends at a barrier first).
// The loss is reduced deterministically: per-row values, then one block sums them in a fixed order.
//
// Kernels (extern "C", one per input dtype f32 / f16 / bf16):
//   softmax_kl_warp_*   one warp per row (C up to a few thousand: 10..1000 classes)
//   softmax_kl_block_*  one block per row (C of 32k..256k), 16-byte vector loads when C allows
//   sum_rows            deterministic sum of the per-row losses
// Row flags (in-kernel input checks, valid rows only): 1 = student has NaN/+inf or is all -inf,
// 2 = the same for the teacher; the caller re-checks on the host to raise the exact error.

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#ifndef CUDART_INF_F
#define CUDART_INF_F __int_as_float(0x7f800000)   // as math_constants.h, which NVRTC may not find
#endif

#define LOG2E 1.4426950408889634f

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
    float hard;       // 1 - alpha
    int kind;         // 0: KL(q||p), 1: H(q, p)
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
        a.Zs += exp2f((s - a.ms) * p.k);
        a.Z1 += exp2f((s - a.ms) * LOG2E);
    }
    if (t > -CUDART_INF_F) {
        float e = exp2f((t - a.mt) * p.k);
        // a student class at -inf where the teacher has mass: d = +inf, the true (infinite) KL;
        // written out because (-inf) - (-inf) would be NaN while the row's student max is -inf
        float sd = s == -CUDART_INF_F ? -CUDART_INF_F : s - a.ms;
        float d = p.kind == 0 ? ((t - a.mt) - sd) * p.inv_T : -sd * p.inv_T;
        a.Zt += e;
        a.B += e * d;
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

__device__ __forceinline__ int row_flag(const State& a) {
    return ((a.bad_s || a.ms == -CUDART_INF_F) ? 1 : 0) + ((a.bad_t || a.mt == -CUDART_INF_F) ? 2 : 0);
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
    float loss = 0.f;
    if (p.soft != 0.f) {
        float kd = p.kind == 0 ? a.B / a.Zt - logf(a.Zt) + logf(a.Zs) : a.B / a.Zt + logf(a.Zs);
        loss += p.soft * kd;
    }
    if (p.hard != 0.f) loss += p.hard * (logf(a.Z1) - (s_y - a.ms));
    row_loss[row] = loss;
}

__device__ __forceinline__ float grad_element(float s, float t, bool is_label, const State& a, float cs, float ct,
                                              float ch, const Params& p) {
    float g = cs * exp2f((s - a.ms) * p.k) - ct * exp2f((t - a.mt) * p.k);
    if (p.hard != 0.f) g += ch * exp2f((s - a.ms) * LOG2E) - (is_label ? ch * a.Z1 : 0.f);
    return g;
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
    State a = empty_state();
    for (int c = lane; c < p.C; c += 32) add_element(a, to_f(s[base + c]), to_f(t[base + c]), p);
    // s_y is read before the shuffles of the merge, which no lane passes before all arrive: with
    // out == s (in place) no lane can have overwritten it yet
    const long long y = labels[row];
    const float s_y = to_f(s[base + y]);
    a = warp_merge(a, p);
    if (lane == 0) finish_row(a, s_y, p, row_loss, flags, row);
    if (row_flag(a)) {
        for (int c = lane; c < p.C; c += 32) out[base + c] = from_f<T>(0.f);
        return;
    }
    const float cs = w * p.soft * p.inv_T / a.Zs, ct = w * p.soft * p.inv_T / a.Zt, ch = w * p.hard / a.Z1;
    for (int c = lane; c < p.C; c += 32) {
        float g = grad_element(to_f(s[base + c]), to_f(t[base + c]), c == y, a, cs, ct, ch, p);
        out[base + c] = from_f<T>(g);
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
    a = warp_merge(a, p);
    const long long y = labels[row];
    const float s_y = to_f(s[base + y]);   // before the barriers: pass 2 may overwrite s in place
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, n_warps = blockDim.x >> 5;
    if (lane == 0) warp_states[warp] = a;
    __syncthreads();
    if (warp == 0) {
        State b = lane < n_warps ? warp_states[lane] : empty_state();
        b = warp_merge(b, p);
        if (lane == 0) row_state = b;
    }
    __syncthreads();
    a = row_state;
    if (threadIdx.x == 0) finish_row(a, s_y, p, row_loss, flags, row);
    if (row_flag(a)) {
        for (int c = threadIdx.x; c < p.C; c += blockDim.x) out[base + c] = from_f<T>(0.f);
        return;
    }
    const float cs = w * p.soft * p.inv_T / a.Zs, ct = w * p.soft * p.inv_T / a.Zt, ch = w * p.hard / a.Z1;
    if (VEC > 1) {
        const Pack<T, VEC>* sv = reinterpret_cast<const Pack<T, VEC>*>(s + base);
        const Pack<T, VEC>* tv = reinterpret_cast<const Pack<T, VEC>*>(t + base);
        Pack<T, VEC>* ov = reinterpret_cast<Pack<T, VEC>*>(out + base);
        for (int i = threadIdx.x; i < n_vec; i += blockDim.x) {
            Pack<T, VEC> xs = sv[i], xt = tv[i], g;
#pragma unroll
            for (int j = 0; j < VEC; ++j)
                g.v[j] = from_f<T>(grad_element(to_f(xs.v[j]), to_f(xt.v[j]), (long long)i * VEC + j == y, a, cs, ct, ch, p));
            ov[i] = g;   // 16-byte store
        }
    } else {
        for (int c = threadIdx.x; c < p.C; c += blockDim.x)
            out[base + c] = from_f<T>(grad_element(to_f(s[base + c]), to_f(t[base + c]), c == y, a, cs, ct, ch, p));
    }
}

// ---------------------------------------------------------------- deterministic sum of row losses

extern "C" __global__ void sum_rows(const float* __restrict__ row_loss, long long n, double* __restrict__ total) {
    // one block of 1024 threads; fixed assignment and fixed tree: the same bits on every run
    __shared__ double part[1024];
    double acc = 0.0;
    for (long long i = threadIdx.x; i < n; i += blockDim.x) acc += (double)row_loss[i];
    part[threadIdx.x] = acc;
    __syncthreads();
    for (int stride = blockDim.x >> 1; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) part[threadIdx.x] += part[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0) *total = part[0];
}

// Scalars are passed one by one (not as a struct) so that any launcher can call these.
#define KERNEL_ARGS(T)                                                                                     \
    const T *s, const T *t, const long long *labels, const float *weights, long long N, int C, float k,    \
        float inv_T, float soft, float hard, int kind, T *out, float *row_loss, signed char *flags
#define MAKE_PARAMS Params p; p.N = N; p.C = C; p.k = k; p.inv_T = inv_T; p.soft = soft; p.hard = hard; p.kind = kind;

#define INSTANTIATE(NAME, T)                                                                              \
    extern "C" __global__ void softmax_kl_warp_##NAME(KERNEL_ARGS(T)) {                                    \
        MAKE_PARAMS softmax_kl_warp<T>(s, t, labels, weights, p, out, row_loss, flags);                     \
    }                                                                                                     \
    extern "C" __global__ void softmax_kl_block_##NAME(KERNEL_ARGS(T)) {                                   \
        MAKE_PARAMS softmax_kl_block<T, 1>(s, t, labels, weights, p, out, row_loss, flags);                 \
    }                                                                                                     \
    extern "C" __global__ void softmax_kl_block_vec_##NAME(KERNEL_ARGS(T)) {                               \
        MAKE_PARAMS softmax_kl_block<T, 16 / sizeof(T)>(s, t, labels, weights, p, out, row_loss, flags);    \
    }

INSTANTIATE(f32, float)
INSTANTIATE(f16, __half)
INSTANTIATE(bf16, __nv_bfloat16)
