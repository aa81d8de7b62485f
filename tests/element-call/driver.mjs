#!/usr/bin/env node
// Runs unmodified Element Call (npm @element-hq/element-call-embedded) in headless Chromium,
// one page per user, each inside the widget host of host/ (matrix-js-sdk logged in to the
// user's own Synapse + matrix-widget-api's ClientWidgetApi). Used by
// tests/integration/element_call.rs; runnable by hand for a demo.
//
// Deps: $CONCLAVE_EC_HOST (a dir holding node_modules/ installed from package-lock.json here,
// by scripts/install-test-deps), $CONCLAVE_CHROMIUM (Debian's chromium).
//
// Usage: node driver.mjs --config FILE.json
//   {
//     "timeout_s": 90,                 // to reach "in_call"; then each command has its own
//     "screenshot_dir": "/tmp/x",      // where <label>.png is written once media flows, and
//                                      // <label>.console.log (the page's whole console)
//     "matrix_rtc_mode": "matrix_2_0", // optional: Element Call's config.json matrix_rtc_mode
//     "pages": [ { "label": "alice", "hs": "http://127.0.0.1:8008", "token": "...",
//                  "user": "@alice:hs1", "device": "ABC", "room": "!r:hs2",
//                  "intent": "start_call" | "join_existing", "e2ee": false } ]   // 1 or 2
//   }
//
// stdout, one JSON object per line, each {"type":"event","event":NAME,...}:
//   {"event":"served","url":...}           the static server is up
//   {"event":"page","label",...}           a page's widget host reached a phase
//   {"event":"media","label",...}          this page plays remote video (videoWidth > 0, frames
//                                          advancing) and hears non-silent remote audio
//   {"event":"in_call","pages":{...}}      every page did; screenshots written
//   {"event":"ban_observed", ...}          answer to a watch_ban command (below)
//   {"event":"stats","pages":{...}}        answer to a stats command
//   {"event":"error","message",...}        then exit 1 (timeout, page error, Chromium failure)
// stdin, one JSON command per line:
//   {"cmd":"watch_ban","victim":"alice","observer":"bob","timeout_s":10}
//       from now, waits until the observer's page stops receiving the victim's media (no
//       remote video frame and no remote audio energy for `quiet_ms`) and the victim's
//       host saw the ban and Element Call left its call view; reports the times, measured
//       from the command.
//   {"cmd":"stats"}   {"cmd":"quit"}
// stdin EOF (the test went away) closes Chromium and exits.
import { createRequire } from 'node:module';
import fs from 'node:fs';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';
import { CHROME_ARGS, serveLoopback } from '../clients/browser-common.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const depsDir = path.resolve(process.env.CONCLAVE_EC_HOST || here);
const require = createRequire(path.join(depsDir, 'package.json'));

const emit = (o) => process.stdout.write(JSON.stringify({ type: 'event', ...o }) + '\n');
const log = (...a) => console.error('[ec-driver]', ...a);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));


function parseConfig() {
  const i = process.argv.indexOf('--config');
  if (i < 0 || !process.argv[i + 1]) {
    console.error('usage: node driver.mjs --config FILE.json');
    process.exit(64);
  }
  const c = JSON.parse(fs.readFileSync(process.argv[i + 1], 'utf8'));
  if (!Array.isArray(c.pages) || c.pages.length < 1 || c.pages.length > 2) {
    console.error('config: pages must have 1 or 2 entries');
    process.exit(64);
  }
  c.timeout_s ??= 90;
  return c;
}

// Bundles host/host.js (matrix-js-sdk + matrix-widget-api) as ESM; the Rust crypto's wasm is
// fetched relative to the bundle (./pkg/...), so it is served from there.
async function bundleHost(outDir) {
  const esbuild = require('esbuild');
  await esbuild.build({
    entryPoints: [path.join(here, 'host', 'host.js')],
    bundle: true,
    format: 'esm',
    platform: 'browser',
    target: 'chrome120',
    outfile: path.join(outDir, 'host.js'),
    nodePaths: [path.join(depsDir, 'node_modules')],
    define: { global: 'globalThis' },
    logLevel: 'error',
  });
}

