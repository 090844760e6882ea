// Causal grouped-query attention of n new queries over a KV cache.
//
// q, out [n, heads*hd]; k, v [capacity, kv_heads*hd]; query i sits at position
// pos0 + i and sees keys 0..pos0+i; head h reads kv head h / (heads/kv_heads);
// scores are scaled by 1/sqrt(hd). All bf16, f32 accumulation.
//
// Version 1, attention_fwd_bf16 (decode-style, the readable reference): one
// block per (query, head), ATT_WARPS warps splitting the keys; each warp keeps
// an online softmax (running max m, normaliser l, weighted sum of values in
// registers, hd/32 dims per lane), and the warps' partial results are merged
// through shared memory at the end.
//
// Version 2, attention_prefill_bf16 (flash-style, tensor cores): one block per
// (tile of ATT_BQ queries, head); K and V tiles of ATT_BK keys staged in shared
// memory; S = Q·K^T and O += P·V on mma.sync m16n8k16; online softmax in
// registers; also writes lse [heads, n], the natural-log log-sum-exp of each
// row's scaled scores, for the backward pass. See its own comment for details.
//
// Version 1 also serves the encoder: attention_bidir_bf16, BERT's
// bidirectional attention over padded sequences, one block per (row, head).
//
// Launch configurations:
//   attention_fwd_bf16       grid (n, heads), block 128, no dynamic smem;
//                            hd <= 256.
//   attention_bidir_bf16     grid (batch*seq, heads), block 128; hd <= 256.
//   attention_prefill_bf16   grid (ceil(n/64), heads), block 128, no dynamic
//                            smem (34,816 bytes static); hd in {8, 16, 32, 64,
//                            128} (anything else traps); k and v 16-byte
//                            aligned, q and out 4-byte aligned (true of any
//                            allocation and of row offsets, hd being a
//                            multiple of 8).

#include "common.cuh"

// Key j's row in a cache whose rows are `stride` elements apart.
struct ContiguousKeys {
    int stride;
    __device__ size_t operator()(int j) const { return (size_t)j * stride; }
};

// Grid (n, heads), block 32*ATT_WARPS. Requires hd <= ATT_MAX_HD.
extern "C" __global__ void attention_fwd_bf16(__nv_bfloat16* out, const __nv_bfloat16* q,
                                              const __nv_bfloat16* k, const __nv_bfloat16* v,
                                              int heads, int kv_heads, int hd, int pos0) {
    const int i = blockIdx.x, h = blockIdx.y;
    const int g = h / (heads / kv_heads);
    const int width = heads * hd, kv_width = kv_heads * hd;
    const size_t row = (size_t)i * width + h * hd;
    attend_row(out + row, q + row, k + g * hd, v + g * hd, ContiguousKeys{kv_width}, hd,
               pos0 + i + 1);
}

// Bidirectional attention over a batch of padded sequences (BERT's
// self-attention with its padding mask): row r of q, k, v, out is token
// r % seq of sequence r / seq, whose first lens[r / seq] rows are real. A real
// query attends to every real key of its sequence; a padding row's output is
// zero. All [batch*seq, heads*hd], one kv head per head. Grid (batch*seq,
// heads), block 32*ATT_WARPS; hd <= ATT_MAX_HD.
extern "C" __global__ void attention_bidir_bf16(__nv_bfloat16* out, const __nv_bfloat16* q,
                                                const __nv_bfloat16* k, const __nv_bfloat16* v,
                                                const unsigned* lens, int seq, int heads,
                                                int hd) {
    const int r = blockIdx.x, h = blockIdx.y, b = r / seq;
    const int width = heads * hd, len = (int)lens[b];
    const size_t row = (size_t)r * width + h * hd;
    if (r % seq >= len) {
        for (int c = threadIdx.x; c < hd; c += blockDim.x) out[row + c] = __float2bfloat16(0.0f);
        return;
    }
    const size_t first = (size_t)b * seq * width + h * hd;
    attend_row(out + row, q + row, k + first, v + first, ContiguousKeys{width}, hd, len);
}

