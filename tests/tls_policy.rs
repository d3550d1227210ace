//! The consumer-facing listener's TLS policy, checked from outside: Debian's `sslscan` (its own
//! OpenSSL, its own hand-made ClientHellos) scans the real gateway on loopback, and a real
//! resumption-capable rustls client tries to resume. Policy: TLS 1.2 and 1.3 only; ECDHE key
//! exchange with AEAD suites only; no renegotiation; no session resumption (so every connection
//! is a full handshake whose client certificate is checked against the current CRLs). And
//! Debian's `openssl s_client` talks to the listener's own record layer in every suite.

mod common;

use std::io::Read as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use http::Response;
use rustls::{ClientConfig, HandshakeKind, SupportedProtocolVersion};
use rustls_pki_types::ServerName;
use ssp_gateway::tls::pki::KeyKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// A whole scan of a loopback port takes about 10 s; this only stops a hung scanner.
const SSLSCAN_DEADLINE: Duration = Duration::from_secs(180);

/// The TLS 1.3 suites, all AEAD (TLS 1.3 key exchange is always ephemeral).
const TLS13_AEAD: [&str; 3] = [
    "TLS_AES_128_GCM_SHA256",
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
];

/// What sslscan's XML report says, one element per line.
#[derive(Debug, Default)]
struct Scan {
    /// (type, version, enabled), e.g. ("tls", "1.0", false).
    protocols: Vec<(String, String, bool)>,
    /// (sslversion, cipher name, has an ECDHE curve, has finite-field DHE bits).
    ciphers: Vec<(String, String, bool, bool)>,
    /// `<renegotiation supported=.. secure=..>`.
    renegotiation: Option<(bool, bool)>,
    /// (sslversion, vulnerable).
    heartbleed: Vec<(String, bool)>,
}

fn attr<'l>(line: &'l str, name: &str) -> Option<&'l str> {
    let key = format!(" {name}=\"");
    let start = line.find(&key)? + key.len();
    let len = line[start..].find('"')?;
    Some(&line[start..start + len])
}

fn flag(line: &str, name: &str) -> bool {
    attr(line, name) == Some("1")
}

fn parse_scan(xml: &str) -> Scan {
    let mut scan = Scan::default();
    for line in xml.lines().map(str::trim) {
        let text = |name| attr(line, name).unwrap_or_default().to_string();
        if line.starts_with("<protocol ") {
            scan.protocols
                .push((text("type"), text("version"), flag(line, "enabled")));
        } else if line.starts_with("<cipher ") {
            scan.ciphers.push((
                text("sslversion"),
                text("cipher"),
                attr(line, "curve").is_some(),
                attr(line, "dhebits").is_some(),
            ));
        } else if line.starts_with("<renegotiation ") {
            scan.renegotiation = Some((flag(line, "supported"), flag(line, "secure")));
        } else if line.starts_with("<heartbleed ") {
            scan.heartbleed
                .push((text("sslversion"), flag(line, "vulnerable")));
        }
    }
    scan
}

/// Waits for `child` to exit, failing the test (and killing it) if it has not within `within`;
/// returns its exit status, standard output and standard error. (Its output is read once it
/// has exited: the tools run here write a few KB.)
fn finish(
    mut child: std::process::Child,
    within: Duration,
    what: &str,
) -> (std::process::ExitStatus, String, String) {
    let deadline = Instant::now() + within;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{what} did not finish within {within:?}");
            }
            Err(e) => panic!("waiting for {what}: {e}"),
        }
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    if let Some(mut out) = child.stdout.take() {
        let _ = out.read_to_string(&mut stdout);
    }
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_string(&mut stderr);
    }
    (status, stdout, stderr)
}

