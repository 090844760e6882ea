// Element-wise and row-gather kernels of the forward pass.
//
// Conventions: activations and weights are bf16 in memory, arithmetic is f32.
// Sizes are ints (tensors here stay far below 2^31 elements).
// Grid-stride loops, so any grid size is correct; launchers size the grid to
// the data.

#include "common.cuh"

// x += alpha * y, element-wise over n elements: the residual stream (alpha 1)
// and a LoRA branch joining its base layer (alpha = the adapter's scaling).
// x is f32 (the residual stream, where bf16 rounding would pile up) or bf16.
template <typename X>
__device__ void add_scaled(X* x, const __nv_bfloat16* y, float alpha, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        x[i] = from_float<X>(to_float(x[i]) + alpha * __bfloat162float(y[i]));
    }
}

// Named add_scaled_{x}_{y}, the element types of x and y; add_scaled_bf16 is
// bf16 += bf16. A y in f32 is a gradient of the residual stream.
template <typename X, typename Y>
__device__ void add_scaled_any(X* x, const Y* y, float alpha, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        x[i] = from_float<X>(to_float(x[i]) + alpha * to_float(y[i]));
    }
}

extern "C" __global__ void add_scaled_bf16(__nv_bfloat16* x, const __nv_bfloat16* y, float alpha,
                                           int n) {
    add_scaled(x, y, alpha, n);
}

extern "C" __global__ void add_scaled_f32_bf16(float* x, const __nv_bfloat16* y, float alpha,
                                               int n) {
    add_scaled(x, y, alpha, n);
}

extern "C" __global__ void add_scaled_bf16_f32(__nv_bfloat16* x, const float* y, float alpha,
                                               int n) {
    add_scaled_any(x, y, alpha, n);
}

extern "C" __global__ void add_scaled_f32_f32(float* x, const float* y, float alpha, int n) {
    add_scaled_any(x, y, alpha, n);
}

// dst = src in dst's element type, over n elements: f32 master weights into
// their bf16 working copy, and back.
extern "C" __global__ void convert_f32_bf16(__nv_bfloat16* dst, const float* src, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        dst[i] = __float2bfloat16(src[i]);
}

extern "C" __global__ void convert_bf16_f32(float* dst, const __nv_bfloat16* src, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        dst[i] = __bfloat162float(src[i]);
}

// x *= s over n f32 elements (gradient clipping).
extern "C" __global__ void scale_f32(float* x, float s, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        x[i] *= s;
}

// One AdamW step over every trainable tensor in one launch, in
// torch.optim.AdamW's order (see Backend::adamw_step); the scalars are formed
// on the host in f64 and rounded once, as the CPU device forms them.
//
// `table` holds ADAMW_WORDS words per tensor: param, m, v, grad (f32), the
// bf16 working copy refreshed from param (0: none), the element count, and
// the tensor's first block. Block b steps elements
// (b − first)·ADAMW_CHUNK .. +ADAMW_CHUNK of the last tensor whose first
// block is ≤ b. Grid: the blocks of all tensors; block ADAMW_THREADS.
#define ADAMW_WORDS 7
#define ADAMW_THREADS 256
#define ADAMW_CHUNK (4 * ADAMW_THREADS)

extern "C" __global__ void __launch_bounds__(ADAMW_THREADS)
    adamw_f32(const unsigned long long* table, int tensors, float decay, float step_size,
              float bc2_sqrt, float one_minus_b1, float one_minus_b2, float beta2, float eps) {
    const unsigned long long b = blockIdx.x;
    int lo = 0, hi = tensors - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (table[mid * ADAMW_WORDS + 6] <= b) lo = mid;
        else hi = mid - 1;
    }
    const unsigned long long* e = table + lo * ADAMW_WORDS;
    float* param = reinterpret_cast<float*>(e[0]);
    float* m = reinterpret_cast<float*>(e[1]);
    float* v = reinterpret_cast<float*>(e[2]);
    const float* grad = reinterpret_cast<const float*>(e[3]);
    __nv_bfloat16* copy = reinterpret_cast<__nv_bfloat16*>(e[4]);
    const long long n = (long long)e[5];
    const long long start = (long long)(b - e[6]) * ADAMW_CHUNK;
    const long long end = min(n, start + ADAMW_CHUNK);
    for (long long i = start + threadIdx.x; i < end; i += ADAMW_THREADS) {
        float g = grad[i];
        float p = param[i] * decay;
        float mi = m[i] + one_minus_b1 * (g - m[i]);
        float vi = v[i] * beta2 + one_minus_b2 * g * g;
        float denom = sqrtf(vi) / bc2_sqrt + eps;
        p -= step_size * (mi / denom);
        param[i] = p;
        m[i] = mi;
        v[i] = vi;
        if (copy) copy[i] = __float2bfloat16_rn(p);
    }
}

// out = x * (1 + erf(x / sqrt(2))) / 2 (GELU, the exact form BERT uses),
// element-wise over n elements.
extern "C" __global__ void gelu_fwd_bf16(__nv_bfloat16* out, const __nv_bfloat16* x, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        float v = __bfloat162float(x[i]);
        out[i] = __float2bfloat16(0.5f * v * (1.0f + erff(v * 0.70710678118654752f)));
    }
}

// x[i] += bias[i % d] over n elements of rows of width d (a Linear's bias).
extern "C" __global__ void add_bias_bf16(__nv_bfloat16* x, const __nv_bfloat16* bias, int n,
                                         int d) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        x[i] = __float2bfloat16(__bfloat162float(x[i]) + __bfloat162float(bias[i % d]));
    }
}

