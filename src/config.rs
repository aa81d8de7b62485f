//! Configuration: one [`Config`] struct, loaded in layers.
//!
//! Serde defaults first, then an optional TOML file, then `CONCLAVE_*` environment variables
//! (`CONCLAVE_SECTION__KEY`, `__` separates nesting levels; `CONCLAVE_DATA_DIR` sets the top-level
//! `data_dir`). Every error names the key, the bad value, where it came from and what was
//! expected; the binary exits with status 2 on any of them.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use ruma::OwnedServerName;
use serde::{Deserialize, Serialize};

/// The commented example configuration printed by `conclave generate-config`.
///
/// `conclave.example.toml` at the repository root is this text; a test keeps them equal and
/// checks that it parses to [`Config::default`].
pub const EXAMPLE_TOML: &str = include_str!("../conclave.example.toml");

/// Prefix of environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "CONCLAVE_";

/// A secret string: never printed by `Debug`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself; call only where it is sent or compared.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(REDACTED)")
    }
}

/// Conclave's whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the SQLite database and generated secrets live. Default `./conclave-data`.
    pub data_dir: PathBuf,
    /// The HTTP listener (appservice API, token endpoints, SFU WebSocket).
    pub http: HttpConfig,
    /// The homeserver Conclave serves.
    pub matrix: MatrixConfig,
    /// The application service registration.
    pub appservice: AppserviceConfig,
    /// LiveKit-compatible API key, secret and the URL handed to clients.
    pub livekit: LiveKitConfig,
    /// Token service policy.
    pub auth: AuthConfig,
    /// Media transport of the embedded SFU.
    pub rtc: RtcConfig,
    /// The embedded TURN server.
    pub turn: TurnConfig,
    /// MatrixRTC calls: enforcement and notices.
    pub calls: CallsConfig,
    /// The admin API.
    pub admin: AdminConfig,
    /// Webhooks (LiveKit-compatible event notifications).
    pub webhook: WebhookConfig,
    /// Media relays between the Conclaves of federating ministries (`docs/cascade.md`).
    pub cascade: CascadeConfig,
    /// Whether `matrix.homeserver_url` was set (file or environment) rather than defaulted.
    #[serde(skip)]
    pub homeserver_configured: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./conclave-data"),
            http: HttpConfig::default(),
            matrix: MatrixConfig::default(),
            appservice: AppserviceConfig::default(),
            livekit: LiveKitConfig::default(),
            auth: AuthConfig::default(),
            rtc: RtcConfig::default(),
            turn: TurnConfig::default(),
            calls: CallsConfig::default(),
            admin: AdminConfig::default(),
            webhook: WebhookConfig::default(),
            cascade: CascadeConfig::default(),
            homeserver_configured: false,
        }
    }
}

/// `[http]`: the one HTTP port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Listen address. Default `127.0.0.1:8080`.
    pub bind: SocketAddr,
    /// URL at which the homeserver reaches this service (used in the generated registration).
    /// Default: `http://` + `bind`.
    pub public_url: Option<String>,
    /// Largest accepted request body, in bytes (appservice transactions). Default 16 MiB.
    pub max_body_bytes: usize,
    /// A request head must be complete this many seconds after its first byte, or the
    /// connection is closed. Default 10.
    pub header_timeout_secs: u64,
    /// A connection with no request in flight is closed after this many seconds. Default 60.
    pub idle_timeout_secs: u64,
    /// A WebSocket upgrade (`/rtc`) must be handed over this many seconds after its request,
    /// or the connection is closed. Default 10.
    pub ws_handshake_timeout_secs: u64,
    /// A request must be answered this many seconds after its head was read: its body must
    /// have arrived and the handler answered (WebSocket sessions are not requests here; their
    /// upgrade has `ws_handshake_timeout_secs`). Default 60.
    pub request_timeout_secs: u64,
    /// Open connections (WebSockets included) served in full, from all sources together.
    /// Default 10000.
    pub max_connections: usize,
    /// Open connections served in full from one source address (IPv6: one `/64`). Behind a
    /// reverse proxy every client shares the proxy's address: raise it to `max_connections`.
    /// Default 1000.
    pub max_connections_per_ip: usize,
    /// Connections accepted beyond the two caps above, each serving one request and only
    /// `/healthz` and the appservice API (503 otherwise), so health checks and the homeserver
    /// get through a flood. Loopback and private sources may use all of them, others half.
    /// Default 32.
    pub reserved_connections: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            public_url: None,
            max_body_bytes: 16 * 1024 * 1024,
            header_timeout_secs: 10,
            idle_timeout_secs: 60,
            ws_handshake_timeout_secs: 10,
            request_timeout_secs: 60,
            max_connections: 10_000,
            max_connections_per_ip: 1000,
            reserved_connections: 32,
        }
    }
}

/// `[matrix]`: the homeserver this Conclave belongs to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MatrixConfig {
    /// Client-server API base URL of the homeserver. Default `http://127.0.0.1:8008`.
    pub homeserver_url: String,
    /// The homeserver's server name (the part after `:` in user IDs). Default `localhost`.
    pub server_name: OwnedServerName,
    /// Extra CA certificate (PEM) trusted for federation and homeserver TLS, besides the system
    /// roots. Default: none.
    pub extra_ca_file: Option<PathBuf>,
}

impl Default for MatrixConfig {
    fn default() -> Self {
        Self {
            homeserver_url: "http://127.0.0.1:8008".to_owned(),
            server_name: default_server_name(),
            extra_ca_file: None,
        }
    }
}

