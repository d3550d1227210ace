//! The interaction catalogue: which `Ssp-InteractionID`s exist, with their method, FHIR path
//! template and allowed JWT scopes. It is data (`config/interactions.toml`), loaded and
//! validated here (every problem reported at once), then used on the hot path to check that a
//! request matches the interaction it declares. No I/O beyond reading the file in `load`.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use http::Method;

use super::envelope::{is_interaction_id, Target};
use super::outcome::Rejection;

/// The JWT `requested_scope` values an interaction may allow.
pub const ALLOWED_SCOPES: [&str; 4] = [
    "patient/*.read",
    "patient/*.write",
    "organization/*.read",
    "organization/*.write",
];

/// The catalogue shipped with the gateway (`config/interactions.toml`), compiled in.
pub const BUILTIN_TOML: &str = include_str!("../../config/interactions.toml");

const KEYS: [&str; 6] = ["id", "name", "method", "path", "scopes", "description"];
const MAX_NAME_LEN: usize = 64;
const MAX_FHIR_ID_LEN: usize = 64;

/// One interaction: an `Ssp-InteractionID` and what a request declaring it must look like.
#[derive(Debug, Clone)]
pub struct Interaction {
    /// The interaction URN, e.g. `urn:nhs:names:services:gpconnect:fhir:rest:search:slot-1`.
    pub id: String,
    /// Short snake_case label for metrics and logs, e.g. `search_slot`.
    pub name: String,
    /// The only method this interaction uses.
    pub method: Method,
    /// The JWT `requested_scope` values allowed.
    pub scopes: Vec<String>,
    /// Human description for operators.
    pub description: String,
    path: String,
    template: Template,
}

/// A request matched against an interaction: the target split at the template's suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Matched<'t> {
    /// The target URL before the matched suffix (no trailing `/`): the caller requires it to
    /// equal the receiver's registered endpoint byte for byte.
    pub base: &'t str,
    /// The matched relative FHIR path (no leading `/`, no query), e.g. `Appointment/53`.
    pub relative: &'t str,
}

impl Interaction {
    /// The path template after the endpoint's base, as configured (`Appointment/{id}`).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The path template as written in the catalogue, e.g. `Patient/{id}/Appointment`.
    pub fn path_template(&self) -> &str {
        &self.path
    }

    /// Whether `scope` is one of this interaction's allowed JWT scopes.
    pub fn allows_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope)
    }

    /// Check the request's method and target against this interaction: the method must be this
    /// interaction's and the target path must end with `/` + an instance of the template.
    pub fn match_request<'t>(
        &self,
        method: &Method,
        target: &'t Target,
    ) -> Result<Matched<'t>, Rejection> {
        if *method != self.method {
            return Err(self.mismatch(method, target));
        }
        self.match_path(method, target)
    }

    /// For a CORS preflight: the target path alone against the template (the request is
    /// `OPTIONS`, whatever method the interaction uses); a mismatch names the request as it
    /// was, `INTERACTION_<id>_DOES_NOT_MATCH_REQUEST_OPTIONS_<path>`.
    pub fn match_preflight<'t>(&self, target: &'t Target) -> Result<Matched<'t>, Rejection> {
        self.match_path(&Method::OPTIONS, target)
    }

    fn mismatch(&self, method: &Method, target: &Target) -> Rejection {
        Rejection::InteractionMismatch {
            id: self.id.clone(),
            method: method.as_str().to_owned(),
            path: target.path().to_owned(),
        }
    }

    /// The template against the target path; `method` is the request's, for the token.
    fn match_path<'t>(
        &self,
        method: &Method,
        target: &'t Target,
    ) -> Result<Matched<'t>, Rejection> {
        let path = target.path();
        let slash = self
            .template
            .match_suffix(path)
            .ok_or_else(|| self.mismatch(method, target))?;
        let url = target.without_query();
        // `path` is a suffix of `url`; `slash` indexes the `/` before the match within `path`.
        let split = url.len() - path.len() + slash;
        Ok(Matched {
            base: &url[..split],
            relative: &url[split + 1..],
        })
    }
}

/// A path template, compiled: literal segments and `{id}` parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Template {
    segments: Box<[Segment]>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(Box<str>),
    Id,
}

