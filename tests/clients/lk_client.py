#!/usr/bin/env python3
"""A scriptable LiveKit participant for Conclave's integration tests.

It uses the official LiveKit Python SDK (`livekit`, the Rust client core with
libwebrtc), so it speaks to the SFU exactly as a real client does. It connects
with a ready JWT, publishes a synthetic audio track (440 Hz sine, 48 kHz mono,
10 ms frames) and/or a synthetic video track (moving bar, RGBA), subscribes to
everything, counts decoded frames per remote participant, and can send data
packets, mute its audio, set its metadata and leave on a schedule. For the data
features (off by default) it can serve an RPC method (`echo`), call it, send text
streams (also one claiming another sender identity) and addressed data packets,
and read every text stream of the given topics.

Install: the venv from `scripts/install-test-deps` (CONCLAVE_LK_VENV).

    $CONCLAVE_LK_VENV/bin/python tests/clients/lk_client.py --url ws://127.0.0.1:PORT \
        --token JWT --identity-label alice --expect-participants 1 \
        --expect-audio-frames 50 --expect-video-frames 20 --timeout 30

Times: --timeout counts from process start (it covers the connect);
--min-duration, --mute-after and --leave-after count from the moment the
connect succeeded. All `*_ms` values in the output are milliseconds since
process start (after the imports); `connect_started_ms` (just before
`room.connect`) and `connect_returned_ms` (when it returned) in the summary
let a caller measure a join without the interpreter's start-up.

Finishing: the client ends as soon as every expectation is met and
--min-duration has passed, or at --leave-after (which also keeps it in the
room until then), at --timeout, when the server disconnects it, or on
SIGTERM/SIGINT (a graceful leave). Expectations are the --expect-* flags,
plus: every requested publish succeeded, and, with --set-metadata, the call
resolved and the server echoed the new metadata back; with the data actions
(--send-data-to, --rpc-call, --send-text, --forge-text), they all completed.

Output (stdout; logs go to stderr, more with -v):
  * with --events-stdout, one JSON line per event as it happens:
        {"type": "event", "event": "connected", "t_ms": 812, ...}
  * always, at the end, ONE summary line:
        {"type": "summary", "connected": true, "exit_code": 0, "remote": {...}, ...}

Exit codes:
  0  connected and every expectation met
  2  connect failed (error or timeout)
  3  connected, but expectations unmet (by the deadline, at --leave-after or
     SIGTERM, or a publish / set_metadata failed)
  4  disconnected by the server
  64 usage error
"""

import argparse
import asyncio
import hashlib
import json
import logging
import math
import os
import signal
import sys
import time

import numpy as np
from livekit import rtc

log = logging.getLogger("lk_client")

EXIT_OK, EXIT_CONNECT_FAILED, EXIT_UNMET, EXIT_DISCONNECTED, EXIT_USAGE = 0, 2, 3, 4, 64
RESULTS = {
    EXIT_OK: "ok",
    EXIT_CONNECT_FAILED: "connect_failed",
    EXIT_UNMET: "expectations_unmet",
    EXIT_DISCONNECTED: "disconnected",
}
DATA_TOPIC = "test"
DATA_INTERVAL_S = 0.5
MAX_EVENTS = 1000

SAMPLE_RATE, CHANNELS, SAMPLES_PER_FRAME = 48000, 1, 480  # 10 ms audio frames


def enum_name(enum, value):
    try:
        return enum.Name(value)
    except Exception:  # unknown value or not an enum value at all
        return str(value)


def kind_name(kind):
    return "audio" if kind == rtc.TrackKind.KIND_AUDIO else "video"


