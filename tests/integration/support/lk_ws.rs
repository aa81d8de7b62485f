//! A minimal LiveKit signalling client over WebSocket (tokio-tungstenite + livekit-protocol),
//! for protocol-level tests: it sees every frame, sends anything, including garbage.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use livekit_protocol as lk;
use lk::signal_request::Message as Req;
use lk::signal_response::Message as Msg;
use prost::Message as _;
use tokio_tungstenite::tungstenite::Message as WsMessage;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A connected signalling client.
pub struct WsClient {
    ws: Ws,
}

/// Why a connect was refused: HTTP status and body.
#[derive(Debug)]
pub struct Refused {
    /// HTTP status.
    pub status: u16,
    /// Body text.
    pub body: String,
}

/// The signalling path a test client takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// `/rtc`: two peer connections, the server offers the subscriber one.
    V0,
    /// `/rtc/v1?join_request=…`: one peer connection, the client always offers.
    V1,
}

impl Path {
    /// Both, for tests that must hold on each.
    pub const BOTH: [Path; 2] = [Path::V0, Path::V1];
}

/// A `join_request` as client-sdk-js builds it: gzip'd `JoinRequest`, `btoa` with `+/`
/// swapped for `-_`, the `=` padding kept and percent-encoded by `URLSearchParams`.
pub fn js_join_request(req: &lk::JoinRequest) -> String {
    use std::io::Write as _;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&req.encode_to_vec()).expect("gzip into a Vec");
    js_encode(lk::WrappedJoinRequest {
        compression: lk::wrapped_join_request::Compression::Gzip as i32,
        join_request: gz.finish().expect("gzip into a Vec"),
    })
}

/// The outer layers of [`js_join_request`] alone.
pub fn js_encode(wrapped: lk::WrappedJoinRequest) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .encode(wrapped.encode_to_vec())
        .replace('+', "-")
        .replace('/', "_")
        .replace('=', "%3D")
}

/// The join request a JS client sends with no offer yet: protocol 16, auto-subscribe on.
pub fn plain_join_request() -> lk::JoinRequest {
    lk::JoinRequest {
        client_info: Some(lk::ClientInfo {
            sdk: lk::client_info::Sdk::Js as i32,
            protocol: 16,
            client_protocol: 1,
            ..Default::default()
        }),
        connection_settings: Some(lk::ConnectionSettings {
            auto_subscribe: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}

impl WsClient {
    /// Connects on `path`: v0 as [`WsClient::connect`]; v1 to
    /// `{base}/rtc/v1?access_token=…&join_request=<request>&{query}`.
    pub async fn connect_on(
        path: Path,
        base: &str,
        token: &str,
        request: &lk::JoinRequest,
        query: &str,
    ) -> Result<Self, Refused> {
        match path {
            Path::V0 => Self::connect(base, token, query).await,
            Path::V1 => {
                let url = format!(
                    "{base}/rtc/v1?access_token={token}&join_request={}&{query}",
                    js_join_request(request)
                );
                Self::connect_url(url).await
            }
        }
    }

    /// Connects to `{base}/rtc?access_token=…&{query}`.
    pub async fn connect(base: &str, token: &str, query: &str) -> Result<Self, Refused> {
        let url = format!("{base}/rtc?access_token={token}&protocol=17&sdk=rust-test&{query}");
        Self::connect_url(url).await
    }

    async fn connect_url(url: String) -> Result<Self, Refused> {
        match tokio_tungstenite::connect_async(url).await {
            Ok((ws, _)) => Ok(Self { ws }),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(Refused {
                status: resp.status().as_u16(),
                body: resp
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default(),
            }),
            Err(e) => Err(Refused {
                status: 0,
                body: e.to_string(),
            }),
        }
    }

    /// Wraps an already connected WebSocket (any path, e.g. `/rtc/v1`).
    pub fn from_stream(ws: Ws) -> Self {
        Self { ws }
    }

    /// Sends a request as binary protobuf.
    pub async fn send(&mut self, m: Req) -> Result<()> {
        let bytes = lk::SignalRequest { message: Some(m) }.encode_to_vec();
        self.ws.send(WsMessage::Binary(bytes.into())).await?;
        Ok(())
    }

    /// Sends a raw frame.
    pub async fn send_raw(&mut self, m: WsMessage) -> Result<()> {
        self.ws.send(m).await?;
        Ok(())
    }

    /// The next signal message (skipping WebSocket control frames), or `None` on close/timeout.
    pub async fn recv(&mut self, timeout: Duration) -> Option<Msg> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let frame = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()??;
            match frame.ok()? {
                WsMessage::Binary(b) => {
                    return lk::SignalResponse::decode(b.as_ref()).ok()?.message;
                }
                WsMessage::Text(t) => {
                    let r: lk::SignalResponse = serde_json::from_str(t.as_str()).ok()?;
                    return r.message;
                }
                WsMessage::Close(_) => return None,
                _ => continue,
            }
        }
    }

    /// Receives until `pred` matches, returning every message seen (the match last).
    pub async fn recv_until(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&Msg) -> bool,
    ) -> Result<Vec<Msg>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let Some(m) = self.recv(left).await else {
                bail!("no matching message within {timeout:?}; saw {seen:?}");
            };
            let hit = pred(&m);
            seen.push(m);
            if hit {
                return Ok(seen);
            }
        }
    }

    /// Whether the server closed the connection within `timeout`.
    /// The close frame's code and reason, if the server closes within `timeout` with one.
    pub async fn close_frame_within(&mut self, timeout: Duration) -> Option<(u16, String)> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Ok(Some(Ok(WsMessage::Close(Some(f))))) => {
                    return Some((f.code.into(), f.reason.to_string()))
                }
                Ok(Some(Ok(_))) => continue,
                _ => return None,
            }
        }
    }

    pub async fn closed_within(&mut self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return false,
                Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(WsMessage::Close(_)))) => return true,
                Ok(Some(Ok(_))) => continue,
            }
        }
    }
}

/// The join response, or an error naming what came instead.
pub async fn expect_join(c: &mut WsClient) -> Result<lk::JoinResponse> {
    match c
        .recv(Duration::from_secs(5))
        .await
        .context("no first message")?
    {
        Msg::Join(j) => Ok(j),
        other => bail!("first message is not join: {other:?}"),
    }
}
