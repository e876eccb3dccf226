//! Where notifications go: `tracing` events, webhooks (an HTTP POST of JSON,
//! retried with backoff, from a bounded queue) and commands (a program with
//! the notification on its standard input, killed after a timeout). Sending
//! never waits: a full queue drops the notification and says so.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::config::ChannelConfig;
use super::engine::Notification;
use super::rules::Severity;

/// Notifications waiting per channel at most.
pub(crate) const QUEUE: usize = 64;

/// A webhook URL, parsed.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Url {
    pub(crate) tls: bool,
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) path: String,
}

/// Parses an `http://` or `https://` URL; the reason never repeats it.
pub(crate) fn parse_url(url: &str) -> Result<Url, &'static str> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err("use an http:// or https:// URL");
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.contains('@') {
        return Err("credentials in the URL are not supported; put a token in its path or query");
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
            h,
            p.parse::<u16>()
                .map_err(|_| "the port is not a number from 1 to 65535")?,
        ),
        _ => (authority, if tls { 443 } else { 80 }),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || port == 0 {
        return Err("it has no host");
    }
    if path.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err("its path has spaces or control characters; percent-encode them");
    }
    Ok(Url {
        tls,
        host: host.to_owned(),
        port,
        path: path.to_owned(),
    })
}

/// A URL as it may be printed: scheme and host, never path or query.
pub(crate) fn redacted_url(url: &str) -> String {
    match parse_url(url) {
        Ok(u) => format!(
            "{}://{}:{}/…",
            if u.tls { "https" } else { "http" },
            u.host,
            u.port
        ),
        Err(_) => "<invalid URL>".to_owned(),
    }
}

/// A channel ready to take notifications.
#[derive(Debug, Clone)]
pub(crate) struct Channel {
    name: String,
    queue: Option<tokio::sync::mpsc::Sender<Arc<Notification>>>,
    pub(crate) dropped: Arc<AtomicU64>,
}

impl Channel {
    /// The `log` channel: `tracing` events on target `railyard::alerts`.
    pub(crate) fn log() -> Self {
        Channel {
            name: "log".into(),
            queue: None,
            dropped: Arc::default(),
        }
    }

    /// A configured channel, its worker started on the current runtime.
    pub(crate) fn start(name: &str, config: ChannelConfig) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Arc<Notification>>(QUEUE);
        let label = name.to_owned();
        tokio::spawn(async move {
            while let Some(n) = rx.recv().await {
                let body = serde_json::to_vec(&*n).unwrap_or_default();
                let result = match &config {
                    ChannelConfig::Webhook {
                        url,
                        timeout,
                        attempts,
                    } => post_with_retries(url, &body, *timeout, *attempts).await,
                    ChannelConfig::Command {
                        program,
                        args,
                        timeout,
                    } => run_command(program, args, &body, *timeout).await,
                };
                if let Err(e) = result {
                    tracing::warn!(target: "railyard::alerts", channel = %label, error = %e, "a notification was not delivered");
                }
            }
        });
        Channel {
            name: name.to_owned(),
            queue: Some(tx),
            dropped: Arc::default(),
        }
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Hands a notification over without waiting.
    pub(crate) fn send(&self, n: &Arc<Notification>) {
        match &self.queue {
            None => log(n),
            Some(q) => {
                if q.try_send(n.clone()).is_err() {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(target: "railyard::alerts", channel = %self.name, "the channel's queue is full: a notification was dropped");
                }
            }
        }
    }
}

fn log(n: &Notification) {
    let alerts: Vec<&str> = n.alerts.iter().map(|a| a.summary.as_str()).collect();
    let status = match n.status {
        super::engine::AlertState::Firing => "firing",
        _ => "resolved",
    };
    match n.severity {
        Severity::Critical => {
            tracing::error!(target: "railyard::alerts", status, escalation = n.escalation, group = ?n.group, alerts = ?alerts, "alert")
        }
        Severity::Warning => {
            tracing::warn!(target: "railyard::alerts", status, escalation = n.escalation, group = ?n.group, alerts = ?alerts, "alert")
        }
        Severity::Info => {
            tracing::info!(target: "railyard::alerts", status, escalation = n.escalation, group = ?n.group, alerts = ?alerts, "alert")
        }
    }
}

async fn post_with_retries(
    url: &str,
    body: &[u8],
    timeout: Duration,
    attempts: u32,
) -> Result<(), String> {
    let url = parse_url(url).map_err(str::to_owned)?;
    let mut backoff = Duration::from_millis(200);
    let mut last = String::new();
    for attempt in 1..=attempts.max(1) {
        match tokio::time::timeout(timeout, post(&url, body)).await {
            Ok(Ok(status)) if (200..300).contains(&status) => return Ok(()),
            // A refusal that another try will not change.
            Ok(Ok(status)) if (400..500).contains(&status) && status != 408 && status != 429 => {
                return Err(format!("the receiver answered {status}"));
            }
            Ok(Ok(status)) => last = format!("the receiver answered {status}"),
            Ok(Err(e)) => last = e,
            Err(_) => last = format!("no answer within {timeout:?}"),
        }
        if attempt < attempts {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }
    Err(format!("{attempts} attempts failed; the last: {last}"))
}

/// One POST; the response's status code.
async fn post(url: &Url, body: &[u8]) -> Result<u16, String> {
    let tcp = tokio::net::TcpStream::connect((url.host.as_str(), url.port))
        .await
        .map_err(|e| format!("cannot connect to {}:{}: {e}", url.host, url.port))?;
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: railyard\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        url.path,
        url.host,
        body.len()
    );
    if url.tls {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(url.host.clone())
            .map_err(|_| "the host is not a valid TLS name".to_owned())?;
        let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        exchange(stream, head.as_bytes(), body).await
    } else {
        exchange(tcp, head.as_bytes(), body).await
    }
}

