// The CPU emulation of the CUDA execution model: what a kernels/*.cu file
// needs to compile as host C++ (g++ -std=c++17 -DCUDA_EMU).
//
// - The threads of a block are fibers on one worker OS thread (runtime.cpp);
//   blocks run in parallel on a pool of workers.
// - `__shared__` variables are `static thread_local`: one copy per worker, so
//   shared by the fibers of the block that worker runs. `extern __shared__`
//   arrays are rewritten by build.rs into a pointer to the launch's dynamic
//   shared memory of the current block (emu_dynamic_smem()).
// - threadIdx/blockIdx/blockDim/gridDim are per-worker thread-locals that the
//   scheduler sets on every fiber switch.
// - __syncthreads(), warp shuffles/votes and __syncwarp() are macros that pass
//   the source location to the runtime, which uses it to report deadlocks and
//   divergent barriers (threads of one block waiting at different
//   __syncthreads, lanes of one warp at different shuffles).
// - __CUDA_ARCH__ is 800: arch-gated code takes its sm_80 path; inline PTX must
//   sit behind `#if defined(CUDA_EMU)` (see kernels/common.cuh).
#pragma once

#ifndef CUDA_EMU
#define CUDA_EMU 1
#endif

#include <algorithm>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#ifndef __CUDA_ARCH__
#define __CUDA_ARCH__ 800
#endif

// ---------------------------------------------------------------- qualifiers
#define __global__
#define __device__
#define __host__
#define __noinline__ __attribute__((noinline))
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static thread_local
#define __constant__
#define __managed__
#define __align__(n) __attribute__((aligned(n)))
#define __grid_constant__

// ---------------------------------------------------------------- vector types
struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return uint3{x, y, z}; }
};
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(8) int2 {
    int x, y;
};
struct alignas(16) int4 {
    int x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned x, y;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
static inline float2 make_float2(float x, float y) { return float2{x, y}; }
static inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
static inline int2 make_int2(int x, int y) { return int2{x, y}; }
static inline int4 make_int4(int x, int y, int z, int w) { return int4{x, y, z, w}; }
static inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
static inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) {
    return uint4{x, y, z, w};
}
static inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return uint3{x, y, z}; }

// ---------------------------------------------------------------- runtime hooks
// Set by the scheduler (runtime.cpp) on every fiber switch / block start.
extern __thread uint3 emu_threadIdx;
extern __thread uint3 emu_blockIdx;
extern __thread uint3 emu_blockDim;
extern __thread uint3 emu_gridDim;
#define threadIdx emu_threadIdx
#define blockIdx emu_blockIdx
#define blockDim emu_blockDim
#define gridDim emu_gridDim
#define warpSize 32

extern "C" {
// Block-wide barrier. `pred`/`mode` implement __syncthreads_count/and/or.
int emu_syncthreads(const char* file, int line, int mode, int pred);
// One warp-level operation (see EMU_OP_*); returns this lane's result.
unsigned long long emu_warp_op(const char* file, int line, int op, unsigned mask,
                               unsigned long long val, int arg, int width);
// The current block's dynamic shared memory (extern __shared__).
void* emu_dynamic_smem(void);
// 4 KiB of scratch per warp, for the fallbacks of warp-wide PTX (mma, ldmatrix).
void* emu_warp_scratch(void);
// Lane of the calling fiber within its warp (linear thread index % 32).
int emu_lane_id(void);
// Mask of the lanes of the caller's warp that exist and have not exited.
unsigned emu_active_mask(void);
// Stops the launch with an error (a trap / a failed device assert).
void emu_trap(const char* file, int line, const char* what) __attribute__((noreturn));
}

