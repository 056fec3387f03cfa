package org.firstedge.demo;

import org.json.JSONArray;
import org.json.JSONException;
import org.json.JSONObject;

import java.io.ByteArrayOutputStream;
import java.io.File;
import java.io.IOException;
import java.nio.charset.Charset;
import java.util.ArrayList;
import java.util.Collections;
import java.util.HashMap;
import java.util.Iterator;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

/**
 * The byte-level BPE of a Hugging Face tokenizer.json (GPT-2 style: the default model SmolLM2 and most
 * Llama-family small models), written out because no tokenizer library reaches this project's offline
 * APK build; an Android Studio build can use the HF tokenizers bindings (e.g. DJL's
 * ai.djl.huggingface:tokenizers) instead. Supported, and checked token for token against HF tokenizers
 * (tests/test_android.py): no normalizer, the ByteLevel pre-tokenizer with its GPT-2 regex, a BPE model
 * without dropout, byte fallback or subword affixes, added tokens matched before pre-tokenization.
 * Anything else is refused with a message when the file is read.
 */
public final class ByteLevelBpe {
    private static final Charset UTF8 = Charset.forName("UTF-8");
    // Unicode White_Space (what \s means in the tokenizers library's Oniguruma regex)
    private static final String WS = "\\t\\n\\u000B\\f\\r \\u0085\\u00A0\\u1680\\u2000-\\u200A\\u2028\\u2029\\u202F\\u205F\\u3000";
    // GPT-2's pre-tokenizer: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
    private static final Pattern SPLIT = Pattern.compile(
            "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^" + WS + "\\p{L}\\p{N}]+|[" + WS + "]+(?![^" + WS + "])|[" + WS + "]+");
    private static final char[] BYTE_TO_CHAR = new char[256];
    private static final Map<Character, Integer> CHAR_TO_BYTE = new HashMap<Character, Integer>();

    static {
        int n = 0;
        for (int b = 0; b < 256; b++) {
            boolean printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
            BYTE_TO_CHAR[b] = printable ? (char) b : (char) (256 + n++);
            CHAR_TO_BYTE.put(BYTE_TO_CHAR[b], b);
        }
    }

    private final Map<String, Integer> vocab = new HashMap<String, Integer>();
    private final Map<Integer, String> idToToken = new HashMap<Integer, String>();
    private final Map<String, Integer> ranks = new HashMap<String, Integer>();
    private final List<String> added = new ArrayList<String>();  // longest first
    private final Map<String, Integer> addedIds = new HashMap<String, Integer>();
    private final Map<Integer, Boolean> special = new HashMap<Integer, Boolean>();
    private final boolean addPrefixSpace;
    private final Map<String, int[]> cache = new LinkedHashMap<String, int[]>(256, 0.75f, true) {
        @Override
        protected boolean removeEldestEntry(Map.Entry<String, int[]> e) {
            return size() > 20000;
        }
    };

    public static ByteLevelBpe fromFile(File file) throws FirstEdgeException {
        String text;
        try {
            text = Files.readUtf8(file);
        } catch (IOException e) {
            throw new FirstEdgeException("cannot read " + file + ": " + e.getMessage());
        }
        return fromJson(text);
    }

    public static ByteLevelBpe fromJson(String json) throws FirstEdgeException {
        try {
            return new ByteLevelBpe(new JSONObject(json));
        } catch (JSONException e) {
            throw new FirstEdgeException("tokenizer.json: " + e.getMessage());
        }
    }

    private ByteLevelBpe(JSONObject root) throws JSONException, FirstEdgeException {
        if (!root.isNull("normalizer") && root.has("normalizer"))
            throw new FirstEdgeException("tokenizer.json: a normalizer is not supported by the app's tokenizer");
        JSONObject pre = root.optJSONObject("pre_tokenizer");
        if (pre == null || !"ByteLevel".equals(pre.optString("type")))
            throw new FirstEdgeException("tokenizer.json: only the ByteLevel pre-tokenizer is supported");
        if (!pre.optBoolean("use_regex", true))
            throw new FirstEdgeException("tokenizer.json: ByteLevel without its regex is not supported");
        addPrefixSpace = pre.optBoolean("add_prefix_space", false);
        JSONObject model = root.getJSONObject("model");
        if (!"BPE".equals(model.optString("type", "BPE")))
            throw new FirstEdgeException("tokenizer.json: model type " + model.optString("type") + " is not supported (BPE only)");
        if (!model.isNull("dropout") && model.has("dropout"))
            throw new FirstEdgeException("tokenizer.json: BPE dropout is not supported");
        if (model.optBoolean("byte_fallback", false) || model.optBoolean("ignore_merges", false)
                || !model.optString("continuing_subword_prefix", "").isEmpty()
                || !model.optString("end_of_word_suffix", "").isEmpty())
            throw new FirstEdgeException("tokenizer.json: byte fallback, ignore_merges or subword affixes are not supported");
        JSONObject v = model.getJSONObject("vocab");
        Iterator<String> keys = v.keys();
        while (keys.hasNext()) {
            String k = keys.next();
            int id = v.getInt(k);
            vocab.put(k, id);
            idToToken.put(id, k);
        }
        JSONArray merges = model.getJSONArray("merges");
        for (int i = 0; i < merges.length(); i++) {
            Object m = merges.get(i);
            String a, b;
            if (m instanceof JSONArray) {
                a = ((JSONArray) m).getString(0);
                b = ((JSONArray) m).getString(1);
            } else {
                String s = m.toString();
                int sp = s.indexOf(' ');
                if (sp < 0) throw new FirstEdgeException("tokenizer.json: bad merge '" + s + "'");
                a = s.substring(0, sp);
                b = s.substring(sp + 1);
            }
            String key = a + '\u0000' + b;
            if (!ranks.containsKey(key)) ranks.put(key, i);
        }
        JSONArray at = root.optJSONArray("added_tokens");
        if (at != null) {
            for (int i = 0; i < at.length(); i++) {
                JSONObject t = at.getJSONObject(i);
                if (t.optBoolean("single_word") || t.optBoolean("lstrip") || t.optBoolean("rstrip"))
                    throw new FirstEdgeException("tokenizer.json: added token " + t.optString("content")
                            + " uses single_word/lstrip/rstrip (not supported)");
                String c = t.getString("content");
                int id = t.getInt("id");
                if (c.isEmpty()) continue;
                addedIds.put(c, id);
                added.add(c);
                idToToken.put(id, c);
                special.put(id, t.optBoolean("special", false));
            }
            Collections.sort(added, new java.util.Comparator<String>() {
                @Override
                public int compare(String x, String y) {
                    return y.length() - x.length();
                }
            });
        }
    }

