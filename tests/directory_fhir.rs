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

/// Options for a gateway on the FHIR backend: the API serves the gateway's development world
/// (its endpoints moved to the test provider), edited by `edit`, for the provider's and the
/// consumer's ASIDs; what it serves is kept in the returned LDIF.
fn served_by(
    api: &Arc<FhirApi>,
    edit: impl Fn(&str) -> String + 'static,
) -> (GatewayOptions, Arc<Mutex<String>>) {
    let key = key_file(API_KEY);
    let serving = api.clone();
    let base = api.base_url();
    let served = Arc::new(Mutex::new(String::new()));
    let kept = served.clone();
    let opts = GatewayOptions {
        directory: Some(Box::new(move |ldif: &str| {
            let ldif = edit(ldif);
            serving.serve(&ldif);
            *kept.lock().expect("lock") = ldif;
            format!(
                "backend = \"fhir\"\nfhir_base_url = \"{base}\"\nfhir_api_key_file = \"{}\"\n\
                 fhir_asid_ods = {{ \"{PROVIDER_ASID}\" = \"B82617\", \"{CONSUMER_ASID}\" = \"A20047\" }}\n",
                key.display()
            )
        })),
        ..Default::default()
    };
    (opts, served)
}

/// The consumer's own MHS record's CPA id line in the development LDIF.
const CONSUMER_CPA_ID: &str = "nhsMhsCPAId: f547f3250008191f91b9\n";

/// While the directory fails, a sender it did answer for (cached) and that fails the sender's
/// checks is refused as such, 403 `ASID_CHECK_FAILED_MESSAGESENDER`, as the documented order
/// (sender, identity, receiver) says, not 503 because the receiver's lookup failed beside it.
/// Nothing reaches the provider either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_sender_that_fails_is_refused_as_such_while_the_directory_fails() {
    let api = Arc::new(FhirApi::start("", None).await);
    let (opts, _served) = served_by(&api, str::to_string);
    let h = start_with_recorder(World::ecdsa(), Behaviour::Echo, opts).await;
    let directory = h.directory();
    // The read-only consumer is not in fhir_asid_ods: "not registered", cached.
    assert_eq!(directory.party(READONLY_ASID).await.expect("lookup"), None);
    api.failing.store(true, Ordering::SeqCst);
    let from_unregistered = Gpc::new(
        Method::GET,
        format!("{}/metadata", h.endpoint()),
        IX_METADATA,
    )
    .from(READONLY_ASID);
    h.consumer().gpc(from_unregistered).await.assert_outcome(
        403,
        Some("ACCESS_DENIED"),
        &format!("ASID_CHECK_FAILED_MESSAGESENDER_{READONLY_ASID}"),
    );
    // A sender the directory cannot answer for: 503.
    h.consumer_metadata().await.assert_outcome(
        503,
        Some("INTERNAL_SERVER_ERROR"),
        "DIRECTORY_UNAVAILABLE",
    );
    assert_eq!(h.recorder.seen(), 0);
    h.stop().await;
}

/// `/readyz` follows whether the API answers, not what the last lookup did: cached "not
/// found" answers are no fallback during an outage; after the API recovers, the gateway's
/// prober finds it and it is ready again with no request through the gateway (an unready pod
/// gets none); and a
/// lookup that fails on one party's bad data, with nothing cached, is not taken for an outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_api_not_the_last_lookup() {
    let api = Arc::new(FhirApi::start("", None).await);
    let (opts, served) = served_by(&api, str::to_string);
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

    // One party's bad data (an Endpoint without the CPA id every MHS record has): with nothing
    // cached its lookup fails, but the API answers, so the gateway stays ready.
    let broken = served.lock().expect("lock").replace(CONSUMER_CPA_ID, "");
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
    assert!(err.to_string().contains("nhsMhsCPAId"), "{err}");
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

/// A Device with the ASID that is not `active` ends the lookup: the ASID is not registered,
/// found by the first `/Device` search, with no other search (each would find the same Device)
/// and no `/Endpoint` search.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inactive_device_ends_the_lookup_as_not_registered() {
    let api = FhirApi::start(&world_ldif(), None).await;
    let fhir = backend(api.base_url(), API_KEY, None);
    assert!(fhir.party(CONSUMER_ASID).await.expect("lookup").is_some());
    let active = api.seen().len();
    api.statuses
        .lock()
        .expect("lock")
        .insert(CONSUMER_ASID.into(), "inactive".into());
    assert_eq!(fhir.party(CONSUMER_ASID).await.expect("lookup"), None);
    let seen = api.seen()[active..].to_vec();
    assert_eq!(seen.len(), 1, "{seen:#?}");
    assert!(seen[0].path_and_query.contains("/Device?"), "{seen:#?}");
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
        interactions.len() >= 13,
        "the catalogue has more interactions than two rounds of searches"
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

    // Slow: each answer within query_timeout, but the first search alone and then two rounds
    // of six take 1.5 s, past the budget of 1.2 s.
    api.delay_ms.store(500, Ordering::SeqCst);
    let started = std::time::Instant::now();
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
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1200) && took < Duration::from_millis(1450),
        "the budget, not the searches, ended it: {took:?}"
    );
}

