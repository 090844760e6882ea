// Serving over a paged KV cache: the kernels of one forward over a ragged
// batch, whose rows belong to different sequences at their own positions.
//
// The pool of one layer's keys (or values) is [num_slots, kv_heads*hd], cut
// into blocks of block_size slots; a sequence's block table lists, in order,
// the blocks holding its positions 0..ctx: position p lives in slot
// table[p / block_size] * block_size + p % block_size. All tensors bf16 (the
// scatter also f32), f32 arithmetic. Every output is overwritten; rows a
// launch is not told about are not touched.
//
//   rope_rows_bf16         RoPE in place, row r at positions[r]: rope_fwd_bf16
//                          (elementwise.cu) with a position per row, the same
//                          f32 arithmetic. Grid-stride over (row, head, pair).
//   scatter_rows_bf16/f32  dst[slots[i]] = src[i] (the step's keys or values
//                          into the pool). Grid (n), block 256. Slots are
//                          distinct (checked by the launcher).
//   attention_paged_bf16   causal grouped-query attention through the block
//                          tables. Grid (tasks, heads), block 32*PAGED_WARPS,
//                          no dynamic smem; hd <= PAGED_MAX_HD.
//
// attention_paged_bf16 is version 1 of attention_fwd_bf16 (attention.cu) with
// the keys read through a block table: one block per (query row, head), each
// warp an online softmax (running max m, normaliser l, weighted sum of values
// in registers, hd/32 dims per lane) over keys warp, warp + PAGED_WARPS, ...;
// the warps' partial results merged through shared memory at the end. Decode
// (one row per sequence) is the hot case, bound by reading the pool. Each
// (row, head) is computed alone, so a row's result does not depend on the
// other rows of the batch.

#include "common.cuh"

// The largest finite float, negated: the start of a running maximum (exp of
// -FLT_MAX_F - m is exactly 0, as -inf would give).
#define FLT_MAX_F 3.402823466e+38f

#define PAGED_WARPS 4
#define PAGED_MAX_HD 256
#define PAGED_PER_LANE (PAGED_MAX_HD / 32)

// x [n, heads*hd] in place: in each head, element i pairs with i + hd/2 and
// turns by positions[row] * theta^(-2i/hd).
extern "C" __global__ void rope_rows_bf16(__nv_bfloat16* x, const unsigned* positions, int n,
                                          int heads, int hd, float theta) {
    int half = hd / 2;
    int total = n * heads * half;
    for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < total; t += gridDim.x * blockDim.x) {
        int i = t % half;
        int head = (t / half) % heads;
        int row = t / (half * heads);
        // Same f32 arithmetic as rope_fwd_bf16 and the CPU device (and HF).
        float inv_freq = 1.0f / powf(theta, (float)(2 * i) / (float)hd);
        float angle = (float)positions[row] * inv_freq;
        float s, c;
        sincosf(angle, &s, &c);
        __nv_bfloat16* p = x + (size_t)row * heads * hd + head * hd;
        float x1 = __bfloat162float(p[i]);
        float x2 = __bfloat162float(p[i + half]);
        p[i] = __float2bfloat16(x1 * c - x2 * s);
        p[i + half] = __float2bfloat16(x2 * c + x1 * s);
    }
}

// dst [num_slots, d], src [n, d]: block i copies src row i to dst row slots[i].
template <typename T>
__device__ void scatter_rows(T* dst, const T* src, const unsigned* slots, int d) {
    T* to = dst + (size_t)slots[blockIdx.x] * d;
    const T* from = src + (size_t)blockIdx.x * d;
    for (int c = threadIdx.x; c < d; c += blockDim.x) to[c] = from[c];
}

extern "C" __global__ void scatter_rows_bf16(__nv_bfloat16* dst, const __nv_bfloat16* src,
                                             const unsigned* slots, int d) {
    scatter_rows(dst, src, slots, d);
}

