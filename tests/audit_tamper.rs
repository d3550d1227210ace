//! The audit trail against someone who can write its files, with the gateway binary really
//! started. A keyed trail (`[audit] key_file`): every record's `prev` is the HMAC-SHA256 of the
//! line before under the key, so a trail rewritten and chained again by someone without the key
//! fails `audit verify --key`; key files that are not keys stop `check-config` and `run`; a key
//! change waits for a restart, after which the trail verifies with both keys; the development
//! configuration makes and uses its key. Its end, which no chain protects, anchored outside
//! it: the head the gateway logs (`--head`) and `ssp_audit_last_seq` (`--min-seq`) catch
//! records cut off the end. A line cut short is tolerated only at the very end of the trail,
//! and what the gateway moves aside at start is reported without guessing its cause.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use http::{Method, StatusCode};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A recording provider for `world`, and its port.
async fn provider(world: &World, stop: &CancellationToken) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    serve_recorder(
        world,
        listener,
        Recorder::new(Behaviour::Echo),
        stop.clone(),
    );
    port
}

/// A configuration for the binary (`spawned_config`, `audit` keys in its `[audit]` section,
/// logging at info: the trail's open, head and closing lines are what these tests read): its
/// path, the gateway and admin addresses, and the audit directory.
fn config_for(
    world: &World,
    provider_port: u16,
    audit: &str,
) -> (PathBuf, SocketAddr, SocketAddr, PathBuf) {
    let (config, gateway, admin, dir) =
        spawned_config(world, provider_port, &format!("[audit]\n{audit}"));
    let text = std::fs::read_to_string(&config).expect("read config");
    assert!(text.contains("level = \"warn\""), "{text}");
    std::fs::write(
        &config,
        text.replacen("level = \"warn\"", "level = \"info\"", 1),
    )
    .expect("write config");
    (config, gateway, admin, dir)
}

/// `n` metadata requests through the gateway, each answered 200.
async fn requests(world: &World, g: &Spawned, provider_port: u16, n: usize) {
    for _ in 0..n {
        let a = world
            .client(&world.consumer, g.gateway)
            .gpc(Gpc::new(
                Method::GET,
                format!("{}/metadata", endpoint(provider_port)),
                IX_METADATA,
            ))
            .await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    }
}

