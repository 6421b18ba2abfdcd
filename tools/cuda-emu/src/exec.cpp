// See exec.h. How a launch runs:
//  - The blocks of the grid are shared out, one at a time, to the calling OS thread and the idle
//    threads of a small pool (FAPE_CUDA_EMU_THREADS, default: the machine's cores). Each OS
//    thread is a Worker with its own fibers and shared-memory window, so blocks never share
//    __shared__ storage, and blocks run concurrently as on a GPU (global atomics are real).
//  - A block's CUDA threads are fibers, run round-robin by the worker until each blocks: at
//    __syncthreads (released when every live thread arrived), at a warp collective (computed by
//    the last lane of the mask to arrive), or at its end. A pass in which no fiber can run is a
//    deadlock; a barrier reached by part of a warp whose other lanes exited, a collective whose
//    lanes disagree or include an exited lane, and a trap end the block with an error.
//  - cp.async copies are queued per thread and done when a wait_group retires their group (or
//    the thread ends), so data read before its wait shows up stale, as it may on the GPU;
//    racecheck counts the shared-memory write at issue, when it may start to land.
//  - Sanitizer modes (FAPE_CUDA_EMU_SANITIZER): memcheck compiles the module with ASan and UBSan's
//    alignment check (see nvrtc.cpp) and poisons the unused part of the static shared window;
//    racecheck and initcheck compile it with access callbacks (__asan_{load,store}N_noabort,
//    defined below), which check shared-memory hazards between threads not ordered by a
//    barrier or warp collective (racecheck) or reads of never-written device memory (initcheck).
#include "exec.h"

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>

#include "emu.h"
#include "fiber.h"

// The ASan interface, present when the process runs with libasan preloaded (memcheck).
extern "C" {
void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size) __attribute__((weak));
void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old, size_t* size_old) __attribute__((weak));
void __asan_poison_memory_region(void const volatile* addr, size_t size) __attribute__((weak));
void __asan_unpoison_memory_region(void const volatile* addr, size_t size) __attribute__((weak));
void* __asan_region_is_poisoned(void* beg, size_t size) __attribute__((weak));
}

extern "C" {
__attribute__((visibility("default"))) __thread fape_emu_thread* fape_emu_self = nullptr;
}

namespace emu {

const DeviceInfo& device()
{
    static const DeviceInfo info = [] {
        const char* arch = std::getenv("FAPE_CUDA_EMU_ARCH");
        if (arch != nullptr && std::strcmp(arch, "90") == 0)
            return DeviceInfo{9, 0, 132, 50 * 1024 * 1024, 232448, 233472, "fape-cuda-emu H100-like, emulated (CPU)"};
        if (arch != nullptr && *arch && std::strcmp(arch, "80") != 0) {
            std::fprintf(stderr, "fape-cuda-emu: FAPE_CUDA_EMU_ARCH=%s is not 80 or 90\n", arch);
            std::abort();
        }
        return DeviceInfo{8, 0, 108, 40 * 1024 * 1024, 166912, 167936, "fape-cuda-emu A100-like, emulated (CPU)"};
    }();
    return info;
}

Module* load_module(const std::string& path, std::string* error)
{
    void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle == nullptr) {
        *error = std::string("dlopen: ") + dlerror();
        return nullptr;
    }
    using TableFn = const fape_emu_module_table* (*)();
    auto table_fn = reinterpret_cast<TableFn>(dlsym(handle, "fape_emu_module_kernels"));
    if (table_fn == nullptr || table_fn()->abi_version != FAPE_EMU_ABI_VERSION) {
        *error = path + " is not a module of this fape-cuda-emu (no kernel table of ABI version " +
                 std::to_string(FAPE_EMU_ABI_VERSION) + ")";
        dlclose(handle);
        return nullptr;
    }
    return new Module{handle, path, table_fn()};
}

