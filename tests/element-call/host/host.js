// A minimal Matrix widget host for Element Call: what Element Web does for its embedded
// Element Call, reduced to one room and one widget.
//
// - A real Matrix client (matrix-js-sdk, Rust crypto in memory) logs in with the access
//   token the page is given and syncs with the user's own homeserver.
// - Element Call (npm @element-hq/element-call-embedded, unmodified, served beside this page)
//   runs in an iframe with the widget URL parameters it documents.
// - matrix-widget-api's ClientWidgetApi answers the widget; the WidgetDriver below backs each
//   request with the Matrix client: room state read/send (call.member), delayed events
//   (MSC4140 leave), to-device messages (Olm-encrypted when the widget asks: per-participant
//   E2EE keys), OpenID tokens (for /sfu/get) and the homeserver's RTC transports (MSC4143).
//
// Page URL parameters: hs (client-server base URL), token, user, device, room, ec (Element
// Call index.html URL), e2ee (1 = perParticipantE2EE), intent (start_call | join_existing),
// hold (1 = start Element Call only when window.conclaveStart() is called).
// window.conclaveHost exposes progress and errors to driver.mjs.

import * as sdk from 'matrix-js-sdk';
import {
  ClientWidgetApi,
  Widget,
  WidgetDriver,
  OpenIDRequestState,
  WidgetApiFromWidgetAction,
} from 'matrix-widget-api';

const params = new URLSearchParams(location.search);
const need = (k) => {
  const v = params.get(k);
  if (!v) throw new Error(`host page: missing URL parameter ${k}`);
  return v;
};

const state = {
  phase: 'starting',
  errors: [],
  widgetActions: [],
  toDeviceSent: 0,
  toDeviceSentEncrypted: 0,
  toDeviceReceived: 0,
  openIdTokens: 0,
  transports: null,
  capabilities: [],
  myMembership: null,
  hangupSent: null,
  hangupAcked: null,
};
window.conclaveHost = state;
const fail = (where, e) => {
  const msg = `${where}: ${e && e.stack ? e.stack : e}`;
  state.errors.push(msg);
  console.error(msg);
};

const HS = need('hs');
const USER = need('user');
const DEVICE = need('device');
const ROOM = need('room');
const TOKEN = need('token');
const EC = need('ec');

class Driver extends WidgetDriver {
  constructor(client) {
    super();
    this.client = client;
  }

  // This host trusts the one widget it embeds: every requested capability is granted.
  async validateCapabilities(requested) {
    state.capabilities = [...requested];
    return requested;
  }

  async sendEvent(eventType, content, stateKey, roomId) {
    const room = roomId ?? ROOM;
    const r =
      stateKey !== null && stateKey !== undefined
        ? await this.client.sendStateEvent(room, eventType, content, stateKey)
        : await this.client.sendEvent(room, eventType, content);
    return { roomId: room, eventId: r.event_id };
  }

  async sendStickyEvent(stickyDurationMs, eventType, content, roomId) {
    const room = roomId ?? ROOM;
    const r = await this.client._unstable_sendStickyEvent(
      room, stickyDurationMs, null, eventType, content);
    return { roomId: room, eventId: r.event_id };
  }

  async sendDelayedEvent(delay, eventType, content, stateKey, roomId) {
    const room = roomId ?? ROOM;
    const r =
      stateKey !== null && stateKey !== undefined
        ? await this.client._unstable_sendDelayedStateEvent(
          room, { delay }, eventType, content, stateKey)
        : await this.client._unstable_sendDelayedEvent(
          room, { delay }, null, eventType, content);
    return { roomId: room, delayId: r.delay_id };
  }

  async sendDelayedStickyEvent(delay, stickyDurationMs, eventType, content, roomId) {
    const room = roomId ?? ROOM;
    const r = await this.client._unstable_sendStickyDelayedEvent(
      room, stickyDurationMs, { delay }, null, eventType, content);
    return { roomId: room, delayId: r.delay_id };
  }

  async cancelScheduledDelayedEvent(delayId) {
    await this.client._unstable_cancelScheduledDelayedEvent(delayId);
  }

  async restartScheduledDelayedEvent(delayId) {
    await this.client._unstable_restartScheduledDelayedEvent(delayId);
  }

  async sendScheduledDelayedEvent(delayId) {
    await this.client._unstable_sendScheduledDelayedEvent(delayId);
  }

