// See translate.h. A small scanner over preprocessed C++: it copies the text through, skipping
// string and character literals and preprocessor lines (line markers, pragmas), and rewrites
// the three constructs below in place, keeping the line count so that compiler messages point
// at the original lines.
#include "translate.h"

#include <cctype>
#include <map>
#include <set>

namespace emu {
namespace {

bool ident_char(char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; }

std::string trim(const std::string& s)
{
    size_t b = 0, e = s.size();
    while (b < e && std::isspace(static_cast<unsigned char>(s[b]))) ++b;
    while (e > b && std::isspace(static_cast<unsigned char>(s[e - 1]))) --e;
    return s.substr(b, e - b);
}

std::string newlines_of(const std::string& s, size_t from, size_t to)
{
    std::string n;
    for (size_t i = from; i < to; ++i)
        if (s[i] == '\n') n += '\n';
    return n;
}

// Splits at top-level commas (outside (), [], {}).
std::vector<std::string> split_top(const std::string& s)
{
    std::vector<std::string> parts;
    int depth = 0;
    std::string cur;
    for (char c : s) {
        if (c == '(' || c == '[' || c == '{') ++depth;
        if (c == ')' || c == ']' || c == '}') --depth;
        if (c == ',' && depth == 0) {
            parts.push_back(trim(cur));
            cur.clear();
        } else {
            cur += c;
        }
    }
    if (!trim(cur).empty() || !parts.empty()) parts.push_back(trim(cur));
    return parts;
}

class Scanner {
public:
    explicit Scanner(const std::string& text) : s_(text) {}

    Translation run()
    {
        while (i_ < s_.size()) {
            const char c = s_[i_];
            if (c == '#' && at_line_start()) {
                copy_line_directive();
            } else if (c == '"' || c == '\'') {
                const size_t end = skip_literal(i_);
                out_.append(s_, i_, end - i_);
                i_ = end;
            } else if (c == '{') {
                ++depth_;
                out_ += c, ++i_;
            } else if (c == '}') {
                --depth_;
                out_ += c, ++i_;
            } else if (ident_char(c) && (i_ == 0 || !ident_char(s_[i_ - 1]))) {
                size_t e = i_;
                while (e < s_.size() && ident_char(s_[e])) ++e;
                const std::string word = s_.substr(i_, e - i_);
                if (word == "asm" || word == "__asm__" || word == "__asm")
                    rewrite_asm(e);
                else if (word == "__shared__")
                    rewrite_shared(e);
                else if (word == "__global__")
                    note_kernel(e);
                else {
                    out_ += word;
                    i_ = e;
                }
            } else {
                out_ += c, ++i_;
            }
        }
        Translation t;
        t.source = out_ + registration();
        t.kernels = kernels_;
        return t;
    }

private:
    const std::string& s_;
    size_t i_ = 0;
    int depth_ = 0;
    int shared_count_ = 0;
    std::string out_;
    std::vector<KernelDecl> kernels_;
    std::set<std::string> kernel_names_;
    // Current position in the original file, from the line markers.
    std::string file_ = "<source>";
    long marker_line_ = 1;
    size_t marker_pos_ = 0;

    [[noreturn]] void fail(size_t at, const std::string& message) const
    {
        long line = marker_line_;
        for (size_t k = marker_pos_; k < at && k < s_.size(); ++k)
            if (s_[k] == '\n') ++line;
        throw TranslateError(file_ + ":" + std::to_string(line) + ": fape-cuda-emu: " + message);
    }

    bool at_line_start() const
    {
        size_t k = i_;
        while (k > 0 && (s_[k - 1] == ' ' || s_[k - 1] == '\t')) --k;
        return k == 0 || s_[k - 1] == '\n';
    }

