//! Running the commands: everything `main.rs` does is callable from here.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::auth::jwt::TokenSigner;
use crate::auth::membership::MembershipGate;
use crate::auth::openid::OpenIdVerifier;
use crate::auth::tokens::cascade::PeerLink;
use crate::auth::tokens::{TokenService, TokenSettings};
use crate::calls::{Calls, CallsSettings};
use crate::cascade::{Cascade, CascadeSettings};
use crate::cli::{Cli, Command};
use crate::config::{self, Config, ConfigError};
use crate::http::admin::AdminState;
use crate::http::appservice::AppserviceState;
use crate::http::server::ServerSettings;
use crate::http::tokens::TokenState;
use crate::http::twirp::TwirpState;
use crate::http::HttpState;
use crate::matrix::client::HomeserverClient;
use crate::matrix::registration::Registration;
use crate::metrics::{inc, Metrics};
use crate::net::SfuHandle;
use crate::plumbing::{Backoff, ClientOptions, DestinationPolicy, HttpClients};
use crate::secrets::{Secrets, SecretsError, SECRETS_FILE};
use crate::sfu::registry::RoomRegistry;
use crate::signal::SignalState;
use crate::store::sqlite::Fault;
use crate::store::{AsyncStore, SqliteStore, StoreError};
use crate::webhook::{WebhookSettings, Webhooks};

/// Database file name inside the data directory.
pub const DATABASE_FILE: &str = "conclave.db";

/// Environment variable for fault injection in crash-safety tests (`abort-before-commit`).
pub const FAULT_ENV: &str = "CONCLAVE_TEST_FAULT";

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The configuration is invalid (exit status 2).
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// Secrets could not be loaded or created.
    #[error("{0}")]
    Secrets(#[from] SecretsError),
    /// The database could not be opened.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The HTTP port could not be bound.
    #[error("cannot listen on {addr} (http.bind): {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Writing output failed, or the server stopped with an I/O error.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The HTTP client could not be built (e.g. a bad CA file).
    #[error("cannot set up the HTTP client: {0}")]
    HttpClient(String),
    /// The media sockets could not be set up.
    #[error("{0}")]
    Net(String),
    /// The TURN server could not start (a port taken, an unreadable certificate).
    #[error("{0}")]
    Turn(String),
    /// YAML serialisation failed.
    #[error("cannot write the registration: {0}")]
    Yaml(#[from] serde_yaml::Error),
}

impl RunError {
    /// Process exit status: 2 for configuration errors, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            RunError::Config(_) => 2,
            _ => 1,
        }
    }
}

fn load_config(file: Option<&Path>) -> Result<Config, RunError> {
    let (config, _from) = config::load(file, std::env::vars())?;
    Ok(config)
}

/// Runs one CLI command to completion.
pub async fn run(cli: Cli) -> Result<(), RunError> {
    match cli.command {
        Command::Serve { config } => serve(load_config(config.as_deref())?).await,
        Command::GenerateConfig => write_stdout(config::EXAMPLE_TOML),
        Command::CheckConfig { config } => {
            let mut config = load_config(config.as_deref())?;
            // Never print secrets: show that they are set, not what they are.
            let redacted = || Some(crate::config::Secret::new("(set, redacted)"));
            if config.appservice.as_token.is_some() {
                config.appservice.as_token = redacted();
            }
            if config.appservice.hs_token.is_some() {
                config.appservice.hs_token = redacted();
            }
            if config.livekit.secret.is_some() {
                config.livekit.secret = redacted();
            }
            let text =
                toml::to_string_pretty(&config).map_err(|e| RunError::HttpClient(e.to_string()))?;
            write_stdout(&format!(
                "# configuration is valid; effective values:\n{text}"
            ))
        }
        Command::PrintDiscovery {
            config,
            json,
            msc4512,
        } => {
            let config = load_config(config.as_deref())?;
            write_stdout(&discovery_text(&config, json, msc4512)?)
        }
        Command::GenerateRegistration {
            url,
            config,
            output,
        } => {
            let config = load_config(config.as_deref())?;
            let secrets = Secrets::load_or_create(&config)?;
            let url = url.unwrap_or_else(|| config.public_http_url());
            let yaml = Registration::new(&config, &secrets, &url).to_yaml()?;
            let output = output.unwrap_or_else(|| config.data_dir.join("appservice.yaml"));
            if output == Path::new("-") {
                write_stdout(&yaml)
            } else {
                crate::secrets::write_private(&output, &yaml).map_err(|e| RunError::Io {
                    context: format!("cannot write {}", output.display()),
                    source: std::io::Error::other(e.to_string()),
                })?;
                eprintln!(
                    "wrote {} (url {url}); add it to Synapse's app_service_config_files and restart Synapse",
                    output.display()
                );
                Ok(())
            }
        }
    }
}

