// The drawing page: N class pads, one query pad, "learn" and "clear", and the prediction.
//
// Adaptation and prediction run in the browser with onnxruntime-web (WebAssembly) on the
// exported adapter's adapt.onnx and predict.onnx, fetched from the service. Both sessions are
// created once; the adapted weights are kept as tensors until the next "learn" or "clear"
// releases them, and every other tensor is released right after use. When the adapter cannot
// load here (no onnxruntime-web files, no WebAssembly, a checksum mismatch, a model the runtime
// refuses), the page says why and adapts through the service's /v1/tasks API instead.
// `?backend=service` forces that fallback. `window.mamlPage` exposes the state to tests.

import { CANVAS, PEN_RADIUS, boxResize, inkStrokePoint } from './strokes.js';

const ORT_DIR = new URL('vendor/onnxruntime-web/', location.href).href;
const SIZE = 28;
const PIXELS = SIZE * SIZE;
// Pen radius of the adapter's recorded rasterisation (adapter.json preprocessing.strokes).
let penRadius = PEN_RADIUS;
const $ = (id) => document.getElementById(id);
// A service started with --auth-token-file: open the page as `/#token=TOKEN` and the page sends
// `Authorization: Bearer TOKEN` on its own requests (a fragment never reaches the server or its
// logs; docs/serving-security.md).
const TOKEN = /(?:^#|&)token=([^&]+)/.exec(location.hash);
const AUTH = TOKEN ? { authorization: `Bearer ${decodeURIComponent(TOKEN[1])}` } : {};

// One drawing surface: records strokes in 105x105 image space and shows the binary bitmap the
// model will see (the canvas has 105x105 pixels, scaled up by CSS).
class Pad {
  constructor(container, label, onStroke, onClear) {
    this.strokes = [];
    this.pointerTypes = new Set();
    this.bitmap = new Uint8Array(CANVAS * CANVAS);
    this.element = document.createElement('div');
    this.element.className = 'pad';
    const frame = document.createElement('div');
    frame.className = 'frame';
    this.canvas = document.createElement('canvas');
    this.canvas.width = this.canvas.height = CANVAS;
    this.canvas.setAttribute('aria-label', label);
    frame.append(this.canvas);
    const caption = document.createElement('div');
    caption.className = 'label';
    const text = document.createElement('span');
    text.textContent = label;
    const clear = document.createElement('button');
    clear.type = 'button';
    clear.textContent = 'clear';
    clear.addEventListener('click', () => { this.clear(); onClear(); });
    caption.append(text, clear);
    this.element.append(frame, caption);
    container.append(this.element);
    this.context = this.canvas.getContext('2d');
    this.image = this.context.createImageData(CANVAS, CANVAS);
    this.onStroke = onStroke;
    this.pointer = null;
    this.canvas.addEventListener('pointerdown', (e) => this.down(e));
    this.canvas.addEventListener('pointermove', (e) => this.move(e));
    for (const type of ['pointerup', 'pointercancel']) {
      this.canvas.addEventListener(type, (e) => this.up(e));
    }
    this.paint();
  }

  // Pointer position in image space: the canvas spans [-0.5, 104.5] (pixel centres at 0..104).
  point(e) {
    const rect = this.canvas.getBoundingClientRect();
    return [(e.clientX - rect.left) * CANVAS / rect.width - 0.5,
            (e.clientY - rect.top) * CANVAS / rect.height - 0.5];
  }

  add(e) {
    const stroke = this.strokes[this.strokes.length - 1];
    stroke.push(this.point(e));
    inkStrokePoint(this.bitmap, stroke, stroke.length - 1, CANVAS, penRadius);
  }

  down(e) {
    if (this.pointer !== null || (e.pointerType === 'mouse' && e.button !== 0)) return;
    e.preventDefault();
    this.pointer = e.pointerId;
    this.pointerTypes.add(e.pointerType);
    this.canvas.setPointerCapture(e.pointerId);
    this.strokes.push([]);
    this.add(e);
    this.paint();
  }

  move(e) {
    if (e.pointerId !== this.pointer) return;
    const events = e.getCoalescedEvents ? e.getCoalescedEvents() : [];
    for (const each of events.length ? events : [e]) this.add(each);
    this.paint();
  }

  up(e) {
    if (e.pointerId !== this.pointer) return;
    this.pointer = null;
    this.onStroke();
  }

  paint() {
    const data = this.image.data;
    for (let i = 0; i < this.bitmap.length; i++) {
      const v = this.bitmap[i] ? 0 : 255;
      data[4 * i] = data[4 * i + 1] = data[4 * i + 2] = v;
      data[4 * i + 3] = 255;
    }
    this.context.putImageData(this.image, 0, 0);
  }

  clear() {
    this.strokes = [];
    this.bitmap.fill(0);
    this.pointer = null;
    this.paint();
  }

  get empty() { return this.strokes.length === 0; }

  input() { return boxResize(this.bitmap, CANVAS, SIZE); }

  set winner(on) { this.element.classList.toggle('winner', on); }
}

async function sha256(bytes) {
  const digest = await crypto.subtle.digest('SHA-256', bytes);
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, '0')).join('');
}

