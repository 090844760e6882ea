// Sampling: one token id per row of f32 logits, exactly the token that
// `engine::infer::sampler::choose` (src/infer/sampler.rs) picks.
//
// One block per row, any multiple of 32 threads up to 1024 (launchers use
// 1024), any vocabulary size below 2^23. No scratch memory: every pass reads
// the row again (it stays in L1/L2).
//
// The shared definition (see sampler.rs) makes the choice independent of the
// order of any sum:
//   key(x)     an order-preserving map of the float to u32 (NaN as -inf, -0 as
//              +0); candidates are ordered by (key descending, id ascending).
//   W(x)       the weight, floor(exp((x - max) / T) * 2^40) as an integer
//              (exactly 2^40 for x == max), with exp evaluated by the same
//              sequence of correctly rounded f32 operations on both sides;
//              sums of weights are exact u64 sums.
//   Tokens with equal keys have equal weights.
//
// sample_argmax_f32: the block maximum of (key << 32 | ~id): the largest key,
// and the lowest id among equals.
//
// sample_weights_f32: every token's W (for the tests).
//
// sample_f32, with n = vocab (temperature <= 0 or NaN: the argmax):
//   1. kmax = block max of the keys; max = the logit it stands for.
//   2. Every kept set is "keys > tau, plus the first j tokens (by id) whose
//      key is tau" (everything: tau = 0, which is below every key).
//   3. top-k (0 < k < n): tau = the k-th largest key, found by bisection on
//      [0, kmax + 1) keeping count(key >= lo) >= k > count(key >= hi) with one
//      block-wide count per step (32 steps at most); j = k - count(key > tau).
//   4. top-p (p < 1): S1 = the weight of the top-k set (one pass); need =
//      max(1, ceil(p * S1)) in f64. Bisection for the largest tau' with
//      W(top-k set, key >= tau') >= need, on [tau, kmax + 1) with block-wide
//      sums of weights: above tau, the top-k set is just "key >= mid". Then
//      tau = tau' and j = ceil((need - W(key > tau')) / W(tau')): the
//      shortest prefix in candidate order that reaches need.
//   5. Ties: if the set is limited, the id of the j-th token with key == tau
//      (in id order) by a block-wide prefix count: each thread counts the
//      ties in its own contiguous segment of ids, an exclusive block scan
//      of the counts finds the one thread whose segment holds the j-th, and
//      it walks its segment.
//   6. The draw: each thread sums the weights of the kept tokens of its
//      segment; an exclusive block scan gives every segment's running sum
//      and the kept total S; thr = floor(u * S) in f64, clamped to [0, S-1];
//      the one thread whose segment's range of running sums crosses thr
//      walks it and writes the first kept token whose running sum exceeds thr.
// All control flow that contains barriers depends only on block-wide results.
//
// Numerics must match the CPU bit for bit: only IEEE-exact operations with
// round-to-nearest (__fdiv_rn, __fmaf_rn, ... so nothing is contracted or
// approximated); not for --use_fast_math (flush to zero could change a
// weight whose logit difference is subnormal).

#include "common.cuh"

// __launch_bounds__(SMP_THREADS, 1): with the max alone ptxas aims at two
// blocks per SM (32 registers) and spills; one block of 1024 gets 64.
#define SMP_THREADS 1024
#define SMP_WEIGHT_ONE (1ull << 40)

typedef unsigned long long u64;

// NaN counts as -inf, -0 as +0.
__device__ __forceinline__ float smp_canonical(float x) {
    if (x != x) return __uint_as_float(0xff800000u);
    if (x == 0.0f) return 0.0f;
    return x;
}