class State:
    """Everything the client observed; becomes the summary."""

    def __init__(self, args):
        self.args = args
        self.t0 = time.monotonic()
        self.events = []
        self.events_dropped = 0
        self.remote = {}  # identity -> record
        self.server_data = []  # data packets without a sender participant
        self.connected_at = None  # monotonic time of a successful connect
        self.leaving = False  # set before our own disconnect at the end
        self.summary = {
            "type": "summary",
            "label": args.identity_label,
            "url": args.url,
            "sdk": "python-livekit",
            "sdk_version": rtc.__version__,
            "signalling": {None: "default", True: "single-pc", False: "dual-pc"}[args.single_pc],
            "connected": False,
            "connect_started_ms": None,
            "connect_returned_ms": None,
            "room": None,
            "room_sid": None,
            "local_identity": None,
            "local_sid": None,
            "published": [],
            "publish_errors": [],
            "data_sent": {"reliable": 0, "lossy": 0},
            "data_send_errors": [],
            "muted_own_audio": False,
            "metadata_requested": args.set_metadata,
            "metadata_set": False,
            "metadata_error": None,
            "metadata_echoed": False,
            "rpc_served": [],  # {"caller": identity, "payload": ...} per echo invocation
            "rpc_result": None,  # {"response": ...} or {"error": ...} of --rpc-call
            "text_streams": [],  # {"topic", "sender_identity", "length", "sha256"} per stream read
            "text_sent": [],  # {"topic", "length", "sha256"} per --send-text / --forge-text
            "data_actions_done": False,
            "data_actions_error": None,
            "left_by_request": False,
            "disconnect_reason": None,
            "error": None,
        }

    def now_ms(self):
        return int((time.monotonic() - self.t0) * 1000)

    def since_connect(self):
        return 0.0 if self.connected_at is None else time.monotonic() - self.connected_at

    def ev(self, name, **fields):
        rec = {"event": name, "t_ms": self.now_ms(), **fields}
        if len(self.events) < MAX_EVENTS:
            self.events.append(rec)
        else:
            self.events_dropped += 1
        log.info("%s %s", self.args.identity_label, rec)
        if self.args.events_stdout:
            emit({"type": "event", "label": self.args.identity_label, **rec})

    def peer(self, identity):
        rec = self.remote.get(identity)
        if rec is None:
            rec = self.remote[identity] = {
                "sid": None,
                "tracks": [],
                "audio_frames": 0,
                "video_frames": 0,
                "video_resolution": None,
                "first_audio_ms": None,
                "first_video_ms": None,
                "muted_seen": {"audio": False, "video": False},
                "unmuted_seen": {"audio": False, "video": False},
                "data": [],
                "data_packets": 0,
                "metadata": None,
                "joined_at_ms": self.now_ms(),
                "disconnected_at_ms": None,
                "disconnect_reason": None,
            }
        return rec

    def record_data(self, packet):
        kind = "reliable" if packet.kind == rtc.DataPacketKind.KIND_RELIABLE else "lossy"
        try:
            payload = packet.data.decode("utf-8")
        except UnicodeDecodeError:
            payload = packet.data.hex()
        sender = packet.participant.identity if packet.participant is not None else None
        entry = {"payload": payload, "topic": packet.topic, "kind": kind, "sender_identity": sender}
        # Senders repeat their packet every 500 ms: keep one entry per distinct packet, with a count.
        bucket = self.server_data if sender is None else self.peer(sender)["data"]
        if sender is not None:
            self.peer(sender)["data_packets"] += 1
        for existing in bucket:
            if all(existing[k] == entry[k] for k in entry):
                existing["count"] += 1
                return
        bucket.append({**entry, "count": 1, "first_ms": self.now_ms()})
        self.ev("data_received", **entry)


def emit(obj):
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------- media

async def publish_audio(source, stop, freq=440.0):
    n = 0
    t_next = time.monotonic()
    while not stop.is_set():
        t = (np.arange(SAMPLES_PER_FRAME) + n) / SAMPLE_RATE
        pcm = (0.3 * 32767 * np.sin(2 * math.pi * freq * t)).astype(np.int16)
        n += SAMPLES_PER_FRAME
        await source.capture_frame(
            rtc.AudioFrame(pcm.tobytes(), SAMPLE_RATE, CHANNELS, SAMPLES_PER_FRAME))
        t_next += SAMPLES_PER_FRAME / SAMPLE_RATE
        delay = t_next - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


async def publish_video(source, width, height, fps, stop):
    base = np.zeros((height, width, 4), dtype=np.uint8)
    base[:, :, 3] = 255
    base[:, :, 2] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]  # blue gradient
    i = 0
    t_next = time.monotonic()
    while not stop.is_set():
        img = base.copy()
        x = (i * 8) % width
        img[:, x:x + 16, 0:2] = 255  # moving yellow bar
        frame = rtc.VideoFrame(width, height, rtc.VideoBufferType.RGBA, img.tobytes())
        source.capture_frame(frame, timestamp_us=int(i * 1_000_000 / fps))
        i += 1
        t_next += 1.0 / fps
        await asyncio.sleep(max(0.0, t_next - time.monotonic()))


