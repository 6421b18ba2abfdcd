// fape-cuda-emu: the cuFFT stand-in (libcufft.so.12). Exported, the functions on the crate's call
// paths (cudarc's CudaFft::plan_many / exec_r2c / exec_c2r / drop):
//   cufftPlanMany, cufftSetStream, cufftExecR2C, cufftExecC2R, cufftDestroy
// R2C and C2R plans of rank 1 to 3, batched, basic or advanced layouts, out of place; f32 data,
// f64 arithmetic, unnormalised (C2R(R2C(x)) = N x) like cuFFT. The complex side holds the
// Hermitian half n_last/2 + 1 along the last dimension. One FFT core: radix 2 for powers of two,
// a plain DFT otherwise. Like cuFFT's out-of-place C2R, which overwrites its input, the C2R input
// is poisoned (0xFF bytes) afterwards.
#include <algorithm>
#include <complex>
#include <map>
#include <mutex>
#include <vector>

#include "mathlib.h"

// cufftResult
enum cufftResult {
    CUFFT_SUCCESS = 0,
    CUFFT_INVALID_PLAN = 1,
    CUFFT_INVALID_TYPE = 3,
    CUFFT_INVALID_VALUE = 4,
    CUFFT_EXEC_FAILED = 6,
    CUFFT_INVALID_SIZE = 8,
    CUFFT_NOT_SUPPORTED = 16,
};

namespace {

// cufftType
enum : int { CUFFT_R2C = 0x2a, CUFFT_C2R = 0x2c, CUFFT_C2C = 0x29, CUFFT_D2Z = 0x6a, CUFFT_Z2D = 0x6c,
             CUFFT_Z2Z = 0x69 };

using cd = std::complex<double>;
constexpr size_t REAL = sizeof(float), COMPLEX = 2 * sizeof(float);
constexpr double PI = 3.14159265358979323846;

// Where the elements of one side (real or complex) lie: element (i0, .., i_last) of transform b
// at b * dist + ((i0 * embed[1] + i1) * embed[2] + ..) * stride, in elements of that side.
struct Layout {
    int64_t dims[3];   // logical extents (the complex side's last one is n_last/2 + 1)
    int64_t embed[3];  // storage extents (embed[0] unused)
    int64_t stride, dist;
};

struct Plan {
    int type;  // CUFFT_R2C or CUFFT_C2R
    int rank;
    int64_t n[3];
    int64_t batch;
    Layout real, complex;
    void* stream;  // the transforms run at once, or at a graph's replay when it is capturing
};

std::mutex g_lock;
std::map<int, Plan> g_plans;
int g_next_plan = 1;

// Element offset of the start of row `row` (a linear index over the dimensions before the last).
int64_t row_start(const Layout& l, int rank, int64_t row)
{
    int64_t idx[3] = {0, 0, 0};
    for (int d = rank - 2; d >= 0; --d) {
        idx[d] = row % l.dims[d];
        row /= l.dims[d];
    }
    int64_t off = idx[0];
    for (int d = 1; d < rank; ++d) off = off * l.embed[d] + idx[d];
    return off * l.stride;
}

// Elements from the first of a side to just past its last.
int64_t extent(const Layout& l, int rank, int64_t batch)
{
    int64_t off = l.dims[0] - 1;
    for (int d = 1; d < rank; ++d) off = off * l.embed[d] + l.dims[d] - 1;
    return (batch - 1) * l.dist + off * l.stride + 1;
}

// Calls f(pointer, bytes) on the `count` elements of `size` bytes, `stride` elements apart, from p:
// one span when they are contiguous.
template <class F>
void for_spans(const char* p, int64_t count, int64_t stride, size_t size, F f)
{
    if (stride == 1) return f(p, size_t(count) * size);
    for (int64_t i = 0; i < count; ++i) f(p + i * stride * int64_t(size), size);
}

// The FFT core: the unnormalised DFT X[f] = sum_t x[t] exp(sign 2 pi i f t / n) of n values in
// place, radix 2 for powers of two, O(n^2) otherwise; twiddles computed once per size.
class Dft {
public:
    Dft(int64_t n, int sign) : n_(n), pow2_((n & (n - 1)) == 0), twiddle_(size_t(pow2_ ? n / 2 : n))
    {
        for (size_t j = 0; j < twiddle_.size(); ++j)
            twiddle_[j] = std::polar(1.0, sign * 2 * PI * double(j) / double(n));
        if (!pow2_) out_.resize(size_t(n));
    }

