#include "first_runner.h"

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <numeric>
#include <random>
#include <set>
#include <sstream>
#include <sys/stat.h>
#include <unordered_set>

#include "json.h"
#include "sha256.h"

// The wheel ships libexecutorch_threadpool but not its header; these two symbols are its public API.
namespace executorch {
namespace extension {
namespace threadpool {
class ThreadPool {
 public:
  bool _unsafe_reset_threadpool(uint32_t num_threads);
};
ThreadPool* get_threadpool();
}  // namespace threadpool
}  // namespace extension
}  // namespace executorch

namespace first_edge {

using executorch::aten::ScalarType;
using executorch::extension::from_blob;
using executorch::extension::Module;
using executorch::extension::TensorPtr;
using executorch::runtime::EValue;

namespace {

constexpr int kFormatVersion = 1;

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

std::string et_error(executorch::runtime::Error e) { return "ExecuTorch error " + std::to_string((int)e); }

Status get_int(const Json& obj, const char* section, const char* key, int* out, bool positive = true) {
  int64_t v;
  if (!obj.has(key)) return Status::Error(std::string("manifest '") + section + "' section lacks '" + key + "'");
  if (!obj[key].as_int(&v) || (positive && v <= 0) || v > (1LL << 31) - 1)
    return Status::Error(std::string("manifest ") + section + "." + key + " must be a positive integer");
  *out = (int)v;
  return Status::Ok();
}

}  // namespace

// ------------------------------------------------------------------------------------------------
Status load_bundle_info(const std::string& dir_in, BundleInfo* out, bool verify_hashes) {
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
  Status s;
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
  }
  if (info.layer_methods.empty())
    for (int l = 0; l < info.n_layers; l++) info.layer_methods.push_back("layer_" + std::to_string(l));
  if ((int)info.layer_methods.size() != info.n_layers)
    return Status::Error("manifest lists " + std::to_string(info.layer_methods.size()) + " layer methods for " +
                         std::to_string(info.n_layers) + " layers");
  // files + hashes
  const Json& files = m["files"];
  if (!files.is_obj() || files.obj.empty()) return Status::Error("manifest lists no files");
  for (const char* req : {"tokenizer.json"})
    if (!files.has(req)) return Status::Error(std::string("manifest does not list the required file ") + req);
  if (!files.has(info.pte_file)) return Status::Error("manifest does not list the required file " + info.pte_file);
  for (const auto& kv : files.obj) {
    const std::string& name = kv.first;
    if (name.find("..") != std::string::npos || (!name.empty() && name[0] == '/'))
      return Status::Error("manifest lists a file outside the bundle: " + name);
    std::string p = dir + "/" + name;
    bool d = false;
    if (!file_exists(p, &d) || d) return Status::Error("bundle file missing: " + name + " (listed in the manifest)");
    if (verify_hashes) {
      std::string hex;
      if (!sha256_file(p, &hex, &err)) return Status::Error(err);
      if (hex != kv.second.str)
        return Status::Error("bundle file " + name + " does not match its sha256 in the manifest (corrupt or modified)");
    }
  }
  *out = std::move(info);
  return Status::Ok();
}

// ------------------------------------------------------------------------------------------------
struct Runner::Impl {
  std::unique_ptr<Module> module;
  int64_t tok = 0, pos = 0;
  TensorPtr tok_t, pos_t;
  std::vector<float> new_kv;
};

Runner::~Runner() = default;

