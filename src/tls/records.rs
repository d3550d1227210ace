//! The listener's TLS record layer once the handshake is done.
//!
//! rustls runs the handshake (certificates, key exchange, every check); when it is complete the
//! connection's traffic keys are taken from it ([`UnbufferedServerConnection::
//! dangerous_into_kernel_connection`], whose `KernelConnection` is dropped) and its records are
//! sealed and opened here, with aws-lc's AEADs. The point is memory: rustls' connection state
//! holds about 3.5 KB for as long as the connection is open (its own state, two expanded AEAD
//! contexts, its handshake deframer's spans, the client's certificate chain) and offers no way
//! to release any of it. Here a connection holds its keys, IVs, sequence numbers and (TLS 1.3)
//! its two traffic secrets (the whole layer is 312 bytes); the AEAD contexts are expanded when
//! a record is sealed or opened and dropped when the connection goes idle
//! ([`Records::release`]).
//!
//! TLS 1.3 (RFC 8446 §5): records of type application_data only, the inner content type after
//! the plaintext and any zero padding, nonce = IV XOR sequence number, the record header as
//! additional data; KeyUpdate from the client is followed (§4.6.3) and answered when it asks,
//! and our own keys are updated before the AES-GCM confidentiality limit (§5.5). The traffic
//! secrets for key updates are rustls' `CLIENT_TRAFFIC_SECRET_0` and `SERVER_TRAFFIC_SECRET_0`,
//! caught through its key-log hook while the handshake runs ([`capture`]); the keys derived from
//! them here are compared with the keys rustls hands over, so a derivation that disagreed with
//! rustls' would refuse the connection, never encrypt with a wrong key.
//!
//! TLS 1.2 (RFC 5246 §6.2.3.3, RFC 5288, RFC 7905): AES-GCM with the salt from the key block
//! and an explicit 8-byte nonce (the key block's nonce bytes XOR the sequence number, as rustls
//! sends), ChaCha20-Poly1305 with IV XOR sequence number; sequence number, type, version and
//! length as additional data. Renegotiation is refused with a `no_renegotiation` warning, as
//! rustls does, once; a second attempt ends the connection.
//!
//! Records that carry no data are bounded as rustls bounds them, so a client cannot make the
//! gateway queue answers or spin without end: at most 32 KeyUpdates, 4 warning alerts and 32
//! empty records between two records of data, and one renegotiation attempt.
//!
//! Alerts: close_notify ends the peer's data; a fatal alert (and, in TLS 1.3, any alert but
//! close_notify and user_canceled) is an error carrying `rustls::Error::AlertReceived`. A record
//! that does not decrypt is `rustls::Error::DecryptError` and answered with `bad_record_mac`;
//! the errors carry rustls' types, so they read the same as before the handover.

use std::io::IoSlice;

use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::hkdf;
use rustls::{AlertDescription, CipherSuite, ConnectionTrafficSecrets, Error, ExtractedSecrets};
use zeroize::Zeroize;

/// A record's header.
pub const HEADER: usize = 5;
/// The largest plaintext of a record.
pub const MAX_FRAGMENT: usize = 1 << 14;
/// The AEAD tag every suite here appends.
const TAG: usize = 16;
/// TLS 1.2 AES-GCM's explicit nonce, sent before the ciphertext.
const EXPLICIT_NONCE: usize = 8;
/// The largest ciphertext a TLS 1.3 record may carry (RFC 8446 §5.2).
const MAX_CIPHERTEXT_13: usize = MAX_FRAGMENT + 256;
/// The largest ciphertext a TLS 1.2 record may carry (RFC 5246 §6.2.3).
const MAX_CIPHERTEXT_12: usize = MAX_FRAGMENT + 2048;
/// Records sealed under one AES-GCM key before it is replaced: RFC 8446 §5.5 puts the limit at
/// 2^24.5 full-size records; TLS 1.3 updates the key here, TLS 1.2 (which cannot) ends the
/// connection.
const AES_GCM_RECORDS: u64 = 1 << 24;

const APPLICATION_DATA: u8 = 23;
const HANDSHAKE: u8 = 22;
const ALERT: u8 = 21;
const KEY_UPDATE: u8 = 24;

/// KeyUpdates accepted between two records of data (rustls' limit).
const MAX_KEY_UPDATES: u8 = 32;
/// Warning alerts accepted between two records of data (rustls' limit).
const MAX_WARNINGS: u8 = 4;
/// Empty application-data records accepted in a row.
const MAX_EMPTY: u8 = 32;

/// The protocol version the handshake settled on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Tls12,
    Tls13,
}

/// What the records received so far amounted to.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Opened {
    /// Bytes of the receive window used up (whole records).
    pub consumed: usize,
    /// The peer's close_notify arrived: nothing after it is read.
    pub closed: bool,
}

/// The record layer of one connection (module documentation).
pub struct Records {
    version: Version,
    aead: &'static aead::Algorithm,
    /// TLS 1.3: the hash of the suite's key schedule, for key updates.
    hkdf: Option<hkdf::Algorithm>,
    rx: Direction,
    tx: Direction,
    /// TLS 1.3: the client asked for our key update; it goes before our next record.
    answer_key_update: bool,
    /// TLS 1.2: a renegotiation attempt to refuse with a warning.
    refuse_renegotiation: bool,
    /// TLS 1.2: renegotiation was refused once already.
    renegotiation_refused: bool,
    /// Records without data since the last record of data: key updates, warnings, empty ones.
    key_updates: u8,
    warnings: u8,
    empty: u8,
}

/// One direction's keys and sequence number.
struct Direction {
    key: [u8; 32],
    key_len: usize,
    iv: [u8; 12],
    /// TLS 1.3 traffic secret (up to SHA-384's 48 bytes); empty in TLS 1.2.
    secret: [u8; 48],
    secret_len: usize,
    seq: u64,
    /// The expanded AEAD context, built on first use and dropped when the connection idles.
    ctx: Option<LessSafeKey>,
}

impl Drop for Direction {
    fn drop(&mut self) {
        self.key.zeroize();
        self.iv.zeroize();
        self.secret.zeroize();
    }
}

