package org.firstedge.demo;

import java.io.File;

/**
 * The chat without the UI: a bundle folder's manifest, tokenizer and native runner, and one reply at a
 * time on the caller's (worker) thread. Multi-turn through the runner's chat session (first_edge::Session)
 * when the bundle carries the template's token ids (manifest format 3); otherwise, or when the session is
 * turned off, each turn is a fresh prompt wrapped in the chat prefix/suffix.
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
    private final ChatSession session;  // null: fresh prompts
    /** Why there is no session (null when there is one). */
    public final String sessionUnavailable;

    private ChatEngine(File dir, BundleManifest manifest, ByteLevelBpe tokenizer, NativeRunner runner) {
        this.dir = dir;
        this.manifest = manifest;
        this.tokenizer = tokenizer;
        this.runner = runner;
        ChatSession s = null;
        String why = null;
        try {
            s = ChatSession.create(runner);
        } catch (FirstEdgeException e) {
            why = e.getMessage();
        }
        session = s;
        sessionUnavailable = why;
    }

    public boolean multiTurn() {
        return session != null;
    }

    /** Forget the conversation (the next turn starts a new one). */
    public void resetConversation() {
        if (session != null) session.reset();
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

    /**
     * One reply: tokens streamed as text to the listener; the end-of-sequence token is not shown. With a
     * session the message continues the conversation (trim: drop the oldest turns when the context is full).
     */
    public Generation reply(String message, GenerateOptions options, boolean trim, final Listener listener)
            throws FirstEdgeException {
        final ByteLevelBpe.IntList shown = new ByteLevelBpe.IntList();
        TokenCallback cb = new TokenCallback() {
            @Override
            public boolean onToken(int token) {
                if (manifest.isEos(token)) return true;
                shown.add(token);
                int[] a = shown.toArray();
                return listener == null || listener.onText(tokenizer.decode(a, a.length, true));
            }
        };
        if (session != null) return session.chat(tokenizer.encode(message), options, trim, cb);
        int[] ids = encode(message);
        if (ids.length + 1 >= manifest.maxContext)
            throw new FirstEdgeException("the message is " + ids.length + " tokens, the bundle's context is " + manifest.maxContext);
        return runner.generate(ids, options, cb);
    }

    public String decode(int[] ids) {
        return tokenizer.decode(ids);
    }

    public void close() {
        if (session != null) session.close();
        runner.close();
    }
}
