-- The latest m.room.server_acl of each room: a peer Conclave's relay is granted and kept only
-- while the room's ACL allows the peer's server (docs/cascade.md).
CREATE TABLE room_server_acl (
    room_id  TEXT PRIMARY KEY,
    content  TEXT NOT NULL,
    event_id TEXT NOT NULL
);
