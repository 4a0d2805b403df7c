//! The text exposition of a registry, as both binaries serve it on /metrics.

use prometheus::{Encoder, Registry, TextEncoder};

/// The content type Prometheus' text format is served with.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4";

pub fn render(registry: &Registry) -> String {
    let mut buf = Vec::new();
    TextEncoder::new().encode(&registry.gather(), &mut buf).expect("text encoding of a registry cannot fail");
    String::from_utf8(buf).expect("prometheus text is UTF-8")
}
