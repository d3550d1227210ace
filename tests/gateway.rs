//! The gateway end to end: the real gateway (library `start`, port 0) with real mTLS clients, in
//! front of the real mock provider or a recording provider.

mod common;

use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode};
use http_body_util::Full;

fn slot_query() -> String {
    let start = chrono::Utc::now().date_naive() + chrono::Duration::days(1);
    let end = start + chrono::Duration::days(13);
    format!(
        "status=free&start=ge{start}&end=le{end}&_include=Slot%3Aschedule\
         &_include%3Arecurse=Schedule%3Aactor%3APractitioner\
         &_include%3Arecurse=Schedule%3Aactor%3ALocation\
         &searchFilter=https%3A%2F%2Ffhir.nhs.uk%2FId%2Fods-organization-code%7CA20047\
         &searchFilter=https%3A%2F%2Ffhir.nhs.uk%2FSTU3%2FCodeSystem%2FGPConnect-OrganisationType-1%7Curgent-care"
    )
}

fn entries<'a>(bundle: &'a serde_json::Value, resource_type: &str) -> Vec<&'a serde_json::Value> {
    bundle["entry"]
        .as_array()
        .map(|e| {
            e.iter()
                .map(|x| &x["resource"])
                .filter(|r| r["resourceType"] == resource_type)
                .collect()
        })
        .unwrap_or_default()
}

