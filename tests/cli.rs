//! The `ssp-gateway` binary itself, as a new user runs it: `dev-certs`, `check-config`, and
//! `run` on the shipped development configuration (ports moved to free ones), driven with real
//! mTLS clients and stopped with SIGTERM.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use http::{Method, StatusCode};
use ssp_gateway::tls::ClientTls;

const BIN: &str = env!("CARGO_BIN_EXE_ssp-gateway");

/// A copy of the shipped `config/` under a scratch root, with `certs-dev/` beside it.
fn copy_config(ports: Option<(u16, u16, u16)>) -> (PathBuf, PathBuf) {
    let root = scratch_dir("cli");
    let config = shipped_config(&root, ports);
    (root, config)
}

/// `ssp-gateway dev-certs --out DIR`, run.
fn dev_certs_into(dir: &Path) -> std::process::Output {
    Command::new(BIN)
        .args(["dev-certs", "--out"])
        .arg(dir)
        .output()
        .expect("dev-certs")
}

/// The development PKI made in `root/certs-dev`, where the shipped config copied under `root`
/// looks for it.
fn dev_certs_beside(root: &Path) -> PathBuf {
    let certs = root.join("certs-dev");
    assert!(dev_certs_into(&certs).status.success());
    certs
}

#[test]
fn dev_certs_writes_the_development_pki_once() {
    let out = scratch_dir("devcerts").join("certs");
    let run = |force: bool| {
        let mut cmd = Command::new(BIN);
        cmd.arg("dev-certs").arg("--out").arg(&out);
        if force {
            cmd.arg("--force");
        }
        cmd.output().expect("run dev-certs")
    };
    let first = run(false);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    for name in [
        "ca.pem",
        "gateway.pem",
        "gateway-key.pem",
        "gateway-client.pem",
        "gateway-client-key.pem",
        "consumer.pem",
        "consumer-key.pem",
        "readonly.pem",
        "readonly-key.pem",
        "rogue.pem",
        "rogue-key.pem",
        "provider.pem",
        "provider-key.pem",
    ] {
        assert!(out.join(name).is_file(), "{name} missing");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(out.join("consumer-key.pem"))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "private keys are 0600");
    }
    let before = std::fs::read(out.join("ca.pem")).expect("read");
    let second = run(false);
    assert!(second.status.success());
    assert_eq!(
        std::fs::read(out.join("ca.pem")).expect("read"),
        before,
        "kept without --force"
    );
    let third = run(true);
    assert!(third.status.success());
    assert_ne!(
        std::fs::read(out.join("ca.pem")).expect("read"),
        before,
        "replaced with --force"
    );
}

/// A partial development PKI is a problem for `check-config` as it is for `run` (before,
/// check-config said the set was missing and would be made, and passed), and the error names
/// the directory once and the command that regenerates that directory.
#[test]
fn a_partial_development_pki_is_a_problem_for_check_config_and_dev_certs() {
    let (root, config) = copy_config(None);
    let certs = dev_certs_beside(&root);
    std::fs::remove_file(certs.join("consumer.pem")).expect("remove");
    let check = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .expect("check-config");
    let err = String::from_utf8_lossy(&check.stderr);
    assert_eq!(check.status.code(), Some(1), "{err}");
    assert!(
        err.contains("dev.certs_dir: ") && err.contains("missing consumer.pem"),
        "{err}"
    );
    let again = dev_certs_into(&certs);
    let err = String::from_utf8_lossy(&again.stderr);
    assert_eq!(again.status.code(), Some(1), "{err}");
    let dir = certs.display().to_string();
    assert_eq!(err.matches(&format!("{dir}:")).count(), 1, "{err}");
    assert!(
        err.contains(&format!("ssp-gateway dev-certs --out {dir} --force")),
        "{err}"
    );
}