impl Template {
    /// Compile a template, or say why it is invalid.
    fn compile(text: &str) -> Result<Template, String> {
        if text.is_empty() {
            return Err("empty path template".to_owned());
        }
        if text.starts_with('/') || text.ends_with('/') {
            return Err(format!(
                "path template {text:?} must not start or end with \"/\""
            ));
        }
        let mut segments = Vec::new();
        for segment in text.split('/') {
            segments.push(match segment {
                "" => return Err(format!("path template {text:?} has an empty segment")),
                "." | ".." => {
                    return Err(format!(
                        "path template {text:?} has a dot segment {segment:?}"
                    ))
                }
                "{id}" => Segment::Id,
                literal if literal.bytes().all(crate::ssp::envelope::is_pchar_byte) => {
                    Segment::Literal(literal.into())
                }
                other => {
                    return Err(format!(
                        "path template {text:?}: segment {other:?} is neither \"{{id}}\" nor a \
                         literal of letters, digits and - . _ ~ ! $ & ' ( ) * + , ; = : @"
                    ))
                }
            });
        }
        Ok(Template {
            segments: segments.into_boxed_slice(),
        })
    }

    /// If `path` (starting with `/`) ends with `/` + an instance of this template, the index of
    /// that `/` in `path`.
    fn match_suffix(&self, path: &str) -> Option<usize> {
        let mut end = path.len();
        for segment in self.segments.iter().rev() {
            let slash = path[..end].rfind('/')?;
            let text = &path[slash + 1..end];
            let ok = match segment {
                Segment::Literal(literal) => text == &**literal,
                Segment::Id => is_fhir_id(text),
            };
            if !ok {
                return None;
            }
            end = slash;
        }
        Some(end)
    }
}

/// A FHIR logical id: `[A-Za-z0-9\-\.]{1,64}`, never `.` or `..`.
pub fn is_fhir_id(text: &str) -> bool {
    (1..=MAX_FHIR_ID_LEN).contains(&text.len())
        && text != "."
        && text != ".."
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// The validated interaction catalogue.
#[derive(Debug, Clone)]
pub struct Catalogue {
    interactions: Vec<Interaction>,
    by_id: HashMap<String, usize>,
}

impl Catalogue {
    /// Parse and validate a catalogue. `source_name` (usually the file path) prefixes errors.
    /// Every problem in the text is reported at once.
    pub fn from_toml_str(text: &str, source_name: &str) -> Result<Catalogue, CatalogueError> {
        let table: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| CatalogueError::Syntax {
                    source_name: source_name.to_owned(),
                    message: e.to_string().trim_end().to_owned(),
                })?;
        let mut problems = Vec::new();
        let interactions = validate(&table, &mut problems);
        if !problems.is_empty() {
            return Err(CatalogueError::Invalid {
                source_name: source_name.to_owned(),
                problems,
            });
        }
        let by_id = interactions
            .iter()
            .enumerate()
            .map(|(i, interaction)| (interaction.id.clone(), i))
            .collect();
        Ok(Catalogue {
            interactions,
            by_id,
        })
    }

    /// Read and validate a catalogue file.
    pub fn load(path: &Path) -> Result<Catalogue, CatalogueError> {
        let text = crate::files::read_to_string(path).map_err(|source| CatalogueError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Catalogue::from_toml_str(&text, &path.display().to_string())
    }

    /// The catalogue shipped with the gateway ([`BUILTIN_TOML`]).
    pub fn builtin() -> Catalogue {
        Catalogue::from_toml_str(BUILTIN_TOML, "config/interactions.toml (built in)")
            .expect("the shipped catalogue is valid: checked by the builtin_catalogue test")
    }

    /// The interaction with this exact id.
    pub fn get(&self, id: &str) -> Option<&Interaction> {
        self.by_id.get(id).map(|&i| &self.interactions[i])
    }

    /// All interactions, in file order.
    pub fn iter(&self) -> std::slice::Iter<'_, Interaction> {
        self.interactions.iter()
    }

    /// The number of interactions.
    pub fn len(&self) -> usize {
        self.interactions.len()
    }

    /// Whether the catalogue is empty (never true for a validated catalogue).
    pub fn is_empty(&self) -> bool {
        self.interactions.is_empty()
    }

    /// The distinct methods of every interaction whose template matches the end of the
    /// target's path, in catalogue order (the CORS preflight answer: `Appointment/{id}` gives
    /// GET and PUT).
    pub fn methods_for_target(&self, target: &Target) -> Vec<Method> {
        let path = target.path();
        let mut methods: Vec<Method> = Vec::with_capacity(3);
        for interaction in &self.interactions {
            if !methods.contains(&interaction.method)
                && interaction.template.match_suffix(path).is_some()
            {
                methods.push(interaction.method.clone());
            }
        }
        methods
    }

    /// The `Allow` of `target`: the methods some interaction takes on its path, then OPTIONS
    /// (the CORS preflight, answered on every such path); empty when no interaction has the
    /// path (RFC 9110 §10.2.1: no method is allowed there).
    pub fn allow_for_target(&self, target: &Target) -> String {
        let mut allow = self.methods_text(target);
        if !allow.is_empty() {
            allow.push_str(", OPTIONS");
        }
        allow
    }

    /// The methods some interaction takes on `target`'s path, as a list (`GET, PUT`; what a
    /// preflight answers), empty when none does.
    pub fn methods_text(&self, target: &Target) -> String {
        let mut text = String::with_capacity(24);
        for method in self.methods_for_target(target) {
            if !text.is_empty() {
                text.push_str(", ");
            }
            text.push_str(method.as_str());
        }
        text
    }
}

