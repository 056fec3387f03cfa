// FiRST-Edge C++ runner for ExecuTorch bundles (the code the Android app calls through JNI).
//
// Loads a bundle folder (manifest.json validated: version, runtime, dims, files, sha256), runs the
// `prefill` method once per prompt, fixes the layer mask, and per token runs `embed`, the kept
// `layer_{l}` methods only, and `head`. The runner owns one K and one V buffer per layer,
// [max_context, n_kv_heads, head_dim], allocated once; a layer reads its first S positions through a
// zero-copy tensor view and the new entry is written in place. Token ids in, token ids out (the
// tokenizer lives in the app). No exceptions cross this API: every call returns a Status.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace first_edge {

struct Status {
  bool ok = true;
  std::string message;
  static Status Ok() { return {}; }
  static Status Error(std::string m) { return {false, std::move(m)}; }
  explicit operator bool() const { return ok; }
};

// One input or output of a graph, as the manifest's graphs.io declares it (runtime/graph_io.py).
struct TensorSpec {
  std::string name;   // "{l}" in a layer method's names stands for the layer index
  std::string dtype;  // int64 | int32 | float32 | bool
  std::vector<int64_t> shape;  // -1: a symbolic size (T prompt tokens, S past tokens)
};
struct GraphIo {
  std::vector<TensorSpec> inputs, outputs;
  int input(const std::string& name) const;   // position of a named input, -1 if absent
  int output(const std::string& name) const;  // position of a named output, -1 if absent
};

struct BundleInfo {
  std::string path, name, architecture, quantization, weights;
  int n_layers = 0, hidden_size = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0, vocab_size = 0, max_context = 0;
  int64_t bos_id = -1;
  std::vector<int64_t> eos_ids;
  std::vector<int> pinned;
  float default_threshold = 0.5f;
  int pool_start = 0;  // first prompt position the router scores pool (the prefill method applies it)
  std::string pte_file;
  std::string prefill_method = "prefill", embed_method = "embed", head_method = "head";
  std::vector<std::string> layer_methods;
  std::map<std::string, GraphIo> io;  // prefill, embed, layer, head: what the runner binds, by name
};

// Reads and validates manifest.json (and every file's sha256 when verify_hashes).
Status load_bundle_info(const std::string& dir, BundleInfo* out, bool verify_hashes = true);

struct GenerateOptions {
  int max_new_tokens = 64;
  float temperature = 0.0f;  // 0 = greedy
  float top_p = 1.0f;
  uint64_t seed = 0;
  bool ignore_eos = false;
  bool has_threshold = false;
  float threshold = 0.5f;  // used when has_threshold, else the bundle's default
  int keep = 0;            // > 0: layer budget (keep the K highest scores; pinned first)
  std::string mask;        // non-empty: explicit 0/1 mask string, overrides the routers
  bool keep_logits = false;
};

struct GenerateResult {
  std::vector<int64_t> tokens;
  std::vector<float> scores;        // router scores g[L]
  std::vector<uint8_t> mask;        // final mask
  std::vector<int64_t> layer_calls;  // decode-time executions per layer
  int prompt_tokens = 0;
  double prefill_ms = 0, decode_s = 0;
  double decode_cpu_s = 0;  // process CPU time of the decode steps (all threads)
  std::string stop_reason;
  std::vector<std::vector<float>> logits;  // first (prefill) + every decode step, when keep_logits
  double decode_tokens_per_s() const {
    size_t n = tokens.size() > 0 ? tokens.size() - 1 : 0;
    return (decode_s > 0 && n) ? n / decode_s : 0.0;
  }
};

// A Runner holds one conversation's state (the KV buffers): it is not thread-safe. Use one Runner per
// thread (several Runners may run at once); a call made while another thread is inside the same Runner
// returns an error instead of corrupting it. The XNNPACK thread pool is process-wide and `create` with
// threads > 0 resets it: create the Runners before using them from several threads.
class Runner {
 public:
  // Validates the bundle and loads every method. threads <= 0 keeps ExecuTorch's default pool.
  static Status create(const std::string& bundle_dir, int threads, std::unique_ptr<Runner>* out,
                       bool verify_hashes = true);
  ~Runner();

  const BundleInfo& info() const { return info_; }

  // Low level (the Backend protocol of runtime/loop.py).
  Status prefill(const std::vector<int64_t>& ids, float threshold, std::vector<float>* logits,
                 std::vector<float>* scores, std::vector<uint8_t>* mask);
  Status decode(int64_t token, int64_t position, const std::vector<uint8_t>& mask, std::vector<float>* logits);
  const std::vector<int64_t>& layer_calls() const;

  // The loop: prefill, fix the mask, decode through the kept layers; on_token may be null.
  Status generate(const std::vector<int64_t>& ids, const GenerateOptions& opt, GenerateResult* res,
                  const std::function<void(int64_t)>& on_token = nullptr);

  struct Impl;  // opaque: the ExecuTorch module, per-layer KV buffers and lengths, binding positions

 private:
  Runner() = default;
  std::unique_ptr<Impl> impl_;
  BundleInfo info_;
};

// Mask helpers shared by the runner and its tests (the rules of runtime/masks.py).
Status parse_mask(const std::string& text, int n_layers, std::vector<uint8_t>* out);
Status budget_mask(const std::vector<float>& scores, int keep, const std::vector<int>& pinned,
                   std::vector<uint8_t>* out);

}  // namespace first_edge
