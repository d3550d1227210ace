//! Remembers client certificate chains the listener's verifier has accepted, so a consumer that
//! opens a new connection per request is not put through the same chain verification (path
//! building, signatures, CRL lookups) on every handshake: about a fifth of an ECDSA handshake.
//! The proof of possession (the handshake signature) is verified every time; only the verdict
//! on the chain is reused.
//!
//! A verdict is reused only for the same bytes (the end-entity certificate and every
//! intermediate, in order), only by the verifier that reached it — a reload of the CA bundle or
//! the CRLs builds a new verifier with an empty cache — and never past the earliest of: `TTL`
//! after it was reached, the certificate's notAfter, and the earliest nextUpdate of the loaded
//! CRLs (after which the verifier itself would refuse). Refusals are never remembered. This
//! module never accepts a chain the wrapped verifier has not accepted.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::audit::record::sha256;

/// How long an accepted chain is trusted without verifying it again (when nothing earlier
/// bounds it).
pub const TTL: Duration = Duration::from_secs(60);
/// Most chains remembered; when full, the cache starts again empty.
pub const CAPACITY: usize = 10_000;
/// Most intermediate certificates a client may send. Path building tries every candidate
/// issuer with a signature check each, so a chain of many look-alike "intermediates" naming
/// the CA costs the gateway up to webpki's budget of 100 signature checks (about 11 ms of CPU
/// per handshake, measured, against 0.3 ms for a plain refusal) from anyone who knows the CA's
/// name. Real chains have one or two (NHS: issuing CA, sometimes its root too).
pub const MAX_INTERMEDIATES: usize = 4;

