package org.firstedge.demo;

import static org.junit.Assert.assertArrayEquals;
import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertTrue;
import static org.junit.Assert.fail;

import org.json.JSONArray;
import org.json.JSONObject;
import org.junit.Test;

/** The tokenizer on a hand-made byte-level BPE (the real one is checked against HF in TokenizerParityTest). */
public class ByteLevelBpeTest {
    // vocabulary: the printable bytes used below plus merges "h e" -> "he", "he l" -> "hel", "Ġ w" -> "Ġw"
    static JSONObject tokenizer() throws Exception {
        JSONObject vocab = new JSONObject();
        String chars = "helowrdĠ!Ċ";
        int id = 0;
        vocab.put("<s>", id++);
        for (int i = 0; i < chars.length(); i++) vocab.put(String.valueOf(chars.charAt(i)), id++);
        vocab.put("he", id++);
        vocab.put("hel", id++);
        vocab.put("Ġw", id++);
        vocab.put("<|end|>", id++);
        JSONArray merges = new JSONArray();
        merges.put(new JSONArray("[\"h\", \"e\"]"));
        merges.put("he l");  // the older "a b" string form
        merges.put(new JSONArray("[\"Ġ\", \"w\"]"));
        JSONObject model = new JSONObject().put("type", "BPE").put("vocab", vocab).put("merges", merges)
                .put("dropout", JSONObject.NULL).put("byte_fallback", false);
        JSONArray added = new JSONArray();
        added.put(new JSONObject().put("id", 0).put("content", "<s>").put("special", true));
        added.put(new JSONObject().put("id", id - 1).put("content", "<|end|>").put("special", true));
        return new JSONObject().put("normalizer", JSONObject.NULL)
                .put("pre_tokenizer", new JSONObject().put("type", "ByteLevel").put("add_prefix_space", false).put("use_regex", true))
                .put("model", model).put("added_tokens", added);
    }

    static int id(JSONObject t, String tok) throws Exception {
        return t.getJSONObject("model").getJSONObject("vocab").getInt(tok);
    }

    @Test
    public void mergesByRankAndSplitsAddedTokens() throws Exception {
        JSONObject j = tokenizer();
        ByteLevelBpe t = ByteLevelBpe.fromJson(j.toString());
        int[] ids = t.encode("<s>hello world!\n<|end|>");
        int[] expect = {id(j, "<s>"), id(j, "hel"), id(j, "l"), id(j, "o"), id(j, "Ġw"), id(j, "o"), id(j, "r"),
                id(j, "l"), id(j, "d"), id(j, "!"), id(j, "Ċ"), id(j, "<|end|>")};
        assertArrayEquals(expect, ids);
        assertEquals("hello world!\n", t.decode(ids));
        assertEquals("<s>hello world!\n<|end|>", t.decode(ids, ids.length, false));
    }

    @Test
    public void unknownSymbolIsAMessage() throws Exception {
        ByteLevelBpe t = ByteLevelBpe.fromJson(tokenizer().toString());
        try {
            t.encode("xyz");
            fail();
        } catch (FirstEdgeException e) {
            assertTrue(e.getMessage().contains("no vocabulary entry"));
        }
    }

    private static void refused(JSONObject j, String expect) {
        try {
            ByteLevelBpe.fromJson(j.toString());
            fail("accepted");
        } catch (FirstEdgeException e) {
            assertTrue(e.getMessage(), e.getMessage().contains(expect));
        }
    }

    @Test
    public void refusesWhatItDoesNotImplement() throws Exception {
        JSONObject j = tokenizer();
        j.put("normalizer", new JSONObject().put("type", "NFC"));
        refused(j, "normalizer");
        j = tokenizer();
        j.put("pre_tokenizer", new JSONObject().put("type", "Whitespace"));
        refused(j, "only the ByteLevel pre-tokenizer");
        j = tokenizer();
        j.getJSONObject("model").put("type", "WordLevel");
        refused(j, "model type WordLevel");
        j = tokenizer();
        j.getJSONObject("model").put("byte_fallback", true);
        refused(j, "byte fallback");
        refused(new JSONObject().put("x", 1), "tokenizer.json");
    }
}
