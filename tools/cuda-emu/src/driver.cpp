// The CUDA driver API subset cudarc calls for this crate (libcuda.so.1), on the emulated
// device: one device with a primary context; device memory is host memory (memory.cpp); every
// stream operation runs at once, in order, on the calling thread (so streams and events are
// trivially ordered, and events time the emulator's real work). A kernel that fails while it
// runs (a trap, a deadlock, a sanitizer report) leaves its error on its stream, returned by the
// stream's next synchronising call as CUDA returns asynchronous errors; configuration errors are
// returned by cuLaunchKernel itself. A capturing stream (cuStreamBeginCapture) records its
// operations, kernel arguments copied, into a graph that cuGraphLaunch replays on a stream;
// allocating or synchronising on a capturing stream is refused, as CUDA refuses a sync.
#include <sys/sysinfo.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <functional>
#include <set>
#include <vector>
#include <string>

#include "emu.h"
#include "exec.h"

namespace {

enum CUresult : int {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NOT_INITIALIZED = 3,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_IMAGE = 200,
    CUDA_ERROR_INVALID_CONTEXT = 201,
    CUDA_ERROR_INVALID_PTX = 218,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_ILLEGAL_STATE = 401,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_NOT_READY = 600,
    CUDA_ERROR_ILLEGAL_ADDRESS = 700,
    CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES = 701,
    CUDA_ERROR_LAUNCH_FAILED = 719,
    CUDA_ERROR_NOT_SUPPORTED = 801,
    CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED = 900,
    CUDA_ERROR_STREAM_CAPTURE_INVALIDATED = 901,
    CUDA_ERROR_UNKNOWN = 999,
};

struct Context {
    int device = 0;
};
Context g_primary;
thread_local Context* tl_current = nullptr;

struct Stream;
// One operation of a stream, run on the stream given (the one it was submitted to, or the one a
// graph is launched on).
using Op = std::function<CUresult(Stream*)>;

struct Graph {
    std::vector<Op> ops;
};

struct Stream {
    CUresult error = CUDA_SUCCESS;  // of a kernel that failed while running, not yet returned
    Graph* capture = nullptr;       // the graph being captured, if any
};
// The legacy (null) and per-thread default streams, CU_STREAM_LEGACY (0x1), CU_STREAM_PER_THREAD (0x2).
Stream g_default_stream;

struct Event {
    std::chrono::steady_clock::time_point at{};
    bool recorded = false;
    bool timing = true;
};

std::mutex g_lock;
std::set<Stream*> g_streams;
std::set<Event*> g_events;
std::map<const void*, emu::Function*> g_functions;  // by handle, for validation
std::set<emu::Module*> g_modules;

std::set<Graph*> g_graphs, g_graph_execs;

bool g_initialised = false;

Stream* stream_of(void* handle)
{
    if (handle == nullptr || handle == reinterpret_cast<void*>(1) || handle == reinterpret_cast<void*>(2))
        return &g_default_stream;
    std::lock_guard<std::mutex> g(g_lock);
    return g_streams.count(static_cast<Stream*>(handle)) ? static_cast<Stream*>(handle) : nullptr;
}

// The error a stream's earlier kernel left, cleared as it is returned.
CUresult take_error(Stream* s)
{
    const CUresult e = s->error;
    s->error = CUDA_SUCCESS;
    return e;
}

// Runs `op` on `s` now (after returning the error an earlier kernel left there, if any), or
// records it when `s` is capturing.
CUresult submit(Stream* s, Op op)
{
    if (s->capture != nullptr) {
        s->capture->ops.push_back(std::move(op));
        return CUDA_SUCCESS;
    }
    if (const CUresult e = take_error(s)) return e;
    return op(s);
}

}  // namespace

bool emu::capturing(void* stream)
{
    const Stream* s = stream_of(stream);
    return s != nullptr && s->capture != nullptr;
}

bool emu::capture(void* stream, std::function<bool()> work)
{
    Stream* s = stream_of(stream);
    if (s == nullptr || s->capture == nullptr) return false;
    s->capture->ops.push_back([work = std::move(work)](Stream*) { return work() ? CUDA_SUCCESS : CUDA_ERROR_LAUNCH_FAILED; });
    return true;
}

