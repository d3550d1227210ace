//! The remote directory's TLS material is hot-reloaded and watched like the listener's and the
//! upstream client's (component `directory TLS`): the LDAPS client certificate, key, CA bundle
//! and CRLs against a real slapd, and the SDS FHIR API's CA bundle against the in-process API.
//! Before, they were read at start only: a renewal took a restart, `ldap_crls` had no
//! `ssp_crl_next_update_seconds` series, and `fhir_ca` no `ssp_certificate_expiry_seconds`.

mod common;
mod directory_support;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use directory_support::{admin, ldaps_section, until_readiness, FhirApi, Slapd, SlapdTls, API_KEY};
use http::Method;
use ssp_gateway::tls::pki::{Ca, Issued, KeyKind, LeafSpec, Usage, Validity};

const DEADLINE: Duration = Duration::from_secs(20);
const COMPONENT: &str = "directory TLS";

/// A TCP front that pipes every connection to `127.0.0.1:port` and counts them: how many
/// connections the gateway opened to the directory. Called while the gateway's configuration
/// is written (inside the runtime).
fn counting_front(port: u16) -> (u16, Arc<AtomicUsize>) {
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind front");
    std_listener.set_nonblocking(true).expect("nonblocking");
    let front = std_listener.local_addr().expect("addr").port();
    let listener = tokio::net::TcpListener::from_std(std_listener).expect("tokio listener");
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                    let _ = tokio::io::copy_bidirectional(&mut tcp, &mut server).await;
                }
            });
        }
    });
    (front, accepted)
}

/// The gateway's LDAPS client certificate, running out at `until`.
fn ldap_client(world: &World, until: i64) -> Issued {
    world
        .authority
        .issue(&LeafSpec {
            names: vec!["ssp.dev.local".into()],
            common_name: "ssp.dev.local".into(),
            key: KeyKind::EcdsaP256,
            usage: Usage::Client,
            validity: Validity::Until(until),
        })
        .expect("issue")
}

/// Writes `contents` to `path` in one rename, so a poll never sees it half-written.
fn replace(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// Points the symlink `live` at `target` in one rename: the certificate and its key change
/// together, as a Kubernetes Secret volume's `..data` link does.
fn point(live: &Path, target: &Path) {
    let tmp = live.with_extension("new");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).expect("symlink");
    std::fs::rename(&tmp, live).expect("rename symlink");
}

async fn scrape(admin: std::net::SocketAddr) -> String {
    http_get(admin, "/metrics").await.1
}

