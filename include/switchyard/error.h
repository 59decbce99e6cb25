// switchyard/error.h: the one exception type of the library and the checking macros.
//
// Every validation failure at the API boundary throws switchyard::Error with a message of the form
//   "<what> (file:line): <message naming the parameter and its value>"
// The library never calls exit() and never prints; callers decide what to do with an Error.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace switchyard {

class Error : public std::runtime_error {
 public:
    explicit Error(const std::string& msg) : std::runtime_error(msg) {}
};

namespace detail {
inline void append_all(std::ostringstream&) {}
template <typename T, typename... Rest>
void append_all(std::ostringstream& os, const T& v, const Rest&... rest) {
    os << v;
    append_all(os, rest...);
}
template <typename... Args>
[[noreturn]] void throw_error(const char* what, const char* file, int line, const Args&... args) {
    std::ostringstream os;
    append_all(os, args...);
    std::string msg = os.str();
    std::ostringstream full;
    full << msg << " [" << what << " at " << file << ":" << line << "]";
    throw Error(full.str());
}
}  // namespace detail

}  // namespace switchyard

// SWITCHYARD_CHECK(cond, parts...): throws switchyard::Error built from the streamed parts when cond is false.
#define SWITCHYARD_CHECK(cond, ...)                                                                 \
    do {                                                                                            \
        if (!(cond)) ::switchyard::detail::throw_error("check `" #cond "` failed", __FILE__, __LINE__, \
                                                       __VA_ARGS__);                                \
    } while (0)

// SWITCHYARD_FAIL(parts...): throws unconditionally.
#define SWITCHYARD_FAIL(...) ::switchyard::detail::throw_error("error", __FILE__, __LINE__, __VA_ARGS__)
