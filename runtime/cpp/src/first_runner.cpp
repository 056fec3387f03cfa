#include "first_runner.h"

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>

#include <algorithm>
#include <atomic>
#include <thread>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <numeric>
#include <random>
#include <set>
#include <sstream>
#include <sys/stat.h>
#include <unordered_set>


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

std::string et_error(executorch::runtime::Error e) { return "ExecuTorch error " + std::to_string((int)e); }

const char* dtype_name(ScalarType t) {
  switch (t) {
    case ScalarType::Long: return "int64";
    case ScalarType::Int: return "int32";
    case ScalarType::Float: return "float32";
    case ScalarType::Bool: return "bool";
    default: return "other";
  }
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); i++) r += (i ? ", " : "") + (s[i] < 0 ? std::string("?") : std::to_string(s[i]));
  return r + "]";
}

// The one metadata reader: a method's inputs and outputs have the count, dtypes and fixed sizes that
// the manifest declares (symbolic sizes are free).
Status check_signature(Module& module, const std::string& method, const GraphIo& io) {
  auto meta = module.method_meta(method);
  if (!meta.ok()) return Status::Error("cannot read the signature of method '" + method + "'");
  if (meta->num_inputs() != io.inputs.size() || meta->num_outputs() != io.outputs.size())
    return Status::Error("bundle dims do not match the graphs: method " + method + " has " +
                         std::to_string(meta->num_inputs()) + " inputs and " + std::to_string(meta->num_outputs()) +
                         " outputs, the manifest declares " + std::to_string(io.inputs.size()) + " and " +
                         std::to_string(io.outputs.size()));
  for (int side = 0; side < 2; side++) {
    const auto& specs = side == 0 ? io.inputs : io.outputs;
    for (size_t i = 0; i < specs.size(); i++) {
      auto t = side == 0 ? meta->input_tensor_meta(i) : meta->output_tensor_meta(i);
      if (!t.ok()) return Status::Error("method " + method + " " + (side == 0 ? "input " : "output ") + specs[i].name + " is not a tensor");
      auto sizes = t->sizes();
      bool ok = dtype_name(t->scalar_type()) == specs[i].dtype && sizes.size() == specs[i].shape.size();
      for (size_t d = 0; ok && d < sizes.size(); d++) ok = specs[i].shape[d] < 0 || specs[i].shape[d] == sizes[d];
      if (!ok) {
        std::vector<int64_t> got(sizes.begin(), sizes.end());
        return Status::Error("bundle dims do not match the graphs: method " + method + " " +
                             (side == 0 ? "input " : "output ") + specs[i].name + " is " + dtype_name(t->scalar_type()) +
                             " " + shape_str(got) + ", the manifest says " + specs[i].dtype + " " + shape_str(specs[i].shape));
      }
    }
  }
  return Status::Ok();
}

}  // namespace

// ------------------------------------------------------------------------------------------------
struct Runner::Impl {
  std::unique_ptr<Module> module;
  int64_t tok = 0, pos = 0;
  TensorPtr tok_t, pos_t;
  std::vector<std::vector<float>> k, v;  // per layer [max_context, n_kv, head_dim], sequence-major
  std::vector<int> len;                  // entries held per layer
  std::vector<int64_t> layer_calls;      // decode-time executions per layer since the last prefill
  // argument and result positions, by name from the manifest's graphs.io
  int pre_ids, pre_thr, pre_logits, pre_scores, pre_mask;
  std::vector<int> pre_k, pre_v;
  int emb_ids, emb_pos, emb_h, emb_cos, emb_sin;
  int lay_h, lay_cos, lay_sin, lay_pk, lay_pv, lay_out_h, lay_out_k, lay_out_v;
  int head_h, head_logits;
  int ext_ids, ext_logits, ext_probs;
  std::vector<int> ext_pk, ext_pv, ext_k, ext_v;  // per layer
  bool extend_loaded = false;  // the extend method is loaded on first use
  std::vector<EValue> embed_args, layer_args, head_args;  // reused by every decode step (filled in place)
  // one thread at a time (a Runner's KV buffers are its state); re-entrant for generate -> prefill/decode
  std::atomic<bool> busy{false};
  std::atomic<std::thread::id> owner{};
  int depth = 0;
};