Status Runner::create(const std::string& bundle_dir, int threads, std::unique_ptr<Runner>* out, bool verify_hashes) {
  std::unique_ptr<Runner> r(new Runner());
  Status s = load_bundle_info(bundle_dir, &r->info_, verify_hashes);
  if (!s) return s;
  const BundleInfo& I = r->info_;
  if (threads > 0) {
    auto* tp = executorch::extension::threadpool::get_threadpool();
    if (tp) tp->_unsafe_reset_threadpool((uint32_t)threads);
  }
  r->impl_.reset(new Impl());
  Impl& M = *r->impl_;
  M.module.reset(new Module(I.path + "/" + I.pte_file, Module::LoadMode::Mmap));
  auto err = M.module->load();
  if (err != executorch::runtime::Error::Ok)
    return Status::Error("ExecuTorch cannot load " + I.pte_file + " (" + et_error(err) + ")");
  auto names = M.module->method_names();
  if (!names.ok()) return Status::Error("cannot list the methods of " + I.pte_file);
  std::vector<std::string> need = {I.prefill_method, I.embed_method, I.head_method};
  need.insert(need.end(), I.layer_methods.begin(), I.layer_methods.end());
  for (const auto& n : need) {
    if (!names->count(n)) return Status::Error(I.pte_file + " lacks the method '" + n + "' named in the manifest");
  }
  // constant methods must agree with the manifest
  auto check_const = [&](const char* name, int64_t want) -> Status {
    if (!names->count(name)) return Status::Ok();
    auto o = M.module->execute(name);
    if (!o.ok() || o->empty() || !(*o)[0].isInt()) return Status::Error(std::string("cannot read ") + name);
    if ((*o)[0].toInt() != want)
      return Status::Error(I.pte_file + " says " + name + " = " + std::to_string((*o)[0].toInt()) +
                           ", the manifest says " + std::to_string(want));
    return Status::Ok();
  };
  if (!(s = check_const("get_n_layers", I.n_layers))) return s;
  if (!(s = check_const("get_max_context_len", I.max_context))) return s;
  if (!(s = check_const("get_vocab_size", I.vocab_size))) return s;
  for (const auto& n : need) {
    err = M.module->load_method(n);
    if (err != executorch::runtime::Error::Ok)
      return Status::Error("ExecuTorch cannot load method '" + n + "' (" + et_error(err) + ")");
  }
  // graph dims: layer past key input [1, S, n_kv, head_dim]
  auto meta = M.module->method_meta(I.layer_methods[0]);
  if (!meta.ok() || meta->num_inputs() != 5) return Status::Error("unexpected signature of " + I.layer_methods[0]);
  auto pk = meta->input_tensor_meta(3);
  if (!pk.ok() || pk->sizes().size() != 4 || pk->sizes()[2] != I.n_kv_heads || pk->sizes()[3] != I.head_dim)
    return Status::Error("model.pte K/V dims do not match the manifest (n_kv_heads " + std::to_string(I.n_kv_heads) +
                         ", head_dim " + std::to_string(I.head_dim) + ")");
  auto hm = M.module->method_meta(I.head_method);
  if (!hm.ok() || hm->num_outputs() != 1) return Status::Error("unexpected signature of " + I.head_method);
  auto lo = hm->output_tensor_meta(0);
  if (!lo.ok() || lo->sizes().size() != 2 || lo->sizes()[1] != I.vocab_size)
    return Status::Error("model.pte vocabulary does not match the manifest's vocab_size " + std::to_string(I.vocab_size));
  size_t per = (size_t)I.max_context * I.n_kv_heads * I.head_dim;
  r->k_.assign(I.n_layers, std::vector<float>(per, 0.f));
  r->v_.assign(I.n_layers, std::vector<float>(per, 0.f));
  r->len_.assign(I.n_layers, 0);
  r->layer_calls_.assign(I.n_layers, 0);
  M.tok_t = from_blob(&M.tok, {1, 1}, ScalarType::Long);
  M.pos_t = from_blob(&M.pos, {1}, ScalarType::Long);
  *out = std::move(r);
  return Status::Ok();
}

