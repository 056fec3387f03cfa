// JNI bridge of the Android app (org.firstedge.demo.NativeRunner): a thin wrapper over first_edge::Runner.
// Built by this folder's CMakeLists.txt for the host (the JUnit tests) and, with the NDK, for arm64-v8a.
// Only the public header first_runner.h is used. A Runner Status that is not ok becomes a Java
// org.firstedge.demo.FirstEdgeException; no C++ exception leaves this file.
#include <jni.h>

#include <chrono>
#include <cmath>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "first_runner.h"

namespace {

const char* kException = "org/firstedge/demo/FirstEdgeException";

void throw_java(JNIEnv* env, const std::string& message) {
  if (env->ExceptionCheck()) return;  // a Java exception is already pending (e.g. from the callback)
  jclass cls = env->FindClass(kException);
  if (cls == nullptr) return;  // NoClassDefFoundError pending
  env->ThrowNew(cls, message.c_str());
}

std::string to_string(JNIEnv* env, jstring s) {
  if (s == nullptr) return std::string();
  const char* c = env->GetStringUTFChars(s, nullptr);
  std::string out = c ? c : "";
  if (c) env->ReleaseStringUTFChars(s, c);
  return out;
}

// Thrown from the token callback when Java asks to stop (or threw); caught in nativeGenerate. The runner
// calls the callback between decode steps, and its in-use guard is released on unwinding.
struct StopGeneration {};

jfieldID field(JNIEnv* env, jclass cls, const char* name, const char* sig) {
  jfieldID f = env->GetFieldID(cls, name, sig);
  if (f == nullptr) env->ExceptionClear();
  return f;
}

}  // namespace

extern "C" {

JNIEXPORT jlong JNICALL Java_org_firstedge_demo_NativeRunner_nativeCreate(JNIEnv* env, jclass, jstring dir,
                                                                          jint threads) {
  if (dir == nullptr) {
    throw_java(env, "no bundle folder given");
    return 0;
  }
  std::unique_ptr<first_edge::Runner> runner;
  first_edge::Status s;
  try {
    s = first_edge::Runner::create(to_string(env, dir), (int)threads, &runner);
  } catch (const std::exception& e) {
    s = first_edge::Status::Error(std::string("cannot load the bundle: ") + e.what());
  }
  if (!s) {
    throw_java(env, s.message);
    return 0;
  }
  return reinterpret_cast<jlong>(runner.release());
}

JNIEXPORT jint JNICALL Java_org_firstedge_demo_NativeRunner_nativeLayers(JNIEnv*, jclass, jlong handle) {
  auto* runner = reinterpret_cast<first_edge::Runner*>(handle);
  return runner ? runner->info().n_layers : 0;
}

JNIEXPORT void JNICALL Java_org_firstedge_demo_NativeRunner_nativeDestroy(JNIEnv*, jclass, jlong handle) {
  delete reinterpret_cast<first_edge::Runner*>(handle);
}

}  // extern "C"

namespace {

// Reads org.firstedge.demo.GenerateOptions into opt; false with a Java exception pending on a bad value.
bool read_options(JNIEnv* env, jobject jopt, first_edge::GenerateOptions* opt) {
  jclass ocls = env->GetObjectClass(jopt);
  opt->max_new_tokens = env->GetIntField(jopt, field(env, ocls, "maxNewTokens", "I"));
  float thr = env->GetFloatField(jopt, field(env, ocls, "threshold", "F"));
  if (!std::isnan(thr)) {
    opt->has_threshold = true;
    opt->threshold = thr;
  }
  opt->keep = env->GetIntField(jopt, field(env, ocls, "keep", "I"));
  opt->mask = to_string(env, (jstring)env->GetObjectField(jopt, field(env, ocls, "mask", "Ljava/lang/String;")));
  opt->ignore_eos = env->GetBooleanField(jopt, field(env, ocls, "ignoreEos", "Z"));
  opt->temperature = env->GetFloatField(jopt, field(env, ocls, "temperature", "F"));
  opt->top_p = env->GetFloatField(jopt, field(env, ocls, "topP", "F"));
  opt->seed = (uint64_t)env->GetLongField(jopt, field(env, ocls, "seed", "J"));
  if (env->ExceptionCheck()) return false;
  if (opt->has_threshold && !(opt->threshold >= 0.f && opt->threshold <= 1.f)) {
    throw_java(env, "threshold must be in [0, 1]");
    return false;
  }
  return true;
}

std::vector<int64_t> read_ids(JNIEnv* env, jintArray jids) {
  jsize n = env->GetArrayLength(jids);
  std::vector<jint> tmp((size_t)n);
  env->GetIntArrayRegion(jids, 0, n, tmp.data());
  return std::vector<int64_t>(tmp.begin(), tmp.end());
}

jintArray int_array(JNIEnv* env, const std::vector<int64_t>& v) {
  jintArray a = env->NewIntArray((jsize)v.size());
  if (a == nullptr) return nullptr;
  std::vector<jint> tmp(v.begin(), v.end());
  env->SetIntArrayRegion(a, 0, (jsize)tmp.size(), tmp.data());
  return a;
}

// Streams tokens to Java's boolean onToken(int) and keeps its own record (the stats of a stopped generation).
struct Forwarder {
  JNIEnv* env;
  jobject callback;
  jmethodID on_token = nullptr;
  std::vector<int64_t> streamed;
  std::chrono::steady_clock::time_point t0 = std::chrono::steady_clock::now(), t_first;

