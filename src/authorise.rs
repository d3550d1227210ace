//! Authorisation against the directory, in the documented order: sender, identity, receiver,
//! sharing agreement, endpoint. A pure function of the request's facts and the directory's
//! answers; it performs no I/O and never forwards anything. Its answer is the one message
//! handler (registered endpoint) the request may go to.

use std::collections::BTreeSet;

use crate::directory::{MessageHandler, Party};
use crate::ssp::envelope::{SspHeaders, Target};
use crate::ssp::interactions::{Interaction, Matched};
use crate::ssp::outcome::Rejection;
use crate::tls::PeerIdentity;

/// The facts one authorisation decision is made from.
pub struct Facts<'a> {
    pub headers: &'a SspHeaders,
    pub interaction: &'a Interaction,
    pub target: &'a Target,
    pub matched: &'a Matched<'a>,
    pub peer: &'a PeerIdentity,
    /// The directory's answer for `Ssp-From` (None: not registered).
    pub sender: Option<&'a Party>,
    /// The directory's answer for `Ssp-To` (None: not registered).
    pub receiver: Option<&'a Party>,
    /// `Some` when sharing agreements are enforced: the allowed (sender, receiver) pairs.
    pub sharing_agreements: Option<&'a BTreeSet<(String, String)>>,
}

/// The first two checks of [`authorise`], which need only the sender's directory answer (the
/// gateway runs them alone when the receiver's lookup failed, so that a sender it can judge is
/// refused as such, not with 503): 1. the sender is an accredited system whose interactions
/// include the declared one; 2. the certificate's FQDN is one registered for its party key.
pub fn check_sender(
    headers: &SspHeaders,
    interaction: &Interaction,
    peer: &PeerIdentity,
    sender: Option<&Party>,
) -> Result<(), Rejection> {
    let from = headers.from.as_str();
    let sender = match sender {
        Some(p) if p.may(interaction.id.as_str()) => p,
        _ => {
            return Err(Rejection::AsidCheckFailed {
                sender: from.to_string(),
            })
        }
    };
    if !peer.names.iter().any(|name| sender.has_fqdn(name)) {
        return Err(Rejection::FqdnNotRegistered {
            fqdn: peer
                .names
                .first()
                .cloned()
                .unwrap_or_else(|| "UNKNOWN".to_string()),
            asid: from.to_string(),
        });
    }
    Ok(())
}

