//! Room lifetime tests through the engine's public API: creation (idempotent), metadata,
//! deletion, `max_participants`, and expiry after `empty_timeout` / `departure_timeout`
//! driven as a timer on a virtual clock. No sockets, no sleeps.

use super::*;
use crate::sfu::registry::{RoomOptions, RoomRegistry};

const MS: Duration = Duration::from_millis(1);

fn sfu(now: Instant) -> Sfu {
    let mut s = Sfu::new(
        SfuConfig {
            candidates: vec!["127.0.0.1:7882".parse().unwrap()],
            seed: Some(11),
            ..Default::default()
        },
        now,
    );
    s.set_unix_time(1_700_000_000);
    s
}

fn opts(empty: u64, departure: u64, max: u32) -> RoomOptions {
    RoomOptions {
        empty_timeout: Duration::from_secs(empty),
        departure_timeout: Duration::from_secs(departure),
        max_participants: max,
    }
}

fn join(s: &mut Sfu, now: Instant, session: u64, room: &str, identity: &str) {
    let permission = super::tests::publish_permission();
    s.handle_command(
        now,
        super::tests::join_command(session, room, identity, permission, false),
    );
}

/// Everything one drain (until `Output::Timeout`) produced.
#[derive(Default)]
struct Drained {
    /// Signals in order: `Some(message)` or `None` for `Close`.
    signals: Vec<(u64, Option<Msg>)>,
    events: Vec<SfuEvent>,
    timeout: Option<Instant>,
}

impl Drained {
    fn to(&self, session: u64) -> Vec<&Option<Msg>> {
        self.signals
            .iter()
            .filter(|(id, _)| *id == session)
            .map(|(_, m)| m)
            .collect()
    }
}

fn drain(s: &mut Sfu) -> Drained {
    let mut d = Drained::default();
    loop {
        match s.poll_output() {
            Output::Timeout(t) => {
                d.timeout = Some(t);
                return d;
            }
            Output::Signal(id, SignalOut::Message(m)) => d.signals.push((id.0, Some(*m))),
            Output::Signal(id, SignalOut::Close) => d.signals.push((id.0, None)),
            Output::Event(e) => d.events.push(e),
            Output::Transmit(_) => {}
        }
    }
}

/// Follows the caller contract up to `until`: drains, and wakes the engine only at the
/// timeouts it asked for (never on its own), as long as they are not after `until`.
/// Returns the events seen on the way.
fn run_until(s: &mut Sfu, until: Instant) -> Vec<SfuEvent> {
    let mut events = Vec::new();
    for _ in 0..100_000 {
        let d = drain(s);
        events.extend(d.events);
        let t = d.timeout.expect("drain ends with a timeout");
        if t > until {
            return events;
        }
        s.handle_timeout(t);
    }
    panic!("engine timers did not settle before {until:?}");
}

fn names(s: &Sfu) -> Vec<String> {
    s.registered_rooms().map(|r| r.name.to_string()).collect()
}

fn record(s: &Sfu, room: &str) -> Option<RegisteredRoom> {
    s.registered_rooms()
        .find(|r| r.name.as_str() == room)
        .cloned()
}

fn is_started(e: &SfuEvent) -> bool {
    matches!(e, SfuEvent::RoomStarted { .. })
}

fn is_finished(e: &SfuEvent) -> bool {
    matches!(e, SfuEvent::RoomFinished { .. })
}

#[test]
fn create_is_idempotent_listed_and_flags_changes() {
    let t0 = Instant::now();
    let mut s = sfu(t0);
    assert!(!s.take_rooms_changed(), "nothing changed yet");
    assert!(names(&s).is_empty());

    assert!(s.create_room(t0, &"b".into(), opts(300, 20, 0)));
    assert!(s.take_rooms_changed(), "a creation is a change");
    assert!(!s.take_rooms_changed(), "taken");

    // Again, later, with other options: refused, the first record stays as it was.
    s.set_unix_time(1_700_000_099);
    assert!(!s.create_room(t0 + Duration::from_secs(1), &"b".into(), opts(5, 1, 3)));
    assert!(
        !s.take_rooms_changed(),
        "an idempotent create changes nothing"
    );
    let b = record(&s, "b").expect("b");
    assert_eq!(b.options, opts(300, 20, 0));
    assert_eq!(b.created_at, t0);
    assert_eq!(b.created_unix, 1_700_000_000);
    assert_eq!(b.participants, 0);
    assert_eq!(b.emptied_at, None);
    assert_eq!(b.metadata, "");

    assert!(s.create_room(t0 + Duration::from_secs(2), &"a".into(), opts(300, 20, 0)));
    assert!(s.take_rooms_changed());
    assert_eq!(names(&s), ["a", "b"], "listed, ordered by name");
    assert_eq!(
        record(&s, "a").unwrap().created_unix,
        1_700_000_099,
        "creation time from the engine's wall clock"
    );

    // What the loop publishes is what the rest of the service reads.
    let view = RoomRegistry::default();
    view.publish_from(0, s.registered_rooms().cloned());
    assert!(view.exists("a", t0 + Duration::from_secs(2)));
    assert_eq!(view.list(t0 + Duration::from_secs(2)).len(), 2);
    assert!(!view.exists("c", t0));

    // Creating does not start the room (no participant): no lifecycle events, no signals.
    let d = drain(&mut s);
    assert!(d.events.is_empty(), "{:?}", d.events);
    assert!(d.signals.is_empty());
}