impl Direction {
    fn new(
        seq: u64,
        secrets: &ConnectionTrafficSecrets,
        traffic_secret: Option<&[u8]>,
    ) -> Result<Direction, Error> {
        let (key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv }
            | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
            | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (key.as_ref(), iv.as_ref()),
            _ => {
                return Err(Error::General(
                    "a cipher suite this gateway does not offer".into(),
                ))
            }
        };
        let mut d = Direction {
            key: [0; 32],
            key_len: key.len(),
            iv: [0; 12],
            secret: [0; 48],
            secret_len: 0,
            seq,
            ctx: None,
        };
        if key.len() > d.key.len() || iv.len() != d.iv.len() {
            return Err(Error::General("unexpected AEAD key or IV length".into()));
        }
        d.key[..key.len()].copy_from_slice(key);
        d.iv.copy_from_slice(iv);
        if let Some(secret) = traffic_secret {
            if secret.len() > d.secret.len() {
                return Err(Error::General("unexpected traffic secret length".into()));
            }
            d.secret[..secret.len()].copy_from_slice(secret);
            d.secret_len = secret.len();
        }
        Ok(d)
    }

    /// A copy of the keys, secret and sequence number, without the AEAD context. (Before
    /// [`Direction::catch_up`], the secret may be older than the keys.)
    fn copy(&self) -> Direction {
        Direction {
            key: self.key,
            key_len: self.key_len,
            iv: self.iv,
            secret: self.secret,
            secret_len: self.secret_len,
            seq: self.seq,
            ctx: None,
        }
    }

    /// Steps the traffic secret forward (at most `max` times) until the key and IV derived
    /// from it are the ones held; returns how many steps that took. An error if none matches.
    fn catch_up(&mut self, hash: hkdf::Algorithm, max: u8) -> Result<u8, Error> {
        let mut steps = 0;
        loop {
            let (mut key, mut iv) = self.derived(hash)?;
            let same = key[..self.key_len] == self.key[..self.key_len] && iv == self.iv;
            key.zeroize();
            iv.zeroize();
            if same {
                return Ok(steps);
            }
            if steps == max {
                return Err(Error::General(
                    "the caught traffic secret does not give rustls' keys".into(),
                ));
            }
            self.step_secret(hash)?;
            steps += 1;
        }
    }

    /// The key (its first `key_len` bytes) and IV the traffic secret gives (RFC 8446 §7.3).
    fn derived(&self, hash: hkdf::Algorithm) -> Result<([u8; 32], [u8; 12]), Error> {
        let mut key = [0u8; 32];
        let mut iv = [0u8; 12];
        let secret = &self.secret[..self.secret_len];
        expand_label(hash, secret, b"key", &mut key[..self.key_len])?;
        expand_label(hash, secret, b"iv", &mut iv)?;
        Ok((key, iv))
    }

    /// Sets the key and IV to those the traffic secret gives, at sequence number 0.
    fn rederive(&mut self, hash: hkdf::Algorithm) -> Result<(), Error> {
        let (mut key, mut iv) = self.derived(hash)?;
        self.key = key;
        self.iv = iv;
        key.zeroize();
        iv.zeroize();
        self.seq = 0;
        self.ctx = None;
        Ok(())
    }

    /// The next generation's traffic secret (RFC 8446 §7.2), in place of this one.
    fn step_secret(&mut self, hash: hkdf::Algorithm) -> Result<(), Error> {
        let len = self.secret_len;
        let mut next = [0u8; 48];
        expand_label(hash, &self.secret[..len], b"traffic upd", &mut next[..len])?;
        self.secret[..len].copy_from_slice(&next[..len]);
        next.zeroize();
        Ok(())
    }

    fn ctx(&mut self, aead: &'static aead::Algorithm) -> Result<&LessSafeKey, Error> {
        if self.ctx.is_none() {
            let key = UnboundKey::new(aead, &self.key[..self.key_len])
                .map_err(|_| Error::General("the AEAD key was refused".into()))?;
            self.ctx = Some(LessSafeKey::new(key));
        }
        Ok(self.ctx.as_ref().expect("set just above"))
    }

    /// The per-record nonce: the IV XOR the sequence number (big-endian, right-aligned).
    fn nonce(&self) -> [u8; 12] {
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        nonce
    }

    fn next_seq(&mut self) -> Result<(), Error> {
        self.seq = self.seq.checked_add(1).ok_or(Error::EncryptError)?;
        Ok(())
    }

    /// TLS 1.3 key update (RFC 8446 §7.2): the next traffic secret, and its key and IV.
    fn update(&mut self, hash: hkdf::Algorithm) -> Result<(), Error> {
        self.step_secret(hash)?;
        self.rederive(hash)
    }
}

/// HKDF-Expand-Label (RFC 8446 §7.1) with an empty context.
fn expand_label(
    hash: hkdf::Algorithm,
    secret: &[u8],
    label: &[u8],
    out: &mut [u8],
) -> Result<(), Error> {
    struct Len(usize);
    impl hkdf::KeyType for Len {
        fn len(&self) -> usize {
            self.0
        }
    }
    let failed = || Error::General("HKDF-Expand-Label failed".into());
    let length = u16::try_from(out.len())
        .map_err(|_| failed())?
        .to_be_bytes();
    let label_len = [u8::try_from(6 + label.len()).map_err(|_| failed())?];
    let info: [&[u8]; 5] = [&length, &label_len, b"tls13 ", label, &[0]];
    hkdf::Prk::new_less_safe(hash, secret)
        .expand(&info, Len(out.len()))
        .and_then(|okm| okm.fill(out))
        .map_err(|_| failed())
}

/// A fatal condition: the error to return and the alert that tells the peer.
#[derive(Debug)]
pub struct Fatal {
    pub error: Error,
    /// None when the peer's own alert ended the connection (nothing to answer).
    pub alert: Option<AlertDescription>,
}

fn fatal(alert: AlertDescription, error: Error) -> Fatal {
    Fatal {
        error,
        alert: Some(alert),
    }
}

fn unexpected(what: &str) -> Fatal {
    fatal(
        AlertDescription::UnexpectedMessage,
        Error::General(format!(
            "unexpected TLS message after the handshake: {what}"
        )),
    )
}

fn overflow() -> Fatal {
    fatal(
        AlertDescription::RecordOverflow,
        Error::General("a TLS record's plaintext over 16 KiB".into()),
    )
}

fn decode_error(what: &str) -> Fatal {
    fatal(
        AlertDescription::DecodeError,
        Error::General(format!("malformed TLS message after the handshake: {what}")),
    )
}

impl From<Error> for Fatal {
    fn from(error: Error) -> Self {
        fatal(AlertDescription::InternalError, error)
    }
}

