//! The one factory of outbound HTTP clients, so every client trusts the same roots: the
//! system's plus `matrix.extra_ca_file` (a private CA between ministries, or a test CA). Each
//! caller chooses only timeouts, redirects, DNS and which destinations may be connected to
//! ([`DestinationPolicy`]).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::destination::{DestinationPolicy, GuardedResolver, SystemResolver};

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

/// Which redirects a client follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redirects {
    /// None: a 3xx answer is returned as it is.
    None,
    /// Up to this many, anywhere.
    Any(usize),
    /// Up to this many, only to `https` URLs of the first request's host and port; any other
    /// redirect fails the request with [`RedirectRefused`].
    SameHostHttps(usize),
}

/// Why a redirect was not followed (the cause of the failed request's error; find it with
/// [`error_cause`]). Names no URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RedirectRefused {
    /// The redirect leads to another host or port, or to a scheme other than `https`.
    #[error("redirect to another destination refused")]
    OtherDestination,
    /// More redirects than allowed.
    #[error("too many redirects")]
    TooMany,
}

/// Whether a client following [`Redirects::SameHostHttps`]`(max)` follows a redirect to
/// `next` after requesting `previous` (the first request first).
pub fn same_host_https(
    previous: &[reqwest::Url],
    next: &reqwest::Url,
    max: usize,
) -> Result<(), RedirectRefused> {
    // `previous` holds the first request too, which is not a redirect.
    if previous.len() > max {
        return Err(RedirectRefused::TooMany);
    }
    let Some(first) = previous.first() else {
        return Err(RedirectRefused::OtherDestination);
    };
    let same = next.scheme() == "https"
        && next.host_str().is_some()
        && next.host_str() == first.host_str()
        && next.port_or_known_default() == first.port_or_known_default();
    if same {
        Ok(())
    } else {
        Err(RedirectRefused::OtherDestination)
    }
}

/// What one client needs besides the trust roots.
#[derive(Clone)]
pub struct ClientOptions {
    /// Connection set-up limit.
    pub connect_timeout: Duration,
    /// Longest wait for the next bytes of a response (none: only `timeout`).
    pub read_timeout: Option<Duration>,
    /// Whole-request limit, body included.
    pub timeout: Duration,
    /// Redirects followed.
    pub redirects: Redirects,
    /// Only `https` URLs are requested.
    pub https_only: bool,
    /// When set, resolved addresses the policy refuses are never connected to (IP-literal URLs
    /// are the caller's to check: [`DestinationPolicy::check_url`]).
    pub destinations: Option<DestinationPolicy>,
}

impl ClientOptions {
    /// `timeout` for the whole request, 5 s (at most `timeout`) to connect, up to 10 redirects
    /// anywhere (reqwest's default), any destination.
    pub fn with_timeout(timeout: Duration) -> Self {
        Self {
            connect_timeout: timeout.min(Duration::from_secs(5)),
            read_timeout: None,
            timeout,
            redirects: Redirects::Any(10),
            https_only: false,
            destinations: None,
        }
    }
}