    void operator()(cd* x)
    {
        if (pow2_) {
            for (int64_t i = 1, j = 0; i < n_; ++i) {  // bit-reversal permutation
                int64_t bit = n_ >> 1;
                for (; j & bit; bit >>= 1) j ^= bit;
                j |= bit;
                if (i < j) std::swap(x[i], x[j]);
            }
            for (int64_t len = 2; len <= n_; len <<= 1)
                for (int64_t i = 0; i < n_; i += len)
                    for (int64_t j = 0; j < len / 2; ++j) {
                        const cd u = x[i + j], v = x[i + j + len / 2] * twiddle_[size_t(j * (n_ / len))];
                        x[i + j] = u + v;
                        x[i + j + len / 2] = u - v;
                    }
            return;
        }
        for (int64_t f = 0; f < n_; ++f) {
            cd sum = 0;
            for (int64_t t = 0, w = 0; t < n_; ++t, w = (w + f) % n_) sum += x[t] * twiddle_[size_t(w)];
            out_[size_t(f)] = sum;
        }
        std::copy(out_.begin(), out_.end(), x);
    }

private:
    int64_t n_;
    bool pow2_;
    std::vector<cd> twiddle_, out_;
};

// Transforms every line along dimension d of the row-major array w with extents dims[0..rank).
void transform_lines(std::vector<cd>& w, const int64_t* dims, int rank, int d, Dft& dft, std::vector<cd>& line)
{
    int64_t inner = 1, outer = 1;
    for (int e = d + 1; e < rank; ++e) inner *= dims[e];
    for (int e = 0; e < d; ++e) outer *= dims[e];
    for (int64_t o = 0; o < outer; ++o)
        for (int64_t i = 0; i < inner; ++i) {
            cd* base = &w[size_t(o * dims[d] * inner + i)];
            for (int64_t t = 0; t < dims[d]; ++t) line[size_t(t)] = base[t * inner];
            dft(line.data());
            for (int64_t t = 0; t < dims[d]; ++t) base[t * inner] = line[size_t(t)];
        }
}

// cufftExecR2C / cufftExecC2R of plan `id`. Refused like cuFFT: an unknown plan, or one of the
// other type (INVALID_PLAN: it is no valid plan for the call); idata or odata not aligned to a
// cufftComplex (8 bytes), or outside device memory (reported to memcheck) (INVALID_VALUE). In-place
// transforms are not emulated (NOT_SUPPORTED). Never-written input read under initcheck is
// reported (EXEC_FAILED).
cufftResult exec(const char* fn, int id, int type, const void* in, void* out)
{
    Plan p;
    {
        std::lock_guard<std::mutex> lock(g_lock);
        const auto it = g_plans.find(id);
        if (it == g_plans.end()) return CUFFT_INVALID_PLAN;
        p = it->second;
    }
    if (p.type != type) return CUFFT_INVALID_PLAN;
    // On a capturing stream the transform (and the rest of its validation) runs at the replay.
    if (emu::capturing(p.stream))
        return emu::capture(p.stream, [=] { return exec(fn, id, type, in, out) == CUFFT_SUCCESS; }) ? CUFFT_SUCCESS
                                                                                                  : CUFFT_EXEC_FAILED;
    if (reinterpret_cast<uintptr_t>(in) % COMPLEX != 0 || reinterpret_cast<uintptr_t>(out) % COMPLEX != 0)
        return CUFFT_INVALID_VALUE;
    const bool r2c = type == CUFFT_R2C;
    const Layout& li = r2c ? p.real : p.complex;
    const Layout& lo = r2c ? p.complex : p.real;
    const size_t in_size = r2c ? REAL : COMPLEX, out_size = r2c ? COMPLEX : REAL;
    const size_t in_bytes = size_t(extent(li, p.rank, p.batch)) * in_size;
    const size_t out_bytes = size_t(extent(lo, p.rank, p.batch)) * out_size;
    const char* src = static_cast<const char*>(in);
    char* dst = static_cast<char*>(out);
    if (src < dst + out_bytes && dst < src + in_bytes) {
        emu::not_emulated(fn, "an in-place transform");
        return CUFFT_NOT_SUPPORTED;
    }
    if (!emu::in_device_memory(fn, "idata", in, in_bytes) || !emu::in_device_memory(fn, "odata", out, out_bytes)) {
        emu::take_reports();
        return CUFFT_INVALID_VALUE;
    }
    const int rank = p.rank;
    const int64_t nl = p.n[rank - 1], half = nl / 2 + 1;
    int64_t rows = 1, longest = nl;
    for (int d = 0; d < rank - 1; ++d) {
        rows *= p.n[d];
        longest = std::max(longest, p.n[d]);
    }
    const int sign = r2c ? -1 : 1;
    Dft last(nl, sign);
    std::vector<Dft> others;
    for (int d = 0; d < rank - 1; ++d) others.emplace_back(p.n[d], sign);
    std::vector<cd> w(static_cast<size_t>(rows * half)), line(static_cast<size_t>(longest));
    bool written = true;
    auto check = [&](const char* q, size_t bytes) {  // initcheck: the first never-written row is reported
        if (written) written = emu::check_read(q, bytes, fn);
    };
    auto mark = [](const char* q, size_t bytes) { emu::mark_written(q, bytes); };
    auto poison = [](const char* q, size_t bytes) { std::memset(const_cast<char*>(q), 0xFF, bytes); };
    for (int64_t b = 0; b < p.batch; ++b) {
        const char* ib = src + b * li.dist * int64_t(in_size);
        char* ob = dst + b * lo.dist * int64_t(out_size);
        if (r2c) {
            // Real rows -> their half spectra, then the other dimensions (complex, forward).
            for (int64_t r = 0; r < rows; ++r) {
                const float* x = reinterpret_cast<const float*>(ib) + row_start(li, rank, r);
                for_spans(reinterpret_cast<const char*>(x), nl, li.stride, REAL, check);
                for (int64_t t = 0; t < nl; ++t) line[size_t(t)] = x[t * li.stride];
                last(line.data());
                std::copy(line.begin(), line.begin() + half, w.begin() + r * half);
            }
            for (int d = rank - 2; d >= 0; --d) transform_lines(w, lo.dims, rank, d, others[size_t(d)], line);
            for (int64_t r = 0; r < rows; ++r) {
                float* y = reinterpret_cast<float*>(ob) + 2 * row_start(lo, rank, r);
                for (int64_t f = 0; f < half; ++f) {
                    y[2 * f * lo.stride] = float(w[size_t(r * half + f)].real());
                    y[2 * f * lo.stride + 1] = float(w[size_t(r * half + f)].imag());
                }
                for_spans(reinterpret_cast<const char*>(y), half, lo.stride, COMPLEX, mark);
            }
        } else {
            // The other dimensions (complex, inverse), then each Hermitian half row -> a real row.
            // The imaginary parts of the DC and Nyquist bins only reach the imaginary part of the
            // row, which is dropped: they are ignored, as in cuFFT.
            for (int64_t r = 0; r < rows; ++r) {
                const float* x = reinterpret_cast<const float*>(ib) + 2 * row_start(li, rank, r);
                for_spans(reinterpret_cast<const char*>(x), half, li.stride, COMPLEX, check);
                for (int64_t f = 0; f < half; ++f)
                    w[size_t(r * half + f)] = cd(x[2 * f * li.stride], x[2 * f * li.stride + 1]);
            }
            for (int d = 0; d < rank - 1; ++d) transform_lines(w, li.dims, rank, d, others[size_t(d)], line);
            for (int64_t r = 0; r < rows; ++r) {
                const cd* h = &w[size_t(r * half)];
                std::copy(h, h + half, line.begin());
                for (int64_t f = 1; f <= nl - half; ++f) line[size_t(nl - f)] = std::conj(h[f]);  // mirrored bins
                last(line.data());
                float* y = reinterpret_cast<float*>(ob) + row_start(lo, rank, r);
                for (int64_t t = 0; t < nl; ++t) y[t * lo.stride] = float(line[size_t(t)].real());
                for_spans(reinterpret_cast<const char*>(y), nl, lo.stride, REAL, mark);
            }
            for (int64_t r = 0; r < rows; ++r)
                for_spans(ib + 2 * row_start(li, rank, r) * int64_t(REAL), half, li.stride, COMPLEX, poison);
        }
    }
    if (!written) {
        emu::take_reports();
        return CUFFT_EXEC_FAILED;
    }
    return CUFFT_SUCCESS;
}

}  // namespace

