//! Which participants' timers are due, without looking at every participant.
//!
//! Why: the loop asks the engine for its next deadline after every datagram and every
//! command, and drives time on every wake-up. Scanning all participants for both made the
//! cost of every packet grow with the number of participants, not with the work to do
//! (`docs/performance.md`, issue "media plane"). Each participant's earliest deadline
//! ([`super::participant::Participant::next_timeout`]: peer connection timers and the connect
//! deadline) only changes when its connections are polled, so the engine files it here after
//! each poll, and a heap answers "next deadline" and "who is due" in O(log n).
//!
//! Filing must stay cheap: a publisher's packet reaches hundreds of subscribers, each polled
//! once. So an entry is pushed only when a participant's deadline moves *earlier* than the one
//! it has filed (`Participant::filed`); a deadline that moves later (the common case: a timer
//! pushed back) keeps its old, earlier entry, which then wakes the loop once, finds nothing
//! due and files the real deadline. An entry counts only while it is its participant's filed
//! deadline; the others (superseded, or of a participant that left) are skipped lazily.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

use super::SessionId;

/// Filed deadlines, earliest first, stale ones included.
#[derive(Debug, Default)]
pub(super) struct Timers {
    heap: BinaryHeap<Reverse<(Instant, SessionId)>>,
}

impl Timers {
    /// Files `at` for `session`.
    pub(super) fn push(&mut self, session: SessionId, at: Instant) {
        self.heap.push(Reverse((at, session)));
    }

    /// The earliest entry, stale or not.
    pub(super) fn peek(&self) -> Option<(Instant, SessionId)> {
        self.heap.peek().map(|Reverse(e)| *e)
    }

    /// Removes the earliest entry.
    pub(super) fn pop(&mut self) -> Option<(Instant, SessionId)> {
        self.heap.pop().map(|Reverse(e)| e)
    }

    /// Entries, stale ones included.
    pub(super) fn len(&self) -> usize {
        self.heap.len()
    }

    /// Replaces every entry with `live` (the filed deadlines), dropping the stale ones.
    pub(super) fn rebuild(&mut self, live: impl Iterator<Item = (Instant, SessionId)>) {
        self.heap = live.map(Reverse).collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn entries_come_out_earliest_first() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut timers = Timers::default();
        timers.push(SessionId(1), ms(30));
        timers.push(SessionId(2), ms(10));
        timers.push(SessionId(3), ms(20));
        assert_eq!(timers.peek(), Some((ms(10), SessionId(2))));
        assert_eq!(timers.pop(), Some((ms(10), SessionId(2))));
        assert_eq!(timers.pop(), Some((ms(20), SessionId(3))));
        timers.rebuild([(ms(5), SessionId(4))].into_iter());
        assert_eq!(timers.len(), 1);
        assert_eq!(timers.pop(), Some((ms(5), SessionId(4))));
        assert_eq!(timers.pop(), None);
    }
}