#[test]
fn a_room_nobody_joins_closes_after_empty_timeout() {
    let t0 = Instant::now();
    let mut s = sfu(t0);
    let deadline = t0 + Duration::from_secs(5);
    assert!(s.create_room(t0, &"r".into(), opts(5, 20, 0)));
    assert!(s.take_rooms_changed());

    // The engine asks to be woken by the deadline (the only timer it has: exactly then).
    let d = drain(&mut s);
    assert!(d.events.is_empty() && d.signals.is_empty());
    assert_eq!(d.timeout, Some(deadline), "woken at the expiry deadline");

    // Following its timeouts up to just before the deadline: still there.
    let events = run_until(&mut s, deadline - 100 * MS);
    assert!(events.is_empty());
    assert_eq!(names(&s), ["r"]);
    // An early (spurious) wake at 4.9 s does not close it either.
    s.handle_timeout(deadline - 100 * MS);
    assert_eq!(names(&s), ["r"]);
    assert!(!s.take_rooms_changed());
    assert!(s.set_room_metadata(deadline - 100 * MS, &"r".into(), "m"));
    assert!(s.take_rooms_changed());

    // Following its timeouts through the deadline: gone.
    let events = run_until(&mut s, deadline);
    assert!(names(&s).is_empty(), "closed at the deadline");
    assert!(s.take_rooms_changed(), "the closing is a change to publish");
    // A room that never started (nobody joined) finishes silently: RoomStarted/RoomFinished
    // are about the engine's live room state, which it never had.
    assert!(events.is_empty(), "{events:?}");
    let d = drain(&mut s);
    assert!(d.events.is_empty() && d.signals.is_empty());
    assert_eq!(
        d.timeout,
        Some(deadline + Duration::from_secs(3600)),
        "nothing scheduled any more"
    );
    assert!(!s.set_room_metadata(deadline, &"r".into(), "x"), "gone");
    // It can be created anew.
    assert!(s.create_room(deadline, &"r".into(), opts(5, 20, 0)));
}

#[test]
fn a_room_everybody_left_closes_after_departure_timeout() {
    let t0 = Instant::now();
    let mut s = sfu(t0);
    let room: RoomName = "r".into();
    assert!(s.create_room(t0, &room, opts(5, 10, 0)));
    join(&mut s, t0 + Duration::from_secs(1), 1, "r", "alice");
    let mut events = drain(&mut s).events;
    let r = record(&s, "r").unwrap();
    assert_eq!(r.participants, 1);
    assert_eq!(r.emptied_at, None);

    // Occupied: stays far past empty_timeout (5 s); 20 s is still inside the 30 s connect
    // deadline, so the participant (whose PCs never connect here) is not dropped. The leave
    // is off the 500 ms speaker grid, so only the expiry timer wakes the engine at the
    // departure deadline.
    let left_at = t0 + Duration::from_millis(20_123);
    events.extend(run_until(&mut s, left_at));
    assert_eq!(names(&s), ["r"], "occupied rooms never close");
    assert_eq!(s.participant_count(&room), 1);
    assert_eq!(record(&s, "r").unwrap().participants, 1);

    s.handle_command(
        left_at,
        Command::Disconnect {
            session: SessionId(1),
            epoch: None,
            reason: lk::DisconnectReason::ClientInitiated,
        },
    );
    let d = drain(&mut s);
    events.extend(d.events.iter().cloned());
    let r = record(&s, "r").expect("kept after the last participant left");
    assert_eq!(r.participants, 0);
    assert_eq!(r.emptied_at, Some(left_at));
    assert!(s.take_rooms_changed());
    let deadline = left_at + Duration::from_secs(10);
    assert!(
        d.timeout.unwrap() <= deadline,
        "woken by the departure deadline: {:?} > {deadline:?}",
        d.timeout
    );
    // The engine drops its live room (and says RoomFinished) when the last participant
    // leaves; the record lives on until departure_timeout.
    assert!(
        d.events.iter().any(is_finished),
        "RoomFinished at the last leave: {:?}",
        d.events
    );

    events.extend(run_until(&mut s, deadline - 100 * MS));
    assert_eq!(names(&s), ["r"], "still there before departure_timeout");
    events.extend(run_until(&mut s, deadline));
    assert!(names(&s).is_empty(), "gone after departure_timeout");
    assert!(s.take_rooms_changed());

    let lifecycle: Vec<&SfuEvent> = events
        .iter()
        .filter(|e| is_started(e) || is_finished(e))
        .collect();
    assert_eq!(lifecycle.len(), 2, "{lifecycle:?}");
    let (SfuEvent::RoomStarted { room: a, sid: sa }, SfuEvent::RoomFinished { room: b, sid: sb }) =
        (lifecycle[0], lifecycle[1])
    else {
        panic!("RoomStarted then RoomFinished: {lifecycle:?}");
    };
    assert_eq!((a, b), (&room, &room));
    assert_eq!(sa, sb, "one room SID");
    assert!(sa.as_str().starts_with("RM_"));
    let left = events
        .iter()
        .position(|e| matches!(e, SfuEvent::ParticipantLeft { .. }))
        .expect("ParticipantLeft");
    let finished = events.iter().position(is_finished).unwrap();
    assert!(
        left < finished,
        "the participant leaves before the room finishes"
    );
}

