//! The LDIF directory backend: SDS-schema entries from an LDIF file (RFC 2849 content records),
//! indexed in memory and swapped atomically on reload.
//! Owns the LDIF parser, the model builder (`nhsAs` -> [`AccreditedSystem`], `nhsMhs` ->
//! [`MhsRecord`], judged per party key and ODS code into [`PartyHandlers`]) and
//! [`LdifBackend`]. It never does I/O on a lookup: only [`LdifBackend::from_path`] and
//! [`LdifBackend::reload`] read the file.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use base64::Engine as _;
use futures_util::future::{self, BoxFuture};

use super::{
    mhs_fqdn, trim_value, AccreditedSystem, DirectoryBackend, DirectoryError, Effect, JoinKey,
    MhsRecord, Party, PartyHandlers, Requestable, Unusable,
};

/// The development world (`config/directory.ldif`), compiled in as the default directory.
pub const DEVELOPMENT_WORLD: &str = include_str!("../../config/directory.ldif");

/// The largest LDIF file or text the backend will load (64 MiB).
pub const MAX_LDIF_BYTES: u64 = 64 * 1024 * 1024;

// ------------------------------------------------------------------------------------------------
// Parser
// ------------------------------------------------------------------------------------------------

/// An LDIF syntax error, with the (1-based) line it was found on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct LdifError {
    pub line: usize,
    pub reason: String,
}

impl LdifError {
    fn new(line: usize, reason: impl Into<String>) -> Self {
        Self {
            line,
            reason: reason.into(),
        }
    }
}

/// One LDIF content record (an entry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The DN, as written (base64 decoded).
    pub dn: String,
    /// Line of the `dn:` line.
    pub line: usize,
    /// Attribute values in file order.
    pub attributes: Vec<AttributeValue>,
}

/// One `attr: value` line of a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttributeValue {
    /// The attribute name, ASCII-lowercased (LDAP attribute names are case-insensitive); an
    /// attribute of the SDS schema (or `objectClass`, `uniqueIdentifier`, `ou`, `o`) written by
    /// its numeric OID or another name is given its schema name, as slapd reads it (so
    /// `1.2.826.0.1285.0.2.1.84:` is `nhsmhsendpoint`). Other OIDs stay as written.
    pub name: String,
    /// The value, base64-decoded when it was written `attr:: ...`.
    pub value: String,
    /// Line the value starts on.
    pub line: usize,
}

impl Record {
    /// The values of the attribute `name` (give it lowercase).
    pub fn values<'r>(&'r self, name: &'r str) -> impl Iterator<Item = &'r AttributeValue> + 'r {
        self.attributes.iter().filter(move |a| a.name == name)
    }
}

/// Parse LDIF bytes: they must be UTF-8 (the error names the line of the first bad byte).
pub fn parse_records_bytes(bytes: &[u8]) -> Result<Vec<Record>, LdifError> {
    match std::str::from_utf8(bytes) {
        Ok(text) => parse_records(text),
        Err(e) => {
            let line = line_of_offset(bytes, e.valid_up_to());
            Err(LdifError::new(line, "not valid UTF-8"))
        }
    }
}

/// Parse LDIF text (RFC 2849 content records) into records.
///
/// Supported: an optional leading `version: 1`, `#` comments, folded lines (a line starting
/// with one space continues the previous one), `attr: value`, `attr:: base64` (must decode to
/// UTF-8), case-insensitive attribute names, numeric OIDs for attribute names (those of the
/// SDS schema and the standard attributes it uses read as their names, see
/// [`AttributeValue::name`]), LF or CRLF line ends, records separated by blank lines. Rejected
/// with an error: change records (`changetype:`, `control:`), URL values (`attr:< url`),
/// attribute options (`cn;lang-en`: slapd would store `nhsMHSEndPoint;lang-en` as another
/// endpoint of the record, the gateway refuses the file), and unencoded values that contain NUL or
/// CR, or start with `:` or `<`. An unencoded value that ends in a space keeps it (the model
/// removes it from the values it reads, with a warning).
pub fn parse_records(text: &str) -> Result<Vec<Record>, LdifError> {
    let mut records = Vec::new();
    let mut current: Option<Record> = None;
    let mut first_line_seen = false;

    for item in logical_lines(text) {
        let (number, line) = match item? {
            Logical::Blank => {
                if let Some(record) = current.take() {
                    records.push(finish(record)?);
                }
                continue;
            }
            Logical::Line(number, line) => (number, line),
        };
        let (name, value) = parse_attr_line(&line, number)?;
        let is_first_line = !first_line_seen;
        first_line_seen = true;

        match current.as_mut() {
            None if is_first_line && name == "version" => {
                if value != "1" {
                    return Err(LdifError::new(
                        number,
                        format!("unsupported LDIF version {value:?} (only 1)"),
                    ));
                }
            }
            None if name == "dn" => {
                if value.is_empty() {
                    return Err(LdifError::new(number, "empty dn"));
                }
                current = Some(Record {
                    dn: value,
                    line: number,
                    attributes: Vec::new(),
                });
            }
            None => {
                return Err(LdifError::new(
                    number,
                    format!("a record must start with 'dn:', found '{name}:'"),
                ))
            }
            Some(_) if name == "dn" => {
                return Err(LdifError::new(
                    number,
                    "'dn:' inside a record: separate records with a blank line",
                ))
            }
            Some(_) if name == "changetype" || name == "control" => {
                return Err(LdifError::new(
                    number,
                    format!("change records ('{name}:') are not supported, only content records"),
                ))
            }
            Some(record) => record.attributes.push(AttributeValue {
                name,
                value,
                line: number,
            }),
        }
    }
    if let Some(record) = current {
        records.push(finish(record)?);
    }
    Ok(records)
}

/// A complete record must have at least one attribute (RFC 2849 `ldif-attrval-record`).
fn finish(record: Record) -> Result<Record, LdifError> {
    if record.attributes.is_empty() {
        return Err(LdifError::new(
            record.line,
            format!("entry {} has no attributes", record.dn),
        ));
    }
    Ok(record)
}

/// A logical line (folded lines joined, comments dropped) or a record separator.
enum Logical<'a> {
    /// First physical line number, text.
    Line(usize, Cow<'a, str>),
    Blank,
}

/// Split `text` into logical lines: unfold continuations, drop comments, mark blank lines.
fn logical_lines(text: &str) -> impl Iterator<Item = Result<Logical<'_>, LdifError>> + '_ {
    let mut physical = text
        .split('\n')
        .enumerate()
        .map(|(i, l)| (i + 1, l.strip_suffix('\r').unwrap_or(l)))
        .peekable();

    std::iter::from_fn(move || loop {
        let (number, line) = physical.next()?;
        if line.is_empty() {
            return Some(Ok(Logical::Blank));
        }
        if line.starts_with(' ') {
            // Continuations of a line are consumed with it below, so this one follows a blank
            // line or starts the file.
            return Some(Err(LdifError::new(
                number,
                "continuation line (starting with a space) with no line to continue",
            )));
        }
        let mut joined = Cow::Borrowed(line);
        while let Some((_, next)) = physical.next_if(|(_, l)| l.starts_with(' ')) {
            joined.to_mut().push_str(&next[1..]);
        }
        // Comments (and their continuations) are dropped.
        if !joined.starts_with('#') {
            return Some(Ok(Logical::Line(number, joined)));
        }
    })
}

/// Parse `attr: value`, `attr:: base64` into (lowercase name, value).
fn parse_attr_line(line: &str, number: usize) -> Result<(String, String), LdifError> {
    let Some((name, rest)) = line.split_once(':') else {
        return Err(LdifError::new(number, "expected 'attribute: value'"));
    };
    check_attr_name(name, number)?;
    let name = attribute_key(name);

    if let Some(encoded) = rest.strip_prefix(':') {
        let encoded = encoded.trim_matches(' ');
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|e| LdifError::new(number, format!("{name}: invalid base64: {e}")))?;
        let value = String::from_utf8(bytes).map_err(|_| {
            LdifError::new(number, format!("{name}: base64 value is not valid UTF-8"))
        })?;
        return Ok((name, value));
    }
    if rest.starts_with('<') {
        return Err(LdifError::new(
            number,
            format!("{name}: URL values ('{name}:< url') are not supported"),
        ));
    }
    let value = rest.trim_start_matches(' ');
    if value.starts_with(':') || value.starts_with('<') {
        return Err(LdifError::new(
            number,
            format!(
                "{name}: a value starting with ':' or '<' must be base64-encoded ('{name}:: ...')"
            ),
        ));
    }
    if value.contains(['\0', '\r']) {
        return Err(LdifError::new(
            number,
            format!("{name}: value contains NUL or CR; base64-encode it"),
        ));
    }
    // A value ending in a space is kept as written (RFC 2849 only advises base64 for it): the
    // model removes leading and trailing white space from the values it reads, with a warning.
    Ok((name, value.to_owned()))
}

/// Attribute names: a keystring (`ALPHA *(ALPHA / DIGIT / "-")`) or a numeric OID. Options
/// (`;lang-en`, `;binary`) are rejected: the SDS schema uses none, and slapd would read an
/// attribute with options as one more value of the attribute (a second endpoint, a second
/// interaction), which the model would have to merge; refusing the file is the clear answer.
fn check_attr_name(name: &str, number: usize) -> Result<(), LdifError> {
    if let Some((base, _)) = name.split_once(';') {
        return Err(LdifError::new(
            number,
            format!("{base}: attribute options ('{name}') are not supported"),
        ));
    }
    let bytes = name.as_bytes();
    let keystring = bytes.first().is_some_and(u8::is_ascii_alphabetic)
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-');
    let numeric_oid = !name.is_empty()
        && name
            .split('.')
            .all(|arc| !arc.is_empty() && arc.bytes().all(|b| b.is_ascii_digit()));
    if keystring || numeric_oid {
        Ok(())
    } else if name.is_empty() {
        Err(LdifError::new(number, "missing attribute name before ':'"))
    } else {
        Err(LdifError::new(
            number,
            format!("invalid attribute name {name:?}"),
        ))
    }
}

/// 1-based line number of byte `offset`.
fn line_of_offset(bytes: &[u8], offset: usize) -> usize {
    let end = offset.min(bytes.len());
    bytes[..end].iter().filter(|b| **b == b'\n').count() + 1
}

// ------------------------------------------------------------------------------------------------
// Schema
// ------------------------------------------------------------------------------------------------

/// How slapd compares an attribute's values: its EQUALITY rule, once insignificant spaces are
/// removed (leading and trailing, and runs of inner spaces taken as one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Equality {
    /// `caseExactMatch`.
    Exact,
    /// `caseIgnoreMatch` (and `objectIdentifierMatch`, whose values are ASCII names or OIDs).
    IgnoreCase,
    /// No EQUALITY rule: no value ever matches (slapd refuses such an attribute in a DN).
    None,
}

/// The attribute types the backend knows by OID and by every name: those of
/// `config/sds.schema` (every `nhs*` attribute), and the standard ones an SDS file names
/// (`objectClass`, `uniqueIdentifier`, and `ou` and `o` of the search base). Each is (numeric
/// OID, names with the schema's spelling first, equality). An attribute written by OID or by
/// another name is read as its first name, as slapd reads it.
const ATTRIBUTE_TYPES: &[(&str, &[&str], Equality)] = &[
    ("2.5.4.0", &["objectClass"], Equality::IgnoreCase),
    (
        "0.9.2342.19200300.100.1.44",
        &["uniqueIdentifier"],
        Equality::IgnoreCase,
    ),
    ("2.5.4.10", &["o", "organizationName"], Equality::IgnoreCase),
    (
        "2.5.4.11",
        &["ou", "organizationalUnitName"],
        Equality::IgnoreCase,
    ),
    (
        "1.2.826.0.1285.0.2.1.216",
        &["nhsApproverURP"],
        Equality::None,
    ),
    ("1.2.826.0.1285.0.2.1.121", &["nhsAsACF"], Equality::Exact),
    (
        "1.2.826.0.1285.0.2.1.176",
        &["nhsAsCategoryBag"],
        Equality::IgnoreCase,
    ),
    (
        "1.2.826.0.1285.0.2.1.175",
        &["nhsAsClient"],
        Equality::IgnoreCase,
    ),
    ("1.2.826.0.1285.0.2.1.122", &["nhsAsSvcIA"], Equality::Exact),
    (
        "1.2.826.0.1285.0.2.1.223",
        &["nhsContractPropertyTemplateKey"],
        Equality::None,
    ),
    (
        "1.2.826.0.1285.0.2.1.217",
        &["nhsDateApproved"],
        Equality::None,
    ),
    (
        "1.2.826.0.1285.0.2.1.219",
        &["nhsDateDNSApproved"],
        Equality::None,
    ),
    (
        "1.2.826.0.1285.0.2.1.215",
        &["nhsDateRequested"],
        Equality::None,
    ),
    (
        "1.2.826.0.1285.0.2.1.218",
        &["nhsDNSApprover"],
        Equality::None,
    ),
    (
        "1.2.826.0.1285.0.2.1.222",
        &["nhsEPInteractionType"],
        Equality::None,
    ),
    ("1.2.826.0.1285.0.1.10", &["nhsIDCode"], Equality::Exact),
    (
        "1.2.826.0.1285.0.2.1.91",
        &["nhsMHSAckRequested"],
        Equality::None,
    ),
    ("1.2.826.0.1285.0.2.1.93", &["nhsMHSActor"], Equality::Exact),
    (
        "1.2.826.0.1285.0.2.1.124",
        &["nhsMhsCPAId"],
        Equality::Exact,
    ),
    (
        "1.2.826.0.1285.0.2.1.92",
        &["nhsMHSDuplicateElimination"],
        Equality::None,
    ),
    (
        "1.2.826.0.1285.0.2.1.84",
        &["nhsMHSEndPoint"],
        Equality::Exact,
    ),
    ("1.2.826.0.1285.0.2.1.224", &["nhsMhsFQDN"], Equality::None),
    ("1.2.826.0.1285.0.2.1.127", &["nhsMHsIN"], Equality::None),
    (
        "1.2.826.0.1285.0.2.1.225",
        &["nhsMhsIPAddress"],
        Equality::None,
    ),
    (
        "1.2.826.0.1285.0.2.1.86",
        &["nhsMHSIsAuthenticated"],
        Equality::None,
    ),
    (
        "1.2.826.0.1285.0.2.1.299",
        &["nhsMhsManufacturerOrg"],
        Equality::IgnoreCase,
    ),
    (
        "1.2.826.0.1285.0.2.1.226",
        &["nhsMhsNetwork"],
        Equality::None,
    ),
    (
        "1.2.826.0.1285.0.2.1.82",
        &["nhsMHSPartyKey"],
        Equality::IgnoreCase,
    ),
    (
        "1.2.826.0.1285.0.2.1.87",
        &["nhsMHSPersistDuration"],
        Equality::None,
    ),
    (
        "1.2.826.0.1285.0.2.1.88",
        &["nhsMHSRetries"],
        Equality::None,
    ),
    (
        "1.2.826.0.1285.0.2.1.89",
        &["nhsMHSRetryInterval"],
        Equality::None,
    ),
    (
        "1.2.826.0.1285.0.2.1.85",
        &["nhsMHSServiceDescription"],
        Equality::None,
    ),
    (
        "1.2.826.0.1285.0.2.1.227",
        &["nhsMhsSinCode"],
        Equality::None,
    ),
    ("1.2.826.0.1285.0.2.1.126", &["nhsMHsSN"], Equality::None),
    (
        "1.2.826.0.1285.0.2.1.123",
        &["nhsMhsSvcIA"],
        Equality::Exact,
    ),
    (
        "1.2.826.0.1285.0.2.1.90",
        &["nhsMHSSyncReplyMode"],
        Equality::None,
    ),
    (
        "1.2.826.0.1285.0.2.1.220",
        &["nhsProductKey"],
        Equality::None,
    ),
    (
        "1.2.826.0.1285.0.2.1.157",
        &["nhsProductName"],
        Equality::IgnoreCase,
    ),
    (
        "1.2.826.0.1285.0.2.1.158",
        &["nhsProductVersion"],
        Equality::IgnoreCase,
    ),
    (
        "1.2.826.0.1285.0.2.1.214",
        &["nhsRequestorURP"],
        Equality::None,
    ),
];

