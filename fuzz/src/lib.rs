//! The fuzz targets' bodies: each takes arbitrary bytes, runs one of the gateway's pure
//! deciding functions on them and panics when a property that function promises is broken (a
//! panic inside the function is a finding too). Shared by the libFuzzer targets
//! (`fuzz_targets/`) and the fallback runner (`src/bin/fallback.rs`). Never does I/O.

use std::sync::OnceLock;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use http::{HeaderMap, HeaderName, HeaderValue};
use ssp_gateway::authorise::{authorise, Facts};
use ssp_gateway::directory::ldif::{self, LdifBackend};
use ssp_gateway::directory::Party;
use ssp_gateway::ssp::envelope::{self, SspHeaders};
use ssp_gateway::ssp::interactions::Catalogue;
use ssp_gateway::ssp::jwt;
use ssp_gateway::tls::PeerIdentity;

/// One fuzz target: takes any bytes, panics on a broken property.
pub type Target = fn(&[u8]);

/// The targets by name, for the fallback runner.
pub const TARGETS: [(&str, Target); 4] = [
    ("envelope", envelope),
    ("jwt", jwt),
    ("ldif", ldif),
    ("endpoint", endpoint),
];

/// The development world's parties (config/directory.ldif, as compiled into the gateway).
const CONSUMER_ASID: &str = "200000000359";
const PROVIDER_ASID: &str = "918999198993";
const CONSUMER_FQDN: &str = "consumer.dev.local";
const SCOPES: [&str; 3] = ["patient/*.read", "patient/*.write", "organization/*.read"];

/// Input: the request's path-and-query (as `http::Uri` hands it to the gateway), a newline,
/// then header lines `Name: value` separated by newlines.
///
/// Properties of an accepted target: it is the input minus the leading `/`, kept byte for
/// byte; it starts with `https://` and a non-empty authority of letters, digits and `-._~:[]`;
/// its path starts with `/`, has no empty, `.` or `..` segment, no `..` at all, no `\`, `#`,
/// space, control or non-ASCII byte, and no percent-encoded `.`, `/`, `\` or `%`; the query is
/// everything after the first `?`; and parsing its own URL again gives the same target.
/// Properties of accepted headers: the ASIDs are 1-32 digits, the trace id is a UUID.
pub fn envelope(data: &[u8]) {
    let (target, headers) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    if let Ok(text) = std::str::from_utf8(target) {
        if let Ok(t) = envelope::parse_target(text) {
            check_target(text, &t);
        }
    }
    if let Ok(h) = envelope::parse_headers(&header_map(headers)) {
        for asid in [&h.from, &h.to] {
            assert!(
                (1..=32).contains(&asid.len()) && asid.bytes().all(|b| b.is_ascii_digit()),
                "accepted ASID {asid:?}"
            );
        }
        assert_eq!(h.trace_id.len(), 36, "accepted trace id {:?}", h.trace_id);
        assert!(
            !h.interaction_id.is_empty() && h.interaction_id.bytes().all(|b| b.is_ascii_graphic()),
            "accepted interaction id {:?}",
            h.interaction_id
        );
    }
}

fn check_target(input: &str, t: &envelope::Target) {
    let url = t.url();
    assert_eq!(Some(url), input.strip_prefix('/'), "target kept as sent");
    assert!(url.starts_with("https://"), "{url}");
    let authority = t.authority();
    assert!(!authority.is_empty(), "{url}");
    assert!(
        authority
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~:[]".contains(&b)),
        "authority of {url}"
    );
    let path = t.path();
    assert!(path.starts_with('/'), "{url}");
    assert!(!path.contains(".."), "{url}");
    assert!(
        path[1..].split('/').all(|s| !s.is_empty() && s != "."),
        "{url}"
    );
    assert!(
        path.bytes()
            .all(|b| b.is_ascii_graphic() && !b"\\#?".contains(&b)),
        "{url}"
    );
    let lower = path.to_ascii_lowercase();
    for bad in ["%2e", "%2f", "%5c", "%25"] {
        assert!(!lower.contains(bad), "{bad} in {url}");
    }
    match t.query() {
        Some(q) => assert_eq!(format!("{}?{q}", t.without_query()), url),
        None => assert_eq!(t.without_query(), url),
    }
    assert_eq!(
        format!("https://{authority}{path}"),
        t.without_query(),
        "parts of {url}"
    );
    let again = envelope::parse_target(&format!("/{url}"));
    assert_eq!(again.as_ref(), Ok(t), "re-parse of {url}");
}

