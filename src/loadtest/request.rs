//! What the load generator sends: the service root it is pointed at, the interaction mix, and
//! the GP Connect requests themselves (Ssp-* headers, a fresh `Ssp-TraceID` per request, a
//! valid JWT per scope refreshed before it expires, booking bodies). Builds requests; never
//! touches a socket.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Uri};
use http_body_util::Full;
use serde_json::{json, Value};

use super::LoadtestError;
use crate::ssp::jwt;

const FHIR_JSON: HeaderValue = HeaderValue::from_static("application/fhir+json");
const FHIR_JSON_UTF8: HeaderValue = HeaderValue::from_static("application/fhir+json;charset=utf-8");
/// Largest total weight of a mix (the mix is expanded into a schedule of this length at most).
const MAX_MIX_WEIGHT: u32 = 10_000;

/// One kind of request in the mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// `GET metadata` (read:metadata-1).
    Metadata,
    /// `GET Slot?…` (search:slot-1).
    Search,
    /// `POST Appointment` (create:appointment-1).
    Book,
}

impl Kind {
    /// Every kind, in report order.
    pub const ALL: [Kind; 3] = [Kind::Metadata, Kind::Search, Kind::Book];

    /// The name used in `--mix` and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Metadata => "metadata",
            Kind::Search => "search",
            Kind::Book => "book",
        }
    }

    /// Index into per-kind arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    fn interaction_id(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            Kind::Metadata => "urn:nhs:names:services:gpconnect:fhir:rest:read:metadata-1",
            Kind::Search => "urn:nhs:names:services:gpconnect:fhir:rest:search:slot-1",
            Kind::Book => "urn:nhs:names:services:gpconnect:fhir:rest:create:appointment-1",
        })
    }

    fn scope(self) -> Scope {
        match self {
            Kind::Metadata | Kind::Search => Scope::OrganizationRead,
            Kind::Book => Scope::PatientWrite,
        }
    }

    fn method(self) -> Method {
        match self {
            Kind::Book => Method::POST,
            Kind::Metadata | Kind::Search => Method::GET,
        }
    }

    fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }
}

#[derive(Debug, Clone, Copy)]
enum Scope {
    OrganizationRead,
    PatientWrite,
}

impl Scope {
    fn as_str(self) -> &'static str {
        match self {
            Scope::OrganizationRead => "organization/*.read",
            Scope::PatientWrite => "patient/*.write",
        }
    }
}

/// A weighted interaction mix, expanded into a fixed schedule: request `n` of a worker is
/// `schedule[n % len]`, so the mix is exact over any whole number of rounds and needs no RNG.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mix {
    schedule: Vec<Kind>,
}

