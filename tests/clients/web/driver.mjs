#!/usr/bin/env node
// Headless Chromium participants on the unmodified npm `livekit-client`, for Conclave's
// browser interop tests (tests/integration/browser.rs via tests/integration/support/web.rs).
//
// Deps: node_modules with livekit-client + playwright-core (package.json / package-lock.json
// here), found in $CONCLAVE_WEB_CLIENTS (a dir holding node_modules/), else next to this
// script. Browser: $CONCLAVE_CHROMIUM (Debian's /usr/bin/chromium); playwright-core never
// downloads one (do not run `npx playwright install`). Both come from
// `eval "$(scripts/install-test-deps)"`.
//
// Usage:  node driver.mjs --config FILE.json      (or --config-json '{...}')
//              [--exit-on-stdin-eof]   (stop, leave and report when stdin closes: the parent died)
//
// Config:
//   {
//     "timeout_s": 40,        // overall deadline from start; unmet expectations by then: exit 3
//     "min_duration_s": 0,    // stay at least this long after every tab connected
//     "hold": false,          // after the expectations are met, stay until SIGTERM/SIGINT,
//                             // stdin EOF or timeout_s (exit 0 as long as they were met)
//     "verbose": false,       // page console on stderr
//     "tabs": [               // 1 or 2 tabs, each its own browser context (its own "user")
//       { "label": "a", "url": "ws://127.0.0.1:PORT", "token": "JWT",
//         "options": { "simulcast": true, "adaptiveStream": false, "dynacast": false,
//                      "singlePC": null, "videoCodec": "vp8", "e2eeKey": null,
//                      "resolution": {"width": 640, "height": 360, "frameRate": 24},
//                      "red": true,             // publishDefaults.red (redundant audio)
//                      "statsIntervalMs": 0 },  // > 0: periodic video_stats / audio_stats /
//                                               // outbound_stats events (page.js)
//         "publish": { "camera": true, "microphone": true },
//         // ask the SFU for a simulcast layer of a remote video once it is subscribed
//         // (RemoteTrackPublication.setVideoQuality; needs adaptiveStream off)
//         "video_quality": [{"identity": "bob", "quality": "low"}],
//         "expect": {
//           "sending_layers": 2,     // own camera: at least this many simulcast layers encoding
//           "paused_layers": ["h"],  // own camera: these encodings switched off (dynacast)
//           "remote_tracks": [{"identity": "bob", "kind": "audio"}],   // subscribed
//           "video_playing": [{"identity": "bob", "min_frames": 30}],  // videoWidth > 0,
//                                        // >= min_frames painted, a frame in the last second
//           "audio_level":   [{"identity": "bob", "min_level": 0.001}], // analyser RMS seen
//           "video_size":    [{"identity": "bob", "width": 320, "height": 180}] // playing at
//                                        // exactly this size (videoWidth x videoHeight) now
//         } } ]
//   }
//
// stdout: one JSON line per page event as it happens ({"type":"event","tab":"a","event":...}),
// {"type":"event","event":"expectations_met"} once, then ONE summary line:
//   {"type":"summary","result","exit_code","browser","elapsed_ms","expectations_met","unmet":[...],
//    "tabs":[{label, connected, identity, published:[...outbound layers...], remote_tracks,
//             videos:[{identity, video_width, video_height, frames, fps_1s, frames_advancing,
//                      stats}], audios:[{identity, level_max, participant_audio_level, stats}],
//             console_errors, console_warnings, page_errors, console_tail, events}]}
// Exit: 0 ok, 2 a tab failed to connect, 3 expectations unmet, 4 a tab was disconnected by
// the server, 5 browser/launch/driver error, 64 usage.
import { createRequire } from 'node:module';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { CHROME_ARGS, serveLoopback } from '../browser-common.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const depsDir = path.resolve(process.env.CONCLAVE_WEB_CLIENTS || here);
const require = createRequire(path.join(depsDir, 'package.json'));

const EXIT = { ok: 0, connect_failed: 2, expectations_unmet: 3, disconnected: 4, browser_error: 5, usage: 64 };
const RESULT = Object.fromEntries(Object.entries(EXIT).map(([k, v]) => [v, k]));
const CONSOLE_TAIL = 150;
const MAX_TABS = 2;


const emit = (o) => process.stdout.write(JSON.stringify(o) + '\n');
const log = (...a) => console.error('[driver]', ...a);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function usage(msg) {
  console.error(`driver.mjs: ${msg}\nusage: node driver.mjs --config FILE.json | --config-json JSON`);
  process.exit(EXIT.usage);
}

