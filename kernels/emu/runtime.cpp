// The emulator's runtime: fibers, the per-block scheduler, barriers, warp
// operations, deadlock detection, the worker pool and the C API.
//
// A block runs on one worker OS thread. Its threads are fibers, each on its
// own stack, switched by emu_ctx_switch (below). A fiber runs until it blocks
// (at __syncthreads, a warp operation, or its end); then the next runnable
// fiber of the block runs, in FIFO order. So one fiber races ahead of the
// others as far as it can, which makes a missing __syncthreads show up as
// wrong results, every run.
//
// __syncthreads: a generation-counting barrier over the block's live fibers
// (a fiber that returns leaves the count). All threads must wait at the same
// __syncthreads (same file and line); threads at different ones are reported.
// Warp operations: the lanes named in the mask stage their values in the
// warp's staging area; the last to arrive computes every lane's result and
// releases them. A lane named in the mask that has exited, that does not
// exist, or that waits elsewhere (another shuffle, a barrier) is reported —
// never a hang: when no fiber of the block can run, the launch fails with a
// message naming the kernel, the block and what each thread waits on.

// System headers first: emu.h defines __noinline__ and friends as macros.
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstdarg>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "emu.h"
#include "registry.h"

__thread uint3 emu_threadIdx;
__thread uint3 emu_blockIdx;
__thread uint3 emu_blockDim;
__thread uint3 emu_gridDim;

// ---------------------------------------------------------------- context switch

#if defined(__x86_64__)
// emu_ctx_switch(save, to): saves the callee-saved registers, the SSE control
// and status register and the x87 control word on the current stack, stores
// the stack pointer in *save, and resumes the context whose stack pointer is
// `to`. A new context starts in emu_ctx_trampoline, which calls r13(r12).
extern "C" void emu_ctx_switch(void** save, void* to);
extern "C" void emu_ctx_trampoline();
asm(R"(
    .text
    .globl emu_ctx_switch
    .hidden emu_ctx_switch
    .type emu_ctx_switch, @function
emu_ctx_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_ctx_switch, .-emu_ctx_switch

    .globl emu_ctx_trampoline
    .hidden emu_ctx_trampoline
    .type emu_ctx_trampoline, @function
emu_ctx_trampoline:
    movq %r12, %rdi
    callq *%r13
    ud2
    .size emu_ctx_trampoline, .-emu_ctx_trampoline
)");

namespace {
struct Context {
    void* sp = nullptr;
};
inline void ctx_switch(Context* save, Context* to) { emu_ctx_switch(&save->sp, to->sp); }
// Prepares `c` to run fn(arg) on the stack that ends at `top`.
inline void ctx_make(Context* c, char* top, void (*fn)(void*), void* arg) {
    uintptr_t t = (uintptr_t)top & ~(uintptr_t)15;
    uint64_t* sp = (uint64_t*)(t - 80);  // 8 words popped by emu_ctx_switch, 16 bytes spare
    uint32_t csr[2];
    asm volatile("stmxcsr %0" : "=m"(csr[0]));
    asm volatile("fnstcw %0" : "=m"(csr[1]));
    memcpy(&sp[0], csr, 8);
    sp[1] = 0;                         // r15
    sp[2] = 0;                         // r14
    sp[3] = (uint64_t)(uintptr_t)fn;   // r13
    sp[4] = (uint64_t)(uintptr_t)arg;  // r12
    sp[5] = 0;                         // rbx
    sp[6] = 0;                         // rbp
    sp[7] = (uint64_t)(uintptr_t)&emu_ctx_trampoline;
    c->sp = sp;
}
}  // namespace
#else
// Portable fallback (other architectures): ucontext, about 10x slower.
#include <ucontext.h>
namespace {
struct Context {
    ucontext_t uc;
};
inline void ctx_switch(Context* save, Context* to) { swapcontext(&save->uc, &to->uc); }
void (*g_start_fn)(void*);
void ctx_start(unsigned hi, unsigned lo) {
    g_start_fn((void*)(((uintptr_t)hi << 32) | (uintptr_t)lo));
}
inline void ctx_make(Context* c, char* top, void (*fn)(void*), void* arg) {
    const size_t size = 256 * 1024 - 4096;
    getcontext(&c->uc);
    c->uc.uc_stack.ss_sp = top - size;
    c->uc.uc_stack.ss_size = size;
    c->uc.uc_link = nullptr;
    g_start_fn = fn;  // always fiber_main
    uintptr_t a = (uintptr_t)arg;
    makecontext(&c->uc, (void (*)())ctx_start, 2, (unsigned)(a >> 32), (unsigned)a);
}
}  // namespace
#endif

