// Minimal JSON reader for the bundle manifest (no dependencies; enough for manifest.json).
// Parses objects, arrays, strings (with \uXXXX escapes to UTF-8), numbers, true/false/null.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace first_edge {

struct Json {
  enum Type { Null, Bool, Number, String, Array, Object } type = Null;
  bool b = false;
  double num = 0;
  std::string str;
  std::vector<Json> arr;
  std::map<std::string, Json> obj;

  bool is_obj() const { return type == Object; }
  bool is_arr() const { return type == Array; }
  bool is_str() const { return type == String; }
  bool is_num() const { return type == Number; }
  bool has(const std::string& k) const { return type == Object && obj.count(k) > 0; }
  const Json& operator[](const std::string& k) const {
    static const Json null_value;
    if (type != Object) return null_value;
    auto it = obj.find(k);
    return it == obj.end() ? null_value : it->second;
  }
  // integer value if this is an integral number in int64's range, else false (NaN and +-1e300 included:
  // casting an out-of-range double to int64_t is undefined behaviour; found by libFuzzer)
  bool as_int(int64_t* out) const {
    if (type != Number || !(num >= -9223372036854775808.0 && num < 9223372036854775808.0) ||
        num != (double)(int64_t)num)
      return false;
    *out = (int64_t)num;
    return true;
  }

  // Parse `text`; on failure returns false and sets *err to a message with the byte offset.
  static bool parse(const std::string& text, Json* out, std::string* err);
};

}  // namespace first_edge