// ------------------------------------------------------------------ version 2
//
// Flash-style prefill (FlashAttention-2's loop order: queries outer, keys
// inner, the softmax normalised once at the end).
//
// Block: 4 warps, each owning 16 consecutive query rows of the block's 64
// (ATT_BQ); lane (g = lane/4, t = lane%4) holds rows g and g+8 of its warp's
// 16, in the mma C-fragment layout (see common.cuh).
//   - The warp's Q rows live in registers as mma A fragments for the whole
//     kernel (read once from global; rows >= n read as zero).
//   - Per key tile of ATT_BK = 64 keys: the block stages K and V rows
//     [k0, k0+64) of kv head h/group into shared memory with cp.async (two
//     commit groups, so S = Q·K^T starts while V is still in flight); rows at
//     or past the block's last visible key are zero-filled, never read, so no
//     cache row >= pos0+n is touched.
//   - S (16x64 per warp, f32 in registers) = Q·K^T, times log2(e)/sqrt(hd),
//     causal mask (key j visible to query i iff j <= pos0 + i) as -FLT_MAX_F;
//     then the online softmax in base 2: row max over the 4 lanes of a row by
//     shuffles, m_new = max(m, rowmax), O and l scaled by 2^(m - m_new),
//     P = 2^(S - m_new), l += rowsum(P) (kept per lane, reduced at the end).
//   - P is repacked from C fragments into bf16 A fragments in registers (the
//     C layout of two adjacent n-tiles is the A layout of one k-step) and
//     O (16 x hd per warp, f32) += P·V.
//   - The block stops after the tile holding key pos0 + last query of the
//     block; a warp skips the math (not the barriers) of tiles wholly past
//     its own last row's keys.
// Epilogue: out = O / l (bf16), lse = (m + log2 l)·ln 2.
// Shared memory: K and V tiles [64][hd + 8] bf16 each (the 8-element pad keeps
// rows 16-byte aligned for cp.async and makes the fragment reads
// bank-conflict-free), sized for hd = 128: 2·64·136·2 = 34,816 bytes.

#define ATT_BQ 64
#define ATT_BK 64
#define ATT_PF_THREADS 128
#define ATT_PF_MAX_HD 128
#define ATT_LN2 0.69314718055994531f
#define ATT_LOG2E 1.44269504088896341f

// The 32-bit word (two bf16) at p; p 4-byte aligned.
__device__ __forceinline__ unsigned ld_bf16x2(const __nv_bfloat16* p) {
    return *reinterpret_cast<const unsigned*>(p);
}

