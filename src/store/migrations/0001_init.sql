-- Appservice transactions already applied (Synapse retries a txnId until it gets 200).
CREATE TABLE appservice_txn_processed (
    txn_id       TEXT PRIMARY KEY,
    event_count  INTEGER NOT NULL,
    processed_ts INTEGER NOT NULL
);

-- Current m.room.member state per (room, user), as seen through transactions.
CREATE TABLE room_user_membership (
    room_id          TEXT NOT NULL,
    user_id          TEXT NOT NULL,
    membership       TEXT NOT NULL,
    event_id         TEXT NOT NULL,
    origin_server_ts INTEGER NOT NULL,
    PRIMARY KEY (room_id, user_id)
);

-- Every membership event applied, in order (no uniqueness on purpose: an event applied twice
-- would show here, which is what the exactly-once tests look for).
CREATE TABLE membership_event_log (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    txn_id           TEXT NOT NULL,
    event_id         TEXT NOT NULL,
    room_id          TEXT NOT NULL,
    user_id          TEXT NOT NULL,
    membership       TEXT NOT NULL,
    origin_server_ts INTEGER NOT NULL
);
CREATE INDEX membership_event_log_event ON membership_event_log (event_id);
