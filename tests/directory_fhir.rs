//! The SDS FHIR API backend against an in-process API answering in the documented shapes: the
//! requests it makes (how an ASID is resolved, headers), HTTPS with a CA bundle, the API's
//! errors as directory errors, and a gateway running on it end to end.

mod common;
mod directory_support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use directory_support::{admin, directory_readiness, until_readiness, FhirApi, API_KEY};
use http::Method;
use ssp_gateway::directory::fhir::{FhirBackend, FhirSettings};
use ssp_gateway::directory::DirectoryBackend;
use ssp_gateway::ssp::interactions::Catalogue;

fn world_ldif() -> String {
    std::fs::read_to_string(repo_path("config/directory.ldif")).expect("read LDIF")
}

fn key_file(key: &str) -> PathBuf {
    let path = scratch_dir("fhir").join("apikey");
    std::fs::write(&path, key).expect("write key");
    path
}

fn asid_ods() -> BTreeMap<String, String> {
    [
        (PROVIDER_ASID, "B82617"),
        (CONSUMER_ASID, "A20047"),
        (READONLY_ASID, "A20048"),
    ]
    .into_iter()
    .map(|(a, o)| (a.to_string(), o.to_string()))
    .collect()
}

fn backend(base_url: String, key: &str, ca: Option<PathBuf>) -> FhirBackend {
    let settings = FhirSettings {
        base_url,
        api_key_file: key_file(key),
        ca,
        asid_ods: asid_ods(),
        connect_timeout: Duration::from_secs(5),
        query_timeout: Duration::from_secs(5),
    };
    let catalogue = Catalogue::load(&repo_path("config/interactions.toml")).expect("catalogue");
    FhirBackend::new(&settings, catalogue.iter().map(|i| i.id.clone()).collect())
        .expect("FHIR backend")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_asid_is_resolved_by_ods_code_and_interaction_then_party_key() {
    let api = FhirApi::start(&world_ldif(), None).await;
    let fhir = backend(api.base_url(), API_KEY, None);

    let consumer = fhir
        .party(CONSUMER_ASID)
        .await
        .expect("lookup")
        .expect("registered");
    assert_eq!(consumer.system.party_key, "A20047-821870");
    let seen = api.seen();
    assert_eq!(
        seen.len(),
        2,
        "one /Device search (first catalogue interaction), one /Endpoint"
    );
    let metadata = "urn%3Anhs%3Anames%3Aservices%3Agpconnect%3Afhir%3Arest%3Aread%3Ametadata-1";
    assert_eq!(
        seen[0].path_and_query,
        format!("/spine-directory/FHIR/R4/Device?organization=https%3A%2F%2Ffhir.nhs.uk%2FId%2Fods-organization-code%7CA20047&identifier=https%3A%2F%2Ffhir.nhs.uk%2FId%2FnhsServiceInteractionId%7C{metadata}")
    );
    assert_eq!(
        seen[1].path_and_query,
        "/spine-directory/FHIR/R4/Endpoint?organization=https%3A%2F%2Ffhir.nhs.uk%2FId%2Fods-organization-code%7CA20047&identifier=https%3A%2F%2Ffhir.nhs.uk%2FId%2FnhsMhsPartyKey%7CA20047-821870"
    );

    // An ASID not in fhir_asid_ods is "not registered" without asking the API.
    assert_eq!(fhir.party("999999999999").await.expect("lookup"), None);
    assert_eq!(api.seen().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_errors_are_directory_errors_naming_the_correlation_id() {
    let api = FhirApi::start(&world_ldif(), None).await;

    let wrong_key = backend(api.base_url(), "not-the-key", None);
    let err = wrong_key
        .party(PROVIDER_ASID)
        .await
        .expect_err("401")
        .to_string();
    assert!(
        err.contains("HTTP 401 Unauthorized: Invalid access token"),
        "{err}"
    );
    assert!(err.contains("X-Correlation-Id "), "{err}");
    assert!(
        !err.contains("not-the-key"),
        "the key is never in messages: {err}"
    );

    let fhir = backend(api.base_url(), API_KEY, None);
    api.failing.store(true, Ordering::SeqCst);
    let err = fhir
        .party(PROVIDER_ASID)
        .await
        .expect_err("502")
        .to_string();
    assert!(
        err.starts_with("directory backend fhir: GET /Device (X-Correlation-Id "),
        "{err}"
    );
    assert!(err.contains("HTTP 502 Bad Gateway: LDAP error"), "{err}");
    api.failing.store(false, Ordering::SeqCst);
    assert!(fhir
        .party(PROVIDER_ASID)
        .await
        .expect("recovered")
        .is_some());

    // Nothing listening: a connection error, not a hang.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let nowhere = backend(
        format!("http://127.0.0.1:{port}/spine-directory/FHIR/R4"),
        API_KEY,
        None,
    );
    assert!(nowhere.party(PROVIDER_ASID).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_verifies_the_api_certificate_against_the_configured_ca() {
    let world = World::ecdsa();
    let api = FhirApi::start(
        &world_ldif(),
        Some(directory_support::api_server_tls(&world)),
    )
    .await;
    let fhir = backend(api.https_base_url(), API_KEY, Some(world.ca.clone()));
    let provider = fhir
        .party(PROVIDER_ASID)
        .await
        .expect("lookup over https")
        .expect("registered");
    assert_eq!(provider.handlers.len(), 15);

    let other = World::ecdsa();
    let untrusting = backend(api.https_base_url(), API_KEY, Some(other.ca.clone()));
    assert!(untrusting.party(PROVIDER_ASID).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_runs_on_the_fhir_backend() {
    let api = Arc::new(FhirApi::start("", None).await);
    let key = key_file(API_KEY);
    let serving = api.clone();
    let base = api.base_url();
    let opts = GatewayOptions {
        directory: Some(Box::new(move |ldif: &str| {
            serving.serve(ldif);
            format!(
                "backend = \"fhir\"\nfhir_base_url = \"{base}\"\nfhir_api_key_file = \"{}\"\n\
                 fhir_asid_ods = {{ \"{PROVIDER_ASID}\" = \"B82617\", \"{CONSUMER_ASID}\" = \"A20047\" }}\n",
                key.display()
            )
        })),
        ..Default::default()
    };
    let h = start_with_recorder(World::ecdsa(), Behaviour::Echo, opts).await;
    let answer = h.consumer_metadata().await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(h.recorder.seen(), 1);
    // Not in fhir_asid_ods: the API cannot resolve it, so it is not registered.
    let answer = h
        .world
        .client(&h.world.readonly, h.gateway)
        .gpc(
            Gpc::new(
                Method::GET,
                format!("{}/metadata", h.endpoint()),
                IX_METADATA,
            )
            .from(READONLY_ASID),
        )
        .await;
    answer.assert_outcome(
        403,
        Some("ACCESS_DENIED"),
        &format!("ASID_CHECK_FAILED_MESSAGESENDER_{READONLY_ASID}"),
    );
    h.stop().await;
}

/// The consumer's own MHS endpoint in the development LDIF.
const CONSUMER_ENDPOINT: &str = "https://consumer.dev.local/reliablemessaging/reliablerequest";

/// `/readyz` follows whether the API answers, not what the last lookup did: cached "not
/// found" answers are no fallback during an outage; after the API recovers, the gateway's
/// prober finds it and it is ready again with no request through the gateway (an unready pod
/// gets none); and a
/// lookup that fails on one party's bad data, with nothing cached, is not taken for an outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_api_not_the_last_lookup() {
    let api = Arc::new(FhirApi::start("", None).await);
    let key = key_file(API_KEY);
    let serving = api.clone();
    let base = api.base_url();
    let served = Arc::new(Mutex::new(String::new()));
    let kept = served.clone();
    let opts = GatewayOptions {
        directory: Some(Box::new(move |ldif: &str| {
            serving.serve(ldif);
            *kept.lock().expect("lock") = ldif.to_string();
            format!(
                "backend = \"fhir\"\nfhir_base_url = \"{base}\"\nfhir_api_key_file = \"{}\"\n\
                 fhir_asid_ods = {{ \"{PROVIDER_ASID}\" = \"B82617\", \"{CONSUMER_ASID}\" = \"A20047\" }}\n",
                key.display()
            )
        })),
        ..Default::default()
    };
    let h = start_with_recorder(World::ecdsa(), Behaviour::Echo, opts).await;
    let directory = h.directory();
    // Ready once the gateway's own probe (a /Device search) has been answered.
    until_readiness(h.admin, (200, Some(true)), "ready once the API answers").await;

    // The read-only consumer is not in fhir_asid_ods: "not registered", cached (the only entry:
    // asked of the directory directly, so the provider is not looked up beside it).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        assert_eq!(directory.party(READONLY_ASID).await.expect("lookup"), None);
        // moka settles its count after pending maintenance, which lookups drive.
        if directory.stats().entries > 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(directory.stats().entries, 1);

    // The API fails: the consumer gets a 503, and the only cached answer is that "not found",
    // which serves nobody.
    api.failing.store(true, Ordering::SeqCst);
    let answer = h.consumer_metadata().await;
    answer.assert_outcome(503, Some("INTERNAL_SERVER_ERROR"), "DIRECTORY_UNAVAILABLE");
    // The failed lookup woke the prober, whose probe fails too.
    until_readiness(
        h.admin,
        (503, Some(false)),
        "unready: a cached 'not found' is no fallback",
    )
    .await;

    // The API recovers: the prober asks it (a /Device search) and /readyz turns ready, with no
    // request through the gateway.
    api.failing.store(false, Ordering::SeqCst);
    let (misses, asked) = (directory.stats().misses, api.seen().len());
    until_readiness(h.admin, (200, Some(true)), "ready after the API recovers").await;
    assert_eq!(directory.stats().misses, misses, "no lookup made it ready");
    let probes = api.seen()[asked..].to_vec();
    assert!(!probes.is_empty(), "readiness asked the API");
    assert!(
        probes.iter().all(|s| s
            .path_and_query
            .starts_with("/spine-directory/FHIR/R4/Device?")
            && s.apikey.as_deref() == Some(API_KEY)),
        "{probes:?}"
    );
    assert_eq!(h.recorder.seen(), 0);

    // One party's bad data (an endpoint no request could be forwarded to): with nothing cached
    // its lookup fails, but the API answers, so the gateway stays ready.
    let broken = served
        .lock()
        .expect("lock")
        .replace(CONSUMER_ENDPOINT, &format!("{CONSUMER_ENDPOINT}/"));
    api.serve(&broken);
    let (status, _) = admin(h.admin, Method::POST, "/directory/invalidate").await;
    assert_eq!(status, 200);
    let answer = h.consumer_metadata().await;
    answer.assert_outcome(503, Some("INTERNAL_SERVER_ERROR"), "DIRECTORY_UNAVAILABLE");
    // The provider's lookup ran beside it and succeeded; the consumer's, last, fails.
    let err = directory
        .party(CONSUMER_ASID)
        .await
        .expect_err("the consumer's data is bad");
    assert!(err.to_string().contains("nhsMhsEndPoint"), "{err}");
    // The failed lookup woke the prober: its probe is answered.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !directory.healthy() {
        assert!(std::time::Instant::now() < deadline, "never probed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        directory_readiness(h.admin).await,
        (200, Some(true)),
        "one party's bad data is not an outage of the API"
    );
    h.stop().await;
}

/// A lookup has one time budget for all its requests (twice query_timeout), not one per
/// request: on a slow API, an ASID that no catalogue interaction's `/Device` search finds is a
/// backend error once the budget is spent, not one slow request per catalogue interaction later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_ends_when_its_time_budget_is_spent() {
    let api = FhirApi::start(&world_ldif(), None).await;
    let catalogue = Catalogue::load(&repo_path("config/interactions.toml")).expect("catalogue");
    let interactions: Vec<String> = catalogue.iter().map(|i| i.id.clone()).collect();
    assert!(
        interactions.len() >= 10,
        "the catalogue has many interactions"
    );
    let unknown = "123456789012";
    let settings = FhirSettings {
        base_url: api.base_url(),
        api_key_file: key_file(API_KEY),
        ca: None,
        // Practice B82617 has Devices, none with this ASID: every interaction is searched.
        asid_ods: [(unknown.to_string(), "B82617".to_string())].into(),
        connect_timeout: Duration::from_secs(5),
        query_timeout: Duration::from_millis(600),
    };
    let fhir = FhirBackend::new(&settings, interactions.clone()).expect("FHIR backend");

    // Fast: every interaction is searched and the ASID is not registered.
    assert_eq!(fhir.party(unknown).await.expect("lookup"), None);
    assert_eq!(api.seen().len(), interactions.len());

    // Slow (each answer well within query_timeout, all of them far past the budget of 1.2 s).
    api.delay_ms.store(300, Ordering::SeqCst);
    let asked = api.seen().len();
    let err = fhir
        .party(unknown)
        .await
        .expect_err("the budget is spent")
        .to_string();
    assert!(
        err.contains(&format!(
            "the lookup of ASID {unknown} did not finish within 1.2s"
        )),
        "{err}"
    );
    let searched = api.seen().len() - asked;
    assert!(
        searched < interactions.len() / 2,
        "{searched} of {} searches made",
        interactions.len()
    );
}
