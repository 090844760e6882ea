// LoRA branches (src/model/adapter.rs), with A [r, in], B [out, r], s the
// adapter's scaling and drop the dropout mask of common.cuh:
//
//   forward   t = drop(x)·Aᵀ [n, r]          y += s·t·Bᵀ
//   backward  dt = s·dy·B [n, r]             dx += drop'(dt·A)
//             dA += dtᵀ·drop(x)              dB += s·dyᵀ·t
//
// lora_fwd_* and lora_bwd_x_* are one kernel shape, "down then up": a block
// takes LORA_ROWS rows, reduces them to their r-wide rows of t (or dt) in shared
// memory, writes those out once (the backward's input), and expands them
// through the second matrix into its output rows. The rank-r intermediate
// makes no round trip through device memory between the two products.
// lora_grad_* are the weight gradients, sums over the n rows split into
// chunks that add with atomics.
//
// t and dt are f32; activations and weights bf16; dy bf16, or f32 where it
// is the residual stream's gradient. Ranks up to LORA_MAX_RANK.
//
// lora_gathered_bf16 is serving's many-adapters-in-one-batch branch
// (Backend::lora_gathered, BGMV-style): y[i] += s_a·(x[i]·A_aᵀ)·B_aᵀ with
// each row's own adapter a, no t stored, no dropout. See its comment.

#include "common.cuh"

#define LORA_THREADS 256
#define LORA_MAX_RANK 128
#define LORA_ROWS 16  // rows per block of the down-then-up kernels
#define LORA_CH 32    // columns per staged chunk of the reduction
#define LORA_PER_THREAD (LORA_ROWS * LORA_MAX_RANK / LORA_THREADS)

// A matrix read as M(k, c) = m[k * sk + c * sc]: A is (k, c) = A[k·in + c],
// B as (k, o) is B[o·r + k].
struct View {
    const __nv_bfloat16* m;
    int sk, sc;
    __device__ float at(int k, int c) const { return __bfloat162float(m[k * sk + c * sc]); }
};

// For the block's rows row0..row0+LORA_ROWS of out [n, cols_out]:
//   mid[row][k] = scale_in · Σ_c drop_in(in[row, c]) · W1(k, c)   (k < r, c < cols_in)
//   out[row, c] += drop_out(scale_out · Σ_k mid[row][k] · W2(k, c))
// mid goes to shared memory and once to `mid_out` [n, r]. drop_in / drop_out
// apply the mask (over the input's / output's flat indices) when set.
template <typename In, typename Out>
__device__ void down_up(Out* out, float* mid_out, const In* in, View w1, View w2, int n,
                        int cols_in, int cols_out, int r, float scale_in, float scale_out,
                        bool drop_in, bool drop_out, float p, float keep_scale,
                        unsigned long long seed) {
    __shared__ float in_s[LORA_ROWS][LORA_CH];
    __shared__ float w_s[LORA_MAX_RANK][LORA_CH + 1];  // +1: rows of w_s fall in distinct banks
    __shared__ float mid[LORA_ROWS][LORA_MAX_RANK];
    const int tid = threadIdx.x;
    const int row0 = blockIdx.x * LORA_ROWS;

    float acc[LORA_PER_THREAD];
    for (int j = 0; j < LORA_PER_THREAD; j++) acc[j] = 0.0f;
    for (int c0 = 0; c0 < cols_in; c0 += LORA_CH) {
        for (int e = tid; e < LORA_ROWS * LORA_CH; e += LORA_THREADS) {
            int row = e / LORA_CH, c = c0 + e % LORA_CH, gr = row0 + row;
            float v = 0.0f;
            if (gr < n && c < cols_in) {
                long long i = (long long)gr * cols_in + c;
                v = to_float(in[i]);
                if (drop_in) v = dropout_keeps(seed, (unsigned long long)i, p) ? v * keep_scale : 0.0f;
            }
            in_s[row][e % LORA_CH] = v;
        }
        for (int e = tid; e < r * LORA_CH; e += LORA_THREADS) {
            int k = e / LORA_CH, c = c0 + e % LORA_CH;
            w_s[k][e % LORA_CH] = c < cols_in ? w1.at(k, c) : 0.0f;
        }
        __syncthreads();
        for (int j = 0; j < LORA_PER_THREAD; j++) {
            int o = tid + j * LORA_THREADS;
            if (o < LORA_ROWS * r) {
                int row = o / r, k = o % r;
                float sum = 0.0f;
                for (int cc = 0; cc < LORA_CH; cc++) sum += in_s[row][cc] * w_s[k][cc];
                acc[j] += sum;
            }
        }
        __syncthreads();
    }
    for (int j = 0; j < LORA_PER_THREAD; j++) {
        int o = tid + j * LORA_THREADS;
        if (o < LORA_ROWS * r) {
            int row = o / r, k = o % r, gr = row0 + row;
            float v = scale_in * acc[j];
            mid[row][k] = v;
            if (gr < n) mid_out[(long long)gr * r + k] = v;
        }
    }
    __syncthreads();

    for (int c = tid; c < cols_out; c += LORA_THREADS) {
        float sum[LORA_ROWS];
        for (int row = 0; row < LORA_ROWS; row++) sum[row] = 0.0f;
        for (int k = 0; k < r; k++) {
            float w = w2.at(k, c);
            for (int row = 0; row < LORA_ROWS; row++) sum[row] += mid[row][k] * w;
        }
        for (int row = 0; row < LORA_ROWS && row0 + row < n; row++) {
            long long i = (long long)(row0 + row) * cols_out + c;
            float v = scale_out * sum[row];
            if (drop_out) v = dropout_keeps(seed, (unsigned long long)i, p) ? v * keep_scale : 0.0f;
            out[i] = from_float<Out>(to_float(out[i]) + v);
        }
    }
}

