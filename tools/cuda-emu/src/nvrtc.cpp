// The NVRTC stand-in (libnvrtc.so.13). nvrtcCompileProgram
//  1. compiles the program with the real NVRTC too when one is found (FAPE_CUDA_EMU_REAL_NVRTC,
//     or libnvrtc.so.13 in another LD_LIBRARY_PATH directory), so compile errors and warnings
//     are NVRTC's own and the PTX it returns is real (ptxas accepts it);
//  2. builds the emulator's module: the host compiler preprocesses the source as NVRTC would
//     (__CUDACC__, __CUDACC_RTC__, __CUDA_ARCH__ from --gpu-architecture, the -D/-U/-I options,
//     the program's headers, no system include path), translate.cpp rewrites it, and the host
//     compiler builds a shared object with fape_cuda_emu.h, for the sanitizer mode in force,
//     cached under FAPE_CUDA_EMU_CACHE (default ~/.cache/fape-cuda-emu) by a hash of everything
//     that goes into it;
//  3. returns as "PTX" a first line naming that shared object (cuModuleLoadData loads it)
//     followed by the real PTX, or a minimal PTX header without a real NVRTC.
#include <dlfcn.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "emu.h"
#include "fape_cuda_emu_abi.h"
#include "translate.h"

extern "C" void* __asan_region_is_poisoned(void* beg, size_t size) __attribute__((weak));