  bool init() {  // false: NoSuchMethodError pending
    if (callback == nullptr) return true;
    on_token = env->GetMethodID(env->GetObjectClass(callback), "onToken", "(I)Z");
    return on_token != nullptr;
  }
  void operator()(int64_t tok) {
    if (streamed.empty()) t_first = std::chrono::steady_clock::now();
    streamed.push_back(tok);
    if (on_token == nullptr) return;
    jboolean go = env->CallBooleanMethod(callback, on_token, (jint)tok);
    if (env->ExceptionCheck() || !go) throw StopGeneration{};
  }
  // What the bridge saw of a stopped generation: the tokens so far and its own clock.
  void stopped_result(int prompt_tokens, first_edge::GenerateResult* res) const {
    *res = first_edge::GenerateResult();
    res->tokens = streamed;
    res->prompt_tokens = prompt_tokens;
    auto first = streamed.empty() ? std::chrono::steady_clock::now() : t_first;
    res->prefill_ms = std::chrono::duration<double, std::milli>(first - t0).count();
    res->decode_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - first).count();
    res->stop_reason = "stopped";
  }
};

// Runs call (a runner or session call taking the token callback) with the stop/exception rules; true when
// the result is to be filled in (finished or stopped), false with a Java exception pending.
template <class Call>
bool run_streaming(JNIEnv* env, Forwarder& fwd, bool* stopped, Call call) {
  first_edge::Status s;
  *stopped = false;
  try {
    s = call([&fwd](int64_t t) { fwd(t); });
  } catch (const StopGeneration&) {
    *stopped = true;
  } catch (const std::exception& e) {
    s = first_edge::Status::Error(std::string("generation failed: ") + e.what());
  }
  if (env->ExceptionCheck()) return false;  // the callback threw: that exception goes on to Java
  if (!*stopped && !s) {
    throw_java(env, s.message);
    return false;
  }
  return true;
}

// Fills org.firstedge.demo.Generation (or its subclass ChatTurn) from a result.
bool fill_generation(JNIEnv* env, jobject out, const first_edge::GenerateResult& res, bool stopped) {
  jclass rcls = env->GetObjectClass(out);
  jintArray toks = int_array(env, res.tokens);
  if (toks == nullptr) return false;
  env->SetObjectField(out, field(env, rcls, "tokens", "[I"), toks);
  jfloatArray scores = env->NewFloatArray((jsize)res.scores.size());
  if (scores == nullptr) return false;
  env->SetFloatArrayRegion(scores, 0, (jsize)res.scores.size(), res.scores.data());
  env->SetObjectField(out, field(env, rcls, "scores", "[F"), scores);
  jbooleanArray mask = env->NewBooleanArray((jsize)res.mask.size());
  if (mask == nullptr) return false;
  {
    std::vector<jboolean> tmp(res.mask.size());
    for (size_t i = 0; i < res.mask.size(); i++) tmp[i] = res.mask[i] ? JNI_TRUE : JNI_FALSE;
    env->SetBooleanArrayRegion(mask, 0, (jsize)tmp.size(), tmp.data());
  }
  env->SetObjectField(out, field(env, rcls, "mask", "[Z"), mask);
  jlongArray calls = env->NewLongArray((jsize)res.layer_calls.size());
  if (calls == nullptr) return false;
  {
    std::vector<jlong> tmp(res.layer_calls.begin(), res.layer_calls.end());
    env->SetLongArrayRegion(calls, 0, (jsize)tmp.size(), tmp.data());
  }
  env->SetObjectField(out, field(env, rcls, "layerCalls", "[J"), calls);
  env->SetIntField(out, field(env, rcls, "promptTokens", "I"), res.prompt_tokens);
  env->SetDoubleField(out, field(env, rcls, "prefillMs", "D"), res.prefill_ms);
  env->SetDoubleField(out, field(env, rcls, "decodeSeconds", "D"), res.decode_s);
  jstring reason = env->NewStringUTF(res.stop_reason.c_str());
  if (reason == nullptr) return false;
  env->SetObjectField(out, field(env, rcls, "stopReason", "Ljava/lang/String;"), reason);
  env->SetBooleanField(out, field(env, rcls, "stopped", "Z"), stopped ? JNI_TRUE : JNI_FALSE);
  return !env->ExceptionCheck();
}

}  // namespace

