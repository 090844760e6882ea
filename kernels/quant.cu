// Products and gathers with weights kept in ggml's block formats
// (Backend::matmul_q, Backend::embedding_q). src/quant/dequant.rs has the
// layouts and the reference arithmetic; a weight row is its blocks back to
// back, `row_bytes` long.
//
//   quantize_q8_bf16      x [n, k] bf16 → xq [n, k] int8 and xds [n, k/32]
//                         (d, Σq): each 32 values of a row as d·q, d = max|x|/127
//   matmul_q_TY_OUT       out [n, m] = x · deq(w [m, k])ᵀ, dp4a (decode rows)
//   matmul_q_mma_TY_OUT   the same product on int8 tensor cores (prefill)
//   dequant_rows_OUT      out [r, k] = deq(w[ids[r]]) for every type of
//                         dequant.rs (embedding_q; the other types' products)
// TY: q8_0, q4_0, q4_1, q4_k; OUT: bf16, f32.
//
// The products' unit is 32 values of k: a block, or a sub-block of Q4_K. Its
// weights are w = a·q + b with int quants q (0..15 or −128..127); x's unit is
// d·qx. The unit's integer dot product isum = Σ q·qx is exact, in any order;
// the unit then adds
//   c = d · fma(a, isum, b·Σqx)
// Both kernels make out[i, j] by the same float arithmetic: partial p_g
// accumulates c over the units u ≡ g (mod 8), u ascending (acc = fma(d, t,
// acc)), and out = ((p0 + p1) + (p2 + p3)) + ((p4 + p5) + (p6 + p7)). The
// dp4a kernel's partials are the 8 lanes of a weight row, the mma kernel's its
// 8 warps. Nothing depends on n or on where a row sits in a tile, so a row's
// bits are the same alone or in any batch, through either kernel (the
// batch invariance of Backend::matmul_q).

#include "common.cuh"

// ---------------------------------------------------------------- block formats

// ggml type ids (GgmlType::id in src/quant/dequant.rs).
#define GGML_F32 0
#define GGML_F16 1
#define GGML_Q4_0 2
#define GGML_Q4_1 3
#define GGML_Q5_0 6
#define GGML_Q5_1 7
#define GGML_Q8_0 8
#define GGML_Q4_K 12
#define GGML_Q5_K 13
#define GGML_Q6_K 14
#define GGML_BF16 30

#define NIBBLES 0x0F0F0F0F

// A 32-bit word at a 2-byte aligned address: Q8_0 and Q4_0 blocks are 34 and
// 18 bytes long, so their quants are no better aligned.
__device__ __forceinline__ int load_a2(const unsigned char* p) {
    const unsigned short* h = reinterpret_cast<const unsigned short*>(p);
    return (int)((unsigned)h[0] | ((unsigned)h[1] << 16));
}

__device__ __forceinline__ float load_f16(const unsigned char* p) {
    return __half2float(__ushort_as_half(*reinterpret_cast<const unsigned short*>(p)));
}

// The 4-bit value j (0..32) of a 32-value block: low nibbles of qs[0..16]
// hold values 0..16, high nibbles 16..32.
__device__ __forceinline__ int nibble(const unsigned char* qs, int j) {
    return j < 16 ? qs[j] & 15 : qs[j - 16] >> 4;
}

