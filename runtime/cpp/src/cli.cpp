// first_edge_run: the C++ runner's command line (token ids in, token ids out, stats as JSON).
//
//   first_edge_run --bundle DIR --ids 1,2,3 [--threshold T | --keep K | --mask 0101...]
//                  [--max-new-tokens N] [--temperature T] [--top-p P] [--seed S] [--ignore-eos]
//                  [--threads N] [--runs R] [--warmup W] [--dump-logits FILE] [--no-verify] [--trusted-key FILE]
//
//   first_edge_run --bundle DIR --chat [--script FILE] [--trim] [--dump-kv PREFIX] [generation options]
//
// Prints one JSON line. Exit status 0 on success; 2 with "error: ..." on stderr for any bad input.
//
// --chat: a multi-turn session (first_edge::Session, the KV cache reused across turns). C++ has no tokenizer:
// each user turn is a line of comma-separated token ids of the user's message (no template tokens). With
// --script FILE every non-empty line of FILE is one turn and any refused turn is an error (exit 2); without it
// the turns are read from stdin until EOF or /exit, and a refused turn prints "error: ..." on stderr and the
// session goes on. A line "/reset" forgets the conversation. One JSON line per turn: the reply's token ids
// (reply_ids, without the stop token), every generated token, the mask, scores and the turn's stats
// (turn, reused_tokens, prefilled_tokens, history_tokens, dropped_turns). --dump-kv PREFIX writes, after each
// turn, every layer's first history_tokens K then V rows ([history_tokens, n_kv, head_dim] float32 each, layer
// by layer) to PREFIX.N.bin (N counts the turns the command ran; "kv_file" in the JSON line).
//
// --trusted-key FILE: refuse the bundle unless its manifest.sig is the HMAC-SHA256 of manifest.json under FILE's
// bytes (python -m export.build --sign-key FILE); default: the file named by FIRST_EDGE_TRUSTED_KEY, if set. With a
// key the file hashes are always checked (--no-verify is refused with it).
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "first_runner.h"

using namespace first_edge;

static int fail(const std::string& m) {
  std::fprintf(stderr, "error: %s\n", m.c_str());
  return 2;
}

static bool parse_ids(const std::string& s, std::vector<int64_t>* out) {
  out->clear();
  size_t i = 0;
  while (i < s.size()) {
    size_t j = s.find(',', i);
    if (j == std::string::npos) j = s.size();
    std::string t = s.substr(i, j - i);
    if (t.empty()) return false;
    char* end = nullptr;
    long long v = std::strtoll(t.c_str(), &end, 10);
    if (*end != '\0') return false;
    out->push_back(v);
    i = j + 1;
  }
  return !out->empty();
}

static bool to_num(const char* s, double* v) {
  char* end = nullptr;
  *v = std::strtod(s, &end);
  return end != s && *end == '\0';
}

static std::string ids_json(const std::vector<int64_t>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); i++) s += (i ? ", " : "") + std::to_string((long long)v[i]);
  return s + "]";
}

static std::string trimmed(const std::string& s) {
  size_t a = s.find_first_not_of(" \t\r\n"), b = s.find_last_not_of(" \t\r\n");
  return a == std::string::npos ? "" : s.substr(a, b - a + 1);
}