// Order-preserving image of the canonical float: a < b <=> key(a) < key(b).
// The smallest key is that of -inf, 0x007fffff: 0 is below every key.
__device__ __forceinline__ unsigned smp_key(float x) {
    const unsigned b = __float_as_uint(smp_canonical(x));
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// The canonical float whose key is k.
__device__ __forceinline__ float smp_key_value(unsigned k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// floor(exp(d) * 2^40) for d <= 0; 0 for d < -28 or NaN. As sampler.rs
// `exp_fixed`, operation for operation.
__device__ __forceinline__ u64 smp_exp_fixed(float d) {
    if (!(d >= -28.0f)) return 0ull;
    const float LOG2E = __uint_as_float(0x3fb8aa3bu);
    const float LN2_HI = __uint_as_float(0x3f317200u);
    const float LN2_LO = __uint_as_float(0x35bfbe8eu);
    const float k = rintf(__fmul_rn(d, LOG2E));  // -40 ..= 0
    float r = __fmaf_rn(k, -LN2_HI, d);
    r = __fmaf_rn(k, -LN2_LO, r);
    float p = 1.0f / 5040.0f;
    p = __fmaf_rn(p, r, 1.0f / 720.0f);
    p = __fmaf_rn(p, r, 1.0f / 120.0f);
    p = __fmaf_rn(p, r, 1.0f / 24.0f);
    p = __fmaf_rn(p, r, 1.0f / 6.0f);
    p = __fmaf_rn(p, r, 0.5f);
    p = __fmaf_rn(p, r, 1.0f);
    p = __fmaf_rn(p, r, 1.0f);
    const float scale = __uint_as_float((unsigned)(127 + 40 + (int)k) << 23);
    return (u64)__fmul_rn(p, scale);
}

// The weight of canonical logit x when the maximum is mx, temperature t > 0.
__device__ __forceinline__ u64 smp_weight(float x, float mx, float t) {
    if (x == mx) return SMP_WEIGHT_ONE;
    return smp_exp_fixed(__fdiv_rn(__fsub_rn(x, mx), t));
}

struct SmpSum {
    template <typename T>
    __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct SmpMax {
    template <typename T>
    __device__ __forceinline__ T operator()(T a, T b) const { return a > b ? a : b; }
};

// op over the block; every thread gets the result. `scratch` holds one value
// per warp. Ends with a barrier, so scratch can be reused right away.
template <typename T, typename Op>
__device__ __forceinline__ T smp_block_reduce(T v, T* scratch, Op op) {
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(FULL_MASK, v, o));
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    T r = scratch[0];
    for (int w = 1; w < warps; w++) r = op(r, scratch[w]);
    __syncthreads();
    return r;
}

// Exclusive prefix sum of v over the threads of the block in threadIdx order;
// *total gets the block's sum. Ends with a barrier.
template <typename T>
__device__ __forceinline__ T smp_block_exclusive_scan(T v, T* scratch, T* total) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    T incl = v;
    for (int o = 1; o < 32; o <<= 1) {
        const T y = __shfl_up_sync(FULL_MASK, incl, o);
        if (lane >= o) incl += y;
    }
    if (lane == 31) scratch[warp] = incl;
    __syncthreads();
    T before = 0, all = 0;
    for (int w = 0; w < warps; w++) {
        const T s = scratch[w];
        if (w < warp) before += s;
        all += s;
    }
    __syncthreads();
    *total = all;
    return before + incl - v;
}

extern "C" __global__ void __launch_bounds__(SMP_THREADS, 1)
    sample_argmax_f32(unsigned* out, const float* logits, int vocab) {
    __shared__ u64 scratch[32];
    const float* row = logits + (size_t)blockIdx.x * vocab;
    u64 best = 0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const u64 v = ((u64)smp_key(row[i]) << 32) | (u64)(0xffffffffu - (unsigned)i);
        best = v > best ? v : best;
    }
    best = smp_block_reduce(best, scratch, SmpMax());
    if (threadIdx.x == 0) out[blockIdx.x] = 0xffffffffu - (unsigned)best;
}

// The fixed-point weights W(x) of one row, as sample_f32 computes them (the
// tests compare them with sampler.rs `weight`, bit for bit); out [rows, vocab].
extern "C" __global__ void __launch_bounds__(SMP_THREADS, 1)
    sample_weights_f32(u64* out, const float* logits, int vocab, float temperature) {
    __shared__ unsigned scratch[32];
    const float* row = logits + (size_t)blockIdx.x * vocab;
    u64* out_row = out + (size_t)blockIdx.x * vocab;
    unsigned kmax = 0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const unsigned k = smp_key(row[i]);
        kmax = k > kmax ? k : kmax;
    }
    kmax = smp_block_reduce(kmax, scratch, SmpMax());
    const float mx = smp_key_value(kmax);
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        out_row[i] = smp_weight(smp_canonical(row[i]), mx, temperature);
    }
}

