//! The development and test PKI: a CA that issues server and client certificates (current,
//! expired or not yet valid), CRLs, and the development world of `certs-dev/` written by
//! `ssp-gateway dev-certs`. For development and tests only: keys are generated in memory and
//! written unencrypted; nothing here is fit to run a real PKI.
//!
//! Every certificate gets a fresh key and a random 16-byte serial (126 random bits); no key is ever reused
//! (RSA 2048 generation costs a moment in debug builds, and correctness wins over speed).

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason,
    RevokedCertParams, SerialNumber,
};
use rsa::rand_core::{OsRng, RngCore};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::time::ASN1Time;

/// Organisation name in every certificate this module makes.
const ORGANISATION: &str = "ssp-gateway development PKI";
/// Margin before "now" for `notBefore`, so small clock differences do not matter.
const BACKDATE_SECS: i64 = 3600;
const DAY_SECS: i64 = 86_400;
/// Lifetime of a CA.
const CA_DAYS: i64 = 3650;
/// Lifetime of a current leaf certificate, and of the CRLs from [`Ca::crl`].
pub const LEAF_DAYS: i64 = 397;

/// Why the PKI could not make or write something.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen refused to build an item (bad name, bad parameters).
    #[error("{what}: {source}")]
    Generate {
        /// What was being made.
        what: String,
        /// rcgen's error.
        source: rcgen::Error,
    },
    /// Key generation failed.
    #[error("generating a {kind:?} key: {reason}")]
    KeyGen {
        /// The key kind.
        kind: KeyKind,
        /// Why.
        reason: String,
    },
    /// The system random number generator failed.
    #[error("system random number generator: {0}")]
    Random(String),
    /// The system clock is unusable (before 1970 or beyond the certificate date range).
    #[error("system clock: {0}")]
    Clock(String),
    /// A file or directory could not be written or inspected.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// Some, but not all, development files exist; `--force` regenerates them all. (The
    /// directory is not in the text: those who report the error name it first.)
    #[error(
        "incomplete development PKI, missing {}; run `ssp-gateway dev-certs --out {} --force` to regenerate all of it",
        missing.join(", "),
        shell_word(dir)
    )]
    PartialSet {
        /// The directory.
        dir: PathBuf,
        /// The missing file names.
        missing: Vec<String>,
    },
}

/// The key algorithm of a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyKind {
    /// ECDSA on P-256 with SHA-256 signatures.
    EcdsaP256,
    /// RSA 2048 with PKCS#1 v1.5 SHA-256 signatures.
    Rsa2048,
}

/// What a leaf certificate may be used for (its extended key usage).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Usage {
    /// TLS server authentication.
    Server,
    /// TLS client authentication.
    Client,
    /// Both.
    Both,
    /// TLS client authentication by its extended key usage, with a Key Usage of
    /// `keyEncipherment` alone: a mis-issued certificate whose key may not sign the handshake
    /// (for tests of the listener's refusal).
    ClientKeyEnciphermentOnly,
}

/// The validity window of a leaf certificate, relative to now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Validity {
    /// From an hour ago for [`LEAF_DAYS`] days.
    Current,
    /// From 30 days ago until yesterday.
    Expired,
    /// From tomorrow for 30 days.
    NotYetValid,
    /// From an hour ago until this Unix time (seconds): a certificate that runs out while in
    /// use.
    Until(i64),
    /// From this Unix time (seconds) for [`LEAF_DAYS`] days: a renewal published before its
    /// notBefore.
    From(i64),
}

/// What to put in a leaf certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafSpec {
    /// Subject alternative names, in order: DNS names, or IP addresses (an entry that parses as
    /// an IP address becomes an IP SAN).
    pub names: Vec<String>,
    /// Subject common name.
    pub common_name: String,
    /// Key algorithm.
    pub key: KeyKind,
    /// Extended key usage.
    pub usage: Usage,
    /// Validity window.
    pub validity: Validity,
}

impl LeafSpec {
    /// A current ECDSA server certificate for `names` (CN = the first name).
    pub fn server(names: &[&str]) -> Self {
        Self::new(names, Usage::Server)
    }

    /// A current ECDSA client certificate for `names` (CN = the first name).
    pub fn client(names: &[&str]) -> Self {
        Self::new(names, Usage::Client)
    }

