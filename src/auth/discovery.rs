//! Matrix server discovery (spec: Server-Server API, "Resolving server names"): where to send a
//! federation request for a server name, and which TLS name its certificate must carry.
//!
//! Order: IP literal; explicit port; `/.well-known/matrix/server` (then the same steps for the
//! delegated name); SRV `_matrix-fed._tcp`; legacy SRV `_matrix._tcp`; port 8448.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ruma::ServerName;

use crate::plumbing::{read_capped, TtlCache};

/// Default federation port.
pub const DEFAULT_PORT: u16 = 8448;
/// Largest accepted `/.well-known/matrix/server` body (it holds one server name).
pub const MAX_WELL_KNOWN_BYTES: usize = 4 * 1024;
/// How long an SRV target is used for a host without being set again.
pub const OVERRIDE_TTL: Duration = Duration::from_secs(3600);
/// Most SRV targets remembered.
pub const OVERRIDE_CAPACITY: usize = 10_000;

/// Where to connect for a server name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// Host used in the URL, the `Host` header and as the TLS name.
    pub host: String,
    /// Port to connect to.
    pub port: u16,
    /// When SRV gave a target, the host whose addresses to connect to instead of `host`'s.
    pub connect_host: Option<String>,
}

impl Destination {
    /// `https://host:port` (IPv6 bracketed).
    pub fn base_url(&self) -> String {
        if self.host.contains(':') && !self.host.starts_with('[') {
            format!("https://[{}]:{}", self.host, self.port)
        } else {
            format!("https://{}:{}", self.host, self.port)
        }
    }
}

/// The lookups discovery needs, so the algorithm can be tested without DNS or HTTPS.
pub trait Lookup: Send + Sync {
    /// `GET https://<host>/.well-known/matrix/server` → `m.server`, if it answers.
    fn well_known(&self, host: &str) -> impl Future<Output = Option<String>> + Send;
    /// The first SRV record of `name` → (target, port), if any.
    fn srv(&self, name: &str) -> impl Future<Output = Option<(String, u16)>> + Send;
}

fn strip_brackets(host: &str) -> &str {
    host.trim_start_matches('[').trim_end_matches(']')
}

fn is_ip_literal(host: &str) -> bool {
    strip_brackets(host).parse::<IpAddr>().is_ok()
}

/// Splits `host[:port]` (IPv6 literals in brackets).
fn split_host_port(name: &str) -> Option<(String, Option<u16>)> {
    let parsed = ServerName::parse(name).ok()?;
    Some((strip_brackets(parsed.host()).to_owned(), parsed.port()))
}

/// Resolves `server_name` to a [`Destination`].
pub async fn resolve(lookup: &impl Lookup, server_name: &ServerName) -> Destination {
    let host = strip_brackets(server_name.host()).to_owned();
    if is_ip_literal(&host) || server_name.port().is_some() {
        return Destination {
            host,
            port: server_name.port().unwrap_or(DEFAULT_PORT),
            connect_host: None,
        };
    }
    if let Some(delegated) = lookup.well_known(&host).await {
        if let Some((dhost, dport)) = split_host_port(delegated.trim()) {
            if is_ip_literal(&dhost) || dport.is_some() {
                return Destination {
                    host: dhost,
                    port: dport.unwrap_or(DEFAULT_PORT),
                    connect_host: None,
                };
            }
            return resolve_srv(lookup, dhost).await;
        }
        tracing::warn!(%server_name, delegated, "ignoring invalid m.server in .well-known");
    }
    resolve_srv(lookup, host).await
}

async fn resolve_srv(lookup: &impl Lookup, host: String) -> Destination {
    for prefix in ["_matrix-fed._tcp", "_matrix._tcp"] {
        if let Some((target, port)) = lookup.srv(&format!("{prefix}.{host}")).await {
            let target = target.trim_end_matches('.').to_owned();
            return Destination {
                connect_host: (target != host).then_some(target),
                host,
                port,
            };
        }
    }
    Destination {
        host,
        port: DEFAULT_PORT,
        connect_host: None,
    }
}