// ---------------------------------------------------------------- block state

namespace {

constexpr size_t kStackSize = 256 * 1024;
constexpr size_t kScratchBytes = 4096;
constexpr int kMaxThreads = 1024;

enum FiberState { RUNNABLE, WAIT_BAR, WAIT_WARP, WAIT_SLOT, DONE };

struct Fiber {
    Context ctx;
    uint3 tid;
    int linear;
    int state;
    char* stack_top;
    // What it waits on (for the deadlock report).
    const char* file;
    int line;
    int op;
    unsigned mask;
    // Results handed over by the fiber that released it.
    int bar_result;
    unsigned long long warp_result;
};

struct Warp {
    bool pending;
    int op;
    const char* file;
    int line;
    unsigned mask;
    unsigned arrived;
    int width;
    unsigned exists;  // lanes that exist (the block may end inside the warp)
    unsigned exited;
    int nwait;
    int nslot;
    unsigned long long val[32];
    int arg[32];
    int waiters[32];       // fiber indices, in arrival order
    int slot_waiters[32];  // lanes waiting for the pending op (disjoint mask) to finish
    alignas(64) unsigned char scratch[kScratchBytes];
};

const char* op_name(int op) {
    switch (op) {
        case EMU_OP_SHFL_IDX: return "__shfl_sync";
        case EMU_OP_SHFL_UP: return "__shfl_up_sync";
        case EMU_OP_SHFL_DOWN: return "__shfl_down_sync";
        case EMU_OP_SHFL_XOR: return "__shfl_xor_sync";
        case EMU_OP_BALLOT: return "__ballot_sync";
        case EMU_OP_ANY: return "__any_sync";
        case EMU_OP_ALL: return "__all_sync";
        case EMU_OP_SYNCWARP: return "__syncwarp";
        case EMU_OP_REDUCE_ADD: return "__reduce_add_sync";
        case EMU_OP_REDUCE_MIN:
        case EMU_OP_REDUCE_UMIN: return "__reduce_min_sync";
        case EMU_OP_REDUCE_MAX:
        case EMU_OP_REDUCE_UMAX: return "__reduce_max_sync";
        case EMU_OP_MATCH_ANY: return "__match_any_sync";
        default: return "warp operation";
    }
}

std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string fmt(const char* f, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, f);
    vsnprintf(buf, sizeof buf, f, ap);
    va_end(ap);
    return buf;
}

// "3", "0-15", "0-3, 8, 10-11" from a sorted list.
std::string ranges(const std::vector<int>& v) {
    std::string s;
    for (size_t i = 0; i < v.size();) {
        size_t j = i;
        while (j + 1 < v.size() && v[j + 1] == v[j] + 1) j++;
        if (!s.empty()) s += ", ";
        s += std::to_string(v[i]);
        if (j > i) s += "-" + std::to_string(v[j]);
        i = j + 1;
    }
    return s;
}

std::string lanes_of(unsigned m) {
    std::vector<int> v;
    for (int l = 0; l < 32; l++)
        if (m >> l & 1) v.push_back(l);
    return ranges(v);
}

const char* base_name(const char* path) {
    const char* s = strrchr(path, '/');
    return s ? s + 1 : path;
}

bool same_site(const char* f1, int l1, const char* f2, int l2) {
    return l1 == l2 && (f1 == f2 || strcmp(f1, f2) == 0);
}

struct Failure {};

// Everything one worker needs to run blocks: fibers and their stacks, warps,
// the dynamic shared memory buffer. Reused from block to block.
struct Worker {
    // The launch
    const EmuKernel* kernel = nullptr;
    void** args = nullptr;
    bool reverse = false;
    // The block
    uint3 bid{}, bdim{}, gdim{};
    int nthreads = 0;
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    std::vector<char*> stacks;
    std::vector<int> queue;  // ring buffer of runnable fiber indices
    int qhead = 0, qlen = 0;
    int live = 0;
    Fiber* cur = nullptr;
    Context sched;
    // __syncthreads
    int bar_arrived = 0;
    int bar_count = 0;
    int bar_mode = 0;
    const char* bar_file = nullptr;
    int bar_line = 0;
    std::vector<int> bar_waiters;
    // Dynamic shared memory
    unsigned char* smem = nullptr;
    size_t smem_cap = 0, smem_len = 0;
    // Outcome
    bool failed = false;
    std::string error;