enum {
    EMU_OP_SHFL_IDX = 1,
    EMU_OP_SHFL_UP,
    EMU_OP_SHFL_DOWN,
    EMU_OP_SHFL_XOR,
    EMU_OP_BALLOT,
    EMU_OP_ANY,
    EMU_OP_ALL,
    EMU_OP_SYNCWARP,
    EMU_OP_REDUCE_ADD,
    EMU_OP_REDUCE_MIN,
    EMU_OP_REDUCE_MAX,
    EMU_OP_REDUCE_UMIN,
    EMU_OP_REDUCE_UMAX,
    EMU_OP_MATCH_ANY,
};

#define __syncthreads() emu_syncthreads(__FILE__, __LINE__, 0, 0)
#define __syncthreads_count(p) emu_syncthreads(__FILE__, __LINE__, 1, (p) != 0)
#define __syncthreads_and(p) emu_syncthreads(__FILE__, __LINE__, 2, (p) != 0)
#define __syncthreads_or(p) emu_syncthreads(__FILE__, __LINE__, 3, (p) != 0)
#define __syncwarp(...) ((void)emu_warp_op(__FILE__, __LINE__, EMU_OP_SYNCWARP, emu_mask_or_full(__VA_ARGS__), 0, 0, 32))
#define __trap() emu_trap(__FILE__, __LINE__, "__trap()")
#define __threadfence() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define __threadfence_block() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define __activemask() emu_active_mask()

static inline unsigned emu_mask_or_full() { return 0xffffffffu; }
static inline unsigned emu_mask_or_full(unsigned m) { return m; }

namespace emu {
template <typename T>
inline unsigned long long to_bits(T v) {
    static_assert(sizeof(T) <= 8, "warp shuffles move at most 8 bytes");
    unsigned long long b = 0;
    memcpy(&b, &v, sizeof(T));
    return b;
}
template <typename T>
inline T from_bits(unsigned long long b) {
    T v;
    memcpy(&v, &b, sizeof(T));
    return v;
}
template <typename T>
inline T shfl(const char* f, int l, int op, unsigned mask, T var, int arg, int width) {
    return from_bits<T>(emu_warp_op(f, l, op, mask, to_bits(var), arg, width));
}
}  // namespace emu

#define __shfl_sync(mask, var, ...) emu::shfl(__FILE__, __LINE__, EMU_OP_SHFL_IDX, mask, var, __VA_ARGS__)
#define __shfl_up_sync(mask, var, ...) emu::shfl(__FILE__, __LINE__, EMU_OP_SHFL_UP, mask, var, __VA_ARGS__)
#define __shfl_down_sync(mask, var, ...) emu::shfl(__FILE__, __LINE__, EMU_OP_SHFL_DOWN, mask, var, __VA_ARGS__)
#define __shfl_xor_sync(mask, var, ...) emu::shfl(__FILE__, __LINE__, EMU_OP_SHFL_XOR, mask, var, __VA_ARGS__)
namespace emu {
// Default width 32 for the shuffles (the macros forward 1 or 2 trailing args).
template <typename T>
inline T shfl(const char* f, int l, int op, unsigned mask, T var, int arg) {
    return shfl(f, l, op, mask, var, arg, 32);
}
}  // namespace emu
#define __ballot_sync(mask, pred) ((unsigned)emu_warp_op(__FILE__, __LINE__, EMU_OP_BALLOT, mask, (pred) != 0, 0, 32))
#define __any_sync(mask, pred) ((int)emu_warp_op(__FILE__, __LINE__, EMU_OP_ANY, mask, (pred) != 0, 0, 32))
#define __all_sync(mask, pred) ((int)emu_warp_op(__FILE__, __LINE__, EMU_OP_ALL, mask, (pred) != 0, 0, 32))
#define __match_any_sync(mask, v) ((unsigned)emu_warp_op(__FILE__, __LINE__, EMU_OP_MATCH_ANY, mask, emu::to_bits(v), 0, 32))
#define __reduce_add_sync(mask, v) ((unsigned)emu_warp_op(__FILE__, __LINE__, EMU_OP_REDUCE_ADD, mask, (unsigned)(v), 0, 32))
#define __reduce_min_sync(mask, v) emu::reduce_minmax(__FILE__, __LINE__, mask, v, true)
#define __reduce_max_sync(mask, v) emu::reduce_minmax(__FILE__, __LINE__, mask, v, false)
namespace emu {
inline int reduce_minmax(const char* f, int l, unsigned mask, int v, bool mn) {
    return (int)emu_warp_op(f, l, mn ? EMU_OP_REDUCE_MIN : EMU_OP_REDUCE_MAX, mask, (unsigned)v, 0, 32);
}
inline unsigned reduce_minmax(const char* f, int l, unsigned mask, unsigned v, bool mn) {
    return (unsigned)emu_warp_op(f, l, mn ? EMU_OP_REDUCE_UMIN : EMU_OP_REDUCE_UMAX, mask, v, 0, 32);
}
}  // namespace emu