impl Records {
    /// The record layer for a connection rustls has finished the handshake of. `client` and
    /// `server` are the TLS 1.3 application traffic secrets caught from rustls (unused in
    /// TLS 1.2). Also returns the records to send before any other (a KeyUpdate answer rustls
    /// had queued), usually none; `tickets` says whether the config sends TLS 1.3 session
    /// tickets (the listener's does not).
    pub fn new(
        version: Version,
        suite: CipherSuite,
        secrets: ExtractedSecrets,
        client: Option<&[u8]>,
        server: Option<&[u8]>,
        tickets: bool,
    ) -> Result<(Records, Vec<u8>), Error> {
        let aead = match &secrets.tx.1 {
            ConnectionTrafficSecrets::Aes128Gcm { .. } => &aead::AES_128_GCM,
            ConnectionTrafficSecrets::Aes256Gcm { .. } => &aead::AES_256_GCM,
            ConnectionTrafficSecrets::Chacha20Poly1305 { .. } => &aead::CHACHA20_POLY1305,
            _ => {
                return Err(Error::General(
                    "a cipher suite this gateway does not offer".into(),
                ))
            }
        };
        let hkdf = match (version, suite) {
            (Version::Tls12, _) => None,
            (Version::Tls13, CipherSuite::TLS13_AES_256_GCM_SHA384) => Some(hkdf::HKDF_SHA384),
            (
                Version::Tls13,
                CipherSuite::TLS13_AES_128_GCM_SHA256 | CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
            ) => Some(hkdf::HKDF_SHA256),
            (Version::Tls13, other) => {
                return Err(Error::General(format!(
                    "TLS 1.3 suite {other:?} is not one this gateway offers"
                )))
            }
        };
        let (rx_secret, tx_secret) = match hkdf {
            None => (None, None),
            Some(_) => match (client, server) {
                (Some(c), Some(s)) => (Some(c), Some(s)),
                _ => {
                    return Err(Error::General(
                        "the TLS 1.3 traffic secrets were not caught from the handshake".into(),
                    ))
                }
            },
        };
        let rx = Direction::new(secrets.rx.0, &secrets.rx.1, rx_secret)?;
        let tx = Direction::new(secrets.tx.0, &secrets.tx.1, tx_secret)?;
        let mut records = Records {
            version,
            aead,
            hkdf,
            rx,
            tx,
            answer_key_update: false,
            refuse_renegotiation: false,
            renegotiation_refused: false,
            key_updates: 0,
            warnings: 0,
            empty: 0,
        };
        let mut lost = Vec::new();
        if let Some(hash) = hkdf {
            // The keys our derivation gives must be the keys rustls gave. A client's KeyUpdates
            // in the flight of its Finished were followed by rustls already: the caught
            // secret is stepped forward to the generation rustls reached.
            records.rx.catch_up(hash, MAX_KEY_UPDATES)?;
            let mut first = records.tx.copy();
            if records.tx.catch_up(hash, 1)? == 1 {
                if tickets {
                    // Tickets went out under the first generation too: where rustls' answer
                    // stood among them is not known.
                    return Err(Error::General(
                        "a KeyUpdate answer queued by rustls after session tickets".into(),
                    ));
                }
                // rustls answered one of them: it sealed its KeyUpdate under our first
                // generation (at sequence 0, as nothing else went out under it) and queued it
                // for its next write, which will never come. It is sealed again here.
                first.rederive(hash)?;
                let current = std::mem::replace(&mut records.tx, first);
                let sealed = records.seal(HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 0], &mut lost);
                records.tx = current;
                sealed?;
            }
        }
        Ok((records, lost))
    }

    /// Drops the expanded AEAD contexts (the connection is going idle); the keys stay.
    pub fn release(&mut self) {
        self.rx.ctx = None;
        self.tx.ctx = None;
    }

    /// Whether both AEAD contexts are dropped (tests).
    #[cfg(test)]
    pub fn released(&self) -> bool {
        self.rx.ctx.is_none() && self.tx.ctx.is_none()
    }

    /// Opens the whole records at the front of `window`, handing application data to `deliver`.
    /// Stops at a partial record, or after the peer's close_notify.
    pub fn open(
        &mut self,
        window: &mut [u8],
        mut deliver: impl FnMut(&[u8]),
    ) -> Result<Opened, Fatal> {
        let mut opened = Opened::default();
        loop {
            let rest = &mut window[opened.consumed..];
            if rest.len() < HEADER {
                return Ok(opened);
            }
            if rest[1] != 3 {
                return Err(decode_error("a record that is not TLS"));
            }
            let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
            let max = match self.version {
                Version::Tls12 => MAX_CIPHERTEXT_12,
                Version::Tls13 => MAX_CIPHERTEXT_13,
            };
            if len > max {
                return Err(fatal(
                    AlertDescription::RecordOverflow,
                    Error::General(format!("a TLS record of {len} bytes, over the limit")),
                ));
            }
            if rest.len() < HEADER + len {
                return Ok(opened);
            }
            let (header, body) = rest[..HEADER + len].split_at_mut(HEADER);
            let header: [u8; HEADER] = header.try_into().expect("split at HEADER");
            let (kind, content) = self.open_record(header, body)?;
            opened.consumed += HEADER + len;
            match kind {
                APPLICATION_DATA if content.is_empty() => {
                    self.empty += 1;
                    if self.empty > MAX_EMPTY {
                        return Err(unexpected("too many empty records"));
                    }
                }
                APPLICATION_DATA => {
                    (self.key_updates, self.warnings, self.empty) = (0, 0, 0);
                    deliver(content);
                }
                ALERT => {
                    if self.alert(content)? {
                        opened.closed = true;
                        return Ok(opened);
                    }
                }
                HANDSHAKE => self.handshake(content)?,
                _ => return Err(unexpected("a record of an unknown content type")),
            }
        }
    }

    /// Decrypts one record in place: its content type and plaintext.
    fn open_record<'a>(
        &mut self,
        header: [u8; HEADER],
        body: &'a mut [u8],
    ) -> Result<(u8, &'a [u8]), Fatal> {
        let bad_mac = || fatal(AlertDescription::BadRecordMac, Error::DecryptError);
        let aead = self.aead;
        match self.version {
            Version::Tls13 => {
                if header[0] != APPLICATION_DATA {
                    return Err(unexpected("an unprotected record"));
                }
                let nonce = Nonce::assume_unique_for_key(self.rx.nonce());
                let plain = self
                    .rx
                    .ctx(aead)?
                    .open_in_place(nonce, Aad::from(header), body)
                    .map_err(|_| bad_mac())?;
                self.rx.next_seq()?;
                // RFC 8446 §5.4: the inner plaintext, padding included, is at most 2^14 + 1
                // (so the content before its type is at most 2^14).
                if plain.len() > MAX_FRAGMENT + 1 {
                    return Err(overflow());
                }
                // The content type is the last non-zero byte; zeros after it are padding.
                let Some(at) = plain.iter().rposition(|&b| b != 0) else {
                    return Err(unexpected("a record with no content type"));
                };
                Ok((plain[at], &plain[..at]))
            }
            Version::Tls12 => {
                let kind = header[0];
                if !matches!(kind, APPLICATION_DATA | ALERT | HANDSHAKE) {
                    return Err(unexpected("a record of an unexpected content type"));
                }
                let gcm = self.gcm();
                let overhead = if gcm { EXPLICIT_NONCE + TAG } else { TAG };
                if body.len() < overhead {
                    return Err(bad_mac());
                }
                let plain_len = body.len() - overhead;
                if plain_len > MAX_FRAGMENT {
                    return Err(overflow());
                }
                let (nonce, sealed) = if gcm {
                    let (explicit, sealed) = body.split_at_mut(EXPLICIT_NONCE);
                    let mut nonce = [0u8; 12];
                    nonce[..4].copy_from_slice(&self.rx.iv[..4]);
                    nonce[4..].copy_from_slice(explicit);
                    (nonce, sealed)
                } else {
                    (self.rx.nonce(), body)
                };
                let aad = tls12_aad(self.rx.seq, kind, [header[1], header[2]], plain_len);
                let plain = self
                    .rx
                    .ctx(aead)?
                    .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad), sealed)
                    .map_err(|_| bad_mac())?;
                self.rx.next_seq()?;
                Ok((kind, plain))
            }
        }
    }

    /// An alert from the peer: true for close_notify, an error for a fatal one.
    fn alert(&mut self, content: &[u8]) -> Result<bool, Fatal> {
        let [level, description] = content else {
            return Err(decode_error("an alert that is not two bytes"));
        };
        let description = AlertDescription::from(*description);
        if !matches!(level, 1 | 2) {
            return Err(fatal(
                AlertDescription::IllegalParameter,
                Error::General(format!("an alert of unknown level {level}")),
            ));
        }
        let warning = *level == 1;
        match description {
            AlertDescription::CloseNotify => Ok(true),
            // TLS 1.3 treats every alert but these two as fatal, whatever its level (§6).
            AlertDescription::UserCanceled if warning || self.version == Version::Tls13 => {
                self.warning()
            }
            _ if warning && self.version == Version::Tls12 => {
                tracing::debug!(alert = ?description, "TLS warning alert ignored");
                self.warning()
            }
            _ => Err(Fatal {
                error: Error::AlertReceived(description),
                alert: None,
            }),
        }
    }

    fn warning(&mut self) -> Result<bool, Fatal> {
        self.warnings += 1;
        if self.warnings > MAX_WARNINGS {
            return Err(unexpected("too many warning alerts"));
        }
        Ok(false)
    }

    /// Handshake messages after the handshake.
    fn handshake(&mut self, mut content: &[u8]) -> Result<(), Fatal> {
        if content.is_empty() {
            return Err(unexpected("an empty handshake record"));
        }
        let Some(hash) = self.hkdf else {
            // TLS 1.2: a client asking to renegotiate, refused with a warning once.
            if self.renegotiation_refused {
                return Err(fatal(
                    AlertDescription::HandshakeFailure,
                    Error::General("a second TLS 1.2 renegotiation attempt".into()),
                ));
            }
            self.renegotiation_refused = true;
            self.refuse_renegotiation = true;
            return Ok(());
        };
        while !content.is_empty() {
            if content.len() < 4 {
                return Err(unexpected("a handshake message split across records"));
            }
            let len = usize::from(content[1]) << 16
                | usize::from(content[2]) << 8
                | usize::from(content[3]);
            if content.len() < 4 + len {
                return Err(unexpected("a handshake message split across records"));
            }
            let (message, rest) = content.split_at(4 + len);
            if message[0] != KEY_UPDATE {
                return Err(unexpected("a handshake message other than KeyUpdate"));
            }
            self.key_updates += 1;
            if self.key_updates > MAX_KEY_UPDATES {
                return Err(unexpected("too many KeyUpdates between records of data"));
            }
            // RFC 8446 §5.1: a key change ends its record.
            if !rest.is_empty() {
                return Err(unexpected("data after a KeyUpdate in its record"));
            }
            match &message[4..] {
                [0] => {}
                [1] => self.answer_key_update = true,
                [_] => {
                    return Err(fatal(
                        AlertDescription::IllegalParameter,
                        Error::General("a KeyUpdate request that is neither 0 nor 1".into()),
                    ))
                }
                _ => return Err(decode_error("a KeyUpdate that is not one byte")),
            }
            self.rx.update(hash)?;
            content = rest;
        }
        Ok(())
    }

    /// Whether [`Records::seal_pending`] has anything to seal.
    pub fn pending(&self) -> bool {
        self.refuse_renegotiation || self.answer_key_update || self.at_record_limit()
    }

    fn at_record_limit(&self) -> bool {
        self.gcm() && self.tx.seq >= AES_GCM_RECORDS
    }

    /// AES-GCM rather than ChaCha20-Poly1305: TLS 1.2's explicit nonce, the record limit.
    /// (By value: aws-lc-rs declares its algorithms as constants, so their addresses differ.)
    fn gcm(&self) -> bool {
        *self.aead != aead::CHACHA20_POLY1305
    }

    /// Seals what the peer must hear before our next record: the answer to a KeyUpdate that
    /// asked for one (then our keys change), the refusal of a renegotiation, or our own key
    /// update before the AES-GCM record limit.
    pub fn seal_pending(&mut self, out: &mut Vec<u8>) -> Result<(), Error> {
        if self.refuse_renegotiation {
            self.refuse_renegotiation = false;
            self.seal(ALERT, &[1, AlertDescription::NoRenegotiation.into()], out)?;
        }
        if self.answer_key_update || self.at_record_limit() {
            let Some(hash) = self.hkdf else {
                return Err(Error::EncryptError);
            };
            self.answer_key_update = false;
            self.seal(HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 0], out)?;
            self.tx.update(hash)?;
        }
        Ok(())
    }

    /// Seals application data gathered from `parts`, up to `limit` bytes of it, as records
    /// filled up to 16 KiB; returns how many bytes were taken.
    pub fn seal_gathered(
        &mut self,
        parts: &[IoSlice<'_>],
        limit: usize,
        out: &mut Vec<u8>,
    ) -> Result<usize, Error> {
        let total = parts.iter().map(|p| p.len()).sum::<usize>().min(limit);
        let mut parts = parts.iter().map(|p| &p[..]).filter(|p| !p.is_empty());
        let mut current: &[u8] = &[];
        let mut left = total;
        while left > 0 {
            let n = left.min(MAX_FRAGMENT);
            self.seal_with(APPLICATION_DATA, n, out, |out| {
                let mut room = n;
                while room > 0 {
                    if current.is_empty() {
                        match parts.next() {
                            Some(part) => current = part,
                            None => break,
                        }
                    }
                    let k = room.min(current.len());
                    out.extend_from_slice(&current[..k]);
                    current = &current[k..];
                    room -= k;
                }
            })?;
            left -= n;
        }
        Ok(total)
    }

    #[cfg(test)]
    fn seal_data(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), Error> {
        self.seal_gathered(&[IoSlice::new(data)], usize::MAX, out)
            .map(|_| ())
    }

    /// Seals a close_notify alert.
    pub fn seal_close_notify(&mut self, out: &mut Vec<u8>) -> Result<(), Error> {
        self.seal(ALERT, &[1, AlertDescription::CloseNotify.into()], out)
    }

    /// Seals a fatal alert.
    pub fn seal_fatal(&mut self, alert: AlertDescription, out: &mut Vec<u8>) -> Result<(), Error> {
        self.seal(ALERT, &[2, alert.into()], out)
    }

    fn seal(&mut self, kind: u8, content: &[u8], out: &mut Vec<u8>) -> Result<(), Error> {
        self.seal_with(kind, content.len(), out, |out| {
            out.extend_from_slice(content)
        })
    }

    /// Appends one record of content type `kind` whose `len` plaintext bytes `fill` appends
    /// (the plaintext is written once, straight into place, and sealed there).
    fn seal_with(
        &mut self,
        kind: u8,
        len: usize,
        out: &mut Vec<u8>,
        fill: impl FnOnce(&mut Vec<u8>),
    ) -> Result<(), Error> {
        debug_assert!(len <= MAX_FRAGMENT);
        if self.version == Version::Tls12 && self.at_record_limit() {
            // TLS 1.2 has no key update: the connection ends here.
            return Err(Error::EncryptError);
        }
        let (version, gcm, aead) = (self.version, self.gcm(), self.aead);
        let seq = self.tx.seq;
        let nonce = self.tx.nonce();
        let ctx = self.tx.ctx(aead)?;
        let start = out.len();
        out.reserve(HEADER + EXPLICIT_NONCE + len + 1 + TAG);
        // Where the plaintext starts, its length (TLS 1.3's with the inner type), and the AAD.
        let (at, content, aad) = match version {
            Version::Tls13 => {
                let header = record_header(APPLICATION_DATA, len + 1 + TAG);
                out.extend_from_slice(&header);
                let at = out.len();
                fill(out);
                out.push(kind);
                (at, len + 1, Aad::from(AdditionalData::Header(header)))
            }
            Version::Tls12 => {
                let explicit = if gcm { EXPLICIT_NONCE } else { 0 };
                out.extend_from_slice(&record_header(kind, explicit + len + TAG));
                if gcm {
                    out.extend_from_slice(&nonce[4..]);
                }
                let at = out.len();
                fill(out);
                let aad = tls12_aad(seq, kind, [3, 3], len);
                (at, len, Aad::from(AdditionalData::Tls12(aad)))
            }
        };
        if out.len() != at + content {
            out.truncate(start);
            return Err(Error::General("a record's plaintext was short".into()));
        }
        let tag = ctx
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), aad, &mut out[at..])
            .map_err(|_| Error::EncryptError);
        match tag {
            Ok(tag) => out.extend_from_slice(tag.as_ref()),
            Err(e) => {
                out.truncate(start);
                return Err(e);
            }
        }
        self.tx.next_seq()
    }
}

