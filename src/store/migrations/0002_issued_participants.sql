-- SFU participants issued a token with an MSC4140 delayed leave event (delay_id): Conclave
-- restarts the delayed event while they are connected and sends it when they disconnect.
CREATE TABLE sfu_participant_delayed_leave (
    room_name        TEXT NOT NULL,
    identity         TEXT NOT NULL,
    matrix_room_id   TEXT NOT NULL,
    user_id          TEXT NOT NULL,
    device_id        TEXT NOT NULL,
    delay_id         TEXT NOT NULL,
    delay_timeout_ms INTEGER NOT NULL,
    issued_ts        INTEGER NOT NULL,
    PRIMARY KEY (room_name, identity)
);
