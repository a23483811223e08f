// Pen strokes to model inputs: the browser copy of maml/strokes.py and maml/images.py.
//
// A stroke is an array of [x, y] points in Omniglot's 105x105 image space (x = column,
// y = row downwards; pixel (row, col) is centred at (col, row)). A pixel is ink (1) when its
// centre lies within `radius` of a segment; the float64 arithmetic below is the same, operation
// for operation, as maml/strokes.py, so both give the same bitmap. `boxResize` is the exact
// area-average resize of maml/images.py (R @ image @ R^T). Works in browsers and in Node.

export const CANVAS = 105;
export const PEN_RADIUS = 2.5;

// Ink the pixels within sqrt(r2) of segment a-b into `bitmap` (Uint8Array, canvas x canvas).
export function inkSegment(bitmap, canvas, ax, ay, bx, by, r2) {
  const dx = bx - ax;
  const dy = by - ay;
  const length2 = dx * dx + dy * dy;
  const reach = Math.sqrt(r2) + 1;
  const c0 = Math.max(0, Math.floor(Math.min(ax, bx) - reach));
  const c1 = Math.min(canvas - 1, Math.ceil(Math.max(ax, bx) + reach));
  const r0 = Math.max(0, Math.floor(Math.min(ay, by) - reach));
  const r1 = Math.min(canvas - 1, Math.ceil(Math.max(ay, by) + reach));
  for (let row = r0; row <= r1; row++) {
    for (let col = c0; col <= c1; col++) {
      const px = col;
      const py = row;
      let t = 0;
      if (length2 > 0) {
        t = Math.min(Math.max(((px - ax) * dx + (py - ay) * dy) / length2, 0.0), 1.0);
      }
      const ex = px - (ax + t * dx);
      const ey = py - (ay + t * dy);
      if (ex * ex + ey * ey <= r2) bitmap[row * canvas + col] = 1;
    }
  }
}

// Ink one stroke's segment ending at point index i (i = 0: the stroke's first point, a dot).
export function inkStrokePoint(bitmap, stroke, i, canvas = CANVAS, radius = PEN_RADIUS) {
  const a = stroke[i > 0 ? i - 1 : 0];
  const b = stroke[i];
  inkSegment(bitmap, canvas, a[0], a[1], b[0], b[1], radius * radius);
}

// All strokes to a canvas x canvas Uint8Array bitmap (1 = ink).
export function rasterise(strokes, canvas = CANVAS, radius = PEN_RADIUS) {
  const bitmap = new Uint8Array(canvas * canvas);
  for (const stroke of strokes) {
    for (let i = 0; i < stroke.length; i++) inkStrokePoint(bitmap, stroke, i, canvas, radius);
  }
  return bitmap;
}

// (nOut, nIn) weights of maml.images.box_resize_matrix, row-major Float64Array.
export function boxResizeMatrix(nIn, nOut) {
  const scale = nIn / nOut;
  const m = new Float64Array(nOut * nIn);
  for (let i = 0; i < nOut; i++) {
    const lo = i * scale;
    const hi = (i + 1) * scale;
    for (let p = 0; p < nIn; p++) {
      const overlap = Math.max(Math.min(hi, p + 1) - Math.max(lo, p), 0);
      m[i * nIn + p] = overlap / scale;
    }
  }
  return m;
}

// A canvas x canvas bitmap to the model's size x size input (Float32Array, ink in [0, 1]).
export function boxResize(bitmap, canvas = CANVAS, size = 28) {
  const r = boxResizeMatrix(canvas, size);
  const tmp = new Float64Array(canvas * size); // image @ R^T: (canvas, size)
  for (let row = 0; row < canvas; row++) {
    for (let j = 0; j < size; j++) {
      let s = 0;
      for (let col = 0; col < canvas; col++) s += bitmap[row * canvas + col] * r[j * canvas + col];
      tmp[row * size + j] = s;
    }
  }
  const out = new Float32Array(size * size);
  for (let i = 0; i < size; i++) {
    for (let j = 0; j < size; j++) {
      let s = 0;
      for (let row = 0; row < canvas; row++) s += r[i * canvas + row] * tmp[row * size + j];
      out[i * size + j] = Math.min(Math.max(s, 0), 1);
    }
  }
  return out;
}

// Strokes to the model input, as adapter.json's preprocessing prescribes.
export function strokesToInput(strokes, size = 28) {
  return boxResize(rasterise(strokes), CANVAS, size);
}
