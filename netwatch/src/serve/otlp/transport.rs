//! Sending one export request to the collector, over gRPC (tonic) or HTTP with protobuf
//! bodies (reqwest): with the user's headers, TLS for an `https` endpoint, a deadline, and
//! what the OTLP specification says about retrying.
use std::time::Duration;

use opentelemetry_proto::tonic::collector::{
    logs::v1::{
        ExportLogsServiceRequest, ExportLogsServiceResponse, logs_service_client::LogsServiceClient,
    },
    metrics::v1::{ExportMetricsServiceRequest, metrics_service_client::MetricsServiceClient},
};
use prost::Message as _;

use super::{Options, Protocol};

/// How long one export may take before it counts as failed.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// Worth trying again: the collector is unreachable, overloaded, or asked for it.
    #[error("{0} (will retry)")]
    Transient(String),
    /// The collector refused the data; sending it again would not help.
    #[error("{0}")]
    Refused(String),
}

pub enum Transport {
    Grpc { channel: tonic::transport::Channel, headers: tonic::metadata::MetadataMap },
    Http { client: reqwest::Client, base: String },
}

impl Transport {
    pub fn new(options: &Options) -> anyhow::Result<Transport> {
        let ca =
            match &options.ca_certificate {
                Some(path) => Some(std::fs::read(path).map_err(|e| {
                    anyhow::anyhow!("--otlp-ca-certificate {}: {e}", path.display())
                })?),
                None => None,
            };
        let endpoint = options.endpoint.as_str().trim_end_matches('/').to_string();
        match options.protocol {
            Protocol::Grpc => {
                let mut builder = tonic::transport::Endpoint::from_shared(endpoint.clone())
                    .map_err(|e| anyhow::anyhow!("--otlp {endpoint}: {e}"))?
                    .timeout(EXPORT_TIMEOUT)
                    .connect_timeout(EXPORT_TIMEOUT);
                if options.endpoint.scheme() == "https" {
                    let mut tls = tonic::transport::ClientTlsConfig::new().with_native_roots();
                    if let Some(pem) = &ca {
                        tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
                    }
                    builder = builder
                        .tls_config(tls)
                        .map_err(|e| anyhow::anyhow!("--otlp {endpoint}: TLS: {e}"))?;
                }
                let mut headers = tonic::metadata::MetadataMap::new();
                for (key, value) in &options.headers {
                    let key =
                        tonic::metadata::MetadataKey::from_bytes(key.to_lowercase().as_bytes())
                            .map_err(|e| anyhow::anyhow!("--otlp-header {key}: {e}"))?;
                    let value =
                        value.parse().map_err(|e| anyhow::anyhow!("--otlp-header {key}: {e}"))?;
                    headers.insert(key, value);
                }
                Ok(Transport::Grpc { channel: builder.connect_lazy(), headers })
            }
            Protocol::Http => {
                let mut headers = reqwest::header::HeaderMap::new();
                for (key, value) in &options.headers {
                    let key = reqwest::header::HeaderName::from_bytes(key.as_bytes())
                        .map_err(|e| anyhow::anyhow!("--otlp-header {key}: {e}"))?;
                    let value = reqwest::header::HeaderValue::from_str(value)
                        .map_err(|e| anyhow::anyhow!("--otlp-header {key}: {e}"))?;
                    headers.insert(key, value);
                }
                let mut client = reqwest::Client::builder()
                    .default_headers(headers)
                    .timeout(EXPORT_TIMEOUT)
                    .connect_timeout(EXPORT_TIMEOUT);
                if let Some(pem) = &ca {
                    let certificate = reqwest::Certificate::from_pem(pem).map_err(|e| {
                        anyhow::anyhow!("--otlp-ca-certificate: not a PEM certificate: {e}")
                    })?;
                    client = client.add_root_certificate(certificate);
                }
                let client = client.build().map_err(|e| anyhow::anyhow!("OTLP over HTTP: {e}"))?;
                Ok(Transport::Http { client, base: endpoint })
            }
        }
    }

    /// Sends `request`; the records the collector rejected (its `partial_success`).
    pub async fn logs(&self, request: &ExportLogsServiceRequest) -> Result<u64, ExportError> {
        let response = match self {
            Transport::Grpc { channel, headers } => {
                let mut client = LogsServiceClient::new(channel.clone());
                let mut request = tonic::Request::new(request.clone());
                *request.metadata_mut() = headers.clone();
                client.export(request).await.map_err(grpc_error)?.into_inner()
            }
            Transport::Http { client, base } => {
                let body =
                    post(client, &format!("{base}/v1/logs"), request.encode_to_vec()).await?;
                ExportLogsServiceResponse::decode(body.as_slice()).unwrap_or_default()
            }
        };
        Ok(response.partial_success.map_or(0, |p| p.rejected_log_records.max(0) as u64))
    }

    pub async fn metrics(&self, request: &ExportMetricsServiceRequest) -> Result<(), ExportError> {
        match self {
            Transport::Grpc { channel, headers } => {
                let mut client = MetricsServiceClient::new(channel.clone());
                let mut request = tonic::Request::new(request.clone());
                *request.metadata_mut() = headers.clone();
                client.export(request).await.map(drop).map_err(grpc_error)
            }
            Transport::Http { client, base } => {
                post(client, &format!("{base}/v1/metrics"), request.encode_to_vec()).await.map(drop)
            }
        }
    }
}

/// The specification's retryable gRPC codes.
fn grpc_error(status: tonic::Status) -> ExportError {
    use tonic::Code::*;
    let text = format!("gRPC {:?}: {}", status.code(), status.message());
    match status.code() {
        Cancelled | DeadlineExceeded | ResourceExhausted | Aborted | OutOfRange | Unavailable
        | DataLoss => ExportError::Transient(text),
        _ => ExportError::Refused(text),
    }
}

/// POSTs a protobuf body; the response's body.
async fn post(client: &reqwest::Client, url: &str, body: Vec<u8>) -> Result<Vec<u8>, ExportError> {
    let response = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/x-protobuf")
        .body(body)
        .send()
        .await
        .map_err(|e| ExportError::Transient(format!("{url}: {e}")))?;
    let status = response.status();
    if status.is_success() {
        let body =
            response.bytes().await.map_err(|e| ExportError::Transient(format!("{url}: {e}")))?;
        return Ok(body.to_vec());
    }
    let text = format!("{url}: HTTP {status}");
    // The specification's retryable statuses.
    if matches!(status.as_u16(), 429 | 502 | 503 | 504) {
        Err(ExportError::Transient(text))
    } else {
        Err(ExportError::Refused(text))
    }
}
