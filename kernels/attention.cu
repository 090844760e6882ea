// Causal grouped-query attention of n new queries over a KV cache.
//
// q, out [n, heads*hd]; k, v [capacity, kv_heads*hd]; query i sits at position
// pos0 + i and sees keys 0..pos0+i; head h reads kv head h / (heads/kv_heads).
//
// Version 1 (decode-style, used for prefill too): one block per (query, head),
// ATT_WARPS warps splitting the keys; each warp keeps an online softmax (running
// max m, normaliser l, weighted sum of values in registers, hd/32 dims per lane),
// and the warps' partial results are merged through shared memory at the end.
// A flash-style tiled prefill kernel that saves the log-sum-exp comes next.

#include "common.cuh"

// The largest finite float, negated: the start of a running maximum (NVRTC has
// no INFINITY macro, and exp(-FLT_MAX_F - m) is exactly 0 as -inf would give).
#define FLT_MAX_F 3.402823466e+38f

#define ATT_WARPS 4
#define ATT_MAX_HD 256
#define ATT_PER_LANE (ATT_MAX_HD / 32)

// Grid (n, heads), block 32*ATT_WARPS. Requires hd <= ATT_MAX_HD.
extern "C" __global__ void attention_fwd_bf16(__nv_bfloat16* out, const __nv_bfloat16* q,
                                              const __nv_bfloat16* k, const __nv_bfloat16* v,
                                              int heads, int kv_heads, int hd, int pos0) {
    __shared__ float part_m[ATT_WARPS], part_l[ATT_WARPS];
    __shared__ float part_acc[ATT_WARPS][ATT_MAX_HD];
    const int i = blockIdx.x, h = blockIdx.y;
    const int g = h / (heads / kv_heads);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int width = heads * hd, kv_width = kv_heads * hd;
    const float scale = rsqrtf((float)hd);

    float qr[ATT_PER_LANE], acc[ATT_PER_LANE];
    for (int t = 0; t < ATT_PER_LANE; t++) {
        int c = lane + 32 * t;
        qr[t] = c < hd ? __bfloat162float(q[(size_t)i * width + h * hd + c]) : 0.0f;
        acc[t] = 0.0f;
    }
    float m = -FLT_MAX_F, l = 0.0f;
    const int len = pos0 + i + 1;
    for (int j = warp; j < len; j += ATT_WARPS) {
        const __nv_bfloat16* kj = k + (size_t)j * kv_width + g * hd;
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
        const __nv_bfloat16* vj = v + (size_t)j * kv_width + g * hd;
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
    // Merge: warps that saw no key have m = -inf and weigh exp(-inf) = 0.
    float big = -FLT_MAX_F;
    for (int w = 0; w < ATT_WARPS; w++) big = fmaxf(big, part_m[w]);
    float total = 0.0f;
    for (int w = 0; w < ATT_WARPS; w++) total += part_l[w] * expf(part_m[w] - big);
    for (int c = threadIdx.x; c < hd; c += blockDim.x) {
        float o = 0.0f;
        for (int w = 0; w < ATT_WARPS; w++) o += part_acc[w][c] * expf(part_m[w] - big);
        out[(size_t)i * width + h * hd + c] = __float2bfloat16(o / total);
    }
}