/// Real lookups: HTTPS for `.well-known` (through the federation client, so its redirect and
/// destination policies apply; the body is capped at [`MAX_WELL_KNOWN_BYTES`]), hickory for
/// SRV.
pub struct NetLookup {
    http: reqwest::Client,
    dns: Option<hickory_resolver::TokioResolver>,
}

impl NetLookup {
    /// Lookups over `http` (which trusts the configured CAs) and the system DNS configuration.
    pub fn new(http: reqwest::Client) -> Self {
        let dns = hickory_resolver::TokioResolver::builder_tokio()
            .map(|b| b.build())
            .map_err(|e| tracing::warn!(error = %e, "no DNS configuration; SRV lookups disabled"))
            .ok();
        Self { http, dns }
    }

    /// Resolves a host name to addresses (used to connect to SRV targets).
    pub async fn addresses(&self, host: &str) -> Vec<IpAddr> {
        if let Ok(ip) = strip_brackets(host).parse::<IpAddr>() {
            return vec![ip];
        }
        match tokio::net::lookup_host((host, 0)).await {
            Ok(addrs) => addrs.map(|a: SocketAddr| a.ip()).collect(),
            Err(_) => Vec::new(),
        }
    }
}

impl Lookup for NetLookup {
    async fn well_known(&self, host: &str) -> Option<String> {
        #[derive(serde::Deserialize)]
        struct WellKnown {
            #[serde(rename = "m.server")]
            server: String,
        }
        let url = format!("https://{host}/.well-known/matrix/server");
        let resp = self
            .http
            .get(url)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?;
        if !resp.status().is_success() {
            return None;
        }
        let bytes = read_capped(resp, MAX_WELL_KNOWN_BYTES).await.ok()?;
        serde_json::from_slice::<WellKnown>(&bytes)
            .ok()
            .map(|w| w.server)
    }

    async fn srv(&self, name: &str) -> Option<(String, u16)> {
        let dns = self.dns.as_ref()?;
        let lookup = dns.srv_lookup(name).await.ok()?;
        let mut records: Vec<_> = lookup.iter().collect();
        records.sort_by_key(|r| (r.priority(), std::cmp::Reverse(r.weight())));
        records.first().map(|r| (r.target().to_utf8(), r.port()))
    }
}

/// reqwest DNS resolver that sends connections for SRV-resolved hosts to their targets, so the
/// URL (and therefore SNI, certificate check and `Host`) keeps the server's own name.
///
/// The host → target table is bounded ([`OVERRIDE_CAPACITY`]) and each entry expires
/// ([`OVERRIDE_TTL`]) unless set again.
#[derive(Clone)]
pub struct SrvAwareResolver {
    overrides: Arc<Mutex<TtlCache<String, String>>>,
}

impl Default for SrvAwareResolver {
    fn default() -> Self {
        Self {
            overrides: Arc::new(Mutex::new(TtlCache::new(OVERRIDE_CAPACITY))),
        }
    }
}

impl SrvAwareResolver {
    /// Connect to `target`'s addresses whenever `host` is requested, for [`OVERRIDE_TTL`] from
    /// `now`.
    pub fn set_override(&self, host: &str, target: &str, now: Instant) {
        if let Ok(mut m) = self.overrides.lock() {
            m.insert(host.to_owned(), target.to_owned(), OVERRIDE_TTL, now);
        }
    }