async def count_audio(track, identity, st):
    stream = rtc.AudioStream.from_track(track=track, sample_rate=SAMPLE_RATE, num_channels=CHANNELS)
    rec = st.peer(identity)
    try:
        async for _ in stream:
            if rec["first_audio_ms"] is None:
                rec["first_audio_ms"] = st.now_ms()
                st.ev("first_audio_frame", identity=identity)
            rec["audio_frames"] += 1
    finally:
        await stream.aclose()


async def count_video(track, identity, st):
    stream = rtc.VideoStream.from_track(track=track)
    rec = st.peer(identity)
    try:
        async for event in stream:
            if rec["first_video_ms"] is None:
                rec["first_video_ms"] = st.now_ms()
                st.ev("first_video_frame", identity=identity,
                      width=event.frame.width, height=event.frame.height)
            rec["video_frames"] += 1
            res = [event.frame.width, event.frame.height]
            if res != rec["video_resolution"]:
                # Every change of the decoded size (a simulcast layer switch), as it happens.
                st.ev("video_resolution", identity=identity, width=res[0], height=res[1],
                      frames=rec["video_frames"])
            rec["video_resolution"] = res
    finally:
        await stream.aclose()


# ---------------------------------------------------------------- scheduled actions

async def send_data_loop(room, st, kinds, stop):
    label = st.args.identity_label
    started = time.monotonic()
    n = 0
    while not stop.is_set():
        if st.args.send_data_for is not None and time.monotonic() - started >= st.args.send_data_for:
            st.ev("data_stopped", sent=dict(st.summary["data_sent"]))
            return
        n += 1
        for kind in kinds:
            # Numbered payloads (--number-data) tell a receiver which packets it got, and how often.
            payload = (f"{label}-{kind}-{n}" if st.args.number_data
                       else f"hello-from-{label}-{kind}")
            try:
                await asyncio.wait_for(
                    room.local_participant.publish_data(
                        payload, reliable=(kind == "reliable"), topic=DATA_TOPIC),
                    timeout=2.0)
                st.summary["data_sent"][kind] += 1
                if st.args.number_data:
                    st.summary.setdefault("data_numbers_sent", {}).setdefault(kind, []).append(n)
                if st.summary["data_sent"][kind] == 1:
                    st.ev("data_sent", kind=kind, payload=payload, topic=DATA_TOPIC)
            except Exception as e:  # keep trying: late data channels, transient errors
                errors = st.summary["data_send_errors"]
                if len(errors) < 20:
                    errors.append({"kind": kind, "error": repr(e), "t_ms": st.now_ms()})
                if len(errors) == 1:
                    st.ev("data_send_failed", kind=kind, error=repr(e))
        try:
            await asyncio.wait_for(stop.wait(), timeout=DATA_INTERVAL_S)
        except asyncio.TimeoutError:
            pass


async def progress_loop(st, interval, stop):
    """A 'progress' event every `interval` s: audio and video frames received per remote."""
    while not stop.is_set():
        frames = {ident: {"audio": r["audio_frames"], "video": r["video_frames"]}
                  for ident, r in st.remote.items()}
        st.ev("progress", frames=frames)
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval)
        except asyncio.TimeoutError:
            pass


async def mute_later(track, st, delay):
    await asyncio.sleep(delay)
    if track is None:
        st.ev("mute_skipped", reason="no audio track published")
        return
    track.mute()
    st.summary["muted_own_audio"] = True
    st.ev("muted", kind="audio")


async def ffi_set_metadata(participant, text):
    """LocalParticipant.set_metadata that also returns the SDK's error (None if OK).

    The SDK's own wrapper drops the error of the FFI callback, e.g. its 5 s timeout
    when the server never sends the RequestResponse for the update. This is the
    same FFI request, through private modules of the pinned SDK version.
    """
    from livekit.rtc._ffi_client import FfiClient
    from livekit.rtc._proto import ffi_pb2

    req = ffi_pb2.FfiRequest()
    req.set_local_metadata.local_participant_handle = participant._ffi_handle.handle
    req.set_local_metadata.metadata = text
    queue = FfiClient.instance.queue.subscribe()
    try:
        resp = FfiClient.instance.request(req)
        async_id = resp.set_local_metadata.async_id
        cb = await queue.wait_for(lambda e: e.set_local_metadata.async_id == async_id)
    finally:
        FfiClient.instance.queue.unsubscribe(queue)
    return cb.set_local_metadata.error or None