namespace {

constexpr unsigned WARP = 32;

struct CpAsyncCopy {
    char* dst;
    const char* src;
    unsigned cp_size, src_size;
};

struct Launch;
struct Worker;

// One CUDA thread. `pub` first: fape_emu_self points at it.
struct Thread {
    fape_emu_thread pub;
    Worker* worker;
    void* sp = nullptr;
    FiberStack stack;
    enum State : uint8_t { Ready, AtBarrier, AtCollective, Done } state = Ready;
    const void* barrier_site = nullptr;  // the __syncthreads call it waits at
    unsigned coll_mask = 0;
    fape_emu_collective_fn coll_fn = nullptr;
    const void* coll_in = nullptr;
    void* coll_out = nullptr;
    std::vector<CpAsyncCopy> cp_pending;
    std::vector<size_t> cp_groups;  // end index in cp_pending of each committed group
    void* fake_stack = nullptr;
};

// racecheck's record of the last accesses to one byte of the shared window.
struct Shadow {
    uint32_t w_epoch, w_wepoch, r_epoch, r_wepoch;
    uint16_t w_tid, r_tid;
    uint8_t r_many, r_warps_mixed;
};

struct Worker {
    std::vector<std::unique_ptr<Thread>> threads;
    size_t stack_bytes;
    void* sched_sp = nullptr;
    const void* sched_stack_bottom = nullptr;
    size_t sched_stack_size = 0;
    fape_emu_block block{};
    char* window = nullptr;
    size_t window_capacity = 0;
    // Static __shared__ offsets of the current launch, by declaration token.
    uint64_t static_launch = 0;  // serial of the launch the table belongs to
    std::vector<std::pair<const void*, unsigned>> static_table;
    unsigned static_used = 0;
    // The block being run.
    Launch* launch = nullptr;
    unsigned nthreads = 0, arrived = 0, done = 0;
    bool aborted = false;
    // racecheck
    uint32_t clock = 0, epoch = 0;
    std::vector<uint32_t> warp_epoch;
    std::vector<Shadow> shadow;
    // initcheck: the allocation of the last device access
    AllocationView cached{0, 0, nullptr};
    uint64_t cached_generation = ~uint64_t(0);

    Worker()
    {
        const char* kb = std::getenv("FAPE_CUDA_EMU_STACK_KB");
        const size_t dflt = sanitizer() == Sanitizer::Memcheck ? 1024 : 256;
        stack_bytes = (kb != nullptr && std::atoi(kb) > 0 ? static_cast<size_t>(std::atoi(kb)) : dflt) * 1024;
    }
    Worker(const Worker&) = delete;
    Worker& operator=(const Worker&) = delete;
    ~Worker()
    {
        for (const auto& t : threads) unmap_stack(t->stack);
        if (window != nullptr && __asan_unpoison_memory_region) __asan_unpoison_memory_region(window, window_capacity);
        std::free(window);
    }
};

// One per OS thread that runs blocks, released when the thread ends.
thread_local std::unique_ptr<Worker> tl_worker;

Worker& this_worker()
{
    if (!tl_worker) tl_worker = std::make_unique<Worker>();
    return *tl_worker;
}

std::atomic<uint64_t> g_launch_serial{0};

struct Launch {
    const uint64_t serial = g_launch_serial.fetch_add(1) + 1;
    unsigned joined = 0;  // pool threads running its blocks (under the pool's lock)
    const LaunchRequest* req;
    const char* name;
    uint64_t blocks;
    unsigned nthreads;
    bool shared_optin;  // the kernel raised its dynamic shared-memory limit above 48 KiB
    std::atomic<uint64_t> next{0};
    std::atomic<bool> failed{false};
    std::atomic<unsigned> errors{0};
    std::atomic<bool> illegal_address{false};
    std::mutex lock;
    std::string first_error;
    std::vector<uintptr_t> initcheck_reported;  // allocations already reported (under lock)
    unsigned hazards_printed = 0;                // under lock

