//! The SDS-style directory: who is accredited for what, and where their endpoints are.
//! Owns the model (accredited systems, message handlers), the backend trait, and the cache in
//! front of it. It answers questions; it never decides whether a request is allowed (authorise does).

pub mod ldif;

use futures_util::future::BoxFuture;

/// An accredited system (`nhsAs`): one ASID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccreditedSystem {
    pub asid: String,
    pub ods_code: String,
    pub party_key: String,
    /// `nhsAsSvcIA`: interactions this system may send (consumer) or serve (provider).
    pub interactions: Vec<String>,
    pub product_name: Option<String>,
    pub product_version: Option<String>,
}

/// A message handler (`nhsMhs`): one endpoint for one interaction of one party key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageHandler {
    /// `uniqueIdentifier` of the MHS record.
    pub id: String,
    pub ods_code: String,
    pub party_key: String,
    /// `nhsMhsSvcIA` (single-valued).
    pub interaction: String,
    /// `nhsMhsEndPoint`, copied exactly (no trailing `/` for GP Connect).
    pub endpoint: String,
    /// `nhsMhsFQDN`.
    pub fqdn: String,
    /// `nhsMhsCPAId`.
    pub cpa_id: String,
}

/// Everything the gateway needs to know about one ASID: its AS record and the message handlers
/// that share its party key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Party {
    pub system: AccreditedSystem,
    pub handlers: Vec<MessageHandler>,
}

#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    #[error("directory backend {backend}: {reason}")]
    Backend { backend: &'static str, reason: String },
}

/// A source of directory data (LDIF file, LDAP, SDS FHIR API).
pub trait DirectoryBackend: Send + Sync + 'static {
    /// Short name for logs and metrics ("ldif", "ldap", "fhir").
    fn name(&self) -> &'static str;
    /// The AS record with this ASID and every MHS record with its party key; `Ok(None)` when
    /// no such ASID is registered.
    fn party<'a>(&'a self, asid: &'a str) -> BoxFuture<'a, Result<Option<Party>, DirectoryError>>;
}
