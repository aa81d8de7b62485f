//! The raw-limit probe: how many datagrams of the forwarded size one core can push to the same
//! number of loopback sockets with plain `sendto`, with `sendmmsg` (batches of
//! [`MMSG_BATCH`]) and with UDP GSO (`UDP_SEGMENT`, [`GSO_SEGMENTS`] datagrams to one
//! destination per call). An SFU does more than this per packet (decrypt, route, encrypt), so
//! these are ceilings, measured in the same run as the SFU.
//!
//! The sender is a thread pinned to the server's core; receivers are tokio tasks on the
//! client core reading like the synthetic clients do (so wake-ups cost the same). Rates are
//! per CPU-second of the sending thread (`CLOCK_THREAD_CPUTIME_ID`), which on loopback also
//! carries the kernel's delivery work.
//!
//! The only `unsafe` code of the benchmark is here: four libc calls (`sendmmsg`, `sendmsg`,
//! `clock_gettime`, `sched_setaffinity`) on buffers owned by the calling function.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::BenchError;

/// Messages per `sendmmsg` call.
pub const MMSG_BATCH: usize = 64;
/// Datagrams per GSO send (one destination).
pub const GSO_SEGMENTS: usize = 16;
/// Most receiving sockets the probe opens.
const MAX_SOCKETS: usize = 4096;

/// Results of the probe, in datagrams per CPU-second of the sending thread.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct LimitReport {
    /// Datagram size (UDP payload bytes).
    pub packet_bytes: usize,
    /// Receiving sockets.
    pub sockets: usize,
    /// Plain `sendto`.
    pub sendto_pps: f64,
    /// `sendmmsg`.
    pub sendmmsg_pps: f64,
    /// UDP GSO, `None` when the kernel refused `UDP_SEGMENT`.
    pub gso_pps: Option<f64>,
}

/// Which send path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    SendTo,
    SendMmsg,
    Gso,
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Pins the calling thread to `cpu` (best effort).
fn pin_thread(cpu: usize) {
    // SAFETY: `set` is a zeroed cpu_set_t owned by this frame; CPU_SET writes inside it and
    // sched_setaffinity(0, …) only reads it for the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let _ = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn sockaddr_of(addr: &SocketAddr) -> Option<libc::sockaddr_in> {
    let SocketAddr::V4(v4) = addr else {
        return None;
    };
    Some(libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(v4.ip().octets()),
        },
        sin_zero: [0; 8],
    })
}

/// Reusable `sendmmsg` buffers: [`MMSG_BATCH`] headers over one payload.
struct Mmsg {
    names: Vec<libc::sockaddr_in>,
    iov: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
}

impl Mmsg {
    fn new(payload: &[u8]) -> Self {
        let names = vec![
            libc::sockaddr_in {
                sin_family: 0,
                sin_port: 0,
                sin_addr: libc::in_addr { s_addr: 0 },
                sin_zero: [0; 8],
            };
            MMSG_BATCH
        ];
        let iov = (0..MMSG_BATCH)
            .map(|_| libc::iovec {
                iov_base: payload.as_ptr() as *mut libc::c_void,
                iov_len: payload.len(),
            })
            .collect();
        let msgs = (0..MMSG_BATCH)
            .map(|_| libc::mmsghdr {
                // SAFETY: an all-zero msghdr is a valid empty header; pointers are set per call.
                msg_hdr: unsafe { std::mem::zeroed() },
                msg_len: 0,
            })
            .collect();
        Self { names, iov, msgs }
    }

    /// One `sendmmsg` of [`MMSG_BATCH`] datagrams to `dests[first..]`, wrapping around.
    /// Returns datagrams sent.
    fn send(&mut self, sock: &UdpSocket, dests: &[libc::sockaddr_in], first: usize) -> usize {
        for i in 0..MMSG_BATCH {
            self.names[i] = dests[(first + i) % dests.len()];
            let h = &mut self.msgs[i].msg_hdr;
            h.msg_name = (&mut self.names[i]) as *mut libc::sockaddr_in as *mut libc::c_void;
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_iov = &mut self.iov[i];
            h.msg_iovlen = 1;
        }
        // SAFETY: every header points into `self.names` and `self.iov`, which live as long as
        // `self` and are not moved during the call; the payload behind `iov` outlives `self`
        // (owned by the caller) and is only read by the kernel.
        let rc = unsafe {
            libc::sendmmsg(
                sock.as_raw_fd(),
                self.msgs.as_mut_ptr(),
                MMSG_BATCH as u32,
                0,
            )
        };
        rc.max(0) as usize
    }
}

