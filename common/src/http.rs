//! /healthz, /readyz, /metrics and /status on one small HTTP/1.1 listener.
//! Hand-rolled: four fixed GET routes do not justify a web framework.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

pub struct Response {
    pub code: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    pub fn text(code: u16, body: impl Into<String>) -> Self {
        Response { code, content_type: "text/plain; charset=utf-8", body: body.into() }
    }
    pub fn json(body: String) -> Self {
        Response { code: 200, content_type: "application/json", body }
    }
}

pub type Router = Arc<dyn Fn(&str) -> Response + Send + Sync>;

impl Response {
    /// A /metrics page in Prometheus' text format.
    pub fn metrics(text: String) -> Self {
        Response { code: 200, content_type: crate::metrics::CONTENT_TYPE, body: text }
    }
}

/// Binds `addr` now (so a probe never meets a refused connection once this
/// returns) and serves `route` from a task.
pub async fn bind_and_serve(
    addr: std::net::SocketAddr,
    route: impl Fn(&str) -> Response + Send + Sync + 'static,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tokio::spawn(serve(listener, Arc::new(route)));
    Ok(())
}

pub async fn serve(listener: TcpListener, router: Router) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let router = router.clone();
        tokio::spawn(async move {
            let Ok(Some(head)) = tokio::time::timeout(Duration::from_secs(5), read_head(&mut sock)).await else {
                return;
            };
            let req = String::from_utf8_lossy(&head);
            let path = req.split_whitespace().nth(1).unwrap_or("/");
            let path = path.split('?').next().unwrap_or("/");
            let resp = router(path);
            let reason = match resp.code {
                200 => "OK",
                404 => "Not Found",
                _ => "Service Unavailable",
            };
            let head = format!(
                "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                resp.code,
                reason,
                resp.content_type,
                resp.body.len()
            );
            let _ = sock.write_all(head.as_bytes()).await;
            let _ = sock.write_all(resp.body.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

/// Reads up to the end of the request head; a request may arrive in pieces.
async fn read_head(sock: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = sock.read(&mut buf).await.ok()?;
        if n == 0 || head.len() > 16 * 1024 {
            return None;
        }
        head.extend_from_slice(&buf[..n]);
    }
    Some(head)
}

/// A blocking GET for `weir-agent status`; returns (code, body).
pub fn get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    // One write: write! would send the request in pieces.
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let code = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((code, body))
}
