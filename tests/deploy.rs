//! deploy/: the Prometheus configuration and alert rules pass `promtool check` and the rules'
//! unit tests (`promtool test rules`), where every rule has a case that fires and one that does
//! not; every rule has a description and a runbook_url to its section of the README's "Alerts";
//! every metric the rules and the Grafana dashboard name is one the gateway exposes, and every
//! dashboard query parses (`promtool check rules`); the Kubernetes manifests, container build
//! and systemd unit carry the properties the project promises (probes on the admin endpoints,
//! non-root, read-only root filesystem, the audit volume, resources, spread, HPA, PDB); the
//! kustomization, read as kustomize renders it (its YAML parsed with PyYAML) and laid out as the
//! kubelet mounts it, mounts what the gateway hot-reloads as whole directories of stable-named
//! objects, revocation-checks consumers and providers with CRLs from a mount, and starts and
//! reloads a CRL there. The container image is not built here (no container engine on the test
//! machines), and neither kubectl nor a Kubernetes cluster runs.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use common::{free_port, repo_path};
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
        "SspGatewayDirectoryUnusableHandlers",
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
    m.register_directory_stats(Arc::new(ssp_gateway::directory::DirectoryStats::default));
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
        "ssp_directory_unusable_handlers_total",
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
    assert!(kustomization.contains("ssp-gateway-audit-key"));

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
        "secretName: ssp-gateway-audit-key",
        "- name: audit-key\n              mountPath: /etc/ssp-gateway/audit-key\n              readOnly: true",
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
    // The trail is keyed, with a key kept apart from the audit volume.
    let key_file = config.audit.key_file.as_deref().expect("audit.key_file");
    assert_eq!(
        key_file,
        Path::new("/etc/ssp-gateway/audit-key/audit-chain.key")
    );
    assert!(!key_file.starts_with(&config.audit.dir));
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

