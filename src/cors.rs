//! CORS: which web origins a browser consumer may call the gateway from
//! (`[policy] cors_allowed_origins`), the check of that list's entries, and the headers that
//! grant an origin on an answer. Pure: it decides from header values and never touches a socket.
//! A request without `Origin` (every server-to-server consumer) costs one header lookup here.

use http::header::{self, HeaderMap, HeaderValue};

/// The headers a consumer may send, listed in CORS preflight answers.
pub const ALLOW_HEADERS: &str = "Accept, Authorization, Content-Type, If-Match, Prefer, \
     Ssp-TraceID, Ssp-From, Ssp-To, Ssp-InteractionID";

/// The headers a browser consumer's script may read from an answer: the version for
/// `If-Match`, where a booking was created, the gateway's request id, when to try again after
/// a 429 or 503 and the consumer's rate limit, and what was wrong with its token.
const EXPOSE_HEADERS: HeaderValue = HeaderValue::from_static(
    "ETag, Location, Content-Location, X-Request-Id, Retry-After, X-Rate-Limit-Limit, \
     X-Rate-Limit-Remaining, X-Rate-Limit-Reset, WWW-Authenticate",
);

const VARY_ORIGIN: HeaderValue = HeaderValue::from_static("Origin");

/// `Access-Control-Allow-Credentials`: a browser sends its client certificate on a cross-origin
/// call, and lets the page read the answer, only with this (and never with a wildcard grant).
const CREDENTIALS: HeaderValue = HeaderValue::from_static("true");

/// The most origins a list may hold: each request with `Origin` scans it.
pub const MAX_ORIGINS: usize = 256;

/// The web origins whose pages may call the gateway through a browser.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AllowedOrigins {
    /// `["*"]`: any origin; the request's own is echoed back.
    Any,
    /// `[]`: none (the default).
    #[default]
    None,
    /// These origins, compared with the request's `Origin` ignoring ASCII case.
    Listed(Box<[Box<str>]>),
}

/// What a request's `Origin` earned it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// No `Origin`: not a browser's cross-origin request; nothing is added to its answer.
    NoOrigin,
    /// An allowed origin, granted on the answer; `credentials` when it was listed by name
    /// (never for `["*"]`): the browser may then send the clinician's client certificate and
    /// let the page read the answer.
    Allowed {
        origin: HeaderValue,
        credentials: bool,
    },
    /// An origin not allowed: its answer grants nothing (a preflight is refused).
    NotAllowed,
}

impl AllowedOrigins {
    /// The list from the configuration's entries, or every problem with the index of the entry
    /// it is about (`None`: the list as a whole).
    pub fn parse(entries: &[&str]) -> Result<AllowedOrigins, Vec<(Option<usize>, String)>> {
        let mut problems = Vec::new();
        if entries.len() > MAX_ORIGINS {
            problems.push((
                None,
                format!("lists {} origins; at most {MAX_ORIGINS}", entries.len()),
            ));
        }
        let any = entries.contains(&"*");
        if any && entries.len() > 1 {
            problems.push((
                None,
                "\"*\" (any origin) must be the only entry when it is listed".to_owned(),
            ));
        }
        // Every other entry is checked too, so that one run lists every problem.
        let mut origins = Vec::with_capacity(entries.len());
        for (i, entry) in entries.iter().enumerate() {
            if *entry == "*" {
                continue;
            }
            match check_origin(entry) {
                Ok(()) => origins.push(Box::from(*entry)),
                Err(reason) => problems.push((Some(i), reason)),
            }
        }
        if !problems.is_empty() {
            Err(problems)
        } else if any {
            Ok(AllowedOrigins::Any)
        } else if origins.is_empty() {
            Ok(AllowedOrigins::None)
        } else {
            Ok(AllowedOrigins::Listed(origins.into_boxed_slice()))
        }
    }

    /// `["*"]`: any web page may call the gateway through a clinician's browser.
    pub fn is_any(&self) -> bool {
        matches!(self, AllowedOrigins::Any)
    }

