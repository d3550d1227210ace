//! The gateway with the LDAP backend against a real slapd, through a directory outage: cached
//! answers keep flowing while slapd is down (served stale and counted), past the maximum
//! staleness the gateway answers 503 DIRECTORY_UNAVAILABLE (never a 403), and when slapd comes
//! back the gateway recovers by itself, without a restart. A gateway started while LDAP is
//! down is not ready until LDAP has answered (its own probe, no consumer traffic), and
//! `/readyz` answers at once even while LDAP hangs.

mod common;
mod directory_support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use directory_support::{directory_readiness, ldaps_section, until_readiness, Slapd, SlapdTls};
use http::Method;

/// Polls `f` until it returns `Some`, failing the test after `limit`.
async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_answers_outlive_slapd_until_max_stale_then_503_then_recovery() {
    let slapd: Arc<Mutex<Option<Slapd>>> = Arc::new(Mutex::new(None));
    let started = slapd.clone();
    let opts = GatewayOptions {
        directory: Some(Box::new(move |ldif: &str| {
            let server = Slapd::start(ldif, None);
            let url = server.url();
            *started.lock().expect("lock") = Some(server);
            format!(
                "backend = \"ldap\"\nldap_url = \"{url}\"\nquery_timeout = \"2s\"\n\
                 cache_ttl = \"200ms\"\nnegative_cache_ttl = \"200ms\"\nmax_stale = \"1500ms\"\n"
            )
        })),
        ..Default::default()
    };
    let h = start_with_recorder(World::ecdsa(), Behaviour::Echo, opts).await;
    let directory = h.directory();
    assert_eq!(directory.backend_name(), "ldap");
    let client = h.consumer();
    let metadata = || {
        Gpc::new(
            Method::GET,
            format!("{}/metadata", h.endpoint()),
            IX_METADATA,
        )
    };

    // 1. slapd up: answered from LDAP.
    let first = client.gpc(metadata()).await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(h.recorder.seen(), 1);
    assert!(directory.healthy());
    assert_eq!(directory.stats().misses, 2, "sender and receiver looked up");

    // 2. slapd stops. Requests keep succeeding; once the TTL has passed they are answered from
    //    the stale entries (both parties), counted.
    slapd.lock().expect("lock").as_mut().expect("slapd").stop();
    eventually(
        "stale answers for both parties",
        Duration::from_secs(20),
        || async {
            let answer = client.gpc(metadata()).await;
            if answer.status != 200 {
                // Still within max_stale of the last good answer: anything but 200 is a failure.
                let stats = directory.stats();
                if stats.stale_served == 0 {
                    panic!(
                        "refused before any stale answer: {} {}",
                        answer.status,
                        answer.text()
                    );
                }
                return None;
            }
            (directory.stats().stale_served >= 2).then_some(())
        },
    )
    .await;
    assert!(!directory.healthy(), "the backend is failing");
    assert!(directory.stats().backend_errors >= 1);
    let forwarded_while_down = h.recorder.seen();
    assert!(forwarded_while_down >= 2);

    // 3. Past max_stale: 503 DIRECTORY_UNAVAILABLE, and nothing reaches the provider.
    let refused = eventually("503 after max_stale", Duration::from_secs(20), || async {
        let before = h.recorder.seen();
        let answer = client.gpc(metadata()).await;
        match answer.status.as_u16() {
            200 => None,
            _ => Some((answer, before)),
        }
    })
    .await;
    let (answer, before) = refused;
    answer.assert_outcome(503, Some("INTERNAL_SERVER_ERROR"), "DIRECTORY_UNAVAILABLE");
    assert_eq!(h.recorder.seen(), before, "a 503 forwards nothing");

    // 4. slapd back: the next lookups succeed, without restarting the gateway.
    slapd
        .lock()
        .expect("lock")
        .as_mut()
        .expect("slapd")
        .start_again();
    eventually(
        "recovery after slapd restarts",
        Duration::from_secs(20),
        || async { (client.gpc(metadata()).await.status == 200).then_some(()) },
    )
    .await;
    assert!(directory.healthy());

    h.stop().await;
}

