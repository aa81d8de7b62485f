//! Keeps the SFU in line with MatrixRTC over time: expired call memberships end (checked every
//! second, and at start-up, which reconciles what expired while Conclave was down), and an SFU
//! participant issued by the token service that never shows a call membership is removed after
//! the grace period (`calls.grace_period_secs`; a peer Conclave's relay, which has no call
//! membership, is checked for a joined member of its server instead). It also keeps the
//! issued-identity map in step with SFU joins and leaves, and deletes store history older than
//! `calls.history_days` (hourly).

use std::time::{Duration, Instant};

use tokio::sync::broadcast;

use super::Calls;
use crate::sfu::ids::{ParticipantIdentity, RoomName};
use crate::sfu::SfuEvent;

/// How often old store history is deleted (`calls.history_days`), the first time at start-up.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Runs until the SFU's event stream closes.
pub(super) async fn run(calls: Calls, mut events: broadcast::Receiver<SfuEvent>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut prune = tokio::time::interval(PRUNE_EVERY);
    prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                calls.expire_once().await;
            }
            _ = prune.tick() => {
                calls.prune_history_once().await;
            }
            ev = events.recv() => match ev {
                Ok(SfuEvent::ParticipantJoined { room, identity, sid, .. }) => {
                    let (room, identity) = (room, identity);
                    calls.inner.issued.joined(&room, &identity, &sid);
                    watch_grace_period(&calls, room, identity);
                }
                Ok(SfuEvent::ParticipantLeft { room, identity, sid, .. }) => {
                    calls.inner.issued.left(
                        &room,
                        &identity,
                        &sid,
                        Instant::now(),
                    );
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "supervisor lagged behind SFU events");
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }
}

/// After the grace period, removes an issued participant that shows no call membership. A
/// peer Conclave's relay has none: it is checked at once for a joined member of its server
/// (the last one may have left between its grant and its join).
fn watch_grace_period(calls: &Calls, room: RoomName, identity: ParticipantIdentity) {
    let Some(p) = calls.inner.issued.get(&room, &identity, Instant::now()) else {
        return;
    };
    if p.relay {
        let calls = calls.clone();
        tokio::spawn(async move {
            calls
                .cut_relays_without_members(&p.room_id, p.user_id.server_name())
                .await;
        });
        return;
    }
    let grace = calls.inner.settings.grace_period;
    if grace.is_zero() {
        return;
    }
    let calls = calls.clone();
    tokio::spawn(async move {
        tokio::time::sleep(grace).await;
        // In encrypted rooms rtc.member events are unreadable: Matrix room membership (already
        // enforced) alone decides.
        let member = calls
            .inner
            .store
            .call_membership_or_encrypted(&p.room_id, &p.user_id, &p.device_id)
            .await;
        if matches!(member, Ok(true)) {
            return;
        }
        let why = format!(
            "no call membership after the {} s grace period",
            grace.as_secs()
        );
        calls.remove(vec![p], &why).await;
    });
}
