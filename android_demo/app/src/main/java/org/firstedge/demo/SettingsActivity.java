package org.firstedge.demo;

import android.app.Activity;
import android.os.Bundle;
import android.view.View;
import android.widget.Button;
import android.widget.EditText;
import android.widget.RadioGroup;
import android.widget.TextView;

/** The settings screen: bundle folder, routing (default / threshold / layer budget), max new tokens, threads. */
public class SettingsActivity extends Activity {
    private EditText bundle, threshold, keep, maxNew, threads;
    private RadioGroup routing;
    private TextView error, where;

    @Override
    protected void onCreate(Bundle saved) {
        super.onCreate(saved);
        setContentView(R.layout.activity_settings);
        bundle = (EditText) findViewById(R.id.bundle);
        threshold = (EditText) findViewById(R.id.threshold);
        keep = (EditText) findViewById(R.id.keep);
        maxNew = (EditText) findViewById(R.id.max_new_tokens);
        threads = (EditText) findViewById(R.id.threads);
        routing = (RadioGroup) findViewById(R.id.routing);
        error = (TextView) findViewById(R.id.error);
        where = (TextView) findViewById(R.id.where);
        ChatSettings s = SettingsStore.load(this);
        bundle.setText(s.bundle);
        threshold.setText(String.valueOf(s.threshold));
        keep.setText(s.keep > 0 ? String.valueOf(s.keep) : "");
        maxNew.setText(String.valueOf(s.maxNewTokens));
        threads.setText(String.valueOf(s.threads));
        routing.check(ChatSettings.ROUTING_THRESHOLD.equals(s.routing) ? R.id.routing_threshold
                : ChatSettings.ROUTING_BUDGET.equals(s.routing) ? R.id.routing_budget : R.id.routing_default);
        where.setText(getString(R.string.bundle_where, SettingsStore.bundleDir(this, s).getAbsolutePath()));
        ((Button) findViewById(R.id.save)).setOnClickListener(new View.OnClickListener() {
            @Override
            public void onClick(View v) {
                save();
            }
        });
    }

    private void save() {
        int id = routing.getCheckedRadioButtonId();
        String r = id == R.id.routing_threshold ? ChatSettings.ROUTING_THRESHOLD
                : id == R.id.routing_budget ? ChatSettings.ROUTING_BUDGET : ChatSettings.ROUTING_DEFAULT;
        try {
            ChatSettings s = ChatSettings.fromText(bundle.getText().toString(), r, threshold.getText().toString(),
                    keep.getText().toString(), maxNew.getText().toString(), threads.getText().toString());
            SettingsStore.save(this, s);
            finish();
        } catch (FirstEdgeException e) {
            error.setText(e.getMessage());
            error.setVisibility(View.VISIBLE);
        }
    }
}