// ---------------------------------------------------------------- bit casts, integer intrinsics
static inline float __int_as_float(int x) { float f; memcpy(&f, &x, 4); return f; }
static inline int __float_as_int(float x) { int i; memcpy(&i, &x, 4); return i; }
static inline float __uint_as_float(unsigned x) { float f; memcpy(&f, &x, 4); return f; }
static inline unsigned __float_as_uint(float x) { unsigned u; memcpy(&u, &x, 4); return u; }
static inline double __longlong_as_double(long long x) { double d; memcpy(&d, &x, 8); return d; }
static inline long long __double_as_longlong(double x) { long long i; memcpy(&i, &x, 8); return i; }
static inline int __popc(unsigned x) { return __builtin_popcount(x); }
static inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
static inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
static inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
static inline int __ffs(int x) { return __builtin_ffs(x); }
static inline int __ffsll(long long x) { return __builtin_ffsll(x); }
static inline unsigned __brev(unsigned x) {
    x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
    x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
    x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
    x = ((x >> 8) & 0x00ff00ffu) | ((x & 0x00ff00ffu) << 8);
    return (x >> 16) | (x << 16);
}
static inline int __mul24(int a, int b) { return a * b; }
static inline unsigned __umul24(unsigned a, unsigned b) { return a * b; }
static inline int __mulhi(int a, int b) { return (int)(((long long)a * b) >> 32); }
static inline unsigned __umulhi(unsigned a, unsigned b) {
    return (unsigned)(((unsigned long long)a * b) >> 32);
}
// Four signed byte products of a and b, summed into c (sm_61+ `dp4a`).
static inline int __dp4a(int a, int b, int c) {
    for (int i = 0; i < 4; i++) c += (int)(signed char)(a >> (8 * i)) * (int)(signed char)(b >> (8 * i));
    return c;
}
template <typename T>
static inline T __ldg(const T* p) { return *p; }
template <typename T>
static inline T __ldcs(const T* p) { return *p; }
template <typename T>
static inline T __ldcg(const T* p) { return *p; }
template <typename T>
static inline void __stcs(T* p, T v) { *p = v; }
template <typename T>
static inline void __stcg(T* p, T v) { *p = v; }

// ---------------------------------------------------------------- math
// expf, logf, sqrtf, fmaxf, tanhf, powf, sincosf, ... come from <cmath>.
#define CUDART_INF_F INFINITY
#define CUDART_NAN_F NAN
// libm's fmaxf/fminf are calls, not instructions; same NaN rule inline.
static inline float emu_fmaxf(float a, float b) { return a != a ? b : (b != b ? a : (a > b ? a : b)); }
static inline float emu_fminf(float a, float b) { return a != a ? b : (b != b ? a : (a < b ? a : b)); }
#define fmaxf(a, b) emu_fmaxf(a, b)
#define fminf(a, b) emu_fminf(a, b)
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
static inline double rsqrt(double x) { return 1.0 / sqrt(x); }
#define __expf(x) expf(x)
#define __logf(x) logf(x)
#define __log2f(x) log2f(x)
#define __exp10f(x) exp10f(x)
#define __powf(x, y) powf(x, y)
#define __sinf(x) sinf(x)
#define __cosf(x) cosf(x)
#define __tanf(x) tanf(x)
#define __sincosf(x, s, c) sincosf(x, s, c)
static inline float __fdividef(float a, float b) { return a / b; }
static inline float fdividef(float a, float b) { return a / b; }
static inline float __frcp_rn(float x) { return 1.0f / x; }
static inline float __fsqrt_rn(float x) { return sqrtf(x); }
static inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
static inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
static inline float normcdff(float x) { return 0.5f * erfcf(-x * 0.70710678118654752f); }

