//! The STUN message format (RFC 8489) as the TURN server needs it: parse a message into its
//! attributes without trusting a single length, check MESSAGE-INTEGRITY (HMAC-SHA1 over the
//! message up to the attribute, with the length field as if it ended there) and build
//! responses with MESSAGE-INTEGRITY and FINGERPRINT. Also ChannelData framing (RFC 8656
//! §12.4). Nothing here allocates more than the input's size.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use hmac::{Hmac, Mac};
use sha1::Sha1;

/// The fixed STUN header.
pub const HEADER_LEN: usize = 20;
/// The magic cookie (RFC 8489 §5).
pub const MAGIC_COOKIE: u32 = 0x2112_A442;

/// Binding (RFC 8489).
pub const BINDING: u16 = 0x001;
/// Allocate (RFC 8656 §7).
pub const ALLOCATE: u16 = 0x003;
/// Refresh (§8).
pub const REFRESH: u16 = 0x004;
/// Send (indication only, §11).
pub const SEND: u16 = 0x006;
/// Data (indication only).
pub const DATA: u16 = 0x007;
/// CreatePermission (§10).
pub const CREATE_PERMISSION: u16 = 0x008;
/// ChannelBind (§12).
pub const CHANNEL_BIND: u16 = 0x009;

/// The message classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// A request, answered by a success or error response.
    Request,
    /// An indication (no response).
    Indication,
    /// A success response.
    Success,
    /// An error response.
    Error,
}

impl Class {
    fn bits(self) -> u16 {
        match self {
            Class::Request => 0x000,
            Class::Indication => 0x010,
            Class::Success => 0x100,
            Class::Error => 0x110,
        }
    }
}

/// Attribute types.
pub mod attr {
    /// USERNAME.
    pub const USERNAME: u16 = 0x0006;
    /// MESSAGE-INTEGRITY (HMAC-SHA1).
    pub const MESSAGE_INTEGRITY: u16 = 0x0008;
    /// ERROR-CODE.
    pub const ERROR_CODE: u16 = 0x0009;
    /// UNKNOWN-ATTRIBUTES.
    pub const UNKNOWN_ATTRIBUTES: u16 = 0x000A;
    /// CHANNEL-NUMBER.
    pub const CHANNEL_NUMBER: u16 = 0x000C;
    /// LIFETIME (seconds).
    pub const LIFETIME: u16 = 0x000D;
    /// XOR-PEER-ADDRESS.
    pub const XOR_PEER_ADDRESS: u16 = 0x0012;
    /// DATA.
    pub const DATA: u16 = 0x0013;
    /// REALM.
    pub const REALM: u16 = 0x0014;
    /// NONCE.
    pub const NONCE: u16 = 0x0015;
    /// XOR-RELAYED-ADDRESS.
    pub const XOR_RELAYED_ADDRESS: u16 = 0x0016;
    /// REQUESTED-ADDRESS-FAMILY (RFC 8656).
    pub const REQUESTED_ADDRESS_FAMILY: u16 = 0x0017;
    /// EVEN-PORT.
    pub const EVEN_PORT: u16 = 0x0018;
    /// REQUESTED-TRANSPORT.
    pub const REQUESTED_TRANSPORT: u16 = 0x0019;
    /// DONT-FRAGMENT.
    pub const DONT_FRAGMENT: u16 = 0x001A;
    /// XOR-MAPPED-ADDRESS.
    pub const XOR_MAPPED_ADDRESS: u16 = 0x0020;
    /// RESERVATION-TOKEN.
    pub const RESERVATION_TOKEN: u16 = 0x0022;
    /// SOFTWARE.
    pub const SOFTWARE: u16 = 0x8022;
    /// FINGERPRINT.
    pub const FINGERPRINT: u16 = 0x8028;
}

