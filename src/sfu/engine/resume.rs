//! Resume: a participant whose signalling connection is lost (a WebSocket that closed or
//! failed, not a leave) stays in the room for `SfuConfig::resume_window`; its media goes on.
//! The client reconnects with `reconnect=1` and its SID and gets the same participant back
//! ([`Sfu::resume`]): a `ReconnectResponse`, then the room as it is now; then it restarts ICE
//! with a new offer (`negotiate.rs` keeps the new credentials routable). Nobody else sees a
//! leave or a join. Past the window, the participant leaves with the reason its connection
//! ended with.
//!
//! v0 participants (two peer connections) resume too: the client restarts ICE on its
//! publisher connection with its next offer, and the SFU, which offers on the subscriber
//! connection, sends a subscriber offer that restarts ICE there ([`Sfu::renegotiate`]).

use std::time::Instant;

use livekit_protocol as lk;
use lk::signal_response::Message as Msg;

use super::downtrack::DownState;
use super::participant::PcKind;
use super::{msg, server_info, Departure, Output, SessionId, Sfu, SignalOut};
use crate::sfu::ids::{ParticipantIdentity, RoomName};

impl Sfu {
    /// The client configuration of join and reconnect responses: resume is offered when a
    /// resume window is configured.
    pub(super) fn client_configuration(&self) -> lk::ClientConfiguration {
        let resume = if self.config.resume_window.is_some() {
            lk::ClientConfigSetting::Enabled
        } else {
            lk::ClientConfigSetting::Disabled
        };
        lk::ClientConfiguration {
            resume_connection: resume as i32,
            ..Default::default()
        }
    }

    /// A session's signalling connection ended: a leave, or, for a lost connection of a
    /// participant that can resume, a detach. A disconnect from an older connection of a
    /// resumed participant is ignored.
    pub(super) fn signalling_ended(
        &mut self,
        now: Instant,
        session: SessionId,
        epoch: Option<u32>,
        reason: lk::DisconnectReason,
    ) {
        let window = self.config.resume_window;
        let Some(p) = self.participant_mut(session) else {
            return;
        };
        if epoch.is_some_and(|e| e != p.signal_epoch) {
            tracing::debug!(%session, ?epoch, current = p.signal_epoch, "disconnect of an older signalling connection ignored");
            return;
        }
        let resumable = p.ever_connected();
        let lost = reason == lk::DisconnectReason::SignalClose;
        match window {
            Some(window) if resumable && lost => {
                tracing::info!(%session, identity = %p.identity, ?window, "signalling lost; participant kept for a resume");
                self.detached.insert(session, now + window);
                // The connection's queue ends (its task waits for this).
                self.out
                    .push_back(Output::Signal(session, SignalOut::Close));
            }
            _ => self.leave_as(now, session, reason, Departure::Left),
        }
    }

    /// A client resumes participant `identity` (SID `sid`) of `room` on a new signalling
    /// connection: the participant is the same (its media went on), others see nothing. Its
    /// new connection gets a `ReconnectResponse`, then the room's participants as they are
    /// now (it may have missed updates). Returns the session and the new connection's epoch
    /// (for its disconnects), or `None` when there is no such participant to resume (then
    /// the client must rejoin in full). A participant whose old connection still looks
    /// alive here (the client noticed the loss first) is taken over the same way.
    pub fn resume(
        &mut self,
        now: Instant,
        room: &RoomName,
        identity: &ParticipantIdentity,
        sid: &str,
        ice_servers: Vec<lk::IceServer>,
    ) -> Option<(SessionId, u32)> {
        self.last_now = now;
        self.config.resume_window?;
        let session = self.session_of(room, identity)?;
        let single_pc = {
            let p = self.participant_mut(session)?;
            if p.info.sid != sid {
                return None;
            }
            p.signal_epoch = p.signal_epoch.wrapping_add(1);
            p.transport.is_single()
        };
        let was_detached = self.detached.remove(&session).is_some();
        let (epoch, last_message_seq) = {
            let p = self.participant_mut(session)?;
            (p.signal_epoch, p.reliable_seq)
        };
        tracing::info!(%session, %identity, was_detached, epoch, "participant resumed");
        let reconnect = lk::ReconnectResponse {
            ice_servers,
            client_configuration: Some(self.client_configuration()),
            server_info: Some(server_info()),
            last_message_seq,
        };
        self.out
            .push_back(Output::Signal(session, msg(Msg::Reconnect(reconnect))));
        let others: Vec<lk::ParticipantInfo> = self
            .rooms
            .get(room)
            .map(|r| {
                r.participants
                    .values()
                    .filter(|p| p.session != session && !p.hidden())
                    .map(|p| p.info.clone())
                    .collect()
            })
            .unwrap_or_default();
        if !others.is_empty() {
            self.out.push_back(Output::Signal(
                session,
                msg(Msg::Update(lk::ParticipantUpdate {
                    participants: others,
                })),
            ));
        }
        if !single_pc {
            self.restart_subscriber_ice(now, session);
        }
        Some((session, epoch))
    }