let exitOnStdinEof = false;

function parseConfig(argv) {
  let text = null;
  for (let i = 2; i < argv.length; i++) {
    if (argv[i] === '--config') text = fs.readFileSync(argv[++i], 'utf8');
    else if (argv[i] === '--config-json') text = argv[++i];
    else if (argv[i] === '--exit-on-stdin-eof') exitOnStdinEof = true;
    else usage(`unknown argument ${argv[i]}`);
  }
  if (text === null) usage('no config');
  let c;
  try { c = JSON.parse(text); } catch (e) { usage(`config is not JSON: ${e.message}`); }
  if (!Array.isArray(c.tabs) || c.tabs.length < 1 || c.tabs.length > MAX_TABS) usage(`tabs: 1..${MAX_TABS} entries`);
  c.tabs.forEach((t, i) => {
    if (!t.url || !t.token) usage(`tab ${i}: url and token are required`);
    t.label ||= `tab${i}`;
    t.options ||= {};
    t.publish ||= { camera: true, microphone: true };
    t.expect ||= {};
    t.video_quality ||= [];
  });
  c.timeout_s ??= 40;
  c.min_duration_s ??= 0;
  c.hold ??= false;
  return c;
}

// Serves the page, its script and the UMD bundle over http://127.0.0.1 (a secure context).
function serve() {
  // The package's `require` export is dist/livekit-client.umd.js (deep paths are not exported).
  const umd = require.resolve('livekit-client');
  const js = 'text/javascript; charset=utf-8';
  const html = 'text/html; charset=utf-8';
  const files = {
    '/': { file: path.join(here, 'index.html'), type: html },
    '/index.html': { file: path.join(here, 'index.html'), type: html },
    '/page.js': { file: path.join(here, 'page.js'), type: js },
    '/livekit-client.umd.js': { file: umd, type: js },
    // The SDK's E2EE worker (classic script), next to the bundle in dist/.
    '/livekit-client.e2ee.worker.js': { file: path.join(path.dirname(umd), 'livekit-client.e2ee.worker.js'), type: js },
  };
  return serveLoopback((p) => files[p] || null);
}

// ---------------------------------------------------------------- expectations

function unmetFor(tab, s) {
  const u = [];
  const L = tab.label;
  if (!s || !s.connected) { u.push(`${L}: not connected`); return u; }
  const pub = s.published || [];
  if (tab.publish.camera && !pub.some((p) => p.kind === 'video' && p.sid)) u.push(`${L}: camera not published`);
  if (tab.publish.microphone && !pub.some((p) => p.kind === 'audio' && p.sid)) u.push(`${L}: microphone not published`);
  const ex = tab.expect;
  if (ex.sending_layers) {
    // the camera's simulcast layers that have encoded frames (the browser turns layers on as
    // its bandwidth estimate, fed by the SFU's congestion-control feedback, grows)
    const cam = pub.find((p) => p.kind === 'video');
    const n = cam ? (cam.outbound || []).filter((l) => (l.frames_encoded || 0) > 0).length : 0;
    if (n < ex.sending_layers) u.push(`${L}: ${n} camera layer(s) sending, want ${ex.sending_layers} (bandwidth estimate ${cam ? cam.available_outgoing_bitrate : '?'} bps)`);
  }
  if ((ex.paused_layers || []).length) {
    // own camera encodings switched off (dynacast: the SFU said nobody needs them)
    const cam = pub.find((p) => p.kind === 'video');
    const enc = cam ? cam.encodings || [] : [];
    const still = ex.paused_layers.filter((rid) => !enc.some((e) => e.rid === rid && e.active === false));
    if (still.length) u.push(`${L}: camera layer(s) ${still.join(',')} not paused (encodings: ${JSON.stringify(enc.map((e) => [e.rid, e.active]))})`);
  }
  for (const want of ex.remote_tracks || []) {
    const hit = (s.remote_tracks || []).some((t) => t.identity === want.identity && (!want.kind || t.kind === want.kind) && !t.unsubscribed_ms);
    if (!hit) u.push(`${L}: no subscribed ${want.kind || ''} track of ${want.identity}`);
  }
  for (const want of ex.video_playing || []) {
    const min = want.min_frames ?? 30;
    const hit = (s.videos || []).some((v) => {
      const frames = v.no_rvfc ? (v.playback_total_frames || 0) : v.frames;
      return v.identity === want.identity && v.video_width > 0 && v.video_height > 0 && frames >= min && v.frames_advancing;
    });
    if (!hit) u.push(`${L}: video of ${want.identity} not playing (videoWidth > 0, >= ${min} frames, advancing)`);
  }
  for (const want of ex.video_size || []) {
    const hit = (s.videos || []).some((v) => v.identity === want.identity && v.video_width === want.width
      && v.video_height === want.height && v.frames_advancing);
    if (!hit) {
      const seen = (s.videos || []).filter((v) => v.identity === want.identity).map((v) => `${v.video_width}x${v.video_height}`);
      u.push(`${L}: video of ${want.identity} not playing at ${want.width}x${want.height} (now: ${seen.join(', ') || 'none'})`);
    }
  }
  for (const want of ex.audio_level || []) {
    const min = want.min_level ?? 0.001;
    const hit = (s.audios || []).some((a) => a.identity === want.identity && (a.level_max || 0) >= min);
    if (!hit) u.push(`${L}: no audio level >= ${min} from ${want.identity}`);
  }
  return u;
}