// Adapt and predict in this browser with onnxruntime-web.
class BrowserBackend {
  static async create(meta, stats) {
    if (typeof WebAssembly !== 'object') throw new Error('this browser has no WebAssembly');
    let ort;
    try {
      ort = await import(`${ORT_DIR}ort.wasm.min.mjs`);
    } catch (err) {
      throw new Error(`onnxruntime-web is not served at ${ORT_DIR} (${err.message}); run ` +
                      'scripts/setup_browser.sh');
    }
    ort.env.wasm.wasmPaths = ORT_DIR;
    ort.env.wasm.numThreads = 1;
    const files = meta.files && meta.files.onnx;
    if (!files) throw new Error('adapter.json lists no ONNX files (export with --formats onnx)');
    const sessions = {};
    for (const entry of ['adapt', 'predict']) {
      const name = files[entry];
      const response = await fetch(`v1/adapter/files/${encodeURIComponent(name)}`,
        { headers: AUTH });
      if (!response.ok) throw new Error(`${name}: HTTP ${response.status}`);
      const bytes = new Uint8Array(await response.arrayBuffer());
      const expected = meta.sha256 && meta.sha256[name];
      if (expected && globalThis.crypto && crypto.subtle) {
        const actual = await sha256(bytes);
        if (actual !== expected) {
          throw new Error(`${name} has sha256 ${actual.slice(0, 12)}…, adapter.json says ` +
                          `${expected.slice(0, 12)}…`);
        }
      }
      sessions[entry] = await ort.InferenceSession.create(bytes, { executionProviders: ['wasm'] });
      stats.sessions += 1;
    }
    return new BrowserBackend(ort, sessions, meta, stats);
  }

  constructor(ort, sessions, meta, stats) {
    this.ort = ort;
    this.sessions = sessions;
    // a task's adapted state, as adapt.onnx returns it: the weights p0.., then (support mode)
    // the support set's batch-norm moments m0..
    this.stateNames = [...meta.parameters.map((_, i) => `p${i}`),
                       ...((meta.norm && meta.norm.moments) || []).map((m) => m.name)];
    this.stats = stats;
    this.params = null;
    this.kind = 'browser';
    this.description = `in this browser (onnxruntime-web ${ort.env.versions?.web ?? ''}, ` +
                       'WebAssembly)';
  }

  tensor(type, data, dims) {
    this.stats.liveTensors += 1;
    return new this.ort.Tensor(type, data, dims);
  }

  dispose(tensor) {
    tensor.dispose();
    this.stats.liveTensors -= 1;
  }

  async run(session, feeds) {
    try {
      const outputs = await session.run(feeds);
      this.stats.liveTensors += Object.keys(outputs).length;
      return outputs;
    } finally {
      for (const t of Object.values(feeds)) if (!this.isParam(t)) this.dispose(t);
    }
  }

  isParam(t) { return this.params !== null && this.params.includes(t); }

  async adapt(supportX, supportY) {
    this.release();
    const n = supportY.length;
    const outputs = await this.run(this.sessions.adapt, {
      support_x: this.tensor('float32', supportX, [n, 1, SIZE, SIZE]),
      support_y: this.tensor('int64', BigInt64Array.from(supportY, BigInt), [n]),
    });
    this.params = this.stateNames.map((name) => outputs[name]);
  }

  async predict(queryX, q) {
    const feeds = { query_x: this.tensor('float32', queryX, [q, 1, SIZE, SIZE]) };
    this.params.forEach((p, i) => { feeds[this.stateNames[i]] = p; });
    const outputs = await this.run(this.sessions.predict, feeds);
    const logits = Float32Array.from(outputs.outputs.data);
    for (const t of Object.values(outputs)) this.dispose(t);
    return logits;
  }

  release() {
    if (this.params) for (const p of this.params) this.dispose(p);
    this.params = null;
  }
}

