package org.firstedge.demo;

/**
 * What one generation asks of the runner (first_edge::GenerateOptions). Give at most one of a threshold,
 * a layer budget ({@link #keep}) or an explicit mask; none of them uses the routers at the bundle's
 * default threshold.
 */
public class GenerateOptions {
    public int maxNewTokens = 64;
    /** NaN: the bundle's default threshold. */
    public float threshold = Float.NaN;
    /** > 0: keep this many layers (the highest router scores, pinned layers first). */
    public int keep = 0;
    /** Non-null: an explicit 0/1 mask string of L characters. */
    public String mask = null;
    public boolean ignoreEos = false;
    /** 0: greedy. */
    public float temperature = 0f;
    public float topP = 1f;
    public long seed = 0;
}
