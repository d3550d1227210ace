//! The SSP envelope of a request: its method, the embedded provider URL in the request target
//! (`/https://provider/.../FHIR-path?query`) and the four `Ssp-*` headers. Pure parsing and
//! validation; this is the first wall against the gateway being used as an open proxy, so
//! anything unusual in the target is refused rather than normalised.

use http::{HeaderMap, HeaderName, Method};

use super::outcome::Rejection;

/// Accept only the methods GP Connect 1.2.7 uses (GET, POST, PUT). OPTIONS (CORS preflight) is
/// answered by the caller before this check; anything else is 405, whose `Allow` is every
/// method the gateway takes until the caller narrows it to the target's (see
/// `Catalogue::allow_for_target`).
pub fn check_method(method: &Method) -> Result<(), Rejection> {
    match *method {
        Method::GET | Method::POST | Method::PUT => Ok(()),
        _ => Err(Rejection::MethodNotAllowed {
            method: method.as_str().to_owned(),
            allow: ALL_METHODS.to_owned(),
        }),
    }
}

/// Every method the gateway takes, for a 405 whose target is not known.
pub const ALL_METHODS: &str = "GET, POST, PUT, OPTIONS";

const SCHEME: &str = "https://";

/// The provider URL embedded in the request target, validated, kept exactly as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    url: String,
    /// Byte index in `url` of the `/` that starts the path.
    path_start: usize,
    /// Byte index in `url` of the `?` that starts the query, if any.
    query_start: Option<usize>,
}

impl Target {
    /// The whole target URL, query included, e.g. `https://host/B82617/STU3/1/gpconnect/Slot?x=1`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The target URL without `?` and query.
    pub fn without_query(&self) -> &str {
        &self.url[..self.query_start.unwrap_or(self.url.len())]
    }

    /// The path after the authority; always starts with `/`.
    pub fn path(&self) -> &str {
        &self.url[self.path_start..self.query_start.unwrap_or(self.url.len())]
    }

    /// The query after the first `?` (possibly empty), unchanged; `None` when there is no `?`.
    pub fn query(&self) -> Option<&str> {
        self.query_start.map(|q| &self.url[q + 1..])
    }

    /// The authority (host and optional port), e.g. `localhost:9443`.
    pub fn authority(&self) -> &str {
        &self.url[SCHEME.len()..self.path_start]
    }
}

/// Parse the embedded target from the request's path-and-query as received (`/https://...`).
///
/// Rules (any violation is `InvalidTargetUrl`):
/// - the target is everything after the first `/` and starts with exactly `https://`;
/// - authority: non-empty, up to the first `/` or `?`, only letters, digits and `-._~:[]`
///   (so no userinfo `@`, `%`, `\`, whitespace);
/// - path: present (a `/` follows the authority), made of non-empty segments (no `//`, no
///   trailing `/`) of RFC 3986 pchar only (so no `\`, `#`, spaces, controls, non-ASCII); no `.`
///   segment and no `..` anywhere; percent-escapes well formed and never an encoded `.`, `/`,
///   `\`, `%` or control character (so `%2e%2e`, `.%2E`, `%2f`, `%5C` in any case are refused);
/// - query (after the first `?`): passed through unchanged, but no `#`, controls, spaces or
///   non-ASCII, and no `_method` parameter (in any case or encoding, as PHP names it too): the method
///   override that frameworks' method-override middleware honour, which would run another
///   method than the interaction checked (FHIR has no such parameter).
pub fn parse_target(path_and_query: &str) -> Result<Target, Rejection> {
    check_target(path_and_query).map_err(|_| Rejection::InvalidTargetUrl)
}

/// What is wrong with a target [`parse_target`] refuses, in words for the consumer's developer
/// (the answer's `details.text`; the token stays `INVALID_TARGET_URL`, as the SSP's). `None`
/// for a valid target.
pub fn target_problem(path_and_query: &str) -> Option<&'static str> {
    check_target(path_and_query).err()
}