/// What `print-discovery` prints: the Synapse `matrix_rtc` block and the well-known key, both
/// pointing at the token service (`http.public_url`); with `msc4512`, Synapse's flags for
/// forwarding MSC4195's endpoints to Conclave and a transport naming the SFU (`url`,
/// `livekit.public_url`), whose tokens clients then ask of the homeserver.
fn discovery_text(config: &Config, json: bool, msc4512: bool) -> Result<String, RunError> {
    let service_url = config.public_http_url();
    let transport = if msc4512 {
        serde_json::json!({"type": "livekit", "url": config.livekit_public_url()})
    } else {
        serde_json::json!({"type": "livekit", "livekit_service_url": service_url})
    };
    let flags = if msc4512 {
        serde_json::json!({"msc4143_enabled": true, "msc4512_enabled": true, "msc4502_enabled": true})
    } else {
        serde_json::json!({"msc4143_enabled": true})
    };
    let synapse = serde_json::json!({
        "experimental_features": flags,
        "max_event_delay_duration": "24h",
        // Conclave restarts every participant's delayed leave from one IP: Synapse's default
        // (1/s, burst 5) would throttle it beyond a handful of participants.
        "rc_delayed_event_mgmt": {"per_second": 50, "burst_count": 200},
        "matrix_rtc": {"transports": [transport]},
    });
    let well_known = serde_json::json!({"org.matrix.msc4143.rtc_foci": [transport]});
    if json {
        return Ok(format!(
            "{}\n",
            serde_json::json!({"synapse": synapse, "well_known_client": well_known})
        ));
    }
    let yaml = serde_yaml::to_string(&synapse)?;
    let wk = serde_json::to_string_pretty(&well_known).unwrap_or_default();
    let mode = if msc4512 {
        "#    MSC4512: Synapse forwards /_matrix/{client,federation}/*/rtc/livekit/* to Conclave\n\
         #    (the registration's io.element.msc4512.* keys; regenerate it if older).\n"
    } else {
        ""
    };
    Ok(format!(
        "# 1. Add to Synapse's homeserver.yaml (MSC4143 transports, MSC4140 delayed events),\n\
         #    then restart Synapse. Clients read it from\n\
         #    /_matrix/client/unstable/org.matrix.msc4143/rtc/transports.\n\
         {mode}{yaml}\n\
         # 2. Merge into https://{server}/.well-known/matrix/client (legacy discovery, still read\n\
         #    by some clients):\n\
         {wk}\n\
         # The URL is http.public_url; behind a TLS reverse proxy set it to the public https URL.\n",
        server = config.matrix.server_name,
    ))
}

fn write_stdout(text: &str) -> Result<(), RunError> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|source| RunError::Io {
            context: "cannot write to standard output".into(),
            source,
        })
}

/// The running service: the HTTP side's state, and the calls service whose workers follow
/// the SFU.
pub struct Services {
    /// What the router serves.
    pub http: HttpState,
    /// The calls service (start its workers with [`Calls::start`]).
    pub calls: Calls,
    /// What the webhook notifier needs.
    pub webhooks: Webhooks,
}