extern "C" __global__ void scatter_rows_f32(float* dst, const float* src, const unsigned* slots,
                                            int d) {
    scatter_rows(dst, src, slots, d);
}

// out, q [n, heads*hd]; k, v [num_slots, kv_heads*hd]. tasks [3 * tasks]:
// for task t (blockIdx.x), tasks[3t] is its row of q and out, tasks[3t + 1]
// its position P (it sees positions 0..P), tasks[3t + 2] the offset of its
// sequence's block table in `blocks`. Head h (blockIdx.y) reads kv head
// h / (heads / kv_heads); scores scaled by 1/sqrt(hd).
extern "C" __global__ void attention_paged_bf16(__nv_bfloat16* out, const __nv_bfloat16* q,
                                                const __nv_bfloat16* k, const __nv_bfloat16* v,
                                                const unsigned* tasks, const unsigned* blocks,
                                                int heads, int kv_heads, int hd, int block_size) {
    __shared__ float part_m[PAGED_WARPS], part_l[PAGED_WARPS];
    __shared__ float part_acc[PAGED_WARPS][PAGED_MAX_HD];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int h = blockIdx.y, g = h / (heads / kv_heads);
    const int row = (int)tasks[3 * blockIdx.x], len = (int)tasks[3 * blockIdx.x + 1] + 1;
    const unsigned* table = blocks + tasks[3 * blockIdx.x + 2];
    const int kv_width = kv_heads * hd;
    const float scale = rsqrtf((float)hd);
    const __nv_bfloat16* q_row = q + (size_t)row * heads * hd + h * hd;

    float qr[PAGED_PER_LANE], acc[PAGED_PER_LANE];
    for (int t = 0; t < PAGED_PER_LANE; t++) {
        int c = lane + 32 * t;
        qr[t] = c < hd ? __bfloat162float(q_row[c]) : 0.0f;
        acc[t] = 0.0f;
    }
    float m = -FLT_MAX_F, l = 0.0f;
    for (int j = warp; j < len; j += PAGED_WARPS) {
        const size_t slot = (size_t)table[j / block_size] * block_size + j % block_size;
        const __nv_bfloat16* kj = k + slot * kv_width + g * hd;
        const __nv_bfloat16* vj = v + slot * kv_width + g * hd;
        float s = 0.0f;
        for (int t = 0; t < PAGED_PER_LANE; t++) {
            int c = lane + 32 * t;
            if (c < hd) s += qr[t] * __bfloat162float(kj[c]);
        }
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
        s *= scale;
        float m_new = fmaxf(m, s);
        float corr = expf(m - m_new), p = expf(s - m_new);
        l = l * corr + p;
        for (int t = 0; t < PAGED_PER_LANE; t++) {
            int c = lane + 32 * t;
            acc[t] = acc[t] * corr + (c < hd ? p * __bfloat162float(vj[c]) : 0.0f);
        }
        m = m_new;
    }
    if (lane == 0) {
        part_m[warp] = m;
        part_l[warp] = l;
    }
    for (int t = 0; t < PAGED_PER_LANE; t++) {
        int c = lane + 32 * t;
        if (c < hd) part_acc[warp][c] = acc[t];
    }
    __syncthreads();
    // Merge: warps that saw no key have m = -FLT_MAX_F and weigh exp(...) = 0.
    float big = -FLT_MAX_F;
    for (int w = 0; w < PAGED_WARPS; w++) big = fmaxf(big, part_m[w]);
    float total = 0.0f;
    for (int w = 0; w < PAGED_WARPS; w++) total += part_l[w] * expf(part_m[w] - big);
    __nv_bfloat16* out_row = out + (size_t)row * heads * hd + h * hd;
    for (int c = threadIdx.x; c < hd; c += blockDim.x) {
        float o = 0.0f;
        for (int w = 0; w < PAGED_WARPS; w++) o += part_acc[w][c] * expf(part_m[w] - big);
        out_row[c] = __float2bfloat16(o / total);
    }
}