namespace {

CUresult bad_range(const char* fn, const void* p, size_t bytes)
{
    emu::report("memcheck", std::string(fn) + ": " + std::to_string(bytes) + " bytes at " + emu::describe_address(p) +
                                " are not inside one device allocation");
    return CUDA_ERROR_INVALID_VALUE;
}

int attribute(int a)
{
    const emu::DeviceInfo& d = emu::device();
    switch (a) {
    case 1: return 1024;                   // MAX_THREADS_PER_BLOCK
    case 2: case 3: return 1024;           // MAX_BLOCK_DIM_X, Y
    case 4: return 64;                     // MAX_BLOCK_DIM_Z
    case 5: return 2147483647;             // MAX_GRID_DIM_X
    case 6: case 7: return 65535;          // MAX_GRID_DIM_Y, Z
    case 8: return 48 * 1024;              // MAX_SHARED_MEMORY_PER_BLOCK
    case 9: return 64 * 1024;              // TOTAL_CONSTANT_MEMORY
    case 10: return 32;                    // WARP_SIZE
    case 12: return 65536;                 // MAX_REGISTERS_PER_BLOCK
    case 13: return 1755000;               // CLOCK_RATE (kHz)
    case 16: return d.sm_count;            // MULTIPROCESSOR_COUNT
    case 31: return 1;                     // CONCURRENT_KERNELS
    case 36: return 2619000;               // MEMORY_CLOCK_RATE
    case 37: return 5120;                  // GLOBAL_MEMORY_BUS_WIDTH
    case 38: return d.l2_bytes;            // L2_CACHE_SIZE
    case 39: return 2048;                  // MAX_THREADS_PER_MULTIPROCESSOR
    case 40: return 2;                     // ASYNC_ENGINE_COUNT
    case 41: return 1;                     // UNIFIED_ADDRESSING
    case 75: return d.major;               // COMPUTE_CAPABILITY_MAJOR
    case 76: return d.minor;               // COMPUTE_CAPABILITY_MINOR
    case 78: return 1;                     // STREAM_PRIORITIES_SUPPORTED
    case 81: return static_cast<int>(d.shared_per_sm);  // MAX_SHARED_MEMORY_PER_MULTIPROCESSOR
    case 82: return 65536;                 // MAX_REGISTERS_PER_MULTIPROCESSOR
    case 95: return 1;                     // COOPERATIVE_LAUNCH
    case 97: return static_cast<int>(d.shared_optin);   // MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
    case 106: return 32;                   // MAX_BLOCKS_PER_MULTIPROCESSOR
    case 111: return 1024;                 // RESERVED_SHARED_MEMORY_PER_BLOCK
    case 115: return 1;                    // MEMORY_POOLS_SUPPORTED
    default: return 0;
    }
}

size_t total_memory()
{
    struct sysinfo si {};
    sysinfo(&si);
    return static_cast<size_t>(si.totalram) * si.mem_unit;
}

const char* error_name(int e)
{
    switch (e) {
    case CUDA_SUCCESS: return "CUDA_SUCCESS";
    case CUDA_ERROR_INVALID_VALUE: return "CUDA_ERROR_INVALID_VALUE";
    case CUDA_ERROR_OUT_OF_MEMORY: return "CUDA_ERROR_OUT_OF_MEMORY";
    case CUDA_ERROR_NOT_INITIALIZED: return "CUDA_ERROR_NOT_INITIALIZED";
    case CUDA_ERROR_INVALID_DEVICE: return "CUDA_ERROR_INVALID_DEVICE";
    case CUDA_ERROR_INVALID_IMAGE: return "CUDA_ERROR_INVALID_IMAGE";
    case CUDA_ERROR_INVALID_CONTEXT: return "CUDA_ERROR_INVALID_CONTEXT";
    case CUDA_ERROR_INVALID_PTX: return "CUDA_ERROR_INVALID_PTX";
    case CUDA_ERROR_INVALID_HANDLE: return "CUDA_ERROR_INVALID_HANDLE";
    case CUDA_ERROR_ILLEGAL_STATE: return "CUDA_ERROR_ILLEGAL_STATE";
    case CUDA_ERROR_NOT_FOUND: return "CUDA_ERROR_NOT_FOUND";
    case CUDA_ERROR_NOT_READY: return "CUDA_ERROR_NOT_READY";
    case CUDA_ERROR_ILLEGAL_ADDRESS: return "CUDA_ERROR_ILLEGAL_ADDRESS";
    case CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES: return "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES";
    case CUDA_ERROR_LAUNCH_FAILED: return "CUDA_ERROR_LAUNCH_FAILED";
    case CUDA_ERROR_NOT_SUPPORTED: return "CUDA_ERROR_NOT_SUPPORTED";
    case CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED: return "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED";
    case CUDA_ERROR_STREAM_CAPTURE_INVALIDATED: return "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED";
    default: return nullptr;
    }
}

const char* error_string(int e)
{
    switch (e) {
    case CUDA_SUCCESS: return "no error";
    case CUDA_ERROR_INVALID_VALUE: return "invalid argument";
    case CUDA_ERROR_OUT_OF_MEMORY: return "out of memory";
    case CUDA_ERROR_NOT_INITIALIZED: return "initialization error";
    case CUDA_ERROR_INVALID_DEVICE: return "invalid device ordinal";
    case CUDA_ERROR_INVALID_IMAGE: return "device kernel image is invalid";
    case CUDA_ERROR_INVALID_CONTEXT: return "invalid device context";
    case CUDA_ERROR_INVALID_PTX: return "a PTX JIT compilation failed (fape-cuda-emu loads only modules its NVRTC compiled)";
    case CUDA_ERROR_INVALID_HANDLE: return "invalid resource handle";
    case CUDA_ERROR_ILLEGAL_STATE: return "the operation is not valid in the stream's current capture state";
    case CUDA_ERROR_NOT_FOUND: return "named symbol not found";
    case CUDA_ERROR_NOT_READY: return "device not ready";
    case CUDA_ERROR_ILLEGAL_ADDRESS: return "an illegal memory access was encountered (fape-cuda-emu memcheck)";
    case CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES: return "too many resources requested for launch";
    case CUDA_ERROR_LAUNCH_FAILED: return "unspecified launch failure (fape-cuda-emu: see its report on stderr)";
    case CUDA_ERROR_NOT_SUPPORTED: return "operation not supported (by fape-cuda-emu)";
    case CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED: return "operation not permitted when stream is capturing";
    case CUDA_ERROR_STREAM_CAPTURE_INVALIDATED: return "operation failed due to a previous error during capture";
    default: return nullptr;
    }
}

}  // namespace

