// fape-cuda-emu: the cuBLASLt stand-in (libcublasLt.so.13), on the GEMM core of cublas.cpp.
// Exported, the functions on the crate's call paths (cudarc's CudaBlasLT::new / drop and the
// result:: calls of src/lora_moe/cuda_gemm.rs):
//   cublasLtCreate, cublasLtDestroy,
//   cublasLtMatrixLayoutCreate, cublasLtMatrixLayoutDestroy,
//   cublasLtMatmulDescCreate, cublasLtMatmulDescSetAttribute, cublasLtMatmulDescDestroy,
//   cublasLtMatmulPreferenceCreate, cublasLtMatmulPreferenceSetAttribute,
//   cublasLtMatmulPreferenceDestroy, cublasLtMatmulAlgoGetHeuristic, cublasLtMatmul
// Emulated: column-major layouts without batches (the layout attributes are not on the call
// paths), host alpha and beta, f32 compute and scale types, the DEFAULT and BIAS epilogues. The
// one algorithm the heuristic offers asks for min(1 MiB, the preference's workspace) of workspace
// and takes the preference's alignment promises, which cublasLtMatmul then holds the call to.
#include <algorithm>

#include "mathlib.h"

namespace {

// cublasLtMatmulDescAttributes_t and cublasLtMatmulPreferenceAttributes_t values handled.
enum : int {
    CUBLASLT_MATMUL_DESC_TRANSA = 3,
    CUBLASLT_MATMUL_DESC_TRANSB = 4,
    CUBLASLT_MATMUL_DESC_EPILOGUE = 7,
    CUBLASLT_MATMUL_DESC_BIAS_POINTER = 8,
    CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE = 26,
};
enum : int {
    CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES = 1,
    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES = 5,  // .. B 6, C 7, D 8
    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES = 8,
};
// cublasLtEpilogue_t values emulated.
enum : uint32_t { CUBLASLT_EPILOGUE_DEFAULT = 1, CUBLASLT_EPILOGUE_BIAS = 4 };
enum : int32_t { CUBLAS_OP_N = 0, CUBLAS_OP_C = 2 };

// What the emulated algorithm asks for as workspace, at most (the preference may allow less).
constexpr uint64_t ALGO_WORKSPACE = 1 << 20;
// Marks a cublasLtMatmulAlgo_t filled by the heuristic.
constexpr uint64_t ALGO_MAGIC = 0x66617065'616c676full;

}  // namespace

struct cublasLtContext {};

// A matrix layout: column-major `rows x cols` of `type`, leading dimension `ld`.
struct cublasLtMatrixLayoutOpaque_t {
    int32_t type;
    uint64_t rows, cols;
    int64_t ld;
};

// A matmul descriptor: compute and scale types, the transposes, the epilogue and its bias.
struct cublasLtMatmulDescOpaque_t {
    int32_t compute, scale;
    int32_t transa = CUBLAS_OP_N, transb = CUBLAS_OP_N;
    uint32_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
    const void* bias = nullptr;
    int32_t bias_type = -1;  // -1: D's type
};

// A heuristic preference: the workspace allowed and the alignment promised for A, B, C, D
// (256 bytes unless set, as in cuBLASLt).
struct cublasLtMatmulPreferenceOpaque_t {
    uint64_t max_workspace = 0;
    uint32_t alignment[4] = {256, 256, 256, 256};
};

// An algorithm (64 opaque bytes): ALGO_MAGIC, its workspace bytes, then the alignment of A, B, C, D
// it was chosen for.
struct cublasLtMatmulAlgo_t {
    uint64_t data[8];
};

struct cublasLtMatmulHeuristicResult_t {
    cublasLtMatmulAlgo_t algo;
    size_t workspaceSize;
    cublasStatus_t state;
    float wavesCount;
    int reserved[4];
};
static_assert(sizeof(cublasLtMatmulHeuristicResult_t) == 96, "cuBLASLt's heuristic result layout");

using cublasLtHandle_t = cublasLtContext*;
using cublasLtMatrixLayout_t = cublasLtMatrixLayoutOpaque_t*;
using cublasLtMatmulDesc_t = cublasLtMatmulDescOpaque_t*;
using cublasLtMatmulPreference_t = cublasLtMatmulPreferenceOpaque_t*;