// min/max for mixed arithmetic types, as CUDA's math headers provide them.
template <typename A, typename B,
          typename = std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>>
static inline std::common_type_t<A, B> min(A a, B b) {
    using C = std::common_type_t<A, B>;
    return (C)a < (C)b ? (C)a : (C)b;
}
template <typename A, typename B,
          typename = std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>>
static inline std::common_type_t<A, B> max(A a, B b) {
    using C = std::common_type_t<A, B>;
    return (C)a > (C)b ? (C)a : (C)b;
}
static inline unsigned umin(unsigned a, unsigned b) { return a < b ? a : b; }
static inline unsigned umax(unsigned a, unsigned b) { return a > b ? a : b; }
static inline long long llmin(long long a, long long b) { return a < b ? a : b; }
static inline long long llmax(long long a, long long b) { return a > b ? a : b; }

// ---------------------------------------------------------------- 16-bit floats
// Storage types with CUDA's conversions (round to nearest even) and operators
// (arithmetic in f32, rounded back).
struct __nv_bfloat16;
struct __half;
static inline unsigned short emu_f32_to_bf16_bits(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x0040u);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}
static inline float emu_bf16_bits_to_f32(unsigned short b) { return __uint_as_float((unsigned)b << 16); }
static inline unsigned short emu_f32_to_f16_bits(float f) {
    unsigned u = __float_as_uint(f);
    unsigned sign = (u >> 16) & 0x8000u;
    unsigned a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (unsigned short)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));  // NaN
    if (a >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u);  // rounds to inf
    if (a < 0x38800000u) {  // subnormal half (or zero)
        // value = a as float; half subnormal unit = 2^-24
        float v = __uint_as_float(a) * 16777216.0f;  // exact scaling by 2^24
        // round to nearest even integer
        float r = nearbyintf(v);
        return (unsigned short)(sign | (unsigned)r);
    }
    unsigned mant = a & 0x7fffffu;
    unsigned exp = (a >> 23) - 127 + 15;
    unsigned h = (exp << 10) | (mant >> 13);
    unsigned rest = mant & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h++;
    return (unsigned short)(sign | h);
}
static inline float emu_f16_bits_to_f32(unsigned short h) {
    unsigned sign = ((unsigned)h & 0x8000u) << 16;
    unsigned e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0) {
        float v = (float)m / 16777216.0f;
        return sign ? -v : v;
    }
    if (e == 31) return __uint_as_float(sign | 0x7f800000u | (m << 13));
    return __uint_as_float(sign | ((e - 15 + 127) << 23) | (m << 13));
}

