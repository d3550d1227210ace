//! nginx as the equivalent mTLS reverse proxy, for the gateway/nginx ratio: the same server
//! certificate, client certificate required against the same CA and CRL, no session resumption,
//! the four Ssp-* headers required (present and non-empty), the embedded target unwrapped to the
//! one registered provider, upstream mTLS with the gateway's client certificate and a keep-alive
//! pool, one access-log line per request, one worker process.
//!
//! What nginx does NOT check, and the gateway does: the Ssp-TraceID is a UUID and the ASIDs are
//! digits; the interaction is in the catalogue and the method and path match it; both parties in
//! the directory (accreditation, certificate FQDN, receiver's endpoint, sharing agreement); the
//! JWT; the open-proxy rules on the target (nginx only forwards the one configured prefix).

use std::path::{Path, PathBuf};

/// Where nginx is installed, if it is.
pub fn binary() -> Option<PathBuf> {
    ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// `nginx -v`.
pub fn version(bin: &Path) -> String {
    std::process::Command::new(bin)
        .arg("-v")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_owned())
        .unwrap_or_default()
}

/// Writes `nginx.conf` into `dir` (certificates there too) for a listener on `port` in front of
/// the provider at 127.0.0.1:`provider_port`, and returns its path.
pub fn write_config(
    dir: &Path,
    port: u16,
    provider_port: u16,
    base_path: &str,
    max_files: u64,
) -> std::io::Result<PathBuf> {
    let d = dir.display();
    let connections = max_files.saturating_sub(100).max(1024);
    for t in ["body", "proxy", "fastcgi", "uwsgi", "scgi"] {
        std::fs::create_dir_all(dir.join("nginx-tmp").join(t))?;
    }
    let user = if is_root() { "user root root;" } else { "" };
    let text = format!(
        r#"# Written by `cargo bench --bench e2e`: the equivalent mTLS reverse proxy.
{user}
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile {max_files};
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;

events {{
    worker_connections {connections};
}}

http {{
    log_format ssp '$remote_addr [$time_iso8601] "$request_method $uri" $status '
                   '$body_bytes_sent $request_time trace=$http_ssp_traceid '
                   'from=$http_ssp_from to=$http_ssp_to ix=$http_ssp_interactionid '
                   'peer="$ssl_client_s_dn"';
    access_log {d}/nginx-access.log ssp;
    client_body_temp_path {d}/nginx-tmp/body;
    proxy_temp_path {d}/nginx-tmp/proxy;
    fastcgi_temp_path {d}/nginx-tmp/fastcgi;
    uwsgi_temp_path {d}/nginx-tmp/uwsgi;
    scgi_temp_path {d}/nginx-tmp/scgi;

    # The embedded target keeps its "//": never merge slashes.
    merge_slashes off;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    client_header_timeout 120s;
    client_max_body_size 1m;

    upstream provider {{
        server 127.0.0.1:{provider_port};
        keepalive 64;
    }}

    server {{
        listen 127.0.0.1:{port} ssl http2;
        ssl_certificate {d}/gateway.pem;
        ssl_certificate_key {d}/gateway-key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_client_certificate {d}/ca.pem;
        ssl_verify_client on;
        ssl_verify_depth 2;
        ssl_crl {d}/ca.crl.pem;
        # Every connection a full handshake, as on the gateway.
        ssl_session_cache off;
        ssl_session_tickets off;

        location ^~ /https://127.0.0.1:{provider_port}{base_path}/ {{
            if ($http_ssp_traceid = "") {{ return 400; }}
            if ($http_ssp_from = "") {{ return 400; }}
            if ($http_ssp_to = "") {{ return 400; }}
            if ($http_ssp_interactionid = "") {{ return 400; }}
            rewrite ^/https://127\.0\.0\.1:{provider_port}(/.*)$ $1 break;
            proxy_pass https://provider;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host 127.0.0.1:{provider_port};
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header Forwarded "for=$remote_addr;proto=https";
            proxy_buffers 8 32k;
            proxy_busy_buffers_size 64k;
            proxy_max_temp_file_size 0;
            proxy_ssl_certificate {d}/gateway-client.pem;
            proxy_ssl_certificate_key {d}/gateway-client-key.pem;
            proxy_ssl_trusted_certificate {d}/ca.pem;
            proxy_ssl_verify on;
            proxy_ssl_name localhost;
            proxy_ssl_protocols TLSv1.2 TLSv1.3;
            proxy_ssl_session_reuse on;
        }}

        location / {{
            return 400;
        }}
    }}
}}
"#
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, text)?;
    Ok(path)
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}
