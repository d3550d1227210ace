//! The `noisy-neighbour` workload: the latency a quiet consumer sees from a gateway, alone and
//! while another consumer floods it far past its rate limit.
//!
//! The quiet consumer (the development consumer, ASID 200000000359, unlimited in the bench
//! config) sends slot searches at a fixed rate (latency from the intended send time, so a
//! stall is not hidden). It runs twice against each gateway: alone, then while the read-only
//! consumer (ASID 200000000360, `readonly.dev.local`, limited to `NOISY_LIMIT` requests a
//! second by a per-ASID override) floods the gateway closed-loop on as many connections as the
//! other workloads use, most of it answered 429. The noisy run starts first and the quiet run
//! only once the noisy one is measuring (its warm-up over), and the noisy run outlasts it.
//! Both load generators share the load core: on a two-core machine there is no other place
//! for them, and a fixed-rate generator wakes promptly beside a busy one.
//!
//! Rows: `<gateway> quiet alone`, `<gateway> quiet + noisy` (with the gateway's CPU per
//! response over the quiet run's window, both consumers' responses counted) and
//! `<gateway> noisy` (its own figures; `throttled` = its 429s).

use std::sync::mpsc;

use serde_json::Value;

use super::{procs, Bench, Row, Target, Workload};

/// Requests per second (and burst) the bench config allows the noisy consumer.
pub const NOISY_LIMIT: u32 = 100;
/// The noisy consumer's ASID (the read-only development consumer).
pub const NOISY_ASID: &str = "200000000360";
/// The quiet consumer's fixed rate and connections (a smoke run uses less).
const QUIET_RATE: f64 = 500.0;
const QUIET_CONNECTIONS: usize = 8;
const SMOKE_QUIET_RATE: f64 = 50.0;

/// The `[rate_limit]` override of the bench config that limits the noisy consumer.
pub fn rate_limit_override() -> String {
    format!(
        "overrides = [{{ asid = \"{NOISY_ASID}\", requests_per_second = {NOISY_LIMIT}, burst = {NOISY_LIMIT} }}]"
    )
}

/// The quiet consumer alone, then beside the noisy one, against gateway `t`.
pub fn measure(b: &Bench, t: &Target, smoke: bool) -> Vec<Row> {
    let (rate, connections) = if smoke {
        (SMOKE_QUIET_RATE, b.connections.min(QUIET_CONNECTIONS))
    } else {
        (QUIET_RATE, QUIET_CONNECTIONS)
    };
    let quiet_args = {
        let mut args = b.load_args(t);
        args.extend(search());
        args.extend([
            "--connections".into(),
            connections.to_string(),
            "--rate".into(),
            format!("{rate}"),
            "--warmup".into(),
            format!("{}ms", b.warmup.as_millis()),
            "--duration".into(),
            format!("{}ms", b.duration.as_millis()),
        ]);
        args
    };
    let mut rows = Vec::new();
    let alone = quiet_run(b, t, &quiet_args);
    rows.push(row(t, "quiet alone", &alone, Some(rate), None));

    // The noisy run: warm up, then flood for longer than the whole quiet run.
    let noisy_args = {
        let mut args = b.load_args(t);
        for (flag, file) in [("--cert", "readonly.pem"), ("--key", "readonly-key.pem")] {
            if let Some(i) = args.iter().position(|a| a == flag) {
                args[i + 1] = b.dir.join(file).display().to_string();
            }
        }
        args.extend(search());
        let outlast = b.warmup + b.duration + std::time::Duration::from_secs(2);
        args.extend([
            "--from".into(),
            NOISY_ASID.into(),
            "--connections".into(),
            b.connections.to_string(),
            "--warmup".into(),
            format!("{}ms", b.warmup.as_millis()),
            "--duration".into(),
            format!("{}ms", outlast.as_millis()),
        ]);
        args
    };
    let (measuring_tx, measuring_rx) = mpsc::channel::<()>();
    let (beside, noisy) = std::thread::scope(|scope| {
        let noisy = scope.spawn(move || {
            b.drive(&noisy_args, |line| {
                if line == "loadtest: measuring" {
                    let _ = measuring_tx.send(());
                }
                false
            })
        });
        // The noisy run ends its warm-up (or fails, dropping the sender) before the quiet
        // run starts.
        let beside = match measuring_rx.recv() {
            Ok(()) => quiet_run(b, t, &quiet_args),
            Err(_) => Err("the noisy load generator stopped before measuring".into()),
        };
        let noisy = noisy
            .join()
            .unwrap_or_else(|_| Err("the noisy load generator thread panicked".into()));
        (beside, noisy)
    });
    let noisy = noisy.map(|report| (report, None));
    let mut both = row(t, "quiet + noisy", &beside, Some(rate), None);
    // The gateway's CPU over the quiet window went to both consumers' responses.
    if let (Ok((quiet, Some((cpu_us, _)))), Ok((report, _))) = (&beside, &noisy) {
        let noisy_in_window = report["rps"].as_f64().unwrap_or(0.0) * b.duration.as_secs_f64();
        let responses = quiet["responses"].as_f64().unwrap_or(0.0) + noisy_in_window;
        both.proxy_cpu_us_per_req = (responses > 0.0).then(|| cpu_us / responses);
    }
    rows.push(both);
    let throttled = noisy
        .as_ref()
        .ok()
        .map(|(report, _)| report["status"]["429"].as_u64().unwrap_or(0));
    rows.push(row(t, "noisy", &noisy, None, throttled));
    rows
}

/// A quiet run's report, and the gateway's CPU (µs) and RSS (MB) over its measured window.
type Measured = Result<(Value, Option<(f64, f64)>), String>;

fn quiet_run(b: &Bench, t: &Target, args: &[String]) -> Measured {
    let proxy_tree = || t.proxy.map(procs::tree).unwrap_or_default();
    let mut start = 0u64;
    let mut end = 0u64;
    let mut rss = 0u64;
    let report = b.drive(args, |line| {
        if line == "loadtest: measuring" {
            start = procs::cpu_ticks(&proxy_tree());
        } else if line == "loadtest: measured" {
            let tree = proxy_tree();
            end = procs::cpu_ticks(&tree);
            rss = procs::rss_kb(&tree);
        }
        false
    })?;
    let cpu_us = end.saturating_sub(start) as f64 / b.ticks * 1e6;
    Ok((report, Some((cpu_us, rss as f64 / 1024.0))))
}

/// Slot searches, as `get-4k`.
fn search() -> [String; 4] {
    let query = ssp_gateway::loadtest::default_search_query(chrono::Utc::now().date_naive());
    [
        "--mix".into(),
        "search=1".into(),
        "--search-query".into(),
        query,
    ]
}

fn row(
    t: &Target,
    what: &str,
    measured: &Measured,
    rate: Option<f64>,
    throttled: Option<u64>,
) -> Row {
    let target = format!("{} {what}", t.label);
    let (report, cpu) = match measured {
        Ok(m) => m,
        Err(e) => {
            return Row {
                workload: Workload::NoisyNeighbour.name(),
                target,
                failed: Some(e.clone()),
                ..Row::default()
            }
        }
    };
    let row = Row::from_report(Workload::NoisyNeighbour.name(), target, report);
    Row {
        proxy_cpu_us_per_req: cpu.map(|(us, _)| us / row.responses.max(1) as f64),
        proxy_rss_mb: cpu.map(|(_, mb)| mb),
        rate,
        throttled,
        ..row
    }
}
