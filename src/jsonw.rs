//! A small JSON writer for the two lines written per request (audit records and the access
//! line), writing exactly what serde_json writes for the same values, byte for byte (tests
//! compare the two over arbitrary strings), without serde's per-field machinery. Strings are
//! scanned eight bytes at a time for the bytes JSON must escape (`"`, `\` and controls
//! below 0x20), where serde_json looks each byte up in a table: most of a record is URLs,
//! ids and certificate names with nothing to escape.

use std::fmt::Display;

const LO: u64 = 0x0101_0101_0101_0101;
const HI: u64 = 0x8080_8080_8080_8080;

/// A mark in the high bit of each byte of `w` that is a control (below 0x20), `"` or `\`.
/// The lowest mark is always one of those bytes: the subtractions' borrows only run upwards,
/// from such a byte into the ones above it, so any false mark lies above a true one.
fn escape_marks(w: u64) -> u64 {
    let below_space = w.wrapping_sub(LO * 0x20) & !w;
    let quote = w ^ (LO * u64::from(b'"'));
    let backslash = w ^ (LO * u64::from(b'\\'));
    let zero = |x: u64| x.wrapping_sub(LO) & !x;
    (below_space | zero(quote) | zero(backslash)) & HI
}

/// The index of the first byte of the 8 little-endian bytes of `w` that JSON must escape.
fn first_in_word(w: u64) -> Option<usize> {
    match escape_marks(w) {
        0 => None,
        marks => Some(marks.trailing_zeros() as usize / 8),
    }
}

/// The index of the first byte of `bytes` that JSON must escape, if any (the JSON reader,
/// `ssp::json`, uses it to find where a string's plain run ends). Eight bytes at a time; the
/// last few are padded with spaces, which need no escape.
pub(crate) fn first_escape(bytes: &[u8]) -> Option<usize> {
    let mut chunks = bytes.chunks_exact(8);
    let mut at = 0;
    for chunk in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(chunk);
        if let Some(i) = first_in_word(u64::from_le_bytes(w)) {
            return Some(at + i);
        }
        at += 8;
    }
    let rest = chunks.remainder();
    let mut w = [b' '; 8];
    w[..rest.len()].copy_from_slice(rest);
    first_in_word(u64::from_le_bytes(w)).map(|i| at + i)
}

/// Appends `s` as a JSON string, escaped as serde_json escapes it: `\"`, `\\`, `\b`, `\f`,
/// `\n`, `\r`, `\t`, other controls as `\u00xx`; everything else, non-ASCII included, as is.
pub fn string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let mut rest = s.as_bytes();
    while let Some(at) = first_escape(rest) {
        out.extend_from_slice(&rest[..at]);
        let b = rest[at];
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xf)]);
            }
        }
        rest = &rest[at + 1..];
    }
    out.extend_from_slice(rest);
    out.push(b'"');
}

/// Appends `ip` in dotted decimal, as `Display` writes it, without `fmt`.
pub(crate) fn ipv4_into(out: &mut Vec<u8>, ip: std::net::Ipv4Addr) {
    let mut digits = itoa::Buffer::new();
    for (i, octet) in ip.octets().iter().enumerate() {
        if i > 0 {
            out.push(b'.');
        }
        out.extend_from_slice(digits.format(*octet).as_bytes());
    }
}

/// Writes one JSON object's members in order: `{` on creation, `,` between members, `}` at
/// [`Object::end`]. Member names are the caller's constants and are written as given.
pub struct Object<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
}

impl<'a> Object<'a> {
    pub fn new(out: &'a mut Vec<u8>) -> Object<'a> {
        out.push(b'{');
        Object { out, first: true }
    }

    fn key(&mut self, name: &str) -> &mut Vec<u8> {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        debug_assert!(first_escape(name.as_bytes()).is_none());
        self.out.push(b'"');
        self.out.extend_from_slice(name.as_bytes());
        self.out.extend_from_slice(b"\":");
        self.out
    }

    pub fn str(&mut self, name: &str, value: &str) {
        let out = self.key(name);
        string(out, value);
    }

    pub fn opt_str(&mut self, name: &str, value: Option<&str>) {
        if let Some(v) = value {
            self.str(name, v);
        }
    }

    /// A socket address as its `Display` writes it (`a.b.c.d:port`, `[v6]:port`).
    pub fn socket_addr(&mut self, name: &str, addr: std::net::SocketAddr) {
        let std::net::SocketAddr::V4(v4) = addr else {
            return self.display(name, addr);
        };
        let out = self.key(name);
        out.push(b'"');
        ipv4_into(out, *v4.ip());
        out.push(b':');
        out.extend_from_slice(itoa::Buffer::new().format(v4.port()).as_bytes());
        out.push(b'"');
    }

    /// A string member from a value's `Display` (an address, say), escaped like any string.
    pub fn display(&mut self, name: &str, value: impl Display) {
        let mut text = String::with_capacity(48);
        let _ = std::fmt::Write::write_fmt(&mut text, format_args!("{value}"));
        self.str(name, &text);
    }

    fn int(&mut self, name: &str, value: impl itoa::Integer) {
        let out = self.key(name);
        out.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
    }

    pub fn uint(&mut self, name: &str, value: u64) {
        self.int(name, value);
    }

    pub fn opt_int(&mut self, name: &str, value: Option<i64>) {
        if let Some(v) = value {
            self.int(name, v);
        }
    }

    pub fn opt_uint(&mut self, name: &str, value: Option<u64>) {
        if let Some(v) = value {
            self.uint(name, v);
        }
    }

    pub fn opt_bool(&mut self, name: &str, value: Option<bool>) {
        if let Some(v) = value {
            let out = self.key(name);
            out.extend_from_slice(if v { b"true" } else { b"false" });
        }
    }

    /// An array of strings.
    pub fn strs(&mut self, name: &str, values: &[String]) {
        let out = self.key(name);
        out.push(b'[');
        for (i, v) in values.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            string(out, v);
        }
        out.push(b']');
    }