// ---------------------------------------------------------------- main

async function main() {
  const cfg = parseConfig(process.argv);
  const t0 = Date.now();
  const elapsed = () => Date.now() - t0;
  const deadline = t0 + cfg.timeout_s * 1000;
  const exe = process.env.CONCLAVE_CHROMIUM || '/usr/bin/chromium';

  let stopRequested = null;
  const requestStop = (why) => {
    if (stopRequested) {
      // A repeated signal means "now"; anything else joins the stop already under way.
      if (why !== 'stdin EOF' && stopRequested !== 'stdin EOF') { log(`second stop request (${why}): exiting now`); process.exit(EXIT.browser_error); }
      return;
    }
    stopRequested = why;
    log(`stop requested: ${why}`);
    // Never hang on shutdown: the summary must come out.
    setTimeout(() => { log('shutdown took over 15 s; exiting'); process.exit(EXIT.browser_error); }, 15000).unref();
  };
  process.on('SIGTERM', () => requestStop('SIGTERM'));
  process.on('SIGINT', () => requestStop('SIGINT'));
  if (exitOnStdinEof) {
    // The test holds our stdin open; EOF means it went away: leave the room and exit.
    process.stdin.on('end', () => requestStop('stdin EOF'));
    process.stdin.on('error', () => {});
    process.stdin.resume();
  }

  const out = { type: 'summary', sdk: 'livekit-client', chromium: exe, tabs: [] };
  let browser = null; let srv = null; let code = EXIT.ok;
  const tabs = cfg.tabs.map((t) => ({
    cfg: t, label: t.label, page: null, state: null, nEvents: 0, qualityPending: [...t.video_quality],
    consoleErrors: [], consoleWarnings: [], consoleTail: [], pageErrors: [], events: [],
  }));
  let met = false; let unmet = ['not started'];
  let allConnectedAt = null;

  const pullEvents = async (tab) => {
    const evs = await tab.page.evaluate((n) => window.lk.eventsSince(n), tab.nEvents);
    tab.nEvents += evs.length;
    for (const e of evs) {
      tab.events.push(e);
      emit({ type: 'event', tab: tab.label, ...e });
    }
  };
  const poll = async (tab) => {
    const pending = [];
    for (const q of tab.qualityPending) {
      const done = await tab.page.evaluate(({ identity, quality }) => window.lk.setVideoQuality(identity, quality), q);
      if (!done) pending.push(q);
    }
    tab.qualityPending = pending;
    tab.state = await tab.page.evaluate(() => window.lk.state());
    await pullEvents(tab);
  };

  try {
    if (!fs.existsSync(exe)) throw new Error(`Chromium not found at ${exe}: run \`eval "$(scripts/install-test-deps)"\` (installs Debian chromium) or set CONCLAVE_CHROMIUM`);
    let chromium;
    try {
      ({ chromium } = require('playwright-core'));
      require.resolve('livekit-client');
    } catch (e) {
      throw new Error(`cannot load playwright-core/livekit-client from ${depsDir}/node_modules (${e.message}): run \`eval "$(scripts/install-test-deps)"\` and pass CONCLAVE_WEB_CLIENTS`);
    }
    srv = await serve();
    const pageUrl = `http://127.0.0.1:${srv.address().port}/index.html`;
    browser = await chromium.launch({
      executablePath: exe, headless: true, args: CHROME_ARGS.concat(cfg.chrome_args || []),
      handleSIGTERM: false, handleSIGINT: false, handleSIGHUP: false, timeout: 30000,
    });
    out.browser = browser.version();
    out.launch_ms = elapsed();
    log(`Chromium ${out.browser} up in ${out.launch_ms} ms; page ${pageUrl}`);

    for (const tab of tabs) {
      const ctx = await browser.newContext({ permissions: ['camera', 'microphone'], viewport: { width: 1024, height: 600 } });
      const page = await ctx.newPage();
      tab.page = page;
      page.on('console', (m) => {
        const line = `[${m.type()}] ${m.text()}`;
        if (tab.consoleTail.length >= CONSOLE_TAIL) tab.consoleTail.shift();
        tab.consoleTail.push(line);
        if (m.type() === 'error' && tab.consoleErrors.length < 200) tab.consoleErrors.push(m.text());
        if (m.type() === 'warning' && tab.consoleWarnings.length < 200) tab.consoleWarnings.push(m.text());
        if (cfg.verbose) console.error(`[page ${tab.label}] ${line}`);
      });
      page.on('pageerror', (e) => { tab.pageErrors.push(String(e && (e.stack || e.message) || e)); });
      page.on('crash', () => { tab.pageErrors.push('page crashed'); });
      await page.goto(pageUrl);
      const ok = await page.evaluate(() => !!(window.lk && window.LivekitClient));
      if (!ok) throw new Error(`tab ${tab.label}: page did not define window.lk / LivekitClient (console: ${tab.consoleTail.join(' | ')})`);
    }

    // Connect every tab at once, then publish.
    const results = await Promise.all(tabs.map(async (tab) => {
      const r = await tab.page.evaluate(({ url, token, options }) => window.lk.connect(url, token, options),
        { url: tab.cfg.url, token: tab.cfg.token, options: tab.cfg.options });
      await pullEvents(tab);
      if (!r.connected) return r;
      const p = tab.cfg.publish;
      if (p.camera || p.microphone) {
        const pr = await tab.page.evaluate((o) => window.lk.publish(o), p);
        await pullEvents(tab);
        if (pr.errors.length) log(`tab ${tab.label}: publish errors ${JSON.stringify(pr.errors)}`);
      }
      return r;
    }));
    if (results.some((r) => !r.connected)) code = EXIT.connect_failed;
    allConnectedAt = Date.now();

    let announced = false;
    while (code === EXIT.ok) {
      for (const tab of tabs) await poll(tab);
      unmet = tabs.flatMap((tab) => unmetFor(tab.cfg, tab.state));
      met = unmet.length === 0;
      if (met && !announced) {
        announced = true;
        emit({ type: 'event', event: 'expectations_met', t_ms: elapsed() });
      }
      if (tabs.some((tab) => tab.state && tab.state.disconnected)) { code = EXIT.disconnected; break; }
      if (stopRequested) { if (!met) code = EXIT.expectations_unmet; break; }
      if (met && !cfg.hold && Date.now() - allConnectedAt >= cfg.min_duration_s * 1000) break;
      if (Date.now() > deadline) { if (!met) code = EXIT.expectations_unmet; break; }
      await sleep(300);
    }
    // A last, full look (also after a connect failure: it carries the error).
    for (const tab of tabs) await poll(tab).catch((e) => tab.pageErrors.push(`final state: ${e.message}`));
    for (const tab of tabs) await tab.page.evaluate(() => window.lk.disconnect()).catch(() => {});
    for (const tab of tabs) await pullEvents(tab).catch(() => {});
  } catch (e) {
    out.error = String(e && (e.stack || e.message) || e);
    log(out.error);
    code = EXIT.browser_error;
  } finally {
    if (browser) await browser.close().catch(() => {});
    if (srv) srv.close();
  }

  out.tabs = tabs.map((tab) => ({
    label: tab.label,
    ...(tab.state || { connected: false }),
    console_errors: tab.consoleErrors,
    console_warnings: tab.consoleWarnings,
    page_errors: [...(tab.state ? tab.state.page_errors : []), ...tab.pageErrors],
    console_tail: tab.consoleTail,
    events: tab.events,
  }));
  out.expectations_met = met;
  out.unmet = met ? [] : unmet;
  out.stopped_by = stopRequested;
  out.exit_code = code;
  out.result = RESULT[code];
  out.elapsed_ms = elapsed();
  emit(out);
  process.exit(code);
}

main().catch((e) => {
  emit({ type: 'summary', exit_code: EXIT.browser_error, result: 'browser_error', error: String(e && (e.stack || e.message) || e) });
  process.exit(EXIT.browser_error);
});
