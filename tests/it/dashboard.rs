//! The live dashboard of `railyard serve`: the page is self-contained, the
//! data endpoint has its sections and `?since=` sends only what is new, and
//! (with Chromium) the page renders the verdict and the replicas; a
//! screenshot is kept under `target/dashboard-screens/`.
//!
//! Without `chromium` on the PATH the browser part says so and passes, unless
//! `RAILYARD_REQUIRE_CHROMIUM=1` (CI).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support;

/// One HTTP/1.1 GET: status, head and body; `None` when nothing answers.
async fn fetch(addr: &str, path: &str) -> Option<(u16, String, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8(buf).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, head.to_ascii_lowercase(), body.to_owned()))
}

async fn data(addr: &str, query: &str) -> Value {
    let (status, head, body) = fetch(addr, &format!("/dashboard/data{query}"))
        .await
        .expect("the data endpoint answers");
    assert_eq!(status, 200, "{head}");
    assert!(head.contains("content-type: application/json"), "{head}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// Stops `serve` on drop, so a failed assertion leaves no process behind.
struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The chromium binary, or `None` (with a notice) when it is not installed.
fn chromium() -> Option<&'static str> {
    let found = Command::new("chromium")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if found {
        return Some("chromium");
    }
    if std::env::var("RAILYARD_REQUIRE_CHROMIUM").is_ok_and(|v| v == "1") {
        panic!("chromium is required (RAILYARD_REQUIRE_CHROMIUM=1) and not on the PATH");
    }
    eprintln!("dashboard: the headless-browser check is skipped: chromium is not installed");
    None
}

/// Headless Chromium on `url` with `args`; its stdout.
async fn headless(args: &[&str], url: &str) -> String {
    let mut cmd = tokio::process::Command::new("chromium");
    cmd.args(["--headless=new", "--no-sandbox", "--disable-gpu"])
        .args(args)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(90), cmd.output())
        .await
        .expect("chromium finishes within 90 s")
        .expect("chromium runs");
    assert!(out.status.success(), "chromium: {}", out.status);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The document without its script (whose source holds markup in strings).
fn without_script(dom: &str) -> String {
    match (dom.find("<script"), dom.rfind("</script>")) {
        (Some(a), Some(b)) if a < b => format!("{}{}", &dom[..a], &dom[b + "</script>".len()..]),
        _ => dom.to_owned(),
    }
}

#[tokio::test]
async fn serve_shows_a_self_contained_dashboard_fed_by_compact_data() {
    let base = support::ledger(|c| c).await;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_railyard"));
    cmd.args(["serve", "--addr", "127.0.0.1:0"])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", std::env::var_os("HOME").unwrap_or_default())
        .env("DATABASE_URL", base.config().primary().expose_url())
        .env("RAILYARD_APPLICATION_NAME", support::unique("dash"))
        .env("RAILYARD_SHUTDOWN_TIMEOUT", "2s")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let replica = support::cluster().await.is_some();
    if let Some(c) = support::cluster().await {
        cmd.env(
            "DATABASE_REPLICA_URLS",
            c.replica_socket_target(&support::ledger_name())
                .unwrap()
                .expose_url(),
        );
    }
    let mut child = cmd.spawn().expect("the binary runs");
    let stdout = child.stdout.take().unwrap();
    let serve = Serve(child);
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let mut seen = Vec::new();
    let addr = loop {
        let line = lines
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("serve prints where it listens: {seen:?}"));
        seen.push(line.clone());
        if let Some(rest) = line.split("http://").nth(1) {
            break rest.trim().trim_end_matches('/').to_owned();
        }
    };
    let url_line = lines
        .recv_timeout(Duration::from_secs(10))
        .expect("serve prints the dashboard's URL");
    assert_eq!(url_line, format!("dashboard on http://{addr}/"));

    // A few samples first (one a second).
    let started = Instant::now();
    let full = loop {
        if fetch(&addr, "/healthz").await.is_some() {
            let d = data(&addr, "").await;
            if d["history"]["at_ms"]
                .as_array()
                .is_some_and(|a| a.len() >= 3)
            {
                break d;
            }
        }
        assert!(started.elapsed() < Duration::from_secs(30), "no samples");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // The page: HTML, not cached, nothing fetched from elsewhere.
    let (status, head, page) = fetch(&addr, "/").await.expect("the page answers");
    assert_eq!(status, 200);
    assert!(
        head.contains("content-type: text/html; charset=utf-8"),
        "{head}"
    );
    assert!(head.contains("cache-control: no-cache"), "{head}");
    let lower = page.to_ascii_lowercase();
    for needle in ["http://", "https://", "<script src", "<link href", "<link "] {
        assert!(!lower.contains(needle), "the page holds {needle:?}");
    }
    assert!(page.len() < 30 * 1024, "{} bytes", page.len());
    assert!(
        ["healthy", "degraded", "unhealthy"]
            .iter()
            .any(|v| page.contains(&format!("id=\"verdict\" class=\"v-{v}\">{v}</span>"))),
        "the verdict is in the page before any script runs"
    );

    // The data: every section, compact.
    for key in [
        "now_ms",
        "every_ms",
        "window_ms",
        "latest",
        "history",
        "statements",
    ] {
        assert!(!full[key].is_null(), "no {key}: {full}");
    }
    for key in ["status", "pools", "replicas", "reasons", "primary_up"] {
        assert!(!full["latest"][key].is_null(), "no latest.{key}");
    }
    let history = &full["history"];
    let n = history["at_ms"].as_array().unwrap().len();
    for key in ["status", "qps", "p50", "p95", "p99"] {
        assert_eq!(history[key].as_array().map(Vec::len), Some(n), "{key}");
    }
    for key in ["errors", "retries", "lag_s"] {
        assert!(history[key].is_object(), "{key}");
    }
    let statements = &full["statements"];
    for key in ["at_ms", "top", "other_plans", "plan_changes"] {
        assert!(!statements[key].is_null(), "no statements.{key}");
    }
    assert!(statements["top"].as_array().unwrap().len() <= 10);
    if replica {
        assert_eq!(full["latest"]["replicas"].as_array().unwrap().len(), 1);
        assert_eq!(history["lag_s"].as_object().unwrap().len(), 1);
    }

    // ?since= sends only the samples after it; &stmts= spares the statements.
    let at = history["at_ms"].as_array().unwrap();
    let second_newest = at[n - 2].as_u64().unwrap();
    let stmts_at = statements["at_ms"].as_u64().unwrap();
    let newer = data(&addr, &format!("?since={second_newest}&stmts={stmts_at}")).await;
    let m = newer["history"]["at_ms"].as_array().unwrap().len();
    assert!(
        m >= 1 && m < n,
        "{m} samples after the second newest of {n}"
    );
    assert!(
        newer["history"]["at_ms"][0].as_u64().unwrap() > second_newest,
        "{newer}"
    );
    let steady = serde_json::to_string(&newer).unwrap().len();
    eprintln!(
        "dashboard: full answer {} bytes ({n} samples), a steady poll {steady} bytes ({m} samples)",
        serde_json::to_string(&full).unwrap().len()
    );
    if newer["statements"].is_null() {
        assert!(steady < 3_000, "{steady} bytes: {newer}");
    }

    // The page in a real browser.
    let Some(_) = chromium() else {
        drop(serve);
        return;
    };
    let url = format!("http://{addr}/");
    let dom = headless(&["--dump-dom", "--virtual-time-budget=5000"], &url).await;
    let dom = without_script(&dom);
    let verdict_re = ["healthy", "degraded", "unhealthy"]
        .iter()
        .any(|v| dom.contains(&format!("id=\"verdict\" class=\"v-{v}\">{v}</span>")));
    assert!(verdict_re, "#verdict is filled: {dom}");
    assert!(dom.contains("<table>"), "the pools are rendered: {dom}");
    assert!(
        dom.contains("no alerts") || dom.contains("class=\"alert "),
        "serve's built-in rules answer /alerts: {dom}"
    );
    if replica {
        assert!(
            dom.contains("class=\"replica st-") && dom.contains("data-state=\""),
            "a .replica element with its state: {dom}"
        );
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/dashboard-screens");
    std::fs::create_dir_all(&dir).unwrap();
    let png = dir.join("serve.png");
    let _ = std::fs::remove_file(&png);
    headless(
        &[
            "--hide-scrollbars",
            "--virtual-time-budget=5000",
            "--window-size=1400,1800",
            &format!("--screenshot={}", png.display()),
        ],
        &url,
    )
    .await;
    let size = std::fs::metadata(&png).map(|m| m.len()).unwrap_or(0);
    assert!(
        size > 10_000,
        "a screenshot at {}: {size} bytes",
        png.display()
    );
    eprintln!("dashboard: screenshot at {}", png.display());
    drop(serve);
}

#[tokio::test]
async fn the_page_renders_alerts_from_an_extra_router_escaped_with_their_buttons() {
    use axum::routing::get;
    use railyard_ops::watch::{WatchOptions, Watcher};
    if chromium().is_none() {
        return;
    }
    let db = support::ledger(|c| c).await;
    let watcher = Watcher::spawn(
        db.clone(),
        WatchOptions::default().every(Duration::from_millis(200)),
    );
    let alert = |rule: &str, severity: &str, state: &str, summary: &str| {
        serde_json::json!({
            "rule": rule, "labels": {"replica": "r'1"}, "severity": severity, "state": state,
            "since_ms": 1_700_000_000_000u64, "value": 12.5, "summary": summary,
            "silenced": false, "inhibited": false, "acknowledged": false, "escalated": false
        })
    };
    let body = serde_json::json!({
        "alerts": [
            alert("pool_saturated", "warning", "pending", "waiting"),
            alert("replica_lag", "critical", "firing", "lag <img src=x onerror=alert(1)> is 12 s"),
            alert("errors", "info", "resolved", "back to normal"),
        ],
        "silences": [{"id": "s1", "matchers": {"rule": "x"}, "until_ms": 1_700_000_360_000u64,
                      "comment": "<b>maintenance</b>"}]
    });
    let extra = axum::Router::new().route(
        "/alerts",
        get(move || {
            let body = body.clone();
            async move { axum::Json(body) }
        }),
    );
    let app = railyard_http::router_with_dashboard(
        db.clone(),
        railyard_http::Readiness::new(),
        watcher,
        Some(extra),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    tokio::time::sleep(Duration::from_millis(500)).await;

    let dom = headless(
        &["--dump-dom", "--virtual-time-budget=5000"],
        &format!("http://{addr}/"),
    )
    .await;
    let dom = without_script(&dom);
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/dashboard-screens");
    std::fs::create_dir_all(&dir).unwrap();
    headless(
        &[
            "--hide-scrollbars",
            "--virtual-time-budget=5000",
            "--window-size=1400,1800",
            &format!("--screenshot={}", dir.join("alerts.png").display()),
        ],
        &format!("http://{addr}/"),
    )
    .await;
    server.abort();
    assert_eq!(dom.matches("<div class=\"alert ").count(), 3, "{dom}");
    let firing = dom
        .find("data-rule=\"replica_lag\" data-state=\"firing\"")
        .expect("the firing alert with its rule and state");
    let pending = dom.find("data-rule=\"pool_saturated\"").unwrap();
    assert!(firing < pending, "firing alerts come first");
    assert_eq!(dom.matches("data-act=\"silence\"").count(), 1, "{dom}");
    assert_eq!(dom.matches("data-act=\"ack\"").count(), 1, "{dom}");
    assert!(
        dom.contains("<span id=\"firing\" class=\"on\">1 firing</span>"),
        "{dom}"
    );
    assert!(!dom.contains("<img"), "markup from an alert is text: {dom}");
    assert!(
        dom.contains("lag &lt;img src=x onerror=alert(1)&gt; is 12 s"),
        "{dom}"
    );
    assert!(dom.contains("replica=r'1"), "{dom}");
    assert!(dom.contains("&lt;b&gt;maintenance&lt;/b&gt;"), "{dom}");
}

/// Requests a webhook receiver got (bodies), answering 200 to each.
async fn receiver() -> (String, std::sync::Arc<std::sync::Mutex<Vec<Value>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = got.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                loop {
                    let Ok(n) = s.read(&mut chunk).await else {
                        return;
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len: usize = text
                            .lines()
                            .find_map(|l| l.strip_prefix("Content-Length: "))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + len {
                            if let Ok(v) = serde_json::from_slice(&buf[end + 4..end + 4 + len]) {
                                seen.lock().unwrap().push(v);
                            }
                            break;
                        }
                    }
                    if n == 0 {
                        return;
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .await;
            });
        }
    });
    (url, got)
}

