package org.firstedge.demo;

/** One turn of a {@link ChatSession} (first_edge::ChatResult): the generation plus the conversation's numbers. */
public class ChatTurn extends Generation {
    /** The reply's tokens without the stop token. */
    public int[] reply = new int[0];
    /** 1 for the first turn after the session was created or reset. */
    public int turn;
    /** Cached tokens this turn did not recompute. */
    public int reusedTokens;
    /** Tokens run through every layer this turn. */
    public int prefilledTokens;
    /** The conversation's tokens after this turn's prompt. */
    public int historyTokens;
    /** Oldest turns dropped to make room (trim). */
    public int droppedTurns;
}