fn check_target(path_and_query: &str) -> Result<Target, &'static str> {
    const NOT_HTTPS: &str = "the target URL must follow the gateway's `/` and start with https://";
    const NO_PATH: &str = "the target URL has no path after its host";
    let url = path_and_query.strip_prefix('/').ok_or(NOT_HTTPS)?;
    let after_scheme = url.strip_prefix(SCHEME).ok_or(NOT_HTTPS)?;

    let authority_len = after_scheme.find(['/', '?']).ok_or(NO_PATH)?;
    let authority = &after_scheme[..authority_len];
    if authority.contains("..")
        || !authority.bytes().all(is_authority_byte)
        || split_authority(authority).is_none()
    {
        return Err(
            "the target URL's host and port are not valid: a host name or address, \
                    no userinfo (`@`), at most one port of 1 to 65535",
        );
    }
    let path_start = SCHEME.len() + authority_len;
    if url.as_bytes()[path_start] != b'/' {
        // A `?` straight after the authority: no path.
        return Err(NO_PATH);
    }

    let query_start = url[path_start..].find('?').map(|i| path_start + i);
    let path = &url[path_start..query_start.unwrap_or(url.len())];
    check_path(path)?;
    if let Some(q) = query_start {
        let query = &url[q + 1..];
        if !query.bytes().all(is_query_byte) {
            return Err(
                "the target URL's query holds a character that must be percent-encoded \
                        (a space, `#`, a control or non-ASCII character)",
            );
        }
        if overrides_method(query) {
            return Err("the target URL's query has a `_method` parameter (a method override)");
        }
    }

    Ok(Target {
        url: url.to_owned(),
        path_start,
        query_start,
    })
}

/// Splits an authority into its host and port: `host`, `host:port`, `[v6]` or `[v6]:port`,
/// with a non-empty host and a port of 1 to 65535 in decimal digits. `None` for anything else
/// (an empty host, an empty port, `:99999`, two colons outside brackets, brackets around
/// anything but an IPv6 address, a bracket in a name): a port that does not fit is not quietly
/// dropped, which would send the request to the scheme's default port, and `[localhost]` is
/// not read as `localhost`.
pub fn split_authority(authority: &str) -> Option<(&str, Option<u16>)> {
    let (host, port) = match authority.strip_prefix('[') {
        Some(rest) => {
            let inside = rest.find(']')?;
            rest[..inside].parse::<std::net::Ipv6Addr>().ok()?;
            let end = inside + 2;
            let port = match &authority[end..] {
                "" => None,
                after => Some(after.strip_prefix(':')?),
            };
            (&authority[..end], port)
        }
        None => match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    if host.is_empty() || (!host.starts_with('[') && host.contains(['[', ']'])) {
        return None;
    }
    let port = match port {
        None => None,
        Some(p) if !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()) => {
            Some(p.parse::<u16>().ok().filter(|n| *n != 0)?)
        }
        Some(_) => return None,
    };
    Some((host, port))
}

fn is_authority_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b':' | b'[' | b']')
}

/// RFC 3986 pchar minus pct-encoded (handled separately): unreserved, sub-delims, `:` and `@`.
pub(crate) fn is_pchar_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
                | b':'
                | b'@'
        )
}

fn is_query_byte(b: u8) -> bool {
    b.is_ascii_graphic() && b != b'#'
}

/// Whether `query` has a parameter that a framework reads as `_method` (separated by `&` or
/// `;`; see [`is_method_name`]). Cheap for the usual query: the separators are found with
/// `memchr`, and only a name starting with `_`, `%`, `.` or `+` is looked at further.
fn overrides_method(query: &str) -> bool {
    let q = query.as_bytes();
    let mut start = 0;
    loop {
        let end = memchr::memchr2(b'&', b';', &q[start..]).map_or(q.len(), |i| start + i);
        let param = &q[start..end];
        if matches!(param.first(), Some(b'_' | b'%' | b'.' | b'+')) {
            let name = memchr::memchr(b'=', param).map_or(param, |i| &param[..i]);
            if is_method_name(name) {
                return true;
            }
        }
        if end == q.len() {
            return false;
        }
        start = end + 1;
    }
}

/// Whether `name` is `_method` once decoded as the frameworks that honour it decode it: in
/// any case (Express, Rails), percent-encoded or not, `+` as a space; and as PHP names its
/// query variables (Laravel, Symfony): leading spaces dropped, a space or `.` read as `_`,
/// the name ending at `[` (array notation: `_method[]`) or a NUL. So `.method`, `+_method`,
/// `%20_method` and `_method[]` are all `_method` to a PHP provider.
fn is_method_name(name: &[u8]) -> bool {
    const NAME: &[u8] = b"_method";
    let mut seen = [0u8; NAME.len()];
    let (mut i, mut n) = (0, 0);
    while i < name.len() {
        let b = match name[i] {
            b'%' => {
                let hex = name
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok());
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        i += 2;
                        b
                    }
                    None => return false,
                }
            }
            b'+' => b' ',
            b => b,
        };
        i += 1;
        match b {
            b'[' | 0 => break,
            b' ' if n == 0 => continue,
            _ => {}
        }
        if n == NAME.len() {
            return false;
        }
        seen[n] = if matches!(b, b' ' | b'.') { b'_' } else { b };
        n += 1;
    }
    seen[..n].eq_ignore_ascii_case(NAME)
}

