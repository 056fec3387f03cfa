package org.firstedge.demo;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertTrue;

import org.json.JSONArray;
import org.json.JSONObject;
import org.junit.Test;

import java.io.BufferedReader;
import java.io.File;
import java.io.FileInputStream;
import java.io.InputStreamReader;

/**
 * The app's tokenizer against Hugging Face tokenizers, token for token: the default model's tokenizer.json
 * (system property first_edge.tokenizer) and a JSON-lines file of {text, ids} written by
 * tests/test_android.py with tokenizers (first_edge.tokenizer_cases): every prompt of ../shared/data's val
 * splits, plain and wrapped in the chat prefix/suffix.
 */
public class TokenizerParityTest {
    @Test
    public void equalsHuggingFaceTokenizers() throws Exception {
        ByteLevelBpe t = ByteLevelBpe.fromFile(new File(System.getProperty("first_edge.tokenizer")));
        BufferedReader r = new BufferedReader(new InputStreamReader(
                new FileInputStream(System.getProperty("first_edge.tokenizer_cases")), "UTF-8"));
        int n = 0, bad = 0;
        String firstBad = null;
        String line;
        while ((line = r.readLine()) != null) {
            JSONObject o = new JSONObject(line);
            String text = o.getString("text");
            JSONArray e = o.getJSONArray("ids");
            int[] got = t.encode(text);
            boolean ok = got.length == e.length();
            for (int i = 0; ok && i < got.length; i++) ok = got[i] == e.getInt(i);
            if (ok) ok = t.decode(got, got.length, false).equals(text);  // byte-level: decoding gives the text back
            if (!ok && bad++ == 0) firstBad = text;
            n++;
        }
        r.close();
        System.out.println("tokenizer parity: " + n + " texts checked, " + bad + " differ");
        assertTrue("no cases", n > 0);
        assertEquals("first differing text: " + firstBad, 0, bad);
    }
}
