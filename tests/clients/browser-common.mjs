// What the browser drivers (tests/clients/web/driver.mjs and tests/element-call/driver.mjs)
// share: Chromium's flags and the loopback file server for their pages.
import fs from 'node:fs';
import http from 'node:http';

// Chromium flags. The first group is what this machine needs for any headless
// Chromium (closed network: no background fetches, no QUIC); the second makes WebRTC work
// without devices or a user: fake camera (pattern) + mic (beep), no permission prompt,
// loopback ICE candidates (127.0.0.1), raw IPs rather than mDNS names, autoplay without a
// gesture; the last keeps every tab "foreground" (no timer/renderer throttling).
// playwright-core adds its own --user-data-dir (a fresh temp profile, removed on close).
export const CHROME_ARGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
  '--disable-dev-shm-usage',
  '--use-fake-device-for-media-stream', '--use-fake-ui-for-media-stream',
  '--allow-loopback-in-peer-connection',
  '--disable-features=WebRtcHideLocalIpsWithMdns',
  '--autoplay-policy=no-user-gesture-required',
  '--mute-audio',
  '--disable-background-timer-throttling', '--disable-renderer-backgrounding',
  '--disable-backgrounding-occluded-windows',
];

// Serves files over http://127.0.0.1:<free port> (a secure context for WebRTC). `resolve`
// maps a URL path to `{ file, type }` or null; anything else, or a missing file, is a 404.
// Resolves to the listening server.
export function serveLoopback(resolve) {
  const srv = http.createServer((req, res) => {
    let found = null;
    try {
      found = resolve(decodeURIComponent(new URL(req.url, 'http://x').pathname));
    } catch (e) { /* a malformed path: not found */ }
    if (!found || !fs.existsSync(found.file) || fs.statSync(found.file).isDirectory()) {
      res.writeHead(404, { 'content-type': 'text/plain' });
      res.end('not found');
      return;
    }
    res.writeHead(200, { 'content-type': found.type, 'cache-control': 'no-store' });
    fs.createReadStream(found.file).pipe(res);
  });
  return new Promise((ok, ko) => {
    srv.once('error', ko);
    srv.listen(0, '127.0.0.1', () => ok(srv));
  });
}