template <int HD>
__device__ __forceinline__ void attention_prefill(__nv_bfloat16* out, float* lse,
                                                  const __nv_bfloat16* q, const __nv_bfloat16* k,
                                                  const __nv_bfloat16* v, int n, int heads,
                                                  int kv_heads, int pos0, __nv_bfloat16* smem) {
    constexpr int LD = HD + 8;              // shared row stride, elements
    constexpr int QK_STEPS = (HD + 15) / 16;  // k-steps of Q·K^T (hd = 8: one, half zero)
    constexpr int S_TILES = ATT_BK / 8;     // n-tiles of S
    constexpr int PV_STEPS = ATT_BK / 16;   // k-steps of P·V
    constexpr int O_TILES = HD / 8;         // n-tiles of O
    constexpr int CHUNKS = HD / 8;          // 16-byte chunks per K/V row
    __nv_bfloat16* ks = smem;
    __nv_bfloat16* vs = smem + ATT_BK * LD;

    const int h = blockIdx.y, kvh = h / (heads / kv_heads);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    const int width = heads * HD, kv_width = kv_heads * HD;
    const int q0 = blockIdx.x * ATT_BQ;    // first query of the block
    const int qw = q0 + warp * 16;         // first query of the warp
    const int r0 = qw + g, r1 = qw + g + 8;  // this lane's two rows
    const bool warp_active = qw < n;
    const int kv_end = pos0 + min(q0 + ATT_BQ, n);      // keys the block reads
    const int warp_last_key = pos0 + min(qw + 15, n - 1);  // the warp's last visible key
    const float scale = rsqrtf((float)HD) * ATT_LOG2E;

    // Q as A fragments: qa[s] covers dims 16s..16s+15.
    unsigned qa[QK_STEPS][4];
    const __nv_bfloat16* q_r0 = q + (size_t)r0 * width + h * HD;
    const __nv_bfloat16* q_r1 = q + (size_t)r1 * width + h * HD;
#pragma unroll
    for (int s = 0; s < QK_STEPS; s++) {
        const int c = 16 * s + 2 * t;
        const bool hi = c + 8 < HD;  // false only for hd = 8
        qa[s][0] = r0 < n ? ld_bf16x2(q_r0 + c) : 0u;
        qa[s][1] = r1 < n ? ld_bf16x2(q_r1 + c) : 0u;
        qa[s][2] = r0 < n && hi ? ld_bf16x2(q_r0 + c + 8) : 0u;
        qa[s][3] = r1 < n && hi ? ld_bf16x2(q_r1 + c + 8) : 0u;
    }

    float o[O_TILES][4];
#pragma unroll
    for (int d = 0; d < O_TILES; d++) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.0f;
    float m0 = -FLT_MAX_F, m1 = -FLT_MAX_F;  // running max of rows r0, r1 (log2 units)
    float l0 = 0.0f, l1 = 0.0f;              // this lane's share of their normalisers

    const __nv_bfloat16* k_head = k + kvh * HD;
    const __nv_bfloat16* v_head = v + kvh * HD;
    for (int k0 = 0; k0 < kv_end; k0 += ATT_BK) {
        // Stage K (group 1) and V (group 2); rows past kv_end become zeros.
        for (int e = threadIdx.x; e < ATT_BK * CHUNKS; e += ATT_PF_THREADS) {
            const int j = e / CHUNKS, c = (e % CHUNKS) * 8;
            __nv_bfloat16* dst = ks + j * LD + c;
            if (k0 + j < kv_end)
                cp_async_16(dst, k_head + (size_t)(k0 + j) * kv_width + c);
            else
                *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
        }
        cp_async_commit();
        for (int e = threadIdx.x; e < ATT_BK * CHUNKS; e += ATT_PF_THREADS) {
            const int j = e / CHUNKS, c = (e % CHUNKS) * 8;
            __nv_bfloat16* dst = vs + j * LD + c;
            if (k0 + j < kv_end)
                cp_async_16(dst, v_head + (size_t)(k0 + j) * kv_width + c);
            else
                *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
        }
        cp_async_commit();
        cp_async_wait<1>();  // this thread's K copies have landed
        __syncthreads();     // and everyone else's

        // Warp-uniform: shuffles and mma below need the whole warp.
        const bool compute = warp_active && k0 <= warp_last_key;
        float s[S_TILES][4];
        if (compute) {
            // S = Q·K^T: B fragment b[0] = K[key g][dims 2t, 2t+1] of the k-step.
#pragma unroll
            for (int j = 0; j < S_TILES; j++) {
                s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
                const __nv_bfloat16* krow = ks + (8 * j + g) * LD + 2 * t;
#pragma unroll
                for (int st = 0; st < QK_STEPS; st++) {
                    unsigned b[2];
                    b[0] = ld_bf16x2(krow + 16 * st);
                    b[1] = 16 * st + 8 < HD ? ld_bf16x2(krow + 16 * st + 8) : 0u;
                    mma_m16n8k16_bf16(s[j], qa[st], b, s[j]);
                }
            }
            // Scale, mask, row maxima (a row's 64 scores sit on the 4 lanes of a quad).
            float mx0 = -FLT_MAX_F, mx1 = -FLT_MAX_F;
            const int lim0 = pos0 + r0 - k0, lim1 = pos0 + r1 - k0;  // last visible tile column
#pragma unroll
            for (int j = 0; j < S_TILES; j++) {
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const int col = 8 * j + 2 * t + e;
                    s[j][e] = col <= lim0 ? s[j][e] * scale : -FLT_MAX_F;
                    s[j][2 + e] = col <= lim1 ? s[j][2 + e] * scale : -FLT_MAX_F;
                    mx0 = fmaxf(mx0, s[j][e]);
                    mx1 = fmaxf(mx1, s[j][2 + e]);
                }
            }
            mx0 = fmaxf(mx0, __shfl_xor_sync(FULL_MASK, mx0, 1));
            mx0 = fmaxf(mx0, __shfl_xor_sync(FULL_MASK, mx0, 2));
            mx1 = fmaxf(mx1, __shfl_xor_sync(FULL_MASK, mx1, 1));
            mx1 = fmaxf(mx1, __shfl_xor_sync(FULL_MASK, mx1, 2));
            // Every row sees key 0 in the first tile, so m is finite from then
            // on and masked scores give exp2(-FLT_MAX_F - m) = 0.
            const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
            const float corr0 = exp2f(m0 - mn0), corr1 = exp2f(m1 - mn1);
            m0 = mn0;
            m1 = mn1;
            float sum0 = 0.0f, sum1 = 0.0f;
#pragma unroll
            for (int j = 0; j < S_TILES; j++) {
                s[j][0] = exp2f(s[j][0] - m0);
                s[j][1] = exp2f(s[j][1] - m0);
                s[j][2] = exp2f(s[j][2] - m1);
                s[j][3] = exp2f(s[j][3] - m1);
                sum0 += s[j][0] + s[j][1];
                sum1 += s[j][2] + s[j][3];
            }
            l0 = l0 * corr0 + sum0;
            l1 = l1 * corr1 + sum1;
#pragma unroll
            for (int d = 0; d < O_TILES; d++) {
                o[d][0] *= corr0;
                o[d][1] *= corr0;
                o[d][2] *= corr1;
                o[d][3] *= corr1;
            }
        }
        cp_async_wait<0>();  // V
        __syncthreads();
        if (compute) {
            // O += P·V. A fragment of k-step st = C fragments of S n-tiles 2st, 2st+1;
            // B fragment b[0] = V[keys 2t, 2t+1][dim g] of the 16-key step.
#pragma unroll
            for (int st = 0; st < PV_STEPS; st++) {
                unsigned a[4];
                a[0] = pack_bf16x2(__float2bfloat16_rn(s[2 * st][0]),
                                   __float2bfloat16_rn(s[2 * st][1]));
                a[1] = pack_bf16x2(__float2bfloat16_rn(s[2 * st][2]),
                                   __float2bfloat16_rn(s[2 * st][3]));
                a[2] = pack_bf16x2(__float2bfloat16_rn(s[2 * st + 1][0]),
                                   __float2bfloat16_rn(s[2 * st + 1][1]));
                a[3] = pack_bf16x2(__float2bfloat16_rn(s[2 * st + 1][2]),
                                   __float2bfloat16_rn(s[2 * st + 1][3]));
                const __nv_bfloat16* vrow = vs + (16 * st + 2 * t) * LD + g;
#pragma unroll
                for (int d = 0; d < O_TILES; d++) {
                    const __nv_bfloat16* vp = vrow + 8 * d;
                    unsigned b[2];
                    b[0] = pack_bf16x2(vp[0], vp[LD]);
                    b[1] = pack_bf16x2(vp[8 * LD], vp[9 * LD]);
                    mma_m16n8k16_bf16(o[d], a, b, o[d]);
                }
            }
        }
        __syncthreads();  // the tiles are overwritten next
    }

    if (!warp_active) return;
    l0 += __shfl_xor_sync(FULL_MASK, l0, 1);
    l0 += __shfl_xor_sync(FULL_MASK, l0, 2);
    l1 += __shfl_xor_sync(FULL_MASK, l1, 1);
    l1 += __shfl_xor_sync(FULL_MASK, l1, 2);
    const float inv0 = 1.0f / l0, inv1 = 1.0f / l1;