// Forward: t = drop(x)·Aᵀ, y += s·t·Bᵀ. Grid ceil(n / LORA_ROWS), block
// LORA_THREADS. p = 0: no dropout.
extern "C" __global__ void __launch_bounds__(LORA_THREADS)
    lora_fwd_bf16(__nv_bfloat16* y, float* t, const __nv_bfloat16* x, const __nv_bfloat16* a,
                  const __nv_bfloat16* b, int n, int in, int out, int r, float s, float p,
                  float keep_scale, unsigned long long seed) {
    View A = {a, in, 1}, B = {b, 1, r};
    down_up(y, t, x, A, B, n, in, out, r, 1.0f, s, p > 0.0f, false, p, keep_scale, seed);
}

// Backward, input side: dt = s·dy·B, dx += drop'(dt·A). Named by dy's type.
template <typename Dy>
__device__ void lora_bwd_x(__nv_bfloat16* dx, float* dt, const Dy* dy, const __nv_bfloat16* a,
                           const __nv_bfloat16* b, int n, int in, int out, int r, float s,
                           float p, float keep_scale, unsigned long long seed) {
    View B = {b, 1, r}, A = {a, in, 1};
    down_up(dx, dt, dy, B, A, n, out, in, r, s, 1.0f, false, p > 0.0f, p, keep_scale, seed);
}

extern "C" __global__ void __launch_bounds__(LORA_THREADS)
    lora_bwd_x_bf16(__nv_bfloat16* dx, float* dt, const __nv_bfloat16* dy,
                    const __nv_bfloat16* a, const __nv_bfloat16* b, int n, int in, int out, int r,
                    float s, float p, float keep_scale, unsigned long long seed) {
    lora_bwd_x(dx, dt, dy, a, b, n, in, out, r, s, p, keep_scale, seed);
}

extern "C" __global__ void __launch_bounds__(LORA_THREADS)
    lora_bwd_x_f32(__nv_bfloat16* dx, float* dt, const float* dy, const __nv_bfloat16* a,
                   const __nv_bfloat16* b, int n, int in, int out, int r, float s, float p,
                   float keep_scale, unsigned long long seed) {
    lora_bwd_x(dx, dt, dy, a, b, n, in, out, r, s, p, keep_scale, seed);
}

