//! One conformance suite, every backend: the same directory questions asked of the LDIF file,
//! a real slapd loaded with the same file (LDAP backend), and an SDS FHIR API serving the same
//! file (FHIR backend) get the same answers on the development world. Also the LDAP backend's
//! own SDS searches against slapd (route lookup, party key case, filter escaping), LDAPS with a
//! client certificate, and reconnection after slapd restarts.

mod common;
mod directory_support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use directory_support::{FhirApi, Slapd, SlapdTls, API_KEY};
use ssp_gateway::directory::fhir::{FhirBackend, FhirSettings};
use ssp_gateway::directory::ldap::{LdapBackend, LdapSettings, DEFAULT_SEARCH_BASE};
use ssp_gateway::directory::ldif::LdifBackend;
use ssp_gateway::directory::{DirectoryBackend, Party};
use ssp_gateway::ssp::interactions::Catalogue;
use ssp_gateway::tls::ClientTls;

/// ASIDs asked of every backend: the three parties, and ASIDs nobody registered (one of them
/// mapped to a real ODS code for the FHIR backend, so it is searched for and not found).
const ASIDS: [&str; 5] = [
    PROVIDER_ASID,
    CONSUMER_ASID,
    READONLY_ASID,
    "918999198994",
    "123456789012",
];

fn world_ldif() -> String {
    std::fs::read_to_string(repo_path("config/directory.ldif")).expect("read LDIF")
}

fn catalogue() -> Catalogue {
    Catalogue::load(&repo_path("config/interactions.toml")).expect("catalogue")
}

fn ldap(url: String, tls: Option<ClientTls>) -> LdapBackend {
    LdapBackend::new(LdapSettings {
        url,
        search_base: DEFAULT_SEARCH_BASE.into(),
        tls,
        connect_timeout: Duration::from_secs(5),
        query_timeout: Duration::from_secs(5),
    })
    .expect("LDAP backend")
}

fn fhir(api: &FhirApi) -> FhirBackend {
    let dir = scratch_dir("fhir-key");
    let key = dir.join("apikey");
    std::fs::write(&key, format!("{API_KEY}\n")).expect("write key");
    let asid_ods: BTreeMap<String, String> = [
        (PROVIDER_ASID, "B82617"),
        (CONSUMER_ASID, "A20047"),
        (READONLY_ASID, "A20048"),
        ("918999198994", "B82617"),
    ]
    .into_iter()
    .map(|(a, o)| (a.to_string(), o.to_string()))
    .collect();
    let settings = FhirSettings {
        base_url: api.base_url(),
        api_key_file: key,
        ca: None,
        asid_ods,
        connect_timeout: Duration::from_secs(5),
        query_timeout: Duration::from_secs(5),
    };
    let interactions = catalogue().iter().map(|i| i.id.clone()).collect();
    FhirBackend::new(&settings, interactions).expect("FHIR backend")
}

/// A party in a canonical form: handlers ordered by MHS id, interactions, FQDNs and what
/// cannot be used sorted. Order carries no meaning in SDS (multi-valued attributes and search
/// results are sets).
fn canonical(party: Option<Party>) -> Option<Party> {
    party.map(|mut p| {
        p.system.interactions.sort();
        p.handlers.sort_by(|a, b| a.id.cmp(&b.id));
        p.registered_fqdns.sort();
        for u in &mut p.unusable {
            u.handlers.sort();
        }
        p.unusable
            .sort_by(|a, b| (&a.interaction, &a.handlers).cmp(&(&b.interaction, &b.handlers)));
        p
    })
}