impl Mix {
    /// Parses `name=weight,name=weight` (a bare `name` weighs 1). Names: `metadata`, `search`,
    /// `book`.
    pub fn parse(text: &str) -> Result<Mix, LoadtestError> {
        let bad = |reason: String| LoadtestError::BadMix {
            mix: text.to_owned(),
            reason,
        };
        // Summed wide: a sum capped at u32::MAX would be reported as the sum.
        let mut weights = [0u128; 3];
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, weight) = match part.split_once('=') {
                Some((n, w)) => (n.trim(), w.trim()),
                None => (part, "1"),
            };
            let kind = Kind::from_name(name).ok_or_else(|| {
                bad(format!(
                    "unknown interaction `{name}` (known: metadata, search, book)"
                ))
            })?;
            let weight: u64 = weight.parse().map_err(|_| {
                if !weight.is_empty() && weight.bytes().all(|b| b.is_ascii_digit()) {
                    bad(format!(
                        "`{weight}` is too large: the weights add up to at most {MAX_MIX_WEIGHT}"
                    ))
                } else {
                    bad(format!("`{weight}` is not a whole number"))
                }
            })?;
            // (A u64 per part cannot reach u128::MAX in any command line.)
            weights[kind.index()] = weights[kind.index()].saturating_add(u128::from(weight));
        }
        let total: u128 = weights.iter().sum();
        if total == 0 {
            return Err(bad("no interaction has a weight above 0".into()));
        }
        if total > u128::from(MAX_MIX_WEIGHT) {
            return Err(bad(format!(
                "the weights add up to {total}; at most {MAX_MIX_WEIGHT}"
            )));
        }
        // Each at most the total, at most MAX_MIX_WEIGHT: they fit.
        let weights = weights.map(|w| w as u32);
        let total = total as u32;
        // Interleave: at each step take the kind furthest behind its share (smooth weighted
        // round robin), so a 9:1 mix is nine searches then a booking, not 90 then 10.
        let mut credit = [0i64; 3];
        let mut schedule = Vec::with_capacity(total as usize);
        for _ in 0..total {
            for (c, w) in credit.iter_mut().zip(weights) {
                *c += i64::from(w);
            }
            let pick = (0..3)
                .filter(|i| weights[*i] > 0)
                .max_by_key(|i| (credit[*i], std::cmp::Reverse(*i)))
                .expect("at least one weight is above 0 (checked above)");
            credit[pick] -= i64::from(total);
            schedule.push(Kind::ALL[pick]);
        }
        Ok(Mix { schedule })
    }

    /// The kind of a worker's `n`th request.
    pub fn kind(&self, n: usize) -> Kind {
        self.schedule[n % self.schedule.len()]
    }

    /// Whether the mix sends this kind at all.
    pub fn contains(&self, kind: Kind) -> bool {
        self.schedule.contains(&kind)
    }

    /// The kinds in the mix with their weights, for reports.
    pub fn describe(&self) -> String {
        Kind::ALL
            .into_iter()
            .filter_map(|k| {
                let n = self.schedule.iter().filter(|s| **s == k).count();
                (n > 0).then(|| format!("{}={n}", k.name()))
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Where the load goes: the URL of a GP Connect service root, either through a gateway
/// (`https://gateway:8443/https://provider/B82617/STU3/1/gpconnect`) or a provider's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRoot {
    /// Host as written in the URL (brackets removed from IPv6): SNI and certificate name.
    pub host: String,
    pub port: u16,
    /// `host:port` as written, for the `Host` header.
    pub authority: String,
    /// The path up to the service root, no trailing `/` (`/https://provider/…/gpconnect`).
    pub base_path: String,
    /// The provider endpoint: the embedded target through a gateway, else the URL itself.
    pub endpoint: String,
}

impl ServiceRoot {
    /// Parses and checks `url` (https only, a path, no query or fragment).
    pub fn parse(url: &str) -> Result<ServiceRoot, LoadtestError> {
        let bad = |reason: &str| LoadtestError::BadUrl {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let rest = url
            .strip_prefix("https://")
            .ok_or_else(|| bad("must start with https://"))?;
        if rest.contains(['#', ' ']) || url.contains('?') {
            return Err(bad(
                "the service root has no query or fragment; the search query is --search-query",
            ));
        }
        let slash = rest
            .find('/')
            .ok_or_else(|| bad("has no path: give the service root"))?;
        let authority = &rest[..slash];
        let base_path = rest[slash..].trim_end_matches('/');
        if authority.is_empty() || authority.contains('@') {
            return Err(bad("has no usable host"));
        }
        if base_path.is_empty() {
            return Err(bad("has no path: give the service root"));
        }
        let (host, port) = split_host_port(authority).ok_or_else(|| bad("bad host or port"))?;
        let endpoint = match base_path.strip_prefix('/') {
            Some(embedded) if embedded.starts_with("https://") => embedded.to_owned(),
            _ => format!("https://{authority}{base_path}"),
        };
        Ok(ServiceRoot {
            host,
            port,
            authority: authority.to_owned(),
            base_path: base_path.to_owned(),
            endpoint,
        })
    }

    /// Whether the URL goes through a gateway (it embeds an `https://` target).
    pub fn through_gateway(&self) -> bool {
        self.base_path.starts_with("/https://")
    }
}

fn split_host_port(authority: &str) -> Option<(String, u16)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => 443,
            None => return None,
        };
        return Some((host.to_owned(), port));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && !host.contains(':') => {
            Some((host.to_owned(), port.parse().ok()?))
        }
        Some(_) => None,
        None => Some((authority.to_owned(), 443)),
    }
}