/// `ssp-gateway audit verify` with `--key` for each of `keys`, on `files`: exit code and output.
fn verify(keys: &[&Path], files: &[PathBuf]) -> (i32, String) {
    let mut cmd = Command::new(GATEWAY_BIN);
    cmd.args(["audit", "verify"]);
    for k in keys {
        cmd.arg("--key").arg(k);
    }
    let out = cmd.args(files).output().expect("run audit verify");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A fresh key of 41 printable bytes (so a test can look for it in the log).
fn new_key(path: &Path) -> String {
    let key = format!("test-key-{}", uuid::Uuid::new_v4().simple());
    std::fs::write(path, &key).expect("write key");
    key
}

/// Edits the first record holding `"method":"GET"` to say PUT, then sets every record's
/// `prev` (in chain order, across the files) to the plain SHA-256 of the line before it: what
/// someone who can write the files but not read the key can do.
fn rewrite_and_chain_again(files: &[PathBuf]) {
    let mut ordered: Vec<(u64, PathBuf)> = files
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(f).expect("read");
            let first: serde_json::Value =
                serde_json::from_str(text.lines().next().expect("a record")).expect("json");
            (first["seq"].as_u64().expect("seq"), f.clone())
        })
        .collect();
    ordered.sort();
    let mut prev: Option<String> = None;
    let mut edited = false;
    for (_, f) in ordered {
        let mut out = String::new();
        for line in std::fs::read_to_string(&f).expect("read").lines() {
            let mut line = line.to_owned();
            if !edited && line.contains("\"method\":\"GET\"") {
                line = line.replacen("\"method\":\"GET\"", "\"method\":\"PUT\"", 1);
                edited = true;
            }
            if let Some(p) = &prev {
                let at = line.find("\"prev\":\"").expect("prev") + 8;
                line.replace_range(at..at + 64, p);
            }
            prev = Some(ssp_gateway::audit::record::hex(
                &ssp_gateway::audit::record::sha256(line.as_bytes()),
            ));
            out.push_str(&line);
            out.push('\n');
        }
        std::fs::write(&f, out).expect("write");
    }
    assert!(edited, "no record to edit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_trail_verifies_with_its_keys_and_a_rechained_one_does_not() {
    let world = World::ecdsa();
    let stop_provider = CancellationToken::new();
    let port = provider(&world, &stop_provider).await;
    let keys = scratch_dir("audit-keys");
    let (k1, k2) = (keys.join("k1"), keys.join("k2"));
    let secret = new_key(&k1);
    let audit = format!("key_file = \"{}\"\nmax_file_bytes = 4096\n", k1.display());
    let (config, gw, admin, dir) = config_for(&world, port, &audit);

    let mut g = spawn_gateway(&config, gw, admin, &dir, &[]).await;
    requests(&world, &g, port, 6).await;
    // A changed key_file waits for a restart, like the rest of [audit].
    let text = std::fs::read_to_string(&config).expect("read");
    new_key(&k2);
    std::fs::write(
        &config,
        text.replace(&k1.display().to_string(), &k2.display().to_string()),
    )
    .expect("write");
    let start = Instant::now();
    while sample(
        &http_get(g.admin, "/metrics").await.1,
        "ssp_config_restart_pending",
    ) != Some(1.0)
    {
        assert!(start.elapsed() < BINARY_DEADLINE, "no restart pending");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    requests(&world, &g, port, 2).await;
    assert!(stop_gateway(&mut g).await.success());
    let log = std::fs::read_to_string(&g.log).expect("log");
    assert!(
        log.contains("audit trail open, keyed") && log.contains("key_id="),
        "{log}"
    );
    assert!(!log.contains(&secret), "the key is in the log:\n{log}");

    let files = audit_files(&dir);
    assert!(files.len() >= 3, "rotated: {files:?}");
    let (code, out) = verify(&[&k1], &files);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok: 16 records"), "{out}");
    assert!(out.contains("under a key given"), "{out}");
    // The key change was not applied: the new key alone proves nothing.
    let (code, out) = verify(&[&k2], &files);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("not the HMAC of record 1 under any key given"),
        "{out}"
    );
    let (code, out) = verify(&[], &files);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("give --key"), "{out}");

    // Restarted with the new key: the trail goes on under it, and verifies with both.
    let mut g = spawn_gateway(&config, gw, admin, &dir, &[]).await;
    requests(&world, &g, port, 2).await;
    assert!(stop_gateway(&mut g).await.success());
    let files = audit_files(&dir);
    let (code, out) = verify(&[&k1, &k2], &files);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok: 20 records"), "{out}");
    for one in [&k1, &k2] {
        let (code, out) = verify(&[one], &files);
        assert_eq!(code, 1, "{} alone: {out}", one.display());
    }

    // Rewritten and chained again with plain SHA-256: a check without a key passes it, the
    // keyed check does not.
    rewrite_and_chain_again(&files);
    let (code, out) = verify(&[], &files);
    assert_eq!(code, 0, "the forgery is a valid SHA-256 chain: {out}");
    let (code, out) = verify(&[&k1, &k2], &files);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("is the plain SHA-256 of record") && out.contains("(seq 2)"),
        "{out}"
    );
    // The gateway restarted on the rewritten trail links onto it under its key, but the
    // rewrite stays a break, and the restart says what it found, in a line kept elsewhere.
    let mut g = spawn_gateway(&config, gw, admin, &dir, &[]).await;
    requests(&world, &g, port, 1).await;
    assert!(stop_gateway(&mut g).await.success());
    let log = std::fs::read_to_string(&g.log).expect("log");
    assert!(log.contains("unkeyed_through=20"), "{log}");
    let files = audit_files(&dir);
    let (code, out) = verify(&[&k1, &k2], &files);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("is the plain SHA-256 of record 1"), "{out}");
    stop_provider.cancel();
}