    /// A member whose value is already JSON.
    pub fn raw(&mut self, name: &str, json: &[u8]) {
        self.key(name).extend_from_slice(json);
    }

    /// A nested object.
    pub fn object(&mut self, name: &str) -> Object<'_> {
        Object::new(self.key(name))
    }

    pub fn end(self) {
        self.out.push(b'}');
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ours(s: &str) -> String {
        let mut out = Vec::new();
        string(&mut out, s);
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn every_ascii_byte_is_escaped_as_serde_json_escapes_it() {
        for b in 0u8..=0x7f {
            let s = (b as char).to_string();
            assert_eq!(
                ours(&s),
                serde_json::to_string(&s).expect("json"),
                "byte {b:#x}"
            );
            // And at every position of a word-sized run.
            for at in 0..17 {
                let mut t = "a".repeat(17);
                t.replace_range(at..at + 1, &s);
                assert_eq!(ours(&t), serde_json::to_string(&t).expect("json"), "{t:?}");
            }
        }
    }

    /// The first byte JSON must escape, found one byte at a time.
    fn first_escape_slowly(bytes: &[u8]) -> Option<usize> {
        bytes
            .iter()
            .position(|&b| b < 0x20 || b == b'"' || b == b'\\')
    }

    #[test]
    fn the_first_escape_is_exact_whatever_follows_it() {
        // Borrows in the word arithmetic mark bytes above a true mark: 0x01 above a quote
        // (0x22 ^ 0x22 - 1 borrows), 0x21 above a control, and so on.
        for special in [0u8, 0x01, 0x1f, b'"', b'\\'] {
            for follower in [0u8, 0x01, 0x20, 0x21, 0x23, 0x5d, 0x5c, b'"', 0x80, 0xff] {
                for at in 0..17 {
                    let mut bytes = vec![b'a'; 17];
                    bytes[at] = special;
                    for b in bytes.iter_mut().skip(at + 1) {
                        *b = follower;
                    }
                    assert_eq!(first_escape(&bytes), Some(at), "{bytes:?}");
                }
            }
        }
    }

    proptest! {
        #[test]
        fn first_escape_is_the_first_byte_to_escape(
            bytes in proptest::collection::vec(
                prop_oneof![Just(0u8), Just(1u8), Just(0x1f), Just(0x20), Just(0x21), Just(b'"'),
                    Just(0x23), Just(b'\\'), Just(0x5d), Just(b'a'), Just(0x80), Just(0xff)],
                0..40,
            )
        ) {
            prop_assert_eq!(first_escape(&bytes), first_escape_slowly(&bytes));
        }

        #[test]
        fn any_string_is_written_as_serde_json_writes_it(s in any::<String>()) {
            prop_assert_eq!(ours(&s), serde_json::to_string(&s).expect("json"));
        }

        #[test]
        fn strings_of_json_s_special_bytes_too(
            s in proptest::collection::vec(
                prop_oneof![Just('"'), Just('\\'), Just('\n'), Just('\u{1}'), Just('\u{1f}'),
                    Just('\u{7f}'), Just('é'), Just('a'), Just('/'), Just('\u{2028}')],
                0..40,
            )
        ) {
            let s: String = s.into_iter().collect();
            prop_assert_eq!(ours(&s), serde_json::to_string(&s).expect("json"));
        }
    }

    #[test]
    fn objects_nest_and_skip_what_is_absent() {
        let mut out = Vec::new();
        let mut o = Object::new(&mut out);
        o.str("a", "x\"y");
        o.opt_str("skipped", None);
        o.uint("n", u64::MAX);
        o.opt_bool("ok", Some(false));
        o.strs("names", &["p".into(), "q".into()]);
        let mut inner = o.object("inner");
        inner.display("addr", std::net::SocketAddr::from(([127, 0, 0, 1], 443)));
        inner.end();
        o.raw("raw", b"{\"z\":1}");
        o.end();
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            r#"{"a":"x\"y","n":18446744073709551615,"ok":false,"names":["p","q"],"inner":{"addr":"127.0.0.1:443"},"raw":{"z":1}}"#
        );
    }
}
