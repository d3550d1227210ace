//! SIGHUP reloads the LDIF directory of a running gateway (file polling off). In its own test
//! binary: the signal goes to the whole test process.

mod common;

use std::time::{Duration, Instant};

use common::*;
use http::Method;

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_directory() {
    // Listen for SIGHUP here first, so the signal can never take the default action (exit)
    // before the gateway's watcher has installed its own listener.
    let _guard = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .expect("listen for SIGHUP");

    let ldif_path = scratch_dir("sighup").join("directory.ldif");
    let written = ldif_path.clone();
    let opts = GatewayOptions {
        directory: Some(Box::new(move |ldif: &str| {
            std::fs::write(&written, ldif).expect("write LDIF");
            format!(
                "ldif_file = \"{}\"\nldif_poll_interval = \"off\"\n",
                written.display()
            )
        })),
        ..Default::default()
    };
    let h = start_with_recorder(World::ecdsa(), Behaviour::Echo, opts).await;
    let readonly = h.world.client(&h.world.readonly, h.gateway);
    let metadata = || {
        Gpc::new(
            Method::GET,
            format!("{}/metadata", h.endpoint()),
            IX_METADATA,
        )
        .from(READONLY_ASID)
    };
    assert_eq!(readonly.gpc(metadata()).await.status, 200);

    let original = std::fs::read_to_string(&ldif_path).expect("read LDIF");
    let without = edit_entry(
        &original,
        &["uniqueIdentifier: 200000000360", "objectClass: nhsAs"],
        "nhsAsSvcIA: urn:nhs:names:services:gpconnect:fhir:rest:read:metadata-1",
    );
    std::fs::write(&ldif_path, &without).expect("write LDIF");

    // Polling is off: only the signal reloads. Signal until the change shows (the watcher may
    // not have started listening when the first one arrives).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = std::process::Command::new("kill")
            .args(["-HUP", &std::process::id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
        if readonly.gpc(metadata()).await.status == 403 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "SIGHUP never reloaded the directory"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    readonly.gpc(metadata()).await.assert_outcome(
        403,
        Some("ACCESS_DENIED"),
        &format!("ASID_CHECK_FAILED_MESSAGESENDER_{READONLY_ASID}"),
    );
    h.stop().await;
}