fn default_server_name() -> OwnedServerName {
    OwnedServerName::try_from("localhost").unwrap_or_else(|_| unreachable!("valid literal"))
}

/// `[appservice]`: the registration Synapse loads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AppserviceConfig {
    /// Registration id, used in the ping URL. Default `conclave`.
    pub id: String,
    /// Localpart of the bot user. Default `conclave`.
    pub sender_localpart: String,
    /// Localpart prefix of the exclusive user namespace. Default `_conclave_`.
    pub user_prefix: String,
    /// Token Conclave uses towards the homeserver. Default: generated and persisted.
    pub as_token: Option<Secret>,
    /// Token the homeserver uses towards Conclave. Default: generated and persisted.
    pub hs_token: Option<Secret>,
    /// Ping the homeserver on start (proves the link, flushes queued transactions). Default true.
    pub ping_on_start: bool,
}

impl Default for AppserviceConfig {
    fn default() -> Self {
        Self {
            id: "conclave".to_owned(),
            sender_localpart: "conclave".to_owned(),
            user_prefix: "_conclave_".to_owned(),
            as_token: None,
            hs_token: None,
            ping_on_start: true,
        }
    }
}

/// `[livekit]`: the LiveKit-compatible credentials and public URL.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LiveKitConfig {
    /// API key (JWT `iss`). Default: generated and persisted.
    pub key: Option<String>,
    /// API secret (HS256 key). Default: generated and persisted.
    pub secret: Option<Secret>,
    /// SFU WebSocket URL returned to clients. Default: `ws://` + `http.bind`.
    pub public_url: Option<String>,
}

/// `[auth]`: who gets SFU tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Only users joined to the Matrix room get a token. Default true.
    pub require_membership: bool,
    /// Homeservers whose users may create SFU rooms; `["*"]` = everyone.
    /// Default: empty, meaning only `matrix.server_name`.
    pub full_access_homeservers: Vec<String>,
    /// Lifetime of issued tokens, in seconds. Default 3600.
    pub token_lifetime_secs: u64,
    /// Whether users of other homeservers may publish. Default true.
    pub remote_can_publish: bool,
    /// Whether users of other homeservers may subscribe. Default true.
    pub remote_can_subscribe: bool,
    /// Timeout of one federation request (OpenID userinfo), in milliseconds. Default 5000.
    pub federation_timeout_ms: u64,
    /// Let federation requests (OpenID userinfo, `/.well-known/matrix/server`) go to loopback,
    /// private (RFC 1918, `100.64/10`), link-local and unique-local (`fc00::/7`) addresses.
    /// Default false: a token request naming a homeserver that resolves only to such addresses
    /// is refused (403) without sending anything. Turn on when homeservers federate on a
    /// private network (and in tests on loopback).
    pub allow_private_federation: bool,
    /// How long a token request for a room Conclave follows may wait for evidence that the
    /// user is joined, in milliseconds. A user of another server who joined the room before
    /// this server did becomes known here only through an event of theirs (typically their
    /// call membership), which can arrive over federation a moment after their client asks
    /// for a token; so can the join of a user invited (or gone) before. Bans are refused at
    /// once. Default 3000; 0 refuses at once.
    pub membership_wait_ms: u64,
    /// Token requests (`/sfu/get`, `/get_token`, `/delegate_delayed_leave`) naming one
    /// homeserver (`openid_token.matrix_server_name`) allowed per second on average, counted
    /// before the OpenID lookup on that server, so no caller can flood a homeserver (or this
    /// one) with lookups. Over it: 429 `M_LIMIT_EXCEEDED` with `Retry-After`. Default 50; 0
    /// turns the limit off.
    pub homeserver_rate_per_sec: u32,
    /// Requests naming one homeserver allowed at once, above the average rate. Default 200.
    pub homeserver_burst: u32,
    /// Token requests of one user (after the OpenID check) allowed per second on average.
    /// Default 2; 0 turns the limit off.
    pub user_rate_per_sec: u32,
    /// Requests of one user allowed at once, above the average rate. Default 20.
    pub user_burst: u32,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            require_membership: true,
            full_access_homeservers: Vec::new(),
            token_lifetime_secs: 3600,
            remote_can_publish: true,
            remote_can_subscribe: true,
            federation_timeout_ms: 5000,
            allow_private_federation: false,
            membership_wait_ms: 3000,
            homeserver_rate_per_sec: 50,
            homeserver_burst: 200,
            user_rate_per_sec: 2,
            user_burst: 20,
        }
    }
}