fn id_of(v: &serde_json::Value) -> String {
    v["id"].as_str().expect("resource id").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_fifteen_interactions_work_through_the_gateway() {
    let h = start_with_mock(World::ecdsa(), GatewayOptions::default()).await;
    let c = h.consumer();
    let ep = h.endpoint();

    // Read metadata.
    let a = c
        .gpc(Gpc::new(Method::GET, format!("{ep}/metadata"), IX_METADATA))
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(a.json()["resourceType"], "CapabilityStatement");
    assert_eq!(a.json()["version"], "1.2.7");

    // Find a patient (the `|` and the system URL percent-encoded, as consumers send them).
    let a = c
        .gpc(Gpc::new(
            Method::GET,
            format!(
                "{ep}/Patient?identifier=https%3A%2F%2Ffhir.nhs.uk%2FId%2Fnhs-number%7C9000000009"
            ),
            IX_SEARCH_PATIENT,
        ))
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    let bundle = a.json();
    let patients = entries(&bundle, "Patient");
    assert_eq!(patients.len(), 1, "{bundle}");
    let patient_id = id_of(patients[0]);

    // Read the patient.
    let a = c
        .gpc(Gpc::new(
            Method::GET,
            format!("{ep}/Patient/{patient_id}"),
            IX_READ_PATIENT,
        ))
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(a.json()["resourceType"], "Patient");

    // Search for free slots, with practitioners and locations included.
    let a = c
        .gpc(Gpc::new(
            Method::GET,
            format!("{ep}/Slot?{}", slot_query()),
            IX_SEARCH_SLOT,
        ))
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    let bundle = a.json();
    let slots = entries(&bundle, "Slot");
    assert!(!slots.is_empty(), "free slots expected: {bundle}");
    assert!(!entries(&bundle, "Schedule").is_empty());
    assert!(
        slots[0]["serviceType"][0]["text"].is_string(),
        "1.2.7 serviceType.text"
    );
    let practitioners = entries(&bundle, "Practitioner");
    let locations = entries(&bundle, "Location");
    assert!(
        !practitioners.is_empty() && !locations.is_empty(),
        "{bundle}"
    );
    let sds_user_id = practitioners[0]["identifier"]
        .as_array()
        .and_then(|ids| {
            ids.iter()
                .find(|i| i["system"] == "https://fhir.nhs.uk/Id/sds-user-id")
        })
        .and_then(|i| i["value"].as_str())
        .expect("practitioner SDS user id")
        .to_string();
    let location_id = id_of(locations[0]);
    let slot = slots[0].clone();

    // Find and read a practitioner.
    let a = c
        .gpc(Gpc::new(
            Method::GET,
            format!("{ep}/Practitioner?identifier=https%3A%2F%2Ffhir.nhs.uk%2FId%2Fsds-user-id%7C{sds_user_id}"),
            IX_SEARCH_PRACTITIONER,
        ))
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    let practitioner_id = id_of(entries(&a.json(), "Practitioner")[0]);
    let a = c
        .gpc(Gpc::new(
            Method::GET,
            format!("{ep}/Practitioner/{practitioner_id}"),
            IX_READ_PRACTITIONER,
        ))
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());

    // Find and read the organisation; read a location.
    let a = c
        .gpc(Gpc::new(
            Method::GET,
            format!("{ep}/Organization?identifier=https%3A%2F%2Ffhir.nhs.uk%2FId%2Fods-organization-code%7CB82617"),
            IX_SEARCH_ORGANIZATION,
        ))
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    let org_id = id_of(entries(&a.json(), "Organization")[0]);
    let a = c
        .gpc(Gpc::new(
            Method::GET,
            format!("{ep}/Organization/{org_id}"),
            IX_READ_ORGANIZATION,
        ))
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    let a = c
        .gpc(Gpc::new(
            Method::GET,
            format!("{ep}/Location/{location_id}"),
            IX_READ_LOCATION,
        ))
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(a.json()["resourceType"], "Location");

    // Book the slot.
    let booking = book_body(&slot, &patient_id, &location_id);
    let a = c
        .gpc(Gpc::new(Method::POST, format!("{ep}/Appointment"), IX_BOOK).body(booking.to_string()))
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.text());
    let appointment = a.json();
    let appointment_id = id_of(&appointment);
    assert!(a.headers.contains_key(http::header::LOCATION));

    // The same slot again: the provider's 409 passes back unchanged.
    let a = c
        .gpc(Gpc::new(Method::POST, format!("{ep}/Appointment"), IX_BOOK).body(booking.to_string()))
        .await;
    assert_eq!(a.status, StatusCode::CONFLICT, "{}", a.text());
    assert_eq!(
        a.json()["issue"][0]["details"]["coding"][0]["code"],
        "DUPLICATE_REJECTED"
    );

    // Read it.
    let a = c
        .gpc(Gpc::new(
            Method::GET,
            format!("{ep}/Appointment/{appointment_id}"),
            IX_READ_APPOINTMENT,
        ))
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    let etag = a.headers[http::header::ETAG]
        .to_str()
        .expect("etag")
        .to_string();

    // Amend the description.
    let mut amended = a.json();
    amended["description"] = serde_json::json!("Amended through the gateway");
    let a = c
        .gpc(
            Gpc::new(
                Method::PUT,
                format!("{ep}/Appointment/{appointment_id}"),
                IX_AMEND,
            )
            .header("If-Match", etag.clone())
            .body(amended.to_string()),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(a.json()["description"], "Amended through the gateway");
    let etag2 = a.headers[http::header::ETAG]
        .to_str()
        .expect("etag")
        .to_string();
    assert_ne!(etag, etag2);

    // A stale If-Match is the provider's 409, passed back.
    let a = c
        .gpc(
            Gpc::new(
                Method::PUT,
                format!("{ep}/Appointment/{appointment_id}"),
                IX_AMEND,
            )
            .header("If-Match", etag)
            .body(amended.to_string()),
        )
        .await;
    assert_eq!(a.status, StatusCode::CONFLICT, "{}", a.text());

    // Retrieve the patient's appointments.
    let from = chrono::Utc::now().date_naive();
    let to = from + chrono::Duration::days(28);
    let a = c
        .gpc(Gpc::new(
            Method::GET,
            format!("{ep}/Patient/{patient_id}/Appointment?start=ge{from}&start=le{to}"),
            IX_PATIENT_APPOINTMENTS,
        ))
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    let ids: Vec<String> = entries(&a.json(), "Appointment")
        .into_iter()
        .map(id_of)
        .collect();
    assert!(ids.contains(&appointment_id), "{ids:?}");

    // Cancel it.
    let a = c
        .gpc(Gpc::new(
            Method::GET,
            format!("{ep}/Appointment/{appointment_id}"),
            IX_READ_APPOINTMENT,
        ))
        .await;
    let etag = a.headers[http::header::ETAG]
        .to_str()
        .expect("etag")
        .to_string();
    let mut cancelled = a.json();
    cancelled["status"] = serde_json::json!("cancelled");
    let mut ext = cancelled["extension"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    ext.push(serde_json::json!({
        "url": "https://fhir.nhs.uk/STU3/StructureDefinition/Extension-GPConnect-AppointmentCancellationReason-1",
        "valueString": "Patient no longer needs the appointment"
    }));
    cancelled["extension"] = serde_json::Value::Array(ext);
    let a = c
        .gpc(
            Gpc::new(
                Method::PUT,
                format!("{ep}/Appointment/{appointment_id}"),
                IX_CANCEL,
            )
            .header("If-Match", etag)
            .body(cancelled.to_string()),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(a.json()["status"], "cancelled");

    // Register a patient not yet at the practice.
    let a = c
        .gpc(
            Gpc::new(
                Method::POST,
                format!("{ep}/Patient/$gpc.registerpatient"),
                IX_REGISTER_PATIENT,
            )
            .body(register_body("9000000033").to_string()),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());

    // Every call reached the provider over mTLS as the gateway.
    let peers = h.recorder.peers.lock().expect("lock").clone();
    assert!(peers.len() >= 15);
    assert!(peers
        .iter()
        .all(|p| p == &vec!["ssp.dev.local".to_string()]));
    h.stop().await;
}

fn book_body(slot: &serde_json::Value, patient_id: &str, location_id: &str) -> serde_json::Value {
    // The recorded 1.2.7 booking (gpconnect-demonstrator, Apache-2.0), re-pointed at our slot.
    let mut body: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/appointment-create-request.json"))
            .expect("create body JSON");
    body["start"] = slot["start"].clone();
    body["end"] = slot["end"].clone();
    body["slot"] = serde_json::json!([{ "reference": format!("Slot/{}", id_of(slot)) }]);
    body["participant"][0]["actor"]["reference"] =
        serde_json::json!(format!("Patient/{patient_id}"));
    body["participant"][1]["actor"]["reference"] =
        serde_json::json!(format!("Location/{location_id}"));
    body["serviceType"] = slot["serviceType"].clone();
    body
}

fn register_body(nhs_number: &str) -> serde_json::Value {
    serde_json::json!({
        "resourceType": "Parameters",
        "parameter": [{
            "name": "registerPatient",
            "resource": {
                "resourceType": "Patient",
                "meta": { "profile": ["https://fhir.nhs.uk/STU3/StructureDefinition/CareConnect-GPC-Patient-1"] },
                "identifier": [{ "system": "https://fhir.nhs.uk/Id/nhs-number", "value": nhs_number }],
                "name": [{ "use": "official", "family": "Pratchett", "given": ["Terry"] }],
                "gender": "male",
                "birthDate": "1948-04-28"
            }
        }]
    })
}

/// Sends one request through a gateway in front of a recording provider.
async fn via_recorder(opts: GatewayOptions) -> Harness {
    start_with_recorder(World::ecdsa(), Behaviour::Echo, opts).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rejection_answers_its_token_and_reaches_no_provider() {
    let h = via_recorder(GatewayOptions {
        extra_policy: "",
        ..Default::default()
    })
    .await;
    let c = h.consumer();
    let ep = h.endpoint();
    let slot = format!("{ep}/Slot?{}", slot_query());

    // 405
    let a = c
        .gpc(Gpc::new(Method::DELETE, slot.clone(), IX_SEARCH_SLOT))
        .await;
    a.assert_outcome(405, Some("BAD_REQUEST"), "METHOD_NOT_ALLOWED_DELETE");
    let a = c
        .gpc(Gpc::new(Method::PATCH, slot.clone(), IX_SEARCH_SLOT))
        .await;
    a.assert_outcome(405, Some("BAD_REQUEST"), "METHOD_NOT_ALLOWED_PATCH");

    // No embedded https:// target, or a target the gateway will not forward: the token is the
    // SSP's, and `details.text` says what to fix.
    for (bad, says) in [
        (
            "B82617/STU3/1/gpconnect/Slot".to_string(),
            "start with https://",
        ),
        (
            "http://localhost/B82617/Slot".to_string(),
            "start with https://",
        ),
        (String::new(), "start with https://"),
        (format!("{ep}/Slot/?{}", slot_query()), "trailing `/`"),
        (format!("{ep}/Slot?_method=DELETE"), "`_method`"),
    ] {
        let a = c
            .gpc(Gpc::new(Method::GET, bad.clone(), IX_SEARCH_SLOT))
            .await;
        let v = a.assert_outcome(400, Some("BAD_REQUEST"), "INVALID_TARGET_URL");
        let text = v["issue"][0]["details"]["text"]
            .as_str()
            .unwrap_or_default();
        assert!(text.contains(says), "{bad}: {text}");
    }

    // Missing or malformed Ssp headers, each named.
    let missing = |name: &'static str| {
        let mut req = Gpc::new(Method::GET, slot.clone(), IX_SEARCH_SLOT).build();
        req.headers_mut().remove(name);
        req
    };
    for (name, token) in [
        ("ssp-traceid", "MISSING_OR_INVALID_HEADER_Ssp-TraceID"),
        ("ssp-from", "MISSING_OR_INVALID_HEADER_Ssp-From"),
        ("ssp-to", "MISSING_OR_INVALID_HEADER_Ssp-To"),
        (
            "ssp-interactionid",
            "MISSING_OR_INVALID_HEADER_Ssp-InteractionID",
        ),
    ] {
        let a = c.send(missing(name)).await.expect("answer");
        a.assert_outcome(400, Some("BAD_REQUEST"), token);
    }
    let mut req = Gpc::new(Method::GET, slot.clone(), IX_SEARCH_SLOT).build();
    req.headers_mut()
        .insert("ssp-traceid", "not-a-uuid".parse().expect("value"));
    c.send(req).await.expect("answer").assert_outcome(
        400,
        Some("BAD_REQUEST"),
        "MISSING_OR_INVALID_HEADER_Ssp-TraceID",
    );
    let a = c
        .gpc(Gpc::new(Method::GET, slot.clone(), IX_SEARCH_SLOT).from("20000000035X"))
        .await;
    let v = a.assert_outcome(
        400,
        Some("BAD_REQUEST"),
        "MISSING_OR_INVALID_HEADER_Ssp-From",
    );
    let text = v["issue"][0]["details"]["text"]
        .as_str()
        .unwrap_or_default();
    assert!(text.contains("1 to 32 digits (not an ODS code)"), "{text}");

    // Unknown interaction.
    let a = c
        .gpc(Gpc::new(
            Method::GET,
            slot.clone(),
            "urn:nhs:names:services:gpconnect:fhir:rest:read:nothing-1",
        ))
        .await;
    a.assert_outcome(
        400,
        Some("BAD_REQUEST"),
        "UNSUPPORTED_INTERACTION_urn:nhs:names:services:gpconnect:fhir:rest:read:nothing-1",
    );

    // The request does not match the declared interaction.
    let a = c
        .gpc(Gpc::new(
            Method::GET,
            format!("{ep}/Appointment/1"),
            IX_SEARCH_SLOT,
        ))
        .await;
    let v = a.assert_outcome(
        400,
        Some("BAD_REQUEST"),
        &format!(
            "INTERACTION_{IX_SEARCH_SLOT}_DOES_NOT_MATCH_REQUEST_GET_{BASE_PATH}/Appointment/1"
        ),
    );
    // The interaction's own method and path, named.
    assert_eq!(
        v["issue"][0]["details"]["text"],
        format!("{IX_SEARCH_SLOT} is GET [endpoint]/Slot")
    );
    // An operation's `$` percent-encoded: said so.
    let a = c
        .gpc(
            Gpc::new(
                Method::POST,
                format!("{ep}/Patient/%24gpc.registerpatient"),
                IX_REGISTER_PATIENT,
            )
            .body("{}"),
        )
        .await;
    let text = a.json()["issue"][0]["details"]["text"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        text.ends_with("POST [endpoint]/Patient/$gpc.registerpatient; an operation's `$` is sent as is, not as %24"),
        "{text}"
    );
    let a = c
        .gpc(Gpc::new(Method::POST, format!("{ep}/Slot"), IX_SEARCH_SLOT))
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);

    // Sender not accredited: the read-only consumer may not book.
    let ro = h.world.client(&h.world.readonly, h.gateway);
    let a = ro
        .gpc(
            Gpc::new(Method::POST, format!("{ep}/Appointment"), IX_BOOK)
                .from(READONLY_ASID)
                .body("{}"),
        )
        .await;
    a.assert_outcome(
        403,
        Some("ACCESS_DENIED"),
        "ASID_CHECK_FAILED_MESSAGESENDER_200000000360",
    );
    // ...but may search.
    let a = ro
        .gpc(Gpc::new(Method::GET, slot.clone(), IX_SEARCH_SLOT).from(READONLY_ASID))
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    let seen_after_allowed = h.recorder.seen();
    assert_eq!(seen_after_allowed, 1);

    // Unknown sender.
    let a = c
        .gpc(Gpc::new(Method::GET, slot.clone(), IX_SEARCH_SLOT).from("100000000001"))
        .await;
    a.assert_outcome(
        403,
        Some("ACCESS_DENIED"),
        "ASID_CHECK_FAILED_MESSAGESENDER_100000000001",
    );

    // A valid certificate whose FQDN is not registered for the sender.
    let rogue = h.world.client(&h.world.rogue, h.gateway);
    let a = rogue
        .gpc(Gpc::new(Method::GET, slot.clone(), IX_SEARCH_SLOT))
        .await;
    a.assert_outcome(
        403,
        Some("ACCESS_DENIED_SSL"),
        "CLIENT_CERTIFICATE_FQDN_rogue.dev.local_NOT_REGISTERED_FOR_ASID_200000000359",
    );
    // The read-only consumer's certificate claiming the full consumer's ASID.
    let a = ro
        .gpc(Gpc::new(Method::GET, slot.clone(), IX_SEARCH_SLOT))
        .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);

    // Receiver unknown, and a receiver that is a consumer (no endpoint).
    let a = c
        .gpc(Gpc::new(Method::GET, slot.clone(), IX_SEARCH_SLOT).to("123456789123"))
        .await;
    a.assert_outcome(
        403,
        Some("ACCESS_DENIED"),
        "PARTYKEY_INTERACTION_CHECK_FAILED_MESSAGERECEIVER_123456789123",
    );
    let a = c
        .gpc(Gpc::new(Method::GET, slot.clone(), IX_SEARCH_SLOT).to(READONLY_ASID))
        .await;
    a.assert_outcome(
        403,
        Some("ACCESS_DENIED"),
        "PARTYKEY_INTERACTION_CHECK_FAILED_MESSAGERECEIVER_200000000360",
    );

    // Target URL is not the registered endpoint (an explicit port, here).
    let wrong = format!("https://localhost:{}:443{BASE_PATH}/Slot", h.provider_port);
    let a = c
        .gpc(Gpc::new(Method::GET, wrong.clone(), IX_SEARCH_SLOT))
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.text());
    let wrong = format!("https://127.0.0.1:{}{BASE_PATH}/Slot", h.provider_port);
    let a = c
        .gpc(Gpc::new(Method::GET, wrong.clone(), IX_SEARCH_SLOT))
        .await;
    let token = a.json()["issue"][0]["diagnostics"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        token.starts_with(&format!("ENDPOINT_{ep}_CPAID_")),
        "{token}"
    );
    assert!(
        token.ends_with(&format!("_VARIES_FROM_TARGETURL_{wrong}")),
        "{token}"
    );
    a.assert_outcome(400, Some("BAD_REQUEST"), &token);

    // JWT missing, malformed, wrong scope for the interaction.
    let a = c
        .gpc(Gpc::new(Method::GET, slot.clone(), IX_SEARCH_SLOT).jwt(None))
        .await;
    a.assert_outcome(400, Some("BAD_REQUEST"), "INVALID_JWT_MISSING");
    assert_eq!(a.headers[http::header::WWW_AUTHENTICATE], "Bearer");
    let a = c
        .gpc(
            Gpc::new(Method::GET, slot.clone(), IX_SEARCH_SLOT)
                .jwt(None)
                .header("Authorization", "Basic Zm9v"),
        )
        .await;
    a.assert_outcome(400, Some("BAD_REQUEST"), "INVALID_JWT_NOT_BEARER");
    assert_eq!(a.headers[http::header::WWW_AUTHENTICATE], "Bearer");
    // A second token beside a valid one: the provider might read either.
    let second = format!(
        "Bearer {}",
        jwt(scope_for(IX_SEARCH_SLOT)).replace("eyJ", "eyK")
    );
    let a = c
        .gpc(Gpc::new(Method::GET, slot.clone(), IX_SEARCH_SLOT).header("Authorization", second))
        .await;
    a.assert_outcome(
        400,
        Some("BAD_REQUEST"),
        "INVALID_JWT_MULTIPLE_AUTHORIZATION_HEADERS",
    );
    let a = c
        .gpc(Gpc::new(Method::GET, slot.clone(), IX_SEARCH_SLOT).jwt(Some("abc.def.ghi".into())))
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert!(a.json()["issue"][0]["diagnostics"]
        .as_str()
        .unwrap_or_default()
        .starts_with("INVALID_JWT_"));
    // A claim twice: a reader keeping the first would see a write scope, one keeping the last
    // (as RFC 7519 allows) a read one. Refused, never forwarded.
    let twice = {
        use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
        let mut payload = ssp_gateway::ssp::jwt::dev_claims(
            "patient/*.write",
            now(),
            "https://authorize.fhir.nhs.net/token",
        )
        .to_string();
        payload.pop();
        payload.push_str(&format!(
            r#","requested_scope":"{}"}}"#,
            scope_for(IX_SEARCH_SLOT)
        ));
        format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#),
            URL_SAFE_NO_PAD.encode(payload)
        )
    };
    let a = c
        .gpc(Gpc::new(Method::GET, slot.clone(), IX_SEARCH_SLOT).jwt(Some(twice)))
        .await;
    a.assert_outcome(400, Some("BAD_REQUEST"), "INVALID_JWT_MALFORMED");
    let a = c
        .gpc(Gpc::new(Method::GET, slot.clone(), IX_SEARCH_SLOT).jwt(Some(jwt("patient/*.write"))))
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        a.headers[http::header::WWW_AUTHENTICATE],
        "Bearer error=\"invalid_request\""
    );
    assert!(a.json()["issue"][0]["diagnostics"]
        .as_str()
        .unwrap_or_default()
        .starts_with("INVALID_JWT_"));

    // None of the rejected requests reached the provider.
    assert_eq!(h.recorder.seen(), seen_after_allowed);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharing_agreements_when_enforced() {
    let h = via_recorder(GatewayOptions {
        extra_policy: "sharing_agreements_enforced = true\nsharing_agreements = [{ from = \"200000000360\", to = \"918999198993\" }]",
        ..Default::default()
    })
    .await;
    let ep = h.endpoint();
    let slot = format!("{ep}/Slot?{}", slot_query());
    let a = h
        .consumer()
        .gpc(Gpc::new(Method::GET, slot.clone(), IX_SEARCH_SLOT))
        .await;
    a.assert_outcome(
        403,
        Some("ACCESS_DENIED"),
        "FOT_CHECK_FAILED_MESSAGESENDER_200000000359_MESSAGERECEIVER_918999198993",
    );
    assert_eq!(h.recorder.seen(), 0);
    let ro = h.world.client(&h.world.readonly, h.gateway);
    let a = ro
        .gpc(Gpc::new(Method::GET, slot, IX_SEARCH_SLOT).from(READONLY_ASID))
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(h.recorder.seen(), 1);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_proxy_attempts_never_leave_the_gateway() {
    let h = via_recorder(GatewayOptions::default()).await;
    let c = h.consumer();
    let p = h.provider_port;
    let attempts = [
        format!("https://localhost:{p}{BASE_PATH}/../../Slot"),
        format!("https://localhost:{p}{BASE_PATH}/%2e%2e/Slot"),
        format!("https://localhost:{p}{BASE_PATH}/%2E%2e/%2E%2E/Slot"),
        format!("https://localhost:{p}{BASE_PATH}/./Slot"),
        format!("https://localhost:{p}{BASE_PATH}//Slot"),
        format!("https://localhost:{p}{BASE_PATH}%2fSlot"),
        format!("https://localhost:{p}{BASE_PATH}\\Slot"),
        format!("https://evil.example@localhost:{p}{BASE_PATH}/Slot"),
        format!("https://localhost:{p}@evil.example{BASE_PATH}/Slot"),
        format!("https://localhost:{p}{BASE_PATH}@evil.example/Slot"),
        format!("https://evil.example{BASE_PATH}/Slot"),
        format!("https://evil.example/https://localhost:{p}{BASE_PATH}/Slot"),
        format!("http://localhost:{p}{BASE_PATH}/Slot"),
        format!("HTTPS://localhost:{p}{BASE_PATH}/Slot"),
        format!("https://LOCALHOST:{p}{BASE_PATH}/Slot"),
        format!("https://localhost:{p}/b82617/STU3/1/gpconnect/Slot"),
        format!("https://localhost:{}{BASE_PATH}/Slot", p + 1),
        format!("https://localhost{BASE_PATH}/Slot"),
        format!("https://127.0.0.1:{p}{BASE_PATH}/Slot"),
        format!("https://localhost:{p}{BASE_PATH}/x/../Slot"),
        format!("https://localhost:{p}{BASE_PATH}extra/Slot"),
        format!("https://localhost:{p}{BASE_PATH}/Slot/../../../admin"),
        format!("//evil.example{BASE_PATH}/Slot"),
        format!("https:/localhost:{p}{BASE_PATH}/Slot"),
    ];
    for target in &attempts {
        let req = Gpc::new(Method::GET, target.clone(), IX_SEARCH_SLOT).build();
        match c.send(req).await {
            Ok(a) => {
                assert_eq!(a.status, StatusCode::BAD_REQUEST, "{target}: {}", a.text());
                let token = a.json()["issue"][0]["diagnostics"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                assert!(
                    token == "INVALID_TARGET_URL"
                        || token.starts_with("ENDPOINT_")
                        || token.starts_with("INTERACTION_"),
                    "{target}: {token}"
                );
            }
            // hyper itself may refuse a request line it cannot parse: also never forwarded.
            Err(e) => assert!(!e.is_empty(), "{target}"),
        }
    }
    assert_eq!(
        h.recorder.seen(),
        0,
        "an open-proxy attempt reached the provider"
    );

    // The legitimate request still works.
    let a = c
        .gpc(Gpc::new(
            Method::GET,
            format!("{}/Slot?{}", h.endpoint(), slot_query()),
            IX_SEARCH_SLOT,
        ))
        .await;
    assert_eq!(a.status, StatusCode::OK);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_request_is_the_consumers_with_the_gateways_hop_headers() {
    let h = via_recorder(GatewayOptions::default()).await;
    let ep = h.endpoint();
    let target = format!("{ep}/Slot?{}", slot_query());
    let a = h
        .consumer()
        .gpc(
            Gpc::new(Method::GET, target.clone(), IX_SEARCH_SLOT)
                .header("Host", "evil.example")
                .header("X-Forwarded-For", "6.6.6.6")
                .header("Forwarded", "for=6.6.6.6")
                .header("Connection", "keep-alive, X-Hop")
                .header("X-Hop", "secret")
                .header("X-Custom", "end-to-end"),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(a.headers["strict-transport-security"], "max-age=31536000");
    let seen = a.json();
    assert_eq!(seen["uri"], format!("{BASE_PATH}/Slot?{}", slot_query()));
    let hd = &seen["headers"];
    assert_eq!(hd["host"], format!("localhost:{}", h.provider_port));
    assert_eq!(hd["x-forwarded-for"], "127.0.0.1");
    assert_eq!(hd["forwarded"], "for=127.0.0.1;proto=https");
    assert_eq!(hd["ssp-interactionid"], IX_SEARCH_SLOT);
    assert_eq!(hd["ssp-from"], CONSUMER_ASID);
    assert_eq!(hd["ssp-to"], PROVIDER_ASID);
    assert!(hd["ssp-traceid"].is_string());
    assert!(hd["authorization"]
        .as_str()
        .unwrap_or_default()
        .starts_with("Bearer "));
    assert_eq!(hd["x-custom"], "end-to-end");
    assert!(
        hd.get("x-hop").is_none()
            && hd
                .get("connection")
                .is_none_or(|v| v != "keep-alive, X-Hop")
    );
    h.stop().await;
}

/// Headers a provider's stack may act on — a method or URL override, or what it believes about
/// the client, the URL it was called by, or the client certificate — are the consumer's to
/// forge, so none reaches the provider; the request itself still does, as checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn override_and_client_identity_headers_never_reach_the_provider() {
    let h = via_recorder(GatewayOptions::default()).await;
    let ep = h.endpoint();
    let patient = format!("{BASE_PATH}/Patient/9000000009");
    let forged: Vec<(&str, String)> = vec![
        ("X-HTTP-Method-Override", "DELETE".into()),
        ("X-HTTP-Method", "DELETE".into()),
        ("X-Method-Override", "DELETE".into()),
        ("X-Original-Method", "DELETE".into()),
        ("X-Original-URL", patient.clone()),
        ("X-Rewrite-URL", patient.clone()),
        ("X-Original-URI", patient.clone()),
        ("X-Forwarded-Uri", patient.clone()),
        ("X-Envoy-Original-Path", patient.clone()),
        ("X-Real-IP", "10.6.6.6".into()),
        ("True-Client-IP", "10.6.6.6".into()),
        ("X-Client-IP", "10.6.6.6".into()),
        ("X-Cluster-Client-IP", "10.6.6.6".into()),
        ("Client-IP", "10.6.6.6".into()),
        ("X-ProxyUser-Ip", "10.6.6.6".into()),
        ("Forwarded-For", "10.6.6.6".into()),
        ("X-Forwarded", "for=10.6.6.6".into()),
        ("X-Originating-IP", "10.6.6.6".into()),
        ("CF-Connecting-IP", "10.6.6.6".into()),
        ("X-Forwarded-Host", "evil.example".into()),
        ("X-Forwarded-Proto", "http".into()),
        ("X-Forwarded-Prefix", "/admin".into()),
        ("X-Forwarded-Port", "80".into()),
        ("X-Forwarded-Server", "evil.example".into()),
        ("X-Host", "evil.example".into()),
        ("Client-Cert", ":MIIB:".into()),
        (
            "X-Forwarded-Client-Cert",
            "Hash=00;Subject=\"CN=provider\"".into(),
        ),
        ("X-SSL-Client-Cert", "-----BEGIN CERTIFICATE-----".into()),
    ];
    let cases = [
        (
            Method::POST,
            format!("{ep}/Appointment"),
            IX_BOOK,
            Some("{\"resourceType\":\"Appointment\"}"),
            format!("{BASE_PATH}/Appointment"),
        ),
        (
            Method::GET,
            format!("{ep}/Slot?{}", slot_query()),
            IX_SEARCH_SLOT,
            None,
            format!("{BASE_PATH}/Slot?{}", slot_query()),
        ),
    ];
    for (method, target, interaction, body, uri) in cases {
        let mut req = Gpc::new(method.clone(), target, interaction).header("X-Custom", "kept");
        if let Some(body) = body {
            req = req.body(body);
        }
        for (name, value) in &forged {
            req = req.header(name, value.clone());
        }
        let before = h.recorder.seen();
        let a = h.consumer().gpc(req).await;
        assert_eq!(a.status, StatusCode::OK, "{method}: {}", a.text());
        assert_eq!(h.recorder.seen(), before + 1, "{method}: forwarded once");
        let (seen_method, seen_uri, headers) = h.recorder.last_head();
        assert_eq!(seen_method, method);
        assert_eq!(seen_uri, uri);
        for (name, _) in &forged {
            assert!(
                !headers.contains_key(*name),
                "{method}: {name} reached the provider: {headers:?}"
            );
        }
        assert_eq!(headers["x-custom"], "kept");
        assert_eq!(headers["x-forwarded-for"], "127.0.0.1");
        assert_eq!(headers["forwarded"], "for=127.0.0.1;proto=https");
        assert_eq!(headers["host"], format!("localhost:{}", h.provider_port));
        // The gateway names itself in Via (RFC 9110 §7.6.3).
        assert_eq!(headers["via"], "1.1 ssp-gateway");
    }
    h.stop().await;
}

/// `Connection` may name any header to be dropped at this hop; the gateway's own `traceparent`
/// is set after the consumer's listed ones are removed, so it still reaches the provider.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cannot_remove_the_gateways_traceparent() {
    let h = via_recorder(GatewayOptions::default()).await;
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let theirs = format!("00-{trace}-b7ad6b7169203331-01");
    let a = h
        .consumer()
        .gpc(
            Gpc::new(
                Method::GET,
                format!("{}/Slot?{}", h.endpoint(), slot_query()),
                IX_SEARCH_SLOT,
            )
            .header("traceparent", theirs.clone())
            .header("Connection", "traceparent"),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    let (_, _, headers) = h.recorder.last_head();
    let sent: Vec<_> = headers.get_all("traceparent").iter().collect();
    assert_eq!(sent.len(), 1, "{headers:?}");
    let sent = sent[0].to_str().expect("ASCII");
    // The consumer's trace, continued with the gateway's span as the provider's parent.
    assert_eq!(sent.len(), 55, "{sent}");
    assert!(sent.starts_with(&format!("00-{trace}-")), "{sent}");
    assert_ne!(sent, theirs);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_names_in_any_case() {
    let h = via_recorder(GatewayOptions::default()).await;
    let target = format!("/{}/Slot?{}", h.endpoint(), slot_query());
    let req = Request::builder()
        .method(Method::GET)
        .uri(target)
        .header("SSP-TRACEID", uuid::Uuid::new_v4().to_string())
        .header("ssp-from", CONSUMER_ASID)
        .header("Ssp-To", PROVIDER_ASID)
        .header("Ssp-InteractionId", IX_SEARCH_SLOT)
        .header(
            "authorization",
            format!("Bearer {}", jwt("organization/*.read")),
        )
        .body(Full::new(Bytes::new()))
        .expect("request");
    let a = h.consumer().send(req).await.expect("answer");
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    h.stop().await;
}

fn consumer_without_cancel(ldif: String) -> String {
    edit_entry(
        &ldif,
        &["uniqueIdentifier: 200000000359", "objectClass: nhsAs"],
        "cancel:appointment-1",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amend_and_cancel_are_told_apart_only_by_the_header() {
    // A consumer accredited to amend but not to cancel: the same PUT is allowed as an amend
    // and refused as a cancel.
    let h = via_recorder(GatewayOptions {
        ldif_edit: Some(consumer_without_cancel),
        ..Default::default()
    })
    .await;
    let target = format!("{}/Appointment/42", h.endpoint());
    let c = h.consumer();
    let a = c
        .gpc(
            Gpc::new(Method::PUT, target.clone(), IX_AMEND)
                .header("If-Match", "W/\"1\"")
                .body("{}"),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(a.json()["headers"]["ssp-interactionid"], IX_AMEND);
    assert_eq!(a.json()["headers"]["if-match"], "W/\"1\"");
    let a = c
        .gpc(
            Gpc::new(Method::PUT, target, IX_CANCEL)
                .header("If-Match", "W/\"1\"")
                .body("{}"),
        )
        .await;
    a.assert_outcome(
        403,
        Some("ACCESS_DENIED"),
        "ASID_CHECK_FAILED_MESSAGESENDER_200000000359",
    );
    assert_eq!(h.recorder.seen(), 1);
    h.stop().await;
}

/// A request refused before its envelope passed as a whole keeps in its audit record each
/// Spine header it sent well formed, and its target: a 405 and a request with one bad header
/// still say who they were from and what they said they were. Before, a DELETE's record had no
/// Ssp-TraceID, From, To or interaction, and one bad header lost the other three (found by an
/// audit review). A 405's `Allow` names the target's methods (RFC 9110 §15.5.6), as the
/// preflight does; before, it was always `GET, POST, PUT, OPTIONS` (found by a conformance
/// review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_keeps_what_it_declared_and_a_405_allows_its_targets_methods() {
    let h = via_recorder(GatewayOptions::default()).await;
    let c = h.consumer();
    let ep = h.endpoint();
    for (target, interaction, allow) in [
        (
            format!("{ep}/Appointment/1"),
            IX_READ_APPOINTMENT,
            "GET, PUT, OPTIONS",
        ),
        (
            format!("{ep}/Slot?{}", slot_query()),
            IX_SEARCH_SLOT,
            "GET, OPTIONS",
        ),
        (format!("{ep}/Appointment"), IX_BOOK, "POST, OPTIONS"),
        (format!("{ep}/Nothing"), IX_METADATA, ""),
    ] {
        let req = Gpc::new(Method::DELETE, target.clone(), interaction).build();
        let trace = req.headers()["ssp-traceid"].clone();
        let a = c.send(req).await.expect("answer");
        a.assert_outcome(405, Some("BAD_REQUEST"), "METHOD_NOT_ALLOWED_DELETE");
        assert_eq!(a.headers[http::header::ALLOW], allow, "{target}");
        let r = audited_answer(&h.audit_dir, &a).await;
        assert_eq!(r["kind"], "rejection", "{r}");
        assert_eq!(r["ssp_trace_id"], trace.to_str().expect("ascii"), "{r}");
        assert_eq!(r["from"], CONSUMER_ASID, "{r}");
        assert_eq!(r["to"], PROVIDER_ASID, "{r}");
        assert_eq!(r["interaction"], interaction, "{r}");
        assert_eq!(r["target_url"], target.as_str(), "{r}");
    }
    // One header not well formed: the other three are kept, the bad one is not recorded.
    let mut req = Gpc::new(Method::GET, format!("{ep}/metadata"), IX_METADATA).build();
    req.headers_mut()
        .insert("ssp-traceid", http::HeaderValue::from_static("not-a-uuid"));
    let a = c.send(req).await.expect("answer");
    a.assert_outcome(
        400,
        Some("BAD_REQUEST"),
        "MISSING_OR_INVALID_HEADER_Ssp-TraceID",
    );
    let r = audited_answer(&h.audit_dir, &a).await;
    assert!(r["ssp_trace_id"].is_null(), "{r}");
    assert_eq!(r["from"], CONSUMER_ASID, "{r}");
    assert_eq!(r["to"], PROVIDER_ASID, "{r}");
    assert_eq!(r["interaction"], IX_METADATA, "{r}");
    assert_eq!(h.recorder.seen(), 0);
    h.stop().await;
}
