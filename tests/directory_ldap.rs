//! The gateway with the LDAP backend against a real slapd, through a directory outage: cached
//! answers keep flowing while slapd is down (served stale and counted), past the maximum
//! staleness the gateway answers 503 DIRECTORY_UNAVAILABLE (never a 403), and when slapd comes
//! back the gateway recovers by itself, without a restart.

mod common;
mod directory_support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use directory_support::{directory_readiness, until_readiness, Slapd};
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

/// With nothing cached, an outage is a 503 (never a 403) and makes the gateway unready; when
/// slapd returns, readiness sees it without any request (the LDAP probe).
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
    assert_eq!(directory_readiness(h.admin).await, (503, Some(false)));

    // slapd comes back: /readyz probes it and turns ready by itself. No request reaches the
    // gateway meanwhile, as none would reach an unready pod.
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