    void copy_line_directive()
    {
        size_t e = s_.find('\n', i_);
        if (e == std::string::npos) e = s_.size();
        const std::string line = s_.substr(i_, e - i_);
        // "# 12 "file.cu" flags": the next line is line 12 of file.cu.
        size_t k = 1;
        while (k < line.size() && line[k] == ' ') ++k;
        if (k < line.size() && std::isdigit(static_cast<unsigned char>(line[k]))) {
            marker_line_ = std::stol(line.substr(k)) - 1;
            marker_pos_ = i_;
            const size_t q = line.find('"');
            const size_t q2 = q == std::string::npos ? q : line.find('"', q + 1);
            if (q2 != std::string::npos) file_ = line.substr(q + 1, q2 - q - 1);
        }
        out_.append(line);
        i_ = e;
    }

    size_t skip_literal(size_t at) const
    {
        const char quote = s_[at];
        size_t k = at + 1;
        while (k < s_.size() && s_[k] != quote) {
            if (s_[k] == '\\') ++k;
            if (k < s_.size() && s_[k] == '\n') fail(at, "unterminated literal");
            ++k;
        }
        if (k >= s_.size()) fail(at, "unterminated literal");
        return k + 1;
    }

    size_t skip_space(size_t k) const
    {
        while (k < s_.size() && std::isspace(static_cast<unsigned char>(s_[k]))) ++k;
        return k;
    }

    // Index just past the bracket matching the one at `open`.
    size_t match(size_t open) const
    {
        int d = 0;
        for (size_t k = open; k < s_.size(); ++k) {
            const char c = s_[k];
            if (c == '"' || c == '\'') {
                k = skip_literal(k) - 1;
                continue;
            }
            if (c == '(' || c == '[' || c == '{') ++d;
            if (c == ')' || c == ']' || c == '}') {
                if (--d == 0) return k + 1;
            }
        }
        fail(open, "unbalanced brackets");
    }

    std::string word_at(size_t k) const
    {
        size_t e = k;
        while (e < s_.size() && ident_char(s_[e])) ++e;
        return s_.substr(k, e - k);
    }

    // --- asm ----------------------------------------------------------------------------------

    struct Operand {
        std::string constraint, expr, name;
        bool output = false, read = false;
    };

    static std::string unescape(const std::string& lit)
    {
        std::string r;
        for (size_t k = 1; k + 1 < lit.size(); ++k) {
            if (lit[k] == '\\' && k + 2 < lit.size()) {
                const char n = lit[++k];
                r += n == 'n' ? '\n' : n == 't' ? '\t' : n;
            } else {
                r += lit[k];
            }
        }
        return r;
    }

    // Parses `"c"(expr), [name] "c"(expr) ...` up to `:` or `)` at `k`; returns the new position.
    size_t parse_operands(size_t k, std::vector<Operand>& ops, bool outputs)
    {
        for (;;) {
            k = skip_space(k);
            if (k >= s_.size() || s_[k] == ':' || s_[k] == ')') return k;
            Operand op;
            if (s_[k] == '[') {
                const size_t e = match(k);
                op.name = trim(s_.substr(k + 1, e - k - 2));
                k = skip_space(e);
            }
            if (s_[k] != '"') fail(k, "asm operand without a constraint string");
            const size_t e = skip_literal(k);
            op.constraint = unescape(s_.substr(k, e - k));
            k = skip_space(e);
            if (s_[k] != '(') fail(k, "asm operand without (expression)");
            const size_t close = match(k);
            op.expr = s_.substr(k + 1, close - k - 2);
            k = skip_space(close);
            op.output = outputs;
            op.read = !outputs || op.constraint.find('+') != std::string::npos;
            ops.push_back(op);
            if (s_[k] == ',') ++k;
        }
    }

    static std::string type_of(char c)
    {
        switch (c) {
        case 'h': return "uint16_t";
        case 'r': return "uint32_t";
        case 'l': return "uint64_t";
        case 'f': return "float";
        case 'd': return "double";
        case 'n': return "long long";
        default: return "";
        }
    }

    static char letter_of(const std::string& constraint)
    {
        for (char c : constraint)
            if (std::isalpha(static_cast<unsigned char>(c))) return c;
        return 0;
    }