#[test]
fn a_full_room_refuses_the_next_join() {
    let t0 = Instant::now();
    let mut s = sfu(t0);
    let room: RoomName = "r".into();
    assert!(s.create_room(t0, &room, opts(300, 20, 1)));
    join(&mut s, t0, 1, "r", "alice");
    let d = drain(&mut s);
    assert!(matches!(d.to(1).first(), Some(Some(Msg::Join(_)))));

    join(&mut s, t0 + MS, 2, "r", "bob");
    let d = drain(&mut s);
    // Bob's session is closed without a join response; nobody else hears of him.
    assert_eq!(d.to(2), [&None], "only a Close for the refused session");
    assert!(d.to(1).is_empty(), "alice is unaffected: {:?}", d.to(1));
    assert!(d.events.is_empty(), "no events: {:?}", d.events);
    assert_eq!(s.participant_count(&room), 1);
    let who: Vec<String> = s
        .participants(&room)
        .into_iter()
        .map(|p| p.identity)
        .collect();
    assert_eq!(who, ["alice"]);
    assert_eq!(record(&s, "r").unwrap().participants, 1);

    // A refused session is not in the room: its disconnect changes nothing.
    s.handle_command(
        t0 + 2 * MS,
        Command::Disconnect {
            session: SessionId(2),
            epoch: None,
            reason: lk::DisconnectReason::ClientInitiated,
        },
    );
    let d = drain(&mut s);
    assert!(d.signals.is_empty() && d.events.is_empty());
    assert_eq!(record(&s, "r").unwrap().participants, 1);
    assert_eq!(s.participant_count(&room), 1);
}

#[test]
fn deleting_a_room_disconnects_its_participants() {
    let t0 = Instant::now();
    let mut s = sfu(t0);
    let room: RoomName = "r".into();
    assert!(s.create_room(t0, &room, opts(300, 20, 0)));
    join(&mut s, t0, 1, "r", "alice");
    drain(&mut s);
    s.take_rooms_changed();

    assert!(s.delete_room(t0 + MS, &room));
    let d = drain(&mut s);
    let to_alice = d.to(1);
    assert_eq!(to_alice.len(), 2, "{to_alice:?}");
    let Some(Msg::Leave(leave)) = to_alice[0] else {
        panic!("a LeaveRequest first: {to_alice:?}");
    };
    assert_eq!(leave.reason, lk::DisconnectReason::RoomDeleted as i32);
    assert_eq!(leave.action, lk::leave_request::Action::Disconnect as i32);
    assert!(!leave.can_reconnect);
    assert!(to_alice[1].is_none(), "then the session closes");
    assert!(d.events.iter().any(|e| matches!(
        e,
        SfuEvent::ParticipantLeft { reason: lk::DisconnectReason::RoomDeleted, session, .. }
            if *session == SessionId(1)
    )));
    assert!(d.events.iter().any(is_finished));

    assert!(names(&s).is_empty(), "the record is gone");
    assert!(s.take_rooms_changed());
    assert_eq!(s.participant_count(&room), 0);
    assert!(s.room_info(&room).is_none());
    assert!(!s.delete_room(t0 + 2 * MS, &room), "already deleted");
    assert!(!s.delete_room(t0 + 2 * MS, &"unknown".into()));
    assert!(!s.take_rooms_changed());
    // Alice's late disconnect is a no-op.
    s.handle_command(
        t0 + 3 * MS,
        Command::Disconnect {
            session: SessionId(1),
            epoch: None,
            reason: lk::DisconnectReason::ClientInitiated,
        },
    );
    let d = drain(&mut s);
    assert!(d.signals.is_empty() && d.events.is_empty());
}