    ~Worker() {
        for (char* s : stacks) munmap(s, kStackSize + 4096);
        free(smem);
    }

    void push(int i) {
        queue[(qhead + qlen) % nthreads] = i;
        qlen++;
    }
    int pop() {
        if (qlen == 0) return -1;
        int i = queue[qhead];
        qhead = (qhead + 1) % nthreads;
        qlen--;
        return i;
    }

    void run_block(uint3 b);
    [[noreturn]] void fail(const std::string& msg);
    void block_current();
    void release_barrier();
    std::string deadlock_report();
};

thread_local Worker* tl_worker = nullptr;

void fiber_main(void* p) {
    Worker* w = tl_worker;
    Fiber* f = static_cast<Fiber*>(p);
    w->kernel->invoke(w->args);
    // The fiber's end: leave the barrier count, check the warp.
    f->state = DONE;
    w->live--;
    Warp& wp = w->warps[f->linear >> 5];
    unsigned bit = 1u << (f->linear & 31);
    wp.exited |= bit;
    if (wp.pending && (wp.mask & bit)) {
        std::vector<int> waiting;
        for (int i = 0; i < wp.nwait; i++) waiting.push_back(wp.waiters[i] & 31);
        std::sort(waiting.begin(), waiting.end());
        w->fail(fmt("thread %d (warp %d lane %d) exited while lanes %s of its warp wait for it at "
                    "%s (%s:%d) with mask 0x%08x",
                    f->linear, f->linear >> 5, f->linear & 31, ranges(waiting).c_str(),
                    op_name(wp.op), base_name(wp.file), wp.line, wp.mask));
    }
    if (w->bar_arrived > 0 && w->bar_arrived == w->live) w->release_barrier();
    int next = w->pop();
    Context* to = next >= 0 ? &w->fibers[next].ctx : &w->sched;
    if (next >= 0) {
        w->cur = &w->fibers[next];
        emu_threadIdx = w->cur->tid;
    } else {
        w->cur = nullptr;
    }
    ctx_switch(&f->ctx, to);  // never resumed
    __builtin_unreachable();
}

void Worker::fail(const std::string& msg) {
    if (!failed) {
        failed = true;
        error = msg;
    }
    Fiber* me = cur;
    cur = nullptr;
    ctx_switch(&me->ctx, &sched);  // never resumed: the block is abandoned
    __builtin_unreachable();
}

// The current fiber waits (its state already set): run the next runnable
// fiber, or go back to the scheduler if there is none.
void Worker::block_current() {
    Fiber* me = cur;
    int next = pop();
    if (next >= 0) {
        Fiber* to = &fibers[next];
        cur = to;
        emu_threadIdx = to->tid;
        ctx_switch(&me->ctx, &to->ctx);
    } else {
        cur = nullptr;
        ctx_switch(&me->ctx, &sched);
    }
    // Resumed by whoever released us (it set cur and threadIdx).
}

void Worker::release_barrier() {
    int n = bar_arrived;
    int result = bar_mode == 1 ? bar_count
                 : bar_mode == 2 ? (bar_count == n)
                 : bar_mode == 3 ? (bar_count > 0)
                                 : 0;
    for (int i : bar_waiters) {
        fibers[i].state = RUNNABLE;
        fibers[i].bar_result = result;
        push(i);
    }
    bar_waiters.clear();
    bar_arrived = 0;
    bar_count = 0;
    if (cur) cur->bar_result = result;
}

