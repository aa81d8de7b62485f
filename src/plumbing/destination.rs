//! The one destination policy of outbound requests to servers named by others (federation): which
//! IP addresses may be connected to. Loopback, private (RFC 1918, shared CGNAT space),
//! link-local and unique-local addresses are refused unless the operator allows them;
//! unspecified, multicast, broadcast, documentation and other reserved addresses are always
//! refused.
//!
//! The check applies to the addresses actually connected to: [`GuardedResolver`] filters what
//! a name resolves to (so a DNS name pointing at 127.0.0.1 is refused too), and
//! [`DestinationPolicy::check_url`] covers IP-literal URLs, which reqwest connects to without
//! asking the resolver.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

/// The kind of network an IP address belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressClass {
    /// Globally routable.
    Public,
    /// `127.0.0.0/8`, `::1`.
    Loopback,
    /// RFC 1918 (`10/8`, `172.16/12`, `192.168/16`), shared address space (`100.64/10`),
    /// deprecated IPv6 site-local (`fec0::/10`), local-use NAT64 (`64:ff9b:1::/48`).
    Private,
    /// `169.254/16`, `fe80::/10`.
    LinkLocal,
    /// `fc00::/7`.
    UniqueLocal,
    /// `0.0.0.0/8`, `::` (connecting to these reaches the local host).
    Unspecified,
    /// `224/4`, `ff00::/8`.
    Multicast,
    /// Broadcast, documentation, benchmarking, IETF protocol assignments, `240/4`, the
    /// IPv4-compatible and discard IPv6 ranges.
    Reserved,
}

/// Classifies `ip`. IPv4 addresses embedded in IPv6 (mapped, NAT64 `64:ff9b::/96`, 6to4) are
/// classified as the IPv4 address they carry.
pub fn classify(ip: IpAddr) -> AddressClass {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> AddressClass {
    let [a, b, c, _] = ip.octets();
    match (a, b, c) {
        (0, _, _) => AddressClass::Unspecified,
        (127, _, _) => AddressClass::Loopback,
        (10, _, _) | (192, 168, _) => AddressClass::Private,
        (172, 16..=31, _) | (100, 64..=127, _) => AddressClass::Private,
        (169, 254, _) => AddressClass::LinkLocal,
        (224..=239, _, _) => AddressClass::Multicast,
        (240..=255, _, _) => AddressClass::Reserved,
        (192, 0, 0) | (192, 0, 2) | (198, 51, 100) | (203, 0, 113) | (198, 18..=19, _) => {
            AddressClass::Reserved
        }
        _ => AddressClass::Public,
    }
}

fn classify_v6(ip: Ipv6Addr) -> AddressClass {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return classify_v4(v4);
    }
    let s = ip.segments();
    let embedded = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    match s {
        [0, 0, 0, 0, 0, 0, 0, 0] => AddressClass::Unspecified,
        [0, 0, 0, 0, 0, 0, 0, 1] => AddressClass::Loopback,
        // IPv4-compatible (deprecated) and the rest of ::/96.
        [0, 0, 0, 0, 0, 0, _, _] => AddressClass::Reserved,
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => classify_v4(embedded(hi, lo)),
        [0x64, 0xff9b, 1, ..] => AddressClass::Private,
        [0x2002, hi, lo, ..] => classify_v4(embedded(hi, lo)),
        [0x100, 0, 0, 0, ..] | [0x2001, 0xdb8, ..] => AddressClass::Reserved,
        [x, ..] if x & 0xfe00 == 0xfc00 => AddressClass::UniqueLocal,
        [x, ..] if x & 0xffc0 == 0xfe80 => AddressClass::LinkLocal,
        [x, ..] if x & 0xffc0 == 0xfec0 => AddressClass::Private,
        [x, ..] if x & 0xff00 == 0xff00 => AddressClass::Multicast,
        _ => AddressClass::Public,
    }
}

/// Why a destination was refused. Carries the class only, never the address, so it can be
/// logged without telling what a name resolves to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("destination refused: {class:?} address")]
pub struct RefusedDestination {
    /// The kind of address refused.
    pub class: AddressClass,
}

/// Which addresses outbound requests may connect to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DestinationPolicy {
    allow_private: bool,
}

impl DestinationPolicy {
    /// Public addresses only (the default), or also loopback, private, link-local and
    /// unique-local ones when `allow_private` (homeservers federating on a private network,
    /// tests on loopback).
    pub fn new(allow_private: bool) -> Self {
        Self { allow_private }
    }

    /// Whether private destinations are allowed.
    pub fn allows_private(&self) -> bool {
        self.allow_private
    }

    /// `Ok` when `ip` may be connected to.
    pub fn check(&self, ip: IpAddr) -> Result<(), RefusedDestination> {
        match classify(ip) {
            AddressClass::Public => Ok(()),
            AddressClass::Loopback
            | AddressClass::Private
            | AddressClass::LinkLocal
            | AddressClass::UniqueLocal
                if self.allow_private =>
            {
                Ok(())
            }
            class => Err(RefusedDestination { class }),
        }
    }

    /// Checks a URL whose host is an IP literal (reqwest connects to those without resolving);
    /// a URL naming a host by DNS name passes here and is checked by [`GuardedResolver`].
    pub fn check_url(&self, url: &reqwest::Url) -> Result<(), RefusedDestination> {
        let host = url.host_str().unwrap_or_default();
        match host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            Ok(ip) => self.check(ip),
            Err(_) => Ok(()),
        }
    }
}

