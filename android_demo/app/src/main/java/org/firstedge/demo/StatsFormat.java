package org.firstedge.demo;

import java.util.Locale;

/** The per-reply stats line and the skipped-layer strip, as text (the strip view draws the same cells). */
public final class StatsFormat {
    private StatsFormat() {
    }

    /**
     * "prefill 123 ms · 45.6 tok/s · 20 tokens · 24/30 layers · skipped 5,9,12" (or "... · stopped"); a chat
     * turn starts with "turn 2 · reused 57 tok · ".
     */
    public static String line(Generation g) {
        StringBuilder sb = new StringBuilder();
        if (g instanceof ChatTurn) {
            ChatTurn t = (ChatTurn) g;
            sb.append("turn ").append(t.turn).append(" \u00b7 reused ").append(t.reusedTokens).append(" tok \u00b7 ");
            if (t.droppedTurns > 0) sb.append("dropped ").append(t.droppedTurns).append(" old turn(s) \u00b7 ");
        }
        sb.append(String.format(Locale.US, "prefill %.0f ms", g.prefillMs));
        sb.append(String.format(Locale.US, " \u00b7 %.1f tok/s", g.decodeTokensPerSecond()));
        sb.append(" \u00b7 ").append(g.tokens.length).append(g.tokens.length == 1 ? " token" : " tokens");
        if (g.mask.length > 0) {
            sb.append(" \u00b7 ").append(g.layersKept()).append('/').append(g.mask.length).append(" layers");
            String skipped = skippedList(g.mask);
            sb.append(" \u00b7 skipped ").append(skipped.isEmpty() ? "none" : skipped);
        }
        if (g.stopped) sb.append(" \u00b7 stopped");
        return sb.toString();
    }

    /** Comma-separated indices of the skipped layers ("" when none). */
    public static String skippedList(boolean[] mask) {
        StringBuilder sb = new StringBuilder();
        for (int i = 0; i < mask.length; i++) {
            if (!mask[i]) {
                if (sb.length() > 0) sb.append(',');
                sb.append(i);
            }
        }
        return sb.toString();
    }

    /** One character a layer: '\u2588' ran, '\u00b7' skipped (L cells). */
    public static String strip(boolean[] mask) {
        StringBuilder sb = new StringBuilder(mask.length);
        for (boolean b : mask) sb.append(b ? '\u2588' : '\u00b7');
        return sb.toString();
    }

    /** A mask as the runner's 0/1 string. */
    public static String maskString(boolean[] mask) {
        StringBuilder sb = new StringBuilder(mask.length);
        for (boolean b : mask) sb.append(b ? '1' : '0');
        return sb.toString();
    }
}