async def set_metadata(room, st, text, deadline):
    st.ev("metadata_requested", metadata=text)
    try:
        error = await asyncio.wait_for(ffi_set_metadata(room.local_participant, text),
                                       timeout=max(0.1, deadline - time.monotonic()))
    except asyncio.TimeoutError:
        error = "timed out (no response from the server before the deadline)"
    except Exception as e:
        error = repr(e)
    if error is None:
        st.summary["metadata_set"] = True
        st.ev("metadata_set")
    else:
        st.summary["metadata_error"] = error
        st.ev("metadata_set_failed", error=error)


# ---------------------------------------------------------------- data: RPC, text streams

RPC_METHOD = "echo"


def sha256(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_text(n):
    """`n` bytes of deterministic, line-numbered ASCII text."""
    lines, size, i = [], 0, 0
    while size < n:
        line = f"{i:07d} the quick brown fox jumps over the lazy dog\n"
        lines.append(line)
        size += len(line)
        i += 1
    return "".join(lines)[:n]


def register_rpc(room, st):
    """The `echo` RPC method (the local participant exists only once connected)."""
    def echo(data):
        st.summary["rpc_served"].append({"caller": data.caller_identity, "payload": data.payload})
        st.ev("rpc_served", caller=data.caller_identity, length=len(data.payload))
        return data.payload[::-1] + "|" + data.caller_identity
    room.local_participant.register_rpc_method(RPC_METHOD, echo)


def register_data_handlers(room, st, tasks):
    """Text stream handlers (before connecting, so no stream is missed)."""
    args = st.args

    async def read_text(reader, sender):
        text = await reader.read_all()
        entry = {"topic": reader.info.topic, "sender_identity": sender, "length": len(text),
                 "sha256": sha256(text)}
        st.summary["text_streams"].append(entry)
        st.ev("text_stream_read", **entry)

    for topic in args.text_handler or []:
        room.register_text_stream_handler(
            topic, lambda reader, sender: tasks.append(asyncio.ensure_future(read_text(reader, sender))))


async def data_actions(room, st, deadline):
    """Waits for the remote participants, then runs the requested data actions in order:
    addressed packets, the RPC call, the text stream, the forged text stream."""
    args = st.args
    lp = room.local_participant
    try:
        while len(room.remote_participants) < args.expect_participants:
            if time.monotonic() > deadline:
                raise TimeoutError("remote participants never arrived")
            await asyncio.sleep(0.05)
        if args.send_data_to:
            for i in range(3):
                payload = f"to-{args.send_data_to}-{i}"
                await lp.publish_data(payload, reliable=True, topic="direct",
                                      destination_identities=[args.send_data_to])
                st.ev("data_sent", kind="reliable", payload=payload, topic="direct",
                      to=args.send_data_to)
        if args.rpc_call:
            dest, _, payload = args.rpc_call.partition(":")
            # The callee registers its method once connected, maybe after we saw it join:
            # an early call may find no method yet, so try up to three times.
            for attempt in range(1, 4):
                try:
                    response = await lp.perform_rpc(destination_identity=dest, method=RPC_METHOD,
                                                    payload=payload, response_timeout=10.0)
                    st.summary["rpc_result"] = {"response": response, "attempts": attempt}
                    break
                except Exception as e:  # rtc.RpcError and transport errors alike
                    st.summary["rpc_result"] = {"error": repr(e), "attempts": attempt}
                    st.ev("rpc_failed", error=repr(e), attempt=attempt)
                    await asyncio.sleep(1.0)
            st.ev("rpc_result", **st.summary["rpc_result"])
        if args.send_text:
            topic, _, size = args.send_text.partition(":")
            text = test_text(int(size))
            await lp.send_text(text, topic=topic, compress=False)
            entry = {"topic": topic, "length": len(text), "sha256": sha256(text)}
            st.summary["text_sent"].append(entry)
            st.ev("text_sent", **entry)
        if args.forge_text:
            # A text stream whose packets claim to come from "mallory".
            text = f"forged-by-{args.identity_label}"
            writer = await lp.stream_text(topic=args.forge_text, sender_identity="mallory")
            await writer.write(text)
            await writer.aclose()
            entry = {"topic": args.forge_text, "length": len(text), "sha256": sha256(text)}
            st.summary["text_sent"].append(entry)
            st.ev("text_sent", forged_as="mallory", **entry)
        # send_text / publish_data return once the SDK took the data, not once it left: stay
        # a moment so that leaving right after does not cut it off.
        await asyncio.sleep(2.0)
        st.summary["data_actions_done"] = True
        st.ev("data_actions_done")
    except Exception as e:
        st.summary["data_actions_error"] = repr(e)
        st.ev("data_actions_failed", error=repr(e))


def wants_data_actions(args):
    return bool(args.send_data_to or args.rpc_call or args.send_text or args.forge_text)


# ---------------------------------------------------------------- main flow

def expectations_met(args, st, room):
    if len(st.remote) < args.expect_participants:
        return False
    if args.expect_audio_frames or args.expect_video_frames or args.expect_data:
        ok = [r for r in st.remote.values()
              if r["audio_frames"] >= args.expect_audio_frames
              and r["video_frames"] >= args.expect_video_frames
              and r["data_packets"] >= args.expect_data]
        if len(ok) < max(args.expect_participants, 1):
            return False
    if args.set_metadata is not None:
        if not st.summary["metadata_set"]:
            return False
        if room.local_participant.metadata == args.set_metadata:
            st.summary["metadata_echoed"] = True
        if not st.summary["metadata_echoed"]:
            return False
    if wants_data_actions(args) and not st.summary["data_actions_done"]:
        return False
    if len(st.summary["rpc_served"]) < args.expect_rpc_calls:
        return False
    if len(st.summary["text_streams"]) < args.expect_text_streams:
        return False
    return True


def register_handlers(room, st, tasks, disconnected):
    @room.on("participant_connected")
    def _participant_connected(p):
        rec = st.peer(p.identity)
        rec["sid"] = p.sid
        rec["metadata"] = p.metadata
        st.ev("participant_connected", identity=p.identity, sid=p.sid)

    @room.on("participant_disconnected")
    def _participant_disconnected(p):
        rec = st.peer(p.identity)
        rec["disconnected_at_ms"] = st.now_ms()
        rec["disconnect_reason"] = enum_name(rtc.DisconnectReason, p.disconnect_reason)
        st.ev("participant_disconnected", identity=p.identity, reason=rec["disconnect_reason"])

    @room.on("track_published")
    def _track_published(pub, p):
        st.ev("track_published", identity=p.identity, kind=kind_name(pub.kind), sid=pub.sid)

    @room.on("track_subscribed")
    def _track_subscribed(track, pub, p):
        kind = kind_name(track.kind)
        rec = st.peer(p.identity)
        rec["tracks"].append({
            "sid": pub.sid, "kind": kind, "name": pub.name, "mime": pub.mime_type,
            "source": enum_name(rtc.TrackSource, pub.source), "muted": pub.muted,
            "subscribed_ms": st.now_ms(),
        })
        if pub.muted:
            rec["muted_seen"][kind] = True
        st.ev("track_subscribed", identity=p.identity, kind=kind, sid=pub.sid, muted=pub.muted)
        counter = count_audio if kind == "audio" else count_video
        tasks.append(asyncio.ensure_future(counter(track, p.identity, st)))

    @room.on("track_unsubscribed")
    def _track_unsubscribed(track, pub, p):
        st.ev("track_unsubscribed", identity=p.identity, kind=kind_name(track.kind), sid=pub.sid)

    @room.on("track_subscription_failed")
    def _track_subscription_failed(p, track_sid, error):
        st.ev("track_subscription_failed", identity=p.identity, sid=track_sid, error=str(error))

    def _mute_change(muted):
        def handler(p, pub):
            if p is None or pub is None:
                return
            kind = kind_name(pub.kind)
            if isinstance(p, rtc.RemoteParticipant):
                rec = st.peer(p.identity)
                rec["muted_seen" if muted else "unmuted_seen"][kind] = True
                for t in rec["tracks"]:
                    if t["sid"] == pub.sid:
                        t["muted"] = muted
            st.ev("track_muted" if muted else "track_unmuted", identity=p.identity,
                  kind=kind, sid=pub.sid, local=not isinstance(p, rtc.RemoteParticipant))
        return handler

    room.on("track_muted", _mute_change(True))
    room.on("track_unmuted", _mute_change(False))

    @room.on("participant_metadata_changed")
    def _metadata_changed(p, old, new):
        local = not isinstance(p, rtc.RemoteParticipant)
        if local:
            if st.args.set_metadata is not None and new == st.args.set_metadata:
                st.summary["metadata_echoed"] = True
        else:
            st.peer(p.identity)["metadata"] = new
        st.ev("participant_metadata_changed", identity=p.identity, metadata=new, local=local)

    @room.on("data_received")
    def _data_received(packet):
        st.record_data(packet)

    @room.on("reconnecting")
    def _reconnecting():
        st.ev("reconnecting")

    @room.on("reconnected")
    def _reconnected():
        st.ev("reconnected")

    @room.on("disconnected")
    def _disconnected(reason=None):
        name = enum_name(rtc.DisconnectReason, reason)
        if st.leaving:  # our own room.disconnect() at the end
            st.ev("disconnected", reason=name, own=True)
            return
        if st.summary["disconnect_reason"] is None:  # the first one is the cause
            st.summary["disconnect_reason"] = name
        st.ev("disconnected", reason=name)
        disconnected.set()


async def run(args):
    st = State(args)
    stop = asyncio.Event()  # stops the media / data loops
    leave = asyncio.Event()  # SIGTERM / SIGINT: leave gracefully
    disconnected = asyncio.Event()
    tasks = []
    room = rtc.Room()
    deadline = st.t0 + args.timeout

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, leave.set)

    register_handlers(room, st, tasks, disconnected)
    register_data_handlers(room, st, tasks)

    opts = rtc.RoomOptions(auto_subscribe=True)
    if args.connect_timeout is not None:
        opts.connect_timeout = args.connect_timeout
    if args.single_pc is not None:
        opts.single_peer_connection = args.single_pc

    code = EXIT_OK
    try:
        st.ev("connecting", url=args.url, signalling=st.summary["signalling"])
        st.summary["connect_started_ms"] = st.now_ms()
        connect = asyncio.ensure_future(room.connect(args.url, args.token, opts))
        interrupted = asyncio.ensure_future(leave.wait())
        await asyncio.wait({connect, interrupted}, return_when=asyncio.FIRST_COMPLETED,
                           timeout=max(0.1, deadline - time.monotonic()))
        interrupted.cancel()
        error = None
        if not connect.done():
            connect.cancel()
            error = "interrupted by a signal" if leave.is_set() else "timed out"
        elif connect.exception() is not None:
            error = str(connect.exception()) or repr(connect.exception())
        if error is not None:
            st.summary["error"] = error
            st.ev("connect_failed", error=error)
            return st, EXIT_CONNECT_FAILED
        st.connected_at = time.monotonic()
        st.summary["connect_returned_ms"] = st.now_ms()
        lp = room.local_participant
        # The room's SID (`RM_...`): `Room.sid` is awaitable (it may arrive after the join
        # response, in a room_update); a server that never sends one gives null here.
        try:
            room_sid = await asyncio.wait_for(room.sid, timeout=5.0)
        except (asyncio.TimeoutError, RuntimeError):
            room_sid = None
        st.summary.update(connected=True, room=room.name, room_sid=room_sid,
                          local_identity=lp.identity, local_sid=lp.sid,
                          connected_ms=st.now_ms())
        st.ev("connected", room=room.name, room_sid=room_sid, identity=lp.identity,
              sid=lp.sid, remote=sorted(room.remote_participants))
        for p in room.remote_participants.values():
            rec = st.peer(p.identity)
            rec["sid"] = p.sid
            rec["metadata"] = p.metadata

        if args.rpc_echo:
            register_rpc(room, st)

        audio_track = None
        publish_ok = True
        if args.publish_audio:
            try:
                source = rtc.AudioSource(SAMPLE_RATE, CHANNELS)
                audio_track = rtc.LocalAudioTrack.create_audio_track("sine", source)
                pub = await asyncio.wait_for(lp.publish_track(
                    audio_track, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)),
                    timeout=max(0.1, deadline - time.monotonic()))
                tasks.append(asyncio.ensure_future(publish_audio(source, stop)))
                st.summary["published"].append("audio")
                st.ev("published", kind="audio", sid=pub.sid)
            except Exception as e:
                audio_track = None
                publish_ok = False
                st.summary["publish_errors"].append({"kind": "audio", "error": repr(e)})
                st.ev("publish_failed", kind="audio", error=repr(e))
        if args.publish_video and publish_ok:
            try:
                source = rtc.VideoSource(args.width, args.height)
                track = rtc.LocalVideoTrack.create_video_track("bars", source)
                pub = await asyncio.wait_for(lp.publish_track(
                    track, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_CAMERA,
                                                   simulcast=args.simulcast)),
                    timeout=max(0.1, deadline - time.monotonic()))
                tasks.append(asyncio.ensure_future(
                    publish_video(source, args.width, args.height, args.fps, stop)))
                st.summary["published"].append("video")
                st.ev("published", kind="video", sid=pub.sid)
            except Exception as e:
                publish_ok = False
                st.summary["publish_errors"].append({"kind": "video", "error": repr(e)})
                st.ev("publish_failed", kind="video", error=repr(e))

        if args.send_data:
            kinds = ["reliable", "lossy"] if args.send_data == "both" else [args.send_data]
            tasks.append(asyncio.ensure_future(send_data_loop(room, st, kinds, stop)))
        if args.mute_after is not None:
            tasks.append(asyncio.ensure_future(mute_later(audio_track, st, args.mute_after)))
        if args.progress_ms > 0:
            tasks.append(asyncio.ensure_future(progress_loop(st, args.progress_ms / 1000.0, stop)))
        actions_task = None
        if wants_data_actions(args):
            actions_task = asyncio.ensure_future(data_actions(room, st, deadline))
            tasks.append(actions_task)
        metadata_task = None
        if args.set_metadata is not None:
            metadata_task = asyncio.ensure_future(set_metadata(room, st, args.set_metadata, deadline))
            tasks.append(metadata_task)

        min_stay = max(args.min_duration, args.leave_after or 0.0)
        met_logged = False
        while True:
            if disconnected.is_set():
                code = EXIT_DISCONNECTED
                break
            met = publish_ok and expectations_met(args, st, room)
            if met and not met_logged:
                met_logged = True
                st.ev("expectations_met")
            if not publish_ok:
                code = EXIT_UNMET
                break
            if metadata_task is not None and metadata_task.done() and st.summary["metadata_error"]:
                code = EXIT_UNMET
                break
            if actions_task is not None and actions_task.done() and st.summary["data_actions_error"]:
                code = EXIT_UNMET
                break
            if args.leave_after is not None and st.since_connect() >= args.leave_after:
                st.summary["left_by_request"] = True
                st.ev("leaving", reason="leave_after")
                code = EXIT_OK if met else EXIT_UNMET
                break
            if leave.is_set():
                st.summary["left_by_request"] = True
                st.ev("leaving", reason="signal")
                code = EXIT_OK if met else EXIT_UNMET
                break
            if met and st.since_connect() >= min_stay:
                code = EXIT_OK
                break
            if time.monotonic() > deadline:
                st.ev("deadline")
                code = EXIT_UNMET
                break
            await asyncio.sleep(0.05)
        return st, code
    finally:
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        st.leaving = True
        if st.summary["connected"]:
            try:
                await asyncio.wait_for(room.disconnect(), timeout=5)
            except Exception as e:
                log.warning("disconnect: %r", e)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True, help="SFU signalling URL, e.g. ws://127.0.0.1:7880")
    ap.add_argument("--token", required=True, help="LiveKit access token (JWT)")
    ap.add_argument("--identity-label", default=f"py-{os.getpid()}",
                    help="label for logs, events and data payloads (the identity is in the token)")
    ap.add_argument("--publish-audio", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--publish-video", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--expect-participants", type=int, default=0,
                    help="remote participants to see (ever joined)")
    ap.add_argument("--expect-audio-frames", type=int, default=0,
                    help="decoded audio frames (10 ms each) from each expected remote participant")
    ap.add_argument("--expect-video-frames", type=int, default=0,
                    help="decoded video frames from each expected remote participant")
    ap.add_argument("--expect-data", type=int, default=0,
                    help="data packets (repeats count) from each expected remote participant")
    ap.add_argument("--timeout", type=float, default=30.0,
                    help="overall deadline in seconds from process start, connect included")
    ap.add_argument("--connect-timeout", type=float, default=None,
                    help="SDK per-attempt signal timeout in seconds (SDK default 5)")
    ap.add_argument("--min-duration", type=float, default=0.0,
                    help="stay connected at least this long (s after connect)")
    pc = ap.add_mutually_exclusive_group()
    pc.add_argument("--single-pc", dest="single_pc", action="store_true", default=None,
                    help="single peer connection, v1 signalling (/rtc/v1)")
    pc.add_argument("--dual-pc", dest="single_pc", action="store_false",
                    help="publisher + subscriber peer connections, v0 signalling (/rtc)")
    ap.add_argument("--send-data", choices=["reliable", "lossy", "both"], default=None,
                    help="send 'hello-from-<label>-<kind>' (topic 'test') every 500 ms until the end")
    ap.add_argument("--number-data", action="store_true",
                    help="with --send-data: a new numbered payload every time (LABEL-KIND-N)")
    ap.add_argument("--send-data-for", type=float, default=None, metavar="S",
                    help="with --send-data: stop sending after S seconds")
    ap.add_argument("--progress-ms", type=int, default=0, metavar="MS",
                    help="emit a 'progress' event (frames received per remote) every MS ms")
    ap.add_argument("--mute-after", type=float, default=None, metavar="S",
                    help="mute the own audio track S seconds after connect")
    ap.add_argument("--set-metadata", default=None, metavar="TEXT",
                    help="set the own metadata after connect (needs canUpdateOwnMetadata); "
                         "success then also requires the server's echo")
    ap.add_argument("--rpc-echo", action="store_true",
                    help="serve RPC method 'echo': answers the payload reversed + '|' + caller identity")
    ap.add_argument("--rpc-call", default=None, metavar="IDENTITY:PAYLOAD",
                    help="call 'echo' on IDENTITY (once the expected participants are there)")
    ap.add_argument("--text-handler", action="append", metavar="TOPIC",
                    help="read every text stream of TOPIC completely (repeatable)")
    ap.add_argument("--send-text", default=None, metavar="TOPIC:BYTES",
                    help="send one uncompressed text stream of BYTES bytes on TOPIC to everyone")
    ap.add_argument("--forge-text", default=None, metavar="TOPIC",
                    help="send a short text stream on TOPIC claiming sender identity 'mallory'")
    ap.add_argument("--send-data-to", default=None, metavar="IDENTITY",
                    help="send 3 reliable packets 'to-IDENTITY-<i>' (topic 'direct') addressed to IDENTITY only")
    ap.add_argument("--expect-rpc-calls", type=int, default=0,
                    help="RPC invocations to serve (with --rpc-echo)")
    ap.add_argument("--expect-text-streams", type=int, default=0,
                    help="text streams to read completely (with --text-handler)")
    ap.add_argument("--leave-after", type=float, default=None, metavar="S",
                    help="stay until S seconds after connect, then leave")
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--height", type=int, default=240)
    ap.add_argument("--fps", type=float, default=15.0)
    ap.add_argument("--simulcast", action="store_true")
    ap.add_argument("--events-stdout", action="store_true",
                    help="also print one JSON line per event as it happens")
    ap.add_argument("-v", "--verbose", action="store_true", help="SDK and client logs on stderr")
    try:
        args = ap.parse_args()
    except SystemExit as e:
        sys.exit(EXIT_USAGE if e.code else 0)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")

    st, code = asyncio.run(run(args))
    st.summary.update({
        "exit_code": code,
        "result": RESULTS[code],
        "elapsed_ms": st.now_ms(),
        "remote": st.remote,
        "server_data": st.server_data,
        "events": st.events,
        "events_dropped": st.events_dropped,
    })
    emit(st.summary)
    sys.stderr.flush()
    # Skip interpreter teardown: the SDK's FFI threads can make it slow or noisy.
    os._exit(code)


if __name__ == "__main__":
    main()