namespace {

enum nvrtcResult : int {
    NVRTC_SUCCESS = 0,
    NVRTC_ERROR_OUT_OF_MEMORY = 1,
    NVRTC_ERROR_PROGRAM_CREATION_FAILURE = 2,
    NVRTC_ERROR_INVALID_INPUT = 3,
    NVRTC_ERROR_INVALID_PROGRAM = 4,
    NVRTC_ERROR_INVALID_OPTION = 5,
    NVRTC_ERROR_COMPILATION = 6,
    NVRTC_ERROR_INTERNAL_ERROR = 11,
};

// --- the real NVRTC --------------------------------------------------------------------------

struct RealNvrtc {
    using Create = int (*)(void**, const char*, const char*, int, const char* const*, const char* const*);
    using Destroy = int (*)(void**);
    using Compile = int (*)(void*, int, const char* const*);
    using Size = int (*)(void*, size_t*);
    using Get = int (*)(void*, char*);
    using Version = int (*)(int*, int*);
    Create create = nullptr;
    Destroy destroy = nullptr;
    Compile compile = nullptr;
    Size ptx_size = nullptr, log_size = nullptr;
    Get ptx = nullptr, log = nullptr;
    Version version = nullptr;
};

std::string self_dir()
{
    Dl_info info{};
    dladdr(reinterpret_cast<void*>(&self_dir), &info);
    std::string path = info.dli_fname ? info.dli_fname : "";
    char resolved[4096];
    if (realpath(path.c_str(), resolved) != nullptr) path = resolved;
    return path.substr(0, path.rfind('/'));
}

const RealNvrtc* real_nvrtc()
{
    static const RealNvrtc* real = []() -> const RealNvrtc* {
        std::vector<std::string> candidates;
        const char* forced = std::getenv("FAPE_CUDA_EMU_REAL_NVRTC");
        if (forced != nullptr) {
            if (*forced == 0 || std::strcmp(forced, "none") == 0) return nullptr;
            candidates.push_back(forced);
        } else if (const char* path = std::getenv("LD_LIBRARY_PATH")) {
            const std::string mine = self_dir();
            std::stringstream dirs(path);
            for (std::string dir; std::getline(dirs, dir, ':');) {
                char resolved[4096];
                if (dir.empty() || realpath(dir.c_str(), resolved) == nullptr || mine == resolved) continue;
                candidates.push_back(dir + "/libnvrtc.so.13");
                candidates.push_back(dir + "/libnvrtc.so");
            }
        }
        for (const std::string& c : candidates) {
            void* h = dlopen(c.c_str(), RTLD_NOW | RTLD_LOCAL);
            if (h == nullptr) continue;
            auto* r = new RealNvrtc();
            r->create = reinterpret_cast<RealNvrtc::Create>(dlsym(h, "nvrtcCreateProgram"));
            r->destroy = reinterpret_cast<RealNvrtc::Destroy>(dlsym(h, "nvrtcDestroyProgram"));
            r->compile = reinterpret_cast<RealNvrtc::Compile>(dlsym(h, "nvrtcCompileProgram"));
            r->ptx_size = reinterpret_cast<RealNvrtc::Size>(dlsym(h, "nvrtcGetPTXSize"));
            r->ptx = reinterpret_cast<RealNvrtc::Get>(dlsym(h, "nvrtcGetPTX"));
            r->log_size = reinterpret_cast<RealNvrtc::Size>(dlsym(h, "nvrtcGetProgramLogSize"));
            r->log = reinterpret_cast<RealNvrtc::Get>(dlsym(h, "nvrtcGetProgramLog"));
            r->version = reinterpret_cast<RealNvrtc::Version>(dlsym(h, "nvrtcVersion"));
            // (dlsym finds fape_emu_nvrtc_marker only in the emulator itself.)
            if (r->create && r->destroy && r->compile && r->ptx_size && r->ptx && r->log_size && r->log && r->version &&
                dlsym(h, "fape_emu_nvrtc_marker") == nullptr)
                return r;
            delete r;
        }
        return nullptr;
    }();
    return real;
}

// --- programs --------------------------------------------------------------------------------

struct Program {
    std::string source, name;
    std::vector<std::pair<std::string, std::string>> headers;  // (include name, contents)
    std::string log, ptx;
    bool compiled = false;
};

// 128-bit FNV-1a (two 64-bit lanes), hex: the cache key.
struct Hash {
    uint64_t a = 0xcbf29ce484222325ull, b = 0x84222325cbf29ce4ull;
    void add(const std::string& s)
    {
        for (unsigned char c : s) {
            a = (a ^ c) * 0x100000001b3ull;
            b = (b ^ c) * 0x100000001b3ull + 0x9e3779b97f4a7c15ull;
        }
        a = (a ^ 0xff) * 0x100000001b3ull;
    }
    std::string hex() const
    {
        char buf[40];
        std::snprintf(buf, sizeof buf, "%016llx%016llx", static_cast<unsigned long long>(a), static_cast<unsigned long long>(b));
        return buf;
    }
};

std::string read_file(const std::string& path)
{
    std::ifstream f(path, std::ios::binary);
    std::stringstream s;
    s << f.rdbuf();
    return s.str();
}

bool write_file(const std::string& path, const std::string& text)
{
    std::ofstream f(path, std::ios::binary);
    f << text;
    return static_cast<bool>(f);
}

std::string quote(const std::string& s)
{
    std::string r = "'";
    for (char c : s) r += c == '\'' ? std::string("'\\''") : std::string(1, c);
    return r + "'";
}

// Runs a shell command; its output (stdout and stderr) goes to *output.
int run(const std::string& command, std::string* output)
{
    FILE* p = popen((command + " 2>&1").c_str(), "r");
    if (p == nullptr) return -1;
    char buf[4096];
    for (size_t n; (n = std::fread(buf, 1, sizeof buf, p)) > 0;) output->append(buf, n);
    return pclose(p);
}

std::string cxx()
{
    const char* c = std::getenv("FAPE_CUDA_EMU_CXX");
    return c != nullptr && *c ? c : "g++";
}

const std::string& compiler_identity()
{
    static const std::string id = [] {
        std::string out;
        run(quote(cxx()) + " --version", &out);
        return out;
    }();
    return id;
}

std::string cache_dir()
{
    std::string dir;
    if (const char* c = std::getenv("FAPE_CUDA_EMU_CACHE"); c != nullptr && *c)
        dir = c;
    else if (const char* x = std::getenv("XDG_CACHE_HOME"); x != nullptr && *x)
        dir = std::string(x) + "/fape-cuda-emu";
    else
        dir = std::string(std::getenv("HOME") ? std::getenv("HOME") : "/tmp") + "/.cache/fape-cuda-emu";
    std::string partial;
    std::stringstream parts(dir);
    for (std::string p; std::getline(parts, p, '/');) {
        partial += p + "/";
        mkdir(partial.c_str(), 0755);
    }
    return dir;
}

// The compiler flags of the sanitizer mode; false with *error when the mode cannot run here.
bool mode_flags(std::string* flags, std::string* error)
{
    switch (emu::sanitizer()) {
    case emu::Sanitizer::Memcheck:
        if (__asan_region_is_poisoned == nullptr) {
            *error = "FAPE_CUDA_EMU_SANITIZER=memcheck needs the process to run with libasan preloaded: "
                     "use tools/cuda-emu/sanitize memcheck -- COMMAND";
            return false;
        }
        *flags = "-fsanitize=address,alignment -fno-sanitize-recover=alignment -fno-omit-frame-pointer";
        return true;
    case emu::Sanitizer::Racecheck:
    case emu::Sanitizer::Initcheck:
        *flags = "-fsanitize=kernel-address --param asan-instrumentation-with-call-threshold=0 "
                 "--param asan-stack=0 --param asan-globals=0";
        return true;
    default:
        flags->clear();
        return true;
    }
}

struct Options {
    std::string arch = "sm_75";
    std::vector<std::string> defines, includes;  // as compiler arguments
};

bool parse_options(int n, const char* const* opts, Options* o, std::string* error)
{
    for (int i = 0; i < n; ++i) {
        std::string a = opts[i];
        auto value = [&](const char* longform, const char* shortform, std::string* v) {
            for (const char* f : {longform, shortform}) {
                const size_t len = std::strlen(f);
                if (a.compare(0, len, f) == 0 && a.size() > len && a[len] == '=') {
                    *v = a.substr(len + 1);
                    return true;
                }
            }
            return false;
        };
        std::string v;
        if (value("--gpu-architecture", "-arch", &v)) {
            if (v.rfind("sm_", 0) != 0 && v.rfind("compute_", 0) != 0) {
                *error = "unknown --gpu-architecture " + v;
                return false;
            }
            o->arch = v;
        } else if (a.rfind("-D", 0) == 0 || a.rfind("--define-macro=", 0) == 0) {
            o->defines.push_back("-D" + a.substr(a[1] == 'D' ? 2 : 15));
        } else if (a.rfind("-U", 0) == 0 || a.rfind("--undefine-macro=", 0) == 0) {
            o->defines.push_back("-U" + a.substr(a[1] == 'U' ? 2 : 17));
        } else if (a.rfind("-I", 0) == 0 || a.rfind("--include-path=", 0) == 0) {
            o->includes.push_back("-I" + a.substr(a[1] == 'I' ? 2 : 15));
        }
        // Other options (--std, --ftz, --prec-*, --fmad, line info, ...) do not change what the
        // emulator computes: it always runs IEEE f32 without contraction.
    }
    return true;
}

// "sm_90a" -> 900 and whether the arch-specific features are on.
int arch_number(const std::string& arch, bool* specific)
{
    const size_t u = arch.find('_');
    std::string digits;
    for (char c : arch.substr(u + 1))
        if (c >= '0' && c <= '9') digits += c;
    *specific = !arch.empty() && arch.back() == 'a';
    return digits.empty() ? 750 : std::atoi(digits.c_str()) * 10;
}

// Builds (or finds in the cache) the module of `p`; its path, or empty with *log appended.
std::string build_module(const Program& p, const Options& o, std::string* log)
{
    std::string flags, error;
    if (!mode_flags(&flags, &error)) {
        *log += "fape-cuda-emu: " + error + "\n";
        return "";
    }
    const std::string lib = self_dir();
    const std::string include = lib + "/include";
    bool specific = false;
    const int arch = arch_number(o.arch, &specific);
    std::string defines = "-D__CUDACC__ -D__CUDACC_RTC__ -D__NVCC__ -DFAPE_CUDA_EMU=1 -D__CUDA_ARCH__=" + std::to_string(arch);
    if (specific) defines += " -D__CUDA_ARCH_FEAT_SM" + std::to_string(arch / 10) + "_ALL";
    for (const std::string& d : o.defines) defines += " " + quote(d);
    std::string includes;
    for (const std::string& i : o.includes) includes += " " + quote(i);

    Hash h;
    h.add(p.source);
    h.add(p.name);
    for (const auto& hd : p.headers) h.add(hd.first), h.add(hd.second);
    h.add(defines + includes + flags);
    h.add(compiler_identity());
    h.add(read_file(include + "/fape_cuda_emu.h"));
    h.add(read_file(include + "/fape_cuda_emu_abi.h"));
    h.add(read_file(lib + "/.stamp"));
    const std::string dir = cache_dir();
    const std::string key = h.hex() + "-" + emu::sanitizer_name(emu::sanitizer());
    const std::string module = dir + "/" + key + ".so";
    if (access(module.c_str(), R_OK) == 0) return module;

    char tmpl[4096];
    std::snprintf(tmpl, sizeof tmpl, "%s/build-%s-XXXXXX", dir.c_str(), key.c_str());
    if (mkdtemp(tmpl) == nullptr) {
        *log += "fape-cuda-emu: cannot create a build directory in " + dir + "\n";
        return "";
    }
    const std::string work = tmpl;
    // The build directory of a failed compile is kept when FAPE_CUDA_EMU_KEEP is set.
    const bool keep = std::getenv("FAPE_CUDA_EMU_KEEP") != nullptr;
    auto failed = [&](const std::string& what) {
        std::string ignored;
        if (keep)
            *log += what + " (sources kept in " + work + ")\n";
        else
            *log += what + " (set FAPE_CUDA_EMU_KEEP=1 to keep the translated sources)\n", run("rm -rf " + quote(work), &ignored);
        return std::string();
    };
    std::string name = p.name.empty() ? "program.cu" : p.name;
    for (char& c : name)
        if (c == '/') c = '_';
    mkdir((work + "/include").c_str(), 0755);
    for (const auto& hd : p.headers) write_file(work + "/include/" + hd.first, hd.second);
    write_file(work + "/" + name, p.source);

    std::string out;
    const std::string pre = work + "/" + name + ".ii";
    // Run in the build directory with the program's own name, so that diagnostics and
    // sanitizer reports name `attention.cu:508` as NVRTC would.
    if (run("cd " + quote(work) + " && " + quote(cxx()) + " -E -x c++ -std=c++17 -nostdinc " + defines + " -Iinclude" +
                includes + " " + quote(name) + " -o " + quote(pre),
            &out) != 0) {
        *log += out;
        return failed("fape-cuda-emu: preprocessing failed");
    }
    emu::Translation t;
    try {
        t = emu::translate(read_file(pre));
    } catch (const emu::TranslateError& e) {
        return failed(e.what());
    }
    const std::string tu = work + "/" + name + ".emu.cpp";
    write_file(tu, t.source);
    const std::string built = work + "/module.so";
    out.clear();
    const char* opt = std::getenv("FAPE_CUDA_EMU_OPT");
    const std::string command = quote(cxx()) + " -std=c++17 " + (opt != nullptr && *opt ? opt : "-O2") +
                                " -g -fPIC -shared -w -ffp-contract=off -fno-strict-aliasing -fvisibility=hidden " +
                                flags + " -I" + quote(include) + " -include fape_cuda_emu.h " + quote(tu) + " -o " +
                                quote(built) + " " + quote(lib + "/libfape_cuda_emu.so") + " -Wl,-rpath," + quote(lib);
    if (run(command, &out) != 0) {
        *log += out;
        return failed("fape-cuda-emu: compiling the emulated module failed");
    }
    if (std::rename(built.c_str(), module.c_str()) != 0) return failed("fape-cuda-emu: cannot move the module into " + dir);
    run("rm -rf " + quote(work), &out);
    return module;
}

const char* result_string(int r)
{
    switch (r) {
    case NVRTC_SUCCESS: return "NVRTC_SUCCESS";
    case NVRTC_ERROR_OUT_OF_MEMORY: return "NVRTC_ERROR_OUT_OF_MEMORY";
    case NVRTC_ERROR_PROGRAM_CREATION_FAILURE: return "NVRTC_ERROR_PROGRAM_CREATION_FAILURE";
    case NVRTC_ERROR_INVALID_INPUT: return "NVRTC_ERROR_INVALID_INPUT";
    case NVRTC_ERROR_INVALID_PROGRAM: return "NVRTC_ERROR_INVALID_PROGRAM";
    case NVRTC_ERROR_INVALID_OPTION: return "NVRTC_ERROR_INVALID_OPTION";
    case NVRTC_ERROR_COMPILATION: return "NVRTC_ERROR_COMPILATION";
    default: return "NVRTC_ERROR_INTERNAL_ERROR";
    }
}

}  // namespace