namespace {

// Copies an attribute value of type T from `buf`; INVALID_VALUE, as in cuBLASLt, when `buf` is
// null or `size` is not the attribute's size.
template <class T>
cublasStatus_t set_value(T& field, const void* buf, size_t size)
{
    if (buf == nullptr || size != sizeof(T)) return CUBLAS_STATUS_INVALID_VALUE;
    std::memcpy(&field, buf, sizeof(T));
    return CUBLAS_STATUS_SUCCESS;
}

// The GEMM D = alpha op(A) op(B) + beta C (+ bias) that a descriptor and four layouts describe,
// validated as cuBLASLt does: INVALID_VALUE for a null descriptor or layout, an operation other
// than N/T/C, ld < max(1, rows), shapes that do not chain (op(A) m x k, op(B) k x n, C and D
// m x n), the bias epilogue without a bias pointer; NOT_SUPPORTED for types, compute or scale
// types it does not take (or the emulator does not: see gemm_types_supported), C's type other
// than D's, a bias type other than D's.
cublasStatus_t describe(const cublasLtMatmulDescOpaque_t* desc, const cublasLtMatrixLayoutOpaque_t* A,
                        const cublasLtMatrixLayoutOpaque_t* B, const cublasLtMatrixLayoutOpaque_t* C,
                        const cublasLtMatrixLayoutOpaque_t* D, emu::Gemm* g)
{
    if (!desc || !A || !B || !C || !D) return CUBLAS_STATUS_INVALID_VALUE;
    for (const auto* x : {A, B, C, D})
        if (x->ld < std::max<int64_t>(1, int64_t(x->rows))) return CUBLAS_STATUS_INVALID_VALUE;
    if (desc->transa < CUBLAS_OP_N || desc->transa > CUBLAS_OP_C || desc->transb < CUBLAS_OP_N ||
        desc->transb > CUBLAS_OP_C)
        return CUBLAS_STATUS_INVALID_VALUE;
    const bool ta = desc->transa != CUBLAS_OP_N, tb = desc->transb != CUBLAS_OP_N;
    const uint64_t m = D->rows, n = D->cols, k = ta ? A->rows : A->cols;
    if (C->rows != m || C->cols != n || (ta ? A->cols : A->rows) != m || (tb ? B->cols : B->rows) != k ||
        (tb ? B->rows : B->cols) != n)
        return CUBLAS_STATUS_INVALID_VALUE;
    const bool bias = desc->epilogue == CUBLASLT_EPILOGUE_BIAS;
    if (bias && desc->bias == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
    const int32_t bias_type = desc->bias_type == -1 ? D->type : desc->bias_type;
    if (desc->scale != emu::CUDA_R_32F || !emu::gemm_types_supported(desc->compute, A->type, B->type, C->type) ||
        C->type != D->type || (bias && bias_type != D->type))
        return CUBLAS_STATUS_NOT_SUPPORTED;
    auto matrix = [](const cublasLtMatrixLayoutOpaque_t* x) {
        return emu::Matrix{nullptr, x->type, int64_t(x->rows), int64_t(x->cols), x->ld, 0};
    };
    *g = emu::Gemm{"cublasLtMatmul", ta, tb, int64_t(m), int64_t(n), int64_t(k), 1, 0, 0, matrix(A), matrix(B),
                   matrix(C), matrix(D), bias ? desc->bias : nullptr, bias_type};
    return CUBLAS_STATUS_SUCCESS;
}

}  // namespace

// A handle; INVALID_VALUE when `handle` is null.
EMU_EXPORT cublasStatus_t cublasLtCreate(cublasLtHandle_t* handle)
{
    if (handle == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
    *handle = new cublasLtContext();
    return CUBLAS_STATUS_SUCCESS;
}

// NOT_INITIALIZED for a null handle.
EMU_EXPORT cublasStatus_t cublasLtDestroy(cublasLtHandle_t handle)
{
    if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
    delete handle;
    return CUBLAS_STATUS_SUCCESS;
}

// A layout (checked where it is used, as in cuBLASLt); INVALID_VALUE when `layout` is null.
EMU_EXPORT cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t* layout, int32_t type, uint64_t rows,
                                                     uint64_t cols, int64_t ld)
{
    if (layout == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
    *layout = new cublasLtMatrixLayoutOpaque_t{type, rows, cols, ld};
    return CUBLAS_STATUS_SUCCESS;
}

EMU_EXPORT cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t layout)
{
    delete layout;
    return CUBLAS_STATUS_SUCCESS;
}

// A descriptor (types checked where it is used); INVALID_VALUE when `desc` is null.
EMU_EXPORT cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t* desc, int32_t compute, int32_t scale)
{
    if (desc == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
    *desc = new cublasLtMatmulDescOpaque_t{};
    (*desc)->compute = compute;
    (*desc)->scale = scale;
    return CUBLAS_STATUS_SUCCESS;
}

// TRANSA, TRANSB (int32), EPILOGUE (uint32: DEFAULT or BIAS), BIAS_POINTER (a pointer),
// BIAS_DATA_TYPE (int32). INVALID_VALUE for a null descriptor or buffer or a size other than the
// attribute's; NOT_SUPPORTED (said on stderr) for the attributes and epilogues not emulated.
EMU_EXPORT cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t desc, int attr, const void* buf,
                                                         size_t size)
{
    if (desc == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
    switch (attr) {
    case CUBLASLT_MATMUL_DESC_TRANSA: return set_value(desc->transa, buf, size);
    case CUBLASLT_MATMUL_DESC_TRANSB: return set_value(desc->transb, buf, size);
    case CUBLASLT_MATMUL_DESC_BIAS_POINTER: return set_value(desc->bias, buf, size);
    case CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE: return set_value(desc->bias_type, buf, size);
    case CUBLASLT_MATMUL_DESC_EPILOGUE: {
        uint32_t epilogue;
        if (const cublasStatus_t s = set_value(epilogue, buf, size)) return s;
        if (epilogue != CUBLASLT_EPILOGUE_DEFAULT && epilogue != CUBLASLT_EPILOGUE_BIAS) {
            emu::not_emulated("cublasLtMatmulDescSetAttribute", "epilogue " + std::to_string(epilogue));
            return CUBLAS_STATUS_NOT_SUPPORTED;
        }
        desc->epilogue = epilogue;
        return CUBLAS_STATUS_SUCCESS;
    }
    default:
        emu::not_emulated("cublasLtMatmulDescSetAttribute", "attribute " + std::to_string(attr));
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
}

EMU_EXPORT cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t desc)
{
    delete desc;
    return CUBLAS_STATUS_SUCCESS;
}

// A preference: no workspace, 256-byte alignment promised; INVALID_VALUE when `pref` is null.
EMU_EXPORT cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t* pref)
{
    if (pref == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
    *pref = new cublasLtMatmulPreferenceOpaque_t();
    return CUBLAS_STATUS_SUCCESS;
}

// MAX_WORKSPACE_BYTES (uint64), MIN_ALIGNMENT_{A,B,C,D}_BYTES (uint32). INVALID_VALUE for a null
// preference or buffer or a size other than the attribute's; NOT_SUPPORTED (said on stderr) for
// the attributes not emulated.
EMU_EXPORT cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t pref, int attr,
                                                               const void* buf, size_t size)
{
    if (pref == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
    if (attr == CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES) return set_value(pref->max_workspace, buf, size);
    if (attr >= CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES && attr <= CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES)
        return set_value(pref->alignment[attr - CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES], buf, size);
    emu::not_emulated("cublasLtMatmulPreferenceSetAttribute", "attribute " + std::to_string(attr));
    return CUBLAS_STATUS_NOT_SUPPORTED;
}

EMU_EXPORT cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t pref)
{
    delete pref;
    return CUBLAS_STATUS_SUCCESS;
}