namespace {
// Marks a Runner in use by this thread for the guard's lifetime; another thread gets an error.
class InUse {
 public:
  explicit InUse(Runner::Impl& impl) : impl_(impl) {
    if (impl_.busy.load() && impl_.owner.load() == std::this_thread::get_id()) {
      impl_.depth++;
      ok_ = true;
      return;
    }
    bool expected = false;
    ok_ = impl_.busy.compare_exchange_strong(expected, true);
    if (ok_) {
      impl_.owner.store(std::this_thread::get_id());
      impl_.depth = 1;
    }
  }
  ~InUse() {
    if (ok_ && --impl_.depth == 0) {
      impl_.owner.store(std::thread::id());
      impl_.busy.store(false);
    }
  }
  bool ok() const { return ok_; }
  static Status error() {
    return Status::Error("this Runner is in use by another thread (a Runner is not thread-safe: use one per thread)");
  }

 private:
  Runner::Impl& impl_;
  bool ok_ = false;
};
}  // namespace

Runner::~Runner() = default;

const std::vector<int64_t>& Runner::layer_calls() const { return impl_->layer_calls; }

Status Runner::create(const std::string& bundle_dir, int threads, std::unique_ptr<Runner>* out, bool verify_hashes) {
  std::unique_ptr<Runner> r(new Runner());
  Status s = load_bundle_info(bundle_dir, &r->info_, verify_hashes);
  if (!s) return s;
  const BundleInfo& info = r->info_;
  if (threads > 0) {
    auto* tp = executorch::extension::threadpool::get_threadpool();
    if (tp) tp->_unsafe_reset_threadpool((uint32_t)threads);
  }
  r->impl_.reset(new Impl());
  Impl& impl = *r->impl_;
  impl.module.reset(new Module(info.path + "/" + info.pte_file, Module::LoadMode::Mmap));
  // InternalConsistency: the flatbuffer is verified at load (a bundle is untrusted input)
  auto err = impl.module->load(executorch::runtime::Program::Verification::InternalConsistency);
  if (err != executorch::runtime::Error::Ok)
    return Status::Error("ExecuTorch cannot load " + info.pte_file + " (" + et_error(err) + ")");
  auto names = impl.module->method_names();
  if (!names.ok()) return Status::Error("cannot list the methods of " + info.pte_file);
  std::vector<std::string> need = {info.prefill_method, info.embed_method, info.head_method};
  need.insert(need.end(), info.layer_methods.begin(), info.layer_methods.end());
  for (const auto& n : need) {
    if (!names->count(n)) return Status::Error(info.pte_file + " lacks the method '" + n + "' named in the manifest");
  }
  if (!names->count(info.extend_method))
    return Status::Error(info.pte_file + " lacks the extend method '" + info.extend_method + "' named in the manifest");
  // constant methods must agree with the manifest
  auto check_const = [&](const char* name, int64_t want) -> Status {
    if (!names->count(name)) return Status::Ok();
    auto o = impl.module->execute(name);
    if (!o.ok() || o->empty() || !(*o)[0].isInt()) return Status::Error(std::string("cannot read ") + name);
    if ((*o)[0].toInt() != want)
      return Status::Error(info.pte_file + " says " + name + " = " + std::to_string((*o)[0].toInt()) +
                           ", the manifest says " + std::to_string(want));
    return Status::Ok();
  };
  if (!(s = check_const("get_n_layers", info.n_layers))) return s;
  if (!(s = check_const("get_max_context_len", info.max_context))) return s;
  if (!(s = check_const("get_vocab_size", info.vocab_size))) return s;
  for (const auto& n : need) {
    err = impl.module->load_method(n);
    if (err != executorch::runtime::Error::Ok)
      return Status::Error("ExecuTorch cannot load method '" + n + "' (" + et_error(err) + ")");
  }
  // every method's signature is the one the manifest declares
  const GraphIo &pre = info.io.at("prefill"), &emb = info.io.at("embed"), &lay = info.io.at("layer"),
                &head = info.io.at("head");
  if (!(s = check_signature(*impl.module, info.prefill_method, pre))) return s;
  if (!(s = check_signature(*impl.module, info.embed_method, emb))) return s;
  for (const auto& n : info.layer_methods)
    if (!(s = check_signature(*impl.module, n, lay))) return s;
  if (!(s = check_signature(*impl.module, info.head_method, head))) return s;
  // extend: its signature is read now (method_meta does not load it); the method itself on first use
  const GraphIo& ext = info.io.at("extend");
  if (!(s = check_signature(*impl.module, info.extend_method, ext))) return s;
  // and the manifest's model dims are the graphs' (layer past key [1, S, n_kv, head_dim], logits [1, vocab])
  const auto& pk = lay.inputs[lay.input("past_key_values.{l}.key")].shape;
  if (pk.size() != 4 || pk[2] != info.n_kv_heads || pk[3] != info.head_dim)
    return Status::Error("model.pte K/V dims do not match the manifest (n_kv_heads " + std::to_string(info.n_kv_heads) +
                         ", head_dim " + std::to_string(info.head_dim) + ")");
  const auto& lg = head.outputs[head.output("logits")].shape;
  if (lg.size() != 2 || lg[1] != info.vocab_size)
    return Status::Error("model.pte vocabulary does not match the manifest's vocab_size " + std::to_string(info.vocab_size));
  impl.pre_ids = pre.input("input_ids");
  impl.pre_thr = pre.input("threshold");
  impl.pre_logits = pre.output("logits");
  impl.pre_scores = pre.output("router_scores");
  impl.pre_mask = pre.output("layer_mask");
  for (int l = 0; l < info.n_layers; l++) {
    impl.pre_k.push_back(pre.output("present." + std::to_string(l) + ".key"));
    impl.pre_v.push_back(pre.output("present." + std::to_string(l) + ".value"));
  }
  impl.emb_ids = emb.input("input_ids");
  impl.emb_pos = emb.input("position");
  impl.emb_h = emb.output("hidden_states");
  impl.emb_cos = emb.output("cos");
  impl.emb_sin = emb.output("sin");
  impl.lay_h = lay.input("hidden_states");
  impl.lay_cos = lay.input("cos");
  impl.lay_sin = lay.input("sin");
  impl.lay_pk = lay.input("past_key_values.{l}.key");
  impl.lay_pv = lay.input("past_key_values.{l}.value");
  impl.lay_out_h = lay.output("hidden_states_out");
  impl.lay_out_k = lay.output("present.{l}.key");
  impl.lay_out_v = lay.output("present.{l}.value");
  impl.ext_ids = ext.input("input_ids");
  impl.ext_logits = ext.output("logits");
  impl.ext_probs = ext.output("router_probs");
  for (int l = 0; l < info.n_layers; l++) {
    impl.ext_pk.push_back(ext.input("past_key_values." + std::to_string(l) + ".key"));
    impl.ext_pv.push_back(ext.input("past_key_values." + std::to_string(l) + ".value"));
    impl.ext_k.push_back(ext.output("present." + std::to_string(l) + ".key"));
    impl.ext_v.push_back(ext.output("present." + std::to_string(l) + ".value"));
  }
  impl.head_h = head.input("hidden_states");
  impl.head_logits = head.output("logits");
  size_t per = (size_t)info.max_context * info.n_kv_heads * info.head_dim;
  impl.k.assign(info.n_layers, std::vector<float>(per, 0.f));
  impl.v.assign(info.n_layers, std::vector<float>(per, 0.f));
  impl.len.assign(info.n_layers, 0);
  impl.layer_calls.assign(info.n_layers, 0);
  impl.tok_t = from_blob(&impl.tok, {1, 1}, ScalarType::Long);
  impl.pos_t = from_blob(&impl.pos, {1}, ScalarType::Long);
  impl.embed_args.resize(emb.inputs.size());
  impl.embed_args[impl.emb_ids] = EValue(impl.tok_t);
  impl.embed_args[impl.emb_pos] = EValue(impl.pos_t);
  impl.layer_args.resize(lay.inputs.size());
  impl.head_args.resize(head.inputs.size());
  *out = std::move(r);
  return Status::Ok();
}