/// With nothing cached, an outage is a 503 (never a 403) and makes the gateway unready (once the
/// prober's probe, woken by the failed lookup, fails too); when slapd returns, readiness sees
/// it without any request (the LDAP probe).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_nothing_cached_a_directory_outage_is_503_never_403() {
    let slapd: Arc<Mutex<Option<Slapd>>> = Arc::new(Mutex::new(None));
    let started = slapd.clone();
    let opts = GatewayOptions {
        directory: Some(Box::new(move |ldif: &str| {
            let server = Slapd::start(ldif, None);
            let url = server.url();
            *started.lock().expect("lock") = Some(server);
            format!("backend = \"ldap\"\nldap_url = \"{url}\"\n")
        })),
        ..Default::default()
    };
    let h = start_with_recorder(World::ecdsa(), Behaviour::Echo, opts).await;
    slapd.lock().expect("lock").as_mut().expect("slapd").stop();
    let answer = h.consumer_metadata().await;
    answer.assert_outcome(503, Some("INTERNAL_SERVER_ERROR"), "DIRECTORY_UNAVAILABLE");
    assert_eq!(h.recorder.seen(), 0);
    until_readiness(h.admin, (503, Some(false)), "unready once the probe fails").await;

    // slapd comes back: the gateway's prober sees it and /readyz turns ready by itself. No
    // request reaches the gateway meanwhile, as none would reach an unready pod.
    let directory = h.directory();
    let misses = directory.stats().misses;
    slapd
        .lock()
        .expect("lock")
        .as_mut()
        .expect("slapd")
        .start_again();
    until_readiness(h.admin, (200, Some(true)), "ready after slapd restarts").await;
    assert_eq!(directory.stats().misses, misses, "no lookup made it ready");
    assert!(directory.healthy(), "the probe cleared the failure");
    assert_eq!(h.consumer_metadata().await.status, 200);
    h.stop().await;
}

/// Real SDS data's quirks in slapd (directory_support::quirky_world): an interaction whose
/// handler cannot be used is refused 403 PARTYKEY_INTERACTION_CHECK_FAILED, never 503, and
/// nothing reaches the provider; the party's other interactions are forwarded, among them one
/// whose `nhsAsSvcIA` and handler's party key slapd stores with a trailing space (its filters
/// ignore it, and so does the gateway); a consumer whose AS party key has a trailing space,
/// and whose own MHS records are OpenTest-like, still sends. No lookup fails, so the
/// backend-errors alert has nothing to count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_sds_quirks_in_slapd_refuse_one_interaction_not_the_party() {
    let slapd: Arc<Mutex<Option<Slapd>>> = Arc::new(Mutex::new(None));
    let started = slapd.clone();
    let opts = GatewayOptions {
        directory: Some(Box::new(move |ldif: &str| {
            let server = Slapd::start(&directory_support::quirky_world(ldif), None);
            let url = server.url();
            *started.lock().expect("lock") = Some(server);
            format!("backend = \"ldap\"\nldap_url = \"{url}\"\n")
        })),
        ..Default::default()
    };
    let h = start_with_recorder(World::ecdsa(), Behaviour::Echo, opts).await;
    let refused = format!("PARTYKEY_INTERACTION_CHECK_FAILED_MESSAGERECEIVER_{PROVIDER_ASID}");
    h.consumer_metadata()
        .await
        .assert_outcome(403, Some("ACCESS_DENIED"), &refused);
    let slot = Gpc::new(
        Method::GET,
        format!("{}/Slot?start=ge2025-01-01", h.endpoint()),
        IX_SEARCH_SLOT,
    );
    h.consumer()
        .gpc(slot)
        .await
        .assert_outcome(403, Some("ACCESS_DENIED"), &refused);
    assert_eq!(h.recorder.seen(), 0);
    for (path, interaction) in [
        ("Location/1", IX_READ_LOCATION),
        ("Organization?identifier=x", IX_SEARCH_ORGANIZATION),
    ] {
        let answer = h
            .consumer()
            .gpc(Gpc::new(
                Method::GET,
                format!("{}/{path}", h.endpoint()),
                interaction,
            ))
            .await;
        assert_eq!(answer.status, 200, "{interaction}: {}", answer.text());
    }
    assert_eq!(h.recorder.seen(), 2);
    // Another consumer, another unusable interaction (its handler has two endpoints): refused
    // the same way, by the receiver check.
    let readonly = h.world.client(&h.world.readonly, h.gateway);
    let answer = readonly
        .gpc(
            Gpc::new(
                Method::GET,
                format!("{}/Patient/1", h.endpoint()),
                IX_READ_PATIENT,
            )
            .from(READONLY_ASID),
        )
        .await;
    answer.assert_outcome(403, Some("ACCESS_DENIED"), &refused);
    let directory = h.directory();
    assert_eq!(directory.stats().backend_errors, 0);
    let provider = directory
        .party(PROVIDER_ASID)
        .await
        .expect("lookup")
        .expect("provider");
    assert_eq!(provider.unusable.len(), 3, "{:?}", provider.unusable);
    assert!(!provider.has_fqdn("rogue.dev.local"));
    h.stop().await;
}

