//! One `PeerIdentity` per client certificate, shared by every connection that presents it.
//!
//! A consumer system opens many connections with one certificate. Each connection used to
//! parse the certificate after its handshake and keep its own copy of the names, subject,
//! serial and fingerprint (and the audit trail's client a second copy): about 0.7 KB per
//! connection, 7 MB for 10,000 idle ones. Here the identity is looked up by the SHA-256 of the
//! certificate's DER bytes, which is also its fingerprint, and shared while any connection
//! holds it. Only certificates that passed the handshake's verification reach it, and the
//! identity is a pure function of the certificate's bytes, so sharing changes nothing a check
//! sees. Entries of certificates no connection holds any more are swept as the map grows.
//!
//! Beside the identity, each entry keeps the chain its first connection presented and the
//! listener's latest verdict on it ([`ClientCert::standing`]): after a reload of the CA bundle
//! or the CRLs, or once the certificate has expired, a connection opened before is judged again
//! before its next request, once per certificate rather than once per connection.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use rustls::pki_types::{CertificateDer, UnixTime};

use super::chaincache::TTL;
use super::{identity_with_digest, HandshakeFailure, ListenerTls, PeerIdentity, TlsError};
use crate::audit::record::sha256;

/// A verified client certificate, shared by the connections that presented it.
#[derive(Debug)]
pub struct ClientCert {
    pub identity: Arc<PeerIdentity>,
    /// The chain the first connection presented, leaf first: what is judged again.
    chain: Box<[CertificateDer<'static>]>,
    /// The leaf's notAfter, unix seconds.
    not_after: u64,
    verdict: Mutex<Verdict>,
    /// Connections open with this certificate (see [`ClientCert::open_connection`]).
    connections: std::sync::atomic::AtomicUsize,
}

/// One open connection of a certificate, counted until dropped.
#[derive(Debug)]
pub struct OpenConnection(Arc<ClientCert>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0
            .connections
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// The listener's latest verdict on a certificate.
#[derive(Debug, Clone, Copy)]
struct Verdict {
    /// The listener TLS snapshot that reached it ([`ListenerTls::generation`]).
    generation: u64,
    /// Unix seconds (exclusive) until which it stands without being reached again.
    until: u64,
    refused: Option<HandshakeFailure>,
}

impl ClientCert {
    /// Counts a new connection with this certificate, unless `limit` are open already (then
    /// `None`: the connection is to be closed). One certificate, registered or not, cannot
    /// take every connection of the listener.
    pub fn open_connection(self: &Arc<Self>, limit: usize) -> Option<OpenConnection> {
        use std::sync::atomic::Ordering;
        self.connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then(|| n + 1)
            })
            .ok()
            .map(|_| OpenConnection(self.clone()))
    }

    /// Whether the listener's TLS `tls` still accepts this certificate at `now`. The verdict
    /// is reached again when `tls` is a snapshot other than the one that reached the last (a
    /// reload of the CA bundle or a CRL), and at the earliest of: a minute after it was
    /// reached ([`TTL`], as for the chain cache), the certificate's notAfter and the CRLs'
    /// earliest nextUpdate. Otherwise the request pays one uncontended lock.
    pub fn standing(&self, tls: &ListenerTls, now: UnixTime) -> Result<(), HandshakeFailure> {
        let secs = now.as_secs();
        let mut verdict = self.lock();
        if verdict.generation == tls.generation() && secs < verdict.until {
            return verdict.refused.map_or(Ok(()), Err);
        }
        let refused = tls
            .verify_client_chain(&self.chain, now)
            .err()
            .map(|e| HandshakeFailure::from_rustls(&e));
        *verdict = self.verdict(tls, secs, refused);
        refused.map_or(Ok(()), Err)
    }

    /// A handshake under `tls` accepted this certificate at `now`: the verdict for that
    /// snapshot (no older snapshot's verdict replaces a newer one's).
    pub fn accepted(&self, tls: &ListenerTls, now: UnixTime) {
        let mut verdict = self.lock();
        if tls.generation() >= verdict.generation {
            *verdict = self.verdict(tls, now.as_secs(), None);
        }
    }