Status Runner::prefill(const std::vector<int64_t>& ids_in, float threshold, std::vector<float>* logits,
                       std::vector<float>* scores, std::vector<uint8_t>* mask) {
  const BundleInfo& info = info_;
  Impl& impl = *impl_;
  InUse in_use(impl);
  if (!in_use.ok()) return InUse::error();
  int T = (int)ids_in.size();
  if (T == 0) return Status::Error("the prompt is empty");
  if (T >= info.max_context)
    return Status::Error("prompt has " + std::to_string(T) + " tokens, longer than the context of " +
                         std::to_string(info.max_context) + " tokens (at least one position must be left to generate)");
  for (int64_t t : ids_in)
    if (t < 0 || t >= info.vocab_size)
      return Status::Error("token id " + std::to_string(t) + " is outside the vocabulary (0.." +
                           std::to_string(info.vocab_size - 1) + ")");
  if (!std::isfinite(threshold)) return Status::Error("the threshold must be a finite number");
  std::vector<int64_t> ids(ids_in);
  float thr = threshold;
  auto ids_t = from_blob(ids.data(), {1, T}, ScalarType::Long);
  auto thr_t = from_blob(&thr, {1}, ScalarType::Float);
  std::vector<EValue> args(info.io.at("prefill").inputs.size());
  args[impl.pre_ids] = EValue(ids_t);
  args[impl.pre_thr] = EValue(thr_t);
  auto out = impl.module->execute(info.prefill_method, args);
  if (!out.ok()) return Status::Error("prefill failed (" + et_error(out.error()) + ")");
  const auto& o = *out;
  if (o.size() != info.io.at("prefill").outputs.size())
    return Status::Error("prefill returned an unexpected number of outputs");
  auto lt = o[impl.pre_logits].toTensor();
  if (lt.numel() != info.vocab_size) return Status::Error("prefill logits have the wrong size");
  logits->assign(lt.const_data_ptr<float>(), lt.const_data_ptr<float>() + info.vocab_size);
  auto st = o[impl.pre_scores].toTensor();
  scores->assign(st.const_data_ptr<float>(), st.const_data_ptr<float>() + info.n_layers);
  auto mt = o[impl.pre_mask].toTensor();
  const bool* mb = mt.const_data_ptr<bool>();
  mask->assign(info.n_layers, 0);
  for (int l = 0; l < info.n_layers; l++) (*mask)[l] = mb[l] ? 1 : 0;
  const int nkv = info.n_kv_heads, hd = info.head_dim;
  for (int l = 0; l < info.n_layers; l++) {
    // present [1, n_kv, T, hd] -> sequence-major rows 0..T-1 (once per prompt)
    for (int w = 0; w < 2; w++) {
      auto t = o[w == 0 ? impl.pre_k[l] : impl.pre_v[l]].toTensor();
      if (t.numel() != (ssize_t)nkv * T * hd) return Status::Error("prefill K/V have the wrong size");
      const float* src = t.const_data_ptr<float>();
      float* dst = (w == 0 ? impl.k : impl.v)[l].data();
      for (int h = 0; h < nkv; h++)
        for (int s = 0; s < T; s++)
          std::copy(src + ((size_t)h * T + s) * hd, src + ((size_t)h * T + s + 1) * hd, dst + ((size_t)s * nkv + h) * hd);
    }
    impl.len[l] = T;
  }
  std::fill(impl.layer_calls.begin(), impl.layer_calls.end(), 0);
  return Status::Ok();
}

