package org.firstedge.demo;

import java.io.File;

/**
 * The chat without the UI: a bundle folder's manifest, tokenizer and native runner, and one reply at a
 * time on the caller's (worker) thread. Each turn is a fresh prompt (the runner's chat session API will
 * carry the conversation once it exists).
 */
public final class ChatEngine {
    /** Receives the reply text as it grows; return false to stop. Called on the generating thread. */
    public interface Listener {
        boolean onText(String replySoFar);
    }

    public final File dir;
    public final BundleManifest manifest;
    private final ByteLevelBpe tokenizer;
    private final NativeRunner runner;

    private ChatEngine(File dir, BundleManifest manifest, ByteLevelBpe tokenizer, NativeRunner runner) {
        this.dir = dir;
        this.manifest = manifest;
        this.tokenizer = tokenizer;
        this.runner = runner;
    }

    /** Manifest, tokenizer, then the native runner; each refusal is a one-line FirstEdgeException. */
    public static ChatEngine open(File dir, int threads) throws FirstEdgeException {
        BundleManifest m = BundleManifest.read(dir);
        File tj = new File(dir, "tokenizer.json");
        if (!tj.isFile()) throw new FirstEdgeException("no tokenizer.json in " + dir);
        ByteLevelBpe tok = ByteLevelBpe.fromFile(tj);
        String why = NativeRunner.loadError();
        if (why != null)
            throw new FirstEdgeException("the native library lib" + NativeRunner.LIBRARY + ".so is missing from this APK "
                    + "(build it with the NDK: docs/android.md). " + why);
        return new ChatEngine(dir, m, tok, NativeRunner.open(dir.getAbsolutePath(), threads));
    }

    public int[] encode(String message) throws FirstEdgeException {
        return tokenizer.encode(manifest.chatText(message));
    }

    /** One reply: tokens streamed as text to the listener; the end-of-sequence token is not shown. */
    public Generation reply(String message, GenerateOptions options, final Listener listener) throws FirstEdgeException {
        int[] ids = encode(message);
        if (ids.length + 1 >= manifest.maxContext)
            throw new FirstEdgeException("the message is " + ids.length + " tokens, the bundle's context is " + manifest.maxContext);
        final ByteLevelBpe.IntList out = new ByteLevelBpe.IntList();
        return runner.generate(ids, options, new TokenCallback() {
            @Override
            public boolean onToken(int token) {
                if (manifest.isEos(token)) return true;
                out.add(token);
                int[] a = out.toArray();
                return listener == null || listener.onText(tokenizer.decode(a, a.length, true));
            }
        });
    }

    public String decode(int[] ids) {
        return tokenizer.decode(ids);
    }

    public void close() {
        runner.close();
    }
}
