//! Watches the CRLs in force (the listener's, the upstream client's and the LDAPS directory
//! client's) and says, once, when
//! they matter: a WARN line when CRLs with less than [`LITTLE_LEFT`] to their nextUpdate are
//! taken into force (at start or by a reload), an ERROR line when the CRLs in force pass their
//! nextUpdate (from then every check against them fails: for the listener, every consumer
//! handshake, a total outage), and an INFO line when current CRLs replace stale ones. The
//! per-handshake `TLS handshake failed … crl_expired` lines are the server's, unchanged. The
//! gateway's own certificates (server, upstream client, LDAPS directory client) are watched
//! alike ([`watch_certificates`]): a WARN line when one with less than 14 days left is taken
//! into force, an ERROR line when the one in force runs out. It only reads the TLS snapshots in
//! force and logs; it never changes them.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::metrics::CrlHorizonsFn;

/// CRLs taken into force with less than this left to their nextUpdate are warned of (the
/// `SspGatewayCrlNextUpdateSoon` alert's threshold).
pub const LITTLE_LEFT: Duration = Duration::from_secs(12 * 3600);

/// How often the CRLs in force are looked at: a stale CRL is logged at most this late, and a
/// reload's CRLs this long after it.
const EVERY: Duration = Duration::from_secs(1);

/// Something worth one log line about a component's CRLs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CrlEvent {
    /// CRLs whose earliest nextUpdate is `next_update`, `left` seconds away (less than
    /// [`LITTLE_LEFT`]), are now in force.
    LittleLeft {
        component: &'static str,
        next_update: u64,
        left: u64,
    },
    /// The CRLs in force passed their nextUpdate.
    Stale {
        component: &'static str,
        next_update: u64,
    },
    /// Current CRLs replaced stale ones.
    CurrentAgain { component: &'static str },
}

/// What was last seen of one component's CRLs.
#[derive(Debug)]
struct Seen {
    component: &'static str,
    horizon: Option<u64>,
    stale: bool,
}

/// The decisions, apart from the clock and the log: fed what is in force at each look.
#[derive(Debug)]
pub struct CrlWatch {
    seen: Vec<Seen>,
    /// Less than this left (seconds) when taken into force is warned of.
    little_left: u64,
}

impl Default for CrlWatch {
    fn default() -> Self {
        CrlWatch::warning_within(LITTLE_LEFT)
    }
}

impl CrlWatch {
    /// A watch that warns of what is taken into force with less than `little_left` left.
    pub fn warning_within(little_left: Duration) -> Self {
        CrlWatch {
            seen: Vec::new(),
            little_left: little_left.as_secs(),
        }
    }

    /// The events since the last look, given the earliest nextUpdate (unix seconds) of each
    /// component's CRLs in force at `now` (`None`: no CRLs, or none with a nextUpdate). New
    /// CRLs are told apart by their earliest nextUpdate: a reload that leaves it unchanged
    /// says nothing again.
    pub fn observe(&mut self, now: u64, horizons: &[(&'static str, Option<u64>)]) -> Vec<CrlEvent> {
        let mut events = Vec::new();
        let little_left = self.little_left;
        for &(component, horizon) in horizons {
            let i = match self.seen.iter().position(|s| s.component == component) {
                Some(i) => i,
                None => {
                    self.seen.push(Seen {
                        component,
                        horizon: None,
                        stale: false,
                    });
                    self.seen.len() - 1
                }
            };
            let seen = &mut self.seen[i];
            if horizon != seen.horizon {
                let was_stale = seen.stale;
                seen.horizon = horizon;
                seen.stale = false;
                if let Some(h) = horizon.filter(|h| *h > now) {
                    if was_stale {
                        events.push(CrlEvent::CurrentAgain { component });
                    }
                    if h - now < little_left {
                        events.push(CrlEvent::LittleLeft {
                            component,
                            next_update: h,
                            left: h - now,
                        });
                    }
                } else if horizon.is_none() && was_stale {
                    events.push(CrlEvent::CurrentAgain { component });
                }
            }
            if let Some(h) = horizon {
                if now >= h && !seen.stale {
                    seen.stale = true;
                    events.push(CrlEvent::Stale {
                        component,
                        next_update: h,
                    });
                }
            }
        }
        events
    }
}

/// `unix` seconds as RFC 3339 UTC, for log lines.
fn time(unix: u64) -> String {
    i64::try_from(unix)
        .ok()
        .and_then(|s| chrono::DateTime::from_timestamp(s, 0))
        .map_or_else(
            || unix.to_string(),
            |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        )
}

/// What a stale CRL of `component` stops.
fn consequence(component: &str) -> &'static str {
    match component {
        "listener" => "every consumer TLS handshake is refused (crl_expired) and /readyz is not ready until a current CRL is loaded",
        "upstream" => "every new provider connection is refused and /readyz is not ready until a current CRL is loaded",
        "directory" => "every new LDAPS connection is refused (the one open is retired at the nextUpdate), so directory lookups fail and cached parties are served only up to max_stale until a current CRL is loaded",
        _ => "every certificate checked against them is refused until a current CRL is loaded",
    }
}

/// Logs the [`CrlEvent`]s of the CRLs `horizons` reads, looking every second, until `shutdown`.
pub async fn watch(horizons: CrlHorizonsFn, shutdown: CancellationToken) {
    let mut watch = CrlWatch::default();
    every_second(shutdown, || {
        for event in watch.observe(crate::unix_now(), &horizons()) {
            match event {
                CrlEvent::LittleLeft {
                    component,
                    next_update,
                    left,
                } => tracing::warn!(
                    component,
                    next_update = %time(next_update),
                    left = %humantime::format_duration(Duration::from_secs(left)),
                    "CRLs taken into force run out soon: publish a newer CRL before their \
                     nextUpdate, or {}",
                    consequence(component)
                ),
                CrlEvent::Stale {
                    component,
                    next_update,
                } => tracing::error!(
                    component,
                    next_update = %time(next_update),
                    "CRLs in force have passed their nextUpdate: {}",
                    consequence(component)
                ),
                CrlEvent::CurrentAgain { component } => {
                    tracing::info!(component, "current CRLs are in force again")
                }
            }
        }
    })
    .await
}

/// Runs `look` every [`EVERY`] until `shutdown`.
async fn every_second(shutdown: CancellationToken, mut look: impl FnMut()) {
    loop {
        look();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(EVERY) => {}
        }
    }
}