    void error(const char* tool, const std::string& message, bool fatal)
    {
        std::string where = std::string("kernel ") + name;
        if (fape_emu_self != nullptr) {
            const fape_emu_thread& t = *fape_emu_self;
            char buf[128];
            std::snprintf(buf, sizeof buf, " block (%u,%u,%u) thread (%u,%u,%u)", t.block->block_idx.x, t.block->block_idx.y,
                          t.block->block_idx.z, t.thread_idx.x, t.thread_idx.y, t.thread_idx.z);
            where += buf;
        }
        const std::string text = where + ": " + message;
        report(tool, text);
        errors.fetch_add(1);
        if (fatal) failed.store(true);
        std::lock_guard<std::mutex> g(lock);
        if (first_error.empty()) first_error = std::string(tool) + ": " + text;
    }
};

// --- fibers ---------------------------------------------------------------------------------

void switch_to_fiber(Worker& w, Thread& t)
{
    fape_emu_self = &t.pub;
    void* sched_fake_stack = nullptr;
    if (__sanitizer_start_switch_fiber) __sanitizer_start_switch_fiber(&sched_fake_stack, t.stack.base, t.stack.bytes);
    fape_emu_fiber_switch(&w.sched_sp, t.sp);
    if (__sanitizer_finish_switch_fiber) __sanitizer_finish_switch_fiber(sched_fake_stack, nullptr, nullptr);
}

// From a fiber back to its worker's scheduler; `final` when the fiber never resumes.
void yield_to_scheduler(Thread& t, bool final)
{
    Worker& w = *t.worker;
    if (__sanitizer_start_switch_fiber)
        __sanitizer_start_switch_fiber(final ? nullptr : &t.fake_stack, w.sched_stack_bottom, w.sched_stack_size);
    fape_emu_fiber_switch(&t.sp, w.sched_sp);
    if (__sanitizer_finish_switch_fiber)
        __sanitizer_finish_switch_fiber(t.fake_stack, &w.sched_stack_bottom, &w.sched_stack_size);
}

Thread& self_thread() { return *reinterpret_cast<Thread*>(fape_emu_self); }

// --- racecheck ------------------------------------------------------------------------------

void hazard(Worker& w, const char* kind, unsigned offset, unsigned tid, unsigned other, bool store)
{
    Launch& l = *w.launch;
    {
        std::lock_guard<std::mutex> g(l.lock);
        if (l.hazards_printed >= 8) {
            l.errors.fetch_add(1);
            return;
        }
        ++l.hazards_printed;
    }
    const bool dynamic = offset >= w.block.dynamic_offset;
    char msg[256];
    std::snprintf(msg, sizeof msg,
                  "%s hazard: thread %u (warp %u) %s %s shared byte %u, %s by thread %u (warp %u) with no "
                  "__syncthreads or warp synchronisation between",
                  kind, tid, tid / WARP, store ? "writes" : "reads", dynamic ? "dynamic" : "static",
                  dynamic ? offset - w.block.dynamic_offset : offset,
                  kind[0] == 'W' && kind[2] == 'R' ? "read" : "written", other, other / WARP);
    l.error("racecheck", msg, false);
}

void race_access(Worker& w, unsigned offset, size_t bytes, bool store)
{
    const unsigned tid = fape_emu_self->linear;
    const unsigned warp = tid / WARP;
    const uint32_t e = w.epoch, we = w.warp_epoch[warp];
    auto ordered = [&](unsigned other, uint32_t oe, uint32_t owe) {
        return other == tid || oe != e || (other / WARP == warp && owe != we);
    };
    for (size_t k = 0; k < bytes; ++k) {
        Shadow& s = w.shadow[offset + k];
        if (!store) {
            if (s.w_epoch != 0 && !ordered(s.w_tid, s.w_epoch, s.w_wepoch)) {
                hazard(w, "RAW", offset + static_cast<unsigned>(k), tid, s.w_tid, false);
                return;
            }
            if (s.r_epoch == e && s.r_tid != tid) {
                s.r_many = 1;
                if (s.r_tid / WARP != warp) s.r_warps_mixed = 1;
            } else if (s.r_epoch != e) {
                s.r_many = 0, s.r_warps_mixed = 0;
            }
            s.r_tid = static_cast<uint16_t>(tid), s.r_epoch = e, s.r_wepoch = we;
        } else {
            if (s.w_epoch != 0 && !ordered(s.w_tid, s.w_epoch, s.w_wepoch)) {
                hazard(w, "WAW", offset + static_cast<unsigned>(k), tid, s.w_tid, true);
                return;
            }
            if (s.r_epoch == e) {
                const bool others = s.r_many ? (s.r_warps_mixed || s.r_tid / WARP != warp || s.r_wepoch == we)
                                             : !ordered(s.r_tid, s.r_epoch, s.r_wepoch);
                if (others) {
                    hazard(w, "WAR", offset + static_cast<unsigned>(k), tid, s.r_tid, true);
                    return;
                }
            }
            s.w_tid = static_cast<uint16_t>(tid), s.w_epoch = e, s.w_wepoch = we;
        }
    }
}

// --- initcheck ------------------------------------------------------------------------------

void init_access(Worker& w, const void* p, size_t bytes, bool store)
{
    const auto a = reinterpret_cast<uintptr_t>(p);
    if (w.cached_generation != free_generation() || a < w.cached.base || a + bytes > w.cached.base + w.cached.bytes) {
        w.cached_generation = free_generation();
        if (!find_allocation(p, &w.cached) || a + bytes > w.cached.base + w.cached.bytes) {
            w.cached = AllocationView{0, 0, nullptr};
            return;  // the stack, the module's statics, host memory
        }
    }
    uint8_t* bits = w.cached.written;
    if (bits == nullptr) return;
    const size_t off = a - w.cached.base;
    for (size_t i = off; i < off + bytes; ++i) {
        const uint8_t bit = uint8_t(1u << (i & 7));
        if (store) {
            __atomic_fetch_or(&bits[i >> 3], bit, __ATOMIC_RELAXED);
        } else if (!(__atomic_load_n(&bits[i >> 3], __ATOMIC_RELAXED) & bit)) {
            Launch& l = *w.launch;
            {
                std::lock_guard<std::mutex> g(l.lock);
                if (std::find(l.initcheck_reported.begin(), l.initcheck_reported.end(), w.cached.base) !=
                    l.initcheck_reported.end()) {
                    l.errors.fetch_add(1);
                    return;
                }
                l.initcheck_reported.push_back(w.cached.base);
            }
            l.error("initcheck",
                    "reads " + std::to_string(bytes) + " byte(s) at " + describe_address(p) +
                        " that were never written (first such read of this allocation)",
                    false);
            return;
        }
    }
}

void access_hook(const void* p, size_t bytes, bool store)
{
    if (fape_emu_self == nullptr) return;
    Worker& w = *self_thread().worker;
    const char* c = static_cast<const char*>(p);
    if (c >= w.block.shared_window && c < w.block.shared_window + w.block.window_bytes) {
        if (sanitizer() == Sanitizer::Racecheck) {
            const auto offset = static_cast<unsigned>(c - w.block.shared_window);
            race_access(w, offset, std::min<size_t>(bytes, w.block.window_bytes - offset), store);
        }
        return;
    }
    if (sanitizer() == Sanitizer::Initcheck) init_access(w, p, bytes, store);
}

// --- blocks ---------------------------------------------------------------------------------

// Ends the block of `t` after an error was reported: its fibers are never resumed.
[[noreturn]] void end_block(Thread& t)
{
    t.worker->aborted = true;
    yield_to_scheduler(t, true);
    std::abort();
}

void run_cp_async(Thread& t, size_t count)
{
    Launch& l = *t.worker->launch;
    for (size_t i = 0; i < count; ++i) {
        const CpAsyncCopy& c = t.cp_pending[i];
        if (c.src_size > 0) {
            if (__asan_region_is_poisoned != nullptr &&
                __asan_region_is_poisoned(const_cast<char*>(c.src), c.src_size) != nullptr) {
                l.illegal_address.store(true);
                l.error("memcheck", "cp.async reads " + std::to_string(c.src_size) + " bytes at " + describe_address(c.src), true);
                end_block(t);
            }
            if (reinterpret_cast<uintptr_t>(c.src) % c.cp_size != 0)
                fape_emu_trap("cp.async: the global source address is not aligned to cp-size");
            if (sanitizer() == Sanitizer::Initcheck) init_access(*t.worker, c.src, c.src_size, false);
            std::memcpy(c.dst, c.src, c.src_size);
        }
        std::memset(c.dst + c.src_size, 0, c.cp_size - c.src_size);
    }
    t.cp_pending.erase(t.cp_pending.begin(), t.cp_pending.begin() + static_cast<long>(count));
}

// Runs a group of threads' release from a barrier: synccheck, then every waiting thread may go.
void release_barrier(Worker& w)
{
    if (w.done > 0) {
        for (unsigned warp = 0; warp * WARP < w.nthreads; ++warp) {
            unsigned exited = 0, waiting = 0;
            for (unsigned i = warp * WARP; i < std::min(w.nthreads, (warp + 1) * WARP); ++i) {
                exited += w.threads[i]->state == Thread::Done;
                waiting += w.threads[i]->state == Thread::AtBarrier;
            }
            if (exited > 0 && waiting > 0) {
                char msg[160];
                std::snprintf(msg, sizeof msg,
                              "synccheck: __syncthreads reached by %u lane(s) of warp %u whose %u other lane(s) "
                              "exited (divergent barrier)",
                              waiting, warp, exited);
                fape_emu_trap(msg);
            }
        }
    }
    const Thread* first = nullptr;
    for (unsigned i = 0; i < w.nthreads; ++i) {
        const Thread& t = *w.threads[i];
        if (t.state != Thread::AtBarrier) continue;
        if (first == nullptr) first = &t;
        if (t.barrier_site != first->barrier_site) {
            char msg[200];
            std::snprintf(msg, sizeof msg,
                          "synccheck: threads %u and %u wait at different __syncthreads calls (code at %p and %p): "
                          "a barrier in code the block does not take uniformly",
                          first->pub.linear, t.pub.linear, first->barrier_site, t.barrier_site);
            fape_emu_trap(msg);
        }
    }
    for (unsigned i = 0; i < w.nthreads; ++i)
        if (w.threads[i]->state == Thread::AtBarrier) w.threads[i]->state = Thread::Ready;
    w.arrived = 0;
    w.epoch = ++w.clock;
}

void fiber_main(void* arg)
{
    Thread& t = *static_cast<Thread*>(arg);
    Worker& w = *t.worker;
    if (__sanitizer_finish_switch_fiber)
        __sanitizer_finish_switch_fiber(nullptr, &w.sched_stack_bottom, &w.sched_stack_size);
    w.launch->req->function->kernel->thunk(w.launch->req->params);
    run_cp_async(t, t.cp_pending.size());
    t.state = Thread::Done;
    ++w.done;
    if (w.arrived > 0 && w.arrived + w.done == w.nthreads) release_barrier(w);
    yield_to_scheduler(t, true);
    std::abort();  // a finished fiber is never resumed
}

std::string describe_states(const Worker& w)
{
    static const char* names[] = {"runnable", "at __syncthreads", "at a warp collective", "exited"};
    std::string r;
    unsigned begin = 0;
    for (unsigned i = 1; i <= w.nthreads; ++i) {
        if (i < w.nthreads && w.threads[i]->state == w.threads[begin]->state) continue;
        if (!r.empty()) r += "; ";
        r += "threads " + std::to_string(begin) + (i - 1 > begin ? "-" + std::to_string(i - 1) : "") + " " +
             names[w.threads[begin]->state];
        begin = i;
    }
    return r;
}

void ensure_window(Worker& w, size_t bytes)
{
    if (w.window_capacity >= bytes && sanitizer() != Sanitizer::Memcheck) return;
    // memcheck: a window of exactly this launch's size, so ASan's redzone follows the
    // dynamic shared memory.
    if (w.window != nullptr) {
        if (__asan_unpoison_memory_region) __asan_unpoison_memory_region(w.window, w.window_capacity);
        std::free(w.window);
    }
    w.window = static_cast<char*>(std::aligned_alloc(128, (bytes + 127) / 128 * 128));
    w.window_capacity = (bytes + 127) / 128 * 128;
    if (sanitizer() == Sanitizer::Memcheck) {
        // aligned_alloc rounds up; poison the tail so the redzone starts at the window's end.
        if (__asan_poison_memory_region) __asan_poison_memory_region(w.window + bytes, w.window_capacity - bytes);
        w.window_capacity = bytes;
    }
    if (sanitizer() == Sanitizer::Racecheck) w.shadow.assign(w.window_capacity, Shadow{});
}

void run_block(Worker& w, Launch& l, uint64_t index)
{
    const LaunchRequest& r = *l.req;
    w.launch = &l;
    w.block.grid_dim = r.grid;
    w.block.block_dim = r.block;
    w.block.block_idx = fape_emu_dim3{static_cast<unsigned>(index % r.grid.x),
                                      static_cast<unsigned>((index / r.grid.x) % r.grid.y),
                                      static_cast<unsigned>(index / (uint64_t(r.grid.x) * r.grid.y))};
    const size_t window = FAPE_EMU_STATIC_SHARED + r.dynamic_shared;
    if (w.static_launch != l.serial) {
        ensure_window(w, window);
        w.static_launch = l.serial;
        w.static_table.clear();
        w.static_used = 0;
    }
    w.block.shared_window = w.window;
    w.block.dynamic_offset = FAPE_EMU_STATIC_SHARED;
    w.block.window_bytes = static_cast<unsigned>(window);
    // Shared memory starts as garbage on a GPU: here it is NaN-like 0xFF bytes.
    if (__asan_unpoison_memory_region) __asan_unpoison_memory_region(w.window, window);
    std::memset(w.window, 0xFF, window);
    if (__asan_poison_memory_region)
        __asan_poison_memory_region(w.window + w.static_used, FAPE_EMU_STATIC_SHARED - w.static_used);

    w.nthreads = l.nthreads;
    w.arrived = w.done = 0;
    w.aborted = false;
    w.epoch = ++w.clock;
    w.warp_epoch.assign((l.nthreads + WARP - 1) / WARP, ++w.clock);
    while (w.threads.size() < l.nthreads) {
        auto t = std::make_unique<Thread>();
        t->worker = &w;
        t->stack = map_stack(w.stack_bytes);
        w.threads.push_back(std::move(t));
    }
    for (unsigned i = 0; i < l.nthreads; ++i) {
        Thread& t = *w.threads[i];
        t.pub.thread_idx = fape_emu_dim3{i % r.block.x, (i / r.block.x) % r.block.y, i / (r.block.x * r.block.y)};
        t.pub.block = &w.block;
        t.pub.linear = i;
        t.pub.lane = i % WARP;
        t.state = Thread::Ready;
        t.cp_pending.clear();
        t.cp_groups.clear();
        t.fake_stack = nullptr;
        if (__asan_unpoison_memory_region) __asan_unpoison_memory_region(t.stack.base, t.stack.bytes);
        t.sp = fiber_context(t.stack, &fiber_main, &t);
    }
    while (w.done < l.nthreads && !w.aborted) {
        bool ran = false;
        for (unsigned i = 0; i < l.nthreads && !w.aborted; ++i) {
            Thread& t = *w.threads[i];
            if (t.state != Thread::Ready) continue;
            ran = true;
            switch_to_fiber(w, t);
        }
        if (!ran && !w.aborted) {
            fape_emu_self = nullptr;
            l.error("synccheck", "deadlock: no thread of block (" + std::to_string(w.block.block_idx.x) + "," +
                                     std::to_string(w.block.block_idx.y) + "," + std::to_string(w.block.block_idx.z) +
                                     ") can go on: " + describe_states(w),
                    true);
            w.aborted = true;
        }
    }
    fape_emu_self = nullptr;
}

void run_blocks(Launch& l)
{
    Worker& w = this_worker();
    for (;;) {
        if (l.failed.load()) break;
        const uint64_t b = l.next.fetch_add(1);
        if (b >= l.blocks) break;
        run_block(w, l, b);
    }
    w.launch = nullptr;
}

// --- the pool of OS threads -------------------------------------------------------------------

class Pool {
public:
    Pool()
    {
        const char* v = std::getenv("FAPE_CUDA_EMU_THREADS");
        unsigned n = v != nullptr && std::atoi(v) > 0 ? static_cast<unsigned>(std::atoi(v)) : std::thread::hardware_concurrency();
        if (n == 0) n = 1;
        for (unsigned i = 1; i < n; ++i) std::thread([this] { serve(); }).detach();
    }