/// One GSO `sendmsg`: `segments` datagrams of `seg` bytes from `payload` to `dest`.
/// Returns datagrams sent, or `None` when the kernel refuses GSO.
fn send_gso(
    sock: &UdpSocket,
    payload: &[u8],
    seg: usize,
    dest: &mut libc::sockaddr_in,
) -> Option<usize> {
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: payload.len(),
    };
    // Control buffer for one cmsg carrying a u16, u64-aligned.
    let mut control = [0u64; 4];
    // SAFETY: all-zero msghdr is valid; every pointer set below refers to locals that outlive
    // the sendmsg call; CMSG_* only compute offsets inside `control`, which is large enough for
    // CMSG_SPACE(2) (checked by the assertion).
    unsafe {
        let space = libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) as usize;
        debug_assert!(space <= std::mem::size_of_val(&control));
        let mut h: libc::msghdr = std::mem::zeroed();
        h.msg_name = dest as *mut libc::sockaddr_in as *mut libc::c_void;
        h.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        h.msg_iov = &mut iov;
        h.msg_iovlen = 1;
        h.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        h.msg_controllen = space;
        let cmsg = libc::CMSG_FIRSTHDR(&h);
        (*cmsg).cmsg_level = libc::SOL_UDP;
        (*cmsg).cmsg_type = libc::UDP_SEGMENT;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut u16, seg as u16);
        let rc = libc::sendmsg(sock.as_raw_fd(), &h, 0);
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::ENOBUFS) => Some(0),
                _ => None,
            };
        }
        Some(rc as usize / seg.max(1))
    }
}

/// Sends for `duration` with `method`; returns datagrams per CPU-second of this thread.
fn run_method(
    method: Method,
    packet: usize,
    dests: &[SocketAddr],
    duration: Duration,
    cpu: Option<usize>,
) -> Result<Option<f64>, BenchError> {
    if let Some(c) = cpu {
        pin_thread(c);
    }
    let sock = UdpSocket::bind("127.0.0.1:0").map_err(|e| BenchError::io("probe socket", e))?;
    let mut raw: Vec<libc::sockaddr_in> = dests.iter().filter_map(sockaddr_of).collect();
    if raw.is_empty() {
        return Ok(None);
    }
    let payload = vec![0x80u8; packet * GSO_SEGMENTS];
    let one = &payload[..packet];
    let mut mmsg = Mmsg::new(one);
    let start = Instant::now();
    let cpu0 = thread_cpu();
    let mut sent: u64 = 0;
    let mut next = 0usize;
    while start.elapsed() < duration {
        for _ in 0..64 {
            match method {
                Method::SendTo => {
                    if sock.send_to(one, dests[next % dests.len()]).is_ok() {
                        sent += 1;
                    }
                    next += 1;
                }
                Method::SendMmsg => {
                    sent += mmsg.send(&sock, &raw, next) as u64;
                    next = (next + MMSG_BATCH) % raw.len();
                }
                Method::Gso => {
                    let i = next % raw.len();
                    match send_gso(&sock, &payload, packet, &mut raw[i]) {
                        Some(n) => sent += n as u64,
                        None => return Ok(None),
                    }
                    next += 1;
                }
            }
        }
    }
    let cpu = thread_cpu().saturating_sub(cpu0).as_secs_f64().max(1e-3);
    Ok(Some(sent as f64 / cpu))
}

/// Runs the three methods, `seconds` each, sending `packet`-byte datagrams round-robin to
/// `sockets` loopback sockets; the sender is pinned to `server_cpu`.
pub async fn probe(
    packet: usize,
    sockets: usize,
    seconds: f64,
    server_cpu: Option<usize>,
) -> Result<LimitReport, BenchError> {
    let packet = packet.clamp(16, 1472);
    let sockets = sockets.clamp(1, MAX_SOCKETS);
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let mut dests = Vec::with_capacity(sockets);
    let mut readers = Vec::with_capacity(sockets);
    for _ in 0..sockets {
        let s = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .map_err(|e| BenchError::io("probe receiver", e))?;
        dests.push(
            s.local_addr()
                .map_err(|e| BenchError::io("probe receiver", e))?,
        );
        let (stop, received) = (stop.clone(), received.clone());
        readers.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                if let Ok(Ok(_)) =
                    tokio::time::timeout(Duration::from_millis(200), s.recv(&mut buf)).await
                {
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let duration = Duration::from_secs_f64(seconds.max(0.1));
    let mut report = LimitReport {
        packet_bytes: packet,
        sockets,
        ..Default::default()
    };
    for method in [Method::SendTo, Method::SendMmsg, Method::Gso] {
        let d = dests.clone();
        // A thread of its own: pinning must not leak into tokio's blocking pool.
        let thread =
            std::thread::spawn(move || run_method(method, packet, &d, duration, server_cpu));
        let r = tokio::task::spawn_blocking(move || thread.join())
            .await
            .map_err(|e| BenchError::Options(format!("probe thread: {e}")))?
            .map_err(|_| BenchError::Options("probe thread panicked".into()))??;
        match method {
            Method::SendTo => report.sendto_pps = r.unwrap_or(0.0),
            Method::SendMmsg => report.sendmmsg_pps = r.unwrap_or(0.0),
            Method::Gso => report.gso_pps = r,
        }
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        let _ = r.await;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn probe_sends_with_every_method() {
        let r = probe(120, 4, 0.1, None).await.expect("probe");
        assert!(r.sendto_pps > 0.0, "{r:?}");
        assert!(r.sendmmsg_pps > 0.0, "{r:?}");
        if let Some(g) = r.gso_pps {
            assert!(g > 0.0, "{r:?}");
        }
    }
}
