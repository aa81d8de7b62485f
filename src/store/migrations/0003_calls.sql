-- MatrixRTC calls: one row per (Matrix room, application, call id) while active, kept after.
CREATE TABLE rtc_call (
    call_key     INTEGER PRIMARY KEY AUTOINCREMENT,
    room_id      TEXT NOT NULL,
    application  TEXT NOT NULL,
    call_id      TEXT NOT NULL,
    started_by   TEXT NOT NULL,
    started_ts   INTEGER NOT NULL,
    ended_ts     INTEGER,
    peak_members INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX rtc_call_active ON rtc_call (room_id, application, call_id)
    WHERE ended_ts IS NULL;

-- Call members per (user, device, membership id), from call.member / rtc.member events.
CREATE TABLE rtc_call_member (
    call_key       INTEGER NOT NULL REFERENCES rtc_call (call_key),
    room_id        TEXT NOT NULL,
    member_key     TEXT NOT NULL,
    user_id        TEXT NOT NULL,
    device_id      TEXT NOT NULL,
    membership_id  TEXT NOT NULL,
    focus_active   TEXT NOT NULL,
    foci_preferred TEXT NOT NULL,
    event_id       TEXT NOT NULL,
    joined_ts      INTEGER NOT NULL,
    expires_ts     INTEGER,
    left_ts        INTEGER,
    PRIMARY KEY (call_key, member_key)
);
CREATE INDEX rtc_call_member_active ON rtc_call_member (room_id, member_key) WHERE left_ts IS NULL;