#define NVRTC FAPE_EMU_EXPORT nvrtcResult

// Lets real_nvrtc() recognise this library if a search path leads back to it.
FAPE_EMU_EXPORT int fape_emu_nvrtc_marker(void) { return 1; }

NVRTC nvrtcVersion(int* major, int* minor)
{
    if (major == nullptr || minor == nullptr) return NVRTC_ERROR_INVALID_INPUT;
    if (const RealNvrtc* r = real_nvrtc()) return static_cast<nvrtcResult>(r->version(major, minor));
    *major = 13, *minor = 0;
    return NVRTC_SUCCESS;
}

FAPE_EMU_EXPORT const char* nvrtcGetErrorString(int r) { return result_string(r); }

NVRTC nvrtcCreateProgram(Program** prog, const char* src, const char* name, int num_headers, const char* const* headers,
                         const char* const* include_names)
{
    if (prog == nullptr || src == nullptr || num_headers < 0) return NVRTC_ERROR_INVALID_INPUT;
    auto* p = new Program();
    p->source = src;
    p->name = name ? name : "default_program";
    for (int i = 0; i < num_headers; ++i) {
        if (headers[i] == nullptr || include_names[i] == nullptr) {
            delete p;
            return NVRTC_ERROR_INVALID_INPUT;
        }
        p->headers.emplace_back(include_names[i], headers[i]);
    }
    *prog = p;
    return NVRTC_SUCCESS;
}

