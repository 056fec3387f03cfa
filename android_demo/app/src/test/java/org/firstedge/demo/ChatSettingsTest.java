package org.firstedge.demo;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertNull;
import static org.junit.Assert.assertTrue;
import static org.junit.Assert.fail;

import org.junit.Test;

public class ChatSettingsTest {
    private static void refused(String expect, String bundle, String routing, String thr, String keep, String max,
                                String threads) {
        try {
            ChatSettings.fromText(bundle, routing, thr, keep, max, threads);
            fail("accepted, expected: " + expect);
        } catch (FirstEdgeException e) {
            assertTrue(e.getMessage(), e.getMessage().contains(expect));
        }
    }

    @Test
    public void defaultsAreValid() throws Exception {
        ChatSettings s = new ChatSettings();
        s.validate(30);
        GenerateOptions o = s.toOptions();
        assertTrue(Float.isNaN(o.threshold));
        assertEquals(0, o.keep);
        assertNull(o.mask);
        assertEquals(128, o.maxNewTokens);
    }

    @Test
    public void parsesTheScreensFields() throws Exception {
        ChatSettings s = ChatSettings.fromText(" smol ", "threshold", "0.9", "", "64", "4");
        assertEquals("smol", s.bundle);
        assertEquals(0.9f, s.toOptions().threshold, 1e-6);
        assertEquals(64, s.toOptions().maxNewTokens);
        assertEquals(4, s.threads);
        ChatSettings b = ChatSettings.fromText("b", "budget", "0.5", "20", "16", "0");
        assertEquals(20, b.toOptions().keep);
        assertTrue(Float.isNaN(b.toOptions().threshold));
    }

    @Test
    public void refusesBadValuesNamingTheField() {
        refused("threshold must be a number", "b", "threshold", "abc", "", "16", "0");
        refused("threshold must be between 0 and 1", "b", "threshold", "1.5", "", "16", "0");
        refused("layer budget must be at least 1", "b", "budget", "", "0", "16", "0");
        refused("layer budget must be a whole number", "b", "budget", "", "2.5", "16", "0");
        refused("max new tokens must be between", "b", "default", "", "", "0", "0");
        refused("threads must be between", "b", "default", "", "", "16", "99");
        refused("bundle folder is empty", " ", "default", "", "", "16", "0");
        refused("must not contain '..'", "../x", "default", "", "", "16", "0");
        refused("routing must be", "b", "fast", "", "", "16", "0");
    }

    @Test
    public void budgetBoundedByTheBundlesLayers() throws Exception {
        ChatSettings s = ChatSettings.fromText("b", "budget", "", "31", "16", "0");
        s.validate(0);
        try {
            s.validate(30);
            fail();
        } catch (FirstEdgeException e) {
            assertTrue(e.getMessage().contains("at most the bundle's 30 layers"));
        }
    }
}
