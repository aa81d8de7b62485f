//! The calls service: everything on the Matrix-call side that follows from appservice
//! transactions and SFU events, with the state it owns.
//!
//! It owns the store (through [`AsyncStore`]), the issued-participants map, the delayed-leave
//! jobs and the call notices. Its inputs: transactions ([`Calls::apply_transaction`]), tokens
//! issued by the token service ([`Calls::issued`], [`Calls::hand_over_delayed_leave`]), SFU
//! events and a one-second tick (the workers started by [`Calls::start`]). Its outputs: store
//! writes, participants removed from the SFU (through [`SfuHandle::remove`]), MSC4140 calls on
//! users' homeservers and `m.notice`s in rooms.
//!
//! "When a call ends" lives here: [`Calls::act_on_call_changes`].

pub mod delayed;
pub mod events;
pub mod issued;
pub mod notices;
mod relays;
mod supervise;

use std::sync::Arc;
use std::time::{Duration, Instant};

use livekit_protocol::DisconnectReason;
use ruma::events::room::member::MembershipState;
use ruma::events::AnyTimelineEvent;
use ruma::serde::Raw;
use ruma::{OwnedServerName, RoomId};
use serde::Serialize;

use crate::config::Config;
use crate::matrix::client::HomeserverClient;
use crate::matrix::naming::{room_name, LEGACY_SLOT};
use crate::metrics::Metrics;
use crate::net::SfuHandle;
use crate::plumbing::{DestinationPolicy, HttpClients};
use crate::sfu::ids::{ParticipantIdentity, RoomName, RoomSid};
use crate::store::{
    AsyncStore, CallChange, CallMemberView, CallView, DelayedLeave, Effect, MembershipRecord,
    Pruned, StoreError, TxnOutcome,
};
use delayed::Delegations;
use issued::{IssuedParticipant, IssuedParticipants};

/// Why a calls operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CallsError {
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// No active call in that Matrix room.
    #[error("No active call in {0}")]
    NoCall(String),
    /// No such participant in the call's SFU room.
    #[error("No participant {0} in the call")]
    NoParticipant(String),
    /// The SFU has no room of that name.
    #[error("No SFU room {0}")]
    NoSfuRoom(String),
    /// The SFU loop is gone (shutting down).
    #[error("the SFU is not running")]
    SfuGone,
}

/// What the calls service needs of the configuration.
#[derive(Debug, Clone)]
pub struct CallsSettings {
    /// This homeserver's name.
    pub server_name: OwnedServerName,
    /// Its client-server API (for local users' delayed events).
    pub homeserver_url: String,
    /// The appservice bot.
    pub bot_user_id: String,
    /// Post `m.notice`s when calls start and end.
    pub notices: bool,
    /// How long an issued SFU participant may stay without a call membership (0: forever).
    pub grace_period: Duration,
    /// Store history older than this is pruned hourly (`calls.history_days`; `None`: kept).
    pub history: Option<Duration>,
    /// Which addresses other homeservers' client-server APIs may have (delayed leaves of
    /// remote users): `auth.allow_private_federation`, as for the OpenID lookups.
    pub federation_destinations: DestinationPolicy,
    /// Cascade peers' server names (whose calls we may mirror).
    pub cascade_peers: Vec<OwnedServerName>,
}

impl CallsSettings {
    /// The settings from the configuration.
    pub fn from_config(config: &Config) -> Self {
        Self {
            server_name: config.matrix.server_name.clone(),
            homeserver_url: config.matrix.homeserver_url.clone(),
            bot_user_id: config.bot_user_id(),
            cascade_peers: config
                .cascade
                .peers
                .iter()
                .map(|p| p.server_name.clone())
                .collect(),
            notices: config.calls.notices,
            grace_period: Duration::from_secs(config.calls.grace_period_secs),
            federation_destinations: DestinationPolicy::new(config.auth.allow_private_federation),
            history: (config.calls.history_days > 0)
                .then(|| Duration::from_secs(config.calls.history_days.saturating_mul(86_400))),
        }
    }
}