/// `path` starts with `/` (guaranteed by the caller).
fn check_path(path: &str) -> Result<(), &'static str> {
    if path.contains("..") {
        return Err("the target URL's path holds `..`");
    }
    path[1..].split('/').try_for_each(check_segment)
}

fn check_segment(segment: &str) -> Result<(), &'static str> {
    if segment.is_empty() {
        return Err(
            "the target URL's path has an empty segment: `//`, or a trailing `/` \
                    (`Slot/` is not `Slot`)",
        );
    }
    if segment == "." {
        return Err("the target URL's path has a `.` segment");
    }
    const ENCODED: &str = "the target URL's path has a malformed percent-escape, or an encoded \
                           `/`, `\\`, `.`, `%` or control character";
    let bytes = segment.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let (Some(&hi), Some(&lo)) = (bytes.get(i + 1), bytes.get(i + 2)) else {
                return Err(ENCODED);
            };
            let (Some(hi), Some(lo)) = (hex_value(hi), hex_value(lo)) else {
                return Err(ENCODED);
            };
            let decoded = hi << 4 | lo;
            // Encoded `/`, `\`, `.` and `%` (double encoding) could change the path's meaning at
            // a server that decodes (`%2e%2e` is `..`); encoded controls have no business in a
            // FHIR path. A dot never needs encoding (it is unreserved), so none is accepted.
            if matches!(decoded, b'/' | b'\\' | b'.' | b'%') || decoded < 0x20 || decoded == 0x7f {
                return Err(ENCODED);
            }
            i += 3;
        } else if is_pchar_byte(b) {
            i += 1;
        } else {
            return Err(
                "the target URL's path holds a character a path cannot (a space, `\\`, \
                        `#`, a control or non-ASCII character)",
            );
        }
    }
    Ok(())
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Canonical name of the trace id header.
pub const TRACE_ID: &str = "Ssp-TraceID";
/// Canonical name of the sender ASID header.
pub const FROM: &str = "Ssp-From";
/// Canonical name of the receiver ASID header.
pub const TO: &str = "Ssp-To";
/// Canonical name of the interaction id header.
pub const INTERACTION_ID: &str = "Ssp-InteractionID";

const TRACE_ID_NAME: HeaderName = HeaderName::from_static("ssp-traceid");
const FROM_NAME: HeaderName = HeaderName::from_static("ssp-from");
const TO_NAME: HeaderName = HeaderName::from_static("ssp-to");
const INTERACTION_ID_NAME: HeaderName = HeaderName::from_static("ssp-interactionid");

/// The four Spine header names as static `HeaderName`s: the HTTP/1.1 parser uses them for the
/// headers every gateway request carries, so reading one allocates nothing and every copy of
/// the head shares it.
pub static SSP_HEADER_NAMES: [HeaderName; 4] =
    [TRACE_ID_NAME, FROM_NAME, TO_NAME, INTERACTION_ID_NAME];

/// The four Spine headers, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SspHeaders {
    /// `Ssp-TraceID`: a UUID as sent (case kept).
    pub trace_id: String,
    /// `Ssp-From`: the sender ASID (digits).
    pub from: String,
    /// `Ssp-To`: the receiver ASID (digits).
    pub to: String,
    /// `Ssp-InteractionID`: the declared interaction URN (not yet looked up).
    pub interaction_id: String,
}

