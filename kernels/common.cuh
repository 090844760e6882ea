// Small device helpers shared by every kernel family.
//
// Compiles two ways:
//   - under NVRTC for a real GPU (the include path holds the cuda-runtime
//     wheel's headers): inline PTX for mma / ldmatrix / cp.async;
//   - as host C++ under the CPU emulator (`-DCUDA_EMU`, kernels/emu/emu.h):
//     plain C++ fallbacks that compute the same thing lane by lane.
//
// Contents:
//   FULL_MASK, WARP_SIZE
//   warp_sum, warp_max                 butterfly reductions, every lane gets the result
//   to_float / from_float<T>           float <-> float, __nv_bfloat16, __half
//   mma_m16n8k16_bf16(d, a, b, c)      d = a·b + c on one warp (tensor cores)
//   mma_m16n8k32_s8(d, a, b)           d = a·b, int8 in, exact int32 out
//   ldmatrix_x4(r, p)                  four 8x8 b16 matrices from shared memory
//   cp_async_16, cp_async_commit, cp_async_wait<N>, cp_async_wait_all
//   dropout_keeps(seed, i, p)          the dropout mask, the CPU device's bit for bit
//
// Fragment layout of mma.sync.m16n8k16 (PTX ISA, "Matrix Fragments for
// mma.m16n8k16"), with g = lane / 4 and t = lane % 4; each 32-bit register
// holds two bf16, the lower column / row index in the low half:
//   A (16x16, row-major) a[0] = A[g][2t..2t+1]     a[1] = A[g+8][2t..2t+1]
//                        a[2] = A[g][2t+8..2t+9]   a[3] = A[g+8][2t+8..2t+9]
//   B (16x8, "col")      b[0] = B[2t..2t+1][g]     b[1] = B[2t+8..2t+9][g]
//   C, D (16x8, f32)     c[0..1] = C[g][2t..2t+1]  c[2..3] = C[g+8][2t..2t+1]
// m16n8k32 with int8 has the same layout in 32-bit words, each holding four
// int8 along k (the lowest k in the low byte): a[0] = A[g][4t..4t+3],
// a[1] = A[g+8][4t..4t+3], a[2] = A[g][4t+16..4t+19], a[3] = A[g+8][4t+16..],
// b[0] = B[4t..4t+3][g], b[1] = B[4t+16..4t+19][g]; D as C above, int32.
#pragma once

#if defined(CUDA_EMU)
#include "emu/emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#define WARP_SIZE 32
#define FULL_MASK 0xffffffffu

// ---------------------------------------------------------------- reductions

// Sum of v over the 32 lanes of a full warp; every lane gets the result.
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

// Maximum of v over the 32 lanes of a full warp; every lane gets the result.
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// ---------------------------------------------------------------- conversions

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

// Round to nearest even, as the CPU device's `half` crate does.
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// Two bf16 packed into one 32-bit register (low half = lo), as mma wants them.
__device__ __forceinline__ unsigned pack_bf16x2(__nv_bfloat16 lo, __nv_bfloat16 hi) {
    unsigned short l = *reinterpret_cast<unsigned short*>(&lo);
    unsigned short h = *reinterpret_cast<unsigned short*>(&hi);
    return (unsigned)l | ((unsigned)h << 16);
}

// ---------------------------------------------------------------- tensor cores

#if defined(CUDA_EMU)
namespace emu_detail {
__device__ __forceinline__ float bf16_lo(unsigned r) {
    return __uint_as_float(r << 16);
}
__device__ __forceinline__ float bf16_hi(unsigned r) {
    return __uint_as_float(r & 0xffff0000u);
}
}  // namespace emu_detail
#endif

