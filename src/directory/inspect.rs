//! What `ssp-gateway directory lookup` prints: a directory answer for one ASID laid out for an
//! operator, and what the gateway would decide for it as sender and as receiver of one
//! interaction. Pure text from the model and the catalogue; it performs no lookups itself and
//! never changes a decision (the checks mirror `authorise`, in the same order).

use std::fmt::Write as _;

use super::Party;
use crate::ssp::interactions::Catalogue;
use crate::ssp::outcome::Rejection;

/// Describes `party` (the backend's answer for `asid`) and, with `interaction`, the gateway's
/// decision for it as sender and as receiver. `source` names the backend (e.g. "ldap
/// ldap://sds.example:636").
pub fn describe(
    source: &str,
    asid: &str,
    party: Option<&Party>,
    catalogue: &Catalogue,
    interaction: Option<&str>,
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "directory: {source}");
    match party {
        None => {
            let _ = writeln!(out, "ASID {asid}: not registered (no nhsAs record)");
        }
        Some(p) => describe_party(&mut out, p),
    }
    if let Some(id) = interaction {
        let _ = writeln!(out);
        describe_decision(&mut out, asid, party, catalogue, id);
    }
    out
}

fn describe_party(out: &mut String, p: &Party) {
    let s = &p.system;
    let _ = writeln!(out, "ASID {} (nhsAs)", s.asid);
    let _ = writeln!(out, "  ODS code (nhsIDCode):        {}", s.ods_code);
    let _ = writeln!(out, "  party key (nhsMHSPartyKey):  {}", s.party_key);
    match (&s.product_name, &s.product_version) {
        (None, None) => {}
        (name, version) => {
            let _ = writeln!(
                out,
                "  product:                     {} {}",
                name.as_deref().unwrap_or("-"),
                version.as_deref().unwrap_or("")
            );
        }
    }
    let _ = writeln!(
        out,
        "  accredited interactions (nhsAsSvcIA): {}",
        s.interactions.len()
    );
    for i in &s.interactions {
        let _ = writeln!(out, "    {i}");
    }
    let _ = writeln!(
        out,
        "  message handlers (nhsMhs with party key {} and ODS code {}): {}",
        s.party_key,
        s.ods_code,
        p.handlers.len()
    );
    for h in &p.handlers {
        let _ = writeln!(out, "    {}", h.interaction);
        let _ = writeln!(out, "      endpoint (nhsMHSEndPoint): {}", h.endpoint);
        let _ = writeln!(out, "      FQDN (nhsMhsFQDN):         {}", h.fqdn);
        let _ = writeln!(out, "      CPA id (nhsMhsCPAId):      {}", h.cpa_id);
        let _ = writeln!(
            out,
            "      MHS id, ODS code:          {}, {}",
            h.id, h.ods_code
        );
    }
    if !p.unusable.is_empty() {
        let _ = writeln!(
            out,
            "  unusable message handlers (not forwarded to; the rest of the party is used): {}",
            p.unusable.len()
        );
        for u in &p.unusable {
            let _ = writeln!(out, "    {u}");
        }
    }
    let fqdns: Vec<&str> = p.fqdns().collect();
    let _ = writeln!(
        out,
        "  client certificate names accepted for this ASID: {}",
        if fqdns.is_empty() {
            "none (no message handler, so it cannot send)".to_string()
        } else {
            fqdns.join(", ")
        }
    );
}

