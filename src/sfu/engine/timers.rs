//! Which participants' timers are due, without looking at every participant.
//!
//! Why: the loop asks the engine for its next deadline after every datagram and every
//! command, and drives time on every wake-up. Scanning all participants for both was half of
//! the SFU's CPU time under load (`docs/performance.md`, issue "media plane"): the cost grew
//! with the number of participants, not with the work to do. Each participant's earliest
//! deadline ([`super::participant::Participant::next_timeout`], peer connection timers and the
//! connect deadline) only changes when its connections are polled, so the engine files it
//! here after each poll, and a heap answers "next deadline" and "who is due" in O(log n).
//!
//! The heap keeps stale entries (a deadline replaced by a later poll) and skips them lazily:
//! an entry counts only while it is the session's current deadline. It is rebuilt when stale
//! entries outnumber live ones, so it stays O(participants).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::Instant;

use super::SessionId;

/// Deadlines by session.
#[derive(Debug, Default)]
pub(super) struct Timers {
    heap: BinaryHeap<Reverse<(Instant, SessionId)>>,
    current: HashMap<SessionId, Instant>,
}

impl Timers {
    /// `session`'s earliest deadline is now `at` (replacing any earlier one).
    pub(super) fn set(&mut self, session: SessionId, at: Instant) {
        if self.current.insert(session, at) == Some(at) {
            return;
        }
        self.heap.push(Reverse((at, session)));
        if self.heap.len() > 2 * self.current.len() + 64 {
            self.heap = self
                .current
                .iter()
                .map(|(s, t)| Reverse((*t, *s)))
                .collect();
        }
    }

    /// `session` has no deadline any more (it left).
    pub(super) fn remove(&mut self, session: SessionId) {
        self.current.remove(&session);
    }

    /// The earliest live deadline.
    pub(super) fn next(&mut self) -> Option<Instant> {
        while let Some(Reverse((t, s))) = self.heap.peek() {
            if self.current.get(s) == Some(t) {
                return Some(*t);
            }
            self.heap.pop();
        }
        None
    }

    /// The sessions whose deadline is at or before `now`, earliest first; they have no
    /// deadline until [`Timers::set`] again.
    pub(super) fn pop_due(&mut self, now: Instant) -> Vec<SessionId> {
        let mut due = Vec::new();
        while let Some(&Reverse((t, s))) = self.heap.peek() {
            if t > now {
                break;
            }
            self.heap.pop();
            if self.current.get(&s) == Some(&t) {
                self.current.remove(&s);
                due.push(s);
            }
        }
        due
    }

    /// Heap entries, stale ones included (for tests of the bound).
    #[cfg(test)]
    fn heap_len(&self) -> usize {
        self.heap.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn due_sessions_come_out_earliest_first_and_only_once() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut timers = Timers::default();
        timers.set(SessionId(1), ms(30));
        timers.set(SessionId(2), ms(10));
        timers.set(SessionId(3), ms(20));
        assert_eq!(timers.next(), Some(ms(10)));
        assert_eq!(timers.pop_due(ms(5)), vec![]);
        assert_eq!(timers.pop_due(ms(20)), vec![SessionId(2), SessionId(3)]);
        assert_eq!(timers.pop_due(ms(20)), vec![], "popped once");
        assert_eq!(timers.next(), Some(ms(30)));
    }

    #[test]
    fn a_replaced_or_removed_deadline_is_skipped() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut timers = Timers::default();
        timers.set(SessionId(1), ms(10));
        timers.set(SessionId(1), ms(50)); // polled again: later
        timers.set(SessionId(2), ms(40));
        timers.set(SessionId(2), ms(5)); // polled again: earlier
        timers.set(SessionId(3), ms(1));
        timers.remove(SessionId(3)); // left
        assert_eq!(timers.next(), Some(ms(5)));
        assert_eq!(timers.pop_due(ms(45)), vec![SessionId(2)]);
        assert_eq!(timers.pop_due(ms(50)), vec![SessionId(1)]);
        assert_eq!(timers.next(), None);
    }

    #[test]
    fn stale_entries_stay_bounded() {
        let t0 = Instant::now();
        let mut timers = Timers::default();
        for i in 0..10_000u64 {
            // Ten sessions re-polled over and over, each time with a later deadline.
            timers.set(SessionId(i % 10), t0 + Duration::from_micros(i));
        }
        assert!(
            timers.heap_len() <= 2 * 10 + 64 + 1,
            "{}",
            timers.heap_len()
        );
        let due = timers.pop_due(t0 + Duration::from_secs(1));
        assert_eq!(due.len(), 10);
    }
}
