#!/usr/bin/env python3
"""A third-party WHIP publisher and WHEP player for Conclave's integration tests.

The WebRTC side is aiortc (PyPI, not written here): its own ICE, DTLS, SRTP,
Opus and VP8 codecs. This script only does the HTTP exchange of RFC 9725 (WHIP)
and draft-ietf-wish-whep (WHEP), as any WHIP/WHEP client does: POST the offer
(`Content-Type: application/sdp`, optional `Authorization: Bearer`), expect
`201 Created` with the answer and a `Location`, DELETE the Location at the end.

    whip_client.py publish --url http://127.0.0.1:PORT/whip/v1/ROOM --token JWT --seconds 10
    whip_client.py play --url http://127.0.0.1:PORT/whep/v1/ROOM/IDENTITY --token JWT \
        --expect-audio-frames 50 --expect-video-frames 20 --timeout 30

`publish` sends a 440 Hz sine (Opus) and a moving bar (VP8, 320x240 at 15 fps).
`play` offers recvonly audio and video and counts decoded frames per kind.

Output (stdout): one JSON line per event, then one summary line
`{"type": "summary", "ok": ..., ...}`. Exit codes: 0 ok; 2 the POST was refused
(the summary has `status` and `body`) or failed; 3 connected but expectations
unmet; 4 never connected.
"""

import argparse
import asyncio
import fractions
import json
import math
import sys
import time
import urllib.error
import urllib.request
from urllib.parse import urljoin

import numpy as np
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCPeerConnection,
    RTCSessionDescription,
)
from av import AudioFrame, VideoFrame

T0 = time.monotonic()


def emit(obj):
    obj.setdefault("type", "event")
    obj["t_ms"] = int((time.monotonic() - T0) * 1000)
    print(json.dumps(obj), flush=True)


class Sine(MediaStreamTrack):
    kind = "audio"

    def __init__(self, freq=440.0, rate=48000):
        super().__init__()
        self.freq, self.rate, self.n, self.start = freq, rate, 0, None

    async def recv(self):
        per_frame = self.rate // 50
        if self.start is None:
            self.start = time.monotonic()
        wait = self.start + self.n / self.rate - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        t = (np.arange(per_frame) + self.n) / self.rate
        pcm = (0.3 * 32767 * np.sin(2 * math.pi * self.freq * t)).astype(np.int16)
        frame = AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts = self.rate, self.n
        frame.time_base = fractions.Fraction(1, self.rate)
        self.n += per_frame
        return frame


class Bars(MediaStreamTrack):
    kind = "video"

    def __init__(self, width=320, height=240, fps=15):
        super().__init__()
        self.w, self.h, self.fps, self.i, self.start = width, height, fps, 0, None

    async def recv(self):
        if self.start is None:
            self.start = time.monotonic()
        wait = self.start + self.i / self.fps - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        img = np.zeros((self.h, self.w, 3), dtype=np.uint8)
        img[:, :, 2] = np.linspace(0, 255, self.w, dtype=np.uint8)[None, :]
        x = (self.i * 8) % self.w
        img[:, x : x + 16, 0:2] = 255
        frame = VideoFrame.from_ndarray(img, format="rgb24")
        frame.pts, frame.time_base = self.i * 6000, fractions.Fraction(1, 90000)
        self.i += 1
        return frame


def http(method, url, body=None, headers=None):
    """(status, headers, body) of one request; HTTP errors are answers too."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=15) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def auth(token):
    return {"Authorization": "Bearer " + token} if token else {}


async def exchange(pc, url, token):
    """POSTs the local offer; returns (status, headers, body text)."""
    # aiortc gathers every candidate inside setLocalDescription (no trickle).
    await pc.setLocalDescription(await pc.createOffer())
    headers = {"Content-Type": "application/sdp", **auth(token)}
    status, rh, body = await asyncio.to_thread(
        http, "POST", url, pc.localDescription.sdp.encode(), headers
    )
    rh = {k.lower(): v for k, v in rh.items()}
    return status, rh, body.decode(errors="replace")


async def wait_connected(pc, timeout):
    deadline = time.monotonic() + timeout
    while pc.connectionState not in ("connected", "failed", "closed"):
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    return pc.connectionState


async def run(args):
    # No STUN server: aiortc's default is a public one, and nothing here leaves the machine.
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    counts = {"audio": 0, "video": 0}
    video_size = None
    if args.cmd == "publish":
        pc.addTransceiver(Sine(), direction="sendonly")
        pc.addTransceiver(Bars(), direction="sendonly")
    else:
        pc.addTransceiver("audio", direction="recvonly")
        pc.addTransceiver("video", direction="recvonly")

        async def consume(track):
            nonlocal video_size
            while True:
                try:
                    frame = await track.recv()
                except Exception:
                    return
                counts[track.kind] += 1
                if track.kind == "video":
                    video_size = [frame.width, frame.height]
                    if counts["video"] == 1:
                        emit({"event": "first_video_frame", "size": video_size})
                elif counts["audio"] == 1:
                    emit({"event": "first_audio_frame"})

        pc.on("track", lambda t: asyncio.ensure_future(consume(t)))

    status, headers, body = await exchange(pc, args.url, args.token)
    summary = {"type": "summary", "status": status}
    if status != 201:
        summary.update(ok=False, body=body, exit_code=2)
        await pc.close()
        return summary
    location = headers.get("location")
    emit(
        {
            "event": "created",
            "location": location,
            "etag": headers.get("etag"),
            "link": headers.get("link"),
            "content_type": headers.get("content-type"),
        }
    )
    await pc.setRemoteDescription(RTCSessionDescription(sdp=body, type="answer"))
    state = await wait_connected(pc, args.timeout)
    emit({"event": "connection", "state": state})
    deadline = T0 + args.timeout
    if state == "connected":
        if args.cmd == "publish":
            await asyncio.sleep(max(0.0, min(args.seconds, deadline - time.monotonic())))
        else:
            while time.monotonic() < deadline and (
                counts["audio"] < args.expect_audio_frames
                or counts["video"] < args.expect_video_frames
            ):
                await asyncio.sleep(0.1)
    summary.update(location=location, connection_state=state, frames=counts)
    if video_size:
        summary["video_size"] = video_size
    if location and not args.keep:
        res = urljoin(args.url, location)
        st, _, _ = await asyncio.to_thread(http, "DELETE", res, None, auth(args.token))
        summary["delete_status"] = st
    await pc.close()
    if state != "connected":
        summary.update(ok=False, exit_code=4)
    elif args.cmd == "play" and (
        counts["audio"] < args.expect_audio_frames or counts["video"] < args.expect_video_frames
    ):
        summary.update(ok=False, exit_code=3)
    else:
        summary.update(ok=True, exit_code=0)
    return summary


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("publish", "play"):
        p = sub.add_parser(name)
        p.add_argument("--url", required=True)
        p.add_argument("--token")
        p.add_argument("--timeout", type=float, default=30)
        p.add_argument("--keep", action="store_true", help="no DELETE at the end")
        if name == "publish":
            p.add_argument("--seconds", type=float, default=10)
        else:
            p.add_argument("--expect-audio-frames", type=int, default=1)
            p.add_argument("--expect-video-frames", type=int, default=1)
    args = ap.parse_args()
    summary = asyncio.run(run(args))
    print(json.dumps(summary), flush=True)
    sys.exit(summary["exit_code"])


if __name__ == "__main__":
    main()