/// The known attribute type `name` (a name in any case, or a numeric OID) is.
fn attribute_type(
    name: &str,
) -> Option<&'static (&'static str, &'static [&'static str], Equality)> {
    if name.starts_with(|c: char| c.is_ascii_digit()) {
        ATTRIBUTE_TYPES.iter().find(|(oid, _, _)| *oid == name)
    } else {
        ATTRIBUTE_TYPES
            .iter()
            .find(|(_, names, _)| names.iter().any(|n| n.eq_ignore_ascii_case(name)))
    }
}

/// The name the model reads attribute `name` by, lowercase: a known attribute's first name
/// (whether written by OID or by another name), otherwise `name` lowercased.
fn attribute_key(name: &str) -> String {
    // Only OIDs and the two long names are rewritten (every other known attribute has one
    // name), so most lines skip the table.
    let rewritten = name.starts_with(|c: char| c.is_ascii_digit())
        || name.eq_ignore_ascii_case("organizationName")
        || name.eq_ignore_ascii_case("organizationalUnitName");
    match rewritten.then(|| attribute_type(name)).flatten() {
        Some((_, names, _)) => names[0].to_ascii_lowercase(),
        None => name.to_ascii_lowercase(),
    }
}

/// The object classes slapd knows when loaded with the schemas the file is for (its built-in
/// classes, `core.schema`, `cosine.schema`, `config/sds.schema`), each (numeric OID, names):
/// slapd refuses an entry with any other `objectClass` value, matching names ignoring ASCII case
/// (`NHSAS` is `nhsAs`) and OIDs exactly, but not white space (`nhsAs ` is unknown). Left out:
/// classes slapd knows but refuses in an `o=nhs` entry (`OpenLDAProotDSE`).
pub const OBJECT_CLASSES: &[(&str, &[&str])] = &[
    // config/sds.schema
    ("1.2.826.0.1285.0.2.0.107", &["nhsAs"]),
    ("1.2.826.0.1285.0.2.0.108", &["nhsMhs"]),
    // slapd's own
    ("2.5.6.0", &["top"]),
    ("1.3.6.1.4.1.1466.101.120.111", &["extensibleObject"]),
    ("2.5.6.1", &["alias"]),
    ("2.16.840.1.113730.3.2.6", &["referral"]),
    ("2.5.17.0", &["subentry"]),
    ("2.5.20.1", &["subschema"]),
    ("1.3.6.1.4.1.1466.101.119.2", &["dynamicObject"]),
    ("1.3.6.1.4.1.4203.666.3.4", &["glue"]),
    ("1.3.6.1.4.1.4203.666.3.5", &["syncConsumerSubentry"]),
    ("1.3.6.1.4.1.4203.666.3.6", &["syncProviderSubentry"]),
    // core.schema
    ("2.5.6.2", &["country"]),
    ("2.5.6.3", &["locality"]),
    ("2.5.6.4", &["organization"]),
    ("2.5.6.5", &["organizationalUnit"]),
    ("2.5.6.6", &["person"]),
    ("2.5.6.7", &["organizationalPerson"]),
    ("2.5.6.8", &["organizationalRole"]),
    ("2.5.6.9", &["groupOfNames"]),
    ("2.5.6.10", &["residentialPerson"]),
    ("2.5.6.11", &["applicationProcess"]),
    ("2.5.6.12", &["applicationEntity"]),
    ("2.5.6.13", &["dSA"]),
    ("2.5.6.14", &["device"]),
    ("2.5.6.15", &["strongAuthenticationUser"]),
    ("2.5.6.16", &["certificationAuthority"]),
    ("2.5.6.16.2", &["certificationAuthority-V2"]),
    ("2.5.6.17", &["groupOfUniqueNames"]),
    ("2.5.6.18", &["userSecurityInformation"]),
    ("2.5.6.19", &["cRLDistributionPoint"]),
    ("2.5.6.20", &["dmd"]),
    ("2.5.6.21", &["pkiUser"]),
    ("2.5.6.22", &["pkiCA"]),
    ("2.5.6.23", &["deltaCRL"]),
    ("1.3.6.1.4.1.250.3.15", &["labeledURIObject"]),
    ("0.9.2342.19200300.100.4.19", &["simpleSecurityObject"]),
    ("1.3.6.1.4.1.1466.344", &["dcObject"]),
    ("1.3.6.1.1.3.1", &["uidObject"]),
    // cosine.schema
    (
        "0.9.2342.19200300.100.4.4",
        &["pilotPerson", "newPilotPerson"],
    ),
    ("0.9.2342.19200300.100.4.5", &["account"]),
    ("0.9.2342.19200300.100.4.6", &["document"]),
    ("0.9.2342.19200300.100.4.7", &["room"]),
    ("0.9.2342.19200300.100.4.9", &["documentSeries"]),
    ("0.9.2342.19200300.100.4.13", &["domain"]),
    ("0.9.2342.19200300.100.4.14", &["RFC822localPart"]),
    ("0.9.2342.19200300.100.4.15", &["dNSDomain"]),
    ("0.9.2342.19200300.100.4.17", &["domainRelatedObject"]),
    ("0.9.2342.19200300.100.4.18", &["friendlyCountry"]),
    ("0.9.2342.19200300.100.4.20", &["pilotOrganization"]),
    ("0.9.2342.19200300.100.4.21", &["pilotDSA"]),
    ("0.9.2342.19200300.100.4.22", &["qualityLabelledData"]),
];

/// The object class `value` (an `objectClass` value as stored) names, by its first name; `None`
/// when slapd would not know it ([`OBJECT_CLASSES`]).
fn object_class(value: &str) -> Option<&'static str> {
    OBJECT_CLASSES
        .iter()
        .find(|(oid, names)| *oid == value || names.iter().any(|n| n.eq_ignore_ascii_case(value)))
        .map(|(_, names)| names[0])
}

/// One attribute-value assertion of an RDN: the attribute as the model reads it
/// ([`attribute_key`]) and the value, escapes decoded.
type Ava = (String, String);

/// The RDNs of `dn`, the entry's own first, each a list of assertions (more than one when
/// joined by `+`). RFC 4514, with the leniencies slapd accepts: spaces around `,` `+` `=`, `;`
/// between RDNs, `"quoted"` values. A `#` (BER hex) value is not supported.
fn parse_dn(dn: &str) -> Result<Vec<Vec<Ava>>, String> {
    let mut rdns = Vec::new();
    let mut rdn = Vec::new();
    let mut rest = dn;
    loop {
        let (name, after) = rest
            .split_once('=')
            .ok_or_else(|| format!("{:?} has no '='", rest.trim()))?;
        let name = name.trim_matches(' ');
        check_attr_name(name, 0).map_err(|e| e.reason)?;
        let (value, after) = dn_value(after.trim_start_matches(' '))?;
        rdn.push((attribute_key(name), value));
        let mut chars = after.chars();
        match chars.next() {
            None => {
                rdns.push(rdn);
                return Ok(rdns);
            }
            Some('+') => {}
            Some(',' | ';') => rdns.push(std::mem::take(&mut rdn)),
            Some(other) => return Err(format!("unexpected {other:?} after a value")),
        }
        rest = chars.as_str();
    }
}

/// One DN value from the start of `text` (leading spaces skipped), escapes decoded and
/// unescaped trailing spaces dropped, and the text after it (from its separator, if any).
fn dn_value(text: &str) -> Result<(String, &str), String> {
    if text.starts_with('#') {
        return Err("a '#' (BER hex) value is not supported: write the value as a string".into());
    }
    let quoted = text.starts_with('"');
    let mut bytes = Vec::new();
    // Length of `bytes` up to its last escaped or non-space byte.
    let mut kept = 0;
    let mut iter = text.char_indices().skip(usize::from(quoted));
    let mut end = text.len();
    let mut closed = !quoted;
    while let Some((at, c)) = iter.next() {
        match c {
            '\\' => {
                let (_, first) = iter.next().ok_or("a DN ends with '\\'")?;
                if let Some(high) = first.to_digit(16) {
                    let low = iter
                        .next()
                        .and_then(|(_, c)| c.to_digit(16))
                        .ok_or("'\\' and one hex digit: escape a byte with two")?;
                    // Two hex digits are one byte: at most 255.
                    bytes.push((high * 16 + low) as u8);
                } else if " \"#+,;<=>\\".contains(first) {
                    bytes.push(first as u8);
                } else {
                    return Err(format!("'\\{first}' is not an escape"));
                }
                kept = bytes.len();
            }
            '"' if quoted => {
                end = at + 1;
                closed = true;
                break;
            }
            ',' | ';' | '+' if !quoted => {
                end = at;
                break;
            }
            '"' | '\0' => return Err(format!("unescaped {c:?} in a value")),
            c => {
                let mut buf = [0; 4];
                bytes.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                if c != ' ' || quoted {
                    kept = bytes.len();
                }
            }
        }
    }
    if !closed {
        return Err("a quoted value is not closed".into());
    }
    bytes.truncate(kept);
    let value = String::from_utf8(bytes).map_err(|_| "an escaped value is not UTF-8".to_owned())?;
    let after = text[end..].trim_start_matches(' ');
    Ok((value, after))
}

/// `value` as `equality` compares it: insignificant spaces removed (leading, trailing, runs of
/// inner ones taken as one), case folded for [`Equality::IgnoreCase`].
fn normalized(value: &str, equality: Equality) -> String {
    let spaced = value
        .split(super::is_insignificant_space)
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    match equality {
        Equality::IgnoreCase => spaced.to_lowercase(),
        Equality::Exact | Equality::None => spaced,
    }
}

/// Whether two RDNs are the same (the same assertions in any order, values compared by each
/// attribute's equality, unknown attributes ignoring case).
fn same_rdn(a: &[Ava], b: &[Ava]) -> bool {
    let key = |rdn: &[Ava]| {
        let mut avas: Vec<(String, String)> = rdn
            .iter()
            .map(|(name, value)| {
                let equality = attribute_type(name).map_or(Equality::IgnoreCase, |t| t.2);
                (name.clone(), normalized(value, equality))
            })
            .collect();
        avas.sort();
        avas
    };
    key(a) == key(b)
}

// ------------------------------------------------------------------------------------------------
// Model builder
// ------------------------------------------------------------------------------------------------

/// An attribute the model reads: its lowercase form (to match) and its schema spelling (to report).
#[derive(Clone, Copy)]
struct Attr {
    lower: &'static str,
    name: &'static str,
}

