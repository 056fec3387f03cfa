package org.firstedge.demo;

import java.io.Closeable;

/**
 * The JNI bridge (app/src/main/cpp/first_edge_jni.cpp) over the C++ runner, first_edge::Runner: one
 * bundle loaded, one conversation's KV state. Not thread-safe: use it from one worker thread. Every
 * refusal of the runner (its Status) arrives as a {@link FirstEdgeException}.
 */
public final class NativeRunner implements Closeable {
    public static final String LIBRARY = "first_edge_jni";
    private static String loadError;

    static {
        try {
            System.loadLibrary(LIBRARY);
        } catch (Throwable t) {  // UnsatisfiedLinkError, SecurityException: reported by loadError()
            loadError = t.getClass().getSimpleName() + ": " + t.getMessage();
        }
    }

    /** null when the native library is loaded, else why it is not (shown to the user, not thrown). */
    public static String loadError() {
        return loadError;
    }

    private long handle;
    private final int nLayers;

    private NativeRunner(long handle) {
        this.handle = handle;
        this.nLayers = nativeLayers(handle);
    }

    /** Validates and loads the bundle folder (manifest, hashes, every method). threads <= 0: the default. */
    public static NativeRunner open(String bundleDir, int threads) throws FirstEdgeException {
        if (loadError != null) throw new FirstEdgeException("the native library " + LIBRARY + " is not available (" + loadError + ")");
        return new NativeRunner(nativeCreate(bundleDir, threads));
    }

    /** The native pointer (0 once closed), for {@link ChatSession}. */
    synchronized long handle() {
        return handle;
    }

    public int layers() {
        return nLayers;
    }

    /** Prefill, fix the mask, decode; callback (may be null) gets every token, false from it stops. */
    public synchronized Generation generate(int[] promptIds, GenerateOptions options, TokenCallback callback)
            throws FirstEdgeException {
        if (handle == 0) throw new FirstEdgeException("this runner is closed");
        if (promptIds == null || promptIds.length == 0) throw new FirstEdgeException("the prompt has no tokens");
        Generation out = new Generation();
        nativeGenerate(handle, promptIds, options == null ? new GenerateOptions() : options, callback, out);
        return out;
    }

    @Override
    public synchronized void close() {
        if (handle != 0) {
            nativeDestroy(handle);
            handle = 0;
        }
    }

    private static native long nativeCreate(String bundleDir, int threads) throws FirstEdgeException;

    private static native int nativeLayers(long handle);

    private static native void nativeGenerate(long handle, int[] ids, GenerateOptions options, TokenCallback callback,
                                              Generation out) throws FirstEdgeException;

    private static native void nativeDestroy(long handle);
}
