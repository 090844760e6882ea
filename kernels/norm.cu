// Row reductions: RMSNorm, LayerNorm and log-softmax.
//
// One block per row; the block's threads stride over the row's columns, then
// reduce through warp shuffles and one shared-memory slot per warp. Launchers
// use 256 threads (8 warps), any multiple of 32 up to 1024 works.

#include "common.cuh"

// Sum of v over the block; every thread gets the result. `scratch` holds one
// float per warp. Ends with a barrier, so scratch can be reused right away.
__device__ float block_sum(float v, float* scratch) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float total = 0.0f;
    for (int w = 0; w < warps; w++) total += scratch[w];
    __syncthreads();
    return total;
}

// Maximum of v over the block; as block_sum.
__device__ float block_max(float v, float* scratch) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float m = -FLT_MAX_F;
    for (int w = 0; w < warps; w++) m = fmaxf(m, scratch[w]);
    __syncthreads();
    return m;
}

// out = x / sqrt(mean(x^2) + eps) * w, per row; x, out [rows, d], w [d].
// x is the residual stream (f32 or bf16); out feeds a matmul (bf16).
template <typename In>
__device__ void rmsnorm(__nv_bfloat16* out, const In* x, const __nv_bfloat16* w, int d,
                        float eps) {
    __shared__ float scratch[32];
    const In* xr = x + (size_t)blockIdx.x * d;
    __nv_bfloat16* outr = out + (size_t)blockIdx.x * d;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float v = to_float(xr[c]);
        ss += v * v;
    }
    float inv = rsqrtf(block_sum(ss, scratch) / (float)d + eps);
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        outr[c] = __float2bfloat16(to_float(xr[c]) * inv * __bfloat162float(w[c]));
    }
}

extern "C" __global__ void rmsnorm_fwd_bf16(__nv_bfloat16* out, const __nv_bfloat16* x,
                                            const __nv_bfloat16* w, int d, float eps) {
    rmsnorm(out, x, w, d, eps);
}

extern "C" __global__ void rmsnorm_fwd_f32_bf16(__nv_bfloat16* out, const float* x,
                                                const __nv_bfloat16* w, int d, float eps) {
    rmsnorm(out, x, w, d, eps);
}

// out = (x - mean) / sqrt(var + eps) * w + b per row of width d, with the
// biased variance (as torch), in two passes over the row as the CPU device
// computes it: the mean, then the centred sum of squares. All bf16.
extern "C" __global__ void layernorm_fwd_bf16(__nv_bfloat16* out, const __nv_bfloat16* x,
                                              const __nv_bfloat16* w, const __nv_bfloat16* b,
                                              int d, float eps) {
    __shared__ float scratch[32];
    const __nv_bfloat16* xr = x + (size_t)blockIdx.x * d;
    __nv_bfloat16* outr = out + (size_t)blockIdx.x * d;
    float s = 0.0f;
    for (int c = threadIdx.x; c < d; c += blockDim.x) s += __bfloat162float(xr[c]);
    const float mean = block_sum(s, scratch) / (float)d;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float v = __bfloat162float(xr[c]) - mean;
        ss += v * v;
    }
    const float inv = rsqrtf(block_sum(ss, scratch) / (float)d + eps);
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float v = (__bfloat162float(xr[c]) - mean) * inv;
        outr[c] = __float2bfloat16(v * __bfloat162float(w[c]) + __bfloat162float(b[c]));
    }
}

// out = x - logsumexp(x), per row of width d, in f32 (logits stay f32).
extern "C" __global__ void log_softmax_f32(float* out, const float* x, int d) {
    __shared__ float scratch[32];
    const float* xr = x + (size_t)blockIdx.x * d;
    float* outr = out + (size_t)blockIdx.x * d;
    float m = -FLT_MAX_F;
    for (int c = threadIdx.x; c < d; c += blockDim.x) m = fmaxf(m, xr[c]);
    m = block_max(m, scratch);
    float s = 0.0f;
    for (int c = threadIdx.x; c < d; c += blockDim.x) s += expf(xr[c] - m);
    float lse = m + logf(block_sum(s, scratch));
    for (int c = threadIdx.x; c < d; c += blockDim.x) outr[c] = xr[c] - lse;
}