    // Runs every block of `l` on this thread and on the pool's idle threads.
    void run(Launch& l)
    {
        {
            std::lock_guard<std::mutex> g(lock_);
            queue_.push_back(&l);
        }
        wake_.notify_all();
        run_blocks(l);
        std::unique_lock<std::mutex> g(lock_);
        queue_.erase(std::find(queue_.begin(), queue_.end(), &l));
        idle_.wait(g, [&] { return l.joined == 0; });
    }

private:
    std::mutex lock_;
    std::condition_variable wake_, idle_;
    std::deque<Launch*> queue_;

    Launch* pending() const
    {
        for (Launch* l : queue_)
            if (l->next.load() < l->blocks && !l->failed.load()) return l;
        return nullptr;
    }

    void serve()
    {
        std::unique_lock<std::mutex> g(lock_);
        for (;;) {
            // The launch the wait saw is the one joined: blocks are claimed without the lock,
            // so a second pending() could find every block taken and return null.
            Launch* l = nullptr;
            wake_.wait(g, [&] { return (l = pending()) != nullptr; });
            ++l->joined;
            g.unlock();
            run_blocks(*l);
            g.lock();
            --l->joined;
            idle_.notify_all();
        }
    }
};

Pool& pool()
{
    static Pool* p = new Pool();  // its threads live as long as the process
    return *p;
}

}  // namespace