/// Runs sslscan against `addr`, presenting the consumer's certificate (without one the
/// listener ends every TLS 1.2 handshake before sslscan can see the suites), and parses the
/// XML report. Fails loudly when sslscan is missing, fails or hangs.
fn sslscan(addr: SocketAddr, cert: &Path, key: &Path) -> Scan {
    match Command::new("sslscan").arg("--version").output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!("sslscan --version failed: {out:?}"),
        Err(e) => panic!(
            "sslscan is not installed ({e}): this test needs the Debian package sslscan \
             (scripts/test.sh installs it)"
        ),
    }
    let xml_path = scratch_dir("sslscan").join("scan.xml");
    let child = Command::new("sslscan")
        .arg("--no-colour")
        .arg(format!("--xml={}", xml_path.display()))
        .arg(format!("--certs={}", cert.display()))
        .arg(format!("--pk={}", key.display()))
        .arg(addr.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start sslscan: {e}"));
    let (status, stdout, stderr) = finish(child, SSLSCAN_DEADLINE, "sslscan");
    assert!(
        status.success(),
        "sslscan failed ({status}):\n{stdout}\n{stderr}"
    );
    let xml = std::fs::read_to_string(&xml_path)
        .unwrap_or_else(|e| panic!("sslscan wrote no report ({e}):\n{stdout}\n{stderr}"));
    let scan = parse_scan(&xml);
    assert!(
        !scan.protocols.is_empty() && !scan.ciphers.is_empty(),
        "sslscan reported nothing it could check:\n{xml}\n{stdout}"
    );
    scan
}

/// The policy, asserted on one scan; `auth` is the server key's suite family (ECDSA or RSA).
fn assert_policy(scan: &Scan, auth: &str) {
    let report = format!("{scan:#?}");
    for (kind, version, expected) in [
        ("ssl", "2", false),
        ("ssl", "3", false),
        ("tls", "1.0", false),
        ("tls", "1.1", false),
        ("tls", "1.2", true),
        ("tls", "1.3", true),
    ] {
        let found = scan
            .protocols
            .iter()
            .find(|(k, v, _)| k == kind && v == version)
            .unwrap_or_else(|| panic!("sslscan did not report {kind} {version}: {report}"));
        assert_eq!(found.2, expected, "{kind} {version} enabled: {report}");
    }

    for version in ["TLSv1.2", "TLSv1.3"] {
        assert!(
            scan.ciphers.iter().any(|(v, ..)| v == version),
            "no {version} suite seen: {report}"
        );
    }
    for (version, cipher, ecdhe, ffdhe) in &scan.ciphers {
        match version.as_str() {
            "TLSv1.3" => assert!(TLS13_AEAD.contains(&cipher.as_str()), "{cipher}: {report}"),
            "TLSv1.2" => {
                let aead = cipher.contains("-GCM-") || cipher.ends_with("-CHACHA20-POLY1305");
                assert!(
                    cipher.starts_with(&format!("ECDHE-{auth}-")) && aead,
                    "TLS 1.2 suite {cipher} is not ECDHE-{auth} with an AEAD: {report}"
                );
                assert!(*ecdhe && !ffdhe, "{cipher} key exchange: {report}");
            }
            other => panic!("suite {cipher} accepted over {other}: {report}"),
        }
    }

    assert_eq!(
        scan.renegotiation,
        Some((false, false)),
        "renegotiation: {report}"
    );
    assert!(!scan.heartbleed.is_empty(), "no heartbleed check: {report}");
    assert!(
        scan.heartbleed.iter().all(|(_, vulnerable)| !vulnerable),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslscan_sees_tls12_and_13_with_ecdhe_aead_only_ecdsa_certificate() {
    let h = start_with_mock(World::ecdsa(), GatewayOptions::default()).await;
    let (addr, cert, key) = (
        h.gateway,
        h.world.consumer.cert.clone(),
        h.world.consumer.key.clone(),
    );
    let scan = tokio::task::spawn_blocking(move || sslscan(addr, &cert, &key))
        .await
        .expect("sslscan task");
    assert_policy(&scan, "ECDSA");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslscan_sees_tls12_and_13_with_ecdhe_aead_only_rsa_certificate() {
    let world = World::new(KeyKind::Rsa2048, KeyKind::EcdsaP256);
    let h = start_with_mock(world, GatewayOptions::default()).await;
    let (addr, cert, key) = (
        h.gateway,
        h.world.consumer.cert.clone(),
        h.world.consumer.key.clone(),
    );
    let scan = tokio::task::spawn_blocking(move || sslscan(addr, &cert, &key))
        .await
        .expect("sslscan task");
    assert_policy(&scan, "RSA");
    h.stop().await;
}

/// OpenSSL's `s_client` through one handshake and one HTTP/1.1 request; in TLS 1.3 it sends a
/// KeyUpdate asking for ours first (its `K` command). Returns stdout and stderr.
fn s_client(
    addr: SocketAddr,
    files: &[std::path::PathBuf; 3],
    version: &str,
    suite: &str,
) -> String {
    let [cert, key, ca] = files;
    use std::io::Write as _;
    let (flag, key_update) = if version == "-tls1_3" {
        ("-ciphersuites", true)
    } else {
        ("-cipher", false)
    };
    let mut child = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &addr.to_string(),
            "-crlf",
            version,
            flag,
            suite,
        ])
        .arg("-cert")
        .arg(cert)
        .arg("-key")
        .arg(key)
        .arg("-CAfile")
        .arg(ca)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start openssl ({e}): this test needs the Debian package openssl")
        });
    let mut stdin = child.stdin.take().expect("stdin");
    // s_client reads commands (K) and request lines from standard input; it is given time to
    // finish the handshake and the key update before the request.
    std::thread::sleep(Duration::from_millis(500));
    if key_update {
        stdin.write_all(b"K\n").expect("K");
        std::thread::sleep(Duration::from_millis(300));
    }
    stdin
        .write_all(b"GET /metadata HTTP/1.1\nHost: gateway\nConnection: close\n\n")
        .expect("request");
    // Standard input stays open until s_client has exited (its end would end the session).
    let what = format!("openssl s_client {version} {suite}");
    let (_, stdout, stderr) = finish(child, Duration::from_secs(20), &what);
    drop(stdin);
    stdout + &stderr
}

