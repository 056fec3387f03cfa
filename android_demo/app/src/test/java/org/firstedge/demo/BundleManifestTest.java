package org.firstedge.demo;

import static org.junit.Assert.assertArrayEquals;
import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertFalse;
import static org.junit.Assert.assertTrue;
import static org.junit.Assert.fail;

import org.json.JSONObject;
import org.junit.Test;

import java.io.File;
import java.io.FileOutputStream;

public class BundleManifestTest {
    static JSONObject manifest() throws Exception {
        return new JSONObject("{\"runtime\": \"executorch\", \"target\": \"android\", \"quantization\": \"8da4w\","
                + "\"model\": {\"name\": \"SmolLM2-135M-Instruct\", \"n_layers\": 30, \"max_context\": 1024, \"vocab_size\": 49152},"
                + "\"tokens\": {\"bos_id\": 1, \"eos_ids\": [2]},"
                + "\"routing\": {\"default_threshold\": 0.93, \"pinned\": [0, 1, 29], \"pool_start\": 24},"
                + "\"chat\": {\"prefix\": \"<|im_start|>user\\n\", \"suffix\": \"<|im_end|>\\n<|im_start|>assistant\\n\"}}");
    }

    private static void refused(String json, String expect) {
        try {
            BundleManifest.parse(json);
            fail("accepted: " + json);
        } catch (FirstEdgeException e) {
            assertTrue(e.getMessage(), e.getMessage().contains(expect));
        }
    }

    @Test
    public void readsTheFieldsTheAppUses() throws Exception {
        BundleManifest m = BundleManifest.parse(manifest().toString());
        assertEquals("SmolLM2-135M-Instruct", m.name);
        assertEquals(30, m.nLayers);
        assertEquals(1024, m.maxContext);
        assertEquals("8da4w", m.quantization);
        assertEquals(0.93f, m.defaultThreshold, 1e-6);
        assertArrayEquals(new int[]{0, 1, 29}, m.pinned);
        assertTrue(m.isEos(2));
        assertFalse(m.isEos(1));
        assertEquals("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", m.chatText("hi"));
    }

    @Test
    public void noChatSectionMeansThePlainPrompt() throws Exception {
        JSONObject j = manifest();
        j.remove("chat");
        assertEquals("hi", BundleManifest.parse(j.toString()).chatText("hi"));
    }

    @Test
    public void refusesWhatIsNotAnAndroidBundle() throws Exception {
        JSONObject j = manifest();
        j.put("runtime", "onnxruntime");
        refused(j.toString(), "needs an ExecuTorch bundle");
        refused("{not json", "manifest.json");
        j = manifest();
        j.getJSONObject("model").remove("n_layers");
        refused(j.toString(), "n_layers");
        j = manifest();
        j.getJSONObject("routing").put("pinned", new org.json.JSONArray("[30]"));
        refused(j.toString(), "pinned layer 30 out of range");
    }

    @Test
    public void missingFolderOrManifestIsAPlainMessage() throws Exception {
        File tmp = File.createTempFile("first_edge", "");
        tmp.delete();
        try {
            BundleManifest.read(tmp);
            fail();
        } catch (FirstEdgeException e) {
            assertTrue(e.getMessage().contains("bundle folder not found"));
        }
        assertTrue(tmp.mkdir());
        try {
            BundleManifest.read(tmp);
            fail();
        } catch (FirstEdgeException e) {
            assertTrue(e.getMessage().contains("no manifest.json"));
        }
        FileOutputStream out = new FileOutputStream(new File(tmp, "manifest.json"));
        out.write(manifest().toString().getBytes("UTF-8"));
        out.close();
        assertEquals(30, BundleManifest.read(tmp).nLayers);
        new File(tmp, "manifest.json").delete();
        tmp.delete();
    }
}