typedef unsigned long long CUdeviceptr;
#define API FAPE_EMU_EXPORT CUresult

// --- initialisation, device, context ---------------------------------------------------------

API cuInit(unsigned flags)
{
    if (flags != 0) return CUDA_ERROR_INVALID_VALUE;
    g_initialised = true;
    return CUDA_SUCCESS;
}
// The real NVRTC opens libcuda.so.1 (this library, under env.sh) and asks for the driver's
// private tables; there are none here, which it takes as "no driver".
API cuGetExportTable(const void** table, const void*)
{
    if (table != nullptr) *table = nullptr;
    return CUDA_ERROR_NOT_SUPPORTED;
}
API cuDriverGetVersion(int* v)
{
    if (v == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *v = 13000;
    return CUDA_SUCCESS;
}
API cuDeviceGetCount(int* n)
{
    if (!g_initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (n == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *n = 1;
    return CUDA_SUCCESS;
}
API cuDeviceGet(int* dev, int ordinal)
{
    if (!g_initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (dev == nullptr) return CUDA_ERROR_INVALID_VALUE;
    if (ordinal != 0) return CUDA_ERROR_INVALID_DEVICE;
    *dev = 0;
    return CUDA_SUCCESS;
}
API cuDeviceGetName(char* name, int len, int dev)
{
    if (dev != 0) return CUDA_ERROR_INVALID_DEVICE;
    if (name == nullptr || len <= 0) return CUDA_ERROR_INVALID_VALUE;
    std::snprintf(name, static_cast<size_t>(len), "%s", emu::device().name);
    return CUDA_SUCCESS;
}
API cuDeviceGetAttribute(int* v, int attr, int dev)
{
    if (dev != 0) return CUDA_ERROR_INVALID_DEVICE;
    if (v == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *v = attribute(attr);
    return CUDA_SUCCESS;
}
API cuDeviceTotalMem_v2(size_t* bytes, int dev)
{
    if (dev != 0) return CUDA_ERROR_INVALID_DEVICE;
    *bytes = total_memory();
    return CUDA_SUCCESS;
}
API cuDeviceGetUuid_v2(unsigned char* uuid, int dev)
{
    if (dev != 0) return CUDA_ERROR_INVALID_DEVICE;
    std::memcpy(uuid, "fape-cuda-emu-00", 16);
    return CUDA_SUCCESS;
}
API cuDeviceGetUuid(unsigned char* uuid, int dev) { return cuDeviceGetUuid_v2(uuid, dev); }
API cuDevicePrimaryCtxRetain(Context** ctx, int dev)
{
    if (dev != 0) return CUDA_ERROR_INVALID_DEVICE;
    *ctx = &g_primary;
    return CUDA_SUCCESS;
}
API cuDevicePrimaryCtxRelease_v2(int dev) { return dev == 0 ? CUDA_SUCCESS : CUDA_ERROR_INVALID_DEVICE; }
API cuCtxSetCurrent(Context* ctx)
{
    if (ctx != nullptr && ctx != &g_primary) return CUDA_ERROR_INVALID_CONTEXT;
    tl_current = ctx;
    return CUDA_SUCCESS;
}
API cuCtxGetCurrent(Context** ctx)
{
    *ctx = tl_current;
    return CUDA_SUCCESS;
}
API cuCtxPushCurrent_v2(Context* ctx) { return cuCtxSetCurrent(ctx); }
API cuCtxPopCurrent_v2(Context** ctx)
{
    if (ctx) *ctx = tl_current;
    return CUDA_SUCCESS;
}
API cuCtxGetDevice(int* dev)
{
    if (tl_current == nullptr) return CUDA_ERROR_INVALID_CONTEXT;
    *dev = 0;
    return CUDA_SUCCESS;
}
API cuCtxSynchronize()
{
    if (tl_current == nullptr) return CUDA_ERROR_INVALID_CONTEXT;
    std::lock_guard<std::mutex> g(g_lock);
    CUresult e = take_error(&g_default_stream);
    for (Stream* s : g_streams) {
        const CUresult se = take_error(s);
        if (e == CUDA_SUCCESS) e = se;
    }
    return e;
}
API cuCtxGetLimit(size_t* v, int)
{
    *v = 0;
    return CUDA_SUCCESS;
}
API cuCtxSetLimit(int, size_t) { return CUDA_SUCCESS; }
API cuCtxGetStreamPriorityRange(int* least, int* greatest)
{
    if (least) *least = 0;
    if (greatest) *greatest = -5;
    return CUDA_SUCCESS;
}
API cuCtxGetCacheConfig(int* c)
{
    *c = 0;
    return CUDA_SUCCESS;
}
API cuCtxSetCacheConfig(int) { return CUDA_SUCCESS; }
API cuCtxSetFlags(unsigned) { return CUDA_SUCCESS; }
API cuGetErrorName(int e, const char** s)
{
    *s = error_name(e);
    return *s ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}
API cuGetErrorString(int e, const char** s)
{
    *s = error_string(e);
    return *s ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

// --- memory ----------------------------------------------------------------------------------

API cuMemAlloc_v2(CUdeviceptr* p, size_t bytes)
{
    if (p == nullptr || bytes == 0) return CUDA_ERROR_INVALID_VALUE;
    void* m = emu::device_alloc(bytes);
    if (m == nullptr) return CUDA_ERROR_OUT_OF_MEMORY;
    *p = reinterpret_cast<CUdeviceptr>(m);
    return CUDA_SUCCESS;
}
// Allocating or freeing on a capturing stream (graph memory nodes) is not emulated.
API cuMemAllocAsync(CUdeviceptr* p, size_t bytes, void* stream)
{
    Stream* s = stream_of(stream);
    if (s == nullptr) return CUDA_ERROR_INVALID_HANDLE;
    if (s->capture != nullptr) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    return cuMemAlloc_v2(p, bytes);
}
API cuMemFree_v2(CUdeviceptr p)
{
    if (p == 0) return CUDA_SUCCESS;
    return emu::device_free(reinterpret_cast<void*>(p)) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}
API cuMemFreeAsync(CUdeviceptr p, void* stream)
{
    Stream* s = stream_of(stream);
    if (s == nullptr) return CUDA_ERROR_INVALID_HANDLE;
    if (s->capture != nullptr) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    return cuMemFree_v2(p);
}
API cuMemGetInfo_v2(size_t* free_bytes, size_t* total)
{
    struct sysinfo si {};
    sysinfo(&si);
    *free_bytes = static_cast<size_t>(si.freeram) * si.mem_unit;
    *total = total_memory();
    return CUDA_SUCCESS;
}
API cuMemHostAlloc(void** p, size_t bytes, unsigned)
{
    *p = std::malloc(bytes == 0 ? 1 : bytes);
    return *p ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY;
}
API cuMemAllocHost_v2(void** p, size_t bytes) { return cuMemHostAlloc(p, bytes, 0); }
API cuMemFreeHost(void* p)
{
    std::free(p);
    return CUDA_SUCCESS;
}
API cuDeviceGetDefaultMemPool(void** pool, int dev)
{
    if (dev != 0) return CUDA_ERROR_INVALID_DEVICE;
    static int the_pool;
    *pool = &the_pool;
    return CUDA_SUCCESS;
}
API cuMemPoolSetAttribute(void*, int, void*) { return CUDA_SUCCESS; }
API cuMemPoolGetAttribute(void*, int, void* v)
{
    std::memset(v, 0, 8);
    return CUDA_SUCCESS;
}
API cuMemPoolTrimTo(void*, size_t) { return CUDA_SUCCESS; }

API cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t bytes, void* stream)
{
    Stream* s = stream_of(stream);
    if (s == nullptr) return CUDA_ERROR_INVALID_HANDLE;
    return submit(s, [=](Stream*) {
        void* d = reinterpret_cast<void*>(dst);
        if (!emu::device_range(d, bytes)) return bad_range("cuMemcpyHtoD", d, bytes);
        std::memcpy(d, src, bytes);
        emu::mark_written(d, bytes);
        return CUDA_SUCCESS;
    });
}
API cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t bytes) { return cuMemcpyHtoDAsync_v2(dst, src, bytes, nullptr); }
API cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t bytes, void* stream)
{
    Stream* s = stream_of(stream);
    if (s == nullptr) return CUDA_ERROR_INVALID_HANDLE;
    return submit(s, [=](Stream*) {
        const void* p = reinterpret_cast<const void*>(src);
        if (!emu::device_range(p, bytes)) return bad_range("cuMemcpyDtoH", p, bytes);
        std::memcpy(dst, p, bytes);
        return CUDA_SUCCESS;
    });
}
API cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t bytes) { return cuMemcpyDtoHAsync_v2(dst, src, bytes, nullptr); }
API cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes, void* stream)
{
    Stream* s = stream_of(stream);
    if (s == nullptr) return CUDA_ERROR_INVALID_HANDLE;
    return submit(s, [=](Stream*) {
        void* d = reinterpret_cast<void*>(dst);
        const void* p = reinterpret_cast<const void*>(src);
        if (!emu::device_range(d, bytes)) return bad_range("cuMemcpyDtoD (destination)", d, bytes);
        if (!emu::device_range(p, bytes)) return bad_range("cuMemcpyDtoD (source)", p, bytes);
        std::memmove(d, p, bytes);
        emu::copy_written(d, p, bytes);
        return CUDA_SUCCESS;
    });
}
API cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes) { return cuMemcpyDtoDAsync_v2(dst, src, bytes, nullptr); }
API cuMemsetD8Async(CUdeviceptr dst, unsigned char value, size_t n, void* stream)
{
    Stream* s = stream_of(stream);
    if (s == nullptr) return CUDA_ERROR_INVALID_HANDLE;
    return submit(s, [=](Stream*) {
        void* d = reinterpret_cast<void*>(dst);
        if (!emu::device_range(d, n)) return bad_range("cuMemsetD8", d, n);
        std::memset(d, value, n);
        emu::mark_written(d, n);
        return CUDA_SUCCESS;
    });
}
API cuMemsetD8_v2(CUdeviceptr dst, unsigned char value, size_t n) { return cuMemsetD8Async(dst, value, n, nullptr); }
API cuMemsetD32Async(CUdeviceptr dst, unsigned value, size_t n, void* stream)
{
    Stream* s = stream_of(stream);
    if (s == nullptr) return CUDA_ERROR_INVALID_HANDLE;
    if (dst % 4 != 0) return CUDA_ERROR_INVALID_VALUE;
    return submit(s, [=](Stream*) {
        auto* d = reinterpret_cast<unsigned*>(dst);
        if (!emu::device_range(d, n * 4)) return bad_range("cuMemsetD32", d, n * 4);
        for (size_t i = 0; i < n; ++i) d[i] = value;
        emu::mark_written(d, n * 4);
        return CUDA_SUCCESS;
    });
}