const TYPES = {
  '.html': 'text/html; charset=utf-8', '.js': 'text/javascript; charset=utf-8',
  '.mjs': 'text/javascript; charset=utf-8', '.css': 'text/css', '.json': 'application/json',
  '.wasm': 'application/wasm', '.svg': 'image/svg+xml', '.png': 'image/png',
  '.woff': 'font/woff', '.woff2': 'font/woff2', '.mp3': 'audio/mpeg', '.ogg': 'audio/ogg',
  '.tflite': 'application/octet-stream', '.map': 'application/json',
};

// Element Call's config.json, with `matrix_rtc_mode` set when the config asks for one
// ("compatibility" | "matrix_2_0"; Element Call's default is compatibility).
function writeEcConfig(bundleDir, ecDist, mode) {
  const ecConfig = JSON.parse(fs.readFileSync(path.join(ecDist, 'config.json'), 'utf8'));
  if (mode) ecConfig.matrix_rtc_mode = mode;
  fs.writeFileSync(path.join(bundleDir, 'config.json'), JSON.stringify(ecConfig));
}

function serve(bundleDir, mode) {
  const ecDist = path.join(depsDir, 'node_modules', '@element-hq', 'element-call-embedded', 'dist');
  // (The package's exports hide package.json; its wasm sits at a fixed place.)
  const wasm = path.join(depsDir, 'node_modules', '@matrix-org', 'matrix-sdk-crypto-wasm', 'pkg',
    'matrix_sdk_crypto_wasm_bg.wasm');
  writeEcConfig(bundleDir, ecDist, mode);
  const resolve = (p) => {
    if (p === '/ec/config.json') return path.join(bundleDir, 'config.json');
    if (p === '/host/' || p === '/host/index.html') return path.join(here, 'host', 'index.html');
    if (p === '/host/host.js') return path.join(bundleDir, 'host.js');
    if (p === '/host/pkg/matrix_sdk_crypto_wasm_bg.wasm') return wasm;
    if (p.startsWith('/ec/')) {
      const rel = p.slice(4) || 'index.html';
      const f = path.normalize(path.join(ecDist, rel));
      return f.startsWith(ecDist) ? f : null;
    }
    return null;
  };
  return serveLoopback((p) => {
    const file = resolve(p);
    return file ? { file, type: TYPES[path.extname(file)] || 'application/octet-stream' } : null;
  });
}

const INIT_SCRIPT = `(() => {
  const Orig = window.RTCPeerConnection;
  if (!Orig || window.__conclavePcs) return;
  window.__conclavePcs = [];
  // Ids of the camera/microphone tracks this page captured (the rest are received).
  window.__conclaveLocalTracks = new Set();
  const md = navigator.mediaDevices;
  if (md && md.getUserMedia) {
    const gum = md.getUserMedia.bind(md);
    md.getUserMedia = async (c) => {
      const s = await gum(c);
      s.getTracks().forEach((t) => window.__conclaveLocalTracks.add(t.id));
      return s;
    };
  }
  const Wrapped = function (...args) {
    const pc = new Orig(...args);
    window.__conclavePcs.push(pc);
    return pc;
  };
  Wrapped.prototype = Orig.prototype;
  Object.setPrototypeOf(Wrapped, Orig);
  window.RTCPeerConnection = Wrapped;
})();`;