/// A trail begun before `[audit] key_file` was set: the gateway, started keyed on it, says in
/// its log where the keyed chain starts (`unkeyed_through=N`), and `audit verify --key
/// --unkeyed-through N` proves the whole trail; without it the plain SHA-256 links are breaks
/// (never taken as an unkeyed start from the trail itself: a trail rewritten without the key
/// looks the same, found by a review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trail_keyed_after_it_began_verifies_with_the_seq_the_gateway_logged() {
    let world = World::ecdsa();
    let stop_provider = CancellationToken::new();
    let port = provider(&world, &stop_provider).await;
    let keys = scratch_dir("audit-keys");
    let key = keys.join("k");
    new_key(&key);
    let (config, gw, admin, dir) = config_for(&world, port, "");
    let mut g = spawn_gateway(&config, gw, admin, &dir, &[]).await;
    requests(&world, &g, port, 3).await;
    assert!(stop_gateway(&mut g).await.success());
    let text = std::fs::read_to_string(&config).expect("read");
    std::fs::write(
        &config,
        text.replace(
            "[audit]\n",
            &format!("[audit]\nkey_file = \"{}\"\n", key.display()),
        ),
    )
    .expect("write");
    let mut g = spawn_gateway(&config, gw, admin, &dir, &[]).await;
    requests(&world, &g, port, 2).await;
    assert!(stop_gateway(&mut g).await.success());
    let log = std::fs::read_to_string(&g.log).expect("log");
    assert!(log.contains("audit trail open, keyed"), "{log}");
    assert!(log.contains("unkeyed_through=6"), "{log}");

    let files = audit_files(&dir);
    let (code, out) = verify(&[&key], &files);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("--unkeyed-through"), "{out}");
    let out = Command::new(GATEWAY_BIN)
        .args(["audit", "verify", "--unkeyed-through", "6", "--key"])
        .arg(&key)
        .args(&files)
        .output()
        .expect("verify");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("ok: 10 records"), "{text}");
    assert!(
        text.contains("links up to record 6 are plain SHA-256"),
        "{text}"
    );
    // A later seq would take keyed links for plain ones: broken.
    let out = Command::new(GATEWAY_BIN)
        .args(["audit", "verify", "--unkeyed-through", "8", "--key"])
        .arg(&key)
        .args(&files)
        .output()
        .expect("verify");
    assert_eq!(out.status.code(), Some(1));
    stop_provider.cancel();
}

/// A key file that is no key (too short, empty, missing, a directory) is named by
/// `check-config` and stops `run`, with the same line; one inside the audit directory is a
/// configuration error.
#[tokio::test]
async fn key_files_that_are_not_keys_stop_check_config_and_run() {
    let world = World::ecdsa();
    let stop_provider = CancellationToken::new();
    let port = provider(&world, &stop_provider).await;
    let keys = scratch_dir("bad-audit-keys");
    let short = keys.join("short");
    std::fs::write(&short, [1u8; 31]).expect("write");
    let empty = keys.join("empty");
    std::fs::write(&empty, b"").expect("write");
    for (key, reason) in [
        (short, "31 bytes; the key must be at least 32"),
        (empty, "empty; the key must be at least 32 bytes"),
        (keys.join("missing"), "No such file or directory"),
        (keys.clone(), "a directory, not a file"),
    ] {
        let (config, ..) = config_for(&world, port, &format!("key_file = \"{}\"\n", key.display()));
        let expected = format!("audit.key_file: {}: {reason}", key.display());
        for command in ["check-config", "run"] {
            let out = Command::new(GATEWAY_BIN)
                .args([command, "--config"])
                .arg(&config)
                .output()
                .expect("run");
            let said = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(out.status.code(), Some(1), "{command}: {said}");
            assert!(
                said.contains(&expected),
                "{command}: {expected} not in:\n{said}"
            );
        }
    }
    // Inside the audit directory: refused when the file is read as configuration.
    let (config, _, _, dir) = config_for(&world, port, "");
    let text = std::fs::read_to_string(&config).expect("read");
    std::fs::write(
        &config,
        text.replace(
            "[audit]\n",
            &format!("[audit]\nkey_file = \"{}\"\n", dir.join("key").display()),
        ),
    )
    .expect("write");
    let out = Command::new(GATEWAY_BIN)
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .expect("run");
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("audit.key_file") && said.contains("is inside the audit directory"),
        "{said}"
    );
    stop_provider.cancel();
}