/// `[rtc]`: the media port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RtcConfig {
    /// UDP port for all media. Default 7882.
    pub udp_port: u16,
    /// TCP port for ICE over TCP (RFC 6544), for clients whose network drops UDP: announced
    /// as a passive candidate on every node IP, after the UDP ones (clients that can use UDP
    /// do). Default 7881 (LiveKit's); 0 turns ICE-TCP off.
    pub tcp_port: u16,
    /// How long a participant whose signalling connection was lost (a network change, a
    /// Wi-Fi drop) is kept for its client to resume it, in seconds: same SID, tracks and
    /// subscriptions, nobody sees it leave; ICE restarts on its peer connections (v0: the SFU
    /// offers the subscriber connection's restart). Default 30; 0 turns resume off (every
    /// client rejoins in full).
    pub resume_window_secs: u64,
    /// Estimate each subscriber's downlink (transport-wide congestion control) and fit its
    /// video into it: layers stepped down, video paused before audio suffers, sends paced
    /// (`docs/quality.md`). `false`: every subscriber gets the layers it asks for, unpaced,
    /// whatever its link (LiveKit's `rtc.congestion_control.enabled`); for links known to be
    /// ample, and for benchmarks whose synthetic clients report sampled feedback. Default
    /// true.
    pub congestion_control: bool,
    /// Clients ping over signalling this often, in seconds (told in the join response).
    /// Default 5, as LiveKit.
    pub ping_interval_secs: u32,
    /// A client that gets no pong for this long takes its connection for dead and resumes
    /// on a new one, in seconds. The sooner, the sooner a client whose network changed (a
    /// laptop leaving Wi-Fi for 4G) gets media again: its old connections die silently, and
    /// this is how the browser SDK notices. Default 15, as LiveKit; at most 300.
    pub ping_timeout_secs: u32,
    /// IPs announced as ICE host candidates. Default: empty, meaning loopback plus the
    /// addresses detected on this host.
    pub node_ips: Vec<IpAddr>,
    /// Create SFU rooms on first connect. Default: on when no homeserver is configured
    /// (`matrix.homeserver_url` unset: a standalone SFU), off when one is (rooms then come only
    /// from token requests of full-access users).
    pub auto_create: Option<bool>,
    /// A signalling client silent this long (no message, not even a ping) is disconnected, in
    /// seconds. Default 30 (twice the ping timeout clients are told).
    pub signal_timeout_secs: u64,
    /// Serve the LiveKit RoomService API (Twirp, `/twirp/livekit.RoomService/…`), authorised
    /// by LiveKit JWTs with server grants. Default true.
    pub twirp_enabled: bool,
    /// Serve LiveKit's single peer connection signalling (`/rtc/v1`, `/rtc/v1/validate`).
    /// Default true: v1 clients (livekit-client 2.21+, Element Call 0.26) join in one round
    /// trip and get one peer connection on which they always offer (`docs/design/rtc-v1.md`);
    /// v0 (`/rtc`, two peer connections) stays for the SDKs that use it. With false, both v1
    /// paths answer a plain 404, on which every LiveKit SDK falls back to v0.
    pub single_pc: bool,
    /// Media loop threads. Each owns whole rooms (a room never spans threads) with their peer
    /// connections; the media port stays one. Default 0: one per core. At most
    /// [`MAX_RTC_THREADS`].
    pub threads: usize,
}

/// The most media loop threads `rtc.threads` may ask for.
pub const MAX_RTC_THREADS: usize = 64;

impl RtcConfig {
    /// The number of media loop threads to run: `threads`, or one per core when it is 0.
    pub fn loop_threads(&self) -> usize {
        match self.threads {
            0 => std::thread::available_parallelism()
                .map_or(1, usize::from)
                .min(MAX_RTC_THREADS),
            n => n,
        }
    }
}

impl Default for RtcConfig {
    fn default() -> Self {
        Self {
            udp_port: 7882,
            tcp_port: 7881,
            resume_window_secs: 30,
            congestion_control: true,
            ping_interval_secs: 5,
            ping_timeout_secs: 15,
            node_ips: Vec::new(),
            auto_create: None,
            signal_timeout_secs: 30,
            twirp_enabled: true,
            single_pc: true,
            threads: 0,
        }
    }
}

/// `[turn]`: the embedded TURN server (RFC 8656), for clients whose network lets only TCP or
/// TLS to one port through. It relays only to Conclave's own media addresses; clients get
/// short-lived credentials (derived from the LiveKit secret) in their join response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TurnConfig {
    /// Run the TURN server and hand its URLs and credentials to participants. Default false.
    pub enabled: bool,
    /// TURN over UDP, on every node IP. Default 3478; 0 off.
    pub udp_port: u16,
    /// TURN over TCP, on every node IP. Default 3478; 0 off.
    pub tcp_port: u16,
    /// TURN over TLS (`turns:`), on every node IP, when `cert_file` and `key_file` are set.
    /// Default 5349; 443 gets through the strictest networks (needs CAP_NET_BIND_SERVICE, or
    /// a TCP load balancer passing TLS through). 0 off.
    pub tls_port: u16,
    /// PEM certificate chain for TURN over TLS, valid for `domain`.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// The host name clients reach TURN at (in the `turn:`/`turns:` URLs; the certificate's
    /// name). Default: the first node IP (enough for `turn:`; `turns:` needs a name the
    /// certificate is valid for).
    pub domain: Option<String>,
    /// How long a credential handed to a participant can open allocations, in seconds (an
    /// allocation it opened lives on with refreshes). Default 3600.
    pub credential_ttl_secs: u64,
    /// The most TURN allocations at once. Default 1000.
    pub max_allocations: usize,
}

impl Default for TurnConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            udp_port: 3478,
            tcp_port: 3478,
            tls_port: 5349,
            cert_file: None,
            key_file: None,
            domain: None,
            credential_ttl_secs: 3600,
            max_allocations: 1000,
        }
    }
}

impl TurnConfig {
    /// Whether TURN over TLS runs (enabled, a port, a certificate and a key).
    pub fn tls_enabled(&self) -> bool {
        self.enabled && self.tls_port != 0 && self.cert_file.is_some() && self.key_file.is_some()
    }
}

