// Device memory of the emulator: host allocations, a table of the live ones, the checker
// reports and initcheck's written-bits.
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <shared_mutex>
#include <vector>

#include "emu.h"

namespace emu {

Sanitizer sanitizer()
{
    static const Sanitizer mode = [] {
        const char* v = std::getenv("FAPE_CUDA_EMU_SANITIZER");
        if (v == nullptr || *v == 0 || std::strcmp(v, "none") == 0) return Sanitizer::None;
        if (std::strcmp(v, "memcheck") == 0) return Sanitizer::Memcheck;
        if (std::strcmp(v, "racecheck") == 0) return Sanitizer::Racecheck;
        if (std::strcmp(v, "initcheck") == 0) return Sanitizer::Initcheck;
        std::fprintf(stderr, "fape-cuda-emu: FAPE_CUDA_EMU_SANITIZER=%s is not one of memcheck, racecheck, initcheck\n", v);
        std::abort();
    }();
    return mode;
}

const char* sanitizer_name(Sanitizer s)
{
    switch (s) {
    case Sanitizer::Memcheck: return "memcheck";
    case Sanitizer::Racecheck: return "racecheck";
    case Sanitizer::Initcheck: return "initcheck";
    default: return "none";
    }
}

namespace {
std::atomic<size_t> g_reports{0};
std::atomic<size_t> g_printed{0};
constexpr size_t MAX_PRINTED = 64;

struct Allocation {
    size_t bytes;
    std::vector<uint8_t> written;  // initcheck: one bit per byte
};

std::shared_mutex g_lock;
std::atomic<uint64_t> g_free_generation{0};
std::map<uintptr_t, Allocation>& table()
{
    static auto* t = new std::map<uintptr_t, Allocation>();  // never destroyed: used at exit
    return *t;
}

// The allocation holding [p, p + bytes), or null. Caller holds g_lock.
std::pair<const uintptr_t, Allocation>* find(const void* p, size_t bytes)
{
    const auto a = reinterpret_cast<uintptr_t>(p);
    auto& t = table();
    auto it = t.upper_bound(a);
    if (it == t.begin()) return nullptr;
    --it;
    if (a + bytes > it->first + it->second.bytes || a + bytes < a) return nullptr;
    return &*it;
}
}  // namespace

void report(const char* tool, const std::string& message)
{
    g_reports.fetch_add(1);
    const size_t n = g_printed.fetch_add(1);
    if (n < MAX_PRINTED)
        std::fprintf(stderr, "========= fape-cuda-emu %s: %s\n", tool, message.c_str());
    else if (n == MAX_PRINTED)
        std::fprintf(stderr, "========= fape-cuda-emu: more reports follow, not printed\n");
}

size_t take_reports() { return g_reports.exchange(0); }

void* device_alloc(size_t bytes)
{
    void* p = nullptr;
    // Zero-byte allocations still get a distinct address (CUDA refuses them; callers check).
    if (posix_memalign(&p, 256, bytes == 0 ? 1 : bytes) != 0) return nullptr;
    std::memset(p, 0xFF, bytes);
    Allocation a{bytes, {}};
    if (initcheck_on()) a.written.assign((bytes + 7) / 8, 0);
    std::unique_lock<std::shared_mutex> lock(g_lock);
    table().emplace(reinterpret_cast<uintptr_t>(p), std::move(a));
    return p;
}

bool device_free(void* p)
{
    {
        std::unique_lock<std::shared_mutex> lock(g_lock);
        if (table().erase(reinterpret_cast<uintptr_t>(p)) == 0) return false;
        g_free_generation.fetch_add(1);
    }
    std::free(p);
    return true;
}

bool device_range(const void* p, size_t bytes)
{
    std::shared_lock<std::shared_mutex> lock(g_lock);
    return find(p, bytes) != nullptr;
}

std::string describe_address(const void* p)
{
    std::shared_lock<std::shared_mutex> lock(g_lock);
    char text[160];
    if (auto* a = find(p, 1))
        std::snprintf(text, sizeof text, "%p (byte %zu of an allocation of %zu bytes at 0x%zx)", p,
                      reinterpret_cast<uintptr_t>(p) - a->first, a->second.bytes, a->first);
    else
        std::snprintf(text, sizeof text, "%p (not in any device allocation)", p);
    return text;
}

bool find_allocation(const void* p, AllocationView* view)
{
    std::shared_lock<std::shared_mutex> lock(g_lock);
    auto* a = find(p, 1);
    if (a == nullptr) return false;
    *view = AllocationView{a->first, a->second.bytes, a->second.written.empty() ? nullptr : a->second.written.data()};
    return true;
}

uint64_t free_generation() { return g_free_generation.load(); }

bool initcheck_on() { return sanitizer() == Sanitizer::Initcheck; }

void mark_written(const void* p, size_t bytes)
{
    if (!initcheck_on() || bytes == 0) return;
    std::unique_lock<std::shared_mutex> lock(g_lock);
    auto* a = find(p, bytes);
    if (a == nullptr) return;
    const size_t off = reinterpret_cast<uintptr_t>(p) - a->first;
    for (size_t i = off; i < off + bytes; ++i) a->second.written[i >> 3] |= uint8_t(1u << (i & 7));
}

bool check_read(const void* p, size_t bytes, const char* what)
{
    if (!initcheck_on() || bytes == 0) return true;
    size_t first_unwritten = SIZE_MAX, count = 0;
    {
        std::shared_lock<std::shared_mutex> lock(g_lock);
        auto* a = find(p, bytes);
        if (a == nullptr) return true;
        const size_t off = reinterpret_cast<uintptr_t>(p) - a->first;
        for (size_t i = off; i < off + bytes; ++i)
            if (!(a->second.written[i >> 3] & (1u << (i & 7)))) {
                if (first_unwritten == SIZE_MAX) first_unwritten = i - off;
                ++count;
            }
    }
    if (count == 0) return true;
    report("initcheck", std::string(what) + " reads " + std::to_string(count) + " never-written byte(s) of " +
                            std::to_string(bytes) + ", the first at " +
                            describe_address(static_cast<const char*>(p) + first_unwritten));
    return false;
}

void copy_written(void* dst, const void* src, size_t bytes)
{
    if (!initcheck_on() || bytes == 0) return;
    std::vector<uint8_t> bits(bytes, 1);
    {
        std::shared_lock<std::shared_mutex> lock(g_lock);
        if (auto* a = find(src, bytes)) {
            const size_t off = reinterpret_cast<uintptr_t>(src) - a->first;
            for (size_t i = 0; i < bytes; ++i) bits[i] = (a->second.written[(off + i) >> 3] >> ((off + i) & 7)) & 1;
        }
    }
    std::unique_lock<std::shared_mutex> lock(g_lock);
    auto* a = find(dst, bytes);
    if (a == nullptr) return;
    const size_t off = reinterpret_cast<uintptr_t>(dst) - a->first;
    for (size_t i = 0; i < bytes; ++i) {
        const size_t j = off + i;
        if (bits[i])
            a->second.written[j >> 3] |= uint8_t(1u << (j & 7));
        else
            a->second.written[j >> 3] &= uint8_t(~(1u << (j & 7)));
    }
}

}  // namespace emu