Status Runner::prefill(const std::vector<int64_t>& ids_in, float threshold, std::vector<float>* logits,
                       std::vector<float>* scores, std::vector<uint8_t>* mask) {
  const BundleInfo& I = info_;
  Impl& M = *impl_;
  int T = (int)ids_in.size();
  if (T == 0) return Status::Error("the prompt is empty");
  if (T >= I.max_context)
    return Status::Error("prompt has " + std::to_string(T) + " tokens, longer than the context of " +
                         std::to_string(I.max_context) + " tokens (at least one position must be left to generate)");
  for (int64_t t : ids_in)
    if (t < 0 || t >= I.vocab_size)
      return Status::Error("token id " + std::to_string(t) + " is outside the vocabulary (0.." +
                           std::to_string(I.vocab_size - 1) + ")");
  if (!std::isfinite(threshold)) return Status::Error("the threshold must be a finite number");
  std::vector<int64_t> ids(ids_in);
  float thr = threshold;
  auto ids_t = from_blob(ids.data(), {1, T}, ScalarType::Long);
  auto thr_t = from_blob(&thr, {1}, ScalarType::Float);
  auto out = M.module->execute(I.prefill_method, {EValue(ids_t), EValue(thr_t)});
  if (!out.ok()) return Status::Error("prefill failed (" + et_error(out.error()) + ")");
  const auto& o = *out;
  if ((int)o.size() != 3 + 2 * I.n_layers) return Status::Error("prefill returned an unexpected number of outputs");
  auto lt = o[0].toTensor();
  if (lt.numel() != I.vocab_size) return Status::Error("prefill logits have the wrong size");
  logits->assign(lt.const_data_ptr<float>(), lt.const_data_ptr<float>() + I.vocab_size);
  auto st = o[1].toTensor();
  scores->assign(st.const_data_ptr<float>(), st.const_data_ptr<float>() + I.n_layers);
  auto mt = o[2].toTensor();
  const bool* mb = mt.const_data_ptr<bool>();
  mask->assign(I.n_layers, 0);
  for (int l = 0; l < I.n_layers; l++) (*mask)[l] = mb[l] ? 1 : 0;
  const int nkv = I.n_kv_heads, hd = I.head_dim;
  for (int l = 0; l < I.n_layers; l++) {
    // present [1, n_kv, T, hd] -> sequence-major rows 0..T-1 (once per prompt)
    for (int w = 0; w < 2; w++) {
      auto t = o[3 + 2 * l + w].toTensor();
      if (t.numel() != (ssize_t)nkv * T * hd) return Status::Error("prefill K/V have the wrong size");
      const float* src = t.const_data_ptr<float>();
      float* dst = (w == 0 ? k_ : v_)[l].data();
      for (int h = 0; h < nkv; h++)
        for (int s = 0; s < T; s++)
          std::copy(src + ((size_t)h * T + s) * hd, src + ((size_t)h * T + s + 1) * hd, dst + ((size_t)s * nkv + h) * hd);
    }
    len_[l] = T;
  }
  std::fill(layer_calls_.begin(), layer_calls_.end(), 0);
  return Status::Ok();
}

