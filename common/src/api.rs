//! How the binaries reach the API server.
//!
//! In a pod, the in-cluster config points at the `kubernetes` Service, which
//! kube-proxy on the node turns into the API server's address. When the API
//! server restarts it takes its address out of that Service, and kube-proxy
//! then rejects the Service's ClusterIP until its own watch comes back, after
//! a backoff of its own. In the lab, after a 20 s outage, the last agent's
//! watch came back 31-47 s after the server was ready (BENCHMARKS.md), and
//! an e2e test once gave up on an agent that had not seen a new Node a
//! minute after the restart. `--api-server` names the API server (or
//! its load balancer) itself, as Calico's `kubernetes-services-endpoint` and
//! Cilium's `k8sServiceHost` do, so the overlay does not wait on kube-proxy.

use std::path::PathBuf;

use anyhow::Context;
use tracing::info;

#[derive(clap::Args, Debug, Clone, Default)]
pub struct ApiArgs {
    /// kubeconfig path; in-cluster config when unset.
    #[arg(long, env = "KUBECONFIG", global = true)]
    pub kubeconfig: Option<PathBuf>,
    /// The API server's URL (https://HOST:PORT), instead of the server of
    /// the in-cluster config or kubeconfig. Its serving certificate must
    /// name HOST.
    #[arg(long, value_name = "URL", env = "WEIR_API_SERVER", value_parser = parse_api_server, global = true)]
    pub api_server: Option<::http::Uri>,
}

/// `--api-server`: https, a host, and nothing after the port.
pub fn parse_api_server(s: &str) -> Result<::http::Uri, String> {
    // clap's error quotes the value and names the flag; these say what is wrong with it.
    let uri: ::http::Uri = s.parse().map_err(|e| format!("not a URL ({e})"))?;
    if uri.scheme_str() != Some("https") {
        return Err("the API server is reached over https: give https://HOST:PORT".into());
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("no host: give https://HOST:PORT".into());
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err("give only https://HOST:PORT, without a path".into());
    }
    Ok(uri)
}

/// The client config: `--kubeconfig`, else the in-cluster one; its server
/// replaced by `--api-server` when that is set.
pub async fn client_config(args: &ApiArgs) -> anyhow::Result<kube::Config> {
    let mut config = match &args.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("read kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?
        }
        None => kube::Config::incluster().context("no --kubeconfig and not running in a cluster")?,
    };
    if let Some(server) = &args.api_server {
        config.cluster_url = server.clone();
    }
    Ok(config)
}

pub async fn kube_client(args: &ApiArgs) -> anyhow::Result<kube::Client> {
    let config = client_config(args).await?;
    let via = match (&args.api_server, &args.kubeconfig) {
        (Some(_), _) => "--api-server",
        (None, Some(_)) => "--kubeconfig",
        (None, None) => "the in-cluster config (the kubernetes Service, through kube-proxy)",
    };
    info!(url = %config.cluster_url, via, "API server");
    Ok(kube::Client::try_from(config)?)
}

/// An error with every cause after it: kube's "client error (Connect)"
/// alone does not say whether the address refused, timed out or failed TLS.
pub fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        // Some wrappers repeat their source's text in their own.
        if !text.ends_with(&more) {
            text = format!("{text}: {more}");
        }
        cause = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_server_takes_https_host_and_port_only() {
        let ok = parse_api_server("https://198.18.0.2:6443").unwrap();
        assert_eq!((ok.host(), ok.port_u16()), (Some("198.18.0.2"), Some(6443)));
        assert!(parse_api_server("https://api.example:443/").is_ok());
        for (bad, says) in [
            ("http://198.18.0.2:6443", "https"),
            ("198.18.0.2:6443", "https"),
            ("https://198.18.0.2:6443/api", "without a path"),
            ("https://", "not a URL"),
            ("https:// x", "not a URL"),
        ] {
            let err = parse_api_server(bad).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn an_error_is_shown_with_its_causes() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused (os error 111)");
        let err = anyhow::Error::new(refused).context("tcp connect error").context("client error (Connect)");
        let shown = with_causes(err.as_ref());
        assert_eq!(shown, "client error (Connect): tcp connect error: Connection refused (os error 111)");
    }

    #[tokio::test]
    async fn api_server_replaces_the_kubeconfig_server_and_keeps_its_credentials() {
        let path = std::env::temp_dir().join(format!("weir-kubeconfig-{}", std::process::id()));
        std::fs::write(
            &path,
            "apiVersion: v1\nkind: Config\ncurrent-context: c\n\
             clusters: [{name: k, cluster: {server: 'https://10.96.0.1:443', insecure-skip-tls-verify: true}}]\n\
             users: [{name: u, user: {token: t0k}}]\n\
             contexts: [{name: c, context: {cluster: k, user: u}}]\n",
        )
        .unwrap();
        let mut args = ApiArgs { kubeconfig: Some(path.clone()), api_server: None };
        let plain = client_config(&args).await.unwrap();
        args.api_server = Some(parse_api_server("https://198.18.0.2:6443").unwrap());
        let direct = client_config(&args).await.unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(plain.cluster_url.to_string(), "https://10.96.0.1:443/");
        assert_eq!(direct.cluster_url.to_string(), "https://198.18.0.2:6443/");
        assert!(direct.auth_info.token.is_some(), "the kubeconfig's token was dropped");
        assert!(direct.accept_invalid_certs);
    }
}
