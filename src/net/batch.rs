//! Batched UDP sends: everything one engine drain produced for a socket goes out in as few
//! `sendmmsg(2)` calls as possible (Linux), never waiting: what the kernel does not take at once
//! is dropped and counted, so a full socket never stalls the loop.

use std::net::SocketAddr;

/// Most datagrams per `sendmmsg` call.
const BATCH: usize = 64;

/// Sends `packets` (destination, bytes) on `fd` without blocking; returns how many were dropped.
#[cfg(target_os = "linux")]
pub fn send_batch(fd: std::os::fd::RawFd, packets: &[(SocketAddr, Vec<u8>)]) -> usize {
    let mut dropped = 0;
    for chunk in packets.chunks(BATCH) {
        let mut addrs: [libc::sockaddr_storage; BATCH] =
            // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
            unsafe { std::mem::zeroed() };
        let mut iovs: [libc::iovec; BATCH] = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; BATCH];
        // SAFETY: mmsghdr is plain old data; all-zero is a valid (empty) header.
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for (i, (dest, bytes)) in chunk.iter().enumerate() {
            let len = write_sockaddr(&mut addrs[i], dest);
            iovs[i] = libc::iovec {
                iov_base: bytes.as_ptr() as *mut libc::c_void,
                iov_len: bytes.len(),
            };
            msgs[i].msg_hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_storage).cast();
            msgs[i].msg_hdr.msg_namelen = len;
            msgs[i].msg_hdr.msg_iov = &mut iovs[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        let mut sent = 0usize;
        while sent < chunk.len() {
            // SAFETY: every header points at an address and one iovec that live on this stack
            // frame, and each iovec at a buffer borrowed from `packets` for the whole call; the
            // kernel only reads them. MSG_DONTWAIT keeps the call non-blocking.
            let n = unsafe {
                libc::sendmmsg(
                    fd,
                    msgs.as_mut_ptr().add(sent),
                    (chunk.len() - sent) as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            if n <= 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                // Full socket (EAGAIN) or a per-destination error (e.g. ECONNREFUSED from an
                // earlier ICMP): drop this datagram and go on with the rest.
                dropped += 1;
                sent += 1;
                continue;
            }
            sent += n as usize;
        }
    }
    dropped
}

#[cfg(target_os = "linux")]
fn write_sockaddr(storage: &mut libc::sockaddr_storage, addr: &SocketAddr) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe {
                std::ptr::write((storage as *mut libc::sockaddr_storage).cast(), sin);
            }
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe {
                std::ptr::write((storage as *mut libc::sockaddr_storage).cast(), sin6);
            }
            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn sends_every_datagram_in_order() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let dest = rx.local_addr().unwrap();
        let packets: Vec<(SocketAddr, Vec<u8>)> = (0..150u32)
            .map(|i| (dest, i.to_be_bytes().to_vec()))
            .collect();
        assert_eq!(send_batch(tx.as_raw_fd(), &packets), 0);
        let mut buf = [0u8; 16];
        for i in 0..150u32 {
            let (n, from) = rx.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], &i.to_be_bytes());
            assert_eq!(from, tx.local_addr().unwrap());
        }
    }

    #[test]
    fn ipv6_and_unreachable_destinations_do_not_stall() {
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        // An IPv6 destination on an IPv4 socket fails per datagram: counted, not fatal.
        let packets = vec![("[::1]:9".parse().unwrap(), vec![1u8; 10])];
        assert_eq!(send_batch(tx.as_raw_fd(), &packets), 1);
    }
}
