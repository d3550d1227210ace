//! TLS for both legs: the mTLS listener's server config (client certificate required, CRLs),
//! the upstream client config, and who the peer is. Never logs key material.

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