/// An attribute loaded into slapd under both its name and its OID comes back in two blocks of
/// the entry: a second endpoint on the slot handler, written by `nhsMHSEndPoint`'s OID, makes
/// the interaction unusable (403, nothing forwarded to either endpoint), and a second ASID on
/// the provider's AS record, by `uniqueIdentifier`'s OID, is an error for both ASIDs, never a
/// registration. Before, only the last block was read: requests went to the OID's endpoint, and
/// the record answered for the OID's ASID alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attribute_slapd_holds_under_its_oid_too_is_read_whole() {
    const SECOND_ASID: &str = "200000000999";
    let slapd: Arc<Mutex<Option<Slapd>>> = Arc::new(Mutex::new(None));
    let started = slapd.clone();
    let opts = GatewayOptions {
        directory: Some(Box::new(move |ldif: &str| {
            let slot = "nhsMhsSvcIA: urn:nhs:names:services:gpconnect:fhir:rest:search:slot-1";
            let edited: Vec<String> = ldif
                .split("\n\n")
                .map(|block| {
                    let mut block = block.to_string();
                    if block.lines().any(|l| l == slot) {
                        block.push_str(
                            "\n1.2.826.0.1285.0.2.1.84: https://localhost:1/B82617/STU3/1/gpconnect",
                        );
                    }
                    if block.lines().any(|l| l == "objectClass: nhsAs")
                        && block
                            .lines()
                            .any(|l| l == format!("uniqueIdentifier: {READONLY_ASID}"))
                    {
                        block.push_str(&format!("\n0.9.2342.19200300.100.1.44: {SECOND_ASID}"));
                    }
                    block
                })
                .collect();
            let server = Slapd::start(&edited.join("\n\n"), None);
            let url = server.url();
            *started.lock().expect("lock") = Some(server);
            format!("backend = \"ldap\"\nldap_url = \"{url}\"\n")
        })),
        ..Default::default()
    };
    let h = start_with_recorder(World::ecdsa(), Behaviour::Echo, opts).await;
    let directory = h.directory();
    for asid in [READONLY_ASID, SECOND_ASID] {
        let refused = directory
            .party(asid)
            .await
            .expect_err("an error, not a party");
        assert!(
            refused.to_string().contains("exactly one value, found 2"),
            "{asid}: {refused}"
        );
    }
    // The slot handler's two endpoints make its interaction unusable.
    let slot = Gpc::new(
        Method::GET,
        format!("{}/Slot?start=ge2025-01-01", h.endpoint()),
        IX_SEARCH_SLOT,
    );
    let refused = format!("PARTYKEY_INTERACTION_CHECK_FAILED_MESSAGERECEIVER_{PROVIDER_ASID}");
    h.consumer()
        .gpc(slot)
        .await
        .assert_outcome(403, Some("ACCESS_DENIED"), &refused);
    let provider = directory
        .party(PROVIDER_ASID)
        .await
        .expect("lookup")
        .expect("provider");
    assert!(
        provider
            .unusable
            .iter()
            .any(|u| format!("{u:?}").contains("slot-1")),
        "{:?}",
        provider.unusable
    );
    // The provider's other interactions are forwarded.
    assert_eq!(h.consumer_metadata().await.status, 200);
    assert_eq!(h.recorder.seen(), 1);
    h.stop().await;
}

