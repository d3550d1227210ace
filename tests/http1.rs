//! HTTP/1.1 on the wire at the consumer-facing listener (RFC 9112), byte by byte over a real
//! mTLS connection: keep-alive and pipelining, message framing (Content-Length; chunked with
//! extensions and trailers), the request-smuggling defences, malformed and oversized heads,
//! when the connection closes (`Connection: close`, HTTP/1.0, errors), `Date` and framing on
//! responses, HEAD, a request whose body never ends, and the request target reaching the
//! provider unchanged.
//!
//! These pin what a consumer sees, not how one server implements it: where RFC 9112 leaves a
//! choice (answer 400 or close; keep a connection after an unread body or close it) either is
//! accepted, and no header case, reason phrase or error body text is asserted. Every read and
//! write has a deadline, so a server that hangs fails the test instead of hanging it.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// The longest any single read or write may wait for the gateway.
const DEADLINE: Duration = Duration::from_secs(10);

/// The listener's head limit in the oversized-head test.
const MAX_HEADER_BYTES: usize = 16384;

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A raw request: request line, header lines and body bytes, written exactly as given.
#[derive(Clone)]
struct Req {
    request_line: String,
    lines: Vec<String>,
    body: Vec<u8>,
}

impl Req {
    /// A valid GP Connect request for `path` under the provider's endpoint: Host, the Ssp-*
    /// headers and a bearer JWT for the interaction's scope; no body.
    fn gpc(h: &Harness, method: &str, path: &str, interaction: &str) -> Req {
        Req {
            request_line: format!("{method} /{}/{path} HTTP/1.1", h.endpoint()),
            lines: vec![
                "Host: localhost".to_string(),
                format!("Ssp-TraceID: {}", uuid::Uuid::new_v4()),
                format!("Ssp-From: {CONSUMER_ASID}"),
                format!("Ssp-To: {PROVIDER_ASID}"),
                format!("Ssp-InteractionID: {interaction}"),
                format!("Authorization: Bearer {}", jwt(scope_for(interaction))),
                "Accept: application/fhir+json".to_string(),
            ],
            body: Vec::new(),
        }
    }

    /// GET metadata: the plainest request the gateway forwards.
    fn metadata(h: &Harness) -> Req {
        Req::gpc(h, "GET", "metadata", IX_METADATA)
    }

    /// A read of patient `id` (tells pipelined or smuggled requests apart at the provider).
    fn read_patient(h: &Harness, id: &str) -> Req {
        Req::gpc(h, "GET", &format!("Patient/{id}"), IX_READ_PATIENT)
    }

    /// Register patient, a POST the gateway forwards with its body; no framing header yet.
    fn register(h: &Harness) -> Req {
        Req::gpc(
            h,
            "POST",
            "Patient/$gpc.registerpatient",
            IX_REGISTER_PATIENT,
        )
        .header("Content-Type: application/fhir+json")
    }

    fn header(mut self, line: impl Into<String>) -> Req {
        self.lines.push(line.into());
        self
    }

    /// Removes the header `name` (every line that starts with `name:`).
    fn without(mut self, name: &str) -> Req {
        let prefix = format!("{}:", name.to_ascii_lowercase());
        self.lines
            .retain(|l| !l.to_ascii_lowercase().starts_with(&prefix));
        self
    }

    fn version(mut self, version: &str) -> Req {
        let (rest, _) = self
            .request_line
            .rsplit_once(' ')
            .expect("a request line has a version");
        self.request_line = format!("{rest} {version}");
        self
    }

    /// Raw body bytes, sent after the head exactly as given (no framing header added).
    fn raw_body(mut self, body: impl Into<Vec<u8>>) -> Req {
        self.body = body.into();
        self
    }

    /// A body framed by a correct Content-Length.
    fn sized_body(self, body: &[u8]) -> Req {
        self.header(format!("Content-Length: {}", body.len()))
            .raw_body(body)
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = format!("{}\r\n", self.request_line);
        for line in &self.lines {
            out.push_str(line);
            out.push_str("\r\n");
        }
        out.push_str("\r\n");
        let mut out = out.into_bytes();
        out.extend_from_slice(&self.body);
        out
    }
}

/// How a response's body was delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    ContentLength,
    Chunked,
    /// No framing header: the body ran to the end of the connection.
    UntilClose,
    /// A response that has no body by definition (to HEAD, 204, 304).
    NoBody,
}

