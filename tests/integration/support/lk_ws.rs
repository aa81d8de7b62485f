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

impl WsClient {
    /// Connects to `{base}/rtc?access_token=…&{query}`.
    pub async fn connect(base: &str, token: &str, query: &str) -> Result<Self, Refused> {
        let url = format!("{base}/rtc?access_token={token}&protocol=17&sdk=rust-test&{query}");
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