const OBJECT_CLASS: Attr = Attr {
    lower: "objectclass",
    name: "objectClass",
};
const UNIQUE_IDENTIFIER: Attr = Attr {
    lower: "uniqueidentifier",
    name: "uniqueIdentifier",
};
const ID_CODE: Attr = Attr {
    lower: "nhsidcode",
    name: "nhsIDCode",
};
const PARTY_KEY: Attr = Attr {
    lower: "nhsmhspartykey",
    name: "nhsMHSPartyKey",
};
const AS_SVC_IA: Attr = Attr {
    lower: "nhsassvcia",
    name: "nhsAsSvcIA",
};
const PRODUCT_NAME: Attr = Attr {
    lower: "nhsproductname",
    name: "nhsProductName",
};
const PRODUCT_VERSION: Attr = Attr {
    lower: "nhsproductversion",
    name: "nhsProductVersion",
};
const MHS_SVC_IA: Attr = Attr {
    lower: "nhsmhssvcia",
    name: "nhsMhsSvcIA",
};
const MHS_END_POINT: Attr = Attr {
    lower: "nhsmhsendpoint",
    name: "nhsMHSEndPoint",
};
const MHS_FQDN: Attr = Attr {
    lower: "nhsmhsfqdn",
    name: "nhsMhsFQDN",
};
const MHS_CPA_ID: Attr = Attr {
    lower: "nhsmhscpaid",
    name: "nhsMhsCPAId",
};

/// An entry that parses as LDIF but does not make a valid directory model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// A required attribute is absent (`line` is the entry's `dn:` line).
    #[error("line {line}: entry {dn}: missing {attribute}")]
    Missing {
        dn: String,
        line: usize,
        attribute: &'static str,
    },
    /// A single-valued attribute has a second value (`line` is the second one).
    #[error(
        "line {line}: entry {dn}: {attribute} must have exactly one value, found another here"
    )]
    Repeated {
        dn: String,
        line: usize,
        attribute: &'static str,
    },
    /// A value the model cannot use (empty, a non-digit ASID).
    #[error("line {line}: entry {dn}: {attribute}: {reason}")]
    Invalid {
        dn: String,
        line: usize,
        attribute: &'static str,
        reason: &'static str,
    },
    /// An `objectClass` value slapd does not know ([`OBJECT_CLASSES`]): slapd refuses the file.
    #[error(
        "line {line}: entry {dn}: objectClass {value:?} is not an object class of the schema \
         (core, cosine, config/sds.schema; names match ignoring case, not white space): slapd \
         refuses it"
    )]
    UnknownObjectClass {
        dn: String,
        line: usize,
        value: String,
    },
    /// An entry with no `objectClass` (a misspelt attribute name?): slapd refuses the file.
    #[error("line {line}: entry {dn} has no objectClass: slapd refuses it")]
    NoObjectClass { dn: String, line: usize },
    /// The DN of an `nhsAs` or `nhsMhs` entry does not parse, or names it by an attribute
    /// slapd refuses in a DN.
    #[error("line {line}: entry {dn}: DN: {reason}")]
    Dn {
        dn: String,
        line: usize,
        reason: String,
    },
    /// The DN names the entry by a value the entry does not hold (`uniqueIdentifier=1` with
    /// `uniqueIdentifier: 2`): slapadd would add it as another value (two ASIDs), or refuse
    /// the entry for a single-valued attribute.
    #[error(
        "line {line}: entry {dn}: the DN names it {attribute}={value}, which is not one of its \
         {attribute} values: slapd would add that value to the entry, or refuse it"
    )]
    NamingValue {
        dn: String,
        line: usize,
        attribute: String,
        value: String,
    },
    /// An attribute of an `nhsAs` or `nhsMhs` entry holds one value twice (as its equality
    /// rule compares values): slapadd refuses the entry.
    #[error(
        "line {line}: entry {dn}: {attribute} holds {value:?} twice (as its equality rule \
         compares values): slapd refuses the entry"
    )]
    DuplicateValue {
        dn: String,
        line: usize,
        attribute: String,
        value: String,
    },
    /// An `nhsAs` or `nhsMhs` entry outside the search base, where an LDAP search would not
    /// find it.
    #[error(
        "line {line}: entry {dn} is not under {base}, where SDS keeps services and the LDAP \
         backend searches: an LDAP search would not find it (move it under {base})"
    )]
    OutsideBase {
        dn: String,
        line: usize,
        base: &'static str,
    },
    /// One entry claims both structural classes.
    #[error("line {line}: entry {dn} is both nhsAs and nhsMhs")]
    BothClasses { dn: String, line: usize },
    /// Two `nhsAs` entries have the same ASID.
    #[error("line {line}: entry {dn}: ASID {asid} is already registered by the entry at line {first_line}")]
    DuplicateAsid {
        dn: String,
        line: usize,
        asid: String,
        first_line: usize,
    },
}

/// What a loaded directory holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Every LDIF record, including those the model ignores (`o=nhs`, other object classes).
    pub entries: usize,
    /// `nhsAs` records.
    pub systems: usize,
    /// `nhsMhs` records.
    pub handlers: usize,
    /// Warnings about the data ([`LdifBackend::warnings`]).
    pub warnings: usize,
}

/// The lookup tables built from one LDIF file. Immutable once built.
#[derive(Debug, Default)]
struct Index {
    /// ASID (digits) -> AS record.
    systems: HashMap<String, AccreditedSystem>,
    /// The MHS records of each party key and ODS code ([`JoinKey`]), judged.
    handlers: HashMap<JoinKey, PartyHandlers>,
    stats: Stats,
    /// What the data holds that the gateway cannot use, or used only after trimming it, each
    /// starting `line N: `, in line order.
    warnings: Vec<String>,
}

impl Index {
    fn party(&self, asid: &str) -> Option<Party> {
        let system = self.systems.get(asid)?;
        let handlers = self
            .handlers
            .get(&system.join_key())
            .cloned()
            .unwrap_or_default();
        Some(Party::new(system.clone(), handlers))
    }
}

/// Warnings about the data, with the line each is about.
type Warnings = Vec<(usize, String)>;

/// The `nhsMhs` records of one party key and ODS code, with where each is (line, DN).
#[derive(Default)]
struct Group {
    records: Vec<MhsRecord>,
    places: Vec<(usize, String)>,
}

/// Where the records an [`Unusable`] names are in their [`Group`], found in time linear in the
/// group's size: a party may have tens of thousands of message handlers, each unusable (no
/// `nhsMhsFQDN`), and matching each against every record would take minutes to load.
struct Places<'g> {
    records: &'g [MhsRecord],
    /// Each interaction's records (indices into the group), in file order.
    by_interaction: HashMap<&'g str, Vec<usize>>,
    /// The records of each (interaction, MHS id) whose FQDN cannot be read, in file order, not
    /// yet matched to their [`Effect::Fqdn`] entry ([`PartyHandlers::judge`] gives one per
    /// such record, in record order).
    bad_fqdn: HashMap<(&'g str, &'g str), VecDeque<usize>>,
}

impl<'g> Places<'g> {
    fn of(records: &'g [MhsRecord]) -> Self {
        let mut places = Places {
            records,
            by_interaction: HashMap::new(),
            bad_fqdn: HashMap::new(),
        };
        for (i, r) in records.iter().enumerate() {
            places
                .by_interaction
                .entry(r.interaction.as_str())
                .or_default()
                .push(i);
            if r.fqdn.is_err() {
                places
                    .bad_fqdn
                    .entry((r.interaction.as_str(), r.id.as_str()))
                    .or_default()
                    .push_back(i);
            }
        }
        places
    }

    /// The records `unusable` names, in file order: for an FQDN entry the one record it is
    /// about (records sharing an MHS id each have their own entry), otherwise the records of
    /// its interaction with one of its MHS ids.
    fn of_unusable(&mut self, unusable: &'g Unusable) -> Vec<usize> {
        let interaction = unusable.interaction.as_str();
        if let (Effect::Fqdn, [id]) = (unusable.effect, unusable.handlers.as_slice()) {
            if let Some(i) = self
                .bad_fqdn
                .get_mut(&(interaction, id.as_str()))
                .and_then(VecDeque::pop_front)
            {
                return vec![i];
            }
        }
        let ids: HashSet<&str> = unusable.handlers.iter().map(String::as_str).collect();
        let Some(records) = self.by_interaction.get(interaction) else {
            return Vec::new();
        };
        records
            .iter()
            .copied()
            .filter(|&i| ids.contains(self.records[i].id.as_str()))
            .collect()
    }
}

/// Build the index from parsed records. Unusable message handlers (judged with `requestable`,
/// see [`PartyHandlers::judge`]) and values with white space removed are warnings, not errors.
fn build_index(records: &[Record], requestable: &Requestable) -> Result<Index, ModelError> {
    let mut index = Index::default();
    let mut warnings: Warnings = Vec::new();
    let mut asid_lines: HashMap<String, usize> = HashMap::new();
    let mut groups: HashMap<JoinKey, Group> = HashMap::new();
    let base = parse_dn(SEARCH_BASE).expect("SEARCH_BASE is a valid DN (see its unit test)");

    for record in records {
        index.stats.entries += 1;
        let classes = object_classes(record)?;
        let is_class = |class: &str| classes.contains(&class);
        if is_class("nhsAs") || is_class("nhsMhs") {
            check_dn(record, &base)?;
            check_distinct_values(record)?;
        }
        match (is_class("nhsAs"), is_class("nhsMhs")) {
            (true, true) => {
                return Err(ModelError::BothClasses {
                    dn: record.dn.clone(),
                    line: record.line,
                })
            }
            (true, false) => {
                let system = accredited_system(record, &mut warnings)?;
                if let Some(first_line) = asid_lines.insert(system.asid.clone(), record.line) {
                    return Err(ModelError::DuplicateAsid {
                        dn: record.dn.clone(),
                        line: record.line,
                        asid: system.asid,
                        first_line,
                    });
                }
                index.stats.systems += 1;
                index.systems.insert(system.asid.clone(), system);
            }
            (false, true) => {
                let mhs = mhs_record(record, &mut warnings)?;
                index.stats.handlers += 1;
                let group = groups.entry(mhs.join_key()).or_default();
                group.records.push(mhs);
                group.places.push((record.line, record.dn.clone()));
            }
            (false, false) => {}
        }
    }
    for (key, group) in groups {
        let judged = PartyHandlers::judge(&group.records, requestable);
        let mut places = Places::of(&group.records);
        for unusable in &judged.unusable {
            let at: Vec<&(usize, String)> = places
                .of_unusable(unusable)
                .into_iter()
                .map(|i| &group.places[i])
                .collect();
            let text = match at.as_slice() {
                [] => continue,
                [(line, dn)] => format!("line {line}: entry {dn}: {unusable}"),
                many => format!(
                    "lines {}: {unusable}",
                    many.iter()
                        .map(|(line, _)| line.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
            warnings.push((at[0].0, text));
        }
        index.handlers.insert(key, judged);
    }
    warnings.sort_by_key(|(line, _)| *line);
    index.stats.warnings = warnings.len();
    index.warnings = warnings.into_iter().map(|(_, text)| text).collect();
    Ok(index)
}

/// The classes of `record`, each by its first name ([`object_class`]); an error for a value
/// slapd would not know, or none at all, as slapd refuses the file then (an `nhsAs ` or `nhsAS1`
/// taken as no class would silently leave its ASID unregistered).
fn object_classes(record: &Record) -> Result<Vec<&'static str>, ModelError> {
    let classes = record
        .values(OBJECT_CLASS.lower)
        .map(|v| {
            object_class(&v.value).ok_or_else(|| ModelError::UnknownObjectClass {
                dn: record.dn.clone(),
                line: v.line,
                value: v.value.clone(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if classes.is_empty() {
        return Err(ModelError::NoObjectClass {
            dn: record.dn.clone(),
            line: record.line,
        });
    }
    Ok(classes)
}

/// The base the model's entries must be under: the LDAP backend's default search base, SDS's
/// `ou=services,o=nhs`. (The LDIF backend has no setting for it: a file that loads into slapd
/// is searched there.)
const SEARCH_BASE: &str = super::ldap::DEFAULT_SEARCH_BASE;

/// An `nhsAs` or `nhsMhs` entry must be where an LDAP search finds it, under `base`, and hold
/// the value its DN names it by: otherwise slapd's answers would differ from the model's (an
/// entry an LDAP search never returns; an entry with the DN's value added, e.g. a second ASID).
/// DNs match as slapd matches them: attribute names ignoring case (or by OID), values by
/// each attribute's equality rule.
fn check_dn(record: &Record, base: &[Vec<Ava>]) -> Result<(), ModelError> {
    let dn_error = |reason: String| ModelError::Dn {
        dn: record.dn.clone(),
        line: record.line,
        reason,
    };
    let rdns = parse_dn(&record.dn).map_err(dn_error)?;
    let under_base = rdns.len() >= base.len()
        && rdns[rdns.len() - base.len()..]
            .iter()
            .zip(base)
            .all(|(a, b)| same_rdn(a, b));
    if !under_base {
        return Err(ModelError::OutsideBase {
            dn: record.dn.clone(),
            line: record.line,
            base: SEARCH_BASE,
        });
    }
    for (name, value) in &rdns[0] {
        let (attribute, equality) = match attribute_type(name) {
            Some((_, names, equality)) => (names[0], *equality),
            None => (name.as_str(), Equality::IgnoreCase),
        };
        if equality == Equality::None {
            return Err(dn_error(format!(
                "{attribute} has no equality rule: slapd refuses it in a DN"
            )));
        }
        let wanted = normalized(value, equality);
        if !record
            .values(name)
            .any(|v| normalized(&v.value, equality) == wanted)
        {
            return Err(ModelError::NamingValue {
                dn: record.dn.clone(),
                line: record.line,
                attribute: attribute.to_owned(),
                value: value.clone(),
            });
        }
    }
    Ok(())
}

/// No attribute of the entry holds one value twice, as its equality rule compares them
/// (`nhsMHSEndPoint: X` twice, or `X` and `X ` with a trailing space): slapadd refuses such an
/// entry, so an LDAP directory never answers it, and the FHIR API, one Endpoint per value,
/// would answer it as one endpoint where this backend would count two.
fn check_distinct_values(record: &Record) -> Result<(), ModelError> {
    let mut seen: Vec<(&str, String)> = Vec::with_capacity(record.attributes.len());
    for attribute in &record.attributes {
        let Some((_, names, equality)) = attribute_type(&attribute.name) else {
            continue;
        };
        if *equality == Equality::None {
            continue;
        }
        let value = normalized(&attribute.value, *equality);
        if seen
            .iter()
            .any(|(name, v)| *name == attribute.name && *v == value)
        {
            return Err(ModelError::DuplicateValue {
                dn: record.dn.clone(),
                line: attribute.line,
                attribute: names[0].to_owned(),
                value: attribute.value.clone(),
            });
        }
        seen.push((&attribute.name, value));
    }
    Ok(())
}

/// The longest ASID a request can name (`Ssp-From`, `Ssp-To`).
const MAX_ASID_DIGITS: usize = 32;

fn accredited_system(
    record: &Record,
    warnings: &mut Warnings,
) -> Result<AccreditedSystem, ModelError> {
    let asid = required(record, UNIQUE_IDENTIFIER, warnings)?;
    if !asid.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(
            record,
            UNIQUE_IDENTIFIER,
            value_line(record, UNIQUE_IDENTIFIER),
            "an ASID must be ASCII digits",
        ));
    }
    if asid.len() > MAX_ASID_DIGITS {
        // `Ssp-From` and `Ssp-To` take at most 32 digits: no request could name it.
        return Err(invalid(
            record,
            UNIQUE_IDENTIFIER,
            value_line(record, UNIQUE_IDENTIFIER),
            "an ASID has at most 32 digits",
        ));
    }
    Ok(AccreditedSystem {
        asid: asid.to_owned(),
        ods_code: required(record, ID_CODE, warnings)?.to_owned(),
        party_key: required(record, PARTY_KEY, warnings)?.to_owned(),
        interactions: all(record, AS_SVC_IA, warnings),
        product_name: optional(record, PRODUCT_NAME, warnings)?.map(str::to_owned),
        product_version: optional(record, PRODUCT_VERSION, warnings)?.map(str::to_owned),
    })
}

/// An `nhsMhs` record: its identity, CPA id and at least one endpoint are required (SDS's
/// schema makes them MUST, and slapd would refuse the entry without them); whether its
/// endpoints and FQDN can be used is judged with its party's other handlers.
fn mhs_record(record: &Record, warnings: &mut Warnings) -> Result<MhsRecord, ModelError> {
    let endpoints = all(record, MHS_END_POINT, warnings);
    if endpoints.is_empty() {
        return Err(ModelError::Missing {
            dn: record.dn.clone(),
            line: record.line,
            attribute: MHS_END_POINT.name,
        });
    }
    let fqdns: Vec<&AttributeValue> = record.values(MHS_FQDN.lower).collect();
    if let [one] = fqdns.as_slice() {
        // The one value is used trimmed: say so, with its line.
        trimmed(record, MHS_FQDN, one, warnings);
    }
    let fqdn = mhs_fqdn(&fqdns.iter().map(|v| &v.value).collect::<Vec<_>>());
    Ok(MhsRecord {
        id: required(record, UNIQUE_IDENTIFIER, warnings)?.to_owned(),
        ods_code: required(record, ID_CODE, warnings)?.to_owned(),
        party_key: required(record, PARTY_KEY, warnings)?.to_owned(),
        interaction: required(record, MHS_SVC_IA, warnings)?.to_owned(),
        endpoints,
        fqdn,
        cpa_id: required(record, MHS_CPA_ID, warnings)?.to_owned(),
    })
}

/// The line of `attr`'s first value (the entry's `dn:` line if it has none).
fn value_line(record: &Record, attr: Attr) -> usize {
    record
        .values(attr.lower)
        .next()
        .map_or(record.line, |v| v.line)
}

/// `value` without leading or trailing white space; a warning when there was some (LDAP's
/// matching ignores it, so the gateway does too).
fn trimmed<'r>(
    record: &Record,
    attr: Attr,
    value: &'r AttributeValue,
    warnings: &mut Warnings,
) -> &'r str {
    let trimmed = trim_value(&value.value);
    if trimmed.len() != value.value.len() {
        warnings.push((
            value.line,
            format!(
                "line {}: entry {}: {}: leading or trailing white space removed from {:?}",
                value.line, record.dn, attr.name, value.value
            ),
        ));
    }
    trimmed
}

/// Every value of `attr`, trimmed (see [`trimmed`]).
fn all(record: &Record, attr: Attr, warnings: &mut Warnings) -> Vec<String> {
    record
        .values(attr.lower)
        .map(|v| trimmed(record, attr, v, warnings).to_owned())
        .collect()
}

/// Exactly one value, non-empty once trimmed (see [`trimmed`]).
fn required<'r>(
    record: &'r Record,
    attr: Attr,
    warnings: &mut Warnings,
) -> Result<&'r str, ModelError> {
    optional(record, attr, warnings)?.ok_or_else(|| ModelError::Missing {
        dn: record.dn.clone(),
        line: record.line,
        attribute: attr.name,
    })
}

/// At most one value; when present, non-empty once trimmed (see [`trimmed`]).
fn optional<'r>(
    record: &'r Record,
    attr: Attr,
    warnings: &mut Warnings,
) -> Result<Option<&'r str>, ModelError> {
    let mut values = record.values(attr.lower);
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if let Some(repeat) = values.next() {
        return Err(ModelError::Repeated {
            dn: record.dn.clone(),
            line: repeat.line,
            attribute: attr.name,
        });
    }
    let value = trimmed(record, attr, first, warnings);
    if value.is_empty() {
        return Err(invalid(record, attr, first.line, "empty value"));
    }
    Ok(Some(value))
}

