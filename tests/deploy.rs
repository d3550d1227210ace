//! deploy/: the Prometheus configuration and alert rules pass `promtool check` and the rules'
//! unit tests (`promtool test rules`), where every rule has a case that fires and one that does
//! not; every rule has a description and a runbook_url to its section of the README's "Alerts";
//! every metric the rules and the Grafana dashboard name is one the gateway exposes, and every
//! dashboard query parses (`promtool check rules`); the Kubernetes manifests, container build
//! and systemd unit carry the properties the project promises (probes on the admin endpoints,
//! non-root, read-only root filesystem, the audit volume, resources, spread, HPA, PDB). The
//! container image is not built here (no container engine on the test machines).

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use common::repo_path;
use ssp_gateway::config::Config;
use ssp_gateway::metrics::Metrics;

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo_path(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn promtool(args: &[&str], dir: &Path) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect(
            "promtool (Debian package prometheus) must be installed: scripts/test.sh installs it",
        );
    assert!(
        out.status.success(),
        "promtool {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn prometheus_config_and_alert_rules_pass_promtool_and_their_unit_tests() {
    let dir = repo_path("deploy/prometheus");
    promtool(&["check", "rules", "alerts.yml"], &dir);
    promtool(&["check", "config", "prometheus.yml"], &dir);
    promtool(&["test", "rules", "alerts.test.yml"], &dir);
    let rules = read("deploy/prometheus/alerts.yml");
    for alert in [
        "SspGatewayHighErrorRatio",
        "SspGatewayHighLatencyP99",
        "SspGatewayAuditUnwritable",
        "SspGatewayAuditWriteErrors",
        "SspGatewayCertificateExpiresSoon",
        "SspGatewayDirectoryServingStale",
        "SspGatewayRevokedCertificateStillInUse",
        "SspGatewayCrlNextUpdateSoon",
        "SspGatewayCrlStale",
        "SspGatewayReloadRefused",
        "SspGatewayNotScraped",
        "SspGatewayUpstreamCircuitOpen",
        "SspGatewayUpstreamCircuitFlapping",
        "SspGatewayDirectoryBackendErrors",
        "SspGatewayDirectoryUnavailable",
        "SspGatewayNotReady",
    ] {
        assert!(
            rules.contains(&format!("alert: {alert}")),
            "{alert} missing"
        );
    }
    assert!(rules.contains("ssp_certificate_expiry_seconds < 14 * 86400"));
    // Not ready on any of /readyz's checks, each alert naming its check; `all` would only
    // repeat the failing one.
    assert!(rules.contains("expr: ssp_ready{check!=\"all\"} == 0\n"));
    // Every rule has a unit test case in alerts.test.yml.
    let cases = read("deploy/prometheus/alerts.test.yml");
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 24, "{alerts:?}");
    for alert in &alerts {
        // Each rule has a case where it fires and one where it does not (`exp_alerts: []`).
        let expected: Vec<&str> = cases
            .split(&format!("alertname: {alert}\n"))
            .skip(1)
            .map(|rest| rest.lines().next().unwrap_or_default().trim())
            .collect();
        assert!(
            expected.contains(&"exp_alerts: []"),
            "{alert} has no case in alerts.test.yml where it does not fire"
        );
        assert!(
            expected
                .iter()
                .any(|e| e.starts_with("exp_alerts:") && *e != "exp_alerts: []"),
            "{alert} has no case in alerts.test.yml where it fires"
        );
    }
    // Every rule says what happened (description) and where the runbook is: its section of the
    // README's "Alerts", which has one section per rule and no other.
    let readme = read("README.md");
    let runbook = readme
        .split_once("\n## Alerts\n")
        .and_then(|(_, rest)| rest.split("\n## ").next())
        .expect("README has an \"Alerts\" section");
    let sections: Vec<&str> = runbook
        .lines()
        .filter_map(|l| l.strip_prefix("### "))
        .collect();
    assert_eq!(
        sections.iter().copied().collect::<BTreeSet<_>>(),
        alerts.iter().copied().collect::<BTreeSet<_>>(),
        "README \"Alerts\" has one section per rule"
    );
    for rule in rules.split("\n      - alert: ").skip(1) {
        let alert = rule.lines().next().unwrap_or_default().trim();
        assert!(
            rule.contains("\n          description: \""),
            "{alert} has no description"
        );
        // GitHub's anchor of the heading `### SspGatewayX`.
        let anchor = format!(
            "\n          runbook_url: \"README.md#{}\"\n",
            alert.to_ascii_lowercase()
        );
        assert!(
            rule.contains(&anchor),
            "{alert} has no runbook_url to its README section"
        );
    }
    // Every `job=` matcher names the job both scrape setups give the gateway: the static
    // config's job_name, and the PodMonitor's jobLabel pod label's value.
    let prometheus = read("deploy/prometheus/prometheus.yml");
    assert!(prometheus.contains("  - job_name: ssp-gateway\n"));
    let podmonitor = read("deploy/kubernetes/podmonitor.yaml");
    assert!(
        podmonitor.contains("\n  jobLabel: app.kubernetes.io/name\n"),
        "without jobLabel the Prometheus Operator sets job=\"<namespace>/<name>\""
    );
    let deployment = read("deploy/kubernetes/deployment.yaml");
    assert!(
        deployment.contains("  template:\n    metadata:\n      labels:\n        app.kubernetes.io/name: ssp-gateway\n"),
        "the pod template carries the jobLabel label"
    );
    let jobs: Vec<&str> = rules
        .match_indices("job=")
        .map(|(i, _)| &rules[i..])
        .collect();
    assert!(!jobs.is_empty());
    for job in jobs {
        assert!(
            job.starts_with("job=\"ssp-gateway\"") || job.starts_with("job=\\\"ssp-gateway\\\""),
            "{}",
            &job[..job.len().min(40)]
        );
    }
}