/// The calls service. Cheap to clone.
#[derive(Clone)]
pub struct Calls {
    inner: Arc<Inner>,
}

struct Inner {
    settings: CallsSettings,
    store: AsyncStore,
    homeserver: HomeserverClient,
    sfu: SfuHandle,
    http: HttpClients,
    metrics: Arc<Metrics>,
    issued: IssuedParticipants,
    delegations: Delegations,
}

/// What a transaction did, for the appservice edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Its effects were committed now.
    Now,
    /// It had been applied before; nothing changed.
    Replayed,
}

/// One call as the admin API shows it: the Matrix view and the SFU view side by side.
#[derive(Debug, Clone, Serialize)]
pub struct CallReport {
    /// The Matrix room.
    pub room_id: String,
    /// Application (`m.call`).
    pub application: String,
    /// Call ID (`""` = room call).
    pub call_id: String,
    /// Who started it.
    pub started_by: String,
    /// Start (ms).
    pub started_ts: i64,
    /// Most members at once.
    pub peak_members: i64,
    /// Call members from MatrixRTC events.
    pub matrix: MatrixView,
    /// Participants connected to the call's SFU room.
    pub sfu: SfuView,
    /// Our mirrors of the call at cascade peers (`docs/cascade.md`): each peer's room, its
    /// mirrored participants and the local participants receiving them. Empty without any.
    pub mirrors: Vec<SfuView>,
}

/// The Matrix side of a [`CallReport`].
#[derive(Debug, Clone, Serialize)]
pub struct MatrixView {
    /// Current members.
    pub members: Vec<CallMemberView>,
}

/// The SFU side of a [`CallReport`].
#[derive(Debug, Clone, Serialize)]
pub struct SfuView {
    /// The SFU room name.
    pub room: RoomName,
    /// The SFU room's SID (`RM_…`, as in RoomService and webhooks); `None` while the SFU has
    /// no such room.
    pub sid: Option<RoomSid>,
    /// Who is connected.
    pub participants: Vec<SfuParticipantView>,
}

/// One connected participant in a [`CallReport`].
#[derive(Debug, Clone, Serialize)]
pub struct SfuParticipantView {
    /// LiveKit identity.
    pub identity: String,
    /// Participant SID.
    pub sid: String,
    /// The Matrix user it was issued to, if Conclave issued it.
    pub user_id: Option<String>,
    /// Their device.
    pub device_id: Option<String>,
    /// Whether it publishes anything.
    pub publisher: bool,
    /// Published tracks.
    pub tracks: usize,
    /// How it reaches the SFU: "udp", "tcp" (ICE over TCP, its network drops UDP), or
    /// "turn/udp", "turn/tcp", "turn/tls" (through the embedded TURN server); two, joined by
    /// ",", for a v0 client whose two peer connections differ. `None` until its peer
    /// connection is connected.
    pub transport: Option<String>,
    /// For a peer Conclave's media relay (`cascade:<peer>|<identity>`): each track it relays,
    /// with the RTP packets and payload bytes sent so far (`docs/cascade.md`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relayed: Option<Vec<crate::sfu::RelayedTrack>>,
}

/// The SFU room of a call.
fn sfu_room_of(call: &CallView) -> RoomName {
    let slot = if call.call_id.is_empty() {
        LEGACY_SLOT
    } else {
        call.call_id.as_str()
    };
    RoomName::from(room_name(&call.room_id, slot))
}