/// Decides whether the request may be forwarded; on success returns the receiver's message
/// handler for the interaction, whose endpoint the target URL is proven to start with.
pub fn authorise<'a>(f: &Facts<'a>) -> Result<&'a MessageHandler, Rejection> {
    let id = f.interaction.id.as_str();
    let from = f.headers.from.as_str();
    let to = f.headers.to.as_str();

    // 1 and 2: sender and identity.
    check_sender(f.headers, f.interaction, f.peer, f.sender)?;

    // 3. Receiver: accredited for the interaction, with a message handler (endpoint) for it.
    let handler = match f.receiver {
        Some(p) if p.may(id) => p.handler_for(id),
        _ => None,
    };
    let Some(handler) = handler else {
        return Err(Rejection::ReceiverCheckFailed {
            receiver: to.to_string(),
        });
    };

    // 4. Sharing agreement (optional).
    if let Some(pairs) = f.sharing_agreements {
        if !pairs.contains(&(from.to_string(), to.to_string())) {
            return Err(Rejection::NoSharingAgreement {
                sender: from.to_string(),
                receiver: to.to_string(),
            });
        }
    }

    // 5. Endpoint: the target is the registered endpoint byte for byte, then `/` + the
    //    interaction's path. `matched.base` is everything before that `/`, so equality here
    //    means the target starts with the endpoint at a path boundary — no port added, no IP
    //    for a name, no case folding, nothing after the endpoint but the interaction's path.
    if f.matched.base != handler.endpoint {
        return Err(Rejection::EndpointMismatch {
            endpoint: handler.endpoint.clone(),
            cpa_id: handler.cpa_id.clone(),
            // Without the query: it adds nothing to the mismatch, and a Find Patient query
            // carries an NHS number into the answer and the access log (the SSP example has
            // none).
            target: f.target.without_query().to_string(),
        });
    }

    Ok(handler)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::AccreditedSystem;
    use crate::ssp::envelope::parse_target;
    use crate::ssp::interactions::Catalogue;
    use http::Method;

    const SLOT: &str = "urn:nhs:names:services:gpconnect:fhir:rest:search:slot-1";
    const BOOK: &str = "urn:nhs:names:services:gpconnect:fhir:rest:create:appointment-1";
    const ENDPOINT: &str = "https://provider.example/B82617/STU3/1/gpconnect";

    fn catalogue() -> Catalogue {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/interactions.toml");
        Catalogue::load(&path).unwrap_or_else(|e| panic!("{e}"))
    }

    fn party(asid: &str, pk: &str, interactions: &[&str], handlers: Vec<MessageHandler>) -> Party {
        Party {
            system: AccreditedSystem {
                asid: asid.into(),
                ods_code: "X1".into(),
                party_key: pk.into(),
                interactions: interactions.iter().map(|s| s.to_string()).collect(),
                product_name: None,
                product_version: None,
            },
            registered_fqdns: handlers.iter().map(|h| h.fqdn.clone()).collect(),
            handlers,
            unusable: Vec::new(),
        }
    }

    fn mhs(pk: &str, interaction: &str, endpoint: &str, fqdn: &str) -> MessageHandler {
        MessageHandler {
            id: format!("{pk}-{interaction}"),
            ods_code: "X1".into(),
            party_key: pk.into(),
            interaction: interaction.into(),
            endpoint: endpoint.into(),
            fqdn: fqdn.into(),
            cpa_id: "CPA1".into(),
        }
    }

    struct World {
        consumer: Party,
        provider: Party,
        peer: PeerIdentity,
    }

    fn world() -> World {
        World {
            consumer: party(
                "200000000359",
                "A20047-821870",
                &[SLOT],
                vec![mhs(
                    "A20047-821870",
                    "urn:other",
                    "https://c.example",
                    "consumer.example",
                )],
            ),
            provider: party(
                "918999198993",
                "B82617-0000806",
                &[SLOT, BOOK],
                vec![
                    mhs("B82617-0000806", SLOT, ENDPOINT, "provider.example"),
                    mhs("B82617-0000806", BOOK, ENDPOINT, "provider.example"),
                ],
            ),
            peer: PeerIdentity {
                names: vec!["Consumer.Example".into()],
                ..PeerIdentity::default()
            },
        }
    }

    fn decide(
        w: &World,
        interaction: &str,
        method: Method,
        url: &str,
        sender: Option<&Party>,
        receiver: Option<&Party>,
        agreements: Option<&BTreeSet<(String, String)>>,
    ) -> Result<String, Rejection> {
        let cat = catalogue();
        let ix = cat.get(interaction).expect("interaction in catalogue");
        let target = parse_target(&format!("/{url}")).expect("valid target");
        let matched = ix.match_request(&method, &target).expect("matches");
        let headers = SspHeaders {
            trace_id: "0a4b1f0e-1b0c-4b5e-9d55-8a8d4e1a2b3c".into(),
            from: "200000000359".into(),
            to: "918999198993".into(),
            interaction_id: interaction.into(),
        };
        authorise(&Facts {
            headers: &headers,
            interaction: ix,
            target: &target,
            matched: &matched,
            peer: &w.peer,
            sender,
            receiver,
            sharing_agreements: agreements,
        })
        .map(|h| h.endpoint.clone())
    }

    #[test]
    fn allowed_request_gets_the_registered_endpoint() {
        let w = world();
        let url = format!("{ENDPOINT}/Slot?status=free");
        let got = decide(
            &w,
            SLOT,
            Method::GET,
            &url,
            Some(&w.consumer),
            Some(&w.provider),
            None,
        );
        assert_eq!(got, Ok(ENDPOINT.to_string()));
    }

    #[test]
    fn checks_run_in_order_with_their_tokens() {
        let w = world();
        let url = format!("{ENDPOINT}/Appointment");
        // Sender unknown, and sender not accredited for the interaction.
        let err = decide(&w, BOOK, Method::POST, &url, None, Some(&w.provider), None).unwrap_err();
        assert_eq!(err.token(), "ASID_CHECK_FAILED_MESSAGESENDER_200000000359");
        let err = decide(&w, BOOK, Method::POST, &url, Some(&w.consumer), None, None).unwrap_err();
        assert_eq!(err.token(), "ASID_CHECK_FAILED_MESSAGESENDER_200000000359");

        // Identity before receiver.
        let mut rogue = world();
        rogue.peer.names = vec!["rogue.example".into()];
        let url = format!("{ENDPOINT}/Slot");
        let err = decide(
            &rogue,
            SLOT,
            Method::GET,
            &url,
            Some(&rogue.consumer),
            None,
            None,
        )
        .unwrap_err();
        assert_eq!(
            err.token(),
            "CLIENT_CERTIFICATE_FQDN_rogue.example_NOT_REGISTERED_FOR_ASID_200000000359"
        );

        // Receiver unknown.
        let err = decide(&w, SLOT, Method::GET, &url, Some(&w.consumer), None, None).unwrap_err();
        assert_eq!(
            err.token(),
            "PARTYKEY_INTERACTION_CHECK_FAILED_MESSAGERECEIVER_918999198993"
        );

        // Receiver accredited on its AS record but with no endpoint for the interaction.
        let mut no_mhs = world().provider;
        no_mhs.handlers.retain(|h| h.interaction != SLOT);
        let err = decide(
            &w,
            SLOT,
            Method::GET,
            &url,
            Some(&w.consumer),
            Some(&no_mhs),
            None,
        )
        .unwrap_err();
        assert!(matches!(err, Rejection::ReceiverCheckFailed { .. }));

        // Sharing agreements, when enforced.
        let none = BTreeSet::new();
        let err = decide(
            &w,
            SLOT,
            Method::GET,
            &url,
            Some(&w.consumer),
            Some(&w.provider),
            Some(&none),
        )
        .unwrap_err();
        assert_eq!(
            err.token(),
            "FOT_CHECK_FAILED_MESSAGESENDER_200000000359_MESSAGERECEIVER_918999198993"
        );
        let mut pairs = BTreeSet::new();
        pairs.insert(("200000000359".to_string(), "918999198993".to_string()));
        assert!(decide(
            &w,
            SLOT,
            Method::GET,
            &url,
            Some(&w.consumer),
            Some(&w.provider),
            Some(&pairs)
        )
        .is_ok());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Whatever the consumer sends, an authorised target starts with the registered
        /// endpoint at a path boundary and has no way back out of it.
        #[test]
        fn authorised_targets_stay_under_the_registered_endpoint(
            prefix in proptest::sample::select(vec![
                ENDPOINT.to_string(),
                format!("{ENDPOINT}/"),
                format!("{ENDPOINT}/.."),
                format!("{ENDPOINT}%2F.."),
                "https://provider.example/B82617/STU3/1".to_string(),
                "https://provider.example:443/B82617/STU3/1/gpconnect".to_string(),
                "https://evil.example/B82617/STU3/1/gpconnect".to_string(),
                String::new(),
            ]),
            middle in "[/.%2eEA-Za-z0-9@:\\\\?#-]{0,24}",
            tail in proptest::sample::select(vec!["Slot", "Appointment", "Appointment/1", "metadata", ""]),
            query in "(\\?[a-z=&%0-9.:/]{0,16})?",
            interaction in proptest::sample::select(vec![SLOT, BOOK]),
        ) {
            let w = world();
            let cat = catalogue();
            let ix = cat.get(interaction).expect("interaction");
            let raw = format!("/{prefix}{middle}{tail}{query}");
            let Ok(target) = parse_target(&raw) else { return Ok(()); };
            let Ok(matched) = ix.match_request(&ix.method, &target) else { return Ok(()); };
            let headers = SspHeaders {
                trace_id: "0a4b1f0e-1b0c-4b5e-9d55-8a8d4e1a2b3c".into(),
                from: "200000000359".into(),
                to: "918999198993".into(),
                interaction_id: interaction.into(),
            };
            let mut consumer = w.consumer.clone();
            consumer.system.interactions.push(BOOK.to_string());
            let decision = authorise(&Facts {
                headers: &headers,
                interaction: ix,
                target: &target,
                matched: &matched,
                peer: &w.peer,
                sender: Some(&consumer),
                receiver: Some(&w.provider),
                sharing_agreements: None,
            });
            if let Ok(handler) = decision {
                let url = target.url();
                proptest::prop_assert!(url.starts_with(&handler.endpoint));
                let rest = &url[handler.endpoint.len()..];
                proptest::prop_assert!(rest.starts_with('/'), "{}", url);
                let path = rest.split('?').next().unwrap_or_default();
                proptest::prop_assert!(!path.contains("//"), "{}", url);
                proptest::prop_assert!(!path.split('/').any(|s| s == ".." || s == "."), "{}", url);
                proptest::prop_assert!(!path.to_ascii_lowercase().contains("%2e"), "{}", url);
                proptest::prop_assert!(!path.contains('\\') && !path.contains('#'), "{}", url);
            }
        }
    }

    /// The token names the target without its query, as the SSP's example does: a Find
    /// Patient's query carries an NHS number, which the answer and the access log would show.
    #[test]
    fn target_must_be_the_endpoint_byte_for_byte() {
        let w = world();
        for url in [
            "https://provider.example:443/B82617/STU3/1/gpconnect/Slot",
            "https://PROVIDER.example/B82617/STU3/1/gpconnect/Slot",
            "https://127.0.0.1/B82617/STU3/1/gpconnect/Slot",
            "https://provider.example/B82617/STU3/1/gpconnectX/Slot",
            "https://provider.example/B82617/STU3/1/Slot",
            "https://evil.example/B82617/STU3/1/gpconnect/Slot",
            "https://provider.example/B82617/STU3/1/gpconnect/extra/Slot",
        ] {
            // The query (here a Find Patient's NHS number) is not in the token.
            let with_query =
                format!("{url}?identifier=https://fhir.nhs.uk/Id/nhs-number%7C9000000009");
            let err = decide(
                &w,
                SLOT,
                Method::GET,
                &with_query,
                Some(&w.consumer),
                Some(&w.provider),
                None,
            )
            .unwrap_err();
            assert_eq!(
                err.token(),
                format!("ENDPOINT_{ENDPOINT}_CPAID_CPA1_VARIES_FROM_TARGETURL_{url}"),
                "{url}"
            );
        }
    }
}
