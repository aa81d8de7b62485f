// Chromium flags shared by the browser drivers (tests/clients/web/driver.mjs and
// tests/element-call/driver.mjs). The first group is what this machine needs for any headless
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
