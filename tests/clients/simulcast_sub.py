#!/usr/bin/env python3
"""Simulcast subscriber for Conclave's tests (official LiveKit Python SDK).

Joins with --token (on v0 with --dual-pc, v1 with --single-pc), waits for a remote simulcast
video track, then:
  1. asks for LOW quality (update_track_settings) and records decoded frame sizes;
  2. asks for HIGH quality and records sizes, and the longest gap between frames;
  3. unsubscribes (set_subscribed(False)) and counts frames that still arrive.
Prints one JSON line: {"low": [w, h], "high": [w, h], "max_gap_ms": n,
"frames_after_unsubscribe": n, "error": null|str}.
"""
import argparse
import asyncio
import collections
import json
import sys
import time

from livekit import rtc


async def main(args):
    out = {"low": None, "high": None, "max_gap_ms": None,
           "frames_after_unsubscribe": None, "error": None}
    room = rtc.Room()
    got = asyncio.get_running_loop().create_future()

    @room.on("track_subscribed")
    def on_track(track, publication, participant):
        if track.kind == rtc.TrackKind.KIND_VIDEO and not got.done():
            got.set_result((track, publication))

    try:
        opts = rtc.RoomOptions(auto_subscribe=True)
        if args.single_pc is not None:
            opts.single_peer_connection = args.single_pc
        await room.connect(args.url, args.token, opts)
        track, publication = await asyncio.wait_for(got, args.timeout)
        sizes = []  # (t, w, h)
        stream = rtc.VideoStream(track)

        async def pump():
            async for ev in stream:
                sizes.append((time.monotonic(), ev.frame.width, ev.frame.height))

        task = asyncio.create_task(pump())

        def common(since):
            c = collections.Counter((w, h) for t, w, h in sizes if t >= since)
            return list(c.most_common(1)[0][0]) if c else None

        await asyncio.sleep(2.0)
        publication.set_video_quality(rtc.VideoQuality.VIDEO_QUALITY_LOW)
        t_low = time.monotonic()
        await asyncio.sleep(args.phase)
        out["low"] = common(t_low + args.settle)
        publication.set_video_quality(rtc.VideoQuality.VIDEO_QUALITY_HIGH)
        t_high = time.monotonic()
        await asyncio.sleep(args.phase)
        out["high"] = common(t_high + args.settle)
        times = [t for t, _, _ in sizes if t >= t_low]
        gaps = [b - a for a, b in zip(times, times[1:])]
        out["max_gap_ms"] = int(max(gaps) * 1000) if gaps else None
        publication.set_subscribed(False)
        await asyncio.sleep(1.0)
        n0 = len(sizes)
        await asyncio.sleep(2.0)
        out["frames_after_unsubscribe"] = len(sizes) - n0
        task.cancel()
    except Exception as e:  # reported, not raised: the test reads the JSON
        out["error"] = f"{type(e).__name__}: {e}"
    finally:
        await room.disconnect()
    print(json.dumps(out), flush=True)
    return 0 if out["error"] is None else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--timeout", type=float, default=20.0)
    ap.add_argument("--phase", type=float, default=4.0)
    ap.add_argument("--settle", type=float, default=1.5)
    pc = ap.add_mutually_exclusive_group()
    pc.add_argument("--single-pc", dest="single_pc", action="store_true", default=None,
                    help="v1 /rtc/v1, one peer connection (default: the SDK's choice)")
    pc.add_argument("--dual-pc", dest="single_pc", action="store_false",
                    help="v0 /rtc, two peer connections")
    sys.exit(asyncio.run(main(ap.parse_args())))