/// `[calls]`: calls follow Matrix.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallsConfig {
    /// Post an `m.notice` when a call starts and ends. Default true.
    pub notices: bool,
    /// Remove SFU participants (issued by the token service) that have no call membership
    /// after this many seconds. Default 30; 0 disables the check.
    pub grace_period_secs: u64,
    /// History older than this many days is deleted from the store, hourly: processed
    /// transaction ids, calls that ended and their members. Default 30; 0 keeps everything.
    pub history_days: u64,
}

impl Default for CallsConfig {
    fn default() -> Self {
        Self {
            notices: true,
            grace_period_secs: 30,
            history_days: 30,
        }
    }
}

/// `[admin]`: the operator API at `/_conclave/admin/v1/…`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Bearer token of the admin API; the API is off when unset.
    pub token: Option<Secret>,
}

/// `[webhook]`: LiveKit-compatible webhooks (`room_started`, `participant_joined`, …).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookConfig {
    /// URLs every event is POSTed to. Default: none (webhooks off). From the environment
    /// (`CONCLAVE_WEBHOOK__URLS`) a comma-separated list.
    pub urls: Vec<String>,
    /// API key the events are signed for (JWT `iss`); signed with `livekit.secret`.
    /// Default: `livekit.key`.
    pub api_key: Option<String>,
}

/// `[cascade]`: which other ministries' Conclaves may pull this Conclave's calls
/// (`docs/cascade.md`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CascadeConfig {
    /// The peers. Default: none (no room is ever relayed to another Conclave).
    pub peers: Vec<CascadePeer>,
    /// How long a mirror of a peer's call may stay without a local subscriber (and no token
    /// issued for it) before its relay ends, so the peer stops sending media nobody here
    /// receives. Default 30 s; at least 1.
    pub mirror_idle_secs: u64,
}

impl Default for CascadeConfig {
    fn default() -> Self {
        Self {
            peers: Vec::new(),
            mirror_idle_secs: 30,
        }
    }
}

impl CascadeConfig {
    /// The peer entry of `server`, if it is one.
    pub fn peer(&self, server: &ruma::ServerName) -> Option<&CascadePeer> {
        self.peers.iter().find(|p| p.server_name == server)
    }
}

/// One `[[cascade.peers]]` entry: another homeserver whose Conclave this one trusts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CascadePeer {
    /// The peer's homeserver (as in its users' IDs).
    pub server_name: OwnedServerName,
    /// The peer Conclave's appservice bot, the only user of that server whose OpenID token
    /// proves the peer. Default `@conclave:<server_name>` (Conclave's default
    /// `appservice.sender_localpart`).
    #[serde(default)]
    pub user_id: Option<ruma::OwnedUserId>,
    /// The peer Conclave's HTTP base URL (its `http.public_url`), where this Conclave asks it
    /// for mirrors and relays. Unset: the peer may pull calls from here, but its users are
    /// not sent to it (they connect here directly, as without a cascade).
    #[serde(default)]
    pub url: Option<String>,
}

impl CascadePeer {
    /// The peer Conclave's bot user (an error only for a server name no user ID can have,
    /// which [`Config::validate`] refuses).
    pub fn bot_user_id(&self) -> Result<ruma::OwnedUserId, ruma::IdParseError> {
        match &self.user_id {
            Some(u) => Ok(u.clone()),
            None => ruma::UserId::parse_with_server_name("conclave", &self.server_name),
        }
    }
}

/// A configuration problem. Every variant names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is not valid TOML.
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A key has a value of the wrong type or an unknown key was given.
    #[error("invalid config key `{key}` (from {origin}): value {value}: {message}")]
    Invalid {
        /// Dotted key path, e.g. `http.bind`.
        key: String,
        /// The offending value as given.
        value: String,
        /// Which layer the value came from.
        origin: String,
        /// What was expected.
        message: String,
    },
    /// Semantic checks failed; every problem is listed.
    #[error("invalid configuration:\n{}", .0.join("\n"))]
    Semantic(Vec<String>),
}

/// Where a loaded configuration came from, for messages and the banner.
#[derive(Debug, Clone, Default)]
pub struct LoadedFrom {
    /// The file, if any.
    pub file: Option<PathBuf>,
    /// Environment variables applied, by dotted key.
    pub env: BTreeMap<String, String>,
}

/// Loads the configuration from an optional TOML file and the given environment.
pub fn load(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(Config, LoadedFrom), ConfigError> {
    let mut merged = toml::Table::new();
    let mut from = LoadedFrom {
        file: file.map(Path::to_path_buf),
        env: BTreeMap::new(),
    };
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        merged = text
            .parse::<toml::Table>()
            .map_err(|e| ConfigError::Syntax {
                path: path.to_path_buf(),
                message: e.to_string().trim().to_owned(),
            })?;
    }
    let defaults = toml::Table::try_from(Config::default()).unwrap_or_default();
    for (var, raw) in env {
        let Some(rest) = var.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
        // Only variables whose first segment is a known top-level key are configuration;
        // other CONCLAVE_* variables (test tooling, scripts) are not ours to judge.
        if !Config::TOP_LEVEL_KEYS.contains(&path[0].as_str()) {
            continue;
        }
        let value = env_value(&defaults, &path, &raw);
        set_path(&mut merged, &path, value);
        from.env.insert(path.join("."), var);
    }
    let mut config = deserialize(merged.clone(), &merged, &from)?;
    config.homeserver_configured = get_path(&merged, &["matrix", "homeserver_url"]).is_some();
    config.validate()?;
    Ok((config, from))
}