fn describe_decision(
    out: &mut String,
    asid: &str,
    party: Option<&Party>,
    catalogue: &Catalogue,
    id: &str,
) {
    let Some(interaction) = catalogue.get(id) else {
        let _ = writeln!(
            out,
            "interaction {id}: not in the catalogue; every request declaring it is refused: 400 {}",
            Rejection::UnsupportedInteraction { id: id.to_string() }.token()
        );
        return;
    };
    let _ = writeln!(
        out,
        "interaction {id} ({} {})",
        interaction.method,
        interaction.path_template()
    );

    // As sender (Ssp-From): accredited, then the certificate FQDN.
    let sender = match party {
        Some(p) if p.may(id) => {
            let fqdns: Vec<&str> = p.fqdns().collect();
            if fqdns.is_empty() {
                format!(
                    "refused: accredited, but no message handler registers an FQDN, so no client certificate can match: 403 CLIENT_CERTIFICATE_FQDN_<fqdn>_NOT_REGISTERED_FOR_ASID_{asid}"
                )
            } else {
                format!(
                    "allowed when the client certificate presents one of: {}",
                    fqdns.join(", ")
                )
            }
        }
        Some(_) => format!(
            "refused: not accredited for it (not in nhsAsSvcIA): 403 {}",
            Rejection::AsidCheckFailed {
                sender: asid.to_string()
            }
            .token()
        ),
        None => format!(
            "refused: ASID not registered: 403 {}",
            Rejection::AsidCheckFailed {
                sender: asid.to_string()
            }
            .token()
        ),
    };
    let _ = writeln!(out, "  as sender (Ssp-From):  {sender}");

    // As receiver (Ssp-To): accredited, with a message handler for the interaction.
    let refused = Rejection::ReceiverCheckFailed {
        receiver: asid.to_string(),
    }
    .token();
    let receiver = match party {
        Some(p) if p.may(id) => match p.handler_for(id) {
            Some(h) => format!(
                "allowed for requests to {}/{} (CPA id {})",
                h.endpoint,
                interaction.path_template(),
                h.cpa_id
            ),
            None => match p.unusable_for(id) {
                Some(u) => format!(
                    "refused: accredited, but its message handler cannot be used ({}: {}): 403 {refused}",
                    u.handlers.join(", "),
                    u.reason
                ),
                None => format!(
                    "refused: accredited, but no message handler (endpoint) for it: 403 {refused}"
                ),
            },
        },
        Some(_) => format!("refused: not accredited for it (not in nhsAsSvcIA): 403 {refused}"),
        None => format!("refused: ASID not registered: 403 {refused}"),
    };
    let _ = writeln!(out, "  as receiver (Ssp-To):  {receiver}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::ldif::LdifBackend;

    const SLOT: &str = "urn:nhs:names:services:gpconnect:fhir:rest:search:slot-1";
    const BOOK: &str = "urn:nhs:names:services:gpconnect:fhir:rest:create:appointment-1";

    fn catalogue() -> Catalogue {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/interactions.toml");
        Catalogue::load(&path).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_provider_is_a_receiver_with_its_endpoint() {
        let world = LdifBackend::development_world().unwrap();
        let p = world.lookup("918999198993").unwrap();
        let text = describe(
            "ldif test",
            "918999198993",
            Some(&p),
            &catalogue(),
            Some(SLOT),
        );
        assert!(
            text.contains("party key (nhsMHSPartyKey):  B82617-0000806"),
            "{text}"
        );
        assert!(
            text.contains(
                "message handlers (nhsMhs with party key B82617-0000806 and ODS code B82617): 15"
            ),
            "{text}"
        );
        assert!(!text.contains("unusable"), "{text}");
        assert!(
            text.contains("as receiver (Ssp-To):  allowed for requests to https://localhost:9443/B82617/STU3/1/gpconnect/Slot"),
            "{text}"
        );
        assert!(text.contains("as sender (Ssp-From):  allowed when the client certificate presents one of: localhost"), "{text}");
    }

    #[test]
    fn a_read_only_consumer_is_refused_what_it_is_not_accredited_for() {
        let world = LdifBackend::development_world().unwrap();
        let p = world.lookup("200000000360").unwrap();
        let text = describe("ldif", "200000000360", Some(&p), &catalogue(), Some(BOOK));
        assert!(
            text.contains("as sender (Ssp-From):  refused: not accredited for it (not in nhsAsSvcIA): 403 ASID_CHECK_FAILED_MESSAGESENDER_200000000360"),
            "{text}"
        );
        assert!(
            text.contains("403 PARTYKEY_INTERACTION_CHECK_FAILED_MESSAGERECEIVER_200000000360"),
            "{text}"
        );
        let text = describe("ldif", "200000000360", Some(&p), &catalogue(), Some(SLOT));
        assert!(text.contains("readonly.dev.local"), "{text}");
        assert!(
            text.contains("refused: accredited, but no message handler (endpoint) for it"),
            "{text}"
        );
    }

    /// An interaction whose message handler cannot be used is shown, with why, in the party
    /// and in the decision; the party's other interactions are allowed.
    #[test]
    fn an_unusable_interaction_is_shown_with_why() {
        let ldif = crate::directory::ldif::DEVELOPMENT_WORLD.replacen(
            "nhsMHSEndPoint: https://localhost:9443/B82617/STU3/1/gpconnect\n",
            "nhsMHSEndPoint: https://localhost:9443/B82617/STU3/1/gpconnect/\n",
            1,
        );
        let world = LdifBackend::parse(&ldif, "test").unwrap();
        let p = world.lookup("918999198993").unwrap();
        let metadata = "urn:nhs:names:services:gpconnect:fhir:rest:read:metadata-1";
        let text = describe(
            "ldif",
            "918999198993",
            Some(&p),
            &catalogue(),
            Some(metadata),
        );
        assert!(
            text.contains(
                "message handlers (nhsMhs with party key B82617-0000806 and ODS code B82617): 14"
            ),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "  unusable message handlers (not forwarded to; the rest of the party is used): 1\n    \
                 {metadata}: message handler 4312b49572e113d450cf: nhsMHSEndPoint \
                 \"https://localhost:9443/B82617/STU3/1/gpconnect/\": not an https:// endpoint"
            )),
            "{text}"
        );
        assert!(
            text.contains(
                "as receiver (Ssp-To):  refused: accredited, but its message handler cannot be used \
                 (4312b49572e113d450cf: nhsMHSEndPoint \"https://localhost:9443/B82617/STU3/1/gpconnect/\": \
                 not an https:// endpoint"
            ),
            "{text}"
        );
        assert!(
            text.contains("403 PARTYKEY_INTERACTION_CHECK_FAILED_MESSAGERECEIVER_918999198993"),
            "{text}"
        );
        let text = describe("ldif", "918999198993", Some(&p), &catalogue(), Some(SLOT));
        assert!(text.contains("as receiver (Ssp-To):  allowed"), "{text}");
    }

    #[test]
    fn unknown_asids_and_interactions_are_explained() {
        let text = describe("ldif", "123", None, &catalogue(), Some("urn:nope"));
        assert!(text.contains("ASID 123: not registered"), "{text}");
        assert!(
            text.contains("400 UNSUPPORTED_INTERACTION_urn:nope"),
            "{text}"
        );
        let text = describe("ldif", "123", None, &catalogue(), Some(SLOT));
        assert!(
            text.contains("refused: ASID not registered: 403 ASID_CHECK_FAILED_MESSAGESENDER_123"),
            "{text}"
        );
        assert!(!describe("ldif", "123", None, &catalogue(), None).contains("interaction"));
    }
}