/// Read and validate the Ssp headers, in the order TraceID, From, To, InteractionID; the first
/// that is missing, repeated, not visible ASCII or malformed is named in the rejection.
/// Surrounding spaces and tabs (HTTP OWS) are ignored; nothing else is trimmed.
///
/// Then two ways of making the provider see other headers than those checked are refused:
/// - a `Connection` header naming an Ssp header or `Authorization` (`MISSING_OR_INVALID_HEADER_
///   Connection`): hop-by-hop, the named header would be removed after it was checked;
/// - a header whose name is an Ssp header's with `_` for `-` (`Ssp_InteractionID`), named as the
///   header it imitates: servers that read headers through CGI-style names (where `-` becomes
///   `_`) would take it for the checked one.
pub fn parse_headers(headers: &HeaderMap) -> Result<SspHeaders, Rejection> {
    let declared = declared(headers);
    let invalid = |header| Rejection::MissingOrInvalidHeader { header };
    let trace_id = declared.trace_id.ok_or_else(|| invalid(TRACE_ID))?;
    let from = declared.from.ok_or_else(|| invalid(FROM))?;
    let to = declared.to.ok_or_else(|| invalid(TO))?;
    let interaction_id = declared
        .interaction_id
        .ok_or_else(|| invalid(INTERACTION_ID))?;
    for (name, value) in headers {
        if name == http::header::CONNECTION {
            let names_checked = value
                .as_bytes()
                .split(|&b| b == b',')
                .map(|t| t.trim_ascii())
                .any(|t| {
                    t.eq_ignore_ascii_case(b"authorization")
                        || SSP_HEADER_NAMES
                            .iter()
                            .any(|n| t.eq_ignore_ascii_case(n.as_str().as_bytes()))
                });
            if names_checked {
                return Err(Rejection::MissingOrInvalidHeader {
                    header: "Connection",
                });
            }
        } else if name.as_str().contains('_') {
            let imitated = SSP_HEADER_NAMES
                .iter()
                .zip([TRACE_ID, FROM, TO, INTERACTION_ID])
                .find(|(n, _)| {
                    n.as_str().len() == name.as_str().len()
                        && n.as_str()
                            .bytes()
                            .zip(name.as_str().bytes())
                            .all(|(a, b)| a == b || (a == b'-' && b == b'_'))
                });
            if let Some((_, canonical)) = imitated {
                return Err(Rejection::MissingOrInvalidHeader { header: canonical });
            }
        }
    }
    Ok(SspHeaders {
        trace_id: trace_id.to_owned(),
        from: from.to_owned(),
        to: to.to_owned(),
        interaction_id: interaction_id.to_owned(),
    })
}

/// What a request declared of itself, header by header: each Spine header that is present once
/// and well formed, whatever the others are. For the audit record of a request refused before
/// its envelope passed as a whole (a method not allowed, a target URL or another header that
/// is invalid), so that an investigator still sees who it said it was from and what it said it
/// was; a header not well formed is left out, never recorded as sent.
#[derive(Debug, Clone, Copy)]
pub struct Declared<'h> {
    /// `Ssp-TraceID`.
    pub trace_id: Option<&'h str>,
    /// `Ssp-From`.
    pub from: Option<&'h str>,
    /// `Ssp-To`.
    pub to: Option<&'h str>,
    /// `Ssp-InteractionID`.
    pub interaction_id: Option<&'h str>,
}

/// The well-formed Spine headers of `headers`, each on its own (see [`Declared`]); what
/// [`parse_headers`] requires all four of.
pub fn declared(headers: &HeaderMap) -> Declared<'_> {
    Declared {
        trace_id: header(headers, &TRACE_ID_NAME, TRACE_ID, is_uuid).ok(),
        from: header(headers, &FROM_NAME, FROM, is_asid).ok(),
        to: header(headers, &TO_NAME, TO, is_asid).ok(),
        interaction_id: header(
            headers,
            &INTERACTION_ID_NAME,
            INTERACTION_ID,
            is_interaction_id,
        )
        .ok(),
    }
}

fn header<'h>(
    headers: &'h HeaderMap,
    name: &HeaderName,
    canonical: &'static str,
    valid: fn(&str) -> bool,
) -> Result<&'h str, Rejection> {
    let invalid = || Rejection::MissingOrInvalidHeader { header: canonical };
    let mut values = headers.get_all(name).iter();
    let value = values.next().ok_or_else(invalid)?;
    if values.next().is_some() {
        return Err(invalid());
    }
    let text = value
        .to_str()
        .map_err(|_| invalid())?
        .trim_matches([' ', '\t']);
    if valid(text) {
        Ok(text)
    } else {
        Err(invalid())
    }
}

/// 8-4-4-4-12 hex digits, either case.
fn is_uuid(text: &str) -> bool {
    text.len() == 36
        && text.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

/// 1 to 32 ASCII digits.
fn is_asid(text: &str) -> bool {
    (1..=32).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_digit())
}