/// Every metric family name the gateway can expose.
fn exposed_names() -> BTreeSet<String> {
    let m = Metrics::new();
    m.observe_request(Some("read_metadata"), 200, 0.001);
    m.rejections.with_label_values(&["invalid_jwt"]).inc();
    m.upstream_duration
        .with_label_values(&["read_metadata"])
        .observe(0.001);
    m.overhead_duration
        .with_label_values(&["read_metadata"])
        .observe(0.0001);
    m.tls_handshake_failures
        .with_label_values(&["unknown_issuer"])
        .inc();
    m.upstream_connect_errors.with_label_values(&["tcp"]).inc();
    m.http_refused_heads.with_label_values(&["framing"]).inc();
    m.register_certificates(Arc::new(|| vec![("server", 0)]));
    m.register_directory_stats(Arc::new(|| [1, 2, 3, 4, 5]));
    m.register_crl_next_update(Arc::new(|| vec![("listener", Some(0))]));
    m.reloads.register_component("policy");
    ssp_gateway::admin::Readiness::with_audit(Arc::new(AtomicBool::new(true))).register_metrics(&m);
    let text = String::from_utf8(m.render()).expect("utf-8");
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_owned)
        .collect()
}

/// Metric names (`ssp_*`, `process_*`) mentioned in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| t.starts_with("ssp_") || t.starts_with("process_"))
        .map(str::to_owned)
        .collect()
}

fn assert_all_exposed(what: &str, names: &BTreeSet<String>, exposed: &BTreeSet<String>) {
    assert!(!names.is_empty(), "{what} names no metric");
    for name in names {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|b| exposed.contains(*b))
            .unwrap_or(name);
        assert!(
            exposed.contains(base),
            "{what} uses {name}, which the gateway does not expose ({exposed:?})"
        );
    }
}

#[test]
fn the_rules_and_the_dashboard_use_only_metrics_the_gateway_exposes() {
    let exposed = exposed_names();
    assert_all_exposed(
        "alerts.yml",
        &metric_names(&read("deploy/prometheus/alerts.yml")),
        &exposed,
    );

    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/ssp-gateway-dashboard.json"))
            .expect("the dashboard is JSON");
    assert_eq!(dashboard["uid"], "ssp-gateway");
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut exprs = String::new();
    let mut queries = Vec::new();
    let mut rows = Vec::new();
    for p in panels {
        if p["type"] == "row" {
            rows.push(p["title"].as_str().expect("row title").to_owned());
            continue;
        }
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
        for t in targets {
            let e = t["expr"].as_str().expect("expr");
            assert!(!e.trim().is_empty());
            exprs.push_str(e);
            exprs.push('\n');
            queries.push(e);
        }
    }
    for row in [
        "Traffic",
        "Errors",
        "Providers",
        "Latency",
        "Directory",
        "Audit trail",
        "Certificates and TLS",
        "Hot reload",
    ] {
        assert!(rows.iter().any(|r| r == row), "row {row} missing: {rows:?}");
    }
    let used = metric_names(&exprs);
    assert_all_exposed("the dashboard", &used, &exposed);
    for needed in [
        "ssp_requests_total",
        "ssp_rejections_total",
        "ssp_request_duration_seconds_bucket",
        "ssp_directory_stale_served_total",
        "ssp_audit_fsync_duration_seconds_bucket",
        "ssp_audit_commit_wait_seconds_bucket",
        "ssp_certificate_expiry_seconds",
        "ssp_upstream_circuits",
        "ssp_upstream_circuit_transitions_total",
        "ssp_upstream_retries_total",
        "ssp_directory_backend_errors_total",
        "ssp_reloads_total",
        "ssp_reload_last_ok",
        "ssp_ready",
    ] {
        assert!(
            used.contains(needed),
            "the dashboard does not show {needed}"
        );
    }
    assert!(exprs.contains("histogram_quantile(0.99"));

    // Every query is PromQL that parses: promtool checks them as recording rules, with
    // Grafana's variables given values.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (n, e) in queries.iter().enumerate() {
        let e = e
            .replace("$__rate_interval", "5m")
            .replace("$instance", ".*");
        rules.push_str(&format!(
            "      - record: dashboard:query_{n}\n        expr: {}\n",
            serde_json::Value::String(e)
        ));
    }
    let dir = common::scratch_dir("dashboard-queries");
    std::fs::write(dir.join("dashboard.yml"), rules).expect("write the queries");
    promtool(&["check", "rules", "dashboard.yml"], &dir);
}

