-- Rooms with m.room.encryption: their rtc.member events are unreadable to the appservice, so
-- Matrix room membership alone decides who may stay in their calls.
CREATE TABLE room_encryption (
    room_id   TEXT PRIMARY KEY,
    algorithm TEXT NOT NULL,
    event_id  TEXT NOT NULL
);
