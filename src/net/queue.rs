//! Per-session signal queues from the loop to a session's task, bounded by messages *and* by
//! bytes.
//!
//! The loop never waits for a session: [`SignalSink::offer`] either queues a message or says
//! why not ([`Refused`]), and the loop disconnects a session whose queue is full. Bytes are
//! counted as the protobuf size of each message (`prost`'s `encoded_len`, which is what a binary
//! frame carries); the count goes up when the loop queues a message and down when the session
//! takes it out, in one atomic shared by both ends. Only the loop adds, so its check-then-add
//! cannot overshoot.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use crate::sfu::SignalOut;

/// Most messages one session's queue holds.
pub const SESSION_QUEUE: usize = 1024;
/// Most bytes (protobuf) one session's queue holds. Not counted: the session's first message,
/// its join response, which grows with the room (up to about 130 kB per participant at the
/// limits of [`crate::sfu::limits`]) and which the session takes out at once, before the
/// WebSocket upgrade. A single message larger than the bound is still taken into an empty
/// queue, so that no message is undeliverable in itself.
pub const SESSION_QUEUE_BYTES: usize = 4 * 1024 * 1024;

/// State both ends see.
#[derive(Debug, Default)]
struct Shared {
    /// Bytes queued now.
    bytes: AtomicUsize,
    /// The loop refused a message for lack of room: the session is being disconnected and
    /// its task should stop at once rather than write out the backlog.
    overflowed: AtomicBool,
}

/// Why [`SignalSink::offer`] did not queue a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The queue holds [`SESSION_QUEUE`] messages, or the message would take it past
    /// [`SESSION_QUEUE_BYTES`]: the session does not keep up.
    Full,
    /// The session's task is gone (its receiving end was dropped).
    Closed,
}

/// A queued message and its counted size.
#[derive(Debug)]
struct Entry {
    out: SignalOut,
    bytes: usize,
}

/// The loop's end of a session's queue.
#[derive(Debug)]
pub struct SignalSink {
    tx: mpsc::Sender<Entry>,
    shared: Arc<Shared>,
    max_bytes: usize,
    /// The next message is the first (the join response, not counted).
    first: Cell<bool>,
}

/// The session's end of its queue.
#[derive(Debug)]
pub struct SignalQueue {
    rx: mpsc::Receiver<Entry>,
    shared: Arc<Shared>,
}

/// A new queue with the default bounds ([`SESSION_QUEUE`] messages, [`SESSION_QUEUE_BYTES`]).
pub fn session_queue() -> (SignalSink, SignalQueue) {
    bounded(SESSION_QUEUE, SESSION_QUEUE_BYTES)
}

/// A new queue of at most `messages` messages and `bytes` bytes.
pub fn bounded(messages: usize, bytes: usize) -> (SignalSink, SignalQueue) {
    let (tx, rx) = mpsc::channel(messages.max(1));
    let shared = Arc::new(Shared::default());
    (
        SignalSink {
            tx,
            shared: shared.clone(),
            max_bytes: bytes,
            first: Cell::new(true),
        },
        SignalQueue { rx, shared },
    )
}

/// The bytes `out` counts for: its protobuf size (a close counts nothing).
fn size_of(out: &SignalOut) -> usize {
    match out {
        SignalOut::Message(m) => m.encoded_len(),
        SignalOut::Close => 0,
    }
}

impl SignalSink {
    /// Queues `out` without waiting. A message refused for lack of room also tells the
    /// session's task to stop ([`SignalQueue::recv`] then returns `None`); a close is never
    /// counted against the bounds that way (dropping the sink closes the queue anyway).
    pub fn offer(&self, out: SignalOut) -> Result<(), Refused> {
        if self.tx.is_closed() {
            return Err(Refused::Closed);
        }
        let is_message = matches!(out, SignalOut::Message(_));
        let bytes = if self.first.replace(false) {
            0
        } else {
            size_of(&out)
        };
        let queued = self.shared.bytes.load(Ordering::Acquire);
        if is_message && queued > 0 && queued.saturating_add(bytes) > self.max_bytes {
            self.shared.overflowed.store(true, Ordering::Release);
            return Err(Refused::Full);
        }
        self.shared.bytes.fetch_add(bytes, Ordering::AcqRel);
        match self.tx.try_send(Entry { out, bytes }) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.shared.bytes.fetch_sub(bytes, Ordering::AcqRel);
                match e {
                    TrySendError::Full(_) => {
                        if is_message {
                            self.shared.overflowed.store(true, Ordering::Release);
                        }
                        Err(Refused::Full)
                    }
                    TrySendError::Closed(_) => Err(Refused::Closed),
                }
            }
        }
    }

    /// Bytes queued now.
    pub fn queued_bytes(&self) -> usize {
        self.shared.bytes.load(Ordering::Acquire)
    }
}