/// One HTTP/1.1 request with a JSON body: status, head, body.
/// The alert controls' token in the tests that use them.
const CONTROL_TOKEN: &str = "test-control-token-6f1d2a";

async fn request(addr: &str, method: &str, path: &str, body: &str) -> (u16, String, String) {
    let auth = format!("Authorization: Bearer {CONTROL_TOKEN}\r\n");
    request_as(addr, method, path, body, "localhost", &auth).await
}

/// A request naming `host`, with `headers` (each ending in CRLF).
async fn request_as(
    addr: &str,
    method: &str,
    path: &str,
    body: &str,
    host: &str,
    headers: &str,
) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!(
            "{method} {path} HTTP/1.1\r\nHost: {host}\r\n{headers}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, head.to_owned(), body.to_owned())
}

async fn post(addr: &str, path: &str, body: &str) -> (u16, String) {
    let (status, _, body) = request(addr, "POST", path, body).await;
    (status, body)
}

async fn alerts_of(addr: &str) -> Value {
    let (status, _, body) = fetch(addr, "/alerts").await.expect("/alerts answers");
    assert_eq!(status, 200);
    serde_json::from_str(&body).unwrap()
}

fn screenshot_dir() -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/dashboard-screens");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn screenshot(url: &str, name: &str) {
    let png = screenshot_dir().join(name);
    let _ = std::fs::remove_file(&png);
    headless(
        &[
            "--hide-scrollbars",
            "--virtual-time-budget=4000",
            "--window-size=1400,1500",
            &format!("--screenshot={}", png.display()),
        ],
        url,
    )
    .await;
    let size = std::fs::metadata(&png).map(|m| m.len()).unwrap_or(0);
    assert!(
        size > 10_000,
        "a screenshot at {}: {size} bytes",
        png.display()
    );
    eprintln!("dashboard: screenshot at {}", png.display());
}