/// The default slot search: free slots from tomorrow for a week, with their schedules.
pub fn default_search_query(today: chrono::NaiveDate) -> String {
    let from = today + chrono::Duration::days(1);
    let to = today + chrono::Duration::days(7);
    format!(
        "status=free&start=ge{}&end=le{}&_include=Slot%3Aschedule",
        from.format("%Y-%m-%d"),
        to.format("%Y-%m-%d")
    )
}

/// Where booking bodies come from.
#[derive(Debug)]
pub enum Bookings {
    /// The same recorded body for every booking (the provider may answer 409 after the first).
    Replay(Bytes),
    /// One body per free slot found by the setup search, each slot booked once, then again
    /// from the first (the provider answers 409 DUPLICATE_REJECTED once they are used up).
    Slots {
        bodies: Vec<Bytes>,
        next: AtomicUsize,
    },
}

impl Bookings {
    fn next(&self) -> Bytes {
        match self {
            Bookings::Replay(body) => body.clone(),
            Bookings::Slots { bodies, next } if !bodies.is_empty() => {
                let n = next.fetch_add(1, Ordering::Relaxed);
                bodies[n % bodies.len()].clone()
            }
            Bookings::Slots { .. } => Bytes::new(),
        }
    }

    /// How many distinct slots are booked, when booking from a search.
    pub fn slots(&self) -> Option<usize> {
        match self {
            Bookings::Replay(_) => None,
            Bookings::Slots { bodies, .. } => Some(bodies.len()),
        }
    }
}

/// One booking body per free slot in a searchset Bundle, for `Patient/{patient}`, booked on
/// behalf of the organisation with ODS code `ods`. `now` is the `created` timestamp.
pub fn booking_bodies(bundle: &[u8], patient: &str, ods: &str, now: &str) -> Vec<Bytes> {
    let Ok(bundle) = serde_json::from_slice::<Value>(bundle) else {
        return Vec::new();
    };
    let Some(entries) = bundle.get("entry").and_then(Value::as_array) else {
        return Vec::new();
    };
    entries
        .iter()
        .filter_map(|e| e.get("resource"))
        .filter(|r| r["resourceType"] == "Slot" && r["status"] == "free")
        .filter_map(|slot| {
            let id = slot["id"].as_str()?;
            let start = slot["start"].as_str()?;
            let end = slot["end"].as_str()?;
            let body = json!({
                "resourceType": "Appointment",
                "meta": {"profile": ["https://fhir.nhs.uk/STU3/StructureDefinition/GPConnect-Appointment-1"]},
                "contained": [{
                    "resourceType": "Organization",
                    "id": "1",
                    "identifier": [{"system": jwt::ODS_SYSTEM, "value": ods}],
                    "name": "ssp-gateway loadtest",
                    "telecom": [{"system": "phone", "value": "0300 311 22 33", "use": "work"}]
                }],
                "extension": [{
                    "url": "https://fhir.nhs.uk/STU3/StructureDefinition/Extension-GPConnect-BookingOrganisation-1",
                    "valueReference": {"reference": "#1"}
                }],
                "status": "booked",
                "start": start,
                "end": end,
                "slot": [{"reference": format!("Slot/{id}")}],
                "description": "Booked by ssp-gateway loadtest",
                "created": now,
                "participant": [{"actor": {"reference": format!("Patient/{patient}")}, "status": "accepted"}]
            });
            Some(Bytes::from(body.to_string()))
        })
        .collect()
}