/// Opens the store and builds every service for `config` around the running SFU loop `sfu`,
/// whose room view is `rooms`; starts the TURN server when `turn.enabled`, registering its
/// relays in `relays` (the SFU's view of them).
pub async fn build_services(
    config: Config,
    fault: Fault,
    rooms: Arc<RoomRegistry>,
    sfu: SfuHandle,
    relays: crate::sfu::RelayAddresses,
) -> Result<Services, RunError> {
    let secrets = Secrets::load_or_create(&config)?;
    let (turn, ice_servers) = if config.turn.enabled {
        let (server, ice) = start_turn(&config, &secrets, &sfu, relays).await?;
        (Some(server), Some(ice))
    } else {
        (None, None)
    };
    let store = SqliteStore::open(&config.data_dir.join(DATABASE_FILE))?.with_fault(fault);
    let store = AsyncStore::new(Arc::new(store));
    let clients = HttpClients::new(config.matrix.extra_ca_file.as_deref())
        .map_err(|e| RunError::HttpClient(e.to_string()))?;
    let homeserver_http = clients
        .client(ClientOptions::with_timeout(Duration::from_secs(30)))
        .map_err(|e| RunError::HttpClient(e.to_string()))?;
    let homeserver = HomeserverClient::new(
        homeserver_http,
        &config.matrix.homeserver_url,
        secrets.as_token.clone(),
    );
    let openid = OpenIdVerifier::new(
        &clients,
        Duration::from_millis(config.auth.federation_timeout_ms),
        DestinationPolicy::new(config.auth.allow_private_federation),
    )
    .map_err(|e| RunError::HttpClient(e.to_string()))?;
    let metrics = Arc::new(Metrics::default());
    let calls = Calls::new(
        CallsSettings::from_config(&config),
        store.clone(),
        homeserver.clone(),
        sfu.clone(),
        clients.clone(),
        metrics.clone(),
    );
    let gate = MembershipGate::new(
        store,
        homeserver.clone(),
        config.matrix.server_name.clone(),
        config.bot_user_id(),
        Duration::from_millis(config.auth.membership_wait_ms),
    );
    let signer = TokenSigner::new(&secrets.livekit_key, secrets.livekit_secret.expose());
    // Requests to peer Conclaves (docs/cascade.md): bounded, so a token request waiting on a
    // peer still answers within the client's patience.
    let peer_http = clients
        .client(ClientOptions::with_timeout(CASCADE_PEER_TIMEOUT))
        .map_err(|e| RunError::HttpClient(e.to_string()))?;
    let peers = PeerLink::new(peer_http, homeserver.clone(), config.bot_user_id());
    let tokens = TokenService::new(
        TokenSettings::from_config(&config),
        openid,
        signer.clone(),
        gate,
        calls.clone(),
        sfu.clone(),
        homeserver,
    )
    .with_peers(peers.clone(), metrics.clone());
    let cascade = Cascade::new(
        CascadeSettings::from_config(&config),
        tokens.clone(),
        peers,
        sfu.clone(),
    );
    let bridges = crate::bridge::Bridges::new(
        signer.clone(),
        sfu.clone(),
        rooms.clone(),
        config.sfu_auto_create(),
        ice_servers.clone(),
        metrics.clone(),
    );
    let http = HttpState {
        appservice: AppserviceState {
            calls: calls.clone(),
            hs_token: secrets.hs_token.clone(),
            bot_user_id: config.bot_user_id(),
            metrics: metrics.clone(),
        },
        tokens: TokenState {
            tokens,
            cascade,
            metrics: metrics.clone(),
            hs_token: secrets.hs_token.clone(),
            server_name: config.matrix.server_name.clone(),
        },
        admin: AdminState {
            calls: calls.clone(),
            token: config.admin.token.clone(),
        },
        signal: Arc::new(SignalState {
            signer: signer.clone(),
            sfu: sfu.clone(),
            rooms: rooms.clone(),
            auto_create: config.sfu_auto_create(),
            signal_timeout: Duration::from_secs(config.rtc.signal_timeout_secs.max(1)),
            token_lifetime_secs: config.auth.token_lifetime_secs,
            single_pc: config.rtc.single_pc,
            metrics: metrics.clone(),
            ice_servers,
        }),
        twirp: TwirpState {
            enabled: config.rtc.twirp_enabled,
            signer,
            sfu: sfu.clone(),
            rooms: rooms.clone(),
        },
        sfu,
        metrics,
        bridges,
        turn: turn.map(|t| t.stats),
        max_body_bytes: config.http.max_body_bytes,
    };
    let settings = WebhookSettings {
        urls: config.webhook.urls.clone(),
        api_key: config
            .webhook
            .api_key
            .clone()
            .unwrap_or_else(|| secrets.livekit_key.clone()),
        secret: secrets.livekit_secret.clone(),
    };
    Ok(Services {
        http,
        calls,
        webhooks: Webhooks {
            settings,
            clients,
            rooms,
        },
    })
}