/// After the handshake the listener seals and opens records itself (`src/tls/records.rs`):
/// Debian's OpenSSL, a TLS stack that shares no code with it or rustls, talks to it in every
/// suite it offers, through a key update in TLS 1.3, and gets the gateway's HTTP answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_talks_to_the_listener_in_every_suite_and_through_a_key_update() {
    let h = start_with_mock(World::ecdsa(), GatewayOptions::default()).await;
    let cases = [
        ("-tls1_3", "TLS_AES_128_GCM_SHA256"),
        ("-tls1_3", "TLS_AES_256_GCM_SHA384"),
        ("-tls1_3", "TLS_CHACHA20_POLY1305_SHA256"),
        ("-tls1_2", "ECDHE-ECDSA-AES128-GCM-SHA256"),
        ("-tls1_2", "ECDHE-ECDSA-AES256-GCM-SHA384"),
        ("-tls1_2", "ECDHE-ECDSA-CHACHA20-POLY1305"),
    ];
    for (version, suite) in cases {
        let addr = h.gateway;
        let files = [
            h.world.consumer.cert.clone(),
            h.world.consumer.key.clone(),
            h.world.ca.clone(),
        ];
        let out = tokio::task::spawn_blocking(move || s_client(addr, &files, version, suite))
            .await
            .expect("openssl task");
        assert!(
            out.contains(&format!("Cipher is {suite}")),
            "{version} {suite}: not negotiated:\n{out}"
        );
        assert!(
            out.contains("HTTP/1.1 4") && out.contains("strict-transport-security"),
            "{version} {suite}: no HTTP answer came back through the records:\n{out}"
        );
        if version == "-tls1_3" {
            assert!(
                out.contains("KEYUPDATE"),
                "{suite}: no key update sent:\n{out}"
            );
        }
    }
    h.stop().await;
}

