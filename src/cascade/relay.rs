//! A relay: one peer's call mirrored into our mirror room.
//!
//! **Roster.** One signalling connection to the origin (`/rtc`, hidden, subscribing to
//! nothing) follows who is in the call and what they publish.
//!
//! **Media, one connection per origin participant.** For each participant that publishes,
//! another hidden connection subscribes to exactly that participant's tracks (each track once,
//! whatever the number of our subscribers), and a mirror participant joins our SFU under the
//! origin participant's identity, name and metadata. The two are glued at the SDP level: the
//! origin's subscriber offer is the mirror's publisher offer (track SIDs as `msid` track ids
//! bind them), our answer goes back as the subscriber answer, candidates both ways. So the
//! media flows from the origin's media port to ours without passing through this task, and
//! our engine forwards it like any publisher's. Both SFUs are ICE-lite; the mirror's
//! connection runs full ICE ([`crate::sfu::Join::cascade`]).
//!
//! Why one connection per participant: our engine presents a participant by the connection
//! it publishes on, and Element Call maps media to members by participant identity. A single
//! relay connection would present every origin participant as one (a later step may teach the
//! engine several identities per connection).
//!
//! Data packets travel too: the origin sends each media connection the packets of the
//! participant it mirrors only, and the mirror publishes them here as that participant's.
//! Speaker updates are computed here from the relayed audio levels. Every simulcast layer of
//! a track crosses (the origin sends a relay each layer on its own stream), so our SFU still
//! chooses a layer per local subscriber; our dynacast (the best quality our subscribers want
//! of a track) is passed to the origin, which sends no layer above it. The origin's later
//! mutes are applied to the mirror's tracks. A mirror room without local subscribers for
//! [`Target::idle_after`] (and no token issued for it meanwhile) ends the relay. A mirror
//! whose media connection ends while its participant still publishes is reopened after a
//! pause ([`Followed`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use livekit_protocol as lk;
use lk::signal_request::Message as Req;
use lk::signal_response::Message as Msg;
use prost::Message as _;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::auth::tokens::cascade::{PeerLink, RelayGrant, RELAY_IDENTITY_PREFIX};
use crate::config::CascadePeer;
use crate::net::{session_queue, SfuHandle};
use crate::sfu::ids::{ParticipantIdentity, RoomName};
use crate::sfu::{CascadeRole, Command, Join, SignalOut};

/// Keep-alive towards the origin's signalling (it closes silent sessions).
const PING_EVERY: Duration = Duration::from_secs(5);
/// How long a connection may take to open and join.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause before the roster connection is opened again after it ended.
const RETRY_AFTER: Duration = Duration::from_secs(2);
/// Attempts of the roster connection in a row before the relay gives up.
const MAX_ATTEMPTS: u32 = 5;
/// A roster connection that lasted this long resets the count of failures in a row.
const STABLE_AFTER: Duration = Duration::from_secs(30);
/// How often a relay looks for local subscribers in its mirror room and for mirrors to reopen.
const IDLE_CHECK: Duration = Duration::from_secs(1);
/// First pause before a mirror whose media connection ended is reopened (its participant
/// still publishing); doubled at each failure in a row up to [`MIRROR_RETRY_MAX`].
const MIRROR_RETRY_FIRST: Duration = Duration::from_secs(2);
/// Longest pause between two attempts to reopen a mirror.
const MIRROR_RETRY_MAX: Duration = Duration::from_secs(30);

/// When a token for a mirror room was last issued; shared by the relay and the service
/// that issues the tokens.
#[derive(Debug, Clone)]
pub(super) struct LastToken(Arc<Mutex<Instant>>);

impl LastToken {
    /// Issued now.
    pub(super) fn now() -> Self {
        Self(Arc::new(Mutex::new(Instant::now())))
    }

    /// Another token issued now.
    pub(super) fn touch(&self) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now();
    }

    fn elapsed(&self) -> Duration {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .elapsed()
    }
}