/// One parsed response (interim 1xx responses are skipped).
#[derive(Debug)]
struct Response {
    version: String,
    status: u16,
    /// Names lowercased, values trimmed, in the order received.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    framing: Framing,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        lossy(&self.body)
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text()))
    }

    /// The provider's echo of what reached it: the request target it saw.
    fn echoed_uri(&self) -> String {
        self.json()["uri"]
            .as_str()
            .unwrap_or_else(|| panic!("no echoed uri in {}", self.text()))
            .to_string()
    }

    /// A `Date` header, and a body delimited by Content-Length or chunked (or none at all
    /// where the status has none).
    fn assert_well_formed(&self, what: &str) {
        let date = self
            .header("date")
            .unwrap_or_else(|| panic!("{what}: no Date header: {self:?}"));
        assert!(
            date.ends_with(" GMT") && date.len() == "Sun, 06 Nov 1994 08:49:37 GMT".len(),
            "{what}: Date is not an IMF-fixdate: {date:?}"
        );
        match self.status {
            204 | 304 => assert!(
                self.body.is_empty() && self.header("transfer-encoding").is_none(),
                "{what}: a {} has no body: {self:?}",
                self.status
            ),
            _ => assert!(
                matches!(self.framing, Framing::ContentLength | Framing::Chunked),
                "{what}: the body is delimited by neither Content-Length nor chunked: {self:?}"
            ),
        }
    }
}

/// A raw HTTP/1.1 connection to the gateway, with what was read but not yet parsed.
struct Wire {
    stream: TlsStream<TcpStream>,
    buf: Vec<u8>,
}

impl Wire {
    async fn open(h: &Harness) -> Wire {
        let stream = h.consumer().handshake().await.expect("mTLS handshake");
        Wire {
            stream,
            buf: Vec::new(),
        }
    }