/// The shipped development configuration: `check-config` before the development PKI exists
/// does not ask for the key `run` will make with it; `run` makes certificates and key, and
/// its trail verifies with that key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_development_configuration_makes_its_key_and_its_trail_verifies_with_it() {
    let (gw, admin, mock) = (free_port(), free_port(), free_port());
    let root = scratch_dir("dev-audit-key");
    let config = shipped_config(&root, Some((gw, admin, mock)));
    let check = Command::new(GATEWAY_BIN)
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .expect("check-config");
    assert!(
        check.status.success(),
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );

    let mut g = spawn_gateway(
        &config,
        ([127, 0, 0, 1], gw).into(),
        ([127, 0, 0, 1], admin).into(),
        &root.join("audit-dev"),
        &[],
    )
    .await;
    let certs = root.join("certs-dev");
    let key = certs.join("audit-chain.key");
    assert_eq!(std::fs::read(&key).expect("the development key").len(), 32);
    let tls = ssp_gateway::tls::client_config(
        &ssp_gateway::tls::ClientTls {
            cert: certs.join("consumer.pem"),
            key: certs.join("consumer-key.pem"),
            ca: certs.join("ca.pem"),
            crls: Vec::new(),
        },
        &[b"http/1.1"],
    )
    .expect("client TLS");
    let consumer = Client {
        tls,
        addr: g.gateway,
    };
    let a = consumer
        .gpc(Gpc::new(
            Method::GET,
            format!("https://localhost:{mock}/B82617/STU3/1/gpconnect/metadata"),
            IX_METADATA,
        ))
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert!(stop_gateway(&mut g).await.success());
    let log = std::fs::read_to_string(&g.log).expect("log");
    assert!(log.contains("audit trail open, keyed"), "{log}");

    let files = audit_files(&root.join("audit-dev"));
    let (code, out) = verify(&[&key], &files);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok: 2 records"), "{out}");
    let (code, out) = verify(&[], &files);
    assert_eq!(code, 1, "{out}");
}

/// The last `last_seq=N head=HEX` the gateway logged.
fn logged_head(log: &str) -> (u64, String) {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("audit trail closed"))
        .unwrap_or_else(|| panic!("no closing line in:\n{log}"));
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {line}"))
            .to_owned()
    };
    (field("last_seq=").parse().expect("a seq"), field("head="))
}