impl<'a> IntoIterator for &'a Catalogue {
    type Item = &'a Interaction;
    type IntoIter = std::slice::Iter<'a, Interaction>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// Why a catalogue could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum CatalogueError {
    /// The file could not be read.
    #[error("{path}: cannot read the interaction catalogue: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The text is not TOML.
    #[error("{source_name}: not valid TOML: {message}")]
    Syntax {
        source_name: String,
        message: String,
    },
    /// The TOML is well formed but has problems; all of them are listed.
    #[error(
        "{source_name}: {count} problem(s) in the interaction catalogue:{list}",
        count = .problems.len(),
        list = ProblemList(.problems)
    )]
    Invalid {
        source_name: String,
        problems: Vec<CatalogueProblem>,
    },
}

/// One problem in a catalogue file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogueProblem {
    /// The `[[interaction]]` entry, counted from 1 in file order; `None` for the file itself.
    pub entry: Option<usize>,
    /// The entry's `id`, when it has a readable one.
    pub id: Option<String>,
    /// The key at fault (`interaction` for problems with the list itself).
    pub key: String,
    /// What is wrong, for an operator.
    pub reason: String,
}

impl fmt::Display for CatalogueProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.entry, &self.id) {
            (Some(n), Some(id)) => write!(f, "[[interaction]] #{n} (id {id:?}): ")?,
            (Some(n), None) => write!(f, "[[interaction]] #{n}: ")?,
            (None, _) => {}
        }
        write!(f, "key {:?}: {}", self.key, self.reason)
    }
}

struct ProblemList<'a>(&'a [CatalogueProblem]);

impl fmt::Display for ProblemList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for problem in self.0 {
            write!(f, "\n  - {problem}")?;
        }
        Ok(())
    }
}

/// Validate the parsed file; push every problem; return the interactions that were valid.
fn validate(table: &toml::Table, problems: &mut Vec<CatalogueProblem>) -> Vec<Interaction> {
    let file_problem = |key: &str, reason: String| CatalogueProblem {
        entry: None,
        id: None,
        key: key.to_owned(),
        reason,
    };
    for key in table.keys().filter(|k| k.as_str() != "interaction") {
        problems.push(file_problem(
            key,
            "unknown key (the file holds only [[interaction]] entries)".to_owned(),
        ));
    }
    let entries: &[toml::Value] = match table.get("interaction") {
        None => &[],
        Some(toml::Value::Array(entries)) => entries,
        Some(_) => {
            problems.push(file_problem(
                "interaction",
                "must be an array of tables, written [[interaction]]".to_owned(),
            ));
            return Vec::new();
        }
    };
    if entries.is_empty() {
        problems.push(file_problem(
            "interaction",
            "no interactions defined".to_owned(),
        ));
    }

    let mut interactions = Vec::with_capacity(entries.len());
    let mut ids: HashMap<&str, usize> = HashMap::new();
    let mut names: HashMap<&str, usize> = HashMap::new();
    for (index, value) in entries.iter().enumerate() {
        let mut entry = Entry {
            number: index + 1,
            id: None,
            problems,
        };
        let toml::Value::Table(fields) = value else {
            entry.problem("interaction", "each entry must be a table".to_owned());
            continue;
        };
        if let Some(interaction) = entry.check(fields, &mut ids, &mut names) {
            interactions.push(interaction);
        }
    }
    interactions
}

/// Checking one `[[interaction]]` entry.
struct Entry<'p> {
    number: usize,
    id: Option<String>,
    problems: &'p mut Vec<CatalogueProblem>,
}