// out = silu(gate) * up, element-wise over n elements.
extern "C" __global__ void swiglu_fwd_bf16(__nv_bfloat16* out, const __nv_bfloat16* gate,
                                           const __nv_bfloat16* up, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        float g = __bfloat162float(gate[i]);
        float silu = g / (1.0f + expf(-g));
        out[i] = __float2bfloat16(silu * __bfloat162float(up[i]));
    }
}

// out[r] = table[ids[r]]: one block per row r of out [n, d]; table [vocab, d].
// Ids are checked on the host before the launch.
template <typename Out>
__device__ void embedding(Out* out, const unsigned* ids, const __nv_bfloat16* table, int d) {
    const __nv_bfloat16* src = table + (size_t)ids[blockIdx.x] * d;
    Out* dst = out + (size_t)blockIdx.x * d;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        dst[c] = from_float<Out>(__bfloat162float(src[c]));
    }
}

extern "C" __global__ void embedding_fwd_bf16(__nv_bfloat16* out, const unsigned* ids,
                                              const __nv_bfloat16* table, int d) {
    embedding(out, ids, table, d);
}

extern "C" __global__ void embedding_fwd_bf16_f32(float* out, const unsigned* ids,
                                                  const __nv_bfloat16* table, int d) {
    embedding(out, ids, table, d);
}

// Rotary position embedding in place, HF "rotate half" layout: in each head of
// width hd, element i < hd/2 pairs with i + hd/2 and turns by the angle
// sign * (pos0 + row) * theta^(-2i/hd): sign 1 is the forward, and -1 its
// backward (the transposed rotation, applied to the gradient). One thread per
// (row, head, i); x [n, heads*hd].
__device__ void rope(__nv_bfloat16* x, int n, int heads, int hd, int pos0, float theta,
                     float sign) {
    int half = hd / 2;
    int total = n * heads * half;
    for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < total; t += gridDim.x * blockDim.x) {
        int i = t % half;
        int head = (t / half) % heads;
        int row = t / (half * heads);
        // Same f32 arithmetic as the CPU device (and HF): inv_freq, then pos * inv_freq.
        float inv_freq = 1.0f / powf(theta, (float)(2 * i) / (float)hd);
        float angle = (float)(pos0 + row) * inv_freq;
        float s, c;
        sincosf(angle, &s, &c);
        s *= sign;
        __nv_bfloat16* p = x + (size_t)row * heads * hd + head * hd;
        float x1 = __bfloat162float(p[i]);
        float x2 = __bfloat162float(p[i + half]);
        p[i] = __float2bfloat16(x1 * c - x2 * s);
        p[i + half] = __float2bfloat16(x2 * c + x1 * s);
    }
}

extern "C" __global__ void rope_fwd_bf16(__nv_bfloat16* x, int n, int heads, int hd, int pos0,
                                         float theta) {
    rope(x, n, heads, hd, pos0, theta, 1.0f);
}

extern "C" __global__ void rope_bwd_bf16(__nv_bfloat16* dx, int n, int heads, int hd, int pos0,
                                         float theta) {
    rope(dx, n, heads, hd, pos0, theta, -1.0f);
}

// Backward of out = silu(gate) * up, element-wise over n elements, with s the
// logistic of gate: dgate = dout * up * s * (1 + gate * (1 - s)), dup = dout *
// silu(gate). Both overwritten.
extern "C" __global__ void swiglu_bwd_bf16(__nv_bfloat16* dgate, __nv_bfloat16* dup,
                                           const __nv_bfloat16* dout, const __nv_bfloat16* gate,
                                           const __nv_bfloat16* up, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        float g = __bfloat162float(gate[i]);
        float o = __bfloat162float(dout[i]);
        float s = 1.0f / (1.0f + expf(-g));
        dgate[i] = __float2bfloat16(o * __bfloat162float(up[i]) * s * (1.0f + g * (1.0f - s)));
        dup[i] = __float2bfloat16(o * g * s);
    }
}

// Backward of out[r] = table[ids[r]]: dtable[ids[r]] += dout[r], one block per
// row r of dout [n, d] (f32, the residual stream's gradient) into dtable
// [vocab, d] (f32). Rows that share an id add atomically.
extern "C" __global__ void embedding_bwd_f32(float* dtable, const unsigned* ids, const float* dout,
                                             int d) {
    float* dst = dtable + (size_t)ids[blockIdx.x] * d;
    const float* src = dout + (size_t)blockIdx.x * d;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        atomicAdd(&dst[c], src[c]);
    }
}

// Inverted dropout in place over n elements: x[i] *= keep_scale where kept,
// else 0 (keep_scale = 1 / (1 - p), formed on the host as the CPU does).
template <typename X>
__device__ void dropout(X* x, float p, float keep_scale, unsigned long long seed, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        x[i] = dropout_keeps(seed, (unsigned long long)i, p) ? from_float<X>(to_float(x[i]) * keep_scale)
                                                              : from_float<X>(0.0f);
    }
}

extern "C" __global__ void dropout_bf16(__nv_bfloat16* x, float p, float keep_scale,
                                        unsigned long long seed, int n) {
    dropout(x, p, keep_scale, seed, n);
}

extern "C" __global__ void dropout_f32(float* x, float p, float keep_scale, unsigned long long seed,
                                       int n) {
    dropout(x, p, keep_scale, seed, n);
}
