#!/usr/bin/env python3
"""Drives the LiveKit RoomService API (Twirp) with the official `livekit-api` package.

Conclave's integration tests use it to check that the real server SDK works against
Conclave: it runs a list of operations in order and prints one JSON line per operation.

Install: the venv from `scripts/install-test-deps` (CONCLAVE_LK_VENV).

    $CONCLAVE_LK_VENV/bin/python tests/clients/room_service.py --url http://127.0.0.1:PORT \
        --key APIxxx --secret SECRET \
        '[{"op": "create_room", "name": "r1", "empty_timeout": 60},
          {"op": "list_rooms"},
          {"op": "list_participants", "room": "r1"}]'

Operations ("op", then the request fields, names as in the protobuf):
  create_room {name, empty_timeout, departure_timeout, max_participants, metadata}
  list_rooms {names}            delete_room {room}
  list_participants {room}      get_participant {room, identity}
  remove_participant {room, identity}
  mute_published_track {room, identity, track_sid, muted}
  update_participant {room, identity, metadata, name, attributes}
  update_subscriptions {room, identity, track_sids, subscribe}
  send_data {room, data (text), kind ("RELIABLE"|"LOSSY"), destination_identities, topic}
  update_room_metadata {room, metadata}
Per operation, optionally:
  "key"/"secret": other credentials (e.g. a wrong key);
  "grants": {VideoGrants fields, snake_case}: call with a token that has exactly these
            grants (via LiveKitAPI(token=...)), e.g. to check a missing grant.

Output (stdout), one line per operation, in order:
  {"op": "list_rooms", "ok": true, "result": {...protobuf as JSON, proto field names...}}
  {"op": "get_participant", "ok": false, "code": "not_found", "status": 404, "message": "..."}
Exit codes: 0 every operation ran (errors included, they are results); 64 usage error.
"""

import argparse
import asyncio
import json
import sys

from google.protobuf.json_format import MessageToDict
from livekit import api
from livekit.protocol import models, room as room_pb

EXIT_USAGE = 64


def emit(obj):
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def request(op):
    """(service method name, request message) for one operation."""
    kind = op["op"]
    if kind == "create_room":
        return "create_room", api.CreateRoomRequest(
            name=op["name"],
            empty_timeout=op.get("empty_timeout", 0),
            departure_timeout=op.get("departure_timeout", 0),
            max_participants=op.get("max_participants", 0),
            metadata=op.get("metadata", ""),
        )
    if kind == "list_rooms":
        return "list_rooms", api.ListRoomsRequest(names=op.get("names", []))
    if kind == "delete_room":
        return "delete_room", api.DeleteRoomRequest(room=op["room"])
    if kind == "list_participants":
        return "list_participants", api.ListParticipantsRequest(room=op["room"])
    if kind in ("get_participant", "remove_participant"):
        return kind, api.RoomParticipantIdentity(room=op["room"], identity=op["identity"])
    if kind == "mute_published_track":
        return kind, api.MuteRoomTrackRequest(
            room=op["room"],
            identity=op["identity"],
            track_sid=op["track_sid"],
            muted=op.get("muted", True),
        )
    if kind == "update_participant":
        return kind, api.UpdateParticipantRequest(
            room=op["room"],
            identity=op["identity"],
            metadata=op.get("metadata", ""),
            name=op.get("name", ""),
            attributes=op.get("attributes", {}),
        )
    if kind == "update_subscriptions":
        return kind, api.UpdateSubscriptionsRequest(
            room=op["room"],
            identity=op["identity"],
            track_sids=op.get("track_sids", []),
            subscribe=op.get("subscribe", True),
        )
    if kind == "send_data":
        req = api.SendDataRequest(
            room=op["room"],
            data=op.get("data", "").encode(),
            kind=models.DataPacket.Kind.Value(op.get("kind", "RELIABLE")),
            destination_identities=op.get("destination_identities", []),
        )
        if "topic" in op:
            req.topic = op["topic"]
        return kind, req
    if kind == "update_room_metadata":
        return kind, room_pb.UpdateRoomMetadataRequest(room=op["room"], metadata=op["metadata"])
    raise ValueError(f"unknown op {kind!r}")


async def run_op(args, op):
    method, req = request(op)
    key = op.get("key", args.key)
    secret = op.get("secret", args.secret)
    if "grants" in op:
        token = api.AccessToken(key, secret).with_grants(api.VideoGrants(**op["grants"])).to_jwt()
        lkapi = api.LiveKitAPI(args.url, token=token)
    else:
        lkapi = api.LiveKitAPI(args.url, key, secret)
    try:
        result = await getattr(lkapi.room, method)(req)
        return {
            "op": op["op"],
            "ok": True,
            "result": MessageToDict(result, preserving_proto_field_name=True),
        }
    except api.TwirpError as e:
        return {
            "op": op["op"],
            "ok": False,
            "code": e.code,
            "status": e.status,
            "message": e.message,
        }
    finally:
        await lkapi.aclose()


async def main(args):
    for op in args.ops:
        emit(await run_op(args, op))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="http(s):// or ws(s):// base URL of the server")
    p.add_argument("--key", required=True, help="API key")
    p.add_argument("--secret", required=True, help="API secret")
    p.add_argument("ops", help="JSON list of operations")
    args = p.parse_args(argv)
    try:
        args.ops = json.loads(args.ops)
        if not isinstance(args.ops, list) or not all(isinstance(o, dict) and "op" in o for o in args.ops):
            raise ValueError("expected a list of objects with an 'op'")
        for op in args.ops:
            request(op)
    except (ValueError, KeyError) as e:
        p.print_usage(sys.stderr)
        print(f"room_service.py: bad operations: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    return args


if __name__ == "__main__":
    asyncio.run(main(parse_args(sys.argv[1:])))