    fn new(names: &[&str], usage: Usage) -> Self {
        LeafSpec {
            names: names.iter().map(|n| (*n).to_owned()).collect(),
            common_name: names.first().map(|n| (*n).to_owned()).unwrap_or_default(),
            key: KeyKind::EcdsaP256,
            usage,
            validity: Validity::Current,
        }
    }

    /// The same spec with another key kind.
    pub fn with_key(mut self, key: KeyKind) -> Self {
        self.key = key;
        self
    }

    /// The same spec with another validity window.
    pub fn with_validity(mut self, validity: Validity) -> Self {
        self.validity = validity;
        self
    }
}

/// A certificate and its private key, as PEM and DER.
pub struct Issued {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PEM PKCS#8.
    pub key_pem: String,
    /// The certificate, DER.
    pub cert_der: CertificateDer<'static>,
    /// The private key, DER PKCS#8 (`clone_key()` for a copy).
    pub key_der: PrivateKeyDer<'static>,
    /// The serial number, lowercase hex (as in [`crate::tls::PeerIdentity::serial`]).
    pub serial: String,
    serial_number: SerialNumber,
}

impl Issued {
    /// Writes the certificate (mode 0644) and the key (mode 0600), each atomically.
    pub fn write(&self, cert_path: &Path, key_path: &Path) -> Result<(), PkiError> {
        write_atomic(cert_path, self.cert_pem.as_bytes(), CERT_MODE)?;
        write_atomic(key_path, self.key_pem.as_bytes(), KEY_MODE)
    }
}

impl fmt::Debug for Issued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issued")
            .field("serial", &self.serial)
            .field("key", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// A certificate authority that signs leaf certificates and CRLs.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    cert_pem: String,
}

