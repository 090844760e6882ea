// Kernels that exercise the emulator itself (tests/emu.rs launches them).
// Compiled only into the emulator (build.rs), never by NVRTC.
//
// The first group must compute the right numbers in either lane order; the
// `emu_bug_*` kernels carry planted bugs the emulator must catch: a missing
// __syncthreads (wrong results), a shuffle with a full mask that only half
// the warp reaches, a __syncthreads in divergent code, and a deadlock between
// a barrier and a shuffle (errors naming the block).

#include "common.cuh"

// ---------------------------------------------------------------- correct kernels

// out[b] = sum of x[b*blockDim.x .. (b+1)*blockDim.x) (zero past n): a tree
// reduction in static shared memory, blockDim.x a power of two <= 1024.
extern "C" __global__ void emu_block_sum_f32(float* out, const float* x, int n) {
    __shared__ float s[1024];
    const int t = threadIdx.x;
    const int i = blockIdx.x * blockDim.x + t;
    s[t] = i < n ? x[i] : 0.0f;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half /= 2) {
        if (t < half) s[t] += s[t + half];
        __syncthreads();
    }
    if (t == 0) out[blockIdx.x] = s[0];
}

// Warp operations; per thread t (lane l = t % 32), 10 ints at out + 10 t:
//   0: sum of lanes over __shfl_xor_sync       1: __shfl_sync from lane 5
//   2: __shfl_up_sync by 3                     3: __shfl_down_sync by 3
//   4: __ballot_sync(lane odd)                 5: __any_sync(lane == 7)
//   6: __all_sync(lane < 32)                   7: __shfl_xor_sync by 1, width 4... of lane
//   8: __syncthreads_count(t odd)              9: __shfl_sync from lane 2 within width 8
extern "C" __global__ void emu_warp_ops(int* out) {
    const int t = threadIdx.x, l = t % 32;
    int* o = out + 10 * t;
    int v = l;
    for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(FULL_MASK, v, m);
    o[0] = v;
    o[1] = __shfl_sync(FULL_MASK, l * 10 + t / 32, 5);
    o[2] = __shfl_up_sync(FULL_MASK, l, 3);
    o[3] = __shfl_down_sync(FULL_MASK, l, 3);
    o[4] = (int)__ballot_sync(FULL_MASK, l & 1);
    o[5] = __any_sync(FULL_MASK, l == 7);
    o[6] = __all_sync(FULL_MASK, l < 32);
    o[7] = __shfl_xor_sync(FULL_MASK, l, 1, 4);
    o[8] = __syncthreads_count(t & 1);
    o[9] = __shfl_sync(FULL_MASK, l, 2, 8);
}

// Two half-warps shuffle separately with disjoint masks (legal on sm_70+):
// out[t] = sum over the thread's half-warp of lane ids.
extern "C" __global__ void emu_half_warp_groups(int* out) {
    const int l = threadIdx.x % 32;
    int v = l;
    if (l < 16) {
        for (int m = 8; m > 0; m >>= 1) v += __shfl_xor_sync(0x0000ffffu, v, m);
    } else {
        for (int m = 8; m > 0; m >>= 1) v += __shfl_xor_sync(0xffff0000u, v, m);
    }
    out[threadIdx.x] = v;
}

// Atomics from every thread of every block: fsum += x[i], isum += 1,
// usum += i, imax = max(i), and a CAS-built counter.
extern "C" __global__ void emu_atomics(float* fsum, int* isum, unsigned* usum, int* imax,
                                       int* cas_count, const float* x, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    atomicAdd(fsum, x[i]);
    atomicAdd(isum, 1);
    atomicAdd(usum, (unsigned)i);
    atomicMax(imax, i);
    int old = *cas_count, assumed;
    do {
        assumed = old;
        old = atomicCAS(cas_count, assumed, assumed + 1);
    } while (old != assumed);
}