    /// Whether a request's `Origin` value is allowed: exact, ignoring ASCII case (scheme and
    /// host; a port is digits). No allocation: a scan of the short list.
    pub fn allows(&self, origin: &[u8]) -> bool {
        match self {
            AllowedOrigins::Any => true,
            AllowedOrigins::None => false,
            AllowedOrigins::Listed(origins) => origins
                .iter()
                .any(|o| o.len() == origin.len() && o.as_bytes().eq_ignore_ascii_case(origin)),
        }
    }

    /// What the request with `headers` is granted.
    pub fn judge(&self, headers: &HeaderMap) -> Grant {
        match headers.get(header::ORIGIN) {
            None => Grant::NoOrigin,
            Some(origin) if self.allows(origin.as_bytes()) => Grant::Allowed {
                origin: origin.clone(),
                credentials: !self.is_any(),
            },
            Some(_) => Grant::NotAllowed,
        }
    }
}

impl Grant {
    /// The CORS headers on the answer to a request (the provider's answer or the gateway's own):
    /// an allowed origin gets `Access-Control-Allow-Origin` (its origin), with
    /// `Access-Control-Allow-Credentials: true` when listed by name, and `Vary: Origin`, unless
    /// the provider set its own, and the exposed headers; one not allowed gets only
    /// `Vary: Origin` (the answer depends on it), and any grant the provider made is removed;
    /// no `Origin`, nothing.
    pub fn apply(self, headers: &mut HeaderMap) {
        match self {
            Grant::NoOrigin => {}
            Grant::Allowed {
                origin,
                credentials,
            } => {
                if let header::Entry::Vacant(slot) =
                    headers.entry(header::ACCESS_CONTROL_ALLOW_ORIGIN)
                {
                    slot.insert(origin);
                    if credentials {
                        headers.insert(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, CREDENTIALS);
                    }
                    headers.append(header::VARY, VARY_ORIGIN);
                }
                headers
                    .entry(header::ACCESS_CONTROL_EXPOSE_HEADERS)
                    .or_insert(EXPOSE_HEADERS);
            }
            Grant::NotAllowed => {
                // Whoever would grant it: a provider's own grant does not reach an origin the
                // gateway refuses.
                headers.remove(header::ACCESS_CONTROL_ALLOW_ORIGIN);
                headers.remove(header::ACCESS_CONTROL_ALLOW_CREDENTIALS);
                headers.remove(header::ACCESS_CONTROL_EXPOSE_HEADERS);
                headers.append(header::VARY, VARY_ORIGIN);
            }
        }
    }
}