#pragma unroll
    for (int d = 0; d < O_TILES; d++) {
        const int c = h * HD + 8 * d + 2 * t;
        if (r0 < n)
            *reinterpret_cast<unsigned*>(out + (size_t)r0 * width + c) =
                pack_bf16x2(__float2bfloat16_rn(o[d][0] * inv0),
                            __float2bfloat16_rn(o[d][1] * inv0));
        if (r1 < n)
            *reinterpret_cast<unsigned*>(out + (size_t)r1 * width + c) =
                pack_bf16x2(__float2bfloat16_rn(o[d][2] * inv1),
                            __float2bfloat16_rn(o[d][3] * inv1));
    }
    if (t == 0) {
        if (r0 < n) lse[(size_t)h * n + r0] = m0 * ATT_LN2 + logf(l0);
        if (r1 < n) lse[(size_t)h * n + r1] = m1 * ATT_LN2 + logf(l1);
    }
}

// Grid (ceil(n/ATT_BQ), heads), block ATT_PF_THREADS, no dynamic shared memory.
// out [n, heads*hd] bf16, lse [heads, n] f32; q [n, heads*hd], k, v
// [capacity >= pos0+n, kv_heads*hd] bf16. hd in {8, 16, 32, 64, 128}.
extern "C" __global__ void __launch_bounds__(ATT_PF_THREADS)
    attention_prefill_bf16(__nv_bfloat16* out, float* lse, const __nv_bfloat16* q,
                           const __nv_bfloat16* k, const __nv_bfloat16* v, int n, int heads,
                           int kv_heads, int hd, int pos0) {
    __shared__ __align__(16) __nv_bfloat16 smem[2 * ATT_BK * (ATT_PF_MAX_HD + 8)];
    switch (hd) {
        case 8: attention_prefill<8>(out, lse, q, k, v, n, heads, kv_heads, pos0, smem); break;
        case 16: attention_prefill<16>(out, lse, q, k, v, n, heads, kv_heads, pos0, smem); break;
        case 32: attention_prefill<32>(out, lse, q, k, v, n, heads, kv_heads, pos0, smem); break;
        case 64: attention_prefill<64>(out, lse, q, k, v, n, heads, kv_heads, pos0, smem); break;
        case 128: attention_prefill<128>(out, lse, q, k, v, n, heads, kv_heads, pos0, smem); break;
        default: __trap();
    }
}