/// Who the requests' JWTs say is asking: the consumer organisation, its system and the
/// practitioner. The development world's consumer unless the command line names another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `iss`: the consumer system's URL; its device and user-guid identifiers are in its
    /// namespace (`{iss}/Id/device`).
    pub issuer: String,
    /// `requesting_organization`'s ODS code.
    pub ods: String,
    /// The practitioner's SDS user id.
    pub user_id: String,
    /// The practitioner's SDS role profile id.
    pub role_profile: String,
}

impl Identity {
    /// The claims of a token for `scope` issued at `now` for `audience`: [`jwt::claims`] with
    /// this identity in it, and the load generator as its device.
    fn claims(&self, scope: &str, now: i64, audience: &str) -> Value {
        let requester = jwt::Requester {
            issuer: &self.issuer,
            ods: &self.ods,
            organization_name: "ssp-gateway loadtest consumer",
            device: "ssp-gateway-loadtest",
            device_model: "ssp-gateway loadtest",
            user_id: &self.user_id,
            role_profile: &self.role_profile,
        };
        jwt::claims(&requester, scope, now, audience)
    }
}

/// `Authorization` values for each scope, replaced before they expire.
struct Tokens {
    organization_read: HeaderValue,
    patient_write: HeaderValue,
    issued_at: i64,
}

impl Tokens {
    fn new(identity: &Identity, audience: &str, now: i64) -> Tokens {
        let bearer = |scope: Scope| {
            let token = jwt::encode_unsigned(&identity.claims(scope.as_str(), now, audience));
            HeaderValue::from_str(&format!("Bearer {token}"))
                .expect("base64url and dots are valid header characters")
        };
        Tokens {
            organization_read: bearer(Scope::OrganizationRead),
            patient_write: bearer(Scope::PatientWrite),
            issued_at: now,
        }
    }

    fn get(&self, scope: Scope) -> HeaderValue {
        match scope {
            Scope::OrganizationRead => self.organization_read.clone(),
            Scope::PatientWrite => self.patient_write.clone(),
        }
    }
}

/// How often tokens are re-issued (they live 300 s; gateways allow a clock skew on top).
const TOKEN_REFRESH_SECS: i64 = 60;

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// What every request of a run is addressed with, from the command line: each kind's request
/// target (origin-form for HTTP/1.1, absolute-form for HTTP/2) and the `Host`, `Ssp-From` and
/// `Ssp-To` values. Made while the arguments are checked, before anything is sent, so that a
/// value no request can carry is refused as an argument.
#[derive(Debug, Clone)]
pub struct Addressing {
    host: HeaderValue,
    from: HeaderValue,
    to: HeaderValue,
    uris_h1: [Uri; 3],
    uris_h2: [Uri; 3],
}

impl Addressing {
    /// Checks that the service root, the ASIDs and the slot search's query make valid
    /// requests.
    pub fn new(
        root: &ServiceRoot,
        from: &str,
        to: &str,
        search_query: &str,
    ) -> Result<Addressing, LoadtestError> {
        let header = |what: &'static str, v: &str| {
            HeaderValue::from_str(v).map_err(|_| LoadtestError::BadArg {
                what,
                reason: format!("`{}` is not a valid header value", v.escape_debug()),
            })
        };
        let paths = [
            format!("{}/metadata", root.base_path),
            format!("{}/Slot?{search_query}", root.base_path),
            format!("{}/Appointment", root.base_path),
        ];
        let uri = |text: String| {
            text.parse::<Uri>().map_err(|e| LoadtestError::BadArg {
                what: "--url / --search-query",
                reason: format!(
                    "`{}` is not a valid request target: {e}",
                    text.escape_debug()
                ),
            })
        };
        let [m, s, b] = paths;
        let uris_h1 = [uri(m.clone())?, uri(s.clone())?, uri(b.clone())?];
        let abs = |p: &str| format!("https://{}{p}", root.authority);
        let uris_h2 = [uri(abs(&m))?, uri(abs(&s))?, uri(abs(&b))?];
        Ok(Addressing {
            host: header("--url", &root.authority)?,
            from: header("--from", from)?,
            to: header("--to", to)?,
            uris_h1,
            uris_h2,
        })
    }
}