// One JSON line per turn (the keys of runtime/session.py TurnResult.stats(), plus reply_ids and the raw outputs).
static void print_turn(const ChatResult& r, int n_layers, int threads, const std::string& kv_file) {
  std::string mask, kept;
  int n_kept = 0;
  for (size_t l = 0; l < r.mask.size(); l++) {
    mask.push_back(r.mask[l] ? '1' : '0');
    if (r.mask[l]) kept += (n_kept++ ? ", " : "") + std::to_string(l);
  }
  std::printf("{\"runtime\": \"executorch-cpp\", \"turn\": %d, \"reused_tokens\": %d, \"prefilled_tokens\": %d, "
              "\"history_tokens\": %d, \"dropped_turns\": %d, \"reply_tokens\": %zu, \"prompt_tokens\": %d, "
              "\"new_tokens\": %zu, \"prefill_ms\": %.3f, \"decode_tokens_per_s\": %.3f, \"layers_kept\": %d, "
              "\"n_layers\": %d, \"kept_layers\": [%s], \"mask\": \"%s\", \"stop_reason\": \"%s\", \"threads\": %d, "
              "\"reply_ids\": %s, \"tokens\": %s, \"scores\": [",
              r.turn, r.reused_tokens, r.prefilled_tokens, r.history_tokens, r.dropped_turns, r.reply.size(),
              r.prompt_tokens, r.tokens.size(), r.prefill_ms, r.decode_tokens_per_s(), n_kept, n_layers, kept.c_str(),
              mask.c_str(), r.stop_reason.c_str(), threads, ids_json(r.reply).c_str(), ids_json(r.tokens).c_str());
  for (size_t i = 0; i < r.scores.size(); i++) std::printf("%s%.9g", i ? ", " : "", r.scores[i]);
  std::printf("], \"layer_calls\": %s", ids_json(r.layer_calls).c_str());
  if (!kv_file.empty()) std::printf(", \"kv_file\": \"%s\"", kv_file.c_str());
  std::printf("}\n");
  std::fflush(stdout);
}

// Every layer's first n K rows then V rows (float32 [n, n_kv, head_dim] each), layer by layer.
static Status write_kv(const Runner& runner, int n, const std::string& path) {
  const BundleInfo& info = runner.info();
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) return Status::Error("cannot write " + path);
  const size_t count = (size_t)n * info.n_kv_heads * info.head_dim;
  for (int l = 0; l < info.n_layers; l++) {
    const float *k, *v;
    int len = 0;
    Status s = runner.kv_cache(l, &k, &v, &len);
    if (s && len < n) s = Status::Error("layer " + std::to_string(l) + " holds fewer entries than the history");
    if (!s || std::fwrite(k, sizeof(float), count, f) != count || std::fwrite(v, sizeof(float), count, f) != count) {
      std::fclose(f);
      return s ? Status::Error("cannot write " + path) : s;
    }
  }
  return std::fclose(f) == 0 ? Status::Ok() : Status::Error("cannot write " + path);
}

static int run_chat(const std::string& bundle, int threads, bool verify, const ChatOptions& opt,
                    const std::string& script, const std::string& dump_kv) {
  std::vector<std::string> lines;
  const bool interactive = script.empty();
  if (!interactive) {
    std::ifstream f(script);
    if (!f) return fail("cannot read the chat script " + script);
    std::string line;
    while (std::getline(f, line))
      if (!trimmed(line).empty()) lines.push_back(trimmed(line));
    std::vector<int64_t> ids;  // every line is checked before anything runs
    for (size_t i = 0; i < lines.size(); i++)
      if (lines[i] != "/reset" && !parse_ids(lines[i], &ids))
        return fail("chat script line '" + lines[i] + "' is not a comma-separated list of token ids");
  }
  std::unique_ptr<Runner> runner;
  Status s = Runner::create(bundle, threads, &runner, verify);
  if (!s) return fail(s.message);
  std::unique_ptr<Session> session;
  if (!(s = Session::create(runner.get(), &session))) return fail(s.message);
  int n_done = 0;
  for (size_t i = 0;; i++) {
    std::string line;
    if (interactive) {
      if (!std::getline(std::cin, line)) break;
      line = trimmed(line);
      if (line == "/exit" || line == "/quit") break;
      if (line.empty()) continue;
    } else {
      if (i >= lines.size()) break;
      line = lines[i];
    }
    if (line == "/reset") {
      session->reset();
      std::fprintf(stderr, "[session reset]\n");
      continue;
    }
    std::vector<int64_t> ids;
    ChatResult r;
    if (!parse_ids(line, &ids)) s = Status::Error("a user turn must be a comma-separated list of token ids");
    else s = session->chat(ids, opt, &r);
    if (!s) {
      if (!interactive) return fail(s.message);
      std::fprintf(stderr, "error: %s\n", s.message.c_str());  // the session is unchanged: go on
      continue;
    }
    std::string kv_file;
    if (!dump_kv.empty()) {
      kv_file = dump_kv + "." + std::to_string(++n_done) + ".bin";
      if (!(s = write_kv(*runner, r.history_tokens, kv_file))) return fail(s.message);
    }
    print_turn(r, runner->info().n_layers, threads, kv_file);
  }
  return 0;
}