// --- streams and events ----------------------------------------------------------------------

API cuStreamCreate(Stream** s, unsigned)
{
    *s = new Stream();
    std::lock_guard<std::mutex> g(g_lock);
    g_streams.insert(*s);
    return CUDA_SUCCESS;
}
API cuStreamCreateWithPriority(Stream** s, unsigned flags, int) { return cuStreamCreate(s, flags); }
API cuStreamDestroy_v2(Stream* s)
{
    std::lock_guard<std::mutex> g(g_lock);
    if (g_streams.erase(s) == 0) return CUDA_ERROR_INVALID_HANDLE;
    delete s;
    return CUDA_SUCCESS;
}
API cuStreamSynchronize(void* stream)
{
    Stream* s = stream_of(stream);
    if (s == nullptr) return CUDA_ERROR_INVALID_HANDLE;
    if (s->capture != nullptr) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    return take_error(s);
}
API cuStreamQuery(void* stream) { return cuStreamSynchronize(stream); }
API cuStreamWaitEvent(void* stream, Event* e, unsigned)
{
    if (stream_of(stream) == nullptr) return CUDA_ERROR_INVALID_HANDLE;
    std::lock_guard<std::mutex> g(g_lock);
    return g_events.count(e) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}
API cuStreamIsCapturing(void* stream, int* status)
{
    Stream* s = stream_of(stream);
    if (s == nullptr) return CUDA_ERROR_INVALID_HANDLE;
    *status = s->capture != nullptr ? 1 : 0;  // CU_STREAM_CAPTURE_STATUS_ACTIVE / _NONE
    return CUDA_SUCCESS;
}
API cuStreamBeginCapture_v2(void* stream, int)
{
    Stream* s = stream_of(stream);
    if (s == nullptr) return CUDA_ERROR_INVALID_HANDLE;
    if (s == &g_default_stream) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;  // the legacy stream
    if (s->capture != nullptr) return CUDA_ERROR_ILLEGAL_STATE;
    s->capture = new Graph();
    return CUDA_SUCCESS;
}
API cuStreamEndCapture(void* stream, Graph** graph)
{
    Stream* s = stream_of(stream);
    if (s == nullptr) return CUDA_ERROR_INVALID_HANDLE;
    if (s->capture == nullptr) return CUDA_ERROR_ILLEGAL_STATE;
    *graph = s->capture;
    s->capture = nullptr;
    std::lock_guard<std::mutex> g(g_lock);
    g_graphs.insert(*graph);
    return CUDA_SUCCESS;
}
API cuGraphInstantiateWithFlags(Graph** exec, Graph* graph, unsigned long long)
{
    std::lock_guard<std::mutex> g(g_lock);
    if (g_graphs.count(graph) == 0) return CUDA_ERROR_INVALID_HANDLE;
    *exec = new Graph(*graph);
    g_graph_execs.insert(*exec);
    return CUDA_SUCCESS;
}
API cuGraphDestroy(Graph* graph)
{
    std::lock_guard<std::mutex> g(g_lock);
    if (g_graphs.erase(graph) == 0) return CUDA_ERROR_INVALID_HANDLE;
    delete graph;
    return CUDA_SUCCESS;
}
API cuGraphExecDestroy(Graph* exec)
{
    std::lock_guard<std::mutex> g(g_lock);
    if (g_graph_execs.erase(exec) == 0) return CUDA_ERROR_INVALID_HANDLE;
    delete exec;
    return CUDA_SUCCESS;
}
API cuGraphUpload(Graph* exec, void* stream)
{
    if (stream_of(stream) == nullptr) return CUDA_ERROR_INVALID_HANDLE;
    std::lock_guard<std::mutex> g(g_lock);
    return g_graph_execs.count(exec) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}
