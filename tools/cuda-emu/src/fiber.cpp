// See fiber.h. x86-64 System V only (the machines this project runs on).
#include "fiber.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

#if !defined(__x86_64__)
#error "fape-cuda-emu fibers are written for x86-64"
#endif

// fape_emu_fiber_switch(void** from_sp /* rdi */, void* to_sp /* rsi */)
// fape_emu_fiber_entry: the first frame of a fiber; r12 = arg, r13 = entry (set up by
// fiber_context), the stack 16-byte aligned at the call.
asm(R"(
    .text
    .globl fape_emu_fiber_switch
    .hidden fape_emu_fiber_switch
    .type fape_emu_fiber_switch, @function
fape_emu_fiber_switch:
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
    .size fape_emu_fiber_switch, .-fape_emu_fiber_switch

    .globl fape_emu_fiber_entry
    .hidden fape_emu_fiber_entry
    .type fape_emu_fiber_entry, @function
fape_emu_fiber_entry:
    movq %r12, %rdi
    callq *%r13
    ud2
    .size fape_emu_fiber_entry, .-fape_emu_fiber_entry
)");

extern "C" void fape_emu_fiber_entry();

namespace emu {

FiberStack map_stack(size_t bytes)
{
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    bytes = (bytes + page - 1) / page * page;
    void* p = mmap(nullptr, bytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
        std::perror("fape-cuda-emu: mapping a fiber stack");
        std::abort();
    }
    mprotect(p, page, PROT_NONE);
    return FiberStack{static_cast<char*>(p) + page, bytes};
}

void unmap_stack(const FiberStack& stack)
{
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    munmap(stack.base - page, stack.bytes + page);
}

void* fiber_context(const FiberStack& stack, void (*entry)(void*), void* arg)
{
    // Layout, from the top: return address (fape_emu_fiber_entry), rbp, rbx, r12 = arg,
    // r13 = entry, r14, r15, then MXCSR and the x87 control word (the current ones).
    auto top = reinterpret_cast<uintptr_t>(stack.base + stack.bytes) & ~uintptr_t(15);
    auto* slot = reinterpret_cast<uint64_t*>(top);
    slot[-1] = reinterpret_cast<uint64_t>(&fape_emu_fiber_entry);
    slot[-2] = 0;                                    // rbp
    slot[-3] = 0;                                    // rbx
    slot[-4] = reinterpret_cast<uint64_t>(arg);      // r12
    slot[-5] = reinterpret_cast<uint64_t>(entry);    // r13
    slot[-6] = 0;                                    // r14
    slot[-7] = 0;                                    // r15
    uint32_t mxcsr;
    uint16_t fpucw;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(fpucw));
    auto* fp = reinterpret_cast<char*>(&slot[-8]);
    *reinterpret_cast<uint32_t*>(fp) = mxcsr;
    *reinterpret_cast<uint16_t*>(fp + 4) = fpucw;
    return &slot[-8];
}

}  // namespace emu