// One algorithm (state SUCCESS) for the GEMM, asking for min(1 MiB, MAX_WORKSPACE_BYTES) of
// workspace and relying on the preference's alignment promises. NOT_INITIALIZED for a null
// handle; INVALID_VALUE for a null preference or result pointer, requestedAlgoCount < 1, and
// the GEMM's errors (see describe); NOT_SUPPORTED, with no algorithm, for the GEMM's and when a
// promised alignment is below an operand's element size (no kernel takes such pointers).
EMU_EXPORT cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t handle, cublasLtMatmulDesc_t desc,
                                                         cublasLtMatrixLayout_t A, cublasLtMatrixLayout_t B,
                                                         cublasLtMatrixLayout_t C, cublasLtMatrixLayout_t D,
                                                         cublasLtMatmulPreference_t pref, int requested,
                                                         cublasLtMatmulHeuristicResult_t* results, int* count)
{
    if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (pref == nullptr || results == nullptr || count == nullptr || requested < 1) return CUBLAS_STATUS_INVALID_VALUE;
    *count = 0;
    emu::Gemm g;
    if (const cublasStatus_t s = describe(desc, A, B, C, D, &g)) return s;
    const cublasLtMatrixLayout_t layouts[4] = {A, B, C, D};
    for (int i = 0; i < 4; ++i)
        if (pref->alignment[i] < emu::element_size(layouts[i]->type)) return CUBLAS_STATUS_NOT_SUPPORTED;
    cublasLtMatmulHeuristicResult_t& r = results[0];
    std::memset(&r, 0, sizeof r);
    r.workspaceSize = std::min(pref->max_workspace, ALGO_WORKSPACE);
    r.algo.data[0] = ALGO_MAGIC;
    r.algo.data[1] = r.workspaceSize;
    for (int i = 0; i < 4; ++i) r.algo.data[2 + i] = pref->alignment[i];
    r.state = CUBLAS_STATUS_SUCCESS;
    r.wavesCount = 1.0f;
    *count = 1;
    return CUBLAS_STATUS_SUCCESS;
}