// d = a·b + c for one 16x8x16 tile, f32 accumulate. All 32 lanes of the warp
// must call it together (as mma.sync requires). d may alias c.
__device__ __forceinline__ void mma_m16n8k16_bf16(float d[4], const unsigned a[4],
                                                  const unsigned b[2], const float c[4]) {
#if defined(CUDA_EMU)
    // Each lane stages its fragments in the warp's staging area, then computes
    // its own four outputs from the whole tiles.
    float* A = reinterpret_cast<float*>(emu_warp_scratch());  // [16][16]
    float* B = A + 16 * 16;                                    // [16][8], k-major
    const int lane = emu_lane_id();
    const int g = lane / 4, t = lane % 4;
    using emu_detail::bf16_hi;
    using emu_detail::bf16_lo;
    A[g * 16 + 2 * t] = bf16_lo(a[0]);
    A[g * 16 + 2 * t + 1] = bf16_hi(a[0]);
    A[(g + 8) * 16 + 2 * t] = bf16_lo(a[1]);
    A[(g + 8) * 16 + 2 * t + 1] = bf16_hi(a[1]);
    A[g * 16 + 2 * t + 8] = bf16_lo(a[2]);
    A[g * 16 + 2 * t + 9] = bf16_hi(a[2]);
    A[(g + 8) * 16 + 2 * t + 8] = bf16_lo(a[3]);
    A[(g + 8) * 16 + 2 * t + 9] = bf16_hi(a[3]);
    B[(2 * t) * 8 + g] = bf16_lo(b[0]);
    B[(2 * t + 1) * 8 + g] = bf16_hi(b[0]);
    B[(2 * t + 8) * 8 + g] = bf16_lo(b[1]);
    B[(2 * t + 9) * 8 + g] = bf16_hi(b[1]);
    __syncwarp();
    float out[4];
    for (int i = 0; i < 4; i++) {
        const int row = g + 8 * (i / 2), col = 2 * t + (i % 2);
        float s = c[i];
        for (int k = 0; k < 16; k++) s += A[row * 16 + k] * B[k * 8 + col];
        out[i] = s;
    }
    __syncwarp();
    for (int i = 0; i < 4; i++) d[i] = out[i];
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]),
          "f"(c[1]), "f"(c[2]), "f"(c[3]));
#endif
}

// d = a·b for one 16x8x32 tile of int8, exact in int32 (a k of 32 holds at
// most 32·128² in magnitude). All 32 lanes of the warp call it together.
__device__ __forceinline__ void mma_m16n8k32_s8(int d[4], const unsigned a[4],
                                                const unsigned b[2]) {
#if defined(CUDA_EMU)
    signed char* A = reinterpret_cast<signed char*>(emu_warp_scratch());  // [16][32]
    signed char* B = A + 16 * 32;                                         // [8][32], k inner
    const int lane = emu_lane_id();
    const int g = lane / 4, t = lane % 4;
    for (int i = 0; i < 4; i++) {
        A[g * 32 + 4 * t + i] = (signed char)(a[0] >> (8 * i));
        A[(g + 8) * 32 + 4 * t + i] = (signed char)(a[1] >> (8 * i));
        A[g * 32 + 4 * t + 16 + i] = (signed char)(a[2] >> (8 * i));
        A[(g + 8) * 32 + 4 * t + 16 + i] = (signed char)(a[3] >> (8 * i));
        B[g * 32 + 4 * t + i] = (signed char)(b[0] >> (8 * i));
        B[g * 32 + 4 * t + 16 + i] = (signed char)(b[1] >> (8 * i));
    }
    __syncwarp();
    int out[4];
    for (int i = 0; i < 4; i++) {
        const int row = g + 8 * (i / 2), col = 2 * t + (i % 2);
        int s = 0;
        for (int k = 0; k < 32; k++) s += (int)A[row * 32 + k] * (int)B[col * 32 + k];
        out[i] = s;
    }
    __syncwarp();
    for (int i = 0; i < 4; i++) d[i] = out[i];
#else
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %10, %10, %10};\n"
        : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(0));
#endif
}

// Loads four 8x8 matrices of 16-bit elements from shared memory. Lanes
// 8i..8i+7 give the addresses of the 8 rows (16 bytes each, 16-byte aligned)
// of matrix i; lane l receives in r[i] the elements (l/4, 2(l%4)) and
// (l/4, 2(l%4)+1) of matrix i. All 32 lanes must call it together.
__device__ __forceinline__ void ldmatrix_x4(unsigned r[4], const void* smem_row) {
#if defined(CUDA_EMU)
    const unsigned char** rows = reinterpret_cast<const unsigned char**>(emu_warp_scratch());
    const int lane = emu_lane_id();
    rows[lane] = static_cast<const unsigned char*>(smem_row);
    __syncwarp();
    unsigned out[4];
    for (int i = 0; i < 4; i++) {
        const unsigned char* p = rows[8 * i + lane / 4] + 4 * (lane % 4);
        unsigned v;
        memcpy(&v, p, 4);
        out[i] = v;
    }
    __syncwarp();
    for (int i = 0; i < 4; i++) r[i] = out[i];
#else
    unsigned addr = (unsigned)__cvta_generic_to_shared(smem_row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
#endif
}

// ---------------------------------------------------------------- async copies

// Copies 16 bytes global -> shared without going through registers (sm_80+).
// Both addresses 16-byte aligned. On the emulator: a plain copy.
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src) {
#if defined(CUDA_EMU)
    memcpy(smem_dst, gmem_src, 16);
#else
    unsigned addr = (unsigned)__cvta_generic_to_shared(smem_dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(addr), "l"(gmem_src));
#endif
}

