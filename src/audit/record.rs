//! One audit record and how it is placed in the chain: the fields a record carries
//! (ARCHITECTURE.md "Audit trail"), and how it is framed as one JSON line with its sequence
//! number and the link value of the line before it (`key::Link`: its SHA-256, or its HMAC).
//! Pure: no I/O here.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;

use chrono::{Datelike, Timelike};

use serde::Serialize;

use crate::jsonw;
use crate::ssp::jwt::JwtClaims;
use crate::tls::PeerIdentity;

/// The `prev` of the very first record of a trail: 64 zeros.
pub const GENESIS: [u8; 32] = [0; 32];

/// What a record is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordKind {
    /// A request about to be forwarded: durable before the provider sees it.
    Request,
    /// How a request that had a `request` record ended (answered, failed, abandoned).
    Outcome,
    /// A request the gateway refused without contacting the provider: its only record.
    Rejection,
    /// A CORS preflight the gateway answered itself: its only record.
    Preflight,
}

/// The client side of the connection a request came on: its address, and its certificate's
/// identity (shared by the connections that present that certificate). Written as one object:
/// `address`, then the certificate's `names`, `subject`, `serial` and `fingerprint_sha256`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    /// IP:port of the TCP peer.
    pub address: SocketAddr,
    /// The certificate's DNS names (or CN, as used for the FQDN check), subject DN (RFC 4514),
    /// serial and SHA-256 fingerprint.
    pub certificate: Arc<PeerIdentity>,
}

impl Default for ClientInfo {
    fn default() -> ClientInfo {
        ClientInfo {
            address: SocketAddr::from(([0, 0, 0, 0], 0)),
            certificate: Arc::default(),
        }
    }
}

impl Serialize for ClientInfo {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let id = &*self.certificate;
        let mut map = serializer.serialize_map(Some(5))?;
        map.serialize_entry("address", &self.address)?;
        map.serialize_entry("names", &id.names)?;
        map.serialize_entry("subject", &id.subject)?;
        map.serialize_entry("serial", &id.serial)?;
        map.serialize_entry("fingerprint_sha256", &id.fingerprint_sha256)?;
        map.end()
    }
}

/// One audit event. Fields the gateway did not get as far as knowing are omitted. The trail is
/// written by [`AuditRecord::write_json`]; `Serialize` (here and on [`ClientInfo`] and
/// [`JwtClaims`]) is the reference it is tested against, byte for byte. Its text is borrowed
/// where it can be: the gateway builds a record from its request's own strings when it submits
/// it, rather than copying each of them into the record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditRecord<'a> {
    pub kind: RecordKind,
    /// When the event happened, RFC 3339 UTC with microseconds.
    pub time: Cow<'a, str>,
    /// The gateway's id for the request (also `x-request-id` on its own answers).
    pub request_id: Cow<'a, str>,
    /// `Ssp-TraceID`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ssp_trace_id: Option<Cow<'a, str>>,
    /// The W3C trace id of the request's span (for joining with traces).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<Cow<'a, str>>,
    /// `Ssp-From` ASID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<Cow<'a, str>>,
    /// `Ssp-To` ASID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<Cow<'a, str>>,
    /// `Ssp-InteractionID` as sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interaction: Option<Cow<'a, str>>,
    pub method: Cow<'a, str>,
    /// The embedded target URL with its query, when it parsed; otherwise the raw request target.
    pub target_url: Cow<'a, str>,
    /// The connection's address and its certificate's identity (shared, not copied).
    pub client: ClientInfo,
    /// The bearer token's claims of audit value, whenever it decoded (even if rejected); shared
    /// by the request's records.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt: Option<Arc<JwtClaims>>,
    /// Why the JWT was not valid (policy `log`, or the rejection under `enforce`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_problem: Option<&'static str>,
    /// HTTP status answered to the consumer (absent on `request` records).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// The gateway's own error token, when it answered with one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<Cow<'a, str>>,
    /// Why the gateway answered with its own error, as a bounded label: the `reason` of
    /// `ssp_rejections_total` (`upstream_error` and `circuit_open` tell apart two 502s with
    /// the same token), or of `ssp_http_refused_heads_total` for a refused head.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'a str>,
    /// Request body bytes received from the consumer (forwarded requests).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_bytes: Option<u64>,
    /// Response body bytes sent to the consumer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_bytes: Option<u64>,
    /// From sending the request to the provider until its response head arrived.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_latency_us: Option<u64>,
    /// Connections tried for the forwarded request, when more than one (a connect failed and
    /// was retried; nothing was sent on a failed one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_attempts: Option<u32>,
    /// Why the provider gave no usable answer (a connect, TLS or protocol failure, or no head
    /// in time), as a bounded label (`forward::UpstreamFailure`): e.g.
    /// `tls_certificate_expired`, `tcp_refused`, `closed_before_answer`, `response_timeout`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_failure: Option<&'a str>,
    /// From receiving the request until the response was complete (or abandoned).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_latency_us: Option<u64>,
    /// `false` when the response body did not reach its end (client gone, provider failed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completed: Option<bool>,
}

