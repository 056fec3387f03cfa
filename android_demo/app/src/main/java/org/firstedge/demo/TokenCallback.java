package org.firstedge.demo;

/** Called on the generating thread for every new token id; return false to stop the generation. */
public interface TokenCallback {
    boolean onToken(int tokenId);
}