fn header_map(bytes: &[u8]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for line in bytes.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii_start()),
        ) else {
            continue;
        };
        map.append(name, value);
    }
    map
}

/// Input: a first byte choosing the form, then either the raw `Authorization` header value
/// (first byte even) or a JWT header and payload separated by a NUL byte, each base64url
/// encoded into `Bearer <header>.<payload>.` (first byte odd: reaches the claim rules).
///
/// Properties: `decode` and `check` agree on structure (a token `check` accepts decodes to the
/// same claims); an accepted token has `exp == iat + 300`, `reason_for_request` `directcare`,
/// an allowed `requested_scope`, an organisation ODS code and `requesting_practitioner.id`
/// equal to `sub`.
pub fn jwt(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let value = if mode % 2 == 0 {
        HeaderValue::from_bytes(rest)
    } else {
        let (header, payload) = match rest.iter().position(|&b| b == 0) {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &[][..]),
        };
        HeaderValue::from_str(&format!(
            "Bearer {}.{}.",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(payload)
        ))
    };
    let Ok(value) = value else { return };
    let decoded = jwt::decode(Some(&value));
    if let Err(e) = &decoded {
        assert!(!e.reason().is_empty());
    }
    // Judge the token at the time it claims to be issued, so the time rules can pass.
    let now = decoded.as_ref().ok().and_then(|c| c.iat).unwrap_or(0);
    let scopes: Vec<String> = SCOPES.iter().map(|s| s.to_string()).collect();
    for skew in [0, 300] {
        match jwt::check(Some(&value), &scopes, now, skew) {
            Ok(claims) => {
                assert_eq!(decoded.as_ref(), Ok(&claims), "check and decode disagree");
                let (Some(iat), Some(exp)) = (claims.iat, claims.exp) else {
                    panic!("accepted without iat/exp: {claims:?}");
                };
                assert_eq!(exp.checked_sub(iat), Some(300), "{claims:?}");
                assert_eq!(claims.reason_for_request.as_deref(), Some("directcare"));
                let scope = claims.requested_scope.as_deref().unwrap_or_default();
                assert!(SCOPES.contains(&scope), "{claims:?}");
                assert!(claims.organization_ods_code.is_some(), "{claims:?}");
                assert!(claims.sub.is_some(), "{claims:?}");
                assert_eq!(claims.practitioner_id, claims.sub, "{claims:?}");
            }
            Err(e) => assert!(!e.reason().is_empty()),
        }
    }
}

/// Input: an LDIF file.
///
/// Properties: bytes and text parsing agree; attribute names come back lowercase; line
/// numbers are 1-based and a record's attributes come after its `dn:` line; a file that indexes
/// answers lookups of its own ASIDs with a party of that ASID.
pub fn ldif(data: &[u8]) {
    let parsed = ldif::parse_records_bytes(data);
    let Ok(text) = std::str::from_utf8(data) else {
        assert!(parsed.is_err(), "non-UTF-8 accepted");
        return;
    };
    assert_eq!(
        parsed.as_ref().map_err(|e| e.to_string()),
        ldif::parse_records(text)
            .as_ref()
            .map_err(|e| e.to_string()),
        "bytes and text parsing disagree"
    );
    let Ok(records) = parsed else { return };
    let mut asids = Vec::new();
    for r in &records {
        assert!(r.line >= 1);
        for a in &r.attributes {
            assert_eq!(a.name, a.name.to_ascii_lowercase(), "attribute name case");
            assert!(a.line > r.line, "attribute before its dn");
            if a.name == "uniqueidentifier" {
                asids.push(a.value.clone());
            }
        }
    }
    if let Ok(backend) = LdifBackend::parse(text, "fuzz input") {
        for asid in asids.iter().take(16) {
            if let Some(party) = backend.lookup(asid) {
                assert_eq!(&party.system.asid, asid, "lookup answered another ASID");
            }
        }
    }
}