impl Ca {
    /// A new self-signed CA (path length 0, valid for ten years from an hour ago).
    pub fn new(common_name: &str, key: KeyKind) -> Result<Ca, PkiError> {
        let key_pair = generate_key(key)?;
        let now = now_unix()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(common_name);
        params.not_before = time_at(now - BACKDATE_SECS)?.to_datetime();
        params.not_after = time_at(now + CA_DAYS * DAY_SECS)?.to_datetime();
        params.serial_number = Some(random_serial()?);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params
            .self_signed(&key_pair)
            .map_err(|source| PkiError::Generate {
                what: format!("CA certificate {common_name:?}"),
                source,
            })?;
        let cert_pem = cert.pem();
        Ok(Ca {
            cert,
            key: key_pair,
            cert_pem,
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        self.cert.der()
    }

    /// The CA private key, PEM PKCS#8.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// Issues a leaf certificate with a fresh key.
    pub fn issue(&self, spec: &LeafSpec) -> Result<Issued, PkiError> {
        let key_pair = generate_key(spec.key)?;
        let mut params =
            CertificateParams::new(spec.names.clone()).map_err(|source| PkiError::Generate {
                what: format!("subject alternative names {:?}", spec.names),
                source,
            })?;
        params.distinguished_name = distinguished_name(&spec.common_name);
        let now = now_unix()?;
        let (from, until) = match spec.validity {
            Validity::Current => (now - BACKDATE_SECS, now + LEAF_DAYS * DAY_SECS),
            Validity::Expired => (now - 30 * DAY_SECS, now - DAY_SECS),
            Validity::NotYetValid => (now + DAY_SECS, now + 30 * DAY_SECS),
            Validity::Until(until) => (now - BACKDATE_SECS, until),
            Validity::From(from) => (from, from + LEAF_DAYS * DAY_SECS),
        };
        params.not_before = time_at(from)?.to_datetime();
        params.not_after = time_at(until)?.to_datetime();
        let serial_number = random_serial()?;
        params.serial_number = Some(serial_number.clone());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = match (spec.key, spec.usage) {
            (_, Usage::ClientKeyEnciphermentOnly) => vec![KeyUsagePurpose::KeyEncipherment],
            (KeyKind::EcdsaP256, _) => vec![KeyUsagePurpose::DigitalSignature],
            (KeyKind::Rsa2048, _) => vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ],
        };
        params.extended_key_usages = match spec.usage {
            Usage::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
            Usage::Client | Usage::ClientKeyEnciphermentOnly => {
                vec![ExtendedKeyUsagePurpose::ClientAuth]
            }
            Usage::Both => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        };
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key_pair, &self.cert, &self.key)
            .map_err(|source| PkiError::Generate {
                what: format!("certificate for {:?}", spec.common_name),
                source,
            })?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key_pair.serialize_pem(),
            cert_der: cert.der().clone(),
            key_der: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pair.serialize_der())),
            serial: super::serial_hex(&serial_number.to_bytes()),
            serial_number,
        })
    }

    /// A CRL (PEM) revoking `revoked`, valid from an hour ago for [`LEAF_DAYS`] days. Pass only
    /// certificates this CA issued: a CRL names serials of its own issuer's certificates.
    pub fn crl(&self, revoked: &[&Issued]) -> Result<String, PkiError> {
        let now = now_unix()?;
        self.crl_between(revoked, now - BACKDATE_SECS, now + LEAF_DAYS * DAY_SECS)
    }

    /// A CRL (PEM) with the given `thisUpdate` and `nextUpdate` (Unix seconds), for testing
    /// stale CRLs. `next_update` must be after `this_update`.
    pub fn crl_between(
        &self,
        revoked: &[&Issued],
        this_update: i64,
        next_update: i64,
    ) -> Result<String, PkiError> {
        self.crl_numbered(revoked, this_update, next_update, next_crl_number())
    }

    /// [`crl_between`](Self::crl_between) with the given CRL Number (each new CRL of an issuer
    /// must have a greater one: the gateway refuses an older or a different CRL of a number it
    /// has loaded).
    pub fn crl_numbered(
        &self,
        revoked: &[&Issued],
        this_update: i64,
        next_update: i64,
        number: u64,
    ) -> Result<String, PkiError> {
        let revocation_time = time_at(this_update)?.to_datetime();
        let params = CertificateRevocationListParams {
            this_update: revocation_time,
            next_update: time_at(next_update)?.to_datetime(),
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|issued| RevokedCertParams {
                    serial_number: issued.serial_number.clone(),
                    revocation_time,
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let what = || "CRL".to_owned();
        params
            .signed_by(&self.cert, &self.key)
            .and_then(|crl| crl.pem())
            .map_err(|source| PkiError::Generate {
                what: what(),
                source,
            })
    }
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("subject", &self.cert.params().distinguished_name)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// The CA certificate of the development world.
pub const DEV_CA: &str = "ca.pem";
/// The CA private key of the development world.
pub const DEV_CA_KEY: &str = "ca-key.pem";
/// The CA's CRL, revoking `revoked.pem`.
pub const DEV_CRL: &str = "ca.crl.pem";
/// The development audit trail's chain key (`[audit] key_file` of `config/gateway.toml`): 32
/// random bytes, mode 0600. Made when missing, with the certificates or after them, and never
/// replaced, not even by `--force`: the development trail written with it stays verifiable
/// (`ssp-gateway audit verify --key certs-dev/audit-chain.key audit-dev`).
pub const DEV_AUDIT_KEY: &str = "audit-chain.key";
/// Bytes of [`DEV_AUDIT_KEY`].
const DEV_AUDIT_KEY_BYTES: usize = 32;

/// One leaf of the development world: `<stem>.pem` and `<stem>-key.pem`.
struct DevLeaf {
    stem: &'static str,
    names: &'static [&'static str],
    usage: Usage,
}

/// The leaves of the development world (ARCHITECTURE.md, "The development world").
const DEV_LEAVES: &[DevLeaf] = &[
    DevLeaf {
        stem: "gateway",
        names: &["localhost", "127.0.0.1"],
        usage: Usage::Server,
    },
    DevLeaf {
        stem: "gateway-client",
        names: &["ssp.dev.local"],
        usage: Usage::Client,
    },
    DevLeaf {
        stem: "consumer",
        names: &["consumer.dev.local"],
        usage: Usage::Client,
    },
    DevLeaf {
        stem: "readonly",
        names: &["readonly.dev.local"],
        usage: Usage::Client,
    },
    DevLeaf {
        stem: "rogue",
        names: &["rogue.dev.local"],
        usage: Usage::Client,
    },
    DevLeaf {
        stem: "provider",
        names: &["localhost", "127.0.0.1"],
        usage: Usage::Server,
    },
    DevLeaf {
        stem: "revoked",
        names: &["consumer.dev.local"],
        usage: Usage::Client,
    },
];

/// The stem of the leaf that [`DEV_CRL`] revokes.
const DEV_REVOKED: &str = "revoked";

/// Every file name of the development world, in writing order.
pub fn dev_cert_files() -> Vec<String> {
    let mut files = vec![DEV_CA.to_owned(), DEV_CA_KEY.to_owned()];
    for leaf in DEV_LEAVES {
        files.push(format!("{}.pem", leaf.stem));
        files.push(format!("{}-key.pem", leaf.stem));
    }
    files.push(DEV_CRL.to_owned());
    files
}

/// What [`write_dev_certs`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DevCertsAction {
    /// Nothing existed; every file was written.
    Created,
    /// `force` was given; every file was (re)written.
    Replaced,
    /// A complete set existed and was left untouched.
    Kept,
}