std::string Worker::deadlock_report() {
    std::string s = "deadlock: no thread can make progress:";
    // Threads at __syncthreads
    if (!bar_waiters.empty()) {
        std::vector<int> t(bar_waiters.begin(), bar_waiters.end());
        std::sort(t.begin(), t.end());
        s += fmt(" threads %s wait at __syncthreads (%s:%d) for %d more live threads;",
                 ranges(t).c_str(), base_name(bar_file), bar_line, live - bar_arrived);
    }
    for (size_t wi = 0; wi < warps.size(); wi++) {
        Warp& wp = warps[wi];
        if (!wp.pending) continue;
        std::vector<int> t;
        for (int i = 0; i < wp.nwait; i++) t.push_back(wp.waiters[i]);
        std::sort(t.begin(), t.end());
        unsigned missing = wp.mask & ~wp.arrived;
        std::string where;
        for (int l = 0; l < 32; l++) {
            if (!(missing >> l & 1)) continue;
            Fiber& f = fibers[wi * 32 + l];
            where = f.state == WAIT_BAR    ? fmt("thread %d waits at __syncthreads (%s:%d)",
                                                 f.linear, base_name(f.file), f.line)
                    : f.state == WAIT_SLOT ? fmt("thread %d waits at %s (%s:%d)", f.linear,
                                                 op_name(f.op), base_name(f.file), f.line)
                                           : fmt("thread %d is elsewhere", f.linear);
            break;
        }
        s += fmt(" threads %s (warp %zu) wait at %s (%s:%d) with mask 0x%08x for lanes %s (%s);",
                 ranges(t).c_str(), wi, op_name(wp.op), base_name(wp.file), wp.line, wp.mask,
                 lanes_of(missing).c_str(), where.c_str());
    }
    if (!s.empty() && s.back() == ';') s.pop_back();
    return s;
}

void Worker::run_block(uint3 b) {
    bid = b;
    emu_blockIdx = b;
    emu_blockDim = bdim;
    emu_gridDim = gdim;
    live = nthreads;
    qhead = qlen = 0;
    bar_arrived = bar_count = 0;
    bar_waiters.clear();
    cur = nullptr;
    for (size_t wi = 0; wi < warps.size(); wi++) {
        Warp& wp = warps[wi];
        wp.pending = false;
        wp.nwait = wp.nslot = 0;
        wp.arrived = 0;
        wp.exited = 0;
        int n = nthreads - (int)wi * 32;
        wp.exists = n >= 32 ? 0xffffffffu : ((1u << n) - 1);
    }
    if (smem_len) memset(smem, 0xff, smem_len);  // NaN everywhere: no stale data
    for (int i = 0; i < nthreads; i++) {
        Fiber& f = fibers[i];
        f.linear = i;
        f.tid = uint3{(unsigned)i % bdim.x, (unsigned)i / bdim.x % bdim.y,
                      (unsigned)i / (bdim.x * bdim.y)};
        f.state = RUNNABLE;
        f.file = nullptr;
        f.line = 0;
        ctx_make(&f.ctx, f.stack_top, fiber_main, &f);
    }
    for (int i = 0; i < nthreads; i++) push(reverse ? nthreads - 1 - i : i);
    for (;;) {
        int next = pop();
        if (next < 0) break;
        Fiber* f = &fibers[next];
        cur = f;
        emu_threadIdx = f->tid;
        ctx_switch(&sched, &f->ctx);
        if (failed) return;
    }
    if (live > 0) {
        failed = true;
        error = deadlock_report();
    }
}

}  // namespace

// ---------------------------------------------------------------- device-side API

extern "C" int emu_syncthreads(const char* file, int line, int mode, int pred) {
    Worker* w = tl_worker;
    Fiber* me = w->cur;
    if (w->bar_arrived == 0) {
        w->bar_file = file;
        w->bar_line = line;
        w->bar_mode = mode;
        w->bar_count = 0;
    } else if (!same_site(file, line, w->bar_file, w->bar_line)) {
        std::vector<int> t(w->bar_waiters.begin(), w->bar_waiters.end());
        std::sort(t.begin(), t.end());
        w->fail(fmt("divergent __syncthreads: thread %d reached __syncthreads at %s:%d while "
                    "threads %s wait at %s:%d (a barrier in code not all threads of the block "
                    "take)",
                    me->linear, base_name(file), line, ranges(t).c_str(),
                    base_name(w->bar_file), w->bar_line));
    }
    w->bar_count += pred;
    w->bar_arrived++;
    if (w->bar_arrived == w->live) {
        w->release_barrier();
        return me->bar_result;
    }
    me->state = WAIT_BAR;
    me->file = file;
    me->line = line;
    w->bar_waiters.push_back(me->linear);
    w->block_current();
    return me->bar_result;
}