async fn last_seq_gauge(admin: SocketAddr) -> Option<f64> {
    sample(&http_get(admin, "/metrics").await.1, "ssp_audit_last_seq")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_cut_off_the_end_are_caught_by_the_logged_head_and_the_gauge() {
    let world = World::ecdsa();
    let stop_provider = CancellationToken::new();
    let port = provider(&world, &stop_provider).await;
    let key = scratch_dir("anchor-key").join("k");
    new_key(&key);
    let (config, gw, admin, dir) =
        config_for(&world, port, &format!("key_file = \"{}\"\n", key.display()));
    let mut g = spawn_gateway(&config, gw, admin, &dir, &[]).await;
    assert_eq!(last_seq_gauge(g.admin).await, Some(0.0), "an empty trail");
    requests(&world, &g, port, 3).await;
    // Outcome records nobody waits on are durable within fsync_follow_up.
    let start = Instant::now();
    while last_seq_gauge(g.admin).await != Some(6.0) {
        assert!(
            start.elapsed() < BINARY_DEADLINE,
            "ssp_audit_last_seq never reached 6"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(stop_gateway(&mut g).await.success());
    let (last_seq, head) = logged_head(&std::fs::read_to_string(&g.log).expect("log"));
    assert_eq!(last_seq, 6);
    let anchored = |extra: &[&str]| {
        let mut cmd = Command::new(GATEWAY_BIN);
        cmd.args(["audit", "verify", "--key"]).arg(&key).args(extra);
        let out = cmd.args(audit_files(&dir)).output().expect("audit verify");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let head_arg = format!("6:{head}");
    let (code, out) = anchored(&["--head", &head_arg, "--min-seq", "6"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("anchor: record 6 is there"), "{out}");
    assert!(
        out.contains(&format!("--head {head_arg}")),
        "the report offers the same: {out}"
    );

    // The last two records removed: still a valid chain, but short of both anchors.
    let active = dir.join("audit.jsonl");
    let whole = std::fs::read_to_string(&active).expect("read");
    let lines: Vec<&str> = whole.lines().collect();
    let cut: String = lines[..lines.len() - 2]
        .iter()
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&active, &cut).expect("write");
    let (code, out) = anchored(&[]);
    assert_eq!(code, 0, "without an anchor the cut is invisible: {out}");
    let (code, out) = anchored(&["--head", &head_arg]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(
            "the trail ends at seq 4, before the anchored seq 6: records removed from its end"
        ),
        "{out}"
    );
    let (code, out) = anchored(&["--min-seq", "6"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("the trail ends at seq 4, before seq 6 (--min-seq)"),
        "{out}"
    );
    // The last record altered instead: not the one anchored.
    let mut altered = lines.clone();
    let last = altered[lines.len() - 1].replacen("\"method\":\"GET\"", "\"method\":\"PUT\"", 1);
    assert_ne!(last, altered[lines.len() - 1]);
    altered[lines.len() - 1] = &last;
    let altered: String = altered.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&active, altered).expect("write");
    let (code, out) = anchored(&["--head", &head_arg]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("record 6 is not the one anchored"), "{out}");

    // Started on the cut trail, the gateway's gauge says so: Prometheus' history shows the drop.
    std::fs::write(&active, &cut).expect("write");
    let mut g = spawn_gateway(&config, gw, admin, &dir, &[]).await;
    assert_eq!(last_seq_gauge(g.admin).await, Some(4.0));
    assert!(stop_gateway(&mut g).await.success());
    stop_provider.cancel();
}

/// A line cut short is tolerated at the end of the trail only; on start the gateway moves it
/// aside with a WARN line that does not claim a cause, and the trail verifies after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_cut_short_is_tolerated_only_at_the_end_and_moved_aside_without_a_cause() {
    let world = World::ecdsa();
    let stop_provider = CancellationToken::new();
    let port = provider(&world, &stop_provider).await;
    let (config, gw, admin, dir) = config_for(&world, port, "max_file_bytes = 4096\n");
    let mut g = spawn_gateway(&config, gw, admin, &dir, &[]).await;
    requests(&world, &g, port, 4).await;
    assert!(stop_gateway(&mut g).await.success());
    let files = audit_files(&dir);
    assert!(files.len() >= 2, "rotated: {files:?}");
    let active = dir.join("audit.jsonl");
    let rotated = files
        .iter()
        .find(|f| **f != active)
        .expect("a rotated file")
        .clone();

    // Cut short at the end of a rotated file: the gateway never leaves that.
    let whole = std::fs::read(&rotated).expect("read");
    let mut cut = whole.clone();
    cut.truncate(whole.len() - 10);
    std::fs::write(&rotated, &cut).expect("write");
    let (code, out) = verify(&[], &files);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("not the last of the trail"), "{out}");
    std::fs::write(&rotated, &whole).expect("restore");

    // At the end of the active file, the start of the next record: tolerated.
    let mut text = std::fs::read(&active).expect("read");
    text.extend_from_slice(b"{\"seq\":9,\"prev\":\"0123");
    std::fs::write(&active, &text).expect("write");
    let (code, out) = verify(&[], &files);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("torn: ") && out.contains("tolerated"), "{out}");

    let mut g = spawn_gateway(&config, gw, admin, &dir, &[]).await;
    requests(&world, &g, port, 1).await;
    assert!(stop_gateway(&mut g).await.success());
    let log = std::fs::read_to_string(&g.log).expect("log");
    let warn = log
        .lines()
        .find(|l| l.contains("WARN") && l.contains("bytes after the last whole audit record"))
        .unwrap_or_else(|| panic!("no WARN line in:\n{log}"));
    assert!(
        warn.contains("a write cut short by a crash, or an edit") && warn.contains("bytes=21"),
        "{warn}"
    );
    assert!(!warn.contains("the process stopped mid-write"), "{warn}");
    let kept: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "partial"))
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(
        std::fs::read(&kept[0]).expect("read"),
        b"{\"seq\":9,\"prev\":\"0123"
    );
    let (code, out) = verify(&[], &audit_files(&dir));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok: 10 records"), "{out}");
    assert!(!out.contains("torn"), "{out}");
    // Given the directory, or the set-aside file itself: named, not read, no failure.
    let mut given = vec![dir.clone()];
    given.extend(kept.iter().cloned());
    let (code, out) = verify(&[], &given);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok: 10 records"), "{out}");
    let aside = format!(
        "set aside: {}: kept aside by the gateway, not part of the chain; not read",
        kept[0].display()
    );
    assert_eq!(out.matches("set aside: ").count(), 1, "named once: {out}");
    assert!(out.contains(&aside), "{out}");
    stop_provider.cancel();
}