// Dynamic shared memory: each block reverses its chunk of blockDim.x floats.
// A second view of the same buffer through a char array checks that both
// extern __shared__ declarations alias.
extern "C" __global__ void emu_dyn_smem_reverse(float* out, const float* x) {
    extern __shared__ float buf[];
    extern __shared__ __align__(16) unsigned char raw[];
    const int t = threadIdx.x, n = blockDim.x;
    const float* xb = x + (size_t)blockIdx.x * n;
    buf[t] = xb[t];
    __syncthreads();
    float v;
    memcpy(&v, raw + 4 * (n - 1 - t), 4);
    out[(size_t)blockIdx.x * n + t] = v;
}

// bf16 and f16 round trips: bits of the conversions and their value back.
extern "C" __global__ void emu_half_convert(unsigned short* bf_bits, float* bf_back,
                                            unsigned short* h_bits, float* h_back,
                                            const float* x, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        __nv_bfloat16 b = __float2bfloat16(x[i]);
        __half h = __float2half(x[i]);
        bf_bits[i] = __bfloat16_as_ushort(b);
        bf_back[i] = __bfloat162float(b);
        h_bits[i] = __half_as_ushort(h);
        h_back[i] = __half2float(h);
    }
}

// One warp: d[16x8] = a[16x16] · b[16x8] + c[16x8] through mma_m16n8k16_bf16.
// a row-major; b given as bt[8][16] (column-major b, the "col" operand); c, d
// row-major f32. Fragments are built as the PTX layout prescribes.
extern "C" __global__ void emu_mma_bf16(float* d, const __nv_bfloat16* a, const __nv_bfloat16* bt,
                                        const float* c) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    unsigned ra[4], rb[2];
    ra[0] = pack_bf16x2(a[g * 16 + 2 * t], a[g * 16 + 2 * t + 1]);
    ra[1] = pack_bf16x2(a[(g + 8) * 16 + 2 * t], a[(g + 8) * 16 + 2 * t + 1]);
    ra[2] = pack_bf16x2(a[g * 16 + 2 * t + 8], a[g * 16 + 2 * t + 9]);
    ra[3] = pack_bf16x2(a[(g + 8) * 16 + 2 * t + 8], a[(g + 8) * 16 + 2 * t + 9]);
    rb[0] = pack_bf16x2(bt[g * 16 + 2 * t], bt[g * 16 + 2 * t + 1]);
    rb[1] = pack_bf16x2(bt[g * 16 + 2 * t + 8], bt[g * 16 + 2 * t + 9]);
    float rc[4] = {c[g * 8 + 2 * t], c[g * 8 + 2 * t + 1], c[(g + 8) * 8 + 2 * t],
                   c[(g + 8) * 8 + 2 * t + 1]};
    float rd[4];
    mma_m16n8k16_bf16(rd, ra, rb, rc);
    d[g * 8 + 2 * t] = rd[0];
    d[g * 8 + 2 * t + 1] = rd[1];
    d[(g + 8) * 8 + 2 * t] = rd[2];
    d[(g + 8) * 8 + 2 * t + 1] = rd[3];
}

// One warp: d[16x8] = a[16x32] · b[32x8] in int8 through mma_m16n8k32_s8 (a
// row-major, b given as bt[8][32]), fragments as the PTX layout prescribes;
// and dots[lane] = the dp4a of a's and bt's first words plus lane.
extern "C" __global__ void emu_mma_s8(int* d, int* dots, const int* a, const int* bt) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const unsigned ra[4] = {(unsigned)a[g * 8 + t], (unsigned)a[(g + 8) * 8 + t],
                            (unsigned)a[g * 8 + t + 4], (unsigned)a[(g + 8) * 8 + t + 4]};
    const unsigned rb[2] = {(unsigned)bt[g * 8 + t], (unsigned)bt[g * 8 + t + 4]};
    int rd[4];
    mma_m16n8k32_s8(rd, ra, rb);
    d[g * 8 + 2 * t] = rd[0];
    d[g * 8 + 2 * t + 1] = rd[1];
    d[(g + 8) * 8 + 2 * t] = rd[2];
    d[(g + 8) * 8 + 2 * t + 1] = rd[3];
    dots[lane] = __dp4a(a[lane], bt[lane], lane);
}