extern "C" unsigned long long emu_warp_op(const char* file, int line, int op, unsigned mask,
                                          unsigned long long val, int arg, int width) {
    Worker* w = tl_worker;
    Fiber* me = w->cur;
    const int lane = me->linear & 31, wi = me->linear >> 5;
    const unsigned bit = 1u << lane;
    Warp& wp = w->warps[wi];
    if (!(mask & bit))
        w->fail(fmt("thread %d (warp %d lane %d) calls %s (%s:%d) with mask 0x%08x, which does "
                    "not name the calling lane",
                    me->linear, wi, lane, op_name(op), base_name(file), line, mask));
    if (mask & ~wp.exists)
        w->fail(fmt("%s (%s:%d) with mask 0x%08x names lanes %s of warp %d, which do not exist "
                    "(the block has %d threads)",
                    op_name(op), base_name(file), line, mask, lanes_of(mask & ~wp.exists).c_str(),
                    wi, w->nthreads));
    if (op <= EMU_OP_SHFL_XOR && (width < 1 || width > 32 || (width & (width - 1))))
        w->fail(fmt("%s (%s:%d): width %d is not a power of two <= 32", op_name(op),
                    base_name(file), line, width));
    for (;;) {
        if (!wp.pending) {
            wp.pending = true;
            wp.op = op;
            wp.file = file;
            wp.line = line;
            wp.mask = mask;
            wp.width = width;
            wp.arrived = 0;
            wp.nwait = 0;
            break;
        }
        if (wp.mask == mask) {
            if (wp.op != op || !same_site(file, line, wp.file, wp.line) || wp.width != width) {
                std::vector<int> t;
                for (int i = 0; i < wp.nwait; i++) t.push_back(wp.waiters[i] & 31);
                std::sort(t.begin(), t.end());
                w->fail(fmt("warp %d diverged: lane %d calls %s (%s:%d) while lanes %s wait at "
                            "%s (%s:%d), both with mask 0x%08x",
                            wi, lane, op_name(op), base_name(file), line, ranges(t).c_str(),
                            op_name(wp.op), base_name(wp.file), wp.line, mask));
            }
            break;
        }
        if ((wp.mask & mask) == 0) {  // another group of lanes: wait until it is done
            me->state = WAIT_SLOT;
            me->file = file;
            me->line = line;
            me->op = op;
            me->mask = mask;
            wp.slot_waiters[wp.nslot++] = me->linear;
            w->block_current();
            continue;
        }
        w->fail(fmt("warp %d: lane %d calls %s (%s:%d) with mask 0x%08x while lanes %s wait at "
                    "%s (%s:%d) with the overlapping mask 0x%08x",
                    wi, lane, op_name(op), base_name(file), line, mask,
                    lanes_of(wp.arrived).c_str(), op_name(wp.op), base_name(wp.file), wp.line,
                    wp.mask));
    }
    if (mask & wp.exited)
        w->fail(fmt("%s (%s:%d) with mask 0x%08x in warp %d waits for lanes %s, which have exited",
                    op_name(op), base_name(file), line, mask, wi,
                    lanes_of(mask & wp.exited).c_str()));
    wp.val[lane] = val;
    wp.arg[lane] = arg;
    wp.arrived |= bit;
    if (wp.arrived != mask) {
        me->state = WAIT_WARP;
        me->file = file;
        me->line = line;
        me->op = op;
        me->mask = mask;
        wp.waiters[wp.nwait++] = me->linear;
        w->block_current();
        return me->warp_result;
    }
    // The last lane: compute every lane's result, release the others.
    Fiber* base = &w->fibers[wi * 32];
    switch (op) {
        case EMU_OP_SHFL_IDX:
        case EMU_OP_SHFL_UP:
        case EMU_OP_SHFL_DOWN:
        case EMU_OP_SHFL_XOR:
            for (int l = 0; l < 32; l++) {
                if (!(mask >> l & 1)) continue;
                const int seg = l & ~(width - 1), a = wp.arg[l];
                int src;
                if (op == EMU_OP_SHFL_IDX) src = seg + (a & (width - 1));
                else if (op == EMU_OP_SHFL_UP) src = (l - a >= seg) ? l - a : l;
                else if (op == EMU_OP_SHFL_DOWN) src = (l + a < seg + width) ? l + a : l;
                else src = ((l ^ a) < seg + width) ? (l ^ a) : l;
                // A source lane outside the mask gives an undefined value on
                // the GPU; here the lane's own.
                if (src < 0 || src > 31 || !(mask >> src & 1)) src = l;
                base[l].warp_result = wp.val[src];
            }
            break;
        case EMU_OP_BALLOT:
        case EMU_OP_ANY:
        case EMU_OP_ALL: {
            unsigned b = 0;
            for (int l = 0; l < 32; l++)
                if ((mask >> l & 1) && wp.val[l]) b |= 1u << l;
            unsigned long long r = op == EMU_OP_BALLOT ? b : op == EMU_OP_ANY ? (b != 0) : (b == mask);
            for (int l = 0; l < 32; l++)
                if (mask >> l & 1) base[l].warp_result = r;
            break;
        }
        case EMU_OP_SYNCWARP:
            break;
        case EMU_OP_MATCH_ANY:
            for (int l = 0; l < 32; l++) {
                if (!(mask >> l & 1)) continue;
                unsigned m = 0;
                for (int j = 0; j < 32; j++)
                    if ((mask >> j & 1) && wp.val[j] == wp.val[l]) m |= 1u << j;
                base[l].warp_result = m;
            }
            break;
        default: {  // reductions
            long long acc = 0;
            bool first = true;
            for (int l = 0; l < 32; l++) {
                if (!(mask >> l & 1)) continue;
                unsigned u = (unsigned)wp.val[l];
                long long v = (op == EMU_OP_REDUCE_MIN || op == EMU_OP_REDUCE_MAX) ? (long long)(int)u
                                                                                   : (long long)u;
                if (first) acc = v;
                else if (op == EMU_OP_REDUCE_ADD) acc = (unsigned)(acc + v);
                else if (op == EMU_OP_REDUCE_MIN || op == EMU_OP_REDUCE_UMIN) acc = std::min(acc, v);
                else acc = std::max(acc, v);
                first = false;
            }
            for (int l = 0; l < 32; l++)
                if (mask >> l & 1) base[l].warp_result = (unsigned)acc;
            break;
        }
    }
    for (int i = 0; i < wp.nwait; i++) {
        w->fibers[wp.waiters[i]].state = RUNNABLE;
        w->push(wp.waiters[i]);
    }
    for (int i = 0; i < wp.nslot; i++) {
        w->fibers[wp.slot_waiters[i]].state = RUNNABLE;
        w->push(wp.slot_waiters[i]);
    }
    wp.nwait = wp.nslot = 0;
    wp.pending = false;
    wp.arrived = 0;
    return me->warp_result;
}