// Backward of out = x * r * w, r = 1/sqrt(mean(x^2) + eps), per row of width d:
//   dx += r * (dout . w) - x * r^3 * mean(dout . w . x)
//   dw += sum over rows of dout . x * r
// One block per row. dx (the residual stream's gradient) and x are f32, dout
// and w bf16, dw f32; both gradients accumulate, dw atomically across rows.
extern "C" __global__ void rmsnorm_bwd_f32_bf16(float* dx, float* dw, const __nv_bfloat16* dout,
                                                const float* x, const __nv_bfloat16* w, int d,
                                                float eps) {
    __shared__ float scratch[32];
    const float* xr = x + (size_t)blockIdx.x * d;
    const __nv_bfloat16* gr = dout + (size_t)blockIdx.x * d;
    float* dxr = dx + (size_t)blockIdx.x * d;
    float ss = 0.0f, gwx = 0.0f;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float v = xr[c];
        ss += v * v;
        gwx += __bfloat162float(gr[c]) * __bfloat162float(w[c]) * v;
    }
    float r = rsqrtf(block_sum(ss, scratch) / (float)d + eps);
    float k = r * r * r * block_sum(gwx, scratch) / (float)d;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float g = __bfloat162float(gr[c]), v = xr[c];
        dxr[c] += r * g * __bfloat162float(w[c]) - v * k;
        atomicAdd(&dw[c], g * v * r);
    }
}

// Fused softmax cross-entropy over f32 logits [rows, vocab], one block per
// row: loss[row] = lse(x) - x[t] (0 for an ignored row, t = 0xffffffff), and
// when dlogits is given, dlogits = (softmax(x) - onehot(t)) * scale (zeros for
// an ignored row). The host sums the per-row losses.
extern "C" __global__ void cross_entropy_f32(float* loss, float* dlogits, const float* logits,
                                             const unsigned* targets, int vocab, float scale) {
    __shared__ float scratch[32];
    const float* xr = logits + (size_t)blockIdx.x * vocab;
    unsigned t = targets[blockIdx.x];
    bool ignored = t == 0xffffffffu;
    float* dl = dlogits ? dlogits + (size_t)blockIdx.x * vocab : nullptr;
    if (ignored) {
        if (dl)
            for (int c = threadIdx.x; c < vocab; c += blockDim.x) dl[c] = 0.0f;
        if (threadIdx.x == 0) loss[blockIdx.x] = 0.0f;
        return;
    }
    float m = -FLT_MAX_F;
    for (int c = threadIdx.x; c < vocab; c += blockDim.x) m = fmaxf(m, xr[c]);
    m = block_max(m, scratch);
    float s = 0.0f;
    for (int c = threadIdx.x; c < vocab; c += blockDim.x) s += expf(xr[c] - m);
    float lse = m + logf(block_sum(s, scratch));
    if (dl)
        for (int c = threadIdx.x; c < vocab; c += blockDim.x)
            dl[c] = (expf(xr[c] - lse) - (c == (int)t ? 1.0f : 0.0f)) * scale;
    if (threadIdx.x == 0) loss[blockIdx.x] = lse - xr[t];
}

// out[0] += sum of x^2 over n elements: each block reduces its grid-stride
// share in f32, then adds it to the f64 total atomically (out zeroed by the
// launcher). The global gradient norm is the square root of the sum.
extern "C" __global__ void sum_squares_f32(double* out, const float* x, int n) {
    __shared__ float scratch[32];
    float s = 0.0f;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        s += x[i] * x[i];
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) atomicAdd(out, (double)s);
}