/// The additional data of a record: TLS 1.3's record header, or TLS 1.2's sequence number,
/// type, version and length.
enum AdditionalData {
    Header([u8; HEADER]),
    Tls12([u8; 13]),
}

impl AsRef<[u8]> for AdditionalData {
    fn as_ref(&self) -> &[u8] {
        match self {
            AdditionalData::Header(h) => h,
            AdditionalData::Tls12(a) => a,
        }
    }
}

fn record_header(kind: u8, len: usize) -> [u8; HEADER] {
    let [hi, lo] = u16::try_from(len).unwrap_or(u16::MAX).to_be_bytes();
    [kind, 3, 3, hi, lo]
}

/// TLS 1.2's additional data: sequence number, type, version, plaintext length.
fn tls12_aad(seq: u64, kind: u8, version: [u8; 2], len: usize) -> [u8; 13] {
    let mut aad = [0u8; 13];
    aad[..8].copy_from_slice(&seq.to_be_bytes());
    aad[8] = kind;
    aad[9..11].copy_from_slice(&version);
    aad[11..].copy_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_be_bytes());
    aad
}

/// Catches rustls' TLS 1.3 application traffic secrets while a handshake is processed.
///
/// rustls reports them to its config's key log ([`rustls::KeyLog`]) from inside
/// `process_tls_records`, on the calling thread. The stream arms this thread's slot around each
/// such call of a handshake and takes what was caught right after, before it could yield to
/// another connection; unarmed (any other connection using the config, e.g. through
/// tokio-rustls), the hook keeps nothing. The secrets never leave the process and are zeroed
/// when dropped.
pub mod capture {
    use std::cell::RefCell;