NVRTC nvrtcDestroyProgram(Program** prog)
{
    if (prog == nullptr || *prog == nullptr) return NVRTC_ERROR_INVALID_PROGRAM;
    delete *prog;
    *prog = nullptr;
    return NVRTC_SUCCESS;
}

NVRTC nvrtcCompileProgram(Program* p, int num_options, const char* const* options)
{
    if (p == nullptr) return NVRTC_ERROR_INVALID_PROGRAM;
    if (num_options < 0 || (num_options > 0 && options == nullptr)) return NVRTC_ERROR_INVALID_INPUT;
    p->log.clear();
    p->ptx.clear();
    p->compiled = false;
    Options o;
    std::string error;
    if (!parse_options(num_options, options, &o, &error)) {
        p->log = "nvrtc: error: " + error + "\n";
        return NVRTC_ERROR_INVALID_OPTION;
    }
    std::string real_ptx = ".version 9.0\n.target " + o.arch + "\n.address_size 64\n";
    if (const RealNvrtc* r = real_nvrtc()) {
        std::vector<const char*> hs, ns;
        for (const auto& h : p->headers) ns.push_back(h.first.c_str()), hs.push_back(h.second.c_str());
        void* rp = nullptr;
        int rc = r->create(&rp, p->source.c_str(), p->name.c_str(), static_cast<int>(hs.size()), hs.data(), ns.data());
        if (rc != NVRTC_SUCCESS) return static_cast<nvrtcResult>(rc);
        rc = r->compile(rp, num_options, options);
        size_t n = 0;
        if (r->log_size(rp, &n) == NVRTC_SUCCESS && n > 1) {
            std::string log(n, '\0');
            r->log(rp, &log[0]);
            p->log = log.c_str();
        }
        if (rc == NVRTC_SUCCESS && r->ptx_size(rp, &n) == NVRTC_SUCCESS) {
            std::string ptx(n, '\0');
            r->ptx(rp, &ptx[0]);
            real_ptx = ptx.c_str();
        }
        r->destroy(&rp);
        if (rc != NVRTC_SUCCESS) return static_cast<nvrtcResult>(rc);
    }
    std::string log;
    const std::string module = build_module(*p, o, &log);
    if (module.empty()) {
        p->log += log;
        return NVRTC_ERROR_COMPILATION;
    }
    p->ptx = "// fape-cuda-emu module " + module + "\n" + real_ptx;
    p->compiled = true;
    return NVRTC_SUCCESS;
}