/// What the FHIR API can say: everything but the product name and version.
fn without_product(party: Option<Party>) -> Option<Party> {
    party.map(|mut p| {
        p.system.product_name = None;
        p.system.product_version = None;
        p
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ldif_ldap_and_fhir_give_the_same_answers_on_the_development_world() {
    let ldif_text = world_ldif();
    let slapd = Slapd::start(&ldif_text, None);
    let api = FhirApi::start(&ldif_text, None).await;

    let ldif = LdifBackend::from_path(repo_path("config/directory.ldif")).expect("LDIF");
    let ldap = ldap(slapd.url(), None);
    let fhir = fhir(&api);
    assert_eq!(
        (ldif.name(), ldap.name(), fhir.name()),
        ("ldif", "ldap", "fhir")
    );

    for asid in ASIDS {
        let expected = canonical(DirectoryBackend::party(&ldif, asid).await.expect("ldif"));
        let from_ldap = canonical(DirectoryBackend::party(&ldap, asid).await.expect("ldap"));
        let from_fhir = canonical(DirectoryBackend::party(&fhir, asid).await.expect("fhir"));
        assert_eq!(from_ldap, expected, "LDAP vs LDIF for {asid}");
        assert_eq!(
            from_fhir,
            without_product(expected.clone()),
            "FHIR vs LDIF for {asid}"
        );
    }

    // The answers are the development world, not three agreeing empties.
    let provider = DirectoryBackend::party(&ldap, PROVIDER_ASID)
        .await
        .expect("ldap")
        .expect("provider registered");
    assert_eq!(provider.handlers.len(), 15);
    assert_eq!(provider.fqdns().collect::<Vec<_>>(), ["localhost"]);
    assert_eq!(
        provider.system.product_name.as_deref(),
        Some("ssp-gateway mock provider")
    );
    let consumer = DirectoryBackend::party(&fhir, CONSUMER_ASID)
        .await
        .expect("fhir")
        .expect("consumer registered");
    assert_eq!(consumer.fqdns().collect::<Vec<_>>(), ["consumer.dev.local"]);
    assert!(consumer.may(IX_BOOK));
    assert!(consumer.handler_for(IX_BOOK).is_none());

    // Every FHIR request carried the API key, a UUID correlation id and the FHIR media type.
    let seen = api.seen();
    assert!(!seen.is_empty());
    for s in &seen {
        assert_eq!(s.apikey.as_deref(), Some(API_KEY), "{s:?}");
        let id = s.correlation_id.as_deref().expect("X-Correlation-Id");
        assert!(uuid::Uuid::parse_str(id).is_ok(), "{id}");
        assert_eq!(s.accept.as_deref(), Some("application/fhir+json"));
        assert!(
            s.path_and_query
                .starts_with("/spine-directory/FHIR/R4/Device?organization=")
                || s.path_and_query
                    .starts_with("/spine-directory/FHIR/R4/Endpoint?organization="),
            "{s:?}"
        );
    }
    let ids: std::collections::HashSet<_> = seen.iter().map(|s| &s.correlation_id).collect();
    assert_eq!(ids.len(), seen.len(), "a fresh correlation id per request");
}

/// Real SDS data's quirks ([`directory_support::quirky_world`]) take no party down, on any
/// backend: an unforwardable endpoint, two endpoints, or two handlers for one catalogue
/// interaction make that interaction unusable for the party, with the same reason from every
/// backend, and leave its other interactions and its FQDNs; a consumer's OpenTest-like handler
/// outside the catalogue only supplies its FQDN; values with a trailing space are used trimmed;
/// and an MHS record of another organisation under the party key, or of its ODS code in another
/// case (`nhsIDCode` is `caseExactMatch`), is not the party's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_sds_quirks_take_out_one_interaction_not_the_party_on_every_backend() {
    let ldif_text = directory_support::quirky_world(&world_ldif());
    let slapd = Slapd::start(&ldif_text, None);
    let api = FhirApi::start(&ldif_text, None).await;
    let ldif = LdifBackend::parse(&ldif_text, "quirky world").expect("the LDIF loads");
    let ldap = ldap(slapd.url(), None);
    let fhir = fhir(&api);

    for asid in ASIDS {
        let expected = canonical(DirectoryBackend::party(&ldif, asid).await.expect("ldif"));
        let from_ldap = canonical(DirectoryBackend::party(&ldap, asid).await.expect("ldap"));
        let from_fhir = canonical(DirectoryBackend::party(&fhir, asid).await.expect("fhir"));
        assert_eq!(from_ldap, expected, "LDAP vs LDIF for {asid}");
        assert_eq!(
            from_fhir,
            without_product(expected.clone()),
            "FHIR vs LDIF for {asid}"
        );
    }

    // What they agree on.
    let provider = canonical(
        DirectoryBackend::party(&ldap, PROVIDER_ASID)
            .await
            .expect("ldap"),
    )
    .expect("provider");
    assert_eq!(provider.handlers.len(), 12, "15 less three unusable");
    for usable in [IX_READ_LOCATION, IX_SEARCH_ORGANIZATION, IX_BOOK] {
        assert!(provider.may(usable), "{usable}");
        assert!(provider.handler_for(usable).is_some(), "{usable}");
    }
    let reasons: Vec<(&str, Vec<&str>, &str)> = provider
        .unusable
        .iter()
        .map(|u| {
            (
                u.interaction.as_str(),
                u.handlers.iter().map(String::as_str).collect(),
                u.reason.as_str(),
            )
        })
        .collect();
    assert_eq!(reasons.len(), 3, "{reasons:#?}");
    assert_eq!(
        reasons[0],
        (
            IX_METADATA,
            vec![directory_support::METADATA_MHS],
            "nhsMHSEndPoint \"https://localhost:9443/B82617/STU3/1/gpconnect/\": not an https:// \
             endpoint the gateway can forward to (host, port 1-65535, a path of non-empty \
             segments, no query)"
        )
    );
    assert_eq!(reasons[1].0, IX_READ_PATIENT);
    assert!(
        reasons[1].2.starts_with("2 nhsMHSEndPoint values"),
        "{reasons:#?}"
    );
    assert_eq!(reasons[2].0, IX_SEARCH_SLOT);
    assert!(reasons[2]
        .1
        .contains(&directory_support::DUPLICATE_SLOT_MHS));
    assert!(reasons[2]
        .2
        .starts_with("2 message handlers for one interaction under party key B82617-0000806"));
    for unusable in [IX_METADATA, IX_READ_PATIENT, IX_SEARCH_SLOT] {
        assert!(provider.handler_for(unusable).is_none(), "{unusable}");
    }
    assert_eq!(
        provider.fqdns().collect::<Vec<_>>(),
        ["localhost"],
        "another organisation's handler, and one of its ODS code in lower case, give no FQDN"
    );
    assert!(provider.handler_for(IX_SEARCH_PRACTITIONER).is_some());
    let consumer = DirectoryBackend::party(&fhir, CONSUMER_ASID)
        .await
        .expect("fhir")
        .expect("consumer");
    assert_eq!(consumer.system.party_key, "A20047-821870");
    assert!(consumer.unusable.is_empty(), "{:?}", consumer.unusable);
    assert!(consumer.has_fqdn("consumer.dev.local") && consumer.has_fqdn("opentest.dev.local"));

    // The LDIF backend says so at load, each with its line; the same file without the quirks
    // says nothing.
    let warnings = ldif.warnings();
    let unusable: Vec<&String> = warnings
        .iter()
        .filter(|w| w.contains("the interaction is refused for this party"))
        .collect();
    assert_eq!(unusable.len(), 3, "{warnings:#?}");
    assert!(
        unusable.iter().all(|w| w.starts_with("line")),
        "{warnings:#?}"
    );
    assert_eq!(
        warnings
            .iter()
            .filter(|w| w.contains("white space removed"))
            .count(),
        3,
        "{warnings:#?}"
    );
    assert!(
        !warnings
            .iter()
            .any(|w| w.contains(directory_support::OPENTEST_MHS)),
        "{warnings:#?}"
    );
    assert!(LdifBackend::parse(&world_ldif(), "world")
        .expect("world")
        .warnings()
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ldap_backend_asks_the_sds_questions_exactly() {
    let slapd = Slapd::start(&world_ldif(), None);
    let ldap = ldap(slapd.url(), None);
    let ldif = LdifBackend::development_world().expect("LDIF");
    let provider = ldif.lookup(PROVIDER_ASID).expect("provider");

    // Route lookup: the message handler of a party key and ODS code for one interaction.
    let handler = ldap
        .handler("B82617-0000806", "B82617", IX_SEARCH_SLOT)
        .await
        .expect("search")
        .expect("found");
    assert_eq!(Some(&handler), provider.handler_for(IX_SEARCH_SLOT));
    assert_eq!(
        ldap.handler("A20047-821870", "A20047", IX_SEARCH_SLOT)
            .await
            .expect("search"),
        None,
        "a consumer registers no GP Connect endpoint"
    );
    // Interactions match case-exactly, party keys case-insensitively (the schema's rules).
    assert_eq!(
        ldap.handler("B82617-0000806", "B82617", &IX_SEARCH_SLOT.to_uppercase())
            .await
            .expect("search"),
        None
    );
    assert_eq!(
        ldap.handler("B82617-0000806", "A20047", IX_SEARCH_SLOT)
            .await
            .expect("search"),
        None,
        "the ODS code joins the route lookup too"
    );
    let by_lower = ldap
        .handlers("b82617-0000806", "B82617")
        .await
        .expect("search");
    assert_eq!(by_lower.len(), 15);
    // The ODS code joins too, exactly (`nhsIDCode` is caseExactMatch in SDS).
    assert!(ldap
        .handlers("B82617-0000806", "A20047")
        .await
        .expect("search")
        .is_empty());
    assert!(ldap
        .handlers("B82617-0000806", "b82617")
        .await
        .expect("search")
        .is_empty());

    // Filter values are escaped: a `*` is a character, not a wildcard; a `)(` cannot widen.
    assert!(ldap
        .handlers("B82617-*", "B82617")
        .await
        .expect("search")
        .is_empty());
    assert!(ldap.handlers("*", "*").await.expect("search").is_empty());
    assert!(ldap
        .handlers("B82617-0000806)(objectClass=*", "B82617")
        .await
        .expect("search")
        .is_empty());
    assert!(ldap
        .handlers("B82617-0000806", "B82617)(objectClass=*")
        .await
        .expect("search")
        .is_empty());
    assert_eq!(ldap.system("9*").await.expect("search"), None);

    // One connection serves every search.
    for asid in ASIDS {
        DirectoryBackend::party(&ldap, asid).await.expect("party");
    }
    assert_eq!(ldap.connections_opened(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_route_lookup_and_the_party_lookup_join_by_ods_code_alike() {
    // Under the provider's party key, a handler of another organisation (X99999) for
    // search:organization-1 beside the provider's own: each ODS code sees only its own, and
    // for every interaction of the provider the route lookup answers what the party has.
    let slapd = Slapd::start(&directory_support::quirky_world(&world_ldif()), None);
    let ldap = ldap(slapd.url(), None);
    let party = DirectoryBackend::party(&ldap, PROVIDER_ASID)
        .await
        .expect("party")
        .expect("the provider");
    let records = ldap
        .handlers("B82617-0000806", "B82617")
        .await
        .expect("search");
    let mut interactions: Vec<&str> = records.iter().map(|r| r.interaction.as_str()).collect();
    interactions.sort_unstable();
    interactions.dedup();
    assert!(
        interactions.contains(&IX_SEARCH_ORGANIZATION),
        "{interactions:?}"
    );
    for interaction in interactions {
        assert_eq!(
            ldap.handler("B82617-0000806", "B82617", interaction)
                .await
                .expect("search")
                .as_ref(),
            party.handler_for(interaction),
            "{interaction}"
        );
    }
    let own = ldap
        .handler("B82617-0000806", "B82617", IX_SEARCH_ORGANIZATION)
        .await
        .expect("search")
        .expect("the provider's own handler, not made unusable by the other's");
    assert_eq!(own.ods_code, "B82617");
    assert_ne!(own.id, directory_support::OTHER_ODS_MHS);
    let other = ldap
        .handler("B82617-0000806", "X99999", IX_SEARCH_ORGANIZATION)
        .await
        .expect("search")
        .expect("the other organisation's handler");
    assert_eq!(other.id, directory_support::OTHER_ODS_MHS);
    assert_eq!(other.fqdn, "rogue.dev.local");
    assert_eq!(
        ldap.handler("B82617-0000806", "X99999", IX_SEARCH_SLOT)
            .await
            .expect("search"),
        None,
        "X99999 has no slot handler under this party key"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ldap_backend_reconnects_after_slapd_restarts() {
    let mut slapd = Slapd::start(&world_ldif(), None);
    let ldap = ldap(slapd.url(), None);
    assert!(DirectoryBackend::party(&ldap, PROVIDER_ASID)
        .await
        .expect("party")
        .is_some());
    assert_eq!(ldap.connections_opened(), 1);

    slapd.stop();
    let err = DirectoryBackend::party(&ldap, PROVIDER_ASID)
        .await
        .expect_err("slapd is down");
    assert!(
        err.to_string().starts_with("directory backend ldap: "),
        "{err}"
    );

    slapd.start_again();
    assert!(DirectoryBackend::party(&ldap, PROVIDER_ASID)
        .await
        .expect("the first query after the restart succeeds")
        .is_some());
    assert_eq!(ldap.connections_opened(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ldap_backend_speaks_ldaps_with_a_client_certificate() {
    let world = World::ecdsa();
    let slapd = Slapd::start(&world_ldif(), Some(SlapdTls::of_provider(&world)));
    let client = |pair: &Pair| ClientTls {
        cert: pair.cert.clone(),
        key: pair.key.clone(),
        ca: world.ca.clone(),
        crls: Vec::new(),
    };

    let ldaps = ldap(slapd.ldaps_url(), Some(client(&world.gateway_client)));
    let provider = DirectoryBackend::party(&ldaps, PROVIDER_ASID)
        .await
        .expect("ldaps query")
        .expect("provider");
    assert_eq!(provider.system.party_key, "B82617-0000806");

    // slapd demands a client certificate from its CA: one from another CA fails.
    let untrusted = ldap(slapd.ldaps_url(), Some(client(&world.untrusted)));
    let err = DirectoryBackend::party(&untrusted, PROVIDER_ASID)
        .await
        .expect_err("untrusted client certificate");
    assert!(err.to_string().contains("directory backend ldap"), "{err}");

    // And the gateway verifies the server: a CA that did not issue slapd's certificate fails.
    let other = World::ecdsa();
    let wrong_ca = ldap(
        slapd.ldaps_url(),
        Some(ClientTls {
            ca: other.ca.clone(),
            crls: Vec::new(),
            ..client(&world.gateway_client)
        }),
    );
    assert!(DirectoryBackend::party(&wrong_ca, PROVIDER_ASID)
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_lookups_share_one_ldap_connection() {
    let slapd = Slapd::start(&world_ldif(), None);
    let ldap = Arc::new(ldap(slapd.url(), None));
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let ldap = ldap.clone();
            tokio::spawn(async move {
                let asid = ASIDS[i % ASIDS.len()];
                DirectoryBackend::party(ldap.as_ref(), asid).await
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("task").expect("party");
    }
    assert_eq!(ldap.connections_opened(), 1);
}
