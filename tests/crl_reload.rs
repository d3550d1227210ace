//! The listener's CA bundle and CRLs reloaded under a running gateway when a CA is re-keyed
//! under the same name: going over to the new key and back to the old one, each with its own
//! CRL, and the overlap (both keys in the bundle while a CRL of the name is listed) refused by
//! the reload and by `check-config` alike, as is a CRL whose CA is not in the bundle;
//! `check-config` warns of a CA with no CRL, the listener's and the LDAPS directory's.

mod common;
mod directory_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use ssp_gateway::tls::pki::{Ca, Issued, KeyKind, LeafSpec};
use ssp_gateway::tls::ClientTls;

const BIN: &str = env!("CARGO_BIN_EXE_ssp-gateway");

/// Writes `text` to `path` in one step (a temporary file renamed over it), so the reloader
/// never reads half a file.
fn publish(path: &Path, text: &str) {
    let temporary = path.with_extension("new");
    std::fs::write(&temporary, text).expect("write");
    std::fs::rename(&temporary, path).expect("rename");
}

/// A consumer with `issued`'s certificate, trusting the gateway's CA only (not the bundle the
/// test rewrites).
fn client_of(h: &Harness, name: &str, issued: &Issued) -> Client {
    let dir = scratch_dir(name);
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    issued.write(&cert, &key).expect("write the client's files");
    let ca = dir.join("gateway-ca.pem");
    std::fs::write(&ca, h.world.authority.cert_pem()).expect("write");
    let tls = ssp_gateway::tls::client_config(
        &ClientTls {
            cert,
            key,
            ca,
            crls: Vec::new(),
        },
        &[b"http/1.1"],
    )
    .expect("client TLS");
    Client {
        tls,
        addr: h.gateway,
    }
}

/// Waits until `client`'s handshake is accepted; fails with `what` after 20 s.
async fn accepted_within_20s(client: &Client, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while client.handshake().await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The listener's handshakes refused so far as revoked.
async fn revoked_so_far(h: &Harness) -> f64 {
    let (_, text) = http_get(h.admin, "/metrics").await;
    sample(
        &text,
        "ssp_tls_handshake_failures_total{reason=\"certificate_revoked\"}",
    )
    .unwrap_or(0.0)
}

/// `client` is refused, as revoked (not as of an unknown CA).
async fn refused_as_revoked(h: &Harness, client: &Client, what: &str) {
    let before = revoked_so_far(h).await;
    assert!(client.handshake().await.is_err(), "{what} was let in");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while revoked_so_far(h).await <= before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} was refused, but not as revoked"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A CA of the test, with a consumer it issued, one it revokes, and its CRL.
struct Partner {
    ca: Ca,
    consumer: Issued,
    revoked: Issued,
    /// Revoking `revoked` (made once: a CRL put back is the same CRL, not another of its
    /// number, which the gateway refuses).
    crl: String,
}

impl Partner {
    /// A CA named `name` whose CRL has the CRL Number `number`.
    fn new(name: &str, number: u64) -> Partner {
        let ca = Ca::new(name, KeyKind::EcdsaP256).expect("CA");
        let issue = |n: &str| {
            ca.issue(&LeafSpec::client(&[n]))
                .expect("client certificate")
        };
        let (consumer, revoked) = (issue("partner.example"), issue("revoked.partner.example"));
        let crl = ca
            .crl_numbered(&[&revoked], now() - 60, now() + 86_400, number)
            .expect("CRL");
        Partner {
            ca,
            consumer,
            revoked,
            crl,
        }
    }
}

/// The gateway's CA bundle file and CRL file: the gateway's own CA and its CRL as the world
/// made them, with `partner`'s CA and CRL added.
fn publish_partner(h: &Harness, authority_crl: &str, partner: &Partner) {
    // The CRL first: with the bundle still the one before, the partner's new CRL is not
    // loaded (a refused or a warned reload), and the bundle's change then takes both up.
    publish(&h.world.crl, &format!("{authority_crl}{}", partner.crl));
    publish(
        &h.world.ca,
        &format!("{}{}", h.world.authority.cert_pem(), partner.ca.cert_pem()),
    );
}

/// A CA re-keyed under the same name is swapped in, CA and CRL in one change, and swapped back
/// with the old key's own CRL, whose CRL Number is below the new key's: both reloads are taken
/// up (before, the CRL floor was kept per issuer name, merged the two keys' numbers, and
/// refused the way back as "older" until a restart), and each key's CRL refuses its revoked
/// consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_re_keyed_under_its_name_is_swapped_in_and_back_with_its_own_crls() {
    let h = start_with_recorder(World::ecdsa(), Behaviour::Echo, GatewayOptions::default()).await;
    let authority_crl = std::fs::read_to_string(&h.world.crl).expect("the world's CRL");
    let (old, new) = (
        Partner::new("Partner CA", 5),
        Partner::new("Partner CA", 1000),
    );
    let (old_consumer, old_revoked) = (
        client_of(&h, "old-consumer", &old.consumer),
        client_of(&h, "old-revoked", &old.revoked),
    );
    let (new_consumer, new_revoked) = (
        client_of(&h, "new-consumer", &new.consumer),
        client_of(&h, "new-revoked", &new.revoked),
    );

    publish_partner(&h, &authority_crl, &old);
    accepted_within_20s(&old_consumer, "the old CA was never taken up").await;
    refused_as_revoked(&h, &old_revoked, "the old CA's revoked consumer").await;
    assert!(
        new_consumer.handshake().await.is_err(),
        "the new CA trusted"
    );

    publish_partner(&h, &authority_crl, &new);
    accepted_within_20s(&new_consumer, "the new CA was never taken up").await;
    refused_as_revoked(&h, &new_revoked, "the new CA's revoked consumer").await;
    assert!(
        old_consumer.handshake().await.is_err(),
        "the old CA still trusted"
    );

    publish_partner(&h, &authority_crl, &old);
    accepted_within_20s(
        &old_consumer,
        "going back to the old CA with its own CRL was never taken up",
    )
    .await;
    refused_as_revoked(&h, &old_revoked, "the old CA's revoked consumer, back").await;
    assert!(
        new_consumer.handshake().await.is_err(),
        "the new CA still trusted"
    );
    // The gateway's own consumers were never disturbed.
    assert_eq!(h.consumer_metadata().await.status, http::StatusCode::OK);
    h.stop().await;
}