/// Starts the TURN server on the node IPs of the SFU's media sockets, relaying only to
/// those sockets; returns it and what participants are handed.
async fn start_turn(
    config: &Config,
    secrets: &Secrets,
    sfu: &SfuHandle,
    relays: crate::sfu::RelayAddresses,
) -> Result<(crate::turn::TurnServer, crate::turn::IceServers), RunError> {
    use crate::turn::{self, IceServers, TurnSettings};
    let t = &config.turn;
    let media = sfu.addresses.clone();
    let Some(first) = media.first() else {
        return Err(RunError::Turn(
            "TURN needs at least one media address".into(),
        ));
    };
    // Relays on the first routable node IP (loopback only when there is nothing else).
    let relay_ip = media
        .iter()
        .map(|a| a.ip())
        .find(|ip| !ip.is_loopback())
        .unwrap_or(first.ip());
    let listen = |port: u16| -> Vec<std::net::SocketAddr> {
        if port == 0 {
            return Vec::new();
        }
        media
            .iter()
            .map(|a| std::net::SocketAddr::new(a.ip(), port))
            .collect()
    };
    let tls_config = match (&t.cert_file, &t.key_file) {
        (Some(cert), Some(key)) if t.tls_enabled() => {
            Some(turn::tls_config(cert, key).map_err(|e| RunError::Turn(e.to_string()))?)
        }
        _ => None,
    };
    let settings = TurnSettings {
        udp: listen(t.udp_port),
        tcp: listen(t.tcp_port),
        tls: if t.tls_enabled() {
            listen(t.tls_port)
        } else {
            Vec::new()
        },
        tls_config,
        relay_ip,
        media: media.to_vec(),
        max_allocations: t.max_allocations,
    };
    let credentials =
        turn::credentials::Credentials::new(secrets.livekit_secret.expose(), t.credential_ttl_secs);
    let server = turn::start(settings, credentials.clone(), relays)
        .await
        .map_err(|e| RunError::Turn(e.to_string()))?;
    let host = t.domain.clone().unwrap_or_else(|| relay_ip.to_string());
    let port = |a: &[std::net::SocketAddr]| a.first().map(|a| a.port());
    let urls = IceServers::urls_for(
        &host,
        port(&server.udp_addresses),
        port(&server.tcp_addresses),
        port(&server.tls_addresses),
    );
    tracing::info!(?urls, "TURN URLs handed to participants");
    Ok((server, IceServers::new(credentials, urls)))
}

/// Binds `http.bind`.
pub async fn bind(config: &Config) -> Result<tokio::net::TcpListener, RunError> {
    tokio::net::TcpListener::bind(config.http.bind)
        .await
        .map_err(|source| RunError::Bind {
            addr: config.http.bind,
            source,
        })
}

