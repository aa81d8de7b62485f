// Browser participant for Conclave's interop tests, on the unmodified livekit-client UMD
// bundle (global `LivekitClient`). driver.mjs calls these through page.evaluate:
//
//   await lk.connect(url, token, {simulcast, adaptiveStream, dynacast, singlePC, e2eeKey,
//                                 resolution: {width, height, frameRate}, videoCodec,
//                                 statsIntervalMs, red})
//        -> {connected, error}
//   await lk.publish({camera: true, microphone: true}) -> {published: [...], errors: [...]}
//   await lk.state()       -> a JSON-able snapshot (see below)
//   lk.eventsSince(n)      -> events[n..] (the driver streams them)
//   await lk.setVideoQuality(identity, 'low'|'medium'|'high') -> bool
//   await lk.disconnect()
//
// Remote video is attached to visible <video> elements and measured there: videoWidth /
// videoHeight, requestVideoFrameCallback counts (frames painted), getVideoPlaybackQuality,
// and the receiver's inbound-rtp stats. Remote audio is attached to <audio> elements and fed
// to a Web Audio analyser (RMS level); the SDK's participant.audioLevel (server speaker
// updates) and inbound-rtp audioLevel are reported beside it.
//
// statsIntervalMs (off by default): every that many ms, one event per remote track
// (`video_stats` / `audio_stats`: the inbound-rtp counters below plus, for video, what the
// page painted and the longest gap between painted frames since the last sample) and one
// `outbound_stats` for the own camera (per simulcast layer), so a test can follow quality
// over time.
(() => {
  'use strict';
  const LK = window.LivekitClient;
  const t0 = performance.now();
  const now = () => Math.round(performance.now() - t0);
  const MAX_EVENTS = 2000;

  const S = {
    sdk_version: LK ? LK.version : null,
    connected: false,
    connect_error: null,
    connect_ms: null,
    identity: null,
    room: null,
    disconnected: null,
    options: null,
    page_errors: [],
    publish_errors: [],
  };
  const events = [];
  let room = null;
  let audioCtx = null;
  // track sid -> record of a subscribed remote track
  const remote = new Map();

  const ev = (name, fields = {}) => {
    if (events.length >= MAX_EVENTS) return;
    const e = { event: name, t_ms: now(), ...fields };
    events.push(e);
  };
  const errText = (e) => String((e && (e.stack || e.message)) || e);
  window.addEventListener('error', (e) => S.page_errors.push(String(e.message || e)));
  window.addEventListener('unhandledrejection', (e) => S.page_errors.push('unhandled rejection: ' + errText(e.reason)));
  if (!LK) S.page_errors.push('window.LivekitClient is missing: livekit-client.umd.js did not load');

  // ---------------------------------------------------------------- remote media

  function watchVideo(rec) {
    const el = rec.el;
    rec.frame_times = [];
    if (typeof el.requestVideoFrameCallback === 'function') {
      const cb = (_now, meta) => {
        rec.frames += 1;
        const t = now();
        if (rec.last_frame_ms !== null) rec.gap_max_ms = Math.max(rec.gap_max_ms || 0, t - rec.last_frame_ms);
        rec.last_frame_ms = t;
        rec.frame_times.push(rec.last_frame_ms);
        if (rec.frame_times.length > 120) rec.frame_times.shift();
        rec.rvfc_width = meta.width;
        rec.rvfc_height = meta.height;
        if (!rec.ended) el.requestVideoFrameCallback(cb);
      };
      el.requestVideoFrameCallback(cb);
    } else {
      rec.no_rvfc = true;
    }
    el.addEventListener('resize', () => ev('video_resize', { identity: rec.identity, sid: rec.sid, width: el.videoWidth, height: el.videoHeight }));
    el.addEventListener('playing', () => ev('video_playing', { identity: rec.identity, sid: rec.sid }));
  }

  function watchAudio(rec, track) {
    try {
      if (!audioCtx) audioCtx = new AudioContext();
      if (audioCtx.state === 'suspended') audioCtx.resume().catch(() => {});
      const src = audioCtx.createMediaStreamSource(new MediaStream([track.mediaStreamTrack]));
      const an = audioCtx.createAnalyser();
      an.fftSize = 2048;
      const sink = audioCtx.createGain();
      sink.gain.value = 0;
      src.connect(an);
      an.connect(sink);
      sink.connect(audioCtx.destination);
      rec.analyser = an;
      rec.buf = new Float32Array(an.fftSize);
      rec.level = 0;
      rec.level_max = 0;
      rec.level_samples = 0;
      rec.timer = setInterval(() => {
        an.getFloatTimeDomainData(rec.buf);
        let sum = 0;
        for (let i = 0; i < rec.buf.length; i++) sum += rec.buf[i] * rec.buf[i];
        rec.level = Math.sqrt(sum / rec.buf.length);
        rec.level_max = Math.max(rec.level_max, rec.level);
        rec.level_samples += 1;
      }, 100);
    } catch (e) {
      rec.analyser_error = errText(e);
    }
  }

  function onSubscribed(track, pub, p) {
    const rec = {
      identity: p.identity, kind: track.kind, sid: pub.trackSid, source: pub.source,
      mime: pub.mimeType || null, subscribed_ms: now(), frames: 0, last_frame_ms: null,
      participant: p, track, pub, ended: false,
    };
    const el = track.attach();
    el.muted = true; // output is muted anyway (--mute-audio); measuring needs no sound
    el.autoplay = true;
    el.playsInline = true;
    el.dataset.identity = p.identity;
    el.dataset.sid = pub.trackSid;
    document.getElementById('media').appendChild(el);
    const played = el.play();
    if (played && played.catch) played.catch((e) => ev('play_failed', { identity: p.identity, sid: pub.trackSid, error: errText(e) }));
    rec.el = el;
    if (track.kind === 'video') watchVideo(rec); else watchAudio(rec, track);
    remote.set(pub.trackSid, rec);
    ev('track_subscribed', { identity: p.identity, kind: track.kind, sid: pub.trackSid, source: pub.source });
  }

  function onUnsubscribed(track, pub, p) {
    const rec = remote.get(pub.trackSid);
    if (rec) {
      rec.ended = true;
      rec.unsubscribed_ms = now();
      if (rec.timer) clearInterval(rec.timer);
    }
    track.detach().forEach((e) => e.remove());
    ev('track_unsubscribed', { identity: p.identity, kind: track.kind, sid: pub.trackSid });
  }

  async function inboundStats(rec) {
    const out = {};
    try {
      const rep = await rec.track.getRTCStatsReport();
      if (!rep) return out;
      const codecs = {};
      rep.forEach((s) => { if (s.type === 'codec') codecs[s.id] = s.mimeType; });
      rep.forEach((s) => {
        if (s.type !== 'inbound-rtp') return;
        out.packets_received = s.packetsReceived;
        out.packets_lost = s.packetsLost;
        out.bytes_received = s.bytesReceived;
        out.codec = codecs[s.codecId] || null;
        if (s.kind === 'video') {
          out.frames_decoded = s.framesDecoded;
          out.frames_received = s.framesReceived;
          out.frame_width = s.frameWidth;
          out.frame_height = s.frameHeight;
          out.key_frames_decoded = s.keyFramesDecoded;
          out.pli_count = s.pliCount;
          out.nack_count = s.nackCount;
          out.fir_count = s.firCount;
          out.freeze_count = s.freezeCount;
          out.total_freezes_duration = s.totalFreezesDuration;
          out.pause_count = s.pauseCount;
          out.total_pauses_duration = s.totalPausesDuration;
          out.retransmitted_packets_received = s.retransmittedPacketsReceived;
          out.retransmitted_bytes_received = s.retransmittedBytesReceived;
          out.frames_dropped = s.framesDropped;
        } else {
          out.audio_level = s.audioLevel;
          out.total_audio_energy = s.totalAudioEnergy;
          out.total_samples_received = s.totalSamplesReceived;
          out.concealed_samples = s.concealedSamples;
          out.silent_concealed_samples = s.silentConcealedSamples;
          out.concealment_events = s.concealmentEvents;
          out.nack_count = s.nackCount;
        }
      });
    } catch (e) {
      out.error = errText(e);
    }
    return out;
  }

  async function remoteSnapshot() {
    const tracks = []; const videos = []; const audios = [];
    const t = now();
    for (const rec of remote.values()) {
      tracks.push({
        identity: rec.identity, kind: rec.kind, sid: rec.sid, source: rec.source, mime: rec.mime,
        subscribed_ms: rec.subscribed_ms, unsubscribed_ms: rec.unsubscribed_ms || null,
        stream_state: rec.pub.streamState || null, muted: rec.pub.isMuted,
      });
      if (rec.ended) continue;
      const stats = await inboundStats(rec);
      if (rec.kind === 'video') {
        const el = rec.el;
        const q = el.getVideoPlaybackQuality ? el.getVideoPlaybackQuality() : null;
        const recent = rec.frame_times.filter((x) => t - x <= 1000).length;
        videos.push({
          identity: rec.identity, sid: rec.sid,
          video_width: el.videoWidth, video_height: el.videoHeight,
          ready_state: el.readyState, paused: el.paused, current_time: el.currentTime,
          frames: rec.frames, // requestVideoFrameCallback calls: frames presented
          fps_1s: recent,
          last_frame_ms: rec.last_frame_ms,
          frames_advancing: rec.last_frame_ms !== null && t - rec.last_frame_ms < 1000,
          rvfc_width: rec.rvfc_width || null, rvfc_height: rec.rvfc_height || null,
          no_rvfc: !!rec.no_rvfc,
          playback_total_frames: q ? q.totalVideoFrames : null,
          playback_dropped_frames: q ? q.droppedVideoFrames : null,
          stats,
        });
      } else {
        audios.push({
          identity: rec.identity, sid: rec.sid,
          level: rec.level ?? null, level_max: rec.level_max ?? null, level_samples: rec.level_samples ?? 0,
          analyser_error: rec.analyser_error || null,
          audio_context: audioCtx ? audioCtx.state : null,
          participant_audio_level: rec.participant.audioLevel,
          participant_is_speaking: rec.participant.isSpeaking,
          stats,
        });
      }
    }
    return { tracks, videos, audios };
  }

  // ---------------------------------------------------------------- local media

  async function publishedSnapshot() {
    const out = [];
    if (!room) return out;
    for (const pub of room.localParticipant.trackPublications.values()) {
      const tr = pub.track;
      const p = {
        sid: pub.trackSid, kind: pub.kind, source: pub.source, mime: pub.mimeType || null,
        simulcasted: pub.simulcasted ?? null, muted: pub.isMuted,
        width: pub.dimensions ? pub.dimensions.width : null,
        height: pub.dimensions ? pub.dimensions.height : null,
      };
      try {
        const sender = tr && tr.sender;
        if (sender) {
          p.encodings = (sender.getParameters().encodings || []).map((e) => ({
            rid: e.rid || null, active: e.active, max_bitrate: e.maxBitrate || null,
            scale_resolution_down_by: e.scaleResolutionDownBy || null, max_framerate: e.maxFramerate || null,
          }));
          const rep = await sender.getStats();
          const layers = [];
          rep.forEach((s) => {
            // The sender's transport: the browser's bandwidth estimate (needs the SFU's
            // transport-cc / REMB feedback to grow) and the RTT seen on it.
            if (s.type === 'candidate-pair' && s.nominated && s.availableOutgoingBitrate !== undefined) {
              p.available_outgoing_bitrate = s.availableOutgoingBitrate;
              p.current_rtt = s.currentRoundTripTime;
            }
            if (s.type !== 'outbound-rtp') return;
            layers.push({
              rid: s.rid || null, active: s.active, packets_sent: s.packetsSent, bytes_sent: s.bytesSent,
              frames_encoded: s.framesEncoded, frames_sent: s.framesSent,
              frame_width: s.frameWidth, frame_height: s.frameHeight,
              quality_limitation_reason: s.qualityLimitationReason, encoder: s.encoderImplementation,
              nack_count: s.nackCount, pli_count: s.pliCount, fir_count: s.firCount,
            });
          });
          layers.sort((a, b) => String(a.rid).localeCompare(String(b.rid)));
          p.outbound = layers;
        }
      } catch (e) {
        p.stats_error = errText(e);
      }
      out.push(p);
    }
    return out;
  }

  // ---------------------------------------------------------------- periodic stats

  let statsTimer = null;
  let statsBusy = false;
  async function statsTick() {
    if (statsBusy) return; // a slow getStats: skip a beat rather than pile up
    statsBusy = true;
    try {
      for (const rec of remote.values()) {
        if (rec.ended) continue;
        const st = await inboundStats(rec);
        const t = now();
        if (rec.kind === 'video') {
          const open = rec.last_frame_ms === null ? null : t - rec.last_frame_ms;
          const gap = Math.max(rec.gap_max_ms || 0, open || 0);
          rec.gap_max_ms = 0;
          ev('video_stats', {
            identity: rec.identity, sid: rec.sid, stream_state: rec.track.streamState || null,
            video_width: rec.el.videoWidth, video_height: rec.el.videoHeight,
            frames: rec.frames, max_frame_gap_ms: rec.last_frame_ms === null ? null : gap, ...st,
          });
        } else {
          ev('audio_stats', { identity: rec.identity, sid: rec.sid, level: rec.level ?? null, ...st });
        }
      }
      const cam = room ? [...room.localParticipant.trackPublications.values()].find((p) => p.kind === 'video') : null;
      if (cam && cam.track && cam.track.sender) {
        const rep = await cam.track.sender.getStats();
        const layers = [];
        let bwe = null;
        rep.forEach((s) => {
          if (s.type === 'candidate-pair' && s.nominated && s.availableOutgoingBitrate !== undefined) bwe = s.availableOutgoingBitrate;
          if (s.type !== 'outbound-rtp') return;
          layers.push({ rid: s.rid || null, bytes_sent: s.bytesSent, packets_sent: s.packetsSent, frames_encoded: s.framesEncoded,
            frame_width: s.frameWidth, frame_height: s.frameHeight, fps: s.framesPerSecond ?? null,
            quality_limitation_reason: s.qualityLimitationReason, nack_count: s.nackCount,
            retransmitted_packets_sent: s.retransmittedPacketsSent });
        });
        layers.sort((a, b) => String(a.rid).localeCompare(String(b.rid)));
        ev('outbound_stats', { available_outgoing_bitrate: bwe, layers });
      }
    } catch (e) {
      ev('stats_error', { error: errText(e) });
    } finally {
      statsBusy = false;
    }
  }

  // ---------------------------------------------------------------- API

  async function connect(url, token, opts = {}) {
    const o = {
      simulcast: true, adaptiveStream: false, dynacast: false, singlePC: null,
      resolution: { width: 640, height: 360, frameRate: 24 }, videoCodec: 'vp8', red: true, ...opts,
    };
    S.options = o;
    const roomOpts = {
      adaptiveStream: o.adaptiveStream,
      dynacast: o.dynacast,
      // red: redundant audio (RED, the SDK's default) roughly doubles the microphone's rate.
      publishDefaults: { simulcast: o.simulcast, videoCodec: o.videoCodec, red: o.red !== false },
      videoCaptureDefaults: { resolution: o.resolution },
    };
    // 2.x defaults to the single-PC /rtc/v1 path; Conclave answers it with 404 and the SDK
    // falls back to v0 /rtc. singlePC: false goes to /rtc at once.
    if (o.singlePC !== null && o.singlePC !== undefined) roomOpts.singlePeerConnection = o.singlePC;
    // e2eeKey: every tab encrypts with the same shared passphrase (ExternalE2EEKeyProvider)
    // in the SDK's own worker; the SFU forwards frames it cannot read.
    let keyProvider = null;
    if (o.e2eeKey) {
      keyProvider = new LK.ExternalE2EEKeyProvider();
      roomOpts.e2ee = { keyProvider, worker: new Worker('./livekit-client.e2ee.worker.js') };
    }
    room = new LK.Room(roomOpts);
    window.lkRoom = room;
    if (keyProvider) {
      await keyProvider.setKey(o.e2eeKey);
      await room.setE2EEEnabled(true);
    }
    const E = LK.RoomEvent;
    room
      .on(E.ParticipantConnected, (p) => ev('participant_connected', { identity: p.identity }))
      .on(E.ParticipantDisconnected, (p) => ev('participant_disconnected', { identity: p.identity }))
      .on(E.TrackPublished, (pub, p) => ev('track_published', { identity: p.identity, kind: pub.kind, sid: pub.trackSid, source: pub.source }))
      .on(E.TrackUnpublished, (pub, p) => ev('track_unpublished', { identity: p.identity, kind: pub.kind, sid: pub.trackSid }))
      .on(E.TrackSubscribed, onSubscribed)
      .on(E.TrackUnsubscribed, onUnsubscribed)
      .on(E.TrackSubscriptionFailed, (sid, p, err) => ev('track_subscription_failed', { identity: p && p.identity, sid, error: err ? String(err) : null }))
      .on(E.TrackStreamStateChanged, (pub, st, p) => ev('track_stream_state', { identity: p.identity, sid: pub.trackSid, state: st }))
      .on(E.TrackMuted, (pub, p) => ev('track_muted', { identity: p.identity, sid: pub.trackSid }))
      .on(E.TrackUnmuted, (pub, p) => ev('track_unmuted', { identity: p.identity, sid: pub.trackSid }))
      .on(E.LocalTrackPublished, (pub) => ev('local_track_published', { kind: pub.kind, sid: pub.trackSid, source: pub.source }))
      .on(E.ActiveSpeakersChanged, (sp) => ev('active_speakers', { identities: sp.map((p) => p.identity) }))
      .on(E.ConnectionStateChanged, (st) => ev('connection_state', { state: st }))
      .on(E.SignalReconnecting, () => ev('signal_reconnecting'))
      .on(E.Reconnecting, () => ev('reconnecting'))
      .on(E.Reconnected, () => ev('reconnected'))
      .on(E.EncryptionError, (e) => ev('encryption_error', { error: errText(e) }))
      .on(E.ParticipantEncryptionStatusChanged, (on, p) => ev('encryption_status', { identity: p ? p.identity : null, encrypted: on }))
      .on(E.MediaDevicesError, (e) => ev('media_devices_error', { error: errText(e) }))
      .on(E.Disconnected, (reason) => {
        S.disconnected = reason === undefined ? 'unknown' : String(reason);
        ev('disconnected', { reason: S.disconnected });
      });
    ev('connecting', { url, options: o });
    const t = performance.now();
    try {
      await room.connect(url, token, { autoSubscribe: true });
      S.connected = true;
      S.connect_ms = Math.round(performance.now() - t);
      S.identity = room.localParticipant.identity;
      S.room = room.name;
      ev('connected', { identity: S.identity, room: S.room, connect_ms: S.connect_ms, server: room.serverInfo ? { version: room.serverInfo.version || null, protocol: room.serverInfo.protocol ?? null, edition: room.serverInfo.edition ?? null } : null });
      if (o.statsIntervalMs > 0 && !statsTimer) statsTimer = setInterval(statsTick, o.statsIntervalMs);
    } catch (e) {
      S.connect_error = errText(e);
      ev('connect_failed', { error: S.connect_error });
    }
    return { connected: S.connected, error: S.connect_error };
  }

  async function publish({ camera = true, microphone = true } = {}) {
    const published = [];
    const pub1 = async (what, fn) => {
      try {
        const p = await fn();
        published.push(what);
        ev('published', { what, sid: p ? p.trackSid : null });
      } catch (e) {
        S.publish_errors.push({ what, error: errText(e) });
        ev('publish_failed', { what, error: errText(e) });
      }
    };
    if (!room || !S.connected) return { published, errors: [{ what: 'all', error: 'not connected' }] };
    if (camera) await pub1('camera', () => room.localParticipant.setCameraEnabled(true));
    if (microphone) await pub1('microphone', () => room.localParticipant.setMicrophoneEnabled(true));
    return { published, errors: S.publish_errors };
  }

  async function setVideoQuality(identity, quality) {
    const q = { low: LK.VideoQuality.LOW, medium: LK.VideoQuality.MEDIUM, high: LK.VideoQuality.HIGH }[quality];
    if (q === undefined || !room) return false;
    const p = room.getParticipantByIdentity(identity);
    if (!p) return false;
    let done = false;
    for (const pub of p.trackPublications.values()) {
      // Needs adaptiveStream off (the SDK ignores manual quality with it on) and a subscription.
      if (pub.kind === 'video' && pub.isSubscribed) { pub.setVideoQuality(q); done = true; }
    }
    if (done) ev('set_video_quality', { identity, quality });
    return done;
  }

  async function state() {
    const r = await remoteSnapshot();
    const participants = room ? [...room.remoteParticipants.values()].map((p) => p.identity) : [];
    return {
      ...S,
      connection_state: room ? room.state : null,
      participants,
      published: await publishedSnapshot(),
      remote_tracks: r.tracks,
      videos: r.videos,
      audios: r.audios,
      n_events: events.length,
      t_ms: now(),
    };
  }

  async function disconnect() {
    if (statsTimer) { clearInterval(statsTimer); statsTimer = null; }
    if (room) await room.disconnect();
  }

  window.lk = {
    connect, publish, state, setVideoQuality, disconnect,
    eventsSince: (n) => events.slice(n),
  };
  ev('page_ready', { sdk_version: S.sdk_version, user_agent: navigator.userAgent });
})();