    /// Entries held (for tests and bounds checks).
    pub fn len(&self) -> usize {
        self.overrides.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Whether no override is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl reqwest::dns::Resolve for SrvAwareResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let target = self
            .overrides
            .lock()
            .ok()
            .and_then(|m| m.get(name.as_str(), Instant::now()))
            .unwrap_or_else(|| name.as_str().to_owned());
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((target.as_str(), 0))
                .await?
                .collect();
            let iter: reqwest::dns::Addrs = Box::new(addrs.into_iter());
            Ok(iter)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// Unit-test lookups: fixed answers.
    #[derive(Default)]
    struct Fake {
        well_known: HashMap<String, String>,
        srv: HashMap<String, (String, u16)>,
    }

    impl Lookup for Fake {
        async fn well_known(&self, host: &str) -> Option<String> {
            self.well_known.get(host).cloned()
        }
        async fn srv(&self, name: &str) -> Option<(String, u16)> {
            self.srv.get(name).cloned()
        }
    }

    fn name(s: &str) -> ruma::OwnedServerName {
        ServerName::parse(s).unwrap()
    }

    fn dest(host: &str, port: u16, connect: Option<&str>) -> Destination {
        Destination {
            host: host.into(),
            port,
            connect_host: connect.map(Into::into),
        }
    }

    #[tokio::test]
    async fn literals_and_explicit_ports_skip_lookups() {
        let mut f = Fake::default();
        f.well_known
            .insert("example.org".into(), "never.used".into());
        assert_eq!(
            resolve(&f, &name("1.2.3.4")).await,
            dest("1.2.3.4", 8448, None)
        );
        assert_eq!(resolve(&f, &name("[::1]:99")).await, dest("::1", 99, None));
        assert_eq!(
            resolve(&f, &name("[::1]:99")).await.base_url(),
            "https://[::1]:99"
        );
        assert_eq!(
            resolve(&f, &name("example.org:8000")).await,
            dest("example.org", 8000, None)
        );
    }

    #[tokio::test]
    async fn well_known_delegation_then_srv_of_delegated_name() {
        let mut f = Fake::default();
        f.well_known
            .insert("a.org".into(), "matrix.a.org:443".into());
        f.well_known.insert("b.org".into(), "fed.b.org".into());
        f.srv.insert(
            "_matrix-fed._tcp.fed.b.org".into(),
            ("box.b.org.".into(), 8449),
        );
        f.well_known.insert("c.org".into(), "10.0.0.1".into());
        assert_eq!(
            resolve(&f, &name("a.org")).await,
            dest("matrix.a.org", 443, None)
        );
        assert_eq!(
            resolve(&f, &name("b.org")).await,
            dest("fed.b.org", 8449, Some("box.b.org"))
        );
        assert_eq!(
            resolve(&f, &name("c.org")).await,
            dest("10.0.0.1", 8448, None)
        );
    }

    #[tokio::test]
    async fn srv_then_legacy_srv_then_default_port() {
        let mut f = Fake::default();
        f.srv
            .insert("_matrix-fed._tcp.a.org".into(), ("x.a.org".into(), 1111));
        f.srv
            .insert("_matrix._tcp.a.org".into(), ("y.a.org".into(), 2222));
        f.srv
            .insert("_matrix._tcp.b.org".into(), ("y.b.org".into(), 2222));
        assert_eq!(
            resolve(&f, &name("a.org")).await,
            dest("a.org", 1111, Some("x.a.org"))
        );
        assert_eq!(
            resolve(&f, &name("b.org")).await,
            dest("b.org", 2222, Some("y.b.org"))
        );
        assert_eq!(resolve(&f, &name("c.org")).await, dest("c.org", 8448, None));
    }

    #[tokio::test]
    async fn invalid_delegation_falls_back() {
        let mut f = Fake::default();
        f.well_known
            .insert("a.org".into(), "not a server name!".into());
        assert_eq!(resolve(&f, &name("a.org")).await, dest("a.org", 8448, None));
    }

    #[test]
    fn srv_overrides_are_bounded_and_expire() {
        let r = SrvAwareResolver::default();
        let t0 = Instant::now();
        for i in 0..(OVERRIDE_CAPACITY + 100) {
            r.set_override(&format!("h{i}.org"), "target.org", t0);
        }
        assert!(r.len() <= OVERRIDE_CAPACITY);
        let newest = format!("h{}.org", OVERRIDE_CAPACITY + 99);
        let later = t0 + OVERRIDE_TTL + Duration::from_secs(1);
        let cache = r.overrides.lock().unwrap();
        assert_eq!(
            cache.get(newest.as_str(), t0),
            Some("target.org".to_owned())
        );
        assert_eq!(cache.get(newest.as_str(), later), None);
    }
}