LaunchResult launch(const LaunchRequest& r, std::string* error)
{
    const fape_emu_kernel& k = *r.function->kernel;
    const uint64_t threads = uint64_t(r.block.x) * r.block.y * r.block.z;
    const uint64_t blocks = uint64_t(r.grid.x) * r.grid.y * r.grid.z;
    auto invalid = [&](const std::string& why) {
        *error = std::string("kernel ") + k.name + ": " + why;
        report("launch", *error);
        return LaunchResult::InvalidValue;
    };
    if (blocks == 0 || threads == 0) return invalid("an empty grid or block");
    if (r.block.x > 1024 || r.block.y > 1024 || r.block.z > 64 || threads > 1024)
        return invalid("block (" + std::to_string(r.block.x) + "," + std::to_string(r.block.y) + "," +
                       std::to_string(r.block.z) + ") exceeds 1024 threads or the per-dimension limits");
    if (r.grid.y > 65535 || r.grid.z > 65535 || r.grid.x > 2147483647u)
        return invalid("grid exceeds 2^31-1 x 65535 x 65535 blocks");
    if (k.max_threads != 0 && threads > k.max_threads) {
        *error = std::string("kernel ") + k.name + ": " + std::to_string(threads) + " threads per block, but __launch_bounds__ allows " +
                 std::to_string(k.max_threads);
        report("launch", *error);
        return LaunchResult::OutOfResources;
    }
    if (r.dynamic_shared > r.function->max_dynamic_shared)
        return invalid(std::to_string(r.dynamic_shared) + " bytes of dynamic shared memory, more than the kernel's limit of " +
                       std::to_string(r.function->max_dynamic_shared) +
                       " (raise it with cuFuncSetAttribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES))");
    if (k.param_count > 0 && r.params == nullptr) return invalid("kernel parameters missing (kernelParams is null)");

    Launch l;
    l.req = &r;
    l.name = k.name;
    l.blocks = blocks;
    l.nthreads = static_cast<unsigned>(threads);
    l.shared_optin = r.function->max_dynamic_shared > 48 * 1024;
    pool().run(l);
    if (l.errors.load() == 0 && !l.failed.load()) return LaunchResult::Ok;
    *error = l.first_error;
    if (l.errors.load() > 1) *error += " (and " + std::to_string(l.errors.load() - 1) + " more reports)";
    return l.illegal_address.load() ? LaunchResult::IllegalAddress : LaunchResult::LaunchFailed;
}

}  // namespace emu