Status Runner::extend(const std::vector<int64_t>& ids_in, int64_t past_length, std::vector<float>* logits,
                      std::vector<float>* router_probs) {
  const BundleInfo& info = info_;
  Impl& impl = *impl_;
  InUse in_use(impl);
  if (!in_use.ok()) return InUse::error();
  const int64_t T = (int64_t)ids_in.size(), S = past_length;
  const int min_len = *std::min_element(impl.len.begin(), impl.len.end());
  if (T < 1 || S < 1 || S > min_len || S + T > info.max_context)
    return Status::Error("cannot extend " + std::to_string(S) + " cached tokens by " + std::to_string(T) +
                         " within the context of " + std::to_string(info.max_context) + " (every layer holds " +
                         std::to_string(min_len) + ")");
  for (int64_t t : ids_in)
    if (t < 0 || t >= info.vocab_size)
      return Status::Error("token id " + std::to_string(t) + " is outside the vocabulary (0.." +
                           std::to_string(info.vocab_size - 1) + ")");
  Status s = load_extend();  // first use: XNNPACK packs this method's own copy of the weights now
  if (!s) return s;
  const int nkv = info.n_kv_heads, hd = info.head_dim, L = info.n_layers;
  const size_t row = (size_t)nkv * hd;
  std::vector<int64_t> ids(ids_in);
  std::vector<TensorPtr> keep;  // the views must live through execute
  std::vector<EValue> args(info.io.at("extend").inputs.size());
  keep.push_back(from_blob(ids.data(), {1, (int)T}, ScalarType::Long));
  args[impl.ext_ids] = EValue(keep.back());
  for (int l = 0; l < L; l++) {  // zero-copy views of the first S rows of every layer's buffers
    keep.push_back(from_blob(impl.k[l].data(), {1, (int)S, nkv, hd}, ScalarType::Float));
    args[impl.ext_pk[l]] = EValue(keep.back());
    keep.push_back(from_blob(impl.v[l].data(), {1, (int)S, nkv, hd}, ScalarType::Float));
    args[impl.ext_pv[l]] = EValue(keep.back());
  }
  auto out = impl.module->execute(info.extend_method, args);
  if (!out.ok()) return Status::Error("extend failed (" + et_error(out.error()) + ")");
  const auto& o = *out;
  if (o.size() != info.io.at("extend").outputs.size()) return Status::Error("extend returned an unexpected number of outputs");
  auto lt = o[impl.ext_logits].toTensor();
  auto pt = o[impl.ext_probs].toTensor();
  if (lt.numel() != info.vocab_size || pt.numel() != (ssize_t)L * T)
    return Status::Error("extend logits or router_probs have the wrong size");
  for (int l = 0; l < L; l++)
    for (int w = 0; w < 2; w++)
      if (o[w == 0 ? impl.ext_k[l] : impl.ext_v[l]].toTensor().numel() != (ssize_t)(T * row))
        return Status::Error("extend K/V have the wrong size");
  logits->assign(lt.const_data_ptr<float>(), lt.const_data_ptr<float>() + info.vocab_size);
  router_probs->assign(pt.const_data_ptr<float>(), pt.const_data_ptr<float>() + (size_t)L * T);
  for (int l = 0; l < L; l++) {
    // present [1, T, n_kv, hd] is the buffer's own layout: rows S..S+T-1, one copy each
    const float* kn = o[impl.ext_k[l]].toTensor().const_data_ptr<float>();
    const float* vn = o[impl.ext_v[l]].toTensor().const_data_ptr<float>();
    std::copy(kn, kn + T * row, impl.k[l].data() + (size_t)S * row);
    std::copy(vn, vn + T * row, impl.v[l].data() + (size_t)S * row);
    impl.len[l] = (int)(S + T);
  }
  std::fill(impl.layer_calls.begin(), impl.layer_calls.end(), 0);
  return Status::Ok();
}

