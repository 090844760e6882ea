// Top-k selection for retrieval: the k best scores of each row of an f32
// matrix (one row per query, one column per indexed vector), best first by
// score (-0 as +0, NaN as -inf), ties to the lower column.
//
// Each (score, column) becomes one 64-bit key that orders exactly as wanted:
// the score's bits made order-preserving in the high word (negative floats
// flipped whole, positive ones with the sign bit set), and ~column in the low
// word, so a lower column ranks higher among equal scores. Keys are unique,
// so the k-th largest key is a sharp threshold: a radix select over the key
// in 8 passes of 8 bits finds it (a 256-bin histogram of the keys that match
// the prefix found so far, then the bin where the count from the top reaches
// k), and a last pass writes the k keys at or above it, in no particular
// order.
//
// A row is cut into segments of `seg` columns, one block each, so that one
// query over a million vectors still fills the GPU; each block writes the
// min(k, its width) best of its segment, then fills its remaining slots with
// (column 0xffffffff, -inf), which ranks below every real entry. The host
// merges each row's segments x k candidates and sorts the k best.
//
// topk_f32: grid (rows, segments), block TOPK_THREADS; idx, val
// [rows, segments, k]; k <= seg.

#include "common.cuh"

#define TOPK_THREADS 256

// The score ranked and reported (backend::topk::rank_score): -0 is +0, a NaN
// is -inf.
__device__ __forceinline__ float topk_rank(float v) {
    return v != v ? __uint_as_float(0xff800000u) : v + 0.0f;
}

__device__ __forceinline__ unsigned long long topk_key(float v, unsigned col) {
    v = topk_rank(v);
    unsigned u = __float_as_uint(v);
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return ((unsigned long long)u << 32) | (unsigned long long)(0xffffffffu - col);
}

extern "C" __global__ void __launch_bounds__(TOPK_THREADS)
    topk_f32(unsigned* idx, float* val, const float* scores, int m, int k, int seg) {
    __shared__ unsigned hist[256];
    __shared__ unsigned long long prefix, mask;
    __shared__ unsigned remaining, count;
    const float* row = scores + (size_t)blockIdx.x * m;
    const int c0 = blockIdx.y * seg, c1 = min(m, c0 + seg);
    const int kk = min(k, c1 - c0);
    const size_t out = ((size_t)blockIdx.x * gridDim.y + blockIdx.y) * k;
    if (threadIdx.x == 0) {
        prefix = 0;
        mask = 0;
        remaining = (unsigned)kk;
        count = 0;
    }
    for (int shift = 56; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < 256; b += blockDim.x) hist[b] = 0;
        __syncthreads();
        for (int i = c0 + threadIdx.x; i < c1; i += blockDim.x) {
            unsigned long long key = topk_key(row[i], (unsigned)i);
            if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255], 1u);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            // From the top bin down, to the bin holding the remaining-th key.
            unsigned r = remaining;
            int b = 255;
            while (hist[b] < r) r -= hist[b--];
            prefix |= (unsigned long long)b << shift;
            mask |= 255ull << shift;
            remaining = r;
        }
        __syncthreads();
    }
    // prefix is now the kk-th largest key itself.
    for (int i = c0 + threadIdx.x; i < c1; i += blockDim.x) {
        float v = topk_rank(row[i]);
        if (topk_key(v, (unsigned)i) >= prefix) {
            unsigned slot = atomicAdd(&count, 1u);
            idx[out + slot] = (unsigned)i;
            val[out + slot] = v;
        }
    }
    for (int slot = kk + threadIdx.x; slot < k; slot += blockDim.x) {
        idx[out + slot] = 0xffffffffu;
        val[out + slot] = __uint_as_float(0xff800000u);
    }
}