// ---------------------------------------------------------------------------------------------
// The runtime functions modules call (fape_cuda_emu_abi.h)
// ---------------------------------------------------------------------------------------------
using emu::Thread;

FAPE_EMU_EXPORT void fape_emu_trap(const char* message)
{
    Thread& t = emu::self_thread();
    emu::Worker& w = *t.worker;
    const bool tagged = std::strncmp(message, "synccheck: ", 11) == 0;
    w.launch->error(tagged ? "synccheck" : "trap", tagged ? message + 11 : message, true);
    emu::end_block(t);
}

FAPE_EMU_EXPORT void fape_emu_syncthreads(void)
{
    Thread& t = emu::self_thread();
    emu::Worker& w = *t.worker;
    t.state = Thread::AtBarrier;
    t.barrier_site = __builtin_return_address(0);
    ++w.arrived;
    if (w.arrived + w.done == w.nthreads) {
        emu::release_barrier(w);
        return;
    }
    emu::yield_to_scheduler(t, false);
}

FAPE_EMU_EXPORT void fape_emu_warp_collective(unsigned mask, fape_emu_collective_fn fn, const void* in, void* out)
{
    Thread& t = emu::self_thread();
    emu::Worker& w = *t.worker;
    const unsigned lane = t.pub.lane, base = t.pub.linear - lane;
    if (!(mask & (1u << lane))) fape_emu_trap("synccheck: a warp-synchronous operation called by a lane outside its mask");
    const unsigned lanes = std::min(emu::WARP, w.nthreads - base);
    if (lanes < 32 && (mask >> lanes) != 0)
        fape_emu_trap("synccheck: a warp-synchronous operation's mask names lanes the block does not have");
    t.coll_mask = mask, t.coll_fn = fn, t.coll_in = in, t.coll_out = out;
    t.state = Thread::AtCollective;
    const void* ins[32] = {};
    void* outs[32] = {};
    for (unsigned l = 0; l < 32; ++l) {
        if (!(mask & (1u << l))) continue;
        Thread& u = *w.threads[base + l];
        if (u.state == Thread::Done) fape_emu_trap("synccheck: a warp-synchronous operation waits for a lane that exited");
        if (u.state != Thread::AtCollective) {
            emu::yield_to_scheduler(t, false);
            return;
        }
        if (u.coll_mask != mask || u.coll_fn != fn)
            fape_emu_trap("synccheck: lanes of one warp wait at different warp-synchronous operations or masks");
        ins[l] = u.coll_in;
        outs[l] = u.coll_out;
    }
    fn(ins, outs, mask);
    for (unsigned l = 0; l < 32; ++l)
        if (mask & (1u << l)) w.threads[base + l]->state = Thread::Ready;
    w.warp_epoch[base / emu::WARP] = ++w.clock;
}