/// `/readyz` checked every 100 ms for `during`: each answer must be `expected`.
async fn readiness_stays(
    admin: std::net::SocketAddr,
    expected: (u16, Option<bool>),
    during: Duration,
) {
    let until = Instant::now() + during;
    while Instant::now() < until {
        assert_eq!(directory_readiness(admin).await, expected);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A gateway started while LDAP is down is not ready: before, `/readyz` said 200 with
/// `directory_usable: true` while every request got 503 DIRECTORY_UNAVAILABLE, until a first
/// consumer request had failed. It probes LDAP itself, and turns ready once LDAP answers,
/// with no consumer request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_started_while_ldap_is_down_is_unready_until_ldap_answers() {
    let slapd: Arc<Mutex<Option<Slapd>>> = Arc::new(Mutex::new(None));
    let started = slapd.clone();
    let opts = GatewayOptions {
        directory: Some(Box::new(move |ldif: &str| {
            let mut server = Slapd::start(ldif, None);
            server.stop();
            let url = server.url();
            *started.lock().expect("lock") = Some(server);
            format!("backend = \"ldap\"\nldap_url = \"{url}\"\n")
        })),
        ..Default::default()
    };
    let h = start_with_recorder(World::ecdsa(), Behaviour::Echo, opts).await;
    let directory = h.directory();
    readiness_stays(h.admin, (503, Some(false)), Duration::from_millis(1500)).await;
    assert_eq!(directory.stats().misses, 0, "no lookup was made");
    assert_eq!(directory.stats().backend_errors, 0);
    assert!(!directory.healthy());
    h.consumer_metadata().await.assert_outcome(
        503,
        Some("INTERNAL_SERVER_ERROR"),
        "DIRECTORY_UNAVAILABLE",
    );
    assert_eq!(directory_readiness(h.admin).await, (503, Some(false)));

    // slapd comes up: the gateway's own probe finds it, and it turns ready with no request.
    let misses = directory.stats().misses;
    slapd
        .lock()
        .expect("lock")
        .as_mut()
        .expect("slapd")
        .start_again();
    until_readiness(h.admin, (200, Some(true)), "ready once slapd answers").await;
    assert_eq!(directory.stats().misses, misses, "no lookup made it ready");
    assert!(directory.healthy());
    assert_eq!(h.consumer_metadata().await.status, 200);
    assert_eq!(h.recorder.seen(), 1);
    h.stop().await;
}

/// An LDAP server that accepts connections and never answers: holds every connection open and
/// counts them. Its thread (blocked in accept) lasts until the test process ends.
struct HungLdap {
    url: String,
    accepted: Arc<AtomicUsize>,
}

impl HungLdap {
    fn start() -> HungLdap {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("ldap://{}", listener.local_addr().expect("addr"));
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for conn in listener.incoming() {
                let Ok(conn) = conn else { break };
                count.fetch_add(1, Ordering::SeqCst);
                held.push(conn);
            }
        });
        HungLdap { url, accepted }
    }
}

/// `/readyz` never waits on the directory backend. Before, with LDAP hanging, about every other
/// `/readyz` took the whole query timeout (3 s; a Kubernetes probe gives up after 1 s), since
/// readiness probed LDAP itself after a failed lookup. Now it reports what the background probe
/// and the lookups found: each answer comes at once (well under the 2 s query timeout here),
/// and the probe, bounded by the query timeout, is retried with back-off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_answers_at_once_while_ldap_hangs() {
    let hung = HungLdap::start();
    let url = hung.url.clone();
    let opts = GatewayOptions {
        directory: Some(Box::new(move |_: &str| {
            format!("backend = \"ldap\"\nldap_url = \"{url}\"\nquery_timeout = \"2s\"\n")
        })),
        ..Default::default()
    };
    let h = start_with_recorder(World::ecdsa(), Behaviour::Echo, opts).await;
    let timed = |what: &'static str| {
        let admin = h.admin;
        async move {
            let started = Instant::now();
            let readiness = directory_readiness(admin).await;
            let took = started.elapsed();
            assert!(
                took < Duration::from_millis(500),
                "{what}: /readyz took {took:?}: it waited on the backend"
            );
            assert_eq!(readiness, (503, Some(false)), "{what}");
        }
    };

    // From the start: the gateway's own probe hangs, /readyz does not.
    let until = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < until {
        timed("before any request").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        hung.accepted.load(Ordering::SeqCst) >= 1,
        "the gateway probed LDAP at start, without any request"
    );

    // A consumer request waits the query timeout and gets 503; /readyz still answers at once
    // while it waits and after.
    let consumer = {
        let client = h.consumer();
        let target = format!("{}/metadata", h.endpoint());
        tokio::spawn(async move { client.gpc(Gpc::new(Method::GET, target, IX_METADATA)).await })
    };
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        timed("during and after a request").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    consumer.await.expect("request task").assert_outcome(
        503,
        Some("INTERNAL_SERVER_ERROR"),
        "DIRECTORY_UNAVAILABLE",
    );
    assert_eq!(h.recorder.seen(), 0);
    // 7.5 s of a hung backend: the probe (given up after the 2 s query timeout, then 1 s, 2 s
    // of back-off) and the request's searches opened a handful of connections, not one per
    // /readyz.
    let accepted = hung.accepted.load(Ordering::SeqCst);
    assert!((2..=6).contains(&accepted), "{accepted} connections");
    h.stop().await;
}