/// A reqwest resolver that resolves through `inner` and drops the addresses the policy
/// refuses; when nothing is left it fails with [`RefusedDestination`] (find it with
/// [`super::http_client::error_cause`]).
#[derive(Clone)]
pub struct GuardedResolver {
    inner: Arc<dyn reqwest::dns::Resolve>,
    policy: DestinationPolicy,
}

impl GuardedResolver {
    /// `inner` filtered by `policy`.
    pub fn new(inner: Arc<dyn reqwest::dns::Resolve>, policy: DestinationPolicy) -> Self {
        Self { inner, policy }
    }
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let resolving = self.inner.resolve(name);
        let policy = self.policy;
        Box::pin(async move {
            let mut refused = None;
            let allowed: Vec<SocketAddr> = resolving
                .await?
                .filter(|addr| match policy.check(addr.ip()) {
                    Ok(()) => true,
                    Err(e) => {
                        refused.get_or_insert(e);
                        false
                    }
                })
                .collect();
            if let (true, Some(e)) = (allowed.is_empty(), refused) {
                return Err(Box::new(e) as Box<dyn std::error::Error + Send + Sync>);
            }
            let addrs: reqwest::dns::Addrs = Box::new(allowed.into_iter());
            Ok(addrs)
        })
    }
}

/// The system resolver (`getaddrinfo` through tokio), for clients that need a
/// [`GuardedResolver`] but no resolver of their own.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl reqwest::dns::Resolve for SystemResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let addrs: reqwest::dns::Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(s: &str) -> AddressClass {
        classify(s.parse().unwrap())
    }

    #[test]
    fn addresses_are_classified() {
        use AddressClass::*;
        let table = [
            ("8.8.8.8", Public),
            ("1.1.1.1", Public),
            ("172.32.0.1", Public),
            ("100.128.0.1", Public),
            ("127.0.0.1", Loopback),
            ("127.9.8.7", Loopback),
            ("10.1.2.3", Private),
            ("172.16.0.1", Private),
            ("172.31.255.255", Private),
            ("192.168.1.1", Private),
            ("100.64.0.1", Private),
            ("169.254.169.254", LinkLocal),
            ("0.0.0.0", Unspecified),
            ("0.1.2.3", Unspecified),
            ("224.0.0.1", Multicast),
            ("255.255.255.255", Reserved),
            ("192.0.2.1", Reserved),
            ("198.18.0.1", Reserved),
            ("2001:4860:4860::8888", Public),
            ("::1", Loopback),
            ("::", Unspecified),
            ("::ffff:127.0.0.1", Loopback),
            ("::ffff:10.0.0.1", Private),
            ("::ffff:8.8.8.8", Public),
            ("::127.0.0.1", Reserved),
            ("64:ff9b::a00:1", Private),
            ("64:ff9b::808:808", Public),
            ("2002:7f00:1::1", Loopback),
            ("fc00::1", UniqueLocal),
            ("fd12:3456::1", UniqueLocal),
            ("fe80::1", LinkLocal),
            ("fec0::1", Private),
            ("ff02::1", Multicast),
            ("2001:db8::1", Reserved),
        ];
        for (ip, want) in table {
            assert_eq!(class(ip), want, "{ip}");
        }
    }

    #[test]
    fn the_switch_allows_private_ranges_but_never_unspecified_or_multicast() {
        let strict = DestinationPolicy::default();
        let open = DestinationPolicy::new(true);
        for ip in ["127.0.0.1", "10.0.0.1", "169.254.1.1", "fd00::1", "::1"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(strict.check(ip).is_err(), "{ip}");
            assert!(open.check(ip).is_ok(), "{ip}");
        }
        for ip in ["0.0.0.0", "::", "224.0.0.1", "255.255.255.255"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(open.check(ip).is_err(), "{ip}");
        }
        assert!(strict.check("93.184.216.34".parse().unwrap()).is_ok());
    }

    #[test]
    fn ip_literal_urls_are_checked_names_are_left_to_the_resolver() {
        let strict = DestinationPolicy::default();
        let url = |s: &str| reqwest::Url::parse(s).unwrap();
        assert!(strict.check_url(&url("https://127.0.0.1:8448/x")).is_err());
        assert!(strict.check_url(&url("https://[::1]:8448/x")).is_err());
        assert!(strict.check_url(&url("https://localhost:8448/x")).is_ok());
        assert!(strict.check_url(&url("https://8.8.8.8/x")).is_ok());
    }

    #[tokio::test]
    async fn the_resolver_drops_refused_addresses_and_fails_when_none_is_left() {
        use reqwest::dns::Resolve;
        use std::str::FromStr;
        let guarded = GuardedResolver::new(Arc::new(SystemResolver), DestinationPolicy::default());
        let name = reqwest::dns::Name::from_str("localhost").unwrap();
        let err = match guarded.resolve(name).await {
            Ok(_) => panic!("localhost resolved through the guard"),
            Err(e) => e,
        };
        assert!(err.downcast_ref::<RefusedDestination>().is_some(), "{err}");
        let open = GuardedResolver::new(Arc::new(SystemResolver), DestinationPolicy::new(true));
        let name = reqwest::dns::Name::from_str("localhost").unwrap();
        let addrs: Vec<SocketAddr> = match open.resolve(name).await {
            Ok(a) => a.collect(),
            Err(e) => panic!("{e}"),
        };
        assert!(addrs.iter().all(|a| a.ip().is_loopback()), "{addrs:?}");
    }
}