    /// Writes `bytes` in one write; false if the connection is already gone.
    async fn send(&mut self, bytes: &[u8]) -> bool {
        let write = async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        };
        match tokio::time::timeout(DEADLINE, write).await {
            Ok(result) => result.is_ok(),
            Err(_) => panic!("the gateway took no bytes for {DEADLINE:?}"),
        }
    }

    /// Reads more bytes into the buffer: false at the end of the connection (a close, a
    /// reset, a TLS error). Panics when the gateway neither sends nor closes in time.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16384];
        match tokio::time::timeout(DEADLINE, self.stream.read(&mut chunk)).await {
            Err(_) => panic!(
                "the gateway neither answered nor closed within {DEADLINE:?}; read so far: {:?}",
                lossy(&self.buf)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => false,
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    async fn take(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            if !self.fill().await {
                panic!(
                    "closed {} bytes short of a {n}-byte read: {:?}",
                    n - self.buf.len(),
                    lossy(&self.buf)
                );
            }
        }
        self.buf.drain(..n).collect()
    }

    /// One line, without its CRLF.
    async fn line(&mut self) -> Vec<u8> {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n") {
                let line = self.buf.drain(..i + 2).take(i).collect();
                return line;
            }
            if !self.fill().await {
                panic!("closed in the middle of a line: {:?}", lossy(&self.buf));
            }
        }
    }

    async fn chunked_body(&mut self) -> Vec<u8> {
        let mut body = Vec::new();
        loop {
            let line = lossy(&self.line().await);
            let size = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size, 16)
                .unwrap_or_else(|e| panic!("bad chunk size line {line:?}: {e}"));
            if size == 0 {
                // The trailer section, up to its empty line.
                while !self.line().await.is_empty() {}
                return body;
            }
            body.extend(self.take(size).await);
            assert_eq!(self.take(2).await, b"\r\n", "chunk data not ended by CRLF");
        }
    }

    /// The next final response (`to_head`: it answers a HEAD, so it has no body), or `None`
    /// when the connection ends before a byte of it.
    async fn response(&mut self, to_head: bool) -> Option<Response> {
        loop {
            let end = loop {
                if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                    break i;
                }
                if !self.fill().await {
                    assert!(
                        self.buf.is_empty(),
                        "closed in the middle of a response head: {:?}",
                        lossy(&self.buf)
                    );
                    return None;
                }
            };
            let head: Vec<u8> = self.buf.drain(..end + 4).collect();
            let head = lossy(&head[..end]);
            let mut lines = head.split("\r\n");
            let status_line = lines.next().unwrap_or_default();
            let (version, rest) = status_line
                .split_once(' ')
                .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
            assert!(
                version == "HTTP/1.1" || version == "HTTP/1.0",
                "bad status line {status_line:?}"
            );
            let status: u16 = rest
                .get(..3)
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
            assert!(
                rest.len() == 3 || rest.as_bytes()[3] == b' ',
                "bad status line {status_line:?}"
            );
            let mut headers = Vec::new();
            for line in lines {
                let (name, value) = line
                    .split_once(':')
                    .unwrap_or_else(|| panic!("bad header line {line:?} in {head:?}"));
                assert!(
                    !name.is_empty() && !name.contains([' ', '\t']),
                    "bad header name in {line:?}"
                );
                headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
            }
            if (100..200).contains(&status) {
                continue;
            }
            let values = |n: &str| -> Vec<String> {
                headers
                    .iter()
                    .filter(|(k, _)| k == n)
                    .map(|(_, v)| v.clone())
                    .collect()
            };
            let te = values("transfer-encoding").join(",");
            let lengths = values("content-length");
            let (framing, body) = if to_head || status == 204 || status == 304 {
                (Framing::NoBody, Vec::new())
            } else if !te.is_empty() {
                let last = te.rsplit(',').next().unwrap_or_default().trim();
                assert!(
                    last.eq_ignore_ascii_case("chunked"),
                    "a response whose last transfer coding is not chunked: {te:?}"
                );
                (Framing::Chunked, self.chunked_body().await)
            } else if let Some(first) = lengths.first() {
                assert!(
                    lengths.iter().all(|l| l == first),
                    "conflicting Content-Length in a response: {lengths:?}"
                );
                let n: usize = first
                    .parse()
                    .unwrap_or_else(|e| panic!("bad Content-Length {first:?}: {e}"));
                (Framing::ContentLength, self.take(n).await)
            } else {
                while self.fill().await {}
                (Framing::UntilClose, std::mem::take(&mut self.buf))
            };
            return Some(Response {
                version: version.to_string(),
                status,
                headers,
                body,
                framing,
            });
        }
    }

    /// The next response, which must come.
    async fn answer(&mut self, to_head: bool, what: &str) -> Response {
        self.response(to_head)
            .await
            .unwrap_or_else(|| panic!("{what}: the connection closed without a response"))
    }

    /// The gateway closes the connection (within the deadline) and sends nothing more.
    async fn expect_closed(&mut self, what: &str) {
        while self.fill().await {}
        assert!(
            self.buf.is_empty(),
            "{what}: bytes after the last response: {:?}",
            lossy(&self.buf)
        );
    }

    /// A refused request: an answer with one of `statuses` and then the close, or (only
    /// with `silent_close_ok`) the close alone.
    async fn expect_refused(&mut self, statuses: &[u16], silent_close_ok: bool, what: &str) {
        match self.response(false).await {
            Some(r) => {
                assert!(
                    statuses.contains(&r.status),
                    "{what}: expected one of {statuses:?}, got {} {}",
                    r.status,
                    r.text()
                );
                r.assert_well_formed(what);
            }
            None => assert!(silent_close_ok, "{what}: closed without a response"),
        }
        self.expect_closed(what).await;
    }
}

async fn echo_gateway() -> Harness {
    start_with_recorder(World::ecdsa(), Behaviour::Echo, GatewayOptions::default()).await
}

/// One GET metadata on `w`, answered 200.
async fn assert_get_ok(h: &Harness, w: &mut Wire, what: &str) -> Response {
    assert!(w.send(&Req::metadata(h).bytes()).await, "{what}: write");
    let r = w.answer(false, what).await;
    assert_eq!(r.status, 200, "{what}: {}", r.text());
    r
}

/// A new connection is still served.
async fn assert_still_serves(h: &Harness, what: &str) {
    let mut w = Wire::open(h).await;
    assert_get_ok(h, &mut w, &format!("a new connection after {what}")).await;
}