/// The `/Device` searches of a lookup after the first run six at a time, answers taken in
/// catalogue order: a party found only by the catalogue's last interactions (an Access Record
/// Structured provider) takes about four round trips (and one more for `/Endpoint`), where one
/// search at a time would spend the whole budget (16 × 0.25 s, against 2 × 1 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_searches_run_six_at_a_time() {
    let structured = "urn:nhs:names:services:gpconnect:fhir:operation:gpc.getstructuredrecord-1";
    let ldif = world_ldif()
        .lines()
        .filter(|l| !l.starts_with("nhsAsSvcIA: "))
        .collect::<Vec<_>>()
        .join("\n")
        .replace(
            "uniqueIdentifier: 918999198993\n",
            &format!("uniqueIdentifier: 918999198993\nnhsAsSvcIA: {structured}\n"),
        );
    let api = FhirApi::start(&ldif, None).await;
    let catalogue = Catalogue::load(&repo_path("config/interactions.toml")).expect("catalogue");
    let interactions: Vec<String> = catalogue.iter().map(|i| i.id.clone()).collect();
    let position = interactions
        .iter()
        .position(|i| i == structured)
        .expect("in the catalogue");
    assert!(position >= 12, "found late in the catalogue: {position}");
    let settings = FhirSettings {
        base_url: api.base_url(),
        api_key_file: key_file(API_KEY),
        ca: None,
        asid_ods: [(PROVIDER_ASID.to_string(), "B82617".to_string())].into(),
        connect_timeout: Duration::from_secs(5),
        query_timeout: Duration::from_secs(1),
    };
    let fhir = FhirBackend::new(&settings, interactions.clone()).expect("FHIR backend");
    api.delay_ms.store(250, Ordering::SeqCst);
    let started = std::time::Instant::now();
    let provider = fhir
        .party(PROVIDER_ASID)
        .await
        .expect("within the budget")
        .expect("registered");
    let took = started.elapsed();
    assert_eq!(provider.system.interactions, [structured]);
    assert_eq!(provider.handlers.len(), 15);
    assert!(took < Duration::from_millis(1800), "{took:?}");
    assert_eq!(api.max_in_flight.load(Ordering::SeqCst), 6);
    // Every search up to the one that found it, and at most the five after it that were in
    // flight, then the /Endpoint search.
    let seen = api.seen();
    let devices = seen
        .iter()
        .filter(|s| s.path_and_query.contains("/Device?"))
        .count();
    assert!(
        devices > position && devices <= (position + 6).min(interactions.len()),
        "{devices} /Device searches"
    );
    assert!(seen
        .last()
        .expect("requests")
        .path_and_query
        .contains("/Endpoint?"));
}

/// The gateway on the FHIR backend with real SDS data's quirks: an interaction whose handler
/// cannot be used is refused 403 PARTYKEY_INTERACTION_CHECK_FAILED, not 503, and nothing
/// reaches the provider; the party's other interactions are forwarded; no lookup failed. An
/// Endpoint that is not `active` is not used (403), nor is a Device that is `inactive` (the
/// sender is not registered: 403 ASID_CHECK_FAILED).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_refuses_only_what_cannot_be_used_on_the_fhir_backend() {
    let api = Arc::new(FhirApi::start("", None).await);
    let (opts, served) = served_by(&api, directory_support::quirky_world);
    let h = start_with_recorder(World::ecdsa(), Behaviour::Echo, opts).await;
    let directory = h.directory();
    let location = || {
        Gpc::new(
            Method::GET,
            format!("{}/Location/1", h.endpoint()),
            IX_READ_LOCATION,
        )
    };

    let answer = h.consumer_metadata().await;
    answer.assert_outcome(
        403,
        Some("ACCESS_DENIED"),
        &format!("PARTYKEY_INTERACTION_CHECK_FAILED_MESSAGERECEIVER_{PROVIDER_ASID}"),
    );
    assert_eq!(h.recorder.seen(), 0);
    let answer = h.consumer().gpc(location()).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(h.recorder.seen(), 1);
    assert_eq!(directory.stats().backend_errors, 0);

    // The location handler's Endpoint is switched off.
    let location_mhs =
        directory_support::mhs_id(&served.lock().expect("lock"), IX_READ_LOCATION, "B82617");
    api.statuses
        .lock()
        .expect("lock")
        .insert(location_mhs, "off".into());
    let (status, _) = admin(h.admin, Method::POST, "/directory/invalidate").await;
    assert_eq!(status, 200);
    h.consumer().gpc(location()).await.assert_outcome(
        403,
        Some("ACCESS_DENIED"),
        &format!("PARTYKEY_INTERACTION_CHECK_FAILED_MESSAGERECEIVER_{PROVIDER_ASID}"),
    );
    assert_eq!(h.recorder.seen(), 1);

    // The consumer's Device is inactive.
    api.statuses
        .lock()
        .expect("lock")
        .insert(CONSUMER_ASID.into(), "inactive".into());
    let (status, _) = admin(h.admin, Method::POST, "/directory/invalidate").await;
    assert_eq!(status, 200);
    h.consumer_metadata().await.assert_outcome(
        403,
        Some("ACCESS_DENIED"),
        &format!("ASID_CHECK_FAILED_MESSAGESENDER_{CONSUMER_ASID}"),
    );
    assert_eq!(h.recorder.seen(), 1);
    assert_eq!(directory.stats().backend_errors, 0);
    h.stop().await;
}