Status Runner::load_extend() {
  Impl& impl = *impl_;
  InUse in_use(impl);
  if (!in_use.ok()) return InUse::error();
  if (impl.extend_loaded) return Status::Ok();
  auto err = impl.module->load_method(info_.extend_method);
  if (err != executorch::runtime::Error::Ok)
    return Status::Error("ExecuTorch cannot load method '" + info_.extend_method + "' (" + et_error(err) + ")");
  impl.extend_loaded = true;
  return Status::Ok();
}

Status Runner::kv_cache(int layer, const float** k, const float** v, int* length) const {
  if (layer < 0 || layer >= info_.n_layers)
    return Status::Error("layer " + std::to_string(layer) + " is out of range (0.." + std::to_string(info_.n_layers - 1) + ")");
  *k = impl_->k[layer].data();
  *v = impl_->v[layer].data();
  *length = impl_->len[layer];
  return Status::Ok();
}

Status Runner::decode(int64_t token, int64_t position, const std::vector<uint8_t>& mask, std::vector<float>* logits) {
  const BundleInfo& info = info_;
  Impl& impl = *impl_;
  InUse in_use(impl);
  if (!in_use.ok()) return InUse::error();
  if ((int)mask.size() != info.n_layers)
    return Status::Error("layer mask has length " + std::to_string(mask.size()) + ", the model has " +
                         std::to_string(info.n_layers) + " layers");
  if (token < 0 || token >= info.vocab_size) return Status::Error("token id " + std::to_string(token) + " is outside the vocabulary");
  if (position < 0 || position >= info.max_context)
    return Status::Error("position " + std::to_string(position) + " is outside the context of " + std::to_string(info.max_context));
  impl.tok = token;
  impl.pos = position;
  auto e = impl.module->execute(info.embed_method, impl.embed_args);
  if (!e.ok()) return Status::Error("embed failed (" + et_error(e.error()) + ")");
  std::vector<EValue>& args = impl.layer_args;
  args[impl.lay_cos] = (*e)[impl.emb_cos];
  args[impl.lay_sin] = (*e)[impl.emb_sin];
  EValue h = (*e)[impl.emb_h];
  const int nkv = info.n_kv_heads, hd = info.head_dim;
  const size_t row = (size_t)nkv * hd;
  for (int l = 0; l < info.n_layers; l++) {
    if (!mask[l]) continue;
    int n = impl.len[l];
    if (n >= info.max_context) return Status::Error("layer " + std::to_string(l) + " KV buffer is full");
    if (n == 0) return Status::Error("decode before prefill");
    auto pk = from_blob(impl.k[l].data(), {1, n, nkv, hd}, ScalarType::Float);  // zero-copy view of the past
    auto pv = from_blob(impl.v[l].data(), {1, n, nkv, hd}, ScalarType::Float);
    args[impl.lay_h] = h;
    args[impl.lay_pk] = EValue(pk);
    args[impl.lay_pv] = EValue(pv);
    auto r = impl.module->execute(info.layer_methods[l], args);
    if (!r.ok()) return Status::Error("layer " + std::to_string(l) + " failed (" + et_error(r.error()) + ")");
    h = (*r)[impl.lay_out_h];
    const float* kn = (*r)[impl.lay_out_k].toTensor().const_data_ptr<float>();
    const float* vn = (*r)[impl.lay_out_v].toTensor().const_data_ptr<float>();
    std::copy(kn, kn + row, impl.k[l].data() + (size_t)n * row);  // the new entry, in place
    std::copy(vn, vn + row, impl.v[l].data() + (size_t)n * row);
    impl.len[l] = n + 1;
    impl.layer_calls[l]++;
  }
  impl.head_args[impl.head_h] = h;
  auto hd_out = impl.module->execute(info.head_method, impl.head_args);
  if (!hd_out.ok()) return Status::Error("head failed (" + et_error(hd_out.error()) + ")");
  auto lt = (*hd_out)[impl.head_logits].toTensor();
  logits->assign(lt.const_data_ptr<float>(), lt.const_data_ptr<float>() + info.vocab_size);
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


// numpy's float32 sum (pairwise, 8 accumulators; numpy/_core/src/umath/loops_utils.h.src), so that the pooled
// router scores of a session's turn are the Python runtime's to the bit (probs[:, s:].mean(axis=1) in float32)
float pairwise_sum(const float* a, int64_t n) {
  if (n < 8) {
    float r = 0.f;
    for (int64_t i = 0; i < n; i++) r += a[i];
    return r;
  }
  if (n <= 128) {
    float r[8];
    for (int j = 0; j < 8; j++) r[j] = a[j];
    int64_t i = 8;
    for (; i < n - (n % 8); i += 8)
      for (int j = 0; j < 8; j++) r[j] += a[i + j];
    float res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; i++) res += a[i];
    return res;
  }
  int64_t n2 = n / 2;
  n2 -= n2 % 8;
  return pairwise_sum(a, n2) + pairwise_sum(a + n2, n - n2);
}

