package org.firstedge.demo;

import static org.junit.Assert.assertArrayEquals;
import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertFalse;
import static org.junit.Assert.assertNull;
import static org.junit.Assert.assertTrue;
import static org.junit.Assert.fail;

import org.json.JSONArray;
import org.json.JSONObject;
import org.junit.AfterClass;
import org.junit.BeforeClass;
import org.junit.Test;

import java.io.File;
import java.util.ArrayList;
import java.util.List;

/**
 * The JNI bridge end to end on the host: libfirst_edge_jni.so (built from app/src/main/cpp with g++ against
 * the executorch wheel) runs a tiny bundle. tests/test_android.py passes the bundle and the Python runtime's
 * greedy tokens for the same prompts and masks (first_edge.runner_cases, JSON), and a damaged copy of the
 * bundle (first_edge.bad_bundle).
 */
public class NativeRunnerTest {
    private static JSONObject spec;
    private static NativeRunner runner;

    @BeforeClass
    public static void open() throws Exception {
        assertNull("native library: " + NativeRunner.loadError(), NativeRunner.loadError());
        spec = new JSONObject(Files.readUtf8(new File(System.getProperty("first_edge.runner_cases"))));
        runner = NativeRunner.open(spec.getString("bundle"), 1);
    }

    @AfterClass
    public static void close() {
        if (runner != null) runner.close();
    }

    static int[] ints(JSONArray a) throws Exception {
        int[] out = new int[a.length()];
        for (int i = 0; i < out.length; i++) out[i] = a.getInt(i);
        return out;
    }

    static GenerateOptions options(JSONObject c) throws Exception {
        GenerateOptions o = new GenerateOptions();
        o.maxNewTokens = c.getInt("max_new_tokens");
        o.ignoreEos = true;
        String mode = c.getString("mode");
        if (mode.equals("threshold")) o.threshold = (float) c.getDouble("threshold");
        if (mode.equals("keep")) o.keep = c.getInt("keep");
        if (mode.equals("mask")) o.mask = c.getString("mask");
        return o;
    }

    static final class Collect implements TokenCallback {
        final List<Integer> got = new ArrayList<Integer>();
        final int stopAfter;

        Collect(int stopAfter) {
            this.stopAfter = stopAfter;
        }

        @Override
        public boolean onToken(int token) {
            got.add(token);
            return stopAfter <= 0 || got.size() < stopAfter;
        }

        int[] array() {
            int[] a = new int[got.size()];
            for (int i = 0; i < a.length; i++) a[i] = got.get(i);
            return a;
        }
    }

    @Test
    public void streamedTokensEqualThePythonRuntime() throws Exception {
        JSONArray cases = spec.getJSONArray("cases");
        int L = spec.getInt("n_layers");
        assertEquals(L, runner.layers());
        int mixed = 0;
        for (int i = 0; i < cases.length(); i++) {
            JSONObject c = cases.getJSONObject(i);
            Collect cb = new Collect(0);
            Generation g = runner.generate(ints(c.getJSONArray("ids")), options(c), cb);
            String what = "case " + i + " (" + c.getString("mode") + ")";
            assertArrayEquals(what, ints(c.getJSONArray("tokens")), cb.array());
            assertArrayEquals(what, cb.array(), g.tokens);
            assertEquals(what, c.getString("expect_mask"), StatsFormat.maskString(g.mask));
            assertEquals(L, g.scores.length);
            assertEquals(c.getJSONArray("ids").length(), g.promptTokens);
            assertEquals("max_new_tokens", g.stopReason);
            assertFalse(g.stopped);
            for (int l = 0; l < L; l++)  // skipped layers never ran while decoding
                assertEquals(what + " layer " + l, g.mask[l] ? g.tokens.length - 1 : 0, g.layerCalls[l]);
            assertTrue(g.prefillMs > 0 && g.decodeSeconds > 0 && g.decodeTokensPerSecond() > 0);
            if (g.layersKept() < L) mixed++;
        }
        assertTrue("cases with skipped layers: " + mixed, mixed >= 3);
        System.out.println("native runner: " + cases.length() + " cases equal the Python runtime, " + mixed + " with skipped layers");
    }