/// `audit verify` names every break, each with its file, line, seq and what is wrong, not
/// only the first, and exits 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_names_every_break_not_only_the_first() {
    let world = World::ecdsa();
    let stop_provider = CancellationToken::new();
    let port = provider(&world, &stop_provider).await;
    let (config, gw, admin, dir) = config_for(&world, port, "max_file_bytes = 4096\n");
    let mut g = spawn_gateway(&config, gw, admin, &dir, &[]).await;
    requests(&world, &g, port, 6).await;
    assert!(stop_gateway(&mut g).await.success());
    let files = audit_files(&dir);
    // The files of two records or more, in chain order.
    let mut by_first: Vec<(u64, PathBuf)> = files
        .iter()
        .filter_map(|f| {
            let text = std::fs::read_to_string(f).expect("read");
            let v: serde_json::Value = serde_json::from_str(text.lines().next()?).expect("json");
            (text.lines().count() >= 2).then(|| (v["seq"].as_u64().expect("seq"), f.clone()))
        })
        .collect();
    by_first.sort();
    assert!(by_first.len() >= 2, "{files:?}");
    let (first, last) = (&by_first[0].1, &by_first[by_first.len() - 1].1);
    // The first record of the first such file and of the last altered.
    for f in [first, last] {
        let text = std::fs::read_to_string(f).expect("read");
        std::fs::write(
            f,
            text.replacen("\"method\":\"GET\"", "\"method\":\"PUT\"", 1),
        )
        .expect("write");
    }
    let (code, out) = verify(&[], &files);
    assert_eq!(code, 1, "{out}");
    let broken: Vec<&str> = out.lines().filter(|l| l.starts_with("BROKEN: /")).collect();
    assert_eq!(broken.len(), 2, "{out}");
    assert!(
        broken[0].starts_with(&format!(
            "BROKEN: {} line 2 (seq 2): prev ",
            first.display()
        )) && broken[0].contains("is not the SHA-256 of record 1"),
        "{out}"
    );
    let seq = by_first[by_first.len() - 1].0;
    assert!(
        broken[1].starts_with(&format!(
            "BROKEN: {} line 2 (seq {}): prev ",
            last.display(),
            seq + 1
        )),
        "{out}"
    );
    assert!(
        out.contains("BROKEN: 2 break(s) in 12 records, seq 1..=12"),
        "{out}"
    );
    stop_provider.cancel();
}

/// `audit verify DIR` on a live trail that rotates every few records under load: every run
/// finds it intact (a rotation while it lists or reads is no missing record, no "No such
/// file"), and each reads further than the last.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn verify_reads_a_directory_whose_trail_rotates_meanwhile() {
    let world = World::ecdsa();
    let stop_provider = CancellationToken::new();
    let port = provider(&world, &stop_provider).await;
    let (config, gw, admin, dir) = config_for(&world, port, "max_file_bytes = 4096\n");
    let mut g = spawn_gateway(&config, gw, admin, &dir, &[]).await;
    let stop_load = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let client = world.client(&world.consumer, g.gateway);
            let target = format!("{}/metadata", endpoint(port));
            let stop = stop_load.clone();
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = client
                        .send(Gpc::new(Method::GET, target.clone(), IX_METADATA).build())
                        .await;
                }
            })
        })
        .collect();
    let start = Instant::now();
    while audit_files(&dir).len() < 3 {
        assert!(start.elapsed() < BINARY_DEADLINE, "no rotation under load");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut seen = 0;
    for run in 0..100 {
        let dir = dir.clone();
        let out = tokio::task::spawn_blocking(move || {
            Command::new(GATEWAY_BIN)
                .args(["audit", "verify"])
                .arg(&dir)
                .output()
                .expect("audit verify")
        })
        .await
        .expect("join");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(0), "run {run}: {text}");
        let records: u64 = text
            .split("ok: ")
            .nth(1)
            .and_then(|t| t.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("run {run}: {text}"));
        assert!(records >= seen, "run {run}: {records} after {seen}");
        seen = records;
    }
    stop_load.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    assert!(stop_gateway(&mut g).await.success());
    let (code, out) = verify(&[], std::slice::from_ref(&dir));
    assert_eq!(code, 0, "{out}");
    assert!(audit_files(&dir).len() > 20, "it rotated: {out}");
    stop_provider.cancel();
}

/// A directory with no trail file in it (a mistyped audit path, the config directory) is not
/// an intact trail: exit 2, naming the directory; an audit directory whose trail has no
/// complete record yet is still ok.
#[test]
fn verify_refuses_a_directory_with_no_trail_file() {
    let dir = std::env::temp_dir().join(format!("ssp-verify-none-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("gateway.toml"), "[listener]\n").expect("write");
    let (code, out) = verify(&[], std::slice::from_ref(&dir));
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("no audit trail file here"), "{out}");
    assert!(out.contains(&dir.display().to_string()), "{out}");
    std::fs::write(dir.join("audit.jsonl"), "").expect("write");
    let (code, out) = verify(&[], std::slice::from_ref(&dir));
    assert_eq!(code, 0, "{out}");
    std::fs::remove_dir_all(&dir).expect("clean up");
}