// One warp: four 8x8 matrices of 16-bit values (m[4][8][8]) through shared
// memory and ldmatrix_x4; out[lane][4] the registers each lane receives.
extern "C" __global__ void emu_ldmatrix(unsigned* out, const unsigned short* m) {
    __shared__ __align__(16) unsigned short s[4 * 8 * 8];
    const int lane = threadIdx.x % 32;
    for (int i = lane; i < 256; i += 32) s[i] = m[i];
    __syncwarp();
    unsigned r[4];
    ldmatrix_x4(r, &s[(lane / 8) * 64 + (lane % 8) * 8]);
    for (int i = 0; i < 4; i++) out[lane * 4 + i] = r[i];
}

// cp_async_16 + commit/wait: copies 16 bytes per thread into shared memory,
// then out = that buffer rotated by one 16-byte chunk.
extern "C" __global__ void emu_cp_async(uint4* out, const uint4* in) {
    __shared__ uint4 s[1024];
    const int t = threadIdx.x, n = blockDim.x;
    cp_async_16(&s[t], &in[t]);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    out[t] = s[(t + 1) % n];
}

// Every index of a 3-D grid of 3-D blocks: out[global linear id] = the 4
// values (threadIdx.x+10*threadIdx.y+100*threadIdx.z,
// blockIdx.x+10*blockIdx.y+100*blockIdx.z, blockDim.x*blockDim.y*blockDim.z,
// gridDim.x*gridDim.y*gridDim.z).
extern "C" __global__ void emu_grid3d(int* out) {
    const int tl = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const int bl = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const int nt = blockDim.x * blockDim.y * blockDim.z;
    int* o = out + 4 * ((size_t)bl * nt + tl);
    o[0] = threadIdx.x + 10 * threadIdx.y + 100 * threadIdx.z;
    o[1] = blockIdx.x + 10 * blockIdx.y + 100 * blockIdx.z;
    o[2] = nt;
    o[3] = gridDim.x * gridDim.y * gridDim.z;
}

// A benign race: every thread of the block stores its index to out[block].
// Which one lands last depends on the order the emulator runs the fibers
// (forward: the last thread; reverse lanes: thread 0).
extern "C" __global__ void emu_last_writer(int* out) {
    out[blockIdx.x] = threadIdx.x;
}

#define EMU_TILE 16

// c[M,N] = a[M,K] · b[K,N], f32, 16x16 tiles through shared memory; block
// (16,16), grid (ceil(N/16), ceil(M/16)). Any M, N, K.
extern "C" __global__ void emu_matmul_tiled_f32(float* c, const float* a, const float* b, int M,
                                                int N, int K) {
    __shared__ float as[EMU_TILE][EMU_TILE];
    __shared__ float bs[EMU_TILE][EMU_TILE];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int row = blockIdx.y * EMU_TILE + ty, col = blockIdx.x * EMU_TILE + tx;
    float acc = 0.0f;
    for (int k0 = 0; k0 < K; k0 += EMU_TILE) {
        as[ty][tx] = (row < M && k0 + tx < K) ? a[(size_t)row * K + k0 + tx] : 0.0f;
        bs[ty][tx] = (col < N && k0 + ty < K) ? b[(size_t)(k0 + ty) * N + col] : 0.0f;
        __syncthreads();
        for (int k = 0; k < EMU_TILE; k++) acc += as[ty][k] * bs[k][tx];
        __syncthreads();
    }
    if (row < M && col < N) c[(size_t)row * N + col] = acc;
}

// Softmax of each row of x [rows, d] (one block per row, blockDim.x a
// multiple of 32): max and sum through warp shuffles and one shared slot per
// warp.
extern "C" __global__ void emu_softmax_f32(float* out, const float* x, int d) {
    __shared__ float red[32];
    const float* xr = x + (size_t)blockIdx.x * d;
    float* orow = out + (size_t)blockIdx.x * d;
    const int t = threadIdx.x, lane = t % 32, warp = t / 32, nw = blockDim.x / 32;
    float m = -INFINITY;
    for (int i = t; i < d; i += blockDim.x) m = fmaxf(m, xr[i]);
    m = warp_max(m);
    if (lane == 0) red[warp] = m;
    __syncthreads();
    m = -INFINITY;
    for (int w = 0; w < nw; w++) m = fmaxf(m, red[w]);
    __syncthreads();
    float s = 0.0f;
    for (int i = t; i < d; i += blockDim.x) s += expf(xr[i] - m);
    s = warp_sum(s);
    if (lane == 0) red[warp] = s;
    __syncthreads();
    s = 0.0f;
    for (int w = 0; w < nw; w++) s += red[w];
    const float inv = 1.0f / s;
    for (int i = t; i < d; i += blockDim.x) orow[i] = expf(xr[i] - m) * inv;
}