Status Runner::decode(int64_t token, int64_t position, const std::vector<uint8_t>& mask, std::vector<float>* logits) {
  const BundleInfo& I = info_;
  Impl& M = *impl_;
  if ((int)mask.size() != I.n_layers)
    return Status::Error("layer mask has length " + std::to_string(mask.size()) + ", the model has " +
                         std::to_string(I.n_layers) + " layers");
  if (token < 0 || token >= I.vocab_size) return Status::Error("token id " + std::to_string(token) + " is outside the vocabulary");
  if (position < 0 || position >= I.max_context)
    return Status::Error("position " + std::to_string(position) + " is outside the context of " + std::to_string(I.max_context));
  M.tok = token;
  M.pos = position;
  auto e = M.module->execute(I.embed_method, {EValue(M.tok_t), EValue(M.pos_t)});
  if (!e.ok()) return Status::Error("embed failed (" + et_error(e.error()) + ")");
  EValue h = (*e)[0], cos = (*e)[1], sin = (*e)[2];
  const int nkv = I.n_kv_heads, hd = I.head_dim;
  const size_t row = (size_t)nkv * hd;
  for (int l = 0; l < I.n_layers; l++) {
    if (!mask[l]) continue;
    int n = len_[l];
    if (n >= I.max_context) return Status::Error("layer " + std::to_string(l) + " KV buffer is full");
    if (n == 0) return Status::Error("decode before prefill");
    auto pk = from_blob(k_[l].data(), {1, n, nkv, hd}, ScalarType::Float);  // zero-copy view of the past
    auto pv = from_blob(v_[l].data(), {1, n, nkv, hd}, ScalarType::Float);
    auto r = M.module->execute(I.layer_methods[l], {h, cos, sin, EValue(pk), EValue(pv)});
    if (!r.ok()) return Status::Error("layer " + std::to_string(l) + " failed (" + et_error(r.error()) + ")");
    h = (*r)[0];
    const float* kn = (*r)[1].toTensor().const_data_ptr<float>();
    const float* vn = (*r)[2].toTensor().const_data_ptr<float>();
    std::copy(kn, kn + row, k_[l].data() + (size_t)n * row);  // the new entry, in place
    std::copy(vn, vn + row, v_[l].data() + (size_t)n * row);
    len_[l] = n + 1;
    layer_calls_[l]++;
  }
  auto hd_out = M.module->execute(I.head_method, {h});
  if (!hd_out.ok()) return Status::Error("head failed (" + et_error(hd_out.error()) + ")");
  auto lt = (*hd_out)[0].toTensor();
  logits->assign(lt.const_data_ptr<float>(), lt.const_data_ptr<float>() + I.vocab_size);
  return Status::Ok();
}

// ------------------------------------------------------------------------------------------------
Status parse_mask(const std::string& text, int n_layers, std::vector<uint8_t>* out) {
  std::vector<uint8_t> m;
  for (char c : text) {
    if (c != '0' && c != '1') return Status::Error("a mask string must contain only the characters 0 and 1");
    m.push_back(c == '1');
  }
  if ((int)m.size() != n_layers)
    return Status::Error("layer mask has length " + std::to_string(m.size()) + ", the model has " +
                         std::to_string(n_layers) + " layers");
  *out = std::move(m);
  return Status::Ok();
}

Status budget_mask(const std::vector<float>& scores, int keep, const std::vector<int>& pinned, std::vector<uint8_t>* out) {
  int n = (int)scores.size();
  if (keep < 1 || keep > n)
    return Status::Error("--keep must be between 1 and the number of layers (" + std::to_string(n) + "), got " +
                         std::to_string(keep));
  std::vector<uint8_t> m(n, 0);
  for (int p : pinned) m[p] = 1;
  int have = (int)std::count(m.begin(), m.end(), 1);
  if (keep < have)
    return Status::Error("--keep " + std::to_string(keep) + " is smaller than the number of pinned layers (" +
                         std::to_string(have) + ")");
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return scores[a] > scores[b]; });
  for (int idx : order) {
    if (have >= keep) break;
    if (!m[idx]) {
      m[idx] = 1;
      have++;
    }
  }
  *out = std::move(m);
  return Status::Ok();
}

namespace {
int64_t sample(const std::vector<float>& logits, const GenerateOptions& o, std::mt19937_64& rng) {
  if (o.temperature <= 0.f) return (int64_t)(std::max_element(logits.begin(), logits.end()) - logits.begin());
  double mx = *std::max_element(logits.begin(), logits.end());
  std::vector<double> p(logits.size());
  double sum = 0;
  for (size_t i = 0; i < p.size(); i++) sum += (p[i] = std::exp((logits[i] - mx) / o.temperature));
  for (double& x : p) x /= sum;
  std::vector<int> idx(p.size());
  std::iota(idx.begin(), idx.end(), 0);
  if (o.top_p < 1.f) {
    std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return p[a] > p[b]; });
    double cum = 0;
    size_t cut = 0;
    while (cut < idx.size()) {
      cum += p[idx[cut++]];
      if (cum >= o.top_p) break;
    }
    idx.resize(cut);
  }
  double tot = 0;
  for (int i : idx) tot += p[i];
  double u = std::uniform_real_distribution<double>(0.0, tot)(rng);
  for (int i : idx) {
    u -= p[i];
    if (u <= 0) return i;
  }
  return idx.back();
}
}  // namespace