fn deserialize(
    value: toml::Table,
    merged: &toml::Table,
    from: &LoadedFrom,
) -> Result<Config, ConfigError> {
    let de = toml::Value::Table(value);
    serde_path_to_error::deserialize::<_, Config>(de).map_err(|err| {
        let key = err.path().to_string();
        let segments: Vec<&str> = key.split('.').collect();
        let value = get_path(merged, &segments)
            .map(|v| v.to_string())
            .unwrap_or_else(|| "(unknown key)".to_owned());
        let origin = origin_of(from, &key);
        let inner = err.into_inner();
        let message = inner.message().trim().to_owned();
        ConfigError::Invalid {
            key,
            value,
            origin,
            message,
        }
    })
}

fn origin_of(from: &LoadedFrom, key: &str) -> String {
    if let Some(var) = from
        .env
        .iter()
        .find(|(k, _)| key == k.as_str() || key.starts_with(&format!("{k}.")))
        .map(|(_, v)| v)
    {
        return format!("environment variable {var}");
    }
    match &from.file {
        Some(p) => format!("config file {}", p.display()),
        None => "defaults".to_owned(),
    }
}

/// Types an environment value by the default's type at the same key, so `CONCLAVE_HTTP__BIND`
/// stays a string and `CONCLAVE_RTC__UDP_PORT` becomes an integer. Where the default is an
/// array, a value not starting with `[` is a comma-separated list of strings
/// (`CONCLAVE_WEBHOOK__URLS=http://a/hook,http://b/hook`).
fn env_value(defaults: &toml::Table, path: &[String], raw: &str) -> toml::Value {
    let segments: Vec<&str> = path.iter().map(String::as_str).collect();
    match get_path(defaults, &segments) {
        Some(toml::Value::String(_)) => toml::Value::String(raw.to_owned()),
        Some(toml::Value::Array(_)) if !raw.trim().starts_with('[') => toml::Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_owned()))
                .collect(),
        ),
        _ => {
            let trimmed = raw.trim();
            if let Ok(b) = trimmed.parse::<bool>() {
                return toml::Value::Boolean(b);
            }
            if let Ok(i) = trimmed.parse::<i64>() {
                return toml::Value::Integer(i);
            }
            if trimmed.starts_with('[') {
                if let Ok(t) = format!("v = {trimmed}").parse::<toml::Table>() {
                    if let Some(v) = t.get("v") {
                        return v.clone();
                    }
                }
            }
            toml::Value::String(raw.to_owned())
        }
    }
}

fn get_path<'a>(table: &'a toml::Table, path: &[&str]) -> Option<&'a toml::Value> {
    let (first, rest) = path.split_first()?;
    let v = table.get(*first)?;
    if rest.is_empty() {
        return Some(v);
    }
    match v {
        toml::Value::Table(t) => get_path(t, rest),
        _ => None,
    }
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    if rest.is_empty() {
        table.insert(first.clone(), value);
        return;
    }
    let entry = table
        .entry(first.clone())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if !entry.is_table() {
        *entry = toml::Value::Table(toml::Table::new());
    }
    if let toml::Value::Table(t) = entry {
        set_path(t, rest, value);
    }
}

