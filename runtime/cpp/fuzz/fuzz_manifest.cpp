// libFuzzer target: the C++ runner's manifest.json parsing and bundle validation (no ExecuTorch).
//
// Each input is written as manifest.json into one bundle folder (made once per process under $TMPDIR,
// holding small files named like a real bundle's: model.pte, tokenizer.json, report.md) and loaded with
// first_edge::load_bundle_info(dir, &info, /*verify_hashes=*/true); the raw bytes also go through
// Json::parse. Any Status error is fine; a crash, a sanitizer report, a hang or a leak is a bug.
//
// Build and run: scripts/fuzz_cpp.sh (clang -fsanitize=fuzzer,address,undefined). With
// FIRST_EDGE_FUZZ_EXPORT=DIR the binary writes the fake bundle files into DIR and exits, so that the
// seed maker can put their sizes and sha256 into the seed manifests (valid seeds pass validation fully);
// with FIRST_EDGE_FUZZ_VERBOSE set it prints each input's Status (e.g. `fuzz_manifest seeds/*`).
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "first_runner.h"
#include "json.h"

namespace {

struct FakeFile {
  const char* name;
  const char* data;
};
// model.pte: a few bytes with an ExecuTorch-like header (load_bundle_info never parses it, only hashes it)
const FakeFile kFiles[] = {
    {"model.pte", "\0\0\0\0ET12fuzz"},
    {"tokenizer.json", "{\"version\":\"1.0\",\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0,\"b\":1}}}\n"},
    {"report.md", "# fuzz bundle\n"},
};
size_t fake_size(const FakeFile& f) { return f.name[0] == 'm' ? 12 : std::strlen(f.data); }

bool write_file(const std::string& path, const void* data, size_t n) {
  FILE* fp = std::fopen(path.c_str(), "wb");
  if (!fp) return false;
  bool ok = std::fwrite(data, 1, n, fp) == n;
  return std::fclose(fp) == 0 && ok;
}

bool write_fake_files(const std::string& dir) {
  for (const FakeFile& f : kFiles)
    if (!write_file(dir + "/" + f.name, f.data, fake_size(f))) return false;
  return true;
}

std::string g_dir;

void cleanup() {
  if (g_dir.empty()) return;
  for (const FakeFile& f : kFiles) unlink((g_dir + "/" + f.name).c_str());
  unlink((g_dir + "/manifest.json").c_str());
  rmdir(g_dir.c_str());
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  if (const char* exp = std::getenv("FIRST_EDGE_FUZZ_EXPORT")) {
    mkdir(exp, 0755);
    if (!write_fake_files(exp)) {
      std::fprintf(stderr, "cannot write the fake bundle files into %s\n", exp);
      std::exit(2);
    }
    std::exit(0);
  }
  const char* tmp = std::getenv("TMPDIR");
  std::string tmpl = std::string(tmp && *tmp ? tmp : "/tmp") + "/first-edge-fuzz-XXXXXX";
  if (!mkdtemp(&tmpl[0]) || !write_fake_files(tmpl)) {
    std::fprintf(stderr, "cannot make the fuzz bundle folder %s\n", tmpl.c_str());
    std::exit(2);
  }
  g_dir = tmpl;
  std::atexit(cleanup);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string text(reinterpret_cast<const char*>(data), size);
  first_edge::Json j;
  std::string err;
  (void)first_edge::Json::parse(text, &j, &err);

  if (!write_file(g_dir + "/manifest.json", data, size)) std::abort();  // the harness itself broke
  first_edge::BundleInfo info;
  first_edge::Status s = first_edge::load_bundle_info(g_dir, &info, true);
  static const bool verbose = std::getenv("FIRST_EDGE_FUZZ_VERBOSE") != nullptr;
  if (verbose) std::fprintf(stderr, "load_bundle_info: %s\n", s.ok ? "ok" : s.message.c_str());
  if (s.ok && (info.n_layers <= 0 || info.pte_file.empty())) std::abort();  // accepted a broken bundle
  if (s.ok) {  // accepted chat ids are token ids of the vocabulary; the extend graph is declared
    for (const auto* v : {&info.chat_ids.prefix, &info.chat_ids.suffix, &info.chat_ids.turn_prefix})
      for (int64_t t : *v)
        if (t < 0 || t >= info.vocab_size) std::abort();
    if (!info.io.count("extend") || info.extend_method.empty()) std::abort();
  }
  return 0;
}