// D = alpha op(A) op(B) + beta C (+ bias), computed at once, or at a graph's replay when `stream`
// is capturing (validated at the call either way, as cuBLASLt does). Refused:
// a null handle (NOT_INITIALIZED); a null alpha or beta, an algorithm not from the heuristic, a
// workspace smaller than the algorithm asked for, C == D with different layouts, the GEMM's
// errors (see describe) (INVALID_VALUE); an operand less aligned than the preference promised
// for the algorithm, or outside device memory (reported to memcheck, INVALID_VALUE); never-
// written operand bytes read under initcheck (reported, EXECUTION_FAILED). A null algorithm is
// cuBLASLt's implicit heuristic: no workspace, element alignment.
EMU_EXPORT cublasStatus_t cublasLtMatmul(cublasLtHandle_t handle, cublasLtMatmulDesc_t desc, const void* alpha,
                                         const void* a, cublasLtMatrixLayout_t A, const void* b,
                                         cublasLtMatrixLayout_t B, const void* beta, const void* c,
                                         cublasLtMatrixLayout_t C, void* d, cublasLtMatrixLayout_t D,
                                         const cublasLtMatmulAlgo_t* algo, void* workspace, size_t workspace_size,
                                         void* stream)
{
    const char* fn = "cublasLtMatmul";
    if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (alpha == nullptr || beta == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
    emu::Gemm g;
    if (const cublasStatus_t s = describe(desc, A, B, C, D, &g)) return s;
    if (c == d && (C->type != D->type || C->ld != D->ld)) return CUBLAS_STATUS_INVALID_VALUE;
    const cublasLtMatrixLayout_t layouts[4] = {A, B, C, D};
    uint64_t needed = 0, alignment[4];
    for (int i = 0; i < 4; ++i) alignment[i] = emu::element_size(layouts[i]->type);
    if (algo != nullptr) {
        if (algo->data[0] != ALGO_MAGIC) return CUBLAS_STATUS_INVALID_VALUE;
        needed = algo->data[1];
        std::copy(algo->data + 2, algo->data + 6, alignment);
    }
    if (workspace_size < needed) return CUBLAS_STATUS_INVALID_VALUE;
    g.alpha = *static_cast<const float*>(alpha);
    g.beta = *static_cast<const float*>(beta);
    const void* pointers[4] = {a, b, c, d};
    for (int i = 0; i < 4; ++i) {
        const uintptr_t address = reinterpret_cast<uintptr_t>(pointers[i]);
        if ((i == 2 && g.beta == 0) || address % alignment[i] == 0) continue;  // C is not read when beta == 0
        const char name[2] = {char('A' + i), 0};
        emu::report("memcheck", std::string(fn) + ": " + name + " at " + emu::describe_address(pointers[i]) +
                                    " is less aligned than the " + std::to_string(alignment[i]) +
                                    " bytes the algorithm was chosen for (CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_" + name +
                                    "_BYTES)");
        emu::take_reports();
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    if (!emu::in_device_memory(fn, "workspace", workspace, needed)) {
        emu::take_reports();
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    g.a.ptr = a;
    g.b.ptr = b;
    g.c.ptr = c;
    g.d.ptr = d;
    if (emu::capturing(stream))
        return emu::capture(stream, [g] { return emu::gemm(g) == emu::GemmResult::Ok; }) ? CUBLAS_STATUS_SUCCESS
                                                                                          : CUBLAS_STATUS_INVALID_VALUE;
    switch (emu::gemm(g)) {
    case emu::GemmResult::Ok: return CUBLAS_STATUS_SUCCESS;
    case emu::GemmResult::OutOfRange: return CUBLAS_STATUS_INVALID_VALUE;
    default: return CUBLAS_STATUS_EXECUTION_FAILED;
    }
}
