// Matrix products: out[n, m] = x[n, k] · w[m, k]^T (a Linear layer), f32
// accumulation. x and w bf16 row-major with out bf16 or f32, or (version 1
// only) x, w and out all f32: the retrieval index's exact inner products,
// where rounding the vectors to bf16 would change the ranking. Any n, m, k:
// loads outside the matrices read zero, stores are guarded.
//
// Two versions, side by side, with the same arguments (out, x, w, n, m, k):
//   1. matmul_nt_bf16, matmul_nt_bf16_f32, matmul_nt_f32: the readable
//      reference. 64×64 output tiles per block of 256 threads, k in steps of
//      16 through f32 shared memory (stored k-major so the inner loop reads
//      consecutive addresses), each thread a 4×4 micro-tile. A thread loads 4
//      consecutive k of one row of each tile; with f32 inputs as one 16-byte
//      load where those 4 lie inside the row and start 16-byte aligned (any
//      k, any base address: each group is checked on its own), else element
//      by element. Grid (ceil(m/64), ceil(n/64)), block 256.
//   2. matmul_nt_mma_bf16, matmul_nt_mma_bf16_f32: tensor cores (mma.sync
//      m16n8k16), ldmatrix, cp.async double buffering; 64×128 output tiles.
//      Grid (ceil(m/128), ceil(n/64)), block 128. See its own header below.

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

// v[0..3] = src[row, kk..kk+3] of the [rows, k] matrix src, zero outside it.
template <typename In>
__device__ __forceinline__ void mm_load4(float (&v)[4], const In* src, int rows, int k, int row,
                                         int kk) {
    for (int e = 0; e < 4; e++)
        v[e] = (row < rows && kk + e < k) ? to_float(src[(size_t)row * k + kk + e]) : 0.0f;
}

// The same for f32: one 16-byte load when the 4 elements lie inside the row
// and start 16-byte aligned (decided per group, so any k and base address).
__device__ __forceinline__ void mm_load4(float (&v)[4], const float* src, int rows, int k, int row,
                                         int kk) {
    const float* p = src + (size_t)row * k + kk;
    if (row < rows && kk + 3 < k && (size_t)p % 16 == 0) {
        const float4 q = *reinterpret_cast<const float4*>(p);
        v[0] = q.x;
        v[1] = q.y;
        v[2] = q.z;
        v[3] = q.w;
        return;
    }
    for (int e = 0; e < 4; e++) v[e] = (row < rows && kk + e < k) ? p[e] : 0.0f;
}

