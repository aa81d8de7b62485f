#!/usr/bin/env node
// A publishing LiveKit participant on @livekit/rtc-node (the Node binding of the
// LiveKit Rust client core), for Conclave's integration tests.
//
// It connects with a ready JWT, publishes a synthetic audio track (440 Hz sine,
// 48 kHz mono, 10 ms frames through AudioSource/AudioFrame) and a synthetic video
// track (moving bar, RGBA through VideoSource/VideoFrame) for --duration seconds,
// then leaves.
//
//   CONCLAVE_NODE_CLIENTS=<dir with node_modules> node tests/clients/node/publish.mjs \
//       --url ws://127.0.0.1:PORT --token JWT [--duration 10] [--label bob] \
//       [--no-audio] [--no-video] [--single-pc|--dual-pc] [--timeout 20] \
//       [--width 320 --height 240 --fps 15]
//
// @livekit/rtc-node is looked up in $CONCLAVE_NODE_CLIENTS (or $LK_NODE_DEPS), else
// next to this file (set up by scripts/install-test-deps).
//
// stdout: JSON lines. Ours carry "type": "event" (connected, published, ...) and the
// last one "type": "summary" with "event": "done". The SDK also logs pino JSON to
// stdout (less with NODE_ENV=production); those lines have no "type".
//
// Exit codes: 0 ok, 2 connect failed (error or --timeout), 3 publish failed,
// 4 disconnected by the server before --duration ended, 64 usage error.
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

const EXIT_OK = 0;
const EXIT_CONNECT_FAILED = 2;
const EXIT_PUBLISH_FAILED = 3;
const EXIT_DISCONNECTED = 4;
const EXIT_USAGE = 64;
const RESULTS = {
  [EXIT_OK]: 'ok',
  [EXIT_CONNECT_FAILED]: 'connect_failed',
  [EXIT_PUBLISH_FAILED]: 'publish_failed',
  [EXIT_DISCONNECTED]: 'disconnected',
};
const SAMPLE_RATE = 48000;
const SAMPLES_PER_FRAME = 480; // 10 ms

const t0 = Date.now();
const nowMs = () => Date.now() - t0;

let args;
try {
  ({ values: args } = parseArgs({
    options: {
      url: { type: 'string' },
      token: { type: 'string' },
      label: { type: 'string', default: `node-${process.pid}` },
      duration: { type: 'string', default: '10' },
      timeout: { type: 'string', default: '20' },
      'no-audio': { type: 'boolean', default: false },
      'no-video': { type: 'boolean', default: false },
      'single-pc': { type: 'boolean', default: false },
      'dual-pc': { type: 'boolean', default: false },
      width: { type: 'string', default: '320' },
      height: { type: 'string', default: '240' },
      fps: { type: 'string', default: '15' },
    },
    strict: true,
  }));
  if (!args.url || !args.token) throw new Error('--url and --token are required');
  if (args['single-pc'] && args['dual-pc']) throw new Error('--single-pc and --dual-pc exclude each other');
} catch (e) {
  process.stderr.write(`publish.mjs: ${e.message}\n`);
  process.exit(EXIT_USAGE);
}
const duration = Number(args.duration);
const timeout = Number(args.timeout);
const width = Number(args.width);
const height = Number(args.height);
const fps = Number(args.fps);

const here = path.dirname(fileURLToPath(import.meta.url));
const depsDir = process.env.CONCLAVE_NODE_CLIENTS || process.env.LK_NODE_DEPS || here;
const require = createRequire(path.join(path.resolve(depsDir), 'package.json'));
let lk;
try {
  lk = require('@livekit/rtc-node');
} catch (e) {
  process.stderr.write(
    `publish.mjs: cannot load @livekit/rtc-node from ${depsDir}: ${e.message}\n` +
      'Run eval "$(scripts/install-test-deps)" and set CONCLAVE_NODE_CLIENTS.\n',
  );
  process.exit(EXIT_USAGE);
}

const summary = {
  type: 'summary',
  event: 'done',
  label: args.label,
  url: args.url,
  sdk: 'node-rtc',
  connected: false,
  room: null,
  local_identity: null,
  local_sid: null,
  published: [],
  audio_frames_sent: 0,
  video_frames_sent: 0,
  disconnect_reason: null,
  error: null,
};

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}
function event(name, fields = {}) {
  emit({ type: 'event', label: args.label, event: name, t_ms: nowMs(), ...fields });
}
const sleep = (ms) => new Promise((r) => setTimeout(r, Math.max(0, ms)));

let stopped = false;
let disconnectedByServer = false;
let leaveRequested = false;
for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => { leaveRequested = true; });