    @Test
    public void falseFromTheCallbackStopsAndTheRunnerStaysUsable() throws Exception {
        JSONObject c = spec.getJSONArray("cases").getJSONObject(0);
        Collect cb = new Collect(3);
        Generation g = runner.generate(ints(c.getJSONArray("ids")), options(c), cb);
        assertEquals(3, cb.got.size());
        assertEquals(3, g.tokens.length);
        assertTrue(g.stopped);
        assertEquals("stopped", g.stopReason);
        int[] expect = ints(c.getJSONArray("tokens"));
        for (int i = 0; i < 3; i++) assertEquals(expect[i], g.tokens[i]);
        // stopping after the first token (the prefill's) too
        Collect first = new Collect(1);
        assertEquals(1, runner.generate(ints(c.getJSONArray("ids")), options(c), first).tokens.length);
        // the next generation is complete and identical
        Collect again = new Collect(0);
        runner.generate(ints(c.getJSONArray("ids")), options(c), again);
        assertArrayEquals(expect, again.array());
    }

    @Test
    public void anExceptionInTheCallbackReachesTheCaller() throws Exception {
        JSONObject c = spec.getJSONArray("cases").getJSONObject(0);
        try {
            runner.generate(ints(c.getJSONArray("ids")), options(c), new TokenCallback() {
                @Override
                public boolean onToken(int token) {
                    throw new IllegalStateException("from the callback");
                }
            });
            fail();
        } catch (IllegalStateException e) {
            assertEquals("from the callback", e.getMessage());
        }
        Collect again = new Collect(0);
        runner.generate(ints(c.getJSONArray("ids")), options(c), again);
        assertArrayEquals(ints(c.getJSONArray("tokens")), again.array());
    }

    static GenerateOptions turnOptions(JSONObject t) throws Exception {
        GenerateOptions o = new GenerateOptions();
        o.maxNewTokens = 8;
        JSONObject opt = t.getJSONObject("options");
        if (opt.has("keep")) o.keep = opt.getInt("keep");
        if (opt.has("threshold")) o.threshold = (float) opt.getDouble("threshold");
        return o;
    }

    static void assertTurn(JSONObject t, ChatTurn got, int[] streamed) throws Exception {
        String what = "turn " + t.getInt("turn");
        assertArrayEquals(what, ints(t.getJSONArray("tokens")), streamed);
        assertArrayEquals(what, ints(t.getJSONArray("tokens")), got.tokens);
        assertArrayEquals(what, ints(t.getJSONArray("reply")), got.reply);
        assertEquals(what, t.getString("expect_mask"), StatsFormat.maskString(got.mask));
        assertEquals(what, t.getInt("turn"), got.turn);
        assertEquals(what, t.getInt("reused_tokens"), got.reusedTokens);
        assertEquals(what, t.getInt("prefilled_tokens"), got.prefilledTokens);
        assertEquals(what, t.getInt("history_tokens"), got.historyTokens);
        assertFalse(got.stopped);
    }