/// The fixed world the endpoint target decides in: the development catalogue and directory.
struct World {
    catalogue: Catalogue,
    consumer: Party,
    provider: Party,
    peer: PeerIdentity,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let catalogue = Catalogue::from_toml_str(
            include_str!("../../config/interactions.toml"),
            "config/interactions.toml",
        )
        .unwrap_or_else(|e| panic!("the development catalogue loads: {e}"));
        let directory = LdifBackend::development_world()
            .unwrap_or_else(|e| panic!("the development directory loads: {e}"));
        let party = |asid: &str| {
            directory
                .lookup(asid)
                .unwrap_or_else(|| panic!("{asid} is in the development directory"))
        };
        World {
            catalogue,
            consumer: party(CONSUMER_ASID),
            provider: party(PROVIDER_ASID),
            peer: PeerIdentity {
                names: vec![CONSUMER_FQDN.to_string()],
                ..PeerIdentity::default()
            },
        }
    })
}

/// Input: the request's path-and-query, tried against every interaction of the development
/// catalogue, from the development consumer to the development provider.
///
/// Property: whenever `authorise` accepts, the target URL is the registered endpoint, then
/// `/`, then a path with no way back out (no empty, `.` or `..` segment, no encoded dot, slash
/// or backslash); and the URL the forwarder builds from it (`http::Uri`) has the endpoint's
/// scheme and authority and a path under the endpoint's path.
pub fn endpoint(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(target) = envelope::parse_target(text) else {
        return;
    };
    let w = world();
    for ix in w.catalogue.iter() {
        let Ok(matched) = ix.match_request(&ix.method, &target) else {
            continue;
        };
        let headers = SspHeaders {
            trace_id: "0a4b1f0e-1b0c-4b5e-9d55-8a8d4e1a2b3c".into(),
            from: CONSUMER_ASID.into(),
            to: PROVIDER_ASID.into(),
            interaction_id: ix.id.clone(),
        };
        let decision = authorise(&Facts {
            headers: &headers,
            interaction: ix,
            target: &target,
            matched: &matched,
            peer: &w.peer,
            sender: Some(&w.consumer),
            receiver: Some(&w.provider),
            sharing_agreements: None,
        });
        let Ok(handler) = decision else { continue };
        check_under_endpoint(target.url(), &handler.endpoint);
    }
}

fn check_under_endpoint(url: &str, endpoint: &str) {
    let rest = url
        .strip_prefix(endpoint)
        .unwrap_or_else(|| panic!("{url} does not start with {endpoint}"));
    assert!(rest.starts_with('/'), "{url} leaves {endpoint}");
    let path = rest.split('?').next().unwrap_or_default();
    assert!(
        path[1..]
            .split('/')
            .all(|s| !s.is_empty() && s != "." && s != ".."),
        "{url}"
    );
    let lower = path.to_ascii_lowercase();
    for bad in ["%2e", "%2f", "%5c", "\\", "#"] {
        assert!(!lower.contains(bad), "{bad} in {url}");
    }
    // What the forwarder sends to: `target.url().parse::<Uri>()`.
    let registered: http::Uri = endpoint
        .parse()
        .unwrap_or_else(|e| panic!("registered endpoint {endpoint}: {e}"));
    if let Ok(uri) = url.parse::<http::Uri>() {
        assert_eq!(uri.scheme_str(), Some("https"), "{url}");
        assert_eq!(uri.authority(), registered.authority(), "{url}");
        assert_eq!(uri.host(), registered.host(), "{url}");
        assert_eq!(uri.port_u16(), registered.port_u16(), "{url}");
        let under = format!("{}/", registered.path());
        assert!(uri.path().starts_with(&under), "{url} -> {}", uri.path());
    }
}