extern "C" void* emu_dynamic_smem(void) { return tl_worker->smem; }

extern "C" void* emu_warp_scratch(void) {
    Worker* w = tl_worker;
    return w->warps[w->cur->linear >> 5].scratch;
}

extern "C" int emu_lane_id(void) { return tl_worker->cur->linear & 31; }

extern "C" unsigned emu_active_mask(void) {
    Worker* w = tl_worker;
    Warp& wp = w->warps[w->cur->linear >> 5];
    return wp.exists & ~wp.exited;
}

extern "C" void emu_trap(const char* file, int line, const char* what) {
    Worker* w = tl_worker;
    w->fail(fmt("thread %d: %s at %s:%d", w->cur->linear, what, base_name(file), line));
}

// ---------------------------------------------------------------- launches and the pool

namespace {

struct Launch {
    const EmuKernel* kernel;
    void** args;
    uint3 grid, block;
    size_t smem;
    bool reverse;
    long nblocks;
    std::atomic<long> next{0};
    std::atomic<bool> failed{false};
    std::mutex err_mu;
    std::string err;
};

// Runs blocks of `l` on the calling thread until none is left.
void work_on(Launch* l) {
    thread_local std::unique_ptr<Worker> mine;
    if (!mine) mine.reset(new Worker());
    Worker* w = mine.get();
    tl_worker = w;
    const int n = (int)(l->block.x * l->block.y * l->block.z);
    w->kernel = l->kernel;
    w->args = l->args;
    w->reverse = l->reverse;
    w->bdim = l->block;
    w->gdim = l->grid;
    w->nthreads = n;
    if ((int)w->fibers.size() < n) w->fibers.resize(n);
    w->queue.assign(n, 0);
    w->warps.resize((n + 31) / 32);
    while ((int)w->stacks.size() < n) {
        void* p = mmap(nullptr, kStackSize + 4096, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) {
            std::lock_guard<std::mutex> g(l->err_mu);
            if (!l->failed.exchange(true)) l->err = "cannot map fiber stacks";
            return;
        }
        mprotect(p, 4096, PROT_NONE);  // guard page below the stack
        w->stacks.push_back(static_cast<char*>(p));
    }
    for (int i = 0; i < n; i++) {
        // Stagger the stack tops so the fibers' hot frames do not all map to
        // the same cache sets.
        w->fibers[i].stack_top = w->stacks[i] + 4096 + kStackSize - (size_t)(i % 64) * 64;
    }
    if (w->smem_cap < l->smem) {
        free(w->smem);
        w->smem_cap = (l->smem + 127) & ~(size_t)127;
        w->smem = static_cast<unsigned char*>(aligned_alloc(128, w->smem_cap));
    }
    w->smem_len = l->smem;
    while (!l->failed.load(std::memory_order_relaxed)) {
        long i = l->next.fetch_add(1);
        if (i >= l->nblocks) break;
        long b = l->reverse ? l->nblocks - 1 - i : i;
        uint3 bid{(unsigned)(b % l->grid.x), (unsigned)(b / l->grid.x % l->grid.y),
                  (unsigned)(b / ((long)l->grid.x * l->grid.y))};
        w->failed = false;
        w->error.clear();
        w->run_block(bid);
        if (w->failed) {
            std::lock_guard<std::mutex> g(l->err_mu);
            if (!l->failed.exchange(true))
                l->err = fmt("kernel %s, block (%u,%u,%u) of grid (%u,%u,%u), blockDim (%u,%u,%u): ",
                             l->kernel->name, bid.x, bid.y, bid.z, l->grid.x, l->grid.y,
                             l->grid.z, l->block.x, l->block.y, l->block.z) +
                         w->error;
        }
    }
    tl_worker = nullptr;
}

// A pool of worker threads; the launching thread waits.
struct Pool {
    std::mutex mu;
    std::condition_variable cv_work, cv_done;
    std::vector<std::thread> threads;
    Launch* job = nullptr;
    unsigned long gen = 0;
    int wanted = 0, done = 0;