/// The YAML documents of `file` as JSON values, parsed by PyYAML (empty documents left out).
fn yaml_documents(file: &Path) -> Vec<serde_json::Value> {
    const TO_JSON: &str = "import sys, yaml, json; json.dump([d for d in \
        yaml.safe_load_all(sys.stdin) if d is not None], sys.stdout, default=str)";
    let input = std::fs::File::open(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let out = Command::new("python3")
        .args(["-c", TO_JSON])
        .stdin(input)
        .output()
        .expect("python3 must be installed: scripts/test.sh installs it");
    assert!(
        out.status.success(),
        "PyYAML (Debian package python3-yaml, which scripts/test.sh installs) on {}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("python3 prints a JSON list")
}

/// Asserts that `object` (a mapping) has no key outside `known`.
fn only_keys(what: &str, object: &serde_json::Value, known: &[&str]) {
    let map = object
        .as_object()
        .unwrap_or_else(|| panic!("{what} is not a mapping"));
    for key in map.keys() {
        assert!(
            known.contains(&key.as_str()),
            "{what} uses {key:?}, which this test does not read as kustomize would: \
             handle it in tests/deploy.rs `kustomize`"
        );
    }
}

/// A ConfigMap or Secret a generator of the kustomization makes.
struct Generated {
    kind: &'static str,
    /// The name as written, and as the pod template names it.
    name: String,
    /// Whether kustomize appends a hash of the contents to the name (and to every reference
    /// to it in the pod template): no `disableNameSuffixHash`, its own or `generatorOptions`'.
    hashed: bool,
    /// Its keys and their files' contents: what a volume of it holds.
    files: Vec<(String, Vec<u8>)>,
}

/// The kustomization in `dir` as `kustomize build` renders it, for the part of kustomize it
/// uses: the objects of its `resources` (files, as written), and the ConfigMaps and Secrets of
/// its `configMapGenerator` and `secretGenerator` (`files`, `key=path` or a bare path, with
/// `disableNameSuffixHash` per generator or in `generatorOptions`). `namespace`, `labels` and
/// `images` rename nothing and touch no volume, so are not applied. Any other kustomize field
/// (patches, name prefixes, bases, literals, ...) fails the test, to be handled here first.
fn kustomize(dir: &Path) -> (Vec<serde_json::Value>, Vec<Generated>) {
    let file = dir.join("kustomization.yaml");
    let docs = yaml_documents(&file);
    let [k] = &docs[..] else {
        panic!("{} holds {} documents, not one", file.display(), docs.len());
    };
    only_keys(
        "kustomization.yaml",
        k,
        &[
            "apiVersion",
            "kind",
            "namespace",
            "resources",
            "configMapGenerator",
            "secretGenerator",
            "generatorOptions",
            "labels",
            "images",
        ],
    );
    assert_eq!(k["apiVersion"], "kustomize.config.k8s.io/v1beta1");
    assert_eq!(k["kind"], "Kustomization");
    let list = |field: &str| match &k[field] {
        serde_json::Value::Null => Vec::new(),
        v => v
            .as_array()
            .unwrap_or_else(|| panic!("{field} is not a list"))
            .clone(),
    };

    let mut resources = Vec::new();
    for resource in list("resources") {
        let path = dir.join(resource.as_str().expect("a resource is a path"));
        assert!(
            path.is_file(),
            "resource {resource} is not a file (a base or remote resource is not read here)"
        );
        resources.extend(yaml_documents(&path));
    }

    only_keys(
        "generatorOptions",
        &k.get("generatorOptions")
            .cloned()
            .unwrap_or_else(|| serde_json::json!({})),
        &["disableNameSuffixHash"],
    );
    let no_hash = |options: &serde_json::Value| match &options["disableNameSuffixHash"] {
        serde_json::Value::Null => false,
        v => v.as_bool().expect("disableNameSuffixHash is true or false"),
    };
    let no_hash_anywhere = no_hash(&k["generatorOptions"]);
    let mut generated: Vec<Generated> = Vec::new();
    for (field, kind) in [
        ("configMapGenerator", "ConfigMap"),
        ("secretGenerator", "Secret"),
    ] {
        for g in list(field) {
            let known: &[&str] = if kind == "Secret" {
                &["name", "files", "options", "type"]
            } else {
                &["name", "files", "options"]
            };
            only_keys(field, &g, known);
            let name = g["name"].as_str().expect("a generator's name").to_owned();
            let what = format!("{field} {name}");
            if let Some(options) = g.get("options") {
                only_keys(
                    &format!("{what} options"),
                    options,
                    &["disableNameSuffixHash"],
                );
            }
            let mut files: Vec<(String, Vec<u8>)> = Vec::new();
            for entry in g["files"].as_array().expect("a generator's files") {
                let entry = entry.as_str().expect("a files entry is a string");
                let (key, path) = entry.split_once('=').unwrap_or_else(|| {
                    let key = Path::new(entry).file_name().expect("a file name");
                    (key.to_str().expect("UTF-8"), entry)
                });
                assert!(
                    files.iter().all(|(k, _)| k != key),
                    "{what} has key {key} twice"
                );
                let bytes =
                    std::fs::read(dir.join(path)).unwrap_or_else(|e| panic!("{what}: {path}: {e}"));
                files.push((key.to_owned(), bytes));
            }
            assert!(
                generated
                    .iter()
                    .all(|o| (o.kind, &*o.name) != (kind, &*name)),
                "{what} is generated twice"
            );
            generated.push(Generated {
                kind,
                hashed: !(no_hash_anywhere || no_hash(&g["options"])),
                name,
                files,
            });
        }
    }
    (resources, generated)
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir").flatten() {
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}

/// Writes `files` into `mount` as the kubelet lays out a ConfigMap or Secret volume: the
/// contents in a timestamped directory `stamp`, the `..data` link to it (replaced in one
/// rename, as the kubelet updates a volume), and each key a link through `..data`.
fn project(mount: &Path, stamp: &str, files: &[(String, Vec<u8>)]) {
    let dir = mount.join(stamp);
    std::fs::create_dir_all(&dir).expect("mkdir");
    for (key, bytes) in files {
        std::fs::write(dir.join(key), bytes).expect("write");
        let link = mount.join(key);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(key), link).expect("symlink");
        }
    }
    let tmp = mount.join("..data_tmp");
    std::os::unix::fs::symlink(stamp, &tmp).expect("symlink");
    std::fs::rename(&tmp, mount.join("..data")).expect("swap ..data");
}