/// Whether `entry` is an origin as a browser sends it in `Origin`: `scheme://host[:port]`, no
/// path (not even a trailing `/`), no default port, ASCII only. The reason when it is not.
pub fn check_origin(entry: &str) -> Result<(), String> {
    let shape = || {
        format!("`{entry}` is not an origin: scheme://host[:port], e.g. https://consumer.example")
    };
    if entry == "null" {
        return Err(
            "`null` is the origin of sandboxed frames, data: URLs and local files, which any page \
             can send; it cannot be allowed"
                .to_owned(),
        );
    }
    if entry.contains('*') {
        return Err(format!(
            "`{entry}`: no patterns; \"*\" alone means any origin, otherwise list each origin in full"
        ));
    }
    if !entry.is_ascii() {
        return Err(format!(
            "`{entry}` is not ASCII: write an internationalised host in its xn-- form, as browsers \
             send it"
        ));
    }
    let (scheme, rest) = entry.split_once("://").ok_or_else(shape)?;
    let mut scheme_bytes = scheme.bytes();
    let scheme_ok = scheme_bytes.next().is_some_and(|b| b.is_ascii_alphabetic())
        && scheme_bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
    if !scheme_ok {
        return Err(shape());
    }
    if let Some(at) = rest.find(['/', '?', '#']) {
        return Err(if &rest[at..] == "/" {
            format!(
                "`{entry}` ends with `/`: an origin has no path; write `{}`",
                &entry[..entry.len() - 1]
            )
        } else {
            format!(
                "`{entry}` has a path, query or fragment: an origin is scheme://host[:port] only"
            )
        });
    }
    if rest.contains('@') {
        return Err(format!(
            "`{entry}` has userinfo (`@`): an origin is scheme://host[:port] only"
        ));
    }
    let (host, port) = crate::ssp::envelope::split_authority(rest).ok_or_else(shape)?;
    let host_ok = match host.strip_prefix('[') {
        Some(literal) => literal
            .strip_suffix(']')
            .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok()),
        None => host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_')),
    };
    if !host_ok {
        return Err(shape());
    }
    if let Some(port) = port {
        let text = &rest[host.len() + 1..];
        if text.starts_with('0') {
            return Err(format!(
                "`{entry}`: a port is written without leading zeros, as browsers send it"
            ));
        }
        let default = match scheme.to_ascii_lowercase().as_str() {
            "http" => Some(80),
            "https" => Some(443),
            _ => None,
        };
        if default == Some(port) {
            return Err(format!(
                "`{entry}`: browsers leave the default port out of an origin; write `{scheme}://{host}`"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[&str]) -> AllowedOrigins {
        AllowedOrigins::parse(entries).unwrap_or_else(|e| panic!("{e:?}"))
    }

    #[test]
    fn origins_as_browsers_send_them_are_accepted() {
        for ok in [
            "https://consumer.example",
            "https://consumer.example:8443",
            "http://localhost:3000",
            "HTTPS://Consumer.Example",
            "https://[::1]:8443",
            "https://xn--bcher-kva.example",
            "https://10.0.0.1",
            "chrome-extension://abcdefghijklmnop",
        ] {
            assert_eq!(check_origin(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn malformed_origins_are_refused_with_a_reason() {
        for (bad, says) in [
            ("https://consumer.example/", "ends with `/`"),
            ("https://consumer.example/app", "path"),
            ("https://consumer.example?x=1", "path, query or fragment"),
            ("https://consumer.example#top", "path, query or fragment"),
            ("consumer.example", "not an origin"),
            ("https//consumer.example", "not an origin"),
            ("://consumer.example", "not an origin"),
            ("1http://consumer.example", "not an origin"),
            ("https://", "not an origin"),
            ("https://user@consumer.example", "userinfo"),
            ("https://consumer.example:443", "default port"),
            ("http://consumer.example:80", "default port"),
            ("https://consumer.example:08443", "leading zeros"),
            ("https://consumer.example:99999", "not an origin"),
            ("https://consumer.example:0", "not an origin"),
            ("https://consumer.example:", "not an origin"),
            ("https://consumer example", "not an origin"),
            ("https://[not-ip]", "not an origin"),
            ("https://*.nhs.uk", "no patterns"),
            ("https://bücher.example", "xn--"),
            ("null", "sandboxed"),
            ("", "not an origin"),
        ] {
            let reason = check_origin(bad).expect_err(bad);
            assert!(reason.contains(says), "{bad}: {reason}");
        }
    }

    #[test]
    fn the_list_is_none_any_or_exact_origins_ignoring_case() {
        assert_eq!(list(&[]), AllowedOrigins::None);
        assert_eq!(AllowedOrigins::default(), AllowedOrigins::None);
        assert!(list(&["*"]).is_any());
        assert!(list(&["*"]).allows(b"https://anything.example"));
        assert!(!list(&[]).allows(b"https://consumer.example"));

        let l = list(&["https://Consumer.example", "http://localhost:3000"]);
        assert!(!l.is_any());
        assert!(l.allows(b"https://consumer.example"));
        assert!(l.allows(b"HTTPS://CONSUMER.EXAMPLE"));
        assert!(l.allows(b"http://localhost:3000"));
        for refused in [
            &b"https://consumer.example.evil"[..],
            b"https://evil-consumer.example",
            b"http://consumer.example",
            b"https://consumer.example:8443",
            b"https://consumer.example/",
            b"http://localhost:30000",
            b"null",
            b"",
            b"https://consumer.exampl\xc3",
        ] {
            assert!(!l.allows(refused), "{}", String::from_utf8_lossy(refused));
        }
    }

    #[test]
    fn a_star_is_alone_and_bad_entries_are_each_named() {
        let e = AllowedOrigins::parse(&["*", "https://consumer.example"]).unwrap_err();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].0, None);
        assert!(e[0].1.contains("only entry"), "{}", e[0].1);
        // Beside a `*`, every other bad entry is named too (one run lists every problem).
        let e = AllowedOrigins::parse(&["https://ok.example", "null", "*", "https://x.example/"])
            .unwrap_err();
        let at: Vec<_> = e.iter().map(|(i, _)| *i).collect();
        assert_eq!(at, [None, Some(1), Some(3)]);

        let e = AllowedOrigins::parse(&["https://ok.example", "https://a.example/", "null"])
            .unwrap_err();
        let at: Vec<_> = e.iter().map(|(i, _)| *i).collect();
        assert_eq!(at, [Some(1), Some(2)]);

        let many: Vec<String> = (0..=MAX_ORIGINS)
            .map(|i| format!("https://c{i}.example"))
            .collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let e = AllowedOrigins::parse(&many).unwrap_err();
        assert!(
            e.iter().any(|(i, r)| i.is_none() && r.contains("at most")),
            "{e:?}"
        );
        assert!(AllowedOrigins::parse(&many[..MAX_ORIGINS]).is_ok());
    }

    #[test]
    fn a_grant_adds_the_origin_and_a_refusal_only_vary() {
        let l = list(&["https://consumer.example"]);
        let mut req = HeaderMap::new();
        assert_eq!(l.judge(&req), Grant::NoOrigin);
        let mut answer = HeaderMap::new();
        l.judge(&req).apply(&mut answer);
        assert!(answer.is_empty());

        req.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://consumer.example"),
        );
        let mut answer = HeaderMap::new();
        l.judge(&req).apply(&mut answer);
        assert_eq!(
            answer[header::ACCESS_CONTROL_ALLOW_ORIGIN],
            "https://consumer.example"
        );
        assert_eq!(answer[header::VARY], "Origin");
        assert_eq!(answer[header::ACCESS_CONTROL_ALLOW_CREDENTIALS], "true");
        let exposed = answer[header::ACCESS_CONTROL_EXPOSE_HEADERS]
            .to_str()
            .expect("text");
        for name in [
            "ETag",
            "Location",
            "Retry-After",
            "X-Rate-Limit-Reset",
            "WWW-Authenticate",
        ] {
            assert!(exposed.split(", ").any(|n| n == name), "{name}: {exposed}");
        }

        // Any origin: echoed, never with credentials.
        let mut answer = HeaderMap::new();
        list(&["*"]).judge(&req).apply(&mut answer);
        assert_eq!(
            answer[header::ACCESS_CONTROL_ALLOW_ORIGIN],
            "https://consumer.example"
        );
        assert!(!answer.contains_key(header::ACCESS_CONTROL_ALLOW_CREDENTIALS));

        req.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        assert_eq!(l.judge(&req), Grant::NotAllowed);
        let mut answer = HeaderMap::new();
        l.judge(&req).apply(&mut answer);
        assert_eq!(answer.len(), 1, "{answer:?}");
        assert_eq!(answer[header::VARY], "Origin");

        // A provider's own CORS headers stay.
        req.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://consumer.example"),
        );
        let mut answer = HeaderMap::new();
        answer.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("https://p.example"),
        );
        l.judge(&req).apply(&mut answer);
        assert_eq!(
            answer[header::ACCESS_CONTROL_ALLOW_ORIGIN],
            "https://p.example"
        );

        // ... but never reach an origin the gateway refuses.
        req.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        let mut answer = HeaderMap::new();
        answer.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        );
        answer.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
        answer.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("ETag"),
        );
        l.judge(&req).apply(&mut answer);
        assert_eq!(answer.len(), 1, "{answer:?}");
        assert_eq!(answer[header::VARY], "Origin");
    }
}
