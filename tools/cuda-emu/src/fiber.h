// Fibers: a stack and a saved stack pointer, switched by fape_emu_fiber_switch (callee-saved
// registers, MXCSR and the x87 control word are saved on the stack being left).
#pragma once

#include <cstddef>

namespace emu {

struct FiberStack {
    char* base = nullptr;  // lowest address (a guard page below the usable stack)
    size_t bytes = 0;      // usable bytes above the guard page
};

// Maps a stack of `bytes` with a PROT_NONE guard page below it (an overflow faults).
FiberStack map_stack(size_t bytes);

// Unmaps a stack of map_stack.
void unmap_stack(const FiberStack& stack);

// A fresh context on `stack` that calls entry(arg) when first switched to (entry never returns).
void* fiber_context(const FiberStack& stack, void (*entry)(void*), void* arg);

}  // namespace emu

// Saves the current context into *from_sp and resumes `to_sp`.
extern "C" void fape_emu_fiber_switch(void** from_sp, void* to_sp);
