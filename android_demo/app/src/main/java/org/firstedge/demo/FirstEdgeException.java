package org.firstedge.demo;

/** A refusal from the runner, the bundle or the tokenizer: one line, meant for the user. */
public class FirstEdgeException extends Exception {
    public FirstEdgeException(String message) {
        super(message);
    }
}
