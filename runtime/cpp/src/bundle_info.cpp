// Bundle manifest reading and validation for the C++ runner (DESIGN.md section 3; the rules of
// runtime/bundle.py and runtime/graph_io.py): no ExecuTorch dependency, so the parser can be fuzzed alone.
#include <sys/stat.h>

#include <climits>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <sstream>

#include "first_runner.h"
#include "json.h"
#include "sha256.h"

namespace first_edge {

namespace {

constexpr int kFormatVersion = 3;  // runtime/bundle.py FORMAT_VERSION (3: the extend graph, chat.turn_prefix, chat.ids)

bool file_exists(const std::string& p, bool* is_dir = nullptr) {
  struct stat st;
  if (stat(p.c_str(), &st) != 0) return false;
  if (is_dir) *is_dir = S_ISDIR(st.st_mode);
  return true;
}

bool read_file(const std::string& p, std::string* out) {
  std::ifstream f(p, std::ios::binary);
  if (!f) return false;
  std::ostringstream ss;
  ss << f.rdbuf();
  *out = ss.str();
  return true;
}

Status get_int(const Json& obj, const char* section, const char* key, int* out, bool positive = true) {
  int64_t v;
  if (!obj.has(key)) return Status::Error(std::string("manifest '") + section + "' section lacks '" + key + "'");
  if (!obj[key].as_int(&v) || (positive && v <= 0) || v > (1LL << 31) - 1)
    return Status::Error(std::string("manifest ") + section + "." + key + " must be a positive integer");
  *out = (int)v;
  return Status::Ok();
}

std::mutex g_key_mu;
std::string g_key_file;  // set_trusted_key_file

// The trusted key file: the options', else the process default, else FIRST_EDGE_TRUSTED_KEY; "" if none.
std::string trusted_key_path(const BundleOptions& opt) {
  if (!opt.trusted_key_file.empty()) return opt.trusted_key_file;
  {
    std::lock_guard<std::mutex> lock(g_key_mu);
    if (!g_key_file.empty()) return g_key_file;
  }
  const char* env = std::getenv("FIRST_EDGE_TRUSTED_KEY");
  return env ? std::string(env) : std::string();
}

// Equal lengths compared without an early exit (no timing hint of where a forged signature first differs).
bool constant_time_equal(const std::string& a, const std::string& b) {
  if (a.size() != b.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < a.size(); i++) diff |= (unsigned char)(a[i] ^ b[i]);
  return diff == 0;
}

// manifest.sig must hold the hex HMAC-SHA256 of the manifest's bytes under the key (runtime/bundle.py).
Status verify_signature(const std::string& dir, const std::string& manifest, const std::string& key) {
  std::string sp = dir + "/manifest.sig", sig;
  struct stat st;
  if (stat(sp.c_str(), &st) != 0 || !S_ISREG(st.st_mode))
    return Status::Error("bundle " + dir + " is not signed (no manifest.sig) and a trusted key is configured: refused");
  if (st.st_size > 4096 || !read_file(sp, &sig)) return Status::Error("cannot read " + sp);
  size_t a = sig.find_first_not_of(" \t\r\n"), b = sig.find_last_not_of(" \t\r\n");
  sig = a == std::string::npos ? "" : sig.substr(a, b - a + 1);
  bool hex = sig.size() == 64;
  for (char& c : sig) {
    if (c >= 'A' && c <= 'F') c = (char)(c - 'A' + 'a');
    hex = hex && ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'));
  }
  if (!hex) return Status::Error(sp + " is not an HMAC-SHA256 signature (64 hex digits): refused");
  if (!constant_time_equal(sig, hmac_sha256(key, manifest)))
    return Status::Error("manifest.sig of bundle " + dir + " does not verify with the trusted key (signed with "
                         "another key, or manifest.json was changed after signing): refused");
  return Status::Ok();
}

// graphs.io: a list of {name, dtype, shape} (runtime/graph_io.py)
Status parse_specs(const Json& list, const std::string& where, std::vector<TensorSpec>* out) {
  if (!list.is_arr()) return Status::Error("manifest graphs.io." + where + " must be a list");
  for (const Json& e : list.arr) {
    if (!e.is_obj() || !e["name"].is_str() || e["name"].str.empty() || !e["dtype"].is_str() || !e["shape"].is_arr())
      return Status::Error("manifest graphs.io." + where + ": each entry must be an object with name, dtype and shape");
    TensorSpec t;
    t.name = e["name"].str;
    t.dtype = e["dtype"].str;
    if (t.dtype != "int64" && t.dtype != "int32" && t.dtype != "float32" && t.dtype != "bool")
      return Status::Error("manifest graphs.io." + where + "." + t.name + ": unknown dtype '" + t.dtype + "'");
    for (const Json& d : e["shape"].arr) {
      int64_t v;
      if (d.as_int(&v) && v >= 0 && v <= (1LL << 31) - 1) t.shape.push_back(v);
      else if (d.is_str() && (d.str == "T" || d.str == "S")) t.shape.push_back(-1);
      else return Status::Error("manifest graphs.io." + where + "." + t.name + ": a shape must list sizes or T/S");
    }
    out->push_back(std::move(t));
  }
  return Status::Ok();
}

// chat.ids: token ids of the chat template's pieces ({"prefix": [...], "suffix": [...], "turn_prefix": [...] or
// null}); every id within the vocabulary, only turn_prefix may be null (runtime/bundle.py)
Status parse_chat_ids(const Json& chat, int vocab_size, ChatIds* out) {
  if (chat.type == Json::Null) return Status::Ok();
  if (!chat.is_obj() || (chat.has("prefix") && !chat["prefix"].is_str()) || (chat.has("suffix") && !chat["suffix"].is_str()))
    return Status::Error("manifest chat.prefix and chat.suffix must be strings");
  if (chat.has("turn_prefix") && !chat["turn_prefix"].is_str() && chat["turn_prefix"].type != Json::Null)
    return Status::Error("manifest chat.turn_prefix must be a string or null");
  if (!chat.has("ids")) return Status::Ok();
  const Json& ids = chat["ids"];
  const std::string bad = "manifest chat.ids must map template pieces to lists of token ids within the vocabulary";
  if (!ids.is_obj()) return Status::Error(bad);
  for (const auto& kv : ids.obj) {
    if (kv.first == "turn_prefix" && kv.second.type == Json::Null) continue;
    if (!kv.second.is_arr()) return Status::Error(bad + " (" + kv.first + ")");
    std::vector<int64_t> v;
    for (const Json& e : kv.second.arr) {
      int64_t t;
      if (!e.as_int(&t) || t < 0 || t >= vocab_size)
        return Status::Error(bad + " (" + kv.first + " holds " + (e.is_num() ? "an id outside 0.." + std::to_string(vocab_size - 1) : std::string("a non-integer")) + ")");
      v.push_back(t);
    }
    if (kv.first == "prefix") out->prefix = std::move(v), out->has_prefix = true;
    else if (kv.first == "suffix") out->suffix = std::move(v), out->has_suffix = true;
    else if (kv.first == "turn_prefix") out->turn_prefix = std::move(v), out->has_turn_prefix = true;
  }
  return Status::Ok();
}

// The graphs the runner calls and the tensors it binds in each, by name (DESIGN.md section 2).
Status parse_io(const Json& io, int n_layers, std::map<std::string, GraphIo>* out) {
  if (!io.is_obj()) return Status::Error("manifest has no graphs.io section (the graphs' inputs and outputs); rebuild the bundle");
  std::vector<std::string> pre_out = {"logits", "router_scores", "layer_mask"};
  for (int l = 0; l < n_layers; l++) {
    pre_out.push_back("present." + std::to_string(l) + ".key");
    pre_out.push_back("present." + std::to_string(l) + ".value");
  }
  // extend (a chat session's next turn): the new tokens and every layer's past in, the new K/V out
  std::vector<std::string> ext_in = {"input_ids"}, ext_out = {"logits", "router_probs"};
  for (int l = 0; l < n_layers; l++) {
    ext_in.push_back("past_key_values." + std::to_string(l) + ".key");
    ext_in.push_back("past_key_values." + std::to_string(l) + ".value");
    ext_out.push_back("present." + std::to_string(l) + ".key");
    ext_out.push_back("present." + std::to_string(l) + ".value");
  }
  const std::vector<std::pair<std::string, std::pair<std::vector<std::string>, std::vector<std::string>>>> need = {
      {"prefill", {{"input_ids", "threshold"}, pre_out}},
      {"embed", {{"input_ids", "position"}, {"hidden_states", "cos", "sin"}}},
      {"layer", {{"hidden_states", "cos", "sin", "past_key_values.{l}.key", "past_key_values.{l}.value"},
                 {"hidden_states_out", "present.{l}.key", "present.{l}.value"}}},
      {"head", {{"hidden_states"}, {"logits"}}},
      {"extend", {ext_in, ext_out}},
  };
  for (const auto& g : need) {
    const Json& gj = io[g.first];
    if (!gj.is_obj()) return Status::Error("manifest graphs.io lacks the graph '" + g.first + "'");
    GraphIo gio;
    Status s = parse_specs(gj["inputs"], g.first + ".inputs", &gio.inputs);
    if (!s) return s;
    if (!(s = parse_specs(gj["outputs"], g.first + ".outputs", &gio.outputs))) return s;
    for (int side = 0; side < 2; side++) {
      const auto& names = side == 0 ? g.second.first : g.second.second;
      const auto& specs = side == 0 ? gio.inputs : gio.outputs;
      const char* what = side == 0 ? "inputs" : "outputs";
      for (const auto& n : names)
        if ((side == 0 ? gio.input(n) : gio.output(n)) < 0)
          return Status::Error("manifest graphs.io." + g.first + "." + what + " lacks " + n);
      if (specs.size() != names.size())
        return Status::Error("bundle dims do not match the graphs: graphs.io." + g.first + "." + what + " has " +
                             std::to_string(specs.size()) + " tensors, n_layers=" + std::to_string(n_layers) +
                             " gives " + std::to_string(names.size()));
    }
    (*out)[g.first] = std::move(gio);
  }
  return Status::Ok();
}

}  // namespace

int GraphIo::input(const std::string& name) const {
  for (size_t i = 0; i < inputs.size(); i++)
    if (inputs[i].name == name) return (int)i;
  return -1;
}

int GraphIo::output(const std::string& name) const {
  for (size_t i = 0; i < outputs.size(); i++)
    if (outputs[i].name == name) return (int)i;
  return -1;
}

// ------------------------------------------------------------------------------------------------
void set_trusted_key_file(const std::string& path) {
  std::lock_guard<std::mutex> lock(g_key_mu);
  g_key_file = path;
}

Status load_bundle_info(const std::string& dir, BundleInfo* out, bool verify_hashes) {
  BundleOptions opt;
  opt.verify_hashes = verify_hashes;
  return load_bundle_info(dir, out, opt);
}

Status load_bundle_info(const std::string& dir_in, BundleInfo* out, const BundleOptions& opt) {
  bool verify_hashes = opt.verify_hashes;
  std::string key;
  const std::string key_path = trusted_key_path(opt);
  if (!key_path.empty()) {  // a configured key that cannot be read refuses every bundle (fail closed)
    struct stat st;  // a regular file (not a folder, nor a device that never ends)
    if (stat(key_path.c_str(), &st) != 0 || !S_ISREG(st.st_mode) || !read_file(key_path, &key))
      return Status::Error("cannot read the trusted key file " + key_path);
    if (key.empty()) return Status::Error("the trusted key file " + key_path + " is empty");
    verify_hashes = true;  // the signature covers the files through their hashes
  }
  BundleInfo info;
  std::string dir = dir_in;
  while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
  info.path = dir;
  bool is_dir = false;
  if (!file_exists(dir, &is_dir)) return Status::Error("bundle folder not found: " + dir);
  if (!is_dir) return Status::Error("the bundle must be a folder: " + dir);
  std::string mf = dir + "/manifest.json", text, err;
  if (!file_exists(mf)) return Status::Error("not a FiRST-Edge bundle (no manifest.json) in " + dir);
  if (!read_file(mf, &text)) return Status::Error("cannot read " + mf);
  Status s;
  if (!key.empty() && !(s = verify_signature(dir, text, key))) return s;  // before the manifest is even parsed
  Json m;
  if (!Json::parse(text, &m, &err)) return Status::Error(mf + " is not valid JSON: " + err);
  if (!m.is_obj()) return Status::Error(mf + " must hold a JSON object");
  int64_t ver = -1;
  if (!m["format_version"].as_int(&ver) || ver != kFormatVersion)
    return Status::Error("unknown bundle format version in " + mf + " (this runtime reads version " +
                         std::to_string(kFormatVersion) + "); rebuild the bundle with the matching toolchain");
  if (m["runtime"].str != "executorch")
    return Status::Error("this runner needs an ExecuTorch bundle (--target android); the manifest names runtime '" +
                         m["runtime"].str + "'");
  const Json& model = m["model"];
  if (!model.is_obj()) return Status::Error("manifest has no 'model' section");
  if (!(s = get_int(model, "model", "n_layers", &info.n_layers))) return s;
  if (!(s = get_int(model, "model", "hidden_size", &info.hidden_size))) return s;
  if (!(s = get_int(model, "model", "n_heads", &info.n_heads))) return s;
  if (!(s = get_int(model, "model", "n_kv_heads", &info.n_kv_heads))) return s;
  if (!(s = get_int(model, "model", "head_dim", &info.head_dim))) return s;
  if (!(s = get_int(model, "model", "vocab_size", &info.vocab_size))) return s;
  if (!(s = get_int(model, "model", "max_context", &info.max_context))) return s;
  if (info.n_heads % info.n_kv_heads)
    return Status::Error("manifest dims inconsistent: n_heads " + std::to_string(info.n_heads) +
                         " is not a multiple of n_kv_heads " + std::to_string(info.n_kv_heads));
  if (info.max_context < 2) return Status::Error("manifest model.max_context must be at least 2");
  info.name = model["name"].str;
  info.architecture = model["architecture"].str;
  info.quantization = m["quantization"].str;
  const Json& tokens = m["tokens"];
  int64_t v;
  if (tokens["bos_id"].as_int(&v)) info.bos_id = v;
  for (const Json& e : tokens["eos_ids"].arr)
    if (e.as_int(&v)) info.eos_ids.push_back(v);
  if (!(s = parse_chat_ids(m["chat"], info.vocab_size, &info.chat_ids))) return s;
  const Json& routing = m["routing"];
  if (routing["default_threshold"].is_num()) info.default_threshold = (float)routing["default_threshold"].num;
  if (routing.has("pool_start")) {  // applied inside the prefill method; checked so a bad manifest is refused
    if (!routing["pool_start"].as_int(&v) || v < 0 || v > (1LL << 31) - 1)
      return Status::Error("manifest routing.pool_start must be a non-negative integer");
    info.pool_start = (int)v;
  }
  for (const Json& p : routing["pinned"].arr) {
    if (!p.as_int(&v) || v < 0 || v >= info.n_layers)
      return Status::Error("manifest pins a layer outside 0.." + std::to_string(info.n_layers - 1));
    info.pinned.push_back((int)v);
  }
  const Json& g = m["graphs"];
  if (!g.is_obj()) return Status::Error("manifest has no 'graphs' section");
  if (g.has("decode_shape") && g["decode_shape"].str != "split")
    return Status::Error("ExecuTorch bundles need decode_shape 'split', the manifest says '" + g["decode_shape"].str + "'");
  if (!g["files"].is_arr() || g["files"].arr.empty() || !g["files"].arr[0].is_str())
    return Status::Error("manifest lists no graph file");
  info.pte_file = g["files"].arr[0].str;
  info.weights = g["weights"].str;
  const Json& meth = g["methods"];
  if (meth.is_obj()) {
    if (meth["prefill"].is_str()) info.prefill_method = meth["prefill"].str;
    if (meth["embed"].is_str()) info.embed_method = meth["embed"].str;
    if (meth["head"].is_str()) info.head_method = meth["head"].str;
    for (const Json& n : meth["layers"].arr) info.layer_methods.push_back(n.str);
    if (meth.has("extend")) {
      if (!meth["extend"].is_str() || meth["extend"].str.empty())
        return Status::Error("manifest graphs.methods.extend must name the extend method");
      info.extend_method = meth["extend"].str;
    }
  }
  if (info.layer_methods.empty())
    for (int l = 0; l < info.n_layers; l++) info.layer_methods.push_back("layer_" + std::to_string(l));
  if ((int)info.layer_methods.size() != info.n_layers)
    return Status::Error("manifest lists " + std::to_string(info.layer_methods.size()) + " layer methods for " +
                         std::to_string(info.n_layers) + " layers");
  if (!(s = parse_io(g["io"], info.n_layers, &info.io))) return s;
  // files + hashes
  const Json& files = m["files"];
  if (!files.is_obj() || files.obj.empty()) return Status::Error("manifest lists no files");
  // every listed file: a name inside the folder (checked before anything is read), an entry
  // {"sha256": 64 hex digits, "bytes": size}, the size before the hash
  char* real_dir_c = realpath(dir.c_str(), nullptr);
  if (!real_dir_c) return Status::Error("cannot resolve the bundle folder " + dir);
  std::string real_dir(real_dir_c);
  std::free(real_dir_c);
  for (const auto& kv : files.obj) {
    const std::string& name = kv.first;
    bool bad = name.empty() || name[0] == '/' || name.find('\\') != std::string::npos ||
               name.find('\0') != std::string::npos;
    for (size_t a = 0; !bad && a <= name.size();) {  // no ".." path component
      size_t b = name.find('/', a);
      if (b == std::string::npos) b = name.size();
      bad = name.compare(a, b - a, "..") == 0 && b - a == 2;
      a = b + 1;
    }
    if (bad) return Status::Error("manifest names a file outside the bundle: " + name);
    const Json& e = kv.second;
    int64_t bytes = -1;
    if (!e.is_obj() || !e["sha256"].is_str() || e["sha256"].str.size() != 64 || !e["bytes"].as_int(&bytes) || bytes < 0)
      return Status::Error("manifest entry of " + name + " must be {\"sha256\": 64 hex digits, \"bytes\": a size}");
    std::string p = dir + "/" + name;
    char* rp = realpath(p.c_str(), nullptr);
    if (rp) {
      std::string real(rp);
      std::free(rp);
      if (real.compare(0, real_dir.size() + 1, real_dir + "/") != 0)
        return Status::Error("bundle file " + name + " leaves the bundle folder (a link to " + real + ")");
    }
  }
  for (const char* req : {"tokenizer.json"})
    if (!files.has(req)) return Status::Error(std::string("manifest does not list the required file ") + req);
  if (!files.has(info.pte_file)) return Status::Error("manifest does not list the required file " + info.pte_file);
  for (const auto& kv : files.obj) {
    const std::string& name = kv.first;
    std::string p = dir + "/" + name;
    struct stat st;
    if (stat(p.c_str(), &st) != 0 || !S_ISREG(st.st_mode))
      return Status::Error("bundle file missing: " + name + " (listed in the manifest)");
    if (verify_hashes) {  // integrity: the size first (cheap), then the hash
      int64_t bytes = 0;
      kv.second["bytes"].as_int(&bytes);
      if ((int64_t)st.st_size != bytes)
        return Status::Error("bundle file " + name + " has " + std::to_string((long long)st.st_size) +
                             " bytes, the manifest says " + std::to_string((long long)bytes) + " (truncated or modified)");
      std::string hex;
      if (!sha256_file(p, &hex, &err)) return Status::Error(err);
      if (hex != kv.second["sha256"].str)
        return Status::Error("bundle file " + name + " does not match its sha256 in the manifest (corrupt or modified)");
    }
  }
  *out = std::move(info);
  return Status::Ok();
}

}  // namespace first_edge
