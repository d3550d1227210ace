//! `cargo bench --bench micro`: criterion micro-benches of the pure functions on the request
//! path, each with the inputs of a real GP Connect slot search from the development world —
//! envelope parse, interaction match, directory cache hit, endpoint check (authorise), JWT check,
//! OperationOutcome render — plus the per-request id the gateway makes. Figures in README
//! ("Hot functions"). Run by `cargo test`, each bench runs once as a test.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue, Method};
use ssp_gateway::authorise::{authorise, Facts};
use ssp_gateway::directory::ldif::LdifBackend;
use ssp_gateway::directory::{CachePolicy, Directory};
use ssp_gateway::ssp::envelope::{parse_headers, parse_target};
use ssp_gateway::ssp::interactions::Catalogue;
use ssp_gateway::ssp::jwt;
use ssp_gateway::ssp::outcome::{self, Format, Rejection};
use ssp_gateway::tls::PeerIdentity;

const FROM: &str = "200000000359";
const TO: &str = "918999198993";
const SLOT: &str = "urn:nhs:names:services:gpconnect:fhir:rest:search:slot-1";
/// A slot search as a consumer sends it through the gateway (path and query of the request).
const PATH_AND_QUERY: &str = "/https://localhost:9443/B82617/STU3/1/gpconnect/Slot?status=free\
     &start=ge2026-11-26&end=le2026-12-02&_include=Slot%3Aschedule\
     &_include%3Arecurse=Schedule%3Aactor%3APractitioner\
     &searchFilter=https%3A%2F%2Ffhir.nhs.uk%2FId%2Fods-organization-code%7CA20047";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn ssp_headers(token: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        "ssp-traceid",
        HeaderValue::from_static("5a5fd3f2-0d6f-4a64-8a31-6b0d2a5c6f11"),
    );
    h.insert("ssp-from", HeaderValue::from_static(FROM));
    h.insert("ssp-to", HeaderValue::from_static(TO));
    h.insert("ssp-interactionid", HeaderValue::from_static(SLOT));
    h.insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {token}")).expect("token is a header value"),
    );
    h.insert("accept", HeaderValue::from_static("application/fhir+json"));
    h.insert("host", HeaderValue::from_static("localhost:8443"));
    h
}

fn catalogue() -> Catalogue {
    Catalogue::load(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/interactions.toml"),
    )
    .expect("config/interactions.toml loads")
}

fn directory(rt: &tokio::runtime::Runtime) -> Directory {
    let backend = LdifBackend::from_path(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/directory.ldif"),
    )
    .expect("config/directory.ldif loads");
    let directory = Directory::new(Arc::new(backend), CachePolicy::default());
    // Warm the cache.
    rt.block_on(async {
        for asid in [FROM, TO] {
            directory
                .party(asid)
                .await
                .expect("lookup")
                .expect("registered");
        }
    });
    directory
}

fn benches(c: &mut Criterion) {
    let token = jwt::encode_unsigned(&jwt::dev_claims(
        "organization/*.read",
        now(),
        "https://localhost:9443/B82617/STU3/1/gpconnect",
    ));
    let headers = ssp_headers(&token);
    let catalogue = catalogue();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let directory = directory(&rt);

    c.bench_function("envelope parse (target + Ssp headers)", |b| {
        b.iter(|| {
            let target = parse_target(std::hint::black_box(PATH_AND_QUERY)).expect("target");
            let ssp = parse_headers(std::hint::black_box(&headers)).expect("headers");
            (target, ssp)
        })
    });

    let target = parse_target(PATH_AND_QUERY).expect("target");
    let ssp = parse_headers(&headers).expect("headers");
    c.bench_function("interaction match (catalogue get + method/path)", |b| {
        b.iter(|| {
            let ix = catalogue
                .get(std::hint::black_box(SLOT))
                .expect("known interaction");
            ix.match_request(&Method::GET, std::hint::black_box(&target))
                .map(|m| m.relative.len())
                .expect("matches")
        })
    });

    c.bench_function("directory cache hit (both parties)", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let from = directory.party(std::hint::black_box(FROM)).await;
                    let to = directory.party(std::hint::black_box(TO)).await;
                    let _ = std::hint::black_box((from, to));
                }
                start.elapsed()
            })
        })
    });

    let interaction = catalogue.get(SLOT).expect("known interaction");
    let matched = interaction
        .match_request(&Method::GET, &target)
        .expect("matches");
    let (sender, receiver) = rt.block_on(async {
        (
            directory.party(FROM).await.expect("lookup"),
            directory.party(TO).await.expect("lookup"),
        )
    });
    let peer = PeerIdentity {
        names: vec!["consumer.dev.local".into()],
        ..PeerIdentity::default()
    };
    c.bench_function("endpoint check (authorise)", |b| {
        b.iter(|| {
            authorise(std::hint::black_box(&Facts {
                headers: &ssp,
                interaction,
                target: &target,
                matched: &matched,
                peer: &peer,
                sender: sender.as_deref(),
                receiver: receiver.as_deref(),
                sharing_agreements: None,
            }))
            .map(|h| h.endpoint.len())
            .expect("authorised")
        })
    });

    let authorization = headers.get("authorization").cloned();
    let scopes = interaction.scopes.clone();
    c.bench_function("JWT check (decode + GP Connect rules)", |b| {
        b.iter(|| {
            jwt::check(
                std::hint::black_box(authorization.as_ref()),
                &scopes,
                now(),
                60,
            )
            .expect("valid token")
        })
    });

    let rejection = Rejection::AsidCheckFailed {
        sender: "200000000360".into(),
    };
    let id = uuid::Uuid::new_v4().to_string();
    c.bench_function("OperationOutcome render (JSON)", |b| {
        b.iter(|| outcome::render(std::hint::black_box(&rejection), Format::Json, &id))
    });
    c.bench_function("OperationOutcome render (XML)", |b| {
        b.iter(|| outcome::render(std::hint::black_box(&rejection), Format::Xml, &id))
    });

    c.bench_function("request id (telemetry::new_request_id + to_string)", |b| {
        b.iter(|| ssp_gateway::telemetry::new_request_id().to_string())
    });
}

criterion_group! {
    name = micro;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = benches
}
criterion_main!(micro);
