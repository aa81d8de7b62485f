//! The receiving side of the cascade (`docs/cascade.md`): mirrors of peer Conclaves' calls.
//!
//! When a peer Conclave (the origin) is asked for a token by one of our users, it asks us
//! (`POST /_conclave/cascade/v1/mirror`, [`Cascade::mirror`]) for a token of that user in our
//! **mirror room** of its call. We check the origin like it checks us (a configured peer,
//! proven by its bot's OpenID token), check our user is joined to the Matrix room, start the
//! relay of that call if it is not running (`relay.rs`), and mint the user a subscribe-only
//! token for the mirror room. The user's client then connects only to us.
//!
//! A relay is one roster connection to the origin's signalling plus, per origin participant
//! that publishes, one media connection (`relay.rs` explains why), each participant mirrored
//! here under its own identity, name and metadata.
#![warn(missing_docs)]

mod relay;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ruma::{OwnedServerName, RoomId, ServerName, UserId};
use tokio::task::JoinHandle;

use crate::auth::tokens::cascade::PeerLink;
use crate::auth::tokens::{TokenResponse, TokenService};
use crate::auth::AuthError;
use crate::config::CascadePeer;
use crate::matrix::naming::{room_name, LEGACY_SLOT};
use crate::net::SfuHandle;
use crate::sfu::ids::RoomName;
use crate::sfu::registry::RoomOptions;

/// The name of our mirror of `origin`'s SFU room `origin_room`.
pub fn mirror_room_name(origin: &ServerName, origin_room: &str) -> RoomName {
    RoomName::from(crate::matrix::naming::mirror_room_name(origin.as_str(), origin_room).as_str())
}

/// What the cascade needs of the configuration.
#[derive(Debug, Clone)]
pub struct CascadeSettings {
    /// This homeserver.
    pub server_name: OwnedServerName,
    /// Our SFU URL, handed to our users.
    pub livekit_public_url: String,
    /// How long a mirror may stay without a local subscriber before its relay ends
    /// (`cascade.mirror_idle_secs`).
    pub mirror_idle: Duration,
}

impl CascadeSettings {
    /// The settings from the configuration.
    pub fn from_config(config: &crate::config::Config) -> Self {
        Self {
            server_name: config.matrix.server_name.clone(),
            livekit_public_url: config.livekit_public_url(),
            mirror_idle: Duration::from_secs(config.cascade.mirror_idle_secs.max(1)),
        }
    }
}

/// One running relay (a peer's call mirrored here).
struct Running {
    task: JoinHandle<()>,
    /// When a token for its mirror was last issued (the relay does not end as idle while
    /// someone is on the way).
    last_token: relay::LastToken,
}

/// The cascade's receiving side. Cheap to clone.
#[derive(Clone)]
pub struct Cascade {
    inner: Arc<Inner>,
}

struct Inner {
    settings: CascadeSettings,
    tokens: TokenService,
    link: PeerLink,
    sfu: SfuHandle,
    /// By mirror room.
    relays: Mutex<HashMap<RoomName, Running>>,
}

impl Cascade {
    /// The service: checks requests with `tokens`, talks to peers through `link`, mirrors into
    /// `sfu`.
    pub fn new(
        settings: CascadeSettings,
        tokens: TokenService,
        link: PeerLink,
        sfu: SfuHandle,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                settings,
                tokens,
                link,
                sfu,
                relays: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// `POST /_conclave/cascade/v1/mirror`: a token of our user in our mirror of the origin's
    /// call, the relay started if needed. Refusals name what failed.
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn mirror(&self, body: &[u8]) -> Result<TokenResponse, AuthError> {
        let (peer, request) = self.inner.tokens.verify_mirror_request(body).await?;
        let origin = &peer.server_name;
        let settings = &self.inner.settings;
        let room_id = RoomId::parse(request.room_id.as_deref().unwrap_or_default())
            .map_err(|_| AuthError::InvalidParam("`room_id` is not a Matrix room ID".into()))?;
        let slot_id = request
            .slot_id
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| LEGACY_SLOT.to_owned());
        let user = request.user_id.as_deref().unwrap_or_default();
        let user_id = UserId::parse(user)
            .map_err(|_| AuthError::InvalidParam(format!("`user_id` {user:?} is not a user ID")))?;
        if user_id.server_name() != settings.server_name {
            return Err(AuthError::Forbidden(format!(
                "{user_id} is not a user of {}",
                settings.server_name
            )));
        }
        if peer.url.is_none() {
            return Err(AuthError::Forbidden(format!(
                "{origin} is a cascade peer without a url here: nothing to pull from"
            )));
        }
        let device_id = request
            .device_id
            .clone()
            .filter(|d| !d.is_empty())
            .ok_or_else(|| AuthError::BadJson("The request body is missing `device_id`".into()))?;
        // Our user, joined to the room (our own homeserver's word).
        self.inner.tokens.require_joined(&room_id, &user_id).await?;
        let origin_room = room_name(room_id.as_str(), &slot_id);
        let mirror = mirror_room_name(origin, &origin_room);
        self.ensure_relay(&peer, room_id.as_str(), &slot_id, &mirror)
            .await?;
        let token = self.inner.tokens.mirror_token(
            &room_id,
            &mirror,
            &user_id,
            &device_id,
            request.member_id.as_deref(),
        )?;
        tracing::info!(%room_id, %user_id, %origin, %mirror, "mirror token issued");
        Ok(TokenResponse {
            url: settings.livekit_public_url.clone(),
            jwt: token,
        })
    }

    /// Starts the relay into `mirror` unless it runs; fails if the origin refuses its grant
    /// (then there is nothing to mirror, and the origin answers its user directly).
    async fn ensure_relay(
        &self,
        peer: &CascadePeer,
        room_id: &str,
        slot_id: &str,
        mirror: &RoomName,
    ) -> Result<(), AuthError> {
        {
            let mut relays = self
                .inner
                .relays
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            relays.retain(|_, r| !r.task.is_finished());
            if let Some(r) = relays.get(mirror) {
                r.last_token.touch();
                return Ok(());
            }
        }
        let grant = self
            .inner
            .link
            .relay_grant(peer, room_id, slot_id, None)
            .await
            .map_err(|e| {
                AuthError::Forbidden(format!("no relay from {}: {e}", peer.server_name))
            })?;
        self.inner
            .sfu
            .create_room(mirror, RoomOptions::default())
            .await;
        let target = relay::Target {
            peer: peer.clone(),
            room_id: room_id.to_owned(),
            slot_id: slot_id.to_owned(),
            mirror: mirror.clone(),
            idle_after: self.inner.settings.mirror_idle,
            last_token: relay::LastToken::now(),
        };
        let mut relays = self
            .inner
            .relays
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Two requests may have raced here: the first relay started serves both.
        if let Some(r) = relays.get(mirror).filter(|r| !r.task.is_finished()) {
            r.last_token.touch();
            return Ok(());
        }
        let last_token = target.last_token.clone();
        let task = tokio::spawn(relay::run(
            self.inner.link.clone(),
            self.inner.sfu.clone(),
            target,
            grant,
        ));
        relays.insert(mirror.clone(), Running { task, last_token });
        Ok(())
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let relays = self
            .relays
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        for r in relays.values() {
            r.task.abort();
        }
    }
}