// ================================================================ backward
//
// Version 1 of the backward (the readable reference), in two kernels over the
// forward's inputs, its output `out` and its log-sum-exp `lse` [heads, n]
// (written by attention_prefill_bf16), plus dout. P is recomputed from the
// saved lse, p_ij = exp(q_i·k_j · scale − lse_i), never stored:
//
//   attention_bwd_dq_bf16   grid (n, heads), block 32: one warp per query row
//     (i, h). D_i = dout_i·out_i (= sum_j p_ij dp_ij, dp_ij = dout_i·v_j);
//     dq_i = scale * sum_j p_ij (dp_ij - D_i) k_j (overwritten). Writes D_i
//     to `dsum` [heads, n] for the second kernel.
//   attention_bwd_dkv_bf16  grid (len, kv_heads), block 32: one warp per key
//     row (j, g), over the heads h of group g and the queries i that see j:
//     dv_j += sum p_ij dout_i, dk_j += scale * sum p_ij (dp_ij - D_i) q_i.
//     Each warp owns its rows of dk and dv: no atomics.
//
// Lanes stride over the head's hd <= ATT_MAX_HD dims (ATT_PER_LANE each);
// dot products reduce with warp_sum.

__device__ __forceinline__ float warp_dot(const __nv_bfloat16* a, const __nv_bfloat16* b, int hd) {
    float s = 0.0f;
    for (int c = threadIdx.x; c < hd; c += 32) s += __bfloat162float(a[c]) * __bfloat162float(b[c]);
    return warp_sum(s);
}