impl AuditRecord<'_> {
    /// The record's fields as a JSON object (`{...}`), without `seq` and `prev`, which the
    /// writer adds when it places the record in the chain.
    pub fn to_body(&self) -> String {
        // Room for a whole record, so the buffer is not grown (reallocated and copied) four or
        // five times on the way; a larger record grows it once.
        let mut out = Vec::with_capacity(BODY_ROOM);
        self.write_json(&mut out);
        // Only `&str`s and ASCII were written.
        String::from_utf8(out).unwrap_or_else(|_| String::from("{}"))
    }

    /// Appends the record as JSON: exactly what its `Serialize` writes (tests compare them),
    /// by the [`crate::jsonw`] writer rather than serde's machinery.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        let mut o = jsonw::Object::new(out);
        o.str("kind", self.kind.as_str());
        o.str("time", &self.time);
        o.str("request_id", &self.request_id);
        o.opt_str("ssp_trace_id", self.ssp_trace_id.as_deref());
        o.opt_str("trace_id", self.trace_id.as_deref());
        o.opt_str("from", self.from.as_deref());
        o.opt_str("to", self.to.as_deref());
        o.opt_str("interaction", self.interaction.as_deref());
        o.str("method", &self.method);
        o.str("target_url", &self.target_url);
        let id = &*self.client.certificate;
        let mut client = o.object("client");
        client.socket_addr("address", self.client.address);
        client.strs("names", &id.names);
        client.str("subject", &id.subject);
        client.str("serial", &id.serial);
        client.str("fingerprint_sha256", &id.fingerprint_sha256);
        client.end();
        if let Some(claims) = self.jwt.as_deref() {
            o.raw("jwt", claims.json().as_bytes());
        }
        o.opt_str("jwt_problem", self.jwt_problem);
        o.opt_uint("status", self.status.map(u64::from));
        o.opt_str("token", self.token.as_deref());
        o.opt_str("reason", self.reason);
        o.opt_uint("request_bytes", self.request_bytes);
        o.opt_uint("response_bytes", self.response_bytes);
        o.opt_uint("upstream_latency_us", self.upstream_latency_us);
        o.opt_uint("upstream_attempts", self.upstream_attempts.map(u64::from));
        o.opt_str("upstream_failure", self.upstream_failure);
        o.opt_uint("total_latency_us", self.total_latency_us);
        o.opt_bool("completed", self.completed);
        o.end();
    }
}

impl RecordKind {
    /// The kind as written.
    pub fn as_str(self) -> &'static str {
        match self {
            RecordKind::Request => "request",
            RecordKind::Outcome => "outcome",
            RecordKind::Rejection => "rejection",
            RecordKind::Preflight => "preflight",
        }
    }
}