/// Why bytes are not a STUN message we can read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// Shorter than the header, or the first two bits are not 00.
    #[error("not a STUN message")]
    NotStun,
    /// The magic cookie is wrong (an RFC 3489 client, or garbage).
    #[error("no STUN magic cookie")]
    NoCookie,
    /// The header's length disagrees with the bytes, or is not a multiple of 4.
    #[error("STUN length {declared} does not fit {actual} bytes")]
    Length {
        /// The header's length field.
        declared: usize,
        /// The bytes after the header.
        actual: usize,
    },
    /// An attribute runs past the end of the message.
    #[error("STUN attribute {0:#06x} runs past the message")]
    Attribute(u16),
}

/// A parsed STUN message: borrowed, attributes in order (up to MESSAGE-INTEGRITY's end for
/// the integrity check).
#[derive(Debug)]
pub struct Message<'a> {
    /// The method (`ALLOCATE`, …).
    pub method: u16,
    /// Request, indication, response.
    pub class: Class,
    /// The transaction ID.
    pub transaction: [u8; 12],
    /// (type, value, offset of the attribute's header in `raw`).
    attributes: Vec<(u16, &'a [u8], usize)>,
    raw: &'a [u8],
}

/// The most attributes read from one message (a request needs fewer than ten).
const MAX_ATTRIBUTES: usize = 32;

