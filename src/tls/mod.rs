//! TLS for both legs: the mTLS listener's server config (client certificate required, CRLs),
//! the upstream client config, and who the peer is. Never logs key material.
//!
//! Everything here uses the aws-lc-rs provider explicitly (never a process-wide default), TLS
//! 1.2 and 1.3 only, and loads certificates and keys from PEM files (CRLs: PEM or DER). Every error
//! names the file it is about; none carries key bytes. Building a whole configuration checks
//! every one of its files and fails with every problem found ([`TlsProblems`]), each under the
//! configuration key that names its file ([`TlsKeys`]: `listener.crls[1]`), so one bad file does
//! not hide another. The development and test PKI lives in [`pki`].
//!
//! Revocation policy of the listener, when CRLs are configured:
//! - every certificate of the client's chain (except the trust anchor) is checked against the
//!   CRLs, so a revoked intermediate is refused as well as a revoked leaf; every certificate of
//!   the bundle is a trust anchor, never itself checked, so a CRL that revokes one refuses the
//!   configuration (`revoked_ca`);
//! - a certificate whose issuer has no CRL loaded has an unknown status, which is allowed (CRLs
//!   are configured per issuing CA; the other CAs of the bundle are not revocation-checked, and
//!   each is named in a warning, logged at load and reload and printed by `check-config`);
//! - a CRL whose `nextUpdate` has passed fails every handshake it would decide (fail closed: a
//!   stale CRL cannot vouch for a certificate). [`load_crls`] refuses CRLs that are already stale,
//!   so a bad file is caught at load or reload rather than at the first handshake;
//! - a CRL is loaded only when a CA of the bundle verifies its signature; one that no CA of the
//!   bundle issued (an intermediate's not in the bundle, another CA's, another key's) refuses
//!   the configuration (`crl_issuer`): left out, it would let in what it revokes;
//! - rustls (webpki) checks a certificate against the first CRL whose issuer name is its issuer's,
//!   so two CAs of one name with different keys (a re-key) are refused while a CRL of that name
//!   is listed (`same_name_cas`), and the CRL floor is kept per issuer key ([`CrlFloor`]).
//!
//! There is no session resumption on the listener: no tickets and no session cache, so every
//! connection runs a full handshake and its client certificate is checked against the current
//! CRLs. A connection already open when the CA bundle or a CRL is reloaded, or whose
//! certificate expires while it is open, has its certificate judged again by the verifier in
//! force before its next request ([`identities::ClientCert::standing`]).
//!
//! Nor on the gateway's own client side (providers, an LDAPS directory): a resumed session
//! skips the check of the server's certificate, so every new connection runs a full handshake
//! and the server's certificate is checked against the clock, the CA bundle and any CRLs
//! ([`upstream_tls_above`]).

pub mod chaincache;
pub mod identities;
pub mod pki;
pub mod records;
pub mod stream;

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{CertificateError, ClientConfig, RootCertStore, ServerConfig};
use x509_parser::der_parser::asn1_rs::ToDer;
use x509_parser::extensions::GeneralName;
use x509_parser::x509::X509Name;

use crate::audit::record::{hex, sha256};

/// Who is on the other end of an mTLS connection, taken from its verified leaf certificate.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PeerIdentity {
    /// DNS SAN names, in certificate order; the subject CN when the certificate has no DNS SAN.
    pub names: Vec<String>,
    /// Subject DN, RFC 4514 string.
    pub subject: String,
    /// Serial number, lowercase hex.
    pub serial: String,
    /// SHA-256 of the DER certificate, lowercase hex.
    pub fingerprint_sha256: String,
}

impl PeerIdentity {
    /// Its first name (SAN or CN), or `-`, for log lines.
    pub fn name(&self) -> &str {
        self.names.first().map_or("-", String::as_str)
    }
}

/// Why loading TLS material or building a TLS config failed. Every variant names the file it is
/// about; none ever carries key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read at all.
    #[error("{path}: cannot read: {source}")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The file holds no PEM `CERTIFICATE` section.
    #[error("{path}: no PEM certificate found (expected a -----BEGIN CERTIFICATE----- section)")]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// A certificate in the file is malformed.
    #[error("{path}: bad certificate: {reason}")]
    BadCertificate {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The file holds no PEM private key.
    #[error(
        "{path}: no private key found (expected a PEM PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY section)"
    )]
    NoPrivateKey {
        /// The file.
        path: PathBuf,
    },
    /// The file holds a private key that cannot be used (encrypted, malformed, unsupported type).
    #[error("{path}: unsupported private key: {reason}")]
    UnsupportedKey {
        /// The file.
        path: PathBuf,
        /// Why it cannot be used.
        reason: String,
    },
    /// The private key is not the one the certificate was issued for.
    #[error("{key}: private key does not match the certificate in {cert}")]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// The gateway's own certificate is one no peer would accept.
    #[error("{path}: {reason}")]
    OwnCertificate {
        /// The certificate file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A CRL file is malformed or stale.
    #[error("{path}: bad CRL: {reason}")]
    BadCrl {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The CA bundle is empty or holds something that cannot be a trust anchor.
    #[error("{path}: bad CA bundle: {reason}")]
    BadCaBundle {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// rustls refused the material loaded from `path`.
    #[error("{path}: {context}: {source}")]
    Rustls {
        /// The file the material came from.
        path: PathBuf,
        /// What was being done.
        context: &'static str,
        /// rustls's error.
        source: rustls::Error,
    },
    /// A certificate received on a connection (not read from a file) cannot be parsed.
    #[error("peer certificate: {reason}")]
    PeerCertificate {
        /// What is wrong with it.
        reason: String,
    },
}

/// The configuration keys that name the files of one TLS configuration, so that each problem
/// found names the key to fix as well as the file:
/// `listener.crls[1]: /etc/ssp/crl2.pem: bad CRL: not a valid X.509 CRL: …`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsKeys {
    /// The own certificate chain.
    pub cert: &'static str,
    /// Its private key.
    pub key: &'static str,
    /// The CA bundle the peer's certificate must chain to.
    pub ca: &'static str,
    /// The CRL list; the problem with its `i`th file is keyed `crls[i]`.
    pub crls: &'static str,
}

impl TlsKeys {
    /// A [`ServerTls`]'s field names, for one not read from a configuration file.
    pub const SERVER_TLS: TlsKeys = TlsKeys {
        cert: "cert",
        key: "key",
        ca: "client_ca",
        crls: "crls",
    };
    /// A [`ClientTls`]'s field names, likewise.
    pub const CLIENT_TLS: TlsKeys = TlsKeys {
        cert: "cert",
        key: "key",
        ca: "ca",
        crls: "crls",
    };

    /// The key of the `i`th file of the CRL list.
    fn crl(&self, i: usize) -> String {
        format!("{}[{i}]", self.crls)
    }
}

/// One problem with a file of a TLS configuration: the key that names the file, and what is
/// wrong with it (the error names the file).
#[derive(Debug, thiserror::Error)]
#[error("{key}: {error}")]
pub struct FileProblem {
    pub key: String,
    pub error: TlsError,
}

/// Every problem found with the files of one TLS configuration (at least one), in the order of
/// its keys: the certificate, the key, the CA bundle, then each CRL in list order. Displayed
/// on one line, `; ` between problems (as a refused reload logs it).
#[derive(Debug)]
pub struct TlsProblems(Vec<FileProblem>);

impl TlsProblems {
    fn one(key: &str, error: TlsError) -> TlsProblems {
        TlsProblems(vec![FileProblem {
            key: key.to_owned(),
            error,
        }])
    }
}

impl IntoIterator for TlsProblems {
    type Item = FileProblem;
    type IntoIter = std::vec::IntoIter<FileProblem>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl fmt::Display for TlsProblems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for TlsProblems {}

/// The problems of one TLS configuration, noted as each of its files is checked.
#[derive(Default)]
struct Found(Vec<FileProblem>);

impl Found {
    /// `result`'s value, or `None` with its error noted against `key`.
    fn take<T>(&mut self, key: impl Into<String>, result: Result<T, TlsError>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(error) => {
                self.note(key, error);
                None
            }
        }
    }

    fn note(&mut self, key: impl Into<String>, error: TlsError) {
        self.0.push(FileProblem {
            key: key.into(),
            error,
        });
    }

    /// `note`, at `at` among the problems noted so far (to keep them in the order of their keys).
    fn note_at(&mut self, at: usize, key: impl Into<String>, error: TlsError) {
        self.0.insert(
            at,
            FileProblem {
                key: key.into(),
                error,
            },
        );
    }

    fn count(&self) -> usize {
        self.0.len()
    }
}

/// The listener's TLS material (all PEM files; CRLs PEM or DER).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTls {
    /// The server certificate chain, leaf first.
    pub cert: PathBuf,
    /// The server private key.
    pub key: PathBuf,
    /// The CA bundle client certificates must chain to.
    pub client_ca: PathBuf,
    /// CRLs of the client CAs; empty for no revocation checking.
    pub crls: Vec<PathBuf>,
}

/// The upstream (gateway-to-provider) TLS material, all PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTls {
    /// The gateway's client certificate chain, leaf first.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// The CA bundle provider certificates must chain to (the system roots are not used).
    pub ca: PathBuf,
    /// CRLs of CAs in `ca`, checked for the server certificates (as the listener checks
    /// client certificates); empty for no revocation checking.
    pub crls: Vec<PathBuf>,
}

/// The protocol versions both legs allow.
static VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// The crypto provider for every config built here: aws-lc-rs with its default suites (AEAD
/// only, ECDHE key exchange only) and key exchange groups (X25519, P-256, P-384, then the
/// X25519+ML-KEM-768 hybrid). aws-lc-rs rather than *ring*: an RSA 2048 signature — the
/// server's share of every full handshake with NHS (RSA) certificates — takes it well under
/// half of *ring*'s time on CPUs with AVX-512 IFMA (README "Performance", docs/performance.md).
///
/// AES-128-GCM is preferred (the listener applies its own order): its SHA-256 handshake hash
/// runs on the CPU's SHA extensions, where AES-256-GCM's SHA-384 has no hardware path — about
/// 5% of a full handshake.
fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|suite| match suite.suite() {
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => 0,
            _ if suite.version() == &rustls::version::TLS13 => 1,
            rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            | rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 2,
            _ => 3,
        });
    Arc::new(provider)
}

/// Reads the certificates (PEM `CERTIFICATE` sections, leaf first) from `path`. Other PEM
/// sections in the file are ignored; each certificate must parse as X.509.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let mut certs = Vec::new();
    for item in CertificateDer::pem_slice_iter(&bytes) {
        let cert = item.map_err(|e| TlsError::BadCertificate {
            path: path.to_owned(),
            reason: pem_reason(&e),
        })?;
        match x509_parser::parse_x509_certificate(&cert) {
            Ok(([], _)) => certs.push(cert),
            Ok(_) => {
                return Err(TlsError::BadCertificate {
                    path: path.to_owned(),
                    reason: format!("certificate #{} has trailing data", certs.len() + 1),
                })
            }
            Err(e) => {
                return Err(TlsError::BadCertificate {
                    path: path.to_owned(),
                    reason: format!("certificate #{} is not valid X.509: {e}", certs.len() + 1),
                })
            }
        }
    }
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// Reads the one private key in `path`: PEM PKCS#8 (`PRIVATE KEY`), PKCS#1 RSA
/// (`RSA PRIVATE KEY`) or SEC1 EC (`EC PRIVATE KEY`). The key must be usable by the *ring*
/// provider (RSA 2048+, ECDSA P-256/P-384, Ed25519); encrypted keys are refused.
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(path)?;
    let mut keys = Vec::new();
    for item in PrivateKeyDer::pem_slice_iter(&bytes) {
        // The reason is built from the error kind only: PEM errors can quote file content.
        let key = item.map_err(|e| TlsError::UnsupportedKey {
            path: path.to_owned(),
            reason: pem_reason(&e),
        })?;
        keys.push(key);
    }
    let key = match keys.len() {
        0 if is_encrypted_pem(&bytes) => {
            return Err(TlsError::UnsupportedKey {
                path: path.to_owned(),
                reason: "the key is encrypted; store it decrypted with mode 0600 \
                         (e.g. `openssl pkey -in KEY -out KEY.dec`)"
                    .to_owned(),
            })
        }
        0 => {
            return Err(TlsError::NoPrivateKey {
                path: path.to_owned(),
            })
        }
        1 => keys.remove(0),
        n => {
            return Err(TlsError::UnsupportedKey {
                path: path.to_owned(),
                reason: format!("the file holds {n} private keys; exactly one is expected"),
            })
        }
    };
    provider()
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| TlsError::UnsupportedKey {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    Ok(key)
}

/// The highest CRL Number loaded so far for each issuer key (and scope), so that a reload
/// never goes back to an older CRL (one that may not list a certificate revoked since): a CRL
/// published by mistake from an old copy, or put back by someone who wants a revoked
/// certificate to work again. Shared by the clones of one listener's reloader.
///
/// Keyed by the issuer's key as well as its name (`FloorKey`): a CA re-keyed under the same
/// name numbers its CRLs on its own, so one key's CRL is neither an older nor a newer version
/// of the other's, and going back to the old CA with its own CRL is a reload like any other.
#[derive(Debug, Default, Clone)]
pub struct CrlFloor(Arc<std::sync::Mutex<HashMap<FloorKey, CrlNumber>>>);

/// What one floor entry is for: a CRL's scope (issuer name, and distribution point) and the
/// SHA-256 of the SubjectPublicKeyInfo of the CA of the bundle whose key verifies it (`None`
/// only where no bundle loaded, and then nothing reaches the floor).
type FloorKey = (String, Option<[u8; 32]>);

impl CrlFloor {
    /// What refuses `numbered`: each CRL older than the one of its issuer key and scope already
    /// loaded, or with its CRL Number and other contents (RFC 5280 §5.2.3: each new CRL of an
    /// issuer has a greater number), with its index in the CRL list.
    /// And each CRL loaded whose issuer key and scope the new set has none for, while that CA
    /// (name and key) is still one of `cas` (no index: it is a CRL missing from the list):
    /// with revocation status unknown allowed (CRLs are per issuing CA), dropping a CA's CRL,
    /// or putting another CA's in its file, would let every certificate it revoked in again.
    fn check(
        &self,
        numbered: &[CrlNumber],
        cas: &[BundleCa<'_>],
        ca_path: &Path,
    ) -> Vec<(Option<usize>, TlsError)> {
        let floor = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut refused = Vec::new();
        let mut missing: Vec<&CrlNumber> = floor
            .values()
            .filter(|loaded| {
                !numbered
                    .iter()
                    .any(|n| n.scope == loaded.scope && n.issuer_key == loaded.issuer_key)
            })
            .collect();
        // In a stable order (the floor is a map).
        missing.sort_by(|a, b| (&a.scope, a.issuer_key).cmp(&(&b.scope, b.issuer_key)));
        for loaded in missing {
            let still_a_ca = cas.iter().any(|ca| {
                ca.subject() == loaded.issuer.as_slice() && Some(ca.key) == loaded.issuer_key
            });
            if still_a_ca {
                refused.push((
                    None,
                    TlsError::BadCrl {
                        path: loaded.path.clone(),
                        reason: format!(
                            "the new CRLs have none for {}, whose CRL Number {} is loaded, while \
                             it is still a CA in {}: its revoked certificates would be let in \
                             again (remove the CA from the bundle as well, or restart the gateway)",
                            loaded.described(),
                            loaded.number,
                            ca_path.display()
                        ),
                    },
                ));
            }
        }
        for new in numbered {
            let Some(loaded) = floor.get(&new.floor_key()) else {
                continue;
            };
            let reason = if new.number < loaded.number {
                "is older than the one loaded: a CRL is never replaced by an older one"
            } else if new.number == loaded.number && new.digest != loaded.digest {
                "is the loaded one's, with other contents: a new CRL has a greater number"
            } else {
                continue;
            };
            refused.push((
                Some(new.index),
                TlsError::BadCrl {
                    path: new.path.clone(),
                    reason: format!(
                        "CRL Number {} for {} {reason} ({})",
                        new.number,
                        new.described(),
                        loaded.path.display()
                    ),
                },
            ));
        }
        refused
    }

    /// `numbered` is in force: no later load may go below it.
    fn raise(&self, numbered: Vec<CrlNumber>) {
        let mut floor = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for new in numbered {
            let key = new.floor_key();
            match floor.get(&key) {
                Some(loaded) if loaded.number >= new.number => {}
                _ => {
                    floor.insert(key, new);
                }
            }
        }
    }
}

/// Reads CRLs from `paths`: each file holds PEM `X509 CRL` sections or one DER CRL. A CRL that
/// does not parse, has no CRL Number, or whose `nextUpdate` has already passed, is refused with
/// its file named (the first such file); so are two different CRLs of one issuer. No CA bundle
/// is consulted here (see `checked_crls` for what a configuration's CRLs must also pass).
pub fn load_crls(
    paths: &[PathBuf],
) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let mut crls = Vec::new();
    let mut numbered = Vec::new();
    for (index, path) in paths.iter().enumerate() {
        for crl in read_crl_file(path)? {
            let parsed = parse_crl(path, &crl)?;
            numbered.push(crl_number(path, index, &crl, &parsed)?);
            crls.push(crl);
        }
    }
    match second_crls(&numbered).into_iter().next() {
        Some((_, e)) => Err(e),
        None => Ok(crls),
    }
}

/// A loaded CA bundle, for checking CRLs against: its file, its certificates, its trust anchors.
struct Bundle<'a> {
    path: &'a Path,
    cas: &'a [CertificateDer<'static>],
    roots: &'a RootCertStore,
}

/// A CA of a loaded bundle, parsed for checking CRLs against it.
struct BundleCa<'a> {
    /// Its place in the bundle file, from 1.
    number: usize,
    cert: x509_parser::certificate::X509Certificate<'a>,
    /// The SHA-256 of its SubjectPublicKeyInfo: which key it is.
    key: [u8; 32],
    /// The SHA-256 of the certificate (what `openssl x509 -fingerprint -sha256` shows).
    fingerprint: [u8; 32],
}

impl<'a> BundleCa<'a> {
    /// Every CA of `cas` (each parsed already by [`ca_bundle`], so none is left out).
    fn all(cas: &'a [CertificateDer<'static>]) -> Vec<BundleCa<'a>> {
        cas.iter()
            .enumerate()
            .filter_map(|(i, der)| {
                let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
                Some(BundleCa {
                    number: i + 1,
                    key: sha256(cert.public_key().raw),
                    fingerprint: sha256(der),
                    cert,
                })
            })
            .collect()
    }

    /// Its subject name, DER.
    fn subject(&self) -> &[u8] {
        self.cert.subject().as_raw()
    }

    /// Its subject key identifier, when it has one.
    fn key_id(&self) -> Option<&[u8]> {
        self.cert
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0),
                _ => None,
            })
    }

    /// How an error or a warning names it: subject, place in the bundle and fingerprint.
    fn described(&self) -> String {
        format!(
            "{} (certificate #{}, SHA-256 fingerprint {})",
            rfc4514(self.cert.subject()),
            self.number,
            hex(&self.fingerprint)
        )
    }
}

/// The CRLs of a configuration's CRL list that load, their numbers, and the warnings about
/// them: when the list is not empty, each CA of the bundle with no CRL loaded (its
/// certificates are not revocation-checked).
struct CheckedCrls {
    crls: Vec<CertificateRevocationListDer<'static>>,
    numbered: Vec<CrlNumber>,
    warnings: Vec<String>,
}

