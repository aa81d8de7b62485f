//! A stand-in homeserver for the token benchmark: HTTPS on a loopback port that answers the
//! federation OpenID userinfo lookup (`GET /_matrix/federation/v1/openid/userinfo`) for one
//! access token.
//!
//! Its server name is its address, `127.0.0.1:<port>`: Matrix server discovery connects to an
//! IP literal with a port directly (no `.well-known`, no SRV). Its certificate (IP SAN
//! `127.0.0.1`) comes from a CA generated per run; the server under test trusts that CA through
//! `matrix.extra_ca_file`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

use super::BenchError;

/// Longest a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// A running stand-in homeserver; stops when dropped.
pub struct OpenIdHomeserver {
    /// `127.0.0.1:<port>`: its server name, which is also where it listens.
    pub server_name: String,
    /// The CA (PEM) that issued its certificate.
    pub ca_pem: String,
    answer: Arc<Answer>,
    task: JoinHandle<()>,
}

/// What the userinfo endpoint knows.
struct Answer {
    access_token: String,
    user_id: String,
    lookups: AtomicUsize,
}

impl OpenIdHomeserver {
    /// Starts it on a free loopback port; it vouches that `access_token` belongs to
    /// `@<localpart>:<server_name>`.
    pub async fn start(access_token: &str, localpart: &str) -> Result<Self, BenchError> {
        let (tls, ca_pem) = tls_config()?;
        let tcp = TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(|e| BenchError::io("binding the stand-in homeserver", e))?;
        let addr = tcp
            .local_addr()
            .map_err(|e| BenchError::io("binding the stand-in homeserver", e))?;
        let server_name = addr.to_string();
        let answer = Arc::new(Answer {
            access_token: access_token.to_owned(),
            user_id: format!("@{localpart}:{server_name}"),
            lookups: AtomicUsize::new(0),
        });
        let app = Router::new()
            .route("/_matrix/federation/v1/openid/userinfo", get(userinfo))
            .with_state(answer.clone());
        let listener = TlsListener {
            tcp,
            acceptor: TlsAcceptor::from(tls),
        };
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            server_name,
            ca_pem,
            answer,
            task,
        })
    }

    /// The user the access token belongs to.
    pub fn user_id(&self) -> &str {
        &self.answer.user_id
    }

    /// Userinfo lookups answered so far (the server under test caches a verified token, so
    /// one per run).
    pub fn lookups(&self) -> usize {
        self.answer.lookups.load(Ordering::Relaxed)
    }
}

impl Drop for OpenIdHomeserver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `GET /_matrix/federation/v1/openid/userinfo?access_token=…`: `{"sub": user}` for the known
/// token, `401 M_UNKNOWN_TOKEN` for any other (as Synapse answers).
async fn userinfo(
    State(answer): State<Arc<Answer>>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    answer.lookups.fetch_add(1, Ordering::Relaxed);
    if query.get("access_token") == Some(&answer.access_token) {
        Json(serde_json::json!({ "sub": answer.user_id })).into_response()
    } else {
        let body = serde_json::json!({
            "errcode": "M_UNKNOWN_TOKEN",
            "error": "Access token unknown or expired",
        });
        (StatusCode::UNAUTHORIZED, Json(body)).into_response()
    }
}

fn tls_err(e: impl std::fmt::Display) -> BenchError {
    BenchError::Tls(e.to_string())
}

/// A CA generated for this run and a server certificate it issued for `127.0.0.1`: the
/// server's TLS configuration (rustls with *ring*, the provider the server's own client uses)
/// and the CA certificate in PEM.
fn tls_config() -> Result<(Arc<ServerConfig>, String), BenchError> {
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(tls_err)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "conclave-bench CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca =
        CertifiedIssuer::self_signed(ca, KeyPair::generate().map_err(tls_err)?).map_err(tls_err)?;

    let key = KeyPair::generate().map_err(tls_err)?;
    let mut leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()]).map_err(tls_err)?;
    leaf.distinguished_name
        .push(DnType::CommonName, "conclave-bench homeserver");
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = leaf.signed_by(&key, &*ca).map_err(tls_err)?;

    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .map_err(tls_err)?;
    Ok((Arc::new(config), pem_certificate(ca.der())))
}

/// A DER certificate as PEM (base64 in lines of 64 characters).
fn pem_certificate(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

/// Accepts TCP connections and completes their TLS handshake; a failed or slow handshake
/// drops that connection only.
struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                // Out of file descriptors or similar: let it pass instead of spinning.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            if let Ok(Ok(tls)) =
                tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(tcp)).await
            {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stand-in answers over HTTPS that a client trusting only the generated CA accepts,
    /// at its IP-literal server name.
    #[tokio::test]
    async fn answers_userinfo_over_tls_trusted_by_its_ca() {
        let hs = OpenIdHomeserver::start("tok", "bench").await.unwrap();
        let ca = reqwest::Certificate::from_pem(hs.ca_pem.as_bytes()).unwrap();
        let client = reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .build()
            .unwrap();
        let url = |token: &str| {
            format!(
                "https://{}/_matrix/federation/v1/openid/userinfo?access_token={token}",
                hs.server_name
            )
        };
        let v: serde_json::Value = client
            .get(url("tok"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["sub"], format!("@bench:{}", hs.server_name));
        assert_eq!(hs.user_id(), format!("@bench:{}", hs.server_name));
        let r = client.get(url("other")).send().await.unwrap();
        assert_eq!(r.status(), reqwest::StatusCode::UNAUTHORIZED);
        assert_eq!(hs.lookups(), 2);
    }
}