/// `check-config` on `config`: its exit code, stdout and stderr.
fn check_config(config: &Path) -> (Option<i32>, String, String) {
    let out = Command::new(BIN)
        .arg("check-config")
        .arg("--config")
        .arg(config)
        .output()
        .expect("run check-config");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The listener's TLS reloads refused so far.
async fn refused_reloads(h: &Harness) -> f64 {
    let (_, text) = http_get(h.admin, "/metrics").await;
    sample(
        &text,
        "ssp_reloads_total{component=\"listener TLS\",result=\"refused\"}",
    )
    .unwrap_or(0.0)
}

/// Both keys of a CA's name in the bundle while its CRL is listed (the overlap of a re-key) is
/// refused by the running gateway's reload, which keeps the bundle in force, and by
/// `check-config` with the same line, naming the subject and both CAs by fingerprint; before,
/// both took it, and every consumer of the new key then failed its handshake. A CRL whose CA is
/// not in the bundle is refused likewise, and `check-config` warns of a CA with no CRL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_keys_of_a_re_keyed_ca_with_its_crl_are_refused_by_reload_and_check_config() {
    let h = start_with_recorder(World::ecdsa(), Behaviour::Echo, GatewayOptions::default()).await;
    let authority_crl = std::fs::read_to_string(&h.world.crl).expect("the world's CRL");
    let (old, new) = (
        Partner::new("Partner CA", 5),
        Partner::new("Partner CA", 1000),
    );
    let old_consumer = client_of(&h, "overlap-old", &old.consumer);
    let new_consumer = client_of(&h, "overlap-new", &new.consumer);
    let (code, stdout, stderr) = check_config(&h.config_path);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(!stdout.contains("listener.crls"), "{stdout}");

    publish_partner(&h, &authority_crl, &old);
    accepted_within_20s(&old_consumer, "the old CA was never taken up").await;

    // The new key added beside the old one, the old key's CRL still listed.
    let refused = refused_reloads(&h).await;
    let bundle = format!(
        "{}{}{}",
        h.world.authority.cert_pem(),
        old.ca.cert_pem(),
        new.ca.cert_pem()
    );
    publish(&h.world.ca, &bundle);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while refused_reloads(&h).await <= refused {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the overlap was never refused"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        old_consumer.handshake().await.is_ok(),
        "the bundle in force"
    );
    assert!(
        new_consumer.handshake().await.is_err(),
        "the refused bundle"
    );

    let fingerprint = |ca: &Ca| {
        ssp_gateway::tls::peer_identity(ca.cert_der())
            .expect("identity")
            .fingerprint_sha256
    };
    let (code, stdout, stderr) = check_config(&h.config_path);
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    let expected = format!(
        "  - listener.client_ca: {}: bad CA bundle: the CAs #2 (SHA-256 fingerprint {}), #3 \
         (SHA-256 fingerprint {}) are all named CN=Partner CA,",
        h.world.ca.display(),
        fingerprint(&old.ca),
        fingerprint(&new.ca)
    );
    assert!(
        stderr.lines().any(|l| l.starts_with(&expected)),
        "{expected:?} not in:\n{stderr}"
    );
    assert!(
        stderr.contains("Give the new CA a name of its own"),
        "{stderr}"
    );

    // The overlap over, and a CA with no CRL added, with another CA's CRL listed before its
    // CA is in the bundle: refused by the reload (the bundle in force stays) and by
    // `check-config`, naming the CRL's file, its issuer and what to do. Before, it was ignored
    // with a warning: revocation checking off for whatever it revokes.
    let stranger = Partner::new("Stranger CA", 1);
    let unchecked = Partner::new("Unchecked CA", 1);
    let refused = refused_reloads(&h).await;
    publish(
        &h.world.crl,
        &format!("{authority_crl}{}{}", old.crl, stranger.crl),
    );
    publish(
        &h.world.ca,
        &format!(
            "{}{}{}",
            h.world.authority.cert_pem(),
            old.ca.cert_pem(),
            unchecked.ca.cert_pem()
        ),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while refused_reloads(&h).await <= refused {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the CRL of a CA not in the bundle was never refused"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The files' first change may be refused for the overlap still on disk: give the watcher
    // (polling every 100 ms) time to judge the last.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let unchecked_consumer = client_of(&h, "unchecked", &unchecked.consumer);
    assert!(
        unchecked_consumer.handshake().await.is_err(),
        "the bundle with the stranger's CRL listed was taken up"
    );
    assert!(
        old_consumer.handshake().await.is_ok(),
        "the bundle in force"
    );
    let crl_file: PathBuf = h.world.crl.clone();
    let (code, stdout, stderr) = check_config(&h.config_path);
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    let expected = format!(
        "  - listener.crls[0]: {}: bad CRL: the CRL of CN=Stranger CA,",
        crl_file.display(),
    );
    let line = stderr
        .lines()
        .find(|l| l.starts_with(&expected))
        .unwrap_or_else(|| panic!("{expected:?} not in:\n{stderr}"));
    for says in [
        &format!(
            " (CRL Number 1) is issued by a CA that is not in {} (listener.client_ca): ",
            h.world.ca.display()
        ),
        "take the CRL out of listener.crls if it is not one of this listener's CAs",
        "An intermediate CA's CRL is honoured only with the intermediate in the bundle",
    ] {
        assert!(line.contains(says), "{says:?} not in {line}");
    }

    // Without the stranger's CRL: `check-config` warns of the CA with no CRL.
    publish(&h.world.crl, &format!("{authority_crl}{}", old.crl));
    let (code, stdout, stderr) = check_config(&h.config_path);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    let warnings: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("warning: listener.crls"))
        .collect();
    assert_eq!(warnings.len(), 1, "{stdout}");
    assert!(
        warnings[0].starts_with("warning: listener.crls: no CRL for CN=Unchecked CA,")
            && warnings[0].contains(&format!(
                "(certificate #3, SHA-256 fingerprint {})",
                fingerprint(&unchecked.ca)
            ))
            && warnings[0].contains("accepted without a revocation check"),
        "{stdout}"
    );
    // The running gateway takes the same files up: the unchecked CA's consumer gets in.
    accepted_within_20s(&unchecked_consumer, "the bundle was never taken up").await;
    h.stop().await;
}

/// `check-config` prints the LDAPS directory client's TLS warnings as it does the listener's:
/// a CA of `directory.ldap_ca` with no CRL while `directory.ldap_crls` are configured (before,
/// `run` logged it and `check-config` said nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_warns_of_an_ldap_ca_with_no_crl() {
    use directory_support::{ldaps_section, until_readiness, Slapd, SlapdTls};
    use std::sync::{Arc, Mutex};
    let world = World::ecdsa();
    let unchecked = Partner::new("Unchecked LDAP CA", 1);
    let ldap_ca = world.dir.join("ldap-ca.pem");
    std::fs::write(
        &ldap_ca,
        format!("{}{}", world.authority.cert_pem(), unchecked.ca.cert_pem()),
    )
    .expect("write the LDAP CA bundle");
    let slapd: Arc<Mutex<Option<Slapd>>> = Arc::new(Mutex::new(None));
    let server = SlapdTls::of_provider(&world);
    let keys = format!(
        "ldap_cert = \"{}\"\nldap_key = \"{}\"\nldap_ca = \"{}\"\nldap_crls = [\"{}\"]\n",
        world.gateway_client.cert.display(),
        world.gateway_client.key.display(),
        ldap_ca.display(),
        world.crl.display()
    );
    let opts = GatewayOptions {
        directory: Some(ldaps_section(slapd.clone(), server, Slapd::ldaps_url, keys)),
        ..Default::default()
    };
    let h = start_with_recorder(world, Behaviour::Echo, opts).await;
    until_readiness(h.admin, (200, Some(true)), "ready over LDAPS").await;
    let (code, stdout, stderr) = check_config(&h.config_path);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    let warnings: Vec<&str> = stdout.lines().filter(|l| l.contains("crls")).collect();
    assert_eq!(warnings.len(), 1, "{stdout}");
    assert!(
        warnings[0].starts_with("warning: directory.ldap_crls: no CRL for CN=Unchecked LDAP CA,")
            && warnings[0].contains(&format!(
                " (certificate #2, SHA-256 fingerprint {}) in {}: ",
                ssp_gateway::tls::peer_identity(unchecked.ca.cert_der())
                    .expect("identity")
                    .fingerprint_sha256,
                ldap_ca.display()
            ))
            && warnings[0].contains("accepted without a revocation check"),
        "{stdout}"
    );
    h.stop().await;
}