/// The LDAPS directory's client certificate (`ldap_cert`) is watched like the listener's and
/// the upstream's: before, it had no `ssp_certificate_expiry_seconds` series and `check-config`
/// did not say it ran out soon, so SDS would have refused the gateway without warning. Now
/// it is `certificate="directory_client"` (and its CA bundle `directory_ca`), and
/// `check-config` warns within 30 days, as for `listener.cert`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ldaps_client_certificate_expiry_is_measured_and_warned_of() {
    use ssp_gateway::tls::pki::{KeyKind, LeafSpec, Usage, Validity};
    let world = World::ecdsa();
    let client = Pair {
        cert: world.dir.join("ldap-client.pem"),
        key: world.dir.join("ldap-client-key.pem"),
    };
    let runs_out = now() + 10 * 86_400;
    world
        .authority
        .issue(&LeafSpec {
            names: vec!["ssp.dev.local".into()],
            common_name: "ssp.dev.local".into(),
            key: KeyKind::EcdsaP256,
            usage: Usage::Client,
            validity: Validity::Until(runs_out),
        })
        .expect("issue")
        .write(&client.cert, &client.key)
        .expect("write the LDAPS client certificate");
    let slapd: Arc<Mutex<Option<Slapd>>> = Arc::new(Mutex::new(None));
    let server = SlapdTls::of_provider(&world);
    let keys = format!(
        "ldap_cert = \"{}\"\nldap_key = \"{}\"\nldap_ca = \"{}\"\n",
        client.cert.display(),
        client.key.display(),
        world.ca.display()
    );
    let opts = GatewayOptions {
        directory: Some(ldaps_section(slapd.clone(), server, Slapd::ldaps_url, keys)),
        ..Default::default()
    };
    let h = start_with_recorder(world, Behaviour::Echo, opts).await;
    // The prober's LDAPS search is answered: slapd accepted the client certificate.
    until_readiness(h.admin, (200, Some(true)), "ready over LDAPS").await;

    let (_, text) = http_get(h.admin, "/metrics").await;
    let series = |role: &str| format!("ssp_certificate_expiry_seconds{{certificate=\"{role}\"}}");
    let left = sample(&text, &series("directory_client"))
        .unwrap_or_else(|| panic!("no directory_client series in\n{text}"));
    let expected = (runs_out - now()) as f64;
    assert!(
        (left - expected).abs() <= 5.0,
        "{left} s left, {expected} s expected"
    );
    let ca_left = sample(&text, &series("directory_ca"))
        .unwrap_or_else(|| panic!("no directory_ca series in\n{text}"));
    assert!(ca_left > 30.0 * 86_400.0, "the CA: {ca_left} s left");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ssp-gateway"))
        .arg("check-config")
        .arg("--config")
        .arg(&h.config_path)
        .output()
        .expect("run check-config");
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let warning = format!(
        "warning: directory.ldap_cert: {} runs out in ",
        client.cert.display()
    );
    let days: u32 = said
        .split(&warning)
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {warning:?} in:\n{said}"));
    assert!((9..=10).contains(&days), "{said}");
    assert_eq!(said.matches("warning").count(), 1, "{said}");
    h.stop().await;
}