    // The operand index of "%3" or "%[name]" at text[k..], advancing k.
    int operand_ref(const std::string& text, size_t& k, const std::vector<Operand>& ops, size_t at) const
    {
        ++k;  // '%'
        if (k < text.size() && text[k] == '[') {
            const size_t e = text.find(']', k);
            const std::string name = text.substr(k + 1, e - k - 1);
            k = e + 1;
            for (size_t n = 0; n < ops.size(); ++n)
                if (ops[n].name == name) return static_cast<int>(n);
            fail(at, "asm refers to an unknown operand %[" + name + "]");
        }
        size_t e = k;
        while (e < text.size() && std::isdigit(static_cast<unsigned char>(text[e]))) ++e;
        if (e == k) fail(at, "asm template uses a PTX register or %-form the emulator does not know: " + text);
        const int n = std::stoi(text.substr(k, e - k));
        k = e;
        if (n < 0 || static_cast<size_t>(n) >= ops.size()) fail(at, "asm refers to operand %" + std::to_string(n) + " that does not exist");
        return n;
    }

    std::string arg_of(const std::string& raw, const std::vector<Operand>& ops, size_t at) const
    {
        const std::string a = trim(raw);
        if (a.empty()) fail(at, "empty asm operand");
        if (a[0] == '%') {
            size_t k = 0;
            const int n = operand_ref(a, k, ops, at);
            if (k != a.size()) fail(at, "unsupported asm operand '" + a + "'");
            return "__fape_p" + std::to_string(n);
        }
        if (a[0] == '[') {
            if (a.back() != ']') fail(at, "unsupported address operand '" + a + "'");
            const std::string inner = trim(a.substr(1, a.size() - 2));
            if (inner.empty() || inner[0] != '%') fail(at, "address operand '" + a + "' is not [%N] or [%N+imm]");
            size_t k = 0;
            const int n = operand_ref(inner, k, ops, at);
            std::string rest = trim(inner.substr(k));
            std::string r = "static_cast<uint64_t>(__fape_p" + std::to_string(n) + ")";
            if (!rest.empty()) {
                if (rest[0] != '+' && rest[0] != '-') fail(at, "address operand '" + a + "' is not [%N+imm]");
                r = "(" + r + " " + rest + ")";
            }
            return r;
        }
        if (a[0] == '-' || std::isdigit(static_cast<unsigned char>(a[0]))) return a + "LL";
        fail(at, "unsupported asm operand '" + a + "'");
    }

    std::string call_of(const std::string& instr, const std::vector<Operand>& ops, size_t at) const
    {
        size_t k = 0;
        while (k < instr.size() && !std::isspace(static_cast<unsigned char>(instr[k]))) ++k;
        const std::string opcode = instr.substr(0, k);
        if (opcode.empty() || opcode[0] == '@') fail(at, "predicated PTX is not supported: " + instr);
        std::string fn;
        for (char c : opcode) {
            if (c == '.')
                fn += '_';
            else if (ident_char(c))
                fn += c;
            else
                fail(at, "unsupported PTX opcode '" + opcode + "'");
        }
        std::vector<std::string> args;
        for (const std::string& operand : split_top(instr.substr(k))) {
            if (!operand.empty() && operand[0] == '{') {
                if (operand.back() != '}') fail(at, "unbalanced vector operand in '" + instr + "'");
                for (const std::string& e : split_top(operand.substr(1, operand.size() - 2))) args.push_back(arg_of(e, ops, at));
            } else {
                args.push_back(arg_of(operand, ops, at));
            }
        }
        std::string call = "fape_ptx::" + fn + "(";
        for (size_t n = 0; n < args.size(); ++n) call += (n ? ", " : "") + args[n];
        return call + ");";
    }