// Evaluated in the Element Call frame: the media it renders and the text it shows.
async function frameSample() {
  const videos = [...document.querySelectorAll('video')].map((v) => {
    const t = v.srcObject && v.srcObject.getVideoTracks ? v.srcObject.getVideoTracks()[0] : null;
    const q = v.getVideoPlaybackQuality ? v.getVideoPlaybackQuality() : null;
    const locals = window.__conclaveLocalTracks || new Set();
    return {
      // Captured here (or a clone of the fake camera, which keeps its label) vs received.
      local: !!t && (locals.has(t.id) || /^fake/i.test(t.label)),
      label: t ? t.label : null,
      has_track: !!t,
      track_state: t ? t.readyState : null,
      width: v.videoWidth,
      height: v.videoHeight,
      frames: q ? q.totalVideoFrames : 0,
    };
  });
  let audioEnergy = 0;
  let audioLevel = 0;
  let audioPackets = 0;
  let audioPacketsSent = 0;
  const audioCodecs = new Set();
  let videoFramesDecoded = 0;
  // Where this page's media goes: the remote address of each connection's selected pair.
  const mediaRemotes = new Set();
  for (const pc of window.__conclavePcs || []) {
    if (pc.connectionState === 'closed') continue;
    try {
      const stats = await pc.getStats();
      stats.forEach((s) => {
        if (s.type === 'transport' && s.selectedCandidatePairId) {
          const pair = stats.get(s.selectedCandidatePairId);
          const remote = pair && stats.get(pair.remoteCandidateId);
          if (remote) mediaRemotes.add(`${remote.address}:${remote.port}`);
        }
        if (s.type === 'outbound-rtp' && s.kind === 'audio') {
          audioPacketsSent += s.packetsSent || 0;
          const c = s.codecId && stats.get(s.codecId);
          if (c) audioCodecs.add(`sent ${c.mimeType}`);
        }
        if (s.type !== 'inbound-rtp') return;
        if (s.kind === 'audio') {
          const c = s.codecId && stats.get(s.codecId);
          if (c) audioCodecs.add(`received ${c.mimeType}`);
          audioEnergy += s.totalAudioEnergy || 0;
          audioLevel = Math.max(audioLevel, s.audioLevel || 0);
          audioPackets += s.packetsReceived || 0;
        } else if (s.kind === 'video') {
          videoFramesDecoded += s.framesDecoded || 0;
        }
      });
    } catch (e) { /* a closing connection */ }
  }
  return {
    videos,
    audio_energy: audioEnergy,
    audio_level: audioLevel,
    audio_packets: audioPackets,
    audio_packets_sent: audioPacketsSent,
    audio_codecs: [...audioCodecs],
    video_frames_decoded: videoFramesDecoded,
    media_remotes: [...mediaRemotes],
    text: (document.body ? document.body.innerText : '').slice(0, 1500),
  };
}

class Page {
  constructor(spec, page) {
    this.spec = spec;
    this.page = page;
    this.label = spec.label;
    this.console = [];
    this.prev = null;
    this.last = null;
    this.lastVideoAdvance = 0;
    this.lastAudioAdvance = 0;
  }

  frame() {
    return this.page.frames().find((f) => f.url().includes('/ec/'));
  }

  async host() {
    return this.page.evaluate(() => window.conclaveHost || null).catch(() => null);
  }

  // One sample of what the page receives, with "advancing" computed against the previous one.
  async sample() {
    const f = this.frame();
    if (!f) return null;
    let s;
    try { s = await f.evaluate(frameSample); } catch (e) { return null; }
    const now = Date.now();
    const remote = s.videos.filter((v) => v.has_track && !v.local);
    s.remote_videos = remote.length;
    s.remote_video_frames = remote.reduce((a, v) => a + (v.width > 0 ? v.frames : 0), 0);
    s.remote_video_width = Math.max(0, ...remote.map((v) => v.width));
    s.remote_video_height = Math.max(0, ...remote.map((v) => v.height));
    const p = this.prev;
    s.video_advancing = !!p && s.remote_video_frames > p.remote_video_frames;
    s.audio_advancing = !!p && s.audio_energy > p.audio_energy + 1e-6;
    if (s.video_advancing) this.lastVideoAdvance = now;
    if (s.audio_advancing) this.lastAudioAdvance = now;
    this.prev = s;
    this.last = s;
    return s;
  }

  mediaOk(s) {
    return !!s && s.remote_video_width > 0 && s.video_advancing && s.audio_level > 0.001
      && s.audio_advancing;
  }

  summary() {
    const s = this.last || {};
    return {
      remote_videos: s.remote_videos ?? 0,
      remote_video_width: s.remote_video_width ?? 0,
      remote_video_height: s.remote_video_height ?? 0,
      remote_video_frames: s.remote_video_frames ?? 0,
      audio_level: s.audio_level ?? 0,
      audio_energy: s.audio_energy ?? 0,
      audio_packets: s.audio_packets ?? 0,
      audio_packets_sent: s.audio_packets_sent ?? 0,
      audio_codecs: s.audio_codecs ?? [],
      local_videos: (s.videos || []).filter((v) => v.local).length,
      media_remotes: s.media_remotes ?? [],
      text: s.text ?? '',
    };
  }
}