async fn exchange<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut s: S,
    head: &[u8],
    body: &[u8],
) -> Result<u16, String> {
    s.write_all(head).await.map_err(|e| e.to_string())?;
    s.write_all(body).await.map_err(|e| e.to_string())?;
    s.flush().await.map_err(|e| e.to_string())?;
    // The status line is all we need; read at most a little.
    let mut buf = vec![0u8; 256];
    let mut n = 0;
    while n < buf.len() && !buf[..n].contains(&b'\n') {
        let m = s.read(&mut buf[n..]).await.map_err(|e| e.to_string())?;
        if m == 0 {
            break;
        }
        n += m;
    }
    let line = String::from_utf8_lossy(&buf[..n]);
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| "the receiver's answer is not HTTP".to_owned())
}

async fn run_command(
    program: &std::path::Path,
    args: &[String],
    body: &[u8],
    timeout: Duration,
) -> Result<(), String> {
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
    let run = async {
        if let Some(mut stdin) = child.stdin.take() {
            // A program that exits without reading is its own business.
            let _ = stdin.write_all(body).await;
        }
        child.wait().await
    };
    let outcome = tokio::time::timeout(timeout, run).await;
    match outcome {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(format!("{} exited with {status}", program.display())),
        Ok(Err(e)) => Err(format!("{}: {e}", program.display())),
        Err(_) => {
            let _ = child.kill().await;
            Err(format!(
                "{} was killed after {timeout:?}",
                program.display()
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alert::engine::AlertState;

    fn note() -> Arc<Notification> {
        Arc::new(Notification {
            group: [("rule".to_owned(), "replica_lag".to_owned())].into(),
            status: AlertState::Firing,
            severity: Severity::Warning,
            escalation: false,
            alerts: Vec::new(),
            at_ms: 1,
        })
    }

    /// A receiver that answers each request with the next status, and
    /// passes each body on.
    async fn receiver(
        statuses: Vec<u16>,
    ) -> (String, tokio::sync::mpsc::UnboundedReceiver<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook?token=abc", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            for status in statuses {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Read the head and the body it announces.
                loop {
                    let n = s.read(&mut chunk).await.unwrap();
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len: usize = text
                            .lines()
                            .find_map(|l| l.strip_prefix("Content-Length: "))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + len || n == 0 {
                            let _ = tx.send(text[end + 4..].to_owned());
                            break;
                        }
                    }
                    if n == 0 {
                        break;
                    }
                }
                let _ = s
                    .write_all(
                        format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n").as_bytes(),
                    )
                    .await;
            }
        });
        (url, rx)
    }

    #[tokio::test]
    async fn a_webhook_is_retried_after_a_server_error_and_delivered_once() {
        let (url, mut bodies) = receiver(vec![503, 200]).await;
        let c = Channel::start(
            "hook",
            ChannelConfig::Webhook {
                url,
                timeout: Duration::from_secs(2),
                attempts: 3,
            },
        );
        c.send(&note());
        let first = bodies.recv().await.unwrap();
        let second = tokio::time::timeout(Duration::from_secs(5), bodies.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(first, second);
        let json: serde_json::Value = serde_json::from_str(&second).unwrap();
        assert_eq!(json["group"]["rule"], "replica_lag");
        assert_eq!(json["status"], "firing");
        assert!(
            tokio::time::timeout(Duration::from_millis(700), bodies.recv())
                .await
                .map_or(true, |b| b.is_none()),
            "delivered more than once"
        );
    }

    #[tokio::test]
    async fn a_command_gets_the_notification_on_stdin_and_a_slow_one_is_killed() {
        let dir = std::env::temp_dir().join(format!("railyard-alert-cmd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("got.json");
        let script = format!("cat > {}", out.display());
        run_command(
            std::path::Path::new("/bin/sh"),
            &["-c".to_owned(), script],
            &serde_json::to_vec(&*note()).unwrap(),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        let got: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        assert_eq!(got["severity"], "warning");
        let started = std::time::Instant::now();
        let e = run_command(
            std::path::Path::new("/bin/sleep"),
            &["10".to_owned()],
            b"{}",
            Duration::from_millis(200),
        )
        .await
        .unwrap_err();
        assert!(e.contains("killed after"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(2));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn webhook_urls_are_parsed_and_printed_without_their_path() {
        let u = parse_url("https://hooks.example.com/T000/B000/secret-token").unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port),
            (true, "hooks.example.com", 443)
        );
        assert_eq!(u.path, "/T000/B000/secret-token");
        assert_eq!(
            redacted_url("https://hooks.example.com/T000/B000/secret-token"),
            "https://hooks.example.com:443/…"
        );
        let u = parse_url("http://127.0.0.1:9000").unwrap();
        assert_eq!((u.port, u.path.as_str()), (9000, "/"));
        assert!(parse_url("http://[::1]:9000/x").is_ok());
        assert!(parse_url("ftp://x").is_err());
        assert!(parse_url("https://user:pw@x/").is_err());
        assert!(parse_url("http://x:99999/").is_err());
        assert!(parse_url("http://x/a b").is_err());
    }
}