    void rewrite_asm(size_t after_keyword)
    {
        const size_t start = i_;
        size_t k = skip_space(after_keyword);
        for (;;) {
            const std::string w = word_at(k);
            if (w == "volatile" || w == "__volatile__" || w == "__volatile" || w == "inline") {
                k = skip_space(k + w.size());
            } else if (w == "goto") {
                fail(start, "asm goto is not supported");
            } else {
                break;
            }
        }
        if (s_[k] != '(') fail(start, "asm without (");
        const size_t close = match(k);
        k = skip_space(k + 1);
        std::string templ;
        while (k < close && s_[k] == '"') {
            const size_t e = skip_literal(k);
            templ += unescape(s_.substr(k, e - k));
            k = skip_space(e);
        }
        std::vector<Operand> ops;
        if (s_[k] == ':') k = parse_operands(k + 1, ops, true);
        if (s_[k] == ':') k = parse_operands(k + 1, ops, false);
        if (s_[k] == ':') k = close - 1;  // clobbers: nothing to emulate
        if (k != close - 1) fail(k, "cannot parse the asm statement");

        // `do { .. } while (0)` takes the statement's own `;`, so `if (c) asm(..); else ..` stays one
        // if-else.
        std::string code = "do { ";
        std::string writeback;
        for (size_t n = 0; n < ops.size(); ++n) {
            const Operand& op = ops[n];
            const std::string type = type_of(letter_of(op.constraint));
            if (type.empty()) fail(start, "asm constraint \"" + op.constraint + "\" is not one of h, r, l, f, d, n");
            const std::string p = "__fape_p" + std::to_string(n);
            if (!op.output) {
                code += "const " + type + " " + p + " = fape_emu::ptx_in<" + type + ">(" + op.expr + "); ";
            } else {
                code += type + " " + p + (op.read ? " = fape_emu::ptx_in<" + type + ">(" + op.expr + "); " : "{}; ");
                writeback += "fape_emu::ptx_out(" + op.expr + ", " + p + "); ";
            }
        }
        std::string instr;
        auto flush = [&] {
            std::string t = trim(instr);
            const size_t comment = t.find("//");
            if (comment != std::string::npos) t = trim(t.substr(0, comment));
            if (!t.empty()) code += call_of(t, ops, start) + " ";
            instr.clear();
        };
        for (char c : templ) {
            if (c == ';' || c == '\n')
                flush();
            else
                instr += c;
        }
        flush();
        code += writeback + "} while (0)";
        out_ += code;
        out_ += newlines_of(s_, start, close);
        i_ = close;
    }

    // --- __shared__ ---------------------------------------------------------------------------

    // Removes a trailing `extern` / `static` storage word from the output; returns which.
    std::set<std::string> strip_storage()
    {
        std::set<std::string> found;
        for (;;) {
            size_t e = out_.size();
            while (e > 0 && std::isspace(static_cast<unsigned char>(out_[e - 1]))) --e;
            size_t b = e;
            while (b > 0 && ident_char(out_[b - 1])) --b;
            const std::string w = out_.substr(b, e - b);
            if (w != "extern" && w != "static") return found;
            found.insert(w);
            out_.erase(b);
        }
    }