/// Builds every request of a run. Shared by all workers.
pub struct Factory {
    root: ServiceRoot,
    addressing: Addressing,
    identity: Identity,
    tokens: ArcSwap<Tokens>,
    bookings: Option<Bookings>,
    close: bool,
}

impl Factory {
    /// Requests to `root` addressed with `addressing`, with JWTs for `identity`. `close`: ask
    /// the server to close the connection after the response (new-connection mode).
    pub fn new(
        root: ServiceRoot,
        identity: Identity,
        addressing: Addressing,
        bookings: Option<Bookings>,
        close: bool,
    ) -> Factory {
        Factory {
            tokens: ArcSwap::from_pointee(Tokens::new(&identity, &root.endpoint, unix_now())),
            identity,
            root,
            addressing,
            bookings,
            close,
        }
    }

    /// Re-issues the tokens when they are older than a minute. Cheap when they are not.
    pub fn refresh_tokens(&self) {
        let now = unix_now();
        if now - self.tokens.load().issued_at >= TOKEN_REFRESH_SECS {
            self.tokens.store(Arc::new(Tokens::new(
                &self.identity,
                &self.root.endpoint,
                now,
            )));
        }
    }

    /// One request of `kind`, with a fresh `Ssp-TraceID` (and, for a booking, the next body).
    pub fn build(&self, kind: Kind, http2: bool) -> Request<Full<Bytes>> {
        self.request(kind, http2, self.body(kind))
    }

    /// The body of the next request of `kind`: the next booking, else none.
    pub fn body(&self, kind: Kind) -> Bytes {
        match (kind, &self.bookings) {
            (Kind::Book, Some(b)) => b.next(),
            _ => Bytes::new(),
        }
    }

