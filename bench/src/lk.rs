//! A minimal LiveKit v0 signalling client (WebSocket `/rtc`, binary protobuf) for the
//! synthetic clients.

use futures_util::{SinkExt, StreamExt};
use livekit_protocol as lk;
use lk::signal_request::Message as Req;
use lk::signal_response::Message as Msg;
use prost::Message as _;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use super::BenchError;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One signalling connection.
pub struct LkSignal {
    ws: Ws,
}

/// What the next frame was.
pub enum Incoming {
    /// A signal message.
    Message(Box<Msg>),
    /// A control or unknown frame; nothing to do.
    Nothing,
    /// The server closed the connection.
    Closed,
}

impl LkSignal {
    /// Connects to `{ws_base}/rtc` with `token` and returns the join response.
    pub async fn connect(
        ws_base: &str,
        token: &str,
        auto_subscribe: bool,
    ) -> Result<(Self, lk::JoinResponse), BenchError> {
        let url = format!(
            "{ws_base}/rtc?access_token={token}&protocol=17&sdk=rust&version=conclave-bench\
             &auto_subscribe={}",
            u8::from(auto_subscribe)
        );
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .map_err(|e| BenchError::Signal(format!("connecting: {e}")))?;
        let mut me = Self { ws };
        loop {
            match me.recv().await {
                Incoming::Message(m) => match *m {
                    Msg::Join(j) => return Ok((me, j)),
                    other => {
                        return Err(BenchError::Signal(format!(
                            "first message is not join: {other:?}"
                        )))
                    }
                },
                Incoming::Nothing => continue,
                Incoming::Closed => return Err(BenchError::Signal("closed before join".into())),
            }
        }
    }

    /// Sends a request as binary protobuf.
    pub async fn send(&mut self, m: Req) -> Result<(), BenchError> {
        let bytes = lk::SignalRequest { message: Some(m) }.encode_to_vec();
        self.ws
            .send(WsMessage::Binary(bytes.into()))
            .await
            .map_err(|e| BenchError::Signal(format!("sending: {e}")))
    }

    /// The next frame (cancel-safe: usable in `select!`).
    pub async fn recv(&mut self) -> Incoming {
        match self.ws.next().await {
            Some(Ok(WsMessage::Binary(b))) => match lk::SignalResponse::decode(b.as_ref()) {
                Ok(r) => r
                    .message
                    .map_or(Incoming::Nothing, |m| Incoming::Message(Box::new(m))),
                Err(_) => Incoming::Nothing,
            },
            Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => Incoming::Closed,
            Some(Ok(_)) => Incoming::Nothing,
        }
    }

    /// Sends a leave request and closes (best effort).
    pub async fn leave(&mut self) {
        let _ = self
            .send(Req::Leave(lk::LeaveRequest {
                can_reconnect: false,
                reason: lk::DisconnectReason::ClientInitiated as i32,
                ..Default::default()
            }))
            .await;
        let _ = self.ws.close(None).await;
    }
}

/// Runs one synthetic LiveKit participant until `stop` flips: joins, publishes its track and/or
/// answers subscriber offers, sends frames while media is on, accounts for received frames.
/// Failures are recorded in `shared`.
pub async fn run_client(
    target: std::sync::Arc<super::server::ConclaveTarget>,
    room: String,
    spec: super::client::ClientSpec,
    shared: std::sync::Arc<super::client::Shared>,
    stop: tokio::sync::watch::Receiver<bool>,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
) {
    let who = spec.identity.clone();
    if let Err(e) = client_loop(target, room, spec, shared.clone(), stop, permit).await {
        tracing::debug!(client = %who, error = %e, "bench client failed");
        shared.fail(&who, &e);
    }
}

async fn client_loop(
    target: std::sync::Arc<super::server::ConclaveTarget>,
    room: String,
    spec: super::client::ClientSpec,
    shared: std::sync::Arc<super::client::Shared>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    mut permit: Option<tokio::sync::OwnedSemaphorePermit>,
) -> Result<(), BenchError> {
    use std::time::{Duration, Instant};
    let started = Instant::now();
    let token = target.token(&room, &spec.identity, spec.publish.is_some())?;
    let (mut sig, _join) =
        LkSignal::connect(&target.ws_url(), &token, spec.receive_tracks > 0).await?;
    let video = spec.profile.kind == str0m::media::MediaKind::Video;
    let mut client = super::client::MediaClient::new(spec, shared, started);
    if client.spec().publish.is_some() {
        let cid = "bench-track";
        sig.send(Req::AddTrack(lk::AddTrackRequest {
            cid: cid.into(),
            name: cid.into(),
            r#type: if video {
                lk::TrackType::Video as i32
            } else {
                lk::TrackType::Audio as i32
            },
            source: if video {
                lk::TrackSource::Camera as i32
            } else {
                lk::TrackSource::Microphone as i32
            },
            width: if video { 1280 } else { 0 },
            height: if video { 720 } else { 0 },
            ..Default::default()
        }))
        .await?;
        let sdp = client.publisher_offer(Instant::now(), cid)?;
        sig.send(Req::Offer(lk::SessionDescription {
            r#type: "offer".into(),
            sdp,
            id: 1,
            mid_to_track_id: Default::default(),
        }))
        .await?;
    }
    let mut ping = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            wake = client.wait() => client.on_wake(wake),
            incoming = sig.recv() => {
                match incoming {
                    Incoming::Message(m) => match *m {
                        Msg::Offer(sd) => {
                            let answer = client.subscriber_offer(Instant::now(), &sd.sdp)?;
                            sig.send(Req::Answer(lk::SessionDescription {
                                r#type: "answer".into(),
                                sdp: answer,
                                id: sd.id,
                                mid_to_track_id: Default::default(),
                            }))
                            .await?;
                        }
                        Msg::Answer(sd) => client.publisher_answer(&sd.sdp)?,
                        Msg::Trickle(t) => {
                            #[derive(serde::Deserialize)]
                            struct Init {
                                candidate: String,
                            }
                            if let Ok(init) = serde_json::from_str::<Init>(&t.candidate_init) {
                                let sub = t.target == lk::SignalTarget::Subscriber as i32;
                                client.remote_candidate(sub, &init.candidate);
                            }
                        }
                        Msg::Leave(l) => {
                            return Err(BenchError::Signal(format!(
                                "server sent leave (reason {})",
                                l.reason
                            )))
                        }
                        _ => {}
                    },
                    Incoming::Nothing => {}
                    Incoming::Closed => {
                        return Err(BenchError::Signal("server closed the WebSocket".into()))
                    }
                }
                client.flush();
            }
            _ = ping.tick() => {
                sig.send(Req::Ping(0)).await?;
            }
            _ = stop.changed() => break,
        }
        if permit.is_some() && client.ready() {
            permit = None;
        }
    }
    sig.leave().await;
    Ok(())
}
