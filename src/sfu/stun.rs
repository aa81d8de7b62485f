//! Just enough STUN (RFC 8489) to demultiplex: the `USERNAME` attribute of a binding request,
//! whose first half is our ICE ufrag.

const HEADER_LEN: usize = 20;
const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];
const ATTR_USERNAME: u16 = 0x0006;

/// Whether `packet` looks like STUN (RFC 7983 first-byte rule plus the magic cookie).
pub fn is_stun(packet: &[u8]) -> bool {
    packet.len() >= HEADER_LEN && packet[0] < 2 && packet[4..8] == MAGIC_COOKIE
}

/// The local (our) ufrag from a STUN message's `USERNAME` (`local:remote`), if any.
pub fn local_ufrag(packet: &[u8]) -> Option<&str> {
    if !is_stun(packet) {
        return None;
    }
    let declared = u16::from_be_bytes([packet[2], packet[3]]) as usize;
    let end = (HEADER_LEN + declared).min(packet.len());
    let mut pos = HEADER_LEN;
    while pos + 4 <= end {
        let kind = u16::from_be_bytes([packet[pos], packet[pos + 1]]);
        let len = u16::from_be_bytes([packet[pos + 2], packet[pos + 3]]) as usize;
        let start = pos + 4;
        if start + len > end {
            return None;
        }
        if kind == ATTR_USERNAME {
            let value = std::str::from_utf8(&packet[start..start + len]).ok()?;
            return value.split(':').next();
        }
        pos = start + len.div_ceil(4) * 4;
    }
    None
}

/// STUN messages for other modules' tests.
#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;

    /// A binding request whose `USERNAME` is `username` (no integrity: for routing tests).
    pub(crate) fn binding_request(username: &str) -> Vec<u8> {
        let mut attrs = Vec::new();
        attrs.extend_from_slice(&ATTR_USERNAME.to_be_bytes());
        attrs.extend_from_slice(&(username.len() as u16).to_be_bytes());
        attrs.extend_from_slice(username.as_bytes());
        while attrs.len() % 4 != 0 {
            attrs.push(0);
        }
        // A second attribute after the padded username.
        attrs.extend_from_slice(&[0x80, 0x29, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]);
        let mut p = vec![0x00, 0x01];
        p.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
        p.extend_from_slice(&MAGIC_COOKIE);
        p.extend_from_slice(&[7; 12]);
        p.extend_from_slice(&attrs);
        p
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::binding_request;
    use super::*;

    #[test]
    fn finds_local_ufrag() {
        assert_eq!(
            local_ufrag(&binding_request("abcd1234:zz9")),
            Some("abcd1234")
        );
        assert_eq!(local_ufrag(&binding_request("x:y")), Some("x"));
    }

    #[test]
    fn garbage_is_not_stun() {
        assert_eq!(local_ufrag(b""), None);
        assert_eq!(local_ufrag(&[0u8; 19]), None);
        assert_eq!(local_ufrag(&[0x80; 100]), None);
        let mut truncated = binding_request("abcd:efgh");
        truncated.truncate(26);
        assert_eq!(local_ufrag(&truncated), None);
        let mut lying = binding_request("abcd:efgh");
        lying[3] = 0xff; // declared length beyond the packet: clamped, parsed, no panic
        assert_eq!(local_ufrag(&lying), Some("abcd"));
    }
}