#[test]
fn check_config_passes_the_shipped_config_and_lists_every_problem() {
    let (root, config) = copy_config(None);
    let certs = root.join("certs-dev");

    // Before the development certificates exist (`run` makes them), everything else is still
    // checked: a missing LDIF and an audit "directory" that is a file.
    let early = root.join("config/early.toml");
    let text = std::fs::read_to_string(&config)
        .expect("read")
        .replace(
            "ldif_file = \"directory.ldif\"",
            "ldif_file = \"missing.ldif\"",
        )
        .replace("dir = \"../audit-dev\"", "dir = \"../audit-file/sub\"");
    std::fs::write(&early, text).expect("write");
    std::fs::write(root.join("audit-file"), "not a directory").expect("write");
    let bad = Command::new(BIN)
        .arg("check-config")
        .arg("--config")
        .arg(&early)
        .output()
        .expect("run");
    let report = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success(), "{report}");
    assert!(
        String::from_utf8_lossy(&bad.stdout).contains("certificates are not checked"),
        "{}",
        String::from_utf8_lossy(&bad.stdout)
    );
    let missing_ldif = format!(
        "directory.ldif_file: {}: ",
        root.join("config/missing.ldif").display()
    );
    for expected in [missing_ldif.as_str(), "audit.dir"] {
        assert!(report.contains(expected), "{expected} not in:\n{report}");
    }

    assert!(dev_certs_into(&certs).status.success());
    let ok = Command::new(BIN)
        .arg("check-config")
        .arg("--config")
        .arg(&config)
        .output()
        .expect("run");
    assert!(
        ok.status.success(),
        "{}{}",
        String::from_utf8_lossy(&ok.stdout),
        String::from_utf8_lossy(&ok.stderr)
    );

    let broken = root.join("config/broken.toml");
    let text = std::fs::read_to_string(&config)
        .expect("read")
        .replace(
            "connect_timeout = \"5s\"",
            "connect_timeout = \"soon\"\nretries = 3",
        )
        .replace("jwt = \"enforce\"", "jwt = \"sometimes\"")
        .replace(
            "cors_allowed_origins = []\n",
            "cors_allowed_origins = [\"https://consumer.example\", \"https://app.example/\", \
             \"https://app.example/path\", \"null\"]\n",
        )
        .replace(
            "ldif_file = \"directory.ldif\"",
            "ldif_file = \"missing.ldif\"",
        );
    std::fs::write(&broken, text).expect("write");
    let bad = Command::new(BIN)
        .arg("check-config")
        .arg("--config")
        .arg(&broken)
        .output()
        .expect("run");
    assert!(!bad.status.success());
    let report = String::from_utf8_lossy(&bad.stderr);
    for expected in [
        "upstream.connect_timeout",
        "upstream.retries: unknown key",
        "policy.jwt",
        "policy.cors_allowed_origins[1]: `https://app.example/` ends with `/`",
        "policy.cors_allowed_origins[2]: `https://app.example/path` has a path",
        "policy.cors_allowed_origins[3]: `null`",
    ] {
        assert!(report.contains(expected), "{expected} not in:\n{report}");
    }

    // A config that parses but points at a directory file that does not exist.
    let missing = root.join("config/missing.toml");
    let text = std::fs::read_to_string(&config).expect("read").replace(
        "ldif_file = \"directory.ldif\"",
        "ldif_file = \"missing.ldif\"",
    );
    std::fs::write(&missing, text).expect("write");
    let bad = Command::new(BIN)
        .arg("check-config")
        .arg("--config")
        .arg(&missing)
        .output()
        .expect("run");
    assert!(!bad.status.success());
    let report = String::from_utf8_lossy(&bad.stderr);
    assert!(report.contains(&missing_ldif), "{report}");
}

