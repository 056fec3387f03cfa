package org.firstedge.demo;

import android.app.Activity;
import android.content.Context;
import android.content.Intent;
import android.os.Bundle;
import android.os.Handler;
import android.os.Looper;
import android.view.LayoutInflater;
import android.view.Menu;
import android.view.MenuItem;
import android.view.View;
import android.view.ViewGroup;
import android.widget.BaseAdapter;
import android.widget.Button;
import android.widget.EditText;
import android.widget.ListView;
import android.widget.TextView;

import java.io.File;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;

/**
 * The chat screen: messages, an input and a send/stop button. The bundle is loaded and every reply is
 * generated on one worker thread; tokens reach the UI through the main thread's Handler. Each message is a
 * turn of one conversation (the runner's chat session) when the bundle supports it, else a fresh prompt;
 * "Clear chat" starts a new conversation.
 */
public class MainActivity extends Activity {
    static final class Message {
        final boolean user;
        String text;
        String stats = "";
        boolean[] mask = new boolean[0];
        boolean error;

        Message(boolean user, String text) {
            this.user = user;
            this.text = text;
        }
    }

    private final List<Message> messages = new ArrayList<Message>();
    private final ExecutorService worker = Executors.newSingleThreadExecutor();
    private final Handler ui = new Handler(Looper.getMainLooper());
    private MessageAdapter adapter;
    private TextView status;
    private EditText input;
    private Button send;
    private ListView list;

    // owned by the worker thread (read on the UI thread only through the flags below)
    private ChatEngine engine;
    private volatile boolean generating;
    private volatile boolean stopRequested;
    private volatile boolean ready;
    private String loadedKey = null;

    @Override
    protected void onCreate(Bundle saved) {
        super.onCreate(saved);
        setContentView(R.layout.activity_main);
        status = (TextView) findViewById(R.id.status);
        input = (EditText) findViewById(R.id.input);
        send = (Button) findViewById(R.id.send);
        list = (ListView) findViewById(R.id.messages);
        adapter = new MessageAdapter(this);
        list.setAdapter(adapter);
        send.setOnClickListener(new View.OnClickListener() {
            @Override
            public void onClick(View v) {
                if (generating) {
                    stopRequested = true;
                } else {
                    sendMessage();
                }
            }
        });
    }

    @Override
    protected void onResume() {
        super.onResume();
        ChatSettings s = SettingsStore.load(this);
        File dir = SettingsStore.bundleDir(this, s);
        String key = dir.getAbsolutePath() + "|" + s.threads;
        if (!key.equals(loadedKey)) {
            loadedKey = key;
            loadBundle(dir, s.threads);
        }
    }

    private void loadBundle(final File dir, final int threads) {
        ready = false;
        status.setText(getString(R.string.loading, dir.getAbsolutePath()));
        updateButton();
        worker.submit(new Runnable() {
            @Override
            public void run() {
                if (engine != null) {
                    engine.close();
                    engine = null;
                }
                String text;
                boolean ok = false;
                try {
                    engine = ChatEngine.open(dir, threads);
                    BundleManifest m = engine.manifest;
                    text = getString(R.string.loaded, m.name, m.nLayers, m.quantization, m.maxContext)
                            + "\n" + (engine.multiTurn() ? getString(R.string.multi_turn)
                            : getString(R.string.single_turn, engine.sessionUnavailable));
                    ok = true;
                } catch (FirstEdgeException e) {
                    text = getString(R.string.load_failed, e.getMessage());
                } catch (Throwable t) {  // never crash the app on a bad bundle
                    text = getString(R.string.load_failed, t.getClass().getSimpleName() + ": " + t.getMessage());
                }
                final String shown = text;
                final boolean loaded = ok;
                ui.post(new Runnable() {
                    @Override
                    public void run() {
                        status.setText(shown);
                        ready = loaded;
                        updateButton();
                    }
                });
            }
        });
    }

    private void updateButton() {
        send.setText(generating ? R.string.stop : R.string.send);
        send.setEnabled(generating || ready);
    }