impl Calls {
    /// The service over `store`, removing participants through `sfu`.
    pub fn new(
        settings: CallsSettings,
        store: AsyncStore,
        homeserver: HomeserverClient,
        sfu: SfuHandle,
        http: HttpClients,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                settings,
                store,
                homeserver,
                sfu,
                http,
                metrics,
                issued: IssuedParticipants::default(),
                delegations: Delegations::default(),
            }),
        }
    }

    /// Starts the workers: expiry and grace-period supervision, issued-identity bookkeeping
    /// and delayed leaves, each following the SFU's events. Call once, inside the runtime.
    pub fn start(&self) {
        tokio::spawn(supervise::run(
            self.clone(),
            self.inner.sfu.subscribe_events(),
        ));
        tokio::spawn(delayed::run(
            self.clone(),
            self.inner.sfu.subscribe_events(),
            self.inner.delegations.subscribe(),
        ));
    }

    /// The client towards the local homeserver (also used for the start-up ping).
    pub fn homeserver(&self) -> &HomeserverClient {
        &self.inner.homeserver
    }

    /// The token service issued `p` a token valid for `lifetime`.
    pub fn issued(&self, p: IssuedParticipant, lifetime: Duration) {
        self.inner.issued.record(p, lifetime, Instant::now());
    }

    /// A client handed over its delayed leave for its participant (with its token request
    /// or later). `delegated` says it came after the token (the participant may be connected
    /// already, so its job starts now).
    pub async fn hand_over_delayed_leave(
        &self,
        leave: DelayedLeave,
        delegated: bool,
    ) -> Result<(), CallsError> {
        let (room, identity) = (leave.room_name.clone(), leave.identity.clone());
        self.inner
            .store
            .record_delayed_leave(leave, crate::clock::unix_millis())
            .await?;
        if delegated {
            self.inner.delegations.delegated(&room, &identity);
        }
        Ok(())
    }

    /// Applies one appservice transaction exactly once, then acts on what changed: members
    /// who are no longer joined leave the SFU, calls that start or end are announced, the
    /// bot accepts invites. Malformed events are counted and skipped.
    pub async fn apply_transaction(
        &self,
        txn_id: &str,
        events: &[Raw<AnyTimelineEvent>],
    ) -> Result<Applied, CallsError> {
        let store = &self.inner.store;
        // Fast path for retries: skip parsing (and its logs) when already applied. The check is
        // repeated inside the database transaction, which is what guarantees exactly-once.
        if store.is_transaction_processed(txn_id.to_owned()).await? {
            return Ok(Applied::Replayed);
        }
        let now_ms = crate::clock::unix_millis();
        let effects = events::transaction_effects(&self.inner.metrics, events, now_ms);
        let outcome = store
            .apply_transaction(txn_id.to_owned(), effects.clone(), now_ms)
            .await?;
        // Matrix decides who stays in the SFU: act on memberships that ended, and on server
        // ACLs (peer Conclaves' relays).
        for effect in &effects {
            match effect {
                Effect::Membership(m) => self.membership_changed(m).await,
                Effect::ServerAcl {
                    room_id, content, ..
                } => self.server_acl_changed(room_id, content).await,
                _ => {}
            }
        }
        Ok(match outcome {
            TxnOutcome::Applied(changes) => {
                self.act_on_call_changes(changes).await;
                Applied::Now
            }
            TxnOutcome::Replayed => Applied::Replayed,
        })
    }

    async fn membership_changed(&self, m: &MembershipRecord) {
        if m.membership == MembershipState::Invite
            && m.user_id.as_str() == self.inner.settings.bot_user_id
        {
            tokio::spawn(notices::accept_invite(
                self.inner.homeserver.clone(),
                m.room_id.clone(),
            ));
        }
        if m.membership != MembershipState::Join {
            let issued = self.inner.issued.of(&m.room_id, &m.user_id, Instant::now());
            self.remove(issued, m.membership.as_str()).await;
            self.cut_relays_without_members(&m.room_id, m.user_id.server_name())
                .await;
        }
    }

    /// Acts on call changes: a member whose call membership ended leaves the SFU; calls that
    /// start or end are announced in the room.
    pub async fn act_on_call_changes(&self, changes: Vec<CallChange>) {
        for change in changes {
            match change {
                CallChange::MemberLeft {
                    room_id,
                    user_id,
                    device_id,
                } => {
                    let issued =
                        self.inner
                            .issued
                            .of_device(&room_id, &user_id, &device_id, Instant::now());
                    self.remove(issued, "call membership ended").await;
                }
                CallChange::Started {
                    room_id,
                    started_by,
                } => {
                    tracing::info!(room_id = %room_id, started_by = %started_by, "call started");
                    self.notice(&room_id, notices::started_text(started_by.as_str()))
                        .await;
                }
                CallChange::Ended {
                    room_id,
                    started_by,
                    started_ts,
                    ended_ts,
                    peak_members,
                } => {
                    tracing::info!(room_id = %room_id, peak_members, "call ended");
                    let text =
                        notices::ended_text(&started_by, ended_ts - started_ts, peak_members);
                    self.notice(&room_id, text).await;
                }
            }
        }
    }

    async fn notice(&self, room_id: &RoomId, text: String) {
        if self.inner.settings.notices {
            notices::post(&self.inner.homeserver, room_id, text).await;
        }
    }

    /// Removes issued participants from the SFU because Matrix says they no longer belong.
    async fn remove(&self, participants: Vec<IssuedParticipant>, why: &str) {
        for p in participants {
            tracing::info!(
                room_id = %p.room_id,
                user_id = %p.user_id,
                identity = %p.identity,
                why,
                "removing SFU participant: Matrix says it no longer belongs to the call"
            );
            if !self
                .inner
                .sfu
                .remove(
                    &p.room_name,
                    &p.identity,
                    DisconnectReason::ParticipantRemoved,
                )
                .await
            {
                tracing::warn!("SFU loop gone; cannot remove participant");
            }
        }
    }

    /// Ends call memberships expired now, and forgets issued identities whose tokens can no
    /// longer be valid; returns how many call changes that made.
    pub async fn expire_once(&self) -> usize {
        self.inner.issued.prune(Instant::now());
        match self
            .inner
            .store
            .expire_call_members(crate::clock::unix_millis())
            .await
        {
            Ok(changes) => {
                let n = changes.len();
                if n > 0 {
                    tracing::info!(changes = n, "expired call memberships ended");
                }
                self.act_on_call_changes(changes).await;
                n
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot expire call memberships");
                0
            }
        }
    }

    /// Deletes store history older than `calls.history_days` (nothing when 0); what went.
    pub async fn prune_history_once(&self) -> Pruned {
        let Some(keep) = self.inner.settings.history else {
            return Pruned::default();
        };
        let keep_ms = i64::try_from(keep.as_millis()).unwrap_or(i64::MAX);
        let before = crate::clock::unix_millis().saturating_sub(keep_ms);
        match self.inner.store.prune_history(before).await {
            Ok(pruned) => {
                if !pruned.is_empty() {
                    tracing::info!(
                        transactions = pruned.transactions,
                        calls = pruned.calls,
                        call_members = pruned.call_members,
                        "old history deleted from the store"
                    );
                }
                pruned
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot prune the store's history");
                Pruned::default()
            }
        }
    }

    /// Every active call, with its Matrix and SFU views.
    pub async fn reports(&self) -> Result<Vec<CallReport>, CallsError> {
        let mut out = Vec::new();
        for call in self.inner.store.active_calls().await? {
            out.push(self.report(call).await);
        }
        Ok(out)
    }

    /// The active call in `room_id`; without one, the room-wide call's SFU room if it has
    /// participants (an encrypted room's `rtc.member` events are unreadable, so Matrix shows
    /// no members there: only the SFU knows who is in the call).
    async fn active_call(&self, room_id: &str) -> Result<CallView, CallsError> {
        if let Some(call) = self
            .inner
            .store
            .active_calls()
            .await?
            .into_iter()
            .find(|c| c.room_id == room_id)
        {
            return Ok(call);
        }
        let unseen = CallView {
            room_id: room_id.to_owned(),
            application: "m.call".to_owned(),
            call_id: String::new(),
            started_by: String::new(),
            started_ts: 0,
            ended_ts: None,
            peak_members: 0,
            members: Vec::new(),
        };
        if self
            .inner
            .sfu
            .participants(&sfu_room_of(&unseen))
            .await
            .is_empty()
        {
            return Err(CallsError::NoCall(room_id.to_owned()));
        }
        Ok(unseen)
    }

    /// The active call in `room_id`.
    pub async fn report_of(&self, room_id: &str) -> Result<CallReport, CallsError> {
        let call = self.active_call(room_id).await?;
        Ok(self.report(call).await)
    }

    /// The SFU side of LiveKit room `room` (with or without a Matrix call: a standalone SFU's
    /// rooms too).
    pub async fn sfu_room_report(&self, room: &str) -> Result<SfuView, CallsError> {
        let view = self.sfu_view(RoomName::from(room)).await;
        if view.sid.is_none() {
            return Err(CallsError::NoSfuRoom(room.to_owned()));
        }
        Ok(view)
    }

    async fn report(&self, call: CallView) -> CallReport {
        let room = sfu_room_of(&call);
        let mut mirrors = Vec::new();
        for peer in &self.inner.settings.cascade_peers {
            let mirror = RoomName::from(
                crate::matrix::naming::mirror_room_name(peer.as_str(), room.as_str()).as_str(),
            );
            if self.inner.sfu.room_sid(&mirror).await.is_some() {
                mirrors.push(self.sfu_view(mirror).await);
            }
        }
        let sfu = self.sfu_view(room).await;
        CallReport {
            room_id: call.room_id,
            application: call.application,
            call_id: call.call_id,
            started_by: call.started_by,
            started_ts: call.started_ts,
            peak_members: call.peak_members,
            matrix: MatrixView {
                members: call.members,
            },
            sfu,
            mirrors,
        }
    }

    async fn sfu_view(&self, room: RoomName) -> SfuView {
        let now = Instant::now();
        let mut transports = self.inner.sfu.transports(&room).await;
        let mut relayed = self.inner.sfu.relayed(&room).await;
        let participants = self
            .inner
            .sfu
            .participants(&room)
            .await
            .into_iter()
            .map(|p| {
                let issued = self.inner.issued.get(
                    &room,
                    &ParticipantIdentity::from(p.identity.as_str()),
                    now,
                );
                SfuParticipantView {
                    publisher: !p.tracks.is_empty(),
                    tracks: p.tracks.len(),
                    user_id: issued.as_ref().map(|i| i.user_id.to_string()),
                    device_id: issued.map(|i| i.device_id),
                    transport: transports.remove(&p.identity),
                    relayed: relayed.remove(&p.identity),
                    identity: p.identity,
                    sid: p.sid,
                }
            })
            .collect();
        SfuView {
            sid: self.inner.sfu.room_sid(&room).await,
            room,
            participants,
        }
    }

    /// An operator removes `identity` from the active call in `room_id`.
    pub async fn remove_from_call(
        &self,
        room_id: &str,
        identity: &ParticipantIdentity,
    ) -> Result<(), CallsError> {
        let call = self.active_call(room_id).await?;
        let room = sfu_room_of(&call);
        let present = self
            .inner
            .sfu
            .participants(&room)
            .await
            .iter()
            .any(|p| identity == p.identity.as_str());
        if !present {
            return Err(CallsError::NoParticipant(identity.to_string()));
        }
        tracing::info!(room_id, %identity, "admin removes a participant");
        if self
            .inner
            .sfu
            .remove(&room, identity, DisconnectReason::ParticipantRemoved)
            .await
        {
            Ok(())
        } else {
            Err(CallsError::SfuGone)
        }
    }
}