/// The CRLs of `paths` (the list `keys.crls`), each problem noted in `found` against the file's
/// key (`crls[i]`): each file read and, for each CRL in it, when the CA bundle loaded, its
/// issuer found in the bundle ([`crl_issuer`]: a CRL no CA of the bundle issued, or one named
/// for a CA of it but not signed by its key, is refused), then numbered and not stale, and
/// accepted by webpki on its own (`webpki_accepts`, so a CRL webpki refuses names its file);
/// no second CRL for what another covers; no two CAs of one name with
/// different keys in the bundle while a CRL of that name is listed ([`same_name_cas`]); and,
/// when every file is good, none older than `floor` has seen and none missing that it has. The
/// CRLs returned are those of the good files. The floor is raised by the caller once its
/// config is built.
fn checked_crls(
    paths: &[PathBuf],
    keys: &TlsKeys,
    bundle: Option<Bundle<'_>>,
    floor: &CrlFloor,
    webpki_accepts: impl Fn(
        &RootCertStore,
        &CertificateRevocationListDer<'static>,
    ) -> Result<(), rustls::Error>,
    found: &mut Found,
) -> CheckedCrls {
    let before = found.count();
    let cas = bundle
        .as_ref()
        .map(|b| BundleCa::all(b.cas))
        .unwrap_or_default();
    let mut checked = CheckedCrls {
        crls: Vec::new(),
        numbered: Vec::new(),
        warnings: Vec::new(),
    };
    // The issuer names of every CRL parsed, kept or not.
    let mut named = Vec::new();
    for (index, path) in paths.iter().enumerate() {
        let key = keys.crl(index);
        let Some(in_file) = found.take(key.clone(), read_crl_file(path)) else {
            continue;
        };
        let mut kept = Vec::new();
        let mut check = |crl: CertificateRevocationListDer<'static>| -> Result<(), TlsError> {
            let parsed = parse_crl(path, &crl)?;
            named.push(parsed.issuer().as_raw().to_vec());
            let issuer_key = match &bundle {
                None => None,
                Some(b) => Some(cas[crl_issuer(path, &parsed, &cas, b.path, keys)?].key),
            };
            if let Some(b) = &bundle {
                revoked_ca(path, &parsed, &cas, b.path)?;
            }
            let mut number = crl_number(path, index, &crl, &parsed)?;
            number.issuer_key = issuer_key;
            if let Some(b) = &bundle {
                webpki_accepts(b.roots, &crl).map_err(|e| TlsError::BadCrl {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            }
            kept.push((crl, number));
            Ok(())
        };
        let file = in_file.into_iter().try_for_each(&mut check);
        if found.take(key, file).is_some() {
            for (crl, number) in kept {
                checked.crls.push(crl);
                checked.numbered.push(number);
            }
        }
    }
    let Some(bundle) = &bundle else {
        for (index, e) in second_crls(&checked.numbered) {
            found.note(keys.crl(index), e);
        }
        return checked;
    };
    let overlapping = same_name_cas(&cas, &named);
    // Problems of the bundle come before those of the CRL list.
    for (at, (cas_of_a_name, _)) in overlapping.iter().enumerate() {
        found.note_at(
            before + at,
            keys.ca,
            TlsError::BadCaBundle {
                path: bundle.path.to_owned(),
                reason: same_name_reason(cas_of_a_name, &cas, keys),
            },
        );
    }
    // A second CRL of a name refused above would say nothing more.
    let apart = checked
        .numbered
        .iter()
        .filter(|n| !overlapping.iter().any(|(_, name)| *name == n.issuer));
    for (index, e) in second_crls(apart) {
        found.note(keys.crl(index), e);
    }
    if found.count() == before {
        for (index, e) in floor.check(&checked.numbered, &cas, bundle.path) {
            match index {
                Some(index) => found.note(keys.crl(index), e),
                None => found.note(keys.crls, e),
            }
        }
    }
    if !paths.is_empty() {
        for ca in &cas {
            let has_a_crl = checked
                .numbered
                .iter()
                .any(|n| n.issuer == ca.subject() && n.issuer_key == Some(ca.key));
            if !has_a_crl {
                checked.warnings.push(format!(
                    "{}: no CRL for {} in {}: the certificates it issues are accepted without a \
                     revocation check; add its CRL to {}, or take the CA out of the bundle",
                    keys.crls,
                    ca.described(),
                    bundle.path.display(),
                    keys.crls
                ));
            }
        }
    }
    checked
}

/// Refuses a CRL (of the file `path`, issued by a CA of the bundle `client_ca`) that revokes
/// a CA of the bundle: every certificate of the bundle is a trust anchor, and webpki never
/// checks an anchor's own revocation, so a revoked intermediate kept in the bundle would go on
/// vouching for the certificates it issued, its issuer's CRL notwithstanding.
fn revoked_ca(
    path: &Path,
    parsed: &x509_parser::revocation_list::CertificateRevocationList<'_>,
    cas: &[BundleCa<'_>],
    client_ca: &Path,
) -> Result<(), TlsError> {
    let issuer = parsed.issuer().as_raw();
    for ca in cas.iter().filter(|ca| ca.cert.issuer().as_raw() == issuer) {
        let serial = ca.cert.raw_serial();
        if parsed
            .iter_revoked_certificates()
            .any(|r| r.raw_serial() == serial)
        {
            return Err(TlsError::BadCrl {
                path: path.to_owned(),
                reason: format!(
                    "the CRL of {} revokes {}, a CA of {}: a CA in the bundle is a trust anchor,                      whose own revocation is never checked, so the certificates it issued would                      still be accepted; take the revoked CA out of the bundle",
                    rfc4514(parsed.issuer()),
                    ca.described(),
                    client_ca.display()
                ),
            });
        }
    }
    Ok(())
}

/// The CAs of `cas` that share a subject name with another of a different key, for each name
/// that a CRL of `crl_issuers` is issued under (as indices into `cas`, with the name, DER).
/// webpki checks a certificate against the first CRL whose issuer name is its issuer's, and
/// verifies that CRL with the key of the CA the certificate chains to: with two keys of one
/// name in the bundle, one key's CRL is checked against the other key's certificates, and each
/// of them is refused (`BadSignature`). Without a CRL of that name both CAs are fine: path
/// building tries each by signature.
fn same_name_cas(cas: &[BundleCa<'_>], crl_issuers: &[Vec<u8>]) -> Vec<(Vec<usize>, Vec<u8>)> {
    let mut overlapping: Vec<(Vec<usize>, Vec<u8>)> = Vec::new();
    for (i, ca) in cas.iter().enumerate() {
        if overlapping
            .iter()
            .any(|(_, name)| name.as_slice() == ca.subject())
            || !crl_issuers
                .iter()
                .any(|name| name.as_slice() == ca.subject())
        {
            continue;
        }
        let of_the_name: Vec<usize> = (i..cas.len())
            .filter(|&j| cas[j].subject() == ca.subject())
            .collect();
        if of_the_name.iter().any(|&j| cas[j].key != ca.key) {
            overlapping.push((of_the_name, ca.subject().to_vec()));
        }
    }
    overlapping
}

/// Why the CAs `of_the_name` (indices into `cas`, one name, more than one key) are refused,
/// and what to do instead.
fn same_name_reason(of_the_name: &[usize], cas: &[BundleCa<'_>], keys: &TlsKeys) -> String {
    let listed: Vec<String> = of_the_name
        .iter()
        .map(|&i| {
            format!(
                "#{} (SHA-256 fingerprint {})",
                cas[i].number,
                hex(&cas[i].fingerprint)
            )
        })
        .collect();
    format!(
        "the CAs {} are all named {} but have different keys, and {} has a CRL issued under that \
         name: rustls checks a certificate against the first CRL whose issuer name is its \
         issuer's and verifies it with the key of the CA the certificate chains to, so one key's \
         CRL would be checked against the other key's certificates and every one of them \
         refused (BadSignature). Give the new CA a name of its own; where the name cannot \
         change, do not overlap them while CRLs are checked: swap the old CA and its CRL for the \
         new CA and its CRL in one reload (either way round)",
        listed.join(", "),
        rfc4514(cas[of_the_name[0]].cert.subject()),
        keys.crls
    )
}

/// Each second, different CRL for what an earlier one covers, with its index in the list:
/// webpki checks a certificate against the first CRL of its issuer's name only, so a second
/// one, older say, would be the one consulted, or never. (The same CRL twice, as PEM and DER
/// say, is harmless.) By name, not key: webpki does not tell keys apart here.
fn second_crls<'a>(numbered: impl IntoIterator<Item = &'a CrlNumber>) -> Vec<(usize, TlsError)> {
    let numbered: Vec<&CrlNumber> = numbered.into_iter().collect();
    let mut seconds = Vec::new();
    for (i, crl) in numbered.iter().enumerate() {
        let earlier = &numbered[..i];
        if let Some(first) = earlier
            .iter()
            .find(|f| f.scope == crl.scope && f.digest != crl.digest)
        {
            seconds.push((
                crl.index,
                TlsError::BadCrl {
                    path: crl.path.clone(),
                    reason: format!(
                        "a second CRL for {} (CRL Number {}; the first, {}, has {}): only the \
                         first would be checked, so list one CRL per issuer, the newest",
                        crl.scope,
                        crl.number,
                        first.path.display(),
                        first.number
                    ),
                },
            ));
        }
    }
    seconds
}

/// What identifies a loaded CRL: its file (and the file's index in its CRL list), what it
/// covers (issuer, and distribution point), its issuer's key, its CRL Number and the SHA-256
/// of its bytes.
#[derive(Debug)]
struct CrlNumber {
    path: PathBuf,
    index: usize,
    scope: String,
    /// The issuer's name, DER (to find it among the CAs of a bundle).
    issuer: Vec<u8>,
    /// The SHA-256 of the SubjectPublicKeyInfo of the CA of the bundle that verifies it;
    /// `None` when read without a bundle.
    issuer_key: Option<[u8; 32]>,
    number: x509_parser::num_bigint::BigUint,
    digest: [u8; 32],
}

impl CrlNumber {
    fn floor_key(&self) -> FloorKey {
        (self.scope.clone(), self.issuer_key)
    }

    /// Its scope, with its issuer's key when known: what the floor's refusals name.
    fn described(&self) -> String {
        match &self.issuer_key {
            Some(key) => format!("{} (issuer key SHA-256 {})", self.scope, hex(key)),
            None => self.scope.clone(),
        }
    }
}

/// The CRLs of one file: PEM `X509 CRL` sections, or one DER CRL; at least one.
fn read_crl_file(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let bad = |reason: String| TlsError::BadCrl {
        path: path.to_owned(),
        reason,
    };
    let in_file: Vec<CertificateRevocationListDer<'static>> = if looks_like_pem(&bytes) {
        CertificateRevocationListDer::pem_slice_iter(&bytes)
            .collect::<Result<_, _>>()
            .map_err(|e| bad(pem_reason(&e)))?
    } else {
        vec![CertificateRevocationListDer::from(bytes)]
    };
    if in_file.is_empty() {
        return Err(bad(
            "no PEM CRL found (expected a -----BEGIN X509 CRL----- section)".to_owned(),
        ));
    }
    Ok(in_file)
}

/// One CRL of the file `path`, parsed: X.509, nothing after it.
fn parse_crl<'a>(
    path: &Path,
    crl: &'a CertificateRevocationListDer<'_>,
) -> Result<x509_parser::revocation_list::CertificateRevocationList<'a>, TlsError> {
    let bad = |reason: String| TlsError::BadCrl {
        path: path.to_owned(),
        reason,
    };
    match x509_parser::parse_x509_crl(crl) {
        Ok(([], parsed)) => Ok(parsed),
        Ok(_) => Err(bad("trailing data after the CRL".to_owned())),
        Err(e) => Err(bad(format!("not a valid X.509 CRL: {e}"))),
    }
}

/// The number of `crl` (`parsed`), of the file `path`, `index` in its CRL list: it must have a
/// CRL Number and not be stale. Its issuer's key is left for the caller to fill in.
fn crl_number(
    path: &Path,
    index: usize,
    crl: &CertificateRevocationListDer<'_>,
    parsed: &x509_parser::revocation_list::CertificateRevocationList<'_>,
) -> Result<CrlNumber, TlsError> {
    let bad = |reason: String| TlsError::BadCrl {
        path: path.to_owned(),
        reason,
    };
    let Some(number) = parsed.crl_number() else {
        // webpki requires it and would say only "ParseError".
        return Err(bad(format!(
            "no CRL Number extension (RFC 5280 §5.2.3), which is required; `openssl ca \
             -gencrl` adds one when a crlnumber file is configured (issuer {})",
            rfc4514(parsed.issuer())
        )));
    };
    if let Some(next) = parsed.next_update() {
        if next < x509_parser::time::ASN1Time::now() {
            return Err(bad(format!(
                "stale: nextUpdate {} has passed; fetch a current CRL from {}",
                next,
                rfc4514(parsed.issuer()),
            )));
        }
    }
    // What a CRL covers: its issuer, and its issuing distribution point when the issuer
    // partitions its revocations over several CRLs.
    let mut scope = rfc4514(parsed.issuer());
    if let Some(idp) = parsed
        .extensions()
        .iter()
        .find(|e| e.oid == x509_parser::oid_registry::OID_X509_EXT_ISSUER_DISTRIBUTION_POINT)
    {
        scope.push_str(" (issuing distribution point ");
        scope.push_str(&hex(idp.value));
        scope.push(')');
    }
    Ok(CrlNumber {
        path: path.to_owned(),
        index,
        scope,
        issuer: parsed.issuer().as_raw().to_vec(),
        issuer_key: None,
        number: number.clone(),
        digest: sha256(crl.as_ref()),
    })
}

/// Reads a CA bundle: one or more PEM CA certificates, each usable as a trust anchor.
pub fn load_ca_bundle(path: &Path) -> Result<RootCertStore, TlsError> {
    Ok(ca_bundle(path)?.1)
}

/// [`load_ca_bundle`] with the bundle's earliest notAfter (unix seconds), from the same read.
pub fn load_ca_bundle_with_expiry(path: &Path) -> Result<(RootCertStore, i64), TlsError> {
    let (certs, roots) = ca_bundle(path)?;
    let earliest = certs
        .iter()
        .filter_map(|c| not_after(c).ok())
        .min()
        .unwrap_or(i64::MIN);
    Ok((roots, earliest))
}

/// The CA bundle's certificates, each checked to be a CA, and the trust anchors made of them.
fn ca_bundle(path: &Path) -> Result<(Vec<CertificateDer<'static>>, RootCertStore), TlsError> {
    let bad = |reason: String| TlsError::BadCaBundle {
        path: path.to_owned(),
        reason,
    };
    let certs = load_certs(path).map_err(|e| match e {
        TlsError::NoCertificate { .. } => bad("no PEM certificate found".to_owned()),
        TlsError::BadCertificate { reason, .. } => bad(reason),
        other => other,
    })?;
    let mut roots = RootCertStore::empty();
    for (i, cert) in certs.iter().enumerate() {
        let (_, parsed) = x509_parser::parse_x509_certificate(cert)
            .map_err(|e| bad(format!("certificate #{}: {e}", i + 1)))?;
        if !parsed.is_ca() {
            return Err(bad(format!(
                "certificate #{} ({}) is not a CA certificate (basicConstraints CA:TRUE missing)",
                i + 1,
                rfc4514(parsed.subject())
            )));
        }
        roots
            .add(cert.clone())
            .map_err(|e| bad(format!("certificate #{}: {e}", i + 1)))?;
    }
    Ok((certs, roots))
}

/// The issuer of `parsed` (a CRL of the file `path`) among `cas` (of the bundle `client_ca`):
/// the index of the CA of its issuer name whose key verifies its signature. Every other CRL is
/// refused, naming its issuer and what to do:
/// - one whose issuer name no CA of the bundle has: it is not left out with a warning, since it
///   may well check something. A client may send intermediate CAs, and webpki checks each
///   certificate of the chain against the CRL of its issuer's name, verified with the key of
///   the issuer the client sent: an intermediate's CRL protects its leaves with only the root
///   in the bundle. The loader honours it only with the intermediate in the bundle (where its
///   signature is checked), so left out it would let the intermediate's revoked certificates
///   in; and a CRL for the wrong CA (two CRL files swapped) would start with revocation
///   checking off. Fail closed, as a stale CRL does;
/// - one whose authority key identifier is the subject key identifier of no CA of its name
///   (another key's CRL: the old or the new key of a CA re-keyed under the same name, its
///   certificate not in the bundle), for the same reason;
/// - one named for a CA of the bundle, for its key as far as key identifiers tell, whose
///   signature verifies with no CA's key: forged or corrupted. webpki checks the signature only
///   when a client of that CA connects, so it had loaded (at start and on reload) and then
///   failed every handshake.
fn crl_issuer(
    path: &Path,
    parsed: &x509_parser::revocation_list::CertificateRevocationList<'_>,
    cas: &[BundleCa<'_>],
    client_ca: &Path,
    keys: &TlsKeys,
) -> Result<usize, TlsError> {
    let issuer = parsed.issuer();
    let bad = |reason: String| TlsError::BadCrl {
        path: path.to_owned(),
        reason,
    };
    // The CRL as an operator finds it: its issuer, and its number (it may share its file).
    let the_crl = match parsed.crl_number() {
        Some(number) => format!("the CRL of {} (CRL Number {number})", rfc4514(issuer)),
        None => format!("the CRL of {}", rfc4514(issuer)),
    };
    let of_the_name: Vec<usize> = (0..cas.len())
        .filter(|&i| cas[i].subject() == issuer.as_raw())
        .collect();
    if of_the_name.is_empty() {
        return Err(bad(format!(
            "{the_crl} is issued by a CA that is not in {bundle} ({ca_key}): a CRL is \
             loaded only when a CA of the bundle verifies it, and leaving this one out would \
             turn revocation checking off for its CA; take the CRL out of {crls} if it is not \
             one of this listener's CAs (check the right file is listed), or, for a CA the \
             bundle is meant to trust, add that CA to the bundle. An intermediate CA's CRL is \
             honoured only with the intermediate in the bundle, even where clients send the \
             intermediate in their chain",
            bundle = client_ca.display(),
            ca_key = keys.ca,
            crls = keys.crls,
        )));
    }
    if let Some(&ca) = of_the_name
        .iter()
        .find(|&&i| parsed.verify_signature(cas[i].cert.public_key()).is_ok())
    {
        return Ok(ca);
    }
    let signer = parsed
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(aki) => {
                aki.key_identifier.as_ref().map(|id| id.0)
            }
            _ => None,
        });
    if let Some(signer) = signer {
        if of_the_name
            .iter()
            .all(|&i| cas[i].key_id().is_some_and(|id| id != signer))
        {
            return Err(bad(format!(
                "{the_crl} is signed under a key that no CA of that name in {bundle} \
                 ({ca_key}) has (authority key identifier {}): its CA was re-keyed under that \
                 name, and the CA of that key is not in the bundle; list the CRL of the key in \
                 the bundle instead, put the CA of that key in the bundle in place of the other \
                 of its name, or take the CRL out of {crls}",
                hex(signer),
                bundle = client_ca.display(),
                ca_key = keys.ca,
                crls = keys.crls,
            )));
        }
    }
    Err(bad(format!(
        "its signature does not verify with the key of {}, its issuer in {}",
        rfc4514(issuer),
        client_ca.display()
    )))
}

/// The listener's TLS as one reloadable snapshot: the rustls config, and the client certificate
/// verifier inside it (which rustls keeps private), so that the certificate of a connection
/// accepted under an earlier snapshot can be judged again under this one.
#[derive(Debug)]
pub struct ListenerTls {
    pub config: Arc<ServerConfig>,
    verifier: Arc<chaincache::ChainCache>,
    /// Unique to this snapshot in this process, and larger than every one built before it.
    generation: u64,
    /// When this snapshot's certificates run out (for expiry metrics).
    pub expiry: Expiry,
    /// What it loaded with but does not check as one might think (a CA with no CRL while
    /// CRLs are configured): logged as it is taken up, shown by `check-config`.
    pub warnings: Vec<String>,
}

/// The earliest notAfter (unix seconds) of a snapshot's own certificate chain (leaf and every
/// certificate after it in the file) and of its CA bundle: what the expiry metrics report for
/// the material in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expiry {
    pub chain: i64,
    pub ca_bundle: i64,
}

impl Expiry {
    /// From the loaded chain and bundle (each at least one certificate, each parsed already).
    fn of(chain: &[CertificateDer<'_>], ca_bundle: &[CertificateDer<'_>]) -> Expiry {
        let earliest = |certs: &[CertificateDer<'_>]| {
            certs
                .iter()
                .filter_map(|c| not_after(c).ok())
                .min()
                .unwrap_or(i64::MIN)
        };
        Expiry {
            chain: earliest(chain),
            ca_bundle: earliest(ca_bundle),
        }
    }
}

/// The next snapshot's generation.
static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1);

impl ListenerTls {
    /// The snapshot's generation: a verdict reached under another one does not hold here.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The earliest nextUpdate of the snapshot's CRLs (unix seconds), if it has any.
    pub fn crl_horizon(&self) -> Option<u64> {
        self.verifier.crl_horizon()
    }

