//! A strict JSON reader that pulls values straight out of the text, for the JWT's typed views
//! (`ssp::jwt`). It accepts exactly the JSON that `serde_json::from_slice` accepts (RFC 8259:
//! no trailing commas, no leading zeros, no control characters or lone surrogates in strings,
//! valid UTF-8, nothing but whitespace after the value, at most 127 nested arrays and objects,
//! numbers serde_json's own `f64` arithmetic keeps finite), and reads integers as serde_json
//! does: one without a fraction or exponent that fits an `i64` is an integer, except `-0`. The
//! tests hold it to serde_json over generated and mutated texts.
//!
//! Strings are borrowed from the text unless they hold escapes. Nothing else is allocated.

use std::borrow::Cow;

/// The text is not JSON: `what` names the first problem found, `at` its byte offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Invalid {
    pub what: &'static str,
    pub at: usize,
}

/// The next value's first token. Arrays and objects are entered, not read: their elements and
/// members come from [`Reader::next_element`] and [`Reader::next_member`].
#[derive(Debug, Clone, PartialEq)]
pub enum Token<'a> {
    Null,
    Bool(bool),
    /// A number without fraction or exponent within `i64` (but not `-0`).
    Int(i64),
    /// Any other number, as written.
    Number(&'a str),
    Str(Cow<'a, str>),
    Array,
    Object,
}

/// serde_json's nesting limit: its 128th nested array or object is refused.
const DEPTH_LIMIT: u8 = 128;

/// The reader: where it is in the text and how many arrays and objects are open.
pub struct Reader<'a> {
    text: &'a str,
    pos: usize,
    remaining_depth: u8,
}

impl<'a> Reader<'a> {
    /// A reader over `json`, which must be UTF-8.
    pub fn new(json: &'a [u8]) -> Result<Self, Invalid> {
        let text = std::str::from_utf8(json).map_err(|e| Invalid {
            what: "not UTF-8",
            at: e.valid_up_to(),
        })?;
        Ok(Reader {
            text,
            pos: 0,
            remaining_depth: DEPTH_LIMIT,
        })
    }

    /// Parses `json` as exactly one value, read by `read` (which must consume it all).
    pub fn whole<T>(
        json: &'a [u8],
        read: impl FnOnce(&mut Reader<'a>) -> Result<T, Invalid>,
    ) -> Result<T, Invalid> {
        let mut reader = Reader::new(json)?;
        let value = read(&mut reader)?;
        reader.skip_whitespace();
        match reader.pos == reader.text.len() {
            true => Ok(value),
            false => Err(reader.invalid("trailing characters")),
        }
    }

    /// The problem `what`, found at the reader's position.
    pub fn invalid(&self, what: &'static str) -> Invalid {
        Invalid { what, at: self.pos }
    }

    fn bytes(&self) -> &'a [u8] {
        self.text.as_bytes()
    }