#[cfg(test)]
impl AuditRecord<'static> {
    /// A record of `kind` with only what every record has (fixed time, id `r1`, `GET /`), for
    /// tests to fill in what they are about.
    pub(crate) fn bare(kind: RecordKind) -> AuditRecord<'static> {
        AuditRecord {
            kind,
            time: "2025-01-01T00:00:00.000000Z".into(),
            request_id: "r1".into(),
            ssp_trace_id: None,
            trace_id: None,
            from: None,
            to: None,
            interaction: None,
            method: "GET".into(),
            target_url: "/".into(),
            client: ClientInfo::default(),
            jwt: None,
            jwt_problem: None,
            status: None,
            token: None,
            reason: None,
            request_bytes: None,
            response_bytes: None,
            upstream_latency_us: None,
            upstream_attempts: None,
            upstream_failure: None,
            total_latency_us: None,
            completed: None,
        }
    }
}

/// A record's body is about 1.4 KB with a JWT and a client certificate.
const BODY_ROOM: usize = 2048;

/// The current time as the audit trail writes it.
pub fn now_rfc3339() -> String {
    Timestamp::now().as_str().to_owned()
}

/// A time as the audit trail and the access log write it: RFC 3339, UTC with microseconds and
/// `Z` (`2026-11-26T15:43:18.123456Z`), exactly what chrono's `to_rfc3339_opts(Micros, true)`
/// writes, on the stack rather than in a `String` grown by `fmt` (three or four allocations).
pub struct Timestamp(Written);

enum Written {
    /// Years 0 to 9999: 27 ASCII bytes.
    Stack([u8; 27]),
    /// Any other year, as chrono writes it (a sign and five or more digits).
    Chrono(String),
}

impl Timestamp {
    /// Now.
    pub fn now() -> Timestamp {
        Timestamp::of(chrono::Utc::now())
    }

    /// `time`, as chrono's `to_rfc3339_opts(SecondsFormat::Micros, true)` writes it.
    pub fn of(time: chrono::DateTime<chrono::Utc>) -> Timestamp {
        let t = time.naive_utc();
        let year = t.year();
        if !(0..=9999).contains(&year) {
            return Timestamp(Written::Chrono(
                time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            ));
        }
        // A leap second's nanoseconds run past 10^9; chrono writes it as second 60.
        let (mut second, mut nano) = (t.second(), t.nanosecond());
        if nano >= 1_000_000_000 {
            second += 1;
            nano -= 1_000_000_000;
        }
        let mut out = *b"0000-00-00T00:00:00.000000Z";
        let two = |out: &mut [u8; 27], at: usize, n: u32| {
            out[at] = b'0' + (n / 10 % 10) as u8;
            out[at + 1] = b'0' + (n % 10) as u8;
        };
        let year = year as u32;
        two(&mut out, 0, year / 100);
        two(&mut out, 2, year % 100);
        two(&mut out, 5, t.month());
        two(&mut out, 8, t.day());
        two(&mut out, 11, t.hour());
        two(&mut out, 14, t.minute());
        two(&mut out, 17, second);
        let micros = nano / 1000;
        two(&mut out, 20, micros / 10_000);
        two(&mut out, 22, micros / 100 % 100);
        two(&mut out, 24, micros % 100);
        Timestamp(Written::Stack(out))
    }

    pub fn as_str(&self) -> &str {
        match &self.0 {
            // Only ASCII digits and punctuation were written.
            Written::Stack(bytes) => std::str::from_utf8(bytes).unwrap_or_default(),
            Written::Chrono(text) => text,
        }
    }
}

/// What framing adds to a body, newline included: `{"seq":`, 20 digits, `,"prev":"`, 64 hex
/// digits, `",`, `}` and `\n` (the body's own braces are dropped).
const FRAME_OVERHEAD: usize = 7 + 20 + 9 + 64 + 2 + 1 + 1;

/// Frames a record body (a JSON object) as the line the trail stores, without the newline:
/// `{"seq":N,"prev":"<hex>",<body fields>}`.
pub fn frame(seq: u64, prev: &[u8; 32], body: &str) -> String {
    let mut line = Vec::new();
    frame_into(&mut line, seq, prev, body);
    // Only ASCII and `body`'s own (UTF-8) fields were written.
    String::from_utf8(line).unwrap_or_default()
}