/// Kills the gateway when the test ends, however it ends.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The Kubernetes example, read as kustomize renders it (`kustomize`), with a real PKI, CRLs
/// and LDIF in place of the files an operator puts in certs/, crls/ and files/, and laid out in
/// a scratch root as the kubelet mounts it: what the gateway hot-reloads comes from stable-named
/// ConfigMaps and Secrets mounted as whole directories (a subPath mount is never updated;
/// a hashed name makes every change a rollout), gateway.toml alone rolls the pods, every file
/// the config names is in a mount or the image, consumer and provider certificates are
/// revocation-checked against the mounted CRLs, and the gateway started on those mounts
/// (`check-config`, then `run`) refuses a consumer revoked by a CRL swapped in as the kubelet
/// swaps a volume's `..data`. (No Kubernetes cluster runs here: that the kubelet updates such
/// volumes in place and never a subPath is Kubernetes' documented behaviour, not tested.)
#[tokio::test]
async fn kubernetes_hot_reloaded_files_are_stable_named_whole_mounts_and_crls_are_checked() {
    let world = common::World::ecdsa();
    let scratch = common::scratch_dir("k8s-example");
    let kustomization = scratch.join("kustomize");
    copy_tree(&repo_path("deploy/kubernetes"), &kustomization);
    let pem = |p: &Path| std::fs::read(p).expect("read PEM");
    let crl_pem = pem(&world.crl);
    let crl_der = <rustls_pki_types::CertificateRevocationListDer as rustls_pki_types::pem::PemObject>::from_pem_slice(&crl_pem)
        .expect("CRL PEM");
    for (file, bytes) in [
        ("certs/gateway.pem", pem(&world.gateway.cert)),
        ("certs/gateway-key.pem", pem(&world.gateway.key)),
        ("certs/gateway-client.pem", pem(&world.gateway_client.cert)),
        (
            "certs/gateway-client-key.pem",
            pem(&world.gateway_client.key),
        ),
        ("certs/consumer-ca.pem", pem(&world.ca)),
        ("certs/provider-ca.pem", pem(&world.ca)),
        // A distribution point serves DER; PEM works as well.
        ("crls/consumer-ca.crl", crl_der.to_vec()),
        ("crls/provider-ca.crl", crl_pem.clone()),
        (
            "files/directory.ldif",
            pem(&repo_path("config/directory.ldif")),
        ),
        (
            "certs/audit-chain.key",
            b"a test audit chain key of 40 bytes......".to_vec(),
        ),
    ] {
        std::fs::write(kustomization.join(file), bytes).expect("write placeholder");
    }
    let (resources, generated) = kustomize(&kustomization);
    let generated = |kind: &str, name: &str| {
        generated
            .iter()
            .find(|g| g.kind == kind && g.name == name)
            .unwrap_or_else(|| panic!("no generator makes {kind} {name}"))
    };

    // What hot-reloads keeps its name (kustomize adds no hash suffix), so an update changes
    // the object in place rather than the pod template.
    let stable = [
        ("ConfigMap", "ssp-gateway-directory"),
        ("ConfigMap", "ssp-gateway-listener-trust"),
        ("ConfigMap", "ssp-gateway-upstream-trust"),
        ("Secret", "ssp-gateway-server-tls"),
        ("Secret", "ssp-gateway-upstream-tls"),
    ];
    for (kind, name) in stable {
        assert!(
            !generated(kind, name).hashed,
            "{kind} {name} gets a hashed name (no disableNameSuffixHash): every change rolls the pods"
        );
    }
    let deployment = resources
        .iter()
        .find(|o| o["kind"] == "Deployment" && o["metadata"]["name"] == "ssp-gateway")
        .expect("the Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let volumes = pod["volumes"].as_array().expect("volumes");
    let volume = |name: &str| {
        volumes
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no volume {name}"))
    };
    // gateway.toml's ConfigMap has a hashed name, which kustomize writes into the pod
    // template: a change to it rolls the pods.
    let config_map = volume("config")["configMap"]["name"]
        .as_str()
        .expect("the config volume is a ConfigMap");
    assert!(
        generated("ConfigMap", config_map).hashed,
        "gateway.toml's ConfigMap {config_map:?} should carry its content hash"
    );
    // The audit chain key is read at start only: a new one rolls the pods.
    let audit_key = volume("audit-key")["secret"]["secretName"]
        .as_str()
        .expect("the audit key volume is a Secret");
    assert!(
        generated("Secret", audit_key).hashed,
        "the audit key's Secret {audit_key:?} should carry its content hash"
    );

    let container = &pod["containers"][0];
    let args: Vec<&str> = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("arg"))
        .collect();
    assert_eq!(args[..2], ["run", "--config"]);
    let config_path = Path::new(args[2]);

    // Lay the pod's filesystem out under `root`: every mount as the kubelet makes it, the
    // image's interaction catalogue where the Dockerfile puts it.
    let root = scratch.join("pod");
    let rooted = |p: &Path| root.join(p.strip_prefix("/").expect("absolute path"));
    let (gateway_port, admin_port) = (free_port(), free_port());
    // (mount path, object kind, object name, keys)
    let mut mounts: Vec<(String, String, String, Vec<String>)> = Vec::new();
    for mount in container["volumeMounts"].as_array().expect("volumeMounts") {
        let name = mount["name"].as_str().expect("mount name");
        let path = mount["mountPath"].as_str().expect("mountPath");
        let v = volume(name);
        let (kind, object_name) = if let Some(n) = v["configMap"]["name"].as_str() {
            ("ConfigMap", n)
        } else if let Some(n) = v["secret"]["secretName"].as_str() {
            ("Secret", n)
        } else {
            assert_eq!(name, "audit", "only the audit volume is neither");
            std::fs::create_dir_all(rooted(Path::new(path))).expect("mkdir audit");
            continue;
        };
        assert!(
            mount.get("subPath").is_none() && mount.get("subPathExpr").is_none(),
            "{name} is mounted with a subPath, which the kubelet never updates"
        );
        assert!(
            v["configMap"].get("items").is_none() && v["secret"].get("items").is_none(),
            "{name} projects only some keys"
        );
        let mut files = generated(kind, object_name).files.clone();
        if name == "config" {
            // Run it here: paths under `root`, listeners on free loopback ports.
            for (key, bytes) in &mut files {
                if Path::new(path).join(&*key) == config_path {
                    *bytes = String::from_utf8(bytes.clone())
                        .expect("UTF-8")
                        .replace("\"/", &format!("\"{}/", root.display()))
                        .replace("0.0.0.0:8443", &format!("127.0.0.1:{gateway_port}"))
                        .replace("0.0.0.0:9100", &format!("127.0.0.1:{admin_port}"))
                        .into_bytes();
                }
            }
        }
        project(
            &rooted(Path::new(path)),
            "..2026_01_01_00_00_00.000000001",
            &files,
        );
        let keys = files.into_iter().map(|(k, _)| k).collect();
        mounts.push((
            path.to_owned(),
            kind.to_owned(),
            object_name.to_owned(),
            keys,
        ));
    }
    let dockerfile = read("deploy/container/Dockerfile");
    let catalogue = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("COPY config/interactions.toml "))
        .map(Path::new)
        .expect("the image ships the interaction catalogue");
    std::fs::create_dir_all(rooted(catalogue).parent().expect("parent")).expect("mkdir");
    std::fs::copy(repo_path("config/interactions.toml"), rooted(catalogue)).expect("copy");

    let config = Config::load(&rooted(config_path)).unwrap_or_else(|e| panic!("{e}"));
    let in_pod = |p: &Path| {
        Path::new("/").join(
            p.strip_prefix(&root)
                .unwrap_or_else(|_| panic!("{} is outside the pod", p.display())),
        )
    };
    // The catalogue is the image's, and no mount hides it.
    assert_eq!(in_pod(&config.policy.interactions_file), catalogue);
    for (path, ..) in &mounts {
        assert!(
            !catalogue.starts_with(path),
            "{path} is mounted over the image's {}",
            catalogue.display()
        );
    }
    // The audit chain key comes from a Secret mounted whole and read-only, apart from the audit
    // volume.
    let key_file = in_pod(config.audit.key_file.as_deref().expect("audit.key_file"));
    let key_mount = container["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .find(|m| {
            m["mountPath"]
                .as_str()
                .is_some_and(|p| key_file.parent() == Some(Path::new(p)))
        })
        .expect("the audit key's mount");
    assert_eq!(
        key_mount["readOnly"], true,
        "the audit key is mounted writable"
    );
    let (_, kind, _, keys) = mounts
        .iter()
        .find(|(path, ..)| key_file.parent() == Some(Path::new(path)))
        .expect("the audit key's mount");
    assert_eq!(kind, "Secret");
    assert!(keys.iter().any(|k| key_file.ends_with(k)));
    assert!(!key_file.starts_with(in_pod(&config.audit.dir)));

    // Every file the gateway hot-reloads is a key of a stable-named object mounted whole.
    let ssp_gateway::config::DirectoryBackendConfig::Ldif { file: ldif, .. } =
        &config.directory.backend
    else {
        panic!("the example's directory is an LDIF");
    };
    let (listener, upstream) = (&config.listener.tls, &config.upstream.tls);
    assert!(
        !listener.crls.is_empty(),
        "consumer certificates are not revocation-checked"
    );
    assert!(
        !upstream.crls.is_empty(),
        "provider certificates are not revocation-checked"
    );
    let mut reloaded = vec![
        &listener.cert,
        &listener.key,
        &listener.client_ca,
        &upstream.cert,
        &upstream.key,
        &upstream.ca,
        ldif,
    ];
    reloaded.extend(listener.crls.iter().chain(&upstream.crls));
    for file in reloaded {
        let file = in_pod(file);
        let (dir, key) = (
            file.parent().expect("dir").to_string_lossy(),
            file.file_name().expect("name").to_string_lossy(),
        );
        let (_, kind, name, _) = mounts
            .iter()
            .find(|(path, .., keys)| *path == dir && keys.iter().any(|k| *k == key))
            .unwrap_or_else(|| panic!("{} is in no mount", file.display()));
        assert!(
            stable.contains(&(kind.as_str(), name.as_str())),
            "{} comes from {kind} {name}, which is not stable-named",
            file.display()
        );
    }

    // The gateway accepts everything mounted (each CRL signed by a CA of its bundle, current).
    let check = Command::new(env!("CARGO_BIN_EXE_ssp-gateway"))
        .args(["check-config", "--config"])
        .arg(rooted(config_path))
        .output()
        .expect("run check-config");
    assert!(
        check.status.success(),
        "check-config: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );

    // Started on those mounts, it refuses the certificate the mounted CRL revokes; a new CRL
    // swapped in as the kubelet updates the ConfigMap's volume is in force at the next poll.
    let mut gateway_process = Running(
        Command::new(env!("CARGO_BIN_EXE_ssp-gateway"))
            .args(["run", "--config"])
            .arg(rooted(config_path))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn ssp-gateway run"),
    );
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], admin_port));
    let gateway = std::net::SocketAddr::from(([127, 0, 0, 1], gateway_port));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while tokio::net::TcpStream::connect(admin).await.is_err()
        || common::http_get(admin, "/readyz").await.0 != 200
    {
        assert!(std::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let consumer = world.client(&world.consumer, gateway);
    assert!(consumer.handshake().await.is_ok(), "consumer refused");
    let revoked = world.client(&world.revoked, gateway);
    assert!(
        revoked.handshake().await.is_err(),
        "a revoked consumer was let in"
    );

    let trust = mounts
        .iter()
        .find(|(.., name, _)| name == "ssp-gateway-listener-trust")
        .expect("the listener-trust mount");
    let crl = in_pod(&listener.crls[0]);
    // (The world does not keep the first revoked certificate as issued: this CRL, a later
    // one of the same CA, revokes the consumer alone.)
    let newer = world.authority.crl(&[&world.consumer_issued]).expect("CRL");
    let files: Vec<(String, Vec<u8>)> = trust
        .3
        .iter()
        .map(|key| {
            let bytes = if Path::new(&trust.0).join(key) == crl {
                newer.clone().into_bytes()
            } else {
                std::fs::read(rooted(Path::new(&trust.0)).join(key)).expect("read")
            };
            (key.clone(), bytes)
        })
        .collect();
    project(
        &rooted(Path::new(&trust.0)),
        "..2026_01_01_00_00_00.000000002",
        &files,
    );
    let series = "ssp_reloads_total{component=\"listener TLS\",result=\"ok\"}";
    while common::sample(&common::http_get(admin, "/metrics").await.1, series) != Some(1.0) {
        assert!(
            std::time::Instant::now() < deadline,
            "the new CRL was not reloaded"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(
        consumer.handshake().await.is_err(),
        "the consumer revoked by the new CRL was let in"
    );

    // Requests the gateway refuses are audited; stopped, its trail verifies with the key the
    // Secret holds, and only with it.
    for _ in 0..2 {
        let answer = world
            .client(&world.gateway_client, gateway)
            .gpc(common::Gpc::new(
                http::Method::GET,
                "not-a-target".into(),
                common::IX_METADATA,
            ))
            .await;
        assert_eq!(answer.status, 400, "{}", answer.text());
    }
    let term = Command::new("kill")
        .args(["-TERM", &gateway_process.0.id().to_string()])
        .status()
        .expect("kill");
    assert!(term.success());
    let status = gateway_process.0.wait().expect("wait");
    assert!(status.success(), "{status}");
    let audit_dir = rooted(&in_pod(&config.audit.dir));
    let verify = |keys: &[&Path]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ssp-gateway"));
        cmd.args(["audit", "verify"]);
        for k in keys {
            cmd.arg("--key").arg(k);
        }
        cmd.arg(audit_dir.join("audit.jsonl"));
        let out = cmd.output().expect("audit verify");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let key = rooted(&key_file);
    let (code, out) = verify(&[&key]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("ok: 2 records"), "{out}");
    let (code, out) = verify(&[]);
    assert_eq!(code, Some(1), "keyed, so not a SHA-256 chain: {out}");
}