/// The outcome of [`write_dev_certs`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevCertsReport {
    /// The directory.
    pub dir: PathBuf,
    /// What was done.
    pub action: DevCertsAction,
    /// Every file of the set, in the directory (the audit chain key last).
    pub files: Vec<PathBuf>,
    /// The audit chain key was missing and has been made.
    pub audit_key_created: bool,
}

impl fmt::Display for DevCertsReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = match self.action {
            DevCertsAction::Created => "created",
            DevCertsAction::Replaced => "replaced",
            DevCertsAction::Kept => "kept",
        };
        write!(
            f,
            "{verb} the development PKI in {} ({} files; for development only)",
            self.dir.display(),
            self.files.len()
        )?;
        if self.audit_key_created {
            write!(f, "; created its audit chain key {DEV_AUDIT_KEY}")?;
        }
        Ok(())
    }
}

/// Whether every file of the development world exists in `dir`, the audit chain key included.
pub fn dev_certs_present(dir: &Path) -> bool {
    missing_dev_certs(dir).is_empty() && dir.join(DEV_AUDIT_KEY).is_file()
}

/// `path` as one word of a shell command to paste: as it is when it holds only letters,
/// digits and `/._-`, else single-quoted.
fn shell_word(path: &Path) -> String {
    let text = path.display().to_string();
    if !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-".contains(&b))
    {
        return text;
    }
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// The development certificate and key files missing from `dir` (the audit key aside, which
/// is made when missing): all of them when there is no set, none when it is complete; any
/// other answer is a partial set ([`PkiError::PartialSet`]).
pub fn missing_dev_certs(dir: &Path) -> Vec<String> {
    dev_cert_files()
        .into_iter()
        .filter(|name| !dir.join(name).is_file())
        .collect()
}

/// Makes the development audit chain key in `dir` when it is missing; `true` when it did.
fn ensure_dev_audit_key(dir: &Path) -> Result<bool, PkiError> {
    let path = dir.join(DEV_AUDIT_KEY);
    if path.symlink_metadata().is_ok() {
        return Ok(false);
    }
    let mut key = [0u8; DEV_AUDIT_KEY_BYTES];
    OsRng.fill_bytes(&mut key);
    let written = write_atomic(&path, &key, KEY_MODE);
    zeroize::Zeroize::zeroize(&mut key);
    written?;
    sync_dir(dir)?;
    Ok(true)
}

/// Writes the development world into `dir` (created if missing): a CA, the gateway's server and
/// client certificates, the consumer, read-only, rogue, provider and revoked certificates, and
/// a CRL revoking the last. All keys are ECDSA P-256 (fast to make; the tests cover RSA).
/// Without `force`, a complete set is kept as it is and a partial set is an error naming the
/// missing files; with `force` everything is regenerated. Each file is written atomically,
/// keys with mode 0600 and certificates with mode 0644.
pub fn write_dev_certs(dir: &Path, force: bool) -> Result<DevCertsReport, PkiError> {
    // A file or a dangling link where the directory should be: say so, not "File exists".
    if dir.symlink_metadata().is_ok() && !dir.is_dir() {
        return Err(PkiError::Io {
            path: dir.to_owned(),
            source: io::Error::new(
                io::ErrorKind::AlreadyExists,
                "exists and is not a directory (or is a link to nothing)",
            ),
        });
    }
    let names = dev_cert_files();
    let mut files: Vec<PathBuf> = names.iter().map(|n| dir.join(n)).collect();
    let missing = missing_dev_certs(dir);
    files.push(dir.join(DEV_AUDIT_KEY));
    if !force {
        if missing.is_empty() {
            let audit_key_created = ensure_dev_audit_key(dir)?;
            return Ok(DevCertsReport {
                dir: dir.to_owned(),
                action: DevCertsAction::Kept,
                files,
                audit_key_created,
            });
        }
        if missing.len() < names.len() {
            return Err(PkiError::PartialSet {
                dir: dir.to_owned(),
                missing,
            });
        }
    }
    let action = if missing.len() == names.len() {
        DevCertsAction::Created
    } else {
        DevCertsAction::Replaced
    };

    // Everything is generated before anything is written.
    let ca = Ca::new("ssp-gateway development CA", KeyKind::EcdsaP256)?;
    let mut leaves = Vec::with_capacity(DEV_LEAVES.len());
    for leaf in DEV_LEAVES {
        let spec = LeafSpec::new(leaf.names, leaf.usage);
        leaves.push((leaf.stem, ca.issue(&spec)?));
    }
    let revoked: Vec<&Issued> = leaves
        .iter()
        .filter(|(stem, _)| *stem == DEV_REVOKED)
        .map(|(_, issued)| issued)
        .collect();
    let crl = ca.crl(&revoked)?;

    fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        path: dir.to_owned(),
        source,
    })?;
    write_atomic(&dir.join(DEV_CA), ca.cert_pem().as_bytes(), CERT_MODE)?;
    write_atomic(&dir.join(DEV_CA_KEY), ca.key_pem().as_bytes(), KEY_MODE)?;
    for (stem, issued) in &leaves {
        issued.write(
            &dir.join(format!("{stem}.pem")),
            &dir.join(format!("{stem}-key.pem")),
        )?;
    }
    write_atomic(&dir.join(DEV_CRL), crl.as_bytes(), CERT_MODE)?;
    sync_dir(dir)?;
    let audit_key_created = ensure_dev_audit_key(dir)?;
    Ok(DevCertsReport {
        dir: dir.to_owned(),
        action,
        files,
        audit_key_created,
    })
}