    use zeroize::Zeroize;

    const CLIENT: &str = "CLIENT_TRAFFIC_SECRET_0";
    const SERVER: &str = "SERVER_TRAFFIC_SECRET_0";

    /// The two secrets, as far as caught.
    #[derive(Default)]
    pub struct Caught {
        pub client: Option<Vec<u8>>,
        pub server: Option<Vec<u8>>,
    }

    impl Drop for Caught {
        fn drop(&mut self) {
            for s in [&mut self.client, &mut self.server].into_iter().flatten() {
                s.zeroize();
            }
        }
    }

    impl Caught {
        /// Takes what `other` caught.
        pub fn merge(&mut self, mut other: Caught) {
            if other.client.is_some() {
                replace(&mut self.client, other.client.take());
            }
            if other.server.is_some() {
                replace(&mut self.server, other.server.take());
            }
        }
    }

    /// Puts `new` in `slot`, zeroing what it held.
    fn replace(slot: &mut Option<Vec<u8>>, new: Option<Vec<u8>>) {
        if let Some(old) = slot.as_mut() {
            old.zeroize();
        }
        *slot = new;
    }

    thread_local! {
        static SLOT: RefCell<Option<Caught>> = const { RefCell::new(None) };
    }

    /// This thread's slot, armed (empty) until the guard is dropped or [`Armed::disarm`]ed:
    /// a panic in between cannot leave it armed.
    pub struct Armed(());

    /// Arms this thread's slot.
    pub fn arm() -> Armed {
        SLOT.with(|s| *s.borrow_mut() = Some(Caught::default()));
        Armed(())
    }

    impl Armed {
        /// Disarms the slot and returns what it caught.
        pub fn disarm(self) -> Option<Caught> {
            SLOT.with(|s| s.borrow_mut().take())
        }
    }

    impl Drop for Armed {
        fn drop(&mut self) {
            let _ = SLOT.try_with(|s| s.borrow_mut().take());
        }
    }