    fn peek(&self) -> Option<u8> {
        self.bytes().get(self.pos).copied()
    }

    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\n' | b'\t' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    /// Reads the next value's first token (a whole scalar, or the `[` or `{` it opens with).
    pub fn value(&mut self) -> Result<Token<'a>, Invalid> {
        self.skip_whitespace();
        match self.peek() {
            Some(b'n') => self.literal("null", Token::Null),
            Some(b't') => self.literal("true", Token::Bool(true)),
            Some(b'f') => self.literal("false", Token::Bool(false)),
            Some(b'"') => {
                self.pos += 1;
                self.string().map(Token::Str)
            }
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(b'[') => self.enter(Token::Array),
            Some(b'{') => self.enter(Token::Object),
            Some(_) => Err(self.invalid("expected a value")),
            None => Err(self.invalid("end of text where a value was expected")),
        }
    }

    /// Reads and drops the next value, checking all of it.
    pub fn skip_value(&mut self) -> Result<(), Invalid> {
        let token = self.value()?;
        self.skip_rest(&token)
    }

    /// After `token`: reads and drops the rest of the array or object it opened, if it did.
    pub fn skip_rest(&mut self, token: &Token<'a>) -> Result<(), Invalid> {
        let mut first = true;
        match token {
            Token::Array => {
                while self.next_element(&mut first)? {
                    self.skip_value()?;
                }
            }
            Token::Object => {
                while self.next_member(&mut first)?.is_some() {
                    self.skip_value()?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Inside an array (`first` true until the first element): whether another element
    /// follows, to be read with [`Reader::value`]. `false` once the array has closed.
    pub fn next_element(&mut self, first: &mut bool) -> Result<bool, Invalid> {
        self.another(first, b']', "expected `,` or `]`")
    }

    /// Inside an object (`first` true until the first member): the next member's name, its
    /// value to be read with [`Reader::value`]. `None` once the object has closed.
    pub fn next_member(&mut self, first: &mut bool) -> Result<Option<Cow<'a, str>>, Invalid> {
        if !self.another(first, b'}', "expected `,` or `}`")? {
            return Ok(None);
        }
        self.skip_whitespace();
        if self.peek() != Some(b'"') {
            return Err(self.invalid("expected a member name"));
        }
        self.pos += 1;
        let name = self.string()?;
        self.skip_whitespace();
        if self.peek() != Some(b':') {
            return Err(self.invalid("expected `:`"));
        }
        self.pos += 1;
        Ok(Some(name))
    }

    /// Inside an array or object closed by `close`: `false` (and closed) at `close`, else
    /// `true` past the `,` that must separate an item from the one before it.
    fn another(
        &mut self,
        first: &mut bool,
        close: u8,
        expected: &'static str,
    ) -> Result<bool, Invalid> {
        self.skip_whitespace();
        match self.peek() {
            Some(b) if b == close => {
                self.pos += 1;
                self.remaining_depth += 1;
                return Ok(false);
            }
            Some(b',') if !*first => self.pos += 1,
            _ if *first => {}
            _ => return Err(self.invalid(expected)),
        }
        *first = false;
        Ok(true)
    }

    fn enter(&mut self, token: Token<'a>) -> Result<Token<'a>, Invalid> {
        self.remaining_depth -= 1;
        if self.remaining_depth == 0 {
            return Err(self.invalid("nested too deeply"));
        }
        self.pos += 1;
        Ok(token)
    }

    fn literal(&mut self, word: &'static str, token: Token<'a>) -> Result<Token<'a>, Invalid> {
        let end = self.pos + word.len();
        if self.bytes().get(self.pos..end) != Some(word.as_bytes()) {
            return Err(self.invalid("expected a value"));
        }
        self.pos = end;
        Ok(token)
    }

    /// A string, from just after its opening quote to just after its closing one.
    fn string(&mut self) -> Result<Cow<'a, str>, Invalid> {
        let start = self.pos;
        self.plain_run();
        if self.peek() == Some(b'"') {
            let text = &self.text[start..self.pos];
            self.pos += 1;
            return Ok(Cow::Borrowed(text));
        }
        // Escapes (or an error, which the loop finds): the text is copied.
        let mut out = String::with_capacity(self.pos - start + 16);
        out.push_str(&self.text[start..self.pos]);
        loop {
            match self.peek() {
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(Cow::Owned(out));
                }
                Some(b'\\') => {
                    self.pos += 1;
                    self.escape(&mut out)?;
                }
                Some(_) => {
                    let run = self.pos;
                    self.plain_run();
                    if run == self.pos {
                        return Err(self.invalid("control character in a string"));
                    }
                    out.push_str(&self.text[run..self.pos]);
                }
                None => return Err(self.invalid("unterminated string")),
            }
        }
    }

    /// Moves past the bytes of a string that are themselves (up to `"`, `\` or a control
    /// character).
    fn plain_run(&mut self) {
        let rest = &self.bytes()[self.pos..];
        self.pos += crate::jsonw::first_escape(rest).unwrap_or(rest.len());
    }

    /// One escape, from just after its backslash.
    fn escape(&mut self, out: &mut String) -> Result<(), Invalid> {
        let Some(b) = self.peek() else {
            return Err(self.invalid("unterminated string"));
        };
        self.pos += 1;
        let c = match b {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => self.unicode_escape()?,
            _ => return Err(self.invalid("invalid escape")),
        };
        out.push(c);
        Ok(())
    }

    /// The character of a `\u` escape (from just after the `u`), a surrogate pair included.
    fn unicode_escape(&mut self) -> Result<char, Invalid> {
        let unit = self.hex4()?;
        let code = match unit {
            0xD800..=0xDBFF => {
                if self.bytes().get(self.pos..self.pos + 2) != Some(b"\\u") {
                    return Err(self.invalid("lone leading surrogate"));
                }
                self.pos += 2;
                let low = self.hex4()?;
                if !(0xDC00..=0xDFFF).contains(&low) {
                    return Err(self.invalid("lone leading surrogate"));
                }
                0x10000 + ((u32::from(unit) - 0xD800) << 10) + (u32::from(low) - 0xDC00)
            }
            0xDC00..=0xDFFF => return Err(self.invalid("lone trailing surrogate")),
            _ => u32::from(unit),
        };
        char::from_u32(code).ok_or_else(|| self.invalid("invalid escape"))
    }

    fn hex4(&mut self) -> Result<u16, Invalid> {
        let mut unit = 0u16;
        for _ in 0..4 {
            let digit = match self.peek() {
                Some(b @ b'0'..=b'9') => b - b'0',
                Some(b @ b'a'..=b'f') => b - b'a' + 10,
                Some(b @ b'A'..=b'F') => b - b'A' + 10,
                _ => return Err(self.invalid("invalid \\u escape")),
            };
            unit = unit << 4 | u16::from(digit);
            self.pos += 1;
        }
        Ok(unit)
    }

    fn digits(&mut self) -> usize {
        let start = self.pos;
        while let Some(b'0'..=b'9') = self.peek() {
            self.pos += 1;
        }
        self.pos - start
    }

    fn number(&mut self) -> Result<Token<'a>, Invalid> {
        let start = self.pos;
        let negative = self.peek() == Some(b'-');
        if negative {
            self.pos += 1;
        }
        match self.peek() {
            Some(b'0') => {
                self.pos += 1;
                if let Some(b'0'..=b'9') = self.peek() {
                    return Err(self.invalid("leading zero"));
                }
            }
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return Err(self.invalid("invalid number")),
        }
        let int_end = self.pos;
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if self.digits() == 0 {
                return Err(self.invalid("invalid number"));
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.pos += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.pos += 1;
            }
            if self.digits() == 0 {
                return Err(self.invalid("invalid number"));
            }
        }
        let text = &self.text[start..self.pos];
        if self.pos == int_end {
            let magnitude = &self.text[start + usize::from(negative)..int_end];
            if let Some(n) = integer(magnitude, negative) {
                return Ok(Token::Int(n));
            }
        }
        // serde_json refuses a number its f64 arithmetic takes past the largest f64. That
        // arithmetic is not exactly rounded (the `float_roundtrip` feature is off), so near the
        // limit it disagrees with `str::parse` both ways: serde_json itself decides (a rare
        // path: the tokens' numbers are integers).
        match serde_json::from_str::<f64>(text) {
            Ok(_) => Ok(Token::Number(text)),
            Err(_) => Err(Invalid {
                what: "number out of range",
                at: start,
            }),
        }
    }
}

