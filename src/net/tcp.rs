//! ICE over TCP (RFC 6544): passive host candidates on `rtc.tcp_port`, for clients whose
//! network drops UDP. Each accepted connection carries one peer connection's packets framed
//! as RFC 4571 says (a 16-bit length, then the packet); its frames reach the media loop that
//! owns the peer connection like datagrams, tagged [`IpProto::Tcp`], and what the engine
//! sends to that peer is framed back onto the same connection.
//!
//! Nothing here trusts the other end: a connection must open with a STUN binding request
//! naming one of our ufrags within [`FIRST_FRAME_TIMEOUT`] and pass the peer connection's ICE
//! check, or it is closed; frames longer than [`MAX_FRAME`] close it; a connection silent for
//! [`IDLE_TIMEOUT`] (ICE consent checks come every few seconds) is closed; the server holds at
//! most [`MAX_CONNECTIONS`]; a peer that does not read its frames loses them (a bounded write
//! queue, never waited for by the loop), and one that stalls a write for [`WRITE_STALL`] is
//! closed.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::Inbound;

/// The longest frame accepted: media packets fit a 1500-byte MTU; STUN and DTLS records
/// too. RFC 4571 allows 65535, which no WebRTC peer sends.
pub const MAX_FRAME: usize = 2048;
/// A connection must send its first frame (a STUN binding request) within this.
pub const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection silent this long is closed (ICE consent freshness sends a request every
/// 5 s or less: RFC 7675).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// A write that cannot complete this long closes the connection.
pub const WRITE_STALL: Duration = Duration::from_secs(5);
/// The most ICE-TCP connections held at once; more are closed as they are accepted.
pub const MAX_CONNECTIONS: usize = 4096;
/// Frames queued for one connection's writer; more are dropped (like a full UDP socket).
const WRITE_QUEUE: usize = 512;

/// ICE-TCP counters (relaxed atomics, read by `/metrics`).
#[derive(Debug, Default)]
pub struct TcpStats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections open now (gauge).
    pub open: AtomicUsize,
    /// Connections refused at once: [`MAX_CONNECTIONS`] reached.
    pub refused_full: AtomicU64,
    /// Connections closed for breaking the rules: no STUN first, a frame over
    /// [`MAX_FRAME`], or not accepted by any peer connection.
    pub closed_bad: AtomicU64,
    /// Connections closed for silence (no first frame in time, or idle too long) or for not
    /// reading what was sent to them: a client that went away or chose another path.
    pub closed_idle: AtomicU64,
}