// Stops the launch through __trap() in thread 5 of block 1.
extern "C" __global__ void emu_trap_test(int* out) {
    if (blockIdx.x == 1 && threadIdx.x == 5) __trap();
    out[blockIdx.x * blockDim.x + threadIdx.x] = 1;
}

// ---------------------------------------------------------------- planted bugs

// emu_matmul_tiled_f32 without the second __syncthreads: a fast thread
// overwrites its tile element for step k0+16 while others still read step k0.
extern "C" __global__ void emu_bug_matmul_nosync_f32(float* c, const float* a, const float* b,
                                                     int M, int N, int K) {
    __shared__ float as[EMU_TILE][EMU_TILE];
    __shared__ float bs[EMU_TILE][EMU_TILE];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int row = blockIdx.y * EMU_TILE + ty, col = blockIdx.x * EMU_TILE + tx;
    float acc = 0.0f;
    for (int k0 = 0; k0 < K; k0 += EMU_TILE) {
        as[ty][tx] = (row < M && k0 + tx < K) ? a[(size_t)row * K + k0 + tx] : 0.0f;
        bs[ty][tx] = (col < N && k0 + ty < K) ? b[(size_t)(k0 + ty) * N + col] : 0.0f;
        __syncthreads();
        for (int k = 0; k < EMU_TILE; k++) acc += as[ty][k] * bs[k][tx];
        // missing: __syncthreads();
    }
    if (row < M && col < N) c[(size_t)row * N + col] = acc;
}

// A full-mask shuffle that only lanes 0-15 reach; lanes 16-31 exit.
extern "C" __global__ void emu_bug_half_warp_shfl(float* out) {
    float v = (float)threadIdx.x;
    if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(FULL_MASK, v, 1);
    out[threadIdx.x] = v;
}

// A full-mask shuffle that lanes 0-15 and lanes 16-31 reach at different
// places in the code (a divergent warp).
extern "C" __global__ void emu_bug_split_shfl(float* out) {
    float v = (float)threadIdx.x;
    if (threadIdx.x % 32 < 16) {
        v = __shfl_xor_sync(FULL_MASK, v, 1);
    } else {
        v = __shfl_xor_sync(FULL_MASK, v, 2);
    }
    out[threadIdx.x] = v;
}

// __syncthreads inside a branch only the first warp takes.
extern "C" __global__ void emu_bug_divergent_barrier(float* out) {
    __shared__ float s[1024];
    s[threadIdx.x] = (float)threadIdx.x;
    if (threadIdx.x < 32) {
        __syncthreads();
    }
    __syncthreads();
    out[threadIdx.x] = s[blockDim.x - 1 - threadIdx.x];
}

// Deadlock: lanes 0-15 of each warp wait at __syncthreads, lanes 16-31 at a
// full-mask shuffle that needs lanes 0-15. Nobody can move.
extern "C" __global__ void emu_bug_deadlock(float* out) {
    float v = (float)threadIdx.x;
    if (threadIdx.x % 32 < 16) __syncthreads();
    v = __shfl_xor_sync(FULL_MASK, v, 16);
    out[threadIdx.x] = v;
}

// ---------------------------------------------------------------- file-scope dynamic shared memory

// An extern __shared__ array declared at file scope (build.rs turns it into a
// macro for the emulator): out[t] = in[t] * 2 through it.
extern __shared__ float emu_file_scope_dyn[];

extern "C" __global__ void emu_file_scope_smem(float* out, const float* in) {
    const int t = threadIdx.x;
    emu_file_scope_dyn[t] = in[t];
    __syncthreads();
    out[t] = emu_file_scope_dyn[blockDim.x - 1 - t] * 2.0f;
}
