package org.firstedge.demo;

import android.content.Context;
import android.graphics.Canvas;
import android.graphics.Paint;
import android.util.AttributeSet;
import android.view.View;

/** A strip of L cells, one a layer: filled = the layer ran, pale = FiRST skipped it for this reply. */
public class LayerStripView extends View {
    private boolean[] mask = new boolean[0];
    private final Paint kept = new Paint();
    private final Paint skipped = new Paint();

    public LayerStripView(Context context) {
        this(context, null);
    }

    public LayerStripView(Context context, AttributeSet attrs) {
        super(context, attrs);
        kept.setColor(0xFF2E7D32);
        skipped.setColor(0xFFE0E0E0);
    }

    public void setMask(boolean[] mask) {
        this.mask = mask == null ? new boolean[0] : mask.clone();
        setContentDescription(mask == null ? "" : "layers run: " + StatsFormat.maskString(this.mask));
        requestLayout();  // the height depends on whether there is a mask
        invalidate();
    }

    @Override
    protected void onMeasure(int widthSpec, int heightSpec) {
        int h = (int) (10 * getResources().getDisplayMetrics().density);
        setMeasuredDimension(MeasureSpec.getSize(widthSpec), mask.length == 0 ? 0 : h);
    }

    @Override
    protected void onDraw(Canvas canvas) {
        int n = mask.length;
        if (n == 0) return;
        float w = (float) getWidth() / n;
        float gap = Math.min(2f, w / 4);
        for (int i = 0; i < n; i++)
            canvas.drawRect(i * w, 0, (i + 1) * w - gap, getHeight(), mask[i] ? kept : skipped);
    }
}