FAPE_EMU_EXPORT void* fape_emu_static_shared(const void* token, size_t bytes, size_t align)
{
    emu::Worker& w = *emu::self_thread().worker;
    for (const auto& e : w.static_table)
        if (e.first == token) return w.window + e.second;
    const size_t offset = (w.static_used + align - 1) / align * align;
    if (offset + bytes > FAPE_EMU_STATIC_SHARED) fape_emu_trap("static __shared__ variables exceed 48 KiB");
    const emu::Launch& l = *w.launch;
    const size_t total = offset + bytes + l.req->dynamic_shared;
    const size_t limit = l.shared_optin ? emu::device().shared_optin : 48 * 1024;
    if (total > limit) {
        char msg[200];
        std::snprintf(msg, sizeof msg, "static (%zu) plus dynamic (%u) shared memory exceed the block's limit of %zu bytes",
                      offset + bytes, l.req->dynamic_shared, limit);
        fape_emu_trap(msg);
    }
    w.static_table.emplace_back(token, static_cast<unsigned>(offset));
    w.static_used = static_cast<unsigned>(offset + bytes);
    if (__asan_unpoison_memory_region) __asan_unpoison_memory_region(w.window + offset, bytes);
    return w.window + offset;
}

FAPE_EMU_EXPORT void fape_emu_cp_async(void* dst_shared, const void* src, unsigned cp_size, unsigned src_size)
{
    Thread& t = emu::self_thread();
    if (reinterpret_cast<uintptr_t>(dst_shared) % cp_size != 0)
        fape_emu_trap("cp.async: the shared destination is not aligned to cp-size");
    // racecheck sees the shared write at issue: from then on it may land at any time.
    if (emu::sanitizer() == emu::Sanitizer::Racecheck) emu::access_hook(dst_shared, cp_size, true);
    t.cp_pending.push_back(emu::CpAsyncCopy{static_cast<char*>(dst_shared), static_cast<const char*>(src), cp_size, src_size});
}