// Replays the graph's operations in order on `stream` (a graph launched into a capture is not
// emulated).
API cuGraphLaunch(Graph* exec, void* stream)
{
    Stream* s = stream_of(stream);
    if (s == nullptr) return CUDA_ERROR_INVALID_HANDLE;
    {
        std::lock_guard<std::mutex> g(g_lock);
        if (g_graph_execs.count(exec) == 0) return CUDA_ERROR_INVALID_HANDLE;
    }
    if (s->capture != nullptr) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    if (const CUresult e = take_error(s)) return e;
    for (const Op& op : exec->ops)
        if (const CUresult e = op(s)) return e;
    return CUDA_SUCCESS;
}
API cuLaunchHostFunc(void* stream, void (*fn)(void*), void* data)
{
    Stream* s = stream_of(stream);
    if (s == nullptr) return CUDA_ERROR_INVALID_HANDLE;
    return submit(s, [=](Stream*) {
        fn(data);
        return CUDA_SUCCESS;
    });
}
API cuEventCreate(Event** e, unsigned flags)
{
    *e = new Event();
    (*e)->timing = !(flags & 0x2);  // CU_EVENT_DISABLE_TIMING
    std::lock_guard<std::mutex> g(g_lock);
    g_events.insert(*e);
    return CUDA_SUCCESS;
}
API cuEventDestroy_v2(Event* e)
{
    std::lock_guard<std::mutex> g(g_lock);
    if (g_events.erase(e) == 0) return CUDA_ERROR_INVALID_HANDLE;
    delete e;
    return CUDA_SUCCESS;
}
API cuEventRecord(Event* e, void* stream)
{
    Stream* s = stream_of(stream);
    if (s == nullptr) return CUDA_ERROR_INVALID_HANDLE;
    {
        std::lock_guard<std::mutex> g(g_lock);
        if (g_events.count(e) == 0) return CUDA_ERROR_INVALID_HANDLE;
    }
    return submit(s, [e](Stream*) {
        e->at = std::chrono::steady_clock::now();
        e->recorded = true;
        return CUDA_SUCCESS;
    });
}
API cuEventRecordWithFlags(Event* e, void* stream, unsigned) { return cuEventRecord(e, stream); }
API cuEventSynchronize(Event* e)
{
    std::lock_guard<std::mutex> g(g_lock);
    return g_events.count(e) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}