#define LORA_GRAD_K 16        // ranks per block
#define LORA_GRAD_TILE 32     // rows of u staged at a time
#define LORA_GRAD_ROWS 128    // rows of the sum per block (chunks add with atomics)

// g(k, c) += scale · Σ_i u[i, k] · drop(v[i, c]), with g(k, c) at
// g[k * g_sk + c * g_sc]: dA (u = dt, v = x, g_sk = in, g_sc = 1, dropout)
// and dB (u = t, v = dy, g_sk = 1, g_sc = r, scale = s). u [n, r] f32,
// v [n, cols]. Grid (ceil(cols / LORA_THREADS), ceil(r / LORA_GRAD_K),
// ceil(n / LORA_GRAD_ROWS)); a thread owns one column c and LORA_GRAD_K ranks.
template <typename V>
__device__ void lora_grad(float* g, const float* u, const V* v, int n, int cols, int r, int g_sk,
                          int g_sc, float scale, float p, float keep_scale,
                          unsigned long long seed) {
    __shared__ float u_s[LORA_GRAD_TILE][LORA_GRAD_K];
    const int tid = threadIdx.x;
    const int c = blockIdx.x * LORA_THREADS + tid;
    const int k0 = blockIdx.y * LORA_GRAD_K;
    const int i0 = blockIdx.z * LORA_GRAD_ROWS;
    const int i1 = min(n, i0 + LORA_GRAD_ROWS);
    float acc[LORA_GRAD_K];
    for (int kk = 0; kk < LORA_GRAD_K; kk++) acc[kk] = 0.0f;
    for (int ib = i0; ib < i1; ib += LORA_GRAD_TILE) {
        for (int e = tid; e < LORA_GRAD_TILE * LORA_GRAD_K; e += LORA_THREADS) {
            int i = ib + e / LORA_GRAD_K, k = k0 + e % LORA_GRAD_K;
            u_s[e / LORA_GRAD_K][e % LORA_GRAD_K] = (i < i1 && k < r) ? u[(long long)i * r + k] : 0.0f;
        }
        __syncthreads();
        if (c < cols) {
            for (int ii = 0; ii < LORA_GRAD_TILE && ib + ii < i1; ii++) {
                long long i = (long long)(ib + ii) * cols + c;
                float x = to_float(v[i]);
                if (p > 0.0f) x = dropout_keeps(seed, (unsigned long long)i, p) ? x * keep_scale : 0.0f;
                for (int kk = 0; kk < LORA_GRAD_K; kk++) acc[kk] += u_s[ii][kk] * x;
            }
        }
        __syncthreads();
    }
    if (c < cols) {
        for (int kk = 0; kk < LORA_GRAD_K && k0 + kk < r; kk++) {
            atomicAdd(&g[(long long)(k0 + kk) * g_sk + (long long)c * g_sc], scale * acc[kk]);
        }
    }
}

extern "C" __global__ void __launch_bounds__(LORA_THREADS)
    lora_grad_bf16(float* g, const float* u, const __nv_bfloat16* v, int n, int cols, int r,
                   int g_sk, int g_sc, float scale, float p, float keep_scale,
                   unsigned long long seed) {
    lora_grad(g, u, v, n, cols, r, g_sk, g_sc, scale, p, keep_scale, seed);
}

extern "C" __global__ void __launch_bounds__(LORA_THREADS)
    lora_grad_f32(float* g, const float* u, const float* v, int n, int cols, int r, int g_sk,
                  int g_sc, float scale, float p, float keep_scale, unsigned long long seed) {
    lora_grad(g, u, v, n, cols, r, g_sk, g_sc, scale, p, keep_scale, seed);
}

// ---------------------------------------------------------------- serving