impl Config {
    /// Top-level keys; `CONCLAVE_<KEY>…` variables starting with one of these are configuration.
    pub const TOP_LEVEL_KEYS: &'static [&'static str] = &[
        "data_dir",
        "http",
        "matrix",
        "appservice",
        "livekit",
        "auth",
        "rtc",
        "turn",
        "calls",
        "admin",
        "webhook",
        "cascade",
    ];

    /// Checks what types alone cannot; reports every problem at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if self.rtc.threads > MAX_RTC_THREADS {
            problems.push(format!(
                "rtc.threads = {} is more than {MAX_RTC_THREADS}; use 0 for one per core",
                self.rtc.threads
            ));
        }
        check_url(
            &mut problems,
            "matrix.homeserver_url",
            &self.matrix.homeserver_url,
            &["http", "https"],
        );
        if let Some(u) = &self.http.public_url {
            check_url(&mut problems, "http.public_url", u, &["http", "https"]);
        }
        if let Some(u) = &self.livekit.public_url {
            check_url(&mut problems, "livekit.public_url", u, &["ws", "wss"]);
        }
        for (key, v) in [
            ("appservice.id", &self.appservice.id),
            (
                "appservice.sender_localpart",
                &self.appservice.sender_localpart,
            ),
            ("appservice.user_prefix", &self.appservice.user_prefix),
        ] {
            let ok = !v.is_empty()
                && v.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._=-/".contains(c));
            if !ok {
                problems.push(format!(
                    "key `{key}`: value {v:?}: expected a non-empty Matrix localpart (a-z, 0-9, ._=-/)"
                ));
            }
        }
        if self.http.max_body_bytes < 1024 {
            problems.push(format!(
                "key `http.max_body_bytes`: value {}: expected at least 1024",
                self.http.max_body_bytes
            ));
        }
        for (key, v) in [
            ("http.header_timeout_secs", self.http.header_timeout_secs),
            ("http.idle_timeout_secs", self.http.idle_timeout_secs),
            (
                "http.ws_handshake_timeout_secs",
                self.http.ws_handshake_timeout_secs,
            ),
            ("http.request_timeout_secs", self.http.request_timeout_secs),
        ] {
            if !(1..=3600).contains(&v) {
                problems.push(format!(
                    "key `{key}`: value {v}: expected 1 to 3600 seconds"
                ));
            }
        }
        for (key, v) in [
            ("http.max_connections", self.http.max_connections),
            (
                "http.max_connections_per_ip",
                self.http.max_connections_per_ip,
            ),
        ] {
            if !(1..=1_000_000).contains(&v) {
                problems.push(format!(
                    "key `{key}`: value {v}: expected 1 to 1000000 connections"
                ));
            }
        }
        if self.http.reserved_connections > 10_000 {
            problems.push(format!(
                "key `http.reserved_connections`: value {}: expected at most 10000",
                self.http.reserved_connections
            ));
        }
        if self.auth.token_lifetime_secs == 0 {
            problems.push(
                "key `auth.token_lifetime_secs`: value 0: expected a positive number of seconds"
                    .to_owned(),
            );
        }
        for (key, rate, burst) in [
            (
                "auth.homeserver_burst",
                self.auth.homeserver_rate_per_sec,
                self.auth.homeserver_burst,
            ),
            (
                "auth.user_burst",
                self.auth.user_rate_per_sec,
                self.auth.user_burst,
            ),
        ] {
            if rate > 0 && burst == 0 {
                problems.push(format!(
                    "key `{key}`: value 0: expected at least 1 while its rate is not 0 \
                     (set the rate to 0 to turn the limit off)"
                ));
            }
        }
        if let Some(k) = &self.livekit.key {
            if k.trim().is_empty() {
                problems.push("key `livekit.key`: value \"\": expected a non-empty API key".into());
            }
        }
        for u in &self.webhook.urls {
            check_url(&mut problems, "webhook.urls", u, &["http", "https"]);
        }
        if let Some(k) = &self.webhook.api_key {
            if k.trim().is_empty() {
                problems
                    .push("key `webhook.api_key`: value \"\": expected a non-empty API key".into());
            }
        }
        if let Some(s) = &self.livekit.secret {
            if s.expose().len() < 32 {
                problems.push(
                    "key `livekit.secret`: value (redacted): expected at least 32 characters"
                        .into(),
                );
            }
        }
        let (interval, timeout) = (self.rtc.ping_interval_secs, self.rtc.ping_timeout_secs);
        if interval == 0 || timeout <= interval || timeout > 300 {
            problems.push(format!(
                "keys `rtc.ping_interval_secs` ({interval}) and `rtc.ping_timeout_secs` \
                 ({timeout}): expected 0 < interval < timeout <= 300 seconds"
            ));
        }
        self.validate_turn(&mut problems);
        self.validate_cascade(&mut problems);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Semantic(problems))
        }
    }

    fn validate_cascade(&self, problems: &mut Vec<String>) {
        if self.cascade.mirror_idle_secs == 0 {
            problems.push(
                "key `cascade.mirror_idle_secs`: value 0: expected at least 1 (seconds)".into(),
            );
        }
        let mut seen = std::collections::BTreeSet::new();
        for p in &self.cascade.peers {
            let server = &p.server_name;
            if server == &self.matrix.server_name {
                problems.push(format!(
                    "key `cascade.peers`: {server} is this Conclave's own server (`matrix.server_name`)"
                ));
            }
            if !seen.insert(server.as_str()) {
                problems.push(format!("key `cascade.peers`: {server} is listed twice"));
            }
            if let Some(u) = &p.url {
                check_url(problems, "cascade.peers.url", u, &["http", "https"]);
            }
            match p.bot_user_id() {
                Ok(u) if u.server_name() != server => problems.push(format!(
                    "key `cascade.peers.user_id`: value {u:?}: expected a user of {server}"
                )),
                Ok(_) => {}
                Err(e) => problems.push(format!(
                    "key `cascade.peers`: {server}: its Conclave's user ID cannot be formed ({e}); \
                     set `user_id`"
                )),
            }
        }
    }

    fn validate_turn(&self, problems: &mut Vec<String>) {
        let t = &self.turn;
        if !t.enabled {
            return;
        }
        if t.cert_file.is_some() != t.key_file.is_some() {
            problems.push(
                "keys `turn.cert_file` and `turn.key_file`: expected both or neither (TURN over \
                 TLS needs the certificate and its key)"
                    .into(),
            );
        }
        if t.tls_enabled() && t.domain.is_none() {
            problems.push(
                "key `turn.domain`: missing: TURN over TLS needs the host name its certificate \
                 is valid for"
                    .into(),
            );
        }
        if t.udp_port == 0 && t.tcp_port == 0 && !t.tls_enabled() {
            problems.push(
                "section `turn`: enabled with no listener: set `udp_port`, `tcp_port`, or \
                 `tls_port` with `cert_file` and `key_file`"
                    .into(),
            );
        }
        if !(60..=7 * 86_400).contains(&t.credential_ttl_secs) {
            problems.push(format!(
                "key `turn.credential_ttl_secs`: value {}: expected 60 to 604800 seconds",
                t.credential_ttl_secs
            ));
        }
        if !(1..=100_000).contains(&t.max_allocations) {
            problems.push(format!(
                "key `turn.max_allocations`: value {}: expected 1 to 100000",
                t.max_allocations
            ));
        }
    }

    /// URL at which the homeserver reaches this service.
    pub fn public_http_url(&self) -> String {
        self.http
            .public_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", self.http.bind))
            .trim_end_matches('/')
            .to_owned()
    }

    /// SFU WebSocket URL returned to clients.
    pub fn livekit_public_url(&self) -> String {
        self.livekit
            .public_url
            .clone()
            .unwrap_or_else(|| format!("ws://{}", self.http.bind))
    }

    /// Whether the SFU creates rooms on first connect (see [`RtcConfig::auto_create`]).
    pub fn sfu_auto_create(&self) -> bool {
        self.rtc.auto_create.unwrap_or(!self.homeserver_configured)
    }

    /// The bot user's ID.
    pub fn bot_user_id(&self) -> String {
        format!(
            "@{}:{}",
            self.appservice.sender_localpart, self.matrix.server_name
        )
    }
}