NVRTC nvrtcGetPTXSize(Program* p, size_t* n)
{
    if (p == nullptr) return NVRTC_ERROR_INVALID_PROGRAM;
    if (n == nullptr || !p->compiled) return NVRTC_ERROR_INVALID_INPUT;
    *n = p->ptx.size() + 1;
    return NVRTC_SUCCESS;
}

NVRTC nvrtcGetPTX(Program* p, char* out)
{
    if (p == nullptr) return NVRTC_ERROR_INVALID_PROGRAM;
    if (out == nullptr || !p->compiled) return NVRTC_ERROR_INVALID_INPUT;
    std::memcpy(out, p->ptx.c_str(), p->ptx.size() + 1);
    return NVRTC_SUCCESS;
}

NVRTC nvrtcGetProgramLogSize(Program* p, size_t* n)
{
    if (p == nullptr) return NVRTC_ERROR_INVALID_PROGRAM;
    if (n == nullptr) return NVRTC_ERROR_INVALID_INPUT;
    *n = p->log.size() + 1;
    return NVRTC_SUCCESS;
}

NVRTC nvrtcGetProgramLog(Program* p, char* out)
{
    if (p == nullptr) return NVRTC_ERROR_INVALID_PROGRAM;
    if (out == nullptr) return NVRTC_ERROR_INVALID_INPUT;
    std::memcpy(out, p->log.c_str(), p->log.size() + 1);
    return NVRTC_SUCCESS;
}
