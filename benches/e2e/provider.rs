//! The bench's provider: the bench binary run again as a separate process
//! (`SSP_E2E_ROLE=provider`), an mTLS HTTP/1.1 server on one thread answering from memory so
//! that its own cost is small and the same for every target. `GET …/Slot` answers the 4.9 KB
//! specification Bundle, or the recorded 178 KB Bundle when the query has `bench-bundle=178k`;
//! `POST …/Appointment` reads the body and answers 201 with the booked Appointment;
//! `GET …/metadata` a small CapabilityStatement.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use ssp_gateway::server::RequestBody;
use ssp_gateway::server::{serve_tls, ServeOptions};
use ssp_gateway::tls::ServerTls;
use tokio_util::sync::CancellationToken;

/// The specification's free-slot searchset Bundle (4.9 KB).
pub static SLOT_BUNDLE_4K: &[u8] =
    include_bytes!("../fixtures/slot-search-response.spec-1.2.7-example.json");
/// The recorded booking request (also the `--book-body` of the POST workload).
pub static BOOKING_REQUEST: &[u8] = include_bytes!(
    "../../src/mock_provider/fixtures/appointment-create-request.demonstrator-1.2.7-recorded.json"
);
/// The query parameter that selects the 178 KB Bundle.
pub const LARGE_BUNDLE_PARAM: &str = "bench-bundle=178k";

const FHIR_JSON: HeaderValue = HeaderValue::from_static("application/fhir+json;charset=utf-8");

/// Bodies served, made once.
#[derive(Clone)]
struct Bodies {
    small: Bytes,
    large: Bytes,
    booked: Bytes,
    metadata: Bytes,
}

fn bodies() -> Bodies {
    let mut booked: serde_json::Value =
        serde_json::from_slice(BOOKING_REQUEST).unwrap_or_else(|_| serde_json::json!({}));
    booked["id"] = "53".into();
    booked["meta"]["versionId"] = "1".into();
    let metadata = serde_json::json!({
        "resourceType": "CapabilityStatement",
        "version": "1.2.7",
        "name": "ssp-gateway e2e bench provider",
        "status": "active",
        "fhirVersion": "3.0.1",
        "format": ["application/fhir+json"]
    });
    Bodies {
        small: Bytes::from_static(SLOT_BUNDLE_4K),
        large: ssp_gateway::mock_provider::slot_bundle_fixture(),
        booked: Bytes::from(booked.to_string()),
        metadata: Bytes::from(metadata.to_string()),
    }
}

fn respond(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, FHIR_JSON);
    resp
}

async fn answer(bodies: Bodies, req: Request<RequestBody>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let large = req
        .uri()
        .query()
        .is_some_and(|q| q.contains(LARGE_BUNDLE_PARAM));
    match (req.method().clone(), path.rsplit('/').next().unwrap_or("")) {
        (Method::GET, "Slot") if large => respond(StatusCode::OK, bodies.large),
        (Method::GET, "Slot") => respond(StatusCode::OK, bodies.small),
        (Method::GET, "metadata") => respond(StatusCode::OK, bodies.metadata),
        (Method::POST, "Appointment") => {
            // Read the whole body, as a provider must before answering.
            if req.into_body().collect().await.is_err() {
                return respond(StatusCode::BAD_REQUEST, Bytes::new());
            }
            let mut resp = respond(StatusCode::CREATED, bodies.booked);
            resp.headers_mut()
                .insert(header::LOCATION, HeaderValue::from_static("Appointment/53"));
            resp
        }
        _ => respond(StatusCode::NOT_FOUND, Bytes::new()),
    }
}

/// Runs the provider until SIGTERM: address in `SSP_E2E_ADDR`, certificates in `SSP_E2E_DIR`.
pub fn main() -> ExitCode {
    let (Ok(addr), Ok(dir)) = (
        std::env::var("SSP_E2E_ADDR"),
        std::env::var("SSP_E2E_DIR").map(PathBuf::from),
    ) else {
        eprintln!("provider: SSP_E2E_ADDR and SSP_E2E_DIR must be set");
        return ExitCode::FAILURE;
    };
    let Ok(addr) = addr.parse::<SocketAddr>() else {
        eprintln!("provider: SSP_E2E_ADDR `{addr}` is not an address");
        return ExitCode::FAILURE;
    };
    let tls = ssp_gateway::tls::listener_tls(
        &ServerTls {
            cert: dir.join("provider.pem"),
            key: dir.join("provider-key.pem"),
            client_ca: dir.join("ca.pem"),
            crls: vec![],
        },
        &[b"http/1.1"],
    );
    let tls = match tls {
        Ok(t) => t,
        Err(e) => {
            eprintln!("provider: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("provider: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("provider: bind {addr}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let stop = CancellationToken::new();
        {
            let stop = stop.clone();
            tokio::spawn(async move {
                if let Ok(mut term) =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                {
                    term.recv().await;
                }
                stop.cancel();
            });
        }
        let opts = ServeOptions {
            name: "bench-provider",
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(300),
            http2: false,
            grace_period: Duration::from_millis(200),
            limits: Default::default(),
        };
        let bodies = bodies();
        let tls = ssp_gateway::reload::Reloadable::new(
            "bench provider TLS",
            std::sync::Arc::new(tls),
            vec![],
        );
        serve_tls(listener, tls, opts, stop, move |_conn, req| {
            answer(bodies.clone(), req)
        })
        .await;
        ExitCode::SUCCESS
    })
}
