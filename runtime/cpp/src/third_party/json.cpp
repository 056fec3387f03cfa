#include "json.h"

#include <cstdlib>

namespace first_edge {
namespace {

struct Parser {
  const std::string& s;
  size_t i = 0;
  std::string err;
  int depth = 0;

  explicit Parser(const std::string& text) : s(text) {}

  void ws() {
    while (i < s.size() && (s[i] == ' ' || s[i] == '\n' || s[i] == '\r' || s[i] == '\t')) i++;
  }
  bool fail(const std::string& m) {
    if (err.empty()) err = m + " at byte " + std::to_string(i);
    return false;
  }
  bool lit(const char* w) {
    size_t n = std::char_traits<char>::length(w);
    if (s.compare(i, n, w) != 0) return fail("invalid literal");
    i += n;
    return true;
  }
  static void utf8(uint32_t c, std::string* o) {
    if (c < 0x80) {
      o->push_back((char)c);
    } else if (c < 0x800) {
      o->push_back((char)(0xC0 | (c >> 6)));
      o->push_back((char)(0x80 | (c & 0x3F)));
    } else if (c < 0x10000) {
      o->push_back((char)(0xE0 | (c >> 12)));
      o->push_back((char)(0x80 | ((c >> 6) & 0x3F)));
      o->push_back((char)(0x80 | (c & 0x3F)));
    } else {
      o->push_back((char)(0xF0 | (c >> 18)));
      o->push_back((char)(0x80 | ((c >> 12) & 0x3F)));
      o->push_back((char)(0x80 | ((c >> 6) & 0x3F)));
      o->push_back((char)(0x80 | (c & 0x3F)));
    }
  }
  bool hex4(uint32_t* v) {
    if (i + 4 > s.size()) return fail("truncated \\u escape");
    *v = 0;
    for (int k = 0; k < 4; k++) {
      char c = s[i++];
      *v <<= 4;
      if (c >= '0' && c <= '9') *v |= c - '0';
      else if (c >= 'a' && c <= 'f') *v |= c - 'a' + 10;
      else if (c >= 'A' && c <= 'F') *v |= c - 'A' + 10;
      else return fail("bad \\u escape");
    }
    return true;
  }
  bool string(std::string* o) {
    if (i >= s.size() || s[i] != '"') return fail("expected a string");
    i++;
    while (true) {
      if (i >= s.size()) return fail("unterminated string");
      char c = s[i++];
      if (c == '"') return true;
      if ((unsigned char)c < 0x20) return fail("control character in string");
      if (c != '\\') {
        o->push_back(c);
        continue;
      }
      if (i >= s.size()) return fail("unterminated escape");
      char e = s[i++];
      switch (e) {
        case '"': o->push_back('"'); break;
        case '\\': o->push_back('\\'); break;
        case '/': o->push_back('/'); break;
        case 'b': o->push_back('\b'); break;
        case 'f': o->push_back('\f'); break;
        case 'n': o->push_back('\n'); break;
        case 'r': o->push_back('\r'); break;
        case 't': o->push_back('\t'); break;
        case 'u': {
          uint32_t c1;
          if (!hex4(&c1)) return false;
          if (c1 >= 0xD800 && c1 < 0xDC00 && i + 1 < s.size() && s[i] == '\\' && s[i + 1] == 'u') {
            i += 2;
            uint32_t c2;
            if (!hex4(&c2)) return false;
            if (c2 >= 0xDC00 && c2 < 0xE000) c1 = 0x10000 + ((c1 - 0xD800) << 10) + (c2 - 0xDC00);
          }
          utf8(c1, o);
          break;
        }
        default: return fail("bad escape");
      }
    }
  }
  bool value(Json* v) {
    if (++depth > 64) return fail("nesting too deep");
    ws();
    if (i >= s.size()) return fail("unexpected end of input");
    bool ok = true;
    char c = s[i];
    if (c == '{') {
      v->type = Json::Object;
      i++;
      ws();
      if (i < s.size() && s[i] == '}') {
        i++;
      } else {
        while (true) {
          ws();
          std::string k;
          if (!string(&k)) { ok = false; break; }
          ws();
          if (i >= s.size() || s[i] != ':') { ok = fail("expected ':'"); break; }
          i++;
          Json item;
          if (!value(&item)) { ok = false; break; }
          v->obj[k] = std::move(item);
          ws();
          if (i < s.size() && s[i] == ',') { i++; continue; }
          if (i < s.size() && s[i] == '}') { i++; break; }
          ok = fail("expected ',' or '}'");
          break;
        }
      }
    } else if (c == '[') {
      v->type = Json::Array;
      i++;
      ws();
      if (i < s.size() && s[i] == ']') {
        i++;
      } else {
        while (true) {
          Json item;
          if (!value(&item)) { ok = false; break; }
          v->arr.push_back(std::move(item));
          ws();
          if (i < s.size() && s[i] == ',') { i++; continue; }
          if (i < s.size() && s[i] == ']') { i++; break; }
          ok = fail("expected ',' or ']'");
          break;
        }
      }
    } else if (c == '"') {
      v->type = Json::String;
      ok = string(&v->str);
    } else if (c == 't') {
      v->type = Json::Bool; v->b = true; ok = lit("true");
    } else if (c == 'f') {
      v->type = Json::Bool; v->b = false; ok = lit("false");
    } else if (c == 'n') {
      v->type = Json::Null; ok = lit("null");
    } else if (c == '-' || (c >= '0' && c <= '9')) {
      size_t j = i;
      if (s[j] == '-') j++;
      while (j < s.size() && ((s[j] >= '0' && s[j] <= '9') || s[j] == '.' || s[j] == 'e' || s[j] == 'E' ||
                              s[j] == '+' || s[j] == '-'))
        j++;
      std::string num = s.substr(i, j - i);
      char* end = nullptr;
      v->type = Json::Number;
      v->num = std::strtod(num.c_str(), &end);
      if (end == nullptr || *end != '\0' || num == "-") ok = fail("bad number");
      else i = j;
    } else {
      ok = fail(std::string("unexpected character '") + c + "'");
    }
    depth--;
    return ok;
  }
};

}  // namespace

bool Json::parse(const std::string& text, Json* out, std::string* err) {
  Parser p(text);
  Json v;
  if (!p.value(&v)) {
    if (err) *err = p.err;
    return false;
  }
  p.ws();
  if (p.i != text.size()) {
    if (err) *err = "trailing characters at byte " + std::to_string(p.i);
    return false;
  }
  *out = std::move(v);
  return true;
}

}  // namespace first_edge