    void ensure(int n) {
        while ((int)threads.size() < n) {
            int idx = (int)threads.size();
            threads.emplace_back([this, idx] { loop(idx); });
            threads.back().detach();
        }
    }
    void loop(int idx) {
        unsigned long seen = 0;
        for (;;) {
            Launch* l;
            {
                std::unique_lock<std::mutex> g(mu);
                cv_work.wait(g, [&] { return gen != seen && idx < wanted; });
                seen = gen;
                l = job;
            }
            work_on(l);
            {
                std::lock_guard<std::mutex> g(mu);
                if (++done == wanted) cv_done.notify_all();
            }
        }
    }
    void run(Launch* l, int nworkers) {
        ensure(nworkers);
        std::unique_lock<std::mutex> g(mu);
        job = l;
        wanted = nworkers;
        done = 0;
        gen++;
        cv_work.notify_all();
        cv_done.wait(g, [&] { return done == wanted; });
        job = nullptr;
    }
};

Pool& pool() {
    static Pool* p = new Pool();  // never destroyed: its threads outlive main
    return *p;
}

std::mutex g_launch_mu;
std::atomic<int> g_workers{0};
std::atomic<int> g_reverse{-1};  // -1: not set yet, read ENGINE_EMU_REVERSE_LANES

bool default_reverse() {
    int r = g_reverse.load();
    if (r < 0) {
        const char* e = getenv("ENGINE_EMU_REVERSE_LANES");
        int v = (e && *e && strcmp(e, "0") != 0) ? 1 : 0;
        g_reverse.compare_exchange_strong(r, v);
        r = g_reverse.load();
    }
    return r == 1;
}

const std::unordered_map<std::string, const EmuKernel*>& table() {
    static const auto* t = [] {
        auto* m = new std::unordered_map<std::string, const EmuKernel*>();
        std::vector<const EmuKernel*> all;
        emu_registry_collect(all);
        for (const EmuKernel* k : all) m->emplace(k->name, k);
        return m;
    }();
    return *t;
}

int set_err(char* err, size_t len, const std::string& msg) {
    if (err && len) {
        size_t n = std::min(len - 1, msg.size());
        memcpy(err, msg.data(), n);
        err[n] = 0;
    }
    return 1;
}

}  // namespace

