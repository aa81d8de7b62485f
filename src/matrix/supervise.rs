//! Keeps the SFU in line with MatrixRTC over time: expired call memberships end (checked every
//! second, and at start-up, which reconciles what expired while Conclave was down), and an SFU
//! participant issued by the token service that never shows a call membership is removed after
//! the grace period (`calls.grace_period_secs`).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;

use crate::app::AppState;
use crate::net::LoopRequest;
use crate::sfu::{Command, SfuEvent};

/// Ends expired memberships now; returns how many changes it made.
pub async fn expire_once(state: &AppState) -> usize {
    let store = state.store.clone();
    let now = crate::clock::unix_millis();
    match tokio::task::spawn_blocking(move || store.expire_call_members(now)).await {
        Ok(Ok(changes)) => {
            let n = changes.len();
            if n > 0 {
                tracing::info!(changes = n, "expired call memberships ended");
            }
            super::enforce::act_on_call_changes(state, changes).await;
            n
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "cannot expire call memberships");
            0
        }
        Err(e) => {
            tracing::error!(error = %e, "expiry task failed");
            0
        }
    }
}

/// Runs forever.
pub async fn run(state: Arc<AppState>, mut events: broadcast::Receiver<SfuEvent>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                expire_once(&state).await;
            }
            ev = events.recv() => match ev {
                Ok(SfuEvent::ParticipantJoined { room, identity, .. }) => {
                    let grace = state.config.calls.grace_period_secs;
                    if grace == 0 {
                        continue;
                    }
                    if let Some(p) = state.issued.get(room.as_str(), identity.as_str()) {
                        let state = state.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_secs(grace)).await;
                            let store = state.store.clone();
                            let q = p.clone();
                            // In encrypted rooms rtc.member events are unreadable: Matrix room
                            // membership (already enforced) alone decides.
                            let member = tokio::task::spawn_blocking(move || {
                                Ok::<_, crate::store::StoreError>(
                                    store.is_room_encrypted(&q.room_id)?
                                        || store.is_call_member(
                                            &q.room_id,
                                            &q.user_id,
                                            &q.device_id,
                                        )?,
                                )
                            })
                            .await;
                            if matches!(member, Ok(Ok(true))) {
                                return;
                            }
                            tracing::info!(
                                room_id = %p.room_id,
                                user_id = %p.user_id,
                                identity = %p.identity,
                                grace,
                                "SFU participant without a call membership; removing it"
                            );
                            if let Some(sfu) = &state.sfu {
                                let _ = sfu
                                    .send(LoopRequest::Sfu(Command::Remove {
                                        room: p.room_name.into(),
                                        identity: p.identity.into(),
                                        reason: livekit_protocol::DisconnectReason::ParticipantRemoved,
                                    }))
                                    .await;
                            }
                        });
                    }
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