/// 1 to 256 printable ASCII characters, no spaces.
pub(crate) fn is_interaction_id(text: &str) -> bool {
    (1..=256).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;

    const SLOT: &str = "/https://localhost:9443/B82617/STU3/1/gpconnect/Slot?status=free&start=ge2025-05-21T01:00:00%2B01:00&searchFilter=https://fhir.nhs.uk/Id/ods-organization-code|A20047";

    #[test]
    fn a_refused_target_says_what_is_wrong() {
        let base = "/https://p.example:9443/B82617/STU3/1/gpconnect";
        assert_eq!(target_problem(&format!("{base}/Slot?status=free")), None);
        for (target, says) in [
            ("/http://p.example/Slot".to_string(), "start with https://"),
            ("/https://p.example".to_string(), "no path"),
            ("/https://u@p.example/Slot".to_string(), "userinfo"),
            ("/https://p.example:99999/Slot".to_string(), "port"),
            (format!("{base}/Slot/?status=free"), "trailing `/`"),
            (format!("{base}//Slot"), "empty segment"),
            (format!("{base}/./Slot"), "`.` segment"),
            (format!("{base}/%2e%2e/Slot"), "encoded"),
            (format!("{base}/Sl%zzot"), "malformed percent-escape"),
            (format!("{base}/Sl ot"), "a character a path cannot"),
            (format!("{base}/Slot?a b"), "must be percent-encoded"),
            (format!("{base}/Slot?_Method=PUT"), "`_method`"),
        ] {
            let problem = target_problem(&target).unwrap_or_else(|| panic!("{target}: accepted"));
            assert!(problem.contains(says), "{target}: {problem}");
            assert_eq!(
                parse_target(&target),
                Err(Rejection::InvalidTargetUrl),
                "{target}"
            );
        }
    }

    #[test]
    fn methods() {
        for m in [Method::GET, Method::POST, Method::PUT] {
            assert_eq!(check_method(&m), Ok(()));
        }
        for m in [
            Method::OPTIONS,
            Method::DELETE,
            Method::PATCH,
            Method::HEAD,
            Method::TRACE,
            Method::CONNECT,
        ] {
            assert_eq!(
                check_method(&m),
                Err(Rejection::MethodNotAllowed {
                    method: m.as_str().to_owned(),
                    allow: ALL_METHODS.to_owned(),
                })
            );
        }
        let custom = Method::from_bytes(b"Brew").expect("valid method token");
        let err = check_method(&custom).expect_err("not allowed");
        assert_eq!(err.token(), "METHOD_NOT_ALLOWED_BREW");
    }

    #[test]
    fn parses_the_slot_search_target() {
        let t = parse_target(SLOT).expect("valid");
        assert_eq!(t.url(), &SLOT[1..]);
        assert_eq!(
            t.without_query(),
            "https://localhost:9443/B82617/STU3/1/gpconnect/Slot"
        );
        assert_eq!(t.path(), "/B82617/STU3/1/gpconnect/Slot");
        assert_eq!(t.authority(), "localhost:9443");
        assert_eq!(
            t.query(),
            Some("status=free&start=ge2025-05-21T01:00:00%2B01:00&searchFilter=https://fhir.nhs.uk/Id/ods-organization-code|A20047")
        );
    }

    #[test]
    fn accepts_ordinary_targets() {
        for ok in [
            "/https://h/metadata",
            "/https://h/x/Patient/$gpc.registerpatient",
            "/https://h/x/Appointment/53",
            "/https://h/x/Patient/9000000009/Appointment?start=ge2025-06-01&start=le2025-06-14",
            "/https://h/x/Slot?",
            "/https://[::1]:9443/x/Slot",
            "/https://[::1]/x/Slot",
            "/https://h:1/x",
            "/https://h:65535/x",
            "/https://h/a%20b",
            "/https://h/x/a.b/_c~d",
            "/https://h/x?a=b\\c",
        ] {
            assert!(parse_target(ok).is_ok(), "{ok}");
        }
        assert_eq!(split_authority("h:65535"), Some(("h", Some(65535))));
        assert_eq!(split_authority("[::1]:9443"), Some(("[::1]", Some(9443))));
        assert_eq!(split_authority("[::1]"), Some(("[::1]", None)));
        assert_eq!(split_authority("localhost"), Some(("localhost", None)));
        assert_eq!(
            split_authority("[2001:db8::a]:443"),
            Some(("[2001:db8::a]", Some(443)))
        );
        // Brackets hold an IPv6 address, nothing else; a name holds no bracket (the forwarder
        // would strip them and connect to `localhost`).
        for bad in [
            "[localhost]:9443",
            "[evil.example]",
            "[]",
            "[::1",
            "[1.2.3.4]",
            "[v1.x]",
            "[fe80::1%25eth0]",
            "a[b]:9443",
            "a]b",
            "[::1]x",
        ] {
            assert_eq!(split_authority(bad), None, "{bad}");
            let target = format!("/https://{bad}/x/Slot");
            assert!(parse_target(&target).is_err(), "{target}");
        }
        let t = parse_target("/https://h/x/Slot?").expect("valid");
        assert_eq!(t.query(), Some(""));
        assert_eq!(t.path(), "/x/Slot");
        let t = parse_target("/https://h/x/Slot").expect("valid");
        assert_eq!(t.query(), None);
        assert_eq!(t.without_query(), t.url());
    }

    #[test]
    fn a_method_override_in_the_query_is_refused() {
        for bad in [
            "/https://h/x/Appointment?_method=DELETE",
            "/https://h/x/Slot?status=free&_method=DELETE",
            "/https://h/x/Slot?status=free;_METHOD=put",
            "/https://h/x/Slot?%5Fmethod=DELETE",
            "/https://h/x/Slot?_%6d%65thod=DELETE",
            "/https://h/x/Slot?_method",
            // As PHP reads a query variable's name (Laravel, Symfony honour `_method`).
            "/https://h/x/Appointment?.method=DELETE",
            "/https://h/x/Appointment?%2Emethod=DELETE",
            "/https://h/x/Appointment?+_method=DELETE",
            "/https://h/x/Appointment?%20%20_method=DELETE",
            "/https://h/x/Appointment?++.method=DELETE",
            "/https://h/x/Appointment?_method[]=DELETE",
            "/https://h/x/Appointment?_method%5B0%5D=DELETE",
            "/https://h/x/Appointment?_method%00x=DELETE",
        ] {
            assert_eq!(
                parse_target(bad).err(),
                Some(Rejection::InvalidTargetUrl),
                "{bad}"
            );
        }
        for ok in [
            "/https://h/x/Slot?_format=json&_include=Slot:schedule",
            "/https://h/x/Slot?method=x&x_method=y&_methods=z",
            "/https://h/x/Slot?%5=1&_%zz=2",
            "/https://h/x/Slot?a=_method",
            "/https://h/x/Slot?_method_=x&_meth=y&[_method]=z&x+_method=w",
            "/https://h/x/Slot?%2B_method=x",
        ] {
            assert!(parse_target(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_bad_targets() {
        for bad in [
            "",
            "/",
            "https://h/x",
            "//https://h/x",
            "/http://h/x",
            "/HTTPS://h/x",
            "/Https://h/x",
            "/https:/h/x",
            "/https:h/x",
            "/https://",
            "/https:///x",
            "/https://h",
            "/https://h?x=1",
            "/https://h:99999/x",
            "/https://h:65536/x",
            "/https://h:0/x",
            "/https://h:/x",
            "/https://:443/x",
            "/https://h:44x/x",
            "/https://h:443:443/x",
            "/https://[::1]x/y",
            "/https://[/y",
            "/https://[]/y",
            "/https://[::1]:/y",
            "/https://h/",
            "/https://h/x/",
            "/https://h//x",
            "/https://h/x//y",
            "/https://user@h/x",
            "/https://h%2e/x",
            "/https://h\\x/y",
            "/https://h x/y",
            "/https://h\t/y",
            "/https://hé/y",
            "/https://h#/y",
            "/https://h/x/./y",
            "/https://h/x/.../y",
            "/https://h/x/a..b",
            "/https://h..x/y",
            "/https://h/x/a%2eb",
            "/https://h/x/../y",
            "/https://h/..",
            "/https://h/.",
            "/https://h/x/%2e/y",
            "/https://h/x/%2E%2E/y",
            "/https://h/x/.%2E/y",
            "/https://h/x/%2e./y",
            "/https://h/x%2fy",
            "/https://h/x%2Fy",
            "/https://h/x%5cy",
            "/https://h/x%5Cy",
            "/https://h/x%252e",
            "/https://h/x%00",
            "/https://h/x%1f",
            "/https://h/x%",
            "/https://h/x%2",
            "/https://h/x%zz",
            "/https://h/x\\y",
            "/https://h/x#frag",
            "/https://h/x y",
            "/https://h/x\ty",
            "/https://h/x\u{0}",
            "/https://h/x\u{7f}",
            "/https://h/é",
            "/https://h/x|y",
            "/https://h/x{id}",
            "/https://h/x?a#b",
            "/https://h/x?a b",
            "/https://h/x?a\u{1}",
            "/https://h/x?a\u{7f}",
            "/https://h/x?é",
        ] {
            assert_eq!(
                parse_target(bad),
                Err(Rejection::InvalidTargetUrl),
                "{bad:?}"
            );
        }
    }

    fn headers(pairs: &[(&str, &[u8])]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).expect("name"),
                HeaderValue::from_bytes(value).expect("value"),
            );
        }
        map
    }

    const GOOD: [(&str, &[u8]); 4] = [
        ("Ssp-TraceID", b"629ea9ba-a077-4d99-b289-7a9b19fd4e03"),
        ("Ssp-From", b"200000000359"),
        ("Ssp-To", b"918999198993"),
        (
            "Ssp-InteractionID",
            b"urn:nhs:names:services:gpconnect:fhir:rest:search:slot-1",
        ),
    ];

    fn with(name: &str, value: Option<&'static [u8]>) -> HeaderMap {
        let mut pairs: Vec<(&str, &[u8])> =
            GOOD.iter().filter(|(n, _)| *n != name).copied().collect();
        if let Some(v) = value {
            pairs.push((name, v));
        }
        headers(&pairs)
    }

    fn rejected(header: &'static str) -> Result<SspHeaders, Rejection> {
        Err(Rejection::MissingOrInvalidHeader { header })
    }

    #[test]
    fn parses_good_headers_any_name_case() {
        let parsed = parse_headers(&headers(&GOOD)).expect("valid");
        assert_eq!(parsed.trace_id, "629ea9ba-a077-4d99-b289-7a9b19fd4e03");
        assert_eq!(parsed.from, "200000000359");
        assert_eq!(parsed.to, "918999198993");
        assert_eq!(
            parsed.interaction_id,
            "urn:nhs:names:services:gpconnect:fhir:rest:search:slot-1"
        );
        let mixed = headers(&[
            ("SSP-TRACEID", b"629EA9BA-A077-4D99-B289-7A9B19FD4E03"),
            ("ssp-from", b" \t200000000359\t "),
            ("Ssp-to", b"918999198993"),
            ("Ssp-InteractionId", b"urn:x"),
        ]);
        let parsed = parse_headers(&mixed).expect("valid");
        assert_eq!(parsed.trace_id, "629EA9BA-A077-4D99-B289-7A9B19FD4E03");
        assert_eq!(parsed.from, "200000000359");
        assert_eq!(parsed.interaction_id, "urn:x");
    }

    #[test]
    fn each_header_missing_repeated_or_malformed() {
        let cases: [(&'static str, &[&'static [u8]]); 4] = [
            (
                TRACE_ID,
                &[
                    b"",
                    b"629ea9ba-a077-4d99-b289-7a9b19fd4e0",
                    b"629ea9ba-a077-4d99-b289-7a9b19fd4e033",
                    b"629ea9baa077-4d99-b289-7a9b19fd4e033",
                    b"629ea9ba-a077-4d99-b289-7a9b19fd4e0g",
                    b"{629ea9ba-a077-4d99-b289-7a9b19fd4e03}",
                    b"629ea9ba_a077-4d99-b289-7a9b19fd4e03",
                ],
            ),
            (
                FROM,
                &[
                    b"",
                    b"20000000035a",
                    b"-200000000359",
                    b"2000 00000359",
                    b"123456789012345678901234567890123",
                    b"\xc2\xb2",
                ],
            ),
            (TO, &[b"", b"abc", b"1.5", b"\xff"]),
            (
                INTERACTION_ID,
                &[b"", b"urn:a b", b"urn:a\tb", b"urn:\xc3\xa9"],
            ),
        ];
        for (name, bad_values) in cases {
            assert_eq!(
                parse_headers(&with(name, None)),
                rejected(name),
                "{name} missing"
            );
            for bad in bad_values.iter().copied() {
                assert_eq!(
                    parse_headers(&with(name, Some(bad))),
                    rejected(name),
                    "{name} = {bad:?}"
                );
            }
            let mut repeated = headers(&GOOD);
            let good = GOOD.iter().find(|(n, _)| *n == name).expect("known").1;
            repeated.append(
                HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()).expect("name"),
                HeaderValue::from_bytes(good).expect("value"),
            );
            assert_eq!(parse_headers(&repeated), rejected(name), "{name} repeated");
        }
        let long = "a".repeat(257);
        let mut map = headers(&GOOD);
        map.insert(
            INTERACTION_ID_NAME,
            HeaderValue::from_str(&long).expect("value"),
        );
        assert_eq!(parse_headers(&map), rejected(INTERACTION_ID));
        map.insert(
            INTERACTION_ID_NAME,
            HeaderValue::from_str(&long[..256]).expect("value"),
        );
        assert!(parse_headers(&map).is_ok());
        map.insert(
            FROM_NAME,
            HeaderValue::from_static("12345678901234567890123456789012"),
        );
        assert!(parse_headers(&map).is_ok());
    }

    /// A `Connection` header naming a checked header, or an `_` look-alike of an Ssp header,
    /// would let the provider see other headers than those checked.
    #[test]
    fn checked_headers_cannot_be_dropped_or_imitated() {
        let good = |extra: &[(&'static str, &'static [u8])]| {
            let mut pairs = GOOD.to_vec();
            pairs.extend_from_slice(extra);
            parse_headers(&headers(&pairs))
        };
        for named in [
            &b"ssp-interactionid"[..],
            b"keep-alive, Ssp-TraceID",
            b"SSP-FROM",
            b" ssp-to ,close",
            b"Authorization",
        ] {
            assert_eq!(
                good(&[("Connection", named)]),
                rejected("Connection"),
                "{}",
                String::from_utf8_lossy(named)
            );
        }
        assert!(good(&[("Connection", b"keep-alive, close, x-other")]).is_ok());
        assert!(good(&[("Connection", b"ssp-interactionid-x")]).is_ok());
        for (alias, imitated) in [
            ("Ssp_InteractionID", INTERACTION_ID),
            ("ssp_traceid", TRACE_ID),
            ("SSP_FROM", FROM),
            ("Ssp_To", TO),
        ] {
            assert_eq!(good(&[(alias, b"urn:x")]), rejected(imitated), "{alias}");
        }
        assert!(good(&[("x_custom", b"1"), ("ssp_tox", b"1")]).is_ok());
    }

    #[test]
    fn headers_are_checked_in_order() {
        assert_eq!(parse_headers(&HeaderMap::new()), rejected(TRACE_ID));
        let only_trace = headers(&GOOD[..1]);
        assert_eq!(parse_headers(&only_trace), rejected(FROM));
        let no_to = headers(&[GOOD[0], GOOD[1], ("Ssp-InteractionID", b"bad value")]);
        assert_eq!(parse_headers(&no_to), rejected(TO));
        let no_interaction = headers(&GOOD[..3]);
        assert_eq!(parse_headers(&no_interaction), rejected(INTERACTION_ID));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn parse_target_never_panics(s in any::<String>()) {
            let _ = parse_target(&s);
        }

        #[test]
        fn accepted_targets_are_clean(
            s in "/https://[a-z.:%@\\\\]{0,6}[/?#.%2eEfF5cC\\\\a-z ]{0,30}"
        ) {
            if let Ok(t) = parse_target(&s) {
                let base = t.without_query();
                prop_assert!(base.starts_with("https://"));
                prop_assert!(!base.contains(".."));
                prop_assert!(!base[8..].contains("//"));
                prop_assert!(!base.contains('\\'));
                prop_assert!(!base.contains('#'));
                prop_assert!(t.path().starts_with('/'));
                prop_assert_eq!(format!("https://{}{}", t.authority(), t.path()), base);
            }
        }

        #[test]
        fn accepted_targets_from_path_like_input_are_clean(
            segs in proptest::collection::vec("[a-zA-Z0-9.%2eEfF5cC]{0,5}", 1..6),
            query in proptest::option::of("[ -~]{0,10}"),
        ) {
            let mut s = format!("/https://host/{}", segs.join("/"));
            if let Some(q) = &query {
                s.push('?');
                s.push_str(q);
            }
            if let Ok(t) = parse_target(&s) {
                let base = t.without_query();
                prop_assert!(base.starts_with("https://"));
                for seg in t.path()[1..].split('/') {
                    prop_assert!(!seg.is_empty());
                    prop_assert!(seg != "." && seg != "..");
                    let lower = seg.to_ascii_lowercase();
                    prop_assert!(lower != "%2e" && lower != "%2e%2e" && lower != ".%2e" && lower != "%2e.");
                    prop_assert!(!lower.contains("%2f") && !lower.contains("%5c"));
                }
            }
        }
    }
}