impl<'a> Message<'a> {
    /// Parses `bytes`, which must hold exactly one message.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, MessageError> {
        if bytes.len() < HEADER_LEN || bytes[0] & 0xC0 != 0 {
            return Err(MessageError::NotStun);
        }
        if u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) != MAGIC_COOKIE {
            return Err(MessageError::NoCookie);
        }
        let declared = u16::from_be_bytes([bytes[2], bytes[3]]) as usize;
        let actual = bytes.len() - HEADER_LEN;
        if declared != actual || declared % 4 != 0 {
            return Err(MessageError::Length { declared, actual });
        }
        let kind = u16::from_be_bytes([bytes[0], bytes[1]]);
        let class = match kind & 0x110 {
            0x000 => Class::Request,
            0x010 => Class::Indication,
            0x100 => Class::Success,
            _ => Class::Error,
        };
        let method = (kind & 0x000F) | ((kind & 0x00E0) >> 1) | ((kind & 0x3E00) >> 2);
        let mut transaction = [0u8; 12];
        transaction.copy_from_slice(&bytes[8..20]);
        let mut attributes = Vec::new();
        let mut pos = HEADER_LEN;
        while pos + 4 <= bytes.len() && attributes.len() < MAX_ATTRIBUTES {
            let t = u16::from_be_bytes([bytes[pos], bytes[pos + 1]]);
            let len = u16::from_be_bytes([bytes[pos + 2], bytes[pos + 3]]) as usize;
            let start = pos + 4;
            let Some(value) = bytes.get(start..start + len) else {
                return Err(MessageError::Attribute(t));
            };
            attributes.push((t, value, pos));
            pos = start + len.div_ceil(4) * 4;
        }
        Ok(Message {
            method,
            class,
            transaction,
            attributes,
            raw: bytes,
        })
    }

    /// The first attribute of type `t` before MESSAGE-INTEGRITY (attributes after it are
    /// ignored, RFC 8489 §14.5, except FINGERPRINT).
    pub fn get(&self, t: u16) -> Option<&'a [u8]> {
        for &(kind, value, _) in &self.attributes {
            if kind == t {
                return Some(value);
            }
            if kind == attr::MESSAGE_INTEGRITY {
                return None;
            }
        }
        None
    }

    /// An attribute as UTF-8 text.
    pub fn text(&self, t: u16) -> Option<&'a str> {
        self.get(t).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// A 32-bit attribute (LIFETIME).
    pub fn u32(&self, t: u16) -> Option<u32> {
        let v = self.get(t)?;
        Some(u32::from_be_bytes(v.get(..4)?.try_into().ok()?))
    }

    /// Every XOR-…-ADDRESS of type `t` (CreatePermission may carry several), decoded;
    /// `None` if one of them is malformed.
    pub fn xor_addresses(&self, t: u16) -> Option<Vec<SocketAddr>> {
        let mut out = Vec::new();
        for &(kind, value, _) in &self.attributes {
            if kind == attr::MESSAGE_INTEGRITY {
                break;
            }
            if kind == t {
                out.push(decode_xor_address(value, &self.transaction)?);
            }
        }
        Some(out)
    }

    /// Comprehension-required attributes (type < 0x8000) this server does not know: the
    /// request must then be refused with 420 (RFC 8489 §7.3.1).
    pub fn unknown_required(&self) -> Vec<u16> {
        const KNOWN: [u16; 16] = [
            attr::USERNAME,
            attr::MESSAGE_INTEGRITY,
            attr::ERROR_CODE,
            attr::UNKNOWN_ATTRIBUTES,
            attr::CHANNEL_NUMBER,
            attr::LIFETIME,
            attr::XOR_PEER_ADDRESS,
            attr::DATA,
            attr::REALM,
            attr::NONCE,
            attr::XOR_RELAYED_ADDRESS,
            attr::REQUESTED_ADDRESS_FAMILY,
            attr::EVEN_PORT,
            attr::REQUESTED_TRANSPORT,
            attr::DONT_FRAGMENT,
            attr::XOR_MAPPED_ADDRESS,
        ];
        self.attributes
            .iter()
            .map(|&(t, _, _)| t)
            .filter(|t| *t < 0x8000 && !KNOWN.contains(t) && *t != attr::RESERVATION_TOKEN)
            .collect()
    }

    /// Whether the message carries a MESSAGE-INTEGRITY that `key` (the long-term credential
    /// key, MD5(username:realm:password)) produced.
    pub fn integrity_ok(&self, key: &[u8]) -> bool {
        let Some(&(_, value, offset)) = self
            .attributes
            .iter()
            .find(|(t, _, _)| *t == attr::MESSAGE_INTEGRITY)
        else {
            return false;
        };
        if value.len() != 20 {
            return false;
        }
        // The length field as if MESSAGE-INTEGRITY were the last attribute.
        let length = (offset + 24 - HEADER_LEN) as u16;
        let mut mac = match Hmac::<Sha1>::new_from_slice(key) {
            Ok(mac) => mac,
            Err(_) => return false,
        };
        mac.update(&self.raw[0..2]);
        mac.update(&length.to_be_bytes());
        mac.update(&self.raw[4..offset]);
        mac.verify_slice(value).is_ok()
    }

    /// Whether MESSAGE-INTEGRITY is present at all.
    pub fn has_integrity(&self) -> bool {
        self.attributes
            .iter()
            .any(|(t, _, _)| *t == attr::MESSAGE_INTEGRITY)
    }
}

fn decode_xor_address(value: &[u8], transaction: &[u8; 12]) -> Option<SocketAddr> {
    if value.len() < 4 {
        return None;
    }
    let port = u16::from_be_bytes([value[2], value[3]]) ^ (MAGIC_COOKIE >> 16) as u16;
    let cookie = MAGIC_COOKIE.to_be_bytes();
    match (value[1], value.len()) {
        (0x01, 8) => {
            let mut ip = [0u8; 4];
            for i in 0..4 {
                ip[i] = value[4 + i] ^ cookie[i];
            }
            Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port))
        }
        (0x02, 20) => {
            let mut mask = [0u8; 16];
            mask[..4].copy_from_slice(&cookie);
            mask[4..].copy_from_slice(transaction);
            let mut ip = [0u8; 16];
            for i in 0..16 {
                ip[i] = value[4 + i] ^ mask[i];
            }
            Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port))
        }
        _ => None,
    }
}

