// Drive the drawing page in headless Chromium (playwright-core, the system's browser), as a
// person would: pen trajectories replayed as pointer input on the pads, then "learn".
//
//   node web/drive_page.mjs < job.json > result.json
//
// job: {url, chromium, userDataDir, pointer?: 'mouse' | 'touch', screenshot?, rounds: [{pads: [drawing, ...n_way],
// query: drawing, answer?}], repeat?: k}; the screenshot shows the first round whose prediction
// is its answer (else the last); a drawing is a list of strokes, a stroke a list of
// [x, y] points in 105x105 image space. Each round clears the page, draws every pad, presses
// "learn" and waits for the prediction. `repeat` then presses "learn" k more times on the last
// round's drawings (many adapt/predict rounds, for leaks). Prints {status, backend, rounds:
// [{shown, prediction, strokes, support, stats}], stats, console} as JSON.
import { readFileSync } from 'node:fs';
import { chromium } from 'playwright-core';

const job = JSON.parse(readFileSync(0, 'utf8'));
const browser = await chromium.launchPersistentContext(job.userDataDir, {
  executablePath: job.chromium,
  headless: true,
  viewport: { width: 1280, height: 1000 },
  hasTouch: job.pointer === 'touch',
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const consoleLines = [];
const out = { rounds: [], console: consoleLines };
try {
  const page = browser.pages()[0] ?? await browser.newPage();
  page.on('console', (m) => consoleLines.push(`${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => consoleLines.push(`pageerror: ${e.message}`));
  await page.goto(job.url);
  await page.waitForSelector('body[data-ready]', { timeout: 60000 });
  out.backend = await page.getAttribute('body', 'data-ready');
  out.status = await page.textContent('#status');
  if (out.backend === 'error') throw new Error(`the page failed to start: ${out.status}`);

  const canvases = page.locator('canvas');
  const cdp = job.pointer === 'touch' ? await browser.newCDPSession(page) : null;
  const touch = (type, points) => cdp.send('Input.dispatchTouchEvent', {
    type, touchPoints: points.map(([x, y]) => ({ x, y, id: 1 })) });
  const draw = async (index, drawing) => {
    const box = await canvases.nth(index).boundingBox();
    const at = ([x, y]) => [box.x + (x + 0.5) * box.width / 105, box.y + (y + 0.5) * box.height / 105];
    if (cdp) { // a finger: touch events, which the page gets as pointer events of type touch
      for (const stroke of drawing) {
        await touch('touchStart', [at(stroke[0])]);
        for (const point of stroke.slice(1)) await touch('touchMove', [at(point)]);
        await touch('touchEnd', []);
      }
      return;
    }
    for (const stroke of drawing) {
      await page.mouse.move(...at(stroke[0]));
      await page.mouse.down();
      for (const point of stroke.slice(1)) await page.mouse.move(...at(point));
      await page.mouse.up();
    }
  };
  const learn = async () => {
    await page.click('#learn');
    await page.evaluate(() => window.mamlPage.idle());
    return page.evaluate(() => {
      const api = window.mamlPage;
      const result = document.querySelector('#result');
      return {
        shown: { text: result.textContent, class: result.dataset.class ?? null,
                 error: result.dataset.error ?? null },
        prediction: api.state.prediction,
        support: api.state.support,
        strokes: { pads: api.pads.map((p) => p.strokes), query: api.query.strokes },
        pointerTypes: [...new Set([...api.pads, api.query].flatMap((p) => [...p.pointerTypes]))],
        stats: { ...api.stats },
      };
    });
  };

  let shot = false;
  for (const [i, round] of job.rounds.entries()) {
    await page.click('#clear');
    for (const [k, drawing] of round.pads.entries()) await draw(k, drawing);
    await draw(round.pads.length, round.query);
    out.rounds.push(await learn());
    const last = out.rounds[out.rounds.length - 1];
    const right = last.prediction && last.prediction.class === round.answer;
    if (job.screenshot && !shot && (right || i === job.rounds.length - 1)) {
      await page.screenshot({ path: job.screenshot, fullPage: true });
      shot = true;
    }
  }
  out.repeats = [];
  for (let r = 0; r < (job.repeat ?? 0); r++) {
    const { prediction, stats } = await learn();
    out.repeats.push({ class: prediction?.class ?? null, logits: prediction?.logits ?? null, stats });
  }
  out.stats = await page.evaluate(() => ({ ...window.mamlPage.stats }));
} catch (err) {
  out.error = String(err && err.stack || err);
} finally {
  await browser.close();
}
process.stdout.write(JSON.stringify(out));