async function audioLoop(source) {
  let n = 0;
  let next = Date.now();
  const pcm = new Int16Array(SAMPLES_PER_FRAME);
  while (!stopped) {
    for (let i = 0; i < SAMPLES_PER_FRAME; i++) {
      pcm[i] = Math.round(0.3 * 32767 * Math.sin((2 * Math.PI * 440 * (n + i)) / SAMPLE_RATE));
    }
    n += SAMPLES_PER_FRAME;
    await source.captureFrame(new lk.AudioFrame(pcm.slice(), SAMPLE_RATE, 1, SAMPLES_PER_FRAME));
    summary.audio_frames_sent++;
    next += (SAMPLES_PER_FRAME / SAMPLE_RATE) * 1000;
    await sleep(next - Date.now());
  }
}

async function videoLoop(source) {
  const base = new Uint8Array(width * height * 4);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const o = (y * width + x) * 4;
      base[o + 2] = Math.floor((x * 255) / Math.max(1, width - 1)); // blue gradient
      base[o + 3] = 255;
    }
  }
  let i = 0;
  let next = Date.now();
  while (!stopped) {
    const img = base.slice();
    const bar = (i * 8) % width;
    for (let y = 0; y < height; y++) {
      for (let x = bar; x < Math.min(width, bar + 16); x++) {
        const o = (y * width + x) * 4;
        img[o] = 255; // yellow bar
        img[o + 1] = 255;
      }
    }
    source.captureFrame(
      new lk.VideoFrame(img, width, height, lk.VideoBufferType.RGBA),
      BigInt(Math.round((i * 1_000_000) / fps)),
    );
    summary.video_frames_sent++;
    i++;
    next += 1000 / fps;
    await sleep(next - Date.now());
  }
}

async function main() {
  const room = new lk.Room();
  room.on(lk.RoomEvent.Disconnected, (reason) => {
    const name = lk.DisconnectReason?.[reason] ?? String(reason);
    if (stopped) {
      event('disconnected', { reason: name, own: true }); // our own leave at the end
      return;
    }
    if (summary.disconnect_reason === null) summary.disconnect_reason = name;
    disconnectedByServer = true;
    event('disconnected', { reason: name });
  });
  room.on(lk.RoomEvent.ParticipantConnected, (p) => event('participant_connected', { identity: p.identity }));

  const opts = { autoSubscribe: false, dynacast: false };
  if (args['single-pc']) opts.singlePeerConnection = true;
  if (args['dual-pc']) opts.singlePeerConnection = false;

  event('connecting', { url: args.url });
  let timer;
  try {
    await Promise.race([
      room.connect(args.url, args.token, opts),
      new Promise((_, reject) => {
        timer = setTimeout(() => reject(new Error('timed out')), timeout * 1000);
      }),
    ]);
  } catch (e) {
    summary.error = String(e?.message ?? e);
    event('connect_failed', { error: summary.error });
    return EXIT_CONNECT_FAILED;
  } finally {
    clearTimeout(timer);
  }
  const lp = room.localParticipant;
  Object.assign(summary, { connected: true, room: room.name, local_identity: lp.identity, local_sid: lp.sid });
  event('connected', { room: room.name, identity: lp.identity, sid: lp.sid });

  const loops = [];
  let code = EXIT_OK;
  try {
    if (!args['no-audio']) {
      const source = new lk.AudioSource(SAMPLE_RATE, 1);
      const track = lk.LocalAudioTrack.createAudioTrack('sine', source);
      const pub = await lp.publishTrack(track, new lk.TrackPublishOptions({ source: lk.TrackSource.SOURCE_MICROPHONE }));
      loops.push(audioLoop(source));
      summary.published.push('audio');
      event('published', { kind: 'audio', sid: pub.sid });
    }
    if (!args['no-video']) {
      const source = new lk.VideoSource(width, height);
      const track = lk.LocalVideoTrack.createVideoTrack('bars', source);
      const pub = await lp.publishTrack(track, new lk.TrackPublishOptions({ source: lk.TrackSource.SOURCE_CAMERA }));
      loops.push(videoLoop(source));
      summary.published.push('video');
      event('published', { kind: 'video', sid: pub.sid });
    }
    const end = Date.now() + duration * 1000;
    while (Date.now() < end && !disconnectedByServer && !leaveRequested) await sleep(50);
    if (disconnectedByServer) code = EXIT_DISCONNECTED;
  } catch (e) {
    summary.error = String(e?.message ?? e);
    event('publish_failed', { error: summary.error });
    code = EXIT_PUBLISH_FAILED;
  } finally {
    stopped = true;
    await Promise.allSettled(loops);
    await Promise.race([room.disconnect().catch(() => {}), sleep(5000)]);
  }
  return code;
}

const code = await main();
summary.exit_code = code;
summary.result = RESULTS[code];
summary.elapsed_ms = nowMs();
emit(summary);
await Promise.race([lk.dispose?.(), sleep(2000)]);
process.exit(code);
