//! The metrics endpoint's connections: plain HTTP, or, for an endpoint other hosts reach,
//! TLS (`--metrics-tls-cert`, `--metrics-tls-key`) and a bearer token
//! (`--metrics-token-file`) that every scrape must present; and `/healthz` for probes,
//! which says only whether the agent's main loop answers.
use std::{path::Path, sync::Arc, time::Duration};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// How long a scraper may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What a scrape must get through before it is answered.
#[derive(Clone, Default)]
pub struct Guard {
    tls: Option<tokio_rustls::TlsAcceptor>,
    token: Option<Arc<str>>,
}

impl Guard {
    /// TLS from a PEM certificate chain and key, and a token from a file, each if given.
    pub fn new(
        tls: Option<(&Path, &Path)>,
        token_file: Option<&Path>,
    ) -> Result<Guard, crate::Error> {
        let tls = match tls {
            Some((cert, key)) => {
                let _ = rustls::crypto::ring::default_provider().install_default();
                let chain = CertificateDer::pem_file_iter(cert)
                    .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| {
                        crate::Error::BadFile(format!("--metrics-tls-cert {}: {e}", cert.display()))
                    })?;
                let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                    crate::Error::BadFile(format!("--metrics-tls-key {}: {e}", key.display()))
                })?;
                let config = rustls::ServerConfig::builder()
                    .with_no_client_auth()
                    .with_single_cert(chain, key)
                    .map_err(|e| {
                        crate::Error::BadFile(format!("--metrics-tls-cert and key: {e}"))
                    })?;
                Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
            }
            None => None,
        };
        let token = match token_file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    crate::Error::BadFile(format!("--metrics-token-file {}: {e}", path.display()))
                })?;
                let token = text.trim();
                if token.is_empty() {
                    return Err(crate::Error::BadFile(format!(
                        "--metrics-token-file {}: the file is empty",
                        path.display()
                    )));
                }
                Some(Arc::from(token))
            }
            None => None,
        };
        Ok(Guard { tls, token })
    }

    pub fn is_open(&self) -> bool {
        self.tls.is_none() && self.token.is_none()
    }

    /// A token sent without TLS can be read on the way.
    pub fn token_in_clear(&self) -> bool {
        self.tls.is_none() && self.token.is_some()
    }

    /// Answers one connection: `body` gives the exposition for an allowed `GET /metrics`.
    pub async fn serve<F: std::future::Future<Output = String>>(
        &self,
        stream: tokio::net::TcpStream,
        body: impl FnOnce() -> F,
    ) {
        match &self.tls {
            Some(acceptor) => {
                let Ok(Ok(stream)) =
                    tokio::time::timeout(REQUEST_TIMEOUT, acceptor.accept(stream)).await
                else {
                    return;
                };
                self.answer(stream, body).await;
            }
            None => self.answer(stream, body).await,
        }
    }

    async fn answer<S: AsyncRead + AsyncWrite + Unpin, F: std::future::Future<Output = String>>(
        &self,
        mut stream: S,
        body: impl FnOnce() -> F,
    ) {
        // The head may come in more than one read (TCP segments, TLS records).
        let mut request = Vec::with_capacity(1024);
        let read_head = async {
            let mut chunk = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&chunk[..n]),
                }
            }
        };
        if tokio::time::timeout(REQUEST_TIMEOUT, read_head).await.is_err() || request.is_empty() {
            return;
        }
        let head = String::from_utf8_lossy(&request).into_owned();
        let reply = if head.starts_with("GET /healthz ") {
            // For probes, which carry no token: whether the main loop answers, nothing more.
            let healthy = !body().await.is_empty();
            let (status, text) =
                if healthy { ("200 OK", "ok\n") } else { ("503 Service Unavailable", "") };
            format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                text.len()
            )
        } else if self.token.as_deref().is_none_or(|token| presents(&head, token)) {
            super::metrics::respond(&head, body).await
        } else {
            "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                .to_string()
        };
        let _ = stream.write_all(reply.as_bytes()).await;
        let _ = stream.shutdown().await;
    }
}

/// Whether the request head carries `Authorization: Bearer TOKEN`.
fn presents(head: &str, token: &str) -> bool {
    head.lines().any(|line| {
        let Some((name, value)) = line.split_once(':') else { return false };
        let value = value.trim().as_bytes();
        name.trim().eq_ignore_ascii_case("authorization")
            && value.len() > 7
            && value[..7].eq_ignore_ascii_case(b"bearer ")
            && constant_time_eq(value[7..].trim_ascii(), token.as_bytes())
    })
}

/// Compares without stopping at the first difference, so that the time taken does not tell
/// a guesser how much of the token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_must_be_presented_exactly() {
        let head = "GET /metrics HTTP/1.1\r\nHost: x\r\nauthorization: Bearer s3cret\r\n\r\n";
        assert!(presents(head, "s3cret"));
        assert!(!presents(head, "s3cre"));
        assert!(!presents("GET /metrics HTTP/1.1\r\n\r\n", "s3cret"));
        assert!(!presents(
            "GET /metrics HTTP/1.1\r\nAuthorization: Basic s3cret\r\n\r\n",
            "s3cret"
        ));
        // Not a character boundary at 7 bytes: no panic, no match.
        assert!(!presents(
            "GET /metrics HTTP/1.1\r\nAuthorization: abcdef\u{e9}\r\n\r\n",
            "s3cret"
        ));
    }
}