/// The `i64` of an integer's digits, as serde_json reads it: `-0` and anything beyond `i64`
/// are not integers.
fn integer(digits: &str, negative: bool) -> Option<i64> {
    let magnitude: u64 = digits.parse().ok()?;
    match negative {
        false => i64::try_from(magnitude).ok(),
        true if magnitude == 0 => None,
        true => 0i64.checked_sub_unsigned(magnitude),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{Map, Value};

    /// The reader's reading of `json` as a serde_json `Value`, to compare with serde_json's.
    fn read_value(json: &[u8]) -> Result<Value, Invalid> {
        fn value(r: &mut Reader<'_>) -> Result<Value, Invalid> {
            let token = r.value()?;
            let mut first = true;
            Ok(match token {
                Token::Null => Value::Null,
                Token::Bool(b) => Value::Bool(b),
                Token::Int(n) => Value::from(n),
                Token::Number(text) => serde_json::from_str(text).expect("serde reads it"),
                Token::Str(s) => Value::String(s.into_owned()),
                Token::Array => {
                    let mut items = Vec::new();
                    while r.next_element(&mut first)? {
                        items.push(value(r)?);
                    }
                    Value::Array(items)
                }
                Token::Object => {
                    let mut map = Map::new();
                    while let Some(name) = r.next_member(&mut first)? {
                        let v = value(r)?;
                        map.insert(name.into_owned(), v);
                    }
                    Value::Object(map)
                }
            })
        }
        Reader::whole(json, value)
    }

    fn skipped(json: &[u8]) -> Result<(), Invalid> {
        Reader::whole(json, Reader::skip_value)
    }

    /// The reader and serde_json agree on whether `json` is JSON and, if it is, on its value;
    /// skipping it agrees too.
    fn agrees(json: &[u8]) -> Result<(), TestCaseError> {
        let ours = read_value(json);
        let serde = serde_json::from_slice::<Value>(json);
        match (&ours, &serde) {
            (Ok(a), Ok(b)) => prop_assert_eq!(a, b, "{}", String::from_utf8_lossy(json)),
            (Err(_), Err(_)) => {}
            _ => prop_assert!(
                false,
                "reader {:?}, serde_json {:?}: {:?}",
                ours,
                serde.map_err(|e| e.to_string()),
                String::from_utf8_lossy(json)
            ),
        }
        prop_assert_eq!(skipped(json).is_ok(), ours.is_ok());
        Ok(())
    }

    fn agrees_on(json: &str) {
        if let Err(e) = agrees(json.as_bytes()) {
            panic!("{e}");
        }
    }

    #[test]
    fn numbers_read_as_serde_json_reads_them() {
        let cases = [
            ("0", Some(0)),
            ("-0", None),
            ("7", Some(7)),
            ("-7", Some(-7)),
            ("9223372036854775807", Some(i64::MAX)),
            ("9223372036854775808", None),
            ("-9223372036854775808", Some(i64::MIN)),
            ("-9223372036854775809", None),
            ("18446744073709551616", None),
            ("1.0", None),
            ("1e2", None),
            ("1E+2", None),
            ("-1.5e-3", None),
        ];
        for (text, int) in cases {
            let token = Reader::whole(text.as_bytes(), Reader::value).expect(text);
            match int {
                Some(n) => assert_eq!(token, Token::Int(n), "{text}"),
                None => assert_eq!(token, Token::Number(text), "{text}"),
            }
            agrees_on(text);
        }
        for bad in [
            "01", "-01", "00", "-", "1.", "1.e3", ".5", "1e", "1e+", "+1", "1e309", "-1e309",
            "0x10", "1_000", "Infinity", "NaN",
        ] {
            assert!(
                Reader::whole(bad.as_bytes(), Reader::value).is_err(),
                "{bad}"
            );
            agrees_on(bad);
        }
        for fine in ["1e-400", "0e99999999999", "123456789012345678901234567890"] {
            agrees_on(fine);
        }
        // Where serde_json's f64 arithmetic and exact rounding part ways, around f64::MAX
        // (found by review: the first two round to f64::MAX but serde_json refuses them, the
        // third rounds to infinity but serde_json accepts it).
        let max_digits = format!("{:.0}", f64::MAX);
        for edge in [
            "1.7976931348623158e308",
            "17976931348623158e292",
            "1.79769313486231590e308",
            "1.7976931348623157e308",
            "-1.7976931348623158e308",
            &max_digits,
        ] {
            agrees_on(edge);
        }
    }

    #[test]
    fn strings_escapes_and_surrogates() {
        let token = Reader::whole(br#""plain""#, Reader::value).expect("plain");
        assert!(matches!(token, Token::Str(Cow::Borrowed("plain"))));
        let token = Reader::whole(br#""a\u00e9\n\/\ud83d\ude00""#, Reader::value).expect("esc");
        assert_eq!(token, Token::Str(Cow::Owned("a\u{e9}\n/\u{1F600}".into())));
        for bad in [
            r#""\ud83d""#,
            r#""\ud83dx""#,
            r#""\ud83d\u0041""#,
            r#""\ude00""#,
            r#""\x""#,
            r#""\u12""#,
            r#""\u12g4""#,
            "\"tab\there\"",
            "\"unterminated",
            "\"\\",
        ] {
            assert!(
                Reader::whole(bad.as_bytes(), Reader::value).is_err(),
                "{bad}"
            );
            agrees_on(bad);
        }
        assert_eq!(
            Reader::new(b"\"\xff\"").err().map(|e| e.what),
            Some("not UTF-8")
        );
        assert!(serde_json::from_slice::<Value>(b"\"\xff\"").is_err());
    }

    #[test]
    fn structure_and_trailing_text() {
        for good in [
            "[]",
            "{}",
            " [ 1 , [ ] , { } ] ",
            r#"{"a":1,"a":2}"#,
            "\t\r\nnull\n",
        ] {
            agrees_on(good);
            assert!(read_value(good.as_bytes()).is_ok(), "{good}");
        }
        for bad in [
            "[1,]",
            "[,1]",
            "[1 2]",
            r#"{"a":1,}"#,
            r#"{,"a":1}"#,
            r#"{"a" 1}"#,
            r#"{a:1}"#,
            r#"{"a":1 "b":2}"#,
            "[",
            "{",
            "]",
            "",
            " ",
            "nul",
            "nulll",
            "true false",
            "[]x",
            r#"{"a":}"#,
            "[1]]",
            "\u{feff}[]",
        ] {
            assert!(read_value(bad.as_bytes()).is_err(), "{bad:?}");
            agrees_on(bad);
        }
    }

    #[test]
    fn nesting_stops_where_serde_json_stops() {
        for depth in [126, 127, 128, 129, 200] {
            for (open, close) in [("[", "]"), (r#"{"a":"#, "}")] {
                let text = format!("{}1{}", open.repeat(depth), close.repeat(depth));
                agrees_on(&text);
                assert_eq!(read_value(text.as_bytes()).is_ok(), depth < 128, "{depth}");
            }
        }
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            any::<String>().prop_map(Value::String),
            "[a-z\"\\\\/\u{1}-\u{1f}\u{e9}\u{1F600}]{0,8}".prop_map(Value::String),
        ];
        leaf.prop_recursive(5, 64, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec(("[a-z\"\\\\]{0,4}", inner), 0..6)
                    .prop_map(|members| Value::Object(members.into_iter().collect())),
            ]
        })
    }

    /// Edits that keep a text close to JSON: bytes that matter to the grammar.
    const EDIT_BYTES: &[u8] = b"{}[],:\"\\ -+.0123456789eEnulltrfasx/u\x01\t\xc3\xa9";

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn agrees_with_serde_json_on_generated_json(value in arb_json(), pretty in any::<bool>()) {
            let text = if pretty {
                serde_json::to_vec_pretty(&value)
            } else {
                serde_json::to_vec(&value)
            }.expect("serialise");
            prop_assert_eq!(read_value(&text).expect("reads"), serde_json::from_slice::<Value>(&text).expect("serde"));
            agrees(&text)?;
        }

        #[test]
        fn agrees_with_serde_json_on_mutated_json(
            value in arb_json(),
            edits in prop::collection::vec((any::<prop::sample::Index>(), 0u8..3, prop::sample::select(EDIT_BYTES)), 1..4),
        ) {
            let mut text = serde_json::to_vec(&value).expect("serialise");
            for (at, kind, byte) in edits {
                let i = at.index(text.len() + 1);
                match kind {
                    0 => text.insert(i, byte),
                    1 if i < text.len() => { text.remove(i); }
                    _ if i < text.len() => text[i] = byte,
                    _ => text.push(byte),
                }
            }
            agrees(&text)?;
        }

        #[test]
        fn agrees_with_serde_json_on_number_like_text(
            text in "-?[0-9]{0,22}(\\.[0-9]{0,4})?([eE][+-]?[0-9]{0,4})?",
        ) {
            agrees(text.as_bytes())?;
            agrees(format!("[{text}]").as_bytes())?;
        }

        #[test]
        fn agrees_with_serde_json_on_escape_like_text(
            body in "(\\\\[\"\\\\/bfnrtux]|\\\\u[0-9a-fA-F]{0,4}|\\\\u[dD][89abAB][0-9a-f]{2}|\\\\u[dD][c-fC-F][0-9a-f]{2}|[a-z]|\u{e9}|\u{1})*",
        ) {
            agrees(format!("\"{body}\"").as_bytes())?;
            agrees(format!("{{\"{body}\":1}}").as_bytes())?;
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_agree(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            agrees(&bytes)?;
        }
    }
}