// The 6-bit scale and min of sub-block j (0..8) of a Q4_K/Q5_K block, from
// its 12 packed bytes.
__device__ __forceinline__ void scale_min_k4(const unsigned char* s, int j, int& sc, int& m) {
    if (j < 4) {
        sc = s[j] & 63;
        m = s[j + 4] & 63;
    } else {
        sc = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
        m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

// The product's types. word(row, u, i): quants 4i..4i+3 of unit u as four
// int8, the lowest in the low byte; ab(row, u): the unit's (a, b).

// { f16 d; i8 qs[32] }: w = d·q.
struct Q8_0 {
    __device__ static int word(const unsigned char* row, int u, int i) {
        return load_a2(row + 34 * u + 2 + 4 * i);
    }
    __device__ static float2 ab(const unsigned char* row, int u) {
        return make_float2(load_f16(row + 34 * u), 0.0f);
    }
};

// { f16 d; u8 qs[16] }: w = d·q − 8d.
struct Q4_0 {
    __device__ static int word(const unsigned char* row, int u, int i) {
        return (load_a2(row + 18 * u + 2 + 4 * (i % 4)) >> (4 * (i / 4))) & NIBBLES;
    }
    __device__ static float2 ab(const unsigned char* row, int u) {
        const float d = load_f16(row + 18 * u);
        return make_float2(d, -8.0f * d);
    }
};

// { f16 d; f16 m; u8 qs[16] }: w = d·q + m.
struct Q4_1 {
    __device__ static int word(const unsigned char* row, int u, int i) {
        const int* qs = reinterpret_cast<const int*>(row + 20 * u + 4);
        return (qs[i % 4] >> (4 * (i / 4))) & NIBBLES;
    }
    __device__ static float2 ab(const unsigned char* row, int u) {
        return make_float2(load_f16(row + 20 * u), load_f16(row + 20 * u + 2));
    }
};

// { f16 d; f16 dmin; u8 scales[12]; u8 qs[128] } per 256 values; unit u is
// sub-block s = u % 8 of block u / 8, in the low (s even) or high nibbles of
// qs[32(s/2)..]: w = (d·sc)·q − dmin·m.
struct Q4_K {
    __device__ static int word(const unsigned char* row, int u, int i) {
        const int s = u % 8;
        const int* qs = reinterpret_cast<const int*>(row + 144 * (u / 8) + 16 + 32 * (s / 2));
        return (qs[i] >> (4 * (s % 2))) & NIBBLES;
    }
    __device__ static float2 ab(const unsigned char* row, int u) {
        const unsigned char* blk = row + 144 * (u / 8);
        int sc, m;
        scale_min_k4(blk + 4, u % 8, sc, m);
        return make_float2(load_f16(blk) * (float)sc, -(load_f16(blk + 2) * (float)m));
    }
};

// Value e of a row of type ty, by the f32 operations of src/quant/dequant.rs
// (so the same bits). Every product of a scale and a quant there is exact
// in f32 but Q6_K's, which both round once.
__device__ float dequant_at(int ty, const unsigned char* row, int e) {
    const int j = e % 32;
    switch (ty) {
        case GGML_F32:
            return reinterpret_cast<const float*>(row)[e];
        case GGML_F16:
            return load_f16(row + 2 * e);
        case GGML_BF16:
            return __bfloat162float(
                __ushort_as_bfloat16(reinterpret_cast<const unsigned short*>(row)[e]));
        case GGML_Q8_0: {
            const unsigned char* b = row + 34 * (e / 32);
            return (float)(signed char)b[2 + j] * load_f16(b);
        }
        case GGML_Q4_0: {
            const unsigned char* b = row + 18 * (e / 32);
            return load_f16(b) * (float)(nibble(b + 2, j) - 8);
        }
        case GGML_Q4_1: {
            const unsigned char* b = row + 20 * (e / 32);
            return load_f16(b) * (float)nibble(b + 4, j) + load_f16(b + 2);
        }
        case GGML_Q5_0: {
            const unsigned char* b = row + 22 * (e / 32);
            const unsigned qh = (unsigned)load_a2(b + 2);
            const int q = nibble(b + 6, j) | (int)((qh >> j) & 1) << 4;
            return load_f16(b) * (float)(q - 16);
        }
        case GGML_Q5_1: {
            const unsigned char* b = row + 24 * (e / 32);
            const unsigned qh = (unsigned)load_a2(b + 4);
            const int q = nibble(b + 8, j) | (int)((qh >> j) & 1) << 4;
            return load_f16(b) * (float)q + load_f16(b + 2);
        }
        case GGML_Q4_K:
        case GGML_Q5_K: {
            const bool five = ty == GGML_Q5_K;
            const unsigned char* b = row + (five ? 176 : 144) * (e / 256);
            const int g = e % 256 / 32;
            int sc, m;
            scale_min_k4(b + 4, g, sc, m);
            const unsigned char* qs = b + (five ? 48 : 16) + 32 * (g / 2);
            int q = (qs[j] >> (4 * (g % 2))) & 15;
            if (five) q |= ((b[16 + j] >> g) & 1) << 4;
            const float scale = load_f16(b) * (float)sc, min = load_f16(b + 2) * (float)m;
            return scale * (float)q - min;
        }
        case GGML_Q6_K: {
            const unsigned char* b = row + 210 * (e / 256);
            const int r = e % 256, h = r / 128, rr = r % 128;
            const int lo = (b[64 * h + rr % 64] >> (4 * (rr / 64))) & 15;
            const int hi = (b[128 + 32 * h + rr % 32] >> (2 * (rr / 32))) & 3;
            const float scale = load_f16(b + 208) * (float)(signed char)b[192 + r / 16];
            return scale * (float)((lo | hi << 4) - 32);
        }
        default:  // the launcher passes only the types above
            return __int_as_float(0x7fc00000);
    }
}

// ---------------------------------------------------------------- x to int8

// One warp per 32 values of x (n·k/32 of them, row-major): lane l quantizes
// value l to q = x/d rounded to even. Grid ceil(units / 8), block 256.
extern "C" __global__ void __launch_bounds__(256)
    quantize_q8_bf16(signed char* xq, float2* xds, const __nv_bfloat16* x, int units) {
    const int unit = blockIdx.x * 8 + threadIdx.x / WARP_SIZE;  // the same for the warp
    if (unit >= units) return;
    const long long e = (long long)unit * 32 + threadIdx.x % WARP_SIZE;
    const float v = __bfloat162float(x[e]);
    const float amax = warp_max(fabsf(v));
    const float d = amax / 127.0f;
    // A subnormal d could round v / d past 127.
    const int q = amax > 0.0f ? max(-127, min(127, (int)rintf(v / d))) : 0;
    xq[e] = (signed char)q;
    int sum = q;
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(FULL_MASK, sum, o);
    if (threadIdx.x % WARP_SIZE == 0) xds[unit] = make_float2(d, (float)sum);
}

// ---------------------------------------------------------------- products

// acc + c for one unit (see the header): the float arithmetic both kernels share.
__device__ __forceinline__ float add_unit(float acc, float2 ab, int isum, float2 xds) {
    const float t = fmaf(ab.x, (float)isum, __fmul_rn(ab.y, xds.y));
    return fmaf(xds.x, t, acc);
}

#define QMV_THREADS 128
#define QMV_ROWS (QMV_THREADS / 8)  // rows of w per block, 8 lanes each
#define QMV_COLS 8                  // rows of x per block

// Version 1, dp4a. Grid (ceil(m / QMV_ROWS), ceil(n / QMV_COLS)), block
// QMV_THREADS. Lanes 8r..8r+7 of a warp own weight row j; lane g takes the
// units g, g + 8, ... of it, loads each once and dots it with the unit of
// each of the block's rows of x. A butterfly over the 8 lanes sums the
// partials; lane c writes x row c's output.
template <typename T, typename Out>
__device__ void matmul_q_mv(Out* out, const unsigned char* w, const signed char* xq,
                            const float2* xds, int n, int m, int k, int row_bytes) {
    const int g = threadIdx.x % 8;
    const int j = blockIdx.x * QMV_ROWS + threadIdx.x / 8;
    const int i0 = blockIdx.y * QMV_COLS;
    const int units = k / 32;
    float acc[QMV_COLS];
#pragma unroll
    for (int c = 0; c < QMV_COLS; c++) acc[c] = 0.0f;
    if (j < m) {
        const unsigned char* row = w + (long long)j * row_bytes;
        for (int u = g; u < units; u += 8) {
            int q[8];
#pragma unroll
            for (int i = 0; i < 8; i++) q[i] = T::word(row, u, i);
            const float2 ab = T::ab(row, u);
#pragma unroll
            for (int c = 0; c < QMV_COLS; c++) {
                if (i0 + c < n) {
                    const long long at = (long long)(i0 + c) * units + u;
                    const int4* xw = reinterpret_cast<const int4*>(xq + at * 32);
                    const int4 lo = xw[0], hi = xw[1];
                    int isum = __dp4a(q[0], lo.x, 0);
                    isum = __dp4a(q[1], lo.y, isum);
                    isum = __dp4a(q[2], lo.z, isum);
                    isum = __dp4a(q[3], lo.w, isum);
                    isum = __dp4a(q[4], hi.x, isum);
                    isum = __dp4a(q[5], hi.y, isum);
                    isum = __dp4a(q[6], hi.z, isum);
                    isum = __dp4a(q[7], hi.w, isum);
                    acc[c] = add_unit(acc[c], ab, isum, xds[at]);
                }
            }
        }
    }
#pragma unroll
    for (int c = 0; c < QMV_COLS; c++) {
        if (i0 + c >= n) break;  // the same for the block: every lane shuffles
        float v = acc[c];
        v += __shfl_xor_sync(FULL_MASK, v, 1);
        v += __shfl_xor_sync(FULL_MASK, v, 2);
        v += __shfl_xor_sync(FULL_MASK, v, 4);
        if (g == c && j < m) out[(long long)(i0 + c) * m + j] = from_float<Out>(v);
    }
}

#define QMM_WARPS 8  // one per partial
#define QMM_THREADS (QMM_WARPS * WARP_SIZE)
#define QMM_X 32  // rows of x per block: 2 mma tiles of 16
#define QMM_W 32  // rows of w per block: 4 mma tiles of 8

// Version 2, int8 tensor cores. Grid (ceil(m / QMM_W), ceil(n / QMM_X)),
// block QMM_THREADS. Every warp computes the block's whole 32×32 tile over
// its own units (warp g: u ≡ g mod 8), one m16n8k32 mma per unit and 16×8
// tile giving the exact isums; fragments come straight from global memory.
// The 8 partial tiles meet in shared memory. Rows past n or m are read as
// the last row (memory that exists) and feed only outputs never written.
template <typename T, typename Out>
__device__ void matmul_q_mm(Out* out, const unsigned char* w, const signed char* xq,
                            const float2* xds, int n, int m, int k, int row_bytes) {
    __shared__ float part[QMM_WARPS][QMM_X * QMM_W];
    const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    const int g = lane / 4, t = lane % 4;
    const int i0 = blockIdx.y * QMM_X, j0 = blockIdx.x * QMM_W;
    const int units = k / 32;
    float acc[2][4][4];
#pragma unroll
    for (int xt = 0; xt < 2; xt++)
#pragma unroll
        for (int wt = 0; wt < 4; wt++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[xt][wt][e] = 0.0f;

    for (int u = warp; u < units; u += QMM_WARPS) {
        unsigned a[2][4];
        float2 xd[2][2];  // rows g and g + 8 of each x tile
#pragma unroll
        for (int xt = 0; xt < 2; xt++) {
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const long long at = (long long)min(i0 + 16 * xt + 8 * h + g, n - 1) * units + u;
                const int* xw = reinterpret_cast<const int*>(xq + at * 32);
                a[xt][h] = (unsigned)xw[t];
                a[xt][h + 2] = (unsigned)xw[t + 4];
                xd[xt][h] = xds[at];
            }
        }
#pragma unroll
        for (int wt = 0; wt < 4; wt++) {
            // B's column g is weight row g of the tile; the outputs' columns
            // 2t, 2t + 1 need those rows' scales.
            const unsigned char* wrow = w + (long long)min(j0 + 8 * wt + g, m - 1) * row_bytes;
            const unsigned b[2] = {(unsigned)T::word(wrow, u, t),
                                   (unsigned)T::word(wrow, u, t + 4)};
            float2 ab[2];
#pragma unroll
            for (int h = 0; h < 2; h++) {
                ab[h] = T::ab(w + (long long)min(j0 + 8 * wt + 2 * t + h, m - 1) * row_bytes, u);
            }
#pragma unroll
            for (int xt = 0; xt < 2; xt++) {
                int d[4];
                mma_m16n8k32_s8(d, a[xt], b);
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    acc[xt][wt][e] = add_unit(acc[xt][wt][e], ab[e % 2], d[e], xd[xt][e / 2]);
                }
            }
        }
    }

#pragma unroll
    for (int xt = 0; xt < 2; xt++)
#pragma unroll
        for (int wt = 0; wt < 4; wt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int r = 16 * xt + g + 8 * (e / 2), c = 8 * wt + 2 * t + e % 2;
                part[warp][r * QMM_W + c] = acc[xt][wt][e];
            }
    __syncthreads();
    for (int e = threadIdx.x; e < QMM_X * QMM_W; e += QMM_THREADS) {
        const int i = i0 + e / QMM_W, j = j0 + e % QMM_W;
        if (i < n && j < m) {
            const float v = ((part[0][e] + part[1][e]) + (part[2][e] + part[3][e])) +
                            ((part[4][e] + part[5][e]) + (part[6][e] + part[7][e]));
            out[(long long)i * m + j] = from_float<Out>(v);
        }
    }
}

// The product's entry points: (out, w, xq, xds, n, m, k, row_bytes).
extern "C" __global__ void __launch_bounds__(QMV_THREADS)
    matmul_q_q8_0_bf16(__nv_bfloat16* out, const unsigned char* w, const signed char* xq,
                       const float2* xds, int n, int m, int k, int row_bytes) {
    matmul_q_mv<Q8_0>(out, w, xq, xds, n, m, k, row_bytes);
}

extern "C" __global__ void __launch_bounds__(QMV_THREADS)
    matmul_q_q8_0_f32(float* out, const unsigned char* w, const signed char* xq,
                      const float2* xds, int n, int m, int k, int row_bytes) {
    matmul_q_mv<Q8_0>(out, w, xq, xds, n, m, k, row_bytes);
}

extern "C" __global__ void __launch_bounds__(QMV_THREADS)
    matmul_q_q4_0_bf16(__nv_bfloat16* out, const unsigned char* w, const signed char* xq,
                       const float2* xds, int n, int m, int k, int row_bytes) {
    matmul_q_mv<Q4_0>(out, w, xq, xds, n, m, k, row_bytes);
}

extern "C" __global__ void __launch_bounds__(QMV_THREADS)
    matmul_q_q4_0_f32(float* out, const unsigned char* w, const signed char* xq,
                      const float2* xds, int n, int m, int k, int row_bytes) {
    matmul_q_mv<Q4_0>(out, w, xq, xds, n, m, k, row_bytes);
}

extern "C" __global__ void __launch_bounds__(QMV_THREADS)
    matmul_q_q4_1_bf16(__nv_bfloat16* out, const unsigned char* w, const signed char* xq,
                       const float2* xds, int n, int m, int k, int row_bytes) {
    matmul_q_mv<Q4_1>(out, w, xq, xds, n, m, k, row_bytes);
}

extern "C" __global__ void __launch_bounds__(QMV_THREADS)
    matmul_q_q4_1_f32(float* out, const unsigned char* w, const signed char* xq,
                      const float2* xds, int n, int m, int k, int row_bytes) {
    matmul_q_mv<Q4_1>(out, w, xq, xds, n, m, k, row_bytes);
}

extern "C" __global__ void __launch_bounds__(QMV_THREADS)
    matmul_q_q4_k_bf16(__nv_bfloat16* out, const unsigned char* w, const signed char* xq,
                       const float2* xds, int n, int m, int k, int row_bytes) {
    matmul_q_mv<Q4_K>(out, w, xq, xds, n, m, k, row_bytes);
}

extern "C" __global__ void __launch_bounds__(QMV_THREADS)
    matmul_q_q4_k_f32(float* out, const unsigned char* w, const signed char* xq,
                      const float2* xds, int n, int m, int k, int row_bytes) {
    matmul_q_mv<Q4_K>(out, w, xq, xds, n, m, k, row_bytes);
}

extern "C" __global__ void __launch_bounds__(QMM_THREADS)
    matmul_q_mma_q8_0_bf16(__nv_bfloat16* out, const unsigned char* w, const signed char* xq,
                           const float2* xds, int n, int m, int k, int row_bytes) {
    matmul_q_mm<Q8_0>(out, w, xq, xds, n, m, k, row_bytes);
}

extern "C" __global__ void __launch_bounds__(QMM_THREADS)
    matmul_q_mma_q8_0_f32(float* out, const unsigned char* w, const signed char* xq,
                          const float2* xds, int n, int m, int k, int row_bytes) {
    matmul_q_mm<Q8_0>(out, w, xq, xds, n, m, k, row_bytes);
}

extern "C" __global__ void __launch_bounds__(QMM_THREADS)
    matmul_q_mma_q4_0_bf16(__nv_bfloat16* out, const unsigned char* w, const signed char* xq,
                           const float2* xds, int n, int m, int k, int row_bytes) {
    matmul_q_mm<Q4_0>(out, w, xq, xds, n, m, k, row_bytes);
}

extern "C" __global__ void __launch_bounds__(QMM_THREADS)
    matmul_q_mma_q4_0_f32(float* out, const unsigned char* w, const signed char* xq,
                          const float2* xds, int n, int m, int k, int row_bytes) {
    matmul_q_mm<Q4_0>(out, w, xq, xds, n, m, k, row_bytes);
}

extern "C" __global__ void __launch_bounds__(QMM_THREADS)
    matmul_q_mma_q4_1_bf16(__nv_bfloat16* out, const unsigned char* w, const signed char* xq,
                           const float2* xds, int n, int m, int k, int row_bytes) {
    matmul_q_mm<Q4_1>(out, w, xq, xds, n, m, k, row_bytes);
}

extern "C" __global__ void __launch_bounds__(QMM_THREADS)
    matmul_q_mma_q4_1_f32(float* out, const unsigned char* w, const signed char* xq,
                          const float2* xds, int n, int m, int k, int row_bytes) {
    matmul_q_mm<Q4_1>(out, w, xq, xds, n, m, k, row_bytes);
}

extern "C" __global__ void __launch_bounds__(QMM_THREADS)
    matmul_q_mma_q4_k_bf16(__nv_bfloat16* out, const unsigned char* w, const signed char* xq,
                           const float2* xds, int n, int m, int k, int row_bytes) {
    matmul_q_mm<Q4_K>(out, w, xq, xds, n, m, k, row_bytes);
}

extern "C" __global__ void __launch_bounds__(QMM_THREADS)
    matmul_q_mma_q4_k_f32(float* out, const unsigned char* w, const signed char* xq,
                          const float2* xds, int n, int m, int k, int row_bytes) {
    matmul_q_mm<Q4_K>(out, w, xq, xds, n, m, k, row_bytes);
}

// ---------------------------------------------------------------- gathers

// out [rows, cols] = the rows ids[r] (r when ids is null) of w, dequantized.
// Grid (rows), block 256.
template <typename Out>
__device__ void dequant_rows(Out* out, const unsigned char* w, const unsigned* ids, int cols,
                             int row_bytes, int ty) {
    const long long r = blockIdx.x;
    const unsigned char* row = w + (ids ? (long long)ids[r] : r) * row_bytes;
    for (int e = threadIdx.x; e < cols; e += blockDim.x) {
        out[r * cols + e] = from_float<Out>(dequant_at(ty, row, e));
    }
}

extern "C" __global__ void __launch_bounds__(256)
    dequant_rows_bf16(__nv_bfloat16* out, const unsigned char* w, const unsigned* ids, int cols,
                      int row_bytes, int ty) {
    dequant_rows(out, w, ids, cols, row_bytes, ty);
}

extern "C" __global__ void __launch_bounds__(256)
    dequant_rows_f32(float* out, const unsigned char* w, const unsigned* ids, int cols,
                      int row_bytes, int ty) {
    dequant_rows(out, w, ids, cols, row_bytes, ty);
}
