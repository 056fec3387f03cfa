// JNI bridge of the Android app (org.firstedge.demo.NativeRunner): a thin wrapper over first_edge::Runner.
// Built by this folder's CMakeLists.txt for the host (the JUnit tests) and, with the NDK, for arm64-v8a.
// Only the public header first_runner.h is used. A Runner Status that is not ok becomes a Java
// org.firstedge.demo.FirstEdgeException; no C++ exception leaves this file.
#include <jni.h>

#include <chrono>
#include <cmath>
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

JNIEXPORT void JNICALL Java_org_firstedge_demo_NativeRunner_nativeGenerate(JNIEnv* env, jclass, jlong handle,
                                                                          jintArray jids, jobject jopt,
                                                                          jobject callback, jobject out) {
  auto* runner = reinterpret_cast<first_edge::Runner*>(handle);
  if (runner == nullptr || jids == nullptr || jopt == nullptr || out == nullptr) {
    throw_java(env, "nativeGenerate: a null argument");
    return;
  }
  // options
  first_edge::GenerateOptions opt;
  jclass ocls = env->GetObjectClass(jopt);
  opt.max_new_tokens = env->GetIntField(jopt, field(env, ocls, "maxNewTokens", "I"));
  float thr = env->GetFloatField(jopt, field(env, ocls, "threshold", "F"));
  if (!std::isnan(thr)) {
    opt.has_threshold = true;
    opt.threshold = thr;
  }
  opt.keep = env->GetIntField(jopt, field(env, ocls, "keep", "I"));
  opt.mask = to_string(env, (jstring)env->GetObjectField(jopt, field(env, ocls, "mask", "Ljava/lang/String;")));
  opt.ignore_eos = env->GetBooleanField(jopt, field(env, ocls, "ignoreEos", "Z"));
  opt.temperature = env->GetFloatField(jopt, field(env, ocls, "temperature", "F"));
  opt.top_p = env->GetFloatField(jopt, field(env, ocls, "topP", "F"));
  opt.seed = (uint64_t)env->GetLongField(jopt, field(env, ocls, "seed", "J"));
  if (env->ExceptionCheck()) return;
  if (opt.has_threshold && !(opt.threshold >= 0.f && opt.threshold <= 1.f)) {
    throw_java(env, "threshold must be in [0, 1]");
    return;
  }
  // prompt ids
  jsize n = env->GetArrayLength(jids);
  std::vector<int64_t> ids((size_t)n);
  {
    std::vector<jint> tmp((size_t)n);
    env->GetIntArrayRegion(jids, 0, n, tmp.data());
    for (jsize i = 0; i < n; i++) ids[(size_t)i] = tmp[(size_t)i];
  }
  // the per-token callback: Java's boolean onToken(int)
  jmethodID on_token = nullptr;
  if (callback != nullptr) {
    on_token = env->GetMethodID(env->GetObjectClass(callback), "onToken", "(I)Z");
    if (on_token == nullptr) return;  // NoSuchMethodError pending
  }
  std::vector<int64_t> streamed;
  using clock = std::chrono::steady_clock;
  auto t0 = clock::now();
  clock::time_point t_first;
  auto forward = [&](int64_t tok) {
    if (streamed.empty()) t_first = clock::now();
    streamed.push_back(tok);
    if (on_token == nullptr) return;
    jboolean go = env->CallBooleanMethod(callback, on_token, (jint)tok);
    if (env->ExceptionCheck() || !go) throw StopGeneration{};
  };
  first_edge::GenerateResult res;
  first_edge::Status s;
  bool stopped = false;
  try {
    s = runner->generate(ids, opt, &res, forward);
  } catch (const StopGeneration&) {
    stopped = true;
  } catch (const std::exception& e) {
    s = first_edge::Status::Error(std::string("generation failed: ") + e.what());
  }
  if (env->ExceptionCheck()) return;  // the callback threw: that exception goes on to Java
  if (!stopped && !s) {
    throw_java(env, s.message);
    return;
  }
  if (stopped) {  // what the bridge saw: the tokens so far and its own clock
    res = first_edge::GenerateResult();
    res.tokens = streamed;
    res.prompt_tokens = (int)ids.size();
    res.prefill_ms = std::chrono::duration<double, std::milli>(t_first - t0).count();
    res.decode_s = std::chrono::duration<double>(clock::now() - t_first).count();
    res.stop_reason = "stopped";
  }
  // the result object
  jclass rcls = env->GetObjectClass(out);
  jintArray toks = env->NewIntArray((jsize)res.tokens.size());
  if (toks == nullptr) return;
  {
    std::vector<jint> tmp(res.tokens.begin(), res.tokens.end());
    env->SetIntArrayRegion(toks, 0, (jsize)tmp.size(), tmp.data());
  }
  env->SetObjectField(out, field(env, rcls, "tokens", "[I"), toks);
  jfloatArray scores = env->NewFloatArray((jsize)res.scores.size());
  if (scores == nullptr) return;
  env->SetFloatArrayRegion(scores, 0, (jsize)res.scores.size(), res.scores.data());
  env->SetObjectField(out, field(env, rcls, "scores", "[F"), scores);
  jbooleanArray mask = env->NewBooleanArray((jsize)res.mask.size());
  if (mask == nullptr) return;
  {
    std::vector<jboolean> tmp(res.mask.size());
    for (size_t i = 0; i < res.mask.size(); i++) tmp[i] = res.mask[i] ? JNI_TRUE : JNI_FALSE;
    env->SetBooleanArrayRegion(mask, 0, (jsize)tmp.size(), tmp.data());
  }
  env->SetObjectField(out, field(env, rcls, "mask", "[Z"), mask);
  jlongArray calls = env->NewLongArray((jsize)res.layer_calls.size());
  if (calls == nullptr) return;
  {
    std::vector<jlong> tmp(res.layer_calls.begin(), res.layer_calls.end());
    env->SetLongArrayRegion(calls, 0, (jsize)tmp.size(), tmp.data());
  }
  env->SetObjectField(out, field(env, rcls, "layerCalls", "[J"), calls);
  env->SetIntField(out, field(env, rcls, "promptTokens", "I"), res.prompt_tokens);
  env->SetDoubleField(out, field(env, rcls, "prefillMs", "D"), res.prefill_ms);
  env->SetDoubleField(out, field(env, rcls, "decodeSeconds", "D"), res.decode_s);
  jstring reason = env->NewStringUTF(res.stop_reason.c_str());
  if (reason == nullptr) return;
  env->SetObjectField(out, field(env, rcls, "stopReason", "Ljava/lang/String;"), reason);
  env->SetBooleanField(out, field(env, rcls, "stopped", "Z"), stopped ? JNI_TRUE : JNI_FALSE);
}

}  // extern "C"
