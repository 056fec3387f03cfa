package org.firstedge.demo;

/** The outcome of one generation (first_edge::GenerateResult), filled in by the native bridge. */
public class Generation {
    public int[] tokens = new int[0];
    /** Router scores, one per layer (empty when the generation was stopped before it finished). */
    public float[] scores = new float[0];
    /** The layer mask used for decoding: true = the layer ran (empty when unknown, see {@link #stopped}). */
    public boolean[] mask = new boolean[0];
    /** Decode-time executions of every layer method. */
    public long[] layerCalls = new long[0];
    public int promptTokens;
    public double prefillMs;
    public double decodeSeconds;
    /** eos | max_new_tokens | max_context | stopped (the token callback returned false). */
    public String stopReason = "";
    public boolean stopped;

    /** Decode speed: tokens after the first over the decode time (0 when there is none). */
    public double decodeTokensPerSecond() {
        int n = tokens.length > 0 ? tokens.length - 1 : 0;
        return (decodeSeconds > 0 && n > 0) ? n / decodeSeconds : 0.0;
    }

    public int layersKept() {
        int k = 0;
        for (boolean b : mask) if (b) k++;
        return k;
    }
}
