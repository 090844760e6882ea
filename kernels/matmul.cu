// Matrix products: out[n, m] = x[n, k] · w[m, k]^T (a Linear layer), x and w
// bf16, f32 accumulation, out bf16 or f32.
//
// Version 1, the readable reference: 64×64 output tiles per block of 256
// threads, k in steps of 16 through shared memory (stored k-major so the
// inner loop reads consecutive addresses), each thread a 4×4 micro-tile.
// Any n, m, k: loads outside the matrices read zero, stores are guarded.
// A tensor-core (mma.sync) version comes next, benchmarked against this one.

#include "common.cuh"

#define MM_BM 64
#define MM_BN 64
#define MM_BK 16
#define MM_TM 4
#define MM_TN 4

template <typename Out>
__device__ void store_out(Out* p, float v);
template <>
__device__ void store_out<float>(float* p, float v) { *p = v; }
template <>
__device__ void store_out<__nv_bfloat16>(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

template <typename Out>
__device__ void matmul_nt_tiled(Out* out, const __nv_bfloat16* x, const __nv_bfloat16* w, int n,
                                int m, int k) {
    __shared__ float xs[MM_BK][MM_BM + 1];
    __shared__ float ws[MM_BK][MM_BN + 1];
    const int row0 = blockIdx.y * MM_BM, col0 = blockIdx.x * MM_BN;
    const int tid = threadIdx.x;
    const int ty = tid / (MM_BN / MM_TN), tx = tid % (MM_BN / MM_TN);
    float acc[MM_TM][MM_TN] = {};
    // Each thread loads 4 consecutive k of one row of each tile.
    const int lr = tid / (MM_BK / 4), lk = (tid % (MM_BK / 4)) * 4;
    for (int k0 = 0; k0 < k; k0 += MM_BK) {
        for (int e = 0; e < 4; e++) {
            int kk = k0 + lk + e;
            int xr = row0 + lr, wr = col0 + lr;
            xs[lk + e][lr] = (xr < n && kk < k) ? __bfloat162float(x[(size_t)xr * k + kk]) : 0.0f;
            ws[lk + e][lr] = (wr < m && kk < k) ? __bfloat162float(w[(size_t)wr * k + kk]) : 0.0f;
        }
        __syncthreads();
        for (int kk = 0; kk < MM_BK; kk++) {
            float a[MM_TM], b[MM_TN];
            for (int i = 0; i < MM_TM; i++) a[i] = xs[kk][ty * MM_TM + i];
            for (int j = 0; j < MM_TN; j++) b[j] = ws[kk][tx * MM_TN + j];
            for (int i = 0; i < MM_TM; i++)
                for (int j = 0; j < MM_TN; j++) acc[i][j] += a[i] * b[j];
        }
        __syncthreads();
    }
    for (int i = 0; i < MM_TM; i++) {
        int r = row0 + ty * MM_TM + i;
        if (r >= n) continue;
        for (int j = 0; j < MM_TN; j++) {
            int c = col0 + tx * MM_TN + j;
            if (c < m) store_out(&out[(size_t)r * m + c], acc[i][j]);
        }
    }
}

// Grid (ceil(m/64), ceil(n/64)), block 256.
extern "C" __global__ void matmul_nt_bf16(__nv_bfloat16* out, const __nv_bfloat16* x,
                                          const __nv_bfloat16* w, int n, int m, int k) {
    matmul_nt_tiled(out, x, w, n, m, k);
}

// The same with an f32 output (logits).
extern "C" __global__ void matmul_nt_bf16_f32(float* out, const __nv_bfloat16* x,
                                              const __nv_bfloat16* w, int n, int m, int k) {
    matmul_nt_tiled(out, x, w, n, m, k);
}