int main(int argc, char** argv) {
  std::string bundle, ids_s, dump, script, dump_kv, trusted_key;
  bool chat = false, trim = false;
  GenerateOptions opt;
  int threads = 2, runs = 1, warmup = 0;
  bool verify = true;
  for (int i = 1; i < argc; i++) {
    std::string a = argv[i];
    auto need = [&](const char* name) -> const char* {
      if (i + 1 >= argc) return nullptr;
      (void)name;
      return argv[++i];
    };
    double v;
    if (a == "--help" || a == "-h") {
      std::printf("usage: first_edge_run --bundle DIR --ids 1,2,3 [--threshold T | --keep K | --mask 0101..] "
                  "[--max-new-tokens N] [--temperature T] [--top-p P] [--seed S] [--ignore-eos] [--threads N] "
                  "[--runs R] [--warmup W] [--dump-logits FILE] [--no-verify] [--trusted-key FILE]\n"
                  "       first_edge_run --bundle DIR --chat [--script FILE] [--trim] [--dump-kv PREFIX] "
                  "[--threshold T | --keep K | --mask 0101..] [--max-new-tokens N] [...]\n"
                  "  --chat: multi-turn session reusing the KV cache; this runner has no tokenizer, so each user turn "
                  "is one line of comma-separated token ids (the message only, no template tokens): the non-empty "
                  "lines of --script FILE, or lines read from stdin (/reset forgets the conversation, /exit ends). "
                  "One JSON line per turn. --trim drops the oldest turns when the context is full (else an error).\n"
                  "  --trusted-key FILE: refuse the bundle unless its manifest.sig (HMAC-SHA256 of manifest.json) "
                  "verifies with this key file (default: the file named by FIRST_EDGE_TRUSTED_KEY, if set).\n");
      return 0;
    } else if (a == "--ignore-eos") {
      opt.ignore_eos = true;
    } else if (a == "--no-verify") {
      verify = false;
    } else if (a == "--chat") {
      chat = true;
    } else if (a == "--trim") {
      trim = true;
    } else {
      const char* val = need(a.c_str());
      if (!val) return fail("option " + a + " needs a value");
      if (a == "--bundle") bundle = val;
      else if (a == "--ids") ids_s = val;
      else if (a == "--mask") opt.mask = val;
      else if (a == "--dump-logits") dump = val;
      else if (a == "--script") script = val;
      else if (a == "--dump-kv") dump_kv = val;
      else if (a == "--trusted-key") {
        if (!*val) return fail("--trusted-key needs a key file");
        trusted_key = val;
      }
      else if (!to_num(val, &v)) return fail("option " + a + " needs a number, got '" + val + "'");
      else if (a == "--threshold") { opt.has_threshold = true; opt.threshold = (float)v; }
      else if (a == "--keep") opt.keep = (int)v;
      else if (a == "--max-new-tokens") opt.max_new_tokens = (int)v;
      else if (a == "--temperature") opt.temperature = (float)v;
      else if (a == "--top-p") opt.top_p = (float)v;
      else if (a == "--seed") opt.seed = (uint64_t)v;
      else if (a == "--threads") threads = (int)v;
      else if (a == "--runs") runs = std::max(1, (int)v);
      else if (a == "--warmup") warmup = std::max(0, (int)v);
      else return fail("unknown option " + a);
    }
  }
  if (bundle.empty()) return fail("--bundle is required");
  if (!trusted_key.empty()) {
    if (!verify) return fail("--no-verify does not go with --trusted-key (the signature covers the files through their hashes)");
    set_trusted_key_file(trusted_key);  // load_bundle_info (Runner::create) checks manifest.sig with it
  }
  if ((!script.empty() || trim || !dump_kv.empty()) && !chat) return fail("--script, --trim and --dump-kv go with --chat");
  if (chat) {
    if (!ids_s.empty()) return fail("give either --ids (one reply) or --chat (a conversation)");
    if (!dump.empty() || runs != 1 || warmup != 0) return fail("--dump-logits, --runs and --warmup do not go with --chat");
    ChatOptions copt;
    static_cast<GenerateOptions&>(copt) = opt;
    copt.trim = trim;
    return run_chat(bundle, threads, verify, copt, script, dump_kv);
  }
  std::vector<int64_t> ids;
  if (!parse_ids(ids_s, &ids)) return fail("--ids must be a comma-separated list of token ids");
  std::unique_ptr<Runner> runner;
  Status s = Runner::create(bundle, threads, &runner, verify);
  if (!s) return fail(s.message);
  opt.keep_logits = !dump.empty();
  GenerateResult r;
  std::vector<double> pre, dec, cpu;
  for (int k = 0; k < warmup + runs; k++) {
    s = runner->generate(ids, opt, &r);
    if (!s) return fail(s.message);
    if (k >= warmup) {
      pre.push_back(r.prefill_ms);
      dec.push_back(r.decode_tokens_per_s());
      if (r.tokens.size() > 1) cpu.push_back(1e3 * r.decode_cpu_s / (r.tokens.size() - 1));
    }
  }
  auto median = [](std::vector<double> x) {
    std::sort(x.begin(), x.end());
    size_t n = x.size();
    return n % 2 ? x[n / 2] : 0.5 * (x[n / 2 - 1] + x[n / 2]);
  };
  if (!dump.empty()) {
    FILE* f = std::fopen(dump.c_str(), "wb");
    if (!f) return fail("cannot write " + dump);
    for (const auto& l : r.logits) std::fwrite(l.data(), sizeof(float), l.size(), f);
    std::fclose(f);
  }
  const BundleInfo& info = runner->info();
  std::string mask;
  int kept = 0;
  for (uint8_t m : r.mask) {
    mask.push_back(m ? '1' : '0');
    kept += m;
  }
  std::printf("{\"runtime\": \"executorch-cpp\", \"prompt_tokens\": %d, \"new_tokens\": %zu, \"prefill_ms\": %.3f, "
              "\"decode_tokens_per_s\": %.3f, \"decode_cpu_ms_per_token\": %.3f, \"layers_kept\": %d, \"n_layers\": %d, \"mask\": \"%s\", "
              "\"stop_reason\": \"%s\", \"threads\": %d, \"runs\": %d, \"tokens\": [",
              r.prompt_tokens, r.tokens.size(), median(pre), median(dec), cpu.empty() ? 0.0 : median(cpu), kept, info.n_layers, mask.c_str(),
              r.stop_reason.c_str(), threads, runs);
  for (size_t i = 0; i < r.tokens.size(); i++) std::printf("%s%lld", i ? ", " : "", (long long)r.tokens[i]);
  std::printf("], \"scores\": [");
  for (size_t i = 0; i < r.scores.size(); i++) std::printf("%s%.9g", i ? ", " : "", r.scores[i]);
  std::printf("], \"layer_calls\": [");
  for (size_t i = 0; i < r.layer_calls.size(); i++) std::printf("%s%lld", i ? ", " : "", (long long)r.layer_calls[i]);
  std::printf("], \"prefill_ms_runs\": [");
  for (size_t i = 0; i < pre.size(); i++) std::printf("%s%.3f", i ? ", " : "", pre[i]);
  std::printf("], \"decode_tokens_per_s_runs\": [");
  for (size_t i = 0; i < dec.size(); i++) std::printf("%s%.3f", i ? ", " : "", dec[i]);
  std::printf("]}\n");
  return 0;
}