    private void sendMessage() {
        final String text = input.getText().toString().trim();
        if (text.isEmpty() || !ready) return;
        input.setText("");
        messages.add(new Message(true, text));
        final Message reply = new Message(false, "");
        messages.add(reply);
        adapter.notifyDataSetChanged();
        list.setSelection(messages.size() - 1);
        final ChatSettings s = SettingsStore.load(this);
        generating = true;
        stopRequested = false;
        updateButton();
        worker.submit(new Runnable() {
            @Override
            public void run() {
                Generation g = null;
                String error = null;
                try {
                    if (engine == null) throw new FirstEdgeException("no bundle is loaded");
                    s.validate(engine.manifest.nLayers);
                    g = engine.reply(text, s.toOptions(), true, new ChatEngine.Listener() {
                        @Override
                        public boolean onText(final String soFar) {
                            ui.post(new Runnable() {
                                @Override
                                public void run() {
                                    reply.text = soFar;
                                    adapter.notifyDataSetChanged();
                                }
                            });
                            return !stopRequested;
                        }
                    });
                } catch (FirstEdgeException e) {
                    error = e.getMessage();
                } catch (Throwable t) {
                    error = t.getClass().getSimpleName() + ": " + t.getMessage();
                }
                final Generation done = g;
                final String err = error;
                ui.post(new Runnable() {
                    @Override
                    public void run() {
                        if (err != null) {
                            reply.error = true;
                            reply.text = getString(R.string.reply_failed, err);
                        } else {
                            int[] shown = withoutEos(done.tokens);
                            reply.text = engine == null ? reply.text : engine.decode(shown);
                            reply.stats = StatsFormat.line(done);
                            reply.mask = done.mask;
                        }
                        generating = false;
                        updateButton();
                        adapter.notifyDataSetChanged();
                    }
                });
            }
        });
    }

    private int[] withoutEos(int[] tokens) {
        ChatEngine e = engine;
        if (e == null) return tokens;
        ByteLevelBpe.IntList out = new ByteLevelBpe.IntList();
        for (int t : tokens) if (!e.manifest.isEos(t)) out.add(t);
        return out.toArray();
    }

    @Override
    public boolean onCreateOptionsMenu(Menu menu) {
        menu.add(0, 1, 0, R.string.settings);
        menu.add(0, 2, 1, R.string.clear);
        return true;
    }

    @Override
    public boolean onOptionsItemSelected(MenuItem item) {
        if (item.getItemId() == 1) {
            startActivity(new Intent(this, SettingsActivity.class));
            return true;
        }
        if (item.getItemId() == 2 && !generating) {
            messages.clear();
            adapter.notifyDataSetChanged();
            worker.submit(new Runnable() {
                @Override
                public void run() {
                    if (engine != null) engine.resetConversation();
                }
            });
            return true;
        }
        return super.onOptionsItemSelected(item);
    }

    @Override
    protected void onDestroy() {
        stopRequested = true;
        worker.submit(new Runnable() {
            @Override
            public void run() {
                if (engine != null) engine.close();
                engine = null;
            }
        });
        worker.shutdown();
        super.onDestroy();
    }

    private final class MessageAdapter extends BaseAdapter {
        private final LayoutInflater inflater;

        MessageAdapter(Context c) {
            inflater = LayoutInflater.from(c);
        }

        @Override
        public int getCount() {
            return messages.size();
        }

        @Override
        public Object getItem(int i) {
            return messages.get(i);
        }

        @Override
        public long getItemId(int i) {
            return i;
        }

        @Override
        public View getView(int i, View view, ViewGroup parent) {
            if (view == null) view = inflater.inflate(R.layout.item_message, parent, false);
            Message m = messages.get(i);
            ((TextView) view.findViewById(R.id.role)).setText(m.user ? R.string.you : R.string.model);
            TextView text = (TextView) view.findViewById(R.id.text);
            text.setText(m.text.isEmpty() && !m.user ? "\u2026" : m.text);
            text.setTextColor(m.error ? 0xFFC62828 : 0xFF212121);
            TextView stats = (TextView) view.findViewById(R.id.stats);
            stats.setText(m.stats);
            stats.setVisibility(m.stats.isEmpty() ? View.GONE : View.VISIBLE);
            ((LayerStripView) view.findViewById(R.id.strip)).setMask(m.mask);
            return view;
        }
    }
}