#define EMU_F16_TYPE(T, TO_BITS, FROM_BITS)                                              \
    struct T {                                                                            \
        unsigned short __x;                                                               \
        T() = default;                                                                    \
        T(float f) : __x(TO_BITS(f)) {}                                                   \
        T(double f) : __x(TO_BITS((float)f)) {}                                           \
        T(int i) : __x(TO_BITS((float)i)) {}                                              \
        T(unsigned i) : __x(TO_BITS((float)i)) {}                                         \
        T(long i) : __x(TO_BITS((float)i)) {}                                             \
        T(unsigned long i) : __x(TO_BITS((float)i)) {}                                    \
        T(long long i) : __x(TO_BITS((float)i)) {}                                        \
        T(unsigned long long i) : __x(TO_BITS((float)i)) {}                               \
        operator float() const { return FROM_BITS(__x); }                                 \
        T& operator=(float f) { __x = TO_BITS(f); return *this; }                         \
        T& operator+=(T o) { *this = T(float(*this) + float(o)); return *this; }          \
        T& operator-=(T o) { *this = T(float(*this) - float(o)); return *this; }          \
        T& operator*=(T o) { *this = T(float(*this) * float(o)); return *this; }          \
        T& operator/=(T o) { *this = T(float(*this) / float(o)); return *this; }          \
    };                                                                                    \
    static inline T operator+(T a, T b) { return T(float(a) + float(b)); }                \
    static inline T operator-(T a, T b) { return T(float(a) - float(b)); }                \
    static inline T operator*(T a, T b) { return T(float(a) * float(b)); }                \
    static inline T operator/(T a, T b) { return T(float(a) / float(b)); }                \
    static inline T operator-(T a) { T r; r.__x = (unsigned short)(a.__x ^ 0x8000u); return r; } \
    static inline T operator+(T a) { return a; }                                          \
    static inline bool operator==(T a, T b) { return float(a) == float(b); }              \
    static inline bool operator!=(T a, T b) { return float(a) != float(b); }              \
    static inline bool operator<(T a, T b) { return float(a) < float(b); }               \
    static inline bool operator>(T a, T b) { return float(a) > float(b); }               \
    static inline bool operator<=(T a, T b) { return float(a) <= float(b); }             \
    static inline bool operator>=(T a, T b) { return float(a) >= float(b); }

EMU_F16_TYPE(__nv_bfloat16, emu_f32_to_bf16_bits, emu_bf16_bits_to_f32)
EMU_F16_TYPE(__half, emu_f32_to_f16_bits, emu_f16_bits_to_f32)
#undef EMU_F16_TYPE
typedef __nv_bfloat16 nv_bfloat16;
typedef __half half;
static_assert(sizeof(__nv_bfloat16) == 2 && std::is_trivial<__nv_bfloat16>::value, "bf16 layout");
static_assert(sizeof(__half) == 2 && std::is_trivial<__half>::value, "f16 layout");

struct alignas(4) __nv_bfloat162 {
    __nv_bfloat16 x, y;
};
struct alignas(4) __half2 {
    __half x, y;
};
typedef __nv_bfloat162 nv_bfloat162;
typedef __half2 half2;

static inline __nv_bfloat16 emu_bf16_from_bits(unsigned short b) { __nv_bfloat16 r; r.__x = b; return r; }
static inline __half emu_f16_from_bits(unsigned short b) { __half r; r.__x = b; return r; }

static inline float __bfloat162float(__nv_bfloat16 x) { return emu_bf16_bits_to_f32(x.__x); }
static inline __nv_bfloat16 __float2bfloat16(float f) { return emu_bf16_from_bits(emu_f32_to_bf16_bits(f)); }
static inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }
static inline __nv_bfloat16 __float2bfloat16_rz(float f) {
    return emu_bf16_from_bits((unsigned short)(__float_as_uint(f) >> 16));
}
static inline __nv_bfloat16 __int2bfloat16_rn(int i) { return __float2bfloat16((float)i); }
static inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short b) { return emu_bf16_from_bits(b); }
static inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 x) { return x.__x; }
static inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
    return __nv_bfloat162{__float2bfloat16(a), __float2bfloat16(b)};
}
static inline __nv_bfloat162 __float22bfloat162_rn(float2 f) { return __floats2bfloat162_rn(f.x, f.y); }
static inline float2 __bfloat1622float2(__nv_bfloat162 v) {
    return float2{__bfloat162float(v.x), __bfloat162float(v.y)};
}
static inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat162{a, b}; }
static inline __nv_bfloat162 __bfloat162bfloat162(__nv_bfloat16 a) { return __nv_bfloat162{a, a}; }
static inline float __low2float(__nv_bfloat162 v) { return __bfloat162float(v.x); }
static inline float __high2float(__nv_bfloat162 v) { return __bfloat162float(v.y); }
static inline __nv_bfloat16 __low2bfloat16(__nv_bfloat162 v) { return v.x; }
static inline __nv_bfloat16 __high2bfloat16(__nv_bfloat162 v) { return v.y; }

