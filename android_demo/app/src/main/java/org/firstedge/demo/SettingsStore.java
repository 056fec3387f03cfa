package org.firstedge.demo;

import android.content.Context;
import android.content.SharedPreferences;

import java.io.File;

/** ChatSettings kept in SharedPreferences, and where the bundle folder is on the device. */
final class SettingsStore {
    private static final String PREFS = "first_edge_settings";

    private SettingsStore() {
    }

    static ChatSettings load(Context c) {
        SharedPreferences p = c.getSharedPreferences(PREFS, Context.MODE_PRIVATE);
        ChatSettings s = new ChatSettings();
        s.bundle = p.getString("bundle", s.bundle);
        s.routing = p.getString("routing", s.routing);
        s.threshold = p.getFloat("threshold", s.threshold);
        s.keep = p.getInt("keep", s.keep);
        s.maxNewTokens = p.getInt("max_new_tokens", s.maxNewTokens);
        s.threads = p.getInt("threads", s.threads);
        try {
            s.validate(0);
        } catch (FirstEdgeException e) {
            return new ChatSettings();  // stored values from an older version that no longer validate
        }
        return s;
    }

    static void save(Context c, ChatSettings s) {
        c.getSharedPreferences(PREFS, Context.MODE_PRIVATE).edit()
                .putString("bundle", s.bundle).putString("routing", s.routing).putFloat("threshold", s.threshold)
                .putInt("keep", s.keep).putInt("max_new_tokens", s.maxNewTokens).putInt("threads", s.threads)
                .apply();
    }

    /** The bundle folder: an absolute path as given, else a folder in the app's external files folder. */
    static File bundleDir(Context c, ChatSettings s) {
        File f = new File(s.bundle);
        if (f.isAbsolute()) return f;
        File base = c.getExternalFilesDir(null);
        if (base == null) base = c.getFilesDir();
        return new File(base, s.bundle);
    }
}