API cuEventQuery(Event* e) { return cuEventSynchronize(e); }
API cuEventElapsedTime_v2(float* ms, Event* start, Event* end)
{
    {
        std::lock_guard<std::mutex> g(g_lock);
        if (g_events.count(start) == 0 || g_events.count(end) == 0) return CUDA_ERROR_INVALID_HANDLE;
    }
    if (!start->recorded || !end->recorded) return CUDA_ERROR_INVALID_HANDLE;
    if (!start->timing || !end->timing) return CUDA_ERROR_INVALID_HANDLE;
    *ms = std::chrono::duration<float, std::milli>(end->at - start->at).count();
    return CUDA_SUCCESS;
}
API cuEventElapsedTime(float* ms, Event* start, Event* end) { return cuEventElapsedTime_v2(ms, start, end); }

// --- modules and kernels ---------------------------------------------------------------------

// The marker the emulator's NVRTC puts on the first line of the PTX it returns.
static const char MODULE_MARKER[] = "// fape-cuda-emu module ";

API cuModuleLoadData(emu::Module** module, const void* image)
{
    const char* text = static_cast<const char*>(image);
    if (module == nullptr || text == nullptr) return CUDA_ERROR_INVALID_VALUE;
    if (std::strncmp(text, MODULE_MARKER, sizeof MODULE_MARKER - 1) != 0) {
        emu::report("module", "cuModuleLoadData: the image was not compiled by fape-cuda-emu's NVRTC (is libnvrtc the emulator's?)");
        return CUDA_ERROR_INVALID_PTX;
    }
    const char* path = text + sizeof MODULE_MARKER - 1;
    const char* eol = std::strchr(path, '\n');
    std::string error;
    emu::Module* m = emu::load_module(eol ? std::string(path, eol) : std::string(path), &error);
    if (m == nullptr) {
        emu::report("module", "cuModuleLoadData: " + error);
        return CUDA_ERROR_INVALID_IMAGE;
    }
    std::lock_guard<std::mutex> g(g_lock);
    g_modules.insert(m);
    *module = m;
    return CUDA_SUCCESS;
}
API cuModuleUnload(emu::Module* m)
{
    std::lock_guard<std::mutex> g(g_lock);
    if (g_modules.erase(m) == 0) return CUDA_ERROR_INVALID_HANDLE;
    // The shared object stays loaded: kernels of it may still be referenced by handle.
    for (auto it = g_functions.begin(); it != g_functions.end();)
        it = it->second->module == m ? (delete it->second, g_functions.erase(it)) : std::next(it);
    delete m;
    return CUDA_SUCCESS;
}
API cuModuleGetFunction(emu::Function** f, emu::Module* m, const char* name)
{
    std::lock_guard<std::mutex> g(g_lock);
    if (g_modules.count(m) == 0) return CUDA_ERROR_INVALID_HANDLE;
    for (unsigned i = 0; i < m->table->count; ++i) {
        if (std::strcmp(m->table->kernels[i].name, name) != 0) continue;
        auto* fn = new emu::Function{&m->table->kernels[i], m};
        g_functions[fn] = fn;
        *f = fn;
        return CUDA_SUCCESS;
    }
    return CUDA_ERROR_NOT_FOUND;
}
API cuModuleGetGlobal_v2(CUdeviceptr*, size_t*, emu::Module*, const char*) { return CUDA_ERROR_NOT_FOUND; }