impl Entry<'_> {
    fn problem(&mut self, key: &str, reason: String) {
        self.problems.push(CatalogueProblem {
            entry: Some(self.number),
            id: self.id.clone(),
            key: key.to_owned(),
            reason,
        });
    }

    /// A required string key, reported when missing or not a string.
    fn string<'t>(&mut self, fields: &'t toml::Table, key: &str) -> Option<&'t str> {
        match fields.get(key) {
            None => {
                self.problem(key, "missing".to_owned());
                None
            }
            Some(toml::Value::String(s)) => Some(s),
            Some(other) => {
                self.problem(key, format!("must be a string, not {}", other.type_str()));
                None
            }
        }
    }

    fn check<'t>(
        &mut self,
        fields: &'t toml::Table,
        ids: &mut HashMap<&'t str, usize>,
        names: &mut HashMap<&'t str, usize>,
    ) -> Option<Interaction> {
        // Name the entry by its id in every report, when it has a string one.
        self.id = fields
            .get("id")
            .and_then(toml::Value::as_str)
            .map(str::to_owned);
        let before = self.problems.len();

        for key in fields.keys().filter(|k| !KEYS.contains(&k.as_str())) {
            self.problem(key, format!("unknown key (allowed: {})", KEYS.join(", ")));
        }

        let id = self.string(fields, "id");
        if let Some(id) = id {
            if !id.starts_with("urn:") || !is_interaction_id(id) {
                self.problem(
                    "id",
                    "must be a URN (\"urn:...\") of 1 to 256 printable ASCII characters without spaces"
                        .to_owned(),
                );
            } else if let Some(first) = ids.insert(id, self.number) {
                ids.insert(id, first);
                self.problem(
                    "id",
                    format!("duplicate id: already used by [[interaction]] #{first}"),
                );
            }
        }

        let name = self.string(fields, "name");
        if let Some(name) = name {
            if !is_metric_name(name) {
                self.problem(
                    "name",
                    format!(
                        "{name:?} must be snake_case ([a-z][a-z0-9_]*, at most {MAX_NAME_LEN} characters)"
                    ),
                );
            } else if let Some(first) = names.insert(name, self.number) {
                names.insert(name, first);
                self.problem(
                    "name",
                    format!("duplicate name {name:?}: already used by [[interaction]] #{first}"),
                );
            }
        }

        let method = match self.string(fields, "method") {
            Some("GET") => Some(Method::GET),
            Some("POST") => Some(Method::POST),
            Some("PUT") => Some(Method::PUT),
            Some(text) => {
                self.problem(
                    "method",
                    format!("unsupported method {text:?} (allowed: GET, POST, PUT)"),
                );
                None
            }
            None => None,
        };

        let template = match self.string(fields, "path") {
            Some(text) => match Template::compile(text) {
                Ok(template) => Some((text, template)),
                Err(reason) => {
                    self.problem("path", reason);
                    None
                }
            },
            None => None,
        };

        let scopes = self.scopes(fields);

        let description = self.string(fields, "description");
        if description.is_some_and(|d| d.trim().is_empty()) {
            self.problem("description", "must not be empty".to_owned());
        }

        if self.problems.len() != before {
            return None;
        }
        let (path, template) = template?;
        Some(Interaction {
            id: id?.to_owned(),
            name: name?.to_owned(),
            method: method?,
            scopes: scopes?,
            description: description?.to_owned(),
            path: path.to_owned(),
            template,
        })
    }

    fn scopes(&mut self, fields: &toml::Table) -> Option<Vec<String>> {
        let values = match fields.get("scopes") {
            None => {
                self.problem("scopes", "missing".to_owned());
                return None;
            }
            Some(toml::Value::Array(values)) => values,
            Some(other) => {
                self.problem(
                    "scopes",
                    format!("must be an array of strings, not {}", other.type_str()),
                );
                return None;
            }
        };
        if values.is_empty() {
            self.problem("scopes", "must list at least one scope".to_owned());
            return None;
        }
        let mut scopes: Vec<String> = Vec::with_capacity(values.len());
        let mut ok = true;
        for value in values {
            match value.as_str() {
                Some(scope) if !ALLOWED_SCOPES.contains(&scope) => {
                    self.problem(
                        "scopes",
                        format!(
                            "unknown scope {scope:?} (allowed: {})",
                            ALLOWED_SCOPES.join(", ")
                        ),
                    );
                    ok = false;
                }
                Some(scope) if scopes.iter().any(|s| s == scope) => {
                    self.problem("scopes", format!("scope {scope:?} listed twice"));
                    ok = false;
                }
                Some(scope) => scopes.push(scope.to_owned()),
                None => {
                    self.problem(
                        "scopes",
                        format!("must be an array of strings, found {}", value.type_str()),
                    );
                    ok = false;
                }
            }
        }
        ok.then_some(scopes)
    }
}