    /// Judges a client chain (leaf first) as a new handshake would at `now`.
    pub fn verify_client_chain(
        &self,
        chain: &[CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<(), rustls::Error> {
        use rustls::server::danger::ClientCertVerifier;
        let (leaf, intermediates) = chain
            .split_first()
            .ok_or(rustls::Error::NoCertificatesPresented)?;
        self.verifier
            .verify_client_cert(leaf, intermediates, now)
            .map(|_| ())
    }
}

/// Builds the listener's config: TLS 1.2/1.3, client certificate required and verified against
/// `client_ca` (and the CRLs, see the module doc), no session resumption, `alpn` offered in the
/// given order. The key is checked against the certificate here, and the certificate must be
/// one clients can accept ([`check_own_leaf`]): every caller serves the gateway's own (the
/// listener, the mock provider). Problems are keyed by `ServerTls`'s field names.
pub fn server_config(s: &ServerTls, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>, TlsProblems> {
    listener_tls(s, alpn).map(|l| l.config)
}

/// [`server_config`] with its verifier: what a listener serves from ([`crate::server`]).
pub fn listener_tls(s: &ServerTls, alpn: &[&[u8]]) -> Result<ListenerTls, TlsProblems> {
    listener_tls_above(s, &TlsKeys::SERVER_TLS, alpn, &CrlFloor::default())
}

/// [`listener_tls`] for a configuration whose files `keys` name, refusing CRLs older than
/// those `floor` has seen, and raising it to these once the config is built: the listener's
/// start and reloads, so a CRL is never replaced by an older one. Every file is checked and
/// every problem reported.
pub fn listener_tls_above(
    s: &ServerTls,
    keys: &TlsKeys,
    alpn: &[&[u8]],
    floor: &CrlFloor,
) -> Result<ListenerTls, TlsProblems> {
    let provider = provider();
    let files = Files {
        cert: &s.cert,
        key: &s.key,
        ca: &s.client_ca,
        crls: &s.crls,
    };
    let m = load_material(
        &files,
        keys,
        Some(Purpose::Server),
        floor,
        &provider,
        |roots, crl| client_verifier(&provider, roots.clone(), vec![crl.clone()]).map(|_| ()),
    )?;
    let verifier = client_verifier(&provider, m.roots, m.crls).map_err(|e| {
        TlsProblems::one(
            keys.ca,
            TlsError::Rustls {
                path: s.client_ca.clone(),
                context: "client certificate verifier",
                source: e,
            },
        )
    })?;
    let config =
        assemble_server_config(provider, verifier.clone(), m.certified, alpn).map_err(|e| {
            TlsProblems::one(
                keys.cert,
                TlsError::Rustls {
                    path: s.cert.clone(),
                    context: "server config",
                    source: e,
                },
            )
        })?;
    floor.raise(m.numbered);
    log_warnings(&m.warnings);
    Ok(ListenerTls {
        config,
        verifier,
        generation: NEXT_GENERATION.fetch_add(1, Ordering::Relaxed),
        expiry: m.expiry,
        warnings: m.warnings,
    })
}

/// Logs each warning of a configuration as it is taken into force (at start, on each reload):
/// once per load, since a reload runs only when a file changed or on SIGHUP.
fn log_warnings(warnings: &[String]) {
    for warning in warnings {
        tracing::warn!("{warning}");
    }
}

/// The files of one TLS configuration.
struct Files<'a> {
    cert: &'a Path,
    key: &'a Path,
    ca: &'a Path,
    crls: &'a [PathBuf],
}

/// The files of one TLS configuration, loaded and checked together.
struct Material {
    /// The own chain paired with its key.
    certified: CertifiedKey,
    /// The CA bundle's trust anchors.
    roots: RootCertStore,
    crls: Vec<CertificateRevocationListDer<'static>>,
    numbered: Vec<CrlNumber>,
    expiry: Expiry,
    /// What loads but is not checked as one might think ([`CheckedCrls`]).
    warnings: Vec<String>,
}

/// Loads every file of `files` — the own chain (its leaf checked for `own` when given), its
/// key, the CA bundle, each CRL ([`checked_crls`]) — and pairs the chain with the key. Each
/// problem is noted against its key in `keys`, and all of them are returned: one bad file does
/// not hide another. `webpki_accepts` is the verifier's judgement of one CRL under the bundle's
/// trust anchors.
fn load_material(
    files: &Files<'_>,
    keys: &TlsKeys,
    own: Option<Purpose>,
    floor: &CrlFloor,
    provider: &CryptoProvider,
    webpki_accepts: impl Fn(
        &RootCertStore,
        &CertificateRevocationListDer<'static>,
    ) -> Result<(), rustls::Error>,
) -> Result<Material, TlsProblems> {
    let mut found = Found::default();
    let certs = found.take(
        keys.cert,
        load_certs(files.cert).and_then(|certs| {
            if let Some(purpose) = own {
                // `load_certs` returns at least one certificate, the leaf first.
                check_own_leaf(files.cert, &certs[0], purpose)?;
            }
            Ok(certs)
        }),
    );
    let private = found.take(keys.key, load_private_key(files.key));
    let certified = match (certs, private) {
        (Some(certs), Some(private)) => {
            match certified_key(provider, files.cert, certs, files.key, private) {
                Ok(certified) => Some(certified),
                Err(e @ TlsError::Rustls { .. }) => {
                    found.note(keys.cert, e);
                    None
                }
                Err(e) => {
                    found.note(keys.key, e);
                    None
                }
            }
        }
        _ => None,
    };
    let bundle = found.take(keys.ca, ca_bundle(files.ca));
    let checked = checked_crls(
        files.crls,
        keys,
        bundle.as_ref().map(|(cas, roots)| Bundle {
            path: files.ca,
            cas,
            roots,
        }),
        floor,
        webpki_accepts,
        &mut found,
    );
    // Every `None` above has its problem noted.
    match (certified, bundle) {
        (Some(certified), Some((cas, roots))) if found.count() == 0 => Ok(Material {
            expiry: Expiry::of(&certified.cert, &cas),
            certified,
            roots,
            crls: checked.crls,
            numbered: checked.numbered,
            warnings: checked.warnings,
        }),
        _ => Err(TlsProblems(found.0)),
    }
}

/// The listener config from loaded parts: versions, verifier, certificate, no resumption, ALPN.
fn assemble_server_config(
    provider: Arc<CryptoProvider>,
    verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    certified: CertifiedKey,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(VERSIONS)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
    // No session cache, no TLS 1.3 tickets: every connection is a full handshake whose client
    // certificate is checked against the current CRLs. (The builder's default ticketer never
    // issues TLS 1.2 tickets; the tests assert it.)
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config.ignore_client_order = true;
    // After the handshake the listener's stream seals and opens records itself
    // (`records`): rustls hands over the keys, and reports the TLS 1.3 traffic secrets (for key
    // updates) to a hook that keeps them only for the stream's own handshake.
    config.enable_secret_extraction = true;
    config.key_log = Arc::new(records::capture::TrafficSecrets);
    Ok(Arc::new(config))
}

/// Builds a test or load-test client config: TLS 1.2/1.3, trusting only the CA bundle in
/// `c.ca` (never the system roots), presenting the client certificate, `alpn` offered in the
/// given order. Session resumption stays on here (rustls's default in-memory client cache)
/// unless CRLs are given; the gateway's own client side never resumes (see
/// [`upstream_tls_above`]). Problems are keyed by `ClientTls`'s field names.
pub fn client_config(c: &ClientTls, alpn: &[&[u8]]) -> Result<Arc<ClientConfig>, TlsProblems> {
    build_client_config(c, &TlsKeys::CLIENT_TLS, alpn, None, &CrlFloor::default()).map(|u| u.config)
}

/// [`client_config`] for the gateway's own client side (providers, an LDAPS directory), whose
/// files `keys` name: its certificate must also be one servers can accept ([`check_own_leaf`]).
/// (Test and load-test clients use `client_config`, which takes any certificate, to see the
/// gateway refuse bad ones.)
pub fn own_client_config(
    c: &ClientTls,
    keys: &TlsKeys,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, TlsProblems> {
    own_client_config_above(c, keys, alpn, &CrlFloor::default())
}

/// [`own_client_config`], refusing CRLs older than those `floor` has seen and raising it to
/// these: the upstream client's reloads, so a provider's CRL is never replaced by an older one.
pub fn own_client_config_above(
    c: &ClientTls,
    keys: &TlsKeys,
    alpn: &[&[u8]],
    floor: &CrlFloor,
) -> Result<Arc<ClientConfig>, TlsProblems> {
    upstream_tls_above(c, keys, alpn, floor).map(|u| u.config)
}

/// The upstream client's TLS as one reloadable snapshot: the config, and the earliest
/// nextUpdate of its CRLs, after which no connection made under it may be used again (new
/// ones are refused by the verifier then; see `forward::Upstream`).
#[derive(Debug)]
pub struct UpstreamTls {
    pub config: Arc<ClientConfig>,
    /// Unix seconds; `None` without CRLs (or with none that has a nextUpdate).
    pub crl_horizon: Option<u64>,
    /// When this snapshot's client certificate chain and CA bundle run out.
    pub expiry: Expiry,
    /// Likewise [`ListenerTls::warnings`].
    pub warnings: Vec<String>,
}

/// [`own_client_config_above`] with the CRLs' horizon: what the gateway forwards with.
/// Session resumption is off (no session cache, no tickets, TLS 1.2 or 1.3), with CRLs or
/// without: a resumed session skips the verification of the server's certificate, so an
/// expired provider (or directory) certificate, or one revoked since, would be accepted on
/// every new connection that resumed. Every new connection runs a full handshake and has the
/// certificate checked against the clock, the CA bundle and the CRLs in force; provider
/// connections are pooled, so full handshakes are rare.
pub fn upstream_tls_above(
    c: &ClientTls,
    keys: &TlsKeys,
    alpn: &[&[u8]],
    floor: &CrlFloor,
) -> Result<UpstreamTls, TlsProblems> {
    build_client_config(c, keys, alpn, Some(Purpose::Client), floor)
}

fn build_client_config(
    c: &ClientTls,
    keys: &TlsKeys,
    alpn: &[&[u8]],
    own: Option<Purpose>,
    floor: &CrlFloor,
) -> Result<UpstreamTls, TlsProblems> {
    let provider = provider();
    let files = Files {
        cert: &c.cert,
        key: &c.key,
        ca: &c.ca,
        crls: &c.crls,
    };
    let m = load_material(&files, keys, own, floor, &provider, |roots, crl| {
        server_verifier(&provider, roots.clone(), vec![crl.clone()]).map(|_| ())
    })?;
    let crl_horizon = chaincache::crl_horizon(&m.crls);
    let with_crls = !m.crls.is_empty();
    let server_verifier = server_verifier(&provider, m.roots, m.crls).map_err(|e| {
        TlsProblems::one(
            keys.ca,
            TlsError::BadCaBundle {
                path: c.ca.clone(),
                reason: e.to_string(),
            },
        )
    })?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(VERSIONS)
        .map_err(|e| {
            TlsProblems::one(
                keys.cert,
                TlsError::Rustls {
                    path: c.cert.clone(),
                    context: "protocol versions",
                    source: e,
                },
            )
        })?
        .with_webpki_verifier(server_verifier)
        .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(m.certified)));
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // The gateway's own client side (`own`) never resumes; a test client only without CRLs.
    if own.is_some() || with_crls {
        config.resumption = rustls::client::Resumption::disabled();
    }
    floor.raise(m.numbered);
    log_warnings(&m.warnings);
    Ok(UpstreamTls {
        config: Arc::new(config),
        crl_horizon,
        expiry: m.expiry,
        warnings: m.warnings,
    })
}

/// The provider certificate verifier of the upstream client: chains to the CA bundle, and,
/// with CRLs, the listener's revocation policy (see the module doc) for provider certificates.
fn server_verifier(
    provider: &Arc<CryptoProvider>,
    roots: RootCertStore,
    crls: Vec<CertificateRevocationListDer<'static>>,
) -> Result<Arc<WebPkiServerVerifier>, rustls::Error> {
    let mut builder =
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(provider));
    if !crls.is_empty() {
        builder = builder
            .with_crls(crls)
            .allow_unknown_revocation_status()
            .enforce_revocation_expiration();
    }
    builder.build().map_err(|e| match e {
        rustls::client::VerifierBuilderError::InvalidCrl(crl) => {
            rustls::Error::InvalidCertRevocationList(crl)
        }
        other => rustls::Error::General(other.to_string()),
    })
}

/// The client certificate verifier of the listener (see the module doc for the CRL policy).
fn client_verifier(
    provider: &Arc<CryptoProvider>,
    roots: RootCertStore,
    crls: Vec<CertificateRevocationListDer<'static>>,
) -> Result<Arc<chaincache::ChainCache>, rustls::Error> {
    let mut builder =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(provider));
    let cache_crls = crls.clone();
    if !crls.is_empty() {
        builder = builder
            .with_crls(crls)
            .allow_unknown_revocation_status()
            .enforce_revocation_expiration();
    }
    let verifier = builder.build().map_err(|e| match e {
        rustls::server::VerifierBuilderError::InvalidCrl(crl) => {
            rustls::Error::InvalidCertRevocationList(crl)
        }
        other => rustls::Error::General(other.to_string()),
    })?;
    // Accepted chains are remembered by this verifier only (a reload builds a new one).
    Ok(Arc::new(chaincache::ChainCache::new(verifier, &cache_crls)))
}

/// What the gateway presents its own certificate for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// The listener's certificate, to consumers.
    Server,
    /// The client certificate, to providers.
    Client,
}

/// Refuses an own leaf certificate every peer would refuse: outside its validity period now,
/// or with an extended key usage that does not allow `purpose`. Loaded at start or on a
/// reload, such a certificate would fail every handshake while the gateway said it was ready.
fn check_own_leaf(
    path: &Path,
    leaf: &CertificateDer<'_>,
    purpose: Purpose,
) -> Result<(), TlsError> {
    let refuse = |reason: String| TlsError::OwnCertificate {
        path: path.to_owned(),
        reason,
    };
    let cert = parse_peer(leaf).map_err(|e| refuse(e.to_string()))?;
    let validity = cert.validity();
    let now = x509_parser::time::ASN1Time::now();
    if validity.not_after < now {
        return Err(refuse(format!("expired at {}", validity.not_after)));
    }
    if validity.not_before > now {
        return Err(refuse(format!("not valid until {}", validity.not_before)));
    }
    if let Ok(Some(eku)) = cert.extended_key_usage() {
        let eku = eku.value;
        let allowed = eku.any
            || match purpose {
                Purpose::Server => eku.server_auth,
                Purpose::Client => eku.client_auth,
            };
        if !allowed {
            return Err(refuse(format!(
                "its extended key usage does not allow TLS {} authentication",
                match purpose {
                    Purpose::Server => "server",
                    Purpose::Client => "client",
                }
            )));
        }
    }
    Ok(())
}

/// Pairs the chain with its signing key, refusing a key that is not the leaf's.
fn certified_key(
    provider: &CryptoProvider,
    cert_path: &Path,
    certs: Vec<CertificateDer<'static>>,
    key_path: &Path,
    key: PrivateKeyDer<'static>,
) -> Result<CertifiedKey, TlsError> {
    let signing_key =
        provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| TlsError::UnsupportedKey {
                path: key_path.to_owned(),
                reason: e.to_string(),
            })?;
    let certified = CertifiedKey::new(certs, signing_key);
    match certified.keys_match() {
        Ok(()) => Ok(certified),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err(TlsError::KeyMismatch {
                cert: cert_path.to_owned(),
                key: key_path.to_owned(),
            })
        }
        Err(e) => Err(TlsError::Rustls {
            path: cert_path.to_owned(),
            context: "checking the private key against the certificate",
            source: e,
        }),
    }
}

/// The identity of a verified peer, from its leaf certificate.
pub fn peer_identity(leaf: &CertificateDer<'_>) -> Result<PeerIdentity, TlsError> {
    identity_with_digest(leaf, &sha256(leaf)).map(|(identity, ..)| identity)
}

/// `peer_identity`, with the SHA-256 of `leaf` already computed, and the certificate's
/// `notAfter` (Unix seconds) from the same parse.
/// The identity of `leaf` (whose SHA-256 is `digest`), its notAfter, and the SHA-256 of its
/// signed part (`tbsCertificate`): what tells one certificate from another whatever the
/// encoding of its signature (an ECDSA signature (r, s) verifies as (r, n−s) too, so a holder
/// can present the same certificate as other DER bytes, with another `digest`). Not issuer
/// and serial: two CAs of one name (a key rollover) may both number from 1.
fn identity_with_digest(
    leaf: &CertificateDer<'_>,
    digest: &[u8; 32],
) -> Result<(PeerIdentity, i64, [u8; 32]), TlsError> {
    let cert = parse_peer(leaf)?;
    let signed = sha256(cert.tbs_certificate.as_ref());
    let not_after = cert.validity().not_after.timestamp();
    let mut names = Vec::new();
    let san = cert
        .subject_alternative_name()
        .map_err(|e| TlsError::PeerCertificate {
            reason: format!("subjectAltName: {e}"),
        })?;
    if let Some(san) = san {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(dns) = name {
                names.push((*dns).to_owned());
            }
        }
    }
    if names.is_empty() {
        for cn in cert.subject().iter_common_name() {
            let cn = cn.as_str().map_err(|e| TlsError::PeerCertificate {
                reason: format!("subject CN is not a string: {e}"),
            })?;
            names.push(cn.to_owned());
        }
    }
    let identity = PeerIdentity {
        names,
        subject: rfc4514(cert.subject()),
        serial: serial_hex(cert.raw_serial()),
        fingerprint_sha256: hex(digest),
    };
    Ok((identity, not_after, signed))
}

/// The certificate's `notAfter`, in Unix seconds (for expiry metrics).
pub fn not_after(cert: &CertificateDer<'_>) -> Result<i64, TlsError> {
    Ok(parse_peer(cert)?.validity().not_after.timestamp())
}

/// Why a handshake failed, as a bounded label set for metrics (`reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HandshakeFailure {
    /// The client sent no certificate.
    NoClientCertificate,
    /// The peer's certificate (or one in its chain) has expired.
    CertificateExpired,
    /// The peer's certificate is not valid yet.
    CertificateNotYetValid,
    /// The peer's certificate is listed in a configured CRL.
    CertificateRevoked,
    /// The certificate's CRL is stale (`nextUpdate` passed).
    CrlExpired,
    /// The chain does not lead to a configured CA.
    UnknownIssuer,
    /// Any other certificate problem (bad signature, wrong purpose, bad name, malformed).
    BadCertificate,
    /// No common protocol version, cipher suite, group or signature scheme.
    Incompatible,
    /// The peer sent an alert (it refused us).
    AlertReceived,
    /// The peer sent something that is not TLS, or not valid at that point.
    Malformed,
    /// The connection closed or failed before the handshake finished.
    Io,
    /// Anything else.
    Other,
}

impl HandshakeFailure {
    /// Every failure, so that each `reason` series can be exposed from 0 at start.
    pub const ALL: [HandshakeFailure; 12] = [
        Self::NoClientCertificate,
        Self::CertificateExpired,
        Self::CertificateNotYetValid,
        Self::CertificateRevoked,
        Self::CrlExpired,
        Self::UnknownIssuer,
        Self::BadCertificate,
        Self::Incompatible,
        Self::AlertReceived,
        Self::Malformed,
        Self::Io,
        Self::Other,
    ];

    /// Classifies the error returned by a tokio-rustls accept or connect.
    pub fn classify(err: &io::Error) -> Self {
        match err
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
        {
            Some(e) => Self::from_rustls(e),
            None => Self::Io,
        }
    }

    /// Classifies a rustls error.
    pub fn from_rustls(err: &rustls::Error) -> Self {
        use rustls::Error as E;
        match err {
            E::NoCertificatesPresented => Self::NoClientCertificate,
            E::InvalidCertificate(cert) => match cert {
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    Self::CertificateExpired
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    Self::CertificateNotYetValid
                }
                CertificateError::Revoked => Self::CertificateRevoked,
                CertificateError::ExpiredRevocationList
                | CertificateError::ExpiredRevocationListContext { .. } => Self::CrlExpired,
                CertificateError::UnknownIssuer => Self::UnknownIssuer,
                _ => Self::BadCertificate,
            },
            E::PeerIncompatible(_) => Self::Incompatible,
            E::AlertReceived(_) => Self::AlertReceived,
            E::InvalidMessage(_)
            | E::InappropriateMessage { .. }
            | E::InappropriateHandshakeMessage { .. }
            | E::PeerMisbehaved(_)
            | E::DecryptError => Self::Malformed,
            _ => Self::Other,
        }
    }

    /// The metric label.
    pub fn as_label(self) -> &'static str {
        match self {
            Self::NoClientCertificate => "no_client_certificate",
            Self::CertificateExpired => "certificate_expired",
            Self::CertificateNotYetValid => "certificate_not_yet_valid",
            Self::CertificateRevoked => "certificate_revoked",
            Self::CrlExpired => "crl_expired",
            Self::UnknownIssuer => "unknown_issuer",
            Self::BadCertificate => "bad_certificate",
            Self::Incompatible => "incompatible",
            Self::AlertReceived => "alert_received",
            Self::Malformed => "malformed",
            Self::Io => "io",
            Self::Other => "other",
        }
    }
}

impl fmt::Display for HandshakeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_label())
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    crate::files::read(path).map_err(|source| TlsError::Unreadable {
        path: path.to_owned(),
        source,
    })
}

fn parse_peer<'a>(
    cert: &'a CertificateDer<'_>,
) -> Result<x509_parser::certificate::X509Certificate<'a>, TlsError> {
    match x509_parser::parse_x509_certificate(cert) {
        Ok(([], parsed)) => Ok(parsed),
        Ok(_) => Err(TlsError::PeerCertificate {
            reason: "trailing data after the certificate".to_owned(),
        }),
        Err(e) => Err(TlsError::PeerCertificate {
            reason: format!("not valid X.509: {e}"),
        }),
    }
}

fn looks_like_pem(bytes: &[u8]) -> bool {
    bytes.windows(11).any(|w| w == b"-----BEGIN ")
}