// Many adapters over one batch (Backend::lora_gathered): for each task
// (row i, adapter a),
//   t      = x[i]·A_aᵀ                 [r]    f32, in shared memory only
//   y[i]  += s_a · t·B_aᵀ              [out]
// Rows that take no adapter get no task (the launcher leaves them out), so
// they are never touched.
//
// adapters: LORA_SERVE_WORDS words per adapter: A [r, in] and B [out, r]
// (bf16 pointers), r (1..LORA_MAX_RANK), and s as the bits of an f32.
// tasks: one word per task, row | adapter << 32; the launcher orders them by
// adapter, so consecutive blocks read the same A and B from L2.
// Grid (tasks), block LORA_THREADS, no dynamic smem.
//
// One block per task, version 1. Shrink: x[i] is staged in shared memory
// LORA_SERVE_CH columns at a time; warp w owns ranks w, w + 8, ..., and its
// lanes stride over the columns of A's row (coalesced), each lane keeping a
// partial sum per rank in a register; a butterfly (warp_sum) over the lanes
// ends it. Expand: thread per output column c, Σ_j t[j]·B[c, j] for j = 0..r
// in order. Nothing depends on the other tasks, so a row's result is the
// same whatever the batch holds (batch invariance).
#define LORA_SERVE_WORDS 4
#define LORA_SERVE_WARPS (LORA_THREADS / WARP_SIZE)
#define LORA_SERVE_CH 512  // columns of x staged at a time
#define LORA_SERVE_PER_WARP (LORA_MAX_RANK / LORA_SERVE_WARPS)

extern "C" __global__ void __launch_bounds__(LORA_THREADS)
    lora_gathered_bf16(__nv_bfloat16* y, const __nv_bfloat16* x,
                       const unsigned long long* adapters, const unsigned long long* tasks,
                       int in, int out) {
    __shared__ float x_s[LORA_SERVE_CH];
    __shared__ float t_s[LORA_MAX_RANK];
    const int tid = threadIdx.x, warp = tid / WARP_SIZE, lane = tid % WARP_SIZE;
    const unsigned long long task = tasks[blockIdx.x];
    const long long row = (long long)(task & 0xffffffffull);
    const unsigned long long* e = adapters + (task >> 32) * LORA_SERVE_WORDS;
    const __nv_bfloat16* a = reinterpret_cast<const __nv_bfloat16*>(e[0]);
    const __nv_bfloat16* b = reinterpret_cast<const __nv_bfloat16*>(e[1]);
    const int r = (int)e[2];
    const float s = __uint_as_float((unsigned)e[3]);
    const __nv_bfloat16* xr = x + row * in;

    float acc[LORA_SERVE_PER_WARP];
#pragma unroll
    for (int q = 0; q < LORA_SERVE_PER_WARP; q++) acc[q] = 0.0f;
    for (int c0 = 0; c0 < in; c0 += LORA_SERVE_CH) {
        const int width = min(LORA_SERVE_CH, in - c0);
        for (int c = tid; c < width; c += LORA_THREADS) x_s[c] = __bfloat162float(xr[c0 + c]);
        __syncthreads();
        // Unrolled, so that acc stays in registers.
#pragma unroll
        for (int q = 0; q < LORA_SERVE_PER_WARP; q++) {
            const int j = warp + q * LORA_SERVE_WARPS;
            if (j < r) {
                const __nv_bfloat16* aj = a + (long long)j * in + c0;
                for (int c = lane; c < width; c += WARP_SIZE) {
                    acc[q] += x_s[c] * __bfloat162float(aj[c]);
                }
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int q = 0; q < LORA_SERVE_PER_WARP; q++) {
        const int j = warp + q * LORA_SERVE_WARPS;
        if (j < r) {  // the same for the whole warp: every lane shuffles
            const float t = warp_sum(acc[q]);
            if (lane == 0) t_s[j] = t;
        }
    }
    __syncthreads();

    __nv_bfloat16* yr = y + row * out;
    for (int c = tid; c < out; c += LORA_THREADS) {
        const __nv_bfloat16* bc = b + (long long)c * r;
        float sum = 0.0f;
        for (int j = 0; j < r; j++) sum += t_s[j] * __bfloat162float(bc[j]);
        yr[c] = __float2bfloat16_rn(__bfloat162float(yr[c]) + s * sum);
    }
}
