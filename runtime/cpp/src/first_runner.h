// FiRST-Edge C++ runner for ExecuTorch bundles (the code the Android app calls through JNI).
//
// Loads a bundle folder (manifest.json validated: version, runtime, dims, files, sha256), runs the
// `prefill` method once per prompt, fixes the layer mask, and per token runs `embed`, the kept
// `layer_{l}` methods only, and `head`. The runner owns one K and one V buffer per layer,
// [max_context, n_kv_heads, head_dim], allocated once; a layer reads its first S positions through a
// zero-copy tensor view and the new entry is written in place. Token ids in, token ids out (the
// tokenizer lives in the app). No exceptions cross this API: every call returns a Status.
//
// Chat sessions (DESIGN.md section 5, runtime/session.py): a Session over a Runner keeps the conversation's
// tokens and reuses the Runner's KV buffers across turns; each later turn's new tokens (the previous reply, the
// template's turn prefix, the user's tokens, the suffix) run through every layer with the `extend` method, so
// the cache stays exactly what a full prefill of the conversation would give, and the routers decide a fresh
// mask per turn.
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

// Token ids of the chat template's pieces (manifest chat.ids): a session joins them around the user's tokens.
struct ChatIds {
  bool has_prefix = false, has_suffix = false, has_turn_prefix = false;  // turn_prefix null: no sessions
  std::vector<int64_t> prefix, suffix, turn_prefix;
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
  std::string extend_method = "extend";  // prefill with a past (chat sessions); loaded on first use
  std::map<std::string, GraphIo> io;  // prefill, extend, embed, layer, head: what the runner binds, by name
  ChatIds chat_ids;
};

// Reads and validates manifest.json (and every file's sha256 when verify_hashes).
Status load_bundle_info(const std::string& dir, BundleInfo* out, bool verify_hashes = true);

// Signed bundles (DESIGN.md section 3): manifest.sig holds the hex HMAC-SHA256 of manifest.json's exact bytes under
// a key shared with the builder (python -m export.build --sign-key FILE). With a trusted key configured, a bundle
// without manifest.sig, or whose signature does not verify, is refused before the manifest is parsed or any other
// file is read, and every file's hash is checked (verify_hashes is ignored: the signature covers the files through
// their hashes). Without a key, manifest.sig is ignored.
struct BundleOptions {
  bool verify_hashes = true;
  // Path of the trusted key file (its raw bytes are the key). Empty: the process default (set_trusted_key_file),
  // else the file named by the FIRST_EDGE_TRUSTED_KEY environment variable when set and not empty, else no key.
  std::string trusted_key_file;
};
Status load_bundle_info(const std::string& dir, BundleInfo* out, const BundleOptions& opt);
// The process-wide trusted key file used when BundleOptions names none (so also by Runner::create and the
// overload above); it takes precedence over FIRST_EDGE_TRUSTED_KEY. "" clears it.
void set_trusted_key_file(const std::string& path);

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
  // A chat session's next turn: `ids` (T >= 1) through every layer after the past_length (>= 1) tokens that
  // every layer's buffer holds; their K/V are written at rows past_length..past_length+T-1 of every layer
  // (entries a decode left there are overwritten) and every layer's length becomes past_length + T. Returns
  // the last position's logits [V] and the per-token router probabilities router_probs [L * T] (row-major
  // [L, T], unpooled). The extend method is loaded on first use (XNNPACK packs its own copy of the weights).
  Status extend(const std::vector<int64_t>& ids, int64_t past_length, std::vector<float>* logits,
                std::vector<float>* router_probs);
  // Loads the extend method now (else on the first extend, which then takes longer: ~1.4 s for SmolLM2-135M
  // fp32 on 2 cores), e.g. while an app waits for the user's first message.
  Status load_extend();
  const std::vector<int64_t>& layer_calls() const;
  // Read-only view of layer l's K and V buffers ([max_context, n_kv, head_dim] each, sequence-major) and the
  // entries it holds (for tests and debugging: a session's cache against a fresh prefill).
  Status kv_cache(int layer, const float** k, const float** v, int* length) const;

  // The loop: prefill, fix the mask, decode through the kept layers; on_token may be null.
  Status generate(const std::vector<int64_t>& ids, const GenerateOptions& opt, GenerateResult* res,
                  const std::function<void(int64_t)>& on_token = nullptr);
  // The same loop after a past (runtime/loop.py generate with past_length > 0): `ids` go through extend after
  // past_length cached tokens, the router scores are the mean of router_probs[l, t] over
  // t in [min(pool_from, T - 1), T), the mask follows the options (a threshold is applied here, as a budget),
  // and decoding continues at position past_length + T. past_length 0 is generate().
  Status generate_with_past(const std::vector<int64_t>& ids, int64_t past_length, int pool_from,
                            const GenerateOptions& opt, GenerateResult* res,
                            const std::function<void(int64_t)>& on_token = nullptr);

  struct Impl;  // opaque: the ExecuTorch module, per-layer KV buffers and lengths, binding positions

 private:
  Runner() = default;
  std::unique_ptr<Impl> impl_;
  BundleInfo info_;
};

