//! A real Prometheus (Debian's `prometheus`) scrapes a running gateway: after known traffic, a
//! PromQL query over Prometheus's HTTP API returns the expected request count. Loopback only,
//! temporary storage, a bounded wait, and the server is stopped at the end.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use http::{Method, StatusCode};

const DEADLINE: Duration = Duration::from_secs(90);

/// The Prometheus server; killed and reaped when dropped, whatever happens.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
}

/// `value` of the single sample of an instant-query answer, if it has one.
fn single_value(body: &str) -> Option<f64> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    if v["status"] != "success" {
        return None;
    }
    let result = v["data"]["result"].as_array()?;
    if result.len() != 1 {
        return None;
    }
    result[0]["value"][1].as_str()?.parse().ok()
}

#[tokio::test]
async fn prometheus_scrapes_the_gateway_and_counts_its_requests() {
    let h = start_with_recorder(World::ecdsa(), Behaviour::Echo, GatewayOptions::default()).await;
    let ep = h.endpoint();
    let forwarded = 7;
    for _ in 0..forwarded {
        let a = h
            .consumer()
            .gpc(Gpc::new(Method::GET, format!("{ep}/metadata"), IX_METADATA))
            .await;
        assert_eq!(a.status, StatusCode::OK);
    }
    let refused = h
        .world
        .client(&h.world.rogue, h.gateway)
        .gpc(Gpc::new(Method::GET, format!("{ep}/metadata"), IX_METADATA))
        .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);

    let dir = scratch_dir("prometheus");
    let web = free_addr();
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: ssp-gateway\n    metrics_path: /metrics\n    static_configs:\n      - targets: [\"{}\"]\n",
            h.admin
        ),
    )
    .expect("write prometheus.yml");
    let child = Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("prometheus.log")).expect("log file"))
        .spawn()
        .expect(
            "prometheus (Debian package prometheus) must be installed: scripts/test.sh installs it",
        );
    let _server = Server(child);

    let query = "/api/v1/query?query=sum(ssp_requests_total%7Bjob%3D%22ssp-gateway%22%2Cinteraction%3D%22read_metadata%22%2Cstatus%3D%22200%22%7D)";
    let refused_query =
        "/api/v1/query?query=sum(ssp_rejections_total%7Breason%3D%22fqdn_not_registered%22%7D)";
    let start = Instant::now();
    let (forwarded_seen, refused_seen) = loop {
        if let Ok(tcp) = tokio::net::TcpStream::connect(web).await {
            drop(tcp);
            let (status, body) = http_get(web, query).await;
            if status == StatusCode::OK {
                if let Some(n) = single_value(&body) {
                    let (_, refused_body) = http_get(web, refused_query).await;
                    break (n, single_value(&refused_body));
                }
            }
        }
        assert!(
            start.elapsed() < DEADLINE,
            "Prometheus never reported the count; its log:\n{}",
            std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(forwarded_seen, forwarded as f64);
    assert_eq!(refused_seen, Some(1.0));

    // The target is healthy in Prometheus's own view.
    let (_, up) = http_get(web, "/api/v1/query?query=up%7Bjob%3D%22ssp-gateway%22%7D").await;
    assert_eq!(single_value(&up), Some(1.0), "{up}");
    h.stop().await;
}