  // Encrypted to-device messages (Element Call's E2EE keys) are Olm-encrypted here, as
  // Element Web does: one encryption per distinct payload, for all its recipients.
  async sendToDevice(eventType, encrypted, contentMap) {
    if (!encrypted) {
      const map = new Map(Object.entries(contentMap).map(
        ([userId, devices]) => [userId, new Map(Object.entries(devices))]));
      await this.client.sendToDevice(eventType, map);
      state.toDeviceSent += 1;
      return;
    }
    const crypto = this.client.getCrypto();
    if (!crypto) throw new Error('encrypted to-device requested but crypto is not initialised');
    const byPayload = new Map();
    for (const [userId, devices] of Object.entries(contentMap)) {
      for (const [deviceId, content] of Object.entries(devices)) {
        const key = JSON.stringify(content);
        if (!byPayload.has(key)) byPayload.set(key, []);
        byPayload.get(key).push({ userId, deviceId });
      }
    }
    for (const [payload, recipients] of byPayload) {
      const batch = await crypto.encryptToDeviceMessages(eventType, recipients, JSON.parse(payload));
      await this.client.queueToDevice(batch);
    }
    state.toDeviceSentEncrypted += 1;
  }

  room(roomId) {
    return this.client.getRoom(roomId);
  }

  async readRoomState(roomId, eventType, stateKey) {
    const room = this.room(roomId);
    if (!room) return [];
    const st = room.getLiveTimeline().getState(sdk.EventTimeline.FORWARDS);
    if (!st) return [];
    if (stateKey === undefined) return st.getStateEvents(eventType).map((e) => e.getEffectiveEvent());
    const ev = st.getStateEvents(eventType, stateKey);
    return ev ? [ev.getEffectiveEvent()] : [];
  }

  async readRoomTimeline(roomId, eventType, msgtype, stateKey, limit, since) {
    const room = this.room(roomId);
    if (!room) return [];
    const out = [];
    const events = room.getLiveTimeline().getEvents();
    for (let i = events.length - 1; i >= 0 && out.length < limit; i--) {
      const ev = events[i];
      if (since !== undefined && ev.getId() === since) break;
      if (ev.getType() !== eventType) continue;
      if (stateKey !== undefined && ev.getStateKey() !== stateKey) continue;
      if (msgtype !== undefined && ev.getContent().msgtype !== msgtype) continue;
      out.push(ev.getEffectiveEvent());
    }
    return out;
  }

  async readStickyEvents(roomId) {
    // The widget gets the room state first: a sticky (timeline) event fed before it makes
    // matrix-js-sdk's widget client apply the state after recalculating the room, so Element
    // Call would never see its own user joined ("Room not found").
    await this.api?.flushRoomStateTask?.catch(() => {});
    const room = this.room(roomId);
    if (!room || typeof room._unstable_getStickyEvents !== 'function') return [];
    return [...room._unstable_getStickyEvents()].map((e) => e.getEffectiveEvent());
  }

  askOpenID(observer) {
    this.client.getOpenIdToken().then(
      (token) => {
        state.openIdTokens += 1;
        observer.update({ state: OpenIDRequestState.Allowed, token });
      },
      (e) => {
        fail('getOpenIdToken', e);
        observer.update({ state: OpenIDRequestState.Blocked });
      });
  }

  // MSC4143 discovery: the homeserver's configured transports (Synapse matrix_rtc.transports).
  async getRtcTransports() {
    const transports = await this.client._unstable_getRTCTransports();
    state.transports = transports;
    return { rtc_transports: transports };
  }

  async *getTurnServers() {
    // Loopback only: no TURN.
  }

  getKnownRooms() {
    return [ROOM];
  }

  async navigate() {
    throw new Error('navigation is not supported by this host');
  }
}