fn invalid(record: &Record, attribute: Attr, line: usize, reason: &'static str) -> ModelError {
    ModelError::Invalid {
        dn: record.dn.clone(),
        line,
        attribute: attribute.name,
        reason,
    }
}

// ------------------------------------------------------------------------------------------------
// Backend
// ------------------------------------------------------------------------------------------------

/// Why an LDIF directory could not be loaded. Every variant names the file (or text source).
#[derive(Debug, thiserror::Error)]
pub enum LdifLoadError {
    /// The file could not be opened or read.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file or text is over [`MAX_LDIF_BYTES`].
    #[error("{origin}: larger than the {limit}-byte limit")]
    TooLarge { origin: String, limit: u64 },
    /// The LDIF does not parse.
    #[error("{origin}: {error}")]
    Syntax {
        origin: String,
        #[source]
        error: LdifError,
    },
    /// The LDIF parses but does not make a valid directory.
    #[error("{origin}: {error}")]
    Model {
        origin: String,
        #[source]
        error: ModelError,
    },
    /// `reload` on a backend built from text.
    #[error("{origin}: cannot reload: the directory was built from text, not a file")]
    NotReloadable { origin: String },
    /// A reload that would leave no accredited system, or no message handler, where there
    /// were some.
    #[error(
        "{origin}: holds no {what}, where the directory in service has {in_service}: refused, \
         as a file emptied or caught while being rewritten would be (replace the file by \
         renaming a complete one into place)"
    )]
    Emptied {
        origin: String,
        what: &'static str,
        in_service: usize,
    },
    /// A reload of a file whose last byte is not a newline: possibly still being written.
    #[error(
        "{origin}: does not end with a newline: refused as possibly still being written \
         (replace the file by renaming a complete one into place)"
    )]
    Unfinished { origin: String },
}

/// A [`DirectoryBackend`] answering from an in-memory index of an LDIF file in the SDS schema.
/// Lookups never do I/O; [`reload`](Self::reload) swaps in a new file's data atomically.
#[derive(Debug)]
pub struct LdifBackend {
    /// The file to (re)load, or `None` when built from text.
    path: Option<PathBuf>,
    /// Name used in errors: the path, or the text's source name.
    origin: String,
    /// The interactions whose unusable message handlers are warnings.
    requestable: Requestable,
    index: ArcSwap<Index>,
}

/// At most this many of a load's warnings are logged (all of them are in
/// [`LdifBackend::warnings`] and `check-config`'s report).
const LOGGED_WARNINGS: usize = 20;

/// Logs the warnings of a load of `origin` (WARN), at most [`LOGGED_WARNINGS`] of them.
fn log_warnings(origin: &str, warnings: &[String]) {
    for warning in warnings.iter().take(LOGGED_WARNINGS) {
        tracing::warn!(file = origin, "directory data: {warning}");
    }
    if warnings.len() > LOGGED_WARNINGS {
        tracing::warn!(
            file = origin,
            more = warnings.len() - LOGGED_WARNINGS,
            "directory data: more warnings not logged; `ssp-gateway check-config` lists them all"
        );
    }
}

impl LdifBackend {
    /// Load and index the LDIF file at `path` (at most [`MAX_LDIF_BYTES`]), reporting the
    /// unusable message handlers of the built-in catalogue's interactions. Blocking file I/O:
    /// call it at start-up or from `spawn_blocking`.
    pub fn from_path(path: impl AsRef<Path>) -> Result<Self, LdifLoadError> {
        Self::from_path_with(path, Requestable::builtin())
    }

    /// [`from_path`](Self::from_path), reporting the unusable message handlers of
    /// `requestable`'s interactions (the catalogue in force). Its warnings are logged.
    pub fn from_path_with(
        path: impl AsRef<Path>,
        requestable: Requestable,
    ) -> Result<Self, LdifLoadError> {
        let path = path.as_ref().to_path_buf();
        let (index, _) = load_file(&path, &requestable)?;
        let origin = path.display().to_string();
        log_warnings(&origin, &index.warnings);
        Ok(Self {
            origin,
            path: Some(path),
            requestable,
            index: ArcSwap::from_pointee(index),
        })
    }

    /// Index LDIF `text`; `source` names it in errors (e.g. "embedded development world").
    pub fn parse(text: &str, source: impl Into<String>) -> Result<Self, LdifLoadError> {
        let origin = source.into();
        let requestable = Requestable::builtin();
        let index = index_text(text, &origin, &requestable)?;
        log_warnings(&origin, &index.warnings);
        Ok(Self {
            path: None,
            origin,
            requestable,
            index: ArcSwap::from_pointee(index),
        })
    }

    /// The compiled-in development world ([`DEVELOPMENT_WORLD`]).
    pub fn development_world() -> Result<Self, LdifLoadError> {
        Self::parse(DEVELOPMENT_WORLD, "embedded config/directory.ldif")
    }

    /// Re-read the file and swap in its data. If the new file cannot be read or is invalid, the
    /// old data stays in service and the error says why. Blocking file I/O (see `from_path`).
    pub fn reload(&self) -> Result<Stats, LdifLoadError> {
        let Some(path) = &self.path else {
            return Err(LdifLoadError::NotReloadable {
                origin: self.origin.clone(),
            });
        };
        let (index, finished) = load_file(path, &self.requestable)?;
        let stats = index.stats;
        let before = self.index.load().stats;
        for (now, in_service, what) in [
            (stats.systems, before.systems, "accredited systems (nhsAs)"),
            (stats.handlers, before.handlers, "message handlers (nhsMhs)"),
        ] {
            if now == 0 && in_service > 0 {
                return Err(LdifLoadError::Emptied {
                    origin: self.origin.clone(),
                    what,
                    in_service,
                });
            }
        }
        if !finished {
            return Err(LdifLoadError::Unfinished {
                origin: self.origin.clone(),
            });
        }
        log_warnings(&self.origin, &index.warnings);
        self.index.store(Arc::new(index));
        Ok(stats)
    }

    /// What the current data holds.
    pub fn stats(&self) -> Stats {
        self.index.load().stats
    }

    /// What the current data holds that the gateway cannot use, or uses only once trimmed,
    /// each starting `line N: ` (or `lines N, M: `), in line order: message handlers of a
    /// catalogue interaction that is refused for their party (an endpoint no request can be
    /// forwarded to, several endpoints, several handlers for the interaction under one party
    /// key), FQDNs that cannot be read, values with leading or trailing white space.
    pub fn warnings(&self) -> Vec<String> {
        self.index.load().warnings.clone()
    }

    /// The file path or text source name.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The party for `asid` from the current data; `None` when no `nhsAs` has that ASID.
    /// ASIDs are digits, so the match is exact.
    pub fn lookup(&self, asid: &str) -> Option<Party> {
        self.index.load().party(asid)
    }
}

impl DirectoryBackend for LdifBackend {
    fn name(&self) -> &'static str {
        "ldif"
    }

    fn party<'a>(&'a self, asid: &'a str) -> BoxFuture<'a, Result<Option<Party>, DirectoryError>> {
        Box::pin(future::ready(Ok(self.lookup(asid))))
    }

    /// The data is in memory: the LDIF backend always answers.
    fn probe(&self) -> BoxFuture<'_, Result<(), DirectoryError>> {
        Box::pin(future::ready(Ok(())))
    }

    /// Loaded before the gateway starts: usable from the start.
    fn answers_from_memory(&self) -> bool {
        true
    }
}

