package org.firstedge.demo;

import java.io.Closeable;

/**
 * A multi-turn conversation (first_edge::Session) on a {@link NativeRunner}: each later turn reuses the
 * cached tokens of the previous ones and the routers decide a fresh mask per turn. The bundle must carry the
 * chat template's token ids (manifest chat.ids, format 3); creating one refuses other bundles. Use it from the
 * runner's thread, and do not call the runner's generate between turns (reset() after doing so).
 * A stopped turn (the callback returned false) is not kept: the session stays as it was before it.
 */
public final class ChatSession implements Closeable {
    private final NativeRunner runner;
    private long handle;

    private ChatSession(NativeRunner runner, long handle) {
        this.runner = runner;
        this.handle = handle;
    }

    public static ChatSession create(NativeRunner runner) throws FirstEdgeException {
        synchronized (runner) {
            return new ChatSession(runner, nativeCreate(runner.handle()));
        }
    }

    /** One turn: the user's tokens (without template tokens) in; generation stops at the bundle's EOS ids. */
    public ChatTurn chat(int[] userIds, GenerateOptions options, boolean trim, TokenCallback callback)
            throws FirstEdgeException {
        synchronized (runner) {
            if (handle == 0 || runner.handle() == 0) throw new FirstEdgeException("this chat session is closed");
            if (userIds == null) throw new FirstEdgeException("no user tokens");
            ChatTurn out = new ChatTurn();
            nativeChat(handle, userIds, options == null ? new GenerateOptions() : options, trim, callback, out);
            return out;
        }
    }

    /** Forget the conversation. */
    public void reset() {
        synchronized (runner) {
            if (handle != 0) nativeReset(handle);
        }
    }

    /** Turns kept in the history. */
    public int turns() {
        synchronized (runner) {
            return handle == 0 ? 0 : nativeTurns(handle);
        }
    }

    @Override
    public void close() {
        synchronized (runner) {
            if (handle != 0) {
                nativeDestroy(handle);
                handle = 0;
            }
        }
    }

    private static native long nativeCreate(long runner) throws FirstEdgeException;

    private static native void nativeChat(long session, int[] userIds, GenerateOptions options, boolean trim,
                                          TokenCallback callback, ChatTurn out) throws FirstEdgeException;

    private static native void nativeReset(long session);

    private static native int nativeTurns(long session);

    private static native void nativeDestroy(long session);
}