fn is_encrypted_pem(bytes: &[u8]) -> bool {
    let has = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    has(b"-----BEGIN ENCRYPTED PRIVATE KEY-----") || has(b"Proc-Type: 4,ENCRYPTED")
}

/// A PEM error as text that never quotes file content (PEM errors can carry key bytes).
fn pem_reason(e: &pem::Error) -> String {
    match e {
        pem::Error::MissingSectionEnd { .. } => "a PEM section has no END line".to_owned(),
        pem::Error::IllegalSectionStart { .. } => "malformed PEM BEGIN line".to_owned(),
        pem::Error::Base64Decode(_) => "invalid base64 in a PEM section".to_owned(),
        pem::Error::Io(e) => format!("read error: {e}"),
        pem::Error::NoItemsFound => "no PEM section found".to_owned(),
        pem::Error::SectionTooLarge => "a PEM section is too large".to_owned(),
        _ => "malformed PEM".to_owned(),
    }
}

/// A DER INTEGER's content bytes as lowercase hex, without the sign-padding zero bytes.
pub(crate) fn serial_hex(raw: &[u8]) -> String {
    let first = raw
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(raw.len().saturating_sub(1));
    hex(&raw[first..])
}

/// A distinguished name as an RFC 4514 string: last RDN first, `,` between RDNs, `+` inside
/// one, short names for the attribute types of RFC 4514 §3 and dotted OIDs with a `#`-hex DER
/// value for the others.
fn rfc4514(name: &X509Name<'_>) -> String {
    let rdns: Vec<String> = name
        .iter_rdn()
        .map(|rdn| {
            rdn.iter()
                .map(|atv| {
                    let oid = atv.attr_type().to_id_string();
                    let short = match oid.as_str() {
                        "2.5.4.3" => Some("CN"),
                        "2.5.4.7" => Some("L"),
                        "2.5.4.8" => Some("ST"),
                        "2.5.4.10" => Some("O"),
                        "2.5.4.11" => Some("OU"),
                        "2.5.4.6" => Some("C"),
                        "2.5.4.9" => Some("STREET"),
                        "0.9.2342.19200300.100.1.25" => Some("DC"),
                        "0.9.2342.19200300.100.1.1" => Some("UID"),
                        _ => None,
                    };
                    match (short, atv.as_str()) {
                        (Some(short), Ok(value)) => format!("{short}={}", escape_rfc4514(value)),
                        _ => {
                            let der = atv.attr_value().to_der_vec().unwrap_or_default();
                            format!("{}=#{}", short.unwrap_or(&oid), hex(&der))
                        }
                    }
                })
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect();
    rdns.into_iter().rev().collect::<Vec<_>>().join(",")
}

fn escape_rfc4514(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        match c {
            '"' | '+' | ',' | ';' | '<' | '>' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '#' if i == 0 => out.push_str("\\#"),
            ' ' if i == 0 || i == last => out.push_str("\\ "),
            '\0' => out.push_str("\\00"),
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::pki::tests::TempDir;
    use super::pki::{Ca, Issued, KeyKind, LeafSpec, Validity};
    use super::*;

    /// The one problem of a failed load (a test of one bad file expects no other), or the
    /// value.
    fn only<T>(loaded: Result<T, TlsProblems>) -> Result<T, TlsError> {
        loaded.map_err(|problems| {
            let mut all: Vec<FileProblem> = problems.into_iter().collect();
            assert_eq!(all.len(), 1, "one problem expected: {all:?}");
            all.remove(0).error
        })
    }
    use rustls::pki_types::ServerName;
    use rustls::{HandshakeKind, ProtocolVersion};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::TlsConnector;

    const ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];

    /// A temp dir plus helpers to write PKI items into it.
    struct Files(TempDir);

    impl Files {
        fn new(tag: &str) -> Files {
            Files(TempDir::new(tag))
        }

        fn text(&self, name: &str, text: impl AsRef<[u8]>) -> PathBuf {
            let path = self.0.path(name);
            std::fs::write(&path, text).expect("write test file");
            path
        }

        fn leaf(&self, stem: &str, issued: &Issued) -> (PathBuf, PathBuf) {
            let cert = self.0.path(&format!("{stem}.pem"));
            let key = self.0.path(&format!("{stem}-key.pem"));
            issued.write(&cert, &key).expect("write leaf");
            (cert, key)
        }

        fn ca(&self, name: &str, cas: &[&Ca]) -> PathBuf {
            let bundle: String = cas.iter().map(|ca| ca.cert_pem()).collect();
            self.text(name, bundle)
        }

        fn server(&self, ca: &Ca, key: KeyKind, client_cas: &[&Ca], crls: &[&str]) -> ServerTls {
            let leaf = ca
                .issue(&LeafSpec::server(&["localhost", "127.0.0.1"]).with_key(key))
                .expect("server cert");
            let (cert, key) = self.leaf("server", &leaf);
            let crls = crls
                .iter()
                .enumerate()
                .map(|(i, pem)| self.text(&format!("crl{i}.pem"), pem))
                .collect();
            ServerTls {
                cert,
                key,
                client_ca: self.ca("client-ca.pem", client_cas),
                crls,
            }
        }

        /// The listener's config: an ECDSA certificate from `ca`, clients of `ca` accepted.
        fn ecdsa_listener(&self, ca: &Ca) -> Arc<ServerConfig> {
            server_config(&self.server(ca, KeyKind::EcdsaP256, &[ca], &[]), ALPN)
                .expect("server config")
        }

        fn client(&self, stem: &str, issued: &Issued, server_ca: &Ca) -> ClientTls {
            let (cert, key) = self.leaf(stem, issued);
            ClientTls {
                cert,
                key,
                ca: self.ca(&format!("{stem}-trust.pem"), &[server_ca]),
                crls: Vec::new(),
            }
        }
    }

    /// The gateway's own certificates must be usable: in their validity period and with an
    /// extended key usage for their role. An expired listener certificate had loaded (at start
    /// and on reload) and then failed every handshake while `/readyz` said ready.
    #[test]
    fn own_certificates_out_of_date_or_for_the_wrong_purpose_are_refused() {
        let files = Files::new("own-leaf");
        let ca = ecdsa_ca("Own CA");
        let server_with = |spec: LeafSpec| {
            let issued = ca.issue(&spec).expect("issue");
            let (cert, key) = files.leaf("own-server", &issued);
            let tls = ServerTls {
                cert,
                key,
                client_ca: files.ca("own-client-ca.pem", &[&ca]),
                crls: vec![],
            };
            server_config(&tls, ALPN).map(|_| ())
        };
        let names = ["localhost"];
        assert!(server_with(LeafSpec::server(&names)).is_ok());
        for (spec, says) in [
            (
                LeafSpec::server(&names).with_validity(Validity::Expired),
                "expired at",
            ),
            (
                LeafSpec::server(&names).with_validity(Validity::NotYetValid),
                "not valid until",
            ),
            (LeafSpec::client(&names), "TLS server authentication"),
        ] {
            match only(server_with(spec)) {
                Err(e @ TlsError::OwnCertificate { .. }) => {
                    assert!(e.to_string().contains(says), "{e}")
                }
                other => panic!("{says}: {other:?}"),
            }
        }
        let client_with = |spec: LeafSpec| {
            let issued = ca.issue(&spec).expect("issue");
            own_client_config(
                &files.client("own-client", &issued, &ca),
                &TlsKeys::CLIENT_TLS,
                &[],
            )
            .map(|_| ())
        };
        assert!(client_with(LeafSpec::client(&["gw.example"])).is_ok());
        for (spec, says) in [
            (
                LeafSpec::client(&["gw.example"]).with_validity(Validity::Expired),
                "expired at",
            ),
            (
                LeafSpec::server(&["gw.example"]),
                "TLS client authentication",
            ),
        ] {
            match only(client_with(spec)) {
                Err(e @ TlsError::OwnCertificate { .. }) => {
                    assert!(e.to_string().contains(says), "{e}")
                }
                other => panic!("{says}: {other:?}"),
            }
        }
    }

    /// Every bad file of a TLS configuration is reported, each with the key that names it and
    /// its file, not only the first: what `check-config`, start-up and a refused reload say.
    #[test]
    fn every_bad_file_is_reported_with_its_key() {
        let files = Files::new("every-problem");
        let ca = ecdsa_ca("Every CA");
        let keys = TlsKeys {
            cert: "listener.cert",
            key: "listener.key",
            ca: "listener.client_ca",
            crls: "listener.crls",
        };
        let keyed = |loaded: Result<ListenerTls, TlsProblems>| -> Vec<(String, PathBuf)> {
            let problems = loaded.expect_err("refused");
            let line = problems.to_string();
            problems
                .into_iter()
                .map(|p| {
                    assert!(line.contains(&p.to_string()), "{line}");
                    let path = match p.error {
                        TlsError::KeyMismatch { key, .. } => key,
                        TlsError::NoCertificate { path }
                        | TlsError::NoPrivateKey { path }
                        | TlsError::BadCrl { path, .. }
                        | TlsError::BadCaBundle { path, .. } => path,
                        other => panic!("{}: {other}", p.key),
                    };
                    (p.key, path)
                })
                .collect()
        };
        let now = x509_parser::time::ASN1Time::now().timestamp();
        let good = ca.crl(&[]).expect("crl");
        let stale = ca
            .crl_between(&[], now - 7200, now - 3600)
            .expect("stale crl");
        let stranger = ecdsa_ca("Stranger CA").crl(&[]).expect("crl");

        // A bad certificate, a CA "bundle" that is a leaf, and CRLs 0 and 2 of three bad: each
        // is reported (the CRLs' issuers cannot be checked without the bundle).
        let mut s = files.server(&ca, KeyKind::EcdsaP256, &[&ca], &[]);
        let not_a_cert = files.text("not-a-cert.pem", "no certificate here\n");
        let garbage = files.text("garbage-crl.pem", "not a CRL\n");
        let good_path = files.text("good-crl.pem", &good);
        let stale_path = files.text("stale-crl.pem", &stale);
        let (leaf_cert, _) = files.leaf("a-leaf", &client_leaf(&ca, &["leaf.example"]));
        let good_cert = std::mem::replace(&mut s.cert, not_a_cert.clone());
        let good_ca = std::mem::replace(&mut s.client_ca, leaf_cert.clone());
        s.crls = vec![garbage.clone(), good_path.clone(), stale_path.clone()];
        let floor = CrlFloor::default();
        assert_eq!(
            keyed(listener_tls_above(&s, &keys, ALPN, &floor)),
            [
                ("listener.cert".to_owned(), not_a_cert),
                ("listener.client_ca".to_owned(), leaf_cert),
                ("listener.crls[0]".to_owned(), garbage.clone()),
                ("listener.crls[2]".to_owned(), stale_path.clone()),
            ]
        );

        // With the bundle good: a key that is not the certificate's, a CRL of a CA not in the
        // bundle, a stale one.
        s.cert = good_cert;
        s.client_ca = good_ca;
        let (_, other_key) = files.leaf("other", &client_leaf(&ca, &["other.example"]));
        let good_key = std::mem::replace(&mut s.key, other_key.clone());
        let stranger_path = files.text("stranger-crl.pem", &stranger);
        s.crls = vec![good_path.clone(), stranger_path.clone(), stale_path.clone()];
        assert_eq!(
            keyed(listener_tls_above(&s, &keys, ALPN, &floor)),
            [
                ("listener.key".to_owned(), other_key),
                ("listener.crls[1]".to_owned(), stranger_path),
                ("listener.crls[2]".to_owned(), stale_path.clone()),
            ]
        );

        // Good files load, and raise the floor; a reload (the same loader) with two bad CRLs is
        // refused naming both, and not the floor (the files are what is wrong).
        s.key = good_key;
        s.crls = vec![good_path.clone()];
        listener_tls_above(&s, &keys, ALPN, &floor).expect("good files");
        s.crls = vec![stale_path.clone(), garbage.clone()];
        assert_eq!(
            keyed(listener_tls_above(&s, &keys, ALPN, &floor)),
            [
                ("listener.crls[0]".to_owned(), stale_path),
                ("listener.crls[1]".to_owned(), garbage),
            ]
        );
        // Without them, the floor's refusal names the list and the CRL it misses.
        s.crls = vec![];
        assert_eq!(
            keyed(listener_tls_above(&s, &keys, ALPN, &floor)),
            [("listener.crls".to_owned(), good_path)]
        );
    }

    /// `crl` (PEM) with the last byte of its signature changed: what a corrupted CRL looks like
    /// (it parses, names its issuer and its issuer's key identifier, and does not verify).
    fn corrupted(crl: &str) -> Vec<u8> {
        let mut der = CertificateRevocationListDer::from_pem_slice(crl.as_bytes())
            .expect("der")
            .as_ref()
            .to_vec();
        *der.last_mut().expect("a signature") ^= 0x01;
        der
    }

    /// How `listener` judges `leaf` (a client certificate its bundle's CA issued directly).
    fn judged(listener: &ListenerTls, leaf: &Issued) -> Result<(), HandshakeFailure> {
        listener
            .verify_client_chain(
                std::slice::from_ref(&leaf.cert_der),
                rustls::pki_types::UnixTime::now(),
            )
            .map_err(|e| HandshakeFailure::from_rustls(&e))
    }

    /// A CRL is checked against the client CAs when it is loaded: one named for a CA of the
    /// bundle, and for its key (its authority key identifier is the CA's), whose signature does
    /// not verify with that key is corrupted or forged, and refused naming its file (it had
    /// loaded and then failed every handshake of that CA's clients).
    #[test]
    fn a_corrupted_crl_of_a_trusted_ca_is_refused() {
        let files = Files::new("crl-issuer");
        let ca = ecdsa_ca("Listener CA");
        let own = ca.crl(&[]).expect("crl");
        assert!(server_config(
            &files.server(&ca, KeyKind::EcdsaP256, &[&ca], &[&own]),
            ALPN
        )
        .is_ok());
        let mut tls = files.server(&ca, KeyKind::EcdsaP256, &[&ca], &[]);
        let bad = files.text("corrupted.crl", corrupted(&own));
        tls.crls = vec![bad.clone()];
        match only(server_config(&tls, ALPN)) {
            Err(TlsError::BadCrl { path, reason }) => {
                assert_eq!(path, bad);
                assert!(reason.contains("signature does not verify"), "{reason}");
            }
            other => panic!("expected BadCrl, got {other:?}"),
        }
    }

    /// A CRL no CA of the bundle issued refuses the configuration, naming its file, its issuer
    /// and what to do, even with the other CRLs of its file and of the list good, and nothing is
    /// loaded of it (the floor is not raised): left out with a warning, it would let in what it
    /// revokes (an intermediate's CRL checks the intermediate's clients with only the root in
    /// the bundle), and a CRL for the wrong CA (two files swapped) would start the gateway with
    /// revocation checking off. So is a stale one (refused as not the bundle's, before its
    /// date), and the CRL of another key of a CA's name (the old key of a CA re-keyed under the
    /// same name, its certificate gone from the bundle): its authority key identifier is no
    /// CA's of the bundle.
    #[test]
    fn a_crl_of_a_ca_not_in_the_bundle_refuses_the_configuration() {
        let files = Files::new("crl-foreign");
        let ca = ecdsa_ca("Trusted CA");
        let stranger = ecdsa_ca("Stranger CA");
        let old_key = ecdsa_ca("Trusted CA");
        let revoked = client_leaf(&ca, &["revoked.example"]);
        let now = x509_parser::time::ASN1Time::now().timestamp();
        let stale_stranger = stranger
            .crl_between(&[], now - 7200, now - 3600)
            .expect("crl");
        let own = ca.crl(&[&revoked]).expect("crl");
        let mut tls = files.server(&ca, KeyKind::EcdsaP256, &[&ca], &[]);
        let hierarchy = files.text(
            "hierarchy.pem",
            format!(
                "{}{own}",
                stranger
                    .crl_numbered(&[], now - 60, now + 3600, 7)
                    .expect("crl")
            ),
        );
        let stale = files.text("stale-stranger.pem", &stale_stranger);
        let old = files.text("old-key.pem", old_key.crl(&[]).expect("crl"));
        tls.crls = vec![hierarchy.clone(), stale.clone(), old.clone()];
        let floor = CrlFloor::default();
        let problems: Vec<FileProblem> =
            listener_tls_above(&tls, &TlsKeys::SERVER_TLS, ALPN, &floor)
                .expect_err("refused")
                .into_iter()
                .collect();
        assert_eq!(problems.len(), 3, "{problems:?}");
        let bundle = tls.client_ca.display().to_string();
        for (problem, (key, path)) in problems.iter().zip([
            ("crls[0]", &hierarchy),
            ("crls[1]", &stale),
            ("crls[2]", &old),
        ]) {
            assert_eq!(problem.key, key);
            let TlsError::BadCrl { path: file, reason } = &problem.error else {
                panic!("{key}: expected BadCrl, got {:?}", problem.error);
            };
            assert_eq!(file, path);
            assert!(
                reason.contains(&format!(" in {bundle} (client_ca)")),
                "{reason}"
            );
            assert!(reason.contains("take the CRL out of crls"), "{reason}");
        }
        let reason = |i: usize| problems[i].error.to_string();
        for says in [
            "the CRL of CN=Stranger CA,",
            "(CRL Number 7) is issued by a CA that is not in",
            "take the CRL out of crls if it is not one of this listener's CAs",
            "add that CA to the bundle",
            "An intermediate CA's CRL is honoured only with the intermediate in the bundle",
        ] {
            assert!(reason(0).contains(says), "{says:?} not in {}", reason(0));
        }
        assert!(
            reason(1).contains("is issued by a CA that is not in"),
            "{}",
            reason(1)
        );
        for says in [
            "the CRL of CN=Trusted CA,",
            "is signed under a key that no CA of that name in",
            "(authority key identifier ",
            "list the CRL of the key in the bundle instead",
        ] {
            assert!(reason(2).contains(says), "{says:?} not in {}", reason(2));
        }
        // Nothing of the refused load reached the floor: the trusted CA's CRL alone loads, as
        // a first CRL, and refuses its revoked client.
        tls.crls = vec![files.text("own.pem", &own)];
        let listener = only(listener_tls_above(&tls, &TlsKeys::SERVER_TLS, ALPN, &floor))
            .expect("without the foreign CRLs");
        assert!(listener.warnings.is_empty(), "{:?}", listener.warnings);
        assert_eq!(
            judged(&listener, &revoked),
            Err(HandshakeFailure::CertificateRevoked)
        );
    }

    /// A CA hierarchy made with rcgen directly (the test PKI's CAs sign leaves only): a root, an
    /// intermediate CA it issued, and a revoked and a good client of the intermediate.
    struct Hierarchy {
        root_pem: String,
        intermediate_pem: String,
        intermediate: CertificateDer<'static>,
        revoked: CertificateDer<'static>,
        good: CertificateDer<'static>,
        /// The intermediate's CRL, revoking `revoked`.
        crl: String,
        /// The root's CRL revoking the intermediate, and one revoking nothing.
        root_crl_revoking_intermediate: String,
        root_crl: String,
    }

    impl Hierarchy {
        fn new() -> Hierarchy {
            use rcgen::{
                BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
                ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose,
                RevocationReason, RevokedCertParams, SerialNumber,
            };
            let now = x509_parser::time::ASN1Time::now().timestamp();
            let at = |t: i64| {
                rcgen::date_time_ymd(1970, 1, 1) + std::time::Duration::from_secs(t as u64)
            };
            let ca_params = |name: &str, depth: BasicConstraints| {
                let mut p = CertificateParams::default();
                p.distinguished_name.push(DnType::CommonName, name);
                p.is_ca = IsCa::Ca(depth);
                p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
                p.not_before = at(now - 3600);
                p.not_after = at(now + 86_400);
                p
            };
            let key = || KeyPair::generate().expect("key");
            let root_key = key();
            let root = ca_params("Hierarchy Root CA", BasicConstraints::Constrained(1))
                .self_signed(&root_key)
                .expect("root");
            let intermediate_key = key();
            let mut intermediate_params = ca_params(
                "Hierarchy Intermediate CA",
                BasicConstraints::Constrained(0),
            );
            intermediate_params.serial_number = Some(SerialNumber::from(7u64));
            let intermediate = intermediate_params
                .signed_by(&intermediate_key, &root, &root_key)
                .expect("intermediate");
            let leaf = |serial: u64| {
                let mut p =
                    CertificateParams::new(vec!["client.example".to_owned()]).expect("params");
                p.distinguished_name
                    .push(DnType::CommonName, "client.example");
                p.is_ca = IsCa::ExplicitNoCa;
                p.serial_number = Some(SerialNumber::from(serial));
                p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
                p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
                p.not_before = at(now - 3600);
                p.not_after = at(now + 86_400);
                p.use_authority_key_identifier_extension = true;
                p.signed_by(&key(), &intermediate, &intermediate_key)
                    .expect("leaf")
                    .der()
                    .clone()
            };
            let crl = CertificateRevocationListParams {
                this_update: at(now - 60),
                next_update: at(now + 3600),
                crl_number: SerialNumber::from(1u64),
                issuing_distribution_point: None,
                revoked_certs: vec![RevokedCertParams {
                    serial_number: SerialNumber::from(2u64),
                    revocation_time: at(now - 60),
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                }],
                key_identifier_method: KeyIdMethod::Sha256,
            }
            .signed_by(&intermediate, &intermediate_key)
            .and_then(|crl| crl.pem())
            .expect("crl");
            let root_crl = |revoked: &[u64]| {
                CertificateRevocationListParams {
                    this_update: at(now - 60),
                    next_update: at(now + 3600),
                    crl_number: SerialNumber::from(1u64),
                    issuing_distribution_point: None,
                    revoked_certs: revoked
                        .iter()
                        .map(|&serial| RevokedCertParams {
                            serial_number: SerialNumber::from(serial),
                            revocation_time: at(now - 60),
                            reason_code: Some(RevocationReason::CaCompromise),
                            invalidity_date: None,
                        })
                        .collect(),
                    key_identifier_method: KeyIdMethod::Sha256,
                }
                .signed_by(&root, &root_key)
                .and_then(|crl| crl.pem())
                .expect("root crl")
            };
            Hierarchy {
                root_crl_revoking_intermediate: root_crl(&[7]),
                root_crl: root_crl(&[]),
                root_pem: root.pem(),
                intermediate_pem: intermediate.pem(),
                intermediate: intermediate.der().clone(),
                revoked: leaf(2),
                good: leaf(3),
                crl,
            }
        }
    }

    /// A CRL that revokes a CA of the bundle refuses the configuration: every certificate of
    /// the bundle is a trust anchor, whose own revocation webpki never checks, so the revoked
    /// intermediate would go on vouching for its clients. The root's CRL revoking nothing loads.
    #[test]
    fn a_crl_revoking_a_ca_of_the_bundle_refuses_the_configuration() {
        let files = Files::new("crl-revoked-ca");
        let h = Hierarchy::new();
        let listener_ca = ecdsa_ca("Listener CA");
        let mut tls = files.server(&listener_ca, KeyKind::EcdsaP256, &[&listener_ca], &[]);
        tls.client_ca = files.text(
            "root-and-intermediate.pem",
            format!("{}{}", h.root_pem, h.intermediate_pem),
        );
        let intermediate_crl = files.text("intermediate-crl.pem", &h.crl);
        let revoking = files.text("root-crl-revoking.pem", &h.root_crl_revoking_intermediate);
        tls.crls = vec![intermediate_crl.clone(), revoking.clone()];
        match only(listener_tls(&tls, ALPN)) {
            Err(TlsError::BadCrl { path, reason }) => {
                assert_eq!(path, revoking);
                assert!(
                    reason.contains("revokes CN=Hierarchy Intermediate CA (certificate #2"),
                    "{reason}"
                );
            }
            other => panic!("expected BadCrl, got {other:?}"),
        }
        tls.crls = vec![intermediate_crl, files.text("root-crl.pem", &h.root_crl)];
        listener_tls(&tls, ALPN).expect("a root CRL revoking nothing loads");
    }

    /// An intermediate CA's CRL listed while only the root is in the bundle (clients send the
    /// intermediate in their chain) refuses the configuration, saying to add the intermediate:
    /// webpki would check the intermediate's clients against it (by issuer name, verified with
    /// the key of the intermediate the client sent), so the CRL does protect them, and leaving
    /// it out with a warning, as the loader once did, let its revoked clients in. With the
    /// intermediate in the bundle it loads and refuses them.
    #[test]
    fn an_intermediates_crl_without_the_intermediate_in_the_bundle_refuses_the_configuration() {
        let files = Files::new("crl-intermediate");
        let h = Hierarchy::new();
        let listener_ca = ecdsa_ca("Listener CA");
        let mut tls = files.server(&listener_ca, KeyKind::EcdsaP256, &[&listener_ca], &[]);
        tls.client_ca = files.text("root-only.pem", &h.root_pem);
        let crl = files.text("intermediate-crl.pem", &h.crl);
        tls.crls = vec![crl.clone()];
        match only(listener_tls(&tls, ALPN)) {
            Err(TlsError::BadCrl { path, reason }) => {
                assert_eq!(path, crl);
                for says in [
                    "the CRL of CN=Hierarchy Intermediate CA (CRL Number 1) is issued by a CA \
                     that is not in",
                    "An intermediate CA's CRL is honoured only with the intermediate in the bundle",
                ] {
                    assert!(reason.contains(says), "{says:?} not in {reason}");
                }
            }
            other => panic!("expected BadCrl, got {other:?}"),
        }
        let now = rustls::pki_types::UnixTime::now();
        // What the CRL does with only the root in the bundle (webpki, without the loader's
        // refusal): the revoked client is refused as revoked, and let in without the CRL.
        let root_only = || load_ca_bundle(&tls.client_ca).expect("roots");
        let sent = std::slice::from_ref(&h.intermediate);
        use rustls::server::danger::ClientCertVerifier;
        let with_crl = client_verifier(
            &provider(),
            root_only(),
            vec![CertificateRevocationListDer::from_pem_slice(h.crl.as_bytes()).expect("der")],
        )
        .expect("verifier");
        let refused = with_crl
            .verify_client_cert(&h.revoked, sent, now)
            .expect_err("the intermediate's CRL revokes it");
        assert_eq!(
            HandshakeFailure::from_rustls(&refused),
            HandshakeFailure::CertificateRevoked
        );
        let without = client_verifier(&provider(), root_only(), vec![]).expect("verifier");
        assert!(without.verify_client_cert(&h.revoked, sent, now).is_ok());

        // With the intermediate in the bundle, the CRL loads and refuses the revoked client
        // (sent with its intermediate, or alone); the good one is let in.
        tls.client_ca = files.text(
            "root-and-intermediate.pem",
            format!("{}{}", h.root_pem, h.intermediate_pem),
        );
        let listener = listener_tls(&tls, ALPN).expect("the intermediate in the bundle");
        for chain in [
            vec![h.revoked.clone(), h.intermediate.clone()],
            vec![h.revoked.clone()],
        ] {
            let judged = listener
                .verify_client_chain(&chain, now)
                .map_err(|e| HandshakeFailure::from_rustls(&e));
            assert_eq!(judged, Err(HandshakeFailure::CertificateRevoked));
        }
        listener
            .verify_client_chain(&[h.good.clone(), h.intermediate.clone()], now)
            .expect("the good client");
    }

    /// Two CAs of one name with different keys (a CA re-keyed under the same name, both in the
    /// bundle for an overlap) are refused while a CRL of that name is listed: webpki checks
    /// a certificate against the first CRL of its issuer's name and verifies it with the key
    /// of the CA the certificate chains to, so every certificate of the other key was refused
    /// (BadSignature) while the load had been accepted. The error names the subject, both
    /// CAs by fingerprint, why and what to do. Without a CRL of that name they are allowed.
    #[tokio::test]
    async fn two_cas_of_one_name_with_different_keys_are_refused_while_its_crl_is_listed() {
        let files = Files::new("crl-same-name");
        let (old, new, other) = (
            ecdsa_ca("Rekeyed CA"),
            ecdsa_ca("Rekeyed CA"),
            ecdsa_ca("Other CA"),
        );
        let fingerprint = |ca: &Ca| hex(&sha256(ca.cert_der()));
        let bundle: [&Ca; 3] = [&old, &new, &other];
        let (old_crl, new_crl) = (old.crl(&[]).expect("crl"), new.crl(&[]).expect("crl"));
        let other_crl = other.crl(&[]).expect("crl");
        let refused = |crls: &[&str]| {
            let tls = files.server(&other, KeyKind::EcdsaP256, &bundle, crls);
            match only(listener_tls(&tls, ALPN)) {
                Err(TlsError::BadCaBundle { path, reason }) => {
                    assert_eq!(path, tls.client_ca);
                    reason
                }
                other => panic!("expected BadCaBundle, got {other:?}"),
            }
        };
        // Either key's CRL, or both (one problem: the bundle's, not a second CRL's too).
        for crls in [
            vec![old_crl.as_str(), other_crl.as_str()],
            vec![new_crl.as_str()],
            vec![old_crl.as_str(), new_crl.as_str()],
        ] {
            let reason = refused(&crls);
            for says in [
                format!("#1 (SHA-256 fingerprint {})", fingerprint(&old)),
                format!("#2 (SHA-256 fingerprint {})", fingerprint(&new)),
                "are all named CN=Rekeyed CA,".to_owned(),
                "but have different keys".to_owned(),
                "crls has a CRL issued under that name".to_owned(),
                "BadSignature".to_owned(),
                "Give the new CA a name of its own".to_owned(),
            ] {
                assert!(reason.contains(&says), "{says:?} not in {reason}");
            }
            assert!(!reason.contains(&fingerprint(&other)), "{reason}");
        }
        // Without a CRL of that name, webpki's path building tries each by signature: both
        // CAs' clients are accepted.
        let tls = files.server(&other, KeyKind::EcdsaP256, &bundle, &[&other_crl]);
        let listener = listener_tls(&tls, ALPN).expect("no CRL of that name");
        for ca in [&old, &new] {
            assert_eq!(judged(&listener, &client_leaf(ca, &["c.example"])), Ok(()));
        }
        // What the refusal prevents: the old key's CRL with the new key in the bundle fails
        // every client of the new key (checked here without the loader's refusal).
        let provider = provider();
        let verifier = client_verifier(
            &provider,
            load_ca_bundle(&files.ca("overlap.pem", &bundle)).expect("roots"),
            vec![CertificateRevocationListDer::from_pem_slice(old_crl.as_bytes()).expect("der")],
        )
        .expect("verifier");
        use rustls::server::danger::ClientCertVerifier;
        let refused_by_webpki = verifier
            .verify_client_cert(
                &client_leaf(&new, &["c.example"]).cert_der,
                &[],
                rustls::pki_types::UnixTime::now(),
            )
            .expect_err("the old key's CRL against the new key's client");
        assert_eq!(
            HandshakeFailure::from_rustls(&refused_by_webpki),
            HandshakeFailure::BadCertificate,
            "{refused_by_webpki}"
        );
    }

    /// The CRL floor is per issuer key: a CA re-keyed under the same name numbers its CRLs on
    /// its own, so going over to the new CA (bundle and CRL) and back to the old one with its
    /// own CRL are both accepted; before, the floor merged the keys' CRL Numbers and refused the
    /// way back as "older". Each key's CRL still never goes back below its own floor, and a
    /// CA still in the bundle may not lose its CRL.
    #[test]
    fn a_ca_re_keyed_under_its_name_can_be_rolled_back_with_its_own_crl() {
        let files = Files::new("crl-rekeyed");
        let (old, new) = (ecdsa_ca("Rekeyed CA"), ecdsa_ca("Rekeyed CA"));
        let now = x509_parser::time::ASN1Time::now().timestamp();
        let numbered = |ca: &Ca, number| {
            ca.crl_numbered(&[], now - 60, now + 3600, number)
                .expect("crl")
        };
        let floor = CrlFloor::default();
        let build = |ca: &Ca, crls: &[&str]| {
            only(listener_tls_above(
                &files.server(ca, KeyKind::EcdsaP256, &[ca], crls),
                &TlsKeys::SERVER_TLS,
                ALPN,
                &floor,
            ))
        };
        let old_crl = numbered(&old, 5);
        build(&old, &[&old_crl]).expect("the old CA");
        build(&new, &[&numbered(&new, 1000)]).expect("over to the new CA");
        build(&old, &[&old_crl]).expect("back to the old CA with its own CRL");
        build(&new, &[&numbered(&new, 1001)]).expect("over again");
        for (ca, crls, says) in [
            (
                &new,
                vec![numbered(&new, 999)],
                "is older than the one loaded",
            ),
            (
                &old,
                vec![numbered(&old, 4)],
                "is older than the one loaded",
            ),
            (&old, vec![], "is still a CA in"),
        ] {
            let crls: Vec<&str> = crls.iter().map(String::as_str).collect();
            match build(ca, &crls) {
                Err(TlsError::BadCrl { reason, .. }) => {
                    assert!(reason.contains(says), "{says}: {reason}");
                    assert!(reason.contains("issuer key SHA-256"), "{reason}");
                }
                other => panic!("{says}: expected BadCrl, got {other:?}"),
            }
        }
    }

    /// The warnings of a configuration are logged (WARN) as it is built, once for each load
    /// (start, each reload), each as the snapshot holds it.
    #[test]
    fn a_configurations_warnings_are_logged_when_it_loads() {
        #[derive(Clone, Default)]
        struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);
        impl io::Write for Captured {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                self.0.lock().expect("log buffer").extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let files = Files::new("crl-logged");
        let (one, two) = (ecdsa_ca("Logged CA"), ecdsa_ca("Unlogged CA"));
        let tls = files.server(
            &one,
            KeyKind::EcdsaP256,
            &[&one, &two],
            &[&one.crl(&[]).expect("crl")],
        );
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let listener = tracing::subscriber::with_default(subscriber, || {
            listener_tls(&tls, ALPN).expect("loads")
        });
        let log = String::from_utf8(captured.0.lock().expect("log buffer").clone()).expect("utf-8");
        assert_eq!(listener.warnings.len(), 1);
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(" WARN ")).collect();
        assert_eq!(lines.len(), 1, "{log}");
        assert!(lines[0].ends_with(&listener.warnings[0]), "{log}");
    }

    /// While CRLs are configured, each CA of the bundle with no CRL loaded is named in a
    /// warning (subject, place, fingerprint): its clients are accepted without a revocation
    /// check, which before went unsaid. Without CRLs (revocation checking off) there is none.
    #[test]
    fn a_ca_without_a_crl_is_named_in_a_warning_while_crls_are_configured() {
        let files = Files::new("crl-uncovered");
        let (one, two) = (ecdsa_ca("Covered CA"), ecdsa_ca("Uncovered CA"));
        let crl_one = one.crl(&[]).expect("crl");
        let warnings = |crls: &[&str]| {
            listener_tls(
                &files.server(&one, KeyKind::EcdsaP256, &[&one, &two], crls),
                ALPN,
            )
            .expect("loads")
            .warnings
        };
        let said = warnings(&[&crl_one]);
        assert_eq!(said.len(), 1, "{said:?}");
        assert!(
            said[0].starts_with("crls: no CRL for CN=Uncovered CA,")
                && said[0].contains(&format!(
                    " (certificate #2, SHA-256 fingerprint {}) in ",
                    hex(&sha256(two.cert_der()))
                )),
            "{}",
            said[0]
        );
        assert!(
            said[0].contains("accepted without a revocation check"),
            "{}",
            said[0]
        );
        assert!(
            warnings(&[]).is_empty(),
            "no CRLs: revocation checking is off"
        );
        assert!(warnings(&[&crl_one, &two.crl(&[]).expect("crl")]).is_empty());

        // The upstream client's CRLs (the same loader), likewise.
        let leaf = one
            .issue(&LeafSpec::client(&["gateway.example"]))
            .expect("client cert");
        let mut c = files.client("upstream", &leaf, &one);
        c.ca = files.ca("upstream-ca.pem", &[&one, &two]);
        c.crls = vec![files.text("upstream-crl.pem", &crl_one)];
        let upstream = upstream_tls_above(&c, &TlsKeys::CLIENT_TLS, &[], &CrlFloor::default())
            .expect("upstream");
        assert_eq!(upstream.warnings.len(), 1, "{:?}", upstream.warnings);
        assert!(upstream.warnings[0].contains("CN=Uncovered CA"));
    }

    /// A snapshot's expiry is the earliest notAfter of its whole chain (not just the leaf's)
    /// and of its CA bundle.
    #[test]
    fn a_snapshot_expires_with_the_earliest_certificate_of_its_chain_and_bundle() {
        let files = Files::new("expiry");
        let ca = ecdsa_ca("Expiry CA");
        let other = ecdsa_ca("Second CA");
        let mut s = files.server(&ca, KeyKind::EcdsaP256, &[&ca, &other], &[]);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs() as i64;
        let chain_end = now + 5 * 86_400;
        let short = ca
            .issue(
                &LeafSpec::server(&["intermediate.example"])
                    .with_validity(Validity::Until(chain_end)),
            )
            .expect("short-lived cert");
        let leaf = std::fs::read_to_string(&s.cert).expect("leaf");
        s.cert = files.text("chain.pem", format!("{leaf}{}", short.cert_pem));
        let listener = listener_tls(&s, ALPN).expect("listener");
        assert_eq!(listener.expiry.chain, chain_end);
        let bundle = load_certs(&s.client_ca).expect("bundle");
        let earliest = bundle.iter().map(|c| not_after(c).expect("notAfter")).min();
        assert_eq!(Some(listener.expiry.ca_bundle), earliest);
    }

    /// `ALL` holds every variant once (a new variant must be added to it: this match fails to
    /// compile until its arm is written, and the count below until `ALL` has it).
    #[test]
    fn all_handshake_failures_are_listed_once() {
        let arms = |f: HandshakeFailure| match f {
            HandshakeFailure::NoClientCertificate
            | HandshakeFailure::CertificateExpired
            | HandshakeFailure::CertificateNotYetValid
            | HandshakeFailure::CertificateRevoked
            | HandshakeFailure::CrlExpired
            | HandshakeFailure::UnknownIssuer
            | HandshakeFailure::BadCertificate
            | HandshakeFailure::Incompatible
            | HandshakeFailure::AlertReceived
            | HandshakeFailure::Malformed
            | HandshakeFailure::Io
            | HandshakeFailure::Other => f.as_label(),
        };
        let labels: std::collections::HashSet<_> =
            HandshakeFailure::ALL.iter().map(|f| arms(*f)).collect();
        assert_eq!(labels.len(), 12);
    }

    fn ecdsa_ca(name: &str) -> Ca {
        Ca::new(name, KeyKind::EcdsaP256).expect("CA")
    }

    fn client_leaf(ca: &Ca, names: &[&str]) -> Issued {
        ca.issue(&LeafSpec::client(names)).expect("client cert")
    }

    /// What the server saw of a successful handshake.
    #[derive(Debug)]
    struct Accepted {
        identity: PeerIdentity,
        version: Option<ProtocolVersion>,
        alpn: Option<Vec<u8>>,
        kind: Option<HandshakeKind>,
        suite: Option<rustls::CipherSuite>,
    }

    /// Runs one handshake over an in-memory pipe; the server answers "ok" once it has accepted,
    /// and the client reads it, so a rejection is seen on both sides in every TLS version.
    async fn handshake(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
    ) -> (io::Result<Accepted>, io::Result<()>) {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server_side = async move {
            let (mut tls, hs) = stream::accept(server, server_io).await?;
            let leaf = hs
                .peer_certificates
                .first()
                .ok_or_else(|| io::Error::other("no client certificate"))?;
            let accepted = Accepted {
                identity: peer_identity(leaf).map_err(io::Error::other)?,
                version: hs.version,
                alpn: hs.alpn,
                kind: hs.kind,
                suite: hs.suite,
            };
            tls.write_all(b"ok").await?;
            tls.flush().await?;
            Ok(accepted)
        };
        let client_side = async move {
            let name = ServerName::try_from("localhost").map_err(io::Error::other)?;
            let mut tls = TlsConnector::from(client).connect(name, client_io).await?;
            let mut buf = [0u8; 2];
            tls.read_exact(&mut buf).await?;
            assert_eq!(&buf, b"ok");
            Ok(())
        };
        tokio::join!(server_side, client_side)
    }

    fn failure(result: &io::Result<impl fmt::Debug>) -> HandshakeFailure {
        match result {
            Err(e) => HandshakeFailure::classify(e),
            Ok(ok) => panic!("expected a handshake failure, got {ok:?}"),
        }
    }

    /// A client presenting `c`'s certificate, with `provider`'s suites and only `versions`.
    fn client_with(
        c: &ClientTls,
        provider: Arc<CryptoProvider>,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Arc<ClientConfig> {
        let config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .expect("versions")
            .with_root_certificates(load_ca_bundle(&c.ca).expect("ca"))
            .with_client_auth_cert(
                load_certs(&c.cert).expect("cert"),
                load_private_key(&c.key).expect("key"),
            )
            .expect("client auth");
        Arc::new(config)
    }

    fn tls12_client(c: &ClientTls) -> Arc<ClientConfig> {
        client_with(c, provider(), &[&rustls::version::TLS12])
    }

    fn anonymous_client(ca: &Path) -> Arc<ClientConfig> {
        Arc::new(
            ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(VERSIONS)
                .expect("versions")
                .with_root_certificates(load_ca_bundle(ca).expect("ca"))
                .with_no_client_auth(),
        )
    }

    // ---- loading ----

    #[test]
    fn missing_files_are_unreadable_with_their_path() {
        let files = Files::new("missing");
        let path = files.0.path("nope.pem");
        assert!(
            matches!(load_certs(&path), Err(TlsError::Unreadable { path: p, .. }) if p == path)
        );
        assert!(
            matches!(load_private_key(&path), Err(TlsError::Unreadable { path: p, .. }) if p == path)
        );
        assert!(
            matches!(load_crls(std::slice::from_ref(&path)), Err(TlsError::Unreadable { path: p, .. }) if p == path)
        );
        let err = load_certs(&path).expect_err("missing");
        assert!(err.to_string().contains("nope.pem"), "{err}");
    }

    #[test]
    fn empty_and_garbage_files_name_the_problem_and_the_file() {
        let files = Files::new("garbage");
        let empty = files.text("empty.pem", "");
        let garbage = files.text("garbage.pem", "this is not a certificate\n");
        let bad_b64 = files.text(
            "bad64.pem",
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        );
        let not_x509 = files.text(
            "notx509.pem",
            "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n",
        );
        assert!(
            matches!(load_certs(&empty), Err(TlsError::NoCertificate { path }) if path == empty)
        );
        assert!(
            matches!(load_certs(&garbage), Err(TlsError::NoCertificate { path }) if path == garbage)
        );
        assert!(
            matches!(load_certs(&bad_b64), Err(TlsError::BadCertificate { path, .. }) if path == bad_b64)
        );
        match load_certs(&not_x509) {
            Err(TlsError::BadCertificate { path, reason }) => {
                assert_eq!(path, not_x509);
                assert!(reason.contains("X.509"), "{reason}");
            }
            other => panic!("expected BadCertificate, got {other:?}"),
        }
        assert!(
            matches!(load_private_key(&empty), Err(TlsError::NoPrivateKey { path }) if path == empty)
        );
        assert!(
            matches!(load_private_key(&garbage), Err(TlsError::NoPrivateKey { path }) if path == garbage)
        );
        assert!(
            matches!(load_crls(std::slice::from_ref(&empty)), Err(TlsError::BadCrl { path, .. }) if path == empty)
        );
        assert!(
            matches!(load_crls(std::slice::from_ref(&garbage)), Err(TlsError::BadCrl { path, .. }) if path == garbage)
        );
    }

    #[test]
    fn key_files_that_hold_no_usable_key_are_refused_without_quoting_them() {
        let files = Files::new("keys");
        let ca = ecdsa_ca("Keys CA");
        let leaf = client_leaf(&ca, &["k.example"]);
        let (cert, _) = files.leaf("leaf", &leaf);
        assert!(
            matches!(load_private_key(&cert), Err(TlsError::NoPrivateKey { path }) if path == cert)
        );

        let encrypted = files.text(
            "enc.pem",
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIBvTBXBgkqhkiG9w0BBQ0=\n-----END ENCRYPTED PRIVATE KEY-----\n",
        );
        match load_private_key(&encrypted) {
            Err(TlsError::UnsupportedKey { path, reason }) => {
                assert_eq!(path, encrypted);
                assert!(reason.contains("encrypted"), "{reason}");
            }
            other => panic!("expected UnsupportedKey, got {other:?}"),
        }

        let two = files.text("two.pem", format!("{}{}", leaf.key_pem, leaf.key_pem));
        assert!(matches!(
            load_private_key(&two),
            Err(TlsError::UnsupportedKey { .. })
        ));

        // A PKCS#8 section whose content is not a key: refused, and the message quotes nothing.
        let body = "c2VjcmV0LWJ5dGVzLXRoYXQtYXJlLW5vdC1hLWtleQ==";
        let junk = files.text(
            "junk.pem",
            format!("-----BEGIN PRIVATE KEY-----\n{body}\n-----END PRIVATE KEY-----\n"),
        );
        let err = load_private_key(&junk).expect_err("junk key");
        assert!(matches!(&err, TlsError::UnsupportedKey { path, .. } if *path == junk));
        let text = err.to_string();
        assert!(!text.contains(body) && !text.contains("secret"), "{text}");

        let bad64 = files.text(
            "bad64-key.pem",
            "-----BEGIN PRIVATE KEY-----\nsecret*bytes\n-----END PRIVATE KEY-----\n",
        );
        let text = load_private_key(&bad64)
            .expect_err("bad base64")
            .to_string();
        assert!(
            !text.contains("secret") && text.contains("base64"),
            "{text}"
        );
    }

    #[test]
    fn pkcs8_pkcs1_and_sec1_keys_load_and_match_their_certificates() {
        use rsa::pkcs1::EncodeRsaPrivateKey;
        use rsa::pkcs8::DecodePrivateKey;
        let files = Files::new("keyformats");
        let ca = ecdsa_ca("Formats CA");

        // PKCS#1 RSA.
        let rsa_leaf = ca
            .issue(&LeafSpec::server(&["localhost"]).with_key(KeyKind::Rsa2048))
            .expect("rsa leaf");
        let rsa = rsa::RsaPrivateKey::from_pkcs8_der(rsa_leaf.key_der.secret_der()).expect("rsa");
        let pkcs1 = rsa.to_pkcs1_pem(rsa::pkcs8::LineEnding::LF).expect("pkcs1");
        let (rsa_cert, _) = files.leaf("rsa", &rsa_leaf);
        let rsa_key = files.text("rsa-pkcs1.pem", pkcs1.as_bytes());
        assert!(matches!(
            load_private_key(&rsa_key),
            Ok(PrivateKeyDer::Pkcs1(_))
        ));

        // SEC1 EC: the privateKey OCTET STRING inside the PKCS#8 structure.
        let ec_leaf = ca
            .issue(&LeafSpec::server(&["localhost"]))
            .expect("ec leaf");
        let (_, pkcs8) =
            x509_parser::der_parser::parse_der(ec_leaf.key_der.secret_der()).expect("pkcs8 DER");
        let fields = pkcs8.as_sequence().expect("sequence");
        let sec1 = fields[2].as_slice().expect("octet string");
        use base64::Engine;
        let sec1_pem = format!(
            "-----BEGIN EC PRIVATE KEY-----\n{}\n-----END EC PRIVATE KEY-----\n",
            base64::engine::general_purpose::STANDARD.encode(sec1)
        );
        let (ec_cert, ec_pkcs8) = files.leaf("ec", &ec_leaf);
        let ec_key = files.text("ec-sec1.pem", sec1_pem);
        assert!(matches!(
            load_private_key(&ec_key),
            Ok(PrivateKeyDer::Sec1(_))
        ));
        assert!(matches!(
            load_private_key(&ec_pkcs8),
            Ok(PrivateKeyDer::Pkcs8(_))
        ));

        let client_ca = files.ca("ca.pem", &[&ca]);
        for (cert, key) in [
            (&rsa_cert, &rsa_key),
            (&ec_cert, &ec_key),
            (&ec_cert, &ec_pkcs8),
        ] {
            let s = ServerTls {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: client_ca.clone(),
                crls: vec![],
            };
            server_config(&s, ALPN).expect("server config");
        }
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_a_mismatch_naming_both_files() {
        let files = Files::new("mismatch");
        let ca = ecdsa_ca("Mismatch CA");
        let a = ca.issue(&LeafSpec::server(&["localhost"])).expect("a");
        let b = ca.issue(&LeafSpec::server(&["localhost"])).expect("b");
        let (a_cert, _) = files.leaf("a", &a);
        let (_, b_key) = files.leaf("b", &b);
        let s = ServerTls {
            cert: a_cert.clone(),
            key: b_key.clone(),
            client_ca: files.ca("ca.pem", &[&ca]),
            crls: vec![],
        };
        match only(server_config(&s, ALPN)) {
            Err(TlsError::KeyMismatch { cert, key }) => {
                assert_eq!((cert, key), (a_cert.clone(), b_key.clone()));
            }
            other => panic!("expected KeyMismatch, got {other:?}"),
        }
        let c = ClientTls {
            cert: a_cert,
            key: b_key,
            ca: s.client_ca.clone(),
            crls: Vec::new(),
        };
        assert!(matches!(
            only(client_config(&c, &[])),
            Err(TlsError::KeyMismatch { .. })
        ));
    }

    #[test]
    fn ca_bundles_must_hold_ca_certificates() {
        let files = Files::new("bundle");
        let ca = ecdsa_ca("Bundle CA");
        let leaf = client_leaf(&ca, &["leaf.example"]);
        let (leaf_cert, _) = files.leaf("leaf", &leaf);
        match load_ca_bundle(&leaf_cert) {
            Err(TlsError::BadCaBundle { path, reason }) => {
                assert_eq!(path, leaf_cert);
                assert!(reason.contains("not a CA"), "{reason}");
            }
            other => panic!("expected BadCaBundle, got {:?}", other.map(|r| r.len())),
        }
        let empty = files.text("empty.pem", "");
        assert!(
            matches!(load_ca_bundle(&empty), Err(TlsError::BadCaBundle { path, .. }) if path == empty)
        );
        let two = files.ca("two.pem", &[&ca, &ecdsa_ca("Second CA")]);
        assert_eq!(load_ca_bundle(&two).expect("bundle").len(), 2);
    }

    #[test]
    fn a_crl_is_never_replaced_by_an_older_one_or_another_of_its_number() {
        let files = Files::new("crl-floor");
        let ca = ecdsa_ca("Floor CA");
        let leaf = client_leaf(&ca, &["r.example"]);
        let now = x509_parser::time::ASN1Time::now().timestamp();
        let crl = |revoked: &[&pki::Issued], number| {
            ca.crl_numbered(revoked, now - 60, now + 3600, number)
                .expect("crl")
        };
        let first = crl(&[&leaf], 10);
        let tls = files.server(&ca, KeyKind::EcdsaP256, &[&ca], &[&first]);
        let path = tls.crls[0].clone();
        let floor = CrlFloor::default();
        let build = || only(listener_tls_above(&tls, &TlsKeys::SERVER_TLS, ALPN, &floor));
        build().expect("first");
        build().expect("the same again");
        for (number, what) in [(9, "is older"), (10, "with other contents")] {
            std::fs::write(&path, crl(&[], number)).expect("write");
            match build() {
                Err(TlsError::BadCrl { reason, .. }) => {
                    assert!(reason.contains(what), "{number}: {reason}")
                }
                other => panic!("{number}: expected BadCrl, got {other:?}"),
            }
        }
        std::fs::write(&path, crl(&[], 11)).expect("write");
        build().expect("newer");
        std::fs::write(&path, &first).expect("write");
        assert!(build().is_err(), "the floor rose to 11");

        // Two different CRLs of the issuer in two files: refused by the listener's first build
        // too (start-up and check-config), not only by a reload.
        let two = files.server(&ca, KeyKind::EcdsaP256, &[&ca], &[&crl(&[], 5), &first]);
        match only(server_config(&two, ALPN)) {
            Err(TlsError::BadCrl { reason, .. }) => {
                assert!(reason.contains("a second CRL for"), "{reason}")
            }
            other => panic!("expected BadCrl, got {other:?}"),
        }
    }

    #[test]
    fn crls_load_from_pem_or_der_and_stale_ones_are_refused() {
        let files = Files::new("crls");
        let ca = ecdsa_ca("CRL CA");
        let leaf = client_leaf(&ca, &["r.example"]);
        let pem = ca.crl(&[&leaf]).expect("crl");
        let pem_path = files.text("crl.pem", &pem);
        let der = CertificateRevocationListDer::from_pem_slice(pem.as_bytes()).expect("der");
        let der_path = files.text("crl.der", der.as_ref());
        let loaded = load_crls(&[pem_path.clone(), der_path]).expect("load");
        assert_eq!(loaded.len(), 2);
        assert_eq!(loaded[0], loaded[1]);

        // Two different CRLs of one issuer: webpki would check the first only, so the load is
        // refused, whichever file or PEM section the second is in; another issuer's is fine.
        let now = x509_parser::time::ASN1Time::now().timestamp();
        let older = ca
            .crl_numbered(&[], now - 60, now + 3600, 1)
            .expect("older crl");
        let older_path = files.text("older.pem", &older);
        for paths in [
            vec![older_path.clone(), pem_path.clone()],
            vec![files.text("both.pem", format!("{pem}{older}"))],
        ] {
            match load_crls(&paths) {
                Err(TlsError::BadCrl { reason, .. }) => {
                    assert!(reason.contains("a second CRL for"), "{reason}")
                }
                other => panic!("expected BadCrl, got {other:?}"),
            }
        }
        let other_ca = ecdsa_ca("Other CRL CA");
        let other = files.text("other.pem", other_ca.crl(&[]).expect("crl"));
        assert_eq!(load_crls(&[pem_path, other]).expect("two issuers").len(), 2);

        let now = x509_parser::time::ASN1Time::now().timestamp();
        let stale = ca
            .crl_between(&[&leaf], now - 7200, now - 3600)
            .expect("stale crl");
        let stale_path = files.text("stale.pem", stale);
        match load_crls(std::slice::from_ref(&stale_path)) {
            Err(TlsError::BadCrl { path, reason }) => {
                assert_eq!(path, stale_path);
                assert!(reason.contains("stale"), "{reason}");
            }
            other => panic!("expected BadCrl, got {other:?}"),
        }
        let cert_as_crl = files.text("cert.pem", &leaf.cert_pem);
        assert!(matches!(
            load_crls(&[cert_as_crl]),
            Err(TlsError::BadCrl { .. })
        ));

        // server_config names the bad CRL file too.
        let mut s = files.server(&ca, KeyKind::EcdsaP256, &[&ca], &[]);
        s.crls = vec![files.0.path("crl.pem"), stale_path.clone()];
        assert!(
            matches!(only(server_config(&s, ALPN)), Err(TlsError::BadCrl { path, .. }) if path == stale_path)
        );
    }

    // ---- identity ----

    #[test]
    fn peer_identity_has_dns_names_in_order_subject_serial_and_fingerprint() {
        let ca = ecdsa_ca("Identity CA");
        let leaf = client_leaf(&ca, &["first.example", "10.1.2.3", "second.example"]);
        let id = peer_identity(&leaf.cert_der).expect("identity");
        assert_eq!(id.names, ["first.example", "second.example"]);
        assert_eq!(id.subject, "CN=first.example,O=ssp-gateway development PKI");
        assert_eq!(id.serial, leaf.serial);
        assert_eq!(id.fingerprint_sha256, hex(&sha256(&leaf.cert_der)));
        assert_eq!(id.fingerprint_sha256.len(), 64);
        assert!(id
            .fingerprint_sha256
            .chars()
            .all(|c| matches!(c, '0'..='9' | 'a'..='f')));
    }

    #[test]
    fn peer_identity_falls_back_to_the_cn_without_dns_sans() {
        let ca = ecdsa_ca("CN CA");
        let mut spec = LeafSpec::client(&["192.0.2.7"]);
        spec.common_name = "ip-only.example".to_owned();
        let leaf = ca.issue(&spec).expect("leaf");
        let id = peer_identity(&leaf.cert_der).expect("identity");
        assert_eq!(id.names, ["ip-only.example"]);
    }

    #[test]
    fn subjects_are_escaped_per_rfc_4514() {
        let ca = ecdsa_ca("Escape CA");
        let mut spec = LeafSpec::client(&["e.example"]);
        spec.common_name = "#a,b+c\"d\\ ".to_owned();
        let leaf = ca.issue(&spec).expect("leaf");
        let id = peer_identity(&leaf.cert_der).expect("identity");
        assert_eq!(
            id.subject,
            "CN=\\#a\\,b\\+c\\\"d\\\\\\ ,O=ssp-gateway development PKI"
        );
    }

    #[test]
    fn sha256_matches_the_fips_180_test_vector() {
        assert_eq!(
            hex(&sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(serial_hex(&[0x00, 0x80, 0x01]), "8001");
        assert_eq!(serial_hex(&[0x00]), "00");
    }

    #[test]
    fn not_after_tells_expired_from_current() {
        let ca = ecdsa_ca("Expiry CA");
        let now = x509_parser::time::ASN1Time::now().timestamp();
        let current = client_leaf(&ca, &["c.example"]);
        let expired = ca
            .issue(&LeafSpec::client(&["e.example"]).with_validity(Validity::Expired))
            .expect("expired");
        let current_until = not_after(&current.cert_der).expect("not_after");
        assert!(
            current_until > now + 300 * 86_400,
            "{current_until} vs {now}"
        );
        assert!(not_after(&expired.cert_der).expect("not_after") < now);
        assert!(matches!(
            not_after(&CertificateDer::from(vec![1, 2, 3])),
            Err(TlsError::PeerCertificate { .. })
        ));
    }

    #[test]
    fn handshake_failure_labels_are_distinct() {
        use HandshakeFailure::*;
        let all = [
            NoClientCertificate,
            CertificateExpired,
            CertificateNotYetValid,
            CertificateRevoked,
            CrlExpired,
            UnknownIssuer,
            BadCertificate,
            Incompatible,
            AlertReceived,
            Malformed,
            Io,
            Other,
        ];
        let labels: std::collections::HashSet<_> = all.iter().map(|f| f.as_label()).collect();
        assert_eq!(labels.len(), all.len());
        assert_eq!(
            HandshakeFailure::classify(&io::Error::new(io::ErrorKind::UnexpectedEof, "eof")),
            Io
        );
    }

    // ---- handshakes ----

    #[tokio::test]
    async fn a_client_of_the_ca_is_accepted_and_identified() {
        let files = Files::new("hs-ok");
        let ca = ecdsa_ca("Handshake CA");
        let server = files.ecdsa_listener(&ca);
        let leaf = client_leaf(&ca, &["consumer.dev.local", "alt.dev.local"]);
        let client =
            client_config(&files.client("consumer", &leaf, &ca), &[b"h2"]).expect("client");
        let (accepted, connected) = handshake(server, client).await;
        connected.expect("client side");
        let accepted = accepted.expect("server side");
        assert_eq!(
            accepted.identity.names,
            ["consumer.dev.local", "alt.dev.local"]
        );
        assert_eq!(accepted.identity.serial, leaf.serial);
        assert_eq!(
            accepted.identity,
            peer_identity(&leaf.cert_der).expect("id")
        );
        assert_eq!(accepted.version, Some(ProtocolVersion::TLSv1_3));
        assert_eq!(accepted.alpn.as_deref(), Some(&b"h2"[..]));
    }

    /// The listener applies its own order: AES-128-GCM (SHA-256 handshake hash, on the CPU's
    /// SHA extensions) even for a client that lists AES-256-GCM first.
    #[tokio::test]
    async fn the_listener_prefers_aes_128_gcm_whatever_the_client_order() {
        let files = Files::new("hs-suite");
        let ca = ecdsa_ca("Suite CA");
        let server = files.ecdsa_listener(&ca);
        let c = files.client("consumer", &client_leaf(&ca, &["consumer.dev.local"]), &ca);
        let default = rustls::crypto::aws_lc_rs::default_provider();
        assert_eq!(
            default.cipher_suites[0].suite(),
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
            "the client lists AES-256 first"
        );
        for versions in [VERSIONS, &[&rustls::version::TLS12][..]] {
            let client = client_with(&c, Arc::new(default.clone()), versions);
            let (accepted, connected) = handshake(server.clone(), client).await;
            connected.expect("client side");
            let expected = if versions.len() == 1 {
                rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            } else {
                rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
            };
            assert_eq!(accepted.expect("server side").suite, Some(expected));
        }
    }

    #[tokio::test]
    async fn rsa_and_ecdsa_work_on_both_sides_in_tls_1_2_and_1_3() {
        let files = Files::new("hs-rsa");
        let ca = Ca::new("RSA Handshake CA", KeyKind::Rsa2048).expect("CA");
        let rsa_client = ca
            .issue(&LeafSpec::client(&["rsa.example"]).with_key(KeyKind::Rsa2048))
            .expect("rsa client");
        let ec_client = client_leaf(&ca, &["ec.example"]);
        let rsa_client = files.client("rsa-client", &rsa_client, &ca);
        let ec_client = files.client("ec-client", &ec_client, &ca);
        for (server_key, client, name) in [
            (KeyKind::Rsa2048, &ec_client, "ec.example"),
            (KeyKind::EcdsaP256, &rsa_client, "rsa.example"),
            (KeyKind::Rsa2048, &rsa_client, "rsa.example"),
        ] {
            let server =
                server_config(&files.server(&ca, server_key, &[&ca], &[]), ALPN).expect("server");
            for (config, version) in [
                (
                    client_config(client, &[]).expect("client"),
                    ProtocolVersion::TLSv1_3,
                ),
                (tls12_client(client), ProtocolVersion::TLSv1_2),
            ] {
                let (accepted, connected) = handshake(Arc::clone(&server), config).await;
                connected.expect("client side");
                let accepted = accepted.expect("server side");
                assert_eq!(
                    accepted.identity.names,
                    [name],
                    "{server_key:?}/{name}/{version:?}"
                );
                assert_eq!(accepted.version, Some(version));
            }
        }
    }

    #[tokio::test]
    async fn no_client_certificate_fails_the_handshake() {
        let files = Files::new("hs-anon");
        let ca = ecdsa_ca("Anon CA");
        let s = files.server(&ca, KeyKind::EcdsaP256, &[&ca], &[]);
        let server = server_config(&s, ALPN).expect("server");
        let (accepted, connected) = handshake(server, anonymous_client(&s.client_ca)).await;
        assert_eq!(failure(&accepted), HandshakeFailure::NoClientCertificate);
        assert!(connected.is_err());
    }

    #[tokio::test]
    async fn certificates_from_another_ca_expired_or_early_fail() {
        let files = Files::new("hs-bad");
        let ca = ecdsa_ca("Good CA");
        let other = ecdsa_ca("Other CA");
        let server = files.ecdsa_listener(&ca);
        let cases = [
            (
                client_leaf(&other, &["x.example"]),
                HandshakeFailure::UnknownIssuer,
            ),
            (
                ca.issue(&LeafSpec::client(&["x.example"]).with_validity(Validity::Expired))
                    .expect("expired"),
                HandshakeFailure::CertificateExpired,
            ),
            (
                ca.issue(&LeafSpec::client(&["x.example"]).with_validity(Validity::NotYetValid))
                    .expect("early"),
                HandshakeFailure::CertificateNotYetValid,
            ),
            (
                // A server-only certificate is not a client certificate.
                ca.issue(&LeafSpec::server(&["x.example"]))
                    .expect("server-only"),
                HandshakeFailure::BadCertificate,
            ),
        ];
        for (i, (leaf, expected)) in cases.iter().enumerate() {
            let client = client_config(&files.client(&format!("c{i}"), leaf, &ca), &[])
                .expect("client config");
            let (accepted, connected) = handshake(Arc::clone(&server), client).await;
            assert_eq!(failure(&accepted), *expected, "case {i}");
            assert!(
                connected.is_err(),
                "case {i}: the client must see the rejection"
            );
        }
    }

    #[tokio::test]
    async fn a_revoked_certificate_fails_when_the_crl_is_configured() {
        let files = Files::new("hs-crl");
        let ca = ecdsa_ca("Revoking CA");
        let second = ecdsa_ca("CA without CRL");
        let revoked = client_leaf(&ca, &["consumer.dev.local"]);
        let good = client_leaf(&ca, &["consumer.dev.local"]);
        let from_second = client_leaf(&second, &["second.example"]);
        let crl = ca.crl(&[&revoked]).expect("crl");

        let with_crl = files.server(&ca, KeyKind::EcdsaP256, &[&ca, &second], &[&crl]);
        let server = server_config(&with_crl, ALPN).expect("server");
        let mut no_crl = with_crl.clone();
        no_crl.crls.clear();
        let server_without_crl = server_config(&no_crl, ALPN).expect("server");

        let revoked = client_config(&files.client("revoked", &revoked, &ca), &[]).expect("c");
        let good = client_config(&files.client("good", &good, &ca), &[]).expect("c");
        let from_second =
            client_config(&files.client("second", &from_second, &ca), &[]).expect("c");

        let (accepted, connected) = handshake(Arc::clone(&server), Arc::clone(&revoked)).await;
        assert_eq!(failure(&accepted), HandshakeFailure::CertificateRevoked);
        assert!(connected.is_err());
        // Without the CRL the same certificate is accepted: the CRL is what refused it.
        handshake(server_without_crl, revoked)
            .await
            .0
            .expect("accepted without CRL");
        handshake(Arc::clone(&server), good)
            .await
            .0
            .expect("not revoked");
        // An issuer without a CRL has an unknown status, which is allowed.
        handshake(server, from_second)
            .await
            .0
            .expect("unknown status allowed");
    }

    #[tokio::test]
    async fn a_crl_that_goes_stale_while_loaded_fails_handshakes() {
        let files = Files::new("hs-stale");
        let ca = ecdsa_ca("Stale CA");
        let now = x509_parser::time::ASN1Time::now().timestamp();
        let stale = ca.crl_between(&[], now - 7200, now - 3600).expect("crl");
        let stale = CertificateRevocationListDer::from_pem_slice(stale.as_bytes()).expect("der");
        let s = files.server(&ca, KeyKind::EcdsaP256, &[&ca], &[]);
        let provider = provider();
        let roots = load_ca_bundle(&s.client_ca).expect("roots");
        let verifier = client_verifier(&provider, roots, vec![stale]).expect("verifier");
        let certified = certified_key(
            &provider,
            &s.cert,
            load_certs(&s.cert).expect("cert"),
            &s.key,
            load_private_key(&s.key).expect("key"),
        )
        .expect("certified");
        let server = assemble_server_config(provider, verifier, certified, ALPN).expect("config");
        let client = client_config(
            &files.client("c", &client_leaf(&ca, &["c.example"]), &ca),
            &[],
        )
        .expect("client");
        let (accepted, _) = handshake(server, client).await;
        assert_eq!(failure(&accepted), HandshakeFailure::CrlExpired);
    }

    #[tokio::test]
    async fn sessions_are_never_resumed() {
        let files = Files::new("hs-resume");
        let ca = ecdsa_ca("Resume CA");
        let server = files.ecdsa_listener(&ca);
        assert!(!server.ticketer.enabled());
        assert_eq!(server.send_tls13_tickets, 0);
        // The control: the same config with a session cache and tickets does resume, so the
        // assertions below can fail.
        let mut resumable = (*server).clone();
        resumable.session_storage = rustls::server::ServerSessionMemoryCache::new(16);
        resumable.send_tls13_tickets = 2;
        let resumable = Arc::new(resumable);

        let leaf = client_leaf(&ca, &["c.example"]);
        let c = files.client("c", &leaf, &ca);
        for client in [client_config(&c, &[]).expect("client"), tls12_client(&c)] {
            let (first, _) = handshake(Arc::clone(&resumable), Arc::clone(&client)).await;
            assert_eq!(first.expect("first").kind, Some(HandshakeKind::Full));
            let (second, _) = handshake(Arc::clone(&resumable), Arc::clone(&client)).await;
            assert_eq!(second.expect("control").kind, Some(HandshakeKind::Resumed));

            for _ in 0..2 {
                let (again, _) = handshake(Arc::clone(&server), Arc::clone(&client)).await;
                assert_eq!(again.expect("accepted").kind, Some(HandshakeKind::Full));
            }
        }
    }

    /// The gateway's own client side (providers, an LDAPS directory) never resumes a session,
    /// with CRLs or without, against a server that offers resumption: a resumed session skips
    /// the server certificate's verification, so a provider certificate that had expired since
    /// the first connection went on being accepted on every new one (before, resumption was
    /// off only with `[upstream] crls`).
    #[tokio::test]
    async fn the_upstream_client_never_resumes_a_session() {
        let files = Files::new("hs-upstream-resume");
        let ca = ecdsa_ca("Upstream resume CA");
        let mut resumable = (*files.ecdsa_listener(&ca)).clone();
        resumable.session_storage = rustls::server::ServerSessionMemoryCache::new(16);
        resumable.send_tls13_tickets = 2;
        let resumable = Arc::new(resumable);
        let gateway = files.client("gw", &client_leaf(&ca, &["ssp.dev.local"]), &ca);
        let clean = files.text("clean.pem", ca.crl(&[]).expect("crl"));

        // The control: a test client without CRLs does resume against this server.
        let control = client_config(&gateway, &[]).expect("client");
        let (first, _) = handshake(Arc::clone(&resumable), Arc::clone(&control)).await;
        assert_eq!(first.expect("first").kind, Some(HandshakeKind::Full));
        let (second, _) = handshake(Arc::clone(&resumable), control).await;
        assert_eq!(second.expect("control").kind, Some(HandshakeKind::Resumed));

        for crls in [vec![], vec![clean]] {
            let with = ClientTls {
                crls: crls.clone(),
                ..gateway.clone()
            };
            let floor = CrlFloor::default();
            let upstream =
                upstream_tls_above(&with, &TlsKeys::CLIENT_TLS, &[], &floor).expect("upstream TLS");
            let ldaps = own_client_config(&with, &TlsKeys::CLIENT_TLS, &[]).expect("LDAPS");
            for (leg, client) in [("upstream", upstream.config), ("ldaps", ldaps)] {
                for attempt in 0..3 {
                    let (accepted, connected) =
                        handshake(Arc::clone(&resumable), Arc::clone(&client)).await;
                    assert!(connected.is_ok(), "{leg} {crls:?} {attempt}: {connected:?}");
                    assert_eq!(
                        accepted.expect("accepted").kind,
                        Some(HandshakeKind::Full),
                        "{leg}, CRLs {crls:?}, connection {attempt}"
                    );
                }
            }
        }
    }

    #[tokio::test]
    async fn alpn_picks_the_clients_protocol_from_the_servers_list() {
        let files = Files::new("hs-alpn");
        let ca = ecdsa_ca("ALPN CA");
        let server = files.ecdsa_listener(&ca);
        let c = files.client("c", &client_leaf(&ca, &["c.example"]), &ca);
        for (offer, expected) in [
            (&b"http/1.1"[..], b"http/1.1".to_vec()),
            (b"h2", b"h2".to_vec()),
        ] {
            let client = client_config(&c, &[offer]).expect("client");
            let accepted = handshake(Arc::clone(&server), client)
                .await
                .0
                .expect("accepted");
            assert_eq!(accepted.alpn, Some(expected));
        }
    }

    #[test]
    fn tls_1_1_is_not_offered_and_a_tls_1_1_hello_is_refused() {
        // rustls has no TLS 1.1 at all: no client or server can be configured for it.
        assert!(rustls::ALL_VERSIONS.iter().all(|v| matches!(
            v.version,
            ProtocolVersion::TLSv1_2 | ProtocolVersion::TLSv1_3
        )));

        let files = Files::new("tls11");
        let ca = ecdsa_ca("TLS 1.1 CA");
        let server = files.ecdsa_listener(&ca);
        // A minimal ClientHello; with version 3.3 (TLS 1.2) and a GCM suite the server goes on to
        // answer it, which shows that only the version makes the TLS 1.1 one fail.
        fn client_hello(version: u8, suite: [u8; 2]) -> Vec<u8> {
            let mut body = vec![0x03, version];
            body.extend_from_slice(&[0x42; 32]); // random
            body.push(0x00); // no session id
            body.extend_from_slice(&[0x00, 0x02, suite[0], suite[1], 0x01, 0x00]);
            let extensions: &[u8] = &[
                0x00, 0x0d, 0x00, 0x06, 0x00, 0x04, 0x04, 0x03, 0x04,
                0x01, // signature_algorithms
                0x00, 0x0a, 0x00, 0x06, 0x00, 0x04, 0x00, 0x1d, 0x00,
                0x17, // supported_groups
                0x00, 0x0b, 0x00, 0x02, 0x01, 0x00, // ec_point_formats: uncompressed
            ];
            body.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
            body.extend_from_slice(extensions);
            let mut msg = vec![0x01, 0x00];
            msg.extend_from_slice(&(body.len() as u16).to_be_bytes());
            msg.extend_from_slice(&body);
            let mut record = vec![0x16, 0x03, 0x01];
            record.extend_from_slice(&(msg.len() as u16).to_be_bytes());
            record.extend_from_slice(&msg);
            record
        }
        let ecdhe_ecdsa_aes128_gcm = [0xc0, 0x2b];
        let ecdhe_ecdsa_aes128_cbc = [0xc0, 0x09];

        let mut control = rustls::ServerConnection::new(Arc::clone(&server)).expect("connection");
        control
            .read_tls(&mut &client_hello(0x03, ecdhe_ecdsa_aes128_gcm)[..])
            .expect("read");
        control
            .process_new_packets()
            .expect("a TLS 1.2 hello is answered");

        let mut conn = rustls::ServerConnection::new(server).expect("connection");
        conn.read_tls(&mut &client_hello(0x02, ecdhe_ecdsa_aes128_cbc)[..])
            .expect("read");
        let err = conn
            .process_new_packets()
            .expect_err("TLS 1.1 must be refused");
        assert_eq!(
            HandshakeFailure::from_rustls(&err),
            HandshakeFailure::Incompatible,
            "{err}"
        );
        assert_eq!(
            err,
            rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered),
            "refused for its version, not for anything else in the hello"
        );
        let mut out = Vec::new();
        conn.write_tls(&mut out).expect("alert");
        // One fatal alert record: type 21, length 2, level fatal (2).
        assert_eq!(out.len(), 7, "{out:?}");
        assert_eq!((out[0], out[5]), (0x15, 2), "{out:?}");
    }

    #[tokio::test]
    async fn the_upstream_client_trusts_only_its_ca_bundle() {
        let files = Files::new("hs-upstream");
        let ca = ecdsa_ca("Provider CA");
        let other = ecdsa_ca("Unrelated CA");
        // The provider's server certificate comes from `other`; the client trusts only `ca`.
        let server = server_config(&files.server(&other, KeyKind::EcdsaP256, &[&ca], &[]), ALPN)
            .expect("server");
        let client = client_config(
            &files.client("gw", &client_leaf(&ca, &["ssp.dev.local"]), &ca),
            &[],
        )
        .expect("client");
        let (_, connected) = handshake(server, client).await;
        assert_eq!(failure(&connected), HandshakeFailure::UnknownIssuer);

        // A certificate for another name is refused as well.
        let wrong_name = ca
            .issue(&LeafSpec::server(&["elsewhere.example"]))
            .expect("leaf");
        let (cert, key) = files.leaf("wrong-name", &wrong_name);
        let s = ServerTls {
            cert,
            key,
            client_ca: files.ca("ca2.pem", &[&ca]),
            crls: vec![],
        };
        let client = client_config(
            &files.client("gw2", &client_leaf(&ca, &["ssp.dev.local"]), &ca),
            &[],
        )
        .expect("client");
        let (_, connected) = handshake(server_config(&s, ALPN).expect("server"), client).await;
        assert_eq!(failure(&connected), HandshakeFailure::BadCertificate);
    }

    /// The upstream client checks provider certificates against its CRLs, as the listener
    /// checks client certificates: a revoked provider is refused at the handshake, and a CRL of
    /// a CA outside the upstream bundle, or older than one already loaded, is refused at load.
    #[tokio::test]
    async fn the_upstream_client_refuses_a_revoked_provider() {
        let files = Files::new("hs-upstream-crl");
        let ca = ecdsa_ca("Provider CA");
        let other = ecdsa_ca("Unrelated CA");
        let leaf = ca
            .issue(&LeafSpec::server(&["localhost", "127.0.0.1"]))
            .expect("provider leaf");
        let (cert, key) = files.leaf("provider", &leaf);
        let provider = ServerTls {
            cert,
            key,
            client_ca: files.ca("provider-clients.pem", &[&ca]),
            crls: vec![],
        };
        let gateway = files.client("gw", &client_leaf(&ca, &["ssp.dev.local"]), &ca);
        let with_crls = |crls: &[&PathBuf]| ClientTls {
            crls: crls.iter().map(|p| (*p).clone()).collect(),
            ..gateway.clone()
        };
        let revoking = files.text("revoking.pem", ca.crl(&[&leaf]).expect("crl"));
        let clean = files.text("clean.pem", ca.crl(&[]).expect("crl"));
        let connect = |crls: &[&PathBuf]| {
            let client = client_config(&with_crls(crls), &[]).expect("client");
            handshake(server_config(&provider, ALPN).expect("server"), client)
        };
        let (_, connected) = connect(&[&revoking]).await;
        assert_eq!(failure(&connected), HandshakeFailure::CertificateRevoked);
        let (_, connected) = connect(&[&clean]).await;
        assert!(connected.is_ok(), "{connected:?}");
        let (_, connected) = connect(&[]).await;
        assert!(connected.is_ok(), "{connected:?}");

        // A CRL of a CA not in the bundle (the consumer side's, say, put in the provider
        // side's list) refuses the upstream client's configuration, as the listener's.
        let floor = CrlFloor::default();
        let keys = TlsKeys::CLIENT_TLS;
        let foreign = files.text("foreign.pem", other.crl(&[]).expect("crl"));
        match only(upstream_tls_above(
            &with_crls(&[&foreign]),
            &keys,
            &[],
            &floor,
        )) {
            Err(TlsError::BadCrl { path, reason }) => {
                assert_eq!(path, foreign);
                assert!(
                    reason.contains("the CRL of CN=Unrelated CA")
                        && reason.contains("is issued by a CA that is not in"),
                    "{reason}"
                );
            }
            other => panic!("expected BadCrl, got {other:?}"),
        }
        own_client_config_above(&with_crls(&[&clean]), &keys, &[], &floor).expect("the newer CRL");
        match only(own_client_config_above(
            &with_crls(&[&revoking]),
            &keys,
            &[],
            &floor,
        )) {
            Err(TlsError::BadCrl { reason, .. }) => {
                assert!(reason.contains("is older"), "{reason}")
            }
            other => panic!("expected BadCrl, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn the_development_world_works_end_to_end() {
        let files = Files::new("devworld");
        let dir = files.0.path("certs-dev");
        pki::write_dev_certs(&dir, false).expect("dev certs");
        let p = |name: &str| dir.join(name);
        let gateway = server_config(
            &ServerTls {
                cert: p("gateway.pem"),
                key: p("gateway-key.pem"),
                client_ca: p("ca.pem"),
                crls: vec![p("ca.crl.pem")],
            },
            ALPN,
        )
        .expect("gateway listener");
        let client = |stem: &str| {
            client_config(
                &ClientTls {
                    cert: p(&format!("{stem}.pem")),
                    key: p(&format!("{stem}-key.pem")),
                    ca: p("ca.pem"),
                    crls: Vec::new(),
                },
                &[b"h2"],
            )
            .expect("client config")
        };
        for (stem, name) in [
            ("consumer", "consumer.dev.local"),
            ("readonly", "readonly.dev.local"),
            ("rogue", "rogue.dev.local"),
        ] {
            let accepted = handshake(Arc::clone(&gateway), client(stem))
                .await
                .0
                .expect(stem);
            assert_eq!(accepted.identity.names, [name]);
        }
        let (revoked, _) = handshake(Arc::clone(&gateway), client("revoked")).await;
        assert_eq!(failure(&revoked), HandshakeFailure::CertificateRevoked);

        // The gateway towards the mock provider.
        let provider_listener = server_config(
            &ServerTls {
                cert: p("provider.pem"),
                key: p("provider-key.pem"),
                client_ca: p("ca.pem"),
                crls: vec![],
            },
            ALPN,
        )
        .expect("provider listener");
        let accepted = handshake(provider_listener, client("gateway-client"))
            .await
            .0
            .expect("gateway to provider");
        assert_eq!(accepted.identity.names, ["ssp.dev.local"]);
    }

    // ---- the server stream (rustls' unbuffered API) ----

    type ClientStream = tokio_rustls::client::TlsStream<tokio::io::DuplexStream>;

    /// Our server stream and a tokio-rustls client over an in-memory pipe of `pipe` bytes.
    async fn stream_pair(
        tag: &str,
        pipe: usize,
        tls12: bool,
    ) -> (stream::ServerStream<tokio::io::DuplexStream>, ClientStream) {
        let files = Files::new(tag);
        let ca = ecdsa_ca("Stream CA");
        let server = files.ecdsa_listener(&ca);
        let leaf = client_leaf(&ca, &["consumer.dev.local"]);
        let c = files.client("consumer", &leaf, &ca);
        let client = if tls12 {
            tls12_client(&c)
        } else {
            client_config(&c, &[]).expect("client config")
        };
        let (client_io, server_io) = tokio::io::duplex(pipe);
        let name = ServerName::try_from("localhost").expect("name");
        let (server, client) = tokio::join!(
            stream::accept(server, server_io),
            TlsConnector::from(client).connect(name, client_io)
        );
        (
            server.expect("server handshake").0,
            client.expect("client handshake"),
        )
    }

    /// 300 KB each way through a 1 KiB pipe (partial writes, back-pressure, records split
    /// across reads), echoed in odd-sized reads, then closed with close_notify both ways.
    #[tokio::test]
    async fn the_stream_carries_large_bodies_both_ways_and_closes_cleanly() {
        for tls12 in [false, true] {
            let (mut server, client) = stream_pair("st-big", 1024, tls12).await;
            let sent: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
            let echo = async {
                let mut buf = vec![0u8; 3001];
                let mut total = 0;
                loop {
                    let n = server.read(&mut buf).await.expect("server read");
                    if n == 0 {
                        break;
                    }
                    server.write_all(&buf[..n]).await.expect("server write");
                    total += n;
                }
                server.shutdown().await.expect("server close_notify");
                total
            };
            let (mut rx, mut tx) = tokio::io::split(client);
            let send = async {
                for chunk in sent.chunks(40_000) {
                    tx.write_all(chunk).await.expect("client write");
                }
                tx.shutdown().await.expect("client close_notify");
            };
            let receive = async {
                let mut got = Vec::new();
                rx.read_to_end(&mut got)
                    .await
                    .expect("a clean end: the server's close_notify");
                got
            };
            let (echoed, (), got) = tokio::join!(echo, send, receive);
            assert_eq!(echoed, sent.len(), "TLS 1.2: {tls12}");
            assert!(got == sent, "the echo differs (TLS 1.2: {tls12})");
            assert_eq!(server.allocated(), 0, "a closed stream holds no buffer");
        }
    }

    /// Every suite the listener offers, in both versions, through our record layer: 100 KB
    /// each way (records of 16 KiB and partial ones), two key updates asked by the client in
    /// TLS 1.3 (SHA-384's derivation for AES-256-GCM), and close_notify both ways.
    #[tokio::test]
    async fn every_suite_carries_data_both_ways_through_our_record_layer() {
        use rustls::CipherSuite as S;
        let files = Files::new("st-suites");
        let ca = ecdsa_ca("Suites CA");
        let server = files.ecdsa_listener(&ca);
        let c = files.client("consumer", &client_leaf(&ca, &["consumer.dev.local"]), &ca);
        let suites = [
            (S::TLS13_AES_128_GCM_SHA256, &rustls::version::TLS13),
            (S::TLS13_AES_256_GCM_SHA384, &rustls::version::TLS13),
            (S::TLS13_CHACHA20_POLY1305_SHA256, &rustls::version::TLS13),
            (
                S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
                &rustls::version::TLS12,
            ),
            (
                S::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
                &rustls::version::TLS12,
            ),
            (
                S::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
                &rustls::version::TLS12,
            ),
        ];
        for (suite, version) in suites {
            let mut only = rustls::crypto::aws_lc_rs::default_provider();
            only.cipher_suites.retain(|s| s.suite() == suite);
            let client = client_with(&c, Arc::new(only), &[version]);
            let (client_io, server_io) = tokio::io::duplex(4096);
            let name = ServerName::try_from("localhost").expect("name");
            let (server_side, client_side) = tokio::join!(
                stream::accept(server.clone(), server_io),
                TlsConnector::from(client).connect(name, client_io)
            );
            let (mut server_tls, hs) = server_side.expect("server handshake");
            let mut client_tls = client_side.expect("client handshake");
            assert_eq!(hs.suite, Some(suite));
            let sent: Vec<u8> = (0..100_000u32).map(|i| (i * 13 % 255) as u8).collect();
            for round in 0..3 {
                if round > 0 && version == &rustls::version::TLS13 {
                    client_tls
                        .get_mut()
                        .1
                        .refresh_traffic_keys()
                        .expect("key update");
                }
                let echo = async {
                    let mut got = vec![0u8; sent.len()];
                    server_tls.read_exact(&mut got).await.expect("server read");
                    server_tls.write_all(&got).await.expect("server write");
                    server_tls.flush().await.expect("server flush");
                    got
                };
                let exchange = async {
                    client_tls.write_all(&sent).await.expect("client write");
                    client_tls.flush().await.expect("client flush");
                    let mut back = vec![0u8; sent.len()];
                    client_tls.read_exact(&mut back).await.expect("client read");
                    back
                };
                let (got, back) = tokio::join!(echo, exchange);
                assert!(
                    got == sent,
                    "{suite:?} round {round}: the server read other bytes"
                );
                assert!(
                    back == sent,
                    "{suite:?} round {round}: the client read other bytes"
                );
                server_tls.release();
                assert!(server_tls.keys_released(), "{suite:?}: released when idle");
            }
            client_tls.shutdown().await.expect("client close_notify");
            let n = server_tls.read(&mut [0u8; 8]).await.expect("a clean end");
            assert_eq!(n, 0, "{suite:?}: close_notify ends the server's reads");
            server_tls.shutdown().await.expect("server close_notify");
            let mut rest = Vec::new();
            client_tls
                .read_to_end(&mut rest)
                .await
                .expect("the client reads our close_notify");
            assert!(rest.is_empty());
        }
    }

    /// After the handshake rustls keeps nothing: a record the client sends unprotected is
    /// refused by our layer with unexpected_message, which the client hears.
    #[tokio::test]
    async fn an_unprotected_record_after_the_handshake_is_refused() {
        for record in [vec![21u8, 3, 3, 0, 2, 1, 0], vec![20u8, 3, 3, 0, 1, 1]] {
            let (mut server, mut client) = stream_pair("st-plain", 64 * 1024, false).await;
            client
                .get_mut()
                .0
                .write_all(&record)
                .await
                .expect("raw write");
            let err = server.read(&mut [0u8; 16]).await.expect_err("refused");
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            assert!(err.to_string().contains("unprotected"), "{err}");
            let _ = server.flush().await;
            let seen = client.read(&mut [0u8; 16]).await;
            assert!(
                seen.as_ref()
                    .is_err_and(|e| e.to_string().contains("UnexpectedMessage")),
                "the client hears unexpected_message: {seen:?}"
            );
        }
    }

    /// The point of the stream: no buffer after the handshake, nor once released after an
    /// exchange.
    #[tokio::test]
    async fn an_idle_stream_holds_no_buffer() {
        let (mut server, mut client) = stream_pair("st-idle", 64 * 1024, false).await;
        assert_eq!(server.allocated(), 0, "after the handshake");
        assert!(!server.buffered());
        client
            .write_all(b"GET / HTTP/1.1\r\n\r\n")
            .await
            .expect("w");
        client.flush().await.expect("flush");
        let mut buf = [0u8; 64];
        let n = server.read(&mut buf).await.expect("read");
        assert_eq!(&buf[..n], b"GET / HTTP/1.1\r\n\r\n");
        server
            .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
            .await
            .expect("w");
        server.flush().await.expect("flush");
        let n = client.read(&mut buf).await.expect("read");
        assert_eq!(&buf[..n], b"HTTP/1.1 204 No Content\r\n\r\n");
        server.release();
        assert_eq!(server.allocated(), 0, "after an exchange, released");
        assert!(
            server.keys_released(),
            "and the record layer's AEAD contexts dropped"
        );
    }

    /// Pipelined records: what arrived with the first read is reported as buffered, so the
    /// caller does not wait on the socket for bytes it already has.
    #[tokio::test]
    async fn records_already_received_are_buffered_not_waited_for() {
        let (mut server, mut client) = stream_pair("st-pipe", 64 * 1024, false).await;
        client.write_all(b"first").await.expect("w");
        client.flush().await.expect("flush");
        client.write_all(b"second").await.expect("w");
        client.flush().await.expect("flush");
        // Both records are in the pipe; read them as one small read at a time.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut buf = [0u8; 5];
        server.read_exact(&mut buf).await.expect("first");
        assert_eq!(&buf, b"first");
        assert!(server.buffered(), "the second record is already here");
        let mut buf = [0u8; 6];
        server.read_exact(&mut buf).await.expect("second");
        assert_eq!(&buf, b"second");
    }

    #[tokio::test]
    async fn a_transport_end_without_close_notify_is_an_unexpected_eof() {
        let (mut server, client) = stream_pair("st-eof", 64 * 1024, false).await;
        drop(client.into_inner());
        let err = server
            .read(&mut [0u8; 16])
            .await
            .expect_err("no close_notify");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    /// A client's TLS 1.3 KeyUpdate asks for ours; the answer must precede our next record.
    #[tokio::test]
    async fn a_key_update_from_the_client_is_answered_and_traffic_goes_on() {
        let (mut server, mut client) = stream_pair("st-ku", 64 * 1024, false).await;
        client
            .get_mut()
            .1
            .refresh_traffic_keys()
            .expect("key update");
        client.write_all(b"after").await.expect("w");
        client.flush().await.expect("flush");
        let mut buf = [0u8; 5];
        server
            .read_exact(&mut buf)
            .await
            .expect("read under the new keys");
        assert_eq!(&buf, b"after");
        reply_reaches_the_client(&mut server, &mut client).await;
    }

    /// The server's reply reaches the client, which must have followed every key change.
    async fn reply_reaches_the_client(
        server: &mut stream::ServerStream<tokio::io::DuplexStream>,
        client: &mut ClientStream,
    ) {
        server.write_all(b"reply").await.expect("write");
        server.flush().await.expect("flush");
        let mut reply = [0u8; 5];
        client
            .read_exact(&mut reply)
            .await
            .expect("the client follows our keys");
        assert_eq!(&reply, b"reply");
    }

    /// A client that asks for key update after key update, with no data between them, is cut
    /// off at rustls' limit (32) instead of making the server queue an answer for each.
    #[tokio::test]
    async fn key_updates_without_data_between_them_are_bounded() {
        let (mut server, mut client) = stream_pair("st-ku-flood", 64 * 1024, false).await;
        for _ in 0..40 {
            client
                .get_mut()
                .1
                .refresh_traffic_keys()
                .expect("key update");
            client.flush().await.expect("flush");
        }
        let err = server.read(&mut [0u8; 16]).await.expect_err("cut off");
        assert!(err.to_string().contains("too many KeyUpdates"), "{err}");
        assert!(server.allocated() < 64 * 1024);
    }

    /// A client that reads slowly does not make the send buffer grow with all that was written
    /// to it: what was sent ahead of the held bytes is reclaimed.
    #[tokio::test]
    async fn a_slow_reader_does_not_grow_the_send_buffer() {
        let (mut server, mut client) = stream_pair("st-slow", 1024, false).await;
        let body = vec![7u8; 4 << 20];
        let write = async {
            let mut max = 0;
            for chunk in body.chunks(64 * 1024) {
                server.write_all(chunk).await.expect("write");
                max = max.max(server.allocated());
            }
            server.flush().await.expect("flush");
            max
        };
        let read = async {
            let (mut got, mut buf) = (0, vec![0u8; 1000]);
            while got < body.len() {
                got += client.read(&mut buf).await.expect("read");
            }
        };
        let (max, ()) = tokio::join!(write, read);
        assert!(max < 512 * 1024, "the send buffer grew to {max} bytes");
    }

    /// A handshake whose client, as soon as it is connected (its Finished just sent), asks
    /// for `updates` key updates, writing `each` after every one: what reaches the server comes
    /// in the flight of the client's Finished. The server must read it all, and the client must
    /// follow the server's answers and read its reply.
    async fn key_updates_right_after_the_handshake(tag: &str, updates: usize, each: &[u8]) {
        let files = Files::new(tag);
        let ca = ecdsa_ca("Stream CA");
        let server = files.ecdsa_listener(&ca);
        let c = files.client("consumer", &client_leaf(&ca, &["consumer.dev.local"]), &ca);
        let client = client_config(&c, &[]).expect("client config");
        let (client_io, server_io) = tokio::io::duplex(256 * 1024);
        let name = ServerName::try_from("localhost").expect("name");
        let (server, client) = tokio::join!(stream::accept(server, server_io), async {
            let mut tls = TlsConnector::from(client).connect(name, client_io).await?;
            for _ in 0..updates {
                tls.get_mut().1.refresh_traffic_keys().expect("key update");
                tls.write_all(each).await?;
            }
            tls.write_all(b"end").await?;
            tls.flush().await?;
            Ok::<_, io::Error>(tls)
        });
        let mut client = client.expect("client");
        let (mut server, _) = server.expect("takeover");
        let expected = [each.repeat(updates), b"end".to_vec()].concat();
        let mut got = vec![0u8; expected.len()];
        server.read_exact(&mut got).await.expect("read");
        assert_eq!(got, expected);
        reply_reaches_the_client(&mut server, &mut client).await;
    }

    /// KeyUpdates sent with the client's Finished are followed by rustls before the takeover:
    /// the caught secrets are stepped to the generation rustls reached, and the answer rustls
    /// had queued is sent by our layer.
    #[tokio::test]
    async fn key_updates_in_the_finished_flight_survive_the_takeover() {
        key_updates_right_after_the_handshake("st-ku-early", 2, b"").await;
    }

    /// Writes, under the client's TLS, an application-data record of 40 bytes that no key seals.
    async fn send_forged_record(client: &mut ClientStream) {
        let mut forged = vec![23, 3, 3, 0, 40];
        forged.extend((0..40u8).map(|i| i.wrapping_mul(37)));
        client
            .get_mut()
            .0
            .write_all(&forged)
            .await
            .expect("raw write");
    }

    fn assert_decrypt_error(err: &io::Error) {
        assert!(
            matches!(
                err.get_ref()
                    .and_then(|e| e.downcast_ref::<rustls::Error>()),
                Some(rustls::Error::DecryptError)
            ),
            "{err}"
        );
    }

    /// Data that arrived ahead of a record that fails is read before the failure is reported.
    #[tokio::test]
    async fn data_before_a_forged_record_is_read_first() {
        let (mut server, mut client) = stream_pair("st-data-forged", 64 * 1024, false).await;
        client.write_all(b"hello").await.expect("w");
        client.flush().await.expect("flush");
        send_forged_record(&mut client).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut buf = [0u8; 16];
        let n = server.read(&mut buf).await.expect("the data first");
        assert_eq!(&buf[..n], b"hello");
        let err = server.read(&mut buf).await.expect_err("then the failure");
        assert_decrypt_error(&err);
    }

    /// More KeyUpdates in the Finished flight than rustls' limit of 32, with data between
    /// them: rustls follows only those before the handshake is over, our layer the rest.
    #[tokio::test]
    async fn many_key_updates_with_data_right_after_the_handshake_are_followed() {
        key_updates_right_after_the_handshake("st-ku-many", 40, b"x").await;
    }

    /// A forged record after the handshake: a decrypt error for the reader, and the alert
    /// that says so for the peer.
    #[tokio::test]
    async fn a_record_that_does_not_decrypt_is_an_error_and_an_alert() {
        let (mut server, mut client) = stream_pair("st-forged", 64 * 1024, false).await;
        send_forged_record(&mut client).await;
        let err = server.read(&mut [0u8; 16]).await.expect_err("forged");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert_decrypt_error(&err);
        let seen = client.read(&mut [0u8; 16]).await;
        assert!(seen.is_err(), "the client hears the alert: {seen:?}");
    }

    /// A handshake message that claims more than 64 KiB is refused, not buffered without end.
    #[tokio::test]
    async fn an_oversized_handshake_message_is_refused() {
        let files = Files::new("st-big-hello");
        let ca = ecdsa_ca("Stream CA");
        let server = files.ecdsa_listener(&ca);
        let (mut client_io, server_io) = tokio::io::duplex(64 * 1024);
        let feed = tokio::spawn(async move {
            // A ClientHello of 16 MiB, as records of 16 KiB, the first starting the message.
            let mut first = vec![22, 3, 1, 0x40, 0x00, 1, 0xff, 0xff, 0xff];
            first.resize(5 + 0x4000, 0);
            if client_io.write_all(&first).await.is_err() {
                return;
            }
            let mut more = vec![22, 3, 3, 0x40, 0x00];
            more.resize(5 + 0x4000, 0);
            for _ in 0..64 {
                if client_io.write_all(&more).await.is_err() {
                    return;
                }
            }
        });
        let accepted =
            tokio::time::timeout(Duration::from_secs(10), stream::accept(server, server_io))
                .await
                .expect("refused in time, not waited on");
        assert!(accepted.is_err(), "an oversized hello must fail");
        feed.abort();
    }

    /// Any bytes from a client, in place of a handshake or after one: an error or data, never
    /// a panic or a hang.
    #[test]
    fn any_bytes_from_a_client_end_in_an_error_not_a_panic() {
        use proptest::prelude::*;
        use proptest::test_runner::{Config, TestRunner};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let files = Files::new("st-fuzz");
        let ca = ecdsa_ca("Stream CA");
        let server = files.ecdsa_listener(&ca);
        let prefixes: &[&[u8]] = &[
            b"",
            &[22, 3, 1],
            &[22, 3, 3, 0],
            &[23, 3, 3],
            &[21, 3, 3, 0, 2],
        ];
        let mut runner = TestRunner::new(Config {
            cases: 300,
            failure_persistence: None,
            ..Config::default()
        });
        let bytes = (
            0..prefixes.len(),
            proptest::collection::vec(any::<u8>(), 0..600),
        );
        runner
            .run(&bytes, |(prefix, tail)| {
                let mut input = prefixes[prefix].to_vec();
                input.extend(&tail);
                let server = server.clone();
                let outcome = rt.block_on(async move {
                    let (mut client_io, server_io) = tokio::io::duplex(4096);
                    let write = async move {
                        let _ = client_io.write_all(&input).await;
                        let _ = client_io.shutdown().await;
                        // Drain what the server answers, so it never blocks on a full pipe.
                        let mut sink = Vec::new();
                        let _ = client_io.read_to_end(&mut sink).await;
                    };
                    let accept = tokio::time::timeout(
                        Duration::from_secs(5),
                        stream::accept(server, server_io),
                    );
                    tokio::join!(accept, write).0
                });
                let accepted = outcome.expect("the handshake ends, not hangs");
                prop_assert!(
                    accepted.is_err(),
                    "no handshake can succeed from these bytes"
                );
                Ok(())
            })
            .expect("no bytes break the handshake");
    }

    /// A connection's certificate is judged again when the listener's TLS is another snapshot
    /// (a CRL or the CA bundle reloaded), once it has expired, and a minute after the verdict
    /// it stands on; otherwise the verdict stands.
    #[test]
    fn a_connections_certificate_is_judged_again_after_a_reload_or_its_expiry() {
        let files = Files::new("standing");
        let ca = ecdsa_ca("Standing CA");
        let other = ecdsa_ca("Other CA");
        let leaf = client_leaf(&ca, &["c.example"]);
        let build = |client_cas: &[&Ca], crls: &[&str]| {
            listener_tls(
                &files.server(&ca, KeyKind::EcdsaP256, client_cas, crls),
                ALPN,
            )
            .expect("listener TLS")
        };
        let plain = build(&[&ca], &[]);
        let revoking = build(&[&ca], &[&ca.crl(&[&leaf]).expect("crl")]);
        let foreign = build(&[&other], &[]);
        assert!(plain.generation() < revoking.generation());
        assert!(revoking.generation() < foreign.generation());

        let ids = identities::Identities::default();
        let cert = ids
            .get(std::slice::from_ref(&leaf.cert_der))
            .expect("certificate");
        let now = rustls::pki_types::UnixTime::now();
        let at =
            |secs: u64| rustls::pki_types::UnixTime::since_unix_epoch(Duration::from_secs(secs));
        cert.accepted(&plain, now);
        assert_eq!(cert.standing(&plain, now), Ok(()));
        assert_eq!(
            cert.standing(&revoking, now),
            Err(HandshakeFailure::CertificateRevoked)
        );
        assert_eq!(
            cert.standing(&foreign, now),
            Err(HandshakeFailure::UnknownIssuer)
        );
        assert_eq!(cert.standing(&plain, now), Ok(()), "accepted again");
        let expiry =
            u64::try_from(not_after(&leaf.cert_der).expect("notAfter")).expect("after 1970");
        assert_eq!(
            cert.standing(&plain, at(expiry + 10)),
            Err(HandshakeFailure::CertificateExpired),
            "expired while its connection was open"
        );

        // A handshake's verdict stands for its snapshot (here one that would refuse the
        // certificate now) until the minute is up.
        cert.accepted(&revoking, now);
        assert_eq!(cert.standing(&revoking, now), Ok(()), "the verdict stands");
        assert_eq!(
            cert.standing(&revoking, at(now.as_secs() + chaincache::TTL.as_secs())),
            Err(HandshakeFailure::CertificateRevoked)
        );
        // A handshake under an older snapshot does not replace a newer snapshot's verdict.
        cert.accepted(&plain, now);
        assert_eq!(
            cert.standing(&revoking, at(now.as_secs() + chaincache::TTL.as_secs())),
            Err(HandshakeFailure::CertificateRevoked)
        );
    }

    /// A reload may not drop the CRL of a CA that is still in the bundle, nor put another
    /// CA's CRL in its place: the first CA's revoked certificates would be accepted again.
    /// Dropping the CA from the bundle with its CRL is a reload like any other.
    #[test]
    fn a_reload_keeps_a_crl_for_every_ca_that_had_one() {
        let files = Files::new("crl-dropped");
        let (one, two) = (ecdsa_ca("CRL CA one"), ecdsa_ca("CRL CA two"));
        let revoked = client_leaf(&one, &["revoked.example"]);
        let crl_one = one.crl(&[&revoked]).expect("crl");
        let crl_two = two.crl(&[]).expect("crl");
        let floor = CrlFloor::default();
        let build = |cas: &[&Ca], crls: &[&str]| {
            only(listener_tls_above(
                &files.server(&one, KeyKind::EcdsaP256, cas, crls),
                &TlsKeys::SERVER_TLS,
                ALPN,
                &floor,
            ))
        };
        build(&[&one, &two], &[&crl_one]).expect("first");
        for (crls, what) in [
            (vec![crl_two.as_str()], "another CA's CRL in its place"),
            (vec![], "no CRL at all"),
        ] {
            match build(&[&one, &two], &crls) {
                Err(TlsError::BadCrl { reason, .. }) => {
                    assert!(reason.contains("is still a CA in"), "{what}: {reason}")
                }
                other => panic!("{what}: expected BadCrl, got {other:?}"),
            }
        }
        build(&[&one, &two], &[&crl_one, &crl_two]).expect("both");
        build(&[&two], &[&crl_two]).expect("the first CA gone from the bundle with its CRL");
    }
}