    /// v0: the subscriber connection's ICE restarts with the SFU's next offer. An offer still
    /// in flight went to the lost connection and is never answered: it is dropped (str0m
    /// changed nothing for it) and its changes are made again in the restart offer.
    fn restart_subscriber_ice(&mut self, now: Instant, session: SessionId) {
        let Some(p) = self.participant_mut(session) else {
            return;
        };
        let mut stale = None;
        if p.sub_pending.take().is_some() {
            for d in &mut p.down_tracks {
                d.state = match d.state {
                    DownState::Negotiating(_) => DownState::ToOpen,
                    DownState::NegotiatingStop(m) => DownState::ToStop(m),
                    s => s,
                };
            }
            stale = p.sub_restart.take();
        }
        p.sub_restart_wanted = true;
        if let Some(creds) = stale {
            self.by_ufrag.remove(&creds.ufrag);
        }
        self.renegotiate(now, session);
    }

    /// When the first detached participant's resume window ends.
    pub(super) fn next_detached_expiry(&self) -> Option<Instant> {
        self.detached.values().min().copied()
    }

    /// Participants not resumed within the window leave (the others see it now).
    pub(super) fn expire_detached(&mut self, now: Instant) {
        let expired: Vec<SessionId> = self
            .detached
            .iter()
            .filter(|(_, deadline)| **deadline <= now)
            .map(|(s, _)| *s)
            .collect();
        for session in expired {
            self.detached.remove(&session);
            tracing::info!(%session, "not resumed within the window; participant leaves");
            self.leave_as(
                now,
                session,
                lk::DisconnectReason::SignalClose,
                Departure::Left,
            );
        }
    }
}

impl Sfu {
    /// After a client's offer restarted ICE (new credentials: a resume, a network change),
    /// str0m answers with local credentials of its own making; they would lack this
    /// engine's ufrag prefix (the routing of STUN to the loop owning the connection) and are
    /// not indexed. They are replaced with fresh ones of ours, in the connection and in the
    /// answer text `sdp`, which is returned.
    pub(super) fn routable_ice_credentials(
        &mut self,
        session: SessionId,
        kind: PcKind,
        sdp: String,
    ) -> String {
        let Some(pc) = self.participant_mut(session).and_then(|p| p.pc_mut(kind)) else {
            return sdp;
        };
        let theirs = pc.rtc.direct_api().local_ice_credentials();
        if theirs.ufrag == pc.ufrag {
            return sdp;
        }
        let ours = self.routable_creds();
        tracing::info!(%session, ?kind, "ICE restarted by the client; new credentials");
        self.use_restart_creds(session, kind, ours.clone());
        swap_ice_credentials(&sdp, &theirs, &ours)
    }

    /// Fresh ICE credentials whose ufrag starts with this engine's prefix (STUN routing).
    pub(super) fn routable_creds(&mut self) -> str0m::IceCreds {
        let (ufrag, pass) = self.ids.ice_credentials();
        str0m::IceCreds {
            ufrag: format!("{}{ufrag}", self.config.ufrag_prefix),
            pass,
        }
    }

    /// A restarted connection of `session` uses `creds` from now on (indexed for routing;
    /// the old ufrag is forgotten).
    pub(super) fn use_restart_creds(
        &mut self,
        session: SessionId,
        kind: PcKind,
        creds: str0m::IceCreds,
    ) {
        let Some(pc) = self.participant_mut(session).and_then(|p| p.pc_mut(kind)) else {
            return;
        };
        pc.rtc.direct_api().set_local_ice_credentials(creds.clone());
        let old = std::mem::replace(&mut pc.ufrag, creds.ufrag.clone());
        pc.restarting = true;
        self.by_ufrag.remove(&old);
        self.by_ufrag.insert(creds.ufrag, (session, kind));
    }
}

/// `sdp` with ICE credentials `from` replaced by `to`: the session's `ice-ufrag`/`ice-pwd`
/// and the ufrag candidate lines name (`… typ host ufrag <ufrag>`; a client drops candidates
/// whose ufrag is not the session's, str0m does, and would be left with nothing to check).
pub(super) fn swap_ice_credentials(
    sdp: &str,
    from: &str0m::IceCreds,
    to: &str0m::IceCreds,
) -> String {
    sdp.replace(
        &format!("a=ice-ufrag:{}", from.ufrag),
        &format!("a=ice-ufrag:{}", to.ufrag),
    )
    .replace(
        &format!(" ufrag {}", from.ufrag),
        &format!(" ufrag {}", to.ufrag),
    )
    .replace(
        &format!("a=ice-pwd:{}", from.pass),
        &format!("a=ice-pwd:{}", to.pass),
    )
}