fn encode_xor_address(addr: SocketAddr, transaction: &[u8; 12]) -> Vec<u8> {
    let port = addr.port() ^ (MAGIC_COOKIE >> 16) as u16;
    let cookie = MAGIC_COOKIE.to_be_bytes();
    let mut out = vec![0u8];
    match addr.ip() {
        IpAddr::V4(ip) => {
            out.push(0x01);
            out.extend_from_slice(&port.to_be_bytes());
            for (i, b) in ip.octets().iter().enumerate() {
                out.push(b ^ cookie[i]);
            }
        }
        IpAddr::V6(ip) => {
            out.push(0x02);
            out.extend_from_slice(&port.to_be_bytes());
            let mut mask = [0u8; 16];
            mask[..4].copy_from_slice(&cookie);
            mask[4..].copy_from_slice(transaction);
            for (i, b) in ip.octets().iter().enumerate() {
                out.push(b ^ mask[i]);
            }
        }
    }
    out
}

/// Builds one STUN message attribute by attribute.
#[derive(Debug)]
pub struct Builder {
    buf: Vec<u8>,
    transaction: [u8; 12],
}

impl Builder {
    /// A message of `method` and `class` with `transaction`.
    pub fn new(method: u16, class: Class, transaction: [u8; 12]) -> Self {
        let kind = (method & 0x000F) | ((method & 0x0070) << 1) | ((method & 0x0F80) << 2);
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&(kind | class.bits()).to_be_bytes());
        buf.extend_from_slice(&[0, 0]);
        buf.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        buf.extend_from_slice(&transaction);
        Builder { buf, transaction }
    }

    /// Appends an attribute (padded to 4 bytes).
    pub fn attr(mut self, t: u16, value: &[u8]) -> Self {
        self.push(t, value);
        self
    }

    fn push(&mut self, t: u16, value: &[u8]) {
        self.buf.extend_from_slice(&t.to_be_bytes());
        self.buf
            .extend_from_slice(&(value.len().min(u16::MAX as usize) as u16).to_be_bytes());
        self.buf.extend_from_slice(value);
        let pad = value.len().div_ceil(4) * 4 - value.len();
        self.buf.extend(std::iter::repeat_n(0, pad));
        self.set_length();
    }

    fn set_length(&mut self) {
        let len = (self.buf.len() - HEADER_LEN) as u16;
        self.buf[2..4].copy_from_slice(&len.to_be_bytes());
    }

    /// Appends an XOR-…-ADDRESS.
    pub fn xor_address(self, t: u16, addr: SocketAddr) -> Self {
        let value = encode_xor_address(addr, &self.transaction);
        self.attr(t, &value)
    }

    /// Appends a 32-bit value.
    pub fn u32(self, t: u16, v: u32) -> Self {
        self.attr(t, &v.to_be_bytes())
    }

    /// Appends ERROR-CODE with its reason phrase.
    pub fn error(self, code: u16, reason: &str) -> Self {
        let mut value = vec![0, 0, (code / 100) as u8, (code % 100) as u8];
        value.extend_from_slice(reason.as_bytes());
        self.attr(attr::ERROR_CODE, &value)
    }

    /// Appends MESSAGE-INTEGRITY made with `key`.
    pub fn integrity(mut self, key: &[u8]) -> Self {
        // The length must count MESSAGE-INTEGRITY itself before the HMAC is computed.
        let len = (self.buf.len() + 24 - HEADER_LEN) as u16;
        self.buf[2..4].copy_from_slice(&len.to_be_bytes());
        let digest = match Hmac::<Sha1>::new_from_slice(key) {
            Ok(mut mac) => {
                mac.update(&self.buf);
                mac.finalize().into_bytes().to_vec()
            }
            Err(_) => vec![0; 20],
        };
        self.push(attr::MESSAGE_INTEGRITY, &digest);
        self
    }

    /// Appends FINGERPRINT and returns the bytes.
    pub fn finish(mut self) -> Vec<u8> {
        let len = (self.buf.len() + 8 - HEADER_LEN) as u16;
        self.buf[2..4].copy_from_slice(&len.to_be_bytes());
        let crc = crc32fast::hash(&self.buf) ^ 0x5354_554E;
        self.push(attr::FINGERPRINT, &crc.to_be_bytes());
        self.buf
    }
}