async fn serve(config: Config) -> Result<(), RunError> {
    let fault = match std::env::var(FAULT_ENV).as_deref() {
        Ok("abort-before-commit") => Fault::AbortBeforeCommit,
        _ => Fault::None,
    };
    log_fd_limit(&config);
    let listener = bind(&config).await?;
    let local = listener.local_addr().map_err(|source| RunError::Io {
        context: "cannot read the bound address".into(),
        source,
    })?;
    let rooms = Arc::new(RoomRegistry::default());
    let relays = crate::sfu::RelayAddresses::default();
    let node_ips = if config.rtc.node_ips.is_empty() {
        crate::net::default_node_ips()
    } else {
        config.rtc.node_ips.clone()
    };
    let sfu = crate::net::start(
        &node_ips,
        config.rtc.udp_port,
        (config.rtc.tcp_port != 0).then_some(config.rtc.tcp_port),
        config.rtc.loop_threads(),
        crate::sfu::SfuConfig {
            resume_window: (config.rtc.resume_window_secs != 0)
                .then(|| std::time::Duration::from_secs(config.rtc.resume_window_secs)),
            relays: relays.clone(),
            ping: crate::sfu::Ping {
                interval_secs: config.rtc.ping_interval_secs,
                timeout_secs: config.rtc.ping_timeout_secs,
            },
            congestion_control_off: !config.rtc.congestion_control,
            ..Default::default()
        },
        rooms.clone(),
    )
    .map_err(|e| RunError::Net(e.to_string()))?;
    let media = sfu.addresses.clone();
    let media_tcp = sfu.tcp_addresses.clone();
    let events = sfu.subscribe_events();
    let sfu_handle = sfu.clone();
    let services = build_services(config.clone(), fault, rooms, sfu, relays).await?;
    tracing::info!(
        ?media,
        ?media_tcp,
        auto_create = config.sfu_auto_create(),
        "SFU running"
    );
    services.calls.start();
    tokio::spawn(crate::webhook::run(services.webhooks, events));
    print_banner(&config, local);
    if config.appservice.ping_on_start {
        let homeserver = services.calls.homeserver().clone();
        let metrics = services.http.metrics.clone();
        tokio::spawn(ping_homeserver(
            homeserver,
            config.appservice.id.clone(),
            metrics,
        ));
    }
    let metrics = services.http.metrics.clone();
    let app = crate::http::router(services.http);
    let settings = ServerSettings::from_config(&config.http);
    // On a shutdown signal the SFU's participants are told to reconnect (they rejoin the
    // restarted server on their own) before the HTTP connections drain.
    let signal_metrics = metrics.clone();
    let shutdown = async move {
        shutdown_signal().await;
        sfu_handle.shut_down().await;
        // The sessions write the leave and close their WebSockets.
        let deadline = tokio::time::Instant::now() + SFU_SHUTDOWN_WAIT;
        let open = || {
            signal_metrics
                .signal_sessions_open
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        while open() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        if open() > 0 {
            tracing::warn!(
                open = open(),
                "signalling sessions still open after {SFU_SHUTDOWN_WAIT:?}"
            );
        }
    };
    crate::http::server::run(listener, app, settings, metrics, shutdown)
        .await
        .map_err(|source| RunError::Io {
            context: "HTTP server failed".into(),
            source,
        })?;
    tracing::info!("shut down cleanly");
    Ok(())
}

/// Raises the open-files limit to the hard limit and logs it; warns when it is below what
/// the connection caps allow.
fn log_fd_limit(config: &Config) {
    #[cfg(unix)]
    match crate::http::server::raise_fd_limit() {
        Some((soft, hard)) => {
            let ice_tcp = if config.rtc.tcp_port == 0 {
                0
            } else {
                crate::net::tcp::MAX_CONNECTIONS
            };
            let needed = config
                .http
                .max_connections
                .saturating_add(config.http.reserved_connections)
                .saturating_add(ice_tcp)
                .saturating_add(256);
            let needed = libc::rlim_t::try_from(needed).unwrap_or(libc::rlim_t::MAX);
            if soft < needed {
                tracing::warn!(
                    soft,
                    hard,
                    needed,
                    "the open-files limit (RLIMIT_NOFILE) is below http.max_connections + \
                     http.reserved_connections + the ICE-TCP connections (4096 unless \
                     rtc.tcp_port = 0) + 256; raise it (systemd LimitNOFILE, docker --ulimit \
                     nofile) or lower the caps"
                );
            } else {
                tracing::info!(soft, hard, "open-files limit (RLIMIT_NOFILE)");
            }
        }
        None => tracing::warn!("cannot read the open-files limit (RLIMIT_NOFILE)"),
    }
    #[cfg(not(unix))]
    let _ = config;
}

fn print_banner(config: &Config, local: std::net::SocketAddr) {
    let data = absolute(&config.data_dir);
    let text = format!(
        "Conclave {version} is running.\n\
         \x20 HTTP (appservice, tokens, SFU signalling): http://{local}\n\
         \x20 health: http://{local}/healthz   metrics: http://{local}/metrics\n\
         \x20 data:   {data} (database {db}, secrets {secrets})\n\
         \x20 homeserver: {hs} (server name {name})\n\
         Next step: register Conclave with Synapse:\n\
         \x20 conclave generate-registration --url {url}\n\
         \x20 then add {data}/appservice.yaml to app_service_config_files in homeserver.yaml and restart Synapse.\n",
        version = env!("CARGO_PKG_VERSION"),
        data = data.display(),
        db = DATABASE_FILE,
        secrets = SECRETS_FILE,
        hs = config.matrix.homeserver_url,
        name = config.matrix.server_name,
        url = config.public_http_url(),
    );
    let _ = write_stdout(&text);
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Pings the homeserver until it answers: proves the link and makes Synapse retry queued
/// transactions immediately. An unreachable homeserver is a warning; serving goes on.
async fn ping_homeserver(
    homeserver: HomeserverClient,
    appservice_id: String,
    metrics: Arc<Metrics>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let mut warned = false;
    loop {
        match homeserver.ping(&appservice_id).await {
            Ok(rtt) => {
                inc(&metrics.homeserver_pings_ok);
                tracing::info!(
                    duration_ms = rtt.as_millis() as u64,
                    homeserver = %homeserver.base_url(),
                    "appservice ping round trip through the homeserver succeeded"
                );
                return;
            }
            Err(e) => {
                inc(&metrics.homeserver_pings_failed);
                if !warned {
                    tracing::warn!(
                        error = %e,
                        homeserver = %homeserver.base_url(),
                        "homeserver ping failed; still serving, retrying with backoff \
                         (is Conclave registered in app_service_config_files?)"
                    );
                    warned = true;
                } else {
                    tracing::debug!(error = %e, "homeserver ping failed again");
                }
            }
        }
        backoff.wait().await;
    }
}

/// How long a graceful shutdown waits for the SFU's participants to be told to reconnect and
/// their signalling to close, before the HTTP connections drain.
/// Each request to a peer Conclave (a mirror token, a relay grant) must be answered within
/// this; a token request waiting on a peer then falls back to the direct answer in time.
const CASCADE_PEER_TIMEOUT: Duration = Duration::from_secs(4);

const SFU_SHUTDOWN_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown signal received; draining connections");
}
