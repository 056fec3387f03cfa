package org.firstedge.demo;

import org.json.JSONArray;
import org.json.JSONException;
import org.json.JSONObject;

import java.io.File;
import java.io.IOException;

/**
 * What the app reads from a bundle's manifest.json (runtime/bundle.py writes it): the model's shape, the
 * routing defaults, the end-of-sequence ids and the chat prefix/suffix. The native runner validates the
 * whole bundle (files, hashes, graphs) when it loads; this is the app's own, earlier check, so a folder
 * that is not an Android bundle gets a plain message before the native library is asked.
 */
public final class BundleManifest {
    public final String name;
    public final String runtime;
    public final String quantization;
    public final int nLayers;
    public final int maxContext;
    public final int vocabSize;
    public final int[] eosIds;
    public final int[] pinned;
    public final float defaultThreshold;
    public final String chatPrefix;
    public final String chatSuffix;

    private BundleManifest(JSONObject m) throws JSONException, FirstEdgeException {
        runtime = m.optString("runtime", "");
        if (!"executorch".equals(runtime))
            throw new FirstEdgeException("this bundle is for runtime '" + runtime + "', the app needs an ExecuTorch bundle "
                    + "(python -m export.build --target android)");
        JSONObject model = m.getJSONObject("model");
        name = model.optString("name", "model");
        nLayers = model.getInt("n_layers");
        maxContext = model.getInt("max_context");
        vocabSize = model.optInt("vocab_size", 0);
        if (nLayers < 1 || maxContext < 2) throw new FirstEdgeException("manifest.json: bad n_layers or max_context");
        quantization = m.optString("quantization", "none");
        JSONObject tokens = m.optJSONObject("tokens");
        eosIds = ints(tokens == null ? null : tokens.optJSONArray("eos_ids"));
        JSONObject routing = m.getJSONObject("routing");
        defaultThreshold = (float) routing.optDouble("default_threshold", 0.5);
        pinned = ints(routing.optJSONArray("pinned"));
        for (int p : pinned)
            if (p < 0 || p >= nLayers) throw new FirstEdgeException("manifest.json: pinned layer " + p + " out of range");
        JSONObject chat = m.optJSONObject("chat");
        chatPrefix = chat == null ? "" : chat.optString("prefix", "");
        chatSuffix = chat == null ? "" : chat.optString("suffix", "");
    }

    private static int[] ints(JSONArray a) throws JSONException {
        if (a == null) return new int[0];
        int[] out = new int[a.length()];
        for (int i = 0; i < out.length; i++) out[i] = a.getInt(i);
        return out;
    }

    public static BundleManifest parse(String json) throws FirstEdgeException {
        try {
            return new BundleManifest(new JSONObject(json));
        } catch (JSONException e) {
            throw new FirstEdgeException("manifest.json: " + e.getMessage());
        }
    }

    /** Reads DIR/manifest.json, with a message that says what is missing. */
    public static BundleManifest read(File dir) throws FirstEdgeException {
        if (!dir.isDirectory()) throw new FirstEdgeException("bundle folder not found: " + dir);
        File f = new File(dir, "manifest.json");
        if (!f.isFile()) throw new FirstEdgeException("no manifest.json in " + dir + " (not a bundle folder)");
        try {
            return parse(Files.readUtf8(f));
        } catch (IOException e) {
            throw new FirstEdgeException("cannot read " + f + ": " + e.getMessage());
        }
    }

    /** The user message wrapped in the chat template (prefix + message + suffix). */
    public String chatText(String message) {
        return chatPrefix + message + chatSuffix;
    }

    public boolean isEos(int token) {
        for (int e : eosIds) if (e == token) return true;
        return false;
    }
}