/// The first channel number a client may bind (RFC 8656 §12).
pub const CHANNEL_MIN: u16 = 0x4000;
/// The last one.
pub const CHANNEL_MAX: u16 = 0x4FFF;

/// A ChannelData message: (channel, payload), when `bytes` is exactly one (over UDP the
/// padding may be absent or present).
pub fn parse_channel_data(bytes: &[u8]) -> Option<(u16, &[u8])> {
    if bytes.len() < 4 {
        return None;
    }
    let channel = u16::from_be_bytes([bytes[0], bytes[1]]);
    if !(CHANNEL_MIN..=CHANNEL_MAX).contains(&channel) {
        return None;
    }
    let len = u16::from_be_bytes([bytes[2], bytes[3]]) as usize;
    let data = bytes.get(4..4 + len)?;
    (bytes.len() <= 4 + len.div_ceil(4) * 4).then_some((channel, data))
}

/// Frames `data` as ChannelData on `channel`, padded to 4 bytes when `pad` (stream
/// transports must pad; RFC 8656 §12.5).
pub fn channel_data(channel: u16, data: &[u8], pad: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 8);
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&(data.len() as u16).to_be_bytes());
    out.extend_from_slice(data);
    if pad {
        out.extend(std::iter::repeat_n(
            0,
            data.len().div_ceil(4) * 4 - data.len(),
        ));
    }
    out
}