#[test]
fn room_metadata_is_kept_in_the_record() {
    let t0 = Instant::now();
    let mut s = sfu(t0);
    let room: RoomName = "r".into();
    assert!(s.create_room(t0, &room, opts(5, 20, 0)));
    s.take_rooms_changed();

    assert!(s.set_room_metadata(t0 + MS, &room, "{\"topic\":\"standup\"}"));
    assert!(s.take_rooms_changed());
    assert_eq!(record(&s, "r").unwrap().metadata, "{\"topic\":\"standup\"}");
    assert!(s.set_room_metadata(t0 + 2 * MS, &room, "second"));
    assert_eq!(record(&s, "r").unwrap().metadata, "second");

    s.take_rooms_changed();
    assert!(!s.set_room_metadata(t0 + 3 * MS, &"unknown".into(), "x"));
    assert!(!s.take_rooms_changed(), "an unknown room changes nothing");
    assert_eq!(names(&s), ["r"]);
    // An expired room (not yet dropped: no timeout handled) takes no metadata.
    assert!(!s.set_room_metadata(t0 + Duration::from_secs(5), &room, "late"));
    assert_eq!(record(&s, "r").unwrap().metadata, "second");
}

#[test]
fn replacing_the_only_participant_keeps_the_room() {
    let t0 = Instant::now();
    let mut s = sfu(t0);
    let room: RoomName = "r".into();
    assert!(s.create_room(t0, &room, opts(300, 20, 1)));
    join(&mut s, t0, 1, "r", "alice");
    let first = drain(&mut s);
    let Some(SfuEvent::RoomStarted { sid, .. }) = first.events.iter().find(|e| is_started(e))
    else {
        panic!("RoomStarted: {:?}", first.events);
    };
    let sid = sid.clone();

    // Alice reconnects (new session, same identity): she replaces herself, even in a full
    // room, and the room goes on; LiveKit keeps the room (and its SID) through this.
    join(&mut s, t0 + Duration::from_secs(1), 2, "r", "alice");
    let d = drain(&mut s);
    let Some(Some(Msg::Leave(leave))) = d.to(1).first() else {
        panic!("the old session is told to leave: {:?}", d.to(1));
    };
    assert_eq!(leave.reason, lk::DisconnectReason::DuplicateIdentity as i32);
    let Some(Some(Msg::Join(j))) = d.to(2).first() else {
        panic!("the new session joins: {:?}", d.to(2));
    };
    assert_eq!(s.participant_count(&room), 1);
    assert_eq!(record(&s, "r").unwrap().participants, 1);
    assert!(
        !d.events.iter().any(|e| is_started(e) || is_finished(e)),
        "the room neither finished nor restarted: {:?}",
        d.events
    );
    assert_eq!(j.room.as_ref().unwrap().sid, sid.as_str(), "same room SID");
}

/// The room's SID as every event carries it.
fn event_sids(events: &[SfuEvent]) -> Vec<&str> {
    events.iter().map(|e| e.room_sid().as_str()).collect()
}

/// The room SID in the join response `session` got.
fn joined_sid(d: &Drained, session: u64) -> String {
    match d.to(session).first() {
        Some(Some(Msg::Join(j))) => j.room.as_ref().map(|r| r.sid.clone()).unwrap_or_default(),
        other => panic!("a join response first: {other:?}"),
    }
}

