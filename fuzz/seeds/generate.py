#!/usr/bin/env python3
"""Writes the seed inputs in fuzz/seeds/<target>/ (small valid requests the fuzzer mutates).

Protobuf is encoded by hand (field numbers from livekit-protocol 0.8's .proto files) so that
this needs nothing but Python. Run from fuzz/: `python3 seeds/generate.py`.
"""
import base64
import gzip
import json
import os
import struct


def varint(n):
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def vi(field, n):
    return varint(field << 3) + varint(n)


def ld(field, payload):
    if isinstance(payload, str):
        payload = payload.encode()
    return varint(field << 3 | 2) + varint(len(payload)) + payload


def write(target, name, data):
    d = os.path.join(os.path.dirname(__file__), target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


SDP = "\r\n".join([
    "v=0", "o=- 1 2 IN IP4 127.0.0.1", "s=-", "t=0 0", "a=group:BUNDLE 0 1",
    "a=msid-semantic: WMS *",
    "m=audio 9 UDP/TLS/RTP/SAVPF 111", "c=IN IP4 0.0.0.0", "a=rtcp:9 IN IP4 0.0.0.0",
    "a=ice-ufrag:abcd", "a=ice-pwd:abcdefghijklmnopqrstuvwx", "a=ice-options:trickle",
    "a=fingerprint:sha-256 " + ":".join(["AB"] * 32), "a=setup:actpass", "a=mid:0",
    "a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level", "a=sendonly",
    "a=msid:s a1", "a=rtcp-mux", "a=rtpmap:111 opus/48000/2", "a=fmtp:111 minptime=10;useinbandfec=1",
    "a=ssrc:1111 cname:c",
    "m=video 9 UDP/TLS/RTP/SAVPF 96", "c=IN IP4 0.0.0.0", "a=ice-ufrag:abcd",
    "a=ice-pwd:abcdefghijklmnopqrstuvwx", "a=fingerprint:sha-256 " + ":".join(["AB"] * 32),
    "a=setup:actpass", "a=mid:1", "a=sendonly", "a=msid:s v1", "a=rtcp-mux", "a=rtcp-rsize",
    "a=rtpmap:96 VP8/90000", "a=rtcp-fb:96 nack", "a=rtcp-fb:96 nack pli",
    "a=rid:q send", "a=rid:h send", "a=simulcast:send q;h", "",
])

# signal_request: SignalRequest oneof fields.
sd_offer = ld(1, "offer") + ld(2, SDP) + vi(3, 1)
write("signal_request", "offer", ld(1, sd_offer))
write("signal_request", "answer", ld(2, ld(1, "answer") + ld(2, SDP.replace("sendonly", "recvonly"))))
write("signal_request", "trickle", ld(3, ld(1, json.dumps({
    "candidate": "candidate:1 1 udp 2130706431 10.0.0.1 5000 typ host",
    "sdpMid": "0", "sdpMLineIndex": 0})) + vi(2, 0)))
write("signal_request", "add_track_audio", ld(4, ld(1, "a1") + ld(2, "mic") + vi(3, 0) + vi(8, 2)))
layer = vi(1, 2) + vi(2, 1280) + vi(3, 720) + vi(4, 1_000_000)
write("signal_request", "add_track_video", ld(4, ld(1, "v1") + ld(2, "cam") + vi(3, 1) + vi(4, 1280)
                                             + vi(5, 720) + vi(8, 1) + ld(9, layer)
                                             + ld(10, ld(1, "video/VP8") + ld(2, "v1"))))
write("signal_request", "mute", ld(5, ld(1, "TR_x") + vi(2, 1)))
write("signal_request", "subscription", ld(6, ld(1, "TR_x") + vi(2, 1)))
write("signal_request", "track_setting", ld(7, ld(1, "TR_x") + vi(3, 0) + vi(4, 2) + vi(5, 640) + vi(6, 360)))
write("signal_request", "leave", ld(8, vi(1, 1) + vi(2, 1)))
write("signal_request", "update_metadata", ld(15, ld(1, "m") + ld(2, "n") + ld(3, ld(1, "k") + ld(2, "v"))))
write("signal_request", "ping_req", ld(16, vi(1, 1_700_000_000_000) + vi(2, 20)))
write("signal_request", "json_add_track", json.dumps({"addTrack": {"cid": "a1", "name": "mic", "type": "AUDIO"}}))

# appservice_txn: transaction bodies.
room, user = "!r:example.org", "@alice:example.org"
base = {"room_id": room, "sender": user, "event_id": "$e", "origin_server_ts": 1_000_000}
call_member = dict(base, type="org.matrix.msc3401.call.member", state_key="_@alice:example.org_DEV_m.call",
                   content={"application": "m.call", "call_id": "", "scope": "m.room", "device_id": "DEV",
                            "expires": 60_000, "focus_active": {"type": "livekit", "focus_selection": "oldest_membership"},
                            "foci_preferred": [{"type": "livekit", "livekit_service_url": "https://x.example"}],
                            "membershipID": "m1"})
rtc_member = dict(base, type="org.matrix.msc4143.rtc.member", msc4354_sticky={"duration_ms": 60_000},
                  content={"slot_id": "m.call#ROOM", "application": {"type": "m.call"},
                           "member": {"user_id": user, "device_id": "DEV", "id": "mem1"},
                           "msc4354_sticky_key": "mem1", "rtc_transports": [{"type": "livekit"}]})
member = dict(base, type="m.room.member", state_key=user, content={"membership": "join"})
message = dict(base, type="m.room.message", content={"msgtype": "m.text", "body": "hi"})
leave = dict(call_member, content={})
write("appservice_txn", "call_member", json.dumps({"events": [call_member]}))
write("appservice_txn", "rtc_member", json.dumps({"events": [rtc_member]}))
write("appservice_txn", "mixed", json.dumps({"events": [member, message, leave, call_member]}))
write("appservice_txn", "empty", json.dumps({"events": [], "ephemeral": []}))

# token_request: /get_token and /sfu/get bodies.
openid = {"access_token": "t", "token_type": "Bearer", "matrix_server_name": "example.org", "expires_in": 3600}
write("token_request", "get_token", json.dumps({
    "room_id": room, "slot_id": "m.call#ROOM", "openid_token": openid,
    "member": {"id": "mem1", "claimed_user_id": user, "claimed_device_id": "DEV"},
    "delay_id": "d", "delay_timeout": 10_000, "delay_cs_api_url": "https://x.example"}))
write("token_request", "sfu_get", json.dumps({
    "room": room, "openid_token": openid, "device_id": "DEV", "delay_id": "d", "delay_timeout": 10_000}))

# twirp_body: RoomService requests, protobuf and protojson.
write("twirp_body", "create_room.pb", ld(1, "r") + vi(2, 5) + vi(3, 2) + ld(5, "meta") + vi(10, 7))
write("twirp_body", "create_room.json", json.dumps({"name": "r", "emptyTimeout": 5, "departureTimeout": 7,
                                                    "maxParticipants": 2, "metadata": "m"}))
write("twirp_body", "list_rooms.json", json.dumps({"names": ["r", "s"]}))
write("twirp_body", "room_identity.pb", ld(1, "r") + ld(2, "alice"))
write("twirp_body", "mute_track.json", json.dumps({"room": "r", "identity": "alice", "trackSid": "TR_x", "muted": True}))
write("twirp_body", "update_participant.json", json.dumps({
    "room": "r", "identity": "alice", "metadata": "m", "name": "A", "attributes": {"k": "v"},
    "permission": {"canSubscribe": True, "canPublish": False, "canPublishData": True,
                   "canPublishSources": ["CAMERA", "MICROPHONE"]}}))
write("twirp_body", "update_subscriptions.json", json.dumps({
    "room": "r", "identity": "alice", "trackSids": ["TR_x"], "subscribe": True,
    "participantTracks": [{"participantSid": "PA_x", "trackSids": ["TR_y"]}]}))
write("twirp_body", "send_data.json", json.dumps({
    "room": "r", "data": "aGVsbG8=", "kind": "RELIABLE", "destinationIdentities": ["alice"], "topic": "t"}))
write("twirp_body", "send_data.pb", ld(1, "r") + ld(2, b"hello") + vi(3, 0) + ld(6, "alice") + ld(5, "t"))

# datagram: the first byte picks the source (1: the peer that passed ICE), the rest is the
# datagram: a DTLS ClientHello record head, RTP (VP8 payload type, SSRC 7), an RTCP receiver
# report, a STUN binding request with no credentials.
dtls = bytes([22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
rtp = bytes([0x80, 96, 0, 1, 0, 0, 0, 1, 0, 0, 0, 7]) + bytes([0x90, 0x80, 0x00, 0x9d, 0x01, 0x2a])
rtcp_rr = bytes([0x81, 201, 0, 7, 0, 0, 0, 1, 0, 0, 0, 7] + [0] * 20)
stun = bytes([0, 1, 0, 0, 0x21, 0x12, 0xA4, 0x42] + [7] * 12)
for name, body in [("dtls", dtls), ("rtp", rtp), ("rtcp_rr", rtcp_rr), ("stun", stun)]:
    write("datagram", name, bytes([1]) + body)
# join_request: /rtc/v1's query parameter (text: base64 of a WrappedJoinRequest) and the
# WrappedJoinRequest protobuf itself (*.pb); the target decodes each input both ways.
client_info = vi(1, 1) + ld(2, "2.21.0") + vi(3, 16) + ld(7, "Chrome") + vi(12, 1)  # sdk JS
connection_settings = vi(1, 1) + vi(2, 1)  # auto_subscribe, adaptive_stream
placeholders = SDP.replace("sendonly", "recvonly")
join = (ld(1, client_info) + ld(2, connection_settings) + ld(3, "meta")
        + ld(4, ld(1, "k") + ld(2, "v"))
        + ld(5, ld(1, "a1") + ld(2, "mic") + vi(3, 0) + vi(8, 2))
        + ld(6, ld(1, "offer") + ld(2, placeholders) + vi(3, 1)))
none = ld(2, join)  # compression NONE (0) is the default: not written
gz = vi(1, 1) + ld(2, gzip.compress(join, mtime=0))


def js_base64(b):
    """client-sdk-js: btoa, then + and / swapped for - and _, padding kept."""
    return base64.b64encode(b).decode().replace("+", "-").replace("/", "_")


write("join_request", "js_gzip", js_base64(gz))
write("join_request", "rust_none", base64.urlsafe_b64encode(none).decode())
write("join_request", "unpadded_gzip", base64.urlsafe_b64encode(gz).decode().rstrip("="))
write("join_request", "standard_none", base64.b64encode(none).decode())
write("join_request", "wrapped_none.pb", none)
write("join_request", "wrapped_gzip.pb", gz)
write("join_request", "empty_request", base64.urlsafe_b64encode(ld(2, b"")).decode())
# turn_message: TURN requests, indications and ChannelData (the target splits at FE FE).


def turn(method_type, attrs):
    body = b""
    for t, v in attrs:
        body += struct.pack(">HH", t, len(v)) + v + b"\0" * ((4 - len(v) % 4) % 4)
    return struct.pack(">HHI", method_type, len(body), 0x2112A442) + bytes(range(12)) + body


cookie = [0x21, 0x12, 0xA4, 0x42]
xor_peer = struct.pack(">BBH", 0, 1, 9 ^ 0x2112) + bytes(a ^ b for a, b in zip([127, 0, 0, 1], cookie))
channel_data = struct.pack(">HH", 0x4000, 5) + b"12345\0\0\0"
for name, body in [
    ("allocate_unsigned", turn(0x0003, [(0x0019, bytes([17, 0, 0, 0]))])),
    ("refresh", turn(0x0004, [(0x000D, struct.pack(">I", 600))])),
    ("create_permission", turn(0x0008, [(0x0012, xor_peer)])),
    ("channel_bind", turn(0x0009, [(0x000C, struct.pack(">HH", 0x4001, 0)), (0x0012, xor_peer)])),
    ("send_indication", turn(0x0016, [(0x0012, xor_peer), (0x0013, b"hello media")])),
    ("binding", turn(0x0001, [])),
    ("channel_data", channel_data),
    ("several", turn(0x0016, [(0x0012, xor_peer), (0x0013, b"a")]) + b"\xfe\xfe" + channel_data),
]:
    write("turn_message", name, body)

# whip_sdp: a WHIP offer (audio, three-layer simulcast video), a trickle and a restart fragment.
write("whip_sdp", "offer.sdp", 'v=0\no=- 1 2 IN IP4 127.0.0.1\ns=-\nt=0 0\na=group:BUNDLE 0 1\nm=audio 9 UDP/TLS/RTP/SAVPF 111\nc=IN IP4 0.0.0.0\na=ice-ufrag:EsAw\na=ice-pwd:bP+XJMM09aR8AiX1jdukzR6Y\na=fingerprint:sha-256 DA:7B:57:DC:28:CE:04:4F:31:79:85:C4:31:67:EB:27:58:29:ED:77:2A:0D:24:AE:ED:AD:30:BC:BD:F1:9C:02\na=setup:actpass\na=mid:0\na=sendonly\na=msid:- a\na=rtcp-mux\na=rtpmap:111 opus/48000/2\na=candidate:1 1 udp 2130706431 127.0.0.1 5000 typ host\nm=video 9 UDP/TLS/RTP/SAVPF 96 97\nc=IN IP4 0.0.0.0\na=mid:1\na=sendonly\na=msid:- v\na=rtcp-mux\na=rtpmap:96 VP8/90000\na=rtpmap:97 rtx/90000\na=fmtp:97 apt=96\na=rid:q send\na=rid:h send\na=rid:f send\na=simulcast:send q;h;f\n')
write("whip_sdp", "trickle.frag", 'a=ice-ufrag:EsAw\na=ice-pwd:bP+XJMM09aR8AiX1jdukzR6Y\nm=audio 9 UDP/TLS/RTP/SAVPF 0\na=mid:0\na=candidate:1 1 udp 2130706431 127.0.0.1 5000 typ host\na=end-of-candidates\n')
write("whip_sdp", "restart.frag", 'a=ice-ufrag:new1\na=ice-pwd:newpasswordnewpasswordxx\n')