    void rewrite_shared(size_t after_keyword)
    {
        const size_t start = i_;
        if (depth_ == 0) fail(start, "namespace-scope __shared__ variables are not supported; declare them in the kernel");
        const std::set<std::string> storage = strip_storage();
        const size_t semi = s_.find(';', after_keyword);
        if (semi == std::string::npos) fail(start, "__shared__ declaration without ;");
        std::string decl = s_.substr(after_keyword, semi - after_keyword);
        std::string align = "1";
        for (size_t a; (a = decl.find("__align__")) != std::string::npos;) {
            const size_t open = decl.find('(', a);
            const size_t close = decl.find(')', open);
            align = decl.substr(open + 1, close - open - 1);
            decl.erase(a, close + 1 - a);
        }
        decl = trim(decl);
        if (decl.find('=') != std::string::npos) fail(start, "a __shared__ variable cannot have an initializer");
        if (split_top(decl).size() != 1) fail(start, "declare one __shared__ variable per declaration");
        const size_t bracket = decl.find('[');
        const std::string head = trim(bracket == std::string::npos ? decl : decl.substr(0, bracket));
        const std::string dims = bracket == std::string::npos ? "" : trim(decl.substr(bracket));
        size_t name_begin = head.size();
        while (name_begin > 0 && ident_char(head[name_begin - 1])) --name_begin;
        const std::string name = head.substr(name_begin);
        const std::string type = trim(head.substr(0, name_begin));
        if (name.empty() || type.empty()) fail(start, "cannot parse the __shared__ declaration '" + decl + "'");

        std::string code;
        if (storage.count("extern")) {
            if (dims != "[]") fail(start, "extern __shared__ must be an unsized array: '" + decl + "'");
            code = type + "* const " + name + " = static_cast<" + type + "*>(fape_emu::dynamic_shared())";
        } else {
            const std::string token = "__fape_shared_" + std::to_string(shared_count_++);
            const std::string full = type + " " + dims;
            const std::string alignment = "(alignof(" + type + ") > (" + align + ") ? alignof(" + type + ") : (" + align + "))";
            const std::string ptr = dims.empty() ? type + "*" : type + " (*)" + dims;
            const std::string ref = dims.empty() ? type + "& " + name : type + " (&" + name + ")" + dims;
            code = "static char " + token + "; " + ref + " = *static_cast<" + ptr + ">(fape_emu_static_shared(&" + token +
                   ", sizeof(" + full + "), " + alignment + "))";
        }
        out_ += code;
        out_ += newlines_of(s_, start, semi);
        i_ = semi;
    }

    // --- kernels ------------------------------------------------------------------------------

    void note_kernel(size_t after_keyword)
    {
        const size_t start = i_;
        out_ += "__global__";
        i_ = after_keyword;
        size_t k = skip_space(after_keyword);
        if (word_at(k) != "void") fail(start, "a __global__ function must return void");
        k = skip_space(k + 4);
        KernelDecl decl;
        if (word_at(k) == "__launch_bounds__") {
            const size_t open = skip_space(k + 17);
            const size_t close = match(open);
            const auto args = split_top(s_.substr(open + 1, close - open - 2));
            if (!args.empty()) decl.max_threads = args[0];
            k = skip_space(close);
        }
        decl.name = word_at(k);
        if (decl.name.empty()) fail(start, "cannot find the kernel's name");
        k = skip_space(k + decl.name.size());
        if (s_[k] != '(') return;  // a template or an unusual declarator: not registered
        // Only extern "C" kernels are looked up by name.
        size_t b = start;
        while (b > 0 && std::isspace(static_cast<unsigned char>(s_[b - 1]))) --b;
        const bool extern_c = b >= 3 && s_.compare(b - 3, 3, "\"C\"") == 0;
        if (extern_c && kernel_names_.insert(decl.name).second) kernels_.push_back(decl);
    }

    std::string registration() const
    {
        std::string r = "\n// fape-cuda-emu: the module's kernels\n";
        if (kernels_.empty()) {
            r += "FAPE_EMU_EXPORT const fape_emu_module_table* fape_emu_module_kernels() { static const "
                 "fape_emu_module_table t{FAPE_EMU_ABI_VERSION, 0, nullptr}; return &t; }\n";
            return r;
        }
        r += "static const fape_emu_kernel fape_emu_kernel_list[] = {\n";
        for (const KernelDecl& k : kernels_) {
            const std::string thunk = "fape_emu::Thunk<decltype(&" + k.name + "), &" + k.name + ">";
            const std::string bounds = k.max_threads.empty() ? "0u" : "static_cast<unsigned>(" + k.max_threads + ")";
            r += "  {\"" + k.name + "\", &" + thunk + "::call, " + bounds + ", " + thunk + "::count, " + thunk + "::sizes},\n";
        }
        r += "};\nFAPE_EMU_EXPORT const fape_emu_module_table* fape_emu_module_kernels() { static const "
             "fape_emu_module_table t{FAPE_EMU_ABI_VERSION, " +
             std::to_string(kernels_.size()) + ", fape_emu_kernel_list}; return &t; }\n";
        return r;
    }
};

}  // namespace

Translation translate(const std::string& pre) { return Scanner(pre).run(); }

}  // namespace emu
