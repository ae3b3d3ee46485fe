//! Connections to coordinators: one gRPC channel to the coordinator the agent currently uses,
//! with the agent's credential on every call.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use davit_proto::agent::agent_service_client::AgentServiceClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// A connected coordinator.
#[derive(Clone)]
pub struct Coordinator {
    pub address: String,
    channel: Channel,
    credential: Arc<str>,
}

impl Coordinator {
    pub fn client(&self) -> AgentServiceClient<Channel> {
        AgentServiceClient::new(self.channel.clone())
            .max_decoding_message_size(16 * 1024 * 1024)
            .max_encoding_message_size(16 * 1024 * 1024)
    }

    /// A request carrying the agent's credential.
    pub fn authorize<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        let value = format!("Bearer {}", self.credential).parse().expect("credentials are ASCII");
        request.metadata_mut().insert("authorization", value);
        request
    }
}

/// Open a channel to `address` (`host:port`, or a full `http(s)://` URL); TLS when `ca_file` is set.
pub async fn channel(address: &str, ca_file: Option<&Path>) -> anyhow::Result<Channel> {
    let scheme = if ca_file.is_some() { "https" } else { "http" };
    let url = if address.contains("://") { address.to_string() } else { format!("{scheme}://{address}") };
    let mut endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| anyhow::anyhow!("coordinator address {address:?} is not valid: {e}"))?
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        // Windows above the 1 MiB default so that artifact downloads are not throttled to one
        // message per round trip.
        .initial_stream_window_size(8 << 20)
        .initial_connection_window_size(32 << 20)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    if let Some(ca_file) = ca_file {
        let pem = std::fs::read(ca_file).map_err(|e| anyhow::anyhow!("cannot read the CA file {}: {e}", ca_file.display()))?;
        endpoint = endpoint.tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))?;
    }
    endpoint.connect().await.map_err(|e| anyhow::anyhow!("cannot reach coordinator {url}: {e}"))
}

pub async fn connect(address: &str, ca_file: Option<&Path>, credential: &str) -> anyhow::Result<Coordinator> {
    Ok(Coordinator { address: address.to_string(), channel: channel(address, ca_file).await?, credential: Arc::from(credential) })
}