/// A consumer's client config pinned to one TLS version, with rustls's default client-side
/// resumption (in-memory cache; TLS 1.2 session ids and tickets, TLS 1.3 tickets).
fn resuming_client(world: &World, version: &'static SupportedProtocolVersion) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = ssp_gateway::tls::load_ca_bundle(&world.ca).expect("CA bundle");
    let certs = ssp_gateway::tls::load_certs(&world.consumer.cert).expect("consumer cert");
    let key = ssp_gateway::tls::load_private_key(&world.consumer.key).expect("consumer key");
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[version])
        .expect("protocol version")
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .expect("client certificate");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// One connection: handshake, one HTTP/1.1 request read to the end (so any session ticket the
/// server sends is received and stored), then the handshake kind and the status line.
async fn one_connection(client: &Arc<ClientConfig>, addr: SocketAddr) -> (HandshakeKind, String) {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let connector = tokio_rustls::TlsConnector::from(client.clone());
    let name = ServerName::try_from("localhost").expect("server name");
    let mut tls = connector.connect(name, tcp).await.expect("handshake");
    tls.write_all(
        b"GET /https://localhost/x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("write request");
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), async {
        let mut buf = [0u8; 4096];
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the server did not close the connection");
    let kind = tls
        .get_ref()
        .1
        .handshake_kind()
        .expect("the handshake completed");
    let status = String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    (kind, status)
}

/// A plain rustls server with the gateway's certificate, the listener's config except that
/// session resumption is switched on: the control that shows the client does resume.
async fn resumable_control(world: &World, shutdown: CancellationToken) -> SocketAddr {
    let mut listener_tls =
        ssp_gateway::tls::listener_tls(&world.server_tls(&world.gateway), &[b"http/1.1"])
            .expect("server TLS");
    let mut resumable = (*listener_tls.config).clone();
    resumable.session_storage = rustls::server::ServerSessionMemoryCache::new(64);
    resumable.send_tls13_tickets = 2;
    listener_tls.config = Arc::new(resumable);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let opts = ssp_gateway::server::ServeOptions {
        name: "resumable-control",
        handshake_timeout: Duration::from_secs(5),
        header_read_timeout: Duration::from_secs(5),
        http2: false,
        grace_period: Duration::from_secs(1),
        limits: Default::default(),
    };
    tokio::spawn(ssp_gateway::server::serve_tls(
        listener,
        ssp_gateway::reload::Reloadable::new("resumable control", Arc::new(listener_tls), vec![]),
        opts,
        shutdown,
        |_conn, _req| async {
            Response::new(http_body_util::Full::new(bytes::Bytes::from_static(b"ok")))
        },
    ));
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_never_resumes_a_session() {
    let h = start_with_mock(World::ecdsa(), GatewayOptions::default()).await;
    let control_stop = CancellationToken::new();
    let control = resumable_control(&h.world, control_stop.clone()).await;

    for (version, label) in [
        (&rustls::version::TLS13, "TLS 1.3"),
        (&rustls::version::TLS12, "TLS 1.2"),
    ] {
        // The control: the same client does resume against a server that allows it.
        let client = resuming_client(&h.world, version);
        let (first, status) = one_connection(&client, control).await;
        assert_eq!(first, HandshakeKind::Full, "{label} control, first");
        assert!(status.starts_with("HTTP/1.1 200"), "{label}: {status}");
        let (second, _) = one_connection(&client, control).await;
        assert_eq!(second, HandshakeKind::Resumed, "{label} control, second");

        // The gateway: a fresh client (empty cache), two connections, both full handshakes.
        let client = resuming_client(&h.world, version);
        for attempt in ["first", "second", "third"] {
            let (kind, status) = one_connection(&client, h.gateway).await;
            assert_eq!(kind, HandshakeKind::Full, "{label} gateway, {attempt}");
            assert!(status.starts_with("HTTP/1.1 400"), "{label}: {status}");
        }
    }
    control_stop.cancel();
    h.stop().await;
}

/// What `openssl ca -gencrl` makes without a `crlnumber` file: a CRL with no CRL Number, which
/// webpki refuses with only "ParseError". It is refused when loaded, saying what is missing.
#[test]
fn a_crl_without_a_crl_number_is_refused_saying_so() {
    let dir = std::env::temp_dir().join(format!("ssp-crlnumber-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("openssl (installed by scripts/test.sh)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "ca-key.pem",
        "-out",
        "ca.pem",
        "-days",
        "30",
        "-subj",
        "/CN=CRL Number CA",
    ]);
    std::fs::write(dir.join("index.txt"), "").expect("index");
    std::fs::write(
        dir.join("ca.cnf"),
        "[ca]\ndefault_ca = d\n[d]\ndatabase = index.txt\ncertificate = ca.pem\n\
         private_key = ca-key.pem\ndefault_md = sha256\ndefault_crl_days = 30\n",
    )
    .expect("cnf");
    run(&["ca", "-gencrl", "-config", "ca.cnf", "-out", "crl.pem"]);
    let err = ssp_gateway::tls::load_crls(&[dir.join("crl.pem")]).expect_err("no CRL number");
    assert!(err.to_string().contains("no CRL Number"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