extern "C" {

JNIEXPORT void JNICALL Java_org_firstedge_demo_NativeRunner_nativeGenerate(JNIEnv* env, jclass, jlong handle,
                                                                          jintArray jids, jobject jopt,
                                                                          jobject callback, jobject out) {
  auto* runner = reinterpret_cast<first_edge::Runner*>(handle);
  if (runner == nullptr || jids == nullptr || jopt == nullptr || out == nullptr) {
    throw_java(env, "nativeGenerate: a null argument");
    return;
  }
  first_edge::GenerateOptions opt;
  if (!read_options(env, jopt, &opt)) return;
  std::vector<int64_t> ids = read_ids(env, jids);
  Forwarder fwd{env, callback};
  if (!fwd.init()) return;
  first_edge::GenerateResult res;
  bool stopped = false;
  if (!run_streaming(env, fwd, &stopped, [&](const std::function<void(int64_t)>& cb) {
        return runner->generate(ids, opt, &res, cb);
      }))
    return;
  if (stopped) fwd.stopped_result((int)ids.size(), &res);
  fill_generation(env, out, res, stopped);
}

// ---- chat sessions (first_edge::Session over a Runner)

JNIEXPORT jlong JNICALL Java_org_firstedge_demo_ChatSession_nativeCreate(JNIEnv* env, jclass, jlong runner_handle) {
  auto* runner = reinterpret_cast<first_edge::Runner*>(runner_handle);
  if (runner == nullptr) {
    throw_java(env, "the runner is closed");
    return 0;
  }
  std::unique_ptr<first_edge::Session> session;
  first_edge::Status s = first_edge::Session::create(runner, &session);
  // load the extend method now (while the app shows "Loading"), not in the second turn
  if (s) s = runner->load_extend();
  if (!s) {
    throw_java(env, s.message);
    return 0;
  }
  return reinterpret_cast<jlong>(session.release());
}

JNIEXPORT void JNICALL Java_org_firstedge_demo_ChatSession_nativeChat(JNIEnv* env, jclass, jlong handle,
                                                                     jintArray jids, jobject jopt, jboolean trim,
                                                                     jobject callback, jobject out) {
  auto* session = reinterpret_cast<first_edge::Session*>(handle);
  if (session == nullptr || jids == nullptr || jopt == nullptr || out == nullptr) {
    throw_java(env, "nativeChat: a null argument");
    return;
  }
  first_edge::ChatOptions opt;
  if (!read_options(env, jopt, &opt)) return;
  opt.trim = trim == JNI_TRUE;
  std::vector<int64_t> ids = read_ids(env, jids);
  Forwarder fwd{env, callback};
  if (!fwd.init()) return;
  first_edge::ChatResult res;
  bool stopped = false;
  // a stopped turn unwinds out of Session::chat before the session records it: the session is left as it was
  // (like a refused turn), so the stopped exchange is not part of the conversation
  if (!run_streaming(env, fwd, &stopped, [&](const std::function<void(int64_t)>& cb) {
        return session->chat(ids, opt, &res, cb);
      }))
    return;
  if (stopped) {
    first_edge::GenerateResult g;
    fwd.stopped_result((int)ids.size(), &g);
    static_cast<first_edge::GenerateResult&>(res) = g;
    res.reply = fwd.streamed;
    res.turn = session->turns() + 1;
  }
  if (!fill_generation(env, out, res, stopped)) return;
  jclass cls = env->GetObjectClass(out);
  jintArray reply = int_array(env, res.reply);
  if (reply == nullptr) return;
  env->SetObjectField(out, field(env, cls, "reply", "[I"), reply);
  env->SetIntField(out, field(env, cls, "turn", "I"), res.turn);
  env->SetIntField(out, field(env, cls, "reusedTokens", "I"), res.reused_tokens);
  env->SetIntField(out, field(env, cls, "prefilledTokens", "I"), res.prefilled_tokens);
  env->SetIntField(out, field(env, cls, "historyTokens", "I"), res.history_tokens);
  env->SetIntField(out, field(env, cls, "droppedTurns", "I"), res.dropped_turns);
}

JNIEXPORT void JNICALL Java_org_firstedge_demo_ChatSession_nativeReset(JNIEnv*, jclass, jlong handle) {
  auto* session = reinterpret_cast<first_edge::Session*>(handle);
  if (session) session->reset();
}

JNIEXPORT jint JNICALL Java_org_firstedge_demo_ChatSession_nativeTurns(JNIEnv*, jclass, jlong handle) {
  auto* session = reinterpret_cast<first_edge::Session*>(handle);
  return session ? session->turns() : 0;
}

JNIEXPORT void JNICALL Java_org_firstedge_demo_ChatSession_nativeDestroy(JNIEnv*, jclass, jlong handle) {
  delete reinterpret_cast<first_edge::Session*>(handle);
}

}  // extern "C"