/// A client certificate whose Key Usage extension does not allow signing: RFC 8446 §4.4.2.2
/// (and RFC 5246 §7.4.6 for TLS 1.2) says the certificate MUST allow its key to sign the
/// handshake, that is, have `digitalSignature` when the extension is present (RFC 5280
/// §4.2.1.3). webpki does not look at Key Usage; a CA that issued such a certificate (a
/// key-encipherment-only leaf, or one meant for signing certificates) did not issue it for
/// TLS client authentication.
#[derive(Debug, thiserror::Error)]
#[error("the client certificate's Key Usage {0}")]
pub struct KeyUsageNotForSigning(&'static str);

/// Refuses an end-entity certificate whose Key Usage (when present) lacks `digitalSignature`,
/// or whose extensions cannot be read.
fn check_key_usage(
    cert: &x509_parser::certificate::X509Certificate<'_>,
) -> Result<(), KeyUsageNotForSigning> {
    match cert.key_usage() {
        Ok(None) => Ok(()),
        Ok(Some(ku)) if ku.value.digital_signature() => Ok(()),
        Ok(Some(_)) => Err(KeyUsageNotForSigning("does not include digitalSignature")),
        Err(_) => Err(KeyUsageNotForSigning("cannot be read")),
    }
}

/// A client chain refused before path building (see [`MAX_INTERMEDIATES`]).
#[derive(Debug, thiserror::Error)]
#[error("the client sent {0} intermediate certificates; at most {MAX_INTERMEDIATES} are accepted")]
pub struct TooManyIntermediates(pub usize);

/// A client certificate verifier that remembers accepted chains (see the module doc).
#[derive(Debug)]
pub struct ChainCache {
    inner: Arc<dyn ClientCertVerifier>,
    /// No verdict outlives this (unix seconds): the earliest nextUpdate of the CRLs.
    crl_horizon: Option<u64>,
    /// Chain digest -> accepted until (unix seconds, exclusive).
    accepted: RwLock<HashMap<[u8; 32], u64>>,
}

impl ChainCache {
    /// Wraps `inner`, which checks against `crls` (for the horizon; a CRL without nextUpdate,
    /// or one that does not parse here, sets no bound of its own).
    pub fn new(
        inner: Arc<dyn ClientCertVerifier>,
        crls: &[CertificateRevocationListDer<'_>],
    ) -> ChainCache {
        ChainCache {
            inner,
            crl_horizon: crl_horizon(crls),
            accepted: RwLock::new(HashMap::new()),
        }
    }

    /// The earliest nextUpdate of the CRLs this verifier checks against (unix seconds), if any:
    /// after it the verifier refuses what they would decide.
    pub fn crl_horizon(&self) -> Option<u64> {
        self.crl_horizon
    }

    fn lookup(&self, key: &[u8; 32], now: u64) -> bool {
        // A poisoned lock only means a panic mid-insert elsewhere; the map is still a map.
        let map = self.accepted.read().unwrap_or_else(|p| p.into_inner());
        map.get(key).is_some_and(|until| now < *until)
    }

    fn remember(
        &self,
        key: [u8; 32],
        cert: &x509_parser::certificate::X509Certificate<'_>,
        now: u64,
    ) {
        let not_after = u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0);
        let mut until = now.saturating_add(TTL.as_secs()).min(not_after);
        if let Some(horizon) = self.crl_horizon {
            until = until.min(horizon);
        }
        if until <= now {
            return;
        }
        let mut map = self.accepted.write().unwrap_or_else(|p| p.into_inner());
        if map.len() >= CAPACITY {
            map.retain(|_, u| now < *u);
            if map.len() >= CAPACITY {
                map.clear();
            }
        }
        map.insert(key, until);
    }
}

/// The earliest nextUpdate of `crls` (unix seconds): after it a verifier checking against them
/// refuses what they would decide. A CRL without nextUpdate, or one that does not parse here,
/// sets no bound of its own.
pub fn crl_horizon(crls: &[CertificateRevocationListDer<'_>]) -> Option<u64> {
    crls.iter()
        .filter_map(|crl| {
            let (_, parsed) = x509_parser::parse_x509_crl(crl.as_ref()).ok()?;
            let next = parsed.next_update()?.timestamp();
            Some(u64::try_from(next).unwrap_or(0))
        })
        .min()
}

/// SHA-256 over the chain, each certificate length-prefixed (so no two chains share a key).
fn chain_key(end_entity: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>]) -> [u8; 32] {
    let mut data = Vec::with_capacity(
        end_entity.len() + intermediates.iter().map(|c| c.len() + 8).sum::<usize>() + 8,
    );
    for cert in std::iter::once(end_entity).chain(intermediates) {
        data.extend_from_slice(&(cert.len() as u64).to_be_bytes());
        data.extend_from_slice(cert.as_ref());
    }
    sha256(&data)
}

impl ClientCertVerifier for ChainCache {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if intermediates.len() > MAX_INTERMEDIATES {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(
                    TooManyIntermediates(intermediates.len()),
                ))),
            ));
        }
        let key = chain_key(end_entity, intermediates);
        let now_secs = now.as_secs();
        if self.lookup(&key, now_secs) {
            return Ok(ClientCertVerified::assertion());
        }
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        // The wrapped verifier parsed it already; a leaf that does not parse here is refused.
        let refuse = |e: KeyUsageNotForSigning| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                Arc::new(e),
            )))
        };
        let (_, cert) = x509_parser::parse_x509_certificate(end_entity.as_ref())
            .map_err(|_| refuse(KeyUsageNotForSigning("cannot be read")))?;
        check_key_usage(&cert).map_err(refuse)?;
        self.remember(key, &cert, now_secs);
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.inner.requires_raw_public_keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::pki::{Ca, KeyKind, LeafSpec};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Accepts every chain except `refused`, counting the calls.
    #[derive(Debug, Default)]
    struct Counting {
        calls: AtomicUsize,
        refused: Option<Vec<u8>>,
    }

    impl ClientCertVerifier for Counting {
        fn root_hint_subjects(&self) -> &[DistinguishedName] {
            &[]
        }
        fn verify_client_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: UnixTime,
        ) -> Result<ClientCertVerified, rustls::Error> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.refused.as_deref() == Some(end_entity.as_ref()) {
                return Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::Revoked,
                ));
            }
            Ok(ClientCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Err(rustls::Error::General("not in this test".into()))
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Err(rustls::Error::General("not in this test".into()))
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            vec![]
        }
    }

    fn at(secs: u64) -> UnixTime {
        UnixTime::since_unix_epoch(Duration::from_secs(secs))
    }

    /// A long chain is refused before the wrapped verifier (path building) sees it.
    #[test]
    fn a_chain_with_too_many_intermediates_is_refused_before_path_building() {
        let ca = Ca::new("Cache CA", KeyKind::EcdsaP256).expect("CA");
        let leaf = ca
            .issue(&LeafSpec::client(&["consumer.dev.local"]))
            .expect("leaf");
        let ee = leaf.cert_der.clone();
        let inner = Arc::new(Counting::default());
        let cache = ChainCache::new(inner.clone(), &[]);
        let now = UnixTime::now();
        let padding = vec![ca.cert_der().clone(); MAX_INTERMEDIATES + 1];
        let err = cache
            .verify_client_cert(&ee, &padding, now)
            .expect_err("refused");
        // rustls shows the reason by its Debug form, as the handshake-failure log line will.
        assert!(err.to_string().contains("TooManyIntermediates(5)"), "{err}");
        assert_eq!(inner.calls.load(Ordering::SeqCst), 0, "never path-built");
        cache
            .verify_client_cert(&ee, &padding[..MAX_INTERMEDIATES], now)
            .expect("four are accepted");
        assert_eq!(inner.calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_verdict_is_reused_only_for_the_same_chain_within_its_bounds() {
        let ca = Ca::new("Cache CA", KeyKind::EcdsaP256).expect("CA");
        let leaf = ca
            .issue(&LeafSpec::client(&["consumer.dev.local"]))
            .expect("leaf");
        let other = ca
            .issue(&LeafSpec::client(&["other.dev.local"]))
            .expect("leaf");
        let revoked = ca
            .issue(&LeafSpec::client(&["revoked.dev.local"]))
            .expect("leaf");
        let ee = leaf.cert_der.clone();
        let not_after = x509_parser::parse_x509_certificate(&leaf.cert_der)
            .expect("parse")
            .1
            .validity()
            .not_after
            .timestamp() as u64;
        let inner = Arc::new(Counting {
            refused: Some(revoked.cert_der.to_vec()),
            ..Counting::default()
        });
        let cache = ChainCache::new(inner.clone(), &[]);
        let calls = || inner.calls.load(Ordering::SeqCst);
        let now = not_after - 3600;

        cache.verify_client_cert(&ee, &[], at(now)).expect("first");
        assert_eq!(calls(), 1);
        cache
            .verify_client_cert(&ee, &[], at(now + 10))
            .expect("cached");
        assert_eq!(
            calls(),
            1,
            "the same chain within the TTL is not verified again"
        );
        // Another chain: the leaf with an intermediate, or another leaf.
        let extra = other.cert_der.clone();
        cache
            .verify_client_cert(&ee, std::slice::from_ref(&extra), at(now + 10))
            .expect("with an intermediate");
        cache
            .verify_client_cert(&extra, &[], at(now + 10))
            .expect("other leaf");
        assert_eq!(calls(), 3);
        // Past the TTL: verified again.
        cache
            .verify_client_cert(&ee, &[], at(now + TTL.as_secs()))
            .expect("again");
        assert_eq!(calls(), 4);
        // Refusals are never remembered.
        let bad = revoked.cert_der.clone();
        assert!(cache.verify_client_cert(&bad, &[], at(now)).is_err());
        assert!(cache.verify_client_cert(&bad, &[], at(now)).is_err());
        assert_eq!(calls(), 6);
        // Never past the certificate's notAfter.
        let close = not_after - 5;
        cache
            .verify_client_cert(&ee, &[], at(close))
            .expect("near expiry");
        let before = calls();
        cache
            .verify_client_cert(&ee, &[], at(not_after))
            .expect("the counting verifier accepts");
        assert_eq!(
            calls(),
            before + 1,
            "at notAfter the chain is verified again"
        );
    }

    #[test]
    fn no_verdict_outlives_the_earliest_crl_next_update() {
        let ca = Ca::new("Cache CRL CA", KeyKind::EcdsaP256).expect("CA");
        let leaf = ca
            .issue(&LeafSpec::client(&["consumer.dev.local"]))
            .expect("leaf");
        // nextUpdate in an hour: well before the leaf's notAfter, so only the CRL bounds it.
        let unix_now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs() as i64;
        let crl = ca
            .crl_between(&[], unix_now - 100, unix_now + 3600)
            .expect("crl");
        let crl = rustls::pki_types::pem::PemObject::from_pem_slice(crl.as_bytes())
            .map(|der: CertificateRevocationListDer<'static>| der)
            .expect("CRL PEM");
        let next_update = x509_parser::parse_x509_crl(crl.as_ref())
            .expect("parse")
            .1
            .next_update()
            .expect("nextUpdate")
            .timestamp() as u64;
        let inner = Arc::new(Counting::default());
        let cache = ChainCache::new(inner.clone(), std::slice::from_ref(&crl));
        assert_eq!(cache.crl_horizon, Some(next_update));
        let ee = leaf.cert_der.clone();
        let now = next_update - 20;
        cache.verify_client_cert(&ee, &[], at(now)).expect("first");
        cache
            .verify_client_cert(&ee, &[], at(now + 19))
            .expect("cached");
        assert_eq!(inner.calls.load(Ordering::SeqCst), 1);
        cache
            .verify_client_cert(&ee, &[], at(next_update))
            .expect("counting accepts");
        assert_eq!(
            inner.calls.load(Ordering::SeqCst),
            2,
            "at the CRL's nextUpdate the chain is verified again"
        );
    }
}