#[test]
fn a_created_room_keeps_its_sid_through_joins_and_events() {
    let t0 = Instant::now();
    let mut s = sfu(t0);
    let room: RoomName = "r".into();
    assert_eq!(s.room_sid(&room), None, "no room, no SID");
    assert!(s.create_room(t0, &room, opts(300, 20, 0)));
    let sid = record(&s, "r").expect("record").sid;
    assert!(
        sid.as_str().starts_with("RM_") && sid.as_str().len() == 15,
        "{sid}"
    );
    assert_eq!(s.room_sid(&room), Some(sid.clone()));
    // The idempotent create keeps it.
    assert!(!s.create_room(t0 + MS, &room, opts(5, 1, 0)));
    assert_eq!(record(&s, "r").unwrap().sid, sid);

    // The first join: the join response, RoomStarted and ParticipantJoined carry it.
    s.set_unix_time(1_700_000_050);
    join(&mut s, t0 + 2 * MS, 1, "r", "alice");
    let d = drain(&mut s);
    assert_eq!(joined_sid(&d, 1), sid.as_str());
    let Some(Some(Msg::Join(j))) = d.to(1).first() else {
        unreachable!()
    };
    assert_eq!(
        j.room.as_ref().unwrap().creation_time,
        1_700_000_000,
        "the room was created before its first join"
    );
    assert!(d.events.iter().any(is_started));
    assert!(
        event_sids(&d.events).iter().all(|s| *s == sid.as_str()),
        "{:?}",
        d.events
    );
    assert_eq!(s.room_info(&room).unwrap().sid, sid.as_str());
    // A second participant: the same.
    join(&mut s, t0 + 3 * MS, 2, "r", "bob");
    let d = drain(&mut s);
    assert_eq!(joined_sid(&d, 2), sid.as_str());

    // Everybody leaves: ParticipantLeft and RoomFinished carry it; the record keeps it.
    let mut events = Vec::new();
    for session in [1, 2] {
        s.handle_command(
            t0 + 4 * MS,
            Command::Disconnect {
                session: SessionId(session),
                epoch: None,
                reason: lk::DisconnectReason::ClientInitiated,
            },
        );
        events.extend(drain(&mut s).events);
    }
    assert!(events.iter().any(is_finished), "{events:?}");
    assert!(
        event_sids(&events).iter().all(|s| *s == sid.as_str()),
        "{events:?}"
    );
    assert_eq!(record(&s, "r").unwrap().sid, sid);

    // Back within departure_timeout: the room still exists, so it is the same room.
    join(&mut s, t0 + Duration::from_secs(5), 3, "r", "carol");
    let d = drain(&mut s);
    assert_eq!(joined_sid(&d, 3), sid.as_str());
    assert!(
        event_sids(&d.events).iter().all(|s| *s == sid.as_str()),
        "{:?}",
        d.events
    );
}

#[test]
fn a_room_created_again_after_it_ended_gets_a_new_sid() {
    let t0 = Instant::now();
    let mut s = sfu(t0);
    let room: RoomName = "r".into();

    // Deleted, then created again.
    assert!(s.create_room(t0, &room, opts(5, 1, 0)));
    let first = record(&s, "r").unwrap().sid;
    join(&mut s, t0, 1, "r", "alice");
    drain(&mut s);
    assert!(s.delete_room(t0 + MS, &room));
    let d = drain(&mut s);
    assert!(
        event_sids(&d.events).iter().all(|s| *s == first.as_str()),
        "{:?}",
        d.events
    );
    assert_eq!(s.room_sid(&room), None);
    assert!(s.create_room(t0 + 2 * MS, &room, opts(5, 1, 0)));
    let second = record(&s, "r").unwrap().sid;
    assert_ne!(second, first, "a new room, a new SID");

    // Expired (nobody joined within empty_timeout), then created again.
    let later = t0 + Duration::from_secs(6);
    run_until(&mut s, later);
    assert!(names(&s).is_empty(), "expired");
    assert!(s.create_room(later, &room, opts(5, 1, 0)));
    let third = record(&s, "r").unwrap().sid;
    assert!(third != first && third != second);

    // Joined, emptied and past departure_timeout, then joined again without a record (a
    // record made after that join, as on the auto-create path, takes the live room's SID).
    join(&mut s, later, 2, "r", "bob");
    let d = drain(&mut s);
    assert_eq!(joined_sid(&d, 2), third.as_str());
    s.handle_command(
        later + MS,
        Command::Disconnect {
            session: SessionId(2),
            epoch: None,
            reason: lk::DisconnectReason::ClientInitiated,
        },
    );
    drain(&mut s);
    let gone = later + Duration::from_secs(2);
    run_until(&mut s, gone);
    assert!(names(&s).is_empty(), "closed after departure_timeout");
    join(&mut s, gone, 3, "r", "carol");
    let d = drain(&mut s);
    let fourth = joined_sid(&d, 3);
    assert!(fourth.starts_with("RM_"));
    assert!(![&first, &second, &third]
        .iter()
        .any(|s| s.as_str() == fourth));
    assert!(s.create_room(gone, &room, opts(5, 1, 0)));
    assert_eq!(
        record(&s, "r").unwrap().sid.as_str(),
        fourth,
        "a record made while participants are connected takes their room's SID"
    );
}