extern "C" __global__ void __launch_bounds__(SMP_THREADS, 1)
    sample_f32(unsigned* out, const float* logits, int vocab, float temperature, int top_k,
               float top_p, float u) {
    __shared__ u64 scratch64[32];
    __shared__ unsigned scratch32[32];
    __shared__ int cut_shared;
    const float* row = logits + (size_t)blockIdx.x * vocab;
    const int n = vocab, tid = threadIdx.x, nt = blockDim.x;

    // 1. The largest key and the logit it stands for (and the argmax, which
    //    is the answer for a temperature <= 0 or NaN).
    u64 best = 0;
    for (int i = tid; i < n; i += nt) {
        const u64 v = ((u64)smp_key(row[i]) << 32) | (u64)(0xffffffffu - (unsigned)i);
        best = v > best ? v : best;
    }
    best = smp_block_reduce(best, scratch64, SmpMax());
    if (!(temperature > 0.0f)) {
        if (tid == 0) out[blockIdx.x] = 0xffffffffu - (unsigned)best;
        return;
    }
    const unsigned kmax = (unsigned)(best >> 32);
    const float mx = smp_key_value(kmax);

    // 2. The kept set: key > tau, or key == tau among the first j by id.
    unsigned tau = 0;
    unsigned j = 0;
    bool limited = false;

    // 3. top-k: tau = the k-th largest key.
    if (top_k > 0 && top_k < n) {
        unsigned lo = 0, hi = kmax + 1, count_hi = 0;
        while (hi - lo > 1) {
            const unsigned mid = lo + (hi - lo) / 2;
            unsigned c = 0;
            for (int i = tid; i < n; i += nt) c += smp_key(row[i]) >= mid ? 1u : 0u;
            c = smp_block_reduce(c, scratch32, SmpSum());
            if (c >= (unsigned)top_k) {
                lo = mid;
            } else {
                hi = mid;
                count_hi = c;
            }
        }
        tau = lo;
        j = (unsigned)top_k - count_hi;
        limited = true;
    }

    // 4. top-p: the shortest prefix of the top-k set reaching need.
    if (top_p < 1.0f) {
        u64 s = 0;
        for (int i = tid; i < n; i += nt) {
            const float x = smp_canonical(row[i]);
            if (smp_key(x) > tau) s += smp_weight(x, mx, temperature);
        }
        u64 s1 = smp_block_reduce(s, scratch64, SmpSum());
        if (limited) s1 += (u64)j * smp_weight(smp_key_value(tau), mx, temperature);
        const double want = (double)top_p * (double)s1;
        u64 need = want > 0.0 ? (u64)ceil(want) : 0ull;
        need = need < 1ull ? 1ull : need;

        unsigned lo = tau, hi = kmax + 1;
        u64 mass_hi = 0;
        while (hi - lo > 1) {
            const unsigned mid = lo + (hi - lo) / 2;
            u64 m = 0;
            for (int i = tid; i < n; i += nt) {
                const float x = smp_canonical(row[i]);
                if (smp_key(x) >= mid) m += smp_weight(x, mx, temperature);
            }
            m = smp_block_reduce(m, scratch64, SmpSum());
            if (m >= need) {
                lo = mid;
            } else {
                hi = mid;
                mass_hi = m;
            }
        }
        tau = lo;
        const u64 w_tau = smp_weight(smp_key_value(tau), mx, temperature);  // > 0
        j = (unsigned)((need - mass_hi + w_tau - 1) / w_tau);
        limited = true;
    }

    // Contiguous segments of ids, one per thread, for the scans.
    const int seg = (n + nt - 1) / nt;
    const int begin = min(tid * seg, n), end = min(begin + seg, n);

    // 5. Ties at tau: the id of the j-th one.
    int cut = n;
    if (limited) {
        if (tid == 0) cut_shared = n;  // (the scan's barriers order it)
        unsigned c = 0;
        for (int i = begin; i < end; i++) c += smp_key(row[i]) == tau ? 1u : 0u;
        unsigned total;
        const unsigned before = smp_block_exclusive_scan(c, scratch32, &total);
        if (before < j && j <= before + c) {
            unsigned r = before;
            for (int i = begin; i < end; i++) {
                if (smp_key(row[i]) == tau && ++r == j) {
                    cut_shared = i;
                    break;
                }
            }
        }
        __syncthreads();
        cut = cut_shared;
    }

    // 6. The draw, in id order.
    u64 w = 0;
    for (int i = begin; i < end; i++) {
        const float x = smp_canonical(row[i]);
        const unsigned k = smp_key(x);
        if (k > tau || (k == tau && i <= cut)) w += smp_weight(x, mx, temperature);
    }
    u64 total;
    const u64 before = smp_block_exclusive_scan(w, scratch64, &total);
    const double at = (double)u * (double)total;
    u64 thr = !(at > 0.0) ? 0ull : (at >= (double)total ? total - 1 : (u64)at);
    thr = thr < total - 1 ? thr : total - 1;
    if (before <= thr && thr < before + w) {
        u64 cum = before;
        for (int i = begin; i < end; i++) {
            const float x = smp_canonical(row[i]);
            const unsigned k = smp_key(x);
            if (k > tau || (k == tau && i <= cut)) {
                cum += smp_weight(x, mx, temperature);
                if (cum > thr) {
                    out[blockIdx.x] = (unsigned)i;
                    break;
                }
            }
        }
    }
}