FAPE_EMU_EXPORT void fape_emu_cp_async_commit(void)
{
    Thread& t = emu::self_thread();
    t.cp_groups.push_back(t.cp_pending.size());
}

FAPE_EMU_EXPORT void fape_emu_cp_async_wait(unsigned pending_groups)
{
    Thread& t = emu::self_thread();
    if (t.cp_groups.size() <= pending_groups) return;
    const size_t retire = t.cp_groups.size() - pending_groups;
    const size_t upto = t.cp_groups[retire - 1];
    emu::run_cp_async(t, upto);
    t.cp_groups.erase(t.cp_groups.begin(), t.cp_groups.begin() + static_cast<long>(retire));
    for (size_t& g : t.cp_groups) g -= upto;
}

// The access callbacks of modules compiled for racecheck and initcheck
// (-fsanitize=kernel-address --param asan-instrumentation-with-call-threshold=0).
#define FAPE_EMU_HOOKS(N)                                                                            \
    FAPE_EMU_EXPORT void __asan_load##N##_noabort(void* p) { emu::access_hook(p, N, false); }      \
    FAPE_EMU_EXPORT void __asan_store##N##_noabort(void* p) { emu::access_hook(p, N, true); }
FAPE_EMU_HOOKS(1)
FAPE_EMU_HOOKS(2)
FAPE_EMU_HOOKS(4)
FAPE_EMU_HOOKS(8)
FAPE_EMU_HOOKS(16)
#undef FAPE_EMU_HOOKS
FAPE_EMU_EXPORT void __asan_loadN_noabort(void* p, size_t n) { emu::access_hook(p, n, false); }
FAPE_EMU_EXPORT void __asan_storeN_noabort(void* p, size_t n) { emu::access_hook(p, n, true); }
FAPE_EMU_EXPORT void __asan_handle_no_return(void) {}