/// Appends `frame(seq, prev, body)` to `out` (no newline) and returns where it starts: the
/// writer frames each record straight into the bytes it writes.
pub fn frame_into(out: &mut Vec<u8>, seq: u64, prev: &[u8; 32], body: &str) -> usize {
    let start = out.len();
    // One growth per record at most (the writer frames a batch into one buffer), rather than
    // one per field.
    out.reserve(body.len() + FRAME_OVERHEAD);
    let fields = body
        .strip_prefix('{')
        .and_then(|b| b.strip_suffix('}'))
        .unwrap_or("");
    out.extend_from_slice(b"{\"seq\":");
    out.extend_from_slice(itoa::Buffer::new().format(seq).as_bytes());
    out.extend_from_slice(b",\"prev\":\"");
    hex_into(out, prev);
    out.push(b'"');
    if !fields.trim().is_empty() {
        out.push(b',');
        out.extend_from_slice(fields.as_bytes());
    }
    out.push(b'}');
    start
}

/// How a keyed record's own MAC is written, last in its line: `,"mac":"<64 hex>"}`.
pub const MAC_FIELD: &[u8] = b",\"mac\":\"";

/// The bytes of a sealed line (a keyed record) its `mac` is the HMAC of, and that `mac`: the
/// line up to `,"mac":"`, which ends it with 64 hex digits, `"` and `}`. `None`: no `mac` there.
pub fn sealed_parts(line: &[u8]) -> Option<(&[u8], [u8; 32])> {
    let tail = MAC_FIELD.len() + 64 + 2;
    let pos = line.len().checked_sub(tail)?;
    let (signed, rest) = line.split_at(pos);
    let digits = rest.strip_prefix(MAC_FIELD)?.strip_suffix(b"\"}")?;
    // Lowercase, as the writer writes it: one spelling per MAC.
    Some((signed, decode_hex(digits)?))
}

/// SHA-256 (audit chain, certificate fingerprints, the listener's chain cache), from the
/// *ring* provider's TLS 1.3 suite hash.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    if let rustls::SupportedCipherSuite::Tls13(suite) =
        rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256
    {
        let digest = suite.common.hash_provider.hash(data);
        out.copy_from_slice(digest.as_ref());
    }
    // TLS13_AES_128_GCM_SHA256 is a TLS 1.3 suite with SHA-256 by definition, so the branch
    // above is always taken; the FIPS 180 test vector below proves it.
    out
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    let mut out = Vec::with_capacity(bytes.len() * 2);
    hex_into(&mut out, bytes);
    // Only ASCII hex digits were written.
    String::from_utf8(out).unwrap_or_default()
}