// The options' own checks (before anything runs, so a refused call changes nothing); the explicit mask parsed.
Status check_options(const GenerateOptions& opt, int n_layers, std::vector<uint8_t>* user_mask) {
  if (opt.max_new_tokens < 1) return Status::Error("max_new_tokens must be at least 1");
  if (!(opt.temperature >= 0.f)) return Status::Error("temperature must be >= 0");
  if (!(opt.top_p > 0.f && opt.top_p <= 1.f)) return Status::Error("top_p must be in (0, 1]");
  if (!opt.mask.empty() && (opt.keep > 0 || opt.has_threshold))
    return Status::Error("give one of a mask, a threshold or a layer budget (--keep)");
  if (opt.keep > 0 && opt.has_threshold) return Status::Error("give either a threshold or a layer budget (--keep), not both");
  if (opt.has_threshold && !std::isfinite(opt.threshold)) return Status::Error("the threshold must be a finite number");
  user_mask->clear();
  if (!opt.mask.empty()) {
    Status s = parse_mask(opt.mask, n_layers, user_mask);
    if (!s) return s;
  }
  if (opt.keep != 0 && (opt.keep < 1 || opt.keep > n_layers))
    return Status::Error("--keep must be between 1 and the number of layers (" + std::to_string(n_layers) + "), got " +
                         std::to_string(opt.keep));
  return Status::Ok();
}
}  // namespace