struct ChatOptions : GenerateOptions {
  bool trim = false;  // when a turn does not fit the context: drop the oldest whole turns instead of an error
};

struct ChatResult : GenerateResult {
  std::vector<int64_t> reply;  // the reply's tokens, without the stop token (template tokens excluded)
  int turn = 0;                // 1 for the first turn after create() or reset()
  int reused_tokens = 0;       // cached tokens this turn did not recompute
  int prefilled_tokens = 0;    // tokens run through every layer this turn (the new tokens, plus a re-prefill)
  int history_tokens = 0;      // the conversation's tokens after this turn's prompt (exact in every layer)
  int dropped_turns = 0;       // oldest turns dropped to make room (ChatOptions::trim)
};

// A multi-turn conversation on one Runner (runtime/session.py, exactly): turn 1 runs the chat prefix, the
// user's tokens and the suffix through prefill; turn n runs the previous reply (without its stop token), the
// template's turn prefix, the user's tokens and the suffix through extend from the end of the previous turn's
// prompt; the router scores pool this turn's tokens from the user's on. Generation stops at the bundle's EOS
// ids. When a turn does not fit the context: an error, or with ChatOptions::trim the oldest whole turns are
// dropped (the chat prefix stays) and the rest is prefilled again. A refused turn (empty, too long, bad ids or
// options) returns an error and leaves the session as it was.
// The session uses the Runner's KV buffers: do not call the Runner's prefill/generate/extend between turns
// (or reset() the session after doing so). Not thread-safe (like a Runner).
class Session {
 public:
  // The bundle must carry chat.ids (prefix, suffix and a non-null turn_prefix). `runner` must outlive the Session.
  static Status create(Runner* runner, std::unique_ptr<Session>* out);
  ~Session();

  // One turn: the user's tokens (no template tokens) in, the reply and the stats out; on_token may be null.
  // An exception thrown by on_token (a caller's way to stop a turn) leaves this function: the turn is not
  // recorded, the Runner is free again and the session stays usable (if the turn had first dropped old turns
  // with trim, they stay dropped: the cache was prefilled again without them).
  Status chat(const std::vector<int64_t>& user_ids, const ChatOptions& opt, ChatResult* res,
              const std::function<void(int64_t)>& on_token = nullptr);
  // Forget the conversation (the buffers are overwritten by the next turn's prefill).
  void reset();
  // The conversation's tokens whose K/V the cache holds exactly (up to the last turn's prompt).
  std::vector<int64_t> history() const;
  int turns() const;  // turns kept in the history (after any trimming)

  struct Impl;

 private:
  Session() = default;
  std::unique_ptr<Impl> impl_;
};

// Mask helpers shared by the runner and its tests (the rules of runtime/masks.py).
Status parse_mask(const std::string& text, int n_layers, std::vector<uint8_t>* out);
Status budget_mask(const std::vector<float>& scores, int keep, const std::vector<int>& pinned,
                   std::vector<uint8_t>* out);
// The generation options' own checks (sampling, one of mask / threshold / budget, their values).
Status check_generate_options(const GenerateOptions& opt, int n_layers);

}  // namespace first_edge
