// The kernels of kernels/softmax_kl.cu, unchanged, on the CPU emulator (emu.h), behind one
// C entry point for ctypes: emu_run(name, grid, block, shared bytes, cluster size, args), where
// args points to the argument values in the order of the kernel's parameters (as cuLaunchKernel).
#include "emu.h"
#include MINIKD_KERNEL_SOURCE

#include <functional>
#include <map>

// Two deliberately wrong kernels: the tests check that the emulator catches what they do wrong.
// Reads its shared-memory copy before waiting for the cp.async: sees the poison (NaN), not x.
extern "C" __global__ void broken_read_before_wait(const float* x, float* y) {
    float* buf = reinterpret_cast<float*>(minikd_dynamic_smem());
    minikd_cp_async16(buf + 4 * threadIdx.x, x + 4 * threadIdx.x);
    minikd_cp_async_commit();
    y[threadIdx.x] = buf[4 * threadIdx.x];
    minikd_cp_async_wait<0>();
}
// Odd lanes leave before a full-warp shuffle.
extern "C" __global__ void broken_shuffle_after_exit(const float* x, float* y) {
    if (threadIdx.x & 1) return;
    y[threadIdx.x] = __shfl_xor_sync(0xffffffffu, x[threadIdx.x], 1);
}

// KERNEL_ARGS of softmax_kl.cu, in order
template <typename T>
using KernelFn = void (*)(const T*, const T*, const long long*, const float*, long long, int, float, float, float,
                          float, int, float, float, T*, float*, signed char*);

template <typename T> std::function<void(void**)> bind(KernelFn<T> f) {
    return [f](void** a) {
        f(*(const T**)a[0], *(const T**)a[1], *(const long long**)a[2], *(const float**)a[3], *(long long*)a[4],
          *(int*)a[5], *(float*)a[6], *(float*)a[7], *(float*)a[8], *(float*)a[9], *(int*)a[10], *(float*)a[11],
          *(float*)a[12], *(T**)a[13], *(float**)a[14], *(signed char**)a[15]);
    };
}

#define ROWS_ENTRIES(NAME, T)                                                                       \
    {"softmax_kl_rows_" #NAME "_L1_E4", bind<T>(softmax_kl_rows_##NAME##_L1_E4)},                    \
    {"softmax_kl_rows_" #NAME "_L2_E4", bind<T>(softmax_kl_rows_##NAME##_L2_E4)},                    \
    {"softmax_kl_rows_" #NAME "_L4_E4", bind<T>(softmax_kl_rows_##NAME##_L4_E4)},                    \
    {"softmax_kl_rows_" #NAME "_L8_E4", bind<T>(softmax_kl_rows_##NAME##_L8_E4)},                    \
    {"softmax_kl_rows_" #NAME "_L16_E4", bind<T>(softmax_kl_rows_##NAME##_L16_E4)},                  \
    {"softmax_kl_rows_" #NAME "_L32_E4", bind<T>(softmax_kl_rows_##NAME##_L32_E4)},                  \
    {"softmax_kl_rows_" #NAME "_L32_E8", bind<T>(softmax_kl_rows_##NAME##_L32_E8)},                  \
    {"softmax_kl_rows_" #NAME "_L32_E16", bind<T>(softmax_kl_rows_##NAME##_L32_E16)},                \
    {"softmax_kl_rows_" #NAME "_L32_E32", bind<T>(softmax_kl_rows_##NAME##_L32_E32)},                \
    {"softmax_kl_rows_recompute_" #NAME "_L32_E8", bind<T>(softmax_kl_rows_recompute_##NAME##_L32_E8)},   \
    {"softmax_kl_rows_recompute_" #NAME "_L32_E16", bind<T>(softmax_kl_rows_recompute_##NAME##_L32_E16)}, \
    {"softmax_kl_rows_recompute_" #NAME "_L32_E32", bind<T>(softmax_kl_rows_recompute_##NAME##_L32_E32)}, \
    {"softmax_kl_warp_" #NAME, bind<T>(softmax_kl_warp_##NAME)},                                     \
    {"softmax_kl_block_" #NAME, bind<T>(softmax_kl_block_##NAME)},                                   \
    {"softmax_kl_block_vec_" #NAME, bind<T>(softmax_kl_block_vec_##NAME)},                           \
    {"softmax_kl_cluster_" #NAME "_c1", bind<T>(softmax_kl_cluster_##NAME##_c1)},                    \
    {"softmax_kl_cluster_" #NAME "_c2", bind<T>(softmax_kl_cluster_##NAME##_c2)},                    \
    {"softmax_kl_cluster_" #NAME "_c4", bind<T>(softmax_kl_cluster_##NAME##_c4)},                    \
    {"softmax_kl_cluster_" #NAME "_c8", bind<T>(softmax_kl_cluster_##NAME##_c8)},                    \
    {"softmax_kl_cluster_" #NAME "_c16", bind<T>(softmax_kl_cluster_##NAME##_c16)}

static const std::map<std::string, std::function<void(void**)>>& table() {
    static const std::map<std::string, std::function<void(void**)>> t = {
        ROWS_ENTRIES(f32, float), ROWS_ENTRIES(f16, __half), ROWS_ENTRIES(bf16, __nv_bfloat16),
        {"sum_rows", [](void** a) { sum_rows(*(const float**)a[0], *(long long*)a[1], *(double**)a[2]); }},
        {"broken_read_before_wait", [](void** a) { broken_read_before_wait(*(const float**)a[0], *(float**)a[1]); }},
        {"broken_shuffle_after_exit", [](void** a) { broken_shuffle_after_exit(*(const float**)a[0], *(float**)a[1]); }},
    };
    return t;
}

// 0: ran without complaint; 1: unknown kernel; 2: the emulator saw undefined behaviour (err says what)
extern "C" int emu_run(const char* name, unsigned grid, unsigned block, unsigned long long smem, unsigned cluster,
                       void** args, char* err, int err_len) {
    auto it = table().find(name);
    if (it == table().end()) return 1;
    emu::n_errors = 0;
    emu::error_claimed = false;
    emu::first_error.clear();
    const auto& body = it->second;
    emu_launch(grid, block, (size_t)smem, cluster, [&] { body(args); });
    if (emu::n_errors) {
        std::snprintf(err, (size_t)err_len, "%s", emu::first_error.c_str());
        return 2;
    }
    return 0;
}