template <typename Out, typename In>
__device__ void matmul_nt_tiled(Out* out, const In* x, const In* w, int n, int m, int k) {
    __shared__ float xs[MM_BK][MM_BM + 1];
    __shared__ float ws[MM_BK][MM_BN + 1];
    const int row0 = blockIdx.y * MM_BM, col0 = blockIdx.x * MM_BN;
    const int tid = threadIdx.x;
    const int ty = tid / (MM_BN / MM_TN), tx = tid % (MM_BN / MM_TN);
    float acc[MM_TM][MM_TN] = {};
    // Each thread loads 4 consecutive k of one row of each tile.
    const int lr = tid / (MM_BK / 4), lk = (tid % (MM_BK / 4)) * 4;
    for (int k0 = 0; k0 < k; k0 += MM_BK) {
        float xv[4], wv[4];
        mm_load4(xv, x, n, k, row0 + lr, k0 + lk);
        mm_load4(wv, w, m, k, col0 + lr, k0 + lk);
        for (int e = 0; e < 4; e++) {
            xs[lk + e][lr] = xv[e];
            ws[lk + e][lr] = wv[e];
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

// f32 x, w and out: the flat-IP index's scores, f32 throughout.
extern "C" __global__ void matmul_nt_f32(float* out, const float* x, const float* w, int n, int m,
                                         int k) {
    matmul_nt_tiled(out, x, w, n, m, k);
}

// ================================================================ version 2
//
// Tensor cores through mma.sync.m16n8k16.row.col.f32.bf16.bf16.f32 (sm_80+).
//
// Tiles. A block computes a 64 × 128 tile of out: 64 rows of x (rows of out)
//   by 128 rows of w (columns of out), k in steps of MM2_BK = 32. Its four
//   warps form a 2 × 2 grid, each warp a 32 × 64 sub-tile = 2 × 8 mma tiles of
//   16 × 8 (64 f32 accumulators per lane). Per 16-wide k step a warp loads its
//   2 A and 8 B fragments with 6 ldmatrix.x4 and issues 16 mma.
//
// Launch. Grid (ceil(m/128), ceil(n/64)), block 128 threads, no dynamic
//   shared memory: 30 KiB static, two stages of xs[64][40] and ws[128][40] bf16.
//
// Shared tiles are stored as in global memory, row-major along k, each row
//   padded from 32 to 40 bf16 (80 bytes): the 8 rows that one ldmatrix
//   8×8 matrix reads start at 8 different 16-byte offsets mod 128 bytes (no
//   bank conflicts), and every 8-element chunk stays 16-byte aligned.
//
// Pipeline: double buffer. While the warps multiply stage s, the copies of
//   the next k tile into stage s^1 are in flight (one cp.async group per
//   tile). Before a stage is read: cp.async.wait_group 1 (this thread's copies
//   of it have landed) and __syncthreads (everyone's have); after it is read,
//   __syncthreads before it is refilled.
//
// Loads. A tile row is 4 chunks of 8 bf16 (16 bytes). A chunk goes through
//   cp.async when k % 8 == 0 and x and w are 16-byte aligned (then every chunk
//   is aligned and wholly inside or wholly outside its row) and it lies inside
//   the matrix; otherwise plain guarded loads fill it, zero outside the
//   matrix. The choice is the same for the whole launch.
//
// Fragments (layout in common.cuh; g = lane / 4, t = lane % 4), 8×8 matrices
//   of ldmatrix.x4 numbered 0..3, lanes 8i..8i+7 addressing the rows of
//   matrix i:
//   A, 16 rows of xs × 16 k: lane l addresses row l % 16 at k offset
//     8·(l / 16), so the matrices are (rows 0-7, k 0-7), (8-15, 0-7),
//     (0-7, 8-15), (8-15, 8-15) = a[0], a[1], a[2], a[3].
//   B, 16 k × 8 columns of out, "col" layout = 8 rows of ws as stored: one
//     ldmatrix.x4 covers two such tiles; lane l addresses ws row
//     (l % 8) + 8·(l / 16) at k offset 8·((l / 8) % 2), so the matrices are
//     b[0], b[1] of the first tile, then b[0], b[1] of the second.
//   C: c[0], c[1] = out[g][2t], out[g][2t+1]; c[2], c[3] the same in row g+8.

#define MM2_BX 64                 // rows of x (rows of out) per block
#define MM2_BW 128                // rows of w (columns of out) per block
#define MM2_BK 32                 // k per stage
#define MM2_LD (MM2_BK + 8)       // padded row of a shared tile, in bf16
#define MM2_WX 32                 // rows of out per warp
#define MM2_WW 64                 // columns of out per warp
#define MM2_WARPS_W (MM2_BW / MM2_WW)
#define MM2_THREADS (WARP_SIZE * (MM2_BX / MM2_WX) * MM2_WARPS_W)
#define MM2_CHUNKS (MM2_BK / 8)   // 16-byte chunks per tile row

// Fills dst, one 16-byte chunk of a shared tile row, with elements kk..kk+7
// of row `row` of the [rows, k] matrix src (zero outside it).
__device__ __forceinline__ void mm2_load_chunk(__nv_bfloat16* dst, const __nv_bfloat16* src,
                                               int rows, int k, int row, int kk, bool vec) {
    if (vec && row < rows && kk < k) {
        // vec: k % 8 == 0 and src 16-byte aligned, so the chunk is whole and aligned.
        cp_async_16(dst, src + (size_t)row * k + kk);
        return;
    }
    unsigned short e[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    if (row < rows) {
        const __nv_bfloat16* p = src + (size_t)row * k;
#pragma unroll
        for (int i = 0; i < 8; i++)
            if (kk + i < k) e[i] = __bfloat16_as_ushort(p[kk + i]);
    }
    uint4 v;
    v.x = (unsigned)e[0] | ((unsigned)e[1] << 16);
    v.y = (unsigned)e[2] | ((unsigned)e[3] << 16);
    v.z = (unsigned)e[4] | ((unsigned)e[5] << 16);
    v.w = (unsigned)e[6] | ((unsigned)e[7] << 16);
    *reinterpret_cast<uint4*>(dst) = v;
}

// Starts filling one stage: x rows row0.., w rows col0.., k from k0.
__device__ __forceinline__ void mm2_load_stage(__nv_bfloat16 (*xs)[MM2_LD],
                                               __nv_bfloat16 (*ws)[MM2_LD],
                                               const __nv_bfloat16* x, const __nv_bfloat16* w,
                                               int n, int m, int k, int row0, int col0, int k0,
                                               bool vec) {
    static_assert(MM2_BX * MM2_CHUNKS % MM2_THREADS == 0, "whole x chunks per thread");
    static_assert(MM2_BW * MM2_CHUNKS % MM2_THREADS == 0, "whole w chunks per thread");
    // Consecutive threads take consecutive chunks: 4 threads read a row's 64
    // bytes. Not unrolled: unrolling keeps 6 chunk addresses live through the
    // main loop (134 registers instead of 96).
#pragma unroll 1
    for (int it = 0; it < MM2_BX * MM2_CHUNKS / MM2_THREADS; it++) {
        const int i = threadIdx.x + it * MM2_THREADS;
        const int r = i / MM2_CHUNKS, c = (i % MM2_CHUNKS) * 8;
        mm2_load_chunk(&xs[r][c], x, n, k, row0 + r, k0 + c, vec);
    }
#pragma unroll 1
    for (int it = 0; it < MM2_BW * MM2_CHUNKS / MM2_THREADS; it++) {
        const int i = threadIdx.x + it * MM2_THREADS;
        const int r = i / MM2_CHUNKS, c = (i % MM2_CHUNKS) * 8;
        mm2_load_chunk(&ws[r][c], w, m, k, col0 + r, k0 + c, vec);
    }
}

template <typename Out>
__device__ __forceinline__ void matmul_nt_mma(Out* out, const __nv_bfloat16* x,
                                              const __nv_bfloat16* w, int n, int m, int k) {
    __shared__ __align__(16) __nv_bfloat16 xs[2][MM2_BX][MM2_LD];
    __shared__ __align__(16) __nv_bfloat16 ws[2][MM2_BW][MM2_LD];
    const int row0 = blockIdx.y * MM2_BX, col0 = blockIdx.x * MM2_BW;
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    const int wr = (warp / MM2_WARPS_W) * MM2_WX;  // the warp's sub-tile in the block's
    const int wc = (warp % MM2_WARPS_W) * MM2_WW;
    const bool vec = k % 8 == 0 && (((size_t)x | (size_t)w) % 16) == 0;

    float acc[MM2_WX / 16][MM2_WW / 8][4];
#pragma unroll
    for (int i = 0; i < MM2_WX / 16; i++)
#pragma unroll
        for (int j = 0; j < MM2_WW / 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[i][j][e] = 0.0f;

    const int tiles = (k + MM2_BK - 1) / MM2_BK;
    mm2_load_stage(xs[0], ws[0], x, w, n, m, k, row0, col0, 0, vec);
    cp_async_commit();
    for (int t = 0; t < tiles; t++) {
        const int s = t & 1;
        if (t + 1 < tiles)
            mm2_load_stage(xs[s ^ 1], ws[s ^ 1], x, w, n, m, k, row0, col0, (t + 1) * MM2_BK,
                           vec);
        cp_async_commit();  // possibly empty: one group per iteration keeps the count
        cp_async_wait<1>();  // stage s (all groups but the newest) has landed
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < MM2_BK; kk += 16) {
            unsigned a[MM2_WX / 16][4], b[MM2_WW / 8][2];
#pragma unroll
            for (int i = 0; i < MM2_WX / 16; i++)
                ldmatrix_x4(a[i], &xs[s][wr + 16 * i + lane % 16][kk + 8 * (lane / 16)]);
#pragma unroll
            for (int j = 0; j < MM2_WW / 16; j++) {
                unsigned r[4];
                ldmatrix_x4(
                    r, &ws[s][wc + 16 * j + lane % 8 + 8 * (lane / 16)][kk + 8 * (lane / 8 % 2)]);
                b[2 * j][0] = r[0];
                b[2 * j][1] = r[1];
                b[2 * j + 1][0] = r[2];
                b[2 * j + 1][1] = r[3];
            }
#pragma unroll
            for (int i = 0; i < MM2_WX / 16; i++)
#pragma unroll
                for (int j = 0; j < MM2_WW / 8; j++)
                    mma_m16n8k16_bf16(acc[i][j], a[i], b[j], acc[i][j]);
        }
        __syncthreads();  // everyone is done with stage s before it is refilled
    }

    const int g = lane / 4, tq = lane % 4;
#pragma unroll
    for (int i = 0; i < MM2_WX / 16; i++)
#pragma unroll
        for (int j = 0; j < MM2_WW / 8; j++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int r = row0 + wr + 16 * i + g + 8 * h;
                const int c = col0 + wc + 8 * j + 2 * tq;
                if (r >= n) continue;
                if (c < m) store_out(&out[(size_t)r * m + c], acc[i][j][2 * h]);
                if (c + 1 < m) store_out(&out[(size_t)r * m + c + 1], acc[i][j][2 * h + 1]);
            }
}

// Grid (ceil(m/128), ceil(n/64)), block 128.
extern "C" __global__ void __launch_bounds__(MM2_THREADS)
    matmul_nt_mma_bf16(__nv_bfloat16* out, const __nv_bfloat16* x, const __nv_bfloat16* w, int n,
                       int m, int k) {
    matmul_nt_mma(out, x, w, n, m, k);
}

// The same with an f32 output (logits).
extern "C" __global__ void __launch_bounds__(MM2_THREADS)
    matmul_nt_mma_bf16_f32(float* out, const __nv_bfloat16* x, const __nv_bfloat16* w, int n,
                           int m, int k) {
    matmul_nt_mma(out, x, w, n, m, k);
}

// ================================================================ backward
//
// The products of matmul_nt's backward, dx += dout · w (NN) and dw += dout^T ·
// x (TN), as one readable kernel: C[M, N] += A[M, K] · B[K, N], where A and B
// are read through (row, column) strides, so one kernel serves both layouts.
// C is row-major and accumulates (read, add, store). A is dout (f32 for the
// residual stream's gradient and the logits', bf16 elsewhere), B a bf16 weight
// or activation, C a bf16 activation gradient or an f32 weight gradient.
// Tiling as version 1 above: 64x64 C tiles, K in steps of 16 through shared
// memory, 4x4 per thread. Grid (ceil(N/64), ceil(M/64)), block 256.

template <typename A, typename C>
__device__ void matmul_acc_tiled(C* c, const A* a, const __nv_bfloat16* b, int M, int N, int K,
                                 int a_rs, int a_cs, int b_rs, int b_cs) {
    __shared__ float as[MM_BK][MM_BM + 1];
    __shared__ float bs[MM_BK][MM_BN + 1];
    const int row0 = blockIdx.y * MM_BM, col0 = blockIdx.x * MM_BN;
    const int tid = threadIdx.x;
    const int ty = tid / (MM_BN / MM_TN), tx = tid % (MM_BN / MM_TN);
    float acc[MM_TM][MM_TN] = {};
    // Each thread loads 4 elements of each tile: A's row lr at k lk..lk+3, and
    // B's column lr at k lk..lk+3.
    const int lr = tid / (MM_BK / 4), lk = (tid % (MM_BK / 4)) * 4;
    for (int k0 = 0; k0 < K; k0 += MM_BK) {
        for (int e = 0; e < 4; e++) {
            int kk = k0 + lk + e;
            int ar = row0 + lr, bc = col0 + lr;
            as[lk + e][lr] =
                (ar < M && kk < K) ? to_float(a[(size_t)ar * a_rs + (size_t)kk * a_cs]) : 0.0f;
            bs[lk + e][lr] =
                (bc < N && kk < K) ? to_float(b[(size_t)kk * b_rs + (size_t)bc * b_cs]) : 0.0f;
        }
        __syncthreads();
        for (int kk = 0; kk < MM_BK; kk++) {
            float x[MM_TM], y[MM_TN];
            for (int i = 0; i < MM_TM; i++) x[i] = as[kk][ty * MM_TM + i];
            for (int j = 0; j < MM_TN; j++) y[j] = bs[kk][tx * MM_TN + j];
            for (int i = 0; i < MM_TM; i++)
                for (int j = 0; j < MM_TN; j++) acc[i][j] += x[i] * y[j];
        }
        __syncthreads();
    }
    for (int i = 0; i < MM_TM; i++) {
        int r = row0 + ty * MM_TM + i;
        if (r >= M) continue;
        for (int j = 0; j < MM_TN; j++) {
            int col = col0 + tx * MM_TN + j;
            if (col < N) {
                C* p = &c[(size_t)r * N + col];
                *p = from_float<C>(to_float(*p) + acc[i][j]);
            }
        }
    }
}

// Named matmul_acc_{A}_{C}; B is always bf16.
extern "C" __global__ void matmul_acc_bf16_bf16(__nv_bfloat16* c, const __nv_bfloat16* a,
                                                const __nv_bfloat16* b, int M, int N, int K,
                                                int a_rs, int a_cs, int b_rs, int b_cs) {
    matmul_acc_tiled(c, a, b, M, N, K, a_rs, a_cs, b_rs, b_cs);
}

extern "C" __global__ void matmul_acc_f32_bf16(__nv_bfloat16* c, const float* a,
                                               const __nv_bfloat16* b, int M, int N, int K,
                                               int a_rs, int a_cs, int b_rs, int b_cs) {
    matmul_acc_tiled(c, a, b, M, N, K, a_rs, a_cs, b_rs, b_cs);
}

extern "C" __global__ void matmul_acc_bf16_f32(float* c, const __nv_bfloat16* a,
                                               const __nv_bfloat16* b, int M, int N, int K,
                                               int a_rs, int a_cs, int b_rs, int b_cs) {
    matmul_acc_tiled(c, a, b, M, N, K, a_rs, a_cs, b_rs, b_cs);
}

extern "C" __global__ void matmul_acc_f32_f32(float* c, const float* a, const __nv_bfloat16* b,
                                              int M, int N, int K, int a_rs, int a_cs, int b_rs,
                                              int b_cs) {
    matmul_acc_tiled(c, a, b, M, N, K, a_rs, a_cs, b_rs, b_cs);
}