Status check_generate_options(const GenerateOptions& opt, int n_layers) {
  std::vector<uint8_t> m;
  return check_options(opt, n_layers, &m);
}

Status Runner::generate(const std::vector<int64_t>& ids, const GenerateOptions& opt, GenerateResult* res,
                        const std::function<void(int64_t)>& on_token) {
  return generate_with_past(ids, 0, 0, opt, res, on_token);
}

Status Runner::generate_with_past(const std::vector<int64_t>& ids, int64_t past_length, int pool_from,
                                  const GenerateOptions& opt, GenerateResult* res,
                                  const std::function<void(int64_t)>& on_token) {
  const BundleInfo& info = info_;
  InUse in_use(*impl_);
  if (!in_use.ok()) return InUse::error();
  std::vector<uint8_t> user_mask;
  Status s = check_options(opt, info.n_layers, &user_mask);
  if (!s) return s;
  const int64_t T = (int64_t)ids.size();
  if (past_length < 0 || pool_from < 0) return Status::Error("past_length and pool_from must be >= 0");
  if (past_length > 0 && T == 0) return Status::Error("the prompt is empty");
  if (past_length > 0 && past_length + T >= info.max_context)
    return Status::Error("prompt has " + std::to_string(past_length + T) + " tokens, longer than the context of " +
                         std::to_string(info.max_context) + " tokens (at least one position must be left to generate)");
  GenerateResult r;
  float thr = opt.has_threshold ? opt.threshold : info.default_threshold;
  auto t0 = std::chrono::steady_clock::now();
  std::vector<float> logits, scores;
  std::vector<uint8_t> gmask;  // the prefill graph's threshold mask; none after a past
  if (past_length == 0) {
    s = prefill(ids, thr, &logits, &scores, &gmask);
  } else {
    std::vector<float> probs;  // [L, T]
    s = extend(ids, past_length, &logits, &probs);
    if (s) {  // the turn's pooled span: the mean over t in [min(pool_from, T - 1), T)
      const int64_t from = std::min<int64_t>(pool_from, T - 1);
      scores.resize(info.n_layers);
      for (int l = 0; l < info.n_layers; l++)
        scores[l] = pairwise_sum(probs.data() + (size_t)l * T + from, T - from) / (float)(T - from);
    }
  }
  if (!s) return s;
  if (!user_mask.empty()) {
    r.mask = user_mask;  // used exactly as given
  } else if (opt.keep > 0) {
    s = budget_mask(scores, opt.keep, info.pinned, &r.mask);
    if (!s) return s;
  } else if (!gmask.empty()) {
    r.mask = gmask;
    for (int p : info.pinned) r.mask[p] = 1;
  } else {  // the threshold rule, applied here (runtime/masks.py threshold_mask)
    r.mask.assign(info.n_layers, 0);
    for (int l = 0; l < info.n_layers; l++) r.mask[l] = scores[l] >= thr;
    for (int p : info.pinned) r.mask[p] = 1;
  }
  std::mt19937_64 rng(opt.seed);
  std::set<int64_t> eos(info.eos_ids.begin(), info.eos_ids.end());
  int64_t tok = sample(logits, opt, rng);
  r.prefill_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  if (opt.keep_logits) r.logits.push_back(logits);
  r.tokens.push_back(tok);
  if (on_token) on_token(tok);
  r.stop_reason = "max_new_tokens";
  int64_t pos = past_length + T;
  auto t1 = std::chrono::steady_clock::now();
  std::clock_t c1 = std::clock();
  while (true) {
    if (eos.count(tok) && !opt.ignore_eos) {
      r.stop_reason = "eos";
      break;
    }
    if ((int)r.tokens.size() >= opt.max_new_tokens) break;
    if (pos >= info.max_context) {
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
  r.layer_calls = impl_->layer_calls;
  r.prompt_tokens = (int)T;
  *res = std::move(r);
  return Status::Ok();
}

}  // namespace first_edge
