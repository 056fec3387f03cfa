// first_edge_run: the C++ runner's command line (token ids in, token ids out, stats as JSON).
//
//   first_edge_run --bundle DIR --ids 1,2,3 [--threshold T | --keep K | --mask 0101...]
//                  [--max-new-tokens N] [--temperature T] [--top-p P] [--seed S] [--ignore-eos]
//                  [--threads N] [--runs R] [--warmup W] [--dump-logits FILE] [--no-verify]
//
// Prints one JSON line. Exit status 0 on success; 2 with "error: ..." on stderr for any bad input.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <algorithm>
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

int main(int argc, char** argv) {
  std::string bundle, ids_s, dump;
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
                  "[--runs R] [--warmup W] [--dump-logits FILE] [--no-verify]\n");
      return 0;
    } else if (a == "--ignore-eos") {
      opt.ignore_eos = true;
    } else if (a == "--no-verify") {
      verify = false;
    } else {
      const char* val = need(a.c_str());
      if (!val) return fail("option " + a + " needs a value");
      if (a == "--bundle") bundle = val;
      else if (a == "--ids") ids_s = val;
      else if (a == "--mask") opt.mask = val;
      else if (a == "--dump-logits") dump = val;
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