/// Why the server ended a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// The other end broke the rules.
    Bad(&'static str),
    /// It was silent too long, or stopped reading.
    Idle(&'static str),
}

/// The loop owning a connection, from the ufrag of its first STUN request (see the UDP
/// receiver's routing): loop 0 when there is one loop; `None` when the prefix names none.
fn owner_of(frame: &[u8], loops: usize) -> Option<usize> {
    if loops == 1 {
        return Some(0);
    }
    crate::sfu::stun::local_ufrag(frame)
        .and_then(|u| u.get(..2))
        .and_then(|p| usize::from_str_radix(p, 16).ok())
        .filter(|i| *i < loops)
}

/// Accepts ICE-TCP connections on `listeners` until the runtime ends; each is served on its
/// own task and handed to the loop that owns its peer connection through `loops`.
pub(super) async fn serve(
    listeners: Vec<TcpListener>,
    loops: Vec<mpsc::Sender<Inbound>>,
    stats: Arc<TcpStats>,
) {
    let loops: Arc<[mpsc::Sender<Inbound>]> = loops.into();
    let mut tasks = Vec::new();
    for listener in listeners {
        let (loops, stats) = (loops.clone(), stats.clone());
        tasks.push(tokio::spawn(async move {
            let local = match listener.local_addr() {
                Ok(a) => a,
                Err(e) => {
                    tracing::error!(error = %e, "ICE-TCP listener has no address");
                    return;
                }
            };
            loop {
                let (stream, remote) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: back off, do not spin.
                        tracing::warn!(%local, error = %e, "ICE-TCP accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                stats.accepted.fetch_add(1, Ordering::Relaxed);
                if stats.open.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
                    stats.refused_full.fetch_add(1, Ordering::Relaxed);
                    drop(stream);
                    continue;
                }
                stats.open.fetch_add(1, Ordering::Relaxed);
                let (loops, stats) = (loops.clone(), stats.clone());
                tokio::spawn(async move {
                    match connection(stream, local, remote, &loops).await {
                        Ok(()) => {}
                        Err(Ended::Bad(why)) => {
                            tracing::debug!(%remote, why, "ICE-TCP connection closed");
                            stats.closed_bad.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(Ended::Idle(why)) => {
                            tracing::debug!(%remote, why, "ICE-TCP connection closed");
                            stats.closed_idle.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    stats.open.fetch_sub(1, Ordering::Relaxed);
                });
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// Reads one RFC 4571 frame into `buf` (resized to it) within `timeout`; `Ok(false)` at a
/// clean end of stream.
async fn read_frame(
    stream: &mut tokio::net::tcp::OwnedReadHalf,
    buf: &mut Vec<u8>,
    timeout: Duration,
) -> Result<bool, Ended> {
    let read = async {
        let mut len = [0u8; 2];
        match stream.read_exact(&mut len).await {
            Ok(_) => {}
            // A clean end, or a reset: the peer is gone either way.
            Err(_) => return Ok(false),
        }
        let len = usize::from(u16::from_be_bytes(len));
        if len == 0 || len > MAX_FRAME {
            return Err(Ended::Bad("frame length out of bounds"));
        }
        buf.resize(len, 0);
        stream
            .read_exact(buf)
            .await
            .map(|_| true)
            .map_err(|_| Ended::Bad("connection ended inside a frame"))
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| Ended::Idle("silent too long"))?
}

/// Serves one connection until either side ends it. `Err` says why the server closed it
/// (counted); `Ok` for an end the peer or its loop chose.
async fn connection(
    stream: TcpStream,
    local: SocketAddr,
    remote: SocketAddr,
    loops: &[mpsc::Sender<Inbound>],
) -> Result<(), Ended> {
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let mut buf = Vec::with_capacity(MAX_FRAME);
    if !read_frame(&mut rd, &mut buf, FIRST_FRAME_TIMEOUT).await? {
        return Ok(());
    }
    // STUN first (the loop checks that it passes ICE).
    if !crate::sfu::stun::is_stun(&buf) {
        return Err(Ended::Bad("first frame is not STUN"));
    }
    let Some(tx) = owner_of(&buf, loops.len()).and_then(|i| loops.get(i)) else {
        return Err(Ended::Bad("first STUN request names no media loop"));
    };
    let (writer, mut frames) = mpsc::channel::<Vec<u8>>(WRITE_QUEUE);
    // The loop holds the only sender: when it lets go (the peer failed ICE, or left), the
    // writer below ends and so does the connection.
    let opened = Inbound::TcpOpen {
        local,
        remote,
        writer,
    };
    if tx.send(opened).await.is_err() {
        return Ok(()); // shutting down
    }
    let first = Inbound::Packet {
        proto: crate::sfu::IpProto::Tcp,
        source: remote,
        local,
        bytes: std::mem::take(&mut buf),
    };
    if tx.send(first).await.is_err() {
        return Ok(());
    }
    let write = async {
        let mut out = Vec::with_capacity(MAX_FRAME + 2);
        while let Some(frame) = frames.recv().await {
            let Ok(len) = u16::try_from(frame.len()) else {
                continue;
            };
            out.clear();
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&frame);
            match tokio::time::timeout(WRITE_STALL, wr.write_all(&out)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Ok(()),
                Err(_) => return Err(Ended::Idle("peer stopped reading")),
            }
        }
        Ok(())
    };
    let read = async {
        loop {
            if !read_frame(&mut rd, &mut buf, IDLE_TIMEOUT).await? {
                return Ok(());
            }
            let packet = Inbound::Packet {
                proto: crate::sfu::IpProto::Tcp,
                source: remote,
                local,
                bytes: std::mem::take(&mut buf),
            };
            // Like a UDP datagram: a loop that cannot take it now loses it.
            if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(packet) {
                return Ok(());
            }
            buf = Vec::with_capacity(MAX_FRAME);
        }
    };
    let result = tokio::select! {
        r = write => r,
        r = read => r,
    };
    let _ = tx.try_send(Inbound::TcpClosed { local, remote });
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::{start, SfuHandle};
    use crate::sfu::registry::RoomRegistry;
    use std::net::{IpAddr, Ipv4Addr};
    use tokio::net::TcpStream;

    /// A media loop on loopback with ICE-TCP on an ephemeral port, and that port.
    fn loop_with_tcp() -> (SfuHandle, SocketAddr) {
        let sfu = start(
            &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
            0,
            Some(0),
            1,
            crate::sfu::SfuConfig::default(),
            Arc::new(RoomRegistry::default()),
        )
        .expect("bind loopback ports");
        let addr = sfu.tcp_addresses[0];
        (sfu, addr)
    }

    /// Whether the server closes `stream` within `within` (reads EOF or a reset).
    async fn closed_by_server(stream: &mut TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(within, stream.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    /// Waits until `counter` reaches `want` (the connection tasks count after closing).
    async fn counted(counter: &AtomicU64, want: u64) -> u64 {
        for _ in 0..100 {
            if counter.load(Ordering::Relaxed) >= want {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        counter.load(Ordering::Relaxed)
    }

    /// Garbage, an oversized frame, a STUN request for no peer connection and a partial frame
    /// cut off: each connection is closed (the bad ones at once) and counted, and the loop
    /// goes on answering.
    #[tokio::test]
    async fn hostile_connections_are_closed_and_counted() {
        let (sfu, addr) = loop_with_tcp();
        let tcp = sfu.stats.tcp.clone();

        // Not STUN: a framed HTTP request line.
        let mut s = TcpStream::connect(addr).await.unwrap();
        let junk = b"GET / HTTP/1.1\r\n\r\n";
        s.write_all(&(junk.len() as u16).to_be_bytes())
            .await
            .unwrap();
        s.write_all(junk).await.unwrap();
        assert!(closed_by_server(&mut s, Duration::from_secs(5)).await);

        // A length over the bound (RFC 4571 allows 65535; no WebRTC peer sends it).
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&[0xff, 0xff, 1, 2, 3]).await.unwrap();
        assert!(closed_by_server(&mut s, Duration::from_secs(5)).await);

        // A zero-length frame.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&[0, 0]).await.unwrap();
        assert!(closed_by_server(&mut s, Duration::from_secs(5)).await);

        // STUN naming a ufrag no peer connection has: the loop refuses it and lets go.
        let mut s = TcpStream::connect(addr).await.unwrap();
        let req = crate::sfu::stun::tests_support::binding_request("nobody:peer");
        s.write_all(&(req.len() as u16).to_be_bytes())
            .await
            .unwrap();
        s.write_all(&req).await.unwrap();
        assert!(closed_by_server(&mut s, Duration::from_secs(5)).await);

        // Half a frame, then the client goes away: nothing is left behind.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&[0, 100, 1, 2, 3]).await.unwrap();
        drop(s);

        assert_eq!(counted(&tcp.closed_bad, 5).await, 5, "{tcp:?}");
        for _ in 0..100 {
            if tcp.open.load(Ordering::Relaxed) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(tcp.open.load(Ordering::Relaxed), 0, "{tcp:?}");
        assert!(sfu.participants(&"room".into()).await.is_empty());
    }

    /// 500 connections that never send a byte neither stop the listener (a bad one opened
    /// after them is still read and closed) nor the loop; they are all open until their first
    /// frame timeout.
    #[tokio::test]
    async fn five_hundred_idle_connections_leave_the_listener_serving() {
        // Both ends live in this process.
        crate::plumbing::raise_fd_limit();
        let (sfu, addr) = loop_with_tcp();
        let tcp = sfu.stats.tcp.clone();
        let mut idle = Vec::new();
        for _ in 0..500 {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&[0xff, 0xff]).await.unwrap();
        assert!(closed_by_server(&mut s, Duration::from_secs(5)).await);
        assert_eq!(counted(&tcp.closed_bad, 1).await, 1, "{tcp:?}");
        assert_eq!(tcp.accepted.load(Ordering::Relaxed), 501);
        assert_eq!(tcp.open.load(Ordering::Relaxed), 500, "{tcp:?}");
        assert!(sfu.participants(&"room".into()).await.is_empty());
        // An idle one is still open (not closed before its timeout).
        let mut buf = [0u8; 1];
        let early = tokio::time::timeout(Duration::from_millis(200), idle[0].read(&mut buf));
        assert!(
            early.await.is_err(),
            "an idle connection is kept until its timeout"
        );
    }

    #[test]
    fn the_owner_is_named_by_the_ufrag_prefix() {
        let mut req = crate::sfu::stun::tests_support::binding_request("01abcd:peer");
        assert_eq!(owner_of(&req, 1), Some(0));
        assert_eq!(owner_of(&req, 2), Some(1));
        assert_eq!(owner_of(&req, 1), Some(0));
        req = crate::sfu::stun::tests_support::binding_request("7fabcd:peer");
        assert_eq!(
            owner_of(&req, 4),
            None,
            "a prefix beyond the loops names none"
        );
        assert_eq!(owner_of(b"garbage", 2), None);
    }
}