// Closes the group of cp_async_16 issued so far by this thread.
__device__ __forceinline__ void cp_async_commit() {
#if !defined(CUDA_EMU)
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most N committed groups of this thread are still in flight.
// (Other threads' copies need a __syncthreads as well.)
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if !defined(CUDA_EMU)
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

__device__ __forceinline__ void cp_async_wait_all() {
#if !defined(CUDA_EMU)
    asm volatile("cp.async.wait_all;\n" ::);
#endif
}

// ---------------------------------------------------------------- dropout

// Whether inverted dropout keeps element i under seed: the top 24 bits of a
// SplitMix64 hash of (seed, i), as u in [0, 1), against p. Bit for bit the
// CPU device's `dropout_keeps`.
__device__ __forceinline__ bool dropout_keeps(unsigned long long seed, unsigned long long i,
                                              float p) {
    unsigned long long z = seed ^ (i * 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    float u = (float)(unsigned)(z >> 40) / 16777216.0f;
    return u >= p;
}

// ---------------------------------------------------------------- attention rows

// The largest finite float, negated: the start of a running maximum (NVRTC has
// no INFINITY macro, and exp(-FLT_MAX_F - m) is exactly 0 as -inf would give).
#define FLT_MAX_F 3.402823466e+38f

#define ATT_WARPS 4
#define ATT_MAX_HD 256
#define ATT_PER_LANE (ATT_MAX_HD / 32)

// One query row of one head over keys 0..len-1, by the block's ATT_WARPS warps
// (block 32*ATT_WARPS): out_row = softmax(q_row·k_j / sqrt(hd)) · v_j. Key j's
// row starts at k + key(j) and its value's at v + key(j): `Keys` maps a
// position to its row (contiguous in attention.cu, through a block table in
// paged.cu). Each warp runs an online softmax over keys warp, warp + ATT_WARPS,
// ...; the warps' partials are merged through shared memory. Requires
// hd <= ATT_MAX_HD.
template <typename Keys>
__device__ void attend_row(__nv_bfloat16* out_row, const __nv_bfloat16* q_row,
                           const __nv_bfloat16* k, const __nv_bfloat16* v, Keys key, int hd,
                           int len) {
    __shared__ float part_m[ATT_WARPS], part_l[ATT_WARPS];
    __shared__ float part_acc[ATT_WARPS][ATT_MAX_HD];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const float scale = rsqrtf((float)hd);

    float qr[ATT_PER_LANE], acc[ATT_PER_LANE];
    for (int t = 0; t < ATT_PER_LANE; t++) {
        int c = lane + 32 * t;
        qr[t] = c < hd ? __bfloat162float(q_row[c]) : 0.0f;
        acc[t] = 0.0f;
    }
    float m = -FLT_MAX_F, l = 0.0f;
    for (int j = warp; j < len; j += ATT_WARPS) {
        const size_t at = key(j);
        const __nv_bfloat16* kj = k + at;
        float s = 0.0f;
        for (int t = 0; t < ATT_PER_LANE; t++) {
            int c = lane + 32 * t;
            if (c < hd) s += qr[t] * __bfloat162float(kj[c]);
        }
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
        s *= scale;
        float m_new = fmaxf(m, s);
        float corr = expf(m - m_new), p = expf(s - m_new);
        l = l * corr + p;
        const __nv_bfloat16* vj = v + at;
        for (int t = 0; t < ATT_PER_LANE; t++) {
            int c = lane + 32 * t;
            acc[t] = acc[t] * corr + (c < hd ? p * __bfloat162float(vj[c]) : 0.0f);
        }
        m = m_new;
    }
    if (lane == 0) {
        part_m[warp] = m;
        part_l[warp] = l;
    }
    for (int t = 0; t < ATT_PER_LANE; t++) {
        int c = lane + 32 * t;
        if (c < hd) part_acc[warp][c] = acc[t];
    }
    __syncthreads();
    // Merge: warps that saw no key have m = -FLT_MAX_F and weigh exp(...) = 0.
    float big = -FLT_MAX_F;
    for (int w = 0; w < ATT_WARPS; w++) big = fmaxf(big, part_m[w]);
    float total = 0.0f;
    for (int w = 0; w < ATT_WARPS; w++) total += part_l[w] * expf(part_m[w] - big);
    for (int c = threadIdx.x; c < hd; c += blockDim.x) {
        float o = 0.0f;
        for (int w = 0; w < ATT_WARPS; w++) o += part_acc[w][c] * expf(part_m[w] - big);
        out_row[c] = __float2bfloat16(o / total);
    }
}