/// `[a-z][a-z0-9_]*`, at most 64 characters.
fn is_metric_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_NAME_LEN
        && bytes[0].is_ascii_lowercase()
        && bytes
            .iter()
            .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ssp::envelope::parse_target;
    use proptest::prelude::*;

    const BASE: &str = "https://localhost:9443/B82617/STU3/1/gpconnect";

    fn target(relative: &str) -> Target {
        parse_target(&format!("/{BASE}/{relative}")).expect("valid target")
    }

    #[test]
    fn builtin_catalogue_has_the_17_interactions_of_the_reference() {
        let catalogue = Catalogue::builtin();
        assert_eq!(catalogue.len(), 17);
        let from_file = Catalogue::load(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/config/interactions.toml"
        )))
        .expect("config/interactions.toml loads");
        assert_eq!(from_file.len(), 17);

        let p = "urn:nhs:names:services:gpconnect:";
        let expected: [(&str, &str, &str, &str); 17] = [
            (
                "fhir:rest:read:metadata-1",
                "GET",
                "metadata",
                "organization/*.read",
            ),
            (
                "fhir:rest:search:patient-1",
                "GET",
                "Patient",
                "patient/*.read",
            ),
            (
                "fhir:rest:read:patient-1",
                "GET",
                "Patient/{id}",
                "patient/*.read",
            ),
            (
                "fhir:rest:search:practitioner-1",
                "GET",
                "Practitioner",
                "organization/*.read",
            ),
            (
                "fhir:rest:read:practitioner-1",
                "GET",
                "Practitioner/{id}",
                "organization/*.read",
            ),
            (
                "fhir:rest:search:organization-1",
                "GET",
                "Organization",
                "organization/*.read",
            ),
            (
                "fhir:rest:read:organization-1",
                "GET",
                "Organization/{id}",
                "organization/*.read",
            ),
            (
                "fhir:rest:read:location-1",
                "GET",
                "Location/{id}",
                "organization/*.read",
            ),
            (
                "fhir:operation:gpc.registerpatient-1",
                "POST",
                "Patient/$gpc.registerpatient",
                "patient/*.write",
            ),
            (
                "fhir:rest:search:slot-1",
                "GET",
                "Slot",
                "organization/*.read",
            ),
            (
                "fhir:rest:create:appointment-1",
                "POST",
                "Appointment",
                "patient/*.write",
            ),
            (
                "fhir:rest:read:appointment-1",
                "GET",
                "Appointment/{id}",
                "patient/*.read",
            ),
            (
                "fhir:rest:update:appointment-1",
                "PUT",
                "Appointment/{id}",
                "patient/*.write",
            ),
            (
                "fhir:rest:cancel:appointment-1",
                "PUT",
                "Appointment/{id}",
                "patient/*.write",
            ),
            (
                "fhir:rest:search:patient_appointments-1",
                "GET",
                "Patient/{id}/Appointment",
                "patient/*.read",
            ),
            (
                "fhir:operation:gpc.getstructuredrecord-1",
                "POST",
                "Patient/$gpc.getstructuredrecord",
                "patient/*.read",
            ),
            (
                "structured:fhir:rest:read:metadata-1",
                "GET",
                "metadata",
                "organization/*.read",
            ),
        ];
        for (suffix, method, path, scope) in expected {
            let id = format!("{p}{suffix}");
            let interaction = catalogue.get(&id).unwrap_or_else(|| panic!("{id} missing"));
            assert_eq!(interaction.id, id);
            assert_eq!(interaction.method.as_str(), method, "{id}");
            assert_eq!(interaction.path_template(), path, "{id}");
            assert_eq!(interaction.scopes, vec![scope.to_owned()], "{id}");
            assert!(interaction.allows_scope(scope));
            assert!(!interaction.description.is_empty());
        }
        let names: std::collections::HashSet<_> = catalogue.iter().map(|i| &i.name).collect();
        assert_eq!(names.len(), 17);
        assert_eq!(
            catalogue
                .get(&format!("{p}fhir:rest:search:slot-1"))
                .map(|i| i.name.as_str()),
            Some("search_slot")
        );
        assert!(catalogue
            .get("urn:nhs:names:services:gpconnect:fhir:rest:search:slot-2")
            .is_none());
        assert_eq!((&catalogue).into_iter().count(), 17);
    }

    #[test]
    fn matches_each_interaction_and_splits_base_and_relative() {
        let catalogue = Catalogue::builtin();
        let p = "urn:nhs:names:services:gpconnect:fhir:";
        let cases = [
            (
                "rest:read:metadata-1",
                Method::GET,
                "metadata?_format=json",
                "metadata",
            ),
            (
                "rest:search:patient-1",
                Method::GET,
                "Patient?identifier=x%7C9000000009",
                "Patient",
            ),
            ("rest:read:patient-1", Method::GET, "Patient/2", "Patient/2"),
            (
                "rest:read:location-1",
                Method::GET,
                "Location/loc-1.a",
                "Location/loc-1.a",
            ),
            (
                "operation:gpc.registerpatient-1",
                Method::POST,
                "Patient/$gpc.registerpatient",
                "Patient/$gpc.registerpatient",
            ),
            (
                "rest:search:slot-1",
                Method::GET,
                "Slot?status=free",
                "Slot",
            ),
            (
                "rest:create:appointment-1",
                Method::POST,
                "Appointment",
                "Appointment",
            ),
            (
                "rest:read:appointment-1",
                Method::GET,
                "Appointment/53",
                "Appointment/53",
            ),
            (
                "rest:update:appointment-1",
                Method::PUT,
                "Appointment/53",
                "Appointment/53",
            ),
            (
                "rest:cancel:appointment-1",
                Method::PUT,
                "Appointment/53",
                "Appointment/53",
            ),
            (
                "rest:search:patient_appointments-1",
                Method::GET,
                "Patient/9000000009/Appointment?start=ge2025-06-01&start=le2025-06-14",
                "Patient/9000000009/Appointment",
            ),
        ];
        for (suffix, method, relative, matched) in cases {
            let interaction = catalogue.get(&format!("{p}{suffix}")).expect("known");
            let t = target(relative);
            let m = interaction.match_request(&method, &t).expect(suffix);
            assert_eq!(m.base, BASE, "{suffix}");
            assert_eq!(m.relative, matched, "{suffix}");
        }
    }

    #[test]
    fn mismatches_give_the_exact_token() {
        let catalogue = Catalogue::builtin();
        let slot = catalogue
            .get("urn:nhs:names:services:gpconnect:fhir:rest:search:slot-1")
            .expect("known");
        let t = target("Slot?status=free");
        let err = slot
            .match_request(&Method::POST, &t)
            .expect_err("wrong method");
        assert_eq!(
            err.token(),
            "INTERACTION_urn:nhs:names:services:gpconnect:fhir:rest:search:slot-1_DOES_NOT_MATCH_REQUEST_POST_/B82617/STU3/1/gpconnect/Slot"
        );
        for relative in ["slot", "Slots", "Slot/1", "Appointment", "XSlot"] {
            let t = target(relative);
            let err = slot.match_request(&Method::GET, &t).expect_err(relative);
            assert_eq!(
                err,
                Rejection::InteractionMismatch {
                    id: slot.id.clone(),
                    method: "GET".into(),
                    path: format!("/B82617/STU3/1/gpconnect/{relative}"),
                }
            );
        }
        let read = catalogue
            .get("urn:nhs:names:services:gpconnect:fhir:rest:read:appointment-1")
            .expect("known");
        for relative in [
            "Appointment",
            "appointment/1",
            "Appointment/a_b",
            "Appointment/a%41",
            "Appointment/1/x",
            "Appointment/$x",
        ] {
            assert!(
                read.match_request(&Method::GET, &target(relative)).is_err(),
                "{relative}"
            );
        }
        let long = "a".repeat(65);
        assert!(read
            .match_request(&Method::GET, &target(&format!("Appointment/{long}")))
            .is_err());
        assert!(read
            .match_request(
                &Method::GET,
                &target(&format!("Appointment/{}", &long[..64]))
            )
            .is_ok());
        // The whole path may be the template (the endpoint check then decides).
        let t = parse_target("/https://h/Slot").expect("valid");
        let m = slot.match_request(&Method::GET, &t).expect("matches");
        assert_eq!((m.base, m.relative), ("https://h", "Slot"));
    }

    #[test]
    fn fhir_ids() {
        for ok in ["1", "a", "A-b.c", "..."] {
            assert!(is_fhir_id(ok), "{ok}");
        }
        let long = "x".repeat(65);
        for bad in ["", ".", "..", "a_b", "a b", "é", "a/b", long.as_str()] {
            assert!(!is_fhir_id(bad), "{bad}");
        }
    }

    #[test]
    fn preflight_methods() {
        let catalogue = Catalogue::builtin();
        let cases: [(&str, &[Method]); 7] = [
            ("Appointment/53", &[Method::GET, Method::PUT]),
            ("Appointment", &[Method::POST]),
            ("Slot", &[Method::GET]),
            ("metadata", &[Method::GET]),
            ("Patient/$gpc.registerpatient", &[Method::POST]),
            ("Patient/$gpc.getstructuredrecord", &[Method::POST]),
            ("Nothing", &[]),
        ];
        for (relative, methods) in cases {
            assert_eq!(
                catalogue.methods_for_target(&target(relative)),
                methods,
                "{relative}"
            );
        }
        // `Patient/$gpc.registerpatient` is also a valid `Patient/{id}`? No: `$` is not an id char.
        assert_eq!(
            catalogue.methods_for_target(&target("Patient/9000000009")),
            vec![Method::GET]
        );
    }

    fn problems(text: &str) -> Vec<CatalogueProblem> {
        match Catalogue::from_toml_str(text, "test.toml") {
            Err(CatalogueError::Invalid { problems, .. }) => problems,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    fn has(problems: &[CatalogueProblem], entry: Option<usize>, key: &str, reason: &str) -> bool {
        problems
            .iter()
            .any(|p| p.entry == entry && p.key == key && p.reason.contains(reason))
    }

    #[test]
    fn every_catalogue_error_is_reported_together() {
        let text = r#"
            version = 2

            [[interaction]]
            id = "urn:a"
            name = "a"
            method = "GET"
            path = "Slot"
            scopes = ["organization/*.read"]
            description = "fine"

            [[interaction]]
            id = "urn:a"
            name = "a"
            method = "DELETE"
            path = "/Slot"
            scopes = ["system/*.read", "patient/*.read", "patient/*.read"]
            description = ""
            colour = "blue"

            [[interaction]]
            id = "not a urn"
            name = "Bad-Name"
            method = 1
            path = "Patient//x"
            scopes = []

            [[interaction]]
            name = "d"
            method = "get"
            path = "Patient/../x"
            scopes = "patient/*.read"
            description = "x"

            [[interaction]]
            id = "urn:e"
            name = "e"
            method = "POST"
            path = "Patient/{ID}"
            scopes = [1]
            description = "x"

            [[interaction]]
            id = "urn:f"
            name = "f"
            method = "PUT"
            path = ""
            description = "x"

            [[interaction]]
            id = "urn:g"
            name = "g"
            method = "GET"
            path = "Patient/a%2Fb"
            scopes = ["patient/*.read"]
            description = "x"
        "#;
        let p = problems(text);
        let expect: &[(Option<usize>, &str, &str)] = &[
            (None, "version", "unknown key"),
            (
                Some(2),
                "id",
                "duplicate id: already used by [[interaction]] #1",
            ),
            (Some(2), "name", "duplicate name \"a\""),
            (Some(2), "method", "unsupported method \"DELETE\""),
            (Some(2), "path", "must not start or end with"),
            (Some(2), "scopes", "unknown scope \"system/*.read\""),
            (Some(2), "scopes", "listed twice"),
            (Some(2), "description", "must not be empty"),
            (Some(2), "colour", "unknown key"),
            (Some(3), "id", "must be a URN"),
            (Some(3), "name", "snake_case"),
            (Some(3), "method", "must be a string, not integer"),
            (Some(3), "path", "empty segment"),
            (Some(3), "scopes", "at least one scope"),
            (Some(3), "description", "missing"),
            (Some(4), "id", "missing"),
            (Some(4), "method", "unsupported method \"get\""),
            (Some(4), "path", "dot segment"),
            (Some(4), "scopes", "must be an array of strings, not string"),
            (Some(5), "path", "neither \"{id}\" nor a literal"),
            (
                Some(5),
                "scopes",
                "must be an array of strings, found integer",
            ),
            (Some(6), "path", "empty path template"),
            (Some(6), "scopes", "missing"),
            (Some(7), "path", "neither \"{id}\" nor a literal"),
        ];
        for (entry, key, reason) in expect {
            assert!(
                has(&p, *entry, key, reason),
                "missing {entry:?} {key} {reason}: {p:#?}"
            );
        }
        assert_eq!(p.len(), expect.len(), "{p:#?}");
        // Reports name the entry's id when it has one.
        let dup = p
            .iter()
            .find(|x| x.entry == Some(2) && x.key == "method")
            .expect("dup");
        assert_eq!(dup.id.as_deref(), Some("urn:a"));
        // The rendered error carries source, entry, id, key and reason on one line each.
        let err = Catalogue::from_toml_str(text, "test.toml").expect_err("invalid");
        let message = err.to_string();
        assert!(message.starts_with(&format!("test.toml: {} problem(s)", expect.len())));
        assert!(message.contains(
            "\n  - [[interaction]] #2 (id \"urn:a\"): key \"method\": unsupported method \"DELETE\" (allowed: GET, POST, PUT)"
        ));
        assert!(message.contains("\n  - key \"version\": unknown key"));
    }

    #[test]
    fn catalogue_file_level_errors() {
        assert!(has(
            &problems(""),
            None,
            "interaction",
            "no interactions defined"
        ));
        assert!(has(
            &problems("interaction = []"),
            None,
            "interaction",
            "no interactions defined"
        ));
        assert!(has(
            &problems("interaction = 3"),
            None,
            "interaction",
            "must be an array of tables"
        ));
        assert!(has(
            &problems("interaction = [1]"),
            Some(1),
            "interaction",
            "must be a table"
        ));
        match Catalogue::from_toml_str("[[interaction]\n", "bad.toml") {
            Err(CatalogueError::Syntax { source_name, .. }) => assert_eq!(source_name, "bad.toml"),
            other => panic!("expected Syntax, got {other:?}"),
        }
        match Catalogue::load(Path::new("/nonexistent/interactions.toml")) {
            Err(e @ CatalogueError::Read { .. }) => {
                assert!(e
                    .to_string()
                    .starts_with("/nonexistent/interactions.toml: cannot read"))
            }
            other => panic!("expected Read, got {other:?}"),
        }
    }

    #[test]
    fn an_operator_can_add_an_interaction() {
        let text = format!(
            "{BUILTIN_TOML}\n[[interaction]]\nid = \"urn:nhs:names:services:gpconnect:documents:fhir:rest:search:documentreference-1\"\nname = \"search_documents\"\nmethod = \"GET\"\npath = \"Patient/{{id}}/DocumentReference\"\nscopes = [\"patient/*.read\"]\ndescription = \"Find documents\"\n"
        );
        let catalogue = Catalogue::from_toml_str(&text, "extended").expect("valid");
        assert_eq!(catalogue.len(), 18);
        let docs = catalogue
            .get("urn:nhs:names:services:gpconnect:documents:fhir:rest:search:documentreference-1")
            .expect("added");
        let t = target("Patient/2/DocumentReference?type=x");
        assert_eq!(
            docs.match_request(&Method::GET, &t)
                .expect("matches")
                .relative,
            "Patient/2/DocumentReference"
        );
    }

    fn segment() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("Slot".to_owned()),
            Just("Appointment".to_owned()),
            Just("Patient".to_owned()),
            Just("$gpc.registerpatient".to_owned()),
            Just("metadata".to_owned()),
            Just(".".to_owned()),
            Just("..".to_owned()),
            Just("%2e".to_owned()),
            Just(String::new()),
            "[A-Za-z0-9.\\-%]{1,6}",
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        #[test]
        fn matched_requests_split_exactly(
            segments in proptest::collection::vec(segment(), 1..7),
            query in proptest::option::of("[a-z=&%.]{0,8}"),
            method in prop_oneof![Just(Method::GET), Just(Method::POST), Just(Method::PUT)],
        ) {
            let catalogue = Catalogue::builtin();
            let mut raw = format!("/https://h.example/{}", segments.join("/"));
            if let Some(q) = &query {
                raw.push('?');
                raw.push_str(q);
            }
            if let Ok(t) = parse_target(&raw) {
                for interaction in &catalogue {
                    if let Ok(m) = interaction.match_request(&method, &t) {
                        prop_assert_eq!(format!("{}/{}", m.base, m.relative), t.without_query());
                        prop_assert!(m.base.starts_with("https://h.example"));
                        for seg in m.relative.split('/') {
                            prop_assert!(!seg.is_empty() && seg != "." && seg != "..");
                            prop_assert!(!seg.to_ascii_lowercase().contains("%2e"));
                        }
                        prop_assert!(!m.relative.contains('?'));
                    }
                }
            }
        }
    }
}