static inline float __half2float(__half x) { return emu_f16_bits_to_f32(x.__x); }
static inline __half __float2half(float f) { return emu_f16_from_bits(emu_f32_to_f16_bits(f)); }
static inline __half __float2half_rn(float f) { return __float2half(f); }
static inline __half __ushort_as_half(unsigned short b) { return emu_f16_from_bits(b); }
static inline unsigned short __half_as_ushort(__half x) { return x.__x; }
static inline __half2 __floats2half2_rn(float a, float b) { return __half2{__float2half(a), __float2half(b)}; }
static inline __half2 __float22half2_rn(float2 f) { return __floats2half2_rn(f.x, f.y); }
static inline float2 __half22float2(__half2 v) { return float2{__half2float(v.x), __half2float(v.y)}; }
static inline float __low2float(__half2 v) { return __half2float(v.x); }
static inline float __high2float(__half2 v) { return __half2float(v.y); }

// Arithmetic intrinsics on one 16-bit value (f32 arithmetic, rounded).
#define EMU_H_OPS(T, TO, FROM)                                                         \
    static inline T __hadd(T a, T b) { return TO(FROM(a) + FROM(b)); }                 \
    static inline T __hsub(T a, T b) { return TO(FROM(a) - FROM(b)); }                 \
    static inline T __hmul(T a, T b) { return TO(FROM(a) * FROM(b)); }                 \
    static inline T __hdiv(T a, T b) { return TO(FROM(a) / FROM(b)); }                 \
    static inline T __hfma(T a, T b, T c) { return TO(fmaf(FROM(a), FROM(b), FROM(c))); } \
    static inline T __hneg(T a) { return -a; }                                         \
    static inline T __hmax(T a, T b) { return TO(fmaxf(FROM(a), FROM(b))); }           \
    static inline T __hmin(T a, T b) { return TO(fminf(FROM(a), FROM(b))); }           \
    static inline bool __hlt(T a, T b) { return FROM(a) < FROM(b); }                   \
    static inline bool __hgt(T a, T b) { return FROM(a) > FROM(b); }                   \
    static inline bool __heq(T a, T b) { return FROM(a) == FROM(b); }                  \
    static inline bool __hisnan(T a) { return std::isnan(FROM(a)); }
EMU_H_OPS(__nv_bfloat16, __float2bfloat16, __bfloat162float)
EMU_H_OPS(__half, __float2half, __half2float)
#undef EMU_H_OPS
static inline __nv_bfloat162 __hadd2(__nv_bfloat162 a, __nv_bfloat162 b) { return {__hadd(a.x, b.x), __hadd(a.y, b.y)}; }
static inline __nv_bfloat162 __hmul2(__nv_bfloat162 a, __nv_bfloat162 b) { return {__hmul(a.x, b.x), __hmul(a.y, b.y)}; }
static inline __nv_bfloat162 __hfma2(__nv_bfloat162 a, __nv_bfloat162 b, __nv_bfloat162 c) {
    return {__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y)};
}
static inline __half2 __hadd2(__half2 a, __half2 b) { return {__hadd(a.x, b.x), __hadd(a.y, b.y)}; }
static inline __half2 __hmul2(__half2 a, __half2 b) { return {__hmul(a.x, b.x), __hmul(a.y, b.y)}; }
static inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) {
    return {__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y)};
}