    /// A request of `kind` with `body` and a fresh `Ssp-TraceID` (a request sent again on a
    /// new connection is built again with the same body).
    pub fn request(&self, kind: Kind, http2: bool, body: Bytes) -> Request<Full<Bytes>> {
        let a = &self.addressing;
        let uri = if http2 {
            a.uris_h2[kind.index()].clone()
        } else {
            a.uris_h1[kind.index()].clone()
        };
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = kind.method();
        *req.uri_mut() = uri;
        let h = req.headers_mut();
        if !http2 {
            h.insert(header::HOST, a.host.clone());
        }
        let mut trace = [0u8; uuid::fmt::Hyphenated::LENGTH];
        let trace = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut trace);
        h.insert(
            "ssp-traceid",
            HeaderValue::from_str(trace).expect("a hyphenated UUID is a valid header value"),
        );
        h.insert("ssp-from", a.from.clone());
        h.insert("ssp-to", a.to.clone());
        h.insert("ssp-interactionid", kind.interaction_id());
        h.insert(header::AUTHORIZATION, self.tokens.load().get(kind.scope()));
        h.insert(header::ACCEPT, FHIR_JSON);
        if kind == Kind::Book {
            h.insert(header::CONTENT_TYPE, FHIR_JSON_UTF8);
        }
        if self.close && !http2 {
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        req
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ssp::jwt::{DEV_ISSUER, DEV_ROLE_PROFILE, DEV_USER_ID};

    #[test]
    fn mix_is_exact_and_interleaved() {
        let mix = Mix::parse("search=9, book=1").expect("mix");
        let round: Vec<Kind> = (0..10).map(|n| mix.kind(n)).collect();
        assert_eq!(round.iter().filter(|k| **k == Kind::Search).count(), 9);
        assert_eq!(round.iter().filter(|k| **k == Kind::Book).count(), 1);
        // The pattern repeats exactly every 10 requests.
        assert_eq!(mix.kind(3), mix.kind(13));
        assert_eq!(mix.describe(), "search=9,book=1");

        let even = Mix::parse("search,book").expect("mix");
        assert_ne!(even.kind(0), even.kind(1), "1:1 alternates");
        assert!(!even.contains(Kind::Metadata));
    }

    #[test]
    fn bad_mixes_are_refused_with_the_reason() {
        for (text, reason) in [
            ("", "no interaction"),
            ("search=0", "no interaction"),
            ("serch=1", "unknown interaction `serch`"),
            ("search=x", "`x` is not a whole number"),
            ("search=10001", "at most 10000"),
            (
                "search=1,search=4294967295",
                "the weights add up to 4294967296; at most 10000",
            ),
            (
                "search=18446744073709551615,book=18446744073709551615,search=5",
                "the weights add up to 36893488147419103235; at most 10000",
            ),
            (
                "search=99999999999999999999",
                "`99999999999999999999` is too large: the weights add up to at most 10000",
            ),
            ("search=-1", "`-1` is not a whole number"),
        ] {
            let err = Mix::parse(text).expect_err(text).to_string();
            assert!(err.contains(reason), "{text}: {err}");
        }
    }

    #[test]
    fn service_roots_through_a_gateway_and_direct() {
        let gw = ServiceRoot::parse(
            "https://localhost:8443/https://localhost:9443/B82617/STU3/1/gpconnect/",
        )
        .expect("gateway url");
        assert_eq!(gw.host, "localhost");
        assert_eq!(gw.port, 8443);
        assert_eq!(gw.authority, "localhost:8443");
        assert_eq!(
            gw.base_path,
            "/https://localhost:9443/B82617/STU3/1/gpconnect"
        );
        assert_eq!(
            gw.endpoint,
            "https://localhost:9443/B82617/STU3/1/gpconnect"
        );
        assert!(gw.through_gateway());

        let direct = ServiceRoot::parse("https://[::1]/B82617/STU3/1/gpconnect").expect("direct");
        assert_eq!(direct.host, "::1");
        assert_eq!(direct.port, 443);
        assert_eq!(direct.endpoint, "https://[::1]/B82617/STU3/1/gpconnect");
        assert!(!direct.through_gateway());

        for bad in [
            "http://localhost:8443/x",
            "https://localhost:8443",
            "https://localhost:8443/",
            "https://localhost:99999/x",
            "https://user@localhost/x",
            "https://localhost/x?status=free",
        ] {
            assert!(ServiceRoot::parse(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn requests_carry_the_envelope_and_a_valid_jwt() {
        let root =
            ServiceRoot::parse("https://localhost:8443/https://localhost:9443/B/gpc").expect("url");
        let addressing =
            Addressing::new(&root, "200000000359", "918999198993", "status=free").expect("valid");
        let factory = Factory::new(
            root,
            dev_identity(),
            addressing,
            Some(Bookings::Replay(Bytes::from_static(b"{}"))),
            true,
        );
        let search = factory.build(Kind::Search, false);
        assert_eq!(search.method(), Method::GET);
        assert_eq!(
            search.uri(),
            "/https://localhost:9443/B/gpc/Slot?status=free"
        );
        let h = search.headers();
        assert_eq!(h["host"], "localhost:8443");
        assert_eq!(h["ssp-from"], "200000000359");
        assert_eq!(h["ssp-to"], "918999198993");
        assert_eq!(h["connection"], "close");
        assert_eq!(
            h["ssp-interactionid"],
            "urn:nhs:names:services:gpconnect:fhir:rest:search:slot-1"
        );
        let trace = h["ssp-traceid"].to_str().expect("ascii");
        assert!(uuid::Uuid::parse_str(trace).is_ok());
        let claims = jwt::check(
            h.get(header::AUTHORIZATION),
            &["organization/*.read".to_owned()],
            unix_now(),
            0,
        );
        let claims = claims.expect("valid claims");
        assert_eq!(claims.organization_ods_code.as_deref(), Some("A20047"));
        assert_eq!(
            claims.sds_role_profile_id.as_deref(),
            Some(DEV_ROLE_PROFILE)
        );

        let book = factory.build(Kind::Book, true);
        assert_eq!(book.method(), Method::POST);
        assert_eq!(
            book.uri(),
            "https://localhost:8443/https://localhost:9443/B/gpc/Appointment"
        );
        assert!(book.headers().get("host").is_none(), "h2 uses :authority");
        assert!(book.headers().get("connection").is_none());
        assert_eq!(
            book.headers()[header::CONTENT_TYPE],
            "application/fhir+json;charset=utf-8"
        );
        let other = factory.build(Kind::Search, false);
        assert_ne!(other.headers()["ssp-traceid"], h["ssp-traceid"]);
        assert_eq!(
            book.headers()["ssp-interactionid"],
            "urn:nhs:names:services:gpconnect:fhir:rest:create:appointment-1"
        );
    }

    fn dev_identity() -> Identity {
        Identity {
            issuer: DEV_ISSUER.into(),
            ods: "A20047".into(),
            user_id: DEV_USER_ID.into(),
            role_profile: DEV_ROLE_PROFILE.into(),
        }
    }

    #[test]
    fn the_jwt_carries_the_identity_asked_for() {
        let root = ServiceRoot::parse("https://gw:8443/https://p/B/gpc").expect("url");
        let identity = Identity {
            issuer: "https://consumer.example.org".into(),
            ods: "Y12345".into(),
            user_id: "U999".into(),
            role_profile: "R888".into(),
        };
        let addressing = Addressing::new(&root, "1", "2", "status=free").expect("valid");
        let factory = Factory::new(root, identity, addressing, None, false);
        let req = factory.build(Kind::Metadata, false);
        let auth = req.headers().get(header::AUTHORIZATION);
        let claims = jwt::check(auth, &["organization/*.read".to_owned()], unix_now(), 0)
            .expect("a valid GP Connect token");
        assert_eq!(claims.iss.as_deref(), Some("https://consumer.example.org"));
        assert_eq!(claims.organization_ods_code.as_deref(), Some("Y12345"));
        assert_eq!(claims.sds_user_id.as_deref(), Some("U999"));
        assert_eq!(claims.sds_role_profile_id.as_deref(), Some("R888"));
        assert_eq!(
            claims.device_identifier.as_deref(),
            Some("https://consumer.example.org/Id/device|ssp-gateway-loadtest")
        );
        assert_eq!(claims.aud.as_deref(), Some("https://p/B/gpc"));
    }

    #[test]
    fn booking_bodies_are_made_from_free_slots() {
        let bundle = json!({"resourceType": "Bundle", "entry": [
            {"resource": {"resourceType": "Slot", "id": "7", "status": "free",
                "start": "2026-01-02T09:00:00+00:00", "end": "2026-01-02T09:10:00+00:00"}},
            {"resource": {"resourceType": "Slot", "id": "8", "status": "busy",
                "start": "2026-01-02T09:10:00+00:00", "end": "2026-01-02T09:20:00+00:00"}},
            {"resource": {"resourceType": "Schedule", "id": "1"}}
        ]});
        let bodies = booking_bodies(
            bundle.to_string().as_bytes(),
            "1",
            "A20047",
            "2026-01-01T00:00:00+00:00",
        );
        assert_eq!(bodies.len(), 1);
        let body: Value = serde_json::from_slice(&bodies[0]).expect("json");
        assert_eq!(body["slot"][0]["reference"], "Slot/7");
        assert_eq!(body["participant"][0]["actor"]["reference"], "Patient/1");
        assert_eq!(body["start"], "2026-01-02T09:00:00+00:00");
        assert!(booking_bodies(b"not json", "1", "A", "x").is_empty());
    }

    #[test]
    fn default_search_is_the_next_week() {
        let day = chrono::NaiveDate::from_ymd_opt(2026, 1, 31).expect("date");
        assert_eq!(
            default_search_query(day),
            "status=free&start=ge2026-02-01&end=le2026-02-07&_include=Slot%3Aschedule"
        );
    }
}
