package org.firstedge.demo;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertTrue;

import org.junit.Test;

public class StatsFormatTest {
    private static Generation gen(boolean[] mask, int nTokens, double prefillMs, double decodeS) {
        Generation g = new Generation();
        g.mask = mask;
        g.tokens = new int[nTokens];
        g.prefillMs = prefillMs;
        g.decodeSeconds = decodeS;
        return g;
    }

    @Test
    public void lineShowsPrefillSpeedLayersAndSkipped() {
        Generation g = gen(new boolean[]{true, false, true, true, false, true}, 11, 123.4, 0.5);
        assertEquals("prefill 123 ms \u00b7 20.0 tok/s \u00b7 11 tokens \u00b7 4/6 layers \u00b7 skipped 1,4", StatsFormat.line(g));
    }

    @Test
    public void noSkippedLayersAndOneToken() {
        Generation g = gen(new boolean[]{true, true}, 1, 5, 0);
        assertEquals("prefill 5 ms \u00b7 0.0 tok/s \u00b7 1 token \u00b7 2/2 layers \u00b7 skipped none", StatsFormat.line(g));
    }

    @Test
    public void stoppedReplyWithoutMask() {
        Generation g = gen(new boolean[0], 3, 10, 0.1);
        g.stopped = true;
        assertEquals("prefill 10 ms \u00b7 20.0 tok/s \u00b7 3 tokens \u00b7 stopped", StatsFormat.line(g));
    }

    @Test
    public void chatTurnShowsTheConversation() {
        ChatTurn t = new ChatTurn();
        t.mask = new boolean[]{true, false};
        t.tokens = new int[3];
        t.prefillMs = 7;
        t.decodeSeconds = 1;
        t.turn = 3;
        t.reusedTokens = 57;
        assertEquals("turn 3 \u00b7 reused 57 tok \u00b7 prefill 7 ms \u00b7 2.0 tok/s \u00b7 3 tokens \u00b7 1/2 layers \u00b7 skipped 1",
                StatsFormat.line(t));
        t.droppedTurns = 1;
        assertTrue(StatsFormat.line(t).startsWith("turn 3 \u00b7 reused 57 tok \u00b7 dropped 1 old turn(s) \u00b7 prefill"));
    }

    @Test
    public void stripHasOneCellPerLayer() {
        boolean[] m = new boolean[30];
        for (int i = 0; i < 30; i++) m[i] = i % 3 != 0;
        String s = StatsFormat.strip(m);
        assertEquals(30, s.length());
        assertEquals('\u00b7', s.charAt(0));
        assertEquals('\u2588', s.charAt(1));
        assertEquals("011", StatsFormat.maskString(new boolean[]{false, true, true}));
        assertEquals("0,3", StatsFormat.skippedList(new boolean[]{false, true, true, false}));
        assertTrue(StatsFormat.skippedList(new boolean[]{true}).isEmpty());
    }

    @Test
    public void speedCountsTokensAfterTheFirst() {
        assertEquals(4.0, gen(new boolean[0], 5, 0, 1.0).decodeTokensPerSecond(), 1e-9);
        assertEquals(2, gen(new boolean[]{true, false, true}, 1, 0, 0).layersKept());
    }
}