impl SignalQueue {
    /// The next message; `None` once the loop dropped its end (after the queued messages), or
    /// at once when the queue overflowed (the backlog is dropped).
    pub async fn recv(&mut self) -> Option<SignalOut> {
        if self.overflowed() {
            return None;
        }
        let entry = self.rx.recv().await?;
        Some(self.take(entry))
    }

    /// The next message if one is queued now (see [`SignalQueue::recv`]).
    pub fn try_recv(&mut self) -> Option<SignalOut> {
        if self.overflowed() {
            return None;
        }
        let entry = self.rx.try_recv().ok()?;
        Some(self.take(entry))
    }

    /// Bytes queued now.
    pub fn queued_bytes(&self) -> usize {
        self.shared.bytes.load(Ordering::Acquire)
    }

    fn overflowed(&self) -> bool {
        self.shared.overflowed.load(Ordering::Acquire)
    }

    fn take(&self, entry: Entry) -> SignalOut {
        self.shared.bytes.fetch_sub(entry.bytes, Ordering::AcqRel);
        entry.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use livekit_protocol as lk;
    use lk::signal_response::Message as Msg;

    fn message(bytes: usize) -> SignalOut {
        SignalOut::Message(Box::new(Msg::RefreshToken("x".repeat(bytes))))
    }

    #[tokio::test]
    async fn bounded_by_bytes_and_messages_and_closed_is_not_full() {
        let (sink, mut queue) = bounded(4, 1000);
        // The first message (the join response) is not counted.
        sink.offer(message(5000)).unwrap();
        assert_eq!(sink.queued_bytes(), 0);
        assert!(matches!(queue.recv().await, Some(SignalOut::Message(_))));
        // One message larger than the bound goes into an empty queue...
        sink.offer(message(5000)).unwrap();
        assert!(sink.queued_bytes() > 5000);
        // ...but nothing after it until it is taken out.
        assert_eq!(sink.offer(message(10)), Err(Refused::Full));
        // The refusal stops the session's end at once.
        assert!(queue.recv().await.is_none());

        let (sink, mut queue) = bounded(4, 1000);
        sink.offer(SignalOut::Close).unwrap();
        sink.offer(message(400)).unwrap();
        sink.offer(message(400)).unwrap();
        let full = sink.queued_bytes();
        assert!(full <= 1000);
        assert_eq!(sink.offer(message(400)), Err(Refused::Full));
        assert_eq!(
            sink.queued_bytes(),
            full,
            "a refused message is not counted"
        );
        drop(sink);
        assert!(queue.recv().await.is_none(), "overflowed: backlog dropped");

        let (sink, mut queue) = bounded(2, 1_000_000);
        sink.offer(message(1)).unwrap();
        sink.offer(SignalOut::Close).unwrap();
        assert_eq!(sink.offer(message(1)), Err(Refused::Full), "by messages");
        assert!(queue.try_recv().is_none(), "overflowed: backlog dropped");

        let (sink, mut queue) = bounded(2, 1000);
        sink.offer(SignalOut::Close).unwrap();
        sink.offer(message(100)).unwrap();
        assert!(queue.queued_bytes() > 100);
        assert!(matches!(queue.recv().await, Some(SignalOut::Close)));
        assert!(matches!(queue.recv().await, Some(SignalOut::Message(_))));
        assert_eq!(
            queue.queued_bytes(),
            0,
            "taking a message out frees its bytes"
        );
        // A session that is gone is no full queue.
        drop(queue);
        assert_eq!(sink.offer(message(1)), Err(Refused::Closed));
    }
}