// A plan of `batch` rank-`rank` transforms of extents n[0..rank). When inembed or onembed is null,
// cuFFT's basic layout (contiguous, transforms back to back; istride, idist, ostride, odist are
// ignored, as in cuFFT); otherwise the advanced layout. Refused like cuFFT: null plan or n
// (INVALID_VALUE); an unknown type (INVALID_TYPE); rank outside 1..3, an extent or batch below 1
// (INVALID_SIZE); an advanced layout with a stride or distance below 1 or a storage extent
// (beyond the first) below the data's (INVALID_VALUE). C2C, D2Z, Z2D, Z2Z: not emulated
// (NOT_SUPPORTED).
EMU_EXPORT cufftResult cufftPlanMany(int* plan, int rank, int* n, int* inembed, int istride, int idist, int* onembed,
                                     int ostride, int odist, int type, int batch)
{
    if (plan == nullptr || n == nullptr) return CUFFT_INVALID_VALUE;
    if (type != CUFFT_R2C && type != CUFFT_C2R && type != CUFFT_C2C && type != CUFFT_D2Z && type != CUFFT_Z2D &&
        type != CUFFT_Z2Z)
        return CUFFT_INVALID_TYPE;
    if (rank < 1 || rank > 3 || batch < 1) return CUFFT_INVALID_SIZE;
    for (int d = 0; d < rank; ++d)
        if (n[d] < 1) return CUFFT_INVALID_SIZE;
    if (type != CUFFT_R2C && type != CUFFT_C2R) {
        emu::not_emulated("cufftPlanMany", "transform type " + std::to_string(type));
        return CUFFT_NOT_SUPPORTED;
    }
    Plan p{type, rank, {1, 1, 1}, batch, {}, {}, nullptr};
    for (int d = 0; d < rank; ++d) p.n[d] = p.real.dims[d] = p.complex.dims[d] = n[d];
    p.complex.dims[rank - 1] = n[rank - 1] / 2 + 1;
    const bool r2c = type == CUFFT_R2C;
    for (Layout* l : {&p.real, &p.complex}) {
        const bool input = (l == &p.real) == r2c;
        const int* embed = input ? inembed : onembed;
        const int stride = input ? istride : ostride, dist = input ? idist : odist;
        if (inembed == nullptr || onembed == nullptr) {
            l->stride = 1;
            l->dist = 1;
            for (int d = 0; d < rank; ++d) l->dist *= l->embed[d] = l->dims[d];
            continue;
        }
        if (stride < 1 || dist < 1) return CUFFT_INVALID_VALUE;
        l->stride = stride;
        l->dist = dist;
        for (int d = 0; d < rank; ++d) {
            l->embed[d] = embed[d];
            if (d > 0 && embed[d] < l->dims[d]) return CUFFT_INVALID_VALUE;
        }
    }
    std::lock_guard<std::mutex> lock(g_lock);
    *plan = g_next_plan++;
    g_plans.emplace(*plan, p);
    return CUFFT_SUCCESS;
}

// Stores the stream (transforms run at once, or are captured when it is capturing);
// INVALID_PLAN for an unknown plan.
EMU_EXPORT cufftResult cufftSetStream(int plan, void* stream)
{
    std::lock_guard<std::mutex> lock(g_lock);
    const auto it = g_plans.find(plan);
    if (it == g_plans.end()) return CUFFT_INVALID_PLAN;
    it->second.stream = stream;
    return CUFFT_SUCCESS;
}

// INVALID_PLAN for an unknown (or already destroyed) plan.
EMU_EXPORT cufftResult cufftDestroy(int plan)
{
    std::lock_guard<std::mutex> lock(g_lock);
    return g_plans.erase(plan) == 1 ? CUFFT_SUCCESS : CUFFT_INVALID_PLAN;
}

EMU_EXPORT cufftResult cufftExecR2C(int plan, float* idata, float* odata)
{
    return exec("cufftExecR2C", plan, CUFFT_R2C, idata, odata);
}

EMU_EXPORT cufftResult cufftExecC2R(int plan, float* idata, float* odata)
{
    return exec("cufftExecC2R", plan, CUFFT_C2R, idata, odata);
}