async function main() {
  state.phase = 'login';
  const client = sdk.createClient({
    baseUrl: HS,
    accessToken: TOKEN,
    userId: USER,
    deviceId: DEVICE,
    timelineSupport: true,
  });
  window.matrixClient = client;
  // In memory: every page load is a fresh device (the test logs in anew for each run).
  await client.initRustCrypto({ useIndexedDB: false });
  state.phase = 'sync';
  const prepared = new Promise((resolve, reject) => {
    client.on(sdk.ClientEvent.Sync, (s, _prev, data) => {
      if (s === 'PREPARED' || s === 'SYNCING') resolve();
      if (s === 'ERROR') reject(new Error(`sync error: ${data?.error}`));
    });
  });
  await client.startClient({ initialSyncLimit: 20, lazyLoadMembers: false });
  await prepared;
  if (!client.getRoom(ROOM)) throw new Error(`${USER} is not in ${ROOM} after the first sync`);

  // Whether this client knows (and would encrypt for) a device of another user.
  window.conclaveKnowsDevice = async (userId, deviceId) => {
    const devices = await client.getCrypto()?.getUserDeviceInfo([userId], true);
    return Boolean(devices?.get(userId)?.has(deviceId));
  };
  // hold=1: the client runs (its device keys are published) but Element Call waits for
  // window.conclaveStart(): every user is online before the call starts, so the first
  // encrypted events (matrix_2_0 memberships) are encrypted for every device.
  if (params.get('hold') === '1') {
    state.phase = 'held';
    await new Promise((resolve) => { window.conclaveStart = resolve; });
  }

  state.phase = 'widget';
  const parentUrl = location.origin + location.pathname;
  const widgetParams = new URLSearchParams({
    widgetId: 'conclave-element-call',
    parentUrl,
    roomId: ROOM,
    userId: USER,
    deviceId: DEVICE,
    baseUrl: HS,
    intent: params.get('intent') || 'start_call',
    skipLobby: 'true',
    confineToRoom: 'true',
    hideHeader: 'true',
    preload: 'false',
    perParticipantE2EE: params.get('e2ee') === '1' ? 'true' : 'false',
    lang: 'en',
    theme: 'dark',
  });
  const url = `${EC}#?${widgetParams}`;
  const widget = new Widget({
    id: 'conclave-element-call',
    creatorUserId: USER,
    type: 'm.custom',
    url,
    waitForIframeLoad: false,
  });
  const iframe = document.createElement('iframe');
  iframe.id = 'element-call';
  iframe.allow = 'camera; microphone; display-capture; autoplay; clipboard-write';
  iframe.src = url;
  // ClientWidgetApi talks to the iframe's window: it must be in the document first (the
  // widget's first message comes after its scripts load, long after this tick).
  document.body.appendChild(iframe);
  const driver = new Driver(client);
  const api = new ClientWidgetApi(widget, iframe, driver);
  driver.api = api;
  window.widgetApi = api;
  // Element Call's own actions (device mute, always-on-screen, hang-up, close): acknowledge
  // and record them, as a host that keeps the widget in place would.
  api.on('action', (ev) => {
    state.widgetActions.push(ev.detail.action);
  });
  for (const action of [
    'io.element.device_mute', 'im.vector.hangup', 'io.element.close', 'io.element.join',
    WidgetApiFromWidgetAction.UpdateAlwaysOnScreen, 'set_always_on_screen',
    'io.element.tile_layout', 'io.element.spotlight_layout',
  ]) {
    api.on(`action:${action}`, (ev) => {
      ev.preventDefault();
      state.widgetActions.push(action);
      api.transport.reply(ev.detail, {});
    });
  }
  api.on('ready', () => {
    state.phase = 'ready';
    api.setViewedRoomId(ROOM);
  });

  // Like Element Web: once the user is no longer in the room (left, kicked, banned), the call
  // is hung up; Element Call then leaves the MatrixRTC session and its call view.
  const onMyMembership = (membership) => {
    console.info(`conclave host: own membership is now ${membership}`);
    state.myMembership = membership;
    if (membership === 'join' || state.hangupSent) return;
    state.hangupSent = Date.now();
    api.transport.send('im.vector.hangup', {}).then(
      () => { state.hangupAcked = Date.now(); },
      (e) => fail('hangup', e));
  };
  // Live room events and state changes, and to-device messages (decrypted by the Rust
  // crypto), go to the widget.
  const feedLive = (ev) => {
    const feed = () => api.feedEvent(ev.getEffectiveEvent(), ROOM).catch((e) => fail('feedEvent', e));
    if (ev.isBeingDecrypted() || ev.shouldAttemptDecryption()) {
      client.decryptEventIfNeeded(ev).then(feed, feed);
    } else {
      feed();
    }
  };
  client.on(sdk.RoomEvent.Timeline, (ev, room, toStart, removed, data) => {
    if (!room || room.roomId !== ROOM || toStart || removed || (data && data.liveEvent === false)) return;
    if (ev.getType() === 'm.room.member' && ev.getStateKey() === USER) {
      onMyMembership(ev.getContent().membership);
    }
    // A local echo (what this host itself is sending: sticky rtc.member events in matrix_2_0
    // mode) has no event ID yet; it goes to the widget once its remote echo replaces it.
    if (ev.status !== null) return;
    feedLive(ev);
  });
  client.on(sdk.RoomEvent.LocalEchoUpdated, (ev, room) => {
    if (room && room.roomId === ROOM && ev.status === null) feedLive(ev);
  });
  client.on(sdk.RoomStateEvent.Events, (ev) => {
    if (ev.getRoomId() !== ROOM) return;
    if (ev.getType() === 'm.room.member' && ev.getStateKey() === USER) {
      onMyMembership(ev.getContent().membership);
    }
    api.feedStateUpdate(ev.getEffectiveEvent()).catch((e) => fail('feedStateUpdate', e));
  });
  client.on(sdk.RoomEvent.MyMembership, (room, membership) => {
    if (room.roomId === ROOM) onMyMembership(membership);
  });
  client.on(sdk.ClientEvent.ToDeviceEvent, (ev) => {
    state.toDeviceReceived += 1;
    api.feedToDevice(ev.getEffectiveEvent(), ev.isEncrypted()).catch((e) => fail('feedToDevice', e));
  });
}

main().then(
  () => { if (state.phase !== 'ready') state.phase = 'started'; },
  (e) => { state.phase = 'failed'; fail('host', e); });