// ---------------------------------------------------------------- atomics
// Blocks run in parallel on OS threads: these are real atomics.
namespace emu {
template <typename T, typename F>
inline T atomic_update(T* addr, F f) {
    static_assert(sizeof(T) == 4 || sizeof(T) == 8, "atomics on 4 or 8 bytes");
    using U = std::conditional_t<sizeof(T) == 4, unsigned, unsigned long long>;
    U* p = reinterpret_cast<U*>(addr);
    U old_bits = __atomic_load_n(p, __ATOMIC_RELAXED);
    for (;;) {
        T old_val;
        memcpy(&old_val, &old_bits, sizeof(T));
        T new_val = f(old_val);
        U new_bits;
        memcpy(&new_bits, &new_val, sizeof(T));
        if (__atomic_compare_exchange_n(p, &old_bits, new_bits, true, __ATOMIC_SEQ_CST,
                                        __ATOMIC_RELAXED))
            return old_val;
    }
}
}  // namespace emu
static inline int atomicAdd(int* a, int v) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); }
static inline unsigned atomicAdd(unsigned* a, unsigned v) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); }
static inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) {
    return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);
}
static inline float atomicAdd(float* a, float v) {
    return emu::atomic_update(a, [v](float o) { return o + v; });
}
static inline double atomicAdd(double* a, double v) {
    return emu::atomic_update(a, [v](double o) { return o + v; });
}
static inline int atomicSub(int* a, int v) { return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST); }
static inline unsigned atomicSub(unsigned* a, unsigned v) { return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST); }
static inline int atomicExch(int* a, int v) { return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); }
static inline unsigned atomicExch(unsigned* a, unsigned v) { return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); }
static inline unsigned long long atomicExch(unsigned long long* a, unsigned long long v) {
    return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST);
}
static inline float atomicExch(float* a, float v) {
    return emu::atomic_update(a, [v](float) { return v; });
}
static inline int atomicMax(int* a, int v) {
    return emu::atomic_update(a, [v](int o) { return o > v ? o : v; });
}
static inline unsigned atomicMax(unsigned* a, unsigned v) {
    return emu::atomic_update(a, [v](unsigned o) { return o > v ? o : v; });
}
static inline int atomicMin(int* a, int v) {
    return emu::atomic_update(a, [v](int o) { return o < v ? o : v; });
}
static inline unsigned atomicMin(unsigned* a, unsigned v) {
    return emu::atomic_update(a, [v](unsigned o) { return o < v ? o : v; });
}
static inline int atomicAnd(int* a, int v) { return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST); }
static inline unsigned atomicAnd(unsigned* a, unsigned v) { return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST); }
static inline int atomicOr(int* a, int v) { return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST); }
static inline unsigned atomicOr(unsigned* a, unsigned v) { return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST); }
static inline int atomicXor(int* a, int v) { return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST); }
static inline unsigned atomicXor(unsigned* a, unsigned v) { return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST); }
template <typename T>
static inline T emu_atomic_cas(T* a, T cmp, T v) {
    __atomic_compare_exchange_n(a, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return cmp;  // the old value either way
}
static inline int atomicCAS(int* a, int c, int v) { return emu_atomic_cas(a, c, v); }
static inline unsigned atomicCAS(unsigned* a, unsigned c, unsigned v) { return emu_atomic_cas(a, c, v); }
static inline unsigned long long atomicCAS(unsigned long long* a, unsigned long long c,
                                           unsigned long long v) {
    return emu_atomic_cas(a, c, v);
}
static inline unsigned atomicInc(unsigned* a, unsigned lim) {
    return emu::atomic_update(a, [lim](unsigned o) { return o >= lim ? 0u : o + 1; });
}
#define atomicAdd_block atomicAdd
#define atomicMax_block atomicMax

// ---------------------------------------------------------------- misc
static inline size_t __cvta_generic_to_shared(const void* p) { return (size_t)p; }
static inline long long clock64() { return 0; }
static inline unsigned __nanosleep(unsigned) { return 0; }