#[test]
fn kubernetes_manifests_have_probes_security_audit_volume_and_scaling() {
    let k = "deploy/kubernetes";
    let kustomization = read(&format!("{k}/kustomization.yaml"));
    let mut kinds = String::new();
    for line in kustomization
        .lines()
        .map(str::trim)
        .filter_map(|l| l.strip_prefix("- "))
        .filter(|l| l.ends_with(".yaml"))
    {
        kinds.push_str(&read(&format!("{k}/{line}")));
    }
    for kind in [
        "kind: Deployment",
        "kind: Service",
        "kind: HorizontalPodAutoscaler",
        "kind: PodDisruptionBudget",
        "kind: PersistentVolumeClaim",
        "kind: NetworkPolicy",
    ] {
        assert!(
            kinds.contains(kind),
            "{kind} missing from the kustomization"
        );
    }
    assert!(kustomization.contains("configMapGenerator"));
    assert!(kustomization.contains("ssp-gateway-server-tls"));
    assert!(kustomization.contains("ssp-gateway-upstream-tls"));

    let d = read(&format!("{k}/deployment.yaml"));
    for needle in [
        // Explicit probe timeouts: /readyz never waits on the backend, and Kubernetes'
        // default of 1 s would drop a CPU-throttled pod.
        "readinessProbe:\n            httpGet:\n              path: /readyz\n              port: admin\n            timeoutSeconds: 2",
        "livenessProbe:\n            httpGet:\n              path: /healthz\n              port: admin\n            timeoutSeconds: 2",
        "startupProbe:\n            httpGet:\n              path: /healthz\n              port: admin\n            timeoutSeconds: 2",
        "runAsNonRoot: true",
        "readOnlyRootFilesystem: true",
        "allowPrivilegeEscalation: false",
        "drop: [\"ALL\"]",
        "mountPath: /var/lib/ssp-gateway/audit",
        "subPathExpr: $(POD_NAME)",
        "claimName: ssp-gateway-audit",
        "topologySpreadConstraints:",
        "requests:\n              cpu:",
        "limits:\n              cpu:",
        "secretName: ssp-gateway-server-tls",
        "secretName: ssp-gateway-upstream-tls",
        "terminationGracePeriodSeconds: 45",
    ] {
        assert!(d.contains(needle), "deployment.yaml lacks {needle:?}");
    }

    // The configuration it mounts is valid, listens where the Deployment probes, and audits
    // to the volume.
    let config =
        Config::load(&repo_path(&format!("{k}/gateway.toml"))).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.admin.address.port(), 9100);
    assert_eq!(config.listener.address.port(), 8443);
    assert_eq!(
        config.audit.dir,
        Path::new("/var/lib/ssp-gateway/audit").to_path_buf()
    );
    assert!(config.mock_provider.is_none());
    assert!(!config.dev.generate_certs);
}

#[test]
fn the_container_build_is_multi_stage_and_non_root_and_the_unit_is_hardened() {
    let f = read("deploy/container/Dockerfile");
    let stages = f.lines().filter(|l| l.starts_with("FROM ")).count();
    assert!(stages >= 2, "multi-stage build");
    assert!(f.contains("FROM gcr.io/distroless/cc-debian12:nonroot"));
    assert!(f.contains("USER 65532:65532"));
    assert!(f.contains("--read-only"));
    assert!(f.contains("VOLUME [\"/var/lib/ssp-gateway/audit\"]"));

    let u = read("deploy/systemd/ssp-gateway.service");
    for needle in [
        "DynamicUser=yes",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=\n",
        "ProtectSystem=strict",
        "StateDirectory=ssp-gateway ssp-gateway/audit",
        "SystemCallFilter=@system-service",
        "MemoryDenyWriteExecute=yes",
        "UMask=0077",
        "ExecStartPre=/usr/local/bin/ssp-gateway check-config",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ] {
        assert!(u.contains(needle), "the unit lacks {needle:?}");
    }
}
