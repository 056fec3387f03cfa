package org.firstedge.demo;

/**
 * The settings screen's values and their rules (kept free of Android classes so they are unit-tested on
 * the host). Routing is one of: the routers at the bundle's default threshold, the routers at a given
 * threshold, or a layer budget (keep K layers).
 */
public final class ChatSettings {
    public static final String ROUTING_DEFAULT = "default";
    public static final String ROUTING_THRESHOLD = "threshold";
    public static final String ROUTING_BUDGET = "budget";
    public static final int MAX_THREADS = 16;
    public static final int MAX_NEW_TOKENS = 2048;

    /** The bundle folder's name inside the app's external files folder (or an absolute path). */
    public String bundle = "bundle";
    public String routing = ROUTING_DEFAULT;
    public float threshold = 0.5f;
    public int keep = 0;
    public int maxNewTokens = 128;
    /** 0: ExecuTorch's default thread pool. */
    public int threads = 0;

    /**
     * Builds settings from the text fields of the settings screen; null fields keep their defaults.
     * Throws with a message naming the field when a value is not valid.
     */
    public static ChatSettings fromText(String bundle, String routing, String threshold, String keep, String maxNewTokens,
                                        String threads) throws FirstEdgeException {
        ChatSettings s = new ChatSettings();
        if (bundle != null) s.bundle = bundle.trim();
        if (routing != null) s.routing = routing.trim();
        if (threshold != null && !threshold.trim().isEmpty()) s.threshold = parseFloat("threshold", threshold);
        if (keep != null && !keep.trim().isEmpty()) s.keep = parseInt("layer budget", keep);
        if (maxNewTokens != null && !maxNewTokens.trim().isEmpty()) s.maxNewTokens = parseInt("max new tokens", maxNewTokens);
        if (threads != null && !threads.trim().isEmpty()) s.threads = parseInt("threads", threads);
        s.validate(0);
        return s;
    }

    private static float parseFloat(String what, String text) throws FirstEdgeException {
        try {
            return Float.parseFloat(text.trim());
        } catch (NumberFormatException e) {
            throw new FirstEdgeException(what + " must be a number, got '" + text.trim() + "'");
        }
    }

    private static int parseInt(String what, String text) throws FirstEdgeException {
        try {
            return Integer.parseInt(text.trim());
        } catch (NumberFormatException e) {
            throw new FirstEdgeException(what + " must be a whole number, got '" + text.trim() + "'");
        }
    }

    /** Checks every value; nLayers > 0 also bounds the layer budget by the loaded bundle's layers. */
    public void validate(int nLayers) throws FirstEdgeException {
        if (bundle == null || bundle.isEmpty()) throw new FirstEdgeException("bundle folder is empty");
        if (bundle.contains("..")) throw new FirstEdgeException("bundle folder must not contain '..'");
        if (!ROUTING_DEFAULT.equals(routing) && !ROUTING_THRESHOLD.equals(routing) && !ROUTING_BUDGET.equals(routing))
            throw new FirstEdgeException("routing must be default, threshold or budget, got '" + routing + "'");
        if (ROUTING_THRESHOLD.equals(routing) && !(threshold >= 0f && threshold <= 1f))
            throw new FirstEdgeException("threshold must be between 0 and 1, got " + threshold);
        if (ROUTING_BUDGET.equals(routing)) {
            if (keep < 1) throw new FirstEdgeException("layer budget must be at least 1, got " + keep);
            if (nLayers > 0 && keep > nLayers)
                throw new FirstEdgeException("layer budget must be at most the bundle's " + nLayers + " layers, got " + keep);
        }
        if (maxNewTokens < 1 || maxNewTokens > MAX_NEW_TOKENS)
            throw new FirstEdgeException("max new tokens must be between 1 and " + MAX_NEW_TOKENS + ", got " + maxNewTokens);
        if (threads < 0 || threads > MAX_THREADS)
            throw new FirstEdgeException("threads must be between 0 (default) and " + MAX_THREADS + ", got " + threads);
    }

    /** The runner's options for these settings. */
    public GenerateOptions toOptions() {
        GenerateOptions o = new GenerateOptions();
        o.maxNewTokens = maxNewTokens;
        if (ROUTING_THRESHOLD.equals(routing)) o.threshold = threshold;
        if (ROUTING_BUDGET.equals(routing)) o.keep = keep;
        return o;
    }
}