/// `N` bytes from `2N` lowercase hex digits (as `hex` writes them, and as W3C trace context
/// requires), or `None`.
pub(crate) fn decode_hex<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    if s.len() != N * 2 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, pair) in s.chunks(2).enumerate() {
        out[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

/// Appends `bytes` in lowercase hex to `out`.
pub(super) fn hex_into(out: &mut Vec<u8>, bytes: &[u8]) {
    for b in bytes {
        out.extend_from_slice(&hex_pair(*b));
    }
}

/// Writes `bytes` in lowercase hex over the start of `out` (twice as long), without allocating.
pub fn hex_to(out: &mut [u8], bytes: &[u8]) {
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair.copy_from_slice(&hex_pair(*b));
    }
}

/// One byte's two lowercase hex digits.
fn hex_pair(b: u8) -> [u8; 2] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    [DIGITS[usize::from(b >> 4)], DIGITS[usize::from(b & 0x0f)]]
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    fn opt_text() -> impl Strategy<Value = Option<String>> {
        proptest::option::of(prop_oneof![
            any::<String>(),
            "[a-z0-9:/?&=.%-]{0,40}",
            Just("odd \"quote\" \\ \n \u{1} é \u{2028}".to_string()),
        ])
    }

    prop_compose! {
        fn arb_record()(
            kind in prop_oneof![
                Just(RecordKind::Request),
                Just(RecordKind::Outcome),
                Just(RecordKind::Rejection),
                Just(RecordKind::Preflight)
            ],
            texts in proptest::collection::vec(any::<String>(), 5),
            opts in proptest::collection::vec(opt_text(), 6),
            names in proptest::collection::vec(any::<String>(), 0..3),
            v6 in any::<bool>(),
            port in any::<u16>(),
            nums in proptest::collection::vec(proptest::option::of(any::<u64>()), 4),
            small in proptest::option::of(any::<u16>()),
            attempts in proptest::option::of(any::<u32>()),
            completed in proptest::option::of(any::<bool>()),
            problem in proptest::option::of(Just("JWT_EXPIRED")),
            reason in proptest::option::of(prop_oneof![Just("upstream_error"), Just("circuit_open")]),
            failure in proptest::option::of(prop_oneof![Just("tls_certificate_expired"), Just("tcp_refused")]),
            jwt in proptest::option::of((opt_text(), opt_text(), proptest::option::of(any::<i64>()))),
        ) -> AuditRecord<'static> {
            let address = if v6 {
                SocketAddr::from(([0x2001, 0xdb8, 0, 0, 0, 0, 0, 1], port))
            } else {
                SocketAddr::from(([10, 1, 2, 3], port))
            };
            AuditRecord {
                kind,
                time: texts[0].clone().into(),
                request_id: texts[1].clone().into(),
                ssp_trace_id: opts[0].clone().map(Cow::from),
                trace_id: opts[1].clone().map(Cow::from),
                from: opts[2].clone().map(Cow::from),
                to: opts[3].clone().map(Cow::from),
                interaction: opts[4].clone().map(Cow::from),
                method: texts[2].clone().into(),
                target_url: texts[3].clone().into(),
                client: ClientInfo {
                    address,
                    certificate: Arc::new(PeerIdentity {
                        names,
                        subject: texts[4].clone(),
                        serial: "0a1b".into(),
                        fingerprint_sha256: "ff".repeat(32),
                    }),
                },
                jwt: jwt.map(|(iss, reason, iat)| {
                    let mut claims = JwtClaims::default();
                    claims.iss = iss;
                    claims.reason_for_request = reason;
                    claims.iat = iat;
                    Arc::new(claims)
                }),
                jwt_problem: problem,
                status: small,
                token: opts[5].clone().map(Cow::from),
                reason,
                request_bytes: nums[0],
                response_bytes: nums[1],
                upstream_latency_us: nums[2],
                upstream_attempts: attempts,
                upstream_failure: failure,
                total_latency_us: nums[3],
                completed,
            }
        }
    }

    proptest! {
        /// The hand-written record is byte for byte what its `Serialize` writes.
        #[test]
        fn the_written_record_is_what_serde_json_writes(record in arb_record()) {
            let serde = serde_json::to_string(&record).expect("json");
            prop_assert_eq!(record.to_body(), serde);
        }

        /// The stack timestamp is what chrono writes, over any year chrono can hold (four
        /// digits or not), any microsecond, and leap seconds.
        #[test]
        fn the_timestamp_is_what_chrono_writes(
            secs in prop_oneof![
                0i64..253_402_300_800,
                chrono::DateTime::<chrono::Utc>::MIN_UTC.timestamp()
                    ..=chrono::DateTime::<chrono::Utc>::MAX_UTC.timestamp(),
            ],
            nanos in prop_oneof![0u32..1_000_000_000, 1_000_000_000u32..2_000_000_000],
        ) {
            // Nanoseconds past 10^9 are a leap second, allowed only at a minute's last second.
            let secs = if nanos >= 1_000_000_000 { secs - secs.rem_euclid(60) + 59 } else { secs };
            if let Some(time) = chrono::DateTime::from_timestamp(secs, nanos) {
                let ours = Timestamp::of(time);
                prop_assert_eq!(
                    ours.as_str(),
                    time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
                );
            }
        }
    }

    #[test]
    fn the_timestamp_of_known_times() {
        let at = |secs, nanos| {
            Timestamp::of(chrono::DateTime::from_timestamp(secs, nanos).expect("time"))
                .as_str()
                .to_owned()
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            at(1_795_707_798, 123_456_789),
            "2026-11-26T15:43:18.123456Z"
        );
        assert_eq!(at(-62_167_219_200, 999), "0000-01-01T00:00:00.000000Z");
        assert_eq!(at(253_402_300_800, 0), "+10000-01-01T00:00:00.000000Z");
        assert_eq!(
            at(1_483_228_799, 1_500_000_000),
            "2016-12-31T23:59:60.500000Z"
        );
        assert_eq!(now_rfc3339().len(), 27);
    }

    use super::*;

    #[test]
    fn sha256_is_sha256() {
        assert_eq!(
            hex(&sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn frame_puts_seq_and_prev_first_and_stays_json() {
        let record = AuditRecord {
            from: Some("200000000359".into()),
            target_url: "/x".into(),
            status: Some(400),
            token: Some("INVALID_TARGET_URL".into()),
            total_latency_us: Some(12),
            ..AuditRecord::bare(RecordKind::Rejection)
        };
        let line = frame(7, &GENESIS, &record.to_body());
        assert!(line.starts_with(&format!("{{\"seq\":7,\"prev\":\"{}\",", "0".repeat(64))));
        let v: serde_json::Value = serde_json::from_str(&line).expect("valid JSON");
        assert_eq!(v["seq"], 7);
        assert_eq!(v["kind"], "rejection");
        assert_eq!(v["status"], 400);
        assert!(v.get("to").is_none());
        assert_eq!(
            frame(1, &GENESIS, "{}"),
            format!("{{\"seq\":1,\"prev\":\"{}\"}}", "0".repeat(64))
        );
    }

    /// The writer frames straight into its write buffer: the same bytes as `frame`, appended
    /// after what the buffer holds, at the offset returned.
    #[test]
    fn frame_into_appends_exactly_what_frame_returns() {
        let prev = sha256(b"previous line");
        let body = r#"{"kind":"request","target_url":"https://x/\u00e9?a=1"}"#;
        let mut out = b"earlier line\n".to_vec();
        let start = frame_into(&mut out, 123_456_789, &prev, body);
        assert_eq!(start, 13);
        assert_eq!(&out[..start], b"earlier line\n");
        assert_eq!(&out[start..], frame(123_456_789, &prev, body).as_bytes());
        assert!(std::str::from_utf8(&out[start..])
            .expect("UTF-8")
            .contains(&format!("\"prev\":\"{}\"", hex(&prev))));
    }

    /// A request's records share its claims: they are rendered once, and each record writes
    /// exactly what serialising the claims inline would.
    #[test]
    fn shared_claims_are_rendered_once_and_written_as_serialised() {
        let mut claims = JwtClaims::default();
        claims.iss = Some("https://consumer.example/\"quoted\"".into());
        claims.iat = Some(1_700_000_000);
        claims.practitioner_name = Some("Zoë O'Brien".into());
        let inline = serde_json::to_value(&claims).expect("serialise");
        let shared = Arc::new(claims);
        assert_eq!(format!("{shared:?}").matches("not rendered").count(), 1);
        let record = |kind| AuditRecord {
            jwt: Some(shared.clone()),
            ..AuditRecord::bare(kind)
        };
        for kind in [RecordKind::Request, RecordKind::Outcome] {
            let body: serde_json::Value =
                serde_json::from_str(&record(kind).to_body()).expect("valid JSON");
            assert_eq!(body["jwt"], inline);
        }
        assert!(!format!("{shared:?}").contains("not rendered"));
        assert_eq!(
            Some(shared.json().to_owned()),
            serde_json::to_string(&*shared).ok()
        );
        // A copy may be changed, so it renders afresh.
        let mut copy = (*shared).clone();
        assert!(format!("{copy:?}").contains("not rendered"));
        copy.iat = Some(1);
        assert!(copy.json().contains("\"iat\":1,"));
        assert_eq!(copy, copy.clone(), "the store is not part of the value");
    }
}