fn reloads(text: &str, result: &str) -> f64 {
    let series = format!("ssp_reloads_total{{component=\"{COMPONENT}\",result=\"{result}\"}}");
    sample(text, &series).unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

fn expiry(text: &str, role: &str) -> Option<f64> {
    sample(
        text,
        &format!("ssp_certificate_expiry_seconds{{certificate=\"{role}\"}}"),
    )
}

fn directory_crl(text: &str) -> Option<f64> {
    sample(text, "ssp_crl_next_update_seconds{component=\"directory\"}")
}

/// Scrapes until `done` holds of the metrics, failing after [`DEADLINE`] with the last scrape.
async fn scrape_until(
    admin: std::net::SocketAddr,
    what: &str,
    done: impl Fn(&str) -> bool,
) -> String {
    let started = Instant::now();
    loop {
        let text = scrape(admin).await;
        if done(&text) {
            return text;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "timed out waiting for {what}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Forgets every cached party, so the next request looks its parties up in the directory.
async fn forget_parties(h: &Harness) {
    let (status, _) = admin(h.admin, Method::POST, "/directory/invalidate").await;
    assert_eq!(status, 200);
}

/// Within `tolerance` seconds of `expected`.
fn about(value: f64, expected: i64, tolerance: f64) -> bool {
    (value - expected as f64).abs() <= tolerance
}

/// The LDAPS gateway of these tests: slapd with TLS behind a counting front, the client
/// certificate and key at `live/cert.pem` and `live/key.pem` (`live` a symlink), and `crl`
/// as `ldap_crls`.
struct Ldaps {
    h: Harness,
    /// Connections the gateway opened to the directory.
    opened: Arc<AtomicUsize>,
    _slapd: Arc<Mutex<Option<Slapd>>>,
}

async fn start_ldaps(world: World, live: &Path, crl: &Path) -> Ldaps {
    let slapd: Arc<Mutex<Option<Slapd>>> = Arc::new(Mutex::new(None));
    let opened = Arc::new(Mutex::new(None));
    let counted = opened.clone();
    let server = SlapdTls::of_provider(&world);
    let client = format!(
        "ldap_cert = \"{}\"\nldap_key = \"{}\"\nldap_ca = \"{}\"\nldap_crls = [\"{}\"]\n",
        live.join("cert.pem").display(),
        live.join("key.pem").display(),
        world.ca.display(),
        crl.display()
    );
    let url = move |server: &Slapd| {
        let (front, accepted) = counting_front(server.tls_port.expect("ldaps port"));
        *counted.lock().expect("lock") = Some(accepted);
        format!("ldaps://localhost:{front}")
    };
    let opts = GatewayOptions {
        directory: Some(ldaps_section(slapd.clone(), server, url, client)),
        ..Default::default()
    };
    let h = start_with_recorder(world, Behaviour::Echo, opts).await;
    let opened = opened
        .lock()
        .expect("lock")
        .take()
        .expect("the front started");
    until_readiness(h.admin, (200, Some(true)), "ready over LDAPS").await;
    Ldaps {
        h,
        opened,
        _slapd: slapd,
    }
}

/// A renewed LDAPS client certificate and key, written beside the old ones and swapped in
/// together, are taken up without a restart: the expiry metric shows the renewal at once, the
/// reload is counted, and the next lookup opens a new connection with them (the one opened with
/// the old ones is not used again). A broken certificate, and a CRL older than the one in
/// force, are refused and counted, and the material in force (and its connection) stays.
/// A fresher CRL is taken up and `ssp_crl_next_update_seconds{component="directory"}` follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewed_ldaps_files_are_reloaded_and_used_by_a_new_connection() {
    let world = World::ecdsa();
    let base = scratch_dir("ldaps-reload");
    let (v1, v2, live) = (base.join("v1"), base.join("v2"), base.join("live"));
    for dir in [&v1, &v2] {
        std::fs::create_dir_all(dir).expect("mkdir");
    }
    let first_until = now() + 20 * 86_400;
    ldap_client(&world, first_until)
        .write(&v1.join("cert.pem"), &v1.join("key.pem"))
        .expect("write");
    point(&live, &v1);
    let crl = base.join("sds.crl");
    let crl_until = now() + 7 * 86_400;
    let issue_crl = |world: &World, until: i64, number: u64| {
        world
            .authority
            .crl_numbered(&[], now() - 60, until, number)
            .expect("CRL")
    };
    std::fs::write(&crl, issue_crl(&world, crl_until, 1_000)).expect("write CRL");
    let renewed_until = now() + 10 * 86_400;
    let renewed = ldap_client(&world, renewed_until);
    let (older_crl, fresher_crl, fresher_until) = (
        issue_crl(&world, now() + 8 * 86_400, 999),
        issue_crl(&world, now() + 3 * 86_400, 1_001),
        now() + 3 * 86_400,
    );
    let Ldaps { h, opened, _slapd } = start_ldaps(world, &live, &crl).await;

    let text = scrape(h.admin).await;
    let left = expiry(&text, "directory_client").expect("directory_client");
    assert!(about(left, first_until - now(), 5.0), "{left}");
    assert!(expiry(&text, "directory_ca").expect("directory_ca") > 30.0 * 86_400.0);
    let crl_left = directory_crl(&text).unwrap_or_else(|| panic!("no directory CRL in\n{text}"));
    assert!(about(crl_left, crl_until - now(), 5.0), "{crl_left}");
    assert_eq!(
        (reloads(&text, "ok"), reloads(&text, "refused")),
        (0.0, 0.0)
    );

    let answer = h.consumer_metadata().await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(
        opened.load(Ordering::SeqCst),
        1,
        "the probe's connection, reused"
    );

    // Renewed: the certificate and key change together.
    renewed
        .write(&v2.join("cert.pem"), &v2.join("key.pem"))
        .expect("write");
    point(&live, &v2);
    let text = scrape_until(h.admin, "the renewal in the metrics", |text| {
        expiry(text, "directory_client")
            .is_some_and(|left| left <= (renewed_until - now()) as f64 + 5.0)
            && reloads(text, "ok") == 1.0
    })
    .await;
    assert_eq!(reloads(&text, "refused"), 0.0, "{text}");
    assert_eq!(opened.load(Ordering::SeqCst), 1, "nothing searched yet");
    forget_parties(&h).await;
    let answer = h.consumer_metadata().await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(
        opened.load(Ordering::SeqCst),
        2,
        "the lookup after the reload opened a connection with the renewed files"
    );

    // A broken certificate: refused, the renewed one stays in force, and so does its
    // connection.
    replace(&v2.join("cert.pem"), "not a certificate\n");
    let text = scrape_until(h.admin, "the refusal", |text| {
        reloads(text, "refused") == 1.0
    })
    .await;
    assert_eq!(reloads(&text, "ok"), 1.0, "{text}");
    let left = expiry(&text, "directory_client").expect("directory_client");
    assert!(about(left, renewed_until - now(), 5.0), "{left}");
    assert_eq!(
        sample(
            &text,
            &format!("ssp_reload_last_ok{{component=\"{COMPONENT}\"}}")
        ),
        Some(0.0)
    );
    forget_parties(&h).await;
    let answer = h.consumer_metadata().await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(
        opened.load(Ordering::SeqCst),
        2,
        "the connection in use stays"
    );

    // Repaired; then a fresher CRL is taken up, and an older one refused.
    replace(&v2.join("cert.pem"), &renewed.cert_pem);
    scrape_until(h.admin, "the repair", |text| reloads(text, "ok") == 2.0).await;
    replace(&crl, &fresher_crl);
    let text = scrape_until(h.admin, "the fresher CRL", |text| {
        reloads(text, "ok") == 3.0
    })
    .await;
    let crl_left = directory_crl(&text).expect("directory CRL");
    assert!(about(crl_left, fresher_until - now(), 5.0), "{crl_left}");
    replace(&crl, &older_crl);
    let text = scrape_until(h.admin, "the older CRL refused", |text| {
        reloads(text, "refused") == 2.0
    })
    .await;
    assert_eq!(reloads(&text, "ok"), 3.0, "{text}");
    let crl_left = directory_crl(&text).expect("directory CRL");
    assert!(
        about(crl_left, fresher_until - now(), 5.0),
        "the fresher CRL stays in force: {crl_left}"
    );
    forget_parties(&h).await;
    let answer = h.consumer_metadata().await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    h.stop().await;
}

/// At the LDAPS CRLs' nextUpdate the connection open is retired, so the next lookup's
/// handshake is checked against the CRLs in force and fails while they are stale (fail closed,
/// as for providers): before, the connection opened under them went on being used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_ldaps_crl_retires_the_directory_connection() {
    let world = World::ecdsa();
    let base = scratch_dir("ldaps-stale");
    let v1 = base.join("v1");
    std::fs::create_dir_all(&v1).expect("mkdir");
    ldap_client(&world, now() + 20 * 86_400)
        .write(&v1.join("cert.pem"), &v1.join("key.pem"))
        .expect("write");
    let live = base.join("live");
    point(&live, &v1);
    let crl = base.join("sds.crl");
    // Time enough for slapd, the gateway and the first lookup on a loaded 2-core CI machine.
    let stale_at = now() + 20;
    let pem = world
        .authority
        .crl_between(&[], now() - 60, stale_at)
        .expect("CRL");
    std::fs::write(&crl, pem).expect("write CRL");
    let Ldaps { h, opened, _slapd } = start_ldaps(world, &live, &crl).await;

    let text = scrape(h.admin).await;
    let left = directory_crl(&text).unwrap_or_else(|| panic!("no directory CRL in\n{text}"));
    assert!(left <= 20.0, "{left}");
    let answer = h.consumer_metadata().await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(opened.load(Ordering::SeqCst), 1);

    while now() <= stale_at {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    forget_parties(&h).await;
    let answer = h.consumer_metadata().await;
    answer.assert_outcome(503, Some("INTERNAL_SERVER_ERROR"), "DIRECTORY_UNAVAILABLE");
    assert!(
        opened.load(Ordering::SeqCst) >= 2,
        "the lookup tried a new connection"
    );
    h.stop().await;
}

/// The earliest notAfter of a CA bundle file.
fn bundle_not_after(path: &Path) -> i64 {
    ssp_gateway::tls::load_certs(path)
        .expect("bundle")
        .iter()
        .map(|c| ssp_gateway::tls::not_after(c).expect("notAfter"))
        .min()
        .expect("a certificate")
}

/// The SDS FHIR API backend's `fhir_ca` has an expiry series, read from the bundle in force,
/// and is reloaded: a broken bundle is refused (lookups go on), and a bundle that no longer
/// trusts the API is taken up by a new client, whose connections then fail, until the right
/// bundle is back (the pooled connection made under the old bundle is not used again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fhir_ca_is_measured_and_reloaded_with_a_new_client() {
    let world = World::ecdsa();
    let api = Arc::new(FhirApi::start("", Some(directory_support::api_server_tls(&world))).await);
    let dir = scratch_dir("fhir-ca");
    let key = dir.join("apikey");
    std::fs::write(&key, API_KEY).expect("write key");
    let bundle = dir.join("fhir-ca.pem");
    let trusted = std::fs::read_to_string(&world.ca).expect("read CA");
    std::fs::write(&bundle, &trusted).expect("write CA");
    let ca_until = bundle_not_after(&bundle);
    let (serving, base, configured) = (api.clone(), api.https_base_url(), bundle.clone());
    let opts = GatewayOptions {
        directory: Some(Box::new(move |ldif: &str| {
            serving.serve(ldif);
            format!(
                "backend = \"fhir\"\nfhir_base_url = \"{base}\"\nfhir_api_key_file = \"{}\"\n\
                 fhir_ca = \"{}\"\n\
                 fhir_asid_ods = {{ \"{PROVIDER_ASID}\" = \"B82617\", \"{CONSUMER_ASID}\" = \"A20047\" }}\n",
                key.display(),
                configured.display()
            )
        })),
        ..Default::default()
    };
    let h = start_with_recorder(world, Behaviour::Echo, opts).await;
    until_readiness(h.admin, (200, Some(true)), "ready over https").await;
    let answer = h.consumer_metadata().await;
    assert_eq!(answer.status, 200, "{}", answer.text());

    let text = scrape(h.admin).await;
    let left =
        expiry(&text, "directory_ca").unwrap_or_else(|| panic!("no directory_ca in\n{text}"));
    assert!(about(left, ca_until - now(), 5.0), "{left}");
    assert_eq!(
        expiry(&text, "directory_client"),
        None,
        "no client certificate"
    );
    assert_eq!(directory_crl(&text), None, "no CRLs");
    assert_eq!(
        (reloads(&text, "ok"), reloads(&text, "refused")),
        (0.0, 0.0)
    );

    // Broken: refused, and the client in force goes on.
    replace(&bundle, "not a CA bundle\n");
    scrape_until(h.admin, "the refusal", |text| {
        reloads(text, "refused") == 1.0
    })
    .await;
    forget_parties(&h).await;
    let answer = h.consumer_metadata().await;
    assert_eq!(answer.status, 200, "{}", answer.text());

    // A bundle that does not trust the API: taken up, and the new client's handshakes fail.
    let other = Ca::new("Another CA", KeyKind::EcdsaP256).expect("CA");
    replace(&bundle, other.cert_pem());
    let text = scrape_until(h.admin, "the other bundle", |text| {
        reloads(text, "ok") == 1.0
    })
    .await;
    let other_until = ssp_gateway::tls::not_after(other.cert_der()).expect("notAfter");
    let left = expiry(&text, "directory_ca").expect("directory_ca");
    assert!(about(left, other_until - now(), 5.0), "{left}");
    forget_parties(&h).await;
    let answer = h.consumer_metadata().await;
    answer.assert_outcome(503, Some("INTERNAL_SERVER_ERROR"), "DIRECTORY_UNAVAILABLE");

    // The right bundle is back: lookups succeed again.
    replace(&bundle, &trusted);
    scrape_until(h.admin, "the trusted bundle", |text| {
        reloads(text, "ok") == 2.0
    })
    .await;
    forget_parties(&h).await;
    let answer = h.consumer_metadata().await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    h.stop().await;
}