/// Own certificates taken into force with less than this left are warned of (the
/// `SspGatewayCertificateExpiresSoon` alert's threshold).
pub const CERTIFICATE_LITTLE_LEFT: Duration = Duration::from_secs(14 * 24 * 3600);

/// What the gateway's own certificate `role` (as `ssp_certificate_expiry_seconds` names it)
/// stops once it has run out.
fn certificate_consequence(role: &str) -> &'static str {
    match role {
        "server" => "consumers refuse the gateway's TLS handshake (certificate expired), so every request fails",
        "upstream_client" => "providers refuse the gateway's client certificate, so every new provider connection fails (502)",
        "directory_client" => "the directory refuses the gateway's client certificate, so directory lookups fail and cached parties are served only up to max_stale",
        _ => "every TLS handshake it is presented in fails",
    }
}

/// Logs, for the gateway's own certificates that `expiries` reads (`server`,
/// `upstream_client`, `directory_client`; CA bundles are not the gateway's to renew), a WARN
/// line when one with less than [`CERTIFICATE_LITTLE_LEFT`] left is taken into force (at start
/// or by a reload), an ERROR line when the one in force runs out, and an INFO line when a
/// current one replaces it; looking every second, until `shutdown`.
pub async fn watch_certificates(
    expiries: crate::metrics::CertificateExpiriesFn,
    shutdown: CancellationToken,
) {
    let mut watch = CrlWatch::warning_within(CERTIFICATE_LITTLE_LEFT);
    let own = |expiries: Vec<(&'static str, i64)>| -> Vec<(&'static str, Option<u64>)> {
        expiries
            .into_iter()
            .filter(|(role, _)| matches!(*role, "server" | "upstream_client" | "directory_client"))
            .map(|(role, not_after)| (role, Some(u64::try_from(not_after).unwrap_or(0))))
            .collect()
    };
    every_second(shutdown, || {
        for event in watch.observe(crate::unix_now(), &own(expiries())) {
            match event {
                CrlEvent::LittleLeft {
                    component,
                    next_update,
                    left,
                } => tracing::warn!(
                    certificate = component,
                    not_after = %time(next_update),
                    left = %humantime::format_duration(Duration::from_secs(left)),
                    "the certificate taken into force runs out soon: renew it before then, or {}",
                    certificate_consequence(component)
                ),
                CrlEvent::Stale {
                    component,
                    next_update,
                } => tracing::error!(
                    certificate = component,
                    not_after = %time(next_update),
                    "the certificate in force has run out: {}; renew it (a reload takes the new one)",
                    certificate_consequence(component)
                ),
                CrlEvent::CurrentAgain { component } => tracing::info!(
                    certificate = component,
                    "a current certificate is in force again"
                ),
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Own certificates: warned of within 14 days when taken into force (12 hours is the
    /// CRLs'), said once when one runs out, and once when a renewed one replaces it.
    #[test]
    fn a_certificate_is_warned_of_within_fourteen_days_and_when_it_runs_out() {
        let mut w = CrlWatch::warning_within(CERTIFICATE_LITTLE_LEFT);
        let now = 100 * 24 * HOUR;
        let not_after = now + 10 * 24 * HOUR;
        assert_eq!(
            w.observe(now, &[("server", Some(not_after))]),
            [CrlEvent::LittleLeft {
                component: "server",
                next_update: not_after,
                left: 10 * 24 * HOUR
            }]
        );
        assert_eq!(w.observe(not_after - 1, &[("server", Some(not_after))]), []);
        assert_eq!(
            w.observe(not_after, &[("server", Some(not_after))]),
            [CrlEvent::Stale {
                component: "server",
                next_update: not_after
            }]
        );
        assert_eq!(w.observe(not_after + 5, &[("server", Some(not_after))]), []);
        let renewed = not_after + 365 * 24 * HOUR;
        assert_eq!(
            w.observe(not_after + 6, &[("server", Some(renewed))]),
            [CrlEvent::CurrentAgain {
                component: "server"
            }]
        );
        // A CRL watch would not have warned of 10 days left.
        let mut crls = CrlWatch::default();
        assert_eq!(crls.observe(now, &[("listener", Some(not_after))]), []);
    }

    const HOUR: u64 = 3600;

    #[test]
    fn crls_with_plenty_left_say_nothing_until_they_go_stale_once() {
        let mut w = CrlWatch::default();
        let next = 1_000 + 48 * HOUR;
        let horizons = [("listener", Some(next)), ("upstream", None)];
        assert_eq!(w.observe(1_000, &horizons), []);
        assert_eq!(w.observe(next - 1, &horizons), []);
        assert_eq!(
            w.observe(next, &horizons),
            [CrlEvent::Stale {
                component: "listener",
                next_update: next
            }]
        );
        for later in [next + 1, next + 60, next + 10 * HOUR] {
            assert_eq!(w.observe(later, &horizons), [], "said once only");
        }
    }

    #[test]
    fn crls_taken_into_force_with_little_left_are_warned_of_once() {
        let mut w = CrlWatch::default();
        let now = 10 * HOUR;
        let next = now + 2 * HOUR;
        assert_eq!(
            w.observe(now, &[("listener", Some(next))]),
            [CrlEvent::LittleLeft {
                component: "listener",
                next_update: next,
                left: 2 * HOUR
            }],
            "at start"
        );
        assert_eq!(w.observe(now + 5, &[("listener", Some(next))]), []);
        // A reload with the same earliest nextUpdate says nothing again; one with a later
        // nextUpdate that is still close does.
        let reloaded = now + 11 * HOUR;
        assert_eq!(
            w.observe(now + 10, &[("listener", Some(reloaded))]),
            [CrlEvent::LittleLeft {
                component: "listener",
                next_update: reloaded,
                left: 11 * HOUR - 10
            }]
        );
        assert_eq!(
            w.observe(now + 20, &[("listener", Some(now + 12 * HOUR + 20))]),
            [],
            "exactly 12 hours left is not little"
        );
    }

    #[test]
    fn current_crls_after_stale_ones_are_said_and_stale_again_is_said_again() {
        let mut w = CrlWatch::default();
        assert_eq!(w.observe(100, &[("upstream", Some(100 + 24 * HOUR))]), []);
        let stale_at = 100 + 24 * HOUR;
        assert_eq!(
            w.observe(stale_at + 3, &[("upstream", Some(stale_at))]),
            [CrlEvent::Stale {
                component: "upstream",
                next_update: stale_at
            }]
        );
        let fresh = stale_at + 3 + 6 * HOUR;
        assert_eq!(
            w.observe(stale_at + 3, &[("upstream", Some(fresh))]),
            [
                CrlEvent::CurrentAgain {
                    component: "upstream"
                },
                CrlEvent::LittleLeft {
                    component: "upstream",
                    next_update: fresh,
                    left: 6 * HOUR
                }
            ]
        );
        assert_eq!(
            w.observe(fresh, &[("upstream", Some(fresh))]),
            [CrlEvent::Stale {
                component: "upstream",
                next_update: fresh
            }]
        );
        // The CRLs are removed from the configuration: nothing is checked against them now.
        assert_eq!(
            w.observe(fresh + 1, &[("upstream", None)]),
            [CrlEvent::CurrentAgain {
                component: "upstream"
            }]
        );
        assert_eq!(w.observe(fresh + 2, &[("upstream", None)]), []);
    }

    /// The LDAPS directory's CRLs (`ldap_crls`) are watched beside the listener's and the
    /// upstream's, and their stale line says what stops.
    #[test]
    fn the_directory_crls_are_watched_like_the_others() {
        let mut w = CrlWatch::default();
        let next = 1_000 + 2 * HOUR;
        let horizons = [
            ("listener", None),
            ("upstream", None),
            ("directory", Some(next)),
        ];
        assert_eq!(
            w.observe(1_000, &horizons),
            [CrlEvent::LittleLeft {
                component: "directory",
                next_update: next,
                left: 2 * HOUR
            }]
        );
        assert_eq!(
            w.observe(next, &horizons),
            [CrlEvent::Stale {
                component: "directory",
                next_update: next
            }]
        );
        assert!(consequence("directory").contains("LDAPS"));
    }

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(time(0), "1970-01-01T00:00:00Z");
        assert_eq!(time(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(time(u64::MAX), u64::MAX.to_string());
    }
}
