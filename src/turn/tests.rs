//! The TURN server on real loopback sockets, driven by a raw TURN client written here: what
//! it grants, what it refuses (no, wrong or expired credentials; any peer but the media
//! address), and hostile connections.

use super::*;
use std::net::Ipv4Addr;

const SECRET: &str = "0123456789abcdef0123456789abcdef";
const WAIT: Duration = Duration::from_secs(3);

/// A server relaying only to `media` (127.0.0.1), with a foreign host on 127.0.0.2 and a
/// foreign port on the media IP.
struct Fixture {
    server: TurnServer,
    relays: RelayAddresses,
    media: UdpSocket,
    foreign_host: UdpSocket,
    foreign_port: UdpSocket,
    credentials: Credentials,
}

async fn fixture_with(max_allocations: usize, tls: Option<Arc<rustls::ServerConfig>>) -> Fixture {
    let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let media = UdpSocket::bind((localhost, 0)).await.unwrap();
    let foreign_host = UdpSocket::bind("127.0.0.2:0").await.unwrap();
    let foreign_port = UdpSocket::bind((localhost, 0)).await.unwrap();
    let relays = RelayAddresses::default();
    let credentials = Credentials::new(SECRET, 600);
    let any = SocketAddr::new(localhost, 0);
    let server = start(
        TurnSettings {
            udp: vec![any],
            tcp: vec![any],
            tls: if tls.is_some() { vec![any] } else { vec![] },
            tls_config: tls,
            relay_ip: localhost,
            media: vec![media.local_addr().unwrap()],
            max_allocations,
        },
        credentials.clone(),
        relays.clone(),
    )
    .await
    .unwrap();
    Fixture {
        server,
        relays,
        media,
        foreign_host,
        foreign_port,
        credentials,
    }
}

async fn fixture() -> Fixture {
    fixture_with(100, None).await
}

/// One message framing: datagrams, or a byte stream (TCP, TLS).
enum Wire {
    Udp(UdpSocket, SocketAddr),
    Stream(Box<dyn Stream>),
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A raw TURN client.
struct Client {
    wire: Wire,
    username: String,
    password: String,
    nonce: Option<String>,
}

impl Client {
    async fn udp(f: &Fixture) -> Client {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        Client::new(Wire::Udp(sock, f.server.udp_addresses[0]), f)
    }

    async fn tcp(f: &Fixture) -> Client {
        let s = tokio::net::TcpStream::connect(f.server.tcp_addresses[0])
            .await
            .unwrap();
        Client::new(Wire::Stream(Box::new(s)), f)
    }

    fn new(wire: Wire, f: &Fixture) -> Client {
        let (username, password) = f.credentials.mint(unix_now());
        Client {
            wire,
            username,
            password,
            nonce: None,
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        match &mut self.wire {
            Wire::Udp(s, to) => {
                s.send_to(bytes, *to).await.unwrap();
            }
            Wire::Stream(s) => s.write_all(bytes).await.unwrap(),
        }
    }

    /// The next message from the server, or `None` within `wait`.
    async fn recv_within(&mut self, wait: Duration) -> Option<Vec<u8>> {
        let read = async {
            match &mut self.wire {
                Wire::Udp(s, _) => {
                    let mut buf = vec![0u8; 4096];
                    let (n, _) = s.recv_from(&mut buf).await.ok()?;
                    buf.truncate(n);
                    Some(buf)
                }
                Wire::Stream(s) => {
                    let mut head = [0u8; 4];
                    s.read_exact(&mut head).await.ok()?;
                    let len = message::stream_frame_len(&head)?;
                    let mut buf = head.to_vec();
                    buf.resize(len, 0);
                    s.read_exact(&mut buf[4..]).await.ok()?;
                    Some(buf)
                }
            }
        };
        tokio::time::timeout(wait, read).await.ok().flatten()
    }

    async fn recv(&mut self) -> Vec<u8> {
        self.recv_within(WAIT)
            .await
            .expect("a message from the server")
    }

    fn key(&self) -> [u8; 16] {
        let text = format!("{}:{REALM}:{}", self.username, self.password);
        <md5::Md5 as md5::Digest>::digest(text.as_bytes()).into()
    }

    /// Sends a request signed with the client's credential (once it has a nonce) and
    /// returns (class, error code, response bytes).
    async fn request(&mut self, method: u16, build: impl Fn(Builder) -> Builder) -> Answer {
        let tx: [u8; 12] = rand::random();
        let mut b = build(Builder::new(method, Class::Request, tx));
        if let Some(nonce) = &self.nonce {
            b = b
                .attr(attr::USERNAME, self.username.as_bytes())
                .attr(attr::REALM, REALM.as_bytes())
                .attr(attr::NONCE, nonce.as_bytes())
                .integrity(&self.key());
        }
        let bytes = b.finish();
        self.send(&bytes).await;
        let reply = self.recv().await;
        Answer::of(reply, tx)
    }

    /// Gets a nonce (the 401 challenge), then allocates.
    async fn allocate(&mut self) -> Answer {
        let first = self.request(message::ALLOCATE, requested_udp).await;
        assert_eq!(first.code, Some(401), "an unsigned Allocate is challenged");
        self.nonce = Some(first.text(attr::NONCE).expect("a nonce"));
        assert_eq!(first.text(attr::REALM).as_deref(), Some(REALM));
        self.request(message::ALLOCATE, requested_udp).await
    }
}

fn requested_udp(b: Builder) -> Builder {
    b.u32(attr::REQUESTED_TRANSPORT, u32::from(UDP_PROTOCOL) << 24)
}

/// A parsed answer (owned).
struct Answer {
    bytes: Vec<u8>,
    class: Class,
    code: Option<u16>,
}

impl Answer {
    fn of(bytes: Vec<u8>, tx: [u8; 12]) -> Answer {
        let m = Message::parse(&bytes).expect("a STUN answer");
        assert_eq!(m.transaction, tx, "the answer is to this request");
        let class = m.class;
        let code = m
            .get(attr::ERROR_CODE)
            .map(|v| u16::from(v[2]) * 100 + u16::from(v[3]));
        Answer { bytes, class, code }
    }