    public int vocabSize() {
        return idToToken.size();
    }

    /** Token ids of text (no special tokens added, like encode(text, add_special_tokens=False)). */
    public int[] encode(String text) throws FirstEdgeException {
        IntList out = new IntList();
        int start = 0, i = 0;
        while (i < text.length()) {
            String hit = null;
            for (String a : added) {  // leftmost, then longest
                if (text.startsWith(a, i)) {
                    hit = a;
                    break;
                }
            }
            if (hit == null) {
                i++;
                continue;
            }
            encodeSegment(text.substring(start, i), out);
            out.add(addedIds.get(hit));
            i += hit.length();
            start = i;
        }
        encodeSegment(text.substring(start), out);
        return out.toArray();
    }

    private void encodeSegment(String s, IntList out) throws FirstEdgeException {
        if (s.isEmpty()) return;
        if (addPrefixSpace && !s.startsWith(" ")) s = " " + s;
        Matcher m = SPLIT.matcher(s);
        while (m.find()) {
            String word = m.group();
            int[] ids = cache.get(word);
            if (ids == null) {
                ids = bpe(word);
                cache.put(word, ids);
            }
            for (int id : ids) out.add(id);
        }
    }

    private int[] bpe(String word) throws FirstEdgeException {
        byte[] bytes = word.getBytes(UTF8);
        List<String> sym = new ArrayList<String>(bytes.length);
        for (byte b : bytes) sym.add(String.valueOf(BYTE_TO_CHAR[b & 0xFF]));
        while (sym.size() > 1) {
            int best = Integer.MAX_VALUE;
            String ba = null, bb = null;
            for (int j = 0; j + 1 < sym.size(); j++) {
                Integer r = ranks.get(sym.get(j) + '\u0000' + sym.get(j + 1));
                if (r != null && r < best) {
                    best = r;
                    ba = sym.get(j);
                    bb = sym.get(j + 1);
                }
            }
            if (ba == null) break;
            List<String> next = new ArrayList<String>(sym.size());
            for (int j = 0; j < sym.size(); j++) {
                if (j + 1 < sym.size() && sym.get(j).equals(ba) && sym.get(j + 1).equals(bb)) {
                    next.add(ba + bb);
                    j++;
                } else {
                    next.add(sym.get(j));
                }
            }
            sym = next;
        }
        int[] ids = new int[sym.size()];
        for (int j = 0; j < ids.length; j++) {
            Integer id = vocab.get(sym.get(j));
            if (id == null) throw new FirstEdgeException("tokenizer.json: no vocabulary entry for '" + sym.get(j) + "'");
            ids[j] = id;
        }
        return ids;
    }

    /** Text of ids (skipSpecial: leave out special added tokens, like decode(skip_special_tokens=True)). */
    public String decode(int[] ids, int count, boolean skipSpecial) {
        ByteArrayOutputStream bytes = new ByteArrayOutputStream();
        for (int k = 0; k < count; k++) {
            int id = ids[k];
            String tok = idToToken.get(id);
            if (tok == null) continue;
            Boolean sp = special.get(id);
            if (sp != null) {
                if (sp && skipSpecial) continue;
                byte[] b = tok.getBytes(UTF8);
                bytes.write(b, 0, b.length);
                continue;
            }
            for (int j = 0; j < tok.length(); j++) {
                Integer b = CHAR_TO_BYTE.get(tok.charAt(j));
                if (b != null) {
                    bytes.write(b);
                } else {
                    byte[] u = String.valueOf(tok.charAt(j)).getBytes(UTF8);
                    bytes.write(u, 0, u.length);
                }
            }
        }
        return new String(bytes.toByteArray(), UTF8);
    }

    public String decode(int[] ids) {
        return decode(ids, ids.length, true);
    }

    /** A growable int array (no boxing in the hot path). */
    static final class IntList {
        private int[] a = new int[64];
        private int n;

        void add(int v) {
            if (n == a.length) {
                int[] b = new int[n * 2];
                System.arraycopy(a, 0, b, 0, n);
                a = b;
            }
            a[n++] = v;
        }

        int size() {
            return n;
        }

        int[] toArray() {
            int[] b = new int[n];
            System.arraycopy(a, 0, b, 0, n);
            return b;
        }
    }
}