/// The first error of type `T` in `e`'s chain of causes (a [`RedirectRefused`] or a
/// [`super::destination::RefusedDestination`] behind a failed request).
pub fn error_cause<'a, T: std::error::Error + 'static>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(found) = err.downcast_ref::<T>() {
            return Some(found);
        }
        next = err.source();
    }
    None
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
        let mut builder = self.builder(&options);
        if let Some(policy) = options.destinations {
            builder = builder.dns_resolver(Arc::new(GuardedResolver::new(
                Arc::new(SystemResolver),
                policy,
            )));
        }
        builder
            .build()
            .map_err(|e| HttpClientError::Build(e.to_string()))
    }

    /// A client with `options` resolving names with `resolver` (federation SRV lookups),
    /// filtered by `options.destinations` when set.
    pub fn client_with_resolver<R: reqwest::dns::Resolve + 'static>(
        &self,
        options: ClientOptions,
        resolver: Arc<R>,
    ) -> Result<reqwest::Client, HttpClientError> {
        let builder = self.builder(&options);
        let builder = match options.destinations {
            Some(policy) => builder.dns_resolver(Arc::new(GuardedResolver::new(resolver, policy))),
            None => builder.dns_resolver(resolver),
        };
        builder
            .build()
            .map_err(|e| HttpClientError::Build(e.to_string()))
    }

    fn builder(&self, options: &ClientOptions) -> reqwest::ClientBuilder {
        let redirect = match options.redirects {
            Redirects::None | Redirects::Any(0) => reqwest::redirect::Policy::none(),
            Redirects::Any(max) => reqwest::redirect::Policy::limited(max),
            Redirects::SameHostHttps(max) => reqwest::redirect::Policy::custom(move |attempt| {
                match same_host_https(attempt.previous(), attempt.url(), max) {
                    Ok(()) => attempt.follow(),
                    Err(refused) => attempt.error(refused),
                }
            }),
        };
        let mut builder = reqwest::Client::builder()
            .connect_timeout(options.connect_timeout)
            .timeout(options.timeout)
            .redirect(redirect)
            .https_only(options.https_only)
            .user_agent(concat!("conclave/", env!("CARGO_PKG_VERSION")));
        if let Some(read) = options.read_timeout {
            builder = builder.read_timeout(read);
        }
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

    #[test]
    fn same_host_https_redirects_only() {
        let url = |s: &str| reqwest::Url::parse(s).unwrap();
        let first = [url("https://hs.example:8448/a")];
        let ok = |next: &str| same_host_https(&first, &url(next), 3);
        assert_eq!(ok("https://hs.example:8448/b"), Ok(()));
        for elsewhere in [
            "http://hs.example:8448/b",
            "https://other.example:8448/b",
            "https://hs.example/b",
            "https://127.0.0.1:8448/b",
            "http://127.0.0.1/internal",
        ] {
            assert_eq!(
                ok(elsewhere),
                Err(RedirectRefused::OtherDestination),
                "{elsewhere}"
            );
        }
        let chain = [
            url("https://hs.example:8448/a"),
            url("https://hs.example:8448/b"),
            url("https://hs.example:8448/c"),
            url("https://hs.example:8448/d"),
        ];
        assert_eq!(
            same_host_https(&chain, &url("https://hs.example:8448/e"), 3),
            Err(RedirectRefused::TooMany)
        );
        assert_eq!(
            same_host_https(&chain[..3], &url("https://hs.example:8448/e"), 3),
            Ok(())
        );
    }

    /// A loopback HTTP server answering every request with a redirect to `location`; counts
    /// the connections it accepted.
    async fn redirecting_server(
        location: &'static str,
    ) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/start", listener.local_addr().unwrap());
        let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut buf = [0u8; 4096];
                let _ = sock.read(&mut buf).await;
                let answer = format!(
                    "HTTP/1.1 302 Found\r\nlocation: {location}\r\ncontent-length: 0\r\n\r\n"
                );
                let _ = sock.write_all(answer.as_bytes()).await;
            }
        });
        (url, seen)
    }

    #[tokio::test]
    async fn a_refused_redirect_fails_the_request_with_a_findable_cause() {
        let mut options = ClientOptions::with_timeout(Duration::from_secs(5));
        options.redirects = Redirects::SameHostHttps(3);
        let client = HttpClients::default().client(options).unwrap();
        // To plain http on another port of the same address.
        let (url, _) = redirecting_server("http://127.0.0.1:9/internal").await;
        let err = client.get(url).send().await.unwrap_err();
        assert_eq!(
            error_cause::<RedirectRefused>(&err),
            Some(&RedirectRefused::OtherDestination),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn a_guarded_client_does_not_connect_to_names_resolving_to_loopback() {
        let (url, seen) = redirecting_server("/never").await;
        let url = url.replace("127.0.0.1", "localhost");
        let mut options = ClientOptions::with_timeout(Duration::from_secs(5));
        options.destinations = Some(DestinationPolicy::default());
        let client = HttpClients::default().client(options).unwrap();
        let err = client.get(url).send().await.unwrap_err();
        assert!(
            error_cause::<super::super::destination::RefusedDestination>(&err).is_some(),
            "{err:?}"
        );
        assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 0);
    }
}
