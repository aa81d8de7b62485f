//! The one factory of outbound HTTP clients, so every client trusts the same roots: the
//! system's plus `matrix.extra_ca_file` (a private CA between ministries, or a test CA). Each
//! caller chooses only timeouts, redirects and DNS.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Why a client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum HttpClientError {
    /// The extra CA file could not be read.
    #[error("cannot read matrix.extra_ca_file {path}: {source}")]
    ReadCa {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The extra CA file is not a PEM bundle.
    #[error("matrix.extra_ca_file is not PEM: {0}")]
    BadCa(String),
    /// reqwest refused the settings.
    #[error("cannot build the HTTP client: {0}")]
    Build(String),
}

/// What one client needs besides the trust roots.
#[derive(Clone)]
pub struct ClientOptions {
    /// Connection set-up limit.
    pub connect_timeout: Duration,
    /// Whole-request limit.
    pub timeout: Duration,
    /// Redirects followed (0: none).
    pub redirects: usize,
}

impl ClientOptions {
    /// `timeout` for the whole request, 5 s (at most `timeout`) to connect, up to 10 redirects
    /// (reqwest's default).
    pub fn with_timeout(timeout: Duration) -> Self {
        Self {
            connect_timeout: timeout.min(Duration::from_secs(5)),
            timeout,
            redirects: 10,
        }
    }
}

/// Builds clients with one CA policy. Cheap to clone.
#[derive(Clone, Default)]
pub struct HttpClients {
    extra_roots: Vec<reqwest::Certificate>,
}

impl HttpClients {
    /// The factory for the system roots plus the PEM bundle at `extra_ca_file`, if any.
    pub fn new(extra_ca_file: Option<&Path>) -> Result<Self, HttpClientError> {
        let Some(path) = extra_ca_file else {
            return Ok(Self::default());
        };
        let pem = std::fs::read(path).map_err(|source| HttpClientError::ReadCa {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_pem(&pem)
    }

    /// The factory for the system roots plus a PEM bundle.
    pub fn from_pem(pem: &[u8]) -> Result<Self, HttpClientError> {
        let extra_roots = reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|e| HttpClientError::BadCa(e.to_string()))?;
        Ok(Self { extra_roots })
    }

    /// A client with `options`.
    pub fn client(&self, options: ClientOptions) -> Result<reqwest::Client, HttpClientError> {
        self.builder(options)
            .build()
            .map_err(|e| HttpClientError::Build(e.to_string()))
    }

    /// A client with `options` resolving names with `resolver` (federation SRV lookups).
    pub fn client_with_resolver<R: reqwest::dns::Resolve + 'static>(
        &self,
        options: ClientOptions,
        resolver: Arc<R>,
    ) -> Result<reqwest::Client, HttpClientError> {
        self.builder(options)
            .dns_resolver(resolver)
            .build()
            .map_err(|e| HttpClientError::Build(e.to_string()))
    }

    fn builder(&self, options: ClientOptions) -> reqwest::ClientBuilder {
        let redirect = if options.redirects == 0 {
            reqwest::redirect::Policy::none()
        } else {
            reqwest::redirect::Policy::limited(options.redirects)
        };
        let mut builder = reqwest::Client::builder()
            .connect_timeout(options.connect_timeout)
            .timeout(options.timeout)
            .redirect(redirect)
            .user_agent(concat!("conclave/", env!("CARGO_PKG_VERSION")));
        for cert in &self.extra_roots {
            builder = builder.add_root_certificate(cert.clone());
        }
        builder
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_bad_ca_file_is_named() {
        let missing = HttpClients::new(Some(Path::new("/nonexistent/ca.pem")))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(missing.contains("/nonexistent/ca.pem"), "{missing}");
        let clients = HttpClients::default();
        assert!(clients
            .client(ClientOptions::with_timeout(Duration::from_secs(1)))
            .is_ok());
    }
}