fn check_url(problems: &mut Vec<String>, key: &str, value: &str, schemes: &[&str]) {
    match reqwest::Url::parse(value) {
        Ok(u) if schemes.contains(&u.scheme()) && u.host().is_some() => {}
        _ => problems.push(format!(
            "key `{key}`: value {value:?}: expected an absolute {} URL",
            schemes.join("/")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn example_file_parses_to_defaults() {
        let table: toml::Table = EXAMPLE_TOML.parse().expect("example is TOML");
        let config: Config = toml::Value::Table(table)
            .try_into()
            .expect("example parses");
        assert_eq!(config, Config::default());
    }

    #[test]
    fn env_overrides_are_typed_by_default() {
        let (c, from) = load(
            None,
            env(&[
                ("CONCLAVE_HTTP__BIND", "127.0.0.1:9999"),
                ("CONCLAVE_RTC__UDP_PORT", "7000"),
                ("CONCLAVE_RTC__SINGLE_PC", "true"),
                ("CONCLAVE_DATA_DIR", "/tmp/x"),
                (
                    "CONCLAVE_AUTH__FULL_ACCESS_HOMESERVERS",
                    "[\"a.org\", \"b.org\"]",
                ),
                ("CONCLAVE_SYNAPSE_VENV", "/not/config"),
                ("OTHER", "x"),
            ]),
        )
        .expect("loads");
        assert_eq!(c.http.bind.port(), 9999);
        assert_eq!(c.rtc.udp_port, 7000);
        assert!(c.rtc.single_pc);
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(c.auth.full_access_homeservers, vec!["a.org", "b.org"]);
        assert_eq!(
            from.env.get("http.bind").map(String::as_str),
            Some("CONCLAVE_HTTP__BIND")
        );
    }

    #[test]
    fn comma_separated_env_lists_where_the_default_is_an_array() {
        let (c, _) = load(
            None,
            env(&[
                (
                    "CONCLAVE_WEBHOOK__URLS",
                    "http://127.0.0.1:1/a, https://hooks.example.org/b",
                ),
                ("CONCLAVE_RTC__NODE_IPS", "127.0.0.1,10.0.0.2"),
                ("CONCLAVE_RTC__TWIRP_ENABLED", "false"),
            ]),
        )
        .expect("loads");
        assert_eq!(
            c.webhook.urls,
            vec!["http://127.0.0.1:1/a", "https://hooks.example.org/b"]
        );
        assert_eq!(c.rtc.node_ips.len(), 2);
        assert!(!c.rtc.twirp_enabled);
        let (c, _) = load(
            None,
            env(&[("CONCLAVE_WEBHOOK__URLS", "[\"http://127.0.0.1:1/a\"]")]),
        )
        .expect("loads");
        assert_eq!(c.webhook.urls, vec!["http://127.0.0.1:1/a"]);
        let err = load(None, env(&[("CONCLAVE_WEBHOOK__URLS", "not a url")])).unwrap_err();
        assert!(err.to_string().contains("webhook.urls"), "{err}");
    }

    #[test]
    fn bad_env_names_key_value_and_variable() {
        let err = load(None, env(&[("CONCLAVE_HTTP__BIND", "nonsense")])).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("http.bind"), "{msg}");
        assert!(msg.contains("nonsense"), "{msg}");
        assert!(msg.contains("CONCLAVE_HTTP__BIND"), "{msg}");
    }

    #[test]
    fn unknown_key_in_known_section_is_an_error() {
        let err = load(None, env(&[("CONCLAVE_HTTP__BINDD", "x")])).unwrap_err();
        assert!(err.to_string().contains("bindd"), "{err}");
    }

    #[test]
    fn bad_file_value_names_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[rtc]\nudp_port = \"high\"\n").expect("write");
        let err = load(Some(&path), Vec::new()).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("rtc.udp_port") && msg.contains("high"),
            "{msg}"
        );
        assert!(msg.contains("c.toml"), "{msg}");
    }

    #[test]
    fn semantic_problems_are_all_listed() {
        let err = load(
            None,
            env(&[
                ("CONCLAVE_MATRIX__HOMESERVER_URL", "not a url"),
                ("CONCLAVE_APPSERVICE__ID", "Bad Id"),
            ]),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("matrix.homeserver_url"), "{msg}");
        assert!(msg.contains("appservice.id"), "{msg}");
    }

    #[test]
    fn a_rate_limit_needs_a_burst_unless_it_is_off() {
        let err = load(None, env(&[("CONCLAVE_AUTH__USER_BURST", "0")])).unwrap_err();
        assert!(err.to_string().contains("auth.user_burst"), "{err}");
        let (c, _) = load(
            None,
            env(&[
                ("CONCLAVE_AUTH__USER_BURST", "0"),
                ("CONCLAVE_AUTH__USER_RATE_PER_SEC", "0"),
                ("CONCLAVE_AUTH__HOMESERVER_RATE_PER_SEC", "0"),
            ]),
        )
        .unwrap();
        assert_eq!(
            (c.auth.user_rate_per_sec, c.auth.homeserver_rate_per_sec),
            (0, 0)
        );
        assert_eq!(c.auth.homeserver_burst, 200);
    }

    #[test]
    fn http_limits_are_validated() {
        let (c, _) = load(
            None,
            env(&[
                ("CONCLAVE_HTTP__IDLE_TIMEOUT_SECS", "2"),
                ("CONCLAVE_HTTP__MAX_CONNECTIONS", "50"),
            ]),
        )
        .expect("loads");
        assert_eq!(c.http.idle_timeout_secs, 2);
        assert_eq!(c.http.max_connections, 50);
        let err = load(
            None,
            env(&[
                ("CONCLAVE_HTTP__HEADER_TIMEOUT_SECS", "0"),
                ("CONCLAVE_HTTP__MAX_CONNECTIONS_PER_IP", "0"),
            ]),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("http.header_timeout_secs"), "{msg}");
        assert!(msg.contains("http.max_connections_per_ip"), "{msg}");
    }

    #[test]
    fn turn_settings_are_checked_only_when_it_is_enabled() {
        let mut c = Config::default();
        c.turn.udp_port = 0;
        c.turn.tcp_port = 0;
        c.turn.cert_file = Some("/c.pem".into());
        assert!(c.validate().is_ok(), "off: nothing to check");
        c.turn.enabled = true;
        c.turn.credential_ttl_secs = 5;
        let Err(ConfigError::Semantic(problems)) = c.validate() else {
            panic!("problems expected");
        };
        let all = problems.join("\n");
        for key in [
            "turn.cert_file",
            "section `turn`: enabled with no listener",
            "turn.credential_ttl_secs",
        ] {
            assert!(all.contains(key), "{key}: {all}");
        }
        // TLS with both files needs the name the certificate is for.
        c.turn.key_file = Some("/k.pem".into());
        c.turn.credential_ttl_secs = 3600;
        let Err(ConfigError::Semantic(problems)) = c.validate() else {
            panic!("problems expected");
        };
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("turn.domain"), "{problems:?}");
        c.turn.domain = Some("turn.example".into());
        assert!(c.validate().is_ok());
        assert!(c.turn.tls_enabled());
    }

    #[test]
    fn cascade_peers_come_from_the_environment_as_inline_tables() {
        let (c, _) = load(
            None,
            env(&[(
                "CONCLAVE_CASCADE__PEERS",
                r#"[{server_name = "b.example"}, {server_name = "c.example", user_id = "@rtc:c.example"}]"#,
            )]),
        )
        .unwrap();
        assert_eq!(c.cascade.peers.len(), 2);
        assert_eq!(
            c.cascade.peers[1].user_id.as_ref().unwrap().as_str(),
            "@rtc:c.example"
        );
    }

    #[test]
    fn cascade_peers_are_checked() {
        let mut c = Config::default();
        let load = |toml: &str| -> CascadeConfig {
            let t: toml::Table = toml.parse().unwrap();
            t["cascade"].clone().try_into().unwrap()
        };
        c.cascade = load(
            r#"[cascade]
            peers = [{server_name = "b.example"}, {server_name = "c.example", user_id = "@rtc:c.example"}]"#,
        );
        assert!(c.validate().is_ok());
        assert_eq!(c.cascade.mirror_idle_secs, 30, "the default");
        let b = c.cascade.peer(ruma::server_name!("b.example")).unwrap();
        assert_eq!(b.bot_user_id().unwrap().as_str(), "@conclave:b.example");
        let c2 = c.cascade.peer(ruma::server_name!("c.example")).unwrap();
        assert_eq!(c2.bot_user_id().unwrap().as_str(), "@rtc:c.example");
        assert!(c.cascade.peer(ruma::server_name!("d.example")).is_none());
        // Our own server, a duplicate, a bot of another server: each named.
        let own = c.matrix.server_name.to_string();
        c.cascade = load(&format!(
            r#"[cascade]
            mirror_idle_secs = 0
            peers = [{{server_name = "{own}"}}, {{server_name = "b.example"}},
                     {{server_name = "b.example", user_id = "@conclave:c.example"}}]"#
        ));
        let Err(ConfigError::Semantic(problems)) = c.validate() else {
            panic!("problems expected");
        };
        let all = problems.join("\n");
        for needle in [
            "own server",
            "listed twice",
            "expected a user of b.example",
            "cascade.mirror_idle_secs",
        ] {
            assert!(all.contains(needle), "{needle}: {all}");
        }
    }

    #[test]
    fn ping_settings_must_leave_the_timeout_after_the_interval() {
        let mut c = Config::default();
        for (interval, timeout, ok) in [
            (5, 15, true),
            (1, 4, true),
            (0, 4, false),
            (5, 5, false),
            (5, 301, false),
        ] {
            c.rtc.ping_interval_secs = interval;
            c.rtc.ping_timeout_secs = timeout;
            assert_eq!(
                c.validate().is_ok(),
                ok,
                "{interval}/{timeout}: {:?}",
                c.validate()
            );
        }
    }

    #[test]
    fn secrets_never_debug_print() {
        let s = Secret::new("hunter2");
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