    /// The key-log hook to set on the listener's config.
    #[derive(Debug)]
    pub struct TrafficSecrets;

    impl rustls::KeyLog for TrafficSecrets {
        fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
            SLOT.with(|s| {
                if let Some(caught) = s.borrow_mut().as_mut() {
                    match label {
                        CLIENT => replace(&mut caught.client, Some(secret.to_vec())),
                        SERVER => replace(&mut caught.server, Some(secret.to_vec())),
                        _ => {}
                    }
                }
            });
        }

        fn will_log(&self, label: &str) -> bool {
            label == CLIENT || label == SERVER
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record layer and its mirror (the client's view: directions swapped), with fixed keys.
    /// (`gcm` is what the layer must make of `aead`, checked here.)
    fn pair(version: Version, (aead, gcm): Aead) -> (Records, Records) {
        let key_len = aead.key_len();
        let dir = |fill: u8, secret: bool| Direction {
            key: [fill; 32],
            key_len,
            iv: [fill.wrapping_add(1); 12],
            secret: [fill.wrapping_add(2); 48],
            secret_len: if secret { 32 } else { 0 },
            seq: 3,
            ctx: None,
        };
        let tls13 = version == Version::Tls13;
        let make = |rx: u8, tx: u8| Records {
            version,
            aead,
            hkdf: tls13.then_some(hkdf::HKDF_SHA256),
            rx: dir(rx, tls13),
            tx: dir(tx, tls13),
            answer_key_update: false,
            refuse_renegotiation: false,
            renegotiation_refused: false,
            key_updates: 0,
            warnings: 0,
            empty: 0,
        };
        let (server, client) = (make(10, 20), make(20, 10));
        assert_eq!(server.gcm(), gcm, "{aead:?}");
        (server, client)
    }

    type Aead = (&'static aead::Algorithm, bool);
    const AEADS: [Aead; 3] = [
        (&aead::AES_128_GCM, true),
        (&aead::AES_256_GCM, true),
        (&aead::CHACHA20_POLY1305, false),
    ];

    /// One TLS 1.3 record sealed by `rec` around an inner plaintext given whole (content,
    /// type and padding as the test wants them, which `seal` would not write).
    fn raw_tls13_record(rec: &mut Records, mut inner: Vec<u8>) -> Vec<u8> {
        let header = record_header(APPLICATION_DATA, inner.len() + TAG);
        let nonce = Nonce::assume_unique_for_key(rec.tx.nonce());
        let aead = rec.aead;
        let tag = rec
            .tx
            .ctx(aead)
            .expect("ctx")
            .seal_in_place_separate_tag(nonce, Aad::from(header), &mut inner)
            .expect("seal");
        rec.tx.next_seq().expect("seq");
        let mut wire = header.to_vec();
        wire.extend_from_slice(&inner);
        wire.extend_from_slice(tag.as_ref());
        wire
    }

    /// Opens everything in `wire` with `rec`: the data, and whether close_notify came.
    fn open_all(rec: &mut Records, wire: &mut Vec<u8>) -> Result<(Vec<u8>, bool), Fatal> {
        let mut data = Vec::new();
        let opened = rec.open(wire, |d| data.extend_from_slice(d))?;
        wire.drain(..opened.consumed);
        Ok((data, opened.closed))
    }

    #[test]
    fn sealed_records_open_in_every_suite_and_version() {
        for version in [Version::Tls12, Version::Tls13] {
            for aead in AEADS {
                let (mut server, mut client) = pair(version, aead);
                let body: Vec<u8> = (0..40_000u32).map(|i| (i % 253) as u8).collect();
                let mut wire = Vec::new();
                let taken = server
                    .seal_gathered(
                        &[
                            IoSlice::new(b"head "),
                            IoSlice::new(&[]),
                            IoSlice::new(&body),
                        ],
                        usize::MAX,
                        &mut wire,
                    )
                    .expect("seal");
                assert_eq!(taken, 5 + body.len());
                server.seal_close_notify(&mut wire).expect("close");
                let (data, closed) = open_all(&mut client, &mut wire).expect("open");
                assert_eq!(&data[..5], b"head ", "{version:?} {aead:?}");
                assert!(data[5..] == body[..], "{version:?} {aead:?}");
                assert!(closed && wire.is_empty());
            }
        }
    }

    fn refusal(result: Result<(Vec<u8>, bool), Fatal>) -> (Error, Option<AlertDescription>) {
        match result {
            Ok(got) => panic!("accepted: {got:?}"),
            Err(Fatal { error, alert }) => (error, alert),
        }
    }

    /// A client's KeyUpdate asking for ours: the server follows it, answers before its next
    /// record, and both sides carry on under the new keys; then one not asking, and the
    /// server's own update at the AES-GCM record limit.
    #[test]
    fn key_updates_are_followed_answered_and_made_at_the_limit() {
        for aead in AEADS {
            let (mut server, mut client) = pair(Version::Tls13, aead);
            let mut wire = Vec::new();
            client
                .seal(HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 1], &mut wire)
                .expect("ku");
            client
                .tx
                .update(hkdf::HKDF_SHA256)
                .expect("client tx update");
            client
                .seal_data(b"under new keys", &mut wire)
                .expect("seal");
            let (data, _) = open_all(&mut server, &mut wire).expect("server follows");
            assert_eq!(data, b"under new keys");
            assert!(server.answer_key_update);
            server.seal_pending(&mut wire).expect("answer");
            assert!(!server.answer_key_update);
            server.seal_data(b"reply", &mut wire).expect("seal");
            let (data, _) = open_all(&mut client, &mut wire).expect("client follows the answer");
            assert_eq!(data, b"reply");
            // Not asking: no answer.
            client
                .seal(HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 0], &mut wire)
                .expect("ku");
            client.tx.update(hkdf::HKDF_SHA256).expect("update");
            open_all(&mut server, &mut wire).expect("followed");
            assert!(!server.answer_key_update);
            // The limit (AES-GCM only): our own update before the next record.
            server.tx.seq = AES_GCM_RECORDS;
            client.rx.seq = AES_GCM_RECORDS;
            server.seal_pending(&mut wire).expect("pending");
            server
                .seal_data(b"after the limit", &mut wire)
                .expect("seal");
            let (data, _) = open_all(&mut client, &mut wire).expect("client follows");
            assert_eq!(data, b"after the limit");
            assert_eq!(
                server.tx.seq == 1,
                aead.1,
                "{aead:?}: updated only for AES-GCM"
            );
        }
        // TLS 1.2 cannot update: at the limit the connection ends.
        let (mut server, _) = pair(Version::Tls12, AEADS[0]);
        server.tx.seq = AES_GCM_RECORDS;
        assert!(server.seal_data(b"x", &mut Vec::new()).is_err());
    }

    #[test]
    fn post_handshake_messages_other_than_a_whole_key_update_are_refused() {
        let cases: [(&[u8], AlertDescription); 6] = [
            (
                &[KEY_UPDATE, 0, 0, 1, 1, 23],
                AlertDescription::UnexpectedMessage,
            ),
            (
                &[KEY_UPDATE, 0, 0, 1, 2],
                AlertDescription::IllegalParameter,
            ),
            (&[KEY_UPDATE, 0, 0, 2, 0, 0], AlertDescription::DecodeError),
            (&[4, 0, 0, 1, 0], AlertDescription::UnexpectedMessage),
            (&[KEY_UPDATE, 0, 0], AlertDescription::UnexpectedMessage),
            (&[KEY_UPDATE, 0, 0, 1], AlertDescription::UnexpectedMessage),
        ];
        for (message, expected) in cases {
            let (mut server, mut client) = pair(Version::Tls13, AEADS[0]);
            let mut wire = Vec::new();
            client.seal(HANDSHAKE, message, &mut wire).expect("seal");
            let (_, alert) = refusal(open_all(&mut server, &mut wire));
            assert_eq!(alert, Some(expected), "{message:?}");
        }
    }

    #[test]
    fn alerts_close_warn_or_end_the_connection() {
        // TLS 1.3: user_canceled is let pass, any other alert but close_notify is fatal.
        let (mut server, mut client) = pair(Version::Tls13, AEADS[0]);
        let mut wire = Vec::new();
        client.seal(ALERT, &[1, 90], &mut wire).expect("seal");
        client.seal_data(b"still", &mut wire).expect("seal");
        client.seal(ALERT, &[1, 40], &mut wire).expect("seal");
        let mut data = Vec::new();
        let outcome = server.open(&mut wire, |d| data.extend_from_slice(d));
        assert_eq!(data, b"still", "data before the fatal alert is delivered");
        let Err(Fatal { error, alert }) = outcome else {
            panic!("a warning-level handshake_failure is fatal in TLS 1.3");
        };
        assert_eq!(
            error,
            Error::AlertReceived(AlertDescription::HandshakeFailure)
        );
        assert_eq!(alert, None, "no alert answers an alert");
        // TLS 1.2: a warning is ignored; a fatal one ends it.
        let (mut server, mut client) = pair(Version::Tls12, AEADS[2]);
        let mut wire = Vec::new();
        client.seal(ALERT, &[1, 100], &mut wire).expect("seal");
        client.seal_data(b"on", &mut wire).expect("seal");
        assert_eq!(open_all(&mut server, &mut wire).expect("ok").0, b"on");
        client.seal(ALERT, &[2, 46], &mut wire).expect("seal");
        let (error, _) = refusal(open_all(&mut server, &mut wire));
        assert_eq!(
            error,
            Error::AlertReceived(AlertDescription::CertificateUnknown)
        );
        // An alert of the wrong size.
        let (mut server, mut client) = pair(Version::Tls13, AEADS[1]);
        let mut wire = Vec::new();
        client.seal(ALERT, &[1, 0, 0], &mut wire).expect("seal");
        let (_, alert) = refusal(open_all(&mut server, &mut wire));
        assert_eq!(alert, Some(AlertDescription::DecodeError));
        // close_notify: nothing after it is read.
        let (mut server, mut client) = pair(Version::Tls13, AEADS[1]);
        let mut wire = Vec::new();
        client.seal_close_notify(&mut wire).expect("seal");
        client.seal_data(b"ignored", &mut wire).expect("seal");
        let mut data = Vec::new();
        let opened = server
            .open(&mut wire, |d| data.extend_from_slice(d))
            .expect("open");
        assert!(opened.closed && data.is_empty());
    }

    /// Records without data are bounded: warnings, empty records, renegotiations; and an
    /// alert of no known level or a record padded past 2^14 + 1 is refused.
    #[test]
    fn records_without_data_are_bounded_and_odd_ones_refused() {
        type Case = (
            Version,
            &'static [(u8, &'static [u8])],
            usize,
            AlertDescription,
        );
        let cases: [Case; 6] = [
            (
                Version::Tls12,
                &[(ALERT, &[1, 100])],
                5,
                AlertDescription::UnexpectedMessage,
            ),
            (
                Version::Tls13,
                &[(ALERT, &[1, 90])],
                5,
                AlertDescription::UnexpectedMessage,
            ),
            (
                Version::Tls13,
                &[(APPLICATION_DATA, &[])],
                33,
                AlertDescription::UnexpectedMessage,
            ),
            (
                Version::Tls12,
                &[(APPLICATION_DATA, &[])],
                33,
                AlertDescription::UnexpectedMessage,
            ),
            (
                Version::Tls12,
                &[(HANDSHAKE, &[1, 0, 0, 0])],
                2,
                AlertDescription::HandshakeFailure,
            ),
            (
                Version::Tls13,
                &[(ALERT, &[3, 0])],
                1,
                AlertDescription::IllegalParameter,
            ),
        ];
        for (version, records, times, expected) in cases {
            let (mut server, mut client) = pair(version, AEADS[0]);
            let mut wire = Vec::new();
            for _ in 0..times - 1 {
                for (kind, content) in records {
                    client.seal(*kind, content, &mut wire).expect("seal");
                }
            }
            if times > 1 {
                // Up to the limit: accepted.
                open_all(&mut server, &mut wire).expect("within the limit");
                // Data resets the count: as many again are accepted.
                client.seal_data(b"x", &mut wire).expect("seal");
                for _ in 0..times - 1 {
                    for (kind, content) in records {
                        client.seal(*kind, content, &mut wire).expect("seal");
                    }
                }
                let again = open_all(&mut server, &mut wire);
                if expected == AlertDescription::HandshakeFailure {
                    // Renegotiation is refused once per connection, not once per data.
                    let (_, alert) = refusal(again);
                    assert_eq!(alert, Some(expected));
                    continue;
                }
                assert_eq!(again.expect("after data").0, b"x");
            }
            for (kind, content) in records {
                client.seal(*kind, content, &mut wire).expect("seal");
            }
            let (_, alert) = refusal(open_all(&mut server, &mut wire));
            assert_eq!(alert, Some(expected), "{version:?} {records:?}");
        }
        // TLS 1.3: one byte of data, its content type, and padding past 2^14 + 1 bytes of
        // inner plaintext (the data itself is small: only the padding is over).
        let (mut server, mut client) = pair(Version::Tls13, AEADS[0]);
        let mut inner = vec![0u8; MAX_FRAGMENT + 2];
        inner[0] = b'x';
        inner[1] = APPLICATION_DATA;
        let mut wire = raw_tls13_record(&mut client, inner);
        let (_, alert) = refusal(open_all(&mut server, &mut wire));
        assert_eq!(alert, Some(AlertDescription::RecordOverflow));
    }

    #[test]
    fn a_tls_1_2_renegotiation_is_refused_with_a_warning() {
        for aead in AEADS {
            let (mut server, mut client) = pair(Version::Tls12, aead);
            let mut wire = Vec::new();
            client
                .seal(HANDSHAKE, &[1, 0, 0, 2, 3, 3], &mut wire)
                .expect("seal");
            client.seal_data(b"then data", &mut wire).expect("seal");
            assert_eq!(
                open_all(&mut server, &mut wire).expect("open").0,
                b"then data"
            );
            server.seal_pending(&mut wire).expect("pending");
            assert_eq!(wire[0], ALERT, "a no_renegotiation alert");
            server.seal_data(b"answer", &mut wire).expect("seal");
            // The client's side (TLS 1.2) lets the warning pass.
            assert_eq!(open_all(&mut client, &mut wire).expect("open").0, b"answer");
        }
    }

    #[test]
    fn tampered_oversized_unprotected_and_empty_records_are_refused() {
        for version in [Version::Tls12, Version::Tls13] {
            for aead in AEADS {
                let (mut server, mut client) = pair(version, aead);
                let mut wire = Vec::new();
                client.seal_data(b"payload", &mut wire).expect("seal");
                let last = wire.len() - 1;
                wire[last] ^= 1;
                let (error, alert) = refusal(open_all(&mut server, &mut wire));
                assert_eq!(error, Error::DecryptError);
                assert_eq!(alert, Some(AlertDescription::BadRecordMac));
                // Too short to hold a tag.
                let (mut server, _) = pair(version, aead);
                let mut wire = vec![23, 3, 3, 0, 4, 1, 2, 3, 4];
                let (error, _) = refusal(open_all(&mut server, &mut wire));
                assert_eq!(error, Error::DecryptError, "{version:?}");
                // Over the size limit: refused from the header, before the body arrives.
                let (mut server, _) = pair(version, aead);
                let mut wire = vec![23, 3, 3, 0x48, 0x01];
                let (_, alert) = refusal(open_all(&mut server, &mut wire));
                assert_eq!(alert, Some(AlertDescription::RecordOverflow));
                // Not TLS at all.
                let (mut server, _) = pair(version, aead);
                let mut wire = b"GET / HTTP/1.1\r\n".to_vec();
                let (_, alert) = refusal(open_all(&mut server, &mut wire));
                assert_eq!(alert, Some(AlertDescription::DecodeError));
            }
        }
        // TLS 1.3: an empty record of data is fine; one with no content type (all padding) is
        // not.
        let (mut server, mut client) = pair(Version::Tls13, AEADS[0]);
        let mut wire = Vec::new();
        client
            .seal_with(APPLICATION_DATA, 0, &mut wire, |_| {})
            .expect("seal");
        assert_eq!(
            open_all(&mut server, &mut wire)
                .expect("empty data is fine")
                .0,
            b""
        );
        let mut wire = raw_tls13_record(&mut client, vec![0u8; 5]);
        let (_, alert) = refusal(open_all(&mut server, &mut wire));
        assert_eq!(alert, Some(AlertDescription::UnexpectedMessage));
        // A partial record is left for more bytes, not refused.
        let (mut server, mut client) = pair(Version::Tls13, AEADS[0]);
        let mut wire = Vec::new();
        client.seal_data(b"split", &mut wire).expect("seal");
        let mut first = wire[..9].to_vec();
        let opened = server.open(&mut first, |_| {}).expect("partial");
        assert_eq!(opened, Opened::default());
    }

    /// Any bytes a client sends after the handshake: opened, refused or waited for, never a
    /// panic; and never more consumed than was there.
    #[test]
    fn any_bytes_after_the_handshake_end_in_data_an_error_or_a_wait() {
        use proptest::prelude::*;
        use proptest::test_runner::{Config, TestRunner};
        let mut runner = TestRunner::new(Config::with_cases(2000));
        let bytes = prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..64),
            // Record-shaped: a plausible header, then anything.
            (
                0u8..3,
                0usize..3,
                proptest::collection::vec(any::<u8>(), 0..300)
            )
                .prop_map(|(kind, v, body)| {
                    let mut wire = vec![[21, 22, 23][usize::from(kind)], 3, [1, 3, 4][v]];
                    wire.extend_from_slice(&u16::try_from(body.len()).unwrap_or(0).to_be_bytes());
                    wire.extend_from_slice(&body);
                    wire
                }),
        ];
        runner
            .run(&(bytes, 0usize..6), |(mut wire, which)| {
                let version = if which < 3 {
                    Version::Tls12
                } else {
                    Version::Tls13
                };
                let (mut server, _) = pair(version, AEADS[which % 3]);
                let len = wire.len();
                if let Ok(opened) = server.open(&mut wire, |_| {}) {
                    prop_assert!(opened.consumed <= len);
                }
                Ok(())
            })
            .expect("no bytes break the record layer");
    }

    /// RFC 8448 §3 (a simple 1-RTT handshake): the server's application traffic secret and the
    /// key and IV derived from it (TLS_AES_128_GCM_SHA256).
    #[test]
    fn key_and_iv_derive_as_in_rfc_8448() {
        let secret = hex("a11af9f05531f856ad47116b45a950328204b4f44bfb6b3a4b4f1f3fcb631643");
        let mut d = Direction {
            key: [0; 32],
            key_len: 16,
            iv: [0; 12],
            secret: [0; 48],
            secret_len: secret.len(),
            seq: 0,
            ctx: None,
        };
        d.secret[..secret.len()].copy_from_slice(&secret);
        let (key, iv) = d.derived(hkdf::HKDF_SHA256).expect("derive");
        assert_eq!(key[..16].to_vec(), hex("9f02283b6c9c07efc26bb9f2ac92e356"));
        assert_eq!(iv.to_vec(), hex("cf782b88dd83549aadf1e984"));
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    #[test]
    fn the_nonce_is_the_iv_xor_the_sequence_number() {
        let mut d = Direction {
            key: [0; 32],
            key_len: 16,
            iv: [0xff; 12],
            secret: [0; 48],
            secret_len: 0,
            seq: 0x0102_0304_0506_0708,
            ctx: None,
        };
        assert_eq!(
            d.nonce(),
            [0xff, 0xff, 0xff, 0xff, 0xfe, 0xfd, 0xfc, 0xfb, 0xfa, 0xf9, 0xf8, 0xf7]
        );
        d.seq = u64::MAX;
        assert!(d.next_seq().is_err(), "a sequence number never wraps");
    }
}