// ---------------------------------------------------------------- C API

extern "C" int emu_has_kernel(const char* name) { return table().count(name) ? 1 : 0; }

extern "C" int emu_kernel_param_count(const char* name) {
    auto it = table().find(name);
    return it == table().end() ? -1 : it->second->nparams;
}

extern "C" size_t emu_kernel_count(void) { return table().size(); }

extern "C" const char* emu_kernel_name(size_t i) {
    static const std::vector<std::string>* names = [] {
        auto* v = new std::vector<std::string>();
        for (auto& kv : table()) v->push_back(kv.first);
        std::sort(v->begin(), v->end());
        return v;
    }();
    return i < names->size() ? (*names)[i].c_str() : nullptr;
}

extern "C" void emu_set_reverse_lanes(int on) { g_reverse.store(on ? 1 : 0); }

extern "C" int emu_reverse_lanes(void) { return default_reverse() ? 1 : 0; }

extern "C" void emu_set_workers(int n) { g_workers.store(n > 0 ? n : 0); }

extern "C" int emu_workers(void) {
    int n = g_workers.load();
    if (n <= 0) n = (int)std::thread::hardware_concurrency();
    return n > 0 ? n : 1;
}

// Launches `name` on a grid of blocks and waits for it. args: as
// cuLaunchKernel's kernelParams; nargs: their number (checked against the
// kernel's parameter count), or -1 not to check. lane_order: -1 the default
// (emu_set_reverse_lanes / ENGINE_EMU_REVERSE_LANES), 0 forward, 1 reverse.
// Returns 0, or 1 with a message in err.
extern "C" int emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                          unsigned by, unsigned bz, unsigned smem_bytes, void** args, int nargs,
                          int lane_order, char* err, size_t err_len) {
    auto it = table().find(name ? name : "");
    if (it == table().end())
        return set_err(err, err_len,
                       fmt("the emulator has no kernel named `%s` (%zu kernels compiled from "
                           "kernels/*.cu)",
                           name ? name : "(null)", table().size()));
    const EmuKernel* k = it->second;
    if (nargs >= 0 && nargs != k->nparams)
        return set_err(err, err_len, fmt("kernel %s takes %d arguments, the launch gives %d", name,
                                         k->nparams, nargs));
    if (k->nparams > 0 && !args)
        return set_err(err, err_len, fmt("kernel %s: null argument array", name));
    for (int i = 0; i < k->nparams; i++)
        if (!args[i])
            return set_err(err, err_len, fmt("kernel %s: argument %d is a null pointer", name, i));
    if (!gx || !gy || !gz || !bx || !by || !bz)
        return set_err(err, err_len, fmt("kernel %s: empty grid (%u,%u,%u) or block (%u,%u,%u)",
                                         name, gx, gy, gz, bx, by, bz));
    if ((unsigned long long)bx * by * bz > (unsigned long long)kMaxThreads || bz > 64)
        return set_err(err, err_len,
                       fmt("kernel %s: block (%u,%u,%u) exceeds 1024 threads (z <= 64)", name, bx,
                           by, bz));
    if (gy > 65535 || gz > 65535 || gx > 0x7fffffffu)
        return set_err(err, err_len,
                       fmt("kernel %s: grid (%u,%u,%u) exceeds the limits", name, gx, gy, gz));
    if (smem_bytes > 227u * 1024)
        return set_err(err, err_len,
                       fmt("kernel %s: %u bytes of dynamic shared memory exceed 227 KiB", name,
                           smem_bytes));
    Launch l;
    l.kernel = k;
    l.args = args;
    l.grid = uint3{gx, gy, gz};
    l.block = uint3{bx, by, bz};
    l.smem = smem_bytes;
    l.reverse = lane_order < 0 ? default_reverse() : lane_order != 0;
    l.nblocks = (long)gx * gy * gz;
    std::lock_guard<std::mutex> g(g_launch_mu);
    long nw = std::min<long>(emu_workers(), l.nblocks);
    pool().run(&l, (int)nw);
    if (l.failed.load()) return set_err(err, err_len, l.err);
    return 0;
}