extern "C" __global__ void attention_bwd_dq_bf16(__nv_bfloat16* dq, float* dsum,
                                                 const __nv_bfloat16* dout,
                                                 const __nv_bfloat16* q, const __nv_bfloat16* k,
                                                 const __nv_bfloat16* v,
                                                 const __nv_bfloat16* out, const float* lse,
                                                 int n, int heads, int kv_heads, int hd,
                                                 int pos0) {
    const int i = blockIdx.x, h = blockIdx.y, g = h / (heads / kv_heads);
    const int width = heads * hd, kv_width = kv_heads * hd, visible = pos0 + i + 1;
    const float scale = rsqrtf((float)hd);
    const __nv_bfloat16* qi = q + (size_t)i * width + h * hd;
    const __nv_bfloat16* doi = dout + (size_t)i * width + h * hd;
    const float lse_i = lse[(size_t)h * n + i];
    const float d = warp_dot(doi, out + (size_t)i * width + h * hd, hd);
    // dq = scale * sum_j p_j (dp_j - D) k_j
    float acc[ATT_PER_LANE] = {};
    for (int j = 0; j < visible; j++) {
        const __nv_bfloat16* kj = k + (size_t)j * kv_width + g * hd;
        float p = expf(warp_dot(qi, kj, hd) * scale - lse_i);
        float ds = p * (warp_dot(doi, v + (size_t)j * kv_width + g * hd, hd) - d) * scale;
        for (int e = 0, c = threadIdx.x; c < hd; e++, c += 32) acc[e] += ds * __bfloat162float(kj[c]);
    }
    __nv_bfloat16* dqi = dq + (size_t)i * width + h * hd;
    for (int e = 0, c = threadIdx.x; c < hd; e++, c += 32) dqi[c] = __float2bfloat16(acc[e]);
    if (threadIdx.x == 0) dsum[(size_t)h * n + i] = d;
}

extern "C" __global__ void attention_bwd_dkv_bf16(__nv_bfloat16* dk, __nv_bfloat16* dv,
                                                  const float* lse, const float* dsum,
                                                  const __nv_bfloat16* dout,
                                                  const __nv_bfloat16* q, const __nv_bfloat16* k,
                                                  const __nv_bfloat16* v, int n, int heads,
                                                  int kv_heads, int hd, int pos0) {
    const int j = blockIdx.x, g = blockIdx.y, group = heads / kv_heads;
    const int width = heads * hd, kv_width = kv_heads * hd;
    const float scale = rsqrtf((float)hd);
    const __nv_bfloat16* kj = k + (size_t)j * kv_width + g * hd;
    const __nv_bfloat16* vj = v + (size_t)j * kv_width + g * hd;
    float dk_acc[ATT_PER_LANE] = {}, dv_acc[ATT_PER_LANE] = {};
    // query i (at position pos0 + i) sees key j when pos0 + i >= j
    for (int i = max(0, j - pos0); i < n; i++) {
        for (int h = g * group; h < (g + 1) * group; h++) {
            const __nv_bfloat16* qi = q + (size_t)i * width + h * hd;
            const __nv_bfloat16* doi = dout + (size_t)i * width + h * hd;
            float p = expf(warp_dot(qi, kj, hd) * scale - lse[(size_t)h * n + i]);
            float ds = p * (warp_dot(doi, vj, hd) - dsum[(size_t)h * n + i]) * scale;
            for (int e = 0, c = threadIdx.x; c < hd; e++, c += 32) {
                dv_acc[e] += p * __bfloat162float(doi[c]);
                dk_acc[e] += ds * __bfloat162float(qi[c]);
            }
        }
    }
    __nv_bfloat16* dkj = dk + (size_t)j * kv_width + g * hd;
    __nv_bfloat16* dvj = dv + (size_t)j * kv_width + g * hd;
    for (int e = 0, c = threadIdx.x; c < hd; e++, c += 32) {
        dkj[c] = __float2bfloat16(__bfloat162float(dkj[c]) + dk_acc[e]);
        dvj[c] = __float2bfloat16(__bfloat162float(dvj[c]) + dv_acc[e]);
    }
}