/// Every bad file a configuration points at is reported at once, each problem naming its
/// exact key and its file: two bad CRLs in one list and a bad key file. `check-config` lists
/// them all and fails; `run` refuses to start with the same lines.
#[test]
fn check_config_and_run_name_the_key_and_file_of_every_bad_file() {
    let (gw, admin, mock) = (free_port(), free_port(), free_port());
    let (root, config) = copy_config(Some((gw, admin, mock)));
    dev_certs_beside(&root);
    let bad = root.join("bad");
    std::fs::create_dir_all(&bad).expect("mkdir");
    let not_a_crl = bad.join("not-a-crl.pem");
    std::fs::write(&not_a_crl, "this is not a CRL\n").expect("write");
    // A certificate where a CRL belongs.
    let a_certificate = bad.join("certificate.pem");
    std::fs::copy(root.join("certs-dev/ca.pem"), &a_certificate).expect("copy");
    let not_a_key = bad.join("not-a-key.pem");
    std::fs::write(&not_a_key, "this is not a key\n").expect("write");
    let text = std::fs::read_to_string(&config).expect("read");
    // The listener's `crls` is the first in the file.
    let text = text
        .replacen(
            "crls = [\"../certs-dev/ca.crl.pem\"]",
            &format!(
                "crls = [\"{}\", \"{}\"]",
                not_a_crl.display(),
                a_certificate.display()
            ),
            1,
        )
        .replace(
            "key = \"../certs-dev/gateway-key.pem\"",
            &format!("key = \"{}\"", not_a_key.display()),
        );
    let broken = root.join("config/bad-files.toml");
    std::fs::write(&broken, text).expect("write");
    let expected = [
        format!(
            "listener.key: {}: no private key found",
            not_a_key.display()
        ),
        format!(
            "listener.crls[0]: {}: bad CRL: not a valid X.509 CRL",
            not_a_crl.display()
        ),
        format!(
            "listener.crls[1]: {}: bad CRL: no PEM CRL found",
            a_certificate.display()
        ),
    ];

    let checked = Command::new(BIN)
        .arg("check-config")
        .arg("--config")
        .arg(&broken)
        .output()
        .expect("run check-config");
    let report = String::from_utf8_lossy(&checked.stderr);
    assert_eq!(checked.status.code(), Some(1), "{report}");
    assert!(
        report.starts_with(&format!("{}: 3 problems\n", broken.display())),
        "{report}"
    );
    let lines: Vec<&str> = report.lines().skip(1).collect();
    assert_eq!(lines.len(), 3, "{report}");
    for (line, expected) in lines.iter().zip(&expected) {
        assert!(
            line.starts_with(&format!("  - {expected}")),
            "{expected:?} not in:\n{report}"
        );
    }

    let ran = Command::new(BIN)
        .arg("run")
        .arg("--config")
        .arg(&broken)
        .env("RUST_LOG", "off")
        .stdout(Stdio::null())
        .output()
        .expect("run");
    let said = String::from_utf8_lossy(&ran.stderr);
    assert_eq!(ran.status.code(), Some(1), "{said}");
    assert!(
        said.starts_with("error: cannot load what the configuration points at:\n"),
        "{said}"
    );
    for expected in &expected {
        assert!(
            said.contains(&format!("\n  - {expected}")),
            "{expected:?} not in:\n{said}"
        );
    }
}