/// The file's index, and whether the file ends with a newline (as a finished LDIF file does).
fn load_file(path: &Path, requestable: &Requestable) -> Result<(Index, bool), LdifLoadError> {
    let io = |source| LdifLoadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let too_large = || LdifLoadError::TooLarge {
        origin: path.display().to_string(),
        limit: MAX_LDIF_BYTES,
    };
    let file = crate::files::open_regular(path).map_err(io)?;
    if file.metadata().map_err(io)?.len() > MAX_LDIF_BYTES {
        return Err(too_large());
    }
    // Read at most one byte past the limit: the file may grow, or be a device with no length.
    let mut bytes = Vec::new();
    file.take(MAX_LDIF_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_LDIF_BYTES {
        return Err(too_large());
    }
    let origin = path.display().to_string();
    let records = parse_records_bytes(&bytes).map_err(|error| LdifLoadError::Syntax {
        origin: origin.clone(),
        error,
    })?;
    let finished = bytes.is_empty() || bytes.ends_with(b"\n");
    let index = build_index(&records, requestable)
        .map_err(|error| LdifLoadError::Model { origin, error })?;
    Ok((index, finished))
}

fn index_text(text: &str, origin: &str, requestable: &Requestable) -> Result<Index, LdifLoadError> {
    if text.len() as u64 > MAX_LDIF_BYTES {
        return Err(LdifLoadError::TooLarge {
            origin: origin.to_owned(),
            limit: MAX_LDIF_BYTES,
        });
    }
    let records = parse_records(text).map_err(|error| LdifLoadError::Syntax {
        origin: origin.to_owned(),
        error,
    })?;
    build_index(&records, requestable).map_err(|error| LdifLoadError::Model {
        origin: origin.to_owned(),
        error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GPC: &str = "urn:nhs:names:services:gpconnect:";
    const ENDPOINT: &str = "https://localhost:9443/B82617/STU3/1/gpconnect";

    fn b64(s: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    fn parse_err(text: &str) -> LdifError {
        match parse_records(text) {
            Ok(records) => panic!("expected an error, parsed {records:?}"),
            Err(e) => e,
        }
    }

    // ---- parser ----------------------------------------------------------------------------

    #[test]
    fn parses_version_comments_and_records() {
        let text = "version: 1\n# a comment\n\ndn: o=nhs\nobjectClass: organization\no: nhs\n\n\n\
                    # between records\ndn: ou=services,o=nhs\r\n# inside a record\r\nou: services\r\n";
        let records = parse_records(text).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].dn, "o=nhs");
        assert_eq!(records[0].line, 4);
        assert_eq!(records[0].attributes.len(), 2);
        assert_eq!(records[0].attributes[1].line, 6);
        assert_eq!(records[1].dn, "ou=services,o=nhs");
        assert_eq!(records[1].line, 10);
        let ou: Vec<_> = records[1].values("ou").map(|v| v.value.as_str()).collect();
        assert_eq!(ou, ["services"], "CRLF must be stripped");
    }

    #[test]
    fn unfolds_continuation_lines_and_folded_comments() {
        let text = "dn: uniqueIdentifier=1,\n ou=services,o=nhs\nnhsMHSEndPoint: https://localhost:9443/\n B82617/STU3/1/\n gpconnect\n# a folded comment\n dn: not-a-line\nnhsMhsFQDN: local\n host\n";
        let records = parse_records(text).unwrap();
        assert_eq!(records.len(), 1);
        let r = &records[0];
        assert_eq!(r.dn, "uniqueIdentifier=1,ou=services,o=nhs");
        assert_eq!(
            r.attributes.len(),
            2,
            "the folded comment must stay a comment"
        );
        assert_eq!(r.attributes[0].value, ENDPOINT);
        assert_eq!(r.attributes[0].line, 3);
        assert_eq!(r.attributes[1].value, "localhost");
        assert_eq!(r.attributes[1].line, 8);
    }

    #[test]
    fn decodes_base64_values_and_dn() {
        let text = format!(
            "dn:: {}\nnhsProductName:: {}\ndescription::{}\n",
            b64(b"uniqueIdentifier=1,o=nhs"),
            b64("Prodüct name ".as_bytes()),
            b64(b"")
        );
        let records = parse_records(&text).unwrap();
        assert_eq!(records[0].dn, "uniqueIdentifier=1,o=nhs");
        assert_eq!(records[0].attributes[0].value, "Prodüct name ");
        assert_eq!(records[0].attributes[1].value, "");
    }

    #[test]
    fn attribute_names_are_case_insensitive() {
        let records = parse_records("DN: o=nhs\nNHSIDCODE: B82617\nnhsIdCode: x\n").unwrap();
        assert_eq!(records[0].dn, "o=nhs");
        let codes: Vec<_> = records[0]
            .values("nhsidcode")
            .map(|v| v.value.as_str())
            .collect();
        assert_eq!(codes, ["B82617", "x"]);
    }

    /// slapd reads an attribute written by its numeric OID (or another of its names) as the
    /// attribute itself: so does the parser, for the attributes of the SDS schema and the
    /// standard ones it uses; other OIDs stay as written (the model reads none of them).
    #[test]
    fn numeric_oid_attribute_names_read_as_their_schema_names() {
        let text = "dn: o=nhs\n0.9.2342.19200300.100.1.44: 1\n2.5.4.0: nhsAs\n\
                    1.2.826.0.1285.0.2.1.84: https://x\n1.2.826.0.1285.0.1.10: B82617\n\
                    organizationName: nhs\nORGANIZATIONALUNITNAME: services\n2.5.4.3: x\n";
        let records = parse_records(text).unwrap();
        let names: Vec<_> = records[0]
            .attributes
            .iter()
            .map(|a| a.name.as_str())
            .collect();
        assert_eq!(
            names,
            [
                "uniqueidentifier",
                "objectclass",
                "nhsmhsendpoint",
                "nhsidcode",
                "o",
                "ou",
                "2.5.4.3"
            ]
        );
    }

    /// The OIDs and names of the SDS attributes are those of `config/sds.schema`, every one.
    #[test]
    fn attribute_table_matches_the_sds_schema() {
        let schema = include_str!("../../config/sds.schema");
        let mut defined = Vec::new();
        for line in schema.lines().filter(|l| l.starts_with("attributetype ")) {
            let mut words = line.split_whitespace();
            let oid = words.nth(2).unwrap();
            let name = words.nth(1).unwrap().trim_matches('\'');
            let equality = match line.split(" EQUALITY ").nth(1) {
                Some(rule) if rule.starts_with("caseExactMatch") => Equality::Exact,
                Some(rule) if rule.starts_with("caseIgnoreMatch") => Equality::IgnoreCase,
                Some(rule) => panic!("unexpected rule {rule}"),
                None => Equality::None,
            };
            defined.push((oid, name, equality));
        }
        assert_eq!(defined.len(), 36);
        let table: Vec<_> = ATTRIBUTE_TYPES
            .iter()
            .filter(|(oid, _, _)| oid.starts_with("1.2.826.0.1285."))
            .map(|(oid, names, equality)| (*oid, names[0], *equality))
            .collect();
        assert_eq!(table, defined);
    }

    #[test]
    fn every_syntax_error_names_its_line() {
        let cases: &[(&str, usize, &str)] = &[
            (" folded at start\n", 1, "no line to continue"),
            (
                "dn: o=nhs\no: nhs\n\n continued after blank\n",
                4,
                "no line to continue",
            ),
            (
                "dn: o=nhs\nno colon here\n",
                2,
                "expected 'attribute: value'",
            ),
            ("# c\nobjectClass: top\n", 2, "must start with 'dn:'"),
            (
                "dn: o=nhs\no: nhs\ndn: ou=x,o=nhs\n",
                3,
                "'dn:' inside a record",
            ),
            ("dn: o=nhs\nchangetype: add\no: nhs\n", 2, "change records"),
            ("dn: o=nhs\ncontrol: 1.2.3 true\n", 2, "change records"),
            (
                "dn: o=nhs\njpegPhoto:< file:///etc/passwd\n",
                2,
                "URL values",
            ),
            ("dn: o=nhs\ncn;lang-en: x\n", 2, "attribute options"),
            ("dn: o=nhs\nbad name: x\n", 2, "invalid attribute name"),
            ("dn: o=nhs\n1abc: x\n", 2, "invalid attribute name"),
            ("dn: o=nhs\n: x\n", 2, "missing attribute name"),
            ("dn: o=nhs\no: :nhs\n", 2, "must be base64-encoded"),
            ("dn: o=nhs\no: <nhs\n", 2, "must be base64-encoded"),
            ("dn: o=nhs\no: a\0b\n", 2, "NUL or CR"),
            ("dn: o=nhs\no: a\rb\n", 2, "NUL or CR"),
            ("dn: o=nhs\no:: not base64!\n", 2, "invalid base64"),
            (
                "version: 2\n\ndn: o=nhs\no: nhs\n",
                1,
                "unsupported LDIF version",
            ),
            (
                "dn: o=nhs\no: nhs\n\ndn: ou=empty,o=nhs\n\n",
                4,
                "has no attributes",
            ),
            (
                "dn: o=nhs\no: nhs\n\ndn: ou=empty,o=nhs\n",
                4,
                "has no attributes",
            ),
            ("dn:\no: nhs\n", 1, "empty dn"),
        ];
        for (text, line, reason) in cases {
            let err = parse_err(text);
            assert_eq!(err.line, *line, "{text:?}: {err}");
            assert!(err.reason.contains(reason), "{text:?}: {err}");
            assert!(
                err.to_string().starts_with(&format!("line {line}: ")),
                "{err}"
            );
        }
    }

    /// RFC 2849 only advises base64 for a value ending in a space: the parser keeps it as
    /// written (the model trims the values it reads, with a warning).
    #[test]
    fn unencoded_trailing_spaces_are_kept() {
        let records = parse_records("dn: o=nhs\no: nhs  \n").unwrap();
        assert_eq!(records[0].attributes[0].value, "nhs  ");
    }

    #[test]
    fn base64_that_is_not_utf8_is_an_error() {
        let err = parse_err(&format!(
            "dn: o=nhs\no: nhs\n\n\ndn: o=x\ndescription:: {}\n",
            b64(&[0xff, 0xfe])
        ));
        assert_eq!(err.line, 6);
        assert!(err.reason.contains("not valid UTF-8"), "{err}");
    }

    #[test]
    fn raw_bytes_that_are_not_utf8_report_the_line() {
        let err = parse_records_bytes(b"dn: o=nhs\no: nhs\ndescription: caf\xe9\n").unwrap_err();
        assert_eq!(err, LdifError::new(3, "not valid UTF-8"));
    }

    // ---- model -----------------------------------------------------------------------------

    fn as_entry(asid: &str, pk: &str, extra: &str) -> String {
        format!(
            "dn: uniqueIdentifier={asid},ou=services,o=nhs\nobjectClass: top\nobjectClass: nhsAs\n\
             uniqueIdentifier: {asid}\nnhsIDCode: B82617\nnhsMHSPartyKey: {pk}\n\
             nhsAsSvcIA: {GPC}fhir:rest:read:metadata-1\n{extra}"
        )
    }

    fn mhs_entry(id: &str, pk: &str, interaction: &str, extra: &str) -> String {
        format!(
            "dn: uniqueIdentifier={id},ou=services,o=nhs\nobjectClass: top\nobjectClass: nhsMhs\n\
             uniqueIdentifier: {id}\nnhsIDCode: B82617\nnhsMHSPartyKey: {pk}\nnhsMhsSvcIA: {interaction}\n\
             nhsMHSEndPoint: {ENDPOINT}\nnhsMhsFQDN: localhost\nnhsMhsCPAId: {id}\n{extra}"
        )
    }

    fn model(text: &str) -> Result<Index, ModelError> {
        build_index(
            &parse_records(text).expect("test LDIF parses"),
            &Requestable::builtin(),
        )
    }

    fn model_err(text: &str) -> ModelError {
        match model(text) {
            Ok(index) => panic!("expected a model error, built {index:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn builds_parties_joining_on_party_key_case_insensitively() {
        let text =
            format!(
            "dn: o=nhs\nobjectClass: organization\no: nhs\n\n{}nhsProductName: Mock\n\n{}\n{}\n{}",
            as_entry("918999198993", "B82617-0000806", ""),
            mhs_entry("aaaa", "b82617-0000806", &format!("{GPC}fhir:rest:read:metadata-1"), ""),
            mhs_entry("bbbb", "B82617-0000806", &format!("{GPC}fhir:rest:search:slot-1"), ""),
            mhs_entry("cccc", "OTHER-1", &format!("{GPC}fhir:rest:search:slot-1"), ""),
        );
        let index = model(&text).unwrap();
        assert_eq!(
            index.stats,
            Stats {
                entries: 5,
                systems: 1,
                handlers: 3,
                warnings: 0
            }
        );
        let party = index.party("918999198993").unwrap();
        assert_eq!(party.system.ods_code, "B82617");
        assert_eq!(party.system.product_name.as_deref(), Some("Mock"));
        assert_eq!(party.system.product_version, None);
        assert_eq!(
            party.system.interactions,
            [format!("{GPC}fhir:rest:read:metadata-1")]
        );
        let ids: Vec<_> = party.handlers.iter().map(|h| h.id.as_str()).collect();
        assert_eq!(ids, ["aaaa", "bbbb"]);
        assert_eq!(party.handlers[0].endpoint, ENDPOINT);
        assert_eq!(party.handlers[0].cpa_id, "aaaa");
        assert!(index.party("918999198994").is_none());
    }

    #[test]
    fn object_classes_and_attribute_names_match_case_insensitively() {
        let text = "dn: UNIQUEIDENTIFIER=1,OU=Services,O=NHS\nOBJECTCLASS: NHSAS\nUNIQUEIDENTIFIER: 1\nNhsIdCode: X\nNHSMHSPARTYKEY: X-1\n";
        let index = model(text).unwrap();
        assert_eq!(index.party("1").unwrap().system.party_key, "X-1");
    }

    #[test]
    fn other_object_classes_are_ignored() {
        let text = "dn: cn=x,o=nhs\nobjectClass: organizationalRole\ncn: x\n\n\
                    dn: cn=y,o=nhs\nobjectClass: 2.5.6.8\nobjectClass: TOP\ncn: y\n";
        let index = model(text).unwrap();
        assert_eq!(
            index.stats,
            Stats {
                entries: 2,
                systems: 0,
                handlers: 0,
                warnings: 0
            }
        );
    }

    /// slapd knows object classes by name ignoring case, and by OID: so does the model. A
    /// value that is no class slapd knows (`nhsAs ` with a trailing space, a misspelling), or
    /// an entry with no `objectClass` at all, makes slapd refuse the file: the model refuses it
    /// too, naming the line, where it used to ignore the entry (its ASID "not registered", or
    /// a duplicate message handler not seen and the first one used).
    #[test]
    fn object_classes_are_those_slapd_knows() {
        for class in ["NHSAS", "nhsas", "1.2.826.0.1285.0.2.0.107"] {
            let text = as_entry("1", "P-1", "")
                .replace("objectClass: nhsAs", &format!("objectClass: {class}"));
            assert!(model(&text).unwrap().party("1").is_some(), "{class}");
        }
        let slot = format!("{GPC}fhir:rest:search:slot-1");
        let mhs_oid = mhs_entry("s2", "P-1", &slot, "").replace(
            "objectClass: nhsMhs",
            "objectClass: 1.2.826.0.1285.0.2.0.108",
        );
        let text = format!(
            "{}\n{}\n{mhs_oid}",
            as_entry("1", "P-1", ""),
            mhs_entry("s1", "P-1", &slot, "")
        );
        let index = model(&text).unwrap();
        let party = index.party("1").unwrap();
        assert!(party.unusable_for(&slot).is_some(), "two handlers for slot");

        for (class, encoded) in [
            ("nhsAs ", "objectClass: nhsAs ".to_owned()),
            (" nhsAs", format!("objectClass:: {}", b64(b" nhsAs"))),
            ("nhsAs1", "objectClass: nhsAs1".to_owned()),
            ("", "objectClass:".to_owned()),
            (
                "1.2.826.0.1285.0.2.0.1070",
                "objectClass: 1.2.826.0.1285.0.2.0.1070".to_owned(),
            ),
        ] {
            let text = as_entry("1", "P-1", "").replace("objectClass: nhsAs", &encoded);
            let err = model_err(&text);
            assert_eq!(
                err,
                ModelError::UnknownObjectClass {
                    dn: "uniqueIdentifier=1,ou=services,o=nhs".into(),
                    line: 3,
                    value: class.into(),
                },
                "{encoded}"
            );
            assert!(err.to_string().starts_with("line 3: "), "{err}");
        }
        // A second handler with a padded class: refused, not a lone first handler used.
        let padded = mhs_entry("s2", "P-1", &slot, "")
            .replace("objectClass: nhsMhs", "objectClass: nhsMhs ");
        let text = format!(
            "{}\n{}\n{padded}",
            as_entry("1", "P-1", ""),
            mhs_entry("s1", "P-1", &slot, "")
        );
        assert!(matches!(
            model_err(&text),
            ModelError::UnknownObjectClass { line: 22, .. }
        ));

        let misspelt = as_entry("1", "P-1", "").replace("objectClass:", "objectClas:");
        assert_eq!(
            model_err(&misspelt),
            ModelError::NoObjectClass {
                dn: "uniqueIdentifier=1,ou=services,o=nhs".into(),
                line: 1
            }
        );
    }

    /// An `nhsAs` or `nhsMhs` entry must hold the value its DN names it by (slapadd adds the
    /// DN's value: `uniqueIdentifier=200000000360` over `uniqueIdentifier: 200000000999` is an
    /// entry with two ASIDs in slapd, which the gateway used to register as 200000000999
    /// alone), and be under `ou=services,o=nhs`, where the LDAP backend searches (it used to be
    /// used wherever it was). DNs are read as slapd reads them.
    /// One value twice in an attribute, as its equality rule compares values (caseExact
    /// `nhsMHSEndPoint` again with a trailing space, or by its OID; `uniqueIdentifier` again):
    /// refused, as slapadd refuses the entry; other values, and attributes with no equality
    /// rule, may repeat.
    #[test]
    fn a_value_held_twice_is_refused_as_slapd_refuses_it() {
        let slot = format!("{GPC}fhir:rest:search:slot-1");
        let twice = mhs_entry(
            "ab",
            "P-1",
            &slot,
            &format!("nhsMHSEndPoint: {ENDPOINT} \n"),
        );
        match model_err(&twice) {
            ModelError::DuplicateValue {
                line, attribute, ..
            } => {
                assert_eq!((line, attribute.as_str()), (11, "nhsMHSEndPoint"));
            }
            other => panic!("{other:?}"),
        }
        let by_oid = mhs_entry(
            "ab",
            "P-1",
            &slot,
            &format!("1.2.826.0.1285.0.2.1.84: {ENDPOINT}\n"),
        );
        assert!(matches!(
            model_err(&by_oid),
            ModelError::DuplicateValue { .. }
        ));
        let asid = as_entry("200000000999", "P-1", "uniqueIdentifier: 200000000999\n");
        assert!(matches!(
            model_err(&asid),
            ModelError::DuplicateValue { .. }
        ));
        // Two different endpoints are two values (the handler is unusable, not refused); the
        // same endpoint in another case is another value for caseExact.
        let two = mhs_entry(
            "ab",
            "P-1",
            &slot,
            &format!("nhsMHSEndPoint: {}\n", ENDPOINT.to_uppercase()),
        );
        assert!(model(&two).is_ok());
    }

    #[test]
    fn dns_are_checked_as_slapd_reads_them() {
        let slot = format!("{GPC}fhir:rest:search:slot-1");
        let renamed = as_entry("200000000999", "P-1", "").replacen(
            "uniqueIdentifier=200000000999",
            "uniqueIdentifier=200000000360",
            1,
        );
        let err = model_err(&renamed);
        assert_eq!(
            err,
            ModelError::NamingValue {
                dn: "uniqueIdentifier=200000000360,ou=services,o=nhs".into(),
                line: 1,
                attribute: "uniqueIdentifier".into(),
                value: "200000000360".into(),
            }
        );
        assert!(err
            .to_string()
            .starts_with("line 1: entry uniqueIdentifier=200000000360,"));
        let mhs = mhs_entry("ab", "P-1", &slot, "").replacen("=ab,", "=cd,", 1);
        assert!(matches!(
            model_err(&mhs),
            ModelError::NamingValue { line: 1, .. }
        ));
        // nhsIDCode is caseExact: slapd refuses the entry (a second value of a single-valued
        // attribute); nhsMhsFQDN has no equality rule: slapd refuses it in a DN.
        let ods = mhs_entry("ab", "P-1", &slot, "").replace(
            "dn: uniqueIdentifier=ab,",
            "dn: nhsIDCode=b82617+uniqueIdentifier=ab,",
        );
        assert!(
            matches!(model_err(&ods), ModelError::NamingValue { ref attribute, .. } if attribute == "nhsIDCode")
        );
        let fqdn = mhs_entry("ab", "P-1", &slot, "")
            .replace("dn: uniqueIdentifier=ab,", "dn: nhsMhsFQDN=localhost,");
        assert!(
            model_err(&fqdn)
                .to_string()
                .contains("nhsMhsFQDN has no equality rule"),
            "{}",
            model_err(&fqdn)
        );

        for outside in [
            "uniqueIdentifier=1,o=nhs",
            "uniqueIdentifier=1,ou=people,o=nhs",
            "uniqueIdentifier=1,ou=services,o=nhs2",
            "uniqueIdentifier=1",
        ] {
            let text =
                as_entry("1", "P-1", "").replace("uniqueIdentifier=1,ou=services,o=nhs", outside);
            assert_eq!(
                model_err(&text),
                ModelError::OutsideBase {
                    dn: outside.into(),
                    line: 1,
                    base: "ou=services,o=nhs"
                }
            );
        }
        // Other entries may be anywhere (slapd's own `o=nhs`, `ou=people`).
        let other = "dn: cn=x,ou=people,o=nhs\nobjectClass: organizationalRole\ncn: y\n";
        assert_eq!(model(other).unwrap().stats.entries, 1);

        for accepted in [
            "uniqueIdentifier=1 , OU=Services;  o=NHS",
            "0.9.2342.19200300.100.1.44=1,2.5.4.11=services,organizationName=nhs",
            "uniqueIdentifier=\"1\",ou=\"Services\",o=nhs",
            "uniqueIdentifier=\\31,ou=serv\\69ces,o=nhs",
            "uniqueIdentifier=1,ou=x,ou=services,o=nhs",
            "cn=x+uniqueIdentifier=1,ou=services,o=nhs",
        ] {
            let text = as_entry("1", "P-1", "")
                .replace("uniqueIdentifier=1,ou=services,o=nhs", accepted)
                .replace("uniqueIdentifier: 1\n", "uniqueIdentifier: 1\ncn: X\n");
            let index = model(&text).unwrap_or_else(|e| panic!("{accepted}: {e}"));
            assert!(index.party("1").is_some(), "{accepted}");
        }
        let upper = mhs_entry("ab", "P-1", &slot, "").replacen("=ab,", "=AB,", 1);
        assert!(model(&upper).is_ok(), "uniqueIdentifier is caseIgnore");

        for (bad, why) in [
            ("uniqueIdentifier=#3101,ou=services,o=nhs", "BER"),
            ("uniqueIdentifier", "has no '='"),
            ("uniqueIdentifier=\"1,ou=services,o=nhs", "not closed"),
            ("uniqueIdentifier=1\\", "ends with"),
            ("uniqueIdentifier=1\\4,ou=services,o=nhs", "two"),
            ("uniqueIdentifier=1\\q,ou=services,o=nhs", "not an escape"),
            ("uniqueIdentifier=\\ff,ou=services,o=nhs", "not UTF-8"),
            (
                "unique identifier=1,ou=services,o=nhs",
                "invalid attribute name",
            ),
            ("uniqueIdentifier=\"1\"x,ou=services,o=nhs", "unexpected"),
        ] {
            let text =
                as_entry("1", "P-1", "").replace("uniqueIdentifier=1,ou=services,o=nhs", bad);
            let err = model_err(&text);
            assert!(
                matches!(err, ModelError::Dn { line: 1, ref reason, .. } if reason.contains(why)),
                "{bad}: {err}"
            );
            assert!(err.to_string().contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn the_search_base_parses() {
        let base = parse_dn(SEARCH_BASE).unwrap();
        assert_eq!(
            base,
            [
                vec![("ou".to_owned(), "services".to_owned())],
                vec![("o".to_owned(), "nhs".to_owned())]
            ]
        );
    }

    #[test]
    fn a_system_with_no_handlers_has_an_empty_list() {
        let index = model(&as_entry("5", "P-5", "")).unwrap();
        assert!(index.party("5").unwrap().handlers.is_empty());
    }

    /// (Without its `uniqueIdentifier`, an entry is named by its party key here: a DN naming
    /// a value the entry lacks is an error of its own, see `dns_are_checked_as_slapd_reads_them`.)
    #[test]
    fn missing_required_attributes_are_named_with_dn_and_line() {
        let full_as = as_entry("1", "P-1", "").replace(
            "dn: uniqueIdentifier=1,",
            "dn: nhsMHSPartyKey=P-1+uniqueIdentifier=1,",
        );
        let named_by_party_key = |text: String| {
            text.replace(
                "nhsMHSPartyKey=P-1+uniqueIdentifier=1,",
                "nhsMHSPartyKey=P-1,",
            )
            .replace("dn: uniqueIdentifier=ab,", "dn: nhsMHSPartyKey=P-1,")
        };
        for (attr, name) in [
            ("uniqueIdentifier: 1\n", "uniqueIdentifier"),
            ("nhsIDCode: B82617\n", "nhsIDCode"),
            ("nhsMHSPartyKey: P-1\n", "nhsMHSPartyKey"),
        ] {
            let mut text = format!(
                "dn: o=nhs\nobjectClass: organization\no: nhs\n\n{}",
                full_as.replace(attr, "")
            );
            if name == "uniqueIdentifier" {
                text = named_by_party_key(text);
            } else if name == "nhsMHSPartyKey" {
                text = text.replace("nhsMHSPartyKey=P-1+", "");
            }
            let ModelError::Missing {
                line, attribute, ..
            } = model_err(&text)
            else {
                panic!("{name}: {}", model_err(&text));
            };
            assert_eq!((line, attribute), (5, name));
        }
        let interaction = format!("{GPC}fhir:rest:read:metadata-1");
        let full_mhs = mhs_entry("ab", "P-1", &interaction, "");
        for (attr, name) in [
            ("uniqueIdentifier: ab\n".to_owned(), "uniqueIdentifier"),
            ("nhsIDCode: B82617\n".to_owned(), "nhsIDCode"),
            ("nhsMHSPartyKey: P-1\n".to_owned(), "nhsMHSPartyKey"),
            (format!("nhsMhsSvcIA: {interaction}\n"), "nhsMhsSvcIA"),
            (format!("nhsMHSEndPoint: {ENDPOINT}\n"), "nhsMHSEndPoint"),
            ("nhsMhsCPAId: ab\n".to_owned(), "nhsMhsCPAId"),
        ] {
            let mut text = full_mhs.replace(&attr, "");
            let mut dn = "uniqueIdentifier=ab,ou=services,o=nhs";
            if name == "uniqueIdentifier" {
                text = named_by_party_key(text);
                dn = "nhsMHSPartyKey=P-1,ou=services,o=nhs";
            }
            let err = model_err(&text);
            assert_eq!(
                err,
                ModelError::Missing {
                    dn: dn.into(),
                    line: 1,
                    attribute: name
                }
            );
            assert_eq!(
                err.to_string(),
                format!("line 1: entry {dn}: missing {name}")
            );
        }
    }

    #[test]
    fn repeated_single_valued_attributes_name_the_repeat_line() {
        let interaction = format!("{GPC}fhir:rest:read:metadata-1");
        let cases = [
            (
                mhs_entry(
                    "ab",
                    "P-1",
                    &interaction,
                    &format!("nhsMhsSvcIA: {GPC}fhir:rest:search:slot-1\n"),
                ),
                11,
                "nhsMhsSvcIA",
            ),
            (
                mhs_entry("ab", "P-1", &interaction, "nhsMhsCPAId: other\n"),
                11,
                "nhsMhsCPAId",
            ),
            (
                mhs_entry("ab", "P-1", &interaction, "uniqueIdentifier: cd\n"),
                11,
                "uniqueIdentifier",
            ),
            (
                as_entry("1", "P-1", "nhsMHSPartyKey: P-2\n"),
                8,
                "nhsMHSPartyKey",
            ),
            (as_entry("1", "P-1", "nhsIDCode: Y\n"), 8, "nhsIDCode"),
            (
                as_entry("1", "P-1", "nhsProductName: a\nnhsProductName: b\n"),
                9,
                "nhsProductName",
            ),
        ];
        for (text, line, attribute) in cases {
            let err = model_err(&text);
            let ModelError::Repeated {
                line: got,
                attribute: got_attr,
                dn,
            } = &err
            else {
                panic!("{attribute}: {err}");
            };
            assert_eq!((*got, *got_attr), (line, attribute), "{err}");
            assert!(dn.starts_with("uniqueIdentifier="), "{err}");
        }
    }

    #[test]
    fn invalid_values_are_rejected() {
        let empty = as_entry("1", "P-1", "nhsProductVersion:\n");
        assert!(matches!(
            model_err(&empty),
            ModelError::Invalid {
                line: 8,
                attribute: "nhsProductVersion",
                reason: "empty value",
                ..
            }
        ));

        let long = as_entry(&"9".repeat(33), "P-1", "");
        assert!(matches!(
            model_err(&long),
            ModelError::Invalid {
                attribute: "uniqueIdentifier",
                reason: "an ASID has at most 32 digits",
                ..
            }
        ));
        assert!(model(&as_entry(&"9".repeat(32), "P-1", "")).is_ok());

        let not_digits = as_entry("12a", "P-1", "");
        assert!(matches!(
            model_err(&not_digits),
            ModelError::Invalid {
                line: 4,
                attribute: "uniqueIdentifier",
                reason: "an ASID must be ASCII digits",
                ..
            }
        ));
    }

    #[test]
    fn duplicate_asids_are_errors() {
        let text = format!("{}\n{}", as_entry("7", "P-1", ""), as_entry("7", "P-2", ""));
        assert_eq!(
            model_err(&text),
            ModelError::DuplicateAsid {
                dn: "uniqueIdentifier=7,ou=services,o=nhs".into(),
                line: 9,
                asid: "7".into(),
                first_line: 1
            }
        );
    }

    /// A value with leading or trailing white space is used trimmed (LDAP's matching ignores
    /// it), with a warning naming its line: not a refused file, nor a party no request can
    /// reach.
    #[test]
    fn padded_values_are_trimmed_with_a_warning() {
        let interaction = format!("{GPC}fhir:rest:read:metadata-1");
        let text = format!(
            "{}\n{}",
            as_entry("1", "P-1", "")
                .replace(
                    "nhsIDCode: B82617",
                    &format!("nhsIDCode:: {}", b64(b" B82617"))
                )
                .replace(&interaction, &format!("{interaction} ")),
            mhs_entry("ab", "P-1", &interaction, "")
                .replace("nhsMHSPartyKey: P-1", "nhsMHSPartyKey: P-1  ")
                .replace(ENDPOINT, &format!("{ENDPOINT} "))
        );
        let index = model(&text).unwrap();
        let party = index.party("1").unwrap();
        assert_eq!(party.system.ods_code, "B82617");
        assert!(party.may(&interaction));
        let handler = party.handler_for(&interaction).expect("joined and usable");
        assert_eq!(handler.endpoint, ENDPOINT);
        assert_eq!(handler.party_key, "P-1");
        assert_eq!(index.stats.warnings, 4, "{:#?}", index.warnings);
        assert_eq!(
            index.warnings[0],
            "line 5: entry uniqueIdentifier=1,ou=services,o=nhs: nhsIDCode: leading or trailing \
             white space removed from \" B82617\""
        );
        assert!(
            index.warnings[1].starts_with("line 7: "),
            "{:?}",
            index.warnings
        );
        assert!(index.warnings[2]
            .starts_with("line 14: entry uniqueIdentifier=ab,ou=services,o=nhs: nhsMHSPartyKey: "));
        assert!(index.warnings[3]
            .starts_with("line 16: entry uniqueIdentifier=ab,ou=services,o=nhs: nhsMHSEndPoint: "));
    }

    /// The message handlers of a catalogue interaction that cannot be used (an endpoint no
    /// request can be forwarded to, two endpoints, two handlers for the interaction) make that
    /// interaction unusable for the party: the file loads, each is a warning with its line,
    /// and the party's other interactions and FQDNs stay. Handlers of interactions outside the
    /// catalogue only supply their FQDN: nothing about them is reported.
    #[test]
    fn unusable_handlers_are_warnings_not_errors() {
        let metadata = format!("{GPC}fhir:rest:read:metadata-1");
        let slot = format!("{GPC}fhir:rest:search:slot-1");
        let book = format!("{GPC}fhir:rest:create:appointment-1");
        let patient = format!("{GPC}fhir:rest:read:patient-1");
        let mcci = "urn:nhs:names:services:psis:MCCI_IN010000UK13";
        let entries = [
            as_entry("1", "P-1", ""),
            mhs_entry("m1", "P-1", &metadata, ""),
            // An endpoint with a trailing `/`: slot is unusable (the entry at line 20).
            mhs_entry("s1", "P-1", &slot, "").replace(ENDPOINT, &format!("{ENDPOINT}/")),
            // Two handlers for book, the second under the party key in another case (lines
            // 31, 42).
            mhs_entry("b1", "P-1", &book, ""),
            mhs_entry("b2", "p-1", &book, ""),
            // Two endpoints (line 53).
            mhs_entry(
                "p1",
                "P-1",
                &patient,
                "nhsMHSEndPoint: https://localhost/x\n",
            ),
            // Outside the catalogue: a trailing `/`, and twice; no FQDN on the second.
            mhs_entry("o1", "P-1", mcci, "")
                .replace(ENDPOINT, "https://vpn-client-1411.opentest.hscic.gov.uk/")
                .replace("nhsMhsFQDN: localhost", "nhsMhsFQDN: vpn.example"),
            mhs_entry("o2", "P-1", mcci, "").replace("nhsMhsFQDN: localhost\n", ""),
        ];
        let text = entries.join("\n");
        let index = model(&text).unwrap();
        let party = index.party("1").unwrap();
        assert!(
            party.handler_for(&metadata).is_some(),
            "the sound one stays"
        );
        for refused in [&slot, &book, &patient] {
            assert!(party.handler_for(refused).is_none(), "{refused}");
            assert!(party.unusable_for(refused).is_some(), "{refused}");
        }
        assert!(party.handler_for(mcci).is_none());
        assert_eq!(
            party.fqdns().collect::<Vec<_>>(),
            ["localhost", "vpn.example"]
        );
        assert_eq!(index.warnings.len(), 4, "{:#?}", index.warnings);
        assert_eq!(
            index.warnings[0],
            format!(
                "line 20: entry uniqueIdentifier=s1,ou=services,o=nhs: {slot}: message handler \
                 s1: nhsMHSEndPoint \"{ENDPOINT}/\": {}: the interaction is refused for this \
                 party (403)",
                super::super::UNFORWARDABLE_ENDPOINT
            )
        );
        assert!(
            index.warnings[1].starts_with(&format!(
                "lines 31, 42: {book}: message handlers b1, b2: 2 message handlers for one \
                 interaction under party key P-1"
            )),
            "{}",
            index.warnings[1]
        );
        assert!(
            index.warnings[2].starts_with(&format!(
                "line 53: entry uniqueIdentifier=p1,ou=services,o=nhs: {patient}: message \
                 handler p1: 2 nhsMHSEndPoint values"
            )),
            "{}",
            index.warnings[2]
        );
        assert_eq!(
            index.warnings[3],
            format!(
                "line 76: entry uniqueIdentifier=o2,ou=services,o=nhs: message handler o2 \
                 ({mcci}): nhsMhsFQDN: missing: its FQDN is not one a client certificate may \
                 present"
            )
        );
    }

    /// Attributes written by numeric OID are the attributes themselves, as slapd stores them:
    /// a second handler whose `objectClass` is written `2.5.4.0` makes two handlers for the
    /// interaction, and an `nhsMHSEndPoint` written `1.2.826.0.1285.0.2.1.84` a second
    /// endpoint: each interaction is unusable, as on LDAP (before, both were not seen, and
    /// the first handler was used).
    #[test]
    fn attributes_written_by_oid_count_with_their_named_values() {
        let slot = format!("{GPC}fhir:rest:search:slot-1");
        let patient = format!("{GPC}fhir:rest:read:patient-1");
        let text = [
            as_entry("1", "P-1", "")
                .replace("uniqueIdentifier: 1\n", "0.9.2342.19200300.100.1.44: 1\n"),
            mhs_entry("s1", "P-1", &slot, ""),
            mhs_entry("s2", "P-1", &slot, "").replace("objectClass: nhsMhs", "2.5.4.0: nhsMhs"),
            mhs_entry(
                "p1",
                "P-1",
                &patient,
                "1.2.826.0.1285.0.2.1.84: https://localhost:9443/other\n",
            ),
        ]
        .join("\n");
        let index = model(&text).unwrap();
        assert_eq!(index.stats.handlers, 3);
        let party = index
            .party("1")
            .expect("the ASID written by OID is registered");
        for interaction in [&slot, &patient] {
            assert!(party.handler_for(interaction).is_none(), "{interaction}");
            assert!(party.unusable_for(interaction).is_some(), "{interaction}");
        }
        assert!(index.warnings[0].contains("2 message handlers for one interaction"));
        assert!(index.warnings[1].contains("2 nhsMHSEndPoint values"));
    }

    /// A party with tens of thousands of unusable message handlers (here 20,000 with no
    /// `nhsMhsFQDN`, as a 38 MB file under the size limit can hold 48,000) loads with one
    /// warning per handler naming its own line. Each warning is matched to its record through
    /// an index built once per party (`Places`), not by scanning the party's records for each
    /// warning, which made loading such a file quadratic (93 s for 48,000 in a debug build).
    #[test]
    fn many_unusable_handlers_each_name_their_own_line() {
        const HANDLERS: usize = 20_000;
        let mcci = "urn:nhs:names:services:psis:MCCI_IN010000UK13";
        let mut text = as_entry("1", "P-1", "");
        for i in 0..HANDLERS {
            text.push('\n');
            text.push_str(
                &mhs_entry(&format!("m{i}"), "P-1", mcci, "")
                    .replace("nhsMhsFQDN: localhost\n", ""),
            );
        }
        let records = parse_records(&text).unwrap();
        let index = build_index(&records, &Requestable::builtin()).unwrap();
        assert_eq!(index.stats.handlers, HANDLERS);
        assert_eq!(index.warnings.len(), HANDLERS);
        for (warning, record) in index.warnings.iter().zip(&records[1..]) {
            let expected = format!(
                "line {}: entry {}: message handler ",
                record.line, record.dn
            );
            assert!(warning.starts_with(&expected), "{warning}");
        }
    }

    /// Message handlers sharing an MHS id and interaction (distinct DNs) each have their own
    /// unreadable FQDN: each warning names its own line, not every line with that id (which
    /// made the warnings, as well as the time to find them, grow with the square of such
    /// records).
    #[test]
    fn unusable_fqdns_of_handlers_sharing_an_id_name_their_own_line() {
        let mcci = "urn:nhs:names:services:psis:MCCI_IN010000UK13";
        let mut text = as_entry("1", "P-1", "");
        for ou in ["a", "b", "c"] {
            text.push('\n');
            text.push_str(
                &mhs_entry("dup", "P-1", mcci, "")
                    .replace("nhsMhsFQDN: localhost\n", "")
                    .replace(",ou=services,", &format!(",ou={ou},ou=services,")),
            );
        }
        let index = model(&text).unwrap();
        let lines: Vec<_> = index
            .warnings
            .iter()
            .map(|w| w.split(':').next().unwrap_or_default())
            .collect();
        assert_eq!(
            lines,
            ["line 9", "line 19", "line 29"],
            "{:#?}",
            index.warnings
        );
    }

    /// An AS record joins the MHS records of its party key (ignoring case) AND its ODS code
    /// (exactly, as slapd's filter on `nhsIDCode`, `caseExactMatch`, and the FHIR API's
    /// `/Endpoint` search do): an MHS record of another organisation under the same party key,
    /// or of its ODS code in another case, adds no endpoint and no FQDN.
    #[test]
    fn the_ods_code_joins_as_records_to_mhs_records_too() {
        let metadata = format!("{GPC}fhir:rest:read:metadata-1");
        let slot = format!("{GPC}fhir:rest:search:slot-1");
        let text = format!(
            "{}\n{}\n{}\n{}",
            as_entry("1", "P-1", ""),
            mhs_entry("m1", "P-1", &metadata, ""),
            mhs_entry("s1", "P-1", &slot, "")
                .replace("nhsIDCode: B82617", "nhsIDCode: X99999")
                .replace("nhsMhsFQDN: localhost", "nhsMhsFQDN: rogue.example"),
            mhs_entry("s2", "P-1", &slot, "")
                .replace("nhsIDCode: B82617", "nhsIDCode: b82617")
                .replace("nhsMhsFQDN: localhost", "nhsMhsFQDN: lower.example"),
        );
        let index = model(&text).unwrap();
        let party = index.party("1").unwrap();
        assert_eq!(
            party
                .handlers
                .iter()
                .map(|h| h.id.as_str())
                .collect::<Vec<_>>(),
            ["m1"]
        );
        assert!(party.handler_for(&slot).is_none());
        assert!(!party.has_fqdn("rogue.example"));
        assert!(
            !party.has_fqdn("lower.example"),
            "the ODS code is case-exact"
        );
        assert!(index.warnings.is_empty(), "{:?}", index.warnings);
    }

    #[test]
    fn an_entry_cannot_be_both_classes() {
        let text = as_entry("1", "P-1", "objectClass: nhsMhs\n");
        assert_eq!(
            model_err(&text),
            ModelError::BothClasses {
                dn: "uniqueIdentifier=1,ou=services,o=nhs".into(),
                line: 1
            }
        );
    }

    // ---- the shipped development world ----------------------------------------------------

    const PROVIDER: &str = "918999198993";
    const CONSUMER: &str = "200000000359";
    const READ_ONLY: &str = "200000000360";

    fn gpc_interactions() -> Vec<String> {
        [
            "fhir:rest:read:metadata-1",
            "fhir:rest:search:patient-1",
            "fhir:rest:read:patient-1",
            "fhir:rest:search:practitioner-1",
            "fhir:rest:read:practitioner-1",
            "fhir:rest:search:organization-1",
            "fhir:rest:read:organization-1",
            "fhir:rest:read:location-1",
            "fhir:operation:gpc.registerpatient-1",
            "fhir:rest:search:slot-1",
            "fhir:rest:create:appointment-1",
            "fhir:rest:read:appointment-1",
            "fhir:rest:update:appointment-1",
            "fhir:rest:cancel:appointment-1",
            "fhir:rest:search:patient_appointments-1",
        ]
        .iter()
        .map(|i| format!("{GPC}{i}"))
        .collect()
    }

    fn shipped() -> LdifBackend {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/directory.ldif");
        LdifBackend::from_path(&path).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn shipped_file_and_embedded_copy_load_the_same_world() {
        let from_file = shipped();
        let embedded = LdifBackend::development_world().unwrap();
        let expected = Stats {
            entries: 22,
            systems: 3,
            handlers: 17,
            warnings: 0,
        };
        assert_eq!(from_file.stats(), expected);
        assert_eq!(embedded.stats(), expected);
        for asid in [PROVIDER, CONSUMER, READ_ONLY] {
            assert_eq!(from_file.lookup(asid), embedded.lookup(asid));
        }
    }

    #[test]
    fn shipped_provider_has_one_handler_per_interaction_at_the_mock_endpoint() {
        let provider = shipped().lookup(PROVIDER).unwrap();
        assert_eq!(provider.system.ods_code, "B82617");
        assert_eq!(provider.system.party_key, "B82617-0000806");
        assert_eq!(
            provider.system.product_name.as_deref(),
            Some("ssp-gateway mock provider")
        );
        assert_eq!(provider.system.interactions, gpc_interactions());
        assert_eq!(provider.handlers.len(), 15);
        let mut cpa_ids = std::collections::HashSet::new();
        for interaction in gpc_interactions() {
            assert!(provider.may(&interaction));
            let handler = provider.handler_for(&interaction).unwrap();
            assert_eq!(handler.endpoint, ENDPOINT);
            assert_eq!(handler.fqdn, "localhost");
            assert_eq!(handler.party_key, "B82617-0000806");
            assert_eq!(handler.cpa_id, handler.id);
            assert_eq!(handler.cpa_id.len(), 20);
            assert!(handler.cpa_id.bytes().all(|b| b.is_ascii_hexdigit()));
            assert!(
                cpa_ids.insert(handler.cpa_id.clone()),
                "CPA ids must be distinct"
            );
        }
        assert_eq!(provider.fqdns().collect::<Vec<_>>(), ["localhost"]);
    }

    #[test]
    fn shipped_consumers_have_their_fqdn_and_interactions() {
        let world = shipped();
        let consumer = world.lookup(CONSUMER).unwrap();
        assert_eq!(consumer.system.party_key, "A20047-821870");
        assert_eq!(consumer.system.interactions, gpc_interactions());
        assert_eq!(consumer.fqdns().collect::<Vec<_>>(), ["consumer.dev.local"]);
        assert!(consumer.has_fqdn("Consumer.Dev.Local"));
        assert!(!consumer.has_fqdn("readonly.dev.local"));
        assert!(!consumer.has_fqdn("rogue.dev.local"));
        assert!(
            gpc_interactions()
                .iter()
                .all(|i| consumer.handler_for(i).is_none()),
            "consumers register no GP Connect endpoint"
        );

        let read_only = world.lookup(READ_ONLY).unwrap();
        assert_eq!(read_only.system.party_key, "A20048-000001");
        let expected: Vec<_> = [
            "fhir:rest:read:metadata-1",
            "fhir:rest:search:patient-1",
            "fhir:rest:read:patient-1",
            "fhir:rest:search:slot-1",
            "fhir:rest:read:appointment-1",
            "fhir:rest:search:patient_appointments-1",
        ]
        .iter()
        .map(|i| format!("{GPC}{i}"))
        .collect();
        assert_eq!(read_only.system.interactions, expected);
        assert!(!read_only.may(&format!("{GPC}fhir:rest:create:appointment-1")));
        assert_eq!(
            read_only.fqdns().collect::<Vec<_>>(),
            ["readonly.dev.local"]
        );
    }

    #[tokio::test]
    async fn shipped_world_answers_unknown_asids_with_none() {
        let world = shipped();
        assert_eq!(world.name(), "ldif");
        for asid in [
            "999999999999",
            "",
            "918999198993 ",
            " 918999198993",
            "91899919899",
            "B82617",
        ] {
            assert_eq!(
                DirectoryBackend::party(&world, asid).await.unwrap(),
                None,
                "{asid:?}"
            );
        }
        let found = DirectoryBackend::party(&world, PROVIDER).await.unwrap();
        assert_eq!(found.map(|p| p.system.asid), Some(PROVIDER.to_owned()));
    }

    // ---- loading and reloading ------------------------------------------------------------

    /// A file in the temp directory, removed on drop.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(contents: &str) -> Self {
            let path = std::env::temp_dir()
                .join(format!("ssp-gateway-ldif-{}.ldif", uuid::Uuid::new_v4()));
            std::fs::write(&path, contents).unwrap();
            Self(path)
        }

        fn write(&self, contents: &str) {
            std::fs::write(&self.0, contents).unwrap();
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn reload_swaps_in_new_data_and_keeps_the_old_on_a_broken_file() {
        let file = TempFile::new(&as_entry("1", "P-1", ""));
        let backend = LdifBackend::from_path(&file.0).unwrap();
        assert!(backend.lookup("1").is_some());

        file.write("dn: o=nhs\nthis is not ldif\n");
        let err = backend.reload().unwrap_err();
        assert!(matches!(err, LdifLoadError::Syntax { .. }), "{err}");
        assert!(
            err.to_string()
                .starts_with(&format!("{}: line 2: ", file.0.display())),
            "{err}"
        );
        assert!(
            backend.lookup("1").is_some(),
            "old data must stay after a syntax error"
        );

        file.write(&format!(
            "{}\n{}",
            as_entry("1", "P-1", ""),
            as_entry("1", "P-1", "")
        ));
        assert!(matches!(
            backend.reload().unwrap_err(),
            LdifLoadError::Model { .. }
        ));
        assert!(
            backend.lookup("1").is_some(),
            "old data must stay after a model error"
        );

        // Emptied (truncated, or caught between cp's truncate and its write): refused.
        // (A file with CR-only line ends after a `#` is one long comment.)
        let cr_only = format!(
            "# SDS export\r{}",
            as_entry("1", "P-1", "").replace('\n', "\r")
        );
        for emptied in ["", "dn: o=nhs\nobjectClass: top\n", cr_only.as_str()] {
            file.write(emptied);
            let err = backend.reload().unwrap_err();
            assert!(
                matches!(err, LdifLoadError::Emptied { in_service: 1, .. }),
                "{emptied:?}: {err}"
            );
            assert!(backend.lookup("1").is_some(), "{emptied:?}");
        }

        // A file cut short mid-line (a copy or a write still running) is refused, even when the
        // entries before the cut make a valid directory; the same file finished is loaded.
        let two = format!("{}\n{}", as_entry("1", "P-1", ""), as_entry("3", "P-3", ""));
        file.write(two.trim_end_matches('\n'));
        let err = backend.reload().unwrap_err();
        assert!(matches!(err, LdifLoadError::Unfinished { .. }), "{err}");
        assert!(
            err.to_string().contains("does not end with a newline"),
            "{err}"
        );
        assert!(backend.lookup("3").is_none(), "the old data stays");
        file.write(&two);
        assert_eq!(backend.reload().unwrap().systems, 2);
        assert!(backend.lookup("3").is_some());

        // Every message handler gone while the systems stay (a file ordered handlers first,
        // caught mid-write): refused too, not a directory where no request can go anywhere.
        let interaction = format!("{GPC}fhir:rest:search:slot-1");
        file.write(&format!(
            "{}\n{}",
            as_entry("1", "P-1", ""),
            mhs_entry("ab", "P-1", &interaction, "")
        ));
        assert_eq!(backend.reload().unwrap().handlers, 1);
        file.write(&as_entry("1", "P-1", ""));
        let err = backend.reload().unwrap_err();
        assert!(
            matches!(err, LdifLoadError::Emptied { what, in_service: 1, .. } if what.contains("nhsMhs")),
            "{err}"
        );
        assert_eq!(backend.stats().handlers, 1);

        file.write(&format!(
            "{}\n{}",
            as_entry("2", "P-2", ""),
            mhs_entry("cd", "P-2", &interaction, "")
        ));
        assert_eq!(
            backend.reload().unwrap(),
            Stats {
                entries: 2,
                systems: 1,
                handlers: 1,
                warnings: 0
            }
        );
        assert!(backend.lookup("1").is_none());
        assert!(backend.lookup("2").is_some());

        std::fs::remove_file(&file.0).unwrap();
        assert!(matches!(
            backend.reload().unwrap_err(),
            LdifLoadError::Io { .. }
        ));
        assert!(
            backend.lookup("2").is_some(),
            "old data must stay when the file is gone"
        );
    }

    #[test]
    fn load_errors_name_the_file() {
        let missing =
            std::env::temp_dir().join(format!("ssp-gateway-missing-{}.ldif", uuid::Uuid::new_v4()));
        let err = LdifBackend::from_path(&missing).unwrap_err();
        assert!(
            err.to_string().contains(&missing.display().to_string()),
            "{err}"
        );

        let err = LdifBackend::parse("dn: o=nhs\n", "inline test").unwrap_err();
        assert_eq!(
            err.to_string(),
            "inline test: line 1: entry o=nhs has no attributes"
        );

        let text = LdifBackend::parse(&as_entry("1", "P-1", ""), "inline").unwrap();
        assert!(matches!(
            text.reload().unwrap_err(),
            LdifLoadError::NotReloadable { .. }
        ));
    }

    #[test]
    fn oversized_files_are_refused_before_reading() {
        let file = TempFile::new("");
        // A sparse file: no disk space used, but its length is over the limit.
        std::fs::File::options()
            .write(true)
            .open(&file.0)
            .unwrap()
            .set_len(MAX_LDIF_BYTES + 1)
            .unwrap();
        let err = LdifBackend::from_path(&file.0).unwrap_err();
        assert!(
            matches!(
                err,
                LdifLoadError::TooLarge {
                    limit: MAX_LDIF_BYTES,
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string().contains(&file.0.display().to_string()),
            "{err}"
        );
    }

    // ---- fuzz ------------------------------------------------------------------------------

    /// LDIF-ish text: lines built from the tokens that drive the parser's branches.
    fn ldif_like() -> impl Strategy<Value = String> {
        let token = prop::sample::select(vec![
            "dn",
            "DN",
            "objectClass",
            "nhsAs",
            "nhsMhs",
            "uniqueIdentifier",
            "nhsMHSPartyKey",
            "nhsIDCode",
            "nhsMhsSvcIA",
            "nhsMHSEndPoint",
            "nhsMhsFQDN",
            "nhsMhsCPAId",
            "version",
            "changetype",
            "1",
            "x",
            ":",
            "::",
            ":<",
            ": ",
            ";",
            " ",
            "#",
            "\n",
            "\r\n",
            "\n\n",
            "\n ",
            "=",
            "AAAA",
            "/w==",
            "é",
            "\0",
        ]);
        prop::collection::vec(token, 0..80).prop_map(|parts| parts.concat())
    }

    proptest! {
        #[test]
        fn parser_never_panics_on_arbitrary_text(text in ".*") {
            if let Ok(records) = parse_records(&text) {
                let _ = build_index(&records, &Requestable::builtin());
            }
        }

        #[test]
        fn parser_never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_records_bytes(&bytes);
        }

        #[test]
        fn parser_and_model_never_panic_on_ldif_like_text(text in ldif_like()) {
            match parse_records(&text) {
                Ok(records) => { let _ = build_index(&records, &Requestable::builtin()); }
                Err(e) => prop_assert!(e.line >= 1 && e.line <= text.split('\n').count()),
            }
        }
    }
}