async function main() {
  const cfg = parseConfig();
  const started = Date.now();
  const bundleDir = fs.mkdtempSync(path.join(process.env.TMPDIR || '/tmp', 'conclave-ec-host-'));
  await bundleHost(bundleDir);
  const srv = await serve(bundleDir, cfg.matrix_rtc_mode);
  const base = `http://127.0.0.1:${srv.address().port}`;
  emit({ event: 'served', url: base });

  const { chromium } = require('playwright-core');
  const exe = process.env.CONCLAVE_CHROMIUM;
  if (!exe) throw new Error('CONCLAVE_CHROMIUM is not set (eval "$(scripts/install-test-deps)")');
  const browser = await chromium.launch({ executablePath: exe, args: CHROME_ARGS, headless: true });
  const pages = [];
  let closing = false;
  const shutdown = async (code) => {
    if (closing) return;
    closing = true;
    await browser.close().catch(() => {});
    srv.close();
    fs.rmSync(bundleDir, { recursive: true, force: true });
    process.exit(code);
  };
  const fatal = async (message, extra = {}) => {
    const detail = {};
    for (const p of pages) {
      detail[p.label] = { host: await p.host(), media: p.summary(), console_tail: p.console.slice(-40) };
    }
    emit({ event: 'error', message, elapsed_ms: Date.now() - started, pages: detail, ...extra });
    await shutdown(1);
  };

  // Every page's Matrix client comes online first (device keys published, and known to the
  // other pages' clients when E2EE is on); then Element Call starts, page by page.
  for (const spec of cfg.pages) {
    const ctx = await browser.newContext({ viewport: { width: 1280, height: 720 } });
    await ctx.addInitScript(INIT_SCRIPT);
    const page = await ctx.newPage();
    const p = new Page(spec, page);
    // The whole console goes to <screenshot_dir>/<label>.console.log for diagnosis; the
    // last lines also go into an error event.
    let consoleLog = null;
    if (cfg.screenshot_dir) {
      fs.mkdirSync(cfg.screenshot_dir, { recursive: true });
      consoleLog = fs.createWriteStream(path.join(cfg.screenshot_dir, `${spec.label}.console.log`));
    }
    const record = (line) => {
      if (consoleLog) consoleLog.write(`${new Date().toISOString()} ${line}\n`);
      p.console.push(line.slice(0, 500));
      if (p.console.length > 400) p.console.splice(0, 100);
    };
    page.on('console', (m) => record(`${m.type()}: ${m.text()}`));
    page.on('pageerror', (e) => record(`pageerror: ${e.message}`));
    const q = new URLSearchParams({
      hs: spec.hs, token: spec.token, user: spec.user, device: spec.device, room: spec.room,
      ec: `${base}/ec/index.html`, e2ee: spec.e2ee ? '1' : '0', intent: spec.intent || 'start_call',
      hold: '1',
    });
    await page.goto(`${base}/host/index.html?${q}`);
    pages.push(p);
  }
  const online = Date.now() + 30_000;
  for (const p of pages) {
    for (;;) {
      const h = await p.host();
      if (h && h.errors.length) return fatal(`${p.label}: widget host failed: ${h.errors[0]}`);
      if (h && h.phase === 'held') break;
      if (Date.now() > online) return fatal(`${p.label}: the Matrix client did not come online within 30 s (widget host phase ${h && h.phase})`);
      await sleep(200);
    }
  }
  for (const p of pages.filter((x) => x.spec.e2ee)) {
    for (const other of pages.filter((x) => x !== p)) {
      for (;;) {
        const known = await p.page.evaluate(
          ([u, d]) => window.conclaveKnowsDevice(u, d), [other.spec.user, other.spec.device]);
        if (known) break;
        if (Date.now() > online) return fatal(`${p.label}: does not know ${other.label}'s device within 30 s`);
        await sleep(250);
      }
    }
  }
  for (const [i, p] of pages.entries()) {
    await p.page.evaluate(() => window.conclaveStart());
    // The first page starts the call; give its membership a head start so the second joins it.
    if (i + 1 < pages.length) {
      const until = Date.now() + 30_000;
      for (;;) {
        const h = await p.host();
        if (h && h.errors.length) return fatal(`${p.label}: widget host failed: ${h.errors[0]}`);
        if (h && (h.openIdTokens > 0)) break;
        if (Date.now() > until) return fatal(`${p.label}: Element Call did not ask for an OpenID token within 30 s (widget host phase ${h && h.phase})`);
        await sleep(200);
      }
    }
  }

  // Until every page plays the other's media.
  const deadline = started + cfg.timeout_s * 1000;
  const ok = new Set();
  const reported = new Map();
  while (ok.size < pages.length) {
    if (Date.now() > deadline) {
      const missing = pages.filter((p) => !ok.has(p.label)).map((p) => p.label);
      return fatal(`no two-way media within ${cfg.timeout_s} s: ${missing.join(', ')} did not play remote video and audio`);
    }
    for (const p of pages) {
      const h = await p.host();
      if (h && h.errors.length) return fatal(`${p.label}: widget host failed: ${h.errors[0]}`);
      if (h && reported.get(p.label) !== h.phase) {
        reported.set(p.label, h.phase);
        emit({ event: 'page', label: p.label, phase: h.phase });
      }
      if (ok.has(p.label)) { await p.sample(); continue; }
      const s = await p.sample();
      if (p.mediaOk(s)) {
        ok.add(p.label);
        emit({ event: 'media', label: p.label, elapsed_ms: Date.now() - started, ...p.summary() });
      }
    }
    await sleep(250);
  }
  // A little more media for the screenshots, then one of each page.
  await sleep(1500);
  const summary = {};
  for (const p of pages) {
    await p.sample();
    if (cfg.screenshot_dir) {
      fs.mkdirSync(cfg.screenshot_dir, { recursive: true });
      await p.page.screenshot({ path: path.join(cfg.screenshot_dir, `${p.label}.png`) });
    }
    summary[p.label] = { ...p.summary(), host: await p.host() };
  }
  emit({ event: 'in_call', elapsed_ms: Date.now() - started, pages: summary });

  const byLabel = (l) => pages.find((p) => p.label === l);
  const rl = readline.createInterface({ input: process.stdin });
  rl.on('close', () => shutdown(0));
  for await (const line of rl) {
    let cmd;
    try { cmd = JSON.parse(line); } catch (e) { return fatal(`bad command: ${line}`); }
    if (cmd.cmd === 'quit') return shutdown(0);
    if (cmd.cmd === 'stats') {
      const out = {};
      for (const p of pages) { await p.sample(); out[p.label] = { ...p.summary(), host: await p.host() }; }
      emit({ event: 'stats', pages: out });
    } else if (cmd.cmd === 'watch_ban') {
      const victim = byLabel(cmd.victim);
      const observer = byLabel(cmd.observer);
      if (!victim || !observer) return fatal(`watch_ban: unknown page ${cmd.victim} / ${cmd.observer}`);
      const t0 = Date.now();
      const quiet = cmd.quiet_ms ?? 700;
      const limit = t0 + (cmd.timeout_s ?? 10) * 1000;
      let mediaStopped = null;
      let victimLeft = null;
      while (Date.now() < limit && (mediaStopped === null || victimLeft === null)) {
        const s = await observer.sample();
        const now = Date.now();
        const lastMedia = Math.max(observer.lastVideoAdvance, observer.lastAudioAdvance);
        if (mediaStopped === null && s && now - lastMedia >= quiet) {
          mediaStopped = Math.max(0, lastMedia - t0);
        }
        // Left: the victim's host saw the ban (and hung the call up, as Element Web does) and
        // Element Call no longer shows its call view (no "End call" control).
        const v = await victim.sample();
        const vh = await victim.host();
        if (victimLeft === null && vh && vh.myMembership === 'ban'
            && v && !/End call/.test(v.text)) {
          victimLeft = now - t0;
        }
        await sleep(100);
      }
      emit({
        event: 'ban_observed',
        media_stopped_ms: mediaStopped,
        victim_left_ms: victimLeft,
        observer: observer.summary(),
        victim: victim.summary(),
        victim_host: await victim.host(),
        victim_console_tail: victim.console.slice(-30),
      });
    } else {
      return fatal(`unknown command ${line}`);
    }
  }
}

main().catch((e) => {
  emit({ event: 'error', message: `driver: ${e && e.stack ? e.stack : e}` });
  process.exit(1);
});
