// Chat sessions on the C++ runner: the rules of runtime/session.py, kept in step with it (DESIGN.md section 5).
//
// Turn 1: chat prefix + user + suffix through prefill. Turn n: the previous reply (without its stop token) +
// the template's turn prefix + user + suffix through the Runner's extend, after the `exact` tokens whose K/V
// every layer holds (the end of the previous turn's prompt: the decode-time entries after it are overwritten).
// The routers' scores pool the new tokens from the user's on; decode continues after the new tokens.
#include <chrono>
#include <set>

#include "first_runner.h"

namespace first_edge {

namespace {
struct Turn {
  std::vector<int64_t> user, reply;
};

void append(std::vector<int64_t>* out, const std::vector<int64_t>& a) { out->insert(out->end(), a.begin(), a.end()); }
}  // namespace

struct Session::Impl {
  Runner* runner = nullptr;
  std::vector<int64_t> prefix, suffix, turn_prefix;
  std::vector<Turn> turns;
  int turn_count = 0;
  int64_t exact = 0;  // tokens whose K/V every layer holds exactly (the history up to the last turn's prompt)

  std::vector<int64_t> history(const std::vector<Turn>& ts) const {
    std::vector<int64_t> out;
    for (size_t i = 0; i < ts.size(); i++) {
      if (i == 0) {
        append(&out, prefix);
      } else {
        append(&out, ts[i - 1].reply);
        append(&out, turn_prefix);
      }
      append(&out, ts[i].user);
      append(&out, suffix);
    }
    return out;
  }
};

Session::~Session() = default;

Status Session::create(Runner* runner, std::unique_ptr<Session>* out) {
  if (!runner) return Status::Error("a Session needs a Runner");
  const ChatIds& ids = runner->info().chat_ids;
  if (!ids.has_prefix || !ids.has_suffix)
    return Status::Error("manifest chat.ids lacks the prefix or suffix token ids; rebuild the bundle");
  if (!ids.has_turn_prefix)
    return Status::Error("this bundle's chat template cannot continue a conversation (no chat.ids.turn_prefix in the "
                         "manifest); rebuild it, or use single-turn generation");
  std::unique_ptr<Session> s(new Session());
  s->impl_.reset(new Impl());
  s->impl_->runner = runner;
  s->impl_->prefix = ids.prefix;
  s->impl_->suffix = ids.suffix;
  s->impl_->turn_prefix = ids.turn_prefix;
  *out = std::move(s);
  return Status::Ok();
}

void Session::reset() {
  impl_->turns.clear();
  impl_->turn_count = 0;
  impl_->exact = 0;
}

std::vector<int64_t> Session::history() const { return impl_->history(impl_->turns); }

int Session::turns() const { return (int)impl_->turns.size(); }

Status Session::chat(const std::vector<int64_t>& u, const ChatOptions& opt, ChatResult* res,
                     const std::function<void(int64_t)>& on_token) {
  Impl& impl = *impl_;
  Runner& runner = *impl.runner;
  const BundleInfo& info = runner.info();
  // everything that can be refused is refused before the cache is touched: the session stays as it was
  Status s = check_generate_options(opt, info.n_layers);
  if (!s) return s;
  if (u.empty()) return Status::Error("the user turn is empty");
  for (int64_t t : u)
    if (t < 0 || t >= info.vocab_size)
      return Status::Error("token id " + std::to_string(t) + " is outside the vocabulary (0.." +
                           std::to_string(info.vocab_size - 1) + ")");
  const int64_t C = info.max_context;
  std::vector<Turn> turns = impl.turns;
  std::vector<int64_t> fresh;  // a first turn: prefix + user + suffix
  append(&fresh, impl.prefix);
  append(&fresh, u);
  append(&fresh, impl.suffix);
  std::vector<int64_t> next;  // a later turn: previous reply + turn prefix + user + suffix
  int pool_from = 0;
  if (!turns.empty()) {
    next = turns.back().reply;
    append(&next, impl.turn_prefix);
    pool_from = (int)next.size();
    append(&next, u);
    append(&next, impl.suffix);
  } else {
    next = fresh;
  }
  int dropped = 0;
  int64_t exact = impl.exact;
  if (exact + (int64_t)next.size() >= C) {  // at least one position must be left to generate
    if ((int64_t)fresh.size() >= C)
      return Status::Error("the user turn needs " + std::to_string(fresh.size()) +
                           " tokens with the chat template, more than the context of " + std::to_string(C) +
                           " tokens leaves to generate");
    if (!opt.trim)
      return Status::Error("the conversation is full: this turn needs " + std::to_string(exact + next.size() + 1) +
                           " of " + std::to_string(C) +
                           " context tokens; reset the session or allow dropping the oldest turns");
    while (!turns.empty()) {  // drop the oldest whole turns until the rest and this turn fit
      turns.erase(turns.begin());
      dropped++;
      if (!turns.empty() && (int64_t)(impl.history(turns).size() + next.size()) < C) break;
    }
    if (turns.empty()) {
      next = fresh;
      pool_from = 0;
    }
    exact = (int64_t)impl.history(turns).size();
  }
  int reprefill = 0;
  double reprefill_ms = 0;
  if (dropped && !turns.empty()) {
    // the kept turns' K/V were computed at other positions: prefill them again (outputs unused)
    auto t0 = std::chrono::steady_clock::now();
    std::vector<int64_t> hist = impl.history(turns);
    std::vector<float> lg, sc;
    std::vector<uint8_t> mk;
    s = runner.prefill(hist, info.default_threshold, &lg, &sc, &mk);
    if (!s) return s;
    // the cache now holds exactly the kept turns: the session keeps them even if this turn fails below
    impl.turns = turns;
    impl.exact = exact;
    reprefill = (int)hist.size();
    reprefill_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  }
  GenerateResult r;
  s = runner.generate_with_past(next, turns.empty() ? 0 : exact, pool_from, opt, &r, on_token);
  if (!s) return s;
  r.prefill_ms += reprefill_ms;
  ChatResult out;
  static_cast<GenerateResult&>(out) = std::move(r);
  std::set<int64_t> eos(info.eos_ids.begin(), info.eos_ids.end());
  for (int64_t t : out.tokens) {  // the reply: the tokens before the first end-of-turn / EOS id
    if (eos.count(t)) break;
    out.reply.push_back(t);
  }
  out.reused_tokens = turns.empty() ? 0 : (int)exact;
  out.prefilled_tokens = (int)next.size() + reprefill;
  impl.exact = turns.empty() ? (int64_t)next.size() : exact + (int64_t)next.size();
  turns.push_back({u, out.reply});
  impl.turns = std::move(turns);
  impl.turn_count++;
  out.turn = impl.turn_count;
  out.history_tokens = (int)impl.exact;
  out.dropped_turns = dropped;
  *res = std::move(out);
  return Status::Ok();
}

}  // namespace first_edge