    fn verdict(&self, tls: &ListenerTls, now: u64, refused: Option<HandshakeFailure>) -> Verdict {
        let mut until = now.saturating_add(TTL.as_secs());
        if refused.is_none() {
            until = until.min(self.not_after);
            if let Some(horizon) = tls.crl_horizon() {
                until = until.min(horizon);
            }
        }
        Verdict {
            generation: tls.generation(),
            until,
            refused,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Verdict> {
        // A verdict is written whole; a panic elsewhere while it was locked leaves it usable.
        self.verdict
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The map is swept of dead entries when it reaches this many, or twice what was live at the
/// last sweep, whichever is more.
const MIN_SWEEP: usize = 64;

/// Identities of the client certificates of open connections.
#[derive(Debug, Default)]
pub struct Identities {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    by_digest: HashMap<[u8; 32], Weak<ClientCert>>,
    /// By the SHA-256 of the signed part: one certificate presented as other DER bytes (an
    /// ECDSA signature's other form) is the same object, with the same connection count and
    /// the same fingerprint for the budgets keyed by it.
    by_signed: HashMap<[u8; 32], Weak<ClientCert>>,
    sweep_at: usize,
}

impl Identities {
    /// The certificate of a verified `chain` (leaf first, not empty): the one already shared,
    /// or a new one.
    pub fn get(&self, chain: &[CertificateDer<'static>]) -> Result<Arc<ClientCert>, TlsError> {
        let leaf = chain.first().ok_or_else(|| TlsError::PeerCertificate {
            reason: "no certificate".to_owned(),
        })?;
        let digest = sha256(leaf);
        if let Some(id) = self.lock().by_digest.get(&digest).and_then(Weak::upgrade) {
            return Ok(id);
        }
        // Parsed outside the lock; two handshakes racing on a new certificate both parse it,
        // and the first to insert wins: the other takes the one in the map, so that every
        // connection of a certificate is counted on one object (its connection limit).
        let (identity, not_after, signed) = identity_with_digest(leaf, &digest)?;
        let not_after = u64::try_from(not_after).unwrap_or(0);
        let id = Arc::new(ClientCert {
            identity: Arc::new(identity),
            chain: chain.into(),
            not_after,
            // Until the handshake's acceptance is recorded: judged at the first request.
            verdict: Mutex::new(Verdict {
                generation: 0,
                until: 0,
                refused: None,
            }),
            connections: std::sync::atomic::AtomicUsize::new(0),
        });
        let mut inner = self.lock();
        if let Some(live) = inner.by_digest.get(&digest).and_then(Weak::upgrade) {
            return Ok(live);
        }
        if inner.by_digest.len() >= inner.sweep_at.max(MIN_SWEEP) {
            inner.by_digest.retain(|_, id| id.strong_count() > 0);
            inner.by_signed.retain(|_, id| id.strong_count() > 0);
            inner.sweep_at = 2 * inner.by_digest.len();
        }
        // The same certificate under another encoding: the one already shared.
        if let Some(live) = inner.by_signed.get(&signed).and_then(Weak::upgrade) {
            inner.by_digest.insert(digest, Arc::downgrade(&live));
            return Ok(live);
        }
        inner.by_digest.insert(digest, Arc::downgrade(&id));
        inner.by_signed.insert(signed, Arc::downgrade(&id));
        Ok(id)
    }

    /// Certificates in the map, live or not yet swept.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().by_digest.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The map holds only weak references and is never left half-updated: a panic
        // elsewhere while it was locked leaves it usable.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::peer_identity;
    use crate::tls::pki::{Ca, KeyKind, LeafSpec};

    fn ca() -> Ca {
        Ca::new("Identities CA", KeyKind::EcdsaP256).expect("ca")
    }

    #[test]
    fn connections_with_one_certificate_share_one_identity_equal_to_a_fresh_parse() {
        let ca = ca();
        let a = ca.issue(&LeafSpec::client(&["a.example"])).expect("leaf");
        let b = ca.issue(&LeafSpec::client(&["b.example"])).expect("leaf");
        let ids = Identities::default();
        let first = ids
            .get(std::slice::from_ref(&a.cert_der))
            .expect("identity");
        let again = ids
            .get(std::slice::from_ref(&a.cert_der))
            .expect("identity");
        let other = ids
            .get(std::slice::from_ref(&b.cert_der))
            .expect("identity");
        assert!(Arc::ptr_eq(&first, &again), "one identity per certificate");
        assert!(!Arc::ptr_eq(&first, &other));
        assert_eq!(*first.identity, peer_identity(&a.cert_der).expect("parse"));
        assert_eq!(*other.identity, peer_identity(&b.cert_der).expect("parse"));
        assert_eq!(other.identity.names, ["b.example"]);
    }

    /// One certificate presented as other DER bytes (its signature re-encoded: an ECDSA
    /// signature (r, s) verifies as (r, n−s) too) is the same identity, with one connection
    /// count: keyed by its bytes alone, it got a second count and a second fingerprint for the
    /// budgets. Another certificate is still another identity.
    #[test]
    fn one_certificate_under_another_encoding_is_one_identity() {
        let ca = ca();
        let leaf = ca
            .issue(&LeafSpec::client(&["same.example"]))
            .expect("leaf");
        // The last byte of the DER is the signature's: the signed part is unchanged.
        let mut bytes = leaf.cert_der.to_vec();
        *bytes.last_mut().expect("not empty") ^= 1;
        let other_bytes = CertificateDer::from(bytes);
        assert_ne!(sha256(&other_bytes), sha256(&leaf.cert_der));
        let ids = Identities::default();
        let first = ids
            .get(std::slice::from_ref(&leaf.cert_der))
            .expect("identity");
        let again = ids
            .get(std::slice::from_ref(&other_bytes))
            .expect("identity");
        assert!(Arc::ptr_eq(&first, &again), "one identity per certificate");
        let open = first.open_connection(1);
        assert!(open.is_some());
        assert!(again.open_connection(1).is_none(), "one count");
        let another = ca
            .issue(&LeafSpec::client(&["same.example"]))
            .expect("leaf");
        let third = ids
            .get(std::slice::from_ref(&another.cert_der))
            .expect("identity");
        assert!(
            !Arc::ptr_eq(&first, &third),
            "a re-issued certificate is its own"
        );
    }

    /// Handshakes racing on a new certificate all get the one object the map keeps, so its
    /// connection count is one count: before, each racer parsed and inserted its own, and the
    /// connections counted on the ones overwritten counted against no limit.
    #[test]
    fn racing_handshakes_on_a_new_certificate_share_one_identity_and_one_count() {
        let ca = ca();
        let leaf = ca
            .issue(&LeafSpec::client(&["race.example"]))
            .expect("leaf");
        let ids = Arc::new(Identities::default());
        let start = Arc::new(std::sync::Barrier::new(8));
        let got: Vec<Arc<ClientCert>> = (0..8)
            .map(|_| {
                let (ids, start, der) = (ids.clone(), start.clone(), leaf.cert_der.clone());
                std::thread::spawn(move || {
                    start.wait();
                    ids.get(std::slice::from_ref(&der)).expect("identity")
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().expect("thread"))
            .collect();
        assert!(got.iter().all(|id| Arc::ptr_eq(id, &got[0])));
        let open: Vec<_> = got.iter().filter_map(|id| id.open_connection(3)).collect();
        assert_eq!(open.len(), 3, "the limit counts every racer's connection");
        drop(open);
        assert!(
            got[5].open_connection(1).is_some(),
            "given back when dropped"
        );
    }

    #[test]
    fn an_identity_no_connection_holds_is_parsed_again_and_the_map_stays_bounded() {
        let ca = ca();
        let ids = Identities::default();
        let leaves: Vec<_> = (0..200)
            .map(|i| {
                ca.issue(&LeafSpec::client(&[&format!("c{i}.example")]))
                    .expect("leaf")
            })
            .collect();
        let held = ids
            .get(std::slice::from_ref(&leaves[0].cert_der))
            .expect("identity");
        for leaf in &leaves {
            drop(
                ids.get(std::slice::from_ref(&leaf.cert_der))
                    .expect("identity"),
            );
        }
        assert!(
            ids.len() <= MIN_SWEEP + 1,
            "dead entries swept: {} left",
            ids.len()
        );
        let again = ids
            .get(std::slice::from_ref(&leaves[0].cert_der))
            .expect("identity");
        assert!(
            Arc::ptr_eq(&held, &again),
            "a held identity survives sweeps"
        );
        assert_eq!(again.identity.names, ["c0.example"]);
    }

    #[test]
    fn a_certificate_that_does_not_parse_is_an_error_and_is_not_remembered() {
        let ids = Identities::default();
        let junk = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x01]);
        assert!(matches!(
            ids.get(&[junk]),
            Err(TlsError::PeerCertificate { .. })
        ));
        assert!(matches!(
            ids.get(&[]),
            Err(TlsError::PeerCertificate { .. })
        ));
        assert_eq!(ids.len(), 0);
    }
}