    fn message(&self) -> Message<'_> {
        Message::parse(&self.bytes).unwrap()
    }

    fn text(&self, t: u16) -> Option<String> {
        self.message().text(t).map(str::to_owned)
    }

    fn address(&self, t: u16) -> SocketAddr {
        self.message().xor_addresses(t).unwrap()[0]
    }
}

fn peer(b: Builder, addr: SocketAddr) -> Builder {
    b.xor_address(attr::XOR_PEER_ADDRESS, addr)
}

fn send_indication(to: SocketAddr, data: &[u8]) -> Vec<u8> {
    Builder::new(message::SEND, Class::Indication, rand::random())
        .xor_address(attr::XOR_PEER_ADDRESS, to)
        .attr(attr::DATA, data)
        .finish()
}

async fn nothing_arrives(sock: &UdpSocket) -> bool {
    let mut buf = [0u8; 2048];
    tokio::time::timeout(Duration::from_millis(300), sock.recv_from(&mut buf))
        .await
        .is_err()
}

async fn received(sock: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buf = [0u8; 2048];
    let (n, from) = tokio::time::timeout(WAIT, sock.recv_from(&mut buf))
        .await
        .expect("a datagram in time")
        .unwrap();
    (buf[..n].to_vec(), from)
}

fn stat(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

#[tokio::test]
async fn allocations_need_a_valid_unexpired_credential() {
    let f = fixture().await;
    // No credential: a challenge, no allocation, not counted as a refusal.
    let mut c = Client::udp(&f).await;
    let a = c.request(message::ALLOCATE, requested_udp).await;
    assert_eq!((a.class, a.code), (Class::Error, Some(401)));
    assert_eq!(f.server.stats.allocations.load(Ordering::Relaxed), 0);
    c.nonce = a.text(attr::NONCE);

    // A wrong password.
    c.password = "not the password".into();
    let a = c.request(message::ALLOCATE, requested_udp).await;
    assert_eq!(a.code, Some(401), "wrong password refused");

    // An expired credential with its right password.
    let (user, pass) = f.credentials.mint(unix_now() - 601);
    (c.username, c.password) = (user, pass);
    let a = c.request(message::ALLOCATE, requested_udp).await;
    assert_eq!(a.code, Some(401), "expired credential refused");

    // Someone else's secret.
    let (user, pass) = Credentials::new("another secret entirely, 32 chars", 600).mint(unix_now());
    (c.username, c.password) = (user, pass);
    let a = c.request(message::ALLOCATE, requested_udp).await;
    assert_eq!(a.code, Some(401), "credential of another server refused");

    // A forged nonce.
    let (user, pass) = f.credentials.mint(unix_now());
    (c.username, c.password) = (user, pass);
    let good_nonce = c.nonce.replace("ffffffff-0011".into());
    let a = c.request(message::ALLOCATE, requested_udp).await;
    assert_eq!(
        a.code,
        Some(438),
        "a nonce the server did not make is stale"
    );
    c.nonce = good_nonce;

    assert_eq!(stat(&f.server.stats.refused_auth), 3);
    assert_eq!(f.server.stats.allocations.load(Ordering::Relaxed), 0);

    // The right one: a relay on the relay IP, registered for the SFU's operator view.
    let a = c.request(message::ALLOCATE, requested_udp).await;
    assert_eq!((a.class, a.code), (Class::Success, None));
    assert!(a.message().integrity_ok(&c.key()), "the answer is signed");
    let relay = a.address(attr::XOR_RELAYED_ADDRESS);
    assert_eq!(relay.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
    assert_eq!(f.relays.get(&relay), Some(RelayVia::Udp));
    assert_eq!(a.message().u32(attr::LIFETIME), Some(600));
    assert_eq!(f.server.stats.allocations.load(Ordering::Relaxed), 1);

    // A second Allocate (new transaction) on the same 5-tuple: 437.
    let a = c.request(message::ALLOCATE, requested_udp).await;
    assert_eq!(a.code, Some(437));
    // A Refresh with lifetime 0 ends it.
    let a = c
        .request(message::REFRESH, |b| b.u32(attr::LIFETIME, 0))
        .await;
    assert_eq!(a.class, Class::Success);
    assert_eq!(f.relays.get(&relay), None);
    assert_eq!(f.server.stats.allocations.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn other_requests_without_an_allocation_or_for_tcp_relays_are_refused() {
    let f = fixture().await;
    let mut c = Client::udp(&f).await;
    let media = f.media.local_addr().unwrap();
    let a = c
        .request(message::CREATE_PERMISSION, |b| peer(b, media))
        .await;
    assert_eq!(a.code, Some(437), "no allocation yet");
    let a = c.request(message::ALLOCATE, requested_udp).await;
    c.nonce = a.text(attr::NONCE);
    let a = c
        .request(message::ALLOCATE, |b| {
            b.u32(attr::REQUESTED_TRANSPORT, 6 << 24)
        })
        .await;
    assert_eq!(a.code, Some(442), "TCP relays (RFC 6062) are not offered");
    let a = c
        .request(message::ALLOCATE, |b| {
            requested_udp(b).attr(0x0042, b"what")
        })
        .await;
    assert_eq!(
        a.code,
        Some(420),
        "unknown comprehension-required attribute"
    );
    // A Binding request works without credentials (it is plain STUN).
    let tx: [u8; 12] = rand::random();
    c.send(&Builder::new(message::BINDING, Class::Request, tx).finish())
        .await;
    let a = Answer::of(c.recv().await, tx);
    assert_eq!(a.class, Class::Success);
}

#[tokio::test]
async fn the_relay_reaches_conclaves_media_address_and_nothing_else() {
    let f = fixture().await;
    let media = f.media.local_addr().unwrap();
    let foreign_host = f.foreign_host.local_addr().unwrap();
    let foreign_port = f.foreign_port.local_addr().unwrap();
    let mut c = Client::udp(&f).await;
    let relay = c.allocate().await.address(attr::XOR_RELAYED_ADDRESS);

    // Permissions and channels to anything but the media address: 403.
    let a = c
        .request(message::CREATE_PERMISSION, |b| peer(b, foreign_host))
        .await;
    assert_eq!(a.code, Some(403), "permission to another host");
    let a = c
        .request(message::CREATE_PERMISSION, |b| {
            peer(peer(b, media), foreign_host)
        })
        .await;
    assert_eq!(a.code, Some(403), "one foreign peer spoils the request");
    let a = c
        .request(message::CHANNEL_BIND, |b| {
            peer(b.u32(attr::CHANNEL_NUMBER, 0x4000 << 16), foreign_port)
        })
        .await;
    assert_eq!(
        a.code,
        Some(403),
        "a channel to another port of the media IP"
    );
    let a = c
        .request(message::CHANNEL_BIND, |b| {
            peer(b.u32(attr::CHANNEL_NUMBER, 0x4000 << 16), foreign_host)
        })
        .await;
    assert_eq!(a.code, Some(403), "a channel to another host");

    // Sends without a permission, or to a foreign address, are dropped.
    c.send(&send_indication(media, b"before permission")).await;
    assert!(nothing_arrives(&f.media).await, "no permission yet");
    let a = c
        .request(message::CREATE_PERMISSION, |b| peer(b, media))
        .await;
    assert_eq!(a.class, Class::Success);
    c.send(&send_indication(foreign_port, b"to a foreign port"))
        .await;
    c.send(&send_indication(foreign_host, b"to a foreign host"))
        .await;
    assert!(nothing_arrives(&f.foreign_port).await);
    assert!(nothing_arrives(&f.foreign_host).await);

    // To the media address: it arrives from the relay, and the answer comes back as a Data
    // indication.
    c.send(&send_indication(media, b"hello sfu")).await;
    let (data, from) = received(&f.media).await;
    assert_eq!((data.as_slice(), from), (&b"hello sfu"[..], relay));
    f.media.send_to(b"hello client", relay).await.unwrap();
    let m = c.recv().await;
    let m = Message::parse(&m).unwrap();
    assert_eq!((m.method, m.class), (message::DATA, Class::Indication));
    assert_eq!(m.get(attr::DATA), Some(&b"hello client"[..]));
    assert_eq!(m.xor_addresses(attr::XOR_PEER_ADDRESS), Some(vec![media]));

    // Whatever a foreign socket sends to the relay is dropped.
    f.foreign_port.send_to(b"spoof", relay).await.unwrap();
    f.foreign_host.send_to(b"spoof", relay).await.unwrap();
    assert!(c.recv_within(Duration::from_millis(300)).await.is_none());

    // A channel to the media address: ChannelData both ways.
    let a = c
        .request(message::CHANNEL_BIND, |b| {
            peer(b.u32(attr::CHANNEL_NUMBER, 0x4001 << 16), media)
        })
        .await;
    assert_eq!(a.class, Class::Success);
    c.send(&message::channel_data(0x4001, b"over the channel", false))
        .await;
    let (data, _) = received(&f.media).await;
    assert_eq!(data, b"over the channel");
    f.media.send_to(b"back", relay).await.unwrap();
    let back = c.recv().await;
    assert_eq!(
        message::parse_channel_data(&back),
        Some((0x4001, &b"back"[..]))
    );
    // ChannelData on a channel never bound goes nowhere.
    c.send(&message::channel_data(0x4002, b"unbound", false))
        .await;
    assert!(nothing_arrives(&f.media).await);

    assert!(stat(&f.server.stats.refused_peer) >= 8, "refusals counted");
    assert_eq!(stat(&f.server.stats.to_media), 2);
    assert_eq!(stat(&f.server.stats.to_clients), 2);
}

#[tokio::test]
async fn the_allocation_quotas_hold() {
    let f = fixture_with(1, None).await;
    let mut first = Client::udp(&f).await;
    assert_eq!(first.allocate().await.class, Class::Success);
    let mut second = Client::udp(&f).await;
    assert_eq!(second.allocate().await.code, Some(486));

    // One credential from many client addresses: at most MAX_ALLOCATIONS_PER_CREDENTIAL.
    let f = fixture().await;
    let mut clients = Vec::new();
    let mut credential = None;
    for _ in 0..=MAX_ALLOCATIONS_PER_CREDENTIAL {
        let mut c = Client::udp(&f).await;
        let (user, pass) =
            credential.get_or_insert_with(|| (c.username.clone(), c.password.clone()));
        (c.username, c.password) = (user.clone(), pass.clone());
        let a = c.allocate().await;
        clients.push((c, a.class, a.code));
    }
    let granted = clients
        .iter()
        .filter(|(_, class, _)| *class == Class::Success)
        .count();
    assert_eq!(granted, MAX_ALLOCATIONS_PER_CREDENTIAL);
    assert_eq!(clients.last().map(|(_, _, code)| *code), Some(Some(486)));
    // Another credential still gets one.
    let mut other = Client::udp(&f).await;
    assert_eq!(other.allocate().await.class, Class::Success);
}

#[tokio::test]
async fn turn_over_tcp_relays_and_ends_with_the_connection() {
    let f = fixture().await;
    let media = f.media.local_addr().unwrap();
    let mut c = Client::tcp(&f).await;
    let relay = c.allocate().await.address(attr::XOR_RELAYED_ADDRESS);
    assert_eq!(f.relays.get(&relay), Some(RelayVia::Tcp));
    let a = c
        .request(message::CHANNEL_BIND, |b| {
            peer(b.u32(attr::CHANNEL_NUMBER, 0x4000 << 16), media)
        })
        .await;
    assert_eq!(a.class, Class::Success);
    // Five bytes: padded to eight on the stream.
    c.send(&message::channel_data(0x4000, b"12345", true)).await;
    assert_eq!(received(&f.media).await.0, b"12345");
    f.media.send_to(b"abc", relay).await.unwrap();
    let back = c.recv().await;
    assert_eq!(back.len(), 8, "padded on a stream");
    assert_eq!(
        message::parse_channel_data(&back),
        Some((0x4000, &b"abc"[..]))
    );
    drop(c);
    for _ in 0..100 {
        if f.relays.get(&relay).is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        f.relays.get(&relay),
        None,
        "the connection's end ends the allocation"
    );
    assert_eq!(f.server.stats.allocations.load(Ordering::Relaxed), 0);
}

/// A self-signed certificate for 127.0.0.1 (openssl CLI, as the integration tests' CA).
fn self_signed(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let status = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=turn.test"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl (apt install openssl) makes the test certificate");
    assert!(status.success());
    (cert, key)
}

/// Accepts any server certificate (the test's own self-signed one).
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[tokio::test]
async fn turn_over_tls_relays_and_idle_or_garbage_connections_do_not_hurt() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let f = fixture_with(100, Some(tls_config(&cert, &key).unwrap())).await;
    let tls_addr = f.server.tls_addresses[0];
    let tcp_addr = f.server.tcp_addresses[0];
    let media = f.media.local_addr().unwrap();

    // 500 idle connections (250 on each stream port), a few hostile ones.
    crate::plumbing::raise_fd_limit();
    let mut idle = Vec::new();
    for i in 0..500 {
        let to = if i % 2 == 0 { tls_addr } else { tcp_addr };
        idle.push(tokio::net::TcpStream::connect(to).await.unwrap());
    }
    let mut garbage = tokio::net::TcpStream::connect(tcp_addr).await.unwrap();
    garbage.write_all(&[0xFF; 64]).await.unwrap();
    let mut oversized = tokio::net::TcpStream::connect(tcp_addr).await.unwrap();
    // A ChannelData header claiming 65535 bytes (more than MAX_FRAME).
    oversized
        .write_all(&[0x40, 0x00, 0xFF, 0xFF])
        .await
        .unwrap();
    let mut partial = tokio::net::TcpStream::connect(tcp_addr).await.unwrap();
    partial
        .write_all(&[0x00, 0x03, 0x00, 0x40, 0x21])
        .await
        .unwrap();
    let mut tls_garbage = tokio::net::TcpStream::connect(tls_addr).await.unwrap();
    tls_garbage
        .write_all(b"GET / HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    // Garbage on UDP.
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for junk in [&b""[..], &[0u8; 3], &[0xFF; 100], &[0x40, 0x00, 0x00, 0x09]] {
        udp.send_to(junk, f.server.udp_addresses[0]).await.unwrap();
    }
    // Closed by the server: garbage, oversized, TLS garbage.
    for (what, s) in [
        ("garbage", &mut garbage),
        ("oversized", &mut oversized),
        ("TLS garbage", &mut tls_garbage),
    ] {
        // Read to the end (TLS answers garbage with an alert first).
        let mut rest = Vec::new();
        let r = tokio::time::timeout(WAIT, s.read_to_end(&mut rest)).await;
        assert!(
            matches!(r, Ok(Ok(_)) | Ok(Err(_))),
            "{what}: closed by the server, got {r:?}"
        );
    }

    // A TLS client allocates and relays while all that is open.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(tls_addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let stream = connector.connect(name, tcp).await.unwrap();
    let mut c = Client::new(Wire::Stream(Box::new(stream)), &f);
    let relay = c.allocate().await.address(attr::XOR_RELAYED_ADDRESS);
    assert_eq!(f.relays.get(&relay), Some(RelayVia::Tls));
    let a = c
        .request(message::CREATE_PERMISSION, |b| peer(b, media))
        .await;
    assert_eq!(a.class, Class::Success);
    c.send(&send_indication(media, b"through tls")).await;
    assert_eq!(received(&f.media).await.0, b"through tls");
    let a = c
        .request(message::CREATE_PERMISSION, |b| {
            peer(b, f.foreign_host.local_addr().unwrap())
        })
        .await;
    assert_eq!(a.code, Some(403));

    assert!(f.server.stats.connections.load(Ordering::Relaxed) >= 500);
    assert!(
        stat(&f.server.stats.dropped_bad) >= 4 + 3,
        "UDP junk and bad streams counted"
    );
    drop(idle);
    drop(partial);
}

#[tokio::test]
async fn the_fuzzing_entry_reaches_an_allocation_and_leaves_nothing_behind() {
    // The prefix allocates: a ChannelData on its channel is TURN, garbage is not.
    assert!(fuzz_messages(&[&message::channel_data(0x4000, b"x", true)]));
    assert!(!fuzz_messages(&[&[0xFF; 8]]));
    // As the fuzz target runs it: each input's relay task ends, its socket closes.
    let fds = || std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
    let before = fds();
    for _ in 0..50 {
        fuzz_messages(&[&message::channel_data(0x4000, b"x", true)]);
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
    }
    assert!(fds() < before + 10, "{before} → {} descriptors", fds());
}