static emu::Function* function_of(void* handle)
{
    std::lock_guard<std::mutex> g(g_lock);
    auto it = g_functions.find(handle);
    return it == g_functions.end() ? nullptr : it->second;
}

API cuFuncSetAttribute(void* handle, int attr, int value)
{
    emu::Function* f = function_of(handle);
    if (f == nullptr) return CUDA_ERROR_INVALID_HANDLE;
    if (attr == 8) {  // MAX_DYNAMIC_SHARED_SIZE_BYTES
        if (value < 0 || static_cast<unsigned>(value) > emu::device().shared_optin) return CUDA_ERROR_INVALID_VALUE;
        f->max_dynamic_shared = static_cast<unsigned>(value);
        return CUDA_SUCCESS;
    }
    if (attr == 9) return value >= -1 && value <= 100 ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;  // carveout
    return CUDA_ERROR_INVALID_VALUE;
}
API cuFuncGetAttribute(int* v, int attr, void* handle)
{
    emu::Function* f = function_of(handle);
    if (f == nullptr) return CUDA_ERROR_INVALID_HANDLE;
    switch (attr) {
    case 0: *v = f->kernel->max_threads ? static_cast<int>(f->kernel->max_threads) : 1024; break;
    case 8: *v = static_cast<int>(f->max_dynamic_shared); break;
    case 5: case 6: *v = emu::device().major * 10 + emu::device().minor; break;  // PTX / binary version
    default: *v = 0;
    }
    return CUDA_SUCCESS;
}
API cuFuncSetCacheConfig(void* handle, int) { return function_of(handle) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE; }

