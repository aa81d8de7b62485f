#!/usr/bin/env node
// Headless Chromium as a WHIP publisher or WHEP player, with the unmodified npm `whip-whep`
// clients (medooze) in the page (whip.html), for Conclave's bridge tests
// (tests/integration/bridges.rs). Chromium's fake camera (1280x720) and microphone; the
// publisher can send three simulcast layers (rids q, h, f).
//
// Deps and browser as driver.mjs: $CONCLAVE_WEB_CLIENTS (node_modules with whip-whep and
// playwright-core), $CONCLAVE_CHROMIUM.
//
// Usage: node whip.mjs --mode publish|play --url URL --token JWT [--simulcast]
//            [--seconds 20] [--restart-after S] [--min-frames 30] [--timeout 40]
//   publish: publishes for --seconds after connecting (--restart-after: an ICE restart by
//            PATCH that many seconds in), then stops (DELETE).
//   play:    plays until --min-frames video frames were painted, then stops (DELETE).
// stdout: {"type":"event","event":...} lines, then ONE {"type":"summary",...} line.
// Exit: 0 ok, 2 the WHIP/WHEP request failed, 3 not connected or too few frames, 5 browser
// error, 64 usage.
import { createRequire } from 'node:module';
import path from 'node:path';
import fs from 'node:fs';
import { fileURLToPath } from 'node:url';
import { CHROME_ARGS, serveLoopback } from '../browser-common.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const depsDir = path.resolve(process.env.CONCLAVE_WEB_CLIENTS || here);
const require = createRequire(path.join(depsDir, 'package.json'));
const emit = (o) => process.stdout.write(JSON.stringify(o) + '\n');
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const args = { mode: null, url: null, token: null, simulcast: false, seconds: 20, restartAfter: null, minFrames: 30, timeout: 40 };
for (let i = 2; i < process.argv.length; i++) {
  const a = process.argv[i];
  const next = () => process.argv[++i];
  if (a === '--mode') args.mode = next();
  else if (a === '--url') args.url = next();
  else if (a === '--token') args.token = next();
  else if (a === '--simulcast') args.simulcast = true;
  else if (a === '--seconds') args.seconds = Number(next());
  else if (a === '--restart-after') args.restartAfter = Number(next());
  else if (a === '--min-frames') args.minFrames = Number(next());
  else if (a === '--timeout') args.timeout = Number(next());
  else { console.error(`whip.mjs: unknown argument ${a}`); process.exit(64); }
}
if (!['publish', 'play'].includes(args.mode) || !args.url || !args.token) {
  console.error('usage: node whip.mjs --mode publish|play --url URL --token JWT ...');
  process.exit(64);
}

const started = Date.now();
const summary = { type: 'summary', mode: args.mode, exit_code: 5 };
let browser = null;
let srv = null;
try {
  const exe = process.env.CONCLAVE_CHROMIUM || '/usr/bin/chromium';
  if (!fs.existsSync(exe)) throw new Error(`Chromium not found at ${exe}: run \`eval "$(scripts/install-test-deps)"\``);
  const { chromium } = require('playwright-core');
  const clients = path.dirname(require.resolve('whip-whep/whip.js'));
  const js = 'text/javascript; charset=utf-8';
  const files = {
    '/whip.html': { file: path.join(here, 'whip.html'), type: 'text/html; charset=utf-8' },
    '/whip.js': { file: path.join(clients, 'whip.js'), type: js },
    '/whep.js': { file: path.join(clients, 'whep.js'), type: js },
  };
  srv = await serveLoopback((p) => files[p] || null);
  browser = await chromium.launch({ executablePath: exe, headless: true, args: CHROME_ARGS, timeout: 30000 });
  const ctx = await browser.newContext({ permissions: ['camera', 'microphone'] });
  const page = await ctx.newPage();
  const consoleTail = [];
  page.on('console', (m) => { consoleTail.push(`[${m.type()}] ${m.text()}`); if (consoleTail.length > 50) consoleTail.shift(); });
  page.on('pageerror', (e) => consoleTail.push(`[pageerror] ${e.message}`));
  await page.goto(`http://127.0.0.1:${srv.address().port}/whip.html`);
  await page.waitForFunction(() => window.ready === true, null, { timeout: 10000 });
  if (args.mode === 'publish') {
    await page.evaluate(([u, t, s]) => window.startPublish(u, t, s), [args.url, args.token, args.simulcast]);
  } else {
    await page.evaluate(([u, t]) => window.startPlay(u, t), [args.url, args.token]);
  }
  const deadline = started + args.timeout * 1000;
  let connectedAt = null;
  let restarted = false;
  let failed = null;
  let last = null;
  while (Date.now() < deadline) {
    last = await page.evaluate(() => window.report());
    for (const e of last.events) {
      emit({ type: 'event', ...e });
      if (e.event === 'error') failed = e.message;
    }
    if (failed) break;
    if (last.state === 'connected' && connectedAt === null) {
      connectedAt = Date.now();
      emit({ type: 'event', event: 'connected', t_ms: connectedAt - started });
    }
    if (connectedAt !== null) {
      const since = (Date.now() - connectedAt) / 1000;
      if (args.restartAfter !== null && !restarted && since >= args.restartAfter) {
        restarted = true;
        await page.evaluate(() => window.restartIce());
      }
      if (args.mode === 'publish' && since >= args.seconds) break;
      if (args.mode === 'play' && last.painted >= args.minFrames) break;
    }
    await sleep(250);
  }
  Object.assign(summary, {
    state: last && last.state,
    painted: last ? last.painted : 0,
    video_width: last ? last.video_width : 0,
    video_height: last ? last.video_height : 0,
    outbound: last ? last.outbound : [],
    inbound: last ? last.inbound : [],
    connected_ms: connectedAt === null ? null : connectedAt - started,
    console_tail: consoleTail,
  });
  await page.evaluate(() => window.stop());
  for (const e of (await page.evaluate(() => window.report())).events) emit({ type: 'event', ...e });
  if (failed) {
    summary.error = failed;
    summary.exit_code = 2;
  } else if (connectedAt === null || (args.mode === 'play' && summary.painted < args.minFrames)) {
    summary.exit_code = 3;
  } else {
    summary.exit_code = 0;
  }
} catch (e) {
  summary.error = String(e && e.stack || e);
  summary.exit_code = 5;
} finally {
  if (browser) await browser.close().catch(() => {});
  if (srv) srv.close();
}
summary.elapsed_ms = Date.now() - started;
emit(summary);
process.exit(summary.exit_code);