/// A hot reload (SIGHUP) of the listener's files refuses bad ones as start-up does, and its
/// log line names every bad file with its key; the previous certificate stays in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_reload_names_the_key_and_file_of_every_bad_file() {
    let (gw, admin, mock) = (free_port(), free_port(), free_port());
    let (root, config) = copy_config(Some((gw, admin, mock)));
    let text = std::fs::read_to_string(&config)
        .expect("read")
        .replace("format = \"pretty\"", "format = \"json\"")
        // SIGHUP only: no poll may catch the files half written.
        .replace("watch_files = true", "watch_files = false");
    std::fs::write(&config, text).expect("write");
    let log_path = root.join("gateway.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let child = Command::new(BIN)
        .arg("run")
        .arg("--config")
        .arg(&config)
        .stdout(log)
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ssp-gateway run");
    let child = Child(child);
    wait_ready(admin).await;

    let certs = root.join("certs-dev");
    // As the configuration names them (relative to its directory).
    let (cert, key) = (
        root.join("config/../certs-dev/gateway.pem"),
        root.join("config/../certs-dev/gateway-key.pem"),
    );
    std::fs::write(&cert, "not a certificate\n").expect("write");
    std::fs::write(&key, "not a key\n").expect("write");
    let hup = Command::new("kill")
        .args(["-HUP", &child.0.id().to_string()])
        .status()
        .expect("kill");
    assert!(hup.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let error = loop {
        let logged = std::fs::read_to_string(&log_path).unwrap_or_default();
        let refused = logged
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|l| {
                l["message"] == "reload refused; the previous version stays in force"
                    && l["component"] == "listener TLS"
            });
        if let Some(line) = refused {
            break line["error"].as_str().expect("error field").to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no refused reload logged:\n{logged}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        error.starts_with(&format!(
            "listener.cert: {}: no PEM certificate found",
            cert.display()
        )),
        "{error}"
    );
    assert!(
        error.contains(&format!(
            "; listener.key: {}: no private key found",
            key.display()
        )),
        "{error}"
    );
    // Still ready, serving the certificate loaded at start.
    wait_ready(admin).await;
    let a = metadata_via(&certs, gw, mock).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
}

/// GET metadata from the embedded mock provider (port `mock`) through the gateway (`gw`), as
/// the development consumer over HTTP/1.1.
async fn metadata_via(certs: &Path, gw: u16, mock: u16) -> Answer {
    let endpoint = format!("https://localhost:{mock}/B82617/STU3/1/gpconnect");
    client_for(certs, "consumer", gw, &[b"http/1.1"])
        .gpc(Gpc::new(
            Method::GET,
            format!("{endpoint}/metadata"),
            IX_METADATA,
        ))
        .await
}

/// A configuration that loads but would not serve well passes `check-config` with a warning
/// for each thing: an own certificate running out within 30 days, an LDIF with no accredited
/// system or no message handler, a remote directory that does not answer.
#[test]
fn check_config_warns_of_what_would_not_serve_well() {
    let (root, config) = copy_config(None);
    let certs = dev_certs_beside(&root);
    let check = |config: &std::path::Path| {
        let out = Command::new(BIN)
            .arg("check-config")
            .arg("--config")
            .arg(config)
            .output()
            .expect("run");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{stdout}{stderr}");
        stdout
    };
    let clean = check(&config);
    assert!(!clean.contains("warning"), "{clean}");

    // The gateway's server certificate, renewed for ten days only.
    let ca_key = std::fs::read_to_string(certs.join("ca-key.pem")).expect("CA key");
    let ca_cert = std::fs::read_to_string(certs.join("ca.pem")).expect("CA cert");
    let short = root.join("short");
    std::fs::create_dir_all(&short).expect("mkdir");
    std::fs::write(short.join("ca.pem"), &ca_cert).expect("write");
    std::fs::write(short.join("ca-key.pem"), &ca_key).expect("write");
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&short)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    openssl(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "gateway-key.pem",
        "-out",
        "gateway.csr",
        "-subj",
        "/CN=localhost",
    ]);
    std::fs::write(
        short.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n\
         keyUsage=critical,digitalSignature\nbasicConstraints=critical,CA:FALSE\n",
    )
    .expect("write");
    // Ten days from now.
    openssl(&[
        "x509",
        "-req",
        "-in",
        "gateway.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca-key.pem",
        "-CAcreateserial",
        "-out",
        "gateway.pem",
        "-extfile",
        "ext.cnf",
        "-days",
        "11",
    ]);
    let text = std::fs::read_to_string(&config).expect("read");
    let soon = root.join("config/soon.toml");
    std::fs::write(
        &soon,
        text.replace(
            "cert = \"../certs-dev/gateway.pem\"\nkey = \"../certs-dev/gateway-key.pem\"",
            "cert = \"../short/gateway.pem\"\nkey = \"../short/gateway-key.pem\"",
        ),
    )
    .expect("write");
    let said = check(&soon);
    assert!(said.contains("warning: listener.cert: "), "{said}");
    let days: u32 = said
        .split("runs out in ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("the days left");
    // `openssl x509 -days 10` has made it run out after 10 or 11 days.
    assert!((9..=11).contains(&days), "{said}");

    // An LDIF with no accredited system.
    let ldif = std::fs::read_to_string(root.join("config/directory.ldif")).expect("LDIF");
    let without: Vec<&str> = ldif
        .split("\n\n")
        .filter(|entry| !entry.contains("objectClass: nhsAs\n"))
        .collect();
    std::fs::write(root.join("config/empty.ldif"), without.join("\n\n")).expect("write");
    // `text` with `from` replaced by `to`, written as config/NAME.toml.
    let variant = |name: &str, from: &str, to: &str| {
        assert!(text.contains(from), "{from}");
        let path = root.join(format!("config/{name}.toml"));
        std::fs::write(&path, text.replace(from, to)).expect("write");
        path
    };
    let empty = variant(
        "empty",
        "ldif_file = \"directory.ldif\"",
        "ldif_file = \"empty.ldif\"",
    );
    let said = check(&empty);
    assert!(
        said.contains("holds no accredited system (nhsAs): every request would be refused"),
        "{said}"
    );
    assert!(!said.contains("message handler"), "{said}");

    // A remote directory that does not answer (nothing listens on the port).
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let down = root.join("config/down.toml");
    let remote: String = text
        .lines()
        .filter(|l| !l.starts_with("ldif_file") && !l.starts_with("ldif_poll_interval"))
        .map(|l| match l {
            "backend = \"ldif\"" => {
                format!("backend = \"ldap\"\nldap_url = \"ldap://127.0.0.1:{port}\"")
            }
            l => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&down, remote).expect("write");
    let said = check(&down);
    assert!(
        said.contains("warning: directory: the ldap backend does not answer now"),
        "{said}"
    );

    // Any web origin allowed (CORS).
    let any = variant(
        "any",
        "cors_allowed_origins = []\n",
        "cors_allowed_origins = [\"*\"]\n",
    );
    let said = check(&any);
    assert!(
        said.contains("warning: policy.cors_allowed_origins: \"*\" lets any web page"),
        "{said}"
    );
    assert_eq!(said.matches("warning").count(), 1, "{said}");
    // More connections allowed than the process may open files (no machine allows 10 million
    // by default): accepting would fail before the limit refuses.
    let fds = variant(
        "fds",
        "max_connections = 10000\n",
        "max_connections = 10000000\n",
    );
    let said = check(&fds);
    assert!(said.contains("warning: the open-files limit is "), "{said}");
    assert!(
        said.contains("listener.max_connections (10000000)"),
        "{said}"
    );
}

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_ready(admin: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", admin)).await {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = s
                .write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .await;
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf).await;
            if buf.starts_with(b"HTTP/1.1 200") {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the gateway did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn client_for(certs: &Path, name: &str, port: u16, alpn: &[&[u8]]) -> Client {
    let tls = ssp_gateway::tls::client_config(
        &ClientTls {
            cert: certs.join(format!("{name}.pem")),
            key: certs.join(format!("{name}-key.pem")),
            ca: certs.join("ca.pem"),
            crls: Vec::new(),
        },
        alpn,
    )
    .expect("client TLS");
    Client {
        tls,
        addr: ([127, 0, 0, 1], port).into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_the_development_world_and_stops_on_sigterm() {
    let (gw, admin, mock) = (free_port(), free_port(), free_port());
    let (root, config) = copy_config(Some((gw, admin, mock)));
    let child = Command::new(BIN)
        .arg("run")
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ssp-gateway run");
    let mut child = Child(child);
    wait_ready(admin).await;

    // It made the development certificates on first start.
    let certs = root.join("certs-dev");
    assert!(certs.join("consumer.pem").is_file());

    // A consumer reaches the embedded mock provider through the gateway.
    let endpoint = format!("https://localhost:{mock}/B82617/STU3/1/gpconnect");
    let a = metadata_via(&certs, gw, mock).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(a.json()["version"], "1.2.7");
    let a = client_for(&certs, "consumer", gw, &[b"h2", b"http/1.1"])
        .gpc(Gpc::new(
            Method::GET,
            format!("{endpoint}/Patient?identifier=https%3A%2F%2Ffhir.nhs.uk%2FId%2Fnhs-number%7C9000000017"),
            IX_SEARCH_PATIENT,
        ))
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(a.json()["resourceType"], "Bundle");
    assert_eq!(
        a.version,
        http::Version::HTTP_2,
        "ALPN h2 was offered first"
    );

    // The rogue certificate is refused by the gateway; the mock refuses anyone but the gateway.
    let rogue = client_for(&certs, "rogue", gw, &[b"h2", b"http/1.1"]);
    let a = rogue
        .gpc(Gpc::new(
            Method::GET,
            format!("{endpoint}/metadata"),
            IX_METADATA,
        ))
        .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    // The revoked certificate fails the handshake: the shipped config checks the CA's CRL.
    let revoked = client_for(&certs, "revoked", gw, &[b"http/1.1"])
        .send(Gpc::new(Method::GET, format!("{endpoint}/metadata"), IX_METADATA).build())
        .await;
    assert!(
        revoked.is_err(),
        "the revoked certificate was answered: {:?}",
        revoked.map(|a| a.status)
    );
    let direct = client_for(&certs, "consumer", mock, &[b"http/1.1"]);
    let a = direct
        .send(Gpc::new(Method::GET, format!("{endpoint}/metadata"), IX_METADATA).build())
        .await;
    match a {
        Ok(a) => assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.text()),
        Err(e) => assert!(!e.is_empty()),
    }

    // SIGTERM: a clean exit.
    let pid = child.0.id().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status}");
}

#[test]
fn readme_walkthrough_is_the_shipped_script() {
    let readme = std::fs::read_to_string(repo_path("README.md")).expect("README");
    let script = std::fs::read_to_string(repo_path("scripts/walkthrough.sh")).expect("script");
    let body = script
        .split_once("set -euo pipefail\n")
        .map(|(_, body)| body)
        .expect("script body");
    assert!(
        readme.contains(body),
        "README's walk-through differs from scripts/walkthrough.sh"
    );
}