API cuLaunchKernel(void* handle, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                   unsigned shared, void* stream, void** params, void** extra)
{
    emu::Function* f = function_of(handle);
    if (f == nullptr) return CUDA_ERROR_INVALID_HANDLE;
    Stream* s = stream_of(stream);
    if (s == nullptr) return CUDA_ERROR_INVALID_HANDLE;
    if (extra != nullptr) return CUDA_ERROR_NOT_SUPPORTED;  // cudarc passes kernelParams
    auto run = [=](Stream* on, void** args) {
        const emu::LaunchRequest r{f, {gx, gy, gz}, {bx, by, bz}, shared, args};
        std::string error;
        switch (emu::launch(r, &error)) {
        case emu::LaunchResult::Ok: return CUDA_SUCCESS;
        case emu::LaunchResult::InvalidValue: return CUDA_ERROR_INVALID_VALUE;
        case emu::LaunchResult::OutOfResources: return CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES;
        case emu::LaunchResult::IllegalAddress: on->error = CUDA_ERROR_ILLEGAL_ADDRESS; return CUDA_SUCCESS;
        case emu::LaunchResult::LaunchFailed: on->error = CUDA_ERROR_LAUNCH_FAILED; return CUDA_SUCCESS;
        }
        return CUDA_ERROR_UNKNOWN;
    };
    if (s->capture == nullptr) return submit(s, [&](Stream* on) { return run(on, params); });
    // Captured: the graph keeps copies of the argument values (the kernel table knows their sizes).
    auto values = std::make_shared<std::vector<std::vector<char>>>();
    for (unsigned i = 0; i < f->kernel->param_count; ++i) {
        const char* v = static_cast<const char*>(params[i]);
        values->emplace_back(v, v + f->kernel->param_sizes[i]);
    }
    return submit(s, [run, values](Stream* on) {
        std::vector<void*> args;
        for (auto& v : *values) args.push_back(v.data());
        return run(on, args.data());
    });
}

API cuOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, void* handle, int block_size, size_t shared)
{
    if (function_of(handle) == nullptr) return CUDA_ERROR_INVALID_HANDLE;
    const int by_threads = 2048 / (block_size > 0 ? block_size : 1);
    const int by_shared = shared ? static_cast<int>(emu::device().shared_per_sm / shared) : 32;
    *blocks = std::max(0, std::min({by_threads, by_shared, 32}));
    return CUDA_SUCCESS;
}