/// What a person on call sees: `serve` with an alert file on a private
/// primary + replica; replay is paused on the replica while writes go on.
/// The page shows the replica lagging and the alert firing, the webhook
/// gets exactly one grouped notification; when replay resumes the alert
/// resolves, on the page too.
#[tokio::test]
async fn a_paused_replica_shows_on_the_page_fires_one_grouped_webhook_and_resolves() {
    use railyard::{Config, Database};
    let cluster = support::private_cluster("alerts", true).await;
    let dir = cluster.dir().to_path_buf();
    let (hook, got) = receiver().await;
    let rules = dir.join("alerts.toml");
    std::fs::write(
        &rules,
        format!(
            r#"
builtin = false
[[rule]]
name = "replica_lag"
metric = "replica_lag_bytes"
above = 0
for = "2s"
severity = "warning"
[grouping]
wait = "1s"
interval = "2s"
[channel.oncall]
type = "webhook"
url = "{hook}"
timeout = "2s"
[[route]]
severity = "warning"
channels = ["log", "oncall"]
"#
        ),
    )
    .unwrap();
    // A fresh database: the boot applies the risky partition_history, after
    // a dump into a directory removed at the end.
    let dumps = support::Dumps::new();
    let token_file = dir.join("control-token");
    std::fs::write(&token_file, format!("{CONTROL_TOKEN}\n")).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_railyard"));
    cmd.args(["serve", "--addr", "127.0.0.1:0", "--alerts"])
        .arg(&rules)
        .env_clear()
        .env(railyard_http::TOKEN_FILE_VAR, &token_file)
        .env(railyard::migrate::BACKUP_DIR_VAR, dumps.dir())
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", std::env::var_os("HOME").unwrap_or_default())
        .env(
            "DATABASE_URL",
            cluster.primary_socket_target("railyard").expose_url(),
        )
        .env(
            "DATABASE_REPLICA_URLS",
            cluster
                .replica_socket_target("railyard")
                .unwrap()
                .expose_url(),
        )
        .env("RAILYARD_SHUTDOWN_TIMEOUT", "2s")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().expect("the binary runs");
    let stdout = child.stdout.take().unwrap();
    let serve = Serve(child);
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let addr = loop {
        let line = lines
            .recv_timeout(Duration::from_secs(60))
            .expect("serve prints where it listens");
        if let Some(rest) = line.split("http://").nth(1) {
            break rest.trim().trim_end_matches('/').to_owned();
        }
    };
    let url = format!("http://{addr}/");
    let primary =
        Database::connect(Config::new(cluster.primary_socket_target("railyard")).pool_max_size(1))
            .await
            .unwrap();
    let replica_admin = Database::connect(
        Config::from_url(&format!(
            "{}&target_session_attrs=any",
            cluster
                .replica_socket_target("postgres")
                .unwrap()
                .expose_url()
        ))
        .unwrap()
        .pool_max_size(1),
    )
    .await
    .unwrap();
    let admin = async |sql: &str| {
        replica_admin
            .with_primary(async |c| {
                diesel_async::SimpleAsyncConnection::batch_execute(&mut **c, sql).await?;
                Ok::<_, railyard::Error>(())
            })
            .await
            .unwrap();
    };

    // Streaming and caught up: on the page, and no alert.
    let started = Instant::now();
    loop {
        if fetch(&addr, "/healthz").await.is_some() {
            let d = data(&addr, "").await;
            if d["latest"]["replicas"][0]["state"] == "healthy" {
                break;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the replica never showed healthy"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let browser = chromium();
    if browser.is_some() {
        let dom =
            without_script(&headless(&["--dump-dom", "--virtual-time-budget=4000"], &url).await);
        assert!(
            dom.contains("data-state=\"healthy\""),
            "the replica, healthy: {dom}"
        );
        assert!(dom.contains("no alerts"), "{dom}");
        screenshot(&url, "1-streaming.png").await;
    }
    assert!(got.lock().unwrap().is_empty());

    // Replay paused, writes go on: the lag grows.
    admin("SELECT pg_wal_replay_pause()").await;
    let writing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let writer = {
        let (primary, writing) = (primary.clone(), writing.clone());
        tokio::spawn(async move {
            let mut i = 0;
            while writing.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let email = format!("lag{i}-{}@example.test", std::process::id());
                let _ = primary
                    .with_primary(async |c| {
                        diesel_async::SimpleAsyncConnection::batch_execute(
                            &mut **c,
                            &format!("INSERT INTO users (email, name) VALUES ('{email}', 'lag')"),
                        )
                        .await?;
                        Ok::<_, railyard::Error>(())
                    })
                    .await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let paused = Instant::now();
    let fired = loop {
        let a = alerts_of(&addr).await;
        if let Some(alert) = a["alerts"].as_array().and_then(|v| {
            v.iter()
                .find(|x| x["rule"] == "replica_lag" && x["state"] == "firing")
        }) {
            break alert.clone();
        }
        // The rule's `for` (2 s), a sample (1 s) and a few seconds of slack.
        assert!(
            paused.elapsed() < Duration::from_secs(10),
            "no firing alert: {a}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let fired_after = paused.elapsed();
    eprintln!(
        "dashboard: replica_lag firing {fired_after:.1?} after replay was paused: {}",
        fired["summary"]
    );
    // The replica is ejected once it is over the lag bound (10 s behind).
    loop {
        let d = data(&addr, "").await;
        if d["latest"]["replicas"][0]["state"] == "lagging" {
            break;
        }
        assert!(
            paused.elapsed() < Duration::from_secs(30),
            "never lagging: {}",
            d["latest"]
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    if browser.is_some() {
        let dom =
            without_script(&headless(&["--dump-dom", "--virtual-time-budget=4000"], &url).await);
        assert!(
            dom.contains("data-state=\"lagging\""),
            "the replica, lagging: {dom}"
        );
        assert!(
            dom.contains("data-rule=\"replica_lag\" data-state=\"firing\""),
            "the firing alert: {dom}"
        );
        screenshot(&url, "2-replay-paused.png").await;
    }
    // Exactly one grouped notification for the firing group.
    tokio::time::sleep(Duration::from_secs(3)).await;
    {
        let got = got.lock().unwrap();
        let firing: Vec<&Value> = got.iter().filter(|n| n["status"] == "firing").collect();
        assert_eq!(firing.len(), 1, "{got:?}");
        assert_eq!(firing[0]["group"]["rule"], "replica_lag");
        assert_eq!(firing[0]["alerts"].as_array().unwrap().len(), 1);
        assert_eq!(firing[0]["alerts"][0]["labels"]["severity"], "warning");
        eprintln!("dashboard: the webhook got {}", firing[0]);
    }

    // The controls refuse a page on another name (DNS rebinding), and a
    // request without the token or with a wrong one; nothing changes.
    let silence_all = r#"{"matchers":{"severity":"warning"},"for_s":2592000,"comment":"x"}"#;
    for (host, headers, expected) in [
        (
            "evil.example",
            format!("Authorization: Bearer {CONTROL_TOKEN}\r\n"),
            421,
        ),
        ("evil.example:9187", String::new(), 421),
        ("localhost", String::new(), 401),
        (
            "localhost",
            "Authorization: Bearer test-control-token-6f1d2b\r\n".to_owned(),
            401,
        ),
        (
            "127.0.0.1",
            "Authorization: Basic dGVzdA==\r\n".to_owned(),
            401,
        ),
    ] {
        for (method, path, body) in [
            ("POST", "/alerts/silences", silence_all),
            ("POST", "/alerts/ack", "{}"),
            ("DELETE", "/alerts/silences/s1", ""),
        ] {
            let (status, _, _) = request_as(&addr, method, path, body, host, &headers).await;
            assert_eq!(
                status, expected,
                "{method} {path} as {host} with {headers:?}"
            );
        }
    }
    // Bounded in bytes: a body over 16 KiB is refused unread, a matcher
    // value over 256 bytes by the alerting (the 1.5 MB x 255 silences that
    // took the process to 1.1 GB).
    let big = format!(
        r#"{{"matchers":{{"rule":"{}"}},"for_s":60}}"#,
        "x".repeat(20_000)
    );
    assert_eq!(
        request(&addr, "POST", "/alerts/silences", &big).await.0,
        413
    );
    let long = format!(
        r#"{{"matchers":{{"rule":"{}"}},"for_s":60}}"#,
        "x".repeat(300)
    );
    assert_eq!(
        request(&addr, "POST", "/alerts/silences", &long).await.0,
        400
    );
    let (status, _, _) = request_as(&addr, "GET", "/alerts", "", "evil.example", "").await;
    assert_eq!(
        status, 421,
        "the alerts' view is not readable by a rebinding page"
    );
    let view = alerts_of(&addr).await;
    assert!(
        view["silences"].as_array().is_none_or(|s| s.is_empty())
            && view["alerts"][0]["acknowledged"] == false,
        "nothing changed: {view}"
    );

    // Acknowledged and silenced over HTTP, as the page's buttons do; the
    // silence is ended again so that the resolution is notified.
    let ack = request_as(
        &addr,
        "POST",
        "/alerts/ack",
        r#"{"rule":"replica_lag"}"#,
        "localhost",
        &format!("Authorization: bearer {CONTROL_TOKEN}\r\n"),
    )
    .await;
    let ack = (ack.0, ack.2);
    assert_eq!(ack.0, 200, "{ack:?}");
    assert_eq!(
        serde_json::from_str::<Value>(&ack.1).unwrap()["acknowledged"],
        1
    );
    let silence = post(
        &addr,
        "/alerts/silences",
        r#"{"matchers":{"rule":"replica_lag"},"for_s":3600,"comment":"test"}"#,
    )
    .await;
    assert_eq!(silence.0, 201, "{silence:?}");
    let id = serde_json::from_str::<Value>(&silence.1).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let view = alerts_of(&addr).await;
    let a = &view["alerts"][0];
    assert!(a["acknowledged"] == true && a["silenced"] == true, "{view}");
    assert_eq!(view["silences"][0]["id"], id.as_str());
    let bad = post(&addr, "/alerts/silences", r#"{"matchers":{},"for_s":60}"#).await;
    assert_eq!(bad.0, 400, "{bad:?}");
    let (status, _, _) = request(&addr, "DELETE", &format!("/alerts/silences/{id}"), "").await;
    assert_eq!(status, 204);
    assert_eq!(alerts_of(&addr).await["alerts"][0]["silenced"], false);

    // Replay resumes: the alert resolves, on the page too.
    writing.store(false, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    admin("SELECT pg_wal_replay_resume()").await;
    let resumed = Instant::now();
    loop {
        let a = alerts_of(&addr).await;
        if a["alerts"].as_array().is_some_and(|v| {
            v.iter()
                .any(|x| x["rule"] == "replica_lag" && x["state"] == "resolved")
        }) {
            break;
        }
        assert!(
            resumed.elapsed() < Duration::from_secs(20),
            "not resolved: {a}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "dashboard: resolved {:.1?} after replay resumed",
        resumed.elapsed()
    );
    if browser.is_some() {
        let dom =
            without_script(&headless(&["--dump-dom", "--virtual-time-budget=4000"], &url).await);
        assert!(
            dom.contains("data-rule=\"replica_lag\" data-state=\"resolved\""),
            "the resolved alert: {dom}"
        );
        screenshot(&url, "3-resolved.png").await;
    }
    let waited = Instant::now();
    while !got
        .lock()
        .unwrap()
        .iter()
        .any(|n| n["status"] == "resolved")
    {
        assert!(
            waited.elapsed() < Duration::from_secs(10),
            "no resolved notification"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        got.lock()
            .unwrap()
            .iter()
            .filter(|n| n["status"] == "firing")
            .count(),
        1
    );
    // Index advice on demand, as the page's button asks for it.
    let (status, head, body) = fetch(&addr, "/dashboard/advice").await.unwrap();
    assert_eq!(status, 200, "{head}{body}");
    let advice: Value = serde_json::from_str(&body).unwrap();
    assert!(advice["statements_examined"].is_u64(), "{advice}");
    assert_eq!(advice["verified"], true, "{advice}");
    drop(serve);
    primary.close(Duration::from_secs(2)).await;
    replica_admin.close(Duration::from_secs(2)).await;
    cluster.destroy().unwrap();
}