const CERT_MODE: u32 = 0o644;
const KEY_MODE: u32 = 0o600;

/// Writes `contents` to `path` through a temporary file in the same directory and a rename, so
/// a reader sees the old file or the new one, never a part. The mode is set before any byte is
/// written.
fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| PkiError::Io { path, source }
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| PkiError::Io {
            path: path.to_owned(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "not a file path"),
        })?;
    let tmp = path.with_file_name(format!(".{file_name}.{}.tmp", std::process::id()));
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&tmp)(e)),
    }
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    let result = (|| {
        let mut file = options.open(&tmp)?;
        // The umask may have narrowed the mode given at creation; set it exactly.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(fs::Permissions::from_mode(mode))?;
        }
        #[cfg(not(unix))]
        let _ = mode;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        // Best effort: the temporary file is useless now, and its removal error would hide `e`.
        let _ = fs::remove_file(&tmp);
        return Err(io_err(path)(e));
    }
    Ok(())
}

/// Makes the renames in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), PkiError> {
    #[cfg(unix)]
    {
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| PkiError::Io {
                path: dir.to_owned(),
                source,
            })?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    // Pushed in encoding order: O first, so the RFC 4514 string reads "CN=...,O=...".
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, ORGANISATION);
    dn.push(DnType::CommonName, common_name);
    dn
}

fn generate_key(kind: KeyKind) -> Result<KeyPair, PkiError> {
    let keygen = |reason: String| PkiError::KeyGen { kind, reason };
    match kind {
        KeyKind::EcdsaP256 => {
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| keygen(e.to_string()))
        }
        KeyKind::Rsa2048 => {
            // ring cannot generate RSA keys: the rsa crate does, and ring signs with them.
            use rsa::pkcs8::EncodePrivateKey;
            let key =
                rsa::RsaPrivateKey::new(&mut OsRng, 2048).map_err(|e| keygen(e.to_string()))?;
            let der = key.to_pkcs8_der().map_err(|e| keygen(e.to_string()))?;
            let pkcs8 = PrivatePkcs8KeyDer::from(der.as_bytes());
            KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &rcgen::PKCS_RSA_SHA256)
                .map_err(|e| keygen(e.to_string()))
        }
    }
}