// The fallback: the service adapts (POST /v1/tasks) and predicts (POST /v1/tasks/{id}/predict).
class ServiceBackend {
  constructor(reason) {
    this.kind = 'service';
    this.reason = reason;
    this.taskId = null;
    this.description = 'on the service (POST /v1/tasks), not in this browser';
  }

  static nested(flat, q) {
    return Array.from({ length: q }, (_, k) => [Array.from({ length: SIZE }, (_, r) =>
      Array.from(flat.subarray(k * PIXELS + r * SIZE, k * PIXELS + (r + 1) * SIZE)))]);
  }

  async call(method, url, body) {
    const response = await fetch(url, {
      method, headers: { 'content-type': 'application/json', ...AUTH },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (!response.ok && response.status !== 404) {
      const text = await response.text();
      throw new Error(`${method} ${url}: HTTP ${response.status} ${text}`);
    }
    return response.status === 204 || response.status === 404 ? null : response.json();
  }

  async adapt(supportX, supportY) {
    await this.release();
    const body = { support_x: ServiceBackend.nested(supportX, supportY.length),
                   support_y: Array.from(supportY) };
    this.taskId = (await this.call('POST', 'v1/tasks', body)).task_id;
  }

  async predict(queryX, q) {
    const answer = await this.call('POST', `v1/tasks/${this.taskId}/predict`,
                                   { query_x: ServiceBackend.nested(queryX, q) });
    if (answer === null) throw new Error('the service forgot the task (idle too long): learn again');
    return Float32Array.from(answer.logits.flat());
  }

  async release() {
    if (this.taskId !== null) await this.call('DELETE', `v1/tasks/${this.taskId}`);
    this.taskId = null;
  }
}

function softmax(row) {
  const top = Math.max(...row);
  const e = row.map((v) => Math.exp(v - top));
  const sum = e.reduce((a, b) => a + b, 0);
  return e.map((v) => v / sum);
}

function setStatus(text, kind = '') {
  const status = $('status');
  status.textContent = text;
  status.className = `status ${kind}`;
}

async function main() {
  const stats = { sessions: 0, liveTensors: 0, rounds: 0 };
  const state = { meta: null, backend: null, adapted: false, prediction: null, error: null };
  const api = { stats, state, pads: [], query: null };
  window.mamlPage = api;
  let queue = Promise.resolve();
  const serial = (fn) => {
    queue = queue.then(fn).catch((err) => {
      state.error = err.message;
      $('result').textContent = `error: ${err.message}`;
      $('result').dataset.error = err.message;
    });
    return queue;
  };

  const response = await fetch('v1/adapter', { headers: AUTH });
  if (!response.ok) throw new Error(`GET /v1/adapter: HTTP ${response.status}`);
  const meta = (await response.json()).metadata;
  state.meta = meta;
  const pre = meta.preprocessing;
  if (meta.task !== 'classification' || !pre || String(meta.input.shape) !== `1,${SIZE},${SIZE}`
      || pre.size !== SIZE || pre.resize !== 'box' || pre.ink !== 1) {
    throw new Error(`this adapter (${meta.task}, input ${JSON.stringify(meta.input.shape)}) is ` +
                    'not a 28x28 ink image classifier; the drawing page needs one (Omniglot)');
  }
  // How strokes become images was recorded at export (maml.strokes.RASTERISATION); older
  // adapters without the record were trained for this page's defaults.
  const pen = pre.strokes || { canvas: CANVAS, pen_radius: PEN_RADIUS };
  if (pen.canvas !== CANVAS || !(pen.pen_radius > 0)) {
    throw new Error(`this adapter rasterises strokes on a ${pen.canvas}x${pen.canvas} canvas with ` +
                    `pen radius ${pen.pen_radius}; this page draws on ${CANVAS}x${CANVAS}: ` +
                    'export an adapter trained on Omniglot-sized strokes');
  }
  penRadius = pen.pen_radius;
  $('pen').textContent = String(penRadius);
  const n = meta.n_way;
  const alone = ['support', 'tasknorm'].includes(meta.norm && meta.norm.mode);  // each query alone

  const showResult = (probabilities) => {
    const best = probabilities.indexOf(Math.max(...probabilities));
    api.pads.forEach((pad, i) => { pad.winner = i === best; });
    const result = $('result');
    result.textContent = `class ${best + 1} (${(100 * probabilities[best]).toFixed(1)}%)`;
    result.dataset.class = String(best);
    result.dataset.round = String(stats.rounds);
    delete result.dataset.error;
    const bars = $('bars');
    bars.replaceChildren();
    probabilities.forEach((p, i) => {
      const label = document.createElement('span');
      label.textContent = `class ${i + 1}`;
      const bar = document.createElement('div');
      bar.className = i === best ? 'bar top' : 'bar';
      const fill = document.createElement('div');
      fill.style.width = `${(100 * p).toFixed(1)}%`;
      bar.append(fill);
      const value = document.createElement('span');
      value.textContent = `${(100 * p).toFixed(1)}%`;
      bars.append(label, bar, value);
    });
  };

  const resetResult = (text) => {
    state.prediction = null;
    api.pads.forEach((pad) => { pad.winner = false; });
    $('result').textContent = text;
    for (const key of ['class', 'round', 'error']) delete $('result').dataset[key];
    $('bars').replaceChildren();
  };

  const runPredict = async () => {
    if (!state.adapted || api.query.empty) return;
    const queryX = api.query.input();
    let logits;
    if (alone) {
      // support mode: batch norm uses the support set's statistics, kept with the task, so the
      // drawing is predicted on its own
      logits = Array.from(await state.backend.predict(queryX, 1));
    } else {
      // transductive: batch norm normalises with the statistics of the query batch it is given
      // (as in training, where the query set holds every class). One drawing alone would be
      // normalised by itself, which the model never saw; so the query goes in a batch with the
      // N examples, and its prediction is the first row. (The test checks the Python runtime
      // agrees on that batch.)
      const batch = new Float32Array((1 + n) * PIXELS);
      batch.set(queryX, 0);
      batch.set(state.supportX, PIXELS);
      const all = await state.backend.predict(batch, 1 + n);
      logits = Array.from(all.subarray(0, n));
    }
    const probabilities = softmax(logits);
    stats.rounds += 1;
    state.prediction = { class: probabilities.indexOf(Math.max(...probabilities)), logits,
                         probabilities, input: Array.from(queryX) };
    showResult(probabilities);
  };
  const predict = () => serial(runPredict);

  const learn = () => serial(async () => {
    const missing = api.pads.findIndex((pad) => pad.empty);
    if (missing >= 0) {
      resetResult(`draw an example on every class pad first (class ${missing + 1} is empty)`);
      return;
    }
    const supportX = new Float32Array(n * PIXELS);
    api.pads.forEach((pad, i) => supportX.set(pad.input(), i * PIXELS));
    await state.backend.adapt(supportX, Array.from({ length: n }, (_, i) => i));
    state.adapted = true;
    state.supportX = supportX;
    state.support = Array.from(supportX);
    resetResult(api.query.empty ? 'learned: now draw one of them again' : 'predicting…');
    if (!api.query.empty) await runPredict();
  });

  const stale = () => {
    if (state.adapted) {
      state.adapted = false;
      serial(async () => { await state.backend.release(); });
      resetResult('the examples changed: press learn again');
    }
  };

  for (let i = 0; i < n; i++) {
    api.pads.push(new Pad($('pads'), `class ${i + 1}`, stale, stale));
  }
  api.query = new Pad($('query'), 'query', predict, () => resetResult(
    state.adapted ? 'learned: now draw one of them again' : 'draw the examples, then press learn'));

  $('clear').addEventListener('click', () => {
    api.pads.forEach((pad) => pad.clear());
    api.query.clear();
    state.adapted = false;
    serial(async () => { await state.backend.release(); });
    resetResult('draw the examples, then press learn');
  });
  $('learn').addEventListener('click', learn);
  api.learn = learn;
  api.predict = predict;
  api.idle = () => queue;

  const forced = new URLSearchParams(location.search).get('backend') === 'service';
  try {
    if (forced) throw new Error('?backend=service asks for it');
    state.backend = await BrowserBackend.create(meta, stats);
    setStatus(`Adapter: ${n}-way ${meta.model?.spec ?? ''}, ${meta.steps} steps. Adapting ` +
              `${state.backend.description}.`);
  } catch (err) {
    state.backend = new ServiceBackend(err.message);
    setStatus(`The adapter could not run in this browser (${err.message}); adapting on the ` +
              'service through /v1/tasks instead.', 'fallback');
  }
  $('where').textContent = state.backend.description;
  $('learn').disabled = false;
  document.body.dataset.ready = state.backend.kind;
  api.pen = { canvas: CANVAS, radius: penRadius };
}

main().catch((err) => {
  setStatus(`error: ${err.message}`, 'error');
  document.body.dataset.ready = 'error';
});
