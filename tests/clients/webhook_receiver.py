#!/usr/bin/env python3
"""A LiveKit webhook receiver for Conclave's integration tests.

Every POST is checked with the official `livekit-api` verifier,
`WebhookReceiver(TokenVerifier(key, secret)).receive(body, Authorization)`: the JWT's
signature, issuer and expiry, and its `sha256` claim against the exact body.

Install: the venv from `scripts/install-test-deps` (CONCLAVE_LK_VENV).

    $CONCLAVE_LK_VENV/bin/python tests/clients/webhook_receiver.py --key APIxxx --secret SECRET

Output (stdout), one JSON line each:
  {"type": "listening", "port": 41234}                       first, once bound
  {"type": "event", "event": "participant_joined", "room": "r1", "room_sid": "RM_...",
   "identity": "alice", "track_sid": "", "disconnect_reason": "", "id": "EV_...",
   "created_at": 1700000000, "content_type": "application/webhook+json",
   "authorization_has_bearer": false}                         per verified event
  {"type": "rejected", "error": "..."}                        per POST that failed verification
Answers 200 to verified events, 401 to rejected ones, and 503 to the first --fail-first
POSTs (before verifying them), to exercise the sender's retries.
"""

import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from google.protobuf.json_format import MessageToDict
from livekit import api

LOCK = threading.Lock()


def emit(obj):
    with LOCK:
        sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
        sys.stdout.flush()


def make_handler(receiver, fail_first):
    state = {"failed": 0}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt, *a):  # quiet: stdout is for results
            sys.stderr.write("webhook_receiver: " + (fmt % a) + "\n")

        def reply(self, status):
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_POST(self):
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length).decode("utf-8")
            with LOCK:
                fail = state["failed"] < fail_first
                if fail:
                    state["failed"] += 1
            if fail:
                emit({"type": "failed_on_purpose"})
                self.reply(503)
                return
            auth = self.headers.get("Authorization", "")
            try:
                event = receiver.receive(body, auth)
            except Exception as e:  # noqa: BLE001 - any failure is a rejection
                emit({"type": "rejected", "error": f"{type(e).__name__}: {e}"})
                self.reply(401)
                return
            d = MessageToDict(event, preserving_proto_field_name=True)
            emit(
                {
                    "type": "event",
                    "event": event.event,
                    "room": event.room.name,
                    "room_sid": event.room.sid,
                    "identity": event.participant.identity,
                    "participant_sid": event.participant.sid,
                    "track_sid": event.track.sid,
                    "disconnect_reason": d.get("participant", {}).get("disconnect_reason", ""),
                    "id": event.id,
                    "created_at": event.created_at,
                    "content_type": self.headers.get("Content-Type", ""),
                    "authorization_has_bearer": auth.lower().startswith("bearer "),
                }
            )
            self.reply(200)

    return Handler


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--key", required=True, help="API key the events must be signed for")
    p.add_argument("--secret", required=True, help="API secret")
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0 = any free one)")
    p.add_argument("--fail-first", type=int, default=0, help="answer 503 to this many POSTs first")
    args = p.parse_args()
    receiver = api.WebhookReceiver(api.TokenVerifier(args.key, args.secret))
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(receiver, args.fail_first))
    emit({"type": "listening", "port": server.server_address[1]})
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
