// ctest: unit tests of the JSON reader, sha256 and mask rules, plus bad-bundle / bad-input checks against a
// real bundle given by FIRST_EDGE_TEST_BUNDLE (built by tests/test_et_cpp.py). Every failure must come back
// as a Status with a message, never a crash (run once under AddressSanitizer: -DFIRST_EDGE_ASAN=ON).
#include <algorithm>
#include <cmath>
#include <set>
#include <cstdio>
#include <future>
#include <thread>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "first_runner.h"
#include "json.h"
#include "sha256.h"

using namespace first_edge;

static int failures = 0, checks = 0;
#define CHECK(cond)                                                    \
  do {                                                                 \
    checks++;                                                          \
    if (!(cond)) {                                                     \
      failures++;                                                      \
      std::fprintf(stderr, "FAILED %s:%d: %s\n", __FILE__, __LINE__, #cond); \
    }                                                                  \
  } while (0)

static bool contains(const std::string& s, const std::string& sub) { return s.find(sub) != std::string::npos; }

static void expect_error(const Status& s, const std::string& sub, const char* what) {
  checks++;
  if (s.ok || !contains(s.message, sub)) {
    failures++;
    std::fprintf(stderr, "FAILED %s: expected an error containing '%s', got ok=%d '%s'\n", what, sub.c_str(), s.ok,
                 s.message.c_str());
  } else {
    std::printf("ok   %-34s -> %s\n", what, s.message.c_str());
  }
}

static std::string slurp(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}
static void spit(const std::string& p, const std::string& s) {
  std::ofstream f(p, std::ios::binary);
  f << s;
}
static int sh(const std::string& cmd) { return std::system(cmd.c_str()); }

static void unit_tests() {
  Json j;
  std::string err;
  CHECK(Json::parse("{\"a\": [1, 2.5, -3e2, true, null, \"x\\u00e9\\n\"], \"b\": {}}", &j, &err));
  CHECK(j["a"].arr.size() == 6 && j["a"].arr[2].num == -300 && j["a"].arr[5].str == "x\xc3\xa9\n");
  CHECK(!Json::parse("{\"a\": }", &j, &err) && !err.empty());
  CHECK(!Json::parse("[1, 2", &j, &err));
  CHECK(!Json::parse("{} x", &j, &err));
  CHECK(!Json::parse(std::string(200, '['), &j, &err));  // depth limit, no stack overflow
  {  // as_int on numbers outside int64 (libFuzzer: "n_layers": 1e300 was a float-to-int overflow, UB)
    int64_t v = 0;
    CHECK(Json::parse("[1e300, -1e300, 9223372036854775808, -9223372036854775808, 4096, 2.5]", &j, &err));
    CHECK(!j.arr[0].as_int(&v) && !j.arr[1].as_int(&v) && !j.arr[2].as_int(&v) && !j.arr[5].as_int(&v));
    CHECK(j.arr[3].as_int(&v) && v == INT64_MIN && j.arr[4].as_int(&v) && v == 4096);
  }
  Sha256 h;
  h.update((const uint8_t*)"abc", 3);
  CHECK(h.hex() == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  std::vector<uint8_t> m;
  CHECK(parse_mask("1011", 4, &m).ok && m[1] == 0 && m[2] == 1);
  expect_error(parse_mask("10x1", 4, &m), "only the characters", "mask with a bad character");
  expect_error(parse_mask("101", 4, &m), "length 3", "mask of the wrong length");
  CHECK(budget_mask({0.1f, 0.9f, 0.5f, 0.9f}, 2, {}, &m).ok && m == std::vector<uint8_t>({0, 1, 0, 1}));
  CHECK(budget_mask({0.1f, 0.9f, 0.5f, 0.9f}, 2, {0}, &m).ok && m == std::vector<uint8_t>({1, 1, 0, 0}));
  expect_error(budget_mask({0.1f, 0.2f}, 3, {}, &m), "--keep", "budget larger than L");
}

static void bundle_tests(const std::string& good, const std::string& tmp) {
  std::unique_ptr<Runner> r;
  Status s = Runner::create(good, 1, &r);
  CHECK(s.ok);
  if (!s.ok) {
    std::fprintf(stderr, "cannot load the good bundle: %s\n", s.message.c_str());
    return;
  }
  const int L = r->info().n_layers, V = r->info().vocab_size, C = r->info().max_context;
  // a normal generation works and counts only kept layers
  GenerateOptions o;
  o.max_new_tokens = 5;
  o.ignore_eos = true;
  o.mask = std::string(L, '1');
  o.mask[1] = '0';
  GenerateResult res;
  s = r->generate({5, 6, 7}, o, &res);
  CHECK(s.ok && res.tokens.size() == 5);
  CHECK(res.layer_calls.size() == (size_t)L && res.layer_calls[1] == 0 && res.layer_calls[0] == 4);
  // threads: two Runners at once give what each gives alone; one Runner refuses a second thread
  {
    std::unique_ptr<Runner> r2;
    CHECK(Runner::create(good, 1, &r2).ok);
    GenerateOptions t;
    t.max_new_tokens = 12;
    t.ignore_eos = true;
    GenerateResult a0, b0, a1, b1;
    CHECK(r->generate({5, 6, 7}, t, &a0).ok && r2->generate({9, 8, 7, 6}, t, &b0).ok);
    Status sa, sb;
    std::thread ta([&] { sa = r->generate({5, 6, 7}, t, &a1); });
    std::thread tb([&] { sb = r2->generate({9, 8, 7, 6}, t, &b1); });
    ta.join();
    tb.join();
    CHECK(sa.ok && sb.ok && a1.tokens == a0.tokens && b1.tokens == b0.tokens);
    std::promise<void> started, tried;
    std::shared_future<void> tried_f = tried.get_future().share();
    bool first = true;
    Status inside;
    std::thread owner([&] {
      inside = r->generate({5, 6, 7}, t, &a1, [&](int64_t) {
        if (first) {
          first = false;
          started.set_value();
          tried_f.wait();
        }
      });
    });
    started.get_future().wait();
    GenerateResult other;
    expect_error(r->generate({5, 6, 7}, t, &other), "in use by another thread", "one Runner from two threads");
    std::vector<float> lg2;
    expect_error(r->decode(3, 3, std::vector<uint8_t>(L, 1), &lg2), "in use by another thread", "decode from another thread");
    tried.set_value();
    owner.join();
    CHECK(inside.ok && a1.tokens == a0.tokens);
  }
  // bad inputs
  GenerateOptions g;
  expect_error(r->generate({}, g, &res), "empty", "empty prompt");
  expect_error(r->generate({1, V + 5}, g, &res), "outside the vocabulary", "token id out of range");
  expect_error(r->generate({-1}, g, &res), "outside the vocabulary", "negative token id");
  expect_error(r->generate(std::vector<int64_t>(C, 3), g, &res), "longer than the context", "prompt too long");
  GenerateOptions bm = g;
  bm.mask = "01";
  expect_error(r->generate({1, 2}, bm, &res), "length 2", "mask of the wrong length");
  GenerateOptions bk = g;
  bk.keep = L + 1;
  expect_error(r->generate({1, 2}, bk, &res), "--keep", "budget larger than L");
  GenerateOptions bt = g;
  bt.temperature = -1;
  expect_error(r->generate({1, 2}, bt, &res), "temperature", "negative temperature");
  GenerateOptions bp = g;
  bp.top_p = 0;
  expect_error(r->generate({1, 2}, bp, &res), "top_p", "top_p 0");
  GenerateOptions bn = g;
  bn.max_new_tokens = 0;
  expect_error(r->generate({1, 2}, bn, &res), "max_new_tokens", "zero new tokens");
  GenerateOptions bth = g;
  bth.has_threshold = true;
  bth.threshold = NAN;
  expect_error(r->generate({1, 2}, bth, &res), "finite", "NaN threshold");
  std::vector<float> lg;
  expect_error(r->decode(1, C + 3, std::vector<uint8_t>(L, 1), &lg), "outside the context", "decode past the context");
  // context fills up: generation stops with max_context, never writes past the buffers
  GenerateOptions full = g;
  full.max_new_tokens = C + 10;
  full.ignore_eos = true;
  s = r->generate(std::vector<int64_t>(C - 3, 4), full, &res);
  CHECK(s.ok && res.stop_reason == "max_context");
  r.reset();

  // bad bundles: copies of the good one with one thing broken
  std::string b = tmp + "/bad";
  auto fresh = [&]() { sh("rm -rf '" + b + "' && cp -r '" + good + "' '" + b + "'"); };
  std::string mf = slurp(good + "/manifest.json");
  auto replace = [&](std::string s, const std::string& a, const std::string& c) {
    size_t p = s.find(a);
    if (p != std::string::npos) s.replace(p, a.size(), c);
    return s;
  };
  expect_error(Runner::create(tmp + "/does-not-exist", 1, &r), "not found", "missing folder");
  fresh();
  sh("rm '" + b + "/manifest.json'");
  expect_error(Runner::create(b, 1, &r), "no manifest.json", "no manifest");
  fresh();
  spit(b + "/manifest.json", mf.substr(0, mf.size() / 2));
  expect_error(Runner::create(b, 1, &r), "not valid JSON", "truncated manifest");
  fresh();
  spit(b + "/manifest.json", replace(mf, "\"format_version\": 3", "\"format_version\": 99"));
  expect_error(Runner::create(b, 1, &r), "format version", "unknown format version");
  fresh();
  spit(b + "/manifest.json", replace(mf, "\"runtime\": \"executorch\"", "\"runtime\": \"onnxruntime\""));
  expect_error(Runner::create(b, 1, &r), "ExecuTorch bundle", "wrong runtime");
  fresh();
  spit(b + "/manifest.json", replace(mf, "\"n_kv_heads\": ", "\"n_kv_heads\": 3"));
  expect_error(Runner::create(b, 1, &r), "n_kv_heads", "inconsistent dims");
  fresh();
  spit(b + "/manifest.json", replace(mf, "\"pool_start\": ", "\"pool_start\": -1, \"pool_start_was\": "));
  expect_error(Runner::create(b, 1, &r), "routing.pool_start", "negative pool_start");
  fresh();
  spit(b + "/manifest.json", replace(mf, "\"pool_start\": ", "\"pool_start\": \"2\", \"pool_start_was\": "));
  expect_error(Runner::create(b, 1, &r), "routing.pool_start", "pool_start not a number");
  fresh();
  sh("rm '" + b + "/model.pte'");
  expect_error(Runner::create(b, 1, &r), "missing: model.pte", "missing model.pte");
  fresh();
  sh("printf 'x' >> '" + b + "/model.pte'");
  expect_error(Runner::create(b, 1, &r), "bytes, the manifest says", "longer model.pte (size before hash)");
  fresh();
  sh("printf 'X' | dd of='" + b + "/model.pte' bs=1 seek=100 conv=notrunc 2>/dev/null");
  expect_error(Runner::create(b, 1, &r), "sha256", "modified model.pte (same size)");
  // confined file access: names and links that leave the folder are refused before anything is read
  fresh();
  spit(b + "/manifest.json", replace(mf, "\"tokenizer.json\": {", "\"../tokenizer.json\": {"));
  expect_error(Runner::create(b, 1, &r), "outside the bundle: ../tokenizer.json", "file name with ..");
  fresh();
  spit(b + "/manifest.json", replace(mf, "\"tokenizer.json\": {", "\"/etc/passwd\": {"));
  expect_error(Runner::create(b, 1, &r), "outside the bundle: /etc/passwd", "absolute file name");
  fresh();
  sh("mv '" + b + "/tokenizer.json' '" + tmp + "/outside.json' && ln -s '" + tmp + "/outside.json' '" + b +
     "/tokenizer.json'");
  expect_error(Runner::create(b, 1, &r), "leaves the bundle folder", "symlink leaving the folder");
  sh("rm -f '" + tmp + "/outside.json'");
  fresh();
  spit(b + "/manifest.json", replace(mf, "\"sha256\": \"", "\"sha256\": \"x"));
  expect_error(Runner::create(b, 1, &r), "must be {\"sha256\"", "malformed file entry");
  fresh();
  spit(b + "/model.pte", "garbage");
  expect_error(Runner::create(b, 1, &r, /*verify_hashes=*/false), "cannot load", "garbage .pte (hash check off)");
  fresh();
  spit(b + "/manifest.json", replace(mf, "\"max_context\": ", "\"max_context\": 1"));
  expect_error(Runner::create(b, 1, &r, false), "max_context", "max_context differs from the .pte");
  fresh();
  spit(b + "/manifest.json", replace(mf, "\"layer_0\"", "\"layer_zero\""));
  expect_error(Runner::create(b, 1, &r, false), "lacks the method", "unknown method name");
  // graphs.io: the declared inputs and outputs, what the runner binds by name
  fresh();
  spit(b + "/manifest.json", replace(mf, "\"io\": {", "\"io_was\": {"));
  expect_error(Runner::create(b, 1, &r, false), "no graphs.io section", "manifest without graphs.io");
  fresh();
  spit(b + "/manifest.json", replace(mf, "\"name\": \"present.1.value\"", "\"name\": \"present.1.values\""));
  expect_error(Runner::create(b, 1, &r, false), "lacks present.1.value", "graphs.io without a K/V output");
  fresh();
  spit(b + "/manifest.json", replace(mf, "\"dtype\": \"bool\"", "\"dtype\": \"int64\""));
  expect_error(Runner::create(b, 1, &r, false), "output layer_mask is bool", "declared dtype differs from the .pte");
  fresh();
  spit(b + "/manifest.json", replace(mf, "\"dtype\": \"bool\"", "\"dtype\": \"float16\""));
  expect_error(Runner::create(b, 1, &r, false), "unknown dtype 'float16'", "unknown dtype");
  sh("rm -rf '" + b + "'");
}

// Layer l's first n K and V entries of `r` against `ref`'s: the largest absolute difference.
static double kv_diff(const Runner& r, const Runner& ref, int n) {
  const BundleInfo& info = r.info();
  const size_t count = (size_t)n * info.n_kv_heads * info.head_dim;
  double worst = 0;
  for (int l = 0; l < info.n_layers; l++) {
    const float *k, *v, *rk, *rv;
    int len = 0, rlen = 0;
    if (!r.kv_cache(l, &k, &v, &len).ok || !ref.kv_cache(l, &rk, &rv, &rlen).ok || len < n || rlen < n) return 1e30;
    for (size_t i = 0; i < count; i++) worst = std::max(worst, (double)std::max(std::fabs(k[i] - rk[i]), std::fabs(v[i] - rv[i])));
  }
  return worst;
}

// Chat sessions (runtime/session.py's rules): after every turn each layer's K/V for the conversation so far equals
// a fresh all-layer prefill of it, each greedy reply equals single-shot generation on the conversation with the
// same mask; refused turns (empty, bad ids or options, longer than the context, context full) leave the session
// usable; trimming; reset; bundles that cannot hold a session.
static void session_tests(const std::string& good, const std::string& tmp) {
  std::unique_ptr<Runner> r, ref;
  if (!Runner::create(good, 1, &r).ok || !Runner::create(good, 1, &ref).ok) {
    CHECK(false);
    return;
  }
  const BundleInfo& info = r->info();
  const int L = info.n_layers, V = info.vocab_size, C = info.max_context;
  const ChatIds& ids = info.chat_ids;
  CHECK(ids.has_prefix && ids.has_suffix && ids.has_turn_prefix && !ids.turn_prefix.empty());
  CHECK(r->load_extend().ok && r->load_extend().ok);  // once, then a no-op
  std::unique_ptr<Session> sess;
  Status s = Session::create(r.get(), &sess);
  CHECK(s.ok);
  if (!s.ok) return;
  // four turns, the masks from the routers' (default) threshold, two budgets, an explicit threshold
  const std::vector<std::vector<int64_t>> turns = {{5, 17, 23, 9}, {41, 8, 30}, {12, 60, 7, 77}, {33}};
  std::vector<ChatOptions> opts(4);
  opts[1].keep = 2;
  opts[2].keep = 5;
  opts[3].has_threshold = true;
  opts[3].threshold = 0.45f;
  double worst = 0;
  std::vector<int64_t> first_reply, prev_reply;
  std::set<std::string> masks;
  for (size_t i = 0; i < turns.size(); i++) {
    opts[i].max_new_tokens = 5;
    ChatResult res;
    s = sess->chat(turns[i], opts[i], &res);
    CHECK(s.ok);
    if (!s.ok) {
      std::fprintf(stderr, "turn %zu: %s\n", i + 1, s.message.c_str());
      return;
    }
    std::vector<int64_t> hist = sess->history();
    CHECK(res.turn == (int)i + 1 && res.history_tokens == (int)hist.size());
    if (i == 0) {
      first_reply = res.reply;
      CHECK(res.reused_tokens == 0 && res.prefilled_tokens == (int)(ids.prefix.size() + turns[0].size() + ids.suffix.size()));
    } else {
      CHECK(res.reused_tokens > 0 &&
            res.prefilled_tokens == (int)(prev_reply.size() + ids.turn_prefix.size() + turns[i].size() + ids.suffix.size()));
      CHECK(res.prompt_tokens == res.prefilled_tokens && res.reused_tokens + res.prefilled_tokens == res.history_tokens);
    }
    prev_reply = res.reply;
    std::string m;
    for (uint8_t x : res.mask) m.push_back(x ? '1' : '0');
    masks.insert(m);
    std::printf("     turn %d: mask %s reply %zu tokens, reused %d, prefilled %d\n", res.turn, m.c_str(), res.reply.size(),
                res.reused_tokens, res.prefilled_tokens);
    // the cache against a fresh all-layer prefill of the conversation (the session's layers hold more entries:
    // the decode steps after the prompt, overwritten by the next turn)
    std::vector<float> lg, sc;
    std::vector<uint8_t> mk;
    CHECK(ref->prefill(hist, 0.5f, &lg, &sc, &mk).ok);
    double d = kv_diff(*r, *ref, (int)hist.size());
    worst = std::max(worst, d);
    CHECK(d <= 1e-4);
    // the reply equals single-shot generation on the conversation with the same mask
    GenerateOptions one;
    one.max_new_tokens = 5;
    one.mask = m;
    GenerateResult g;
    CHECK(ref->generate(hist, one, &g).ok);
    std::vector<int64_t> reply;
    for (int64_t t : g.tokens) {
      if (std::count(info.eos_ids.begin(), info.eos_ids.end(), t)) break;
      reply.push_back(t);
    }
    CHECK(reply == res.reply);
  }
  CHECK(masks.size() > 1);
  {  // the comparison is not vacuous: a conversation with one token changed differs
    std::vector<int64_t> other = sess->history();
    other[other.size() / 2] = (other[other.size() / 2] + 1) % V;
    std::vector<float> lg, sc;
    std::vector<uint8_t> mk;
    CHECK(ref->prefill(other, 0.5f, &lg, &sc, &mk).ok && kv_diff(*r, *ref, (int)other.size()) > 1e-3);
  }
  std::printf("ok   session: 4 turns, %zu distinct masks, max |K/V - fresh prefill| %.3g\n", masks.size(), worst);
  // refused turns: the session is unchanged and usable
  std::vector<int64_t> before = sess->history();
  ChatResult res;
  ChatOptions o;
  o.max_new_tokens = 4;
  expect_error(sess->chat({}, o, &res), "the user turn is empty", "session: empty turn");
  expect_error(sess->chat({5, V + 2}, o, &res), "outside the vocabulary", "session: token id out of range");
  ChatOptions bad = o;
  bad.keep = L + 1;
  expect_error(sess->chat({5}, bad, &res), "--keep", "session: bad budget");
  expect_error(sess->chat(std::vector<int64_t>(C, 7), o, &res), "the user turn needs", "session: turn longer than the context");
  ChatOptions trim = o;
  trim.trim = true;
  expect_error(sess->chat(std::vector<int64_t>(C, 7), trim, &res), "more than the context", "session: too long, with trim");
  CHECK(sess->history() == before);
  // the context fills up: an error, then trimming drops the oldest turns and re-prefills the rest
  std::vector<int64_t> long_turn;
  for (int t = 5; t < 25; t++) long_turn.push_back(t);
  sess->reset();
  CHECK(sess->history().empty() && sess->turns() == 0);
  ChatOptions fill = o;
  fill.ignore_eos = true;
  CHECK(sess->chat(long_turn, fill, &res).ok && res.turn == 1);
  CHECK(sess->chat(long_turn, fill, &res).ok && res.turn == 2);
  before = sess->history();
  expect_error(sess->chat(long_turn, fill, &res), "the conversation is full", "session: context full");
  CHECK(sess->history() == before && sess->turns() == 2);
  fill.trim = true;
  s = sess->chat(long_turn, fill, &res);
  CHECK(s.ok && res.dropped_turns == 1 && res.turn == 3 && sess->turns() == 2);
  std::vector<int64_t> hist = sess->history();
  CHECK(res.history_tokens == (int)hist.size() && (int)hist.size() < C);
  CHECK(std::equal(ids.prefix.begin(), ids.prefix.end(), hist.begin()));
  std::vector<float> lg, sc;
  std::vector<uint8_t> mk;
  CHECK(ref->prefill(hist, 0.5f, &lg, &sc, &mk).ok && kv_diff(*r, *ref, (int)hist.size()) <= 1e-4);
  CHECK(sess->chat({7, 8}, trim, &res).ok && res.turn == 4 && res.dropped_turns >= 1);  // still usable
  {  // a token callback that throws (the JNI bridge's stop) unwinds out of chat: the turn is not recorded, the
     // Runner is free again and the next turn's cache is exact
    before = sess->history();
    int n = 0;
    bool caught = false;
    try {
      sess->chat({9, 10}, trim, &res, [&](int64_t) {
        if (++n == 2) throw 42;
      });
    } catch (int) {
      caught = true;
    }
    CHECK(caught && sess->history() == before);
    s = sess->chat({9, 10}, trim, &res);
    CHECK(s.ok && res.reused_tokens == (int)before.size());
    hist = sess->history();
    CHECK(ref->prefill(hist, 0.5f, &lg, &sc, &mk).ok && kv_diff(*r, *ref, (int)hist.size()) <= 1e-4);
  }
  // reset: the first turn again gives the first reply
  sess->reset();
  CHECK(sess->chat(turns[0], opts[0], &res).ok && res.turn == 1 && res.reply == first_reply);
  // the Runner's extend refuses a past it does not hold
  std::vector<float> probs;
  expect_error(r->extend({5, 6}, 0, &lg, &probs), "cannot extend", "extend without a past");
  expect_error(r->extend({5, 6}, C, &lg, &probs), "cannot extend", "extend past the cached tokens");
  expect_error(r->extend({}, 1, &lg, &probs), "cannot extend", "extend with no tokens");
  sess.reset();
  r.reset();
  ref.reset();
  // bundles that cannot hold a session (or are refused)
  std::string b = tmp + "/bad_session";
  std::string mf = slurp(good + "/manifest.json");
  auto edited = [&](const std::string& a, const std::string& c) {
    sh("rm -rf '" + b + "' && cp -r '" + good + "' '" + b + "'");
    std::string t = mf;
    size_t p = t.find(a);
    CHECK(p != std::string::npos);
    if (p != std::string::npos) t.replace(p, a.size(), c);
    spit(b + "/manifest.json", t);
  };
  edited("\"turn_prefix\": [", "\"turn_prefix\": null, \"turn_prefix_was\": [");
  CHECK(Runner::create(b, 1, &r).ok);
  if (r) expect_error(Session::create(r.get(), &sess), "cannot continue a conversation", "session: no turn_prefix ids");
  edited("\"suffix\": [", "\"suffix_was\": [");
  CHECK(Runner::create(b, 1, &r).ok);
  if (r) expect_error(Session::create(r.get(), &sess), "lacks the prefix or suffix", "session: no suffix ids");
  edited("\"prefix\": [", "\"prefix\": [" + std::to_string(V) + ", ");
  expect_error(Runner::create(b, 1, &r), "chat.ids", "chat.ids outside the vocabulary");
  edited("\"prefix\": [", "\"prefix\": [\"a\", ");
  expect_error(Runner::create(b, 1, &r), "chat.ids", "chat.ids not integers");
  edited("\"turn_prefix\": \"", "\"turn_prefix\": 3, \"turn_prefix_was\": \"");
  expect_error(Runner::create(b, 1, &r), "chat.turn_prefix", "chat.turn_prefix not a string");
  edited("\"extend\": \"extend\"", "\"extend\": \"extend2\"");
  expect_error(Runner::create(b, 1, &r, false), "lacks the extend method 'extend2'", "unknown extend method");
  edited("\"extend\": \"extend\"", "\"extend\": 7");
  expect_error(Runner::create(b, 1, &r, false), "graphs.methods.extend", "extend method name not a string");
  edited("\"name\": \"router_probs\"", "\"name\": \"router_prob\"");
  expect_error(Runner::create(b, 1, &r, false), "lacks router_probs", "graphs.io.extend without router_probs");
  sh("rm -rf '" + b + "'");
}

int main() {
  unit_tests();
  const char* good = std::getenv("FIRST_EDGE_TEST_BUNDLE");
  const char* tmp = std::getenv("FIRST_EDGE_TEST_TMP");
  if (good && *good) {
    bundle_tests(good, tmp && *tmp ? tmp : "/tmp");
    session_tests(good, tmp && *tmp ? tmp : "/tmp");
  }
  else std::printf("FIRST_EDGE_TEST_BUNDLE not set: bundle tests skipped\n");
  std::printf("%d checks, %d failed\n", checks, failures);
  return failures ? 1 : 0;
}