/// A random positive serial of 16 bytes (126 random bits) whose first byte is in 0x40..=0x7f, so its DER
/// encoding is always exactly these 16 bytes (no sign padding, no leading zero).
fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; 16];
    OsRng
        .try_fill_bytes(&mut bytes)
        .map_err(|e| PkiError::Random(e.to_string()))?;
    bytes[0] = (bytes[0] & 0x3f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

/// A CRL Number greater than any this process made before and, by the clock's milliseconds,
/// than those of CRLs made earlier by other runs.
fn next_crl_number() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut last = LAST.load(Ordering::Relaxed);
    loop {
        let next = now.max(last + 1);
        match LAST.compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(seen) => last = seen,
        }
    }
}

fn now_unix() -> Result<i64, PkiError> {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| PkiError::Clock(e.to_string()))?
        .as_secs();
    i64::try_from(secs).map_err(|e| PkiError::Clock(e.to_string()))
}

fn time_at(unix: i64) -> Result<ASN1Time, PkiError> {
    ASN1Time::from_timestamp(unix).map_err(|e| PkiError::Clock(format!("{unix}: {e}")))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;
    use x509_parser::extensions::GeneralName;

    pub(crate) use crate::tempdir::TempDir;

    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(path).expect("stat").permissions().mode() & 0o777
    }

    fn parsed(der: &[u8]) -> x509_parser::certificate::X509Certificate<'_> {
        x509_parser::parse_x509_certificate(der).expect("parse").1
    }

    fn ca() -> Ca {
        Ca::new("Test CA", KeyKind::EcdsaP256).expect("CA")
    }

    #[test]
    fn leaf_has_names_in_order_with_ip_sans_and_the_requested_usage() {
        let ca = ca();
        let mut spec = LeafSpec::server(&["a.example", "127.0.0.1", "b.example"]);
        spec.common_name = "the-cn".to_owned();
        let issued = ca.issue(&spec).expect("issue");
        let cert = parsed(&issued.cert_der);
        let san = cert
            .subject_alternative_name()
            .expect("san")
            .expect("present");
        let names: Vec<String> = san
            .value
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::DNSName(d) => format!("dns:{d}"),
                GeneralName::IPAddress(ip) => format!("ip:{ip:?}"),
                other => format!("other:{other:?}"),
            })
            .collect();
        assert_eq!(
            names,
            ["dns:a.example", "ip:[127, 0, 0, 1]", "dns:b.example"]
        );
        let eku = cert
            .extended_key_usage()
            .expect("eku")
            .expect("present")
            .value;
        assert!(eku.server_auth && !eku.client_auth);
        assert!(!cert.is_ca());
        assert_eq!(cert.issuer(), parsed(ca.cert_der()).subject());
        assert!(cert.validity().is_valid());
        let cn: Vec<_> = cert.subject().iter_common_name().collect();
        assert_eq!(cn[0].as_str().expect("cn"), "the-cn");

        let both = ca
            .issue(&LeafSpec {
                usage: Usage::Both,
                ..LeafSpec::client(&["c.example"])
            })
            .expect("issue");
        let both = parsed(&both.cert_der);
        let eku = both
            .extended_key_usage()
            .expect("eku")
            .expect("present")
            .value;
        assert!(eku.server_auth && eku.client_auth);
    }

    #[test]
    fn each_certificate_gets_its_own_key_and_serial() {
        let ca = ca();
        let spec = LeafSpec::client(&["same.example"]);
        let a = ca.issue(&spec).expect("issue");
        let b = ca.issue(&spec).expect("issue");
        assert_ne!(a.serial, b.serial);
        assert_ne!(a.key_pem, b.key_pem);
        assert_ne!(a.cert_der, b.cert_der);
        assert_eq!(a.serial.len(), 32, "16 bytes, no sign padding");
        assert_eq!(
            a.serial,
            crate::tls::serial_hex(parsed(&a.cert_der).raw_serial())
        );
    }

    #[test]
    fn rsa_leaves_and_cas_are_rsa_2048() {
        let ca = Ca::new("RSA CA", KeyKind::Rsa2048).expect("CA");
        let leaf = ca
            .issue(&LeafSpec::client(&["rsa.example"]).with_key(KeyKind::Rsa2048))
            .expect("issue");
        for der in [ca.cert_der(), &leaf.cert_der] {
            let cert = parsed(der);
            match cert.public_key().parsed().expect("key") {
                x509_parser::public_key::PublicKey::RSA(rsa) => assert_eq!(rsa.key_size(), 2048),
                other => panic!("expected RSA, got {other:?}"),
            }
        }
        assert!(leaf.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
    }

    #[test]
    fn validity_windows_are_relative_to_now() {
        let ca = ca();
        let now = ASN1Time::now();
        let expired = ca
            .issue(&LeafSpec::client(&["x.example"]).with_validity(Validity::Expired))
            .expect("issue");
        assert!(parsed(&expired.cert_der).validity().not_after < now);
        let early = ca
            .issue(&LeafSpec::client(&["x.example"]).with_validity(Validity::NotYetValid))
            .expect("issue");
        assert!(parsed(&early.cert_der).validity().not_before > now);
    }

    #[test]
    fn crl_lists_exactly_the_revoked_serials_and_is_current() {
        let ca = ca();
        let bad = ca
            .issue(&LeafSpec::client(&["bad.example"]))
            .expect("issue");
        let good = ca
            .issue(&LeafSpec::client(&["good.example"]))
            .expect("issue");
        let pem = ca.crl(&[&bad]).expect("crl");
        let der = rustls::pki_types::CertificateRevocationListDer::from_pem_slice(pem.as_bytes())
            .expect("PEM CRL");
        let (_, crl) = x509_parser::parse_x509_crl(&der).expect("parse");
        let serials: Vec<String> = crl
            .iter_revoked_certificates()
            .map(|r| crate::tls::serial_hex(r.raw_serial()))
            .collect();
        assert_eq!(serials, std::slice::from_ref(&bad.serial));
        assert!(!serials.contains(&good.serial));
        assert_eq!(crl.issuer(), parsed(ca.cert_der()).subject());
        assert!(crl.next_update().expect("nextUpdate") > ASN1Time::now());

        assert!(matches!(
            ca.crl_between(&[], 2_000, 1_000),
            Err(PkiError::Generate { .. })
        ));
    }

    #[test]
    fn debug_output_never_shows_keys() {
        let ca = ca();
        let issued = ca.issue(&LeafSpec::client(&["d.example"])).expect("issue");
        for text in [format!("{issued:?}"), format!("{ca:?}")] {
            assert!(!text.contains("PRIVATE KEY"), "{text}");
            assert!(text.contains("<redacted>"));
        }
    }

    #[test]
    fn dev_certs_are_written_once_with_key_modes_and_kept_after() {
        let tmp = TempDir::new("devcerts");
        let dir = tmp.path("nested/certs-dev");
        assert!(!dev_certs_present(&dir));

        let report = write_dev_certs(&dir, false).expect("write");
        assert_eq!(report.action, DevCertsAction::Created);
        assert_eq!(report.files.len(), 18);
        assert!(report.audit_key_created);
        assert!(dev_certs_present(&dir));
        let audit_key = fs::read(dir.join(DEV_AUDIT_KEY)).expect("audit key");
        assert_eq!(audit_key.len(), 32);
        assert!(crate::audit::key::ChainKey::load(&dir.join(DEV_AUDIT_KEY)).is_ok());
        for file in &report.files {
            let name = file
                .file_name()
                .expect("name")
                .to_string_lossy()
                .into_owned();
            let expected = if name.ends_with("-key.pem") || name == DEV_AUDIT_KEY {
                0o600
            } else {
                0o644
            };
            assert_eq!(mode(file), expected, "{name}");
        }
        let leftovers: Vec<_> = fs::read_dir(&dir)
            .expect("list")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");

        // The contents match the development world.
        let names_of = |stem: &str| {
            let der = crate::tls::load_certs(&dir.join(format!("{stem}.pem"))).expect("load");
            crate::tls::peer_identity(&der[0]).expect("identity").names
        };
        assert_eq!(names_of("gateway"), ["localhost"]);
        assert_eq!(names_of("provider"), ["localhost"]);
        assert_eq!(names_of("gateway-client"), ["ssp.dev.local"]);
        assert_eq!(names_of("consumer"), ["consumer.dev.local"]);
        assert_eq!(names_of("readonly"), ["readonly.dev.local"]);
        assert_eq!(names_of("rogue"), ["rogue.dev.local"]);
        assert_eq!(names_of("revoked"), ["consumer.dev.local"]);
        let crl = fs::read(dir.join(DEV_CRL)).expect("crl");
        let crl =
            rustls::pki_types::CertificateRevocationListDer::from_pem_slice(&crl).expect("pem");
        let (_, crl) = x509_parser::parse_x509_crl(&crl).expect("crl");
        let revoked = crate::tls::load_certs(&dir.join("revoked.pem")).expect("load");
        let revoked_serial = crate::tls::peer_identity(&revoked[0]).expect("id").serial;
        let listed: Vec<String> = crl
            .iter_revoked_certificates()
            .map(|r| crate::tls::serial_hex(r.raw_serial()))
            .collect();
        assert_eq!(listed, [revoked_serial]);

        // Without force a complete set is kept byte for byte.
        let before = fs::read(dir.join("consumer.pem")).expect("read");
        let again = write_dev_certs(&dir, false).expect("again");
        assert_eq!(again.action, DevCertsAction::Kept);
        assert_eq!(fs::read(dir.join("consumer.pem")).expect("read"), before);
        assert!(again.to_string().contains("kept"));
        assert!(!again.audit_key_created);

        // A set made before the audit key existed gets one, and keeps its certificates.
        fs::remove_file(dir.join(DEV_AUDIT_KEY)).expect("remove");
        assert!(!dev_certs_present(&dir));
        let keyed = write_dev_certs(&dir, false).expect("key");
        assert_eq!(keyed.action, DevCertsAction::Kept);
        assert!(keyed.audit_key_created);
        assert!(
            keyed.to_string().contains("created its audit chain key"),
            "{keyed}"
        );
        assert_eq!(fs::read(dir.join("consumer.pem")).expect("read"), before);
        assert_eq!(mode(&dir.join(DEV_AUDIT_KEY)), 0o600);
        let audit_key = fs::read(dir.join(DEV_AUDIT_KEY)).expect("audit key");

        // A file, or a dangling link, where the directory should be is named as such.
        let file = dir.join("consumer.pem");
        let dangling = dir.join("nowhere-link");
        std::os::unix::fs::symlink(dir.join("nowhere"), &dangling).expect("symlink");
        for not_dir in [&file, &dangling] {
            let err = write_dev_certs(not_dir, true).expect_err("not a directory");
            assert!(err.to_string().contains("is not a directory"), "{err}");
        }
        fs::remove_file(&dangling).expect("remove");

        // The regeneration command in the error is pasteable as one shell word.
        assert_eq!(
            shell_word(Path::new("/etc/ssp/certs-dev")),
            "/etc/ssp/certs-dev"
        );
        assert_eq!(
            shell_word(Path::new("/my certs/it's")),
            r"'/my certs/it'\''s'"
        );
        // A partial set is an error naming what is missing, and nothing is rewritten.
        fs::remove_file(dir.join("rogue-key.pem")).expect("remove");
        match write_dev_certs(&dir, false) {
            Err(PkiError::PartialSet { missing, .. }) => assert_eq!(missing, ["rogue-key.pem"]),
            other => panic!("expected PartialSet, got {other:?}"),
        }
        assert!(!dev_certs_present(&dir));
        assert_eq!(fs::read(dir.join("consumer.pem")).expect("read"), before);

        // With force everything is regenerated.
        let forced = write_dev_certs(&dir, true).expect("force");
        assert_eq!(forced.action, DevCertsAction::Replaced);
        assert!(dev_certs_present(&dir));
        assert_ne!(fs::read(dir.join("consumer.pem")).expect("read"), before);
        assert_eq!(mode(&dir.join("rogue-key.pem")), 0o600);
        assert_eq!(
            fs::read(dir.join(DEV_AUDIT_KEY)).expect("read"),
            audit_key,
            "--force keeps the audit chain key"
        );
    }

    #[test]
    fn atomic_write_replaces_content_and_fixes_the_mode() {
        let tmp = TempDir::new("atomic");
        let path = tmp.path("f.pem");
        fs::write(&path, b"old").expect("seed");
        write_atomic(&path, b"new", KEY_MODE).expect("write");
        assert_eq!(fs::read(&path).expect("read"), b"new");
        assert_eq!(mode(&path), 0o600);
        assert!(matches!(
            write_atomic(&tmp.path("missing-dir/f.pem"), b"x", CERT_MODE),
            Err(PkiError::Io { .. })
        ));
    }
}