/// Request targets the provider saw that contain `marker`.
fn seen_with(h: &Harness, marker: &str) -> usize {
    h.recorder
        .heads
        .lock()
        .expect("recorder lock")
        .iter()
        .filter(|(_, uri, _)| uri.contains(marker))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_serves_sequential_requests_on_one_connection() {
    let h = echo_gateway().await;
    let mut w = Wire::open(&h).await;
    for i in 0..3 {
        let r = assert_get_ok(&h, &mut w, &format!("request {i}")).await;
        assert_ne!(
            r.framing,
            Framing::UntilClose,
            "a kept-alive answer is framed"
        );
        assert_eq!(
            r.version, "HTTP/1.1",
            "an HTTP/1.1 request answered as {}",
            r.version
        );
    }
    assert_eq!(h.recorder.seen(), 3);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order() {
    let h = echo_gateway().await;
    let mut w = Wire::open(&h).await;
    let mut both = Req::read_patient(&h, "first").bytes();
    both.extend(Req::read_patient(&h, "second").bytes());
    assert!(w.send(&both).await, "write");
    for id in ["first", "second"] {
        let r = w.answer(false, id).await;
        assert_eq!(r.status, 200, "{id}: {}", r.text());
        assert_eq!(r.echoed_uri(), format!("{BASE_PATH}/Patient/{id}"));
    }
    assert_eq!(h.recorder.seen(), 2);
    // And the connection is still usable.
    assert_get_ok(&h, &mut w, "after the pipeline").await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_with_extensions_and_trailers_reaches_the_provider_dechunked() {
    let h = echo_gateway().await;
    let mut w = Wire::open(&h).await;
    let parts: [&[u8]; 3] = [
        br#"{"resourceType":"#,
        br#""Parameters","#,
        br#""parameter":[]}"#,
    ];
    let mut body = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        let ext = if i == 0 { ";ext=1" } else { "" };
        body.extend(format!("{:x}{ext}\r\n", part.len()).into_bytes());
        body.extend_from_slice(part);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"0\r\nX-Checksum: none\r\n\r\n");
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let req = Req::register(&h)
        .header("Transfer-Encoding: chunked")
        .raw_body(body);
    // The head and every chunk in a write of its own.
    let bytes = req.bytes();
    let head_len = find(&bytes, b"\r\n\r\n").expect("head end") + 4;
    assert!(w.send(&bytes[..head_len]).await, "write head");
    let mut rest = &bytes[head_len..];
    while !rest.is_empty() {
        let n = rest.len().min(20);
        assert!(w.send(&rest[..n]).await, "write body");
        rest = &rest[n..];
    }
    let r = w.answer(false, "chunked POST").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["body_length"], total, "{}", r.text());
    assert_eq!(h.recorder.seen(), 1);
    assert_get_ok(&h, &mut w, "after a chunked request").await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_chunked_is_refused_or_read_as_chunked_and_the_connection_closed() {
    let h = echo_gateway().await;
    let mut w = Wire::open(&h).await;
    // Read by Content-Length the body is the whole smuggled request; read as chunked it is
    // empty and the smuggled request is next on the connection. Either way it must never
    // reach the provider (RFC 9112 §6.3: close the connection after answering).
    let mut body = b"0\r\n\r\n".to_vec();
    body.extend(Req::read_patient(&h, "smuggled").bytes());
    let req = Req::register(&h)
        .header(format!("Content-Length: {}", body.len()))
        .header("Transfer-Encoding: chunked")
        .raw_body(body);
    assert!(w.send(&req.bytes()).await, "write");
    match w.response(false).await {
        Some(r) if (200..300).contains(&r.status) => {
            // Processed by Transfer-Encoding alone, as RFC 9112 allows.
            assert_eq!(r.json()["body_length"], 0, "{}", r.text());
            assert_eq!(h.recorder.seen(), 1);
        }
        Some(r) => {
            assert_eq!(r.status, 400, "{}", r.text());
            assert_eq!(h.recorder.seen(), 0);
        }
        None => assert_eq!(h.recorder.seen(), 0),
    }
    w.expect_closed("Content-Length with chunked").await;
    assert_eq!(seen_with(&h, "smuggled"), 0, "the smuggled request ran");
    assert_still_serves(&h, "Content-Length with chunked").await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_content_lengths_are_refused() {
    let h = echo_gateway().await;
    let mut w = Wire::open(&h).await;
    let req = Req::register(&h)
        .header("Content-Length: 5")
        .header("Content-Length: 6")
        .raw_body(b"hello!".to_vec());
    assert!(w.send(&req.bytes()).await, "write");
    w.expect_refused(&[400], false, "two Content-Lengths").await;
    assert_eq!(h.recorder.seen(), 0);
    assert_still_serves(&h, "two Content-Lengths").await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_coding_other_than_final_chunked_is_refused() {
    let h = echo_gateway().await;
    for (i, coding) in ["gzip", "chunked, gzip"].into_iter().enumerate() {
        let mut w = Wire::open(&h).await;
        let req = Req::register(&h)
            .header(format!("Transfer-Encoding: {coding}"))
            .raw_body(b"5\r\nhello\r\n0\r\n\r\n".to_vec());
        assert!(w.send(&req.bytes()).await, "write");
        // RFC 9112 §6.3: no final `chunked`, so 400 (not §6.1's 501) and the connection closed.
        w.expect_refused(&[400], false, coding).await;
        // Only the earlier follow-up request reached the provider.
        assert_eq!(h.recorder.seen(), i, "{coding}");
        assert_still_serves(&h, coding).await;
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_chunk_size_ends_the_request_and_the_connection() {
    let h = echo_gateway().await;
    let mut w = Wire::open(&h).await;
    let req = Req::register(&h)
        .header("Transfer-Encoding: chunked")
        .raw_body(b"5\r\nhello\r\nzz\r\nmore\r\n0\r\n\r\n".to_vec());
    assert!(w.send(&req.bytes()).await, "write");
    // Whatever the answer (the provider may have had the head and a partial body), it is
    // not a success, and the connection is not used again.
    if let Some(r) = w.response(false).await {
        assert!(
            !(200..300).contains(&r.status),
            "a broken chunked body was answered {}: {}",
            r.status,
            r.text()
        );
    }
    w.expect_closed("an invalid chunk size").await;
    // Never more than the one valid chunk went on.
    assert!(
        h.recorder
            .body_bytes
            .load(std::sync::atomic::Ordering::SeqCst)
            <= 5
    );
    assert_still_serves(&h, "an invalid chunk size").await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_heads_are_refused_with_400_and_closed() {
    let h = echo_gateway().await;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("a garbage request line", b"HELLO\r\n\r\n".to_vec()),
        (
            "a header line without a colon",
            Req::metadata(&h).header("NoColonHere").bytes(),
        ),
        (
            "whitespace between a header name and its colon",
            Req::metadata(&h).header("X-Spaced : 1").bytes(),
        ),
        (
            "a NUL in a header value",
            Req::metadata(&h).header("X-Nul: a\0b").bytes(),
        ),
    ];
    for (i, (what, bytes)) in cases.into_iter().enumerate() {
        let mut w = Wire::open(&h).await;
        assert!(w.send(&bytes).await, "{what}: write");
        w.expect_refused(&[400], false, what).await;
        // Only the earlier follow-up requests reached the provider.
        assert_eq!(h.recorder.seen(), i, "{what} reached the provider");
        assert_still_serves(&h, what).await;
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_close_is_honoured_after_the_response() {
    let h = echo_gateway().await;
    let mut w = Wire::open(&h).await;
    let req = Req::metadata(&h).header("Connection: close");
    assert!(w.send(&req.bytes()).await, "write");
    let r = w.answer(false, "Connection: close").await;
    assert_eq!(r.status, 200, "{}", r.text());
    w.expect_closed("after Connection: close").await;
    assert_eq!(h.recorder.seen(), 1);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_1_0_request_is_answered_then_the_connection_closed() {
    let h = echo_gateway().await;
    let mut w = Wire::open(&h).await;
    assert!(
        w.send(&Req::metadata(&h).version("HTTP/1.0").bytes()).await,
        "write"
    );
    let r = w.answer(false, "HTTP/1.0").await;
    assert_eq!(r.status, 200, "{}", r.text());
    // An HTTP/1.0 client does not understand chunked (RFC 9112 §6.1).
    assert_ne!(r.framing, Framing::Chunked, "{r:?}");
    assert_eq!(r.json()["uri"], format!("{BASE_PATH}/metadata"));
    w.expect_closed("after an HTTP/1.0 request").await;
    assert_eq!(h.recorder.seen(), 1);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_carry_a_date_and_proper_framing() {
    let h = echo_gateway().await;
    let body = br#"{"resourceType":"Parameters"}"#;
    let cases = [
        ("a forwarded GET", Req::metadata(&h), 200),
        ("a forwarded POST", Req::register(&h).sized_body(body), 200),
        (
            "a request without Ssp-TraceID",
            Req::metadata(&h).without("Ssp-TraceID"),
            400,
        ),
        (
            "an unknown interaction",
            Req::gpc(
                &h,
                "GET",
                "metadata",
                "urn:nhs:names:services:gpconnect:fhir:rest:read:nothing-1",
            ),
            400,
        ),
        (
            "an unsupported method",
            Req::gpc(&h, "DELETE", "metadata", IX_METADATA),
            405,
        ),
    ];
    let mut w = Wire::open(&h).await;
    for (what, req, status) in cases {
        assert!(w.send(&req.bytes()).await, "{what}: write");
        let r = w.answer(false, what).await;
        assert_eq!(r.status, status, "{what}: {}", r.text());
        r.assert_well_formed(what);
    }
    // The server's own answer to a head it cannot parse.
    let mut w = Wire::open(&h).await;
    assert!(w.send(b"HELLO\r\n\r\n").await, "write");
    let r = w.answer(false, "a garbage head").await;
    r.assert_well_formed("a garbage head");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_refused_before_its_body_is_read_leaves_no_leftover_request() {
    let h = echo_gateway().await;
    let mut w = Wire::open(&h).await;
    // The body is itself a complete request: should the server lose track of the refused
    // request's body it would run it.
    let body = Req::read_patient(&h, "smuggled").bytes();
    let refused = Req::register(&h).without("Ssp-TraceID").sized_body(&body);
    assert!(w.send(&refused.bytes()).await, "write");
    let r = w.answer(false, "missing Ssp-TraceID").await;
    assert_eq!(r.status, 400, "{}", r.text());
    // Then either the connection serves the next request or the server closes it.
    let sent = w.send(&Req::read_patient(&h, "follow-up").bytes()).await;
    match w.response(false).await {
        Some(r) => {
            assert!(sent, "an answer to a request that could not be written");
            assert_eq!(r.status, 200, "{}", r.text());
            assert_eq!(r.echoed_uri(), format!("{BASE_PATH}/Patient/follow-up"));
            assert_eq!(h.recorder.seen(), 1);
        }
        None => assert_eq!(h.recorder.seen(), 0),
    }
    assert_eq!(
        seen_with(&h, "smuggled"),
        0,
        "the refused body ran as a request"
    );
    assert_still_serves(&h, "a refused request with a body").await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stops_short_is_bounded_by_the_response_timeout() {
    // Nothing bounds a body read on the listener; the upstream response timeout does: the
    // provider waits for the rest of the body, no answer comes, the gateway gives up. The
    // consumer's body was being waited for, so it is the consumer's 408, not the provider's 504.
    let h = start_with_recorder(
        World::ecdsa(),
        Behaviour::Echo,
        GatewayOptions {
            response_timeout: "2s",
            ..Default::default()
        },
    )
    .await;
    let mut w = Wire::open(&h).await;
    let req = Req::register(&h)
        .header("Content-Length: 1000")
        .raw_body(b"0123456789".to_vec());
    assert!(w.send(&req.bytes()).await, "write");
    let r = w.answer(false, "a body 990 bytes short").await;
    assert_eq!(r.status, 408, "{}", r.text());
    assert!(r.text().contains("REQUEST_BODY_TIMEOUT"), "{}", r.text());
    assert!(h.recorder.seen() <= 1);
    assert_still_serves(&h, "a body that stopped short").await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_up_to_max_header_bytes_pass_and_larger_get_431() {
    let h = start_with_recorder(
        World::ecdsa(),
        Behaviour::Echo,
        GatewayOptions {
            extra_listener: "max_header_bytes = 16384",
            ..Default::default()
        },
    )
    .await;
    // A head of `size` bytes in all (request line, header lines and the blank line), padded
    // with one header; a margin either side of the limit, so it holds whichever of those
    // bytes a server counts.
    let padded = |size: usize| {
        let base = Req::metadata(&h).bytes().len();
        let pad = size - base - "X-Pad: \r\n".len();
        let bytes = Req::metadata(&h)
            .header(format!("X-Pad: {}", "a".repeat(pad)))
            .bytes();
        assert_eq!(bytes.len(), size);
        bytes
    };

    let mut w = Wire::open(&h).await;
    assert!(w.send(&padded(MAX_HEADER_BYTES - 256)).await, "write");
    let r = w.answer(false, "a head under the limit").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(h.recorder.seen(), 1);

    let mut w = Wire::open(&h).await;
    assert!(w.send(&padded(MAX_HEADER_BYTES + 256)).await, "write");
    w.expect_refused(&[431], false, "a head over the limit")
        .await;
    assert_eq!(
        h.recorder.seen(),
        1,
        "an oversized head reached the provider"
    );
    assert_still_serves(&h, "an oversized head").await;
    // A request line over the limit by itself: its target is too long (RFC 9112 §3: 414).
    let mut w = Wire::open(&h).await;
    let long = format!(
        "GET /{} HTTP/1.1\r\nHost: localhost\r\n\r\n",
        "a".repeat(MAX_HEADER_BYTES + 256)
    );
    assert!(w.send(long.as_bytes()).await, "write");
    w.expect_refused(&[414], false, "a target over the limit")
        .await;
    assert_eq!(
        h.recorder.seen(),
        2,
        "only the two good requests reached it"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_target_reaches_the_provider_unchanged() {
    let h = echo_gateway().await;
    let query = "identifier=https%3A%2F%2Ffhir.nhs.uk%2FId%2Fnhs-number%7C9000000009\
                 &_include=Patient%3Ageneral-practitioner&name=O%27Brien+Sm%C3%ADth&x=a%2Fb&x=c";
    let mut w = Wire::open(&h).await;
    let req = Req::gpc(&h, "GET", &format!("Patient?{query}"), IX_SEARCH_PATIENT);
    assert!(w.send(&req.bytes()).await, "write");
    let r = w.answer(false, "a search").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let (method, uri, _) = h.recorder.last_head();
    assert_eq!(method, http::Method::GET);
    assert_eq!(uri, format!("{BASE_PATH}/Patient?{query}"));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_response_has_no_body_and_the_connection_goes_on() {
    let h = echo_gateway().await;
    let mut w = Wire::open(&h).await;
    assert!(
        w.send(&Req::gpc(&h, "HEAD", "metadata", IX_METADATA).bytes())
            .await,
        "write"
    );
    let r = w.answer(true, "HEAD").await;
    assert!(r.status >= 200, "{r:?}");
    // Body bytes after the HEAD answer would be read as the next response's status line.
    let r = assert_get_ok(&h, &mut w, "a GET after HEAD").await;
    assert_eq!(r.echoed_uri(), format!("{BASE_PATH}/metadata"));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_heads_are_counted_by_reason() {
    let h = echo_gateway().await;
    let cases: [(&str, Vec<u8>); 3] = [
        ("garbage", b"HELLO\r\n\r\n".to_vec()),
        (
            "Content-Length with chunked",
            Req::register(&h)
                .header("Content-Length: 5")
                .header("Transfer-Encoding: chunked")
                .raw_body(b"0\r\n\r\n".to_vec())
                .bytes(),
        ),
        (
            "conflicting lengths",
            Req::register(&h)
                .header("Content-Length: 5")
                .header("Content-Length: 6")
                .raw_body(b"hello".to_vec())
                .bytes(),
        ),
    ];
    for (what, bytes) in cases {
        let mut w = Wire::open(&h).await;
        assert!(w.send(&bytes).await, "{what}: write");
        w.expect_refused(&[400], false, what).await;
    }
    let (_, text) = http_get(h.admin, "/metrics").await;
    let count = |reason: &str| {
        sample(
            &text,
            &format!("ssp_http_refused_heads_total{{reason=\"{reason}\"}}"),
        )
    };
    assert_eq!(count("malformed"), Some(1.0), "{text}");
    assert_eq!(count("framing"), Some(2.0), "{text}");
    assert_eq!(h.recorder.seen(), 0);
    // Each is audited: a rejection with the connection's certificate, its status and reason.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let refused = loop {
        let refused: Vec<serde_json::Value> = audit_records(&h.audit_dir)
            .into_iter()
            .filter(|r| {
                r["token"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("REQUEST_HEAD_REFUSED_"))
            })
            .collect();
        if refused.len() >= 3 || std::time::Instant::now() > deadline {
            break refused;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut tokens: Vec<&str> = refused.iter().filter_map(|r| r["token"].as_str()).collect();
    tokens.sort_unstable();
    assert_eq!(
        tokens,
        [
            "REQUEST_HEAD_REFUSED_FRAMING",
            "REQUEST_HEAD_REFUSED_FRAMING",
            "REQUEST_HEAD_REFUSED_MALFORMED"
        ]
    );
    for r in &refused {
        assert_eq!(r["kind"], "rejection", "{r}");
        assert_eq!(r["status"], 400, "{r}");
        assert_eq!(
            r["client"]["serial"],
            h.world.consumer_issued.serial.as_str(),
            "{r}"
        );
    }
    h.stop().await;
}

/// The audit records of refused requests with `token`, once there are `n` of them.
async fn rejections_with(h: &Harness, token: &str, n: usize) -> Vec<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let found: Vec<_> = audit_records(&h.audit_dir)
            .into_iter()
            .filter(|r| r["kind"] == "rejection" && r["token"] == token)
            .collect();
        if found.len() >= n {
            return found;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {n} rejection records with {token}",
            found.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// No GP Connect GET has a body. A GET Slot search with one (a Content-Length or chunked) is
/// the gateway's own 400, audited, and never forwarded: on a pooled provider connection a
/// provider that ignores Content-Length on a GET would run the body as the next request.
/// `Content-Length: 0` is no body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_with_a_body_is_refused_and_never_forwarded() {
    let h = echo_gateway().await;
    let slot = "Slot?status=free&start=ge2030-01-07&end=le2030-01-10";
    let token = "REQUEST_BODY_NOT_ALLOWED_GET";
    // A body that is itself a request, padded to 1600 bytes.
    let mut smuggled = Req::read_patient(&h, "smuggled").bytes();
    smuggled.resize(1600, b' ');
    let chunked = {
        let mut b = format!("{:x}\r\n", smuggled.len()).into_bytes();
        b.extend_from_slice(&smuggled);
        b.extend_from_slice(b"\r\n0\r\n\r\n");
        b
    };
    let cases = [
        (
            "Content-Length: 1600",
            Req::gpc(&h, "GET", slot, IX_SEARCH_SLOT).sized_body(&smuggled),
        ),
        (
            "chunked",
            Req::gpc(&h, "GET", slot, IX_SEARCH_SLOT)
                .header("Transfer-Encoding: chunked")
                .raw_body(chunked),
        ),
    ];
    for (what, req) in cases {
        let mut w = Wire::open(&h).await;
        assert!(w.send(&req.bytes()).await, "{what}: write");
        let r = w.answer(false, what).await;
        assert_eq!(r.status, 400, "{what}: {}", r.text());
        assert_eq!(r.json()["issue"][0]["diagnostics"], token, "{what}");
        assert_eq!(
            r.json()["issue"][0]["details"]["coding"][1]["code"],
            "BAD_REQUEST"
        );
    }
    assert_eq!(h.recorder.seen(), 0, "a GET with a body was forwarded");
    assert_eq!(seen_with(&h, "smuggled"), 0, "the body ran as a request");
    for record in rejections_with(&h, token, 2).await {
        assert_eq!(record["status"], 400);
        assert_eq!(record["method"], "GET");
        assert_eq!(record["interaction"], IX_SEARCH_SLOT, "{record}");
    }
    let (_, metrics) = http_get(h.admin, "/metrics").await;
    assert_eq!(
        sample(
            &metrics,
            "ssp_rejections_total{reason=\"request_body_not_allowed\"}"
        ),
        Some(2.0),
        "{metrics}"
    );

    // `Content-Length: 0` is no body: forwarded.
    let mut w = Wire::open(&h).await;
    let req = Req::gpc(&h, "GET", slot, IX_SEARCH_SLOT).header("Content-Length: 0");
    assert!(w.send(&req.bytes()).await, "write");
    let r = w.answer(false, "Content-Length: 0").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(h.recorder.seen(), 1);
    h.stop().await;
}

/// RFC 9112 §3.2: an HTTP/1.1 request with no Host, two, or an invalid one is 400 and never
/// reaches the provider; each is counted under `ssp_http_refused_heads_total{reason="host"}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_repeated_or_invalid_host_is_refused() {
    let h = echo_gateway().await;
    let cases = [
        ("two Hosts", Req::metadata(&h).header("Host: b")),
        (
            "an invalid Host",
            Req::metadata(&h).without("Host").header("Host: a b c"),
        ),
        ("no Host", Req::metadata(&h).without("Host")),
    ];
    for (what, req) in cases {
        let mut w = Wire::open(&h).await;
        assert!(w.send(&req.bytes()).await, "{what}: write");
        w.expect_refused(&[400], false, what).await;
    }
    assert_eq!(h.recorder.seen(), 0, "a refused head reached the provider");
    let (_, text) = http_get(h.admin, "/metrics").await;
    assert_eq!(
        sample(&text, "ssp_http_refused_heads_total{reason=\"host\"}"),
        Some(3.0),
        "{text}"
    );
    // HTTP/1.0 needs none.
    let mut w = Wire::open(&h).await;
    let req = Req::metadata(&h).without("Host").version("HTTP/1.0");
    assert!(w.send(&req.bytes()).await, "write");
    let r = w.answer(false, "HTTP/1.0 without Host").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(h.recorder.seen(), 1);
    h.stop().await;
}
