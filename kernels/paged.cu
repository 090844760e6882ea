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
//                          tables. Grid (tasks, heads), block 32*ATT_WARPS,
//                          no dynamic smem; hd <= ATT_MAX_HD.
//
// attention_paged_bf16 is attention_fwd_bf16 (attention.cu) with the keys read
// through a block table: the same `attend_row` (common.cuh), one block per
// (query row, head), each warp an online softmax over every ATT_WARPS-th key,
// the warps' partial results merged through shared memory at the end. Decode
// (one row per sequence) is the hot case, bound by reading the pool. Each
// (row, head) is computed alone, so a row's result does not depend on the
// other rows of the batch.

#include "common.cuh"

// Position j's row of the pool through a sequence's block table.
struct PagedKeys {
    const unsigned* table;
    int block_size, kv_width;
    __device__ size_t operator()(int j) const {
        return ((size_t)table[j / block_size] * block_size + j % block_size) * kv_width;
    }
};

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
    const int h = blockIdx.y, g = h / (heads / kv_heads);
    const int row = (int)tasks[3 * blockIdx.x], len = (int)tasks[3 * blockIdx.x + 1] + 1;
    const PagedKeys keys{blocks + tasks[3 * blockIdx.x + 2], block_size, kv_heads * hd};
    const size_t at = (size_t)row * heads * hd + h * hd;
    attend_row(out + at, q + at, k + g * hd, v + g * hd, keys, hd, len);
}