Status Runner::generate(const std::vector<int64_t>& ids, const GenerateOptions& opt, GenerateResult* res,
                        const std::function<void(int64_t)>& on_token) {
  const BundleInfo& I = info_;
  if (opt.max_new_tokens < 1) return Status::Error("max_new_tokens must be at least 1");
  if (!(opt.temperature >= 0.f)) return Status::Error("temperature must be >= 0");
  if (!(opt.top_p > 0.f && opt.top_p <= 1.f)) return Status::Error("top_p must be in (0, 1]");
  if (!opt.mask.empty() && (opt.keep > 0 || opt.has_threshold))
    return Status::Error("give one of a mask, a threshold or a layer budget (--keep)");
  if (opt.keep > 0 && opt.has_threshold) return Status::Error("give either a threshold or a layer budget (--keep), not both");
  std::vector<uint8_t> user_mask;
  if (!opt.mask.empty()) {
    Status s = parse_mask(opt.mask, I.n_layers, &user_mask);
    if (!s) return s;
  }
  if (opt.keep != 0 && (opt.keep < 1 || opt.keep > I.n_layers))
    return Status::Error("--keep must be between 1 and the number of layers (" + std::to_string(I.n_layers) + "), got " +
                         std::to_string(opt.keep));
  GenerateResult r;
  float thr = opt.has_threshold ? opt.threshold : I.default_threshold;
  auto t0 = std::chrono::steady_clock::now();
  std::vector<float> logits, scores;
  std::vector<uint8_t> gmask;
  Status s = prefill(ids, thr, &logits, &scores, &gmask);
  if (!s) return s;
  if (!user_mask.empty()) {
    r.mask = user_mask;
  } else if (opt.keep > 0) {
    s = budget_mask(scores, opt.keep, I.pinned, &r.mask);
    if (!s) return s;
  } else {
    r.mask = gmask;
    for (int p : I.pinned) r.mask[p] = 1;
  }
  std::mt19937_64 rng(opt.seed);
  std::set<int64_t> eos(I.eos_ids.begin(), I.eos_ids.end());
  int64_t tok = sample(logits, opt, rng);
  r.prefill_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  if (opt.keep_logits) r.logits.push_back(logits);
  r.tokens.push_back(tok);
  if (on_token) on_token(tok);
  r.stop_reason = "max_new_tokens";
  int64_t pos = (int64_t)ids.size();
  auto t1 = std::chrono::steady_clock::now();
  std::clock_t c1 = std::clock();
  while (true) {
    if (eos.count(tok) && !opt.ignore_eos) {
      r.stop_reason = "eos";
      break;
    }
    if ((int)r.tokens.size() >= opt.max_new_tokens) break;
    if (pos >= I.max_context) {
      r.stop_reason = "max_context";
      break;
    }
    s = decode(tok, pos, r.mask, &logits);
    if (!s) return s;
    if (opt.keep_logits) r.logits.push_back(logits);
    tok = sample(logits, opt, rng);
    r.tokens.push_back(tok);
    pos++;
    if (on_token) on_token(tok);
  }
  r.decode_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
  r.decode_cpu_s = double(std::clock() - c1) / CLOCKS_PER_SEC;
  r.scores = scores;
  r.layer_calls = layer_calls_;
  r.prompt_tokens = (int)ids.size();
  *res = std::move(r);
  return Status::Ok();
}

}  // namespace first_edge