/// What to relay.
#[derive(Debug, Clone)]
pub(super) struct Target {
    /// The origin.
    pub(super) peer: CascadePeer,
    /// The call's Matrix room.
    pub(super) room_id: String,
    /// The call's slot.
    pub(super) slot_id: String,
    /// Our mirror room.
    pub(super) mirror: RoomName,
    /// How long the mirror may stay without a local subscriber (and no token issued).
    pub(super) idle_after: Duration,
    /// When a token for the mirror was last issued.
    pub(super) last_token: LastToken,
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Why a relay connection ended.
#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error("peer: {0}")]
    Peer(#[from] crate::auth::tokens::cascade::PeerError),
    #[error("signalling: {0}")]
    Ws(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("timed out: {0}")]
    Timeout(&'static str),
    #[error("closed: {0}")]
    Closed(&'static str),
    #[error("our SFU is not running")]
    SfuGone,
}

/// Opens a signalling connection on `grant` (v0, subscribing to nothing by itself) and
/// waits for its join response.
async fn connect(grant: &RelayGrant) -> Result<(Ws, lk::JoinResponse), RelayError> {
    let url = format!(
        "{}/rtc?access_token={}&auto_subscribe=0&protocol=15&sdk=conclave-cascade",
        grant.url.trim_end_matches('/'),
        grant.jwt
    );
    let (mut ws, _) = tokio::time::timeout(CONNECT_TIMEOUT, tokio_tungstenite::connect_async(url))
        .await
        .map_err(|_| RelayError::Timeout("connect"))??;
    let join = tokio::time::timeout(CONNECT_TIMEOUT, async {
        loop {
            match recv(&mut ws).await? {
                Some(Msg::Join(j)) => return Ok(j),
                Some(_) => {}
                None => return Err(RelayError::Closed("before the join response")),
            }
        }
    })
    .await
    .map_err(|_| RelayError::Timeout("join response"))??;
    Ok((ws, join))
}

/// The next signal message (`None`: the connection ended).
async fn recv(ws: &mut Ws) -> Result<Option<Msg>, RelayError> {
    while let Some(frame) = ws.next().await {
        let bytes = match frame? {
            WsMessage::Binary(b) => b,
            WsMessage::Close(_) => return Ok(None),
            _ => continue,
        };
        match lk::SignalResponse::decode(bytes.as_ref()) {
            Ok(r) => {
                if let Some(m) = r.message {
                    return Ok(Some(m));
                }
            }
            Err(e) => tracing::debug!(error = %e, "undecodable signal message from the origin"),
        }
    }
    Ok(None)
}

async fn send(ws: &mut Ws, m: Req) -> Result<(), RelayError> {
    let bytes = lk::SignalRequest { message: Some(m) }.encode_to_vec();
    ws.send(WsMessage::Binary(bytes.into())).await?;
    Ok(())
}

/// Leaves the origin's room and closes the connection. Without the leave the origin would
/// keep the participant for a resume (30 s) after the socket closed.
async fn hang_up(ws: &mut Ws) {
    let leave = Req::Leave(lk::LeaveRequest {
        can_reconnect: false,
        reason: lk::DisconnectReason::ClientInitiated as i32,
        action: lk::leave_request::Action::Disconnect as i32,
        ..Default::default()
    });
    let _ = send(ws, leave).await;
    let _ = ws.close(None).await;
}

fn ping() -> Req {
    Req::Ping(crate::clock::unix_millis())
}

/// Whether `p` is mirrored: it publishes and is a real participant (not hidden, not a relay).
fn mirrored(p: &lk::ParticipantInfo) -> bool {
    !p.tracks.is_empty()
        && !p.identity.starts_with(RELAY_IDENTITY_PREFIX)
        && !p.permission.as_ref().is_some_and(|x| x.hidden)
        && p.state != lk::participant_info::State::Disconnected as i32
}

/// Runs the relay of `target` until the origin stops answering (a few attempts), mirroring
/// each publishing participant.
#[tracing::instrument(name = "cascade_relay", skip_all, fields(peer = %target.peer.server_name, mirror = %target.mirror))]
pub(super) async fn run(link: PeerLink, sfu: SfuHandle, target: Target, first: RelayGrant) {
    let mut failures = 0;
    let mut grant = Some(first);
    while failures < MAX_ATTEMPTS {
        let started = tokio::time::Instant::now();
        match roster(&link, &sfu, &target, grant.take()).await {
            Ok(()) => {
                tracing::info!("relay ended");
                return;
            }
            Err(e) => {
                // Failures in a row count; a connection that served a while starts afresh.
                failures = if started.elapsed() > STABLE_AFTER {
                    1
                } else {
                    failures + 1
                };
                tracing::warn!(error = %e, failures, "relay roster connection failed");
            }
        }
        tokio::time::sleep(RETRY_AFTER).await;
    }
    tracing::warn!("relay given up");
}

/// A mirrored participant's task and the channel that tells it about new tracks.
struct Mirror {
    task: JoinHandle<()>,
    updates: mpsc::Sender<lk::ParticipantInfo>,
    started: Instant,
}

/// An origin participant the roster follows: its latest info and its mirror, if running.
///
/// Why reopen: a mirror's media connection can end while its participant still publishes
/// (the connection timed out connecting on a loaded machine, the origin's operator removed
/// it, a grant request failed). The roster sees no change of that participant, so without a
/// retry its media would never reach our users again for the rest of the call.
struct Followed {
    info: lk::ParticipantInfo,
    mirror: Option<Mirror>,
    /// Mirrors of this participant that ended in a row, each soon after it started.
    ended: u32,
    /// Not reopened before this.
    retry_at: Instant,
}

impl Followed {
    fn new(info: lk::ParticipantInfo) -> Self {
        Self {
            info,
            mirror: None,
            ended: 0,
            retry_at: Instant::now(),
        }
    }

    /// Notes a mirror that has ended and when to reopen it.
    fn reap(&mut self, now: Instant) {
        let Some(m) = self.mirror.take_if(|m| m.task.is_finished()) else {
            return;
        };
        // A mirror that served a while starts the count afresh.
        self.ended = if m.started.elapsed() > STABLE_AFTER {
            1
        } else {
            self.ended.saturating_add(1)
        };
        let pause = mirror_retry_pause(self.ended);
        self.retry_at = now + pause;
        if mirrored(&self.info) {
            tracing::warn!(
                identity = %self.info.identity,
                ended = self.ended,
                retry_in_ms = pause.as_millis() as u64,
                "mirror ended while its participant still publishes: reopening"
            );
        }
    }

    /// Starts its mirror if it publishes, has none running and its pause is over.
    fn start_if_due(&mut self, now: Instant, start: impl FnOnce(lk::ParticipantInfo) -> Mirror) {
        if self.mirror.is_none() && now >= self.retry_at && mirrored(&self.info) {
            self.mirror = Some(start(self.info.clone()));
        }
    }
}

/// The pause before reopening a mirror that ended `ended` times in a row.
fn mirror_retry_pause(ended: u32) -> Duration {
    let doublings = ended.saturating_sub(1).min(8);
    MIRROR_RETRY_FIRST
        .saturating_mul(1 << doublings)
        .min(MIRROR_RETRY_MAX)
}

/// The roster connection: mirrors appear and go with the origin's participants. `Ok` when
/// the origin ended the relay (it was cut) or nobody here received it for
/// [`Target::idle_after`], an error when the connection failed.
async fn roster(
    link: &PeerLink,
    sfu: &SfuHandle,
    target: &Target,
    grant: Option<RelayGrant>,
) -> Result<(), RelayError> {
    let grant = match grant {
        Some(g) => g,
        None => {
            link.relay_grant(&target.peer, &target.room_id, &target.slot_id, None)
                .await?
        }
    };
    let (mut ws, join) = connect(&grant).await?;
    tracing::info!(origin_room = %grant.room, "relay roster connected");
    let mut mirrors: HashMap<String, Followed> = HashMap::new();
    let start = |p: lk::ParticipantInfo| {
        let (tx, rx) = mpsc::channel(16);
        let task = tokio::spawn(mirror(link.clone(), sfu.clone(), target.clone(), p, rx));
        Mirror {
            task,
            updates: tx,
            started: Instant::now(),
        }
    };
    let seen = |mirrors: &mut HashMap<String, Followed>, p: lk::ParticipantInfo| {
        if p.state == lk::participant_info::State::Disconnected as i32 {
            // Its updates channel closes: the mirror leaves our room and hangs up.
            mirrors.remove(&p.identity);
            return;
        }
        let now = Instant::now();
        let followed = match mirrors.get_mut(&p.identity) {
            Some(f) => {
                f.reap(now);
                if let Some(m) = &f.mirror {
                    let _ = m.updates.try_send(p.clone());
                }
                f.info = p;
                f
            }
            None if mirrored(&p) => mirrors
                .entry(p.identity.clone())
                .or_insert_with(|| Followed::new(p)),
            None => return,
        };
        followed.start_if_due(now, start);
    };
    for p in join.other_participants {
        seen(&mut mirrors, p);
    }
    let mut keepalive = tokio::time::interval(PING_EVERY);
    let mut idle_check = tokio::time::interval(IDLE_CHECK);
    let mut quiet_since: Option<Instant> = None;
    let result = loop {
        tokio::select! {
            _ = idle_check.tick() => {
                let now = Instant::now();
                for f in mirrors.values_mut() {
                    f.reap(now);
                    f.start_if_due(now, start);
                }
                // Anyone in the mirror room but the mirrors is a local subscriber.
                let here = sfu.participants(&target.mirror).await;
                if here.iter().any(|p| !mirrors.contains_key(&p.identity)) {
                    quiet_since = None;
                    continue;
                }
                let quiet = quiet_since.get_or_insert_with(Instant::now).elapsed();
                if quiet >= target.idle_after && target.last_token.elapsed() >= target.idle_after {
                    tracing::info!(
                        idle_s = target.idle_after.as_secs(),
                        "no local subscriber in the mirror room: relay ends"
                    );
                    break Ok(());
                }
            }
            m = recv(&mut ws) => match m {
                Ok(Some(Msg::Update(u))) => {
                    for p in u.participants {
                        seen(&mut mirrors, p);
                    }
                }
                // The origin restarts: try again (a new grant, a new roster).
                Ok(Some(Msg::Leave(l)))
                    if l.action == lk::leave_request::Action::Reconnect as i32 =>
                {
                    break Err(RelayError::Closed("the origin asked to reconnect"));
                }
                Ok(Some(Msg::Leave(_))) | Ok(None) => break Ok(()),
                Ok(Some(_)) => {}
                Err(e) => break Err(e),
            },
            _ = keepalive.tick() => {
                if let Err(e) = send(&mut ws, ping()).await {
                    break Err(e);
                }
            }
        }
    };
    // Every mirror leaves our room (its updates channel closes), within a bound.
    let tasks: Vec<JoinHandle<()>> = mirrors
        .into_values()
        .filter_map(|f| f.mirror.map(|m| m.task))
        .collect();
    for mut task in tasks {
        if tokio::time::timeout(CONNECT_TIMEOUT, &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
    hang_up(&mut ws).await;
    result
}

/// Mirrors one origin participant until its media connection ends.
#[tracing::instrument(name = "cascade_mirror", skip_all, fields(identity = %info.identity))]
async fn mirror(
    link: PeerLink,
    sfu: SfuHandle,
    target: Target,
    info: lk::ParticipantInfo,
    updates: mpsc::Receiver<lk::ParticipantInfo>,
) {
    match mirror_inner(&link, &sfu, &target, info, updates).await {
        Ok(()) => tracing::info!("mirror ended"),
        Err(e) => tracing::warn!(error = %e, "mirror failed"),
    }
}

async fn mirror_inner(
    link: &PeerLink,
    sfu: &SfuHandle,
    target: &Target,
    info: lk::ParticipantInfo,
    mut updates: mpsc::Receiver<lk::ParticipantInfo>,
) -> Result<(), RelayError> {
    let grant = link
        .relay_grant(
            &target.peer,
            &target.room_id,
            &target.slot_id,
            Some(&info.identity),
        )
        .await?;
    let (mut ws, _) = connect(&grant).await?;
    // Our side: a participant under the origin's identity that publishes what the origin
    // sends it.
    let session = sfu.new_session(&target.mirror);
    let (sink, mut queue) = session_queue();
    let join = Join {
        session,
        room: target.mirror.clone(),
        identity: ParticipantIdentity::from(info.identity.as_str()),
        name: info.name.clone(),
        metadata: info.metadata.clone(),
        attributes: info.attributes.clone(),
        permission: lk::ParticipantPermission {
            can_publish: true,
            can_subscribe: false,
            // The origin sends this connection the mirrored participant's data only.
            can_publish_data: true,
            ..Default::default()
        },
        auto_subscribe: false,
        client_protocol: 0,
        single_pc: false,
        ice_servers: Vec::new(),
        // Our SFU binds the mirror a socket of its own.
        cascade: CascadeRole::Mirror(None),
    };
    if !sfu.open(sink, join).await {
        return Err(RelayError::SfuGone);
    }
    let mut announced: Vec<Announced> = Vec::new();
    let result = async {
        announce(sfu, session, &mut ws, &info, &mut announced).await?;
        let mut keepalive = tokio::time::interval(PING_EVERY);
        loop {
            tokio::select! {
                m = recv(&mut ws) => match m? {
                    Some(Msg::Offer(sd)) => {
                        local(sfu, session, Req::Offer(sd)).await?;
                    }
                    Some(Msg::Trickle(mut t)) => {
                        t.target = lk::SignalTarget::Publisher as i32;
                        local(sfu, session, Req::Trickle(t)).await?;
                    }
                    Some(Msg::Leave(_)) | None => return Ok(()),
                    Some(_) => {}
                },
                out = queue.recv() => match out {
                    Some(SignalOut::Message(m)) => match *m {
                        Msg::Answer(sd) => send(&mut ws, Req::Answer(sd)).await?,
                        Msg::TrackPublished(r) => {
                            let local_sid = r.track.map(|t| (t.sid, t.muted));
                            if let (Some(a), Some((sid, muted))) =
                                (announced.iter_mut().find(|a| a.origin_sid == r.cid), local_sid)
                            {
                                a.local_sid = Some(sid);
                                // A mute that came while it was being published.
                                if muted != a.muted {
                                    a.mute(sfu, session).await?;
                                }
                            }
                        }
                        Msg::Trickle(mut t) => {
                            t.target = lk::SignalTarget::Subscriber as i32;
                            send(&mut ws, Req::Trickle(t)).await?;
                        }
                        // Our dynacast: the best quality our subscribers want of a track is all
                        // the origin needs to send us.
                        Msg::SubscribedQualityUpdate(u) => {
                            let best = u
                                .subscribed_codecs
                                .first()
                                .into_iter()
                                .flat_map(|c| &c.qualities)
                                .filter(|q| q.enabled)
                                .map(|q| q.quality)
                                .max()
                                .unwrap_or(lk::VideoQuality::Low as i32);
                            let track = announced
                                .iter_mut()
                                .find(|a| a.local_sid.as_deref() == Some(u.track_sid.as_str()));
                            if let Some(a) = track.filter(|a| a.quality != best) {
                                a.quality = best;
                                tracing::debug!(track = %a.origin_sid, quality = best, "relayed layers follow our subscribers");
                                send(&mut ws, quality_setting(&a.origin_sid, best)).await?;
                            }
                        }
                        _ => {}
                    },
                    Some(SignalOut::Close) | None => return Err(RelayError::Closed("by our SFU")),
                },
                u = updates.recv() => match u {
                    Some(newer) => announce(sfu, session, &mut ws, &newer, &mut announced).await?,
                    None => return Ok(()),
                },
                _ = keepalive.tick() => send(&mut ws, ping()).await?,
            }
        }
    }
    .await;
    sfu.disconnect(session, 0, lk::DisconnectReason::ClientInitiated)
        .await;
    hang_up(&mut ws).await;
    result
}

/// Sends a request of the mirror participant `session` to our SFU.
async fn local(sfu: &SfuHandle, session: crate::sfu::SessionId, m: Req) -> Result<(), RelayError> {
    let cmd = Command::Request {
        session,
        message: Box::new(m),
    };
    if sfu.command(cmd).await {
        Ok(())
    } else {
        Err(RelayError::SfuGone)
    }
}

/// A track of the mirrored participant, announced to our SFU.
struct Announced {
    /// Its SID at the origin (our `cid`).
    origin_sid: String,
    /// Its SID here, once our SFU published it.
    local_sid: Option<String>,
    /// Whether the origin says it is muted.
    muted: bool,
    /// The best quality asked of the origin (what our subscribers want).
    quality: i32,
}

/// Asks the origin for the layers of `track` up to `quality`.
fn quality_setting(track: &str, quality: i32) -> Req {
    Req::TrackSetting(lk::UpdateTrackSettings {
        track_sids: vec![track.to_owned()],
        disabled: false,
        quality,
        ..Default::default()
    })
}

impl Announced {
    /// Applies the origin's mute state (`muted`) here (once it is published here;
    /// [`mirror_inner`] catches up on `TrackPublished`).
    async fn mute(
        &self,
        sfu: &SfuHandle,
        session: crate::sfu::SessionId,
    ) -> Result<(), RelayError> {
        let muted = self.muted;
        let Some(sid) = &self.local_sid else {
            return Ok(());
        };
        tracing::debug!(track = %self.origin_sid, muted, "mirrored track mute");
        local(
            sfu,
            session,
            Req::Mute(lk::MuteTrackRequest {
                sid: sid.clone(),
                muted,
            }),
        )
        .await
    }
}

/// Announces `info`'s tracks not announced yet: to our SFU as the mirror's tracks (the
/// origin's track SID as `cid`, which the origin's offer names in `msid`; its simulcast
/// layers, which the origin relays all), and to the origin as subscriptions. Mute changes of
/// tracks announced before are applied here.
async fn announce(
    sfu: &SfuHandle,
    session: crate::sfu::SessionId,
    ws: &mut Ws,
    info: &lk::ParticipantInfo,
    announced: &mut Vec<Announced>,
) -> Result<(), RelayError> {
    for t in &info.tracks {
        if let Some(a) = announced.iter_mut().find(|a| a.origin_sid == t.sid) {
            if a.muted != t.muted {
                a.muted = t.muted;
                a.mute(sfu, session).await?;
            }
        }
    }
    let fresh: Vec<&lk::TrackInfo> = info
        .tracks
        .iter()
        .filter(|t| !announced.iter().any(|a| a.origin_sid == t.sid))
        .collect();
    if fresh.is_empty() {
        return Ok(());
    }
    for t in &fresh {
        let add = lk::AddTrackRequest {
            cid: t.sid.clone(),
            name: t.name.clone(),
            r#type: t.r#type,
            width: t.width,
            height: t.height,
            muted: t.muted,
            disable_red: t.disable_red,
            source: t.source,
            encryption: t.encryption,
            stream: t.stream.clone(),
            // The layers per codec (`TrackInfo.layers` is their deprecated copy).
            layers: t
                .codecs
                .first()
                .map(|c| c.layers.clone())
                .unwrap_or_default(),
            ..Default::default()
        };
        local(sfu, session, Req::AddTrack(add)).await?;
    }
    let sids: Vec<String> = fresh.iter().map(|t| t.sid.clone()).collect();
    send(
        ws,
        Req::Subscription(lk::UpdateSubscription {
            track_sids: sids.clone(),
            subscribe: true,
            participant_tracks: vec![lk::ParticipantTracks {
                participant_sid: info.sid.clone(),
                track_sids: sids.clone(),
            }],
        }),
    )
    .await?;
    for sid in &sids {
        send(ws, quality_setting(sid, lk::VideoQuality::High as i32)).await?;
    }
    announced.extend(fresh.iter().map(|t| Announced {
        origin_sid: t.sid.clone(),
        local_sid: None,
        muted: t.muted,
        quality: lk::VideoQuality::High as i32,
    }));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mirror_is_reopened_after_a_pause_that_doubles_up_to_a_bound() {
        let pauses: Vec<u64> = (1..=7).map(|n| mirror_retry_pause(n).as_secs()).collect();
        assert_eq!(pauses, [2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(mirror_retry_pause(u32::MAX), MIRROR_RETRY_MAX);
    }
}
