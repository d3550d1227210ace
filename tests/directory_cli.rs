//! `ssp-gateway directory lookup`, as an operator runs it: on the shipped configuration (LDIF)
//! and on a configuration pointing at a real slapd (LDAP).

mod common;
mod directory_support;

use std::path::Path;
use std::process::Command;

use common::*;
use directory_support::Slapd;

const BIN: &str = env!("CARGO_BIN_EXE_ssp-gateway");

fn lookup(config: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(["directory", "lookup", "--config"])
        .arg(config)
        .args(args)
        .output()
        .expect("run ssp-gateway");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn lookup_on_the_shipped_configuration() {
    let config = repo_path("config/gateway.toml");
    let (ok, out, err) = lookup(
        &config,
        &["--asid", PROVIDER_ASID, "--interaction", IX_SEARCH_SLOT],
    );
    assert!(ok, "{err}");
    assert!(out.starts_with("directory: ldif "), "{out}");
    assert!(out.contains("ASID 918999198993 (nhsAs)"), "{out}");
    assert!(
        out.contains("party key (nhsMHSPartyKey):  B82617-0000806"),
        "{out}"
    );
    assert!(out.contains("CPA id (nhsMhsCPAId):"), "{out}");
    assert!(
        out.contains("as receiver (Ssp-To):  allowed for requests to https://localhost:9443/B82617/STU3/1/gpconnect/Slot"),
        "{out}"
    );

    let (ok, out, _) = lookup(
        &config,
        &["--asid", READONLY_ASID, "--interaction", IX_BOOK],
    );
    assert!(ok);
    assert!(
        out.contains("as sender (Ssp-From):  refused: not accredited for it (not in nhsAsSvcIA): 403 ASID_CHECK_FAILED_MESSAGESENDER_200000000360"),
        "{out}"
    );

    let (ok, out, _) = lookup(&config, &["--asid", "123456789012"]);
    assert!(!ok, "an unregistered ASID exits non-zero");
    assert!(out.contains("ASID 123456789012: not registered"), "{out}");

    let (ok, _, err) = lookup(&config, &["--asid", "12ab"]);
    assert!(!ok);
    assert!(err.contains("an ASID is 1 to 32 digits"), "{err}");
}

/// The shipped configuration with its `[directory]` pointed at `url` (LDAP).
fn ldap_config(url: &str) -> std::path::PathBuf {
    directory_config(&format!("backend = \"ldap\"\nldap_url = \"{url}\""))
}

/// The shipped configuration with `backend = "ldif"` and its LDIF keys replaced by `keys`.
fn directory_config(keys: &str) -> std::path::PathBuf {
    let shipped = std::fs::read_to_string(repo_path("config/gateway.toml")).expect("read config");
    let text: String = shipped
        .lines()
        .filter(|l| !l.starts_with("ldif_file") && !l.starts_with("ldif_poll_interval"))
        .map(|l| match l {
            "backend = \"ldif\"" => keys.to_string(),
            l if l.starts_with("interactions = ") => format!(
                "interactions = \"{}\"",
                repo_path("config/interactions.toml").display()
            ),
            l => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    let path = scratch_dir("cli-ldap").join("gateway.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

#[test]
fn lookup_against_slapd_matches_the_ldif_answer() {
    let ldif = std::fs::read_to_string(repo_path("config/directory.ldif")).expect("LDIF");
    let mut slapd = Slapd::start(&ldif, None);
    let config = ldap_config(&slapd.url());
    let args = ["--asid", CONSUMER_ASID, "--interaction", IX_SEARCH_SLOT];
    let (ok, from_ldap, err) = lookup(&config, &args);
    assert!(ok, "{err}");
    assert!(
        from_ldap.starts_with(&format!(
            "directory: ldap {} (base ou=services,o=nhs)",
            slapd.url()
        )),
        "{from_ldap}"
    );
    let (_, from_ldif, _) = lookup(&repo_path("config/gateway.toml"), &args);
    let body = |s: &str| s.lines().skip(1).collect::<Vec<_>>().join("\n");
    assert_eq!(body(&from_ldap), body(&from_ldif));
    assert!(
        from_ldap.contains("client certificate names accepted for this ASID: consumer.dev.local")
    );

    slapd.stop();
    let (ok, _, err) = lookup(&config, &args);
    assert!(!ok);
    assert!(err.contains("error: directory backend ldap: "), "{err}");
    assert!(err.contains("DIRECTORY_UNAVAILABLE"), "{err}");
}

/// A `fhir_base_url` with a fragment (or a query) would silently break every lookup (the request
/// URL is built by appending `/Device?…`): check-config refuses it, naming the key.
#[test]
fn check_config_refuses_a_fhir_base_url_with_a_fragment_or_query() {
    for url in [
        "https://api.example/spine-directory/FHIR/R4#frag",
        "https://api.example/spine-directory/FHIR/R4?x=1",
    ] {
        let config = directory_config(&format!(
            "backend = \"fhir\"\nfhir_base_url = \"{url}\"\nfhir_api_key_file = \"apikey\"\n\
             fhir_ca = \"ca.pem\"\nfhir_asid_ods = {{ \"{CONSUMER_ASID}\" = \"A20047\" }}"
        ));
        let out = Command::new(BIN)
            .arg("check-config")
            .arg("--config")
            .arg(&config)
            .output()
            .expect("run ssp-gateway");
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "{url}: {report}");
        assert!(
            report.contains("fhir_base_url") && report.contains("has a query or a fragment"),
            "{url}: {report}"
        );
    }
}

/// `directory lookup` shows an interaction whose message handler cannot be used, and why, on
/// real SDS data's quirks (directory_support::quirky_world), from the LDIF file and from
/// slapd alike.
#[test]
fn lookup_shows_an_unusable_interaction_and_why() {
    let world = std::fs::read_to_string(repo_path("config/directory.ldif")).expect("LDIF");
    let quirky = directory_support::quirky_world(&world);
    let ldif_path = scratch_dir("cli-quirks").join("directory.ldif");
    std::fs::write(&ldif_path, &quirky).expect("write LDIF");
    let config = directory_config(&format!(
        "backend = \"ldif\"\nldif_file = \"{}\"",
        ldif_path.display()
    ));
    let (ok, out, err) = lookup(
        &config,
        &["--asid", PROVIDER_ASID, "--interaction", IX_METADATA],
    );
    assert!(ok, "{err}");
    let mhs = directory_support::METADATA_MHS;
    let why =
        "nhsMHSEndPoint \"https://localhost:9443/B82617/STU3/1/gpconnect/\": not an https:// \
               endpoint the gateway can forward to";
    assert!(
        out.contains(
            "  unusable message handlers (not forwarded to; the rest of the party is used): 3\n"
        ),
        "{out}"
    );
    assert!(
        out.contains(&format!("    {IX_METADATA}: message handler {mhs}: {why}")),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "as receiver (Ssp-To):  refused: accredited, but its message handler cannot be used \
             ({mhs}: {why}"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "403 PARTYKEY_INTERACTION_CHECK_FAILED_MESSAGERECEIVER_{PROVIDER_ASID}"
        )),
        "{out}"
    );
    let (ok, out, _) = lookup(
        &config,
        &["--asid", PROVIDER_ASID, "--interaction", IX_READ_LOCATION],
    );
    assert!(ok);
    assert!(out.contains("as receiver (Ssp-To):  allowed"), "{out}");

    // The consumer, from slapd as from the file: its OpenTest-like records outside the
    // catalogue give their FQDNs and nothing to report.
    let slapd = Slapd::start(&quirky, None);
    let args = ["--asid", CONSUMER_ASID, "--interaction", IX_SEARCH_SLOT];
    let (ok, from_ldap, err) = lookup(&ldap_config(&slapd.url()), &args);
    assert!(ok, "{err}");
    let (_, from_ldif, _) = lookup(&config, &args);
    let body = |s: &str| s.lines().skip(1).collect::<Vec<_>>().join("\n");
    assert_eq!(body(&from_ldap), body(&from_ldif));
    assert!(
        from_ldap.contains(
            "client certificate names accepted for this ASID: consumer.dev.local, opentest.dev.local"
        ),
        "{from_ldap}"
    );
    assert!(!from_ldap.contains("unusable"), "{from_ldap}");
}