/// On a stream (TURN over TCP or TLS), how long the message starting `head` (at least 4
/// bytes) is in total: STUN header + length, or ChannelData header + padded length; `None`
/// for bytes that start neither.
pub fn stream_frame_len(head: &[u8]) -> Option<usize> {
    let len = u16::from_be_bytes([*head.get(2)?, *head.get(3)?]) as usize;
    match head[0] >> 6 {
        0 => Some(HEADER_LEN + len),
        1 => {
            let channel = u16::from_be_bytes([head[0], head[1]]);
            (CHANNEL_MIN..=CHANNEL_MAX)
                .contains(&channel)
                .then_some(4 + len.div_ceil(4) * 4)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TX: [u8; 12] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];

    #[test]
    fn a_built_message_parses_back_with_its_attributes_and_integrity() {
        let peer: SocketAddr = "10.1.2.3:7882".parse().unwrap();
        let peer6: SocketAddr = "[2001:db8::7]:9".parse().unwrap();
        let bytes = Builder::new(CREATE_PERMISSION, Class::Request, TX)
            .attr(attr::USERNAME, b"123:abc")
            .xor_address(attr::XOR_PEER_ADDRESS, peer)
            .xor_address(attr::XOR_PEER_ADDRESS, peer6)
            .u32(attr::LIFETIME, 600)
            .integrity(b"key")
            .finish();
        let m = Message::parse(&bytes).unwrap();
        assert_eq!(m.method, CREATE_PERMISSION);
        assert_eq!(m.class, Class::Request);
        assert_eq!(m.transaction, TX);
        assert_eq!(m.text(attr::USERNAME), Some("123:abc"));
        assert_eq!(m.u32(attr::LIFETIME), Some(600));
        assert_eq!(
            m.xor_addresses(attr::XOR_PEER_ADDRESS),
            Some(vec![peer, peer6])
        );
        assert!(m.integrity_ok(b"key"));
        assert!(!m.integrity_ok(b"other key"));
        assert!(m.unknown_required().is_empty());
        // The FINGERPRINT is the CRC-32 of what precedes it, XOR 0x5354554e.
        let n = bytes.len();
        let crc = u32::from_be_bytes(bytes[n - 4..].try_into().unwrap());
        assert_eq!(crc, crc32fast::hash(&bytes[..n - 8]) ^ 0x5354_554E);
    }

    #[test]
    fn methods_and_classes_survive_the_bit_interleaving() {
        for method in [
            BINDING,
            ALLOCATE,
            REFRESH,
            SEND,
            DATA,
            CREATE_PERMISSION,
            CHANNEL_BIND,
        ] {
            for class in [
                Class::Request,
                Class::Indication,
                Class::Success,
                Class::Error,
            ] {
                let bytes = Builder::new(method, class, TX).finish();
                let m = Message::parse(&bytes).unwrap();
                assert_eq!((m.method, m.class), (method, class));
            }
        }
        // An Allocate success response is 0x0103 on the wire (RFC 8656 §17).
        let bytes = Builder::new(ALLOCATE, Class::Success, TX).finish();
        assert_eq!(&bytes[..2], &[0x01, 0x03]);
    }

    #[test]
    fn a_tampered_message_fails_its_integrity_check() {
        let mut bytes = Builder::new(ALLOCATE, Class::Request, TX)
            .attr(attr::USERNAME, b"123:abc")
            .u32(attr::REQUESTED_TRANSPORT, 17 << 24)
            .integrity(b"key")
            .finish();
        bytes[26] ^= 1;
        assert!(!Message::parse(&bytes).unwrap().integrity_ok(b"key"));
    }

    #[test]
    fn malformed_bytes_are_errors_not_panics() {
        assert_eq!(Message::parse(&[]).unwrap_err(), MessageError::NotStun);
        assert_eq!(
            Message::parse(&[0xFF; 40]).unwrap_err(),
            MessageError::NotStun
        );
        let mut bytes = Builder::new(BINDING, Class::Request, TX)
            .attr(attr::USERNAME, b"abcd")
            .finish();
        bytes[4] = 0;
        assert_eq!(Message::parse(&bytes).unwrap_err(), MessageError::NoCookie);
        let good = Builder::new(BINDING, Class::Request, TX)
            .attr(attr::USERNAME, b"abcd")
            .finish();
        // Declared length disagreeing with the bytes.
        assert!(matches!(
            Message::parse(&good[..good.len() - 4]),
            Err(MessageError::Length { .. })
        ));
        // An attribute claiming more than there is.
        let mut long = good.clone();
        long[22] = 0x7F;
        assert_eq!(
            Message::parse(&long).unwrap_err(),
            MessageError::Attribute(attr::USERNAME)
        );
        // Every truncation and single-byte corruption of a valid message parses or errs.
        for cut in 0..good.len() {
            let _ = Message::parse(&good[..cut]);
        }
        for i in 0..good.len() {
            let mut b = good.clone();
            b[i] ^= 0xA5;
            if let Ok(m) = Message::parse(&b) {
                let _ = m.xor_addresses(attr::XOR_PEER_ADDRESS);
                let _ = m.integrity_ok(b"k");
            }
        }
    }

    #[test]
    fn channel_data_frames_and_parses_with_and_without_padding() {
        let framed = channel_data(0x4001, b"hello", true);
        assert_eq!(framed.len(), 12);
        assert_eq!(stream_frame_len(&framed), Some(12));
        assert_eq!(parse_channel_data(&framed), Some((0x4001, &b"hello"[..])));
        let bare = channel_data(0x4001, b"hello", false);
        assert_eq!(parse_channel_data(&bare), Some((0x4001, &b"hello"[..])));
        // Channels outside 0x4000..=0x4FFF are not ChannelData.
        assert_eq!(parse_channel_data(&channel_data(0x5000, b"x", true)), None);
        assert_eq!(stream_frame_len(&[0x80, 0, 0, 4]), None);
        // Shorter than it says.
        assert_eq!(parse_channel_data(&[0x40, 0, 0, 9, 1]), None);
    }
}