    @Test
    public void chatSessionTurnsEqualThePythonSession() throws Exception {
        JSONArray turns = spec.getJSONArray("session");
        ChatSession s = ChatSession.create(runner);
        try {
            for (int i = 0; i < turns.length(); i++) {
                JSONObject t = turns.getJSONObject(i);
                if (i == 1) {  // stop turn 2 after two tokens: not kept, the session is as it was
                    Collect stop = new Collect(2);
                    ChatTurn st = s.chat(ints(t.getJSONArray("user")), turnOptions(t), false, stop);
                    assertTrue(st.stopped);
                    assertEquals(2, st.tokens.length);
                    assertEquals(1, s.turns());
                }
                Collect cb = new Collect(0);
                ChatTurn got = s.chat(ints(t.getJSONArray("user")), turnOptions(t), false, cb);
                assertTurn(t, got, cb.array());
                assertEquals(i + 1, s.turns());
            }
            assertTrue(turns.getJSONObject(3).getInt("reused_tokens") > 0);
            s.reset();
            assertEquals(0, s.turns());
            JSONObject first = turns.getJSONObject(0);
            Collect cb = new Collect(0);
            assertTurn(first, s.chat(ints(first.getJSONArray("user")), turnOptions(first), false, cb), cb.array());
            try {
                s.chat(new int[0], new GenerateOptions(), false, null);
                fail();
            } catch (FirstEdgeException e) {
                assertTrue(e.getMessage(), e.getMessage().contains("empty"));
            }
        } finally {
            s.close();
        }
        s.close();
        try {
            s.chat(new int[]{5}, new GenerateOptions(), false, null);
            fail();
        } catch (FirstEdgeException e) {
            assertTrue(e.getMessage().contains("closed"));
        }
        System.out.println("chat session: " + turns.length() + " turns equal runtime.Session");
    }

    @Test
    public void nullCallbackStillGenerates() throws Exception {
        JSONObject c = spec.getJSONArray("cases").getJSONObject(1);
        assertArrayEquals(ints(c.getJSONArray("tokens")), runner.generate(ints(c.getJSONArray("ids")), options(c), null).tokens);
    }

    private static void refused(String expect, int[] ids, GenerateOptions o) {
        try {
            runner.generate(ids, o, null);
            fail("accepted, expected: " + expect);
        } catch (FirstEdgeException e) {
            assertTrue(e.getMessage(), e.getMessage().contains(expect));
        }
    }

    @Test
    public void badOptionsRaise() throws Exception {
        int[] ids = {5, 6, 7};
        GenerateOptions o = new GenerateOptions();
        o.mask = "10";
        refused("length", ids, o);
        o = new GenerateOptions();
        o.threshold = 0.5f;
        o.keep = 2;
        refused("not both", ids, o);
        o = new GenerateOptions();
        o.keep = 999;
        refused("between 1 and the number of layers", ids, o);
        o = new GenerateOptions();
        o.maxNewTokens = 0;
        refused("max_new_tokens", ids, o);
        o = new GenerateOptions();
        o.threshold = 2f;
        refused("threshold must be in [0, 1]", ids, o);
        refused("outside the vocabulary", new int[]{999999}, new GenerateOptions());
        refused("no tokens", new int[0], new GenerateOptions());
    }

    private static void openRefused(String dir, String expect) {
        try {
            NativeRunner r = NativeRunner.open(dir, 1);
            r.close();
            fail("opened " + dir);
        } catch (FirstEdgeException e) {
            assertTrue(e.getMessage(), e.getMessage().contains(expect));
        }
    }

    @Test
    public void aBadBundleRaises() throws Exception {
        openRefused("/nonexistent/bundle", "not found");
        openRefused(System.getProperty("first_edge.bad_bundle"), "sha256");
        String notJson = System.getProperty("first_edge.bad_manifest_bundle");
        openRefused(notJson, "manifest.json");
    }

    @Test
    public void theChatEngineRefusesATokenizerItCannotRun() throws Exception {
        // the tiny test bundle has a word-level tokenizer: the app says so instead of crashing
        try {
            ChatEngine.open(new File(spec.getString("bundle")), 1).close();
            fail();
        } catch (FirstEdgeException e) {
            assertTrue(e.getMessage(), e.getMessage().contains("tokenizer.json"));
        }
    }

    @Test
    public void closedRunnerRaises() throws Exception {
        NativeRunner r = NativeRunner.open(spec.getString("bundle"), 1);
        r.close();
        r.close();
        try {
            r.generate(new int[]{5}, new GenerateOptions(), null);
            fail();
        } catch (FirstEdgeException e) {
            assertTrue(e.getMessage().contains("closed"));
        }
    }
}
